//! Promises of `docs/guarantees.md` that the other test files leave unchecked, each test
//! under the guarantee it holds the layer to: `Mode::Concurrent` takes no lock (3);
//! foreign code that panics outside of any unwinding, or calls back into the layer, or
//! panics while a response body is dropped by an unwinding (6); a fresh domain keeps
//! nothing for keys (7).
//!
//! Tests that could deadlock run on a thread of their own, so that a deadlock fails the
//! test instead of hanging it. Every test listens for the layer's events first (see
//! `support::capture::listen`).

mod support;

#[path = "support/counting.rs"]
mod counting;

use std::future::{Future, Ready, ready};
use std::hash::{Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::FutureExt;
use support::{KEY_DROP_PANIC, Key};
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{BoxError, Layer, Service, service_fn};
use tower_sync_engine::{Mode, Stats, SyncEngineLayer};

/// Longer than anything a passing test waits for.
const BOUND: Duration = Duration::from_secs(10);

/// Runs `test` on a thread of its own; fails if it panics or has not returned within
/// `BOUND` (a deadlock).
fn without_deadlock(what: &'static str, test: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        let _events = support::capture::listen();
        test();
        done.send(()).unwrap();
    });
    match finished.recv_timeout(BOUND) {
        Ok(()) => runner.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The test panicked: report its own failure.
            if let Err(panic) = runner.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what}: deadlocked"),
    }
}

fn noop() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

fn counts(stats: Stats) -> (usize, usize, usize) {
    (stats.keys, stats.in_flight, stats.queued)
}

/// The message of a caught panic.
fn message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default()
}

/// Catches the panic of `f`, which must panic with `expected`.
#[track_caller]
fn assert_panics_with<T>(expected: &str, f: impl FnOnce() -> T) {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(_) => panic!("nothing panicked; expected {expected:?}"),
        Err(payload) => assert_eq!(message(&*payload), expected),
    }
}

type Starts = Arc<Mutex<Vec<u64>>>;

// ---------------------------------------------------------------------------------------
// Guarantee 3: `Mode::Concurrent` takes no lock.
// ---------------------------------------------------------------------------------------

/// What a key runs, once, when it is compared with another: a key's `Eq` runs while its
/// shard is locked.
type Hook = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// A key that runs its hook when compared. Equal and hashed by `id`.
struct HookKey {
    id: u64,
    hook: Hook,
}

impl PartialEq for HookKey {
    fn eq(&self, other: &Self) -> bool {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        self.id == other.id
    }
}

impl Eq for HookKey {}

impl Hash for HookKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

/// A request: `Some(key)` is `Mode::Sync(key)`, `None` is `Mode::Concurrent`; the `u64`
/// names it.
type Job = (Option<u64>, u64);

/// A request made under a shard's lock (from a key's `Eq`) must not wait for that lock:
/// a `Mode::Concurrent` request goes to the inner service inside `call()`, and its
/// response is ready at once.
#[test]
fn a_concurrent_request_made_under_a_shards_lock_takes_no_lock() {
    without_deadlock("a Concurrent request under a shard's lock", || {
        let hook = Hook::default();
        let policy = {
            let hook = hook.clone();
            move |(key, _): &Job| match *key {
                Some(id) => Mode::Sync(HookKey {
                    id,
                    hook: hook.clone(),
                }),
                None => Mode::Concurrent,
            }
        };
        let starts = Starts::default();
        let inner = {
            let starts = starts.clone();
            service_fn(move |(_, name): Job| {
                starts.lock().unwrap().push(name);
                ready(Ok::<_, BoxError>(name))
            })
        };
        let layer = SyncEngineLayer::new(policy);
        let mut service = layer.layer(inner);
        // Key 1 is live from here on, so that the next request for it compares keys.
        let holder = service.call((Some(1), 0));

        let seen = Arc::new(Mutex::new(None));
        let mut side = service.clone();
        *hook.lock().unwrap() = Some(Box::new({
            let (seen, starts) = (seen.clone(), starts.clone());
            move || {
                // Key 1's shard is locked here.
                let response = side.call((None, 7));
                let called_inside = starts.lock().unwrap().contains(&7);
                let answer = response.now_or_never().map(Result::unwrap);
                *seen.lock().unwrap() = Some((called_inside, answer));
            }
        }));
        let waiting = service.call((Some(1), 1));
        assert_eq!(
            *seen.lock().unwrap(),
            Some((true, Some(7))),
            "the key's Eq ran, and the Concurrent request went through at once"
        );

        assert_eq!(holder.now_or_never().unwrap().unwrap(), 0);
        assert_eq!(futures::executor::block_on(waiting).unwrap(), 1);
        assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    });
}

