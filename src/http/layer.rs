//! The [`HttpSyncEngineLayer`].

use std::fmt;
use std::hash::RandomState;

use tower_layer::Layer;

use super::service::HttpSyncEngine;
use crate::layer::SyncEngineLayer;
use crate::stats::Stats;

/// Applies [`HttpSyncEngine`] to HTTP services; made by
/// [`SyncEngineLayer::for_http`](crate::SyncEngineLayer::for_http).
///
/// It is the same ordering domain as the [`SyncEngineLayer`](crate::SyncEngineLayer) it
/// was made from: the same settings, the same keys, the same [`Stats`]. Every service it
/// builds, and every clone of the layer and of those services, shares that domain, so it
/// works under axum, which applies a layer once per route and clones the service for
/// every request.
///
/// ```
/// use axum::{Router, body::Body, http::Request, routing::post};
/// use tower::ServiceExt;
/// use tower_sync_engine::SyncEngineLayer;
/// use tower_sync_engine::http::by_header;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = SyncEngineLayer::new(by_header("x-session-id")).max_queue_per_key(32).for_http();
/// let app: Router = Router::new()
///     .route("/edit", post(|| async { "saved" }))
///     .layer(layer.clone());
///
/// let request = Request::post("/edit").header("x-session-id", "alice").body(Body::empty());
/// let response = app.oneshot(request.unwrap()).await.unwrap();
/// // The session is held by the response body, until it is read to its end or dropped.
/// assert_eq!(layer.stats().in_flight, 1);
/// drop(response);
/// assert!(layer.stats().is_idle());
/// # }
/// ```
pub struct HttpSyncEngineLayer<P, K, H = RandomState> {
    plain: SyncEngineLayer<P, K, H>,
}

impl<P, K, H> HttpSyncEngineLayer<P, K, H> {
    /// The HTTP flavour of `plain`'s domain.
    pub(crate) fn new(plain: SyncEngineLayer<P, K, H>) -> Self {
        HttpSyncEngineLayer { plain }
    }

    /// Current counts of this layer's ordering domain. A `Mode::Sync` request counts as
    /// in flight until its response body has ended or been dropped.
    pub fn stats(&self) -> Stats {
        self.plain.stats()
    }
}

impl<S, P: Clone, K, H> Layer<S> for HttpSyncEngineLayer<P, K, H> {
    type Service = HttpSyncEngine<S, P, K, H>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpSyncEngine::new_in(self.plain.layer(inner))
    }
}

impl<P: Clone, K, H> Clone for HttpSyncEngineLayer<P, K, H> {
    fn clone(&self) -> Self {
        HttpSyncEngineLayer {
            plain: self.plain.clone(),
        }
    }
}

impl<P, K, H> fmt::Debug for HttpSyncEngineLayer<P, K, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HttpSyncEngineLayer")
            .field(&self.plain)
            .finish()
    }
}
