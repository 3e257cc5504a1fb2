//! A request's way through the layer, shared by the response futures of every flavour.
//!
//! [`Turn::concurrent`] and [`Turn::sync`] run inside `call()`, once the policy has
//! classified the request; the second takes the request's place in its key's line. The
//! turn is then driven by the response future:
//!
//! 1. wait for the claim's turn on the key (a `Mode::Sync` request only);
//! 2. drive its own handle on the inner service to readiness;
//! 3. call the inner service and drive the returned future.
//!
//! Readiness is polled only after the turn has come, so a request waiting behind its key
//! never holds inner capacity (a `Buffer` slot, a `ConcurrencyLimit` permit) that
//! another key could use. A `Mode::Concurrent` request whose inner service is ready in
//! `call()` is called there and starts in step 3, in the `Passing` state, which holds
//! nothing but the inner future.
//!
//! When the inner future completes, the turn drops it and hands its output back together
//! with the claim, so that the key passes on only once the inner future is gone; the
//! HTTP flavour keeps the claim until the response body ends.

use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::error::Overloaded;
use crate::registry::{Admitted, Claim, Queued, Registry, let_go};

const POLLED_AFTER_COMPLETION: &str = "ResponseFuture polled after completion";

pin_project! {
    /// The state of one request; see the module docs.
    #[project = TurnProj]
    #[project_replace = TurnProjReplace]
    pub(crate) enum Turn<S, Req, F, E, K> {
        // A Concurrent request: nothing but the inner future. It becomes `Done` when
        // the inner future completes.
        Passing { #[pin] future: F },
        // Rejected in `call()` by a limit.
        Rejected { overloaded: Overloaded },
        Done,
        // The states that may hold a claim come last, so that dropping a turn in one of
        // the others is a single compare.
        // Waiting for the claim's turn (a Sync request), then for readiness.
        Waiting { service: S, request: Option<Req>, claim: Option<Claim<K>> },
        // A Sync request that called the inner service. The claim is declared after the
        // future, so that dropping the state drops the inner future first. When the
        // inner future completes, the state becomes `Done`, which drops both in place
        // in that order (the HTTP flavour takes the claim out first, for the body).
        Running { #[pin] future: F, claim: Option<Claim<K>> },
        // The inner service failed its readiness check in `call()`; a Sync request still
        // holds its claim until the error is returned.
        Failed { error: Option<E>, claim: Option<Claim<K>> },
    }
}

/// The turn of a request to the inner service `S`.
pub(crate) type TurnOf<S, Req, K> =
    Turn<S, Req, <S as Service<Req>>::Future, <S as Service<Req>>::Error, K>;

/// How a turn ended, for a caller that has no use for the claim.
#[derive(Debug)]
pub(crate) enum Ended<E> {
    /// The inner service failed, or failed its readiness check.
    Inner(E),
    /// A limit rejected the request in `call()`.
    Rejected(Overloaded),
}

/// How a turn ends.
#[derive(Debug)]
pub(crate) enum Outcome<T, E, K> {
    /// The inner service answered (or failed its readiness check). The inner future is
    /// gone; the claim, for a `Mode::Sync` request, is still held.
    Answered(Result<T, E>, Option<Claim<K>>),
    /// A limit rejected the request in `call()`.
    Rejected(Overloaded),
}

impl<S, Req, E, K> Turn<S, Req, S::Future, E, K>
where
    S: Service<Req, Error = E> + Clone,
{
    /// Starts a `Mode::Concurrent` request, inside `call()`.
    #[inline(always)]
    pub(crate) fn concurrent(inner: &mut S, request: Req) -> Self {
        // Asking without a waker is enough to learn whether the service is ready, which
        // most are; one that is not is asked again by the response future, with the
        // task's own waker.
        match inner.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Turn::Passing {
                future: inner.call(request),
            },
            Poll::Ready(Err(error)) => Turn::Failed {
                error: Some(error),
                claim: None,
            },
            Poll::Pending => Turn::Waiting {
                service: take_ready_handle(inner),
                request: Some(request),
                claim: None,
            },
        }
    }

    /// Takes the place of a `Mode::Sync` request, inside `call()`, and calls the inner
    /// service at once when the key is free. `wrap` builds the response future around
    /// the turn.
    ///
    /// The common case is handled here: the claim is the head, one request per key may
    /// run, and the inner service is ready. The others go to functions of their own that
    /// take the claim by value. A claim that is still a local value when a call may
    /// unwind has to stay in memory, for the unwinding path to drop it, and is then
    /// copied into the turn; kept clear of such calls (with an inner service whose
    /// `poll_ready` and `call` are inlined and cannot unwind), it goes from registers
    /// straight into the response future. That is also why the response future is built
    /// here, in each arm, and not around this function's result.
    #[inline(always)]
    pub(crate) fn sync<H, T>(
        inner: &mut S,
        registry: &Registry<K, H>,
        key: K,
        request: Req,
        wrap: impl FnOnce(Self) -> T,
    ) -> T
    where
        K: Hash + Eq,
        H: BuildHasher,
    {
        let Admitted {
            claim,
            queued,
            spare_key,
        } = match registry.claim(key) {
            Ok(admitted) => admitted,
            Err(overloaded) => return wrap(Turn::Rejected { overloaded }),
        };
        let turn = if queued.is_some() {
            wrap(Self::wait(inner, request, claim, queued))
        } else if claim.notifies_start() {
            wrap(Self::start_notifying(inner, request, claim))
        } else {
            // The key was free: the turn has come already, and a ready inner service is
            // called at once, as for a Concurrent request.
            match inner.poll_ready(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(Ok(())) => wrap(Turn::Running {
                    future: inner.call(request),
                    claim: Some(claim),
                }),
                Poll::Ready(Err(error)) => wrap(Turn::Failed {
                    error: Some(error),
                    claim: Some(claim),
                }),
                Poll::Pending => wrap(Self::wait(inner, request, claim, None)),
            }
        };
        // A key's `Drop` is foreign code, so it runs once the claim is in the turn, and
        // while the turn is a local: a value being returned is not dropped if a drop
        // panics on the way out (rust-lang/rust#47949), and would keep its claim. `call()`
        // may run in a destructor while a panic unwinds, hence `let_go`.
        let_go(spare_key);
        turn
    }

    /// The key was free and more than one request per key may run: the requests in line
    /// wait for this one to start, so the shard is told once the inner service is called.
    #[inline(never)]
    fn start_notifying(inner: &mut S, request: Req, mut claim: Claim<K>) -> Self {
        match inner.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => {
                // Dropped before `claim`, a parameter, if the start notice's wake panics.
                let future = inner.call(request);
                claim.started();
                Turn::Running {
                    future,
                    claim: Some(claim),
                }
            }
            Poll::Ready(Err(error)) => Turn::Failed {
                error: Some(error),
                claim: Some(claim),
            },
            Poll::Pending => Self::wait(inner, request, claim, None),
        }
    }

    /// A turn that waits for its key (`queued`) or for a ready inner service.
    #[inline(never)]
    fn wait(inner: &mut S, request: Req, claim: Claim<K>, queued: Option<Queued>) -> Self {
        let turn = Turn::Waiting {
            service: take_ready_handle(inner),
            request: Some(request),
            claim: Some(claim),
        };
        if let Some(queued) = queued {
            queued.announce();
        }
        turn
    }
}

