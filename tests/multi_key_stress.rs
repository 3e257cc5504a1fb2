//! Multi-key requests on a multi-threaded runtime: many tasks send overlapping sets of
//! keys, in random key order and with duplicates, mixed with single-key and Concurrent
//! requests; some are awaited, some spawned, dropped unpolled, put under a timeout or
//! aborted, and a few handlers panic.
//!
//! Checked at the end of each run: no key ran more than its permits at once; the starts
//! on every key and the order of the `call()`s are consistent with one global order (see
//! [`assert_one_global_order`]); every request that was awaited completed; and the
//! registry is idle. The clock is real (a paused clock needs a single thread), so no
//! timing is asserted: the bound on a run only turns a hang into a failure.

#[path = "support/sets.rs"]
mod sets;
mod support;
#[path = "support/threads.rs"]
mod threads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sets::distinct;
use support::Rng;
use threads::{CallClock, CallTimes, assert_one_global_order, on_threads, race, until_idle, work};
use tower::{BoxError, Layer};
use tower_sync_engine::{Mode, SyncEngineLayer};

/// Keys the sets are drawn from: few, so that sets overlap a lot.
const KEYS: u64 = 6;
const CALLERS: u64 = 8;
const PER_CALLER: u64 = 500;
/// Longer than any run takes; reaching it means a request never completed, or a thread
/// never got a lock.
const HANG: Duration = Duration::from_secs(30);

/// A request: its id, and the keys as the caller names them (any order, duplicates).
#[derive(Debug, Clone)]
struct Job {
    id: u64,
    keys: Vec<u64>,
    yields: u64,
    panic: bool,
}

fn by_keys(job: &Job) -> Mode<u64> {
    Mode::sync_all(job.keys.iter().copied())
}

/// What the handlers and callers record.
#[derive(Default)]
struct Journal {
    calls: CallClock,
    state: Mutex<JournalState>,
}

#[derive(Default)]
struct JournalState {
    /// Per key, the requests whose handler started, in order. A handler's start on all
    /// of its keys is recorded at once, under this lock, when the inner service is
    /// called.
    starts: HashMap<u64, Vec<u64>>,
    running: HashMap<u64, usize>,
    /// Handlers that found more than `permits` of one of their keys running.
    overlaps: Vec<String>,
}

/// A running handler: counted on its keys until it is dropped, completed or not.
struct Running {
    journal: Arc<Journal>,
    keys: Vec<u64>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut state = self.journal.state.lock().unwrap();
        for key in &self.keys {
            *state.running.get_mut(key).unwrap() -= 1;
        }
    }
}

impl Journal {
    fn start(self: &Arc<Self>, job: &Job, permits: usize) -> Running {
        let keys = distinct(job.keys.clone());
        let mut state = self.state.lock().unwrap();
        for &key in &keys {
            state.starts.entry(key).or_default().push(job.id);
            let running = state.running.entry(key).or_default();
            *running += 1;
            if *running > permits {
                let overlap = format!("request {} found {running} running on key {key}", job.id);
                state.overlaps.push(overlap);
            }
        }
        Running {
            journal: self.clone(),
            keys,
        }
    }
}

/// How a caller treats one response future.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Awaited,
    Spawned,
    Dropped,
    TimedOut(Duration),
    Aborted,
}

fn job(rng: &mut Rng, id: u64) -> Job {
    let keys = match rng.below(20) {
        0 => Vec::new(),
        1..=3 => vec![rng.below(KEYS)],
        _ => (0..2 + rng.below(2)).map(|_| rng.below(KEYS)).collect(),
    };
    Job {
        id,
        keys,
        yields: rng.below(3),
        panic: rng.chance(2),
    }
}

fn fate(rng: &mut Rng) -> Fate {
    match rng.below(100) {
        0..50 => Fate::Awaited,
        50..65 => Fate::Spawned,
        65..75 => Fate::Dropped,
        75..90 => Fate::TimedOut(Duration::from_micros(rng.below(300))),
        _ => Fate::Aborted,
    }
}

