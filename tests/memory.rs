//! Exact cleanup, measured: after any burst the registry's heap returns to where it
//! started, and the steady-state paths allocate nothing.
//!
//! One test function, because the counting allocator sees the whole process.

#[path = "support/counting.rs"]
mod counting;

use std::pin::pin;
use std::task::{Context, Waker};

use counting::{Echo, allocations, live_bytes};
use tower::{Layer, Service};
use tower_sync_engine::{Mode, SyncEngineLayer};

/// How far from its pre-burst size the heap may be after a burst has drained.
const SLACK: isize = 1024;

/// Runs each burst shape once at a small scale: every shard then holds the few slots it
/// keeps when it empties (so that steady traffic does not allocate).
fn warm_up<S: Service<u64>>(service: &mut S, cx: &mut Context<'_>) {
    let held: Vec<_> = (0..1_000u64).map(|key| service.call(key)).collect();
    drop(held);
    let mut held: Vec<_> = (0..1_000).map(|_| Box::pin(service.call(7))).collect();
    for future in &mut held {
        let _ = future.as_mut().poll(cx);
    }
}

#[test]
fn registry_memory_returns_to_baseline_and_hot_paths_do_not_allocate() {
    let mut cx = Context::from_waker(Waker::noop());
    // Keys below 1 << 40 are Sync; the rest are Concurrent.
    let layer = SyncEngineLayer::new(|n: &u64| {
        if *n < 1 << 40 {
            Mode::Sync(*n)
        } else {
            Mode::Concurrent
        }
    });
    let mut service = layer.layer(Echo);
    let constructed = live_bytes();
    warm_up(&mut service, &mut cx);
    let baseline = live_bytes();
    let retained = baseline - constructed;
    println!("retained by an idle, warmed registry: {retained} bytes");

    // 100k distinct keys in flight at once.
    let held: Vec<_> = (0..100_000u64).map(|key| service.call(key)).collect();
    assert_eq!(layer.stats().keys, 100_000);
    assert!(
        live_bytes() - baseline > 100_000 * 8,
        "the burst should be visible"
    );
    drop(held);
    assert!(layer.stats().is_idle());
    let after_keys = live_bytes() - baseline;
    assert!(
        after_keys <= SLACK,
        "{after_keys} bytes kept after 100k keys drained"
    );

    // 100k requests queued on one key.
    let held: Vec<_> = (0..100_000).map(|_| service.call(7)).collect();
    assert_eq!(layer.stats().queued, 99_999);
    drop(held);
    assert!(layer.stats().is_idle());
    let after_queue = live_bytes() - baseline;
    assert!(
        after_queue <= SLACK,
        "{after_queue} bytes kept after 100k waiters drained"
    );

    // 100k queued, drained by running them in order.
    let mut held: Vec<_> = (0..100_000).map(|_| Box::pin(service.call(9))).collect();
    for future in &mut held {
        assert!(future.as_mut().poll(&mut cx).is_ready());
    }
    drop(held);
    assert!(layer.stats().is_idle());
    let after_run = live_bytes() - baseline;
    assert!(after_run <= SLACK, "{after_run} bytes kept after 100k ran");

    // Steady state: the uncontended Sync path, the same key or a new key each time,
    // and the Concurrent path make no heap allocation.
    for (label, keys) in [
        ("same key", [5u64; 1_000].to_vec()),
        ("new keys", (1_000..2_000).collect::<Vec<_>>()),
        (
            "concurrent",
            ((1 << 40)..(1 << 40) + 1_000).collect::<Vec<_>>(),
        ),
    ] {
        // Warm up the shard this key lands in, then count.
        let warm = pin!(service.call(keys[0]));
        assert!(warm.poll(&mut cx).is_ready());
        let before = allocations();
        for key in &keys {
            let future = pin!(service.call(*key));
            assert!(future.poll(&mut cx).is_ready());
        }
        let allocated = allocations() - before;
        assert_eq!(
            allocated, 0,
            "{label}: {allocated} allocations for 1000 requests"
        );
    }
    assert!(layer.stats().is_idle());
}
