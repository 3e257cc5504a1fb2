//! Foreign code that panics while a panic is already unwinding: a response future is
//! dropped on the way out of a panicking handler (`block_on`, a `pin!`ned future on the
//! stack of a panicking function, the main future of a runtime), and the release it runs
//! drops a key whose `Drop` panics, or wakes or drops a waker that panics. A second panic
//! escaping a destructor aborts the process, so every scenario runs in a child process
//! (this test binary, run again with the scenario's name in `SCENARIO`) and the parent
//! checks how it ended: an abort is a signal, a panic that reached the end of the child's
//! test is exit code 101, and a scenario that passed its key on prints a line saying so.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use tower::{BoxError, Layer, Service, service_fn};
use tower_sync_engine::error::Overloaded;
use tower_sync_engine::{Mode, SyncEngineLayer};

#[path = "support/child.rs"]
mod child;
use child::{ChildRun, run_child};

/// The environment variable that names the scenario the child runs.
const SCENARIO: &str = "TOWER_SYNC_ENGINE_UNWINDING_SCENARIO";

/// What a child prints once the key has been passed on and the layer is idle.
const PASSED_ON: &str = "key passed on after the unwinding:";

/// The panic of the handler: the one that unwinds, and that the caller must see.
const HANDLER_PANIC: &str = "the handler panicked";

/// How a scenario's child process must end.
enum Expect {
    /// Its test passed and printed `PASSED_ON`.
    PassedOn,
    /// Its test failed with the handler's panic, which reached the end of the test.
    HandlerPanicEscaped,
}

#[test]
fn a_key_whose_drop_panics_during_unwinding_does_not_abort() {
    check("key_drop", Expect::PassedOn);
}

#[test]
fn a_waker_whose_wake_panics_during_unwinding_does_not_abort() {
    check("wake", Expect::PassedOn);
}

#[test]
fn a_stale_waker_whose_drop_panics_during_unwinding_does_not_abort() {
    check("stale_waker_on_leave", Expect::PassedOn);
}

#[test]
fn a_replaced_waker_whose_drop_panics_in_a_poll_during_unwinding_does_not_abort() {
    check("stale_waker_on_poll", Expect::PassedOn);
}

#[test]
fn a_spare_key_whose_drop_panics_in_a_call_during_unwinding_does_not_abort() {
    check("spare_key", Expect::PassedOn);
}

#[test]
fn a_rejected_key_whose_drop_panics_in_a_call_during_unwinding_does_not_abort() {
    check("rejected_key", Expect::PassedOn);
}

#[test]
fn a_runtime_main_future_dropped_by_a_panic_does_not_abort() {
    check("runtime_main", Expect::HandlerPanicEscaped);
}

/// Runs `scenario` in a child process and checks how it ended.
#[track_caller]
fn check(scenario: &str, expect: Expect) {
    let ChildRun {
        status,
        stdout,
        stderr,
        report,
    } = run_child(SCENARIO, scenario);
    match expect {
        Expect::PassedOn => {
            assert_eq!(status.code(), Some(0), "scenario {scenario}: {report}");
            assert!(
                stdout.contains(&format!("{PASSED_ON} {scenario}")),
                "scenario {scenario} did not report its key passed on: {report}"
            );
        }
        Expect::HandlerPanicEscaped => {
            assert_eq!(status.code(), Some(101), "scenario {scenario}: {report}");
            assert!(
                stderr.contains(HANDLER_PANIC) && stderr.contains(INJECTED_KEY_DROP),
                "scenario {scenario}: the handler's and the key's panics were not both \
                 seen: {report}"
            );
        }
    }
}

#[test]
fn child() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    match scenario.as_str() {
        "key_drop" => key_drop(),
        "wake" => wake(),
        "stale_waker_on_leave" => stale_waker_on_leave(),
        "stale_waker_on_poll" => stale_waker_on_poll(),
        "spare_key" => spare_key(),
        "rejected_key" => rejected_key(),
        "runtime_main" => runtime_main(),
        other => panic!("unknown scenario {other}"),
    }
    println!("{PASSED_ON} {scenario}");
}

