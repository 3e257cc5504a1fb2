//! One cap on the work of a whole axum app, shared fairly between tenants.
//!
//! Requests are keyed by their `x-tenant` header. A tenant may run up to 16 requests at
//! once (`permits_per_key(16)`), and the whole app at most 4 (`max_in_flight(4)`): both
//! routes, `POST /import` and `GET /search`, sit behind one `SyncEngineLayer` value, so
//! they share one domain and one cap.
//!
//! A bulk tenant floods `/import` with 60 requests of 30 to 51 ms. Soon after, a quiet
//! tenant sends three searches of 5 ms, one after another. The bulk tenant holds every
//! slot and has dozens of imports behind them, yet a freed slot goes to the tenant that
//! holds the fewest: each search waits only for the next import to finish, not behind
//! the bulk tenant's backlog.
//!
//! For contrast, the same app runs again with tower's `GlobalConcurrencyLimitLayer` of 4
//! inside the ordering layer instead of `max_in_flight(4)`: the same cap, first come
//! first served. The bulk tenant's 12 other permitted imports queue for the limit's
//! permits before each search does, so every search waits for all 12 to start.
//!
//! ```sh
//! cargo run --example fair_share
//! ```
//!
//! The requests go through the router in process (`tower::ServiceExt::oneshot`), as a
//! server would send them, so the run needs no port and takes about a second. It prints
//! both runs, and exits with status 1 if the cap was exceeded or a search waited behind
//! the bulk tenant's backlog.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{Request, StatusCode};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::time::Instant;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{BoxError, ServiceExt};
use tower_sync_engine::SyncEngineLayer;
use tower_sync_engine::http::by_header;

/// The header that names a tenant: the key.
pub const TENANT: &str = "x-tenant";

/// What bounds the requests running at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    /// `max_in_flight(slots)` on the ordering layer: a freed slot goes to the tenant
    /// holding the fewest.
    FairShare,
    /// tower's `GlobalConcurrencyLimitLayer::new(slots)` inside the ordering layer: first
    /// come, first served.
    GlobalConcurrencyLimit,
}

impl fmt::Display for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limiter::FairShare => f.write_str("max_in_flight"),
            Limiter::GlobalConcurrencyLimit => f.write_str("GlobalConcurrencyLimitLayer"),
        }
    }
}

/// The load.
#[derive(Clone, Debug)]
pub struct Config {
    /// Requests of the whole app running at once.
    pub slots: usize,
    /// Requests of one tenant running at once.
    pub permits_per_tenant: usize,
    /// The bulk tenant's imports, all sent at the start.
    pub imports: u64,
    /// The quiet tenant's searches, each sent once the one before has been answered.
    pub searches: u64,
    /// How long a search works.
    pub search_ms: u64,
    /// When the first search is sent, after the imports.
    pub first_search_after_ms: u64,
    /// How long the quiet tenant pauses between an answer and its next search.
    pub think_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            slots: 4,
            permits_per_tenant: 16,
            imports: 60,
            searches: 3,
            search_ms: 5,
            first_search_after_ms: 5,
            think_ms: 10,
        }
    }
}

/// How long import `id` works: 30, 37, 44 or 51 ms, so that slots free one at a time.
pub fn import_ms(id: u64) -> u64 {
    30 + 7 * (id % 4)
}

/// Which route a handler serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    Import,
    Search,
}

/// When the handlers started, and how many ran at once.
#[derive(Clone)]
pub struct Meter {
    origin: Instant,
    state: Arc<Mutex<MeterState>>,
}

#[derive(Default)]
struct MeterState {
    starts: HashMap<(Route, u64), Duration>,
    running: usize,
    max_running: usize,
}

impl Meter {
    fn new() -> Meter {
        Meter {
            origin: Instant::now(),
            state: Arc::default(),
        }
    }

    fn since_origin(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Runs one handler: records its start, works for `ms`, and answers.
    async fn work(&self, route: Route, id: u64, ms: u64) -> String {
        {
            let mut state = self.state.lock().unwrap();
            let now = self.since_origin();
            state.starts.insert((route, id), now);
            state.running += 1;
            state.max_running = state.max_running.max(state.running);
        }
        let _running = Running(self.clone());
        tokio::time::sleep(Duration::from_millis(ms)).await;
        format!("{route:?} {id} done\n")
    }

    fn started(&self, route: Route, id: u64) -> Option<Duration> {
        self.state.lock().unwrap().starts.get(&(route, id)).copied()
    }

    /// The imports whose handler started strictly between `from` and `to`.
    fn imports_started_between(&self, from: Duration, to: Duration) -> usize {
        let state = self.state.lock().unwrap();
        state
            .starts
            .iter()
            .filter(|((route, _), at)| *route == Route::Import && from < **at && **at < to)
            .count()
    }

    fn max_running(&self) -> usize {
        self.state.lock().unwrap().max_running
    }
}

/// Counts a handler as running until it ends or is dropped.
struct Running(Meter);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut state) = self.0.state.lock() {
            state.running -= 1;
        }
    }
}

#[derive(Deserialize)]
struct Work {
    id: u64,
    ms: u64,
}

async fn import(State(meter): State<Meter>, Query(work): Query<Work>) -> String {
    meter.work(Route::Import, work.id, work.ms).await
}

async fn search(State(meter): State<Meter>, Query(work): Query<Work>) -> String {
    meter.work(Route::Search, work.id, work.ms).await
}