async fn run(seed: u64, permits: usize) {
    support::quiet_handler_panics();
    let journal = Arc::new(Journal::default());
    let layer = SyncEngineLayer::new(by_keys).permits_per_key(permits);
    let inner = {
        let journal = journal.clone();
        tower::service_fn(move |job: Job| {
            let running = journal.start(&job, permits);
            async move {
                let _running = running;
                work(job.yields).await;
                if job.panic {
                    panic!("handler for message {} panicked", job.id);
                }
                Ok::<_, BoxError>(job.id)
            }
        })
    };
    let service = layer.layer(inner);

    race(seed, CALLERS, |caller, mut rng| {
        let mut service = service.clone();
        let journal = journal.clone();
        async move {
            let mut later = Vec::new();
            for seq in 0..PER_CALLER {
                let job = job(&mut rng, caller * 1_000_000 + seq);
                let future = journal.calls.call(&mut service, job.id, job.clone());
                match fate(&mut rng) {
                    Fate::Awaited => {
                        // Awaited in this task, so its panic is caught here.
                        let outcome =
                            futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(future))
                                .await;
                        match outcome {
                            Ok(answer) => assert_eq!(answer.unwrap(), job.id),
                            Err(_) => assert!(job.panic, "{job:?} panicked"),
                        }
                    }
                    Fate::Spawned => later.push((job, tokio::spawn(future))),
                    Fate::Dropped => drop(future),
                    Fate::TimedOut(limit) => {
                        let timed = tokio::time::timeout(limit, future);
                        let outcome =
                            futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(timed))
                                .await;
                        if let Ok(Ok(answer)) = outcome {
                            assert_eq!(answer.unwrap(), job.id);
                        }
                    }
                    Fate::Aborted => {
                        let task = tokio::spawn(future);
                        tokio::task::yield_now().await;
                        task.abort();
                    }
                }
            }
            for (job, task) in later {
                match task.await {
                    Ok(answer) => assert_eq!(answer.unwrap(), job.id),
                    Err(error) => assert!(error.is_panic() && job.panic, "{job:?}: {error}"),
                }
            }
        }
    })
    .await;
    until_idle(|| layer.stats()).await;

    let state = journal.state.lock().unwrap();
    assert!(state.overlaps.is_empty(), "{:?}", &state.overlaps[..1]);
    assert_one_global_order(&state.starts, &journal.calls.calls());
    let started: usize = state.starts.values().map(Vec::len).sum();
    assert!(
        started as u64 > CALLERS * PER_CALLER / 2,
        "only {started} starts"
    );
}

#[test]
fn overlapping_sets_from_many_tasks_keep_one_order_and_finish() {
    for (seed, permits) in [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)] {
        on_threads(4, HANG, seed, permits, move || run(seed, permits));
    }
}

/// The check itself: a key that ran a request ahead of one called before it, or two keys
/// that ran two requests in opposite orders, has no global order.
#[test]
fn the_global_order_check_finds_a_cycle() {
    let calls = |list: &[(u64, u64, u64)]| {
        list.iter()
            .map(|&(id, began, returned)| (id, CallTimes { began, returned }))
            .collect::<HashMap<_, _>>()
    };
    let opposite = (
        HashMap::from([(1, vec![10, 20]), (2, vec![20, 10])]),
        calls(&[(10, 0, 1), (20, 0, 1)]),
    );
    let late = (
        // 10's call returned before 20's began, yet 20 ran first on key 1.
        HashMap::from([(1, vec![20, 10]), (2, vec![10])]),
        calls(&[(10, 0, 1), (20, 2, 3)]),
    );
    for (starts, calls) in [opposite, late] {
        let result = std::panic::catch_unwind(|| assert_one_global_order(&starts, &calls));
        assert!(result.is_err(), "{starts:?}");
    }
    let fine = (
        HashMap::from([(1, vec![10, 20]), (2, vec![10, 30, 20])]),
        calls(&[(10, 0, 1), (20, 2, 5), (30, 3, 4)]),
    );
    assert_one_global_order(&fine.0, &fine.1);
}
