//! Model checks of the registry's admission, release, hand-off and cancellation, run
//! through the public API on loom's instrumented `Mutex`, `Arc` and atomics:
//!
//! ```sh
//! cd tests/loom && RUSTFLAGS="--cfg loom" cargo test --release
//! ```
//!
//! Each model checks, over every interleaving loom explores:
//! - the inner service is called in the order of `call()` (the probe records its calls,
//!   and callers on several threads record their `call()` order under a lock);
//! - never more than `permits_per_key` handlers of a key run at once (the probe service
//!   asserts it while a handler is mid-flight), and with `max_in_flight`, never more than
//!   that many over every key, from their inner call until they complete or are dropped;
//! - no lost hand-off: every request that is not dropped completes (loom reports a
//!   deadlock if a waiter is never woken);
//! - the registry is empty once everything is done.
//!
//! The probe is always ready, unless a model gives it a [`Gate`]: then a request whose
//! key is free waits for readiness holding its key, and a failed readiness check must
//! give the key up. `Mode::Concurrent` requests (numbered from [`CONCURRENT`]) go
//! through the same probe, and must never wait for the key.
#![cfg(loom)]

use std::collections::VecDeque;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use loom::future::block_on;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use tower_layer::Layer;
use tower_service::Service;
use tower_sync_engine::{Mode, SyncEngine, SyncEngineLayer};

/// An inner service whose handlers stay mid-flight across one yield, so that other
/// threads can run while a handler holds its key.
#[derive(Clone)]
struct Probe {
    running: Arc<AtomicUsize>,
    permits: usize,
    /// Requests in the order the inner service was called with them.
    called: Arc<Mutex<Vec<u32>>>,
    /// Its readiness, when it is not always ready.
    gate: Option<Arc<Gate>>,
}

struct ProbeFuture {
    /// The handlers of the key running; `None` for a Concurrent request, which no
    /// permit bounds.
    running: Option<Arc<AtomicUsize>>,
    permits: usize,
    request: u32,
    entered: bool,
}

/// The error of a failed readiness check.
const NOT_READY: &str = "the probe failed its readiness check";

impl Service<u32> for Probe {
    type Response = u32;
    type Error = &'static str;
    type Future = ProbeFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match &self.gate {
            None => Poll::Ready(Ok(())),
            Some(gate) => gate.poll_ready(cx),
        }
    }

    fn call(&mut self, request: u32) -> ProbeFuture {
        self.called.lock().unwrap().push(request);
        ProbeFuture {
            running: (request < CONCURRENT).then(|| self.running.clone()),
            permits: self.permits,
            request,
            entered: false,
        }
    }
}

impl Future for ProbeFuture {
    type Output = Result<u32, &'static str>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.entered {
            self.entered = true;
            if let Some(running) = &self.running {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(now <= self.permits, "{now} handlers of one key at once");
            }
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.entered = false;
        if let Some(running) = &self.running {
            running.fetch_sub(1, Ordering::SeqCst);
        }
        Poll::Ready(Ok(self.request))
    }
}