/// Both routes behind one ordering layer, keyed by tenant, with `limiter` bounding the
/// requests running at once.
pub fn app(limiter: Limiter, config: &Config) -> (Router, Meter) {
    let meter = Meter::new();
    let routes = Router::new()
        .route("/import", post(import))
        .route("/search", get(search));
    let by_tenant =
        SyncEngineLayer::new(by_header(TENANT)).permits_per_key(config.permits_per_tenant);
    let app = match limiter {
        // One layer value on both routes: one domain, one cap.
        Limiter::FairShare => routes.layer(by_tenant.max_in_flight(config.slots).for_http()),
        // Inside the ordering layer, where a request polls it once its turn has come.
        Limiter::GlobalConcurrencyLimit => routes
            .layer(GlobalConcurrencyLimitLayer::new(config.slots))
            .layer(by_tenant.for_http()),
    };
    (app.with_state(meter.clone()), meter)
}

/// One search, as the quiet tenant saw it.
#[derive(Clone, Debug)]
pub struct Search {
    /// From sending it until its handler started.
    pub waited: Duration,
    /// Imports whose handler started while it waited.
    pub imports_meanwhile: usize,
}

/// One run of the load under one limiter.
#[derive(Clone, Debug)]
pub struct Summary {
    pub limiter: Limiter,
    pub slots: usize,
    pub searches: Vec<Search>,
    /// The most handlers, of both routes, that ran at once.
    pub max_running: usize,
    /// Until the last import was answered.
    pub elapsed: Duration,
}

impl Summary {
    /// What went wrong for the fair limiter: the cap exceeded, or a search that waited
    /// behind more imports than could already have had their slot when it was sent
    /// (which, on a loaded machine, can be a few that were handed theirs just before).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_running > self.slots {
            problems.push(format!(
                "{} handlers ran at once, over the cap of {}",
                self.max_running, self.slots
            ));
        }
        if self.limiter == Limiter::FairShare {
            for (id, search) in self.searches.iter().enumerate() {
                if search.imports_meanwhile > self.slots {
                    problems.push(format!(
                        "search {id} waited while {} imports started",
                        search.imports_meanwhile
                    ));
                }
            }
        }
        problems
    }

    /// One line for the report.
    pub fn line(&self) -> String {
        let waits: Vec<String> = self
            .searches
            .iter()
            .map(|search| format!("{} ms", search.waited.as_millis()))
            .collect();
        let meanwhile: Vec<String> = self
            .searches
            .iter()
            .map(|search| search.imports_meanwhile.to_string())
            .collect();
        format!(
            "{:<32} searches waited {} (imports started meanwhile: {}); at most {} handlers at once; imports done in {} ms",
            format!("{}({}):", self.limiter, self.slots),
            waits.join(", "),
            meanwhile.join(", "),
            self.max_running,
            self.elapsed.as_millis()
        )
    }
}

fn request(method: &str, path: &str, tenant: &str, id: u64, ms: u64) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(format!("{path}?id={id}&ms={ms}"))
        .header(TENANT, tenant)
        .body(Body::empty())
        .expect("a valid request")
}

/// Sends `request` through `app` and reads its whole body.
async fn send(app: Router, request: Request<Body>) -> Result<String, BoxError> {
    let response = app.oneshot(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)).into());
    }
    Ok(String::from_utf8(body.to_vec())?)
}

/// The bulk tenant's flood and the quiet tenant's searches through one app.
pub async fn run(limiter: Limiter, config: &Config) -> Result<Summary, BoxError> {
    let (app, meter) = app(limiter, config);
    let imports: Vec<_> = (0..config.imports)
        .map(|id| {
            let request = request("POST", "/import", "bulk", id, import_ms(id));
            tokio::spawn(send(app.clone(), request))
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(config.first_search_after_ms)).await;
    let mut searches = Vec::new();
    for id in 0..config.searches {
        let sent = meter.since_origin();
        let request = request("GET", "/search", "quiet", id, config.search_ms);
        send(app.clone(), request).await?;
        let started = meter
            .started(Route::Search, id)
            .ok_or("a search never ran")?;
        searches.push(Search {
            waited: started - sent,
            imports_meanwhile: meter.imports_started_between(sent, started),
        });
        tokio::time::sleep(Duration::from_millis(config.think_ms)).await;
    }

    for import in imports {
        import.await??;
    }
    Ok(Summary {
        limiter,
        slots: config.slots,
        searches,
        max_running: meter.max_running(),
        elapsed: meter.since_origin(),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let config = Config::default();
    println!(
        "bulk tenant: {} imports of 30-51 ms at once; quiet tenant: {} searches of {} ms, \
         one after another; {} per tenant, {} in all",
        config.imports, config.searches, config.search_ms, config.permits_per_tenant, config.slots
    );
    let fair = run(Limiter::FairShare, &config).await?;
    println!("{}", fair.line());
    let fifo = run(Limiter::GlobalConcurrencyLimit, &config).await?;
    println!("{}", fifo.line());

    let mut problems = fair.problems();
    problems.extend(fifo.problems());
    if problems.is_empty() {
        println!(
            "max_in_flight({}) held the cap and gave each search the next free slot",
            config.slots
        );
        Ok(())
    } else {
        for problem in &problems {
            eprintln!("FAILED: {problem}");
        }
        std::process::exit(1);
    }
}
