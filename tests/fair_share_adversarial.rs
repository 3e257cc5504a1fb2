//! `max_in_flight` attacked from the outside: many threads racing sets, single keys and
//! concurrent requests that are dropped, timed out, aborted and panicking in every state;
//! the count of slots each key holds, lowered by finished requests (single keys and
//! sets) while others wait, checked on the paused clock where the rule has one answer;
//! wakers whose `clone`, `wake` or `drop` panic and tracing subscribers that panic on
//! `slot_queued` and `slot_granted`; a waiter dropped on one thread while another hands
//! it the slot; and HTTP bodies dropped mid-stream while others wait for a slot.
//!
//! Whatever happens, at most `max_in_flight` ordered handlers exist at once, every key
//! keeps its call order, nothing waits for a wake-up that never comes, the domain ends
//! idle (`waiting_for_slot` included), and it still has exactly its `max_in_flight`
//! slots: no more, no fewer.

#[path = "support/child.rs"]
mod child;
#[path = "support/sets.rs"]
mod sets;
mod support;

use support::OneShard;
#[path = "support/threads.rs"]
mod threads;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use child::{ChildRun, run_child};
use sets::Finishes;
use tokio_test::assert_pending;
use tokio_test::task::{self, Spawn};
use tower::{Layer, Service};
use tower_sync_engine::error::BoxError;
use tower_sync_engine::{Mode, SyncEngine, SyncEngineLayer};

use self::probe::{CLONE_PANIC, DROP_PANIC, Probe, WAKE_PANIC};

// ---------------------------------------------------------------------------------------
// Requests whose handlers the test finishes, for the tests that poll by hand.
// ---------------------------------------------------------------------------------------

/// A request: its id, and the keys it is ordered on (none: `Mode::Concurrent`).
#[derive(Debug, Clone)]
struct Req {
    id: u64,
    keys: Vec<u64>,
}

fn on(id: u64, keys: &[u64]) -> Req {
    Req {
        id,
        keys: keys.to_vec(),
    }
}

fn by_keys(request: &Req) -> Mode<u64> {
    Mode::sync_all(request.keys.iter().copied())
}

type ReqPolicy = fn(&Req) -> Mode<u64>;

fn gate_layer(max_in_flight: usize, permits: usize) -> SyncEngineLayer<ReqPolicy, u64> {
    SyncEngineLayer::new(by_keys as ReqPolicy)
        .permits_per_key(permits)
        .max_in_flight(max_in_flight)
}

/// The inner service: logs whom it is called with, and lets a handler finish only once
/// the test finishes it.
#[derive(Clone, Default)]
struct Gate {
    state: Arc<Mutex<GateState>>,
}

#[derive(Default)]
struct GateState {
    called: Vec<u64>,
    finishes: Finishes,
}

struct Handler {
    id: u64,
    gate: Gate,
}

impl Service<Req> for Gate {
    type Response = u64;
    type Error = BoxError;
    type Future = Handler;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Handler {
        self.state.lock().unwrap().called.push(request.id);
        Handler {
            id: request.id,
            gate: self.clone(),
        }
    }
}

impl Future for Handler {
    type Output = Result<u64, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.gate
            .state
            .lock()
            .unwrap()
            .finishes
            .poll(self.id, cx)
            .map(Ok)
    }
}

impl Gate {
    /// Lets the handler of `id` finish, now or whenever it is called.
    fn finish(&self, id: u64) {
        let waker = self.state.lock().unwrap().finishes.finish(id);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The ids the inner service was called with, in order.
    fn called(&self) -> Vec<u64> {
        self.state.lock().unwrap().called.clone()
    }
}

type GateEngine = SyncEngine<Gate, ReqPolicy, u64>;
type GateFuture = tower_sync_engine::ResponseFuture<Gate, Req, u64>;

fn serve(layer: &SyncEngineLayer<ReqPolicy, u64>) -> (GateEngine, Gate) {
    let gate = Gate::default();
    (layer.layer(gate.clone()), gate)
}

fn call(service: &mut GateEngine, id: u64, keys: &[u64]) -> Spawn<GateFuture> {
    task::spawn(service.call(on(id, keys)))
}

/// Polls `future` with `waker` instead of its task's.
fn poll_with(
    future: &mut Spawn<GateFuture>,
    waker: &std::task::Waker,
) -> Poll<Result<u64, BoxError>> {
    future.enter(|_, future| future.poll(&mut Context::from_waker(waker)))
}

/// Runs `f`, which must panic, and returns its message.
#[track_caller]
fn panic_of<R: std::fmt::Debug>(f: impl FnOnce() -> R) -> String {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(returned) => panic!("nothing panicked: {returned:?}"),
        Err(payload) => message(payload),
    }
}

fn message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

