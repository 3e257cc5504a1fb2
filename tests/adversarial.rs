//! Adversarial tests of the turn state machine and the line: inner futures that panic in
//! `Drop` or `poll`, wakers and subscribers that panic, polls after completion, long
//! lines with holes. Every test listens for the layer's events first (see
//! `support::capture::listen`), so that the one that relies on them cannot miss them.

// Both flavours are driven, so the HTTP one must be built.
#![cfg(feature = "http")]

mod support;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tower::{BoxError, Layer, Service};
use tower_sync_engine::{Mode, Stats, SyncEngineLayer};

// ---------------------------------------------------------------------------------------
// An inner service the test drives: readiness, completion, panics in poll and drop.
// ---------------------------------------------------------------------------------------

/// A request: `key: None` is `Mode::Concurrent`.
#[derive(Debug, Clone, Copy)]
struct Job {
    key: Option<u64>,
    id: usize,
}

fn sync(key: u64, id: usize) -> Job {
    Job { key: Some(key), id }
}

fn conc(id: usize) -> Job {
    Job { key: None, id }
}

fn by_job(job: &Job) -> Mode<u64> {
    job.key.map_or(Mode::Concurrent, Mode::Sync)
}

fn by_http_job(request: &http::Request<Job>) -> Mode<u64> {
    by_job(request.body())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Readiness {
    #[default]
    Ready,
    Pending,
    Fail,
}

#[derive(Default)]
struct LabState {
    readiness: Readiness,
    ready_wakers: Vec<Waker>,
    called: Vec<usize>,
    completed: HashSet<usize>,
    wakers: HashMap<usize, Waker>,
    drops: HashMap<usize, usize>,
    panic_on_drop: HashSet<usize>,
    panic_on_poll: HashSet<usize>,
    /// `stats()` of `observe` as seen by each inner future's `Drop`.
    seen_at_drop: HashMap<usize, Stats>,
}

type Observer = Box<dyn Fn() -> Stats + Send + Sync>;

#[derive(Clone, Default)]
struct Lab {
    state: Arc<Mutex<LabState>>,
    observe: Arc<Mutex<Option<Observer>>>,
}

impl Lab {
    fn lock(&self) -> MutexGuard<'_, LabState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn set_readiness(&self, readiness: Readiness) {
        let wakers = {
            let mut state = self.lock();
            state.readiness = readiness;
            std::mem::take(&mut state.ready_wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }
    fn complete(&self, id: usize) {
        let waker = {
            let mut state = self.lock();
            state.completed.insert(id);
            state.wakers.remove(&id)
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
    fn called(&self) -> Vec<usize> {
        self.lock().called.clone()
    }
    fn drops(&self, id: usize) -> usize {
        self.lock().drops.get(&id).copied().unwrap_or(0)
    }
    fn panic_on_drop(&self, id: usize) {
        self.lock().panic_on_drop.insert(id);
    }
    fn panic_on_poll(&self, id: usize) {
        self.lock().panic_on_poll.insert(id);
    }
    fn poll_ready_inner(&self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let mut state = self.lock();
        match state.readiness {
            Readiness::Ready => Poll::Ready(Ok(())),
            Readiness::Fail => Poll::Ready(Err("injected: not ready".into())),
            Readiness::Pending => {
                state.ready_wakers.push(cx.waker().clone());
                Poll::Pending
            }
        }
    }
    fn start<T>(&self, id: usize, make: fn(usize) -> T) -> LabFuture<T> {
        self.lock().called.push(id);
        LabFuture {
            id,
            lab: self.clone(),
            make,
        }
    }
}

struct LabFuture<T> {
    id: usize,
    lab: Lab,
    make: fn(usize) -> T,
}

impl<T> Future for LabFuture<T> {
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.lab.lock();
        if state.panic_on_poll.contains(&self.id) {
            drop(state);
            panic!("injected: inner poll of {}", self.id);
        }
        if state.completed.contains(&self.id) {
            return Poll::Ready(Ok((self.make)(self.id)));
        }
        state.wakers.insert(self.id, cx.waker().clone());
        Poll::Pending
    }
}

impl<T> Drop for LabFuture<T> {
    fn drop(&mut self) {
        let seen = self
            .lab
            .observe
            .lock()
            .unwrap()
            .as_ref()
            .map(|observe| observe());
        let mut state = self.lab.lock();
        *state.drops.entry(self.id).or_default() += 1;
        if let Some(seen) = seen {
            state.seen_at_drop.insert(self.id, seen);
        }
        let explode = state.panic_on_drop.contains(&self.id);
        drop(state);
        if explode && !std::thread::panicking() {
            panic!("injected: inner drop of {}", self.id);
        }
    }
}

impl Service<Job> for Lab {
    type Response = usize;
    type Error = BoxError;
    type Future = LabFuture<usize>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.poll_ready_inner(cx)
    }

    fn call(&mut self, job: Job) -> Self::Future {
        self.start(job.id, |id| id)
    }
}

/// The HTTP flavour's inner service answers with a non-empty body, so that a Sync
/// response's body holds the key until it is read or dropped.
impl Service<http::Request<Job>> for Lab {
    type Response = http::Response<String>;
    type Error = BoxError;
    type Future = LabFuture<http::Response<String>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.poll_ready_inner(cx)
    }

    fn call(&mut self, request: http::Request<Job>) -> Self::Future {
        self.start(request.body().id, |id| {
            http::Response::new(format!("answer {id}"))
        })
    }
}

fn http_job(job: Job) -> http::Request<Job> {
    http::Request::new(job)
}

// ---------------------------------------------------------------------------------------
// Polling by hand.
// ---------------------------------------------------------------------------------------

fn noop() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

/// Polls once with `cx`, catching a panic; `Err(message)` if it panicked.
fn try_poll<F: Future>(
    future: Pin<&mut F>,
    cx: &mut Context<'_>,
) -> Result<Poll<F::Output>, String> {
    catch_unwind(AssertUnwindSafe(|| future.poll(cx))).map_err(|p| panic_message(&*p))
}

fn debug_state<T: std::fmt::Debug>(value: &T) -> String {
    let text = format!("{value:?}");
    let start = text.find("state: \"").expect("a state field") + 8;
    text[start..start + text[start..].find('"').unwrap()].to_owned()
}

const POLLED_AFTER: &str = "ResponseFuture polled after completion";

// ---------------------------------------------------------------------------------------
// 1. Inner futures that panic in `Drop` (after completing) or in `poll`.
// ---------------------------------------------------------------------------------------

/// How the doomed request reaches its inner call.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// Sync, key free, inner ready: called in `call()` (`Running` from the start).
    SyncInCall,
    /// Sync behind a holder: called from the line (`Waiting` then `Running`).
    SyncFromLine,
    /// Concurrent, inner ready: called in `call()` (`Passing`, the inline fast path).
    ConcInCall,
    /// Concurrent, inner not ready in `call()`: `Waiting` then `Passing`.
    ConcAfterReadiness,
}

