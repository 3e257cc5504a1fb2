//! Instruction counts of `Mode::sync_all` requests, as `instructions.rs` counts the
//! single-key ones, and held to their budgets by the same gate.
//!
//! ```sh
//! cargo bench --bench instructions_sets
//! ```
//!
//! A binary of its own: the two-key rows' code, compiled beside the single-key rows,
//! gave shared functions (std's SipHash, the registry's) more callers and changed what
//! the compiler inlined into the single-key rows, by up to 13%. Here they cannot move
//! those rows. Each benchmark sends `REQUESTS` requests; divide by it for the count per
//! request.

use std::hint::black_box;
use std::task::{Context, Poll, Waker};

use gungraun::{library_benchmark, library_benchmark_group, main};
use tower::{Layer, Service};
use tower_sync_engine::{Mode, SyncEngine, SyncEngineLayer};

mod common;
mod counted;
use common::poll_dyn;
use counted::counted;

/// Requests per benchmark.
const REQUESTS: u64 = 1_000;

/// Requests that warm a service up: enough to reach every shard many times over.
const WARM_UP: u64 = 100_000;

/// A request of the two-key rows.
#[derive(Clone, Copy)]
struct Pair(u64);

/// A key of the two-key rows: hashed as the single-key rows' `u64` keys are.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PairKey(u64);

/// Answers at once with a ready future, as `instructions.rs`'s `Echo` does.
#[derive(Clone, Copy)]
struct PairEcho;

impl Service<Pair> for PairEcho {
    type Response = u64;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<u64, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Pair) -> Self::Future {
        std::future::ready(Ok(request.0))
    }
}

/// Orders request `n` on two keys, `n` and a key far from it (`Mode::sync_all`).
fn two_keys(request: &Pair) -> Mode<PairKey> {
    Mode::sync_all([PairKey(request.0), PairKey(request.0 | 1 << 40)])
}

type TwoKeyLayered = SyncEngine<PairEcho, fn(&Pair) -> Mode<PairKey>, PairKey>;

/// A layer over `PairEcho` whose every request is on two keys, warmed up beforehand by
/// `WARM_UP` requests on pairs the benchmarks do not use.
fn two_key_layer() -> TwoKeyLayered {
    let policy: fn(&Pair) -> Mode<PairKey> = two_keys;
    let mut service = SyncEngineLayer::new(policy).layer(PairEcho);
    let mut cx = Context::from_waker(Waker::noop());
    for key in 0..WARM_UP {
        let mut future = std::pin::pin!(service.call(Pair((u64::MAX >> 2) - key)));
        assert!(future.as_mut().poll(&mut cx).is_ready());
    }
    service
}

// Two new keys per request: the cost of a `Mode::sync_all` request, from building its
// `Mode` to its release, beside `layer_sync_new_key` (target: at most twice that).
#[library_benchmark(config = counted("layer_sync_all_two_new_keys"))]
#[bench::default_hasher(setup = two_key_layer)]
fn layer_sync_all_two_new_keys(mut service: TwoKeyLayered) -> u64 {
    let mut cx = Context::from_waker(Waker::noop());
    let sum = (0..REQUESTS).fold(0, |sum, n| {
        sum ^ poll_dyn(std::pin::pin!(service.call(black_box(Pair(n)))), &mut cx).unwrap()
    });
    std::mem::forget(service);
    sum
}

// Two live keys: each request is called while the one before it still holds both keys,
// and is measured through the release of that one, beside `layer_sync_live_key`.
#[library_benchmark(config = counted("layer_sync_all_two_live_keys"))]
#[bench::default_hasher(setup = two_key_layer)]
fn layer_sync_all_two_live_keys(mut service: TwoKeyLayered) -> u64 {
    let mut cx = Context::from_waker(Waker::noop());
    let mut held = service.call(Pair(7));
    let mut sum = 0;
    for _ in 0..REQUESTS {
        let next = service.call(black_box(Pair(7)));
        sum ^= poll_dyn(std::pin::pin!(held), &mut cx).unwrap_or(0);
        held = next;
    }
    sum ^= poll_dyn(std::pin::pin!(held), &mut cx).unwrap_or(0);
    std::mem::forget(service);
    sum
}

library_benchmark_group!(
    name = two_keys_per_request;
    benchmarks = layer_sync_all_two_new_keys, layer_sync_all_two_live_keys
);

main!(library_benchmark_groups = two_keys_per_request);
