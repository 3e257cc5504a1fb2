//! Exact cleanup, measured: after any burst the registry's heap returns to where it
//! started once warmed up, and stays within a bound per shard from a fresh start; a line
//! that never empties still gives its memory back; and steady traffic, contended or not,
//! allocates (almost) nothing.
//!
//! The counting allocator counts per thread, and each test runs on its own thread, so
//! tests running beside these cannot move their numbers.

#[path = "support/counting.rs"]
mod counting;

use std::mem::size_of_val;
use std::pin::pin;
use std::task::{Context, Waker};

use counting::{Echo, YieldOnce, allocations, live_bytes};
use tower::{Layer, Service};
use tower_sync_engine::{Mode, SyncEngineLayer};

/// std's SipHash-1-3 with fixed keys: the counts below depend on how keys fall on shards,
/// and a fixed seed makes them the same in every run (as a random one does on average).
type Seeded = std::hash::BuildHasherDefault<std::hash::DefaultHasher>;

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
        let layer = SyncEngineLayer::new(|n: &u64| Mode::Sync(*n)).with_hasher(Seeded::default());
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

/// Steps run before counting: long enough for every shard to have met the most keys (and
/// queued keys) it meets at once under that load, whose lines and table room it then keeps.
const WARM: usize = 150_000;

type Contended = tower_sync_engine::ResponseFuture<YieldOnce, u64, u64>;

/// One key with a request running and one waiting behind it.
struct Busy {
    running: std::pin::Pin<Box<Contended>>,
    waiting: std::pin::Pin<Box<Contended>>,
}

