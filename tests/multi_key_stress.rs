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

mod support;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::Rng;
use tower::{BoxError, Layer, Service};
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

fn distinct(keys: &[u64]) -> Vec<u64> {
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// When a request's `call()` began and returned, on one clock shared by all callers.
#[derive(Debug, Clone, Copy)]
struct CallTimes {
    began: u64,
    returned: u64,
}

/// What the handlers and callers record.
#[derive(Default)]
struct Journal {
    clock: AtomicU64,
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
    calls: HashMap<u64, CallTimes>,
    keys: HashMap<u64, Vec<u64>>,
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
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn start(self: &Arc<Self>, job: &Job, permits: usize) -> Running {
        let keys = distinct(&job.keys);
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

    fn called(&self, job: &Job, times: CallTimes) {
        let mut state = self.state.lock().unwrap();
        state.calls.insert(job.id, times);
        state.keys.insert(job.id, distinct(&job.keys));
    }
}

/// Checks that one global order of the requests explains both what every key ran and the
/// order of the `call()`s.
///
/// The relation "a before b on some key" has two sources: a started before b on a key
/// they share (the keys' start logs), and a's `call()` returned before b's began while
/// they share a key (the contract: b must then start after a on that key). The check
/// builds a graph of both and asks for a topological order; a cycle means some key ran a
/// request ahead of one that was called before it, or two keys ran two requests in
/// opposite orders.
///
/// The call edges of a key are not listed pair by pair: the key's requests are sorted by
/// the time their call returned, and a chain of "gates" follows that order (gate i comes
/// after request i and after gate i - 1); a request then follows the last gate whose
/// request returned before its own call began, which puts it after every such request.
fn assert_one_global_order(state: &JournalState) {
    let requests: Vec<u64> = {
        let mut started: Vec<u64> = state.starts.values().flatten().copied().collect();
        started.sort_unstable();
        started.dedup();
        started
    };
    let index: HashMap<u64, usize> = requests
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, i))
        .collect();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); requests.len()];
    let node = |edges: &mut Vec<Vec<usize>>| {
        edges.push(Vec::new());
        edges.len() - 1
    };
    for (key, starts) in &state.starts {
        for pair in starts.windows(2) {
            edges[index[&pair[0]]].push(index[&pair[1]]);
        }
        let mut by_return = starts.clone();
        by_return.sort_unstable_by_key(|id| state.calls[id].returned);
        let gates: Vec<usize> = by_return.iter().map(|_| node(&mut edges)).collect();
        for (i, id) in by_return.iter().enumerate() {
            edges[index[id]].push(gates[i]);
            if i > 0 {
                edges[gates[i - 1]].push(gates[i]);
            }
        }
        for id in starts {
            let began = state.calls[id].began;
            let before = by_return.partition_point(|other| state.calls[other].returned < began);
            if before > 0 {
                edges[gates[before - 1]].push(index[id]);
            }
        }
        assert!(!starts.is_empty(), "key {key} has an empty log");
    }
    // Kahn's algorithm.
    let mut incoming = vec![0usize; edges.len()];
    for targets in &edges {
        for &target in targets {
            incoming[target] += 1;
        }
    }
    let mut ready: VecDeque<usize> = (0..edges.len()).filter(|&n| incoming[n] == 0).collect();
    let mut ordered = 0;
    while let Some(next) = ready.pop_front() {
        ordered += 1;
        for &target in &edges[next] {
            incoming[target] -= 1;
            if incoming[target] == 0 {
                ready.push_back(target);
            }
        }
    }
    if ordered < edges.len() {
        let stuck: Vec<u64> = (0..requests.len())
            .filter(|&n| incoming[n] > 0)
            .map(|n| requests[n])
            .take(20)
            .collect();
        panic!(
            "no global order explains the keys' start logs and the call order; requests on \
             a cycle or after one: {stuck:?}"
        );
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
                for _ in 0..job.yields {
                    tokio::task::yield_now().await;
                }
                if job.panic {
                    panic!("handler for message {} panicked", job.id);
                }
                Ok::<_, BoxError>(job.id)
            }
        })
    };
    let service = layer.layer(inner);

    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let mut service = service.clone();
            let journal = journal.clone();
            tokio::spawn(async move {
                let mut rng = Rng::new(seed * 1_000 + caller);
                let mut later = Vec::new();
                for seq in 0..PER_CALLER {
                    let job = job(&mut rng, caller * 1_000_000 + seq);
                    let began = journal.tick();
                    let future = service.call(job.clone());
                    let returned = journal.tick();
                    journal.called(&job, CallTimes { began, returned });
                    match fate(&mut rng) {
                        Fate::Awaited => {
                            // Awaited in this task, so its panic is caught here.
                            let outcome = futures::FutureExt::catch_unwind(
                                std::panic::AssertUnwindSafe(future),
                            )
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
                            let outcome = futures::FutureExt::catch_unwind(
                                std::panic::AssertUnwindSafe(timed),
                            )
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
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    // Aborted tasks are dropped by the runtime on its own time; wait for the last.
    while !layer.stats().is_idle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let state = journal.state.lock().unwrap();
    assert!(state.overlaps.is_empty(), "{:?}", &state.overlaps[..1]);
    assert_one_global_order(&state);
    let started: usize = state.starts.values().map(Vec::len).sum();
    assert!(
        started as u64 > CALLERS * PER_CALLER / 2,
        "only {started} starts"
    );
}

#[test]
fn overlapping_sets_from_many_tasks_keep_one_order_and_finish() {
    for (seed, permits) in [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)] {
        // On a thread of its own, so that a hang fails the test instead of hanging it:
        // a request that is never woken, and a worker that never gets a lock, alike.
        let (done, finished) = std::sync::mpsc::channel();
        let runner = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(run(seed, permits));
            let _ = done.send(());
        });
        match finished.recv_timeout(HANG) {
            Ok(()) => runner.join().unwrap(),
            // The run failed: its panic is the one to report.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(runner.join().unwrap_err())
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("seed {seed}, {permits} permits: not done within {HANG:?}")
            }
        }
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
    let opposite = JournalState {
        starts: HashMap::from([(1, vec![10, 20]), (2, vec![20, 10])]),
        calls: calls(&[(10, 0, 1), (20, 0, 1)]),
        ..JournalState::default()
    };
    let late = JournalState {
        // 10's call returned before 20's began, yet 20 ran first on key 1.
        starts: HashMap::from([(1, vec![20, 10]), (2, vec![10])]),
        calls: calls(&[(10, 0, 1), (20, 2, 3)]),
        ..JournalState::default()
    };
    for state in [opposite, late] {
        let result = std::panic::catch_unwind(|| assert_one_global_order(&state));
        assert!(result.is_err(), "{:?}", state.starts);
    }
    let fine = JournalState {
        starts: HashMap::from([(1, vec![10, 20]), (2, vec![10, 30, 20])]),
        calls: calls(&[(10, 0, 1), (20, 2, 5), (30, 3, 4)]),
        ..JournalState::default()
    };
    assert_one_global_order(&fine);
}