// ---------------------------------------------------------------------------------------
// The scenarios, run by the child.

/// A handler panics under `block_on`, and its request is the last on its key: the
/// release during the unwinding drops the key, whose `Drop` panics.
fn key_drop() {
    let (layer, mut service, starts) = layered(1);
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(service.call(Request {
            explosive: true,
            ..request(0, Handler::Panic)
        }))
    }));
    assert_handler_panicked(panicked);
    assert_eq!(
        injected(),
        1,
        "the key was not dropped during the unwinding"
    );
    next_request_runs(&layer, &mut service, &starts, &[0]);
}

/// A second request waits for the key with a waker whose `wake` panics, and the holder,
/// a `pin!`ned future on the stack of a panicking function, is dropped by the unwinding.
fn wake() {
    let (layer, mut service, starts) = layered(1);
    let probe = Arc::new(PanicsOnWake::default());
    let mut waiting = None;
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        let mut holder = pin!(service.call(request(0, Handler::Pend)));
        assert!(holder.as_mut().poll(&mut noop()).is_pending());
        let waiting = waiting.insert(Box::pin(service.call(request(1, Handler::Answer))));
        let waker = Waker::from(Arc::clone(&probe));
        assert!(
            waiting
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        panic!("{HANDLER_PANIC}");
    }));
    assert_handler_panicked(panicked);
    assert!(
        probe.woken.load(Ordering::SeqCst),
        "the waiter was not woken"
    );
    assert_eq!(injected(), 1);
    // The wake panicked, but the waiter got the key: its next poll runs it.
    let mut waiting = waiting.expect("the waiter was called");
    assert!(matches!(
        waiting.as_mut().poll(&mut noop()),
        Poll::Ready(Ok(1))
    ));
    drop(waiting);
    next_request_runs(&layer, &mut service, &starts, &[0, 1]);
}

/// A request waits for the key with a waker whose `drop` panics, and is dropped by the
/// unwinding: it leaves the line, and its stored waker is dropped.
fn stale_waker_on_leave() {
    let (layer, mut service, starts) = layered(1);
    let mut holder = Box::pin(service.call(request(0, Handler::Pend)));
    assert!(holder.as_mut().poll(&mut noop()).is_pending());
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        let mut waiting = pin!(service.call(request(1, Handler::Answer)));
        poll_with_waker_that_panics_on_drop(waiting.as_mut());
        panic!("{HANDLER_PANIC}");
    }));
    assert_handler_panicked(panicked);
    assert_eq!(injected(), 1, "the stored waker was not dropped");
    let stats = layer.stats();
    assert_eq!((stats.in_flight, stats.queued), (1, 0), "{stats:?}");
    drop(holder);
    next_request_runs(&layer, &mut service, &starts, &[0]);
}

/// A destructor that runs during the unwinding polls a waiting request with another
/// waker: the waker it replaces, whose `drop` panics, is dropped in that poll.
fn stale_waker_on_poll() {
    let (layer, mut service, starts) = layered(1);
    let mut holder = Box::pin(service.call(request(0, Handler::Pend)));
    assert!(holder.as_mut().poll(&mut noop()).is_pending());
    let mut waiting = Box::pin(service.call(request(1, Handler::Answer)));
    poll_with_waker_that_panics_on_drop(waiting.as_mut());

    struct PollsOnDrop<'a, F: Future>(Pin<&'a mut F>);
    impl<F: Future> Drop for PollsOnDrop<'_, F> {
        fn drop(&mut self) {
            assert!(self.0.as_mut().poll(&mut noop()).is_pending());
        }
    }
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        let _polls = PollsOnDrop(waiting.as_mut());
        panic!("{HANDLER_PANIC}");
    }));
    assert_handler_panicked(panicked);
    assert_eq!(injected(), 1, "the replaced waker was not dropped");
    // The waiter kept its place, and gets the key when the holder goes.
    drop(holder);
    assert!(matches!(
        waiting.as_mut().poll(&mut noop()),
        Poll::Ready(Ok(1))
    ));
    drop(waiting);
    next_request_runs(&layer, &mut service, &starts, &[0, 1]);
}

