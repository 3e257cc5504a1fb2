//! How long quiet keys wait while hot keys flood a domain whose capacity is shared: the
//! layer's own cap, `max_in_flight(N)`, against tower's `ConcurrencyLimit` of `N` stacked
//! inside the layer (layer -> `ConcurrencyLimitLayer(N)` -> handler), the way a global
//! limit is set today. Both setups run in one process, on the same requests.
//!
//! ```sh
//! cargo bench --bench fair_share
//! ```
//!
//! `N` is 8 and every handler takes 10 ms. At 0 ms the flood has a backlog of 2,400
//! requests, called in turn over its hot keys, and `permits_per_key` lets each hot key
//! run at least `N` at once, so any one of them can take the whole capacity. Two floods:
//! one hot key with `permits_per_key(32)`, and 32 hot keys with `permits_per_key(8)`.
//! Then, for 2 s, quiet keys send one request each now and then: one request every 1 to
//! 19 ms (10 ms on average, the same moments in every run), on 50 keys in turn, so a
//! quiet key sends about twice a second. A quiet request's wait runs from its `call()`
//! to the moment its handler starts.
//!
//! Inside the layer, a request asks the `ConcurrencyLimit` for a permit once its key
//! lets it start, and a key's requests start in call order, so each busy key has at most
//! one request waiting for a permit; the limit serves them first come, first served. So
//! a quiet request waits behind one request of every flooding key that got there first.
//! `max_in_flight` gives a freed slot to the waiting request whose key holds the fewest
//! slots, then to the key granted one least recently: a quiet key's.
//!
//! Everything runs on tokio's paused clock (a current-thread runtime with
//! `start_paused`): the runtime jumps to the next timer whenever every task is idle, so
//! the times are simulated milliseconds of service time, exact and the same on every
//! run and machine. The program checks, in every setup, that no more than `N` handlers
//! ever ran at once, and fails otherwise. It prints a markdown table and writes a plot of
//! each quiet request's wait against the moment it was sent, one panel per flood, to
//! `benches/fair_share.svg`. The results are in `BENCHMARKS.md`.