/// Finishes the handler of `id` and polls its response future to its answer.
#[track_caller]
fn complete(gate: &Gate, id: u64, future: &mut Spawn<GateFuture>) {
    gate.finish(id);
    match future.poll() {
        Poll::Ready(Ok(answer)) => assert_eq!(answer, id),
        other => panic!("request {id} did not complete: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Wakers whose `clone`, `wake` or `drop` panic once armed.
// ---------------------------------------------------------------------------------------

mod probe {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, OnceLock};
    use std::task::{RawWaker, RawWakerVTable, Waker};

    pub const CLONE_PANIC: &str = "injected: a waker's clone panicked";
    pub const WAKE_PANIC: &str = "injected: a waker's wake panicked";
    pub const DROP_PANIC: &str = "injected: a waker's drop panicked";

    /// The task behind a waker: counts its clones and wake-ups, and panics where it is
    /// armed to; while a panic unwinds only if `even_unwinding` (which makes that second
    /// panic an abort unless the layer contains it).
    #[derive(Default)]
    pub struct Probe {
        clone_panics: AtomicBool,
        wake_panics: AtomicBool,
        drop_panics: AtomicBool,
        even_unwinding: AtomicBool,
        clones: AtomicUsize,
        wakes: AtomicUsize,
        /// Called back on every clone, wake and drop, once set.
        hook: OnceLock<Box<dyn Fn() + Send + Sync>>,
    }

    impl Probe {
        pub fn new() -> Arc<Self> {
            Arc::new(Probe::default())
        }

        pub fn panic_on_clone(&self, armed: bool) {
            self.clone_panics.store(armed, Ordering::SeqCst);
        }

        pub fn panic_on_wake(&self, armed: bool) {
            self.wake_panics.store(armed, Ordering::SeqCst);
        }

        pub fn panic_on_drop(&self, armed: bool) {
            self.drop_panics.store(armed, Ordering::SeqCst);
        }

        pub fn even_while_unwinding(&self) {
            self.even_unwinding.store(true, Ordering::SeqCst);
        }

        pub fn disarm(&self) {
            self.panic_on_clone(false);
            self.panic_on_wake(false);
            self.panic_on_drop(false);
        }

        /// Calls `hook` on every clone, wake and drop of its wakers from now on.
        pub fn call_back(&self, hook: impl Fn() + Send + Sync + 'static) {
            assert!(
                self.hook.set(Box::new(hook)).is_ok(),
                "a hook is set already"
            );
        }

        fn called_back(&self) {
            if let Some(hook) = self.hook.get() {
                hook();
            }
        }

        pub fn wakes(&self) -> usize {
            self.wakes.load(Ordering::SeqCst)
        }

        pub fn clones(&self) -> usize {
            self.clones.load(Ordering::SeqCst)
        }

        pub fn waker(self: &Arc<Self>) -> Waker {
            let raw = RawWaker::new(Arc::into_raw(Arc::clone(self)).cast(), &VTABLE);
            // SAFETY: the vtable's functions treat the pointer as the `Arc<Probe>` it
            // came from, and each waker owns one count of it.
            unsafe { Waker::from_raw(raw) }
        }

        fn fires(&self, flag: &AtomicBool) -> bool {
            flag.load(Ordering::SeqCst)
                && (self.even_unwinding.load(Ordering::SeqCst) || !std::thread::panicking())
        }
    }

    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake_by_ref, drop_waker);

    unsafe fn clone(data: *const ()) -> RawWaker {
        // SAFETY: `data` is an `Arc<Probe>` that the waker being cloned owns a count of.
        let probe = unsafe { &*data.cast::<Probe>() };
        probe.called_back();
        if probe.fires(&probe.clone_panics) {
            panic!("{CLONE_PANIC}");
        }
        probe.clones.fetch_add(1, Ordering::SeqCst);
        // SAFETY: as above; the clone owns the new count.
        unsafe { Arc::increment_strong_count(data.cast::<Probe>()) };
        RawWaker::new(data, &VTABLE)
    }

    unsafe fn wake(data: *const ()) {
        // SAFETY: the waker's count, consumed here.
        let probe = unsafe { Arc::from_raw(data.cast::<Probe>()) };
        probe.wakes.fetch_add(1, Ordering::SeqCst);
        probe.called_back();
        let fires = probe.fires(&probe.wake_panics);
        std::mem::drop(probe);
        if fires {
            panic!("{WAKE_PANIC}");
        }
    }

    unsafe fn wake_by_ref(data: *const ()) {
        // SAFETY: `data` is an `Arc<Probe>` that the waker owns a count of.
        let probe = unsafe { &*data.cast::<Probe>() };
        probe.wakes.fetch_add(1, Ordering::SeqCst);
        probe.called_back();
        if probe.fires(&probe.wake_panics) {
            panic!("{WAKE_PANIC}");
        }
    }

    unsafe fn drop_waker(data: *const ()) {
        // SAFETY: the waker's count, given back here.
        let probe = unsafe { Arc::from_raw(data.cast::<Probe>()) };
        probe.called_back();
        let fires = probe.fires(&probe.drop_panics);
        std::mem::drop(probe);
        if fires {
            panic!("{DROP_PANIC}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1. Many threads: sets, single keys and concurrent requests racing for the slots.
// ---------------------------------------------------------------------------------------

mod stress {
    use std::collections::HashMap;
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::sync::Semaphore;
    use tower::{BoxError, Layer, Service};
    use tower_sync_engine::{Mode, Stats, SyncEngineLayer};

    use crate::sets::distinct;
    use crate::support::Rng;
    use crate::threads::{CallClock, assert_one_global_order, on_threads, race, until_idle, work};

    /// Keys the requests draw from.
    const KEYS: u64 = 8;
    const CALLERS: u64 = 4;
    const PER_CALLER: u64 = 500;
    /// Longer than any run takes: reaching it means a request never completed. The clock
    /// is real (a paused clock needs a single thread); it only turns a hang into a
    /// failure, and the timeouts below only pick when requests are cancelled.
    const HANG: Duration = Duration::from_secs(60);
    /// How long the final check waits for requests that must start.
    const START: Duration = Duration::from_secs(10);

    #[derive(Debug, Clone)]
    struct Task {
        id: u64,
        /// None: `Mode::Concurrent`; one: `Mode::Sync`; more (possibly repeated):
        /// `Mode::sync_all`.
        keys: Vec<u64>,
        yields: u64,
        /// Sleeps a little on the real clock, so that slots stay taken and waiters queue.
        sleeps: bool,
        panics: bool,
        /// Waits for a permit of the journal's gate.
        held: bool,
    }

    impl Task {
        fn plain(id: u64, keys: Vec<u64>) -> Task {
            Task {
                id,
                keys,
                yields: 0,
                sleeps: false,
                panics: false,
                held: false,
            }
        }
    }

    fn by_keys(task: &Task) -> Mode<u64> {
        Mode::sync_all(task.keys.iter().copied())
    }

    type TaskPolicy = fn(&Task) -> Mode<u64>;

    #[derive(Debug, Clone, Copy)]
    enum Event {
        Start(u64),
        End(u64),
    }

    /// What the handlers and callers record. An ordered handler counts as running from
    /// the inner service's `call` (which a request reaches only with a slot) until its
    /// future is dropped (before its slot is given back).
    struct Journal {
        calls: CallClock,
        running: AtomicUsize,
        most: AtomicUsize,
        started: AtomicUsize,
        /// Per key, every start and end of a handler, in order; a set's start (and end) is
        /// recorded on all its keys at once, under this lock.
        log: Mutex<HashMap<u64, Vec<Event>>>,
        gate: Semaphore,
    }

    struct Running {
        journal: Arc<Journal>,
        id: u64,
        keys: Vec<u64>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if self.keys.is_empty() {
                return;
            }
            // Ends on its keys before it stops counting: the log never shows fewer
            // handlers running than the counter.
            if let Ok(mut log) = self.journal.log.lock() {
                for key in &self.keys {
                    log.entry(*key).or_default().push(Event::End(self.id));
                }
            }
            self.journal.running.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Journal {
        fn new() -> Arc<Journal> {
            Arc::new(Journal {
                calls: CallClock::default(),
                running: AtomicUsize::new(0),
                most: AtomicUsize::new(0),
                started: AtomicUsize::new(0),
                log: Mutex::default(),
                gate: Semaphore::new(0),
            })
        }

        fn start(self: &Arc<Self>, task: &Task) -> Running {
            let keys = distinct(task.keys.clone());
            if !keys.is_empty() {
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.most.fetch_max(now, Ordering::SeqCst);
                self.started.fetch_add(1, Ordering::SeqCst);
                let mut log = self.log.lock().unwrap();
                for key in &keys {
                    log.entry(*key).or_default().push(Event::Start(task.id));
                }
            }
            Running {
                journal: self.clone(),
                id: task.id,
                keys,
            }
        }

        fn started(&self) -> usize {
            self.started.load(Ordering::SeqCst)
        }
    }

    fn task(rng: &mut Rng, id: u64) -> Task {
        let keys = match rng.below(10) {
            0..2 => Vec::new(),
            2..6 => vec![rng.below(KEYS)],
            // Two or three keys, sometimes one of them twice.
            _ => (0..2 + rng.below(2)).map(|_| rng.below(KEYS)).collect(),
        };
        Task {
            id,
            keys,
            yields: rng.below(4),
            sleeps: rng.chance(30),
            panics: false,
            held: false,
        }
    }

    /// No key ran more than `permits` handlers at once, by its own log.
    fn assert_permits_held(log: &HashMap<u64, Vec<Event>>, permits: usize) {
        for (key, events) in log {
            let mut running = Vec::new();
            for event in events {
                match *event {
                    Event::Start(id) => {
                        running.push(id);
                        assert!(
                            running.len() <= permits,
                            "key {key}: request {id} started while {running:?} ran"
                        );
                    }
                    Event::End(id) => {
                        let at = running.iter().position(|&r| r == id);
                        let at = at.unwrap_or_else(|| panic!("key {key}: {id} ended unstarted"));
                        running.swap_remove(at);
                    }
                }
            }
            assert!(running.is_empty(), "key {key}: {running:?} never ended");
        }
    }

    fn starts(log: &HashMap<u64, Vec<Event>>) -> HashMap<u64, Vec<u64>> {
        log.iter()
            .map(|(key, events)| {
                let started = events
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

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let waited = tokio::time::timeout(START, async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{what}: not within {START:?}");
    }

    /// After the storm, the domain has exactly `max_in_flight` slots: that many held
    /// requests on fresh keys all start, and one more waits for a slot.
    async fn assert_exactly_the_slots<S>(
        service: &mut S,
        stats: impl Fn() -> Stats,
        journal: &Arc<Journal>,
        max_in_flight: usize,
        label: &str,
    ) where
        S: Service<Task, Response = u64, Error = BoxError>,
        S::Future: Send + 'static,
    {
        let before = journal.started();
        let held: Vec<_> = (0..max_in_flight as u64)
            .map(|n| {
                let task = Task {
                    held: true,
                    ..Task::plain(900_000_000 + n, vec![1_000 + n])
                };
                tokio::spawn(service.call(task))
            })
            .collect();
        until(&format!("{label}: a slot was lost"), || {
            journal.started() == before + max_in_flight
        })
        .await;
        let extra = tokio::spawn(service.call(Task::plain(900_000_100, vec![2_000])));
        let waiting = stats();
        assert_eq!(
            waiting.waiting_for_slot, 1,
            "{label}: a request found a slot beyond max_in_flight: {waiting:?}"
        );
        tokio::task::yield_now().await;
        assert_eq!(journal.started(), before + max_in_flight, "{label}");
        journal.gate.add_permits(max_in_flight);
        for held in held {
            held.await.unwrap().unwrap();
        }
        assert_eq!(extra.await.unwrap().unwrap(), 900_000_100, "{label}");
        until(&format!("{label}: not idle"), || stats().is_idle()).await;
    }

    async fn run<H>(
        layer: SyncEngineLayer<TaskPolicy, u64, H>,
        seed: u64,
        permits: usize,
        max: usize,
    ) where
        H: BuildHasher + Clone + Send + Sync + 'static,
    {
        crate::support::quiet_handler_panics();
        let label = format!("seed {seed}, {permits} permits, max_in_flight({max})");
        let journal = Journal::new();
        let inner = {
            let journal = journal.clone();
            tower::service_fn(move |task: Task| {
                let running = journal.start(&task);
                let journal = journal.clone();
                async move {
                    let _running = running;
                    if task.held {
                        journal.gate.acquire().await.unwrap().forget();
                    }
                    work(task.yields).await;
                    if task.sleeps {
                        tokio::time::sleep(Duration::from_micros(100)).await;
                    }
                    if task.panics {
                        panic!("injected: handler {} panicked", task.id);
                    }
                    Ok::<_, BoxError>(task.id)
                }
            })
        };
        let service = layer.layer(inner);
        race(seed, CALLERS, |caller, mut rng| {
            let mut service = service.clone();
            let journal = journal.clone();
            let layer = layer.clone();
            async move {
                let mut later = Vec::new();
                for seq in 0..PER_CALLER {
                    let mut task = task(&mut rng, caller * 1_000_000 + seq);
                    let action = rng.below(100);
                    // Only a spawned request may panic: its task catches it.
                    task.panics = (45..65).contains(&action) && rng.chance(15);
                    let future = journal.calls.call(&mut service, task.id, task.clone());
                    match action {
                        0..25 => assert_eq!(future.await.unwrap(), task.id),
                        // Cancelled wherever the timeout finds it.
                        25..45 => {
                            let limit = Duration::from_micros(rng.below(300));
                            if let Ok(answer) = tokio::time::timeout(limit, future).await {
                                assert_eq!(answer.unwrap(), task.id);
                            }
                        }
                        45..65 => later.push((task.clone(), tokio::spawn(future))),
                        // Aborted in whatever state another worker has it.
                        65..75 => {
                            let spawned = tokio::spawn(future);
                            for _ in 0..rng.below(3) {
                                tokio::task::yield_now().await;
                            }
                            spawned.abort();
                        }
                        // Polled once, then dropped.
                        75..85 => {
                            let _ = tokio::time::timeout(Duration::ZERO, future).await;
                        }
                        _ => drop(future),
                    }
                    if seq % 16 == 0 {
                        // At most one request per key waits for a slot: its next to start.
                        let waiting = layer.stats().waiting_for_slot;
                        assert!(waiting as u64 <= KEYS, "{waiting} waiting for a slot");
                    }
                    if rng.chance(5) {
                        tokio::time::sleep(Duration::from_micros(rng.below(200))).await;
                    }
                }
                for (task, spawned) in later {
                    match spawned.await {
                        Ok(answer) => assert_eq!(answer.unwrap(), task.id),
                        Err(error) => assert!(task.panics && error.is_panic(), "{error}"),
                    }
                }
            }
        })
        .await;
        until_idle(|| layer.stats()).await;
        assert_eq!(layer.stats(), Stats::default(), "{label}");
        assert_eq!(journal.running.load(Ordering::SeqCst), 0, "{label}");
        let most = journal.most.load(Ordering::SeqCst);
        assert!(
            most <= max,
            "{label}: {most} ordered handlers existed at once"
        );
        {
            let log = journal.log.lock().unwrap();
            assert_permits_held(&log, permits);
            assert_one_global_order(&starts(&log), &journal.calls.calls());
        }
        let started = journal.started();
        assert!(
            started as u64 > CALLERS * PER_CALLER / 3,
            "{label}: only {started} ordered starts"
        );
        let mut service = service.clone();
        assert_exactly_the_slots(&mut service, || layer.stats(), &journal, max, &label).await;
    }

    fn layer(permits: usize, max: usize) -> SyncEngineLayer<TaskPolicy, u64> {
        SyncEngineLayer::new(by_keys as TaskPolicy)
            .permits_per_key(permits)
            .max_in_flight(max)
    }

    /// Every (permits, max_in_flight) pair of 1..=4 that matters: one slot, one permit;
    /// more permits than slots; more slots than permits; four of each.
    #[test]
    fn the_cap_holds_under_sets_single_keys_and_cancellation_on_many_threads() {
        let _events = crate::support::capture::listen();
        for (seed, permits, max) in [
            (1, 1, 1),
            (2, 2, 1),
            (3, 4, 1),
            (4, 1, 2),
            (5, 3, 2),
            (6, 2, 3),
            (7, 1, 4),
            (8, 4, 4),
        ] {
            let layer = layer(permits, max);
            on_threads(3, HANG, seed, permits, move || {
                run(layer, seed, permits, max)
            });
        }
    }

    /// The same with every key in one shard: a set's keys share one lock, and the cap's
    /// bookkeeping for all keys lives in one shard's table.
    #[test]
    fn the_cap_holds_with_every_key_in_one_shard_on_many_threads() {
        let _events = crate::support::capture::listen();
        for (seed, permits, max) in [(11, 2, 2), (12, 3, 1), (13, 1, 3)] {
            let layer = layer(permits, max).with_hasher(super::OneShard);
            on_threads(3, HANG, seed, permits, move || {
                run(layer, seed, permits, max)
            });
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. The count of slots a waiting key holds, lowered as its requests finish: scenes on
//    the paused clock where the rule has exactly one answer, and a wrong count another.
// ---------------------------------------------------------------------------------------

mod counts {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::task::JoinHandle;
    use tokio::time::Instant;
    use tokio_test::assert_pending;
    use tower::util::BoxCloneSyncService;
    use tower::{BoxError, Layer, Service, service_fn};
    use tower_sync_engine::{Mode, SyncEngine, SyncEngineLayer};

    /// A request ordered on `keys`, working for `ms` on tokio's clock.
    #[derive(Debug, Clone)]
    struct Job {
        keys: Vec<u64>,
        seq: u64,
        ms: u64,
    }

    fn by_keys(job: &Job) -> Mode<u64> {
        Mode::sync_all(job.keys.iter().copied())
    }

    type JobPolicy = fn(&Job) -> Mode<u64>;
    type Handler = BoxCloneSyncService<Job, u64, BoxError>;
    type Engine = SyncEngine<Handler, JobPolicy, u64>;

    /// When each request's handler was called, since the scene began.
    #[derive(Clone)]
    struct Board {
        origin: Instant,
        starts: Arc<Mutex<Vec<(u64, Duration)>>>,
    }

    impl Board {
        fn started_at(&self, seq: u64) -> Option<u64> {
            self.starts
                .lock()
                .unwrap()
                .iter()
                .find(|(s, _)| *s == seq)
                .map(|(_, at)| at.as_millis() as u64)
        }

        fn started(&self) -> Vec<u64> {
            self.starts
                .lock()
                .unwrap()
                .iter()
                .map(|(s, _)| *s)
                .collect()
        }

        #[track_caller]
        fn assert_started_at(&self, expected: &[(u64, u64)]) {
            let starts = self.starts.lock().unwrap().clone();
            for &(seq, ms) in expected {
                assert_eq!(
                    self.started_at(seq),
                    Some(ms),
                    "request {seq} should have started at {ms} ms: {starts:?}"
                );
            }
        }
    }

    struct Scene {
        layer: SyncEngineLayer<JobPolicy, u64>,
        service: Engine,
        board: Board,
        calls: Vec<JoinHandle<Result<u64, BoxError>>>,
    }

    impl Scene {
        fn new(permits: usize, max_in_flight: usize) -> Scene {
            let board = Board {
                origin: Instant::now(),
                starts: Arc::default(),
            };
            let recorded = board.clone();
            // The start is recorded when the inner service is called: a request reaches
            // that only with a slot.
            let handler = BoxCloneSyncService::new(service_fn(move |job: Job| {
                let at = recorded.origin.elapsed();
                recorded.starts.lock().unwrap().push((job.seq, at));
                async move {
                    tokio::time::sleep(Duration::from_millis(job.ms)).await;
                    Ok::<_, BoxError>(job.seq)
                }
            }));
            let layer = SyncEngineLayer::new(by_keys as JobPolicy)
                .permits_per_key(permits)
                .max_in_flight(max_in_flight);
            let service = layer.layer(handler);
            Scene {
                layer,
                service,
                board,
                calls: Vec::new(),
            }
        }

        /// Calls a request on `keys`, in call order, and spawns its response future.
        fn call(&mut self, keys: &[u64], seq: u64, ms: u64) {
            let job = Job {
                keys: keys.to_vec(),
                seq,
                ms,
            };
            self.calls.push(tokio::spawn(self.service.call(job)));
        }

        fn call_future(
            &mut self,
            keys: &[u64],
            seq: u64,
            ms: u64,
        ) -> tokio_test::task::Spawn<<Engine as Service<Job>>::Future> {
            let job = Job {
                keys: keys.to_vec(),
                seq,
                ms,
            };
            tokio_test::task::spawn(self.service.call(job))
        }

        async fn settle(&self) {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
        }

        #[track_caller]
        fn assert_waiting(&self, started: &[u64], waiting_for_slot: usize) {
            let stats = self.layer.stats();
            assert_eq!(self.board.started(), started, "{stats:?}");
            assert_eq!(stats.waiting_for_slot, waiting_for_slot, "{stats:?}");
        }

        async fn at(&self, ms: u64) {
            tokio::time::sleep_until(self.board.origin + Duration::from_millis(ms)).await;
        }

        /// Every request completes, and the domain ends idle.
        async fn finish(self) -> Board {
            for call in self.calls {
                tokio::time::timeout(Duration::from_secs(60), call)
                    .await
                    .expect("a request never finished: wedged")
                    .unwrap()
                    .unwrap();
            }
            assert!(self.layer.stats().is_idle(), "{:?}", self.layer.stats());
            self.board
        }
    }

    const A: u64 = 1;
    const B: u64 = 2;
    const C: u64 = 3;

    /// A holds two slots and B one; each has a request waiting for a slot, A's counted
    /// as holding two, B's one. When A's first request ends, A holds one: a tie, which A
    /// wins as the key granted a slot less recently. Had the end not lowered A's count,
    /// B (one against two) would have won.
    #[tokio::test(start_paused = true)]
    async fn a_runner_that_ends_lowers_its_keys_count_for_the_waiter_behind_it() {
        let _events = crate::support::capture::listen();
        let mut scene = Scene::new(4, 3);
        scene.call(&[A], 0, 50); // grant 1
        scene.call(&[A], 1, 1_000); // grant 2
        scene.call(&[B], 10, 1_000); // grant 3
        scene.call(&[A], 2, 10); // waits: A holds 2
        scene.call(&[B], 11, 10); // waits: B holds 1
        scene.settle().await;
        scene.assert_waiting(&[0, 1, 10], 2);
        let board = scene.finish().await;
        board.assert_started_at(&[(2, 50), (11, 60)]);
    }

    /// The count falls by one per request that ends, no more: A holds three slots and B
    /// one; when one of A's ends, A still holds two, and B's waiter goes first. Lowered
    /// by two, A would tie with B and win as the key granted least recently.
    #[tokio::test(start_paused = true)]
    async fn a_runner_that_ends_lowers_its_keys_count_by_exactly_one() {
        let _events = crate::support::capture::listen();
        let mut scene = Scene::new(4, 4);
        scene.call(&[A], 0, 50);
        scene.call(&[A], 1, 1_000);
        scene.call(&[A], 2, 1_000);
        scene.call(&[B], 10, 1_000);
        scene.call(&[A], 3, 10); // waits: A holds 3
        scene.call(&[B], 11, 10); // waits: B holds 1
        scene.settle().await;
        scene.assert_waiting(&[0, 1, 2, 10], 2);
        let board = scene.finish().await;
        board.assert_started_at(&[(11, 50), (3, 60)]);
    }

    /// A set waiting on A and B waits as its busiest key, A (two slots); C's waiter holds
    /// one. When one of A's requests ends, the set's busiest key holds one: a tie, which
    /// the set wins (its keys were last granted before C). Had the end not lowered A's
    /// count, or lowered B's instead, C would have won.
    #[tokio::test(start_paused = true)]
    async fn a_runner_that_ends_lowers_the_count_of_a_set_waiting_on_its_key() {
        let _events = crate::support::capture::listen();
        let mut scene = Scene::new(4, 4);
        scene.call(&[A], 0, 50);
        scene.call(&[A], 1, 1_000);
        scene.call(&[B], 10, 1_000);
        scene.call(&[C], 20, 1_000);
        scene.call(&[A, B], 100, 10); // waits: A holds 2, B 1
        scene.call(&[C], 21, 10); // waits: C holds 1
        scene.settle().await;
        scene.assert_waiting(&[0, 1, 10, 20], 2);
        let board = scene.finish().await;
        board.assert_started_at(&[(100, 50), (21, 60)]);
    }

    /// The same set, with B the busier key: A's request ending leaves B at two, and C's
    /// waiter (one) goes first.
    #[tokio::test(start_paused = true)]
    async fn a_set_still_waits_as_its_busiest_key_after_another_key_falls() {
        let _events = crate::support::capture::listen();
        let mut scene = Scene::new(4, 5);
        scene.call(&[A], 0, 50);
        scene.call(&[A], 1, 1_000);
        scene.call(&[B], 10, 1_000);
        scene.call(&[B], 11, 1_000);
        scene.call(&[C], 20, 1_000);
        scene.call(&[B, A], 100, 10); // waits: A holds 2, B 2
        scene.call(&[C], 21, 10); // waits: C holds 1
        scene.settle().await;
        scene.assert_waiting(&[0, 1, 10, 11, 20], 2);
        let board = scene.finish().await;
        board.assert_started_at(&[(21, 50), (100, 60)]);
    }

    /// A running set holds one slot, counted on each of its keys. When it ends, both
    /// keys' waiters hold one slot fewer: A's holds none and goes first; then B's (B still
    /// holds one, granted before C's) before C's. Had either of the set's claims not told
    /// its key's waiter, the order would differ.
    #[tokio::test(start_paused = true)]
    async fn a_set_that_ends_lowers_the_count_on_each_of_its_keys() {
        let _events = crate::support::capture::listen();
        for keys in [[A, B], [B, A]] {
            let mut scene = Scene::new(3, 3);
            scene.call(&keys, 100, 50); // grant 1, on A and B
            scene.call(&[B], 10, 1_000); // grant 2
            scene.call(&[C], 20, 1_000); // grant 3
            scene.call(&[A], 0, 10); // waits: A holds 1
            scene.call(&[B], 11, 10); // waits: B holds 2
            scene.call(&[C], 21, 10); // waits: C holds 1
            scene.settle().await;
            scene.assert_waiting(&[100, 10, 20], 3);
            let board = scene.finish().await;
            board.assert_started_at(&[(0, 50), (11, 60), (21, 70)]);
        }
    }

    /// A's waiter is dropped; the request behind it on A becomes A's head and waits in
    /// its place, counting A's slots afresh. The end of one of A's requests must lower
    /// the new waiter's count (not look for the dropped one's): a tie with B, which A
    /// wins. Had it not, B would have won.
    #[tokio::test(start_paused = true)]
    async fn the_next_head_of_a_key_whose_waiter_was_dropped_has_its_count_lowered() {
        let _events = crate::support::capture::listen();
        let mut scene = Scene::new(4, 3);
        scene.call(&[A], 0, 50);
        scene.call(&[A], 1, 1_000);
        scene.call(&[B], 10, 1_000);
        let mut dropped = scene.call_future(&[A], 2, 10); // waits: A holds 2
        assert_pending!(dropped.poll());
        scene.call(&[A], 3, 10); // behind it on A
        scene.call(&[B], 11, 10); // waits: B holds 1
        scene.settle().await;
        scene.assert_waiting(&[0, 1, 10], 2);
        scene.at(20).await;
        drop(dropped);
        scene.settle().await;
        // Request 3 took its place: still two waiting.
        scene.assert_waiting(&[0, 1, 10], 2);
        let board = scene.finish().await;
        board.assert_started_at(&[(3, 50), (11, 60)]);
        assert_eq!(board.started_at(2), None);
    }

    /// The freed slot goes to C's waiter (a key never granted one); dropped before it
    /// takes it, that slot goes on at once by the rule: to A's waiter, whose count the
    /// end of A's request lowered to a tie with B's, and A was granted before B.
    #[tokio::test(start_paused = true)]
    async fn a_slot_granted_to_a_request_dropped_before_taking_it_goes_on_by_the_rule() {
        let _events = crate::support::capture::listen();
        let mut scene = Scene::new(4, 3);
        scene.call(&[A], 0, 50);
        scene.call(&[A], 1, 1_000);
        scene.call(&[B], 10, 1_000);
        scene.call(&[A], 2, 10); // waits: A holds 2
        scene.call(&[B], 11, 10); // waits: B holds 1
        let mut granted = scene.call_future(&[C], 20, 10); // waits: C holds none
        assert_pending!(granted.poll());
        scene.settle().await;
        scene.assert_waiting(&[0, 1, 10], 3);
        scene.at(50).await;
        scene.settle().await;
        assert!(granted.is_woken(), "C's waiter was not granted the slot");
        assert_eq!(scene.layer.stats().waiting_for_slot, 2);
        drop(granted);
        scene.settle().await;
        assert_eq!(scene.layer.stats().waiting_for_slot, 1);
        let board = scene.finish().await;
        board.assert_started_at(&[(2, 50), (11, 60)]);
        assert_eq!(board.started_at(20), None);
    }
}

// ---------------------------------------------------------------------------------------
// 3. Foreign code around the slots: wakers and tracing subscribers that panic or call
//    back into the layer.
// ---------------------------------------------------------------------------------------

/// What a test does with a request once one of its polls (or another's) has panicked.
#[derive(Debug, Clone, Copy)]
enum Then {
    PollAgain,
    Drop,
}

/// The domain is idle and has exactly `max_in_flight` slots: that many requests on fresh
/// keys take one in `call()`, and one more waits.
#[track_caller]
fn assert_idle_with_slots(
    layer: &SyncEngineLayer<ReqPolicy, u64>,
    service: &mut GateEngine,
    gate: &Gate,
    max_in_flight: usize,
    label: &str,
) {
    assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
    let first = 10_000 + gate.called().len() as u64 * 100;
    let mut held: Vec<_> = (0..max_in_flight as u64 + 1)
        .map(|n| (first + n, call(service, first + n, &[first + n])))
        .collect();
    let called = gate.called();
    let ids: Vec<u64> = (first..first + max_in_flight as u64).collect();
    assert_eq!(
        called[called.len() - max_in_flight..],
        ids[..],
        "{label}: the slots did not all come back"
    );
    assert_eq!(
        layer.stats().waiting_for_slot,
        1,
        "{label}: more than {max_in_flight} slots: {:?}",
        layer.stats()
    );
    for (id, future) in &mut held {
        gate.finish(*id);
        while future.poll().is_pending() {}
    }
    drop(held);
    assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
}

/// The holder of the only slot ends; the slot goes to the waiter that waited longest,
/// whose waker panics when woken. The panic leaves the holder's poll, the slot stays
/// the waiter's, and polled again it runs; dropped, it passes the slot on.
#[test]
fn a_waker_that_panics_when_woken_for_its_slot_costs_the_waiter_nothing() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    for then in [Then::PollAgain, Then::Drop] {
        let layer = gate_layer(1, 1);
        let (mut service, gate) = serve(&layer);
        let mut holder = call(&mut service, 1, &[1]);
        assert_pending!(holder.poll());
        let mut waiter = call(&mut service, 2, &[2, 3]);
        let probe = Probe::new();
        let waker = probe.waker();
        assert_pending!(poll_with(&mut waiter, &waker));
        drop(waker);
        let mut next = call(&mut service, 4, &[4]);
        assert_pending!(next.poll());
        assert_eq!(layer.stats().waiting_for_slot, 2);

        probe.panic_on_wake(true);
        gate.finish(1);
        assert_eq!(panic_of(|| holder.poll()), WAKE_PANIC, "{then:?}");
        probe.disarm();
        assert_eq!(probe.wakes(), 1, "{then:?}");
        drop(holder);
        // Granted to the waiter, which has not taken it: one request waits still.
        assert_eq!(layer.stats().waiting_for_slot, 1, "{then:?}");
        assert_eq!(gate.called(), [1], "{then:?}");
        match then {
            Then::PollAgain => {
                assert_pending!(waiter.poll());
                assert_eq!(gate.called(), [1, 2], "{then:?}");
                assert!(!next.is_woken(), "{then:?}: the slot was handed on twice");
                complete(&gate, 2, &mut waiter);
            }
            Then::Drop => drop(waiter),
        }
        assert!(
            next.is_woken(),
            "{then:?}: the slot did not reach the next waiter"
        );
        assert_pending!(next.poll());
        complete(&gate, 4, &mut next);
        let label = format!("{then:?}");
        assert_idle_with_slots(&layer, &mut service, &gate, 1, &label);
    }
}

/// A waker whose `clone` panics as a request queued in `call()` is first polled: the
/// request stays queued, and polled again with a sound waker it is woken for the slot;
/// dropped instead, it leaves the queue.
#[test]
fn a_waker_whose_clone_panics_while_waiting_for_a_slot_loses_no_place() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    for then in [Then::PollAgain, Then::Drop] {
        let layer = gate_layer(1, 2);
        let (mut service, gate) = serve(&layer);
        let mut holder = call(&mut service, 1, &[1]);
        assert_pending!(holder.poll());
        let mut waiter = call(&mut service, 2, &[2]);
        let before = layer.stats();
        assert_eq!(before.waiting_for_slot, 1);
        let probe = Probe::new();
        probe.panic_on_clone(true);
        let waker = probe.waker();
        assert_eq!(panic_of(|| poll_with(&mut waiter, &waker)), CLONE_PANIC);
        probe.disarm();
        drop(waker);
        assert_eq!(layer.stats(), before, "{then:?}");
        match then {
            Then::PollAgain => {
                assert_pending!(waiter.poll());
                complete(&gate, 1, &mut holder);
                assert!(waiter.is_woken(), "{then:?}: the waiter was not woken");
                assert_pending!(waiter.poll());
                complete(&gate, 2, &mut waiter);
                assert_eq!(gate.called(), [1, 2]);
            }
            Then::Drop => {
                drop(waiter);
                assert_eq!(layer.stats().waiting_for_slot, 0);
                complete(&gate, 1, &mut holder);
            }
        }
        assert_idle_with_slots(&layer, &mut service, &gate, 1, &format!("{then:?}"));
    }
}

/// A request waits behind another on its key; its key comes free while the only slot is
/// taken, and the poll that would queue it for a slot clones a waker that panics. It is
/// left its key's head, without a slot and out of the queue; polled again it queues, and
/// runs once the slot frees.
#[test]
fn a_waker_whose_clone_panics_as_a_head_first_asks_for_a_slot_loses_no_place() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    for then in [Then::PollAgain, Then::Drop] {
        let layer = gate_layer(1, 1);
        let (mut service, gate) = serve(&layer);
        let mut first = call(&mut service, 1, &[1]);
        assert_pending!(first.poll());
        let mut behind = call(&mut service, 2, &[1]);
        assert_pending!(behind.poll());
        let mut other = call(&mut service, 3, &[3]);
        assert_pending!(other.poll());
        // Key 1 passes to `behind`; the slot to `other`, which waited for it.
        complete(&gate, 1, &mut first);
        assert!(behind.is_woken() && other.is_woken());
        assert_pending!(other.poll());
        assert_eq!(gate.called(), [1, 3]);

        let probe = Probe::new();
        probe.panic_on_clone(true);
        let waker = probe.waker();
        assert_eq!(panic_of(|| poll_with(&mut behind, &waker)), CLONE_PANIC);
        probe.disarm();
        drop(waker);
        let stats = layer.stats();
        assert_eq!(
            (stats.keys, stats.in_flight, stats.waiting_for_slot),
            (2, 2, 0),
            "{then:?}"
        );
        match then {
            Then::PollAgain => {
                assert_pending!(behind.poll());
                assert_eq!(layer.stats().waiting_for_slot, 1, "{then:?}");
                complete(&gate, 3, &mut other);
                assert!(behind.is_woken(), "{then:?}");
                assert_pending!(behind.poll());
                complete(&gate, 2, &mut behind);
                assert_eq!(gate.called(), [1, 3, 2]);
            }
            Then::Drop => {
                drop(behind);
                complete(&gate, 3, &mut other);
            }
        }
        assert_idle_with_slots(&layer, &mut service, &gate, 1, &format!("{then:?}"));
    }
}

/// Polled again with another waker while waiting for a slot, a request drops the waker
/// it had stored, whose `drop` panics: the new waker is the one kept, and the grant
/// wakes it.
#[test]
fn a_stored_waker_whose_drop_panics_when_replaced_keeps_the_new_one() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    let layer = gate_layer(1, 1);
    let (mut service, gate) = serve(&layer);
    let mut holder = call(&mut service, 1, &[1]);
    assert_pending!(holder.poll());
    let mut waiter = call(&mut service, 2, &[2]);
    let probe = Probe::new();
    let waker = probe.waker();
    assert_pending!(poll_with(&mut waiter, &waker));
    drop(waker);
    probe.panic_on_drop(true);
    assert_eq!(panic_of(|| waiter.poll()), DROP_PANIC);
    probe.disarm();
    assert_eq!(layer.stats().waiting_for_slot, 1);
    complete(&gate, 1, &mut holder);
    assert!(waiter.is_woken(), "the waker kept is not the new one");
    assert_eq!(probe.wakes(), 0);
    assert_pending!(waiter.poll());
    complete(&gate, 2, &mut waiter);
    assert_idle_with_slots(&layer, &mut service, &gate, 1, "replaced");
}

/// A request granted the slot takes it on a poll whose waker's `drop` panics: the slot
/// is taken before that, so polled again it runs once, and dropped it passes the slot
/// on.
#[test]
fn a_waker_whose_drop_panics_as_a_granted_request_takes_its_slot_runs_it_once() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    for then in [Then::PollAgain, Then::Drop] {
        let layer = gate_layer(1, 2);
        let (mut service, gate) = serve(&layer);
        let mut holder = call(&mut service, 1, &[1]);
        assert_pending!(holder.poll());
        let mut waiter = call(&mut service, 2, &[2, 3]);
        assert_pending!(waiter.poll());
        let mut next = call(&mut service, 4, &[4]);
        assert_pending!(next.poll());
        complete(&gate, 1, &mut holder);
        assert!(waiter.is_woken());

        let probe = Probe::new();
        let waker = probe.waker();
        probe.panic_on_drop(true);
        assert_eq!(panic_of(|| poll_with(&mut waiter, &waker)), DROP_PANIC);
        probe.disarm();
        drop(waker);
        assert_eq!(layer.stats().waiting_for_slot, 1, "{then:?}");
        match then {
            Then::PollAgain => {
                assert_pending!(waiter.poll());
                assert_eq!(gate.called(), [1, 2], "{then:?}");
                complete(&gate, 2, &mut waiter);
            }
            Then::Drop => {
                drop(waiter);
                assert_eq!(gate.called(), [1], "{then:?}");
            }
        }
        assert!(next.is_woken(), "{then:?}: the slot was not passed on");
        assert_pending!(next.poll());
        complete(&gate, 4, &mut next);
        assert_idle_with_slots(&layer, &mut service, &gate, 1, &format!("{then:?}"));
    }
}

/// A waker that reads `stats()` and calls the layer for a new request whenever it is
/// cloned, woken or dropped: no lock of the cap or of a shard is held while it runs (a
/// deadlock would fail the test on its watchdog).
#[test]
fn a_waker_that_calls_back_into_the_layer_around_a_slot_deadlocks_nothing() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let layer = gate_layer(1, 2);
        let (service, gate) = serve(&layer);
        let service = Arc::new(Mutex::new(service));
        let spawned: Arc<Mutex<Vec<Spawn<GateFuture>>>> = Arc::default();
        let probe = Probe::new();
        {
            let layer = layer.clone();
            let service = service.clone();
            let spawned = spawned.clone();
            let next = std::sync::atomic::AtomicU64::new(1_000);
            probe.call_back(move || {
                let _ = layer.stats();
                let id = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if id < 1_010 {
                    if let Ok(mut service) = service.try_lock() {
                        let future = call(&mut service, id, &[id % 3]);
                        spawned.lock().unwrap().push(future);
                    }
                }
            });
        }
        let mut holder = call(&mut service.lock().unwrap(), 1, &[1]);
        assert_pending!(holder.poll());
        let mut waiter = call(&mut service.lock().unwrap(), 2, &[2, 3]);
        let waker = probe.waker();
        assert_pending!(poll_with(&mut waiter, &waker));
        assert_pending!(poll_with(&mut waiter, &waker));
        complete(&gate, 1, &mut holder);
        assert!(probe.wakes() >= 1, "the waiter was not woken");
        assert_pending!(poll_with(&mut waiter, &waker));
        assert_eq!(gate.called()[..2], [1, 2]);
        drop(waker);
        gate.finish(2);
        assert!(poll_with(&mut waiter, &probe.waker()).is_ready());
        drop(waiter);
        // Everything the callbacks called runs to its end.
        let mut live: Vec<Spawn<GateFuture>> = Vec::new();
        let mut rounds = 0;
        loop {
            live.append(&mut spawned.lock().unwrap());
            if live.is_empty() {
                break;
            }
            for id in gate.called() {
                gate.finish(id);
            }
            live.retain_mut(|future| future.poll().is_pending());
            rounds += 1;
            assert!(rounds < 10_000, "a request never ran");
        }
        assert!(layer.stats().is_idle(), "{:?}", layer.stats());
        let _ = done.send(probe.clones());
    });
    let clones = finished
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a waker's callback into the layer deadlocked (or the thread panicked)");
    assert!(clones >= 2, "only {clones} clones");
}

#[cfg(feature = "tracing")]
mod subscribers {
    //! Tracing subscribers that panic on `slot_queued` or `slot_granted`.

    use std::task::Poll;

    use tokio_test::assert_pending;
    use tower::Service;

    use super::support::capture::Capture;
    use super::{Then, assert_idle_with_slots, call, complete, gate_layer, on, panic_of, serve};

    const QUEUED_PANIC: &str = "injected: a subscriber panicked on slot_queued";
    const GRANTED_PANIC: &str = "injected: a subscriber panicked on slot_granted";

    /// The request that has to wait for a slot inside `call()` panics there, on its
    /// `slot_queued` event: it leaves the queue as it unwinds, and the slot, once free,
    /// is not handed to it.
    #[test]
    fn a_subscriber_that_panics_on_slot_queued_in_call_leaves_no_phantom_waiter() {
        super::support::quiet_handler_panics();
        let subscriber = Capture::panicking_on("slot_queued");
        let _subscriber = tracing::subscriber::set_default(subscriber.clone());
        let layer = gate_layer(1, 1);
        let (mut service, gate) = serve(&layer);
        let mut holder = call(&mut service, 1, &[1]);
        assert_pending!(holder.poll());
        let before = layer.stats();
        assert_eq!(
            panic_of(|| drop(service.call(on(2, &[2, 3])))),
            QUEUED_PANIC
        );
        assert!(subscriber.has_panicked());
        assert_eq!(
            layer.stats(),
            before,
            "the panicking request is still queued"
        );
        let mut next = call(&mut service, 4, &[4]);
        assert_pending!(next.poll());
        assert_eq!(layer.stats().waiting_for_slot, 1);
        complete(&gate, 1, &mut holder);
        assert!(
            next.is_woken(),
            "the slot went to the request that panicked"
        );
        assert_pending!(next.poll());
        complete(&gate, 4, &mut next);
        assert_eq!(gate.called(), [1, 4]);
        assert_idle_with_slots(&layer, &mut service, &gate, 1, "queued in call");
    }

    /// A request that waited behind another on its key asks for a slot in a poll, and
    /// its `slot_queued` event panics: it is queued with the poll's waker already, so
    /// the slot reaches it when it frees; dropped, it leaves the queue.
    #[test]
    fn a_subscriber_that_panics_on_slot_queued_in_a_poll_leaves_the_request_queued() {
        super::support::quiet_handler_panics();
        let _events = super::support::capture::listen();
        for then in [Then::PollAgain, Then::Drop] {
            let layer = gate_layer(1, 1);
            let (mut service, gate) = serve(&layer);
            let mut first = call(&mut service, 1, &[1]);
            assert_pending!(first.poll());
            let mut behind = call(&mut service, 2, &[1]);
            assert_pending!(behind.poll());
            let mut other = call(&mut service, 3, &[3]);
            assert_pending!(other.poll());
            complete(&gate, 1, &mut first);
            assert_pending!(other.poll());

            let subscriber = Capture::panicking_on("slot_queued");
            let guard = tracing::subscriber::set_default(subscriber.clone());
            assert_eq!(panic_of(|| behind.poll()), QUEUED_PANIC, "{then:?}");
            drop(guard);
            assert!(subscriber.has_panicked());
            assert_eq!(layer.stats().waiting_for_slot, 1, "{then:?}");
            match then {
                Then::PollAgain => {
                    complete(&gate, 3, &mut other);
                    assert!(
                        behind.is_woken(),
                        "{then:?}: the queued request was not woken"
                    );
                    assert_pending!(behind.poll());
                    complete(&gate, 2, &mut behind);
                    assert_eq!(gate.called(), [1, 3, 2]);
                }
                Then::Drop => {
                    drop(behind);
                    assert_eq!(layer.stats().waiting_for_slot, 0, "{then:?}");
                    complete(&gate, 3, &mut other);
                }
            }
            assert_idle_with_slots(&layer, &mut service, &gate, 1, &format!("{then:?}"));
        }
    }

    /// A granted request takes its slot and its `slot_granted` event panics: it holds
    /// the slot, and runs once on its next poll; dropped, it passes the slot on.
    #[test]
    fn a_subscriber_that_panics_on_slot_granted_leaves_the_slot_with_the_request() {
        super::support::quiet_handler_panics();
        let _events = super::support::capture::listen();
        for then in [Then::PollAgain, Then::Drop] {
            let layer = gate_layer(1, 1);
            let (mut service, gate) = serve(&layer);
            let mut holder = call(&mut service, 1, &[1]);
            assert_pending!(holder.poll());
            let mut waiter = call(&mut service, 2, &[2, 3]);
            assert_pending!(waiter.poll());
            let mut next = call(&mut service, 4, &[4]);
            assert_pending!(next.poll());
            complete(&gate, 1, &mut holder);

            let subscriber = Capture::panicking_on("slot_granted");
            let guard = tracing::subscriber::set_default(subscriber.clone());
            assert_eq!(panic_of(|| waiter.poll()), GRANTED_PANIC, "{then:?}");
            drop(guard);
            assert!(subscriber.has_panicked());
            assert_eq!(gate.called(), [1], "{then:?}");
            assert_eq!(layer.stats().waiting_for_slot, 1, "{then:?}");
            match then {
                Then::PollAgain => {
                    assert!(matches!(waiter.poll(), Poll::Pending), "{then:?}");
                    assert_eq!(gate.called(), [1, 2], "{then:?}");
                    assert!(!next.is_woken(), "{then:?}: the slot was handed on twice");
                    complete(&gate, 2, &mut waiter);
                }
                Then::Drop => drop(waiter),
            }
            assert!(next.is_woken(), "{then:?}: the slot was not passed on");
            assert_pending!(next.poll());
            complete(&gate, 4, &mut next);
            assert_idle_with_slots(&layer, &mut service, &gate, 1, &format!("{then:?}"));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Foreign code that panics while a panic unwinds through a release: in a child process,
// since a failure would be an abort.
// ---------------------------------------------------------------------------------------

/// Names the scenario a child process runs.
const SCENARIO: &str = "FAIR_SHARE_ADVERSARIAL_SCENARIO";
/// What a child prints once its scenario passed.
const PASSED: &str = "scenario passed:";
const FIRST_PANIC: &str = "injected: the first panic";

/// Runs `scenario` in a child process and checks that it passed, and was not aborted.
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

/// The holder of the slot is dropped while a panic unwinds, and the waiter it hands the
/// slot to has a waker that panics when woken: that second panic is contained, the first
/// one goes on, and the waiter runs on its next poll.
#[test]
fn a_slot_handed_on_while_a_panic_unwinds_to_a_waker_that_panics_does_not_abort() {
    in_child("wake");
}

/// A waiter granted the slot is dropped while a panic unwinds, and the next waiter's
/// waker panics when woken: contained; the next waiter gets the slot.
#[test]
fn a_granted_waiter_dropped_while_a_panic_unwinds_hands_its_slot_on_without_abort() {
    in_child("granted");
}

/// A waiter is dropped while a panic unwinds, and the waker it stored panics when
/// dropped: contained; the request leaves the queue.
#[test]
fn a_waiter_dropped_while_a_panic_unwinds_with_a_stored_waker_that_panics_does_not_abort() {
    in_child("waiting");
}

/// Drops `future` while a panic unwinds, and checks that the first panic is the one
/// that comes out.
#[track_caller]
fn drop_while_unwinding(future: Spawn<GateFuture>) {
    let panicked = catch_unwind(AssertUnwindSafe(move || {
        let _future = future;
        panic!("{FIRST_PANIC}");
    }));
    assert_eq!(
        panicked.map_err(message).expect_err("nothing panicked"),
        FIRST_PANIC
    );
}

/// The test the child runs: a no-op unless `SCENARIO` is set.
#[test]
fn child() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    let layer = gate_layer(1, 1);
    let (mut service, gate) = serve(&layer);
    let mut holder = call(&mut service, 1, &[1]);
    assert_pending!(holder.poll());
    let mut waiter = call(&mut service, 2, &[2, 3]);
    let probe = Probe::new();
    probe.even_while_unwinding();
    match scenario.as_str() {
        "wake" => {
            let waker = probe.waker();
            assert_pending!(poll_with(&mut waiter, &waker));
            drop(waker);
            probe.panic_on_wake(true);
            drop_while_unwinding(holder);
            probe.disarm();
            assert_eq!(probe.wakes(), 1);
            assert_eq!(layer.stats().waiting_for_slot, 0);
            assert_pending!(waiter.poll());
            complete(&gate, 2, &mut waiter);
        }
        "granted" => {
            assert_pending!(waiter.poll());
            let mut next = call(&mut service, 4, &[4]);
            let waker = probe.waker();
            assert_pending!(poll_with(&mut next, &waker));
            drop(waker);
            complete(&gate, 1, &mut holder);
            assert!(waiter.is_woken());
            probe.panic_on_wake(true);
            drop_while_unwinding(waiter);
            probe.disarm();
            assert_eq!(probe.wakes(), 1, "the next waiter was not woken");
            assert_pending!(next.poll());
            complete(&gate, 4, &mut next);
        }
        "waiting" => {
            let waker = probe.waker();
            assert_pending!(poll_with(&mut waiter, &waker));
            drop(waker);
            probe.panic_on_drop(true);
            drop_while_unwinding(waiter);
            probe.disarm();
            assert_eq!(layer.stats().waiting_for_slot, 0);
            complete(&gate, 1, &mut holder);
        }
        other => panic!("unknown scenario {other}"),
    }
    assert_idle_with_slots(&layer, &mut service, &gate, 1, &scenario);
    println!("{PASSED} {scenario}");
}

// ---------------------------------------------------------------------------------------
// 4. Waiters dropped on one thread exactly while another hands them the slot.
// ---------------------------------------------------------------------------------------

mod grant_race {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::task::{Context, Poll, Wake, Waker};

    use tower::{BoxError, Layer, Service, service_fn};
    use tower_sync_engine::SyncEngineLayer;

    use super::{Req, ReqPolicy, by_keys, on};
    use crate::support::Rng;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Flag(AtomicUsize);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    type Answer = Result<u64, BoxError>;
    type Boxed = Pin<Box<dyn Future<Output = Answer> + Send>>;

    /// Ids below this are holders: their handlers never finish, and they are dropped.
    const HOLDERS: u64 = 100;

    /// A response future with its own waker, polled only when that has been woken.
    struct Polled {
        id: u64,
        future: Boxed,
        flag: Arc<Flag>,
        waker: Waker,
        seen: usize,
    }

    impl Polled {
        fn new(id: u64, future: Boxed) -> Polled {
            let flag = Arc::new(Flag::default());
            Polled {
                id,
                future,
                waker: Waker::from(flag.clone()),
                flag,
                seen: 0,
            }
        }

        fn poll(&mut self) -> Poll<Answer> {
            self.seen = self.flag.0.load(Ordering::SeqCst);
            self.future
                .as_mut()
                .poll(&mut Context::from_waker(&self.waker))
        }

        fn is_woken(&self) -> bool {
            self.flag.0.load(Ordering::SeqCst) > self.seen
        }
    }

    fn round(rng: &mut Rng, max_in_flight: usize, label: &str) {
        let layer = SyncEngineLayer::new(by_keys as ReqPolicy).max_in_flight(max_in_flight);
        let inner = service_fn(|request: Req| {
            let id = request.id;
            async move {
                if id < HOLDERS {
                    std::future::pending::<()>().await;
                }
                Ok::<_, BoxError>(id)
            }
        });
        let mut service = layer.layer(inner);
        let mut make = |id: u64, keys: &[u64]| {
            let future: Boxed = Box::pin(service.call(on(id, keys)));
            Polled::new(id, future)
        };
        let mut holders: Vec<Polled> = (0..max_in_flight as u64)
            .map(|id| make(id, &[id]))
            .collect();
        for holder in &mut holders {
            assert!(holder.poll().is_pending());
        }
        let mut waiters = vec![
            make(200, &[10]),
            make(201, &[11, 12]),
            make(202, &[13]),
            make(203, &[14, 10]),
        ];
        for waiter in &mut waiters {
            assert!(waiter.poll().is_pending());
        }
        // Behind 200 on key 10, 203 waits for its key, not for a slot.
        assert_eq!(layer.stats().waiting_for_slot, 3, "{label}");

        // One thread drops holders, handing their slots to the waiters; another drops
        // waiters, the one that waited longest always among them; this one polls the
        // others.
        let dropped_holders: Vec<Polled> = {
            let count = 1 + rng.below(max_in_flight as u64) as usize;
            holders.drain(..count).collect()
        };
        let mut dropped_waiters = vec![waiters.remove(0)];
        let mut index = 0;
        while index < waiters.len() {
            if rng.chance(40) {
                dropped_waiters.push(waiters.remove(index));
            } else {
                index += 1;
            }
        }
        let spin = rng.below(64);
        let barrier = Barrier::new(3);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                barrier.wait();
                drop(dropped_holders);
            });
            scope.spawn(|| {
                barrier.wait();
                for _ in 0..spin {
                    std::hint::spin_loop();
                }
                drop(dropped_waiters);
            });
            barrier.wait();
            for _ in 0..2 {
                waiters.retain_mut(|waiter| {
                    if !waiter.is_woken() {
                        return true;
                    }
                    match waiter.poll() {
                        Poll::Ready(answer) => {
                            assert_eq!(answer.unwrap(), waiter.id, "{label}");
                            false
                        }
                        Poll::Pending => true,
                    }
                });
            }
        });

        // Drain: a waiter is polled only once woken; a holder is dropped only when
        // nothing else can move. A waiter left unwoken with nothing to wake it is stuck.
        let mut rounds = 0;
        while !waiters.is_empty() {
            rounds += 1;
            assert!(rounds < 1_000, "{label}: no end");
            let mut progress = false;
            let mut index = 0;
            while index < waiters.len() {
                if waiters[index].is_woken() {
                    progress = true;
                    if let Poll::Ready(answer) = waiters[index].poll() {
                        let waiter = waiters.remove(index);
                        assert_eq!(answer.unwrap(), waiter.id, "{label}");
                        continue;
                    }
                }
                index += 1;
            }
            if !progress {
                let stuck: Vec<u64> = waiters.iter().map(|waiter| waiter.id).collect();
                assert!(
                    holders.pop().is_some(),
                    "{label}: waiters {stuck:?} were never woken: {:?}",
                    layer.stats()
                );
            }
        }
        drop(holders);
        assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
        // Exactly `max_in_flight` slots: that many requests on fresh keys take one in
        // `call()`, and one more waits.
        let fresh: Vec<_> = (0..=max_in_flight as u64)
            .map(|n| service.call(on(HOLDERS + 1_000 + n, &[1_000 + n])))
            .collect();
        assert_eq!(
            layer.stats().waiting_for_slot,
            1,
            "{label}: the slots did not all come back, or came back twice: {:?}",
            layer.stats()
        );
        drop(fresh);
        assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
    }

    #[test]
    fn a_waiter_dropped_while_another_thread_hands_it_the_slot_loses_no_slot() {
        let _events = crate::support::capture::listen();
        let mut rng = Rng::new(41);
        for max_in_flight in [1, 2] {
            for n in 0..1_500 {
                round(
                    &mut rng,
                    max_in_flight,
                    &format!("max_in_flight({max_in_flight}), round {n}"),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 5. The HTTP flavour: response bodies dropped mid-stream while others wait for a slot.
// ---------------------------------------------------------------------------------------

#[cfg(feature = "http")]
mod http_flavour {
    use std::collections::HashMap;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Request, Response};
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;
    use tower::{Layer, Service, ServiceExt, service_fn};
    use tower_sync_engine::Mode;
    use tower_sync_engine::SyncEngineLayer;
    use tower_sync_engine::http::{HttpSyncEngine, HttpSyncEngineLayer, ResponseBody};

    use crate::sets::http::{by_keys, request};

    type ByKeys = fn(&Request<u64>) -> Mode<u64>;
    type Frames = mpsc::UnboundedSender<Result<&'static str, Infallible>>;
    type Inner = tower::util::BoxCloneSyncService<Request<u64>, Response<Body>, Infallible>;
    type App = HttpSyncEngine<Inner, ByKeys, u64>;

    /// The inner service: records whom it is called with, and answers each with a body
    /// that streams what the test sends, until the test ends it.
    #[derive(Clone, Default)]
    struct Backend {
        called: Arc<Mutex<Vec<u64>>>,
        streams: Arc<Mutex<HashMap<u64, Frames>>>,
    }

    impl Backend {
        fn service(&self) -> Inner {
            let backend = self.clone();
            Inner::new(service_fn(move |request: Request<u64>| {
                let id = *request.body();
                backend.called.lock().unwrap().push(id);
                let (frames, mut receiver) = mpsc::unbounded_channel();
                backend.streams.lock().unwrap().insert(id, frames);
                let body =
                    Body::from_stream(futures::stream::poll_fn(move |cx| receiver.poll_recv(cx)));
                std::future::ready(Ok::<_, Infallible>(Response::new(body)))
            }))
        }

        fn called(&self) -> Vec<u64> {
            self.called.lock().unwrap().clone()
        }

        fn send(&self, id: u64, frame: &'static str) {
            self.streams.lock().unwrap()[&id].send(Ok(frame)).unwrap();
        }

        /// Ends the body of `id`.
        fn end(&self, id: u64) {
            self.streams.lock().unwrap().remove(&id);
        }
    }

    struct Site {
        layer: HttpSyncEngineLayer<ByKeys, u64>,
        app: App,
        backend: Backend,
        reads: Vec<JoinHandle<()>>,
    }

    impl Site {
        fn new(permits: usize, max_in_flight: usize) -> Site {
            let backend = Backend::default();
            let layer = SyncEngineLayer::new(by_keys as ByKeys)
                .permits_per_key(permits)
                .max_in_flight(max_in_flight)
                .for_http();
            let app = layer.layer(backend.service());
            Site {
                layer,
                app,
                backend,
                reads: Vec::new(),
            }
        }

        /// Sends request `id` on `keys` and reads its whole body, in a task.
        fn spawn(&mut self, id: u64, keys: &[u64]) {
            let app = self.app.clone();
            let request = request(id, keys);
            self.reads.push(tokio::spawn(async move {
                let response = app.oneshot(request).await.unwrap();
                response.into_body().collect().await.unwrap();
            }));
        }

        /// Sends request `id` on `keys` and returns its response's body, still open.
        async fn open(&mut self, id: u64, keys: &[u64]) -> ResponseBody<Body, u64> {
            let response =
                tokio::time::timeout(Duration::from_secs(60), self.app.call(request(id, keys)))
                    .await
                    .expect("no response: wedged")
                    .unwrap();
            response.into_body()
        }

        async fn settle(&self) {
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
        }

        #[track_caller]
        fn assert_called(&self, called: &[u64], waiting_for_slot: usize) {
            let stats = self.layer.stats();
            assert_eq!(self.backend.called(), called, "{stats:?}");
            assert_eq!(stats.waiting_for_slot, waiting_for_slot, "{stats:?}");
        }

        /// Ends `id`'s body and lets the others move.
        async fn end(&self, id: u64) {
            self.backend.end(id);
            self.settle().await;
        }

        async fn finish(self) {
            for read in self.reads {
                tokio::time::timeout(Duration::from_secs(60), read)
                    .await
                    .expect("a body never ended: wedged")
                    .unwrap();
            }
            assert!(self.layer.stats().is_idle(), "{:?}", self.layer.stats());
        }
    }

    const A: u64 = 1;
    const B: u64 = 2;
    const C: u64 = 3;
    const D: u64 = 4;

    /// Two slots, held by open bodies of B and A; A's, B's and C's next requests wait.
    /// A's body is dropped mid-stream: the slot goes to C's (a key never granted one),
    /// and A's waiter now counts no slot on A. When C's body ends, A's waiter (none)
    /// goes before B's (one, and B granted before A): had the dropped body not lowered
    /// A's count, B's would have gone first.
    #[tokio::test]
    async fn a_body_dropped_mid_stream_passes_its_slot_and_lowers_its_keys_count() {
        let _events = crate::support::capture::listen();
        let mut site = Site::new(2, 2);
        let mut b1 = site.open(10, &[B]).await;
        let mut a1 = site.open(20, &[A]).await;
        site.spawn(21, &[A]);
        site.spawn(11, &[B]);
        site.spawn(30, &[C]);
        site.settle().await;
        site.assert_called(&[10, 20], 3);

        site.backend.send(20, "one\n");
        let frame = a1.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "one\n");
        site.settle().await;
        site.assert_called(&[10, 20], 3);
        drop(a1);
        site.settle().await;
        site.assert_called(&[10, 20, 30], 2);

        site.end(30).await;
        site.assert_called(&[10, 20, 30, 21], 1);
        site.end(21).await;
        site.assert_called(&[10, 20, 30, 21, 11], 0);
        site.end(11).await;
        site.backend.send(10, "two\n");
        assert!(b1.frame().await.unwrap().is_ok());
        site.backend.end(10);
        assert!(b1.frame().await.is_none(), "b1's body did not end");
        drop(b1);
        site.finish().await;
    }

    /// A set's body is dropped mid-stream while requests on each of its keys wait: both
    /// keys' counts fall. C's and the set's keys' waiters, and a request on D (never
    /// granted), wait for two slots. The dropped body's slot goes to D's; when D's ends,
    /// A's waiter (no slot left on A, waited longest) goes; then B's (none on B) before
    /// C's (one). Without the set's drop lowering A and B, C's (granted first) would
    /// have gone before both.
    #[tokio::test]
    async fn a_set_body_dropped_mid_stream_lowers_the_count_on_each_of_its_keys() {
        let _events = crate::support::capture::listen();
        let mut site = Site::new(2, 2);
        let mut c1 = site.open(30, &[C]).await;
        let mut set = site.open(100, &[A, B]).await;
        site.spawn(21, &[A]);
        site.spawn(11, &[B]);
        site.spawn(31, &[C]);
        site.spawn(40, &[D]);
        site.settle().await;
        site.assert_called(&[30, 100], 4);

        site.backend.send(100, "one\n");
        assert!(set.frame().await.unwrap().is_ok());
        drop(set);
        site.settle().await;
        site.assert_called(&[30, 100, 40], 3);
        site.end(40).await;
        site.assert_called(&[30, 100, 40, 21], 2);
        site.end(21).await;
        site.assert_called(&[30, 100, 40, 21, 11], 1);
        site.end(11).await;
        site.assert_called(&[30, 100, 40, 21, 11, 31], 0);
        site.end(31).await;
        site.backend.end(30);
        assert!(c1.frame().await.is_none(), "c1's body did not end");
        drop(c1);
        site.finish().await;
    }
}
