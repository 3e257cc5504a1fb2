//! Randomized soak: thousands of requests over many keys with random drops, aborts and
//! timeouts. Per-key start order must equal call order, no key may ever run more than
//! its permits, and the registry must end empty. Seeds are fixed so failures replay.

mod support;

use std::time::Duration;

use support::{Msg, Recorder, Rng, handler};
use tower::{Layer, Service};
use tower_sync_engine::{Mode, SyncEngineLayer};

async fn soak(seed: u64, requests: u64, keys: u64, permits: usize, paused_clock: bool) {
    support::quiet_handler_panics();
    let mut rng = Rng::new(seed);
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(|msg: &Msg| {
        // One in ten requests is Concurrent; it must not disturb anything.
        if msg.seq % 10 == 9 {
            Mode::Concurrent
        } else {
            Mode::Sync(msg.key)
        }
    })
    .permits_per_key(permits);
    let mut service = layer.layer(handler(&recorder));
    let mut tasks = Vec::new();
    let mut completed_untouched = 0u64;
    let mut untouched = Vec::new();

    for seq in 0..requests {
        // Concurrent requests get keys of their own in the recorder, so that the bound
        // on each Sync key below counts Sync handlers only.
        let key = rng.below(keys) + if seq % 10 == 9 { CONCURRENT_KEYS } else { 0 };
        let work = if paused_clock { rng.below(20) } else { 0 };
        let mut msg = Msg::new(key, seq, work);
        msg.panic = rng.chance(3);
        let future = service.call(msg.clone());
        match rng.below(100) {
            // Dropped before it is ever polled.
            0..10 => drop(future),
            // Under a timeout that may fire while queued or while running.
            10..20 => {
                let limit = Duration::from_millis(rng.below(40));
                tasks.push(tokio::spawn(async move {
                    let _ = tokio::time::timeout(limit, future).await;
                }));
            }
            // Spawned, then aborted a little later.
            20..30 => {
                let task = tokio::spawn(future);
                let delay = Duration::from_millis(rng.below(30));
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    task.abort();
                }));
            }
            _ => untouched.push((msg, tokio::spawn(future))),
        }
        if rng.chance(20) {
            tokio::time::sleep(Duration::from_millis(rng.below(3))).await;
        }
    }
    for task in tasks {
        if let Err(error) = task.await {
            assert!(error.is_panic(), "{error}");
        }
    }
    for (msg, task) in untouched {
        match task.await {
            Ok(result) => {
                assert_eq!(result.unwrap(), msg.seq);
                completed_untouched += 1;
            }
            Err(error) => assert!(error.is_panic() && msg.panic, "{msg:?}: {error}"),
        }
    }
    assert!(completed_untouched > requests / 2);

    for key in 0..keys {
        let starts: Vec<u64> = recorder
            .starts(key)
            .into_iter()
            .filter(|seq| seq % 10 != 9)
            .collect();
        assert!(
            starts.windows(2).all(|pair| pair[0] < pair[1]),
            "seed {seed}: key {key} started out of call order: {starts:?}"
        );
    }
    for key in 0..keys {
        assert!(
            recorder.max_running(key) <= permits,
            "seed {seed}: key {key}"
        );
    }
    assert!(layer.stats().is_idle(), "seed {seed}: {:?}", layer.stats());
}

const CONCURRENT_KEYS: u64 = 1 << 32;

async fn sync_only(seed: u64, requests: u64, keys: u64, permits: usize) {
    let mut rng = Rng::new(seed);
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(|msg: &Msg| Mode::Sync(msg.key)).permits_per_key(permits);
    let mut service = layer.layer(handler(&recorder));
    let mut tasks = Vec::new();
    for seq in 0..requests {
        let future = service.call(Msg::new(rng.below(keys), seq, rng.below(10)));
        if rng.chance(15) {
            drop(future);
        } else if rng.chance(15) {
            let limit = Duration::from_millis(rng.below(25));
            tasks.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(limit, future).await;
            }));
        } else {
            tasks.push(tokio::spawn(async move {
                future.await.unwrap();
            }));
        }
        if rng.chance(10) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    for key in 0..keys {
        let starts = recorder.starts(key);
        assert!(
            starts.windows(2).all(|pair| pair[0] < pair[1]),
            "seed {seed}: key {key}"
        );
        assert!(
            recorder.max_running(key) <= permits,
            "seed {seed}: key {key}"
        );
    }
    assert!(layer.stats().is_idle(), "seed {seed}");
}

#[tokio::test(start_paused = true)]
async fn soak_with_drops_timeouts_and_panics_one_permit() {
    for seed in 1..=4 {
        soak(seed, 2_000, 40, 1, true).await;
    }
}

#[tokio::test(start_paused = true)]
async fn soak_with_drops_timeouts_and_panics_three_permits() {
    for seed in 11..=14 {
        soak(seed, 2_000, 20, 3, true).await;
    }
}

#[tokio::test(start_paused = true)]
async fn sync_requests_never_exceed_their_permits() {
    for (seed, permits) in [(21, 1), (22, 2), (23, 4)] {
        sync_only(seed, 3_000, 25, permits).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_on_two_worker_threads() {
    for seed in 31..=33 {
        soak(seed, 5_000, 50, 1, false).await;
    }
}
