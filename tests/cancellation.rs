//! Dropping a response future in any state passes the key on; timeouts on both sides of
//! the layer and panics in handlers never wedge a key.

mod support;

use std::time::Duration;

use support::{Msg, Recorder, handler};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::timeout::error::Elapsed;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_sync_engine::{Mode, SyncEngineLayer};

fn by_key(msg: &Msg) -> Mode<u64> {
    Mode::Sync(msg.key)
}

#[tokio::test(start_paused = true)]
async fn dropping_a_queued_request_frees_its_place() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key);
    let mut service = layer.layer(handler(&recorder));
    let mut first = task::spawn(service.call(Msg::new(1, 0, 100)));
    let mut second = task::spawn(service.call(Msg::new(1, 1, 0)));
    let mut third = task::spawn(service.call(Msg::new(1, 2, 0)));
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    assert_pending!(third.poll());
    assert_eq!(layer.stats().queued, 2);

    drop(second);
    assert_eq!(layer.stats().queued, 1);

    tokio::time::advance(Duration::from_millis(100)).await;
    assert_ready_ok!(first.poll());
    assert!(third.is_woken());
    assert_pending!(third.poll());
    assert_ready_ok!(third.poll());
    assert_eq!(recorder.starts(1), [0, 2]);
    assert!(layer.stats().is_idle());
}

