//! The [`HttpSyncEngine`] service.

use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::task::{Context, Poll};

use ::http::{Request, Response};
use tower_service::Service;

use super::body::ResponseBody;
use super::future::ResponseFuture;
use crate::policy::Policy;
use crate::service::SyncEngine;
use crate::stats::Stats;

/// The HTTP flavour of [`SyncEngine`](crate::SyncEngine): orders `Mode::Sync` requests
/// per key until their response bodies end, and passes `Mode::Concurrent` requests
/// straight through.
///
/// Built by [`HttpSyncEngineLayer`](super::HttpSyncEngineLayer) (from
/// [`SyncEngineLayer::for_http`](crate::SyncEngineLayer::for_http)), or by
/// [`HttpSyncEngine::new`] for a domain of its own.
///
/// - **Response:** the inner response with its body wrapped in a [`ResponseBody`], which
///   holds a `Mode::Sync` request's key until the body has ended or been dropped.
/// - **Error:** the inner service's error, unchanged (`Infallible` stays `Infallible`).
/// - **Overload:** a request rejected by `max_queue_per_key` or `max_keys` is answered
///   with `503 Service Unavailable`, an empty body (`ResBody::default()`) and the
///   [`Overloaded`](crate::error::Overloaded) value in the response's extensions.
///
/// Readiness is as for [`SyncEngine`](crate::SyncEngine#readiness): always ready. A
/// `Mode::Concurrent` request, and a `Mode::Sync` request whose key is free, reach the
/// inner service inside `call()`, in the caller's thread, task and runtime; a request
/// that waits for its key reaches it from its response future once its turn has come
/// (see [Where the inner service runs](crate::SyncEngine#where-the-inner-service-runs)).
///
/// ```
/// use axum::body::Body;
/// use axum::http::{Request, Response, StatusCode};
/// use tower::{Service, ServiceExt, service_fn};
/// use tower_sync_engine::http::{HttpSyncEngine, by_header};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let handler = service_fn(|_: Request<Body>| async {
///     Ok::<_, std::convert::Infallible>(Response::new(Body::from("done")))
/// });
/// let mut service = HttpSyncEngine::new(handler, by_header("x-session-id"));
///
/// let request = Request::get("/").header("x-session-id", "alice").body(Body::empty());
/// let response = service.ready().await.unwrap().call(request.unwrap()).await.unwrap();
/// assert_eq!(response.status(), StatusCode::OK);
/// assert_eq!(service.stats().in_flight, 1, "the body still holds the session");
/// drop(response);
/// assert!(service.stats().is_idle());
/// # }
/// ```
pub struct HttpSyncEngine<S, P, K, H = RandomState> {
    /// The plain service of the same domain: the HTTP flavour differs only in what its
    /// response future does with the claim and with an overload.
    plain: SyncEngine<S, P, K, H>,
}

impl<S, P, K> HttpSyncEngine<S, P, K> {
    /// Wraps `inner` in a new ordering domain of its own, with default settings.
    ///
    /// Equivalent to `SyncEngineLayer::new(policy).for_http().layer(inner)`; use the layer
    /// to share one domain between several services or to change the settings.
    pub fn new(inner: S, policy: P) -> Self {
        HttpSyncEngine::new_in(SyncEngine::new(inner, policy))
    }
}

impl<S, P, K, H> HttpSyncEngine<S, P, K, H> {
    /// The HTTP flavour of `plain`, in its domain.
    pub(crate) fn new_in(plain: SyncEngine<S, P, K, H>) -> Self {
        HttpSyncEngine { plain }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        self.plain.get_ref()
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        self.plain.get_mut()
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.plain.into_inner()
    }

    /// Current counts of the ordering domain this service belongs to. A `Mode::Sync`
    /// request counts as in flight until its response body has ended or been dropped.
    pub fn stats(&self) -> Stats {
        self.plain.stats()
    }
}

impl<S, P, K, H, ReqBody, ResBody> Service<Request<ReqBody>> for HttpSyncEngine<S, P, K, H>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    P: Policy<Request<ReqBody>, Key = K>,
    K: Hash + Eq,
    H: BuildHasher,
    ResBody: http_body::Body + Default,
{
    type Response = Response<ResponseBody<ResBody, K>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, K>;

    /// Always ready: inner readiness is polled for each request, inside `call()` when the
    /// request can start at once, otherwise by its response future once its turn has
    /// come.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// Classifies the request and, for `Mode::Sync`, takes its place in its key's line
    /// before returning. A request over a configured limit gets a future that resolves
    /// at once to a `503` response.
    ///
    /// A `Mode::Concurrent` request, and a `Mode::Sync` request whose key is free, reach
    /// the inner service here: its `poll_ready` (with a no-op waker) and, when that is
    /// ready, its `call` run inside this `call()`, in the caller's thread, task and
    /// runtime, under any lock the caller holds. A request that waits for its key
    /// reaches it from its response future once its turn has come. So make `call()`
    /// where the inner stack can run: inside the runtime if an inner layer such as
    /// `Timeout` needs its timer (see
    /// [Where the inner service runs](crate::SyncEngine#where-the-inner-service-runs)).
    #[inline]
    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        self.plain.start(request)
    }
}

impl<S: Clone, P: Clone, K, H> Clone for HttpSyncEngine<S, P, K, H> {
    fn clone(&self) -> Self {
        HttpSyncEngine {
            plain: self.plain.clone(),
        }
    }
}

impl<S: fmt::Debug, P, K, H> fmt::Debug for HttpSyncEngine<S, P, K, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HttpSyncEngine").field(&self.plain).finish()
    }
}
