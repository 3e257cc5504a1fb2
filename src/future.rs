//! The response future of [`SyncEngine`](crate::SyncEngine).
//!
//! A `Mode::Sync` future goes through three steps:
//!
//! 1. wait for its turn on the key (the place in line was taken in `call()`);
//! 2. drive its own handle on the inner service to readiness;
//! 3. call the inner service and drive the returned future.
//!
//! Readiness is polled only after the turn is won, so a request waiting behind its key
//! never holds inner capacity (a `Buffer` slot, a `ConcurrencyLimit` permit) that
//! another key could use. A `Mode::Concurrent` future skips step 1.
//!
//! The claim on the key is dropped as soon as the inner future completes, and with the
//! future in every other case; its `Drop` hands the key to the next request.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::error::{BoxError, Overloaded};
use crate::registry::Claim;

pin_project! {
    /// Response future of [`SyncEngine`](crate::SyncEngine).
    ///
    /// It is `Send` when the inner service, its future, the request and the key are.
    pub struct ResponseFuture<S, Req, K, H>
    where
        S: Service<Req>,
    {
        // Declared before the claim, so that when the whole future is dropped the
        // inner future is gone before the next request on the key may start.
        #[pin]
        state: State<S, Req, S::Future>,
        claim: Option<Claim<K, H>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req, F> {
        // Waiting for the key's turn, then for the inner service to be ready.
        Waiting { service: S, request: Option<Req> },
        Called { #[pin] future: F },
        Rejected { error: Overloaded },
        Done,
    }
}

impl<S, Req, K, H> ResponseFuture<S, Req, K, H>
where
    S: Service<Req>,
{
    pub(crate) fn new(service: S, request: Req, claim: Option<Claim<K, H>>) -> Self {
        ResponseFuture {
            state: State::Waiting {
                service,
                request: Some(request),
            },
            claim,
        }
    }

    pub(crate) fn rejected(error: Overloaded) -> Self {
        ResponseFuture {
            state: State::Rejected { error },
            claim: None,
        }
    }
}

impl<S, Req, K, H> Future for ResponseFuture<S, Req, K, H>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { service, request } => {
                    if let Some(claim) = this.claim.as_mut() {
                        ready!(claim.poll_turn(cx));
                    }
                    if let Err(error) = ready!(service.poll_ready(cx)) {
                        this.state.set(State::Done);
                        *this.claim = None;
                        return Poll::Ready(Err(error.into()));
                    }
                    let request = request.take().expect("request is present until called");
                    let future = service.call(request);
                    if let Some(claim) = this.claim.as_mut() {
                        claim.started();
                    }
                    this.state.set(State::Called { future });
                }
                StateProj::Called { future } => {
                    let output = ready!(future.poll(cx));
                    this.state.set(State::Done);
                    *this.claim = None;
                    return Poll::Ready(output.map_err(Into::into));
                }
                StateProj::Rejected { error } => {
                    let error = *error;
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error.into()));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S, Req, K, H> fmt::Debug for ResponseFuture<S, Req, K, H>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } if self.claim.is_some() => "waiting for its key or readiness",
            State::Waiting { .. } => "waiting for readiness",
            State::Called { .. } => "called",
            State::Rejected { .. } => "rejected",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("claim", &self.claim)
            .finish()
    }
}
