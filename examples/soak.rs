//! A soak run with injected faults, on a multi-thread runtime.
//!
//! ```sh
//! cargo run --release --example soak -- --requests 5000000 --keys 10000
//! ```
//!
//! One driver calls the layered service for `--requests` requests over `--keys` keys,
//! in a known order, and spawns every response future (at most `--in-flight` at once).
//! Faults are injected at random: 10% of requests are dropped (half before their first
//! poll, half aborted while queued or running), 5% panic in the handler, and 5% run
//! under a timeout shorter than their work.
//!
//! Every handler checks, as it starts, that it is the only one running for its key and
//! that no later request of its key has started before it. The summary reports those
//! order violations (must be 0), keys left in the registry (must be 0), the request
//! rate, and resident memory. It exits with an error if either count is not 0.
//!
//! Resident memory follows the most requests that were in flight at once (issued and
//! not yet finished or dropped, at most `--in-flight`), not the number handled: the
//! allocator keeps the memory of finished requests and reuses it for new ones. So it is
//! measured when that number peaks, and again as the last request is issued. The two
//! should match to within the allocator's own variation, several percent (the second
//! can be lower, when the allocator has given memory back during a quieter stretch).
//! Memory that grew with the requests handled would show as a second figure well above
//! the first: a leak of one byte per request adds megabytes over a few million requests.
//! How many requests are in flight depends on how the runtime schedules the driver
//! against the handlers, so the peak, and the memory with it, differs from run to run.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::Semaphore;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub requests: u64,
    pub keys: u64,
    pub in_flight: usize,
    pub progress: bool,
}

/// What happened.
#[derive(Debug)]
pub struct Summary {
    /// Requests without an injected fault; each must complete.
    pub fault_free: u64,
    pub completed: u64,
    pub order_violations: u64,
    pub leaked_keys: usize,
    pub elapsed: Duration,
    pub rss_start_kib: Option<u64>,
    /// The most requests in flight at once, within 1% of `in_flight` (see `run`).
    pub peak_in_flight: usize,
    /// How many requests had been issued when that peak was measured.
    pub peak_at_request: u64,
    /// Resident memory at that peak.
    pub rss_peak_kib: Option<u64>,
    /// Requests in flight as the last request is issued, and resident memory then.
    pub end_in_flight: usize,
    pub rss_end_kib: Option<u64>,
    /// Once every request has finished or been dropped.
    pub rss_drained_kib: Option<u64>,
}

/// Per-key bookkeeping that handlers check against.
struct Keys {
    /// Sequence number of the last request that started, per key, plus one.
    last_started: Vec<AtomicU64>,
    running: Vec<AtomicUsize>,
    violations: AtomicU64,
}

struct Request {
    key: u64,
    seq: u64,
    fault: Fault,
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    DropUnpolled,
    Abort,
    Panic,
    Timeout,
}