#[tokio::test]
async fn dropping_an_admitted_but_never_polled_request_passes_the_key() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key);
    let mut service = layer.layer(handler(&recorder));
    let first = service.call(Msg::new(1, 0, 0)); // holds the key, never polled
    let mut second = task::spawn(service.call(Msg::new(1, 1, 0)));
    assert_pending!(second.poll());

    drop(first);
    assert!(second.is_woken());
    assert_pending!(second.poll());
    assert_ready_ok!(second.poll());
    assert_eq!(recorder.starts(1), [1]);
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn dropping_a_request_handed_the_key_but_not_yet_repolled_passes_it_on() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key);
    let mut service = layer.layer(handler(&recorder));
    let mut first = task::spawn(service.call(Msg::new(1, 0, 10)));
    let mut second = task::spawn(service.call(Msg::new(1, 1, 0)));
    let mut third = task::spawn(service.call(Msg::new(1, 2, 0)));
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    assert_pending!(third.poll());

    tokio::time::advance(Duration::from_millis(10)).await;
    assert_ready_ok!(first.poll());
    // The key now belongs to `second`, which has been woken but not polled.
    assert!(second.is_woken());
    assert!(!third.is_woken());
    assert_eq!(layer.stats().in_flight, 1);

    drop(second);
    assert!(third.is_woken());
    assert_pending!(third.poll());
    assert_ready_ok!(third.poll());
    assert_eq!(recorder.starts(1), [0, 2]);
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn dropping_a_running_request_passes_the_key_after_the_handler_is_gone() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key);
    let mut service = layer.layer(handler(&recorder));
    let mut first = task::spawn(service.call(Msg::new(1, 0, 1_000)));
    let mut second = task::spawn(service.call(Msg::new(1, 1, 0)));
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    assert_eq!(recorder.starts(1), [0]);

    drop(first);
    assert!(second.is_woken());
    assert_pending!(second.poll());
    assert_ready_ok!(second.poll());
    assert_eq!(recorder.starts(1), [0, 1]);
    // The dropped handler had stopped running before the next one started.
    assert_eq!(recorder.max_running(1), 1);
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_timeout_outside_covers_the_wait_and_takes_the_request_out_of_line() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key);
    let mut plain = layer.layer(handler(&recorder));
    let mut with_timeout = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .layer(layer.clone())
        .service(handler(&recorder));

    let started = Instant::now();
    let slow = tokio::spawn(plain.call(Msg::new(1, 0, 10_000)));
    let impatient = tokio::spawn(with_timeout.call(Msg::new(1, 1, 10)));
    let after = tokio::spawn(plain.call(Msg::new(1, 2, 10)));
    tokio::task::yield_now().await;
    assert_eq!(layer.stats().queued, 2);

    let error = impatient.await.unwrap().unwrap_err();
    assert!(error.is::<Elapsed>(), "{error}");
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(layer.stats().queued, 1);

    slow.await.unwrap().unwrap();
    after.await.unwrap().unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(10_010));
    assert_eq!(recorder.starts(1), [0, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_inside_covers_the_handler_and_the_queue_moves_on() {
    let recorder = Recorder::default();
    let mut service = ServiceBuilder::new()
        .layer(SyncEngineLayer::new(by_key))
        .timeout(Duration::from_secs(1))
        .service(handler(&recorder));
    let started = Instant::now();
    let stuck = tokio::spawn(service.call(Msg::new(1, 0, 60_000)));
    // Waits 1s in line, then runs 500ms: inside the timeout, which starts at its turn.
    let next = tokio::spawn(service.call(Msg::new(1, 1, 500)));

    let error = stuck.await.unwrap().unwrap_err();
    assert!(error.is::<Elapsed>(), "{error}");
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(next.await.unwrap().unwrap(), 1);
    assert_eq!(started.elapsed(), Duration::from_millis(1_500));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_in_a_spawned_task_does_not_wedge_its_key() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key);
    let mut service = layer.layer(handler(&recorder));
    support::quiet_handler_panics();
    let mut boom = Msg::new(1, 0, 10);
    boom.panic = true;
    let panicking = tokio::spawn(service.call(boom));
    let next = tokio::spawn(service.call(Msg::new(1, 1, 10)));

    assert!(panicking.await.unwrap_err().is_panic());
    assert_eq!(next.await.unwrap().unwrap(), 1);
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn handler_errors_release_the_key() {
    let layer = SyncEngineLayer::new(|n: &u32| Mode::Sync(*n % 2));
    let mut service = layer.layer(tower::service_fn(|n: u32| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if n == 0 { Err("refused") } else { Ok(n) }
    }));
    let failing = tokio::spawn(service.call(0));
    let next = tokio::spawn(service.call(2));
    let error = failing.await.unwrap().unwrap_err();
    assert_eq!(error.to_string(), "refused");
    assert_eq!(next.await.unwrap().unwrap(), 2);
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn queued_requests_complete_after_every_service_and_the_layer_are_dropped() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key);
    let mut service = layer.layer(handler(&recorder));
    // Later requests are faster: only serialization makes them end in call order.
    let calls: Vec<_> = (0..3)
        .map(|seq| tokio::spawn(service.call(Msg::new(1, seq, 30 - seq * 10))))
        .collect();
    drop(service);
    drop(layer);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(recorder.ends(), [0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn oneshot_under_an_outer_deadline_leaves_nothing_behind() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key);
    let service = layer.layer(handler(&recorder));
    let holder = tokio::spawn(service.clone().oneshot(Msg::new(1, 0, 1_000)));
    // `oneshot` calls the service on its first poll.
    tokio::task::yield_now().await;
    for seq in 1..50 {
        let waiting = service.clone().oneshot(Msg::new(1, seq, 1));
        assert!(
            tokio::time::timeout(Duration::from_millis(1), waiting)
                .await
                .is_err()
        );
    }
    holder.await.unwrap().unwrap();
    assert_eq!(recorder.starts(1), [0]);
    assert!(layer.stats().is_idle());
}

type Policy = fn(&Msg) -> Mode<u64>;

/// A waker that reads the layer's stats when it is woken or dropped. `stats()` locks
/// every shard, so if the layer ran executor code under a shard's lock this would
/// deadlock.
struct ReentrantWaker {
    layer: SyncEngineLayer<Policy, u64>,
    woken: std::sync::atomic::AtomicUsize,
}

impl std::task::Wake for ReentrantWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        let _ = self.layer.stats();
        self.woken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for ReentrantWaker {
    fn drop(&mut self) {
        let _ = self.layer.stats();
    }
}

fn poll_with<F: std::future::Future>(
    future: std::pin::Pin<&mut F>,
    probe: &std::sync::Arc<ReentrantWaker>,
) -> std::task::Poll<F::Output> {
    let waker = std::task::Waker::from(std::sync::Arc::clone(probe));
    future.poll(&mut std::task::Context::from_waker(&waker))
}

#[test]
fn wakers_are_woken_and_dropped_outside_the_shard_lock() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let layer = SyncEngineLayer::new(by_key as Policy);
        let mut service = layer.layer(tower::service_fn(|msg: Msg| async move {
            Ok::<_, tower::BoxError>(msg.seq)
        }));
        let probe = || {
            std::sync::Arc::new(ReentrantWaker {
                layer: layer.clone(),
                woken: Default::default(),
            })
        };
        let first = service.call(Msg::new(1, 0, 0));
        let mut second = Box::pin(service.call(Msg::new(1, 1, 0)));
        let mut third = Box::pin(service.call(Msg::new(1, 2, 0)));
        let (a, b, c) = (probe(), probe(), probe());
        // Registering a new waker drops the old one.
        assert!(poll_with(second.as_mut(), &a).is_pending());
        drop(a);
        assert!(poll_with(second.as_mut(), &b).is_pending());
        assert!(poll_with(third.as_mut(), &c).is_pending());
        // The release wakes `second`'s waker; dropping `third` drops its waker.
        drop(first);
        assert_eq!(b.woken.load(std::sync::atomic::Ordering::SeqCst), 1);
        drop(third);
        drop(c);
        assert!(poll_with(second.as_mut(), &b).is_ready());
        assert!(layer.stats().is_idle());
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a waker ran under a shard lock and deadlocked");
}

/// An inner future that either completes at once or never, and whose `Drop` takes a
/// while (on the thread that drops it) before recording that it is gone.
struct SlowToDrop {
    seq: u64,
    completes: bool,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl std::future::Future for SlowToDrop {
    type Output = Result<u64, tower::BoxError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if self.completes {
            std::task::Poll::Ready(Ok(self.seq))
        } else {
            std::task::Poll::Pending
        }
    }
}

