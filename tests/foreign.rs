//! Foreign code that panics or re-enters the layer: a key's `Drop`, a tracing
//! subscriber, a waker's `clone`. Whatever it does, the registry ends as if the request
//! had been dropped: its key usable, other keys untouched, no abort.

mod support;

use support::OneShard;

use std::hash::{Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use support::Key;
use support::capture::Capture;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{Layer, Service, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};
#[cfg(feature = "tracing")]
use tracing::instrument::WithSubscriber;

/// A request: its key and whether the key's value panics when dropped.
#[derive(Debug, Clone, Copy)]
struct Request {
    key: u64,
    seq: u64,
    explosive: bool,
}

fn by_explosive_key(request: &Request) -> Mode<Key> {
    Mode::Sync(Key {
        id: request.key,
        explosive: request.explosive,
    })
}

fn request(key: u64, seq: u64) -> Request {
    Request {
        key,
        seq,
        explosive: false,
    }
}

type Starts = Arc<Mutex<Vec<u64>>>;

/// An inner service that records which request started, then answers at once.
fn recording(
    starts: &Starts,
) -> impl Service<Request, Response = u64, Error = tower::BoxError> + Clone + use<> {
    let starts = starts.clone();
    service_fn(move |request: Request| {
        starts.lock().unwrap().push(request.seq);
        std::future::ready(Ok(request.seq))
    })
}

#[test]
fn a_key_whose_drop_panics_in_call_does_not_wedge_its_key() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    for permits in [1, 2] {
        let starts = Starts::default();
        let layer = SyncEngineLayer::new(by_explosive_key).permits_per_key(permits);
        let mut service = layer.layer(recording(&starts));
        let mut holder = task::spawn(service.call(request(1, 0)));
        let mut later = Vec::new();
        // With two permits, the first of these takes the free permit as a waiter.
        for seq in 1..permits as u64 {
            later.push(task::spawn(service.call(request(1, seq))));
        }
        // The key is live, so `call` drops the caller's copy of it: that drop panics.
        let explosive = Request {
            key: 1,
            seq: 99,
            explosive: true,
        };
        let panicked = catch_unwind(AssertUnwindSafe(|| service.call(explosive)));
        assert!(panicked.is_err(), "the key's drop did not run in call");

        assert_ready_ok!(holder.poll());
        for future in &mut later {
            while future.poll().is_pending() {}
        }
        drop(later);
        assert!(
            layer.stats().is_idle(),
            "permits {permits}: {:?}",
            layer.stats()
        );
        // The key still works, and only the panicking request went missing.
        let mut next = task::spawn(service.call(request(1, 100)));
        assert_ready_ok!(next.poll());
        let mut expected: Vec<u64> = (0..permits as u64).collect();
        expected.push(100);
        assert_eq!(*starts.lock().unwrap(), expected, "permits {permits}");
        assert!(layer.stats().is_idle());
    }
}

#[test]
fn a_rejected_request_whose_key_drop_panics_leaves_nothing_behind() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    let starts = Starts::default();
    let layer = SyncEngineLayer::new(by_explosive_key).max_queue_per_key(0);
    let mut service = layer.layer(recording(&starts));
    let mut holder = task::spawn(service.call(request(1, 0)));
    let explosive = Request {
        key: 1,
        seq: 1,
        explosive: true,
    };
    assert!(catch_unwind(AssertUnwindSafe(|| service.call(explosive))).is_err());
    assert_eq!(layer.stats().queued, 0);
    assert_ready_ok!(holder.poll());
    assert!(layer.stats().is_idle());
}

fn plain(request: &Request) -> Mode<u64> {
    Mode::Sync(request.key)
}

