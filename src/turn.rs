//! A request's way through the layer: one state machine, shared by the response futures
//! of both flavours.
//!
//! # The machine
//!
//! [`Turn`] is a request's whole life, and [`Turn::poll`] drives it: one `match` in a
//! `loop`, an arm for every state, as in tower's `Oneshot`.
//!
//! | state | holds | what `poll` does |
//! |---|---|---|
//! | `Unstarted` | its own handle on the inner service, the request, the claim (`Mode::Sync`) | waits until the claim is the head of its key (and, with `max_in_flight`, holds a slot), then for inner readiness; calls the inner service and goes on to `Running` (or `Passing`, without a claim); a readiness error ends it |
//! | `Running` | the inner future, then the claim | drives the inner future; when it completes, drops it and ends with its output and the claim |
//! | `Passing` | the inner future | the same, for a request that holds no claim |
//! | `Failed` | the inner service's readiness error from `call()`, and the claim | ends with the error |
//! | `Rejected` | why a limit rejected the request in `call()` | ends with it |
//! | `Done` | nothing | panics: the future was polled after completion |
//!
//! A turn ends as [`Ended`]: the inner service's answer with the claim still held, so
//! that the caller decides when the key passes on (the plain flavour at once, the HTTP
//! flavour when the response body ends), or the rejection. The claim is declared after
//! the inner future in every state, so the inner future is always gone before the key
//! passes on.
//!
//! Readiness is polled only once the claim is the head, so a request waiting behind its
//! key never holds inner capacity (a `Buffer` slot, a `ConcurrencyLimit` permit) that
//! another key could use.
//!
//! # Shortcuts
//!
//! Three entry points do part of the machine's work themselves. Each must end in the
//! state, with the result, that the machine would have reached:
//!
//! 1. **Calling in `call()`.** [`Turn::concurrent`] and [`Turn::sync`] build the first
//!    state. When the request can start at once (`Mode::Concurrent`, or a key that is
//!    free) and the inner service is ready on a poll with a no-op waker, they call it
//!    there and start in `Passing` or `Running`: the `Unstarted` arm would have done the
//!    same on the first poll.
//! 2. **A pass-through poll.** [`Turn::poll_passing`] drives a `Passing` turn and answers
//!    `None` in every other state, so that a `Mode::Concurrent` request's poll is a
//!    compare of the tag and the inner poll.
//! 3. **A release in place.** [`Turn::poll_released`], for a caller that lets the key
//!    go as soon as the inner future is gone (the plain flavour): a `Running` turn that
//!    completes drops the inner future and then the claim where they are, instead of
//!    moving the claim out first. It starts an `Unstarted` turn with the machine's own
//!    arm (`poll_start`); every other state goes through the machine.
//!
//! # Performance
//!
//! Each technique below protects rows of `benches/instructions.rs`, held by CI's
//! instruction gate (`.ci/instruction-gate`, `benches/instructions.budget`); the sites
//! carry a `// PERF:` pointer to the row.
//!
//! - Shortcut 2 keeps `layer_concurrent` near the raw service: driving a pass-through
//!   request through the whole machine measured 44 instructions more per request.
//! - A finished pass-through turn becomes `Done` through `project_replace`, which drops
//!   the inner future in place: `Pin::set` runs the whole turn's drop glue, an
//!   out-of-line call on every `Mode::Concurrent` request (`layer_concurrent`, 68 → 85).
//! - `Turn::sync` builds the response future in each arm, straight from the claim: a
//!   claim still held in a local while a call that may unwind runs (the `queued` event,
//!   a spare key's `Drop`) must be kept in memory for the unwinding path, and is then
//!   copied into place; the cases that call such code (`wait`, `start_notifying`) take
//!   the claim by value in functions of their own (`layer_sync_new_key`).
//! - Shortcut 3 ends with [`Failure`], not [`Ended`]: without the claim it is small
//!   enough to come back in registers; `Ended` went through memory and cost 22
//!   instructions per new-key request (`layer_sync_new_key`).
//! - Shortcut 3 keeps its `Running` arm inline and the rest of its states out of line
//!   (`poll_released_from_other_states`), and the machine is out of line too: the
//!   uncontended release stays a short function (`layer_sync_new_key`).
//! - The cap's step out of line: a capped domain's step of shortcut 1 is a cold
//!   function of its own (`start_capped`), so that a domain without a cap carries none
//!   of it on the paths every domain takes: inlined into `call()`, it measured one
//!   instruction more on each single-key row and three more on
//!   `layer_sync_all_two_new_keys`.

