//! The [`HttpSyncEngine`] service.

use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::task::{Context, Poll};

use ::http::{Request, Response};
use tower_service::Service;

use super::body::ResponseBody;
use super::future::ResponseFuture;
use super::overload::{Answer, EmptyOverloadBody, OverloadBody};
use crate::policy::Policy;
use crate::service::SyncEngine;
use crate::stats::Stats;

/// The HTTP flavour of [`SyncEngine`]: orders `Mode::Sync` requests per key until their
/// response bodies end, and passes `Mode::Concurrent` requests straight through.
///
/// Built by [`HttpSyncEngineLayer`](super::HttpSyncEngineLayer) (from
/// [`SyncEngineLayer::for_http`](crate::SyncEngineLayer::for_http)), or by
/// [`HttpSyncEngine::new`] for a domain of its own.
///
/// - **Response:** the inner response with its body wrapped in a [`ResponseBody`], which
///   holds a `Mode::Sync` request's key until the body has ended or been dropped.
/// - **Error:** the inner service's error, unchanged (`Infallible` stays `Infallible`).
/// - **Overload:** a request rejected by `max_queue_per_key` or `max_keys` is answered,
///   by default, with `503 Service Unavailable`, an empty body (`ResBody::default()`)
///   and the [`Overloaded`](crate::error::Overloaded) value in the response's
///   extensions; the layer's [`overload_status`](super::HttpSyncEngineLayer::overload_status),
///   [`retry_after`](super::HttpSyncEngineLayer::retry_after) and
///   [`describe_overload`](super::HttpSyncEngineLayer::describe_overload) change that
///   answer, and the type parameter `D` records which body it has ([`OverloadBody`]).
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
pub struct HttpSyncEngine<S, P, K, H = RandomState, D = EmptyOverloadBody> {
    /// The plain service of the same domain: the HTTP flavour differs only in what its
    /// response future does with the claim and with an overload.
    plain: SyncEngine<S, P, K, H>,
    /// Copied into each response future, which answers an overload with it.
    answer: Answer<D>,
}

impl<S, P, K> HttpSyncEngine<S, P, K> {
    /// Wraps `inner` in a new ordering domain of its own, with default settings.
    ///
    /// Equivalent to `SyncEngineLayer::new(policy).for_http().layer(inner)`; use the layer
    /// to share one domain between several services or to change the settings.
    pub fn new(inner: S, policy: P) -> Self {
        HttpSyncEngine::new_in(SyncEngine::new(inner, policy), Answer::new())
    }
}

impl<S, P, K, H, D> HttpSyncEngine<S, P, K, H, D> {
    /// The HTTP flavour of `plain`, in its domain, answering an overload with `answer`.
    pub(crate) fn new_in(plain: SyncEngine<S, P, K, H>, answer: Answer<D>) -> Self {
        HttpSyncEngine { plain, answer }
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

impl<S, P, K, H, D, ReqBody, ResBody> Service<Request<ReqBody>> for HttpSyncEngine<S, P, K, H, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    P: Policy<Request<ReqBody>, Key = K>,
    K: Hash + Eq,
    H: BuildHasher,
    ResBody: http_body::Body + Default,
    D: OverloadBody<ResBody>,
{
    type Response = Response<ResponseBody<ResBody, K>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, K, D>;

    /// Always ready: inner readiness is polled for each request, inside `call()` when the
    /// request can start at once, otherwise by its response future once its turn has
    /// come.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// Classifies the request and, for `Mode::Sync`, takes its place in its key's line
    /// before returning. A request over a configured limit gets a future that resolves
    /// at once to the layer's overload answer (`503` by default).
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
        let mut future: Self::Future = self.plain.start(request);
        // Set in place: the future, request and all, is already where it is returned.
        future.set_answer(self.answer);
        future
    }
}

impl<S: Clone, P: Clone, K, H, D> Clone for HttpSyncEngine<S, P, K, H, D> {
    fn clone(&self) -> Self {
        HttpSyncEngine {
            plain: self.plain.clone(),
            answer: self.answer,
        }
    }
}

impl<S: fmt::Debug, P, K, H, D> fmt::Debug for HttpSyncEngine<S, P, K, H, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HttpSyncEngine")
            .field(&self.plain)
            .field(&self.answer)
            .finish()
    }
}