/// A destructor that runs during the unwinding calls the layer with a live key: the
/// caller's copy of the key, whose `Drop` panics, is dropped in `call()`.
fn spare_key() {
    let (layer, mut service, starts) = layered(1);
    let mut holder = Box::pin(service.call(request(0, Handler::Pend)));
    assert!(holder.as_mut().poll(&mut noop()).is_pending());
    let mut called = None;
    call_during_unwinding(&mut service, &mut called);
    assert_eq!(injected(), 1, "the spare key was not dropped");
    let mut called = called.expect("the call returned a response future");
    assert_eq!(layer.stats().queued, 1, "{:?}", layer.stats());
    drop(holder);
    assert!(matches!(
        called.as_mut().poll(&mut noop()),
        Poll::Ready(Ok(1))
    ));
    drop(called);
    next_request_runs(&layer, &mut service, &starts, &[0, 1]);
}

/// As `spare_key`, but the line is full: the request is rejected, and its key dropped.
fn rejected_key() {
    let (layer, mut service, starts) = layered(0);
    let mut holder = Box::pin(service.call(request(0, Handler::Pend)));
    assert!(holder.as_mut().poll(&mut noop()).is_pending());
    let mut called = None;
    call_during_unwinding(&mut service, &mut called);
    assert_eq!(injected(), 1, "the rejected key was not dropped");
    let mut called = called.expect("the call returned a response future");
    match called.as_mut().poll(&mut noop()) {
        Poll::Ready(Err(error)) => assert!(error.is::<Overloaded>(), "{error}"),
        other => panic!("the request was not rejected: {other:?}"),
    }
    drop(holder);
    next_request_runs(&layer, &mut service, &starts, &[0]);
}