impl Drop for ProbeFuture {
    fn drop(&mut self) {
        if let Some(running) = self.running.as_ref().filter(|_| self.entered) {
            running.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The probe's readiness, when a model controls it: the answers to its next readiness
/// checks, in turn, and then ready once the gate is open.
struct Gate {
    state: Mutex<GateState>,
}

struct GateState {
    script: VecDeque<Answer>,
    open: bool,
    /// Tasks whose check found the gate closed, woken when it opens.
    waiting: Vec<Waker>,
}

/// A scripted answer to one readiness check.
enum Answer {
    /// Not ready yet, but worth asking again at once: the task is woken.
    NotYet,
    Fail,
}

impl Gate {
    fn new(script: impl IntoIterator<Item = Answer>, open: bool) -> Arc<Self> {
        Arc::new(Gate {
            state: Mutex::new(GateState {
                script: script.into_iter().collect(),
                open,
                waiting: Vec::new(),
            }),
        })
    }

    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<Result<(), &'static str>> {
        let mut state = self.state.lock().unwrap();
        match state.script.pop_front() {
            Some(Answer::NotYet) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Answer::Fail) => Poll::Ready(Err(NOT_READY)),
            None if state.open => Poll::Ready(Ok(())),
            None => {
                state.waiting.push(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Makes the probe ready, and wakes the tasks that found it closed.
    fn open(&self) {
        let waiting = {
            let mut state = self.state.lock().unwrap();
            state.open = true;
            std::mem::take(&mut state.waiting)
        };
        waiting.into_iter().for_each(Waker::wake);
    }
}

type Policy = fn(&u32) -> Mode<u8>;
type Engine = SyncEngine<Probe, Policy, u8>;

/// Requests from this number on are `Mode::Concurrent`.
const CONCURRENT: u32 = 100;

/// Every request below [`CONCURRENT`] has key 0.
fn one_key(request: &u32) -> Mode<u8> {
    if *request < CONCURRENT {
        Mode::Sync(0)
    } else {
        Mode::Concurrent
    }
}

/// A layer over the probe, and what it records.
struct Model {
    layer: SyncEngineLayer<Policy, u8>,
    service: Engine,
    /// Requests in the order of their `call()`, where threads race to call.
    calls: Arc<Mutex<Vec<u32>>>,
    called: Arc<Mutex<Vec<u32>>>,
}

fn engine(permits: usize) -> Model {
    gated_engine(permits, None)
}

/// A model whose probe answers its readiness checks through `gate`, if given.
fn gated_engine(permits: usize, gate: Option<Arc<Gate>>) -> Model {
    let layer = SyncEngineLayer::new(one_key as Policy).permits_per_key(permits);
    let called = Arc::new(Mutex::new(Vec::new()));
    let probe = Probe {
        running: Arc::new(AtomicUsize::new(0)),
        permits,
        called: called.clone(),
        gate,
    };
    let service = layer.layer(probe);
    Model {
        layer,
        service,
        calls: Arc::new(Mutex::new(Vec::new())),
        called,
    }
}

/// Calls `service` and records the call's place, atomically.
fn call_recorded(
    service: &mut Engine,
    calls: &Mutex<Vec<u32>>,
    request: u32,
) -> tower_sync_engine::ResponseFuture<Probe, u32, u8> {
    let mut calls = calls.lock().unwrap();
    calls.push(request);
    service.call(request)
}

/// The inner service was called with `expected`, in that order.
fn assert_called(model_called: &Mutex<Vec<u32>>, expected: &[u32]) {
    assert_eq!(*model_called.lock().unwrap(), expected, "inner call order");
}

/// Explores the interleavings of `test` with up to `preemptions` forced thread switches.
fn model(preemptions: usize, test: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemptions);
    builder.check(test);
}

#[test]
fn two_callers_on_one_key_race_with_a_release() {
    model(3, || {
        let Model {
            layer,
            mut service,
            calls,
            called,
        } = engine(1);
        // The key is free: the holder is called inside `call()`.
        let holder = call_recorded(&mut service, &calls, 0);
        let callers: Vec<_> = [1, 2]
            .into_iter()
            .map(|request| {
                let mut service = service.clone();
                let calls = calls.clone();
                thread::spawn(move || {
                    block_on(call_recorded(&mut service, &calls, request)).unwrap()
                })
            })
            .collect();
        drop(holder);
        for caller in callers {
            caller.join().unwrap();
        }
        assert_called(&called, &calls.lock().unwrap());
        assert!(layer.stats().is_idle());
    });
}

#[test]
fn a_waiter_dropped_while_the_key_is_handed_to_it() {
    model(3, || {
        let Model {
            layer,
            mut service,
            called,
            ..
        } = engine(1);
        let holder = service.call(0);
        let handed = service.call(1);
        let last = service.call(2);
        let release = thread::spawn(move || drop(holder));
        let cancel = thread::spawn(move || drop(handed));
        assert_eq!(block_on(last).unwrap(), 2);
        release.join().unwrap();
        cancel.join().unwrap();
        // The holder was called inside `call()`, the key being free; `handed` never ran.
        assert_called(&called, &[0, 2]);
        assert!(layer.stats().is_idle());
    });
}

#[test]
fn the_last_release_races_with_a_new_admission() {
    model(3, || {
        let Model {
            layer,
            mut service,
            called,
            ..
        } = engine(1);
        let mut holder = service.call(0);
        let release = thread::spawn(move || {
            // Run the handler to completion: the key goes idle and its entry is removed.
            block_on(&mut holder).unwrap();
        });
        let mut newcomer = service.clone();
        let admit = thread::spawn(move || block_on(newcomer.call(1)).unwrap());
        release.join().unwrap();
        assert_eq!(admit.join().unwrap(), 1);
        // The holder was called first, so it ran first even if the newcomer's thread
        // polled first.
        assert_called(&called, &[0, 1]);
        assert!(layer.stats().is_idle());
    });
}

#[test]
fn two_permits_with_three_callers() {
    model(2, || {
        let Model {
            layer,
            service,
            calls,
            called,
        } = engine(2);
        let callers: Vec<_> = [1, 2, 3]
            .into_iter()
            .map(|request| {
                let mut service = service.clone();
                let calls = calls.clone();
                thread::spawn(move || {
                    block_on(call_recorded(&mut service, &calls, request)).unwrap()
                })
            })
            .collect();
        for caller in callers {
            caller.join().unwrap();
        }
        assert_called(&called, &calls.lock().unwrap());
        assert!(layer.stats().is_idle());
    });
}

#[test]
fn a_dropped_waiter_in_a_two_permit_line_passes_its_grant_on() {
    model(3, || {
        let Model {
            layer,
            mut service,
            called,
            ..
        } = engine(2);
        let first = service.call(0);
        let second = service.call(1);
        let third = service.call(2);
        let drop_first = thread::spawn(move || drop(first));
        let drop_second = thread::spawn(move || drop(second));
        assert_eq!(block_on(third).unwrap(), 2);
        drop_first.join().unwrap();
        drop_second.join().unwrap();
        // Two permits: the first two were called inside `call()`.
        assert_called(&called, &[0, 1, 2]);
        assert!(layer.stats().is_idle());
    });
}

#[test]
fn granted_waiters_polled_on_two_threads_start_in_call_order() {
    model(2, || {
        let Model {
            layer,
            mut service,
            called,
            ..
        } = engine(2);
        // Two permits: 0 and 1 find the key free and are called inside `call()`; 2 and 3
        // wait. When 0 and 1 are dropped, both waiters are granted a permit, and each is
        // driven on a thread of its own, in any order loom picks: 3 must not start
        // before 2.
        let running = [service.call(0), service.call(1)];
        let threads: Vec<_> = (2..4)
            .map(|request| {
                let future = service.call(request);
                thread::spawn(move || block_on(future).unwrap())
            })
            .collect();
        drop(running);
        for thread in threads {
            thread.join().unwrap();
        }
        assert_called(&called, &[0, 1, 2, 3]);
        assert!(layer.stats().is_idle());
    });
}

#[test]
fn a_free_key_waits_for_readiness_while_a_second_caller_queues() {
    for permits in [1, 2] {
        model(3, move || {
            let gate = Gate::new([], false);
            let Model {
                layer,
                mut service,
                called,
                ..
            } = gated_engine(permits, Some(gate.clone()));
            // The key is free but the probe is not ready: the first request takes the key
            // in `call()` and waits for readiness in its response future, holding the key
            // while the second caller races it and the readiness arrives.
            let first = service.call(0);
            let mut second = service.clone();
            let caller = thread::spawn(move || block_on(second.call(1)).unwrap());
            let opener = thread::spawn(move || gate.open());
            assert_eq!(block_on(first).unwrap(), 0);
            opener.join().unwrap();
            assert_eq!(caller.join().unwrap(), 1);
            assert_called(&called, &[0, 1]);
            assert!(layer.stats().is_idle());
        });
    }
}

#[test]
fn a_readiness_error_in_the_response_future_passes_the_key_on() {
    for permits in [1, 2] {
        model(3, move || {
            // Not ready in the first request's `call()`, failing when its response future
            // asks again, ready from then on.
            let gate = Gate::new([Answer::NotYet, Answer::Fail], true);
            let Model {
                layer,
                mut service,
                called,
                ..
            } = gated_engine(permits, Some(gate));
            let first = service.call(0);
            let second = service.call(1);
            let waiter = thread::spawn(move || block_on(second).unwrap());
            let error = block_on(first).unwrap_err();
            assert_eq!(error.to_string(), NOT_READY);
            assert_eq!(waiter.join().unwrap(), 1);
            // The first request never reached the inner service, and gave its key up.
            assert_called(&called, &[1]);
            assert!(layer.stats().is_idle());
        });
    }
}

#[test]
fn a_concurrent_request_is_not_held_up_by_a_release() {
    model(3, || {
        let Model {
            layer,
            mut service,
            called,
            ..
        } = engine(1);
        let holder = service.call(0);
        let waiter = service.call(1);
        let release = thread::spawn(move || {
            drop(holder);
            block_on(waiter).unwrap()
        });
        // Polled with a waker no other thread can use: had the request to wait for the
        // key, or for anything else another thread does, it would still be pending.
        let mut cx = Context::from_waker(Waker::noop());
        let mut concurrent = service.call(CONCURRENT);
        // Its handler was called inside `call()`, and is mid-flight after one poll.
        assert!(Pin::new(&mut concurrent).poll(&mut cx).is_pending());
        let stats = layer.stats();
        assert!(
            stats.in_flight + stats.queued <= 2,
            "the Concurrent request is counted: {stats:?}"
        );
        assert!(matches!(
            Pin::new(&mut concurrent).poll(&mut cx),
            Poll::Ready(Ok(CONCURRENT))
        ));
        assert_eq!(release.join().unwrap(), 1);
        let keyed: Vec<u32> = called
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|&request| request < CONCURRENT)
            .collect();
        assert_eq!(keyed, [0, 1], "inner call order of the key");
        assert!(layer.stats().is_idle());
    });
}

// ---------------------------------------------------------------------------------------
// Multi-key requests (`Mode::sync_all`)
// ---------------------------------------------------------------------------------------

/// The keys of each request of the multi-key models, by request number.
const SET_KEYS: [&[u8]; 6] = [&[0, 1], &[1, 0], &[1], &[1], &[0], &[1]];

fn by_set(request: &u32) -> Mode<u8> {
    Mode::sync_all(SET_KEYS[*request as usize].iter().copied())
}

/// Hashes a key to itself, so that every execution puts the keys on the same shards:
/// loom replays executions, and a hash that changed between them would change which
/// locks a request takes. With the registry's stirring, keys 0 and 1 land on the two
/// shards a loom registry has, so a set takes both shard locks, in shard order.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0 << 8 | u64::from(byte);
        }
    }
}