#[cfg(feature = "tracing")]
#[test]
fn a_subscriber_that_panics_on_queued_leaves_no_phantom_waiter() {
    support::quiet_handler_panics();
    let _subscriber = tracing::subscriber::set_default(Capture::panicking_on("queued"));
    let starts = Starts::default();
    let layer = SyncEngineLayer::new(plain);
    let mut service = layer.layer(recording(&starts));
    let mut holder = task::spawn(service.call(request(1, 0)));
    assert!(catch_unwind(AssertUnwindSafe(|| service.call(request(1, 1)))).is_err());
    assert_eq!(
        layer.stats().queued,
        0,
        "the panicking request is still queued"
    );

    assert_ready_ok!(holder.poll());
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    let mut next = task::spawn(service.call(request(1, 2)));
    assert_ready_ok!(next.poll());
    assert_eq!(*starts.lock().unwrap(), [0, 2]);
}

#[cfg(feature = "tracing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_panics_on_admitted_leaves_the_shard_whole() {
    support::quiet_handler_panics();
    let subscriber = Capture::panicking_on("admitted");
    let _subscriber = tracing::subscriber::set_default(subscriber.clone());
    let starts = Starts::default();
    let layer = SyncEngineLayer::new(plain).with_hasher(OneShard);
    let slow = {
        let starts = starts.clone();
        service_fn(move |request: Request| {
            let starts = starts.clone();
            async move {
                starts.lock().unwrap().push(request.seq);
                // Key 2's first request outlasts key 1's holder, so that the first
                // `admitted` event is the one of key 1's waiter.
                let millis = if request.seq == 10 { 300 } else { 20 };
                tokio::time::sleep(Duration::from_millis(millis)).await;
                Ok::<_, tower::BoxError>(request.seq)
            }
        })
    };
    let mut service = layer.layer(slow);
    // Key 1: a holder and a waiter whose admission panics. Key 2, same shard: a line
    // of its own that must come through untouched.
    let holder = service.call(request(1, 0));
    let doomed = service.call(request(1, 1));
    let others: Vec<_> = (10..14).map(|seq| service.call(request(2, seq))).collect();
    let behind = service.call(request(1, 2));

    // Each task carries the subscriber into every poll, on whichever worker polls it: a
    // default set once inside the task would stay with the thread of its first poll.
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    let spawn = |future| tokio::spawn(WithSubscriber::with_subscriber(future, dispatch.clone()));
    let doomed = spawn(doomed);
    let holder = spawn(holder);
    let others: Vec<_> = others.into_iter().map(spawn).collect();
    let behind = spawn(behind);

    holder.await.unwrap().unwrap();
    let error = doomed.await.unwrap_err();
    assert!(error.is_panic(), "{error}");
    assert_eq!(behind.await.unwrap().unwrap(), 2);
    for (seq, other) in (10..).zip(others) {
        assert_eq!(other.await.unwrap().unwrap(), seq);
    }
    let key_two: Vec<u64> = starts
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|seq| *seq >= 10)
        .collect();
    assert_eq!(key_two, [10, 11, 12, 13]);
    assert!(subscriber.has_panicked(), "no admitted event fired");
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

/// A waker whose `clone` reads the layer's stats, which locks every shard: cloning it
/// under a shard's lock would deadlock.
mod cloning_waker {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{RawWaker, RawWakerVTable, Waker};

    pub struct Probe {
        pub on_clone: Box<dyn Fn() + Send + Sync>,
        pub clones: AtomicUsize,
    }

    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake_by_ref, drop);

    pub fn waker(probe: Arc<Probe>) -> Waker {
        let raw = RawWaker::new(Arc::into_raw(probe).cast(), &VTABLE);
        // SAFETY: the vtable's functions treat the pointer as the `Arc<Probe>` it came from.
        unsafe { Waker::from_raw(raw) }
    }

    unsafe fn clone(data: *const ()) -> RawWaker {
        // SAFETY: `data` is an `Arc<Probe>` that this waker owns.
        let probe = unsafe { Arc::from_raw(data.cast::<Probe>()) };
        (probe.on_clone)();
        probe.clones.fetch_add(1, Ordering::SeqCst);
        let cloned = Arc::clone(&probe);
        std::mem::forget(probe);
        RawWaker::new(Arc::into_raw(cloned).cast(), &VTABLE)
    }

    unsafe fn wake(data: *const ()) {
        // SAFETY: as in `clone`; consumed.
        std::mem::drop(unsafe { Arc::from_raw(data.cast::<Probe>()) });
    }

    unsafe fn wake_by_ref(_: *const ()) {}

    unsafe fn drop(data: *const ()) {
        // SAFETY: as in `clone`; consumed.
        std::mem::drop(unsafe { Arc::from_raw(data.cast::<Probe>()) });
    }
}

