//! Floods, measured: what a flood does to everyone else.
//!
//! ```sh
//! cargo run --release --example flood
//! ```
//!
//! 100 normal keys each send 500 requests one after another; every handler works for
//! 1 ms. Meanwhile a flood of 1,000,000 requests arrives at a million per second, either
//! on one key (against `max_queue_per_key(1000)`) or on distinct keys (against
//! `max_keys(200)`).
//!
//! Producing the flood takes CPU of its own (about a fifth of a core here), which on a
//! small machine slows everything a little. To see what the *layer* does to the other
//! keys, each flood is sent twice:
//! once into a separate layer (an ordering domain of its own: the same CPU load, no
//! shared registry), and once into the normal keys' layer. The first is the baseline for
//! the second.
//!
//! `max_keys` is one bound for all keys: at the cap, a normal key that went idle between
//! two requests competes with the flood for a place and is sometimes rejected too. The
//! program reports how often. `max_queue_per_key` is per key and never rejects them.
//!
//! For each run it prints the normal keys' p50 and p99 latency, against no flood and
//! against the same flood into a separate layer, how many flood requests got
//! `Overloaded` and for which limit, the registry's peak size, and resident memory. It
//! fails if a flood raises the normal keys' p99 above 1.5x that of the run without a
//! flood, or if a bound does not hold. Timings come from the wall clock, which is why
//! this is a program and not a test.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tower::{BoxError, Layer, Service, service_fn};
use tower_sync_engine::error::{Limit, Overloaded};
use tower_sync_engine::{Mode, SyncEngineLayer};

const NORMAL_KEYS: u64 = 100;
const PER_KEY: usize = 500;
const FLOOD: u64 = 1_000_000;
/// Flood requests sent per millisecond: a million per second, for about as long as the
/// normal traffic runs.
const FLOOD_PER_MS: u64 = 1_000;
const MAX_QUEUE: usize = 1_000;
const MAX_KEYS: usize = 200;
/// Flood keys start here, far from the normal ones.
const FLOOD_KEYS: u64 = 1 << 32;

#[derive(Clone, Copy, PartialEq)]
enum Flood {
    None,
    OneKey,
    DistinctKeys,
}