use std::convert::Infallible;
use std::hash::{BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plotters::prelude::*;
use tokio::time::{Instant, sleep, sleep_until};
use tower::limit::ConcurrencyLimitLayer;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_sync_engine::{Mode, SyncEngineLayer};

/// The shared capacity: handlers of the whole domain that may run at once.
const SLOTS: usize = 8;
/// Every handler's service time.
const SERVICE: Duration = Duration::from_millis(10);
/// The flood's backlog at 0 ms, over all its keys: more than the capacity serves while
/// the quiet keys send.
const HOT_BACKLOG: u64 = 2_400;
/// Hot keys are `HOT_BASE..HOT_BASE + hot_keys`, called in turn.
const HOT_BASE: u64 = 1_000;
/// Quiet keys are `1..=QUIET_KEYS`, taking turns.
const QUIET_KEYS: u64 = 50;
/// Quiet requests are sent in `[0, WINDOW)`.
const WINDOW: Duration = Duration::from_secs(2);

/// Who floods, and how much of the capacity each of its keys may take.
#[derive(Clone, Copy)]
struct Scenario {
    hot_keys: u64,
    permits: usize,
}

impl Scenario {
    fn name(self) -> String {
        match self.hot_keys {
            1 => format!("1 hot key, `permits_per_key({})`", self.permits),
            keys => format!("{keys} hot keys, `permits_per_key({})`", self.permits),
        }
    }
}

/// One key that may take four times the capacity, and many keys that may each take all
/// of it.
const SCENARIOS: [Scenario; 2] = [
    Scenario {
        hot_keys: 1,
        permits: 4 * SLOTS,
    },
    Scenario {
        hot_keys: 32,
        permits: SLOTS,
    },
];

const PLOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fair_share.svg");

/// A request: only its key matters.
#[derive(Clone, Copy)]
struct Job {
    key: u64,
}

fn policy(job: &Job) -> Mode<u64> {
    Mode::Sync(job.key)
}

/// The handlers running now, and the most that ever ran at once.
#[derive(Default)]
struct Running {
    now: AtomicUsize,
    peak: AtomicUsize,
}

/// The handler of every setup: notes that it runs, answers with the moment it started
/// after `SERVICE`.
fn handler(
    running: Arc<Running>,
) -> impl Service<Job, Response = Instant, Error = Infallible, Future: Send> + Clone + Send + 'static
{
    tower::service_fn(move |_: Job| {
        let running = Arc::clone(&running);
        async move {
            let started = Instant::now();
            let now = running.now.fetch_add(1, Ordering::Relaxed) + 1;
            running.peak.fetch_max(now, Ordering::Relaxed);
            sleep(SERVICE).await;
            running.now.fetch_sub(1, Ordering::Relaxed);
            Ok(started)
        }
    })
}

/// The same hasher on every run, so that nothing in a run depends on a random seed.
type Fixed = BuildHasherDefault<DefaultHasher>;

/// What one setup did with the scenario's requests.
struct Outcome {
    /// Each quiet request: sent at, and waited, both in simulated milliseconds.
    quiet: Vec<(f64, f64)>,
    /// When each hot request completed, in simulated milliseconds.
    hot_done: Vec<f64>,
    /// The most handlers that ran at once.
    peak: usize,
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// A xorshift, so that the quiet keys send at the same moments in every setup and run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Sends `scenario`'s requests into `service` on a paused clock and waits for all of
/// them.
fn run<S>(scenario: Scenario, service: S, running: Arc<Running>) -> Outcome
where
    S: Service<Job, Response = Instant, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut service = service;
        let origin = Instant::now();
        let quiet = Arc::new(Mutex::new(Vec::new()));
        let hot_done = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();

        for n in 0..HOT_BACKLOG {
            let key = HOT_BASE + n % scenario.hot_keys;
            let response = service.ready().await.unwrap().call(Job { key });
            let hot_done = Arc::clone(&hot_done);
            tasks.push(tokio::spawn(async move {
                response.await.expect("the hot request completes");
                hot_done.lock().unwrap().push(millis(origin.elapsed()));
            }));
        }

        let mut random = XorShift(0x2545_f491_4f6c_dd1d);
        let mut at = Duration::ZERO;
        let mut key = 0;
        loop {
            at += Duration::from_millis(1 + random.next() % 19);
            if at >= WINDOW {
                break;
            }
            sleep_until(origin + at).await;
            key = key % QUIET_KEYS + 1;
            let sent = Instant::now();
            let response = service.ready().await.unwrap().call(Job { key });
            let quiet = Arc::clone(&quiet);
            tasks.push(tokio::spawn(async move {
                let started = response.await.expect("the quiet request completes");
                let entry = (millis(sent - origin), millis(started - sent));
                quiet.lock().unwrap().push(entry);
            }));
        }

        for task in tasks {
            task.await.unwrap();
        }
        let mut quiet = std::mem::take(&mut *quiet.lock().unwrap());
        quiet.sort_by(|a, b| a.0.total_cmp(&b.0));
        let hot_done = std::mem::take(&mut *hot_done.lock().unwrap());
        Outcome {
            quiet,
            hot_done,
            peak: running.peak.load(Ordering::Relaxed),
        }
    })
}

/// The two setups compared.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    /// `SyncEngineLayer::new(policy).permits_per_key(permits).max_in_flight(SLOTS)`.
    MaxInFlight,
    /// The same layer without `max_in_flight`, with `ConcurrencyLimit(SLOTS)` inside it.
    ConcurrencyLimit,
}

impl Setup {
    fn name(self) -> String {
        match self {
            Setup::MaxInFlight => format!("`max_in_flight({SLOTS})`"),
            Setup::ConcurrencyLimit => format!("`ConcurrencyLimit({SLOTS})` inside"),
        }
    }

    fn run(self, scenario: Scenario) -> Outcome {
        let running = Arc::new(Running::default());
        let layer = SyncEngineLayer::new(policy)
            .with_hasher(Fixed::default())
            .permits_per_key(scenario.permits);
        let handler = handler(Arc::clone(&running));
        match self {
            Setup::MaxInFlight => {
                let service = layer.max_in_flight(SLOTS).layer(handler);
                run(scenario, service, running)
            }
            Setup::ConcurrencyLimit => {
                let service = layer.layer(ConcurrencyLimitLayer::new(SLOTS).layer(handler));
                run(scenario, service, running)
            }
        }
    }
}

/// The nearest-rank percentile of sorted `values`.
fn percentile(sorted: &[f64], percent: usize) -> f64 {
    let rank = (sorted.len() * percent).div_ceil(100).max(1);
    sorted[rank - 1]
}

struct Row {
    scenario: Scenario,
    setup: Setup,
    outcome: Outcome,
}