impl Busy {
    fn new<S>(service: &mut S, key: u64, cx: &mut Context<'_>) -> Self
    where
        S: Service<u64, Future = Contended>,
    {
        let mut running = Box::pin(service.call(key));
        assert!(running.as_mut().poll(cx).is_pending(), "running");
        let mut waiting = Box::pin(service.call(key));
        assert!(waiting.as_mut().poll(cx).is_pending(), "waiting");
        Busy { running, waiting }
    }

    /// The running request finishes and the waiting one starts; a new request for the
    /// same key waits behind it. Reuses the futures' boxes, so only the layer allocates.
    fn advance<S>(&mut self, service: &mut S, key: u64, cx: &mut Context<'_>)
    where
        S: Service<u64, Future = Contended>,
    {
        assert!(self.running.as_mut().poll(cx).is_ready(), "finished");
        assert!(self.waiting.as_mut().poll(cx).is_pending(), "started");
        std::mem::swap(&mut self.running, &mut self.waiting);
        self.waiting.set(service.call(key));
        assert!(self.waiting.as_mut().poll(cx).is_pending(), "waiting");
    }

    /// Both requests run to completion: the key goes idle.
    fn finish(&mut self, cx: &mut Context<'_>) {
        assert!(self.running.as_mut().poll(cx).is_ready(), "finished");
        assert!(self.waiting.as_mut().poll(cx).is_pending(), "started");
        assert!(self.waiting.as_mut().poll(cx).is_ready(), "finished");
    }
}

/// Steady contended traffic: every live key has a request running and one waiting, and
/// requests keep coming, on the same keys or on new keys replacing finished ones. Each
/// key that queues needs a line; the shards reuse them, so steady traffic allocates at
/// most once per 1,000 requests up to 1,024 live keys.
#[test]
fn steady_contended_traffic_allocates_almost_nothing() {
    let mut cx = Context::from_waker(Waker::noop());
    for new_keys in [false, true] {
        for live in [16u64, 64, 256, 1_024] {
            let layer =
                SyncEngineLayer::new(|n: &u64| Mode::Sync(*n)).with_hasher(Seeded::default());
            let mut service = layer.layer(YieldOnce);
            let mut keys: Vec<u64> = (0..live).collect();
            let mut next_key = live;
            let mut busy: Vec<Busy> = keys
                .iter()
                .map(|&key| Busy::new(&mut service, key, &mut cx))
                .collect();
            let mut rng = 0x2545_F491_4F6C_DD1Du64;
            let mut step = |busy: &mut Vec<Busy>, service: &mut _, cx: &mut Context<'_>| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let slot = (rng % live) as usize;
                if new_keys {
                    busy[slot].finish(cx);
                    keys[slot] = next_key;
                    next_key += 1;
                    let fresh = Busy::new(service, keys[slot], cx);
                    // Drops the old futures' boxes: allocations of the test, not the layer.
                    let _ = std::mem::replace(&mut busy[slot], fresh);
                } else {
                    busy[slot].advance(service, keys[slot], cx);
                }
            };
            for _ in 0..WARM {
                step(&mut busy, &mut service, &mut cx);
            }
            let before = allocations();
            let steps = 100_000;
            for _ in 0..steps {
                step(&mut busy, &mut service, &mut cx);
            }
            // Each step makes one request with the same keys and two with new keys; the
            // new keys' futures are boxed by the test: two allocations per step.
            let requests = if new_keys { 2 * steps } else { steps };
            let by_test = if new_keys { 2 * steps } else { 0 };
            let allocated = allocations() - before - by_test;
            assert!(
                allocated * 1_000 <= requests,
                "{live} live keys (new keys: {new_keys}): {allocated} allocations for \
                 {requests} requests"
            );
            for mut key in busy {
                key.finish(&mut cx);
            }
            assert!(layer.stats().is_idle());
        }
    }
}

/// Bursts: every one of 256 keys gets two requests at once, then the domain drains.
/// After the first few bursts, the next ones allocate at most once per 1,000 requests.
#[test]
fn repeated_bursts_of_two_per_key_allocate_almost_nothing() {
    let mut cx = Context::from_waker(Waker::noop());
    let layer = SyncEngineLayer::new(|n: &u64| Mode::Sync(*n)).with_hasher(Seeded::default());
    let mut service = layer.layer(YieldOnce);
    let mut busy: Vec<Busy> = (0..256)
        .map(|key| Busy::new(&mut service, key, &mut cx))
        .collect();
    let burst = |busy: &mut Vec<Busy>, service: &mut _, cx: &mut Context<'_>| {
        for key in busy.iter_mut() {
            key.finish(cx);
        }
        assert!(layer.stats().is_idle());
        for (key, slot) in busy.iter_mut().enumerate() {
            slot.running.set(Service::call(service, key as u64));
            assert!(slot.running.as_mut().poll(cx).is_pending());
        }
        for (key, slot) in busy.iter_mut().enumerate() {
            slot.waiting.set(Service::call(service, key as u64));
            assert!(slot.waiting.as_mut().poll(cx).is_pending());
        }
    };
    for _ in 0..20 {
        burst(&mut busy, &mut service, &mut cx);
    }
    let before = allocations();
    let bursts = 100;
    for _ in 0..bursts {
        burst(&mut busy, &mut service, &mut cx);
    }
    let allocated = allocations() - before;
    let requests = bursts * 512;
    assert!(
        allocated * 1_000 <= requests,
        "{allocated} allocations for {requests} requests"
    );
}

/// Requests on two keys (`Mode::sync_all`) give back what they took: the places parked
/// for their other keys too.
#[test]
fn requests_on_two_keys_give_their_memory_back() {
    let mut cx = Context::from_waker(Waker::noop());
    // Below 1 << 40, a request is ordered on keys n and n + 1; above, on one key.
    const ONE: u64 = 1 << 40;
    let layer = SyncEngineLayer::new(|n: &u64| match n.checked_sub(ONE) {
        Some(key) => Mode::Sync(key),
        None => Mode::sync_all([*n, *n + 1]),
    });
    let mut service = layer.layer(Echo);
    // The same keys, two requests on each, one key at a time: the shards' tables and
    // lines grow to what the pairs need, and keep what they keep.
    for _ in 0..2 {
        let held: Vec<_> = (0..=20_000u64)
            .flat_map(|key| [key + ONE, key + ONE])
            .map(|request| service.call(request))
            .collect();
        drop(held);
    }
    // A few pairs: what a shard keeps for the pairs it leads.
    let held: Vec<_> = (0..200u64).map(|n| service.call(n)).collect();
    drop(held);
    let baseline = live_bytes();
    // Every pair shares a key with the next, so most of them wait.
    let held: Vec<_> = (0..20_000u64).map(|n| service.call(n)).collect();
    assert_eq!(layer.stats().keys, 20_001);
    assert!(live_bytes() - baseline > 20_000 * 40);
    drop(held);
    assert!(layer.stats().is_idle());
    let kept = live_bytes() - baseline;
    assert!(kept <= SLACK, "{kept} bytes kept after a burst of pairs");
    let mut future = pin!(service.call(1));
    assert!(future.as_mut().poll(&mut cx).is_ready());
}