use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::error::Overloaded;
use crate::registry::{Claim, Claimed, ClaimedAll, Queued, Registry, let_go};

const POLLED_AFTER_COMPLETION: &str = "ResponseFuture polled after completion";

pin_project! {
    /// The state of one request; see the module docs.
    #[project = TurnProj]
    #[project_replace = TurnProjReplace]
    pub(crate) enum Turn<S: Service<Req>, Req, K> {
        Passing { #[pin] future: S::Future },
        Rejected { overloaded: Overloaded },
        Done,
        // The states that may hold a claim come last, so that dropping a turn in one of
        // the others is a single compare.
        Unstarted { service: S, request: Option<Req>, claim: Option<Claim<K>> },
        Running { #[pin] future: S::Future, claim: Option<Claim<K>> },
        Failed { error: Option<S::Error>, claim: Option<Claim<K>> },
    }
}

/// How a turn ended.
#[derive(Debug)]
pub(crate) enum Ended<T, E, K> {
    /// The inner service answered, or failed its readiness check. The inner future is
    /// gone; the claim of a `Mode::Sync` request is still held (`None` once released).
    Answered(Result<T, E>, Option<Claim<K>>),
    /// A limit rejected the request in `call()`.
    Rejected(Overloaded),
}

/// How the turn of a request to `S` ended.
type EndOf<S, Req, K> = Ended<<S as Service<Req>>::Response, <S as Service<Req>>::Error, K>;

/// A turn's end, its claim released.
fn released<T, E, K>(ended: Ended<T, E, K>) -> Result<T, Failure<E>> {
    match ended {
        Ended::Answered(output, claim) => {
            drop(claim);
            output.map_err(Failure::Inner)
        }
        Ended::Rejected(overloaded) => Err(Failure::Rejected(overloaded)),
    }
}

/// Why a released turn has no response: what the plain flavour boxes into its error.
// PERF: layer_sync_new_key (module docs, Performance: a small end for shortcut 3).
#[derive(Debug)]
pub(crate) enum Failure<E> {
    /// The inner service failed, or failed its readiness check.
    Inner(E),
    /// A limit rejected the request in `call()`.
    Rejected(Overloaded),
}

impl<S, Req, K> Turn<S, Req, K>
where
    S: Service<Req> + Clone,
{
    /// Starts a `Mode::Concurrent` request, inside `call()` (shortcut 1).
    #[inline]
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
            Poll::Pending => Turn::Unstarted {
                service: take_ready_handle(inner),
                request: Some(request),
                claim: None,
            },
        }
    }

    /// Takes the place of a `Mode::Sync` request, inside `call()`, and calls the inner
    /// service at once when the key is free (shortcut 1). Returns the response future
    /// `T` built around the turn.
    #[inline]
    pub(crate) fn sync<H, T>(inner: &mut S, registry: &Registry<K, H>, key: K, request: Req) -> T
    where
        K: Hash + Eq,
        H: BuildHasher,
        T: From<Self>,
    {
        let Claimed {
            claim,
            queued,
            spare_key,
        } = match registry.claim(key) {
            Ok(claimed) => claimed,
            Err(overloaded) => return T::from(Turn::Rejected { overloaded }),
        };
        // PERF: layer_sync_new_key. The response future is built in each arm, from a
        // claim that has not been through a call that may unwind (module docs).
        let turn = if queued.is_some() {
            T::from(Self::wait(inner, request, claim, queued))
        } else if claim.notifies_start() {
            T::from(Self::start_notifying(inner, request, claim))
        } else {
            // The key was free: the claim is the head already, and a ready inner service
            // is called at once, as for a Concurrent request.
            match inner.poll_ready(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(Ok(())) => T::from(Turn::Running {
                    future: inner.call(request),
                    claim: Some(claim),
                }),
                Poll::Ready(Err(error)) => T::from(Turn::Failed {
                    error: Some(error),
                    claim: Some(claim),
                }),
                Poll::Pending => T::from(Self::wait(inner, request, claim, None)),
            }
        };
        // A key's `Drop` is foreign code: it runs once the claim is in the response
        // future, and while that future is a local, since a value being returned is not
        // dropped if a drop panics on the way out (rust-lang/rust#47949), and would keep
        // its claim.
        let_go(spare_key);
        turn
    }

    /// Takes the place of a `Mode::SyncAll` request on every key at once, inside
    /// `call()`, and calls the inner service at once when every key is free, as
    /// [`sync`](Self::sync) does for one key.
    pub(crate) fn sync_all<H, T>(
        inner: &mut S,
        registry: &Registry<K, H>,
        keys: Vec<K>,
        request: Req,
    ) -> T
    where
        K: Hash + Eq,
        H: BuildHasher,
        T: From<Self>,
    {
        let ClaimedAll {
            claim,
            queued,
            spare_keys,
        } = match registry.claim_all(keys) {
            Ok(claimed) => claimed,
            Err(overloaded) => return T::from(Turn::Rejected { overloaded }),
        };
        let turn = if queued.is_empty() {
            T::from(Self::start_notifying(inner, request, claim))
        } else {
            T::from(Self::wait(inner, request, claim, queued))
        };
        // As in `sync`: the keys' `Drop` runs once the claim is in the response future.
        spare_keys.let_go();
        turn
    }

    /// The key (or every key) was free, and the inner service is called at once if it is
    /// ready. When more than one request per key may run, or the claim leads a set, the
    /// shards are told once the inner service is called. In a capped domain the request
    /// first asks for a slot, and waits for one if none is free.
    fn start_notifying(inner: &mut S, request: Req, claim: Claim<K>) -> Self {
        // With a cap, the request needs a slot before it may poll the inner service.
        if claim.is_capped() {
            return Self::start_capped(inner, request, claim);
        }
        Self::start_now(inner, request, claim)
    }

    /// [`start_notifying`](Self::start_notifying) in a capped domain: asks for a slot,
    /// and waits for one if none is free.
    // PERF: layer_sync_new_key, layer_sync_all_two_new_keys (module docs, Performance:
    // the cap's step out of line).
    #[cold]
    #[inline(never)]
    fn start_capped(inner: &mut S, request: Req, mut claim: Claim<K>) -> Self {
        if let Some(slot_queued) = claim.queue_for_slot() {
            let turn = Self::wait(inner, request, claim, None);
            slot_queued.announce();
            return turn;
        }
        Self::start_now(inner, request, claim)
    }

    /// Calls the inner service at once if it is ready, for a request free to start, and
    /// tells the shards.
    fn start_now(inner: &mut S, request: Req, mut claim: Claim<K>) -> Self {
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

    /// A turn that waits for its keys (`queued`, one event per key it waits on) or for a
    /// ready inner service.
    fn wait(
        inner: &mut S,
        request: Req,
        claim: Claim<K>,
        queued: impl IntoIterator<Item = Queued>,
    ) -> Self {
        let turn = Turn::Unstarted {
            service: take_ready_handle(inner),
            request: Some(request),
            claim: Some(claim),
        };
        // The events are foreign code: emitted once the claim is in the turn.
        for queued in queued {
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

impl<S, Req, K> Turn<S, Req, K>
where
    S: Service<Req>,
{
    /// The machine: drives the turn to its end from any state.
    // PERF: layer_sync_new_key. Out of line: the shortcuts that call it stay small.
    #[inline(never)]
    pub(crate) fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<EndOf<S, Req, K>> {
        loop {
            match self.as_mut().project() {
                TurnProj::Unstarted { .. } => {
                    if let Some(failed) = ready!(self.as_mut().poll_start(cx)) {
                        return Poll::Ready(failed);
                    }
                }
                TurnProj::Running { future, claim } => {
                    let output = ready!(future.poll(cx));
                    let claim = claim.take();
                    // The inner future is dropped before the caller can release the claim.
                    self.set(Turn::Done);
                    return Poll::Ready(Ended::Answered(output, claim));
                }
                TurnProj::Passing { future } => {
                    let output = ready!(future.poll(cx));
                    self.set(Turn::Done);
                    return Poll::Ready(Ended::Answered(output, None));
                }
                TurnProj::Failed { error, claim } => {
                    let error = error.take().expect(POLLED_AFTER_COMPLETION);
                    let claim = claim.take();
                    self.set(Turn::Done);
                    return Poll::Ready(Ended::Answered(Err(error), claim));
                }
                TurnProj::Rejected { overloaded } => {
                    let overloaded = *overloaded;
                    self.set(Turn::Done);
                    return Poll::Ready(Ended::Rejected(overloaded));
                }
                TurnProj::Done => panic!("{POLLED_AFTER_COMPLETION}"),
            }
        }
    }

    /// The `Unstarted` arm of the machine, shared with shortcut 3: waits until the claim
    /// is the head and the inner service is ready, and calls it. Answers `None` once the
    /// turn is `Running` (or `Passing`, without a claim), and how it ended if readiness
    /// failed.
    // PERF: hand_off_layer, layer_sync_live_key. Always inlined into both callers.
    #[inline(always)]
    fn poll_start(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<EndOf<S, Req, K>>> {
        let TurnProj::Unstarted {
            service,
            request,
            claim,
        } = self.as_mut().project()
        else {
            return Poll::Ready(None);
        };
        if let Some(claim) = claim {
            ready!(claim.poll_head(cx));
        }
        if let Err(error) = ready!(service.poll_ready(cx)) {
            let claim = claim.take();
            self.set(Turn::Done);
            return Poll::Ready(Some(Ended::Answered(Err(error), claim)));
        }
        let request = request.take().expect(POLLED_AFTER_COMPLETION);
        let future = service.call(request);
        let Some(claim) = claim.take() else {
            self.set(Turn::Passing { future });
            return Poll::Ready(None);
        };
        self.set(Turn::Running {
            future,
            claim: Some(claim),
        });
        // Told once the state owns both: if the notice's wake panics, the inner future is
        // still dropped before the claim, by the state.
        if let TurnProj::Running {
            claim: Some(claim), ..
        } = self.as_mut().project()
        {
            claim.started();
        }
        Poll::Ready(None)
    }

    /// Shortcut 2: polls a `Passing` turn, and answers `None` in every other state.
    // PERF: layer_concurrent
    #[inline]
    pub(crate) fn poll_passing(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Option<Poll<Result<S::Response, S::Error>>> {
        // PERF: layer_concurrent. The tag is compared before projecting.
        if !matches!(*self, Turn::Passing { .. }) {
            return None;
        }
        let TurnProj::Passing { future } = self.as_mut().project() else {
            unreachable!("the tag was compared above")
        };
        let poll = future.poll(cx);
        if poll.is_ready() {
            // PERF: layer_concurrent. Drops the inner future in place (module docs).
            self.project_replace(Turn::Done);
        }
        Some(poll)
    }

    /// Shortcut 3: drives the turn for a caller that releases the claim as soon as the
    /// inner future is gone.
    #[inline]
    pub(crate) fn poll_released(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<S::Response, Failure<S::Error>>> {
        if !matches!(*self, Turn::Running { .. }) {
            return self.poll_released_from_other_states(cx);
        }
        self.poll_running_released(cx)
    }

    /// Shortcut 3 in every state but `Running`. A request that waited starts with the
    /// machine's own arm and goes on as `Running`, so that its claim too is released in
    /// place; the other states go through the machine.
    // PERF: layer_sync_new_key. Out of line, so that shortcut 3 stays small for the
    // requests that never wait.
    #[inline(never)]
    fn poll_released_from_other_states(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<S::Response, Failure<S::Error>>> {
        if matches!(*self, Turn::Unstarted { .. }) {
            if let Some(failed) = ready!(self.as_mut().poll_start(cx)) {
                return Poll::Ready(released(failed));
            }
            if matches!(*self, Turn::Running { .. }) {
                return self.poll_running_released(cx);
            }
        }
        self.poll(cx).map(released)
    }

    /// Polls a `Running` turn; when the inner future completes, drops it and then the
    /// claim in place, in the order of their declaration.
    #[inline(always)]
    fn poll_running_released(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<S::Response, Failure<S::Error>>> {
        let TurnProj::Running { future, .. } = self.as_mut().project() else {
            unreachable!("polled as running in another state")
        };
        let output = ready!(future.poll(cx));
        self.set(Turn::Done);
        Poll::Ready(output.map_err(Failure::Inner))
    }

    /// What the turn is doing, for `Debug`.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Turn::Passing { .. } => "passing through",
            Turn::Unstarted { claim: Some(_), .. } => "waiting for its key or readiness",
            Turn::Unstarted { claim: None, .. } => "waiting for readiness",
            Turn::Running { .. } => "running",
            Turn::Rejected { .. } => "rejected",
            Turn::Failed { .. } => "failed",
            Turn::Done => "done",
        }
    }
}