// ---------------------------------------------------------------------------------------
// Guarantee 6: foreign code that panics outside of any unwinding propagates from the
// `call()`, poll or drop that ran it, and the registry ends whole.
// ---------------------------------------------------------------------------------------

const WAKER_DROP_PANIC: &str = "injected: a waker's drop panicked";
const WAKE_PANIC: &str = "injected: a waker's wake panicked";

/// A request on key 1: its name, and whether its copy of the key panics when dropped.
type Explosive = (u64, bool);

fn by_explosive_key((_, explosive): &Explosive) -> Mode<Key> {
    Mode::Sync(Key {
        id: 1,
        explosive: *explosive,
    })
}

type ExplosiveLayer = SyncEngineLayer<fn(&Explosive) -> Mode<Key>, Key>;

/// A layer keyed by `by_explosive_key` over an inner service that records which
/// requests started and answers at once.
fn explosive_layer() -> (
    ExplosiveLayer,
    impl Service<Explosive, Response = u64, Error = BoxError>,
    Starts,
) {
    let starts = Starts::default();
    let recorded = starts.clone();
    let inner = service_fn(move |(name, _): Explosive| {
        recorded.lock().unwrap().push(name);
        ready(Ok::<_, BoxError>(name))
    });
    let layer = SyncEngineLayer::new(by_explosive_key as fn(&Explosive) -> Mode<Key>);
    let service = layer.layer(inner);
    (layer, service, starts)
}

/// The registry keeps the key of the request that made its key live, and drops it when
/// the key goes idle: a panic of that `Drop` comes out of the poll or the drop whose
/// release removed the entry, once the release is complete.
#[test]
fn a_key_whose_drop_panics_as_its_entry_is_removed_panics_from_that_release() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    let (layer, mut service, starts) = explosive_layer();

    // The first request's key is the one kept; the second waits behind it.
    let mut first = task::spawn(service.call((0, true)));
    let mut second = task::spawn(service.call((1, false)));
    assert_pending!(second.poll());
    assert_ready_ok!(first.poll());
    assert_eq!(counts(layer.stats()), (1, 1, 0), "the key passed on");
    // The second is the key's last request: its release, in this poll, removes the entry.
    assert_panics_with(KEY_DROP_PANIC, || second.poll());
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());

    // The same from a drop: the request holds its key since `call()`.
    let lone = service.call((2, true));
    assert_panics_with(KEY_DROP_PANIC, || drop(lone));
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());

    let mut next = task::spawn(service.call((3, false)));
    assert_eq!(assert_ready_ok!(next.poll()), 3);
    assert_eq!(*starts.lock().unwrap(), [0, 1, 2, 3]);
    assert!(layer.stats().is_idle());
}

/// A waker whose last `drop` panics (outside of any unwinding).
struct PanicsOnDrop;

impl Wake for PanicsOnDrop {
    fn wake(self: Arc<Self>) {}
}

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("{WAKER_DROP_PANIC}");
        }
    }
}

/// Polls a waiting request with a waker whose `drop` panics, and lets go of every copy of
/// it but the one the layer keeps.
fn register_waker_that_panics_on_drop<F: Future>(waiting: Pin<&mut F>) {
    let probe = Arc::new(PanicsOnDrop);
    let waker = Waker::from(Arc::clone(&probe));
    assert!(waiting.poll(&mut Context::from_waker(&waker)).is_pending());
    drop(waker);
    assert_eq!(Arc::strong_count(&probe), 2, "the layer keeps one copy");
    drop(probe);
}

/// A waker the layer lets go of (replaced by a poll with another waker, or dropped with
/// its request) panics out of that poll or drop; the request keeps its place, or has
/// left the line, and the key goes on.
#[test]
fn a_waker_whose_drop_panics_panics_from_the_poll_or_drop_that_lets_go_of_it() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    let (layer, mut service, starts) = explosive_layer();

    // Replaced in a poll.
    let holder = service.call((0, false));
    let mut waiting = Box::pin(service.call((1, false)));
    register_waker_that_panics_on_drop(waiting.as_mut());
    assert_panics_with(WAKER_DROP_PANIC, || waiting.as_mut().poll(&mut noop()));
    assert_eq!(counts(layer.stats()), (1, 1, 1), "it kept its place");
    drop(holder);
    assert!(matches!(
        waiting.as_mut().poll(&mut noop()),
        Poll::Ready(Ok(1))
    ));
    drop(waiting);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());

    // Dropped with its request, which leaves the line.
    let holder = service.call((2, false));
    let mut waiting = Box::pin(service.call((3, false)));
    register_waker_that_panics_on_drop(waiting.as_mut());
    assert_panics_with(WAKER_DROP_PANIC, || drop(waiting));
    assert_eq!(counts(layer.stats()), (1, 1, 0), "it left the line");
    drop(holder);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());

    let mut next = task::spawn(service.call((4, false)));
    assert_ready_ok!(next.poll());
    assert_eq!(*starts.lock().unwrap(), [0, 1, 2, 4]);
}

