//! Instruction counts, with callgrind through gungraun: reproducible on any machine and
//! under any load, unlike the times of `sync_engine.rs`.
//!
//! ```sh
//! cargo install gungraun-runner --version 0.19.1   # the runner matching the library
//! cargo bench --bench instructions                 # valgrind from the OS packages
//! ```
//!
//! Each benchmark sends `REQUESTS` requests (ready, call, poll to completion, no-op
//! waker, `service_fn` echo, `u64` keys, default settings unless its name says
//! otherwise); its setup (building the service) is not counted. Divide a benchmark's
//! instruction count by `REQUESTS` for the count per request.
//!
//! CI holds every row to its budget in `instructions.budget` with
//! `.ci/instruction-gate`: see that file for when and how to change one.

use std::hash::RandomState;
use std::hint::black_box;
use std::task::{Context, Poll, Waker};

use gungraun::{library_benchmark, library_benchmark_group, main};
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service};
use tower_sync_engine::{Mode, SyncEngine, SyncEngineLayer};

mod common;
mod counted;
use common::{CONCURRENT, MutexMap, echo, one_request, policy, poll_dyn, poll_now};
use counted::counted;

/// Requests per benchmark.
const REQUESTS: u64 = 1_000;

/// An echo service with a nameable type, so that setup functions can build the services
/// outside what is counted: ready at once, answering with a ready future.
#[derive(Clone, Copy)]
struct Echo;

impl Service<u64> for Echo {
    type Response = u64;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<u64, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u64) -> Self::Future {
        std::future::ready(Ok(request))
    }
}

type Policy = fn(&u64) -> Mode<u64>;
type Layered<H = RandomState> = SyncEngine<Echo, Policy, u64, H>;

/// A layer over `Echo`, warmed up beforehand by `WARM_UP` requests on keys the benchmarks
/// do not use, as a running service is: its domain is built and every shard's table has
/// been allocated, so that only steady-state work is counted.
fn layered<H: std::hash::BuildHasher>(hasher: H) -> Layered<H> {
    let mut service = SyncEngineLayer::new(policy as Policy)
        .with_hasher(hasher)
        .layer(Echo);
    let mut cx = Context::from_waker(Waker::noop());
    for key in 0..WARM_UP {
        one_request(&mut service, (u64::MAX >> 1) - key, &mut cx);
    }
    service
}

/// Requests that warm a service up: enough to reach every shard many times over.
const WARM_UP: u64 = 100_000;

fn default_hasher() -> Layered {
    layered(RandomState::new())
}

fn fast_hasher() -> Layered<foldhash::fast::RandomState> {
    layered(foldhash::fast::RandomState::default())
}

/// Sends `REQUESTS` requests. The service is leaked, not dropped, so that freeing the
/// domain is not counted.
fn sends<S>(mut service: S, key: impl Fn(u64) -> u64) -> u64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let sum = (0..REQUESTS).fold(0, |sum, n| {
        sum ^ one_request(&mut service, black_box(key(n)), &mut cx)
    });
    std::mem::forget(service);
    sum
}

#[library_benchmark(config = counted("raw_service_fn"))]
fn raw_service_fn() -> u64 {
    sends(Echo, |n| n)
}

#[library_benchmark(config = counted("layer_concurrent"))]
#[bench::default_hasher(setup = default_hasher)]
fn layer_concurrent(service: Layered) -> u64 {
    sends(service, |n| CONCURRENT | n)
}

#[library_benchmark(config = counted("layer_sync_new_key"))]
#[bench::default_hasher(setup = default_hasher)]
fn layer_sync_new_key(service: Layered) -> u64 {
    sends(service, |n| n)
}

// The same key every time, one request after the other: the key's entry is created and
// removed by each request, in the same place of the same table.
#[library_benchmark(config = counted("layer_sync_one_key"))]
#[bench::default_hasher(setup = default_hasher)]
fn layer_sync_one_key(service: Layered) -> u64 {
    sends(service, |_| 7)
}