/// A runtime's main future is dropped by a handler's panic that escapes `block_on`, as
/// under `#[tokio::main]`, and its key's `Drop` panics in the release. The handler's
/// panic ends the child's test: a test failure, not an abort.
fn runtime_main() {
    let (_layer, mut service, _starts) = layered(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let _ = runtime.block_on(service.call(Request {
        explosive: true,
        ..request(0, Handler::Panic)
    }));
}

// ---------------------------------------------------------------------------------------
// What the scenarios share.

/// How many injected panics fired in this process.
static INJECTED: AtomicUsize = AtomicUsize::new(0);

const INJECTED_KEY_DROP: &str = "injected: a key's drop panicked";

fn injected() -> usize {
    INJECTED.load(Ordering::SeqCst)
}

fn inject(message: &str) -> ! {
    INJECTED.fetch_add(1, Ordering::SeqCst);
    panic!("{message}");
}

/// A key whose `Drop` panics, whether the thread is panicking or not, when `explosive`
/// is set. Equal and hashed by `id` only.
#[derive(Debug)]
struct Key {
    id: u64,
    explosive: bool,
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        if self.explosive {
            inject(INJECTED_KEY_DROP);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Handler {
    /// Answers at once.
    Answer,
    /// Never answers.
    Pend,
    /// Panics when polled.
    Panic,
}

#[derive(Debug, Clone, Copy)]
struct Request {
    seq: u64,
    explosive: bool,
    handler: Handler,
}

/// A request on key 1, the key of every scenario.
fn request(seq: u64, handler: Handler) -> Request {
    Request {
        seq,
        explosive: false,
        handler,
    }
}

fn by_key(request: &Request) -> Mode<Key> {
    Mode::Sync(Key {
        id: 1,
        explosive: request.explosive,
    })
}

type Starts = Arc<Mutex<Vec<u64>>>;

type Keyed = SyncEngineLayer<fn(&Request) -> Mode<Key>, Key>;

/// A layer with `max_queue_per_key(max_queue)` over a handler that records which
/// request started and then does what the request says.
fn layered(
    max_queue: usize,
) -> (
    Keyed,
    impl Service<Request, Response = u64, Error = BoxError>,
    Starts,
) {
    let layer =
        SyncEngineLayer::new(by_key as fn(&Request) -> Mode<Key>).max_queue_per_key(max_queue);
    let starts = Starts::default();
    let recorded = starts.clone();
    let handler = service_fn(move |request: Request| {
        recorded.lock().unwrap().push(request.seq);
        async move {
            match request.handler {
                Handler::Answer => Ok::<_, BoxError>(request.seq),
                Handler::Pend => std::future::pending().await,
                Handler::Panic => panic!("{HANDLER_PANIC}"),
            }
        }
    });
    let service = layer.layer(handler);
    (layer, service, starts)
}

fn noop() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// The caller sees the handler's panic, not the one of the foreign code it set off.
#[track_caller]
fn assert_handler_panicked<T>(panicked: std::thread::Result<T>) {
    let Err(payload) = panicked else {
        panic!("the scope did not panic");
    };
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied());
    assert_eq!(message, Some(HANDLER_PANIC));
}

/// The layer is idle and the key works: a new request on it runs at once. `started`
/// are the requests that started before.
#[track_caller]
fn next_request_runs(
    layer: &Keyed,
    service: &mut impl Service<Request, Response = u64, Error = BoxError>,
    starts: &Starts,
    started: &[u64],
) {
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    let mut next = pin!(service.call(request(9, Handler::Answer)));
    assert!(matches!(
        next.as_mut().poll(&mut noop()),
        Poll::Ready(Ok(9))
    ));
    let mut expected = started.to_vec();
    expected.push(9);
    assert_eq!(*starts.lock().unwrap(), expected);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

/// Inside a destructor that runs during a handler's unwinding, calls `service` with
/// request 1, whose key panics when dropped, and keeps its response future in `called`.
fn call_during_unwinding<S>(service: &mut S, called: &mut Option<Pin<Box<S::Future>>>)
where
    S: Service<Request>,
{
    struct CallsOnDrop<'a, S: Service<Request>> {
        service: &'a mut S,
        called: &'a mut Option<Pin<Box<S::Future>>>,
    }
    impl<S: Service<Request>> Drop for CallsOnDrop<'_, S> {
        fn drop(&mut self) {
            let explosive = Request {
                explosive: true,
                ..request(1, Handler::Answer)
            };
            *self.called = Some(Box::pin(self.service.call(explosive)));
        }
    }
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        let _calls = CallsOnDrop { service, called };
        panic!("{HANDLER_PANIC}");
    }));
    assert_handler_panicked(panicked);
}

/// A waker whose `wake` panics, after noting that it was called.
#[derive(Default)]
struct PanicsOnWake {
    woken: AtomicBool,
}

impl Wake for PanicsOnWake {
    fn wake(self: Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        inject("injected: a waker's wake panicked");
    }
}

/// A waker whose last `drop` panics.
struct PanicsOnDrop;

impl Wake for PanicsOnDrop {
    fn wake(self: Arc<Self>) {}
}

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        inject("injected: a waker's drop panicked");
    }
}

/// Polls a waiting request with a waker whose `drop` panics, and lets go of every copy
/// of it but the one the layer keeps: the layer's drop of that one is the last.
fn poll_with_waker_that_panics_on_drop<F: Future>(waiting: Pin<&mut F>) {
    let probe = Arc::new(PanicsOnDrop);
    let waker = Waker::from(Arc::clone(&probe));
    assert!(waiting.poll(&mut Context::from_waker(&waker)).is_pending());
    drop(waker);
    assert_eq!(
        Arc::strong_count(&probe),
        2,
        "the layer keeps one copy of the waker"
    );
    drop(probe);
}