impl Row {
    fn print(&self) {
        let mut waits: Vec<f64> = self.outcome.quiet.iter().map(|&(_, wait)| wait).collect();
        waits.sort_by(f64::total_cmp);
        let window = millis(WINDOW);
        let hot_in_window = self
            .outcome
            .hot_done
            .iter()
            .filter(|&&done| done <= window)
            .count();
        let drained = self.outcome.hot_done.iter().copied().fold(0.0, f64::max);
        println!(
            "| {} | {} | {} | {} ms | {} ms | {} ms | {:.0} | {} ms | {} |",
            self.scenario.name(),
            self.setup.name(),
            waits.len(),
            percentile(&waits, 50),
            percentile(&waits, 99),
            waits.last().unwrap(),
            hot_in_window as f64 / WINDOW.as_secs_f64(),
            drained,
            self.outcome.peak,
        );
    }
}

fn main() {
    let mut rows = Vec::new();
    for scenario in SCENARIOS {
        for setup in [Setup::MaxInFlight, Setup::ConcurrencyLimit] {
            let outcome = setup.run(scenario);
            rows.push(Row {
                scenario,
                setup,
                outcome,
            });
        }
    }

    println!(
        "Quiet keys' wait, from call() to the start of their handler, while hot keys flood: \
         {SLOTS} slots shared, {} ms per handler, a backlog of {HOT_BACKLOG} requests over the \
         hot keys, and one quiet request every 10 ms on average for {} s, over {QUIET_KEYS} keys.",
        SERVICE.as_millis(),
        WINDOW.as_secs(),
    );
    println!(
        "Times are simulated milliseconds of service time (tokio's paused clock): exact, and the \
         same on every run."
    );
    println!();
    println!(
        "| flood | setup | quiet requests | quiet wait p50 | p99 | max \
         | hot keys' requests/s while quiet keys send | hot backlog done at | most handlers at once |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        row.print();
    }

    for row in &rows {
        assert!(
            row.outcome.peak <= SLOTS,
            "{}, {}: {} handlers ran at once, over the {SLOTS} slots",
            row.scenario.name(),
            row.setup.name(),
            row.outcome.peak,
        );
    }

    let panels: Vec<_> = SCENARIOS
        .iter()
        .map(|&scenario| {
            let quiet = |setup| {
                let row = rows
                    .iter()
                    .find(|row| row.scenario.hot_keys == scenario.hot_keys && row.setup == setup)
                    .unwrap();
                row.outcome.quiet.as_slice()
            };
            (
                scenario,
                quiet(Setup::MaxInFlight),
                quiet(Setup::ConcurrencyLimit),
            )
        })
        .collect();
    plot(&panels).expect("the plot is written");
    println!();
    println!("Plot: {PLOT}");
}

type Points<'a> = &'a [(f64, f64)];

/// Each quiet request's wait against the moment it was sent, one panel per scenario with
/// both setups in it, to [`PLOT`].
fn plot(panels: &[(Scenario, Points<'_>, Points<'_>)]) -> Result<(), Box<dyn std::error::Error>> {
    let layer = RGBColor(0x2b, 0x6c, 0xb0);
    let alternative = RGBColor(0xdd, 0x8a, 0x2b);

    let root = SVGBackend::new(PLOT, (860, 400 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((panels.len(), 1));
    for (area, &(scenario, capped, limited)) in areas.iter().zip(panels) {
        let highest = capped
            .iter()
            .chain(limited)
            .map(|&(_, wait)| wait)
            .fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "Quiet keys' wait: {}, {SLOTS} slots, {} ms handlers",
                    scenario.name().replace('`', ""),
                    SERVICE.as_millis()
                ),
                ("sans-serif", 16),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..millis(WINDOW), 0.0..(highest * 1.4).max(1.0))?;
        chart
            .configure_mesh()
            .max_light_lines(0)
            .x_label_formatter(&|ms| format!("{ms:.0}"))
            .y_label_formatter(&|ms| format!("{ms:.0}"))
            .x_desc("quiet request sent at (simulated ms)")
            .y_desc("wait until its handler starts (simulated ms)")
            .draw()?;

        // Rings and dots, so that both setups show where their waits are the same.
        chart
            .draw_series(
                limited
                    .iter()
                    .map(|&point| Circle::new(point, 4, alternative.stroke_width(1))),
            )?
            .label(format!("ConcurrencyLimit({SLOTS}) inside the layer"))
            .legend(move |point| Circle::new(point, 4, alternative.stroke_width(1)));
        chart
            .draw_series(
                capped
                    .iter()
                    .map(|&point| Circle::new(point, 2, layer.filled())),
            )?
            .label(format!("max_in_flight({SLOTS})"))
            .legend(move |point| Circle::new(point, 2, layer.filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(0x99, 0x99, 0x99))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