#[test]
fn a_waker_is_cloned_outside_the_shard_lock() {
    let _events = support::capture::listen();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let starts = Starts::default();
        let layer = SyncEngineLayer::new(plain);
        let mut service = layer.layer(recording(&starts));
        let observer = layer.clone();
        let probe = Arc::new(cloning_waker::Probe {
            on_clone: Box::new(move || {
                let _ = observer.stats();
            }),
            clones: Default::default(),
        });
        let waker = cloning_waker::waker(probe.clone());
        let mut cx = Context::from_waker(&waker);

        let holder = service.call(request(1, 0));
        let mut waiting = Box::pin(service.call(request(1, 1)));
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            probe.clones.load(Ordering::SeqCst),
            1,
            "the waiter kept no waker"
        );
        drop(holder);
        assert!(matches!(waiting.as_mut().poll(&mut cx), Poll::Ready(Ok(1))));
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(Duration::from_secs(10))
        .expect("a waker was cloned under a shard lock and deadlocked");
}

#[tokio::test]
async fn a_waiter_polled_again_with_the_same_waker_clones_nothing() {
    let _events = support::capture::listen();
    let starts = Starts::default();
    let layer = SyncEngineLayer::new(plain);
    let mut service = layer.layer(recording(&starts));
    let mut holder = task::spawn(service.call(request(1, 0)));
    let mut waiting = task::spawn(service.call(request(1, 1)));
    // Spurious polls with the same task's waker keep the stored one.
    for _ in 0..3 {
        assert_pending!(waiting.poll());
    }
    assert_ready_ok!(holder.poll());
    assert!(waiting.is_woken());
    assert_ready_ok!(waiting.poll());
    assert!(layer.stats().is_idle());
}

// ---------------------------------------------------------------------------------------
// The inner service panicking inside `call()`: its `poll_ready` or `call` for a request
// whose key is free, its `clone` for a request that has to wait. The request's place is
// taken before any of them runs, so unwinding must give it back.
// ---------------------------------------------------------------------------------------

/// Where the inner service panics, for requests whose `seq` is `PANICKING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PanicIn {
    PollReady,
    Call,
    Clone,
}

const PANICKING: u64 = 99;

/// An inner service that records the requests it starts and panics where `armed` says,
/// once, for the request `PANICKING`. `next` is the `seq` of the next request to be
/// called, which `poll_ready` and `clone` cannot see: they panic when it is `PANICKING`.
#[derive(Debug)]
struct Touchy {
    starts: Starts,
    armed: Arc<Mutex<Option<PanicIn>>>,
    next: Arc<Mutex<u64>>,
}

impl Touchy {
    fn trip(&self, at: PanicIn) {
        let mut armed = self.armed.lock().unwrap();
        if *armed == Some(at) && *self.next.lock().unwrap() == PANICKING {
            *armed = None;
            drop(armed);
            panic!("injected: the inner service's {at:?} panicked");
        }
    }
}

impl Clone for Touchy {
    fn clone(&self) -> Self {
        self.trip(PanicIn::Clone);
        Touchy {
            starts: self.starts.clone(),
            armed: self.armed.clone(),
            next: self.next.clone(),
        }
    }
}

impl Service<Request> for Touchy {
    type Response = u64;
    type Error = tower::BoxError;
    type Future = std::future::Ready<Result<u64, tower::BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.trip(PanicIn::PollReady);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.trip(PanicIn::Call);
        self.starts.lock().unwrap().push(request.seq);
        std::future::ready(Ok(request.seq))
    }
}