/// Shards of a domain on this machine: 32 per core, a power of two, at most 1,024.
fn shards() -> isize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores * 32).next_power_of_two().min(1_024) as isize
}

/// What an idle shard keeps at most, with `u64` keys and the default features: a table
/// with room for 28 keys, and an empty line for each key the shard has room for (its 4
/// slots and the table's 28), each with room for 8 waiters.
const IDLE_SHARD_BOUND: isize = 16 * 1024;

/// From a fresh domain: whatever the burst, once it has drained the domain keeps at most
/// `IDLE_SHARD_BOUND` per shard, and a burst larger than what a shard keeps is given back
/// down to the same small size every time.
#[test]
fn an_idle_domain_keeps_a_bounded_size_after_any_burst() {
    let mut cx = Context::from_waker(Waker::noop());
    let layer = SyncEngineLayer::new(|n: &u64| Mode::Sync(*n)).with_hasher(Seeded::default());
    let mut service = layer.layer(Echo);
    let fresh = live_bytes();
    let bound = shards() * IDLE_SHARD_BOUND;
    // Printed at the end: printing grows the test harness's output buffer, whose bytes
    // this thread's count would include.
    let mut report = Vec::with_capacity(32);
    let mut kept = |label: &'static str| {
        assert!(layer.stats().is_idle(), "{label}");
        let kept = live_bytes() - fresh;
        assert!(kept <= bound, "{label}: {kept} bytes kept, bound {bound}");
        report.push((label, kept));
        kept
    };

    // Bursts of distinct keys, small and large, each with `depth` requests per key: the
    // ones that fill a shard's table to what it keeps are the worst case.
    let mut worst = 0;
    for (keys, labels) in [
        (100u64, ["100 keys", "100 keys x 9"]),
        (1_500, ["1,500 keys", "1,500 keys x 9"]),
        (1_800, ["1,800 keys", "1,800 keys x 9"]),
        (3_000, ["3,000 keys", "3,000 keys x 9"]),
        (100_000, ["100,000 keys", "100,000 keys x 9"]),
    ] {
        for (depth, label) in [1, 9].into_iter().zip(labels) {
            let held: Vec<_> = (0..keys)
                .flat_map(|key| std::iter::repeat_n(key, depth))
                .map(|key| service.call(key))
                .collect();
            drop(held);
            worst = worst.max(kept(label));
        }
    }
    // Long lines on a few keys.
    let held: Vec<_> = (0..200_000).map(|n| service.call(n % 3)).collect();
    drop(held);
    kept("3 keys x 66,667");

    // A burst far larger than any shard keeps leaves every shard at the size it keeps
    // once emptied after such a burst, whatever came before.
    let held: Vec<_> = (0..200_000u64).map(|key| service.call(key)).collect();
    drop(held);
    let after_large = kept("200,000 keys");
    let held: Vec<_> = (0..100_000u64).map(|key| service.call(key * 7)).collect();
    drop(held);
    assert_eq!(kept("100,000 other keys"), after_large);
    assert!(after_large <= worst);
    let mut future = pin!(service.call(1));
    assert!(future.as_mut().poll(&mut cx).is_ready());
    for (label, kept) in report {
        let per_shard = kept / shards();
        println!("{label}: {kept} bytes kept by the idle domain ({per_shard} per shard)");
    }
}
