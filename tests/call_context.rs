//! Where the inner service runs: inside `call()`, in the caller's thread, task and
//! runtime, for a `Mode::Concurrent` request and for a `Mode::Sync` request whose key is
//! free; from the response future, once its turn has come, for a request that waited.
//! A timeout inside the layer therefore starts at `call()` in the first case and at the
//! turn in the second, and `call()` needs the runtime only in the first.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::{self, ThreadId};
use std::time::Duration;

use tokio::time::Instant;
use tower::timeout::error::Elapsed;
use tower::{BoxError, Layer, Service, ServiceBuilder, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};

/// What the inner service was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    PollReady,
    Call(u32),
}

/// Where a step ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Site {
    thread: ThreadId,
    task: Option<tokio::task::Id>,
}

impl Site {
    fn here() -> Self {
        Site {
            thread: thread::current().id(),
            task: tokio::task::try_id(),
        }
    }
}

/// An always-ready inner service that records each `poll_ready` and `call`, and where it
/// ran. Its future needs no runtime.
#[derive(Clone, Default)]
struct Probe {
    log: Arc<Mutex<Vec<(Step, Site)>>>,
}

impl Probe {
    fn steps(&self) -> Vec<Step> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(step, _)| *step)
            .collect()
    }

    /// Where the steps at `range` ran.
    fn sites(&self, range: std::ops::Range<usize>) -> Vec<Site> {
        self.log.lock().unwrap()[range]
            .iter()
            .map(|(_, site)| *site)
            .collect()
    }

    fn record(&self, step: Step) {
        self.log.lock().unwrap().push((step, Site::here()));
    }
}

impl Service<u32> for Probe {
    type Response = u32;
    type Error = Infallible;
    type Future = Ready<Result<u32, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.record(Step::PollReady);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u32) -> Self::Future {
        self.record(Step::Call(request));
        ready(Ok(request))
    }
}

#[cfg(feature = "http")]
impl Service<axum::http::Request<u32>> for Probe {
    type Response = axum::http::Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<axum::http::Response<String>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.record(Step::PollReady);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::http::Request<u32>) -> Self::Future {
        self.record(Step::Call(*request.body()));
        ready(Ok(axum::http::Response::new(String::new())))
    }
}

/// Requests from 100 up are concurrent; the others are keyed by their last digit.
fn by_last_digit(request: &u32) -> Mode<u32> {
    if *request >= 100 {
        Mode::Concurrent
    } else {
        Mode::Sync(request % 10)
    }
}

fn poll_once<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn a_free_key_and_a_concurrent_request_call_the_inner_service_inside_call() {
    let probe = Probe::default();
    let mut service = SyncEngineLayer::new(by_last_digit).layer(probe.clone());
    let here = Site::here();

    let free = service.call(1);
    assert_eq!(probe.steps(), [Step::PollReady, Step::Call(1)]);
    let concurrent = service.call(100);
    assert_eq!(
        probe.steps(),
        [
            Step::PollReady,
            Step::Call(1),
            Step::PollReady,
            Step::Call(100)
        ]
    );
    assert_eq!(probe.sites(0..4), [here; 4], "on the calling thread");

    // Neither future has been polled: they only hand the inner answers over.
    assert_eq!(futures::executor::block_on(free).unwrap(), 1);
    assert_eq!(futures::executor::block_on(concurrent).unwrap(), 100);
    assert_eq!(probe.steps().len(), 4);
}