type SetHasher = BuildHasherDefault<Identity>;
type SetEngine = SyncEngine<SetProbe, Policy, u8, SetHasher>;

/// An inner service for requests on sets of keys: records its calls, counts its handlers
/// running per key and asserts that no key runs more than one, and keeps each handler
/// mid-flight across one yield.
#[derive(Clone)]
struct SetProbe {
    running: Arc<[AtomicUsize; 2]>,
    called: Arc<Mutex<Vec<u32>>>,
}

struct SetProbeFuture {
    running: Arc<[AtomicUsize; 2]>,
    request: u32,
    entered: bool,
}

impl SetProbeFuture {
    fn keys(&self) -> &'static [u8] {
        SET_KEYS[self.request as usize]
    }

    fn leave(&mut self) {
        if std::mem::take(&mut self.entered) {
            for &key in self.keys() {
                self.running[usize::from(key)].fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Service<u32> for SetProbe {
    type Response = u32;
    type Error = &'static str;
    type Future = SetProbeFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u32) -> SetProbeFuture {
        self.called.lock().unwrap().push(request);
        SetProbeFuture {
            running: self.running.clone(),
            request,
            entered: false,
        }
    }
}

impl Future for SetProbeFuture {
    type Output = Result<u32, &'static str>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.entered {
            self.entered = true;
            for &key in self.keys() {
                let now = self.running[usize::from(key)].fetch_add(1, Ordering::SeqCst) + 1;
                assert!(now <= 1, "{now} handlers of key {key} at once");
            }
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.leave();
        Poll::Ready(Ok(self.request))
    }
}

impl Drop for SetProbeFuture {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A layer of multi-key requests over the set probe, and what the probe records.
struct SetModel {
    layer: SyncEngineLayer<Policy, u8, SetHasher>,
    service: SetEngine,
    called: Arc<Mutex<Vec<u32>>>,
}

fn set_engine() -> SetModel {
    let layer = SyncEngineLayer::new(by_set as Policy).with_hasher(SetHasher::default());
    let called = Arc::new(Mutex::new(Vec::new()));
    let probe = SetProbe {
        running: Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]),
        called: called.clone(),
    };
    let service = layer.layer(probe);
    SetModel {
        layer,
        service,
        called,
    }
}

