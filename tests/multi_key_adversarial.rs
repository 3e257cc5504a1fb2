//! `Mode::sync_all` attacked from the outside: wakers whose `clone`, `wake` or `drop`
//! panic while a set is polled, handed its keys, started or dropped; keys whose `Eq`,
//! `Hash` or `Drop` panic; a set dropped in every state it can be in, with one to three
//! permits per key; thousands of sets led from one shard, given up and replaced, against
//! a model of what `stats()` must count; sets sharing their keys with single-key
//! requests and other sets, called in every order; the HTTP flavour; and sets racing
//! single keys on many threads.
//!
//! Each test checks the order on every key against the order of the `call()`s (see
//! [`assert_one_order`]), that nothing waits for a wake-up that never comes (once a test
//! has set its scene, a response future is polled again only when it has been woken,
//! see [`Calls::drain`]), and that `stats()` is idle at the end.

#[path = "support/child.rs"]
mod child;
#[path = "support/sets.rs"]
mod sets;
mod support;

use support::OneShard;
#[path = "support/threads.rs"]
mod threads;

use child::{ChildRun, run_child};

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use sets::{Finishes, Policy, Req, all, counts, distinct, layer, one};
use support::Rng;
use tokio_test::assert_pending;
use tokio_test::task::{self, Spawn};
use tower::{Layer, Service};
use tower_sync_engine::error::BoxError;
use tower_sync_engine::{Mode, SyncEngine, SyncEngineLayer};

use self::probe::{CLONE_PANIC, DROP_PANIC, Probe, WAKE_PANIC};

// ---------------------------------------------------------------------------------------
// Requests, and the inner service: handlers the test finishes, readiness it controls.
// ---------------------------------------------------------------------------------------

/// What the inner service needs to know of a request: its id and the ids of its keys.
trait Job {
    fn id(&self) -> u64;
    fn key_ids(&self) -> Vec<u64>;
}

impl Job for Req {
    fn id(&self) -> u64 {
        self.id
    }

    fn key_ids(&self) -> Vec<u64> {
        match &self.mode {
            Mode::Sync(key) => vec![*key],
            Mode::SyncAll(keys) => keys.to_vec(),
            Mode::Concurrent => Vec::new(),
        }
    }
}

/// What happened to a request, in the order it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The inner service was called with it.
    Called(u64),
    /// Its handler is gone: completed, or dropped with its response future.
    Ended(u64),
    /// Its response future went without a call: dropped, rejected, or answered with a
    /// readiness error.
    Gone(u64),
}

/// The inner service's readiness, shared by every clone of it.
#[derive(Debug, Default)]
enum Readiness {
    #[default]
    Ready,
    /// Not ready; keeps the waker of the last poll, woken when it opens.
    Closed(Option<Waker>),
    /// Every readiness poll fails.
    Failing,
}

/// The inner service: logs each call and the end of each handler, counts the handlers
/// running per key, and lets a handler finish only once the test calls `finish`.
#[derive(Clone, Default)]
struct Handlers {
    state: Arc<Mutex<HandlerState>>,
}

#[derive(Default)]
struct HandlerState {
    log: Vec<Step>,
    finishes: Finishes,
    readiness: Readiness,
}

struct Handler {
    id: u64,
    handlers: Handlers,
}

impl<R: Job> Service<R> for Handlers {
    type Response = u64;
    type Error = BoxError;
    type Future = Handler;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let mut state = self.state.lock().unwrap();
        match &mut state.readiness {
            Readiness::Ready => Poll::Ready(Ok(())),
            Readiness::Closed(waker) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Readiness::Failing => Poll::Ready(Err("the inner service is not available".into())),
        }
    }

    fn call(&mut self, request: R) -> Handler {
        self.state
            .lock()
            .unwrap()
            .log
            .push(Step::Called(request.id()));
        Handler {
            id: request.id(),
            handlers: self.clone(),
        }
    }
}

impl Future for Handler {
    type Output = Result<u64, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.handlers.state.lock().unwrap();
        state.finishes.poll(self.id, cx).map(Ok)
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        if let Ok(mut state) = self.handlers.state.lock() {
            state.log.push(Step::Ended(self.id));
        }
    }
}