#[test]
fn a_busy_key_calls_the_inner_service_from_its_response_future_once_its_turn_has_come() {
    let probe = Probe::default();
    let mut service = SyncEngineLayer::new(by_last_digit).layer(probe.clone());

    let first = service.call(1);
    let mut busy = Box::pin(service.call(11));
    assert_eq!(probe.steps(), [Step::PollReady, Step::Call(1)], "not yet");
    assert!(poll_once(busy.as_mut()).is_pending());
    assert_eq!(probe.steps().len(), 2, "its turn has not come");

    drop(first);
    assert_eq!(
        probe.steps().len(),
        2,
        "the turn came, but nobody polled it"
    );
    // Polled on another thread: that is where the inner service runs.
    let poller = thread::spawn(move || {
        let answer = poll_once(busy.as_mut());
        (answer, thread::current().id())
    });
    let (answer, poller) = poller.join().unwrap();
    assert!(matches!(answer, Poll::Ready(Ok(11))));
    assert_eq!(probe.steps()[2..], [Step::PollReady, Step::Call(11)]);
    for site in probe.sites(2..4) {
        assert_eq!(site.thread, poller);
    }
    assert!(service.stats().is_idle());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inner_service_runs_in_the_task_that_calls_or_the_task_that_polls() {
    let probe = Probe::default();
    let service = SyncEngineLayer::new(by_last_digit).layer(probe.clone());

    let (caller, first, concurrent, busy) = tokio::spawn(async move {
        let mut service = service;
        let first = service.call(1);
        let concurrent = service.call(100);
        let busy = service.call(11);
        (tokio::task::id(), first, concurrent, busy)
    })
    .await
    .unwrap();
    assert_eq!(
        probe.steps(),
        [
            Step::PollReady,
            Step::Call(1),
            Step::PollReady,
            Step::Call(100)
        ]
    );
    for site in probe.sites(0..4) {
        assert_eq!(site.task, Some(caller), "in the calling task");
    }

    drop((first, concurrent));
    let (poller, answer) = tokio::spawn(async move { (tokio::task::id(), busy.await) })
        .await
        .unwrap();
    assert_eq!(answer.unwrap(), 11);
    assert_ne!(poller, caller);
    assert_eq!(probe.steps()[4..], [Step::PollReady, Step::Call(11)]);
    for site in probe.sites(4..6) {
        assert_eq!(site.task, Some(poller), "in the task that polled it");
    }
}

#[cfg(feature = "http")]
#[test]
fn the_http_flavour_calls_the_inner_service_in_the_same_places() {
    let probe = Probe::default();
    let mut service =
        SyncEngineLayer::new(|request: &axum::http::Request<u32>| by_last_digit(request.body()))
            .for_http()
            .layer(probe.clone());
    let request = axum::http::Request::new;

    let free = service.call(request(1));
    let concurrent = service.call(request(100));
    let mut busy = Box::pin(service.call(request(11)));
    assert_eq!(
        probe.steps(),
        [
            Step::PollReady,
            Step::Call(1),
            Step::PollReady,
            Step::Call(100)
        ]
    );
    assert_eq!(probe.sites(0..4), [Site::here(); 4]);

    drop((free, concurrent));
    let poller = thread::spawn(move || {
        assert!(poll_once(busy.as_mut()).is_ready());
        thread::current().id()
    });
    let poller = poller.join().unwrap();
    assert_eq!(probe.steps()[4..], [Step::PollReady, Step::Call(11)]);
    for site in probe.sites(4..6) {
        assert_eq!(site.thread, poller);
    }
    assert!(service.stats().is_idle());
}

const TIMEOUT: Duration = Duration::from_millis(100);

/// A request: its key, and how many milliseconds its handler works.
type Job = (u32, u64);

type ByKey = fn(&Job) -> Mode<u32>;

fn by_key() -> SyncEngineLayer<ByKey, u32> {
    SyncEngineLayer::new(|(key, _): &Job| Mode::Sync(*key))
}

/// The README's stack: `layer`, a timeout inside it, and a handler that works on tokio's
/// clock.
fn timed_stack(
    layer: &SyncEngineLayer<ByKey, u32>,
) -> impl Service<Job, Response = u32, Error = BoxError, Future: Send + 'static> + Clone + Send + 'static
{
    ServiceBuilder::new()
        .layer(layer.clone())
        .timeout(TIMEOUT)
        .service(service_fn(|(key, work): Job| async move {
            tokio::time::sleep(Duration::from_millis(work)).await;
            Ok::<_, BoxError>(key)
        }))
}

#[tokio::test(start_paused = true)]
async fn an_inner_timeout_starts_at_call_for_a_free_key_and_at_the_turn_for_a_waiting_one() {
    let layer = by_key();
    let mut service = timed_stack(&layer);
    let mut free = pin!(service.call((1, 10)));
    let mut waiting = pin!(service.call((1, 10)));
    // Neither is polled while the clock passes the timeout.
    tokio::time::advance(TIMEOUT + Duration::from_millis(1)).await;
    let Poll::Ready(Err(error)) = poll_once(free.as_mut()) else {
        panic!("the free key's timeout started in `call()` and has elapsed");
    };
    assert!(error.is::<Elapsed>(), "{error}");
    // The key has passed on: the waiting request's timeout starts now, on this poll.
    assert!(poll_once(waiting.as_mut()).is_pending());
    tokio::time::advance(Duration::from_millis(10)).await;
    assert!(matches!(poll_once(waiting.as_mut()), Poll::Ready(Ok(1))));
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn an_inner_timeout_starts_at_the_turn_for_a_request_that_waited() {
    let mut service = timed_stack(&by_key());
    let start = Instant::now();
    let first = tokio::spawn(service.call((1, 60)));
    // 60 + 90 ms after `call()`: over the timeout, but 90 ms after its turn.
    let second = tokio::spawn(service.call((1, 90)));
    // Its turn comes at 150 ms; the timeout fires 100 ms later.
    let third = tokio::spawn(service.call((1, 1_000)));

    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(second.await.unwrap().unwrap(), 1);
    assert_eq!(start.elapsed(), Duration::from_millis(150));
    let error = third.await.unwrap().unwrap_err();
    assert!(error.is::<Elapsed>(), "{error}");
    assert_eq!(start.elapsed(), Duration::from_millis(250));
}

#[test]
fn outside_the_runtime_a_free_key_panics_in_call_and_a_busy_key_does_not() {
    // Paused, so that the time the other thread takes does not count against `first`,
    // whose timeout started at `call()`.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let layer = by_key();
    let mut service = timed_stack(&layer);
    // Key 1 is taken inside the runtime, where the timeout can start its timer.
    let first = {
        let _inside = runtime.enter();
        service.call((1, 10))
    };

    let mut outside = service.clone();
    let (busy, free) = thread::spawn(move || {
        assert!(
            tokio::runtime::Handle::try_current().is_err(),
            "no runtime here"
        );
        let busy = outside.call((1, 10));
        let free = catch_unwind(AssertUnwindSafe(|| drop(outside.call((2, 10)))));
        (busy, free)
    })
    .join()
    .unwrap();

    let panic = free.expect_err("a free key calls the timeout, which needs the runtime");
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or_default();
    assert!(message.contains("runtime"), "{message}");
    // The panicking request gave its place up; the busy one runs in the runtime.
    runtime.block_on(async {
        assert_eq!(first.await.unwrap(), 1);
        assert_eq!(busy.await.unwrap(), 1);
    });
    assert!(layer.stats().is_idle());
}

#[test]
fn with_two_permits_per_key_the_second_request_of_a_key_also_starts_inside_call() {
    let probe = Probe::default();
    let mut service = SyncEngineLayer::new(by_last_digit)
        .permits_per_key(2)
        .layer(probe.clone());
    let first = service.call(1);
    let second = service.call(11);
    assert_eq!(
        probe.steps(),
        [
            Step::PollReady,
            Step::Call(1),
            Step::PollReady,
            Step::Call(11)
        ]
    );
    let mut third = Box::pin(service.call(21));
    assert_eq!(probe.steps().len(), 4, "both permits are held");
    drop(first);
    assert!(poll_once(third.as_mut()).is_ready());
    assert_eq!(probe.steps()[4..], [Step::PollReady, Step::Call(21)]);
    drop(second);
    assert!(service.stats().is_idle());
}