const PATHS: [Path; 4] = [
    Path::SyncInCall,
    Path::SyncFromLine,
    Path::ConcInCall,
    Path::ConcAfterReadiness,
];

/// Builds a doomed request on `path` (id 1) with a holder (id 0) and a waiter behind it
/// (id 2) on key 7, and drives it until its inner future has been called and completed.
/// Returns the doomed future and the waiter.
macro_rules! scenario {
    ($service:expr, $lab:expr, $path:expr, $wrap:expr) => {{
        let lab: &Lab = $lab;
        let service = $service;
        let mut holder = None;
        let doomed = match $path {
            Path::SyncInCall => service.call($wrap(sync(7, 1))),
            Path::ConcInCall => service.call($wrap(conc(1))),
            Path::SyncFromLine => {
                holder = Some(Box::pin(service.call($wrap(sync(7, 0)))));
                service.call($wrap(sync(7, 1)))
            }
            Path::ConcAfterReadiness => {
                lab.set_readiness(Readiness::Pending);
                let doomed = service.call($wrap(conc(1)));
                lab.set_readiness(Readiness::Ready);
                doomed
            }
        };
        let mut doomed = Box::pin(doomed);
        // A Sync waiter on the same key, behind the doomed request (or its holder).
        let mut waiter = Box::pin(service.call($wrap(sync(7, 2))));
        assert!(try_poll(waiter.as_mut(), &mut noop()).unwrap().is_pending());
        if let Some(holder) = holder.as_mut() {
            assert!(try_poll(doomed.as_mut(), &mut noop()).unwrap().is_pending());
            lab.complete(0);
            assert!(try_poll(holder.as_mut(), &mut noop()).unwrap().is_ready());
        }
        // Called now (or in `call()`), not yet complete.
        assert!(try_poll(doomed.as_mut(), &mut noop()).unwrap().is_pending());
        assert!(lab.called().contains(&1), "{:?}: doomed not called", $path);
        lab.complete(1);
        (doomed, waiter)
    }};
}

/// Expands `$run!(layer, wrap)` with a layer of the HTTP flavour if `$http`, and of the
/// plain one otherwise: their services and futures have different types.
macro_rules! in_either_flavour {
    ($http:expr, $run:ident) => {
        if $http {
            $run!(
                SyncEngineLayer::new(by_http_job as fn(&http::Request<Job>) -> Mode<u64>)
                    .for_http(),
                http_job
            );
        } else {
            $run!(
                SyncEngineLayer::new(by_job as fn(&Job) -> Mode<u64>),
                |job| job
            );
        }
    };
}