/// A waker whose `wake` panics (outside of any unwinding), after counting its wakes.
#[derive(Default)]
struct PanicsOnWake {
    woken: AtomicUsize,
}

impl Wake for PanicsOnWake {
    fn wake(self: Arc<Self>) {
        self.woken.fetch_add(1, Ordering::SeqCst);
        panic!("{WAKE_PANIC}");
    }
}

/// A release in `drop` whose hand-off wakes a waker that panics: the panic comes out of
/// that drop, and the woken request has the key all the same.
#[test]
fn a_waker_whose_wake_panics_in_a_release_by_drop_panics_from_that_drop() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    let (layer, mut service, starts) = explosive_layer();
    let holder = service.call((0, false));
    let mut waiting = Box::pin(service.call((1, false)));
    let probe = Arc::new(PanicsOnWake::default());
    let waker = Waker::from(Arc::clone(&probe));
    assert!(
        waiting
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending()
    );

    assert_panics_with(WAKE_PANIC, || drop(holder));
    assert_eq!(probe.woken.load(Ordering::SeqCst), 1);
    assert_eq!(
        counts(layer.stats()),
        (1, 1, 0),
        "the key went to the waiter"
    );
    assert!(matches!(
        waiting.as_mut().poll(&mut noop()),
        Poll::Ready(Ok(1))
    ));
    drop(waiting);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    assert_eq!(*starts.lock().unwrap(), [0, 1]);
}

/// Where an inner service panics, once it is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PanicIn {
    PollReady,
    Call,
}

/// An inner service that records which requests it starts, answers at once, and panics
/// in `poll_ready` or `call` the next time it is asked to after being armed.
#[derive(Clone, Default)]
struct Touchy {
    armed: Arc<Mutex<Option<PanicIn>>>,
    starts: Starts,
}

impl Touchy {
    fn trip(&self, at: PanicIn) {
        let mut armed = self.armed.lock().unwrap();
        if *armed == Some(at) {
            *armed = None;
            drop(armed);
            panic!("injected: the inner service's {at:?} panicked");
        }
    }
}

impl Service<u64> for Touchy {
    type Response = u64;
    type Error = BoxError;
    type Future = Ready<Result<u64, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.trip(PanicIn::PollReady);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u64) -> Self::Future {
        self.trip(PanicIn::Call);
        self.starts.lock().unwrap().push(request);
        ready(Ok(request))
    }
}

