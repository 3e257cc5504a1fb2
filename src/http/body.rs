//! The [`ResponseBody`] that carries a request's key until the response is done.
//!
//! For a `Mode::Sync` request the body owns the request's claim on its key. The claim
//! is dropped, which passes the key to the next request, at the first of:
//!
//! - the response is built and its body is already at its end (`is_end_stream()`), as
//!   for `204`, `304`, a `HEAD` response or an empty body: nobody has to poll it;
//! - `poll_frame` returns `None` (the end) or an error (the body can go no further);
//! - `poll_frame` returns a frame and the inner body then reports `is_end_stream()`: a
//!   server that checks `is_end_stream` stops polling there, and may keep the body until
//!   the connection's next request;
//! - the body is dropped: the client went away, the server gave up on the connection,
//!   or an outer layer replaced the body.
//!
//! A `Mode::Concurrent` body holds no claim, and polling it costs one branch more than
//! polling the inner body.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::registry::Claim;

pin_project! {
    /// Response body of [`HttpSyncEngine`](super::HttpSyncEngine): the inner body, and for
    /// a `Mode::Sync` request its key, held until the body has ended or been dropped.
    ///
    /// Frames, errors, [`size_hint`] and [`is_end_stream`] are the inner body's,
    /// unchanged; trailers pass through as the frames they are.
    ///
    /// [`size_hint`]: https://docs.rs/http-body/1/http_body/trait.Body.html#method.size_hint
    /// [`is_end_stream`]: https://docs.rs/http-body/1/http_body/trait.Body.html#method.is_end_stream
    ///
    /// ```
    /// use axum::body::Body;
    /// use axum::http::{Request, Response};
    /// use http_body_util::BodyExt;
    /// use tower::{Service, ServiceExt, service_fn};
    /// use tower_sync_engine::http::{HttpSyncEngine, by_header};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let report = service_fn(|_: Request<Body>| async {
    ///     Ok::<_, std::convert::Infallible>(Response::new(Body::from("a long report")))
    /// });
    /// let mut service = HttpSyncEngine::new(report, by_header("x-session-id"));
    /// let request = Request::get("/report").header("x-session-id", "alice").body(Body::empty());
    /// let body = service.ready().await.unwrap().call(request.unwrap()).await.unwrap().into_body();
    ///
    /// assert_eq!(service.stats().in_flight, 1);
    /// assert_eq!(body.collect().await.unwrap().to_bytes(), "a long report");
    /// assert!(service.stats().is_idle(), "read to its end, the body let the session go");
    /// # }
    /// ```
    pub struct ResponseBody<B, K> {
        #[pin]
        inner: B,
        // Declared after `inner`, so that dropping the body drops the inner body (and
        // whatever of the handler's it still owns) before the key passes on.
        claim: Option<Claim<K>>,
    }
}

impl<B: Body, K> ResponseBody<B, K> {
    /// The body of an answered request; `claim` is `None` for a `Mode::Concurrent` one.
    #[inline]
    pub(crate) fn new(inner: B, claim: Option<Claim<K>>) -> Self {
        // A body that is already at its end has nothing to wait for, and may never be
        // polled at all: the key passes on now.
        let claim = claim.filter(|_| !inner.is_end_stream());
        ResponseBody { inner, claim }
    }
}

impl<B, K> ResponseBody<B, K> {
    /// A body that holds no key.
    #[inline]
    pub(crate) fn new_released(inner: B) -> Self {
        ResponseBody { inner, claim: None }
    }
}

impl<B: Body, K> Body for ResponseBody<B, K> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        // The only work a body without a key adds.
        if this.claim.is_some() && has_ended(&polled, &*this.inner) {
            *this.claim = None;
        }
        polled
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What `poll_frame` returns.
type Polled<B> = Poll<Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>>;

/// Whether the body is done after a poll that returned `polled`.
#[inline]
fn has_ended<B: Body>(polled: &Polled<B>, inner: &B) -> bool {
    match polled {
        Poll::Pending => false,
        Poll::Ready(None | Some(Err(_))) => true,
        Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
    }
}

impl<B: Default, K> Default for ResponseBody<B, K> {
    /// An empty inner body, holding no key; tower-http's `TimeoutLayer` outside this
    /// layer uses it for its `408` response.
    fn default() -> Self {
        ResponseBody::new_released(B::default())
    }
}

impl<B: fmt::Debug, K> fmt::Debug for ResponseBody<B, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("holds_key", &self.claim.is_some())
            .finish()
    }
}