/// Resident memory of this process, from `/proc/self/statm`.
fn rss_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4)
}

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Runs the soak; see the module docs.
pub async fn run(config: Config) -> Result<Summary, BoxError> {
    let rss_start_kib = rss_kib();
    let keys = Arc::new(Keys {
        last_started: (0..config.keys).map(|_| AtomicU64::new(0)).collect(),
        running: (0..config.keys).map(|_| AtomicUsize::new(0)).collect(),
        violations: AtomicU64::new(0),
    });

    let handler = {
        let keys = keys.clone();
        service_fn(move |request: Request| {
            let keys = keys.clone();
            async move {
                let key = request.key as usize;
                if keys.running[key].fetch_add(1, Ordering::SeqCst) != 0 {
                    keys.violations.fetch_add(1, Ordering::SeqCst);
                }
                // Sequence numbers are given in call order, so each key's must rise.
                let previous = keys.last_started[key].swap(request.seq + 1, Ordering::SeqCst);
                if previous > request.seq {
                    keys.violations.fetch_add(1, Ordering::SeqCst);
                }
                let _running = Running(&keys.running[key]);
                for _ in 0..(request.seq % 3) {
                    tokio::task::yield_now().await;
                }
                match request.fault {
                    Fault::Panic => panic!("injected handler panic"),
                    Fault::Timeout => tokio::time::sleep(Duration::from_millis(5)).await,
                    _ => {}
                }
                Ok::<_, BoxError>(request.seq)
            }
        })
    };
    let layer = SyncEngineLayer::new(|request: &Request| Mode::Sync(request.key));
    let mut service = layer.layer(handler);

    let slots = Arc::new(Semaphore::new(config.in_flight));
    let completed = Arc::new(AtomicU64::new(0));
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let started = Instant::now();
    let report_every = (config.requests / 10).max(1);
    // Reading resident memory costs a system call, so it is read only when the number
    // of requests in flight has risen by 1% of the bound since the last reading.
    let peak_step = (config.in_flight / 100).max(1);
    let (mut peak_in_flight, mut peak_at_request, mut rss_peak_kib) = (0, 0, None);
    let mut fault_free = 0;

    for seq in 0..config.requests {
        let fault = match rng.below(100) {
            0..5 => Fault::DropUnpolled,
            5..10 => Fault::Abort,
            10..15 => Fault::Panic,
            15..20 => Fault::Timeout,
            _ => Fault::None,
        };
        fault_free += u64::from(fault == Fault::None);
        let request = Request {
            key: rng.below(config.keys),
            seq,
            fault,
        };
        let slot = slots.clone().acquire_owned().await?;
        let response = service.ready().await?.call(request);
        let completed = completed.clone();
        match fault {
            Fault::DropUnpolled => drop((response, slot)),
            Fault::Abort => {
                let task = tokio::spawn(response);
                tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    task.abort();
                    let _ = task.await;
                    drop(slot);
                });
            }
            Fault::Timeout => {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_millis(1), response).await;
                    drop(slot);
                });
            }
            Fault::None | Fault::Panic => {
                tokio::spawn(async move {
                    // A panic inside the handler unwinds through the response future,
                    // which is then dropped: the key must pass on regardless.
                    let result = AssertUnwindSafe(response).catch_unwind().await;
                    if matches!(result, Ok(Ok(_))) {
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(slot);
                });
            }
        }
        let in_flight = config.in_flight - slots.available_permits();
        if in_flight >= peak_in_flight + peak_step {
            (peak_in_flight, peak_at_request, rss_peak_kib) = (in_flight, seq + 1, rss_kib());
        }
        if (seq + 1) % report_every == 0 {
            let rss = rss_kib();
            if config.progress {
                let stats = layer.stats();
                println!(
                    "{:>3}% {} requests, {} keys live, {} waiting, {} KiB resident",
                    (seq + 1) * 100 / config.requests,
                    seq + 1,
                    stats.keys,
                    stats.queued,
                    rss.unwrap_or(0)
                );
            }
        }
    }
    let end_in_flight = config.in_flight - slots.available_permits();
    let rss_end_kib = rss_kib();
    // Every slot back means every request has finished or been dropped.
    let _all = slots.acquire_many(config.in_flight as u32).await?;
    let elapsed = started.elapsed();
    drop(service);

    Ok(Summary {
        fault_free,
        completed: completed.load(Ordering::Relaxed),
        order_violations: keys.violations.load(Ordering::SeqCst),
        leaked_keys: layer.stats().keys,
        elapsed,
        rss_start_kib,
        peak_in_flight,
        peak_at_request,
        rss_peak_kib,
        end_in_flight,
        rss_end_kib,
        rss_drained_kib: rss_kib(),
    })
}

/// Marks a handler as no longer running when it ends, however it ends.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn parse_args() -> Result<Config, String> {
    let mut config = Config {
        requests: 5_000_000,
        keys: 10_000,
        in_flight: 10_000,
        progress: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = value
            .parse::<u64>()
            .map_err(|error| format!("{flag} {value}: {error}"))?;
        match flag.as_str() {
            "--requests" => config.requests = number,
            "--keys" if number > 0 => config.keys = number,
            "--in-flight" if number > 0 => config.in_flight = number as usize,
            _ => return Err(format!("unknown or invalid argument {flag} {value}")),
        }
    }
    Ok(config)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    let config = parse_args().unwrap_or_else(|message| {
        eprintln!("{message}\nusage: soak [--requests N] [--keys N] [--in-flight N]");
        std::process::exit(2);
    });
    // The injected panics are expected; keep them out of the output.
    std::panic::set_hook(Box::new(|_| {}));
    println!(
        "soak: {} requests over {} keys; 10% dropped, 5% panicking, 5% timed out",
        config.requests, config.keys
    );
    let summary = run(config).await?;
    let rate = config.requests as f64 / summary.elapsed.as_secs_f64();
    let kib = |value: Option<u64>| value.map_or("n/a".to_owned(), |kib| format!("{kib} KiB"));
    println!(
        "completed normally: {} of {} without a fault",
        summary.completed, summary.fault_free
    );
    println!("order violations:   {}", summary.order_violations);
    println!("leaked keys:        {}", summary.leaked_keys);
    println!("requests/second:    {rate:.0}");
    println!(
        "resident memory:    {} with {} requests in flight, the most at once (at request {})",
        kib(summary.rss_peak_kib),
        summary.peak_in_flight,
        summary.peak_at_request
    );
    let change = match (summary.rss_peak_kib, summary.rss_end_kib) {
        (Some(peak), Some(end)) if peak > 0 => {
            let percent = (end as f64 / peak as f64 - 1.0) * 100.0;
            format!(", {percent:+.1}%")
        }
        _ => String::new(),
    };
    println!(
        "                    {} at the end, with {} in flight{change}",
        kib(summary.rss_end_kib),
        summary.end_in_flight
    );
    println!(
        "                    ({} at start, {} once every request had finished)",
        kib(summary.rss_start_kib),
        kib(summary.rss_drained_kib)
    );
    if summary.order_violations != 0
        || summary.leaked_keys != 0
        || summary.completed != summary.fault_free
    {
        return Err("the soak found order violations, leaked keys or lost requests".into());
    }
    Ok(())
}