/// A request that waited reaches the inner service from its response future: an inner
/// `poll_ready` or `call` that panics there panics out of that poll, the request keeps
/// its turn (no request behind it starts), and dropping it passes the key on.
#[test]
fn an_inner_service_that_panics_for_a_request_that_waited_gives_the_key_up_when_dropped() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    for permits in [1usize, 2] {
        for at in [PanicIn::PollReady, PanicIn::Call] {
            let label = format!("{at:?} with {permits} permits");
            let inner = Touchy::default();
            let layer = SyncEngineLayer::new(|_: &u64| Mode::Sync(1u64)).permits_per_key(permits);
            let mut service = layer.layer(inner.clone());
            // Every permit is taken by a request running since `call()`.
            let mut holders: Vec<_> = (0..permits as u64)
                .map(|name| task::spawn(service.call(name)))
                .collect();
            let mut doomed = task::spawn(service.call(99));
            let mut behind = task::spawn(service.call(100));
            assert_pending!(doomed.poll());
            assert_pending!(behind.poll());

            // A permit comes free: it is the doomed request's turn.
            assert_ready_ok!(holders.remove(0).poll());
            assert!(doomed.is_woken(), "{label}");
            *inner.armed.lock().unwrap() = Some(at);
            let panicked = catch_unwind(AssertUnwindSafe(|| doomed.poll()));
            let payload = panicked.expect_err("the inner service did not panic");
            assert!(message(&*payload).contains(&format!("{at:?}")), "{label}");
            assert_eq!(
                counts(layer.stats()),
                (1, permits, 1),
                "{label}: the doomed request still holds its turn"
            );
            assert_pending!(behind.poll());

            drop(doomed);
            assert!(behind.is_woken(), "{label}");
            assert_eq!(assert_ready_ok!(behind.poll()), 100, "{label}");
            for mut holder in holders {
                assert_ready_ok!(holder.poll());
            }
            assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
            let mut expected: Vec<u64> = (0..permits as u64).collect();
            expected.push(100);
            assert_eq!(*inner.starts.lock().unwrap(), expected, "{label}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Guarantee 6: foreign code that calls back into the layer.
// ---------------------------------------------------------------------------------------

/// What foreign code calls back: reads the layer's `stats()` (which locks every shard
/// in turn), and more, once set.
type Observer = Arc<OnceLock<Box<dyn Fn(&'static str) + Send + Sync>>>;

fn observe(observer: &Observer, site: &'static str) {
    if let Some(observe) = observer.get() {
        observe(site);
    }
}

/// A tracing subscriber that calls back into the layer on each of its events.
#[cfg(feature = "tracing")]
struct Reentrant {
    observer: Observer,
    messages: Arc<Mutex<Vec<String>>>,
}

#[cfg(feature = "tracing")]
impl tracing::Subscriber for Reentrant {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "tower_sync_engine"
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut captured = support::capture::Captured::default();
        event.record(&mut captured);
        observe(&self.observer, "event");
        self.messages.lock().unwrap().push(captured.message);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The `queued` and `admitted` events are emitted with no shard locked: a subscriber
/// that reads `stats()` on each of them does not deadlock.
#[cfg(feature = "tracing")]
#[test]
fn a_subscriber_that_calls_back_into_the_layer_does_not_deadlock() {
    without_deadlock("a subscriber that reads stats()", || {
        let observer = Observer::default();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let _subscriber = tracing::subscriber::set_default(Reentrant {
            observer: observer.clone(),
            messages: messages.clone(),
        });
        let layer = SyncEngineLayer::new(|n: &u64| Mode::Sync(*n));
        let reader = layer.clone();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let _ = observer.set(Box::new(move |_| {
            let _ = reader.stats();
            counted.fetch_add(1, Ordering::SeqCst);
        }));
        let mut service = layer.layer(service_fn(|n: u64| ready(Ok::<_, BoxError>(n))));
        let holder = service.call(1);
        let mut waiting = Box::pin(service.call(1));
        assert!(waiting.as_mut().poll(&mut noop()).is_pending());
        drop(holder);
        assert!(matches!(
            waiting.as_mut().poll(&mut noop()),
            Poll::Ready(Ok(1))
        ));
        assert_eq!(*messages.lock().unwrap(), ["queued", "admitted"]);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        drop(waiting);
        assert!(layer.stats().is_idle());
    });
}

/// An inner service that calls back into the layer from its `clone`, `poll_ready` and
/// `call`, and its futures' `poll` and `drop`: the call makes a request of its own on
/// another key of the same domain, the rest read `stats()`.
struct CallsBack {
    observer: Observer,
}

impl Clone for CallsBack {
    fn clone(&self) -> Self {
        observe(&self.observer, "clone");
        CallsBack {
            observer: self.observer.clone(),
        }
    }
}

/// The inner future of `CallsBack`: answers at once, and calls back when polled and
/// when dropped.
struct CallingBack {
    observer: Observer,
    answer: u64,
}

impl Future for CallingBack {
    type Output = Result<u64, BoxError>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        observe(&self.observer, "poll");
        Poll::Ready(Ok(self.answer))
    }
}

impl Drop for CallingBack {
    fn drop(&mut self) {
        observe(&self.observer, "drop");
    }
}

impl Service<u64> for CallsBack {
    type Response = u64;
    type Error = BoxError;
    type Future = CallingBack;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        observe(&self.observer, "poll_ready");
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u64) -> CallingBack {
        observe(&self.observer, "call");
        CallingBack {
            observer: self.observer.clone(),
            answer: request,
        }
    }
}

/// Requests below 100 are `Mode::Sync` on their own number; the others are concurrent.
fn sync_below_100(n: &u64) -> Mode<u64> {
    if *n < 100 {
        Mode::Sync(*n)
    } else {
        Mode::Concurrent
    }
}

/// The inner service runs with no shard locked, inside `call()` for a request that can
/// start at once and from the response future for one that waited: it may call back
/// into the layer, even make requests of its own, with one permit per key or two.
#[test]
fn an_inner_service_that_calls_back_into_the_layer_does_not_deadlock() {
    without_deadlock("an inner service that calls back into the layer", || {
        for permits in [1usize, 2] {
            let observer = Observer::default();
            let layer = SyncEngineLayer::new(sync_below_100 as fn(&u64) -> Mode<u64>)
                .permits_per_key(permits);
            let mut service = layer.layer(CallsBack {
                observer: observer.clone(),
            });
            let reader = layer.clone();
            let side = Mutex::new(layer.layer(service_fn(|n: u64| ready(Ok::<_, BoxError>(n)))));
            let sites = Arc::new(Mutex::new(Vec::new()));
            let seen = sites.clone();
            let _ = observer.set(Box::new(move |site| {
                let _ = reader.stats();
                if site == "call" {
                    // A request of the handler's own, on a key nobody else uses.
                    let mut side = side.lock().unwrap();
                    let answer = side.call(50).now_or_never().map(Result::unwrap);
                    assert_eq!(answer, Some(50), "the handler's own request");
                }
                seen.lock().unwrap().push(site);
            }));

            // A free key and a Concurrent request, inside `call()`; then requests that
            // wait, reaching the inner service from their response futures.
            let free = service.call(1);
            let concurrent = service.call(100);
            let mut waiting: Vec<_> = (0..permits + 1)
                .map(|_| Box::pin(service.call(1)))
                .collect();
            assert_eq!(futures::executor::block_on(free).unwrap(), 1);
            assert_eq!(futures::executor::block_on(concurrent).unwrap(), 100);
            for future in &mut waiting {
                while future.as_mut().poll(&mut noop()).is_pending() {}
            }
            drop(waiting);
            assert!(
                layer.stats().is_idle(),
                "permits {permits}: {:?}",
                layer.stats()
            );
            let sites = sites.lock().unwrap();
            for site in ["poll_ready", "call", "poll", "drop"] {
                let times = sites.iter().filter(|seen| **seen == site).count();
                assert_eq!(times, permits + 3, "permits {permits}: {site}");
            }
            // Each request that waits takes a clone of the inner service along.
            assert!(sites.contains(&"clone"), "permits {permits}");
        }
    });
}

// ---------------------------------------------------------------------------------------
// Guarantee 6: a response body dropped while a panic unwinds.
// ---------------------------------------------------------------------------------------

/// The environment variable that makes `body_unwinding_child` run its scenario.
#[cfg(feature = "http")]
const BODY_UNWINDING: &str = "TOWER_SYNC_ENGINE_BODY_UNWINDING";

/// What the child prints once every key has passed on.
#[cfg(feature = "http")]
const PASSED_ON: &str = "every key passed on after the unwinding";

/// A second panic escaping a destructor aborts the process, so the scenario runs in a
/// child process (this test binary again), and the test checks how the child ended.
#[cfg(feature = "http")]
#[test]
fn a_response_body_dropped_while_a_panic_unwinds_passes_its_key_on() {
    let output = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["body_unwinding_child", "--exact", "--nocapture"])
        .env(BODY_UNWINDING, "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("the child process runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = format!(
        "{}\n--- stdout\n{stdout}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            output.status.signal(),
            None,
            "killed by a signal (an abort is SIGABRT, 6): {report}"
        );
    }
    assert!(stdout.contains("running 1 test"), "no child test: {report}");
    assert!(output.status.success(), "{report}");
    assert!(stdout.contains(PASSED_ON), "{report}");
}

/// The child's scenario; a no-op unless `BODY_UNWINDING` is set. A session's response
/// body holds its key; the handler that holds the body panics, and the unwinding drops
/// it. Its release wakes a waiter whose `wake` panics, or drops a key whose `Drop` panics
/// even during an unwinding: neither second panic may abort, and the key passes on.
#[cfg(feature = "http")]
#[test]
fn body_unwinding_child() {
    use axum::http::{Request, Response};
    use hyper::body::{Body, Frame};

    if std::env::var(BODY_UNWINDING).is_err() {
        return;
    }

    /// A response body that never ends.
    #[derive(Default)]
    struct Endless;

    impl Body for Endless {
        type Data = &'static [u8];
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<&'static [u8]>, Self::Error>>> {
            Poll::Pending
        }
    }

    static INJECTED: AtomicUsize = AtomicUsize::new(0);

    /// A key whose `Drop` panics, even while the thread is panicking, when `explosive`.
    struct Fragile {
        explosive: bool,
    }

    impl PartialEq for Fragile {
        fn eq(&self, _: &Self) -> bool {
            true
        }
    }

    impl Eq for Fragile {}

    impl Hash for Fragile {
        fn hash<H: Hasher>(&self, _: &mut H) {}
    }

    impl Drop for Fragile {
        fn drop(&mut self) {
            if self.explosive {
                INJECTED.fetch_add(1, Ordering::SeqCst);
                panic!("{KEY_DROP_PANIC}");
            }
        }
    }

    /// A waker whose `wake` panics, even while the thread is panicking.
    struct Bomb;

    impl Wake for Bomb {
        fn wake(self: Arc<Self>) {
            INJECTED.fetch_add(1, Ordering::SeqCst);
            panic!("{WAKE_PANIC}");
        }
    }

    const HANDLER_PANIC: &str = "the handler panicked";

    /// Holds `body`, a session's response body, and panics: the unwinding drops it.
    fn panic_holding<B>(body: B) {
        let panicked = catch_unwind(AssertUnwindSafe(move || {
            let _body = body;
            panic!("{HANDLER_PANIC}");
        }));
        let payload = panicked.expect_err("the handler panicked");
        assert_eq!(message(&*payload), HANDLER_PANIC, "the first panic goes on");
    }

    let layer = SyncEngineLayer::new(|request: &Request<bool>| {
        Mode::Sync(Fragile {
            explosive: *request.body(),
        })
    })
    .for_http();
    let mut service = layer.layer(service_fn(|_: Request<bool>| {
        ready(Ok::<_, std::convert::Infallible>(Response::new(Endless)))
    }));
    /// The response of a request that can answer at once.
    fn respond<F, T, E>(future: Pin<&mut F>) -> T
    where
        F: Future<Output = Result<T, E>>,
    {
        match future.poll(&mut noop()) {
            Poll::Ready(Ok(response)) => response,
            _ => panic!("no response"),
        }
    }

    // A waiter whose waker panics when the key is handed to it.
    let mut holding = Box::pin(service.call(Request::new(false)));
    let body = respond(holding.as_mut()).into_body();
    let mut waiting = Box::pin(service.call(Request::new(false)));
    let bomb = Waker::from(Arc::new(Bomb));
    assert!(
        waiting
            .as_mut()
            .poll(&mut Context::from_waker(&bomb))
            .is_pending()
    );
    panic_holding(body);
    assert_eq!(
        INJECTED.load(Ordering::SeqCst),
        1,
        "the waiter was not woken"
    );
    // The wake panicked, but the waiter has the key: its next poll answers.
    let body = respond(waiting.as_mut()).into_body();
    drop(body);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());

    // The key's last release drops the key the registry kept, which panics.
    let mut last = Box::pin(service.call(Request::new(true)));
    let body = respond(last.as_mut()).into_body();
    panic_holding(body);
    assert_eq!(
        INJECTED.load(Ordering::SeqCst),
        2,
        "the key was not dropped"
    );
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());

    let mut next = Box::pin(service.call(Request::new(false)));
    drop(respond(next.as_mut()));
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    println!("{PASSED_ON}");
}