#[test]
fn two_sets_in_opposite_key_orders_race_a_single_key_request() {
    model(2, || {
        let SetModel {
            layer,
            service,
            called,
        } = set_engine();
        // Requests 0 and 1 name keys 0 and 1, in opposite orders; request 2 names key 1,
        // the sets' second key in shard order, so that a set can head key 0 while it
        // waits for key 1. Each is called on a thread of its own, with no lock around
        // `call()`, so the sets may take their shard locks at the same time. A clock
        // shared by the threads tells which `call()` returned before another began.
        let clock = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..3u32)
            .map(|request| {
                let mut service = service.clone();
                let clock = clock.clone();
                thread::spawn(move || {
                    let began = clock.fetch_add(1, Ordering::SeqCst);
                    let future = service.call(request);
                    let returned = clock.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(block_on(future).unwrap(), request);
                    (began, returned)
                })
            })
            .collect();
        let times: Vec<(usize, usize)> = callers
            .into_iter()
            .map(|caller| caller.join().unwrap())
            .collect();
        // Every request completed (a wait-for cycle would leave loom with no thread to
        // run), and on every key a request whose `call()` returned before another's
        // began was called first.
        let called = called.lock().unwrap().clone();
        assert_eq!(called.len(), 3, "{called:?}");
        let position = |request: u32| called.iter().position(|&r| r == request).unwrap();
        for earlier in 0..3u32 {
            for later in 0..3u32 {
                let shared = SET_KEYS[earlier as usize]
                    .iter()
                    .any(|key| SET_KEYS[later as usize].contains(key));
                if earlier != later && shared && times[earlier as usize].1 < times[later as usize].0
                {
                    assert!(
                        position(earlier) < position(later),
                        "{later} called before {earlier}: {called:?}"
                    );
                }
            }
        }
        assert!(layer.stats().is_idle());
    });
}

