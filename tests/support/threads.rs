//! Requests racing from many callers on a multi-threaded runtime, and the check that one
//! global order explains what every key ran and the order of the `call()`s.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tower::Service;
use tower_sync_engine::Stats;

use crate::support::Rng;

/// When a request's `call()` began and returned, on one clock shared by all callers.
#[derive(Debug, Clone, Copy)]
pub struct CallTimes {
    pub began: u64,
    pub returned: u64,
}

/// The clock the callers share, and when each request's `call()` began and returned on
/// it.
#[derive(Default)]
pub struct CallClock {
    clock: AtomicU64,
    calls: Mutex<HashMap<u64, CallTimes>>,
}

impl CallClock {
    /// Calls `service` with `request`, noting under `id` when the call began and
    /// returned.
    pub fn call<S: Service<R>, R>(&self, service: &mut S, id: u64, request: R) -> S::Future {
        let began = self.tick();
        let future = service.call(request);
        let returned = self.tick();
        let times = CallTimes { began, returned };
        self.calls.lock().unwrap().insert(id, times);
        future
    }

    /// Every request's call times so far, by id.
    pub fn calls(&self) -> HashMap<u64, CallTimes> {
        self.calls.lock().unwrap().clone()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }
}

/// Spawns `callers` tasks and waits for them all. Caller `c` is given its number and an
/// `Rng` seeded from `seed` and `c`, so that a run repeats its requests.
pub async fn race<F, Fut>(seed: u64, callers: u64, caller: F)
where
    F: Fn(u64, Rng) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = (0..callers)
        .map(|c| tokio::spawn(caller(c, Rng::new(seed * 1_000 + c))))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Waits until `stats` says the layer is idle: aborted tasks are dropped by the runtime
/// on its own time.
pub async fn until_idle(stats: impl Fn() -> Stats) {
    while !stats().is_idle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A handler's work: `yields` turns given back to the runtime, so that handlers and
/// callers on other threads interleave with it.
pub async fn work(yields: u64) {
    for _ in 0..yields {
        tokio::task::yield_now().await;
    }
}

/// Runs the future `run` makes on a multi-threaded runtime of `workers` threads, on a
/// thread of its own, so that a hang fails the test instead of hanging it: a request
/// that is never woken, and a worker that never gets a lock, alike. `seed` and `permits`
/// name the run when it is not done within `hang`.
pub fn on_threads<F, Fut>(workers: usize, hang: Duration, seed: u64, permits: usize, run: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (done, finished) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(run());
        let _ = done.send(());
    });
    match finished.recv_timeout(hang) {
        Ok(()) => runner.join().unwrap(),
        // The run failed: its panic is the one to report.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(runner.join().unwrap_err())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("seed {seed}, {permits} permits: not done within {hang:?}")
        }
    }
}

/// Checks that one global order of the requests explains both what every key ran (per
/// key, the requests in the order their handlers started there) and the order of the
/// `call()`s.
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
pub fn assert_one_global_order(starts: &HashMap<u64, Vec<u64>>, calls: &HashMap<u64, CallTimes>) {
    let requests: Vec<u64> = {
        let mut started: Vec<u64> = starts.values().flatten().copied().collect();
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
    for (key, started) in starts {
        for pair in started.windows(2) {
            edges[index[&pair[0]]].push(index[&pair[1]]);
        }
        let mut by_return = started.clone();
        by_return.sort_unstable_by_key(|id| calls[id].returned);
        let gates: Vec<usize> = by_return.iter().map(|_| node(&mut edges)).collect();
        for (i, id) in by_return.iter().enumerate() {
            edges[index[id]].push(gates[i]);
            if i > 0 {
                edges[gates[i - 1]].push(gates[i]);
            }
        }
        for id in started {
            let began = calls[id].began;
            let before = by_return.partition_point(|other| calls[other].returned < began);
            if before > 0 {
                edges[gates[before - 1]].push(index[id]);
            }
        }
        assert!(!started.is_empty(), "key {key} has an empty log");
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