// ---------------------------------------------------------------------------------------
// Guarantee 7: a fresh domain keeps nothing for keys.
// ---------------------------------------------------------------------------------------

/// Shards of a domain on this machine: 32 per core, a power of two, at most 1,024.
fn shards() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores * 32).next_power_of_two().min(1_024)
}

/// Building a domain allocates its shards and their list, and nothing for keys or
/// lines: no table and no line until a key needs one.
#[test]
fn a_fresh_domain_allocates_its_shards_and_nothing_for_keys_or_lines() {
    let _events = support::capture::listen();
    // Finding the number of cores may allocate (Linux reads its cgroup limits); the
    // domain finds it once as it is built, so that is counted apart.
    let before = counting::allocations();
    let shards = shards();
    let finding_cores = counting::allocations() - before;

    let layer = SyncEngineLayer::new(|n: &u64| Mode::Sync(*n));
    let before = counting::allocations();
    let mut service = layer.layer(counting::Echo);
    let building = counting::allocations() - before - finding_cores;
    assert!(
        building <= shards + 1,
        "{building} allocations to build a domain of {shards} shards"
    );
    // And the first request is served by it.
    assert_eq!(service.call(7).now_or_never().unwrap().unwrap(), 7);
    assert!(layer.stats().is_idle());
}
