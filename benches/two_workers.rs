//! How much more work two cores do than one on a single shared layer.
//!
//! ```sh
//! cargo bench --bench two_workers
//! ```
//!
//! One layer, `SyncEngine` over the benchmarks' echo service, each request polled to
//! completion by hand with a no-op waker: the cost is the layer's and the memory traffic
//! between the cores, with no executor in between. Each worker is a thread pinned to a
//! core of its own and draws random `u64` keys from a xorshift of its own.
//!
//! A *pair* is one worker alone (on the first core), then two at once (one per core),
//! each doing the same number of requests. Rates are taken from each thread's own CPU
//! time (`CLOCK_THREAD_CPUTIME_ID`), so time the thread spent descheduled, for other
//! programs on the machine, does not count. The ratio of a pair is the two workers'
//! combined rate over the lone worker's; the program prints the median of 40 alternating
//! pairs, with the quartiles. 2.0× means the cores never got in each other's way. A pair
//! in which a thread was off its core for more than 3% of its run (the machine ran
//! something else there, and the other thread meanwhile ran alone) is run again, and the
//! count of those is printed.
//!
//! Rows:
//!
//! - `random keys`: the default hasher (SipHash-1-3);
//! - `random keys, foldhash`: the seeded fast hasher users can opt into;
//! - `disjoint shards`: each worker's keys land in shards the other never uses, so the
//!   two share only the layer's read-only state (what the shard layout alone allows);
//! - `two private layers`: a layer per worker, nothing shared (the machine's ceiling).
//!
//! Needs Linux and at least two cores; BENCHMARKS.md ("Two workers, one layer") has the
//! figures and what the cores still share.

#[cfg(target_os = "linux")]
mod common;

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("two_workers pins threads and reads their CPU time: Linux only");
}

#[cfg(target_os = "linux")]
mod linux {
    use std::hash::BuildHasher;
    use std::hint::black_box;
    use std::pin::pin;
    use std::sync::{Arc, Barrier};
    use std::task::{Context, Waker};
    use std::time::{Duration, Instant};

    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::time::{ClockId, clock_gettime};
    use nix::unistd::Pid;
    use tower::{Layer, Service};
    use tower_sync_engine::SyncEngineLayer;

    use super::common::{self, echo, poll_dyn};

    const REQUESTS: u64 = 1_000_000;
    const PAIRS: usize = 40;
    const DISJOINT_KEYS: usize = 1 << 12;
    /// A pair counts only if each of its threads was on its core this share of its run.
    const MIN_ON_CORE: f64 = 0.97;
    /// Pairs run again before a row gives up on a busy machine.
    const MAX_DISCARDED: usize = 400;

    pub fn main() {
        let cores = allowed_cores();
        let [first, second] = match cores[..] {
            [first, second, ..] => [first, second],
            _ => {
                eprintln!("two_workers needs two cores; this process may use {cores:?}");
                return;
            }
        };
        println!("two workers against one, pinned to cores {first} and {second}:");
        println!(
            "{:<24} {:>8} {:>18}   (ns per request: one alone, each of two)",
            "row", "median", "quartiles"
        );
        let layer = SyncEngineLayer::new(common::policy);
        run(
            "random keys",
            [first, second],
            |_| layer.layer(echo()),
            random,
        );
        let fast = SyncEngineLayer::new(common::policy)
            .with_hasher(foldhash::fast::RandomState::default());
        run(
            "random keys, foldhash",
            [first, second],
            |_| fast.layer(echo()),
            random,
        );
        let hasher = std::hash::RandomState::new();
        let split = SyncEngineLayer::new(common::policy).with_hasher(hasher.clone());
        let halves = [disjoint_keys(&hasher, 0), disjoint_keys(&hasher, 1)];
        run(
            "disjoint shards",
            [first, second],
            |_| split.layer(echo()),
            |worker, state| {
                let index = random(worker, state) as usize % DISJOINT_KEYS;
                halves[worker][index]
            },
        );
        run(
            "two private layers",
            [first, second],
            |_| SyncEngineLayer::new(common::policy).layer(echo()),
            random,
        );
    }

    /// The cores this process may run on.
    fn allowed_cores() -> Vec<usize> {
        let set = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
        (0..CpuSet::count())
            .filter(|&core| set.is_set(core).unwrap_or(false))
            .collect()
    }

    fn pin_to(core: usize) {
        let mut set = CpuSet::new();
        set.set(core).expect("a valid core");
        sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
    }

    fn thread_cpu_time() -> Duration {
        let now = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("thread CPU clock");
        Duration::new(now.tv_sec() as u64, now.tv_nsec() as u32)
    }

    /// The next key from a worker's generator.
    fn random(_worker: usize, state: &mut u64) -> u64 {
        let mut x = *state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *state = x;
        x >> 1 // the top bit would make the request `Mode::Concurrent`
    }