/// Sends `PANICKING` on key 1 with the inner service armed to panic `at`, after
/// `holders` requests that still hold the key (so that it waits when `holders` is at
/// least the number of permits), and checks that the key ends idle and usable, in order.
fn panicking_inner_gives_the_place_up(at: PanicIn, permits: usize, holders: u64) {
    support::quiet_handler_panics();
    let starts = Starts::default();
    let next = Arc::new(Mutex::new(0));
    let inner = Touchy {
        starts: starts.clone(),
        armed: Arc::new(Mutex::new(Some(at))),
        next: next.clone(),
    };
    let layer = SyncEngineLayer::new(plain).permits_per_key(permits);
    let mut service = layer.layer(inner);
    let mut held: Vec<_> = (0..holders)
        .map(|seq| task::spawn(service.call(request(1, seq))))
        .collect();

    *next.lock().unwrap() = PANICKING;
    let panicked = catch_unwind(AssertUnwindSafe(|| service.call(request(1, PANICKING))));
    *next.lock().unwrap() = 0;
    let label = format!("{at:?} with {permits} permits behind {holders}");
    assert!(
        panicked.is_err(),
        "{label}: the inner service did not panic"
    );

    for future in &mut held {
        assert_ready_ok!(future.poll(), "{label}");
    }
    drop(held);
    assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
    // The key still works, and only the panicking request went missing.
    let mut after = task::spawn(service.call(request(1, 100)));
    assert_ready_ok!(after.poll(), "{label}");
    let mut expected: Vec<u64> = (0..holders).collect();
    expected.push(100);
    assert_eq!(*starts.lock().unwrap(), expected, "{label}");
    assert!(layer.stats().is_idle(), "{label}");
}

#[test]
fn an_inner_service_that_panics_in_poll_ready_or_call_inside_call_gives_the_key_up() {
    let _events = support::capture::listen();
    for at in [PanicIn::PollReady, PanicIn::Call] {
        // The key is free: one permit, or the second of two.
        panicking_inner_gives_the_place_up(at, 1, 0);
        panicking_inner_gives_the_place_up(at, 2, 0);
        panicking_inner_gives_the_place_up(at, 2, 1);
    }
}

#[test]
fn an_inner_service_whose_clone_panics_for_a_waiting_request_gives_its_place_up() {
    let events = Capture::default();
    let _events = tracing::subscriber::set_default(events.clone());
    panicking_inner_gives_the_place_up(PanicIn::Clone, 1, 1);
    panicking_inner_gives_the_place_up(PanicIn::Clone, 2, 2);
    // A request that never got its place announces no wait.
    let queued: Vec<_> = events
        .take_summary()
        .into_iter()
        .filter(|(message, _, _)| message == "queued")
        .collect();
    assert!(queued.is_empty(), "{queued:?}");
}

// ---------------------------------------------------------------------------------------
// A key's `Eq` or `Hash`, or the policy, panicking inside `call()`.
// ---------------------------------------------------------------------------------------

/// Where a request's classification panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Classify {
    /// The policy itself.
    Policy,
    /// The key's `Hash`, which runs before the shard's lock is taken.
    Hash,
    /// The key's `Eq`, which runs under the shard's lock while the key is looked up.
    Eq,
}

/// Reads the layer's stats when set: called back by a `ProbeKey` and a policy.
type Observer = Arc<std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>>;

/// A key whose `Hash`, `Eq` and `Drop` do what a test asks: panic in `Hash` or `Eq`
/// (`fault`), or call back into the layer from `Hash` and `Drop` (`observer`, once
/// set). Equal and hashed by `id`.
struct ProbeKey {
    id: u64,
    fault: Option<Classify>,
    observer: Observer,
}

impl ProbeKey {
    fn observe(&self) {
        if let Some(observe) = self.observer.get() {
            observe();
        }
    }
}

impl PartialEq for ProbeKey {
    fn eq(&self, other: &Self) -> bool {
        if [self.fault, other.fault].contains(&Some(Classify::Eq)) {
            panic!("injected: a key's eq panicked");
        }
        self.id == other.id
    }
}

impl Eq for ProbeKey {}

impl Hash for ProbeKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        if self.fault == Some(Classify::Hash) {
            panic!("injected: a key's hash panicked");
        }
        self.observe();
        self.id.hash(state);
    }
}