#[test]
fn a_set_dropped_while_it_is_handed_one_of_its_keys() {
    model(3, || {
        let SetModel {
            layer,
            mut service,
            called,
        } = set_engine();
        // Request 3 holds key 1. Request 0 heads key 0 and waits on key 1; requests 4
        // (key 0) and 5 (key 1) wait behind it.
        let mut holder = service.call(3);
        let mut set = service.call(0);
        let on_zero = service.call(4);
        let on_one = service.call(5);
        // The holder's handler is mid-flight. Its release hands key 1 to the set while
        // another thread polls the set once, with a waker no one uses, and drops it: the
        // set may run in between (once the holder is gone), or never.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut holder).poll(&mut cx).is_pending());
        let release = thread::spawn(move || drop(holder));
        let cancel = thread::spawn(move || {
            let mut cx = Context::from_waker(Waker::noop());
            let _ = Pin::new(&mut set).poll(&mut cx);
            drop(set);
        });
        assert_eq!(block_on(on_zero).unwrap(), 4);
        assert_eq!(block_on(on_one).unwrap(), 5);
        release.join().unwrap();
        cancel.join().unwrap();
        let called = called.lock().unwrap().clone();
        assert!(
            called == [3, 4, 5] || called == [3, 0, 4, 5],
            "inner call order: {called:?}"
        );
        assert!(layer.stats().is_idle());
    });
}

