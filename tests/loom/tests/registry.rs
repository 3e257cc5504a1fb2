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
//!   asserts it while a handler is mid-flight);
//! - no lost hand-off: every request that is not dropped completes (loom reports a
//!   deadlock if a waiter is never woken);
//! - the registry is empty once everything is done.
#![cfg(loom)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

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
}

struct ProbeFuture {
    running: Arc<AtomicUsize>,
    permits: usize,
    request: u32,
    entered: bool,
}

impl Service<u32> for Probe {
    type Response = u32;
    type Error = std::convert::Infallible;
    type Future = ProbeFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u32) -> ProbeFuture {
        self.called.lock().unwrap().push(request);
        ProbeFuture {
            running: self.running.clone(),
            permits: self.permits,
            request,
            entered: false,
        }
    }
}

impl Future for ProbeFuture {
    type Output = Result<u32, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.entered {
            self.entered = true;
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            assert!(now <= self.permits, "{now} handlers of one key at once");
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.entered = false;
        self.running.fetch_sub(1, Ordering::SeqCst);
        Poll::Ready(Ok(self.request))
    }
}

impl Drop for ProbeFuture {
    fn drop(&mut self) {
        if self.entered {
            self.running.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

type Policy = fn(&u32) -> Mode<u8>;
type Engine = SyncEngine<Probe, Policy, u8>;

fn one_key(_: &u32) -> Mode<u8> {
    Mode::Sync(0)
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
    let layer = SyncEngineLayer::new(one_key as Policy).permits_per_key(permits);
    let called = Arc::new(Mutex::new(Vec::new()));
    let probe = Probe {
        running: Arc::new(AtomicUsize::new(0)),
        permits,
        called: called.clone(),
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