impl Drop for ProbeKey {
    fn drop(&mut self) {
        self.observe();
    }
}

/// A request whose classification panics where `fault` says, if anywhere.
#[derive(Debug, Clone, Copy)]
struct Classified {
    key: u64,
    seq: u64,
    fault: Option<Classify>,
}

fn by_faulty_key(request: &Classified) -> Mode<ProbeKey> {
    if request.fault == Some(Classify::Policy) {
        panic!("injected: the policy panicked");
    }
    Mode::Sync(ProbeKey {
        id: request.key,
        fault: request.fault,
        observer: Observer::default(),
    })
}

#[test]
fn a_panicking_policy_or_key_hash_or_eq_in_call_leaves_nothing_behind() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    for permits in [1, 2] {
        for fault in [Classify::Policy, Classify::Hash, Classify::Eq] {
            let label = format!("{fault:?} with {permits} permits");
            let starts = Starts::default();
            let recorded = starts.clone();
            let inner = service_fn(move |request: Classified| {
                recorded.lock().unwrap().push(request.seq);
                std::future::ready(Ok::<_, tower::BoxError>(request.seq))
            });
            let layer = SyncEngineLayer::new(by_faulty_key).permits_per_key(permits);
            let mut service = layer.layer(inner);
            let request = |seq, fault| Classified { key: 1, seq, fault };
            // The key is live and busy: `Eq` runs, against its entry.
            let mut futures: Vec<_> = (0..permits as u64)
                .map(|seq| task::spawn(service.call(request(seq, None))))
                .collect();
            futures.push(task::spawn(service.call(request(10, None))));
            let before = layer.stats();

            let panicked =
                catch_unwind(AssertUnwindSafe(|| service.call(request(99, Some(fault)))));
            assert!(panicked.is_err(), "{label}: nothing panicked");
            assert_eq!(layer.stats(), before, "{label}: the registry changed");

            futures.push(task::spawn(service.call(request(11, None))));
            for future in &mut futures {
                while future.poll().is_pending() {}
            }
            drop(futures);
            assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
            let mut expected: Vec<u64> = (0..permits as u64).collect();
            expected.extend([10, 11]);
            assert_eq!(*starts.lock().unwrap(), expected, "{label}");
        }
    }
}

#[test]
fn a_policy_and_a_key_whose_hash_and_drop_read_stats_do_not_deadlock() {
    let _events = support::capture::listen();
    let (done, finished) = std::sync::mpsc::channel();
    // On a thread of its own, so that a deadlock fails the test instead of hanging it.
    std::thread::spawn(move || {
        let observer = Observer::default();
        let policy = {
            let observer = observer.clone();
            move |id: &u64| {
                if let Some(observe) = observer.get() {
                    observe();
                }
                Mode::Sync(ProbeKey {
                    id: *id,
                    fault: None,
                    observer: observer.clone(),
                })
            }
        };
        let layer = SyncEngineLayer::new(policy);
        let reader = layer.clone();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let _ = observer.set(Box::new(move || {
            let _ = reader.stats();
            counted.fetch_add(1, Ordering::SeqCst);
        }));
        let echo = service_fn(|id: u64| std::future::ready(Ok::<_, tower::BoxError>(id)));
        let mut service = layer.layer(echo);
        // The first takes the key; the second finds it live, so its own copy of the key
        // is dropped in `call()`; the key kept by the registry is dropped on release.
        let mut first = task::spawn(service.call(1));
        let mut second = task::spawn(service.call(1));
        assert_ready_ok!(first.poll());
        assert_ready_ok!(second.poll());
        drop((first, second));
        assert!(layer.stats().is_idle(), "{:?}", layer.stats());
        done.send(calls.load(Ordering::SeqCst)).unwrap();
    });
    let calls = finished
        .recv_timeout(Duration::from_secs(10))
        .expect("a callback into the layer deadlocked");
    // Two policy calls, two hashes, two key drops.
    assert!(calls >= 6, "only {calls} callbacks ran");
}