/// Takes a service's handle on the inner service for a response future, leaving a clone
/// in its place (see "Be careful when cloning inner services" in tower-service's docs).
fn take_ready_handle<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

impl<S, Req, E, K> Turn<S, Req, S::Future, E, K>
where
    S: Service<Req, Error = E>,
{
    /// Drives the turn; the pass-through state is polled inline.
    #[inline(always)]
    pub(crate) fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Outcome<S::Response, E, K>> {
        match self.as_mut().project() {
            TurnProj::Passing { future } => {
                let output = ready!(future.poll(cx));
                self.set(Turn::Done);
                Poll::Ready(Outcome::Answered(output, None))
            }
            TurnProj::Running { future, claim } => {
                let output = ready!(future.poll(cx));
                let claim = claim.take();
                // The inner future is dropped before the caller can release the claim.
                self.set(Turn::Done);
                Poll::Ready(Outcome::Answered(output, claim))
            }
            _ => self.poll_steps(cx),
        }
    }

    /// Polls a pass-through turn: `None` in every other state, which the caller drives
    /// with [`Turn::poll_released`]. Kept apart so that a `Mode::Concurrent` request
    /// costs a compare of the tag and its inner poll, and nothing of the other states
    /// (their stack, their calls) is paid for on its path.
    #[inline(always)]
    pub(crate) fn poll_passing(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Option<Poll<Result<S::Response, E>>> {
        // The tag is checked before projecting, which keeps this path to a compare.
        if !matches!(*self, Turn::Passing { .. }) {
            return None;
        }
        let TurnProj::Passing { future } = self.as_mut().project() else {
            return None;
        };
        let poll = future.poll(cx);
        if poll.is_ready() {
            // Through the projection, which drops the inner future in place and writes
            // `Done`: `set` would call the whole turn's drop glue, which the compiler
            // keeps out of line, so every pass-through request would pay for a call.
            self.project_replace(Turn::Done);
        }
        Some(poll)
    }

    /// Drives the turn for a caller that releases the claim as soon as the inner future
    /// is gone (the plain flavour).
    #[inline]
    pub(crate) fn poll_released(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<S::Response, Ended<E>>> {
        if let TurnProj::Running { future, .. } = self.as_mut().project() {
            let output = ready!(future.poll(cx));
            // The inner future goes first, then the key passes on: both are dropped in
            // place, in the order of their declaration. (Moving the claim out first
            // would copy it for nothing.)
            self.set(Turn::Done);
            return Poll::Ready(output.map_err(Ended::Inner));
        }
        self.poll_steps(cx).map(|outcome| match outcome {
            Outcome::Answered(output, claim) => {
                drop(claim);
                output.map_err(Ended::Inner)
            }
            Outcome::Rejected(overloaded) => Err(Ended::Rejected(overloaded)),
        })
    }

    #[inline(never)]
    fn poll_steps(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Outcome<S::Response, E, K>> {
        loop {
            match self.as_mut().project() {
                TurnProj::Passing { future } => {
                    let output = ready!(future.poll(cx));
                    self.set(Turn::Done);
                    return Poll::Ready(Outcome::Answered(output, None));
                }
                TurnProj::Waiting {
                    service,
                    request,
                    claim,
                } => {
                    if let Some(claim) = claim {
                        ready!(claim.poll_turn(cx));
                    }
                    if let Err(error) = ready!(service.poll_ready(cx)) {
                        let claim = claim.take();
                        self.set(Turn::Done);
                        return Poll::Ready(Outcome::Answered(Err(error), claim));
                    }
                    let request = request.take().expect(POLLED_AFTER_COMPLETION);
                    let future = service.call(request);
                    let Some(claim) = claim.take() else {
                        self.set(Turn::Passing { future });
                        continue;
                    };
                    self.set(Turn::Running {
                        future,
                        claim: Some(claim),
                    });
                    // Told once the state owns both: if the notice's wake panics, the
                    // inner future is still dropped before the claim, by the state.
                    if let TurnProj::Running {
                        claim: Some(claim), ..
                    } = self.as_mut().project()
                    {
                        claim.started();
                    }
                }
                TurnProj::Running { .. } => return self.poll(cx),
                TurnProj::Rejected { overloaded } => {
                    let overloaded = *overloaded;
                    self.set(Turn::Done);
                    return Poll::Ready(Outcome::Rejected(overloaded));
                }
                TurnProj::Failed { error, claim } => {
                    let error = error.take().expect(POLLED_AFTER_COMPLETION);
                    let claim = claim.take();
                    self.set(Turn::Done);
                    return Poll::Ready(Outcome::Answered(Err(error), claim));
                }
                TurnProj::Done => panic!("{POLLED_AFTER_COMPLETION}"),
            }
        }
    }

    /// What the turn is doing, for `Debug`.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Turn::Passing { .. } => "passing through",
            Turn::Waiting { claim: Some(_), .. } => "waiting for its key's turn or readiness",
            Turn::Waiting { claim: None, .. } => "waiting for readiness",
            Turn::Running { .. } => "running",
            Turn::Rejected { .. } => "rejected",
            Turn::Failed { .. } => "failed",
            Turn::Done => "done",
        }
    }
}