    /// Keys whose hashes put them in a shard of worker `worker`'s half: the layer picks a
    /// shard from bits 32 and up of the stirred hash, and the lowest of those bits splits
    /// the shards in two halves. Drawn before the runs, so that finding them is not timed.
    fn disjoint_keys<H: BuildHasher>(hasher: &H, worker: usize) -> Vec<u64> {
        let mut state = worker as u64 * 0x9E37_79B9 + 1;
        let mut keys = Vec::with_capacity(DISJOINT_KEYS);
        while keys.len() < DISJOINT_KEYS {
            let key = random(worker, &mut state);
            let hash = hasher.hash_one(key);
            let stirred = (hash ^ (hash >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            if (stirred >> 32) as usize & 1 == worker {
                keys.push(key);
            }
        }
        keys
    }

    /// One thread's run: CPU time per request, and the share of the run's wall time that
    /// the thread was on its core.
    #[derive(Clone, Copy)]
    struct Run {
        ns: f64,
        on_core: f64,
    }

    /// Runs `REQUESTS` requests on `service`.
    fn work<S, F>(mut service: S, worker: usize, seed: u64, key: F) -> Run
    where
        S: Service<u64, Response = u64, Error: std::fmt::Debug>,
        F: Fn(usize, &mut u64) -> u64,
    {
        let mut cx = Context::from_waker(Waker::noop());
        let mut state = seed | 1;
        let wall = Instant::now();
        let started = thread_cpu_time();
        for _ in 0..REQUESTS {
            let request = key(worker, &mut state);
            black_box(poll_dyn(pin!(service.call(black_box(request))), &mut cx).unwrap());
        }
        let cpu = thread_cpu_time() - started;
        Run {
            ns: cpu.as_nanos() as f64 / REQUESTS as f64,
            on_core: cpu.as_secs_f64() / wall.elapsed().as_secs_f64(),
        }
    }

    fn run<S, M, F>(row: &str, cores: [usize; 2], make: M, key: F)
    where
        S: Service<u64, Response = u64, Error: std::fmt::Debug> + Send,
        M: Fn(usize) -> S + Sync,
        F: Fn(usize, &mut u64) -> u64 + Copy + Send + Sync,
    {
        let mut ratios = Vec::with_capacity(PAIRS);
        let mut alone = Vec::with_capacity(PAIRS);
        let mut together = Vec::with_capacity(PAIRS);
        let mut discarded = 0;
        std::thread::scope(|scope| {
            // Warm-up: fault in the shards and the allocator's caches on both cores.
            for pair in 0..3u64 {
                pair_once(scope, cores, &make, key, pair);
            }
            let mut pair = 100;
            while ratios.len() < PAIRS && discarded < MAX_DISCARDED {
                pair += 1;
                let (one, two) = pair_once(scope, cores, &make, key, pair);
                // A thread that was off its core for part of its run (the machine ran
                // something else there) leaves the other alone for that time, which
                // flatters the pair: run it again.
                if [one, two[0], two[1]]
                    .iter()
                    .any(|run| run.on_core < MIN_ON_CORE)
                {
                    discarded += 1;
                    continue;
                }
                let rate_one = 1.0 / one.ns;
                let rate_two = 1.0 / two[0].ns + 1.0 / two[1].ns;
                ratios.push(rate_two / rate_one);
                alone.push(one.ns);
                together.extend([two[0].ns, two[1].ns]);
            }
        });
        if ratios.is_empty() {
            println!("{row:<24} no pair ran undisturbed: the machine is busy");
            return;
        }
        let median = |values: &mut Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let (ratio, one, two) = (
            median(&mut ratios),
            median(&mut alone),
            median(&mut together),
        );
        let quartiles = format!(
            "{:.2}–{:.2}",
            ratios[ratios.len() / 4],
            ratios[ratios.len() * 3 / 4]
        );
        println!(
            "{row:<24} {ratio:>7.2}× {quartiles:>18}   ({one:.1} ns, {two:.1} ns; {} pairs, {discarded} run again)",
            ratios.len()
        );
    }

    /// One worker alone, then two at once; CPU time per request of each.
    fn pair_once<'scope, 'env, S, M, F>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        cores: [usize; 2],
        make: &'env M,
        key: F,
        pair: u64,
    ) -> (Run, [Run; 2])
    where
        S: Service<u64, Response = u64, Error: std::fmt::Debug> + Send,
        M: Fn(usize) -> S + Sync,
        F: Fn(usize, &mut u64) -> u64 + Copy + Send + Sync + 'scope,
    {
        let seed = pair.wrapping_mul(0x2545_F491_4F6C_DD1D) + 1;
        let lone = scope.spawn(move || {
            pin_to(cores[0]);
            work(make(0), 0, seed, key)
        });
        let one = lone.join().unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let workers = [0, 1].map(|worker| {
            let barrier = barrier.clone();
            scope.spawn(move || {
                pin_to(cores[worker]);
                let service = make(worker);
                barrier.wait();
                work(service, worker, seed ^ (worker as u64 + 7) << 20, key)
            })
        });
        let two = workers.map(|worker| worker.join().unwrap());
        (one, two)
    }
}