// ---------------------------------------------------------------------------------------
// `max_in_flight`: slots shared by the whole domain
// ---------------------------------------------------------------------------------------

/// The key of each request of the slot models, by request number. With the identity
/// hasher, keys 0 and 2 land on one shard and key 1 on the other.
const SLOT_KEYS: [u8; 5] = [0, 0, 2, 1, 1];

fn by_slot_key(request: &u32) -> Mode<u8> {
    Mode::Sync(SLOT_KEYS[*request as usize])
}

type SlotEngine = SyncEngine<SlotProbe, Policy, u8, SetHasher>;

/// An inner service that counts its handlers from its `call` until their future
/// completes or is dropped, over every key, and asserts that no more than `max` are
/// counted at once; records its calls, and keeps each handler mid-flight across one
/// yield.
#[derive(Clone)]
struct SlotProbe {
    in_flight: Arc<AtomicUsize>,
    max: usize,
    called: Arc<Mutex<Vec<u32>>>,
}

struct SlotProbeFuture {
    in_flight: Arc<AtomicUsize>,
    request: u32,
    yielded: bool,
    done: bool,
}

impl Service<u32> for SlotProbe {
    type Response = u32;
    type Error = &'static str;
    type Future = SlotProbeFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u32) -> SlotProbeFuture {
        self.called.lock().unwrap().push(request);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(
            now <= self.max,
            "{now} handlers at once, max_in_flight {}",
            self.max
        );
        SlotProbeFuture {
            in_flight: self.in_flight.clone(),
            request,
            yielded: false,
            done: false,
        }
    }
}

impl Future for SlotProbeFuture {
    type Output = Result<u32, &'static str>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !std::mem::replace(&mut self.yielded, true) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.done = true;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Poll::Ready(Ok(self.request))
    }
}

