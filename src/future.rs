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
//! another key could use.
//!
//! A `Mode::Concurrent` request whose inner service was ready in `call()` starts in
//! step 3; otherwise it starts in step 2.
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
    pub struct ResponseFuture<S, Req, K>
    where
        S: Service<Req>,
    {
        // Declared before the claim, so that when the whole future is dropped the
        // inner future is gone before the next request on the key may start.
        #[pin]
        state: State<S, Req, S::Future, S::Error>,
        claim: Option<Claim<K>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req, F, E> {
        // Waiting for the key's turn, then for the inner service to be ready.
        Waiting { service: S, request: Option<Req> },
        Called { #[pin] future: F },
        Failed { error: Option<Failure<E>> },
        Done,
    }
}

/// Why a future resolves at once. Kept unboxed until polled, so that rejecting a
/// request allocates nothing.
#[derive(Debug)]
enum Failure<E> {
    Overloaded(Overloaded),
    Inner(E),
}

impl<S, Req, K> ResponseFuture<S, Req, K>
where
    S: Service<Req>,
{
    /// Waits for the claim's turn (if any) and for `service` to be ready, then calls it.
    pub(crate) fn waiting(service: S, request: Req, claim: Option<Claim<K>>) -> Self {
        ResponseFuture {
            state: State::Waiting {
                service,
                request: Some(request),
            },
            claim,
        }
    }

    /// Drives an inner future that needs no claim.
    pub(crate) fn called(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Called { future },
            claim: None,
        }
    }

    /// Resolves at once to `Overloaded`.
    pub(crate) fn rejected(error: Overloaded) -> Self {
        ResponseFuture {
            state: State::Failed {
                error: Some(Failure::Overloaded(error)),
            },
            claim: None,
        }
    }

    /// Resolves at once to the inner service's readiness error.
    pub(crate) fn failed(error: S::Error) -> Self {
        ResponseFuture {
            state: State::Failed {
                error: Some(Failure::Inner(error)),
            },
            claim: None,
        }
    }
}

impl<S, Req, K> Future for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A Concurrent request passed straight through is only its inner future.
        if self.claim.is_none() && matches!(self.state, State::Called { .. }) {
            if let StateProj::Called { future } = self.project().state.project() {
                return future.poll(cx).map_err(Into::into);
            }
            unreachable!("the state was checked above");
        }
        self.poll_steps(cx)
    }
}

impl<S, Req, K> ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    /// Every state but the pass-through: waiting, called with a claim, failed.
    #[inline(never)]
    fn poll_steps(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<S::Response, BoxError>> {
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
                    if this.claim.is_some() {
                        // The inner future goes first, then the key passes on.
                        this.state.set(State::Done);
                        *this.claim = None;
                    }
                    return Poll::Ready(output.map_err(Into::into));
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(match error.take() {
                        Some(Failure::Overloaded(error)) => error.into(),
                        Some(Failure::Inner(error)) => error.into(),
                        None => panic!("ResponseFuture polled after completion"),
                    }));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S, Req, K> fmt::Debug for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } if self.claim.is_some() => "waiting for its key or readiness",
            State::Waiting { .. } => "waiting for readiness",
            State::Called { .. } => "called",
            State::Failed { .. } => "failed",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("claim", &self.claim)
            .finish()
    }
}