#[library_benchmark(config = counted("layer_sync_new_key_foldhash"))]
#[bench::fast_hasher(setup = fast_hasher)]
fn layer_sync_new_key_foldhash(service: Layered<foldhash::fast::RandomState>) -> u64 {
    sends(service, |n| n)
}

// A key that is live already: each request is called while the one before it still
// holds the key, and is measured through the release of that one.
#[library_benchmark(config = counted("layer_sync_live_key"))]
#[bench::default_hasher(setup = default_hasher)]
fn layer_sync_live_key(mut service: Layered) -> u64 {
    let mut cx = Context::from_waker(Waker::noop());
    let mut held = service.call(7);
    let mut sum = 0;
    for _ in 0..REQUESTS {
        let next = service.call(black_box(7));
        sum ^= poll_dyn(std::pin::pin!(held), &mut cx).unwrap_or(0);
        held = next;
    }
    sum ^= poll_dyn(std::pin::pin!(held), &mut cx).unwrap_or(0);
    std::mem::forget(service);
    sum
}

fn limit_of_one() -> ConcurrencyLimit<Echo> {
    ConcurrencyLimit::new(Echo, 1)
}

#[library_benchmark(config = counted("concurrency_limit_1"))]
#[bench::one(setup = limit_of_one)]
fn concurrency_limit_1(service: ConcurrencyLimit<Echo>) -> u64 {
    sends(service, |n| n)
}

#[library_benchmark(config = counted("map_of_mutexes_new_key"))]
fn map_of_mutexes_new_key() -> u64 {
    let map = MutexMap::default();
    let mut cx = Context::from_waker(Waker::noop());
    (0..REQUESTS).fold(0, |sum, n| {
        sum ^ poll_now(map.run(black_box(n), echo()), &mut cx)
    })
}

// 1,000 requests queued on one key, then driven in order: the hand-off. Each request's
// enqueueing, first poll, hand-off and final poll are counted.
#[library_benchmark(config = counted("hand_off_layer"))]
#[bench::default_hasher(setup = default_hasher)]
fn hand_off_layer(mut service: Layered) -> u64 {
    let mut cx = Context::from_waker(Waker::noop());
    let mut queued: Vec<_> = (0..REQUESTS).map(|_| Box::pin(service.call(7))).collect();
    for future in &mut queued[1..] {
        assert!(future.as_mut().poll(&mut cx).is_pending());
    }
    let sum = queued.iter_mut().fold(0, |sum, future| {
        sum ^ poll_dyn(future.as_mut(), &mut cx).unwrap_or(0)
    });
    std::mem::forget(service);
    sum
}

// The same hand-off through tokio's `Semaphore(1)`, each waiter enqueued by its first
// poll, as `acquire` does.
#[library_benchmark(config = counted("hand_off_semaphore"))]
fn hand_off_semaphore() -> u64 {
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
    let mut cx = Context::from_waker(Waker::noop());
    let holder = semaphore.clone().try_acquire_owned().unwrap();
    let mut queued: Vec<_> = (0..REQUESTS)
        .map(|n| {
            let semaphore = semaphore.clone();
            Box::pin(async move {
                let _permit = semaphore.acquire().await.unwrap();
                n
            })
        })
        .collect();
    for future in &mut queued {
        assert!(future.as_mut().poll(&mut cx).is_pending());
    }
    drop(holder);
    queued
        .iter_mut()
        .fold(0, |sum, future| sum ^ poll_dyn(future.as_mut(), &mut cx))
}

library_benchmark_group!(
    name = per_request;
    benchmarks =
        raw_service_fn,
        layer_concurrent,
        layer_sync_new_key,
        layer_sync_one_key,
        layer_sync_new_key_foldhash,
        layer_sync_live_key,
        concurrency_limit_1,
        map_of_mutexes_new_key
);

library_benchmark_group!(
    name = hand_off_1000_queued;
    benchmarks = hand_off_layer, hand_off_semaphore
);

main!(library_benchmark_groups = per_request, hand_off_1000_queued);
