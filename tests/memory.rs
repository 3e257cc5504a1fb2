//! Exact cleanup, measured: after any burst the registry's heap returns to where it
//! started, a line that never empties still gives its memory back, and steady traffic
//! allocates (almost) nothing.
//!
//! The counting allocator counts per thread, and each test runs on its own thread, so
//! tests running beside these cannot move their numbers.

#[path = "support/counting.rs"]
mod counting;

use std::mem::size_of_val;
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

    // 200k queued on one key, and the line never empties: the holder stays (or, run in
    // turn, the requests ahead leave one by one), and so does one waiter at its back.
    // Whether the others leave from the middle (dropped) or from the front (run in
    // turn), the line gives back the memory of those who left.
    for run_in_turn in [false, true] {
        let mut holder = Some(Box::pin(service.call(11)));
        let mut held: Vec<_> = (0..200_000).map(|_| Box::pin(service.call(11))).collect();
        let last = held.pop().expect("200k were queued");
        let burst = live_bytes() - baseline;
        assert!(burst > 200_000 * 8, "the burst should be visible: {burst}");
        if run_in_turn {
            holder = None;
            for future in &mut held {
                assert!(future.as_mut().poll(&mut cx).is_ready());
            }
        }
        drop(held);
        assert_eq!(layer.stats().keys, 1, "the line must still be there");
        // What is left besides one short line: the boxes of the futures still held.
        let boxes = (1 + usize::from(holder.is_some())) * size_of_val(&*last);
        let kept = live_bytes() - baseline - boxes as isize;
        assert!(
            kept <= SLACK,
            "{kept} bytes kept by a line of one after 200k (run in turn: {run_in_turn})"
        );
        drop(holder);
        drop(last);
        assert!(layer.stats().is_idle());
    }

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

/// Steady traffic over a steady number of live keys (new keys replacing finished ones,
/// spread over the shards) allocates at most once per 1,000 requests, whatever that
/// number is, up to 1,024 live keys.
#[test]
fn steady_key_churn_allocates_almost_nothing() {
    let mut cx = Context::from_waker(Waker::noop());
    for live in [16, 64, 256, 1_024] {
        let layer = SyncEngineLayer::new(|n: &u64| Mode::Sync(*n));
        let mut service = layer.layer(Echo);
        let mut next_key = 0u64;
        let mut call = |service: &mut _| {
            next_key += 1;
            Service::call(service, next_key)
        };
        let mut held: Vec<_> = (0..live).map(|_| call(&mut service)).collect();
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut churn = |held: &mut Vec<_>, service: &mut _, requests: usize| {
            for _ in 0..requests {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let slot = (rng % live as u64) as usize;
                // The finished request leaves; a request for a new key takes its place.
                let finished = std::mem::replace(&mut held[slot], call(service));
                let mut finished = std::pin::pin!(finished);
                assert!(finished.as_mut().poll(&mut cx).is_ready());
            }
        };
        churn(&mut held, &mut service, 100_000);
        let before = allocations();
        churn(&mut held, &mut service, 200_000);
        let allocated = allocations() - before;
        assert!(
            allocated <= 200,
            "{live} live keys: {allocated} allocations for 200,000 requests"
        );
        drop(held);
        assert!(layer.stats().is_idle());
    }
}