impl Drop for SlowToDrop {
    fn drop(&mut self) {
        std::thread::sleep(Duration::from_millis(50));
        self.log
            .lock()
            .unwrap()
            .push(format!("dropped {}", self.seq));
    }
}

/// The next request of a key starts only once the previous request's inner future has
/// been dropped, whether it completed or was cancelled. The next request runs on a
/// thread of its own, so it would start while the inner future is still being dropped
/// if the key were passed on first.
#[test]
fn the_inner_future_is_gone_before_the_next_request_starts() {
    for cancel in [false, true] {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let inner = {
            let log = log.clone();
            tower::service_fn(move |msg: Msg| {
                log.lock().unwrap().push(format!("started {}", msg.seq));
                SlowToDrop {
                    seq: msg.seq,
                    completes: msg.seq != 0 || !cancel,
                    log: log.clone(),
                }
            })
        };
        let mut service = SyncEngineLayer::new(by_key).layer(inner);
        let mut first = Box::pin(service.call(Msg::new(1, 0, 0)));
        let second = service.call(Msg::new(1, 1, 0));
        let next = std::thread::spawn(move || futures::executor::block_on(second));
        // Let the other thread register as a waiter first.
        std::thread::sleep(Duration::from_millis(20));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let polled = first.as_mut().poll(&mut cx);
        assert_eq!(polled.is_ready(), !cancel);
        drop(first);
        next.join().unwrap().unwrap();
        let log = log.lock().unwrap().clone();
        assert_eq!(
            log[..3],
            ["started 0", "dropped 0", "started 1"],
            "cancel = {cancel}"
        );
    }
}

/// A waker that panics when woken.
struct PanicsOnWake;

impl std::task::Wake for PanicsOnWake {
    fn wake(self: std::sync::Arc<Self>) {
        panic!("injected: a waker panicked on wake");
    }
}

/// With several permits, a request that starts after waiting for readiness tells the
/// shard, which wakes the next granted waiter. If that wake panics, the request's inner
/// future is dropped while the request still holds its permit: the key passes on only
/// once the inner future is gone.
#[test]
fn a_panicking_start_notice_drops_the_inner_future_before_the_key_passes_on() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};
    use tower_sync_engine::Stats;

    type StatsOf = Arc<dyn Fn() -> Stats + Send + Sync>;

    /// Not ready until `ready` is set; its futures never complete and record the layer's
    /// counts when they are dropped.
    #[derive(Clone)]
    struct Gate {
        ready: Arc<AtomicBool>,
        stats: StatsOf,
        seen_at_drop: Arc<Mutex<Vec<Stats>>>,
    }

    struct Never(Gate);

    impl std::future::Future for Never {
        type Output = Result<(), tower::BoxError>;
        fn poll(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
            Poll::Pending
        }
    }

    impl Drop for Never {
        fn drop(&mut self) {
            let seen = (self.0.stats)();
            self.0.seen_at_drop.lock().unwrap().push(seen);
        }
    }

    impl Service<u64> for Gate {
        type Response = ();
        type Error = tower::BoxError;
        type Future = Never;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
        fn call(&mut self, _: u64) -> Never {
            Never(self.clone())
        }
    }

    support::quiet_handler_panics();
    let layer = SyncEngineLayer::new(|_: &u64| Mode::Sync(1u64)).permits_per_key(2);
    let observer = layer.clone();
    let gate = Gate {
        ready: Arc::default(),
        stats: Arc::new(move || observer.stats()),
        seen_at_drop: Arc::default(),
    };
    let mut service = layer.layer(gate.clone());
    let mut noop = Context::from_waker(Waker::noop());
    // 0 holds a permit but cannot start (not ready); 1 and 2 wait behind it, without a
    // permit: 1 is granted the free one once 0 starts.
    let mut first = Box::pin(service.call(0));
    let mut second = Box::pin(service.call(1));
    let mut third = Box::pin(service.call(2));
    let panicking = Waker::from(Arc::new(PanicsOnWake));
    assert!(
        second
            .as_mut()
            .poll(&mut Context::from_waker(&panicking))
            .is_pending()
    );
    assert!(third.as_mut().poll(&mut noop).is_pending());
    assert_eq!((layer.stats().in_flight, layer.stats().queued), (1, 2));

    // 0 calls the inner service; its start notice wakes 1, and that wake panics.
    gate.ready.store(true, Ordering::SeqCst);
    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        first.as_mut().poll(&mut noop)
    }));
    assert!(
        polled.is_err(),
        "the start notice did not wake the next waiter"
    );
    drop(first);
    let seen = gate.seen_at_drop.lock().unwrap()[0];
    assert_eq!(
        (seen.in_flight, seen.queued),
        (2, 1),
        "the key passed on before the inner future was gone"
    );
    drop((second, third));
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}
