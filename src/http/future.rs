//! The response future of [`HttpSyncEngine`](super::HttpSyncEngine).
//!
//! The same [`Turn`](crate::turn) as the plain flavour's future; what differs is where
//! the claim goes when the inner future has completed: into the response body, which
//! releases it when the body ends, instead of being dropped here.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use ::http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::ResponseBody;
use super::overload::{Answer, EmptyOverloadBody, OverloadBody};
use crate::turn::{Ended, Turn};

pin_project! {
    /// Response future of [`HttpSyncEngine`](super::HttpSyncEngine).
    ///
    /// It resolves to the inner service's response with its body wrapped in a
    /// [`ResponseBody`] (which, for a `Mode::Sync` request, now holds the key), to the
    /// inner service's error (the key is released first), or to the layer's answer to an
    /// overload (`503 Service Unavailable` by default; `D` is its [`OverloadBody`]) when
    /// a limit rejected the request. For a `Mode::Sync` request it first waits for the
    /// request's turn on its key; dropping it at any point gives the turn up.
    ///
    /// It is `Send` when the inner service, its future, the request and the key are.
    /// Polling it again after it has completed panics.
    pub struct ResponseFuture<S, ReqBody, K, D = EmptyOverloadBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        turn: Turn<S, Request<ReqBody>, K>,
        answer: Answer<D>,
    }
}

impl<S, ReqBody, K, D> From<Turn<S, Request<ReqBody>, K>> for ResponseFuture<S, ReqBody, K, D>
where
    S: Service<Request<ReqBody>>,
{
    // Answers an overload with the default answer until `set_answer`.
    #[inline]
    fn from(turn: Turn<S, Request<ReqBody>, K>) -> Self {
        ResponseFuture {
            turn,
            answer: Answer::new(),
        }
    }
}

impl<S, ReqBody, K, D> ResponseFuture<S, ReqBody, K, D>
where
    S: Service<Request<ReqBody>>,
{
    /// Answers an overload with the service's `answer`.
    #[inline]
    pub(super) fn set_answer(&mut self, answer: Answer<D>) {
        self.answer = answer;
    }
}

impl<S, ReqBody, ResBody, K, D> Future for ResponseFuture<S, ReqBody, K, D>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body + Default,
    D: OverloadBody<ResBody>,
{
    type Output = Result<Response<ResponseBody<ResBody, K>>, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match ready!(this.turn.poll(cx)) {
            // The inner future is gone; the key now belongs to the body.
            Ended::Answered(Ok(response), claim) => {
                Ok(response.map(|body| ResponseBody::new(body, claim)))
            }
            Ended::Answered(Err(error), claim) => {
                drop(claim);
                Err(error)
            }
            Ended::Rejected(overloaded) => Ok(this.answer.respond(overloaded)),
        })
    }
}

impl<S, ReqBody, K, D> fmt::Debug for ResponseFuture<S, ReqBody, K, D>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("state", &self.turn.describe())
            .finish()
    }
}