#[test]
fn an_inner_future_whose_drop_panics_after_completing_wedges_nothing() {
    let _events = support::capture::listen();
    support::quiet_handler_panics();
    for http in [false, true] {
        for path in PATHS {
            let label = format!("{path:?}, http {http}");
            let lab = Lab::default();
            lab.panic_on_drop(1);
            // One expansion per flavour: their future types differ.
            macro_rules! run {
                ($layer:expr, $wrap:expr) => {{
                    let layer = $layer;
                    let mut service = layer.layer(lab.clone());
                    let observer = layer.clone();
                    *lab.observe.lock().unwrap() = Some(Box::new(move || observer.stats()));
                    let (mut doomed, mut waiter) = scenario!(&mut service, &lab, path, $wrap);

                    let message = try_poll(doomed.as_mut(), &mut noop()).unwrap_err();
                    assert_eq!(message, "injected: inner drop of 1", "{label}");
                    assert_eq!(lab.drops(1), 1, "{label}");
                    if matches!(path, Path::SyncInCall | Path::SyncFromLine) {
                        // The inner future went first, while the doomed request still
                        // held the key.
                        let seen = lab.lock().seen_at_drop[&1];
                        assert_eq!((seen.in_flight, seen.queued), (1, 1), "{label}");
                    }
                    assert_eq!(debug_state(&doomed), "done", "{label}");
                    // Polled again: this crate's message, and the inner future is not
                    // touched again.
                    let again = try_poll(doomed.as_mut(), &mut noop()).unwrap_err();
                    assert_eq!(again, POLLED_AFTER, "{label}");
                    drop(doomed);
                    assert_eq!(lab.drops(1), 1, "{label}: dropped twice");

                    // The key is not wedged: the waiter runs, and so does a later request.
                    let mut cx = noop();
                    assert!(
                        try_poll(waiter.as_mut(), &mut cx).unwrap().is_pending(),
                        "{label}"
                    );
                    assert!(lab.called().contains(&2), "{label}: waiter not started");
                    lab.complete(2);
                    let Ok(Poll::Ready(Ok(answer))) = try_poll(waiter.as_mut(), &mut cx) else {
                        panic!("{label}: the waiter did not answer");
                    };
                    // An HTTP response's body holds the key until it is dropped.
                    assert_eq!(layer.stats().in_flight, usize::from(http), "{label}");
                    {
                        let _answer = answer;
                    }
                    assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
                    let mut later = Box::pin(service.call($wrap(sync(7, 3))));
                    lab.complete(3);
                    assert!(matches!(
                        try_poll(later.as_mut(), &mut cx),
                        Ok(Poll::Ready(Ok(_)))
                    ));
                    assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
                    for id in [0, 2, 3] {
                        assert!(lab.drops(id) <= 1, "{label}: {id} dropped twice");
                    }
                }};
            }
            in_either_flavour!(http, run);
        }
    }
}