impl Handlers {
    /// Lets the handler of `id` complete, now or whenever it is called.
    fn finish(&self, id: u64) {
        let waker = self.state.lock().unwrap().finishes.finish(id);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The ids the inner service was called with, in order.
    fn called(&self) -> Vec<u64> {
        self.log()
            .into_iter()
            .filter_map(|step| match step {
                Step::Called(id) => Some(id),
                _ => None,
            })
            .collect()
    }

    /// The handlers called and still there that the test has not let finish, in call
    /// order.
    fn unfinished(&self) -> Vec<u64> {
        let state = self.state.lock().unwrap();
        let ended: HashSet<u64> = state
            .log
            .iter()
            .filter_map(|step| match step {
                Step::Ended(id) => Some(*id),
                _ => None,
            })
            .collect();
        state
            .log
            .iter()
            .filter_map(|step| match step {
                Step::Called(id) if !ended.contains(id) && !state.finishes.is_finished(*id) => {
                    Some(*id)
                }
                _ => None,
            })
            .collect()
    }

    fn log(&self) -> Vec<Step> {
        self.state.lock().unwrap().log.clone()
    }

    fn gone(&self, id: u64) {
        self.state.lock().unwrap().log.push(Step::Gone(id));
    }

    fn set_readiness(&self, readiness: Readiness) {
        let before = std::mem::replace(&mut self.state.lock().unwrap().readiness, readiness);
        if let Readiness::Closed(Some(waker)) = before {
            waker.wake();
        }
    }
}

/// Checks what the inner service saw against the order of the `call()`s: on every key,
/// a request was called only once each request called before it on that key had been
/// called or had gone without a call, and while fewer than `permits` of those were still
/// running. `requests` are `(id, keys)`, in call order.
fn assert_one_order(log: &[Step], requests: &[(u64, Vec<u64>)], permits: usize) {
    let at = |step: Step| log.iter().position(|&logged| logged == step);
    let keys: BTreeSet<u64> = requests
        .iter()
        .flat_map(|(_, keys)| keys.iter().copied())
        .collect();
    for key in keys {
        let line: Vec<u64> = requests
            .iter()
            .filter(|(_, keys)| keys.contains(&key))
            .map(|(id, _)| *id)
            .collect();
        for (i, &later) in line.iter().enumerate() {
            let Some(called) = at(Step::Called(later)) else {
                continue;
            };
            let mut running = 0;
            for &earlier in &line[..i] {
                let went = at(Step::Called(earlier)).or_else(|| at(Step::Gone(earlier)));
                assert!(
                    went.is_some_and(|went| went < called),
                    "key {key}: request {later} was called before {earlier}, called before \
                     it, was called or gone: {log:?}"
                );
                let ended = at(Step::Ended(earlier)).is_some_and(|ended| ended < called);
                if at(Step::Called(earlier)).is_some_and(|c| c < called) && !ended {
                    running += 1;
                }
            }
            assert!(
                running < permits,
                "key {key}: request {later} was called while {running} earlier ones ran \
                 ({permits} permits): {log:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Response futures, polled by hand.
// ---------------------------------------------------------------------------------------

type Answer = Result<u64, BoxError>;

/// A test's requests, in call order, and the response futures still live.
struct Calls<F> {
    handlers: Handlers,
    requests: Vec<(u64, Vec<u64>)>,
    /// The distinct keys of each request.
    keys: HashMap<u64, Vec<u64>>,
    live: Vec<Live<F>>,
    /// The answers that were errors, by request.
    errors: HashMap<u64, String>,
}

struct Live<F> {
    id: u64,
    future: Spawn<F>,
    /// Not polled with its task's waker since it was made or last polled with another.
    fresh: bool,
}

impl<F: Future<Output = Answer>> Calls<F> {
    fn new(handlers: &Handlers) -> Self {
        Calls {
            handlers: handlers.clone(),
            requests: Vec::new(),
            keys: HashMap::new(),
            live: Vec::new(),
            errors: HashMap::new(),
        }
    }

    fn call<S, R>(&mut self, service: &mut S, request: R)
    where
        S: Service<R, Future = F>,
        R: Job,
    {
        let (id, keys) = (request.id(), distinct(request.key_ids()));
        let future = service.call(request);
        self.add(id, keys, future);
    }

    fn add(&mut self, id: u64, keys: Vec<u64>, future: F) {
        self.keys.insert(id, keys.clone());
        self.requests.push((id, keys));
        self.live.push(Live {
            id,
            future: task::spawn(future),
            fresh: true,
        });
    }

    fn index(&self, id: u64) -> usize {
        self.live
            .iter()
            .position(|live| live.id == id)
            .unwrap_or_else(|| panic!("request {id} is not live"))
    }

    fn is_live(&self, id: u64) -> bool {
        self.live.iter().any(|live| live.id == id)
    }

    fn is_woken(&self, id: u64) -> bool {
        self.live[self.index(id)].future.is_woken()
    }

    /// Polls `id` with its task's waker; an answer takes it out.
    fn poll(&mut self, id: u64) -> Poll<Answer> {
        let index = self.index(id);
        let live = &mut self.live[index];
        live.fresh = false;
        let polled = live.future.poll();
        self.settle(index, polled)
    }

    /// Polls `id` with `waker` instead of its task's.
    fn poll_with(&mut self, id: u64, waker: &Waker) -> Poll<Answer> {
        let index = self.index(id);
        let live = &mut self.live[index];
        live.fresh = true;
        let polled = live
            .future
            .enter(|_, future| future.poll(&mut Context::from_waker(waker)));
        self.settle(index, polled)
    }

    /// Polls `id` with `waker` (its task's when `None`), and returns the message of the
    /// panic that poll must raise.
    fn poll_panicking(&mut self, id: u64, waker: Option<&Waker>) -> String {
        let polled = catch_unwind(AssertUnwindSafe(|| match waker {
            Some(waker) => self.poll_with(id, waker),
            None => self.poll(id),
        }));
        // Polled again by `drain`, whatever it registered.
        if self.is_live(id) {
            let index = self.index(id);
            self.live[index].fresh = true;
        }
        match polled {
            Ok(polled) => panic!("polling request {id} did not panic: {polled:?}"),
            Err(payload) => message(payload),
        }
    }

    fn settle(&mut self, index: usize, polled: Poll<Answer>) -> Poll<Answer> {
        let Poll::Ready(answer) = polled else {
            return Poll::Pending;
        };
        let id = self.live.remove(index).id;
        match &answer {
            Ok(answered) => assert_eq!(*answered, id, "request {id} got another's answer"),
            Err(error) => {
                self.handlers.gone(id);
                self.errors.insert(id, error.to_string());
            }
        }
        Poll::Ready(match answer {
            Ok(answered) => Ok(answered),
            Err(error) => Err(error.to_string().into()),
        })
    }

    /// Lets go of the response future of `id`, whose handler was called and is gone: a
    /// poll of it panicked after the turn ended, in the release.
    fn forget(&mut self, id: u64) {
        let index = self.index(id);
        drop(self.live.remove(index));
    }

    /// Drops the response future of `id`.
    fn drop(&mut self, id: u64) {
        let index = self.index(id);
        drop(self.live.remove(index));
        self.handlers.gone(id);
    }

    /// Drops the response future of `id`, whose drop must panic; returns the message.
    fn drop_panicking(&mut self, id: u64) -> String {
        let index = self.index(id);
        let live = self.live.remove(index);
        self.handlers.gone(id);
        match catch_unwind(AssertUnwindSafe(move || drop(live))) {
            Ok(()) => panic!("dropping request {id} did not panic"),
            Err(payload) => message(payload),
        }
    }

    /// Lets the handler of `id` finish and polls its response future to its answer.
    fn complete(&mut self, id: u64) {
        self.handlers.finish(id);
        match self.poll(id) {
            Poll::Ready(Ok(_)) => {}
            other => panic!("request {id} did not complete: {other:?}"),
        }
    }

    /// Runs every live request to its end. A response future is polled only when it has
    /// been woken (or has not been polled with its task's waker yet), and handlers finish
    /// one at a time, the first called first; with nothing woken and no handler running,
    /// some request waits for a wake-up that never comes.
    fn drain(&mut self) {
        self.drain_picking(|_| 0);
    }

    /// [`drain`](Self::drain), finishing the running handler that `pick` chooses (an
    /// index into those running, in call order).
    fn drain_picking(&mut self, mut pick: impl FnMut(usize) -> usize) {
        let mut rounds = 0;
        while !self.live.is_empty() {
            rounds += 1;
            assert!(rounds < 100_000, "no end: {:?}", self.handlers.log());
            let mut progress = false;
            let mut index = 0;
            while index < self.live.len() {
                let live = &mut self.live[index];
                if live.fresh || live.future.is_woken() {
                    live.fresh = false;
                    progress = true;
                    let polled = live.future.poll();
                    if self.settle(index, polled).is_ready() {
                        continue;
                    }
                }
                index += 1;
            }
            let running = self.handlers.unfinished();
            if !running.is_empty() {
                self.handlers.finish(running[pick(running.len())]);
                progress = true;
            }
            let waiting: Vec<u64> = self.live.iter().map(|live| live.id).collect();
            assert!(
                progress,
                "stuck: requests {waiting:?} wait and nothing will wake them: {:?}",
                self.handlers.log()
            );
        }
    }

    fn assert_in_order(&self, permits: usize) {
        assert_one_order(&self.handlers.log(), &self.requests, permits);
    }
}

fn message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

type Engine<H = RandomState> = SyncEngine<Handlers, Policy, u64, H>;
type Plain = tower_sync_engine::ResponseFuture<Handlers, Req, u64>;

fn serve<H>(layer: &SyncEngineLayer<Policy, u64, H>) -> (Engine<H>, Calls<Plain>) {
    let handlers = Handlers::default();
    (layer.layer(handlers.clone()), Calls::new(&handlers))
}

// ---------------------------------------------------------------------------------------
// Wakers whose `clone`, `wake` or `drop` panic once armed.
// ---------------------------------------------------------------------------------------

mod probe {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{RawWaker, RawWakerVTable, Waker};

    pub const CLONE_PANIC: &str = "injected: a waker's clone panicked";
    pub const WAKE_PANIC: &str = "injected: a waker's wake panicked";
    pub const DROP_PANIC: &str = "injected: a waker's drop panicked";

    /// The task behind a waker: counts its wake-ups, and panics where it is armed to.
    /// Its wakers panic in `drop` even while the thread unwinds, so a test keeps none of
    /// them in a scope that may unwind while that is armed.
    #[derive(Default)]
    pub struct Probe {
        /// Clones left before `clone` panics; `None`: it never does.
        clones_left: Mutex<Option<usize>>,
        wake_panics: AtomicBool,
        drop_panics: AtomicBool,
        wakes: AtomicUsize,
    }

    impl Probe {
        pub fn new() -> Arc<Self> {
            Arc::new(Probe::default())
        }

        /// `clone` panics once `clones` more clones have been made.
        pub fn panic_on_clone_after(&self, clones: usize) {
            *self.clones_left.lock().unwrap() = Some(clones);
        }

        pub fn panic_on_wake(&self, armed: bool) {
            self.wake_panics.store(armed, Ordering::SeqCst);
        }

        pub fn panic_on_drop(&self, armed: bool) {
            self.drop_panics.store(armed, Ordering::SeqCst);
        }

        pub fn disarm(&self) {
            *self.clones_left.lock().unwrap() = None;
            self.panic_on_wake(false);
            self.panic_on_drop(false);
        }

        pub fn wakes(&self) -> usize {
            self.wakes.load(Ordering::SeqCst)
        }

        pub fn waker(self: &Arc<Self>) -> Waker {
            let raw = RawWaker::new(Arc::into_raw(Arc::clone(self)).cast(), &VTABLE);
            // SAFETY: the vtable's functions treat the pointer as the `Arc<Probe>` it
            // came from, and each waker owns one count of it.
            unsafe { Waker::from_raw(raw) }
        }

        fn before_clone(&self) {
            let mut left = self.clones_left.lock().unwrap();
            match *left {
                Some(0) => {
                    drop(left);
                    panic!("{CLONE_PANIC}");
                }
                Some(n) => *left = Some(n - 1),
                None => {}
            }
        }

        fn woken(&self) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
            if self.wake_panics.load(Ordering::SeqCst) {
                panic!("{WAKE_PANIC}");
            }
        }
    }

    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake_by_ref, drop_waker);

    unsafe fn clone(data: *const ()) -> RawWaker {
        // SAFETY: `data` is an `Arc<Probe>` that the waker being cloned owns a count of.
        let probe = unsafe { &*data.cast::<Probe>() };
        probe.before_clone();
        // SAFETY: as above; the clone owns the new count.
        unsafe { Arc::increment_strong_count(data.cast::<Probe>()) };
        RawWaker::new(data, &VTABLE)
    }

    unsafe fn wake(data: *const ()) {
        // SAFETY: the waker's count, consumed here.
        let probe = unsafe { Arc::from_raw(data.cast::<Probe>()) };
        let armed = probe.wake_panics.load(Ordering::SeqCst);
        probe.wakes.fetch_add(1, Ordering::SeqCst);
        std::mem::drop(probe);
        if armed {
            panic!("{WAKE_PANIC}");
        }
    }

    unsafe fn wake_by_ref(data: *const ()) {
        // SAFETY: `data` is an `Arc<Probe>` that the waker owns a count of.
        let probe = unsafe { &*data.cast::<Probe>() };
        probe.woken();
    }

    unsafe fn drop_waker(data: *const ()) {
        // SAFETY: the waker's count, given back here.
        let probe = unsafe { Arc::from_raw(data.cast::<Probe>()) };
        let armed = probe.drop_panics.load(Ordering::SeqCst);
        std::mem::drop(probe);
        if armed {
            panic!("{DROP_PANIC}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// A waker whose `clone` panics while a set is polled.
// ---------------------------------------------------------------------------------------

/// What the test does with a set once one of its polls has panicked.
#[derive(Debug, Clone, Copy)]
enum Then {
    PollAgain,
    Drop,
}

#[test]
fn a_waker_whose_clone_panics_while_a_set_is_polled_leaves_it_in_line_on_every_key() {
    support::quiet_handler_panics();
    const SET: u64 = 10;
    for permits in [1, 2] {
        // The clone for the set's first key in shard order (its lead), its second, its
        // third; and with three clones allowed, none panics.
        for clones_before in 0..=3 {
            for then in [Then::PollAgain, Then::Drop] {
                let label = format!("{permits} permits, {clones_before} clones, {then:?}");
                let layer = layer().permits_per_key(permits);
                let (mut service, mut calls) = serve(&layer);
                let mut id = 100;
                for key in [1, 2, 3] {
                    for _ in 0..permits {
                        calls.call(&mut service, one(id, key));
                        id += 1;
                    }
                }
                calls.call(&mut service, all(SET, [2, 3, 1]));
                for (id, request) in [
                    (20, one(20, 1)),
                    (21, one(21, 2)),
                    (22, one(22, 3)),
                    (23, all(23, [3, 1])),
                ] {
                    calls.call(&mut service, request);
                    assert_pending!(calls.poll(id), "{label}");
                }
                let before = layer.stats();
                assert_eq!(counts(before), (3, 3 * permits, 8), "{label}");

                let probe = Probe::new();
                probe.panic_on_clone_after(clones_before);
                let waker = probe.waker();
                if clones_before == 3 {
                    assert_pending!(calls.poll_with(SET, &waker), "{label}");
                } else {
                    let panicked = calls.poll_panicking(SET, Some(&waker));
                    assert_eq!(panicked, CLONE_PANIC, "{label}");
                }
                probe.disarm();
                // The set kept its place on every key, and holds nothing it did not.
                assert_eq!(layer.stats(), before, "{label}");
                match then {
                    Then::PollAgain => assert_pending!(calls.poll(SET), "{label}"),
                    Then::Drop => {
                        calls.drop(SET);
                        assert_eq!(counts(layer.stats()), (3, 3 * permits, 5), "{label}");
                    }
                }
                calls.drain();
                calls.assert_in_order(permits);
                let ran = matches!(then, Then::PollAgain);
                assert_eq!(calls.handlers.called().contains(&SET), ran, "{label}");
                assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
            }
        }
    }
}

/// A set that has been handed some of its keys, polled with a waker whose `clone`
/// panics for the keys it still waits on: it stays the unstarted head of the keys it has,
/// and waits on the others.
#[test]
fn a_waker_whose_clone_panics_after_a_set_heads_some_keys_loses_neither_kind_of_place() {
    support::quiet_handler_panics();
    const SET: u64 = 10;
    for then in [Then::PollAgain, Then::Drop] {
        let layer = layer();
        let (mut service, mut calls) = serve(&layer);
        calls.call(&mut service, one(1, 1));
        calls.call(&mut service, one(2, 2));
        calls.call(&mut service, one(3, 3));
        calls.call(&mut service, all(SET, [1, 2, 3]));
        calls.call(&mut service, one(20, 2));
        assert_pending!(calls.poll(SET));
        assert_pending!(calls.poll(20));
        // Key 2 comes free and is handed to the set.
        calls.complete(2);
        assert!(calls.is_woken(SET));

        // Every poll of the set now clones the waker for the keys it still waits on.
        let probe = Probe::new();
        probe.panic_on_clone_after(0);
        let waker = probe.waker();
        assert_eq!(calls.poll_panicking(SET, Some(&waker)), CLONE_PANIC);
        probe.disarm();
        assert_eq!(counts(layer.stats()), (3, 3, 3), "{then:?}");
        assert!(!calls.is_woken(20), "{then:?}: key 2 passed on");
        match then {
            Then::PollAgain => {
                assert_pending!(calls.poll(SET));
                calls.complete(1);
                assert_pending!(calls.poll(SET));
                assert_eq!(calls.handlers.called(), [1, 2, 3], "{then:?}");
                calls.complete(3);
                assert!(calls.is_woken(SET), "{then:?}");
            }
            Then::Drop => {
                calls.drop(SET);
                assert!(calls.is_woken(20), "{then:?}: key 2 did not pass on");
            }
        }
        calls.drain();
        calls.assert_in_order(1);
        assert!(layer.stats().is_idle(), "{then:?}: {:?}", layer.stats());
    }
}

// ---------------------------------------------------------------------------------------
// Wakers whose `wake` or `drop` panic when a set is handed its keys or leaves.
// ---------------------------------------------------------------------------------------

#[test]
fn a_waker_whose_wake_panics_when_a_set_is_handed_its_keys_costs_it_no_key() {
    support::quiet_handler_panics();
    const SET: u64 = 10;
    // Panics on every hand-off, or only on the last.
    for every_hand_off in [true, false] {
        for then in [Then::PollAgain, Then::Drop] {
            let label = format!("every hand-off {every_hand_off}, {then:?}");
            let layer = layer();
            let (mut service, mut calls) = serve(&layer);
            calls.call(&mut service, one(1, 1));
            calls.call(&mut service, one(2, 2));
            calls.call(&mut service, one(3, 3));
            calls.call(&mut service, all(SET, [3, 1, 2]));
            for (id, key) in [(20, 1), (21, 2), (22, 3)] {
                calls.call(&mut service, one(id, key));
                assert_pending!(calls.poll(id));
            }
            let probe = Probe::new();
            let waker = probe.waker();
            assert_pending!(calls.poll_with(SET, &waker), "{label}");
            drop(waker);

            probe.panic_on_wake(every_hand_off);
            for holder in [1, 2, 3] {
                if holder == 3 {
                    probe.panic_on_wake(true);
                }
                calls.handlers.finish(holder);
                if holder == 3 || every_hand_off {
                    // The holder's release hands its key to the set and wakes it.
                    assert_eq!(calls.poll_panicking(holder, None), WAKE_PANIC, "{label}");
                    calls.forget(holder);
                } else {
                    assert!(calls.poll(holder).is_ready(), "{label}");
                }
            }
            probe.disarm();
            assert_eq!(
                probe.wakes(),
                3,
                "{label}: the set was not woken on each key"
            );
            // Handed every key, not called yet.
            assert_eq!(calls.handlers.called(), [1, 2, 3], "{label}");
            assert_eq!(counts(layer.stats()), (3, 3, 3), "{label}");
            match then {
                Then::PollAgain => {
                    assert_pending!(calls.poll(SET), "{label}");
                    assert_eq!(calls.handlers.called(), [1, 2, 3, SET], "{label}");
                }
                Then::Drop => {
                    calls.drop(SET);
                    for id in [20, 21, 22] {
                        assert!(calls.is_woken(id), "{label}: {id} was not passed its key");
                    }
                }
            }
            calls.drain();
            calls.assert_in_order(1);
            assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
        }
    }
}

/// The set is polled with a waker whose `drop` panics, then with its task's own: each
/// poll replaces the stored waker on one more key and panics, but a poll that returns
/// has every key's line waking the task, and the set runs in its turn.
#[test]
fn a_waker_whose_drop_panics_as_a_set_polls_again_costs_it_no_key_and_no_wake_up() {
    support::quiet_handler_panics();
    const SET: u64 = 10;
    for keys in [2, 3, 5] {
        let layer = layer();
        let (mut service, mut calls) = serve(&layer);
        for key in 0..keys {
            calls.call(&mut service, one(key, key));
        }
        calls.call(&mut service, all(SET, (0..keys).rev()));
        calls.call(&mut service, one(20, 0));
        assert_pending!(calls.poll(20));
        let probe = Probe::new();
        let waker = probe.waker();
        assert_pending!(calls.poll_with(SET, &waker));
        drop(waker);
        // Only the copies in the keys' lines are left.
        probe.panic_on_drop(true);
        let mut panics = 0;
        loop {
            let polled = catch_unwind(AssertUnwindSafe(|| calls.poll(SET)));
            match polled {
                Ok(polled) => {
                    assert!(polled.is_pending(), "{keys} keys");
                    break;
                }
                Err(payload) => assert_eq!(message(payload), DROP_PANIC),
            }
            panics += 1;
            assert!(panics <= keys, "{keys} keys: a poll made no progress");
        }
        probe.disarm();
        assert_eq!(
            panics, keys,
            "{keys} keys: some key's waker was not replaced"
        );
        assert_eq!(
            counts(layer.stats()),
            (keys as usize, keys as usize, keys as usize + 1)
        );
        calls.drain();
        calls.assert_in_order(1);
        assert_eq!(
            calls.handlers.called()[keys as usize..],
            [SET, 20],
            "{keys} keys"
        );
        assert!(layer.stats().is_idle(), "{keys} keys: {:?}", layer.stats());
    }
}

/// A set handed every key before its first poll, first polled with a waker whose `drop`
/// panics: the clone made for each key is let go of once the key is the set's, and each
/// such poll panics; the set still runs once, in its turn.
#[test]
fn a_set_first_polled_with_a_waker_whose_drop_panics_after_it_was_handed_its_keys_runs_once() {
    support::quiet_handler_panics();
    const SET: u64 = 10;
    let layer = layer();
    let (mut service, mut calls) = serve(&layer);
    for key in [1, 2, 3] {
        calls.call(&mut service, one(key, key));
    }
    calls.call(&mut service, all(SET, [1, 2, 3]));
    calls.call(&mut service, all(20, [3, 2]));
    assert_pending!(calls.poll(20));
    for key in [1, 2, 3] {
        calls.complete(key);
    }
    let probe = Probe::new();
    let waker = probe.waker();
    probe.panic_on_drop(true);
    let mut panics = 0;
    loop {
        match catch_unwind(AssertUnwindSafe(|| calls.poll_with(SET, &waker))) {
            Ok(polled) => {
                assert!(polled.is_pending());
                break;
            }
            Err(payload) => assert_eq!(message(payload), DROP_PANIC),
        }
        panics += 1;
        assert!(panics <= 3, "a poll made no progress");
    }
    probe.disarm();
    drop(waker);
    assert_eq!(panics, 3);
    assert_eq!(calls.handlers.called(), [1, 2, 3, SET]);
    calls.drain();
    calls.assert_in_order(1);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

/// A set is dropped while the waiters behind it on each key have wakers whose `wake`
/// panics: the first wake's panic leaves the drop, the others are contained, and every
/// key passes on.
#[test]
fn dropping_a_set_whose_next_waiters_panic_when_woken_passes_every_key_on() {
    support::quiet_handler_panics();
    const SET: u64 = 10;
    for running in [false, true] {
        let layer = layer();
        let (mut service, mut calls) = serve(&layer);
        if !running {
            // The set heads keys 1 and 3 and waits on key 2.
            calls.call(&mut service, one(1, 2));
        }
        calls.call(&mut service, all(SET, [1, 2, 3]));
        let probe = Probe::new();
        let waker = probe.waker();
        for (id, key) in [(20, 1), (21, 2), (22, 3)] {
            calls.call(&mut service, one(id, key));
            assert_pending!(calls.poll_with(id, &waker));
        }
        drop(waker);
        probe.panic_on_wake(true);
        assert_eq!(calls.drop_panicking(SET), WAKE_PANIC, "running {running}");
        probe.disarm();
        let woken = if running { 3 } else { 2 };
        assert_eq!(probe.wakes(), woken, "running {running}");
        let queued = if running { 0 } else { 1 };
        assert_eq!(
            counts(layer.stats()),
            (3, 3, queued),
            "running {running}: a key did not pass on"
        );
        calls.drain();
        calls.assert_in_order(1);
        assert!(
            layer.stats().is_idle(),
            "running {running}: {:?}",
            layer.stats()
        );
    }
}

/// Dropping a set whose lines keep wakers whose `drop` panics: the first stale waker's
/// panic leaves the drop, the others are contained, and every key passes on.
#[test]
fn dropping_a_waiting_set_whose_stored_wakers_panic_when_dropped_passes_every_key_on() {
    support::quiet_handler_panics();
    const SET: u64 = 10;
    let layer = layer();
    let (mut service, mut calls) = serve(&layer);
    for key in [1, 2, 3] {
        calls.call(&mut service, one(key, key));
    }
    calls.call(&mut service, all(SET, [1, 2, 3]));
    calls.call(&mut service, all(20, [1, 2, 3]));
    assert_pending!(calls.poll(20));
    let probe = Probe::new();
    let waker = probe.waker();
    assert_pending!(calls.poll_with(SET, &waker));
    drop(waker);
    probe.panic_on_drop(true);
    assert_eq!(calls.drop_panicking(SET), DROP_PANIC);
    probe.disarm();
    assert_eq!(counts(layer.stats()), (3, 3, 3));
    calls.drain();
    calls.assert_in_order(1);
    assert_eq!(calls.handlers.called(), [1, 2, 3, 20]);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

// ---------------------------------------------------------------------------------------
// The start of a set is told to every key, whatever a woken waiter's waker does.
// ---------------------------------------------------------------------------------------

/// With more than one permit per key, a set that starts tells each key's shard, so that
/// the next request on each key may run beside it. Each notice wakes the waiter it lets
/// start, and here every waiter's `wake` panics: the first panic leaves the set's poll,
/// and the other keys must have been told all the same, as a single-key request records
/// its start before its notice wakes anyone.
#[test]
fn a_set_that_starts_tells_every_key_even_when_a_woken_waiter_panics() {
    support::quiet_handler_panics();
    const SET: u64 = 1;
    for permits in [2, 3] {
        for keys in [vec![1, 2], vec![1, 2, 3], vec![4, 3, 2, 1]] {
            let label = format!("{permits} permits, keys {keys:?}");
            let layer = layer().permits_per_key(permits);
            let (mut service, mut calls) = serve(&layer);
            // Every key is free but the inner service is not ready: the set heads every
            // key, unstarted, and the next request on each key waits for its start.
            calls.handlers.set_readiness(Readiness::Closed(None));
            calls.call(&mut service, all(SET, keys.clone()));
            assert_pending!(calls.poll(SET), "{label}");
            let probe = Probe::new();
            let waker = probe.waker();
            for &key in &keys {
                calls.call(&mut service, one(10 + key, key));
                assert_pending!(calls.poll_with(10 + key, &waker), "{label}");
            }
            drop(waker);
            assert!(calls.handlers.called().is_empty(), "{label}");
            probe.panic_on_wake(true);

            calls.handlers.set_readiness(Readiness::Ready);
            assert_eq!(calls.poll_panicking(SET, None), WAKE_PANIC, "{label}");
            probe.disarm();
            assert_eq!(calls.handlers.called(), [SET], "{label}");
            // Each waiter was let start: polled, it runs beside the set.
            for &key in &keys {
                assert_pending!(calls.poll(10 + key), "{label}");
            }
            let mut expected = vec![SET];
            expected.extend(keys.iter().map(|key| 10 + key));
            let mut called = calls.handlers.called();
            called[1..].sort_unstable();
            expected[1..].sort_unstable();
            assert_eq!(
                called, expected,
                "{label}: a key was not told that the set started, and its next request \
                 waits for the set to end"
            );
            calls.drain();
            calls.assert_in_order(permits);
            assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
        }
    }
}

// ---------------------------------------------------------------------------------------
// A set dropped in every state, with one to three permits per key.
// ---------------------------------------------------------------------------------------

/// Where a set stands when it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// In line on every key, never polled.
    WaitingUnpolled,
    /// In line on every key, polled.
    WaitingPolled,
    /// Heads keys 1 and 3, waits on key 2, never polled.
    HeadsSomeUnpolled,
    /// The same, polled.
    HeadsSomePolled,
    /// Handed key 2 too, and woken, but not polled again.
    HandedAllUnpolled,
    /// Heads every key; the inner service is not ready.
    HeadsAllNotReady,
    /// Called inside `call()`, running.
    Running,
    /// Heads every key in `call()`, where the inner service's readiness fails.
    FailsInCall,
    /// Waited for key 2; handed it, its readiness fails.
    FailsAfterWaiting,
}

const STAGES: [Stage; 9] = [
    Stage::WaitingUnpolled,
    Stage::WaitingPolled,
    Stage::HeadsSomeUnpolled,
    Stage::HeadsSomePolled,
    Stage::HandedAllUnpolled,
    Stage::HeadsAllNotReady,
    Stage::Running,
    Stage::FailsInCall,
    Stage::FailsAfterWaiting,
];

fn a_set_goes_at(stage: Stage, permits: usize) {
    const SET: u64 = 10;
    let label = format!("{stage:?}, {permits} permits");
    let layer = layer().permits_per_key(permits);
    let (mut service, mut calls) = serve(&layer);
    let busy: &[u64] = match stage {
        Stage::WaitingUnpolled | Stage::WaitingPolled => &[1, 2, 3],
        Stage::HeadsSomeUnpolled
        | Stage::HeadsSomePolled
        | Stage::HandedAllUnpolled
        | Stage::FailsAfterWaiting => &[2],
        Stage::HeadsAllNotReady | Stage::Running | Stage::FailsInCall => &[],
    };
    let mut holders = Vec::new();
    for &key in busy {
        for _ in 0..permits {
            let id = 100 + holders.len() as u64;
            calls.call(&mut service, one(id, key));
            holders.push((id, key));
        }
    }
    match stage {
        Stage::HeadsAllNotReady => calls.handlers.set_readiness(Readiness::Closed(None)),
        Stage::FailsInCall => calls.handlers.set_readiness(Readiness::Failing),
        _ => {}
    }
    calls.call(&mut service, all(SET, [3, 1, 2]));
    if stage == Stage::FailsInCall {
        calls.handlers.set_readiness(Readiness::Ready);
    }
    let behind = [
        one(20, 1),
        one(21, 2),
        one(22, 3),
        all(23, [3, 1]),
        all(24, [2, 4]),
    ];
    for request in behind {
        let id = request.id;
        calls.call(&mut service, request);
        let _ = calls.poll(id);
    }
    let polled = !matches!(
        stage,
        Stage::WaitingUnpolled | Stage::HeadsSomeUnpolled | Stage::FailsInCall
    );
    if polled {
        assert_pending!(calls.poll(SET), "{label}");
    }
    if matches!(stage, Stage::HandedAllUnpolled | Stage::FailsAfterWaiting) {
        if stage == Stage::FailsAfterWaiting {
            calls.handlers.set_readiness(Readiness::Failing);
        }
        for &(id, _) in &holders {
            calls.complete(id);
        }
        assert!(calls.is_woken(SET), "{label}");
    }
    if stage == Stage::Running {
        // Called in `call()`; with more permits, the next request on each key runs beside
        // it (the set told every key it started), and sets behind those wait.
        let mut expected = vec![SET];
        if permits > 1 {
            expected.extend([20, 21, 22]);
        }
        if permits > 2 {
            expected.extend([23, 24]);
        }
        assert_eq!(calls.handlers.called(), expected, "{label}");
    }

    match stage {
        Stage::FailsInCall | Stage::FailsAfterWaiting => {
            assert!(matches!(calls.poll(SET), Poll::Ready(Err(_))), "{label}");
            calls.handlers.set_readiness(Readiness::Ready);
        }
        _ => calls.drop(SET),
    }
    if stage == Stage::HeadsAllNotReady {
        calls.handlers.set_readiness(Readiness::Ready);
    }
    // The keys it headed pass on at once.
    let headed: &[u64] = match stage {
        Stage::WaitingUnpolled | Stage::WaitingPolled => &[],
        Stage::HeadsSomeUnpolled | Stage::HeadsSomePolled => &[20, 22],
        Stage::Running if permits > 1 => &[],
        _ => &[20, 21, 22],
    };
    for &id in headed {
        assert!(calls.is_woken(id), "{label}: {id} was not passed its key");
    }
    calls.drain();
    calls.assert_in_order(permits);
    let called = calls.handlers.called();
    for id in [20, 21, 22, 23, 24] {
        assert!(called.contains(&id), "{label}: {id} never ran");
    }
    assert_eq!(
        called.contains(&SET),
        stage == Stage::Running,
        "{label}: {called:?}"
    );
    assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
}

#[test]
fn a_set_that_goes_in_any_state_passes_every_key_on() {
    for permits in [1, 2, 3] {
        for stage in STAGES {
            a_set_goes_at(stage, permits);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Keys whose `Eq`, `Hash` or `Drop` panic.
// ---------------------------------------------------------------------------------------

const EQ_PANIC: &str = "injected: a key's eq panicked";
const HASH_PANIC: &str = "injected: a key's hash panicked";

/// Where a [`Fragile`] key panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// In `eq`, against any key.
    Eq,
    /// In `hash`.
    Hash,
    /// In `drop`, unless the thread is unwinding already.
    Drop,
    /// In `drop`, even while the thread unwinds: the process aborts if nothing contains
    /// it, so only a child process holds such keys (see `aborts`).
    DropAlways,
}

/// A key equal to and hashed as its `id`, that panics where `fault` says.
#[derive(Debug)]
struct Fragile {
    id: u64,
    fault: Option<Fault>,
}

impl PartialEq for Fragile {
    fn eq(&self, other: &Self) -> bool {
        if self.fault == Some(Fault::Eq) || other.fault == Some(Fault::Eq) {
            panic!("{EQ_PANIC}");
        }
        self.id == other.id
    }
}

impl Eq for Fragile {}

impl Hash for Fragile {
    fn hash<S: Hasher>(&self, state: &mut S) {
        if self.fault == Some(Fault::Hash) {
            panic!("{HASH_PANIC}");
        }
        self.id.hash(state);
    }
}

impl Drop for Fragile {
    fn drop(&mut self) {
        match self.fault {
            Some(Fault::Drop) if !std::thread::panicking() => panic!("{}", support::KEY_DROP_PANIC),
            Some(Fault::DropAlways) => panic!("{}", support::KEY_DROP_PANIC),
            _ => {}
        }
    }
}

/// A request on keys built by the policy from `(id, fault)` pairs: `Mode::Sync` for one
/// pair, `Mode::SyncAll` for several.
#[derive(Debug, Clone)]
struct Shaped {
    id: u64,
    keys: Vec<(u64, Option<Fault>)>,
}

impl Job for Shaped {
    fn id(&self) -> u64 {
        self.id
    }

    fn key_ids(&self) -> Vec<u64> {
        self.keys.iter().map(|&(id, _)| id).collect()
    }
}

type ShapePolicy = fn(&Shaped) -> Mode<Fragile>;

fn by_shape(request: &Shaped) -> Mode<Fragile> {
    let mut keys: Vec<Fragile> = request
        .keys
        .iter()
        .map(|&(id, fault)| Fragile { id, fault })
        .collect();
    if keys.len() == 1 {
        Mode::Sync(keys.pop().expect("one key"))
    } else {
        Mode::SyncAll(Box::new(keys))
    }
}

fn shaped(id: u64, keys: &[(u64, Option<Fault>)]) -> Shaped {
    Shaped {
        id,
        keys: keys.to_vec(),
    }
}

/// A request on harmless keys.
fn on(id: u64, keys: &[u64]) -> Shaped {
    Shaped {
        id,
        keys: keys.iter().map(|&key| (key, None)).collect(),
    }
}

type ShapeLayer = SyncEngineLayer<ShapePolicy, Fragile>;
type ShapeEngine = SyncEngine<Handlers, ShapePolicy, Fragile>;
type ShapeFuture = tower_sync_engine::ResponseFuture<Handlers, Shaped, Fragile>;

fn shape_layer() -> ShapeLayer {
    SyncEngineLayer::new(by_shape as ShapePolicy)
}

fn serve_shapes(layer: &ShapeLayer) -> (ShapeEngine, Calls<ShapeFuture>) {
    let handlers = Handlers::default();
    (layer.layer(handlers.clone()), Calls::new(&handlers))
}

/// Where a set's key panics inside `call()`.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// `Eq`, against the live key it is looked up with, under that key's shard lock,
    /// once the keys before it in shard order have their places.
    Lookup,
    /// `Eq`, against a duplicate of it in the set, before any lock.
    Duplicate,
    /// `Hash`, before any lock.
    Hash,
}

/// The keys of a set that panics where `placement` says, around `others`.
fn panicking_set(placement: Placement, others: &[(u64, Option<Fault>)], round: usize) -> Shaped {
    let mut keys = others.to_vec();
    match placement {
        Placement::Lookup => keys.push((1, Some(Fault::Eq))),
        Placement::Duplicate => keys.extend([(7, Some(Fault::Eq)), (7, None)]),
        Placement::Hash => keys.push((8, Some(Fault::Hash))),
    }
    let len = keys.len();
    keys.rotate_left(round % len);
    Shaped { id: 99, keys }
}

#[test]
fn a_key_whose_eq_or_hash_panics_in_a_set_gives_back_every_place_taken() {
    support::quiet_handler_panics();
    for round in 0..16 {
        for placement in [Placement::Lookup, Placement::Duplicate, Placement::Hash] {
            let label = format!("{placement:?}, round {round}");
            // A domain of its own each round: the keys fall into other shards, and the
            // panicking key comes after others in shard order, or before.
            let layer = shape_layer();
            let (mut service, mut calls) = serve_shapes(&layer);
            // Key 1 is held and has a waiter; key 9 is held by a set with key 1.
            calls.call(&mut service, on(1, &[1]));
            calls.call(&mut service, on(2, &[1, 9]));
            assert_pending!(calls.poll(2), "{label}");
            let before = layer.stats();
            assert_eq!(counts(before), (2, 2, 1), "{label}");

            let others = [(3, None), (4, None), (5, None), (6, None), (9, None)];
            let set = panicking_set(placement, &others, round);
            let panicked = catch_unwind(AssertUnwindSafe(|| drop(service.call(set))));
            let expected = match placement {
                Placement::Lookup | Placement::Duplicate => EQ_PANIC,
                Placement::Hash => HASH_PANIC,
            };
            assert_eq!(
                panicked.map_err(message).expect_err("nothing panicked"),
                expected,
                "{label}"
            );
            // Every place it took is given back: the new keys are free, the live ones
            // have their lines as they were.
            assert_eq!(layer.stats(), before, "{label}");
            calls.call(&mut service, on(10, &[6, 5, 4, 3]));
            assert_eq!(calls.handlers.called(), [1, 10], "{label}");
            calls.call(&mut service, on(11, &[9]));
            calls.call(&mut service, on(12, &[1]));
            calls.drain();
            calls.assert_in_order(1);
            assert_eq!(calls.handlers.called(), [1, 10, 2, 11, 12], "{label}");
            assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
        }
    }
}

#[test]
fn keys_whose_drop_panics_when_a_set_gives_them_up_wedge_no_key() {
    support::quiet_handler_panics();
    const SET: u64 = 10;
    for waiting in [false, true] {
        for round in 0..4 {
            let label = format!("waiting {waiting}, round {round}");
            let layer = shape_layer();
            let (mut service, mut calls) = serve_shapes(&layer);
            if waiting {
                calls.call(&mut service, on(1, &[3]));
            }
            // Keys 1 and 2 are new: the registry keeps the set's own, explosive, copies
            // and lets go of them when the set gives the keys up.
            let mut keys = vec![(1, Some(Fault::Drop)), (2, Some(Fault::Drop)), (3, None)];
            keys.rotate_left(round % 3);
            calls.call(&mut service, shaped(SET, &keys));
            calls.call(&mut service, on(20, &[3]));
            assert_pending!(calls.poll(20), "{label}");
            if waiting {
                assert_pending!(calls.poll(SET), "{label}");
                assert_eq!(
                    calls.drop_panicking(SET),
                    support::KEY_DROP_PANIC,
                    "{label}"
                );
                assert_eq!(counts(layer.stats()), (1, 1, 1), "{label}");
            } else {
                assert_eq!(calls.handlers.called(), [SET], "{label}");
                calls.handlers.finish(SET);
                assert_eq!(
                    calls.poll_panicking(SET, None),
                    support::KEY_DROP_PANIC,
                    "{label}"
                );
                calls.forget(SET);
                // Key 3 went to the next request; keys 1 and 2 are free.
                assert_eq!(counts(layer.stats()), (1, 1, 0), "{label}");
                assert!(calls.is_woken(20), "{label}");
            }
            calls.call(&mut service, on(21, &[2, 1]));
            calls.call(&mut service, on(22, &[3, 2, 1]));
            calls.drain();
            calls.assert_in_order(1);
            assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
        }
    }
}

// ---------------------------------------------------------------------------------------
// In a child process: a set's key whose `Eq` or `Hash` panics, beside keys whose
// `Drop` panics even while the thread unwinds. The keys that `call()` lets go of while
// that panic unwinds must be dropped as guarantee 6 says, their panics contained; one
// dropped plainly aborts the process.
// ---------------------------------------------------------------------------------------

/// The environment variable that names the scenario the child runs.
const SCENARIO: &str = "TOWER_SYNC_ENGINE_MULTI_KEY_ADVERSARIAL_SCENARIO";

/// What a child prints once the scenario has passed.
const PASSED: &str = "scenario passed:";

#[test]
fn a_set_whose_key_eq_panics_on_lookup_does_not_abort_over_keys_whose_drop_panics() {
    in_child("lookup");
}

#[test]
fn a_set_whose_key_eq_panics_on_a_duplicate_does_not_abort_over_keys_whose_drop_panics() {
    in_child("duplicate");
}

#[test]
fn a_set_whose_key_hash_panics_does_not_abort_over_keys_whose_drop_panics() {
    in_child("hash");
}

/// Runs `scenario` in a child process (this test binary, with the scenario's name in
/// `SCENARIO`), and checks that it passed, and was not aborted.
#[track_caller]
fn in_child(scenario: &str) {
    let ChildRun {
        status,
        stdout,
        report,
        ..
    } = run_child(SCENARIO, scenario);
    assert_eq!(status.code(), Some(0), "scenario {scenario}: {report}");
    assert!(
        stdout.contains(&format!("{PASSED} {scenario}")),
        "scenario {scenario} did not pass: {report}"
    );
}

/// The test the child runs: a no-op unless `SCENARIO` is set.
#[test]
fn child() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let placement = match scenario.as_str() {
        "lookup" => Placement::Lookup,
        "duplicate" => Placement::Duplicate,
        "hash" => Placement::Hash,
        other => panic!("unknown scenario {other}"),
    };
    support::quiet_handler_panics();
    for round in 0..8 {
        let layer = shape_layer();
        let (mut service, mut calls) = serve_shapes(&layer);
        calls.call(&mut service, on(1, &[1]));
        let before = layer.stats();
        // New keys, each of whose copies panics when dropped, whenever that is.
        let explosive: Vec<(u64, Option<Fault>)> =
            (20..28).map(|key| (key, Some(Fault::DropAlways))).collect();
        let set = panicking_set(placement, &explosive, round);
        let panicked = catch_unwind(AssertUnwindSafe(|| drop(service.call(set))));
        let expected = match placement {
            Placement::Lookup | Placement::Duplicate => EQ_PANIC,
            Placement::Hash => HASH_PANIC,
        };
        assert_eq!(
            panicked.map_err(message).expect_err("nothing panicked"),
            expected
        );
        assert_eq!(layer.stats(), before, "round {round}");
        calls.drain();
        assert!(
            layer.stats().is_idle(),
            "round {round}: {:?}",
            layer.stats()
        );
    }
    println!("{PASSED} {scenario}");
}

// ---------------------------------------------------------------------------------------
// Set numbers reused: thousands of sets given up and replaced, checked step by step
// against what `stats()` must count.
// ---------------------------------------------------------------------------------------

/// Keys the churning requests draw from.
const CHURN_KEYS: u64 = 8;

/// Random steps on one service: new requests (mostly sets of two to six keys, with
/// duplicates, each with `first` as a key when given), polls, handlers that finish,
/// futures dropped in any state. After every step `stats()` must count exactly the live
/// requests: each live key once, and one place per key of each live request (with one
/// permit, one of them holding the key). A set that released a key of another set, or
/// kept one of its own, would be off by a key, and then run out of order or never.
fn churn<H: BuildHasher>(
    layer: &SyncEngineLayer<Policy, u64, H>,
    seed: u64,
    permits: usize,
    steps: usize,
    first: Option<u64>,
) {
    let (mut service, mut calls) = serve(layer);
    let mut rng = Rng::new(seed);
    let mut next = 0;
    for step in 0..steps {
        let live = calls.live.len();
        match rng.below(100) {
            0..40 if live < 48 => {
                let id = next;
                next += 1;
                let request = if rng.chance(80) {
                    let size = 2 + rng.below(5);
                    let mut keys: Vec<u64> = (0..size).map(|_| rng.below(CHURN_KEYS)).collect();
                    keys.extend(first);
                    keys.rotate_right(first.map_or(0, |_| 1));
                    all(id, keys)
                } else {
                    one(id, rng.below(CHURN_KEYS))
                };
                calls.call(&mut service, request);
            }
            0..65 if live > 0 => {
                let id = calls.live[rng.below(live as u64) as usize].id;
                let _ = calls.poll(id);
            }
            65..85 => {
                let running = calls.handlers.unfinished();
                if !running.is_empty() {
                    calls
                        .handlers
                        .finish(running[rng.below(running.len() as u64) as usize]);
                }
            }
            85.. if live > 0 => {
                let id = calls.live[rng.below(live as u64) as usize].id;
                calls.drop(id);
            }
            _ => {}
        }
        let live: Vec<&Vec<u64>> = calls
            .live
            .iter()
            .map(|live| &calls.keys[&live.id])
            .collect();
        let keys: HashSet<u64> = live.iter().flat_map(|keys| keys.iter().copied()).collect();
        let places: usize = live.iter().map(|keys| keys.len()).sum();
        let stats = layer.stats();
        let label = format!("seed {seed}, step {step}: {stats:?}");
        assert_eq!(stats.keys, keys.len(), "{label}: live keys");
        assert_eq!(stats.in_flight + stats.queued, places, "{label}: places");
        if permits == 1 {
            assert_eq!(stats.in_flight, keys.len(), "{label}: holders");
        } else {
            assert!(
                (keys.len()..=keys.len() * permits).contains(&stats.in_flight),
                "{label}: holders"
            );
        }
    }
    calls.drain_picking(|running| rng.below(running as u64) as usize);
    calls.assert_in_order(permits);
    assert!(calls.errors.is_empty(), "seed {seed}: {:?}", calls.errors);
    assert!(layer.stats().is_idle(), "seed {seed}: {:?}", layer.stats());
}

#[test]
fn thousands_of_sets_led_from_one_shard_wait_for_and_release_exactly_their_own_keys() {
    for seed in 0..6 {
        let permits = if seed % 3 == 2 { 2 } else { 1 };
        let layer = layer().with_hasher(OneShard).permits_per_key(permits);
        churn(&layer, seed, permits, 2_500, None);
    }
}

#[test]
fn thousands_of_sets_sharing_their_first_key_wait_for_and_release_exactly_their_own_keys() {
    for seed in 0..4 {
        let permits = if seed == 3 { 3 } else { 1 };
        churn(
            &layer().permits_per_key(permits),
            seed,
            permits,
            2_500,
            Some(0),
        );
        let layer = layer().with_hasher(OneShard).permits_per_key(permits);
        churn(&layer, seed + 100, permits, 2_500, Some(0));
    }
}

// ---------------------------------------------------------------------------------------
// Sets sharing keys with single-key requests and other sets, in every call order,
// all in one shard or spread.
// ---------------------------------------------------------------------------------------

/// Every order of `0..n`.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut orders = Vec::new();
    for shorter in permutations(n - 1) {
        for at in 0..n {
            let mut order = shorter.clone();
            order.insert(at, n - 1);
            orders.push(order);
        }
    }
    orders
}

fn in_every_order<H: BuildHasher>(make: impl Fn() -> SyncEngineLayer<Policy, u64, H>) {
    // Keys 1, 2, 3: single keys, sets that share their keys (in any key order, with a
    // duplicate), and a set of all three.
    let shapes: [&[u64]; 6] = [&[1], &[1, 2], &[2, 3, 1], &[2], &[1, 3], &[3, 1, 3]];
    for (n, order) in permutations(shapes.len()).into_iter().enumerate() {
        let layer = make();
        let (mut service, mut calls) = serve(&layer);
        for &shape in &order {
            calls.call(
                &mut service,
                all(shape as u64, shapes[shape].iter().copied()),
            );
        }
        // Polled in reverse call order first.
        for &shape in order.iter().rev() {
            if calls.is_live(shape as u64) {
                let _ = calls.poll(shape as u64);
            }
        }
        // The first running handler finishes first, or the last.
        if n % 2 == 0 {
            calls.drain();
        } else {
            calls.drain_picking(|running| running - 1);
        }
        calls.assert_in_order(1);
        assert_eq!(calls.handlers.called().len(), shapes.len(), "{order:?}");
        assert!(layer.stats().is_idle(), "{order:?}: {:?}", layer.stats());
    }
}

#[test]
fn sets_sharing_keys_with_single_keys_and_other_sets_keep_one_order_in_every_call_order() {
    in_every_order(layer);
    in_every_order(|| layer().with_hasher(OneShard));
}

// ---------------------------------------------------------------------------------------
// The HTTP flavour: a set holds every key until its response body ends.
// ---------------------------------------------------------------------------------------

#[cfg(feature = "http")]
mod http_flavour {
    use std::collections::HashMap;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use axum::body::Body;
    use axum::http::{Request, Response};
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;
    use tokio_test::{assert_pending, assert_ready_ok, task};
    use tower::{Layer, Service, service_fn};
    use tower_sync_engine::http::HttpSyncEngineLayer;
    use tower_sync_engine::{Mode, SyncEngineLayer};

    use super::counts;
    use crate::sets::http::{by_keys, request};

    type ByKeys = fn(&Request<u64>) -> Mode<u64>;

    fn http_layer() -> HttpSyncEngineLayer<ByKeys, u64> {
        SyncEngineLayer::new(by_keys as ByKeys).for_http()
    }

    type Frames = mpsc::UnboundedSender<Result<&'static str, std::io::Error>>;

    /// Requests below it answer with a body that streams what the test sends; the others
    /// with an empty body, which holds no key.
    const STREAMED: u64 = 4;

    /// The inner service: records whom it is called with, and keeps the sending end of
    /// each streamed body.
    #[derive(Clone, Default)]
    struct Backend {
        called: Arc<Mutex<Vec<u64>>>,
        streams: Arc<Mutex<HashMap<u64, Frames>>>,
    }

    impl Backend {
        fn service(
            &self,
        ) -> impl Service<Request<u64>, Response = Response<Body>, Error = Infallible> + Clone + use<>
        {
            let backend = self.clone();
            service_fn(move |request: Request<u64>| {
                let id = *request.body();
                backend.called.lock().unwrap().push(id);
                let body = if id < STREAMED {
                    let (frames, mut receiver) = mpsc::unbounded_channel();
                    backend.streams.lock().unwrap().insert(id, frames);
                    Body::from_stream(futures::stream::poll_fn(move |cx| receiver.poll_recv(cx)))
                } else {
                    Body::empty()
                };
                std::future::ready(Ok::<_, Infallible>(Response::new(body)))
            })
        }

        fn called(&self) -> Vec<u64> {
            self.called.lock().unwrap().clone()
        }

        fn send(&self, id: u64, frame: Result<&'static str, std::io::Error>) {
            self.streams.lock().unwrap()[&id].send(frame).unwrap();
        }

        /// Ends the body of `id`.
        fn end(&self, id: u64) {
            self.streams.lock().unwrap().remove(&id);
        }
    }

    /// How the set's body lets its keys go.
    #[derive(Debug, Clone, Copy)]
    enum Release {
        Ends,
        Fails,
        Dropped,
    }

    #[tokio::test(start_paused = true)]
    async fn a_set_waits_for_the_bodies_ahead_of_it_and_holds_every_key_until_its_own_ends() {
        for release in [Release::Ends, Release::Fails, Release::Dropped] {
            let layer = http_layer();
            let backend = Backend::default();
            let mut service = layer.layer(backend.service());
            let mut first = task::spawn(service.call(request(1, &[1])));
            let mut body_one = assert_ready_ok!(first.poll()).into_body();
            let mut second = task::spawn(service.call(request(2, &[2, 3])));
            let body_two = assert_ready_ok!(second.poll()).into_body();
            let mut set = task::spawn(service.call(request(3, &[3, 1, 2])));
            assert_pending!(set.poll());
            let mut later: Vec<_> = [(4, &[1][..]), (5, &[2]), (6, &[3]), (7, &[3, 1])]
                .into_iter()
                .map(|(id, keys)| task::spawn(service.call(request(id, keys))))
                .collect();
            for future in &mut later {
                assert_pending!(future.poll());
            }
            assert_eq!(counts(layer.stats()), (3, 3, 8), "{release:?}");

            // Key 1's body ends: the set heads key 1, and still waits for keys 2 and 3.
            backend.end(1);
            assert!(body_one.frame().await.is_none());
            assert!(set.is_woken(), "{release:?}");
            assert_pending!(set.poll());
            assert_eq!(backend.called(), [1, 2], "{release:?}");
            // The body of the set on keys 2 and 3 goes: the set is called.
            drop(body_two);
            assert!(set.is_woken(), "{release:?}");
            let mut body = assert_ready_ok!(set.poll()).into_body();
            assert_eq!(backend.called(), [1, 2, 3], "{release:?}");
            assert_eq!(counts(layer.stats()), (3, 3, 5), "{release:?}");

            // Its response is out and frames flow: every key stays held.
            backend.send(3, Ok("frame"));
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "frame");
            for future in &mut later {
                assert!(!future.is_woken(), "{release:?}");
                assert_pending!(future.poll());
            }
            assert_eq!(counts(layer.stats()), (3, 3, 5), "{release:?}");

            match release {
                Release::Ends => {
                    backend.end(3);
                    assert!(body.frame().await.is_none());
                }
                Release::Fails => {
                    backend.send(3, Err(std::io::Error::other("the stream broke")));
                    assert!(body.frame().await.unwrap().is_err());
                }
                Release::Dropped => drop(body),
            }
            // Every key passes on in the same step.
            for future in &mut later[..3] {
                assert!(future.is_woken(), "{release:?}");
            }
            for future in &mut later[..3] {
                // Empty bodies: each key passes on again at once.
                drop(assert_ready_ok!(future.poll()));
            }
            assert!(later[3].is_woken(), "{release:?}");
            drop(assert_ready_ok!(later[3].poll()));
            assert_eq!(backend.called(), [1, 2, 3, 4, 5, 6, 7], "{release:?}");
            assert!(layer.stats().is_idle(), "{release:?}: {:?}", layer.stats());
        }
    }

    /// Where the set's response future is dropped.
    #[derive(Debug, Clone, Copy)]
    enum Dropped {
        /// In line for key 1, heading key 2.
        Waiting,
        /// Handed key 1 too, not polled again.
        Handed,
        /// Answered: its whole response is dropped unread.
        Answered,
    }

    #[tokio::test(start_paused = true)]
    async fn a_set_dropped_at_any_point_over_http_passes_every_key_on() {
        for dropped in [Dropped::Waiting, Dropped::Handed, Dropped::Answered] {
            let layer = http_layer();
            let backend = Backend::default();
            let mut service = layer.layer(backend.service());
            let mut holder = task::spawn(service.call(request(1, &[1])));
            let mut body_one = assert_ready_ok!(holder.poll()).into_body();
            let mut set = task::spawn(service.call(request(2, &[2, 1])));
            assert_pending!(set.poll());
            let mut on_two = task::spawn(service.call(request(4, &[2])));
            let mut on_both = task::spawn(service.call(request(5, &[1, 2])));
            assert_pending!(on_two.poll());
            assert_pending!(on_both.poll());
            match dropped {
                Dropped::Waiting => {
                    drop(set);
                    assert!(on_two.is_woken(), "{dropped:?}");
                    drop(assert_ready_ok!(on_two.poll()));
                    assert_pending!(on_both.poll());
                    backend.end(1);
                    assert!(body_one.frame().await.is_none());
                }
                Dropped::Handed => {
                    backend.end(1);
                    assert!(body_one.frame().await.is_none());
                    assert!(set.is_woken(), "{dropped:?}");
                    drop(set);
                    assert!(on_two.is_woken(), "{dropped:?}");
                    drop(assert_ready_ok!(on_two.poll()));
                }
                Dropped::Answered => {
                    backend.end(1);
                    assert!(body_one.frame().await.is_none());
                    let response = assert_ready_ok!(set.poll());
                    assert_eq!(counts(layer.stats()), (2, 2, 3), "{dropped:?}");
                    drop(response);
                    assert!(on_two.is_woken(), "{dropped:?}");
                    drop(assert_ready_ok!(on_two.poll()));
                }
            }
            assert!(on_both.is_woken(), "{dropped:?}");
            drop(assert_ready_ok!(on_both.poll()));
            let mut expected = vec![1];
            expected.extend(matches!(dropped, Dropped::Answered).then_some(2));
            expected.extend([4, 5]);
            assert_eq!(backend.called(), expected, "{dropped:?}");
            assert!(layer.stats().is_idle(), "{dropped:?}: {:?}", layer.stats());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Many threads: sets and single keys racing, cancelled by timeouts, drops and aborts.
// ---------------------------------------------------------------------------------------

mod racing {
    use std::collections::HashMap;
    use std::hash::BuildHasher;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tower::{BoxError, Layer};
    use tower_sync_engine::{Mode, SyncEngineLayer};

    use super::{OneShard, Rng, distinct};
    use crate::threads::{CallClock, assert_one_global_order, on_threads, race, until_idle, work};

    /// Keys the requests draw from: few, so that they overlap a lot; key 0 is in half
    /// the sets, first.
    const KEYS: u64 = 5;
    const CALLERS: u64 = 4;
    const PER_CALLER: u64 = 300;
    /// Longer than any run takes; reaching it means a request never completed. The
    /// clock is real here (a paused clock needs a single thread): it only turns a hang
    /// into a failure, and the timeouts below only pick when requests are cancelled.
    const HANG: Duration = Duration::from_secs(120);

    #[derive(Debug, Clone)]
    struct Task {
        id: u64,
        keys: Vec<u64>,
        yields: u64,
    }

    fn by_keys(task: &Task) -> Mode<u64> {
        Mode::sync_all(task.keys.iter().copied())
    }

    type TaskPolicy = fn(&Task) -> Mode<u64>;

    type TaskLayer<H = std::hash::RandomState> = SyncEngineLayer<TaskPolicy, u64, H>;

    /// One handler's start or end on one key.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        Start(u64),
        End(u64),
    }

    /// What the handlers and callers record.
    #[derive(Default)]
    struct Journal {
        calls: CallClock,
        state: Mutex<JournalState>,
    }

    #[derive(Default)]
    struct JournalState {
        /// Per key, every start and end of a handler, in order. A handler's start (and
        /// its end) is recorded on all of its keys at once, under this lock.
        log: HashMap<u64, Vec<Event>>,
    }

    /// A running handler: ends on its keys when dropped, completed or not.
    struct Running {
        journal: Arc<Journal>,
        id: u64,
        keys: Vec<u64>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let mut state = self.journal.state.lock().unwrap();
            for key in &self.keys {
                state.log.entry(*key).or_default().push(Event::End(self.id));
            }
        }
    }

    impl Journal {
        fn start(self: &Arc<Self>, task: &Task) -> Running {
            let keys = distinct(task.keys.clone());
            let mut state = self.state.lock().unwrap();
            for key in &keys {
                state
                    .log
                    .entry(*key)
                    .or_default()
                    .push(Event::Start(task.id));
            }
            Running {
                journal: self.clone(),
                id: task.id,
                keys,
            }
        }
    }

    /// No key ran more than `permits` handlers at once, by its own log.
    fn assert_permits_held(state: &JournalState, permits: usize) {
        for (key, log) in &state.log {
            let mut running = 0usize;
            for event in log {
                match event {
                    Event::Start(id) => {
                        running += 1;
                        assert!(
                            running <= permits,
                            "key {key}: request {id} started with {} running",
                            running - 1
                        );
                    }
                    Event::End(_) => running -= 1,
                }
            }
            assert_eq!(running, 0, "key {key}: a handler never ended");
        }
    }

    /// Per key, the requests in the order their handlers started there.
    fn starts(state: &JournalState) -> HashMap<u64, Vec<u64>> {
        state
            .log
            .iter()
            .map(|(key, log)| {
                let started = log
                    .iter()
                    .filter_map(|event| match event {
                        Event::Start(id) => Some(*id),
                        Event::End(_) => None,
                    })
                    .collect();
                (*key, started)
            })
            .collect()
    }

    fn task(rng: &mut Rng, id: u64) -> Task {
        let keys = match rng.below(10) {
            0 => Vec::new(),
            1..=3 => vec![rng.below(KEYS)],
            _ => {
                let mut keys: Vec<u64> = (0..2 + rng.below(3)).map(|_| rng.below(KEYS)).collect();
                if rng.chance(50) {
                    keys.insert(0, 0);
                }
                keys
            }
        };
        Task {
            id,
            keys,
            yields: rng.below(3),
        }
    }

    async fn run<H>(layer: TaskLayer<H>, seed: u64, permits: usize)
    where
        H: BuildHasher + Send + Sync + 'static,
    {
        let journal = Arc::new(Journal::default());
        let inner = {
            let journal = journal.clone();
            tower::service_fn(move |task: Task| {
                let running = journal.start(&task);
                async move {
                    let _running = running;
                    work(task.yields).await;
                    Ok::<_, BoxError>(task.id)
                }
            })
        };
        let service = layer.layer(inner);
        race(seed, CALLERS, |caller, mut rng| {
            let mut service = service.clone();
            let journal = journal.clone();
            async move {
                let mut later = Vec::new();
                for seq in 0..PER_CALLER {
                    let task = task(&mut rng, caller * 1_000_000 + seq);
                    let future = journal.calls.call(&mut service, task.id, task.clone());
                    match rng.below(100) {
                        0..45 => assert_eq!(future.await.unwrap(), task.id),
                        45..70 => {
                            let limit = Duration::from_micros(rng.below(200));
                            if let Ok(answer) = tokio::time::timeout(limit, future).await {
                                assert_eq!(answer.unwrap(), task.id);
                            }
                        }
                        70..80 => later.push((task.id, tokio::spawn(future))),
                        80..90 => {
                            let spawned = tokio::spawn(future);
                            tokio::task::yield_now().await;
                            spawned.abort();
                        }
                        _ => drop(future),
                    }
                }
                for (id, spawned) in later {
                    assert_eq!(spawned.await.unwrap().unwrap(), id);
                }
            }
        })
        .await;
        until_idle(|| layer.stats()).await;
        let state = journal.state.lock().unwrap();
        assert_permits_held(&state, permits);
        assert_one_global_order(&starts(&state), &journal.calls.calls());
        let started: usize = state
            .log
            .values()
            .flatten()
            .filter(|event| matches!(event, Event::Start(_)))
            .count();
        assert!(
            started as u64 > CALLERS * PER_CALLER / 2,
            "only {started} starts"
        );
    }

    fn layer() -> TaskLayer {
        SyncEngineLayer::new(by_keys as TaskPolicy)
    }

    #[test]
    fn sets_and_single_keys_racing_on_many_threads_keep_one_order_on_every_key() {
        for (seed, permits) in [(1, 1), (2, 2)] {
            let layer = layer().permits_per_key(permits);
            on_threads(3, HANG, seed, permits, move || run(layer, seed, permits));
        }
    }

    #[test]
    fn sets_led_from_one_shard_racing_on_many_threads_keep_one_order_on_every_key() {
        for (seed, permits) in [(3, 1), (4, 3)] {
            let layer = layer().with_hasher(OneShard).permits_per_key(permits);
            on_threads(3, HANG, seed, permits, move || run(layer, seed, permits));
        }
    }
}
