//! The [`HttpSyncEngineLayer`].

use std::fmt;
use std::hash::RandomState;
use std::num::NonZeroU32;
use std::time::Duration;

use ::http::StatusCode;
use tower_layer::Layer;

use super::overload::{Answer, EmptyOverloadBody, TextOverloadBody};
use super::service::HttpSyncEngine;
use crate::layer::SyncEngineLayer;
use crate::stats::Stats;

/// Applies [`HttpSyncEngine`] to HTTP services; made by
/// [`SyncEngineLayer::for_http`](crate::SyncEngineLayer::for_http).
///
/// It is the same ordering domain as the [`SyncEngineLayer`] it was made from: the same
/// settings, the same keys, the same [`Stats`]. Every service it builds, and every clone
/// of the layer and of those services, shares that domain, so it works under axum, which
/// applies a layer once per route and clones the service for every request.
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
///
/// # The answer to an overload
///
/// A request rejected by `max_queue_per_key` or `max_keys` is answered by the layer
/// itself: `503 Service Unavailable` with an empty body by default. The
/// [`Overloaded`](crate::error::Overloaded) value is in the response's extensions
/// whatever the settings below. They belong to this layer value, not to the domain: two
/// HTTP layers of one domain may answer differently, and the services a layer has
/// built keep the answer they were built with.
///
/// - [`overload_status`](Self::overload_status): another status, such as `429 Too
///   Many Requests`.
/// - [`retry_after`](Self::retry_after): a `Retry-After` header.
/// - [`describe_overload`](Self::describe_overload): a short text body naming the limit
///   that was hit; off by default, so that nothing about the server's limits reaches a
///   client unless asked for.
///
/// ```
/// use std::time::Duration;
/// use axum::http::StatusCode;
/// use tower_sync_engine::SyncEngineLayer;
/// use tower_sync_engine::http::by_header;
///
/// let layer = SyncEngineLayer::new(by_header("x-session-id"))
///     .max_queue_per_key(32)
///     .max_keys(10_000)
///     .for_http()
///     .overload_status(StatusCode::TOO_MANY_REQUESTS)
///     .retry_after(Duration::from_secs(1))
///     .describe_overload();
/// # let _: &tower_sync_engine::http::HttpSyncEngineLayer<_, axum::http::HeaderValue, _, _> = &layer;
/// ```
pub struct HttpSyncEngineLayer<P, K, H = RandomState, D = EmptyOverloadBody> {
    plain: SyncEngineLayer<P, K, H>,
    answer: Answer<D>,
}

impl<P, K, H> HttpSyncEngineLayer<P, K, H> {
    /// The HTTP flavour of `plain`'s domain, answering an overload with an empty `503`.
    pub(crate) fn new(plain: SyncEngineLayer<P, K, H>) -> Self {
        HttpSyncEngineLayer {
            plain,
            answer: Answer::new(),
        }
    }
}

impl<P, K, H, D> HttpSyncEngineLayer<P, K, H, D> {
    /// The status of the answer to a request that a limit rejected (default: `503
    /// Service Unavailable`). `429 Too Many Requests` is the usual alternative, for a
    /// server that treats a full line as one client sending too fast.
    ///
    /// # Panics
    ///
    /// If `status` is not a client or server error (`4xx` or `5xx`): a rejected request
    /// was not served, and a client or proxy must not take its answer for a success or a
    /// redirect.
    #[track_caller]
    pub fn overload_status(mut self, status: StatusCode) -> Self {
        if !(status.is_client_error() || status.is_server_error()) {
            panic!("overload_status must be a 4xx or 5xx error status, got {status}");
        }
        self.answer = self.answer.with_status(status);
        self
    }

    /// Adds `Retry-After` to every answer to a request that a limit rejected: `after`
    /// in whole seconds, rounded up (a second and a half is `Retry-After: 2`), at most
    /// `u32::MAX` seconds. Default: no `Retry-After`.
    ///
    /// # Panics
    ///
    /// If `after` is zero, which would ask clients to retry an overloaded server at once.
    #[track_caller]
    pub fn retry_after(mut self, after: Duration) -> Self {
        let seconds = after
            .as_secs()
            .saturating_add(u64::from(after.subsec_nanos() > 0));
        let Some(seconds) = NonZeroU32::new(u32::try_from(seconds).unwrap_or(u32::MAX)) else {
            panic!("retry_after must be more than zero, got {after:?}")
        };
        self.answer = self.answer.with_retry_after(seconds);
        self
    }

    /// Answers a request that a limit rejected with a short text body that names the
    /// limit: the [`Overloaded`](crate::error::Overloaded) error's message, such as
    /// `request rejected: too many live keys (max_keys)`, with `Content-Type:
    /// text/plain; charset=utf-8`. Off by default, when the body is empty.
    ///
    /// The services' response body type must then implement `From<String>`, as axum's
    /// `Body` and `http_body_util::Full` do; the layer's type records the choice
    /// ([`TextOverloadBody`] in place of [`EmptyOverloadBody`]), so that a layer without
    /// it asks nothing more of the body than `Default`.
    pub fn describe_overload(self) -> HttpSyncEngineLayer<P, K, H, TextOverloadBody> {
        HttpSyncEngineLayer {
            plain: self.plain,
            answer: self.answer.with_body(),
        }
    }

    /// Current counts of this layer's ordering domain. A `Mode::Sync` request counts as
    /// in flight until its response body has ended or been dropped.
    pub fn stats(&self) -> Stats {
        self.plain.stats()
    }
}

impl<S, P: Clone, K, H, D> Layer<S> for HttpSyncEngineLayer<P, K, H, D> {
    type Service = HttpSyncEngine<S, P, K, H, D>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpSyncEngine::new_in(self.plain.layer(inner), self.answer)
    }
}

impl<P: Clone, K, H, D> Clone for HttpSyncEngineLayer<P, K, H, D> {
    fn clone(&self) -> Self {
        HttpSyncEngineLayer {
            plain: self.plain.clone(),
            answer: self.answer,
        }
    }
}

impl<P, K, H, D> fmt::Debug for HttpSyncEngineLayer<P, K, H, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HttpSyncEngineLayer")
            .field(&self.plain)
            .field(&self.answer)
            .finish()
    }
}