#[test]
fn an_inner_future_that_panics_in_poll_gives_its_key_up_when_dropped() {
    let _events = support::capture::listen();
    support::quiet_handler_panics();
    for http in [false, true] {
        for path in PATHS {
            let lab = Lab::default();
            let label = format!("{path:?}, http {http}");
            // One expansion per flavour: their future types differ.
            macro_rules! run {
                ($layer:expr, $wrap:expr) => {{
                    let layer = $layer;
                    let mut service = layer.layer(lab.clone());
                    let (mut doomed, mut waiter) = scenario!(&mut service, &lab, path, $wrap);
                    lab.panic_on_poll(1);
                    let message = try_poll(doomed.as_mut(), &mut noop()).unwrap_err();
                    assert_eq!(message, "injected: inner poll of 1", "{label}");
                    let expected = match path {
                        Path::SyncInCall | Path::SyncFromLine => "running",
                        _ => "passing through",
                    };
                    assert_eq!(debug_state(&doomed), expected, "{label}");
                    assert_eq!(lab.drops(1), 0, "{label}");
                    let sync = matches!(path, Path::SyncInCall | Path::SyncFromLine);
                    // Still holding its key while the response future lives.
                    let stats = layer.stats();
                    assert_eq!(
                        (stats.in_flight, stats.queued),
                        (1, usize::from(sync)),
                        "{label}"
                    );
                    drop(doomed);
                    assert_eq!(lab.drops(1), 1, "{label}");
                    let mut cx = noop();
                    assert!(try_poll(waiter.as_mut(), &mut cx).unwrap().is_pending());
                    assert!(lab.called().contains(&2), "{label}");
                    lab.complete(2);
                    assert!(matches!(
                        try_poll(waiter.as_mut(), &mut cx),
                        Ok(Poll::Ready(Ok(_)))
                    ));
                    drop(waiter);
                    assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
                }};
            }
            in_either_flavour!(http, run);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. Several permits per key, with wakers and subscribers that panic.
// ---------------------------------------------------------------------------------------

/// A waker that can panic in `clone` or `wake`, and counts its wakes.
mod probe {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::task::{RawWaker, RawWakerVTable, Waker};

    #[derive(Default)]
    pub struct Probe {
        pub panic_on_clone: AtomicBool,
        pub panic_on_wake: AtomicBool,
        pub woken: AtomicUsize,
    }

    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake_by_ref, drop);

    pub fn waker(probe: &Arc<Probe>) -> Waker {
        let raw = RawWaker::new(Arc::into_raw(Arc::clone(probe)).cast(), &VTABLE);
        // SAFETY: the vtable treats the pointer as the `Arc<Probe>` it came from.
        unsafe { Waker::from_raw(raw) }
    }

    fn get<'a>(data: *const ()) -> &'a Probe {
        // SAFETY: `data` is a live `Arc<Probe>` owned by the waker being used.
        unsafe { &*data.cast::<Probe>() }
    }

    unsafe fn clone(data: *const ()) -> RawWaker {
        if get(data).panic_on_clone.load(Ordering::SeqCst) {
            panic!("injected: waker clone");
        }
        // SAFETY: as in `get`; the new waker owns the new count.
        unsafe { Arc::increment_strong_count(data.cast::<Probe>()) };
        RawWaker::new(data, &VTABLE)
    }

    unsafe fn wake(data: *const ()) {
        // SAFETY: consumed, as `wake` must.
        let probe = unsafe { Arc::from_raw(data.cast::<Probe>()) };
        probe.woken.fetch_add(1, Ordering::SeqCst);
        if probe.panic_on_wake.load(Ordering::SeqCst) {
            panic!("injected: waker wake");
        }
    }

    unsafe fn wake_by_ref(data: *const ()) {
        let probe = get(data);
        probe.woken.fetch_add(1, Ordering::SeqCst);
        if probe.panic_on_wake.load(Ordering::SeqCst) {
            panic!("injected: waker wake");
        }
    }

    unsafe fn drop(data: *const ()) {
        // SAFETY: consumed.
        std::mem::drop(unsafe { Arc::from_raw(data.cast::<Probe>()) });
    }
}

use probe::Probe;

type JobPolicy = fn(&Job) -> Mode<u64>;
type Plain = tower_sync_engine::SyncEngine<Lab, JobPolicy, u64>;
type PlainFuture = Pin<Box<tower_sync_engine::ResponseFuture<Lab, Job, u64>>>;

fn plain_layer(permits: usize) -> (SyncEngineLayer<JobPolicy, u64>, Lab, Plain) {
    let lab = Lab::default();
    let layer = SyncEngineLayer::new(by_job as JobPolicy).permits_per_key(permits);
    let service = layer.layer(lab.clone());
    (layer, lab, service)
}

fn counts(stats: Stats) -> (usize, usize, usize) {
    (stats.keys, stats.in_flight, stats.queued)
}

/// One key's line: request 0 holds a permit but cannot start (the inner service is not
/// ready), and `permits + 2` more wait behind it without a permit: a permit goes only to
/// a request that may start, and none may before 0 does.
fn line_behind_an_unstarted_head(
    permits: usize,
) -> (
    SyncEngineLayer<JobPolicy, u64>,
    Lab,
    Plain,
    Vec<Option<PlainFuture>>,
) {
    let (layer, lab, mut service) = plain_layer(permits);
    lab.set_readiness(Readiness::Pending);
    let futures: Vec<Option<PlainFuture>> = (0..permits + 3)
        .map(|id| Some(Box::pin(service.call(sync(1, id)))))
        .collect();
    assert_eq!(counts(layer.stats()), (1, 1, permits + 2));
    (layer, lab, service, futures)
}

/// Drives every request to its end. The inner service must have been called for exactly
/// `expected`, in that order, each inner future dropped once, and the layer left idle.
fn finish(
    layer: &SyncEngineLayer<JobPolicy, u64>,
    lab: &Lab,
    futures: &mut [Option<PlainFuture>],
    expected: &[usize],
    label: &str,
) {
    drain(lab, futures);
    assert_eq!(lab.called(), expected, "{label}");
    assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
    for id in expected {
        assert_eq!(lab.drops(*id), 1, "{label}: inner future {id}");
    }
}

/// Drives every future to its end, completing inner futures as they are called.
fn drain(lab: &Lab, futures: &mut [Option<PlainFuture>]) {
    for _ in 0..=futures.len() * 2 {
        for slot in futures.iter_mut() {
            if let Some(future) = slot {
                if let Ok(Poll::Ready(_)) = try_poll(future.as_mut(), &mut noop()) {
                    *slot = None;
                }
            }
        }
        for id in lab.called() {
            lab.complete(id);
        }
    }
    assert!(futures.iter().all(Option::is_none), "requests left stuck");
}

/// With two and three permits: a waiter's waker panics when the start of the request
/// ahead of it wakes it (`Claim::started`, through `notify_started`), or when a release
/// wakes it. Whatever panics, the requests still start in call order and `stats()`
/// is exact.
#[test]
fn with_several_permits_a_waker_that_panics_on_wake_loses_no_permit_and_no_order() {
    let _events = support::capture::listen();
    support::quiet_handler_panics();
    for permits in [2usize, 3] {
        let (layer, lab, _service, mut futures) = line_behind_an_unstarted_head(permits);
        let total = futures.len();
        // The first granted waiter registers a waker that panics when woken.
        let bomb = Arc::new(Probe::default());
        bomb.panic_on_wake
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let bomb_waker = probe::waker(&bomb);
        let mut bomb_cx = Context::from_waker(&bomb_waker);
        assert!(
            try_poll(futures[1].as_mut().unwrap().as_mut(), &mut bomb_cx)
                .unwrap()
                .is_pending()
        );
        for slot in futures.iter_mut().skip(2) {
            assert!(
                try_poll(slot.as_mut().unwrap().as_mut(), &mut noop())
                    .unwrap()
                    .is_pending()
            );
        }
        assert_eq!(lab.called(), Vec::<usize>::new());

        // 0 becomes ready and starts: its start wakes 1, whose waker panics.
        lab.set_readiness(Readiness::Ready);
        let result = try_poll(futures[0].as_mut().unwrap().as_mut(), &mut noop());
        assert_eq!(bomb.woken.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(lab.called(), [0]);
        let after = layer.stats();
        match result {
            Err(message) => {
                assert_eq!(message, "injected: waker wake", "permits {permits}");
                // Request 0 is running: its state owns the inner future and the claim,
                // and nothing was given up while unwinding.
                assert_eq!(lab.drops(0), 0, "permits {permits}");
                // 1 was granted a permit, its wake lost with the panic.
                assert_eq!(counts(after), (1, 2, total - 2), "permits {permits}");
                // Dropping it drops the inner future; 1 keeps its permit, and the
                // others wait for 1 to start.
                futures[0] = None;
                assert_eq!(lab.drops(0), 1, "permits {permits}");
                assert_eq!(
                    counts(layer.stats()),
                    (1, 1, total - 2),
                    "permits {permits}"
                );
            }
            Ok(poll) => panic!("permits {permits}: no panic reached the poller: {poll:?}"),
        }
        let expected: Vec<usize> = (0..total).collect();
        let label = format!("permits {permits}");
        finish(&layer, &lab, &mut futures, &expected, &label);
    }
}

/// A release (`set(Turn::Done)` dropping the claim in place) whose hand-off wake panics:
/// the finished request is done, not dropped twice, and the line goes on in order.
#[test]
fn with_several_permits_a_panicking_wake_in_the_release_leaves_a_done_future() {
    let _events = support::capture::listen();
    support::quiet_handler_panics();
    for permits in [1usize, 2, 3] {
        let (layer, lab, mut service) = plain_layer(permits);
        let total = permits + 3;
        let mut futures: Vec<Option<PlainFuture>> = (0..total)
            .map(|id| Some(Box::pin(service.call(sync(1, id)))))
            .collect();
        assert_eq!(lab.called(), (0..permits).collect::<Vec<_>>());
        let bomb = Arc::new(Probe::default());
        bomb.panic_on_wake
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let bomb_waker = probe::waker(&bomb);
        let first_waiter = futures[permits].as_mut().unwrap().as_mut();
        assert!(
            first_waiter
                .poll(&mut Context::from_waker(&bomb_waker))
                .is_pending()
        );
        for slot in futures.iter_mut().skip(permits + 1) {
            assert!(
                try_poll(slot.as_mut().unwrap().as_mut(), &mut noop())
                    .unwrap()
                    .is_pending()
            );
        }
        lab.complete(0);
        let first = futures[0].as_mut().unwrap();
        let message = try_poll(first.as_mut(), &mut noop()).unwrap_err();
        assert_eq!(message, "injected: waker wake", "permits {permits}");
        assert_eq!(debug_state(first), "done", "permits {permits}");
        assert_eq!(
            try_poll(first.as_mut(), &mut noop()).unwrap_err(),
            POLLED_AFTER
        );
        futures[0] = None;
        assert_eq!(lab.drops(0), 1, "permits {permits}");
        // 0's permit went to the first waiter (granted, its wake lost with the panic).
        assert_eq!(counts(layer.stats()), (1, permits, 2), "permits {permits}");
        let expected: Vec<usize> = (0..total).collect();
        let label = format!("permits {permits}");
        finish(&layer, &lab, &mut futures, &expected, &label);
    }
}

/// Waiters polled with a waker whose `clone` panics: nothing is registered or changed,
/// for the first waiter behind the unstarted head and the ones after it alike.
#[test]
fn with_several_permits_a_waker_that_panics_on_clone_changes_nothing() {
    let _events = support::capture::listen();
    support::quiet_handler_panics();
    for permits in [2usize, 3] {
        let (layer, lab, _service, mut futures) = line_behind_an_unstarted_head(permits);
        let total = futures.len();
        let before = counts(layer.stats());
        let bomb = Arc::new(Probe::default());
        bomb.panic_on_clone
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let bomb_waker = probe::waker(&bomb);
        for slot in futures.iter_mut().skip(1) {
            let message = try_poll(
                slot.as_mut().unwrap().as_mut(),
                &mut Context::from_waker(&bomb_waker),
            )
            .unwrap_err();
            assert_eq!(message, "injected: waker clone");
            assert_eq!(counts(layer.stats()), before, "permits {permits}");
        }
        // Dropping the first waiter and the last, each after a failed clone.
        futures[1] = None;
        futures[total - 1] = None;
        assert_eq!(
            counts(layer.stats()),
            (1, 1, total - 3),
            "permits {permits}"
        );
        lab.set_readiness(Readiness::Ready);
        let expected: Vec<usize> = (0..total)
            .filter(|id| ![1, total - 1].contains(id))
            .collect();
        let label = format!("permits {permits}");
        finish(&layer, &lab, &mut futures, &expected, &label);
    }
}

/// A subscriber that panics on `queued` for a request that joined the line behind an
/// unstarted head while a permit was free, and on `admitted`: the request is gone or
/// still the head, and the counts stay exact.
#[cfg(feature = "tracing")]
#[test]
fn with_several_permits_a_panicking_subscriber_loses_no_permit() {
    use support::capture::Capture;
    support::quiet_handler_panics();
    for permits in [2usize, 3] {
        // `queued`: 0 is the unstarted head, 1 joins the line behind it.
        let _subscriber = tracing::subscriber::set_default(Capture::panicking_on("queued"));
        let (layer, lab, mut service) = plain_layer(permits);
        lab.set_readiness(Readiness::Pending);
        let mut futures: Vec<Option<PlainFuture>> = vec![Some(Box::pin(service.call(sync(1, 0))))];
        let panicked = catch_unwind(AssertUnwindSafe(|| service.call(sync(1, 1))));
        assert!(panicked.is_err(), "permits {permits}: no queued event");
        assert_eq!(counts(layer.stats()), (1, 1, 0), "permits {permits}");
        futures.extend((2..permits + 4).map(|id| Some(Box::pin(service.call(sync(1, id))))));
        assert_eq!(
            counts(layer.stats()),
            (1, 1, permits + 2),
            "permits {permits}"
        );
        lab.set_readiness(Readiness::Ready);
        let expected: Vec<usize> = std::iter::once(0).chain(2..permits + 4).collect();
        let label = format!("permits {permits}");
        finish(&layer, &lab, &mut futures, &expected, &label);
        drop(_subscriber);

        // `admitted`: the first waiter's turn comes and the event panics; it is then
        // the unstarted head, and either starts when polled again or, dropped, passes on.
        for repoll in [true, false] {
            let _subscriber = tracing::subscriber::set_default(Capture::panicking_on("admitted"));
            let (layer, lab, mut service) = plain_layer(permits);
            let mut futures: Vec<Option<PlainFuture>> = (0..permits + 3)
                .map(|id| Some(Box::pin(service.call(sync(1, id)))))
                .collect();
            for slot in futures.iter_mut().skip(permits) {
                assert!(
                    try_poll(slot.as_mut().unwrap().as_mut(), &mut noop())
                        .unwrap()
                        .is_pending()
                );
            }
            lab.complete(0);
            assert!(
                try_poll(futures[0].as_mut().unwrap().as_mut(), &mut noop())
                    .unwrap()
                    .is_ready()
            );
            futures[0] = None;
            let doomed = futures[permits].as_mut().unwrap();
            let message = try_poll(doomed.as_mut(), &mut noop()).unwrap_err();
            assert!(
                message.starts_with("injected: a subscriber panicked"),
                "{message}"
            );
            assert_eq!(counts(layer.stats()), (1, permits, 2), "permits {permits}");
            if !repoll {
                futures[permits] = None;
                assert_eq!(counts(layer.stats()), (1, permits, 1), "permits {permits}");
            }
            let expected: Vec<usize> = (0..permits + 3)
                .filter(|id| repoll || *id != permits)
                .collect();
            let label = format!("permits {permits}, repoll {repoll}");
            finish(&layer, &lab, &mut futures, &expected, &label);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Polling after completion, and `Debug`, on every path of both flavours.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    ConcInCall,
    ConcAfterReadiness,
    ConcFailsInCall,
    ConcFailsAfterWaiting,
    SyncInCall,
    SyncFromLine,
    SyncFailsInCall,
    SyncFailsFromLine,
    Rejected,
}

const CASES: [Case; 9] = [
    Case::ConcInCall,
    Case::ConcAfterReadiness,
    Case::ConcFailsInCall,
    Case::ConcFailsAfterWaiting,
    Case::SyncInCall,
    Case::SyncFromLine,
    Case::SyncFailsInCall,
    Case::SyncFailsFromLine,
    Case::Rejected,
];

/// Runs every case on a fresh service from `$make`; `$check` tells whether an output is
/// the expected one (a rejection is an error in the plain flavour and a `503` in the HTTP
/// one).
macro_rules! every_case {
    ($make:expr, $wrap:expr, $check:expr) => {{
        for case in CASES {
            let lab = Lab::default();
            let (layer, mut service) = $make(&lab);
            // Key 9 is held by a running request in the cases that wait in line.
            let mut holder = None;
            let mut filler = None;
            let (future, debug_at_call) = match case {
                Case::ConcInCall | Case::SyncInCall => {
                    let job = if case == Case::ConcInCall {
                        conc(1)
                    } else {
                        sync(9, 1)
                    };
                    let future = service.call($wrap(job));
                    lab.complete(1);
                    let state = debug_state(&future);
                    (future, state)
                }
                Case::ConcAfterReadiness | Case::ConcFailsAfterWaiting => {
                    lab.set_readiness(Readiness::Pending);
                    let future = service.call($wrap(conc(1)));
                    let state = debug_state(&future);
                    lab.complete(1);
                    lab.set_readiness(if case == Case::ConcAfterReadiness {
                        Readiness::Ready
                    } else {
                        Readiness::Fail
                    });
                    (future, state)
                }
                Case::ConcFailsInCall | Case::SyncFailsInCall => {
                    lab.set_readiness(Readiness::Fail);
                    let job = if case == Case::ConcFailsInCall {
                        conc(1)
                    } else {
                        sync(9, 1)
                    };
                    let future = service.call($wrap(job));
                    let state = debug_state(&future);
                    (future, state)
                }
                Case::SyncFromLine | Case::SyncFailsFromLine | Case::Rejected => {
                    holder = Some(Box::pin(service.call($wrap(sync(9, 0)))));
                    if case == Case::Rejected {
                        // Fills the line (room for one).
                        filler = Some(service.call($wrap(sync(9, 2))));
                    }
                    let future = service.call($wrap(sync(9, 1)));
                    let state = debug_state(&future);
                    lab.complete(1);
                    if case == Case::SyncFailsFromLine {
                        lab.set_readiness(Readiness::Fail);
                    }
                    if case != Case::Rejected {
                        lab.complete(0);
                        let holder = holder.as_mut().unwrap();
                        let Ok(Poll::Ready(Ok(_))) = try_poll(holder.as_mut(), &mut noop()) else {
                            panic!("{case:?}: the holder did not finish");
                        };
                    }
                    (future, state)
                }
            };
            let expected_at_call = match case {
                Case::ConcInCall => "passing through",
                Case::SyncInCall => "running",
                Case::ConcAfterReadiness | Case::ConcFailsAfterWaiting => "waiting for readiness",
                Case::ConcFailsInCall | Case::SyncFailsInCall => "failed",
                Case::SyncFromLine | Case::SyncFailsFromLine => "waiting for its key or readiness",
                Case::Rejected => "rejected",
            };
            assert_eq!(debug_at_call, expected_at_call, "{case:?}");
            let mut future = std::pin::pin!(future);
            let output = loop {
                match try_poll(future.as_mut(), &mut noop()) {
                    Ok(Poll::Ready(output)) => break output,
                    Ok(Poll::Pending) => {}
                    Err(message) => panic!("{case:?}: {message}"),
                }
            };
            let check: fn(Case, &_) -> bool = $check;
            assert!(check(case, &output), "{case:?}: unexpected output");
            drop(output);
            assert_eq!(debug_state(&*future), "done", "{case:?}");
            for _ in 0..2 {
                let message = try_poll(future.as_mut(), &mut noop()).unwrap_err();
                assert_eq!(message, POLLED_AFTER, "{case:?}");
                assert_eq!(debug_state(&*future), "done", "{case:?}");
            }
            drop((holder, filler));
            assert!(layer.stats().is_idle(), "{case:?}: {:?}", layer.stats());
            assert!(lab.lock().drops.values().all(|n| *n == 1), "{case:?}");
        }
    }};
}

fn expected_ok(case: Case) -> bool {
    !matches!(
        case,
        Case::ConcFailsInCall
            | Case::ConcFailsAfterWaiting
            | Case::SyncFailsInCall
            | Case::SyncFailsFromLine
            | Case::Rejected
    )
}

#[test]
fn every_path_panics_with_the_same_message_when_polled_again_plain() {
    let _events = support::capture::listen();
    support::quiet_handler_panics();
    every_case!(
        |lab: &Lab| {
            let layer = SyncEngineLayer::new(by_job as fn(&Job) -> Mode<u64>).max_queue_per_key(
                // Room for one waiter, except where a rejection is wanted.
                1,
            );
            let service = layer.layer(lab.clone());
            (layer, service)
        },
        |job: Job| job,
        |case, output: &Result<usize, BoxError>| match output {
            Ok(id) => expected_ok(case) && *id == 1,
            Err(error) if case == Case::Rejected => {
                error.is::<tower_sync_engine::error::Overloaded>()
            }
            Err(error) => !expected_ok(case) && error.to_string() == "injected: not ready",
        }
    );
}

#[test]
fn every_path_panics_with_the_same_message_when_polled_again_http() {
    let _events = support::capture::listen();
    support::quiet_handler_panics();
    every_case!(
        |lab: &Lab| {
            let layer = SyncEngineLayer::new(by_http_job as fn(&http::Request<Job>) -> Mode<u64>)
                .max_queue_per_key(1)
                .for_http();
            let service = layer.layer(lab.clone());
            (layer, service)
        },
        http_job,
        |case, output: &Result<http::Response<_>, BoxError>| match output {
            Ok(response) if case == Case::Rejected => {
                response.status() == http::StatusCode::SERVICE_UNAVAILABLE
            }
            Ok(response) => expected_ok(case) && response.status() == http::StatusCode::OK,
            Err(error) => !expected_ok(case) && error.to_string() == "injected: not ready",
        }
    );
}

// ---------------------------------------------------------------------------------------
// 4. Long lines with holes: tombstones, compaction and the binary search.
// ---------------------------------------------------------------------------------------

/// Rounds of: many calls on one key, most waiters dropped at random (front and middle,
/// granted or not), the rest polled in random order, some running requests completed.
/// The inner service must be called in call order, skipping exactly the dropped
/// requests, and `stats()` must be exact after every step.
#[test]
fn long_lines_with_holes_keep_call_order_and_exact_stats() {
    let _events = support::capture::listen();
    for permits in [1usize, 2, 3] {
        for seed in 0..8u64 {
            let mut rng = support::Rng::new(seed * 31 + permits as u64);
            let (layer, lab, mut service) = plain_layer(permits);
            let mut futures: Vec<Option<PlainFuture>> = Vec::new();
            let mut dropped_unstarted = Vec::new();
            let label = format!("permits {permits}, seed {seed}");
            let check =
                |futures: &[Option<PlainFuture>], lab: &Lab, layer: &SyncEngineLayer<_, u64>| {
                    let called = lab.called();
                    let alive: Vec<usize> = (0..futures.len())
                        .filter(|id| futures[*id].is_some())
                        .collect();
                    let running = alive.iter().filter(|id| called.contains(id)).count();
                    let waiting = alive.len() - running;
                    // The running requests, and the first that has not started if it
                    // may start: only that one holds a permit while it waits.
                    let holding = running + usize::from(waiting > 0 && running < permits);
                    let expected = (
                        usize::from(!alive.is_empty()),
                        holding,
                        running + waiting - holding,
                    );
                    assert_eq!(counts(layer.stats()), expected, "{label}");
                };
            for _round in 0..6 {
                let calls = 20 + rng.below(60) as usize;
                for _ in 0..calls {
                    let id = futures.len();
                    futures.push(Some(Box::pin(service.call(sync(1, id)))));
                }
                check(&futures, &lab, &layer);
                // Drop most of the waiters that have not started.
                let called = lab.called();
                for id in 0..futures.len() {
                    if futures[id].is_some() && !called.contains(&id) && rng.chance(70) {
                        futures[id] = None;
                        dropped_unstarted.push(id);
                        check(&futures, &lab, &layer);
                    }
                }
                // Poll what is left in a random order, a few times.
                for _ in 0..3 {
                    let mut order: Vec<usize> = (0..futures.len())
                        .filter(|id| futures[*id].is_some())
                        .collect();
                    for i in (1..order.len()).rev() {
                        order.swap(i, rng.below(i as u64 + 1) as usize);
                    }
                    for id in order {
                        let future = futures[id].as_mut().unwrap();
                        if let Ok(Poll::Ready(_)) = try_poll(future.as_mut(), &mut noop()) {
                            futures[id] = None;
                        }
                        check(&futures, &lab, &layer);
                    }
                    // Complete some of the running ones.
                    for id in lab.called() {
                        if rng.chance(50) {
                            lab.complete(id);
                        }
                    }
                }
            }
            let expected: Vec<usize> = (0..futures.len())
                .filter(|id| !dropped_unstarted.contains(id))
                .collect();
            finish(&layer, &lab, &mut futures, &expected, &label);
        }
    }
}