struct Report {
    p50: Duration,
    p99: Duration,
    normal_rejected: usize,
    flood_rejected: usize,
    flood_limit: Option<Limit>,
    peak_queued: usize,
    peak_keys: usize,
    rss_kib: u64,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

async fn run(flood: Flood, same_layer: bool) -> Result<Report, BoxError> {
    let handler = service_fn(|(_, work): (u64, Duration)| async move {
        tokio::time::sleep(work).await;
        Ok::<_, BoxError>(())
    });
    let new_layer = || {
        SyncEngineLayer::new(|(key, _): &(u64, Duration)| Mode::Sync(*key))
            .max_queue_per_key(MAX_QUEUE)
            .max_keys(MAX_KEYS)
    };
    let layer = new_layer();
    let service = layer.layer(handler);
    let flood_layer = if same_layer {
        layer.clone()
    } else {
        new_layer()
    };

    let normal_rejected = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..NORMAL_KEYS)
        .map(|key| {
            let mut service = service.clone();
            let rejected = normal_rejected.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(PER_KEY);
                for _ in 0..PER_KEY {
                    let started = Instant::now();
                    match service.call((key, Duration::from_millis(1))).await {
                        Ok(()) => latencies.push(started.elapsed()),
                        Err(_) => {
                            rejected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            })
        })
        .collect();

    let flooder = {
        let mut service = flood_layer.layer(handler);
        let layer = flood_layer.clone();
        tokio::spawn(async move {
            let mut rejected = 0;
            let mut limit = None;
            let (mut peak_queued, mut peak_keys) = (0, 0);
            if flood == Flood::None {
                return (rejected, limit, peak_queued, peak_keys);
            }
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            for n in 0..FLOOD {
                if n % FLOOD_PER_MS == 0 {
                    tick.tick().await;
                }
                let key = match flood {
                    Flood::OneKey => FLOOD_KEYS,
                    _ => FLOOD_KEYS + n,
                };
                let mut response = Box::pin(service.call((key, Duration::from_millis(1))));
                // A rejection is ready at once; anything else is left to run.
                match response.as_mut().now_or_never() {
                    Some(Err(error)) => {
                        rejected += 1;
                        limit = error.downcast_ref::<Overloaded>().map(Overloaded::limit);
                    }
                    Some(Ok(())) => {}
                    None => drop(tokio::spawn(response)),
                }
                if n % 256 == 0 {
                    let stats = layer.stats();
                    peak_queued = peak_queued.max(stats.queued);
                    peak_keys = peak_keys.max(stats.keys);
                }
            }
            (rejected, limit, peak_queued, peak_keys)
        })
    };

    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await?);
    }
    let (flood_rejected, flood_limit, peak_queued, peak_keys) = flooder.await?;
    let rss = rss_kib();
    // Let the accepted flood requests drain before the next run.
    while !layer.stats().is_idle() || !flood_layer.stats().is_idle() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Ok(Report {
        p50: at(0.50),
        p99: at(0.99),
        normal_rejected: normal_rejected.load(Ordering::Relaxed),
        flood_rejected,
        flood_limit,
        peak_queued,
        peak_keys,
        rss_kib: rss,
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    println!(
        "{NORMAL_KEYS} normal keys x {PER_KEY} requests (1 ms each); floods of {FLOOD} requests"
    );
    println!(
        "| run | normal p50 | normal p99 | p99 vs no flood | p99 vs the same flood into a separate layer | normal rejected | flood rejected | peak queued | peak keys | resident |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut failures = Vec::new();
    let mut baseline = Duration::ZERO;
    let mut no_flood = Duration::ZERO;
    for (label, flood, same_layer) in [
        ("no flood", Flood::None, false),
        ("one-key flood, separate layer", Flood::OneKey, false),
        ("one-key flood, same layer", Flood::OneKey, true),
        (
            "distinct-key flood, separate layer",
            Flood::DistinctKeys,
            false,
        ),
        ("distinct-key flood, same layer", Flood::DistinctKeys, true),
    ] {
        let report = run(flood, same_layer).await?;
        if !same_layer {
            baseline = report.p99;
        }
        if flood == Flood::None {
            no_flood = report.p99;
        }
        let ratio = report.p99.as_secs_f64() / baseline.as_secs_f64();
        let vs_none = report.p99.as_secs_f64() / no_flood.as_secs_f64();
        let limit = report
            .flood_limit
            .map_or("-".to_owned(), |limit| limit.to_string());
        println!(
            "| {label} | {:.2} ms | {:.2} ms | {vs_none:.2}x | {ratio:.2}x | {} | {} ({limit}) | {} | {} | {} KiB |",
            report.p50.as_secs_f64() * 1e3,
            report.p99.as_secs_f64() * 1e3,
            report.normal_rejected,
            report.flood_rejected,
            report.peak_queued,
            report.peak_keys,
            report.rss_kib,
        );
        if vs_none > 1.5 {
            failures.push(format!(
                "{label}: normal p99 is {vs_none:.2}x that without a flood"
            ));
        }
        if report.peak_queued > MAX_QUEUE + NORMAL_KEYS as usize {
            failures.push(format!("{label}: {} queued", report.peak_queued));
        }
        if report.peak_keys > MAX_KEYS {
            failures.push(format!("{label}: {} live keys", report.peak_keys));
        }
        if flood == Flood::OneKey && report.normal_rejected != 0 {
            // A queue bound is per key: another key's flood must never reject these.
            failures.push(format!(
                "{label}: {} normal requests rejected",
                report.normal_rejected
            ));
        }
        if flood != Flood::None && report.flood_rejected == 0 {
            failures.push(format!("{label}: the flood was never rejected"));
        }
    }
    if failures.is_empty() {
        println!("ok: floods were rejected at their bound and the other keys kept their latency");
        Ok(())
    } else {
        Err(failures.join("; ").into())
    }
}