impl Drop for SlotProbeFuture {
    fn drop(&mut self) {
        if !self.done {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A layer with `max_in_flight(max)` over the slot probe, and what the probe records.
struct SlotModel {
    layer: SyncEngineLayer<Policy, u8, SetHasher>,
    service: SlotEngine,
    called: Arc<Mutex<Vec<u32>>>,
}

fn slot_engine(max: usize) -> SlotModel {
    let layer = SyncEngineLayer::new(by_slot_key as Policy)
        .with_hasher(SetHasher::default())
        .max_in_flight(max);
    let called = Arc::new(Mutex::new(Vec::new()));
    let probe = SlotProbe {
        in_flight: Arc::new(AtomicUsize::new(0)),
        max,
        called: called.clone(),
    };
    let service = layer.layer(probe);
    SlotModel {
        layer,
        service,
        called,
    }
}

/// Drives `futures` on this thread, all at once, until each has completed; returns their
/// answers in the order given.
fn block_on_all(futures: Vec<tower_sync_engine::ResponseFuture<SlotProbe, u32, u8>>) -> Vec<u32> {
    let mut futures: Vec<_> = futures.into_iter().map(Some).collect();
    let mut answers = vec![None; futures.len()];
    block_on(std::future::poll_fn(|cx| {
        for (slot, answer) in futures.iter_mut().zip(&mut answers) {
            let Some(future) = slot else {
                continue;
            };
            if let Poll::Ready(result) = Pin::new(future).poll(cx) {
                *answer = Some(result.unwrap());
                *slot = None;
            }
        }
        if futures.iter().all(Option::is_none) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }));
    answers.into_iter().map(Option::unwrap).collect()
}

#[test]
fn a_freed_slot_goes_to_the_key_granted_least_recently_while_waiters_race() {
    model(2, || {
        let SlotModel {
            layer,
            mut service,
            called,
        } = slot_engine(1);
        // One slot. Request 0 (key 0) takes it inside `call()`; request 1 waits behind it
        // on key 0, request 2 (key 2) waits for the slot. When request 0 is dropped,
        // request 1 has its turn, but key 0 was granted a slot and key 2 never was: the
        // slot goes to request 2, which is polled once and runs mid-flight.
        let mut cx = Context::from_waker(Waker::noop());
        let first = service.call(0);
        let behind = service.call(1);
        let mut other = service.call(2);
        drop(first);
        assert!(Pin::new(&mut other).poll(&mut cx).is_pending());
        assert_called(&called, &[0, 2]);
        // Request 1 asks for a slot on its next poll, not before.
        assert_eq!(layer.stats().waiting_for_slot, 0);
        // Now request 1 has its turn on key 0 (shard 0) and asks for a slot when its own
        // thread polls it, while one thread releases the slot and another calls request 3,
        // on key 1 (shard 1), never granted a slot: if request 3 waits before the release,
        // it goes first, although request 1 may have waited longer; otherwise whichever
        // asks first after the release takes the slot. A shared clock tells which came
        // first.
        let clock = Arc::new(AtomicUsize::new(0));
        let release = {
            let clock = clock.clone();
            thread::spawn(move || {
                let began = clock.fetch_add(1, Ordering::SeqCst);
                drop(other);
                let ended = clock.fetch_add(1, Ordering::SeqCst);
                (began, ended)
            })
        };
        let waiter = thread::spawn(move || block_on(behind).unwrap());
        let began = clock.fetch_add(1, Ordering::SeqCst);
        let newcomer = service.call(3);
        let returned = clock.fetch_add(1, Ordering::SeqCst);
        assert_eq!(block_on(newcomer).unwrap(), 3);
        assert_eq!(waiter.join().unwrap(), 1);
        let (release_began, release_ended) = release.join().unwrap();
        let called = called.lock().unwrap().clone();
        if returned < release_began {
            // Waiting when the slot freed, it outranks request 1, waiting or not.
            assert_eq!(called, [0, 2, 3, 1], "request 3 waited first");
        } else {
            // Otherwise the slot was free for whoever asked first: request 1, on its
            // first poll since its turn came, or request 3, in `call()`.
            let _ = release_ended;
            assert!(
                called == [0, 2, 3, 1] || called == [0, 2, 1, 3],
                "inner call order: {called:?}"
            );
        }
        let stats = layer.stats();
        assert!(stats.is_idle() && stats.waiting_for_slot == 0, "{stats:?}");
    });
}

#[test]
fn a_slot_waiter_dropped_as_the_slot_is_granted_to_it() {
    model(2, || {
        let SlotModel {
            layer,
            mut service,
            called,
        } = slot_engine(1);
        // One slot, taken by request 0 (key 0, shard 0) inside `call()`. Request 3 (key 1,
        // shard 1) waits for it, then request 2 (key 2, shard 0); request 4 waits behind
        // request 3 on key 1, request 1 behind request 0 on key 0. One thread drops
        // request 0, whose slot goes to request 3 (keys never granted one, request 3
        // waited longer), while another drops request 3: waiting, or granted and unused.
        // Either way the slot passes on to request 2, and the dropped grant does not count
        // for key 1: when request 2 ends, request 4 goes before request 1, whose key 0 was
        // granted a slot by request 0, though request 1 asks for one first.
        let first = service.call(0);
        let waiter = service.call(3);
        let next = service.call(4);
        let other = service.call(2);
        let behind = service.call(1);
        assert_eq!(layer.stats().waiting_for_slot, 2);
        let release = thread::spawn(move || drop(first));
        let cancel = thread::spawn(move || drop(waiter));
        release.join().unwrap();
        cancel.join().unwrap();
        // Requests 1 and 4 have their turns now, and ask for a slot when polled, request
        // 1 first: request 2 holds it, so both wait, and it goes on by the rule.
        assert_eq!(layer.stats().waiting_for_slot, 0);
        assert_eq!(block_on_all(vec![behind, next, other]), [1, 4, 2]);
        assert_called(&called, &[0, 2, 4, 1]);
        let stats = layer.stats();
        assert!(stats.is_idle() && stats.waiting_for_slot == 0, "{stats:?}");
    });
}
