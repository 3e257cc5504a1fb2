//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`, off
//! by default).
//!
//! The layer records through whatever recorder the application installs
//! (`metrics-exporter-prometheus`, an OpenTelemetry bridge, a test recorder); this crate
//! depends on no exporter. Without a recorder, recording does nothing.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `tower_sync_engine_waits_total` | counter | `domain` | `Mode::Sync` requests that could not start at once and joined their key's line, in `call()` (the `queued` event); a `Mode::SyncAll` request once for every key whose line it joined |
//! | `tower_sync_engine_wait_seconds` | histogram | `domain` | for each request that waited and then got its turn, the seconds from its `call()` until it became the head of its key (the `admitted` event), for a `Mode::SyncAll` request once for every such key; a request dropped while it waits is in `waits_total` only |
//! | `tower_sync_engine_rejections_total` | counter | `domain`, `limit` | requests rejected at once with [`Overloaded`](crate::error::Overloaded); `limit` is the [`Limit`]'s name: `max_queue_per_key` or `max_keys` |
//! | `tower_sync_engine_keys` | gauge | `domain` | [`Stats::keys`]: keys that some request holds or waits for |
//! | `tower_sync_engine_in_flight` | gauge | `domain` | [`Stats::in_flight`]: requests holding a permit of their key |
//! | `tower_sync_engine_queued` | gauge | `domain` | [`Stats::queued`]: requests waiting for their turn |
//! | `tower_sync_engine_deepest_queue` | gauge | `domain` | the most requests waiting for their turn on any one key: a hot key, against `max_queue_per_key` |
//!
//! The `domain` label is there when the layer was given a name with
//! [`SyncEngineLayer::metrics_domain`]: it tells two ordering domains of one process
//! apart. The names are also constants of this module ([`WAIT_SECONDS`] and the others),
//! for a recorder's per-metric settings such as histogram buckets, and [`describe`] gives
//! the recorder their units and help texts.
//!
//! # Counters and the histogram: recorded by the requests that wait
//!
//! A request that gets its key at once records nothing and reads no clock. A request that
//! waits counts itself in `call()`, reads the clock as it joins its key's line there,
//! and records its wait once its turn comes; a rejected request counts itself in
//! `call()`. Each goes through the `metrics` macros at
//! that moment, so a recorder installed after the layer was built still sees them. With
//! the `tokio-clock` feature the wait is timed with tokio's clock, and a paused test
//! runtime gives exact values.
//!
//! # Gauges: sampled, not updated by requests
//!
//! Requests do not touch the gauges. A [`MetricsSampler`] reads the domain's counts and
//! sets them when told: on each scrape of the metrics page (as `examples/http_session.rs`
//! does), or from a task on an interval, as `tokio-metrics` does. A sample visits every
//! shard of the domain under its lock, and every live key; it costs the requests nothing
//! between samples.
//!
//! Served to Prometheus from an axum app, with `metrics-exporter-prometheus`:
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, body::Body, http::Request, routing::{get, post}};
//! use metrics_exporter_prometheus::PrometheusBuilder;
//! use tower::ServiceExt;
//! use tower_sync_engine::SyncEngineLayer;
//! use tower_sync_engine::http::by_header;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let prometheus = PrometheusBuilder::new().install_recorder()?;
//! tower_sync_engine::metrics::describe(); // units and `# HELP` texts
//!
//! let sessions = SyncEngineLayer::new(by_header("x-session-id"))
//!     .max_queue_per_key(32)
//!     .max_keys(10_000)
//!     .metrics_domain("sessions");
//! let sampler = sessions.metrics_sampler(); // taken before `for_http()`
//! let save = || async {
//!     tokio::time::sleep(Duration::from_millis(100)).await;
//!     "saved"
//! };
//! let app: Router = Router::new()
//!     .route("/edit", post(save))
//!     .layer(sessions.for_http())
//!     // Added after the layer, so outside it: sets the gauges, then renders the page.
//!     .route("/metrics", get(move || async move {
//!         sampler.sample();
//!         prometheus.render()
//!     }));
//!
//! // Two edits of one session: the second waits for the first, which holds the session
//! // until its response body ends or, as here, is dropped.
//! let edit = |app: Router| async move {
//!     let request = Request::post("/edit").header("x-session-id", "alice").body(Body::empty())?;
//!     Ok::<_, Box<dyn std::error::Error>>(app.oneshot(request).await?.status())
//! };
//! let (first, second) = tokio::join!(edit(app.clone()), edit(app.clone()));
//! assert!(first?.is_success() && second?.is_success());
//!
//! let page = app.oneshot(Request::get("/metrics").body(Body::empty())?).await?;
//! let page = axum::body::to_bytes(page.into_body(), usize::MAX).await?;
//! let page = std::str::from_utf8(&page)?;
//! assert!(page.contains(r#"tower_sync_engine_waits_total{domain="sessions"} 1"#));
//! assert!(page.contains(r#"tower_sync_engine_in_flight{domain="sessions"} 0"#));
//! # Ok(())
//! # }
//! ```
//!
//! To sample on an interval instead, move the sampler into a task:
//! `loop { interval.tick().await; sampler.sample(); }`.
//!
//! # Performance
//!
//! With the feature off, nothing of this exists. With it on, a request that gets its key
//! at once pays nothing more; the domain's label travels in its settings, which every
//! request reads already. A request that waits reads the clock once, under its shard's
//! lock as it joins the line, and records twice through the recorder; a rejected request
//! records once.
//!
//! [`Limit`]: crate::error::Limit
//! [`SyncEngineLayer::metrics_domain`]: crate::SyncEngineLayer::metrics_domain

use std::fmt;
use std::time::Duration;

use metrics::{Label, Unit};

use crate::error::Limit;
use crate::registry::Registry;
use crate::stats::Stats;
use crate::sync::Arc;

/// Counter: `Mode::Sync` requests that joined their key's line, in `call()`.
pub const WAITS_TOTAL: &str = "tower_sync_engine_waits_total";
/// Histogram, in seconds: each admitted waiting request's time from `call()` to its turn.
pub const WAIT_SECONDS: &str = "tower_sync_engine_wait_seconds";
/// Counter: requests rejected by a limit, labelled `limit`.
pub const REJECTIONS_TOTAL: &str = "tower_sync_engine_rejections_total";
/// Gauge: live keys ([`Stats::keys`]), set by [`MetricsSampler::sample`].
pub const KEYS: &str = "tower_sync_engine_keys";
/// Gauge: requests holding a permit ([`Stats::in_flight`]), set by
/// [`MetricsSampler::sample`].
pub const IN_FLIGHT: &str = "tower_sync_engine_in_flight";
/// Gauge: requests waiting for their turn ([`Stats::queued`]), set by
/// [`MetricsSampler::sample`].
pub const QUEUED: &str = "tower_sync_engine_queued";
/// Gauge: the most requests waiting for their turn on any one key, set by
/// [`MetricsSampler::sample`].
pub const DEEPEST_QUEUE: &str = "tower_sync_engine_deepest_queue";
/// The label that names the domain, from
/// [`SyncEngineLayer::metrics_domain`](crate::SyncEngineLayer::metrics_domain).
pub const DOMAIN_LABEL: &str = "domain";
/// The label of [`REJECTIONS_TOTAL`] that names the [`Limit`].
pub const LIMIT_LABEL: &str = "limit";

/// Gives the installed recorder the unit and help text of every metric in the table.
///
/// Call it once, after installing the recorder: exporters show the help texts (the
/// Prometheus page's `# HELP` lines) only for metrics described to them. Describing
/// again is harmless.
pub fn describe() {
    metrics::describe_counter!(
        WAITS_TOTAL,
        Unit::Count,
        "Requests that could not start at once and waited for their key."
    );
    metrics::describe_histogram!(
        WAIT_SECONDS,
        Unit::Seconds,
        "Time from call() until a waiting request's turn came, for requests that waited."
    );
    metrics::describe_counter!(
        REJECTIONS_TOTAL,
        Unit::Count,
        "Requests rejected at once because a limit was reached, by limit."
    );
    metrics::describe_gauge!(
        KEYS,
        Unit::Count,
        "Keys that some request holds or waits for, when last sampled."
    );
    metrics::describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Requests holding a permit of their key, when last sampled."
    );
    metrics::describe_gauge!(
        QUEUED,
        Unit::Count,
        "Requests waiting for their turn on their key, when last sampled."
    );
    metrics::describe_gauge!(
        DEEPEST_QUEUE,
        Unit::Count,
        "The most requests waiting for their turn on any one key, when last sampled."
    );
}

/// The `domain` label of a domain's metrics, if it has one. Kept in the domain's
/// settings, which every request reads already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Domain(Option<&'static str>);

impl Domain {
    /// No name: the metrics have no `domain` label.
    pub(crate) const NONE: Domain = Domain(None);

    pub(crate) fn named(name: &'static str) -> Self {
        Domain(Some(name))
    }

    fn labels(self) -> Vec<Label> {
        self.0
            .map(|name| Label::from_static_parts(DOMAIN_LABEL, name))
            .into_iter()
            .collect()
    }
}

/// The `limit` label's value: the limit's name, as its `Display` writes it.
fn limit_name(limit: Limit) -> &'static str {
    match limit {
        Limit::MaxQueuePerKey => "max_queue_per_key",
        Limit::MaxKeys => "max_keys",
    }
}

#[cold]
#[inline(never)]
pub(crate) fn record_queued(domain: Domain) {
    metrics::counter!(WAITS_TOTAL, domain.labels()).increment(1);
}

#[cold]
#[inline(never)]
pub(crate) fn record_wait(domain: Domain, waited: Duration) {
    metrics::histogram!(WAIT_SECONDS, domain.labels()).record(waited.as_secs_f64());
}

#[cold]
#[inline(never)]
pub(crate) fn record_rejected(domain: Domain, limit: Limit) {
    let mut labels = domain.labels();
    labels.push(Label::from_static_parts(LIMIT_LABEL, limit_name(limit)));
    metrics::counter!(REJECTIONS_TOTAL, labels).increment(1);
}

/// What a sampler reads from a domain, whatever its key and hasher types.
trait Counts: Send + Sync {
    fn stats(&self) -> Stats;
    fn deepest_queue(&self) -> usize;
}

impl<K: Send, H: Send + Sync> Counts for Registry<K, H> {
    fn stats(&self) -> Stats {
        Registry::stats(self)
    }

    fn deepest_queue(&self) -> usize {
        Registry::deepest_queue(self)
    }
}

/// Sets the gauges of one ordering domain from its current counts, each time
/// [`sample`](Self::sample) is called; from
/// [`SyncEngineLayer::metrics_sampler`](crate::SyncEngineLayer::metrics_sampler).
///
/// Cheap to clone, `Send` and `Sync`: keep one where the metrics page is rendered, or in
/// a task that samples on an interval. It keeps the domain's shards alive, not its
/// requests.
#[derive(Clone)]
pub struct MetricsSampler {
    counts: Arc<dyn Counts>,
    domain: Domain,
}

impl MetricsSampler {
    pub(crate) fn new<K, H>(registry: Arc<Registry<K, H>>) -> Self
    where
        K: Send + 'static,
        H: Send + Sync + 'static,
    {
        let domain = registry.settings().metrics_domain;
        MetricsSampler {
            counts: registry,
            domain,
        }
    }

    /// Reads the domain's counts, as [`stats`](crate::SyncEngineLayer::stats) does, and
    /// the deepest line of any key, and sets the four gauges to them.
    ///
    /// It visits every shard under its lock, and every live key: call it when the
    /// metrics are read or on an interval, not for every request.
    pub fn sample(&self) {
        let stats = self.counts.stats();
        let deepest = self.counts.deepest_queue();
        let labels = self.domain.labels();
        // A gauge is an `f64`: counts up to 2^53 are exact.
        metrics::gauge!(KEYS, labels.clone()).set(stats.keys as f64);
        metrics::gauge!(IN_FLIGHT, labels.clone()).set(stats.in_flight as f64);
        metrics::gauge!(QUEUED, labels.clone()).set(stats.queued as f64);
        metrics::gauge!(DEEPEST_QUEUE, labels).set(deepest as f64);
    }
}

impl fmt::Debug for MetricsSampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsSampler")
            .field("domain", &self.domain.0)
            .finish_non_exhaustive()
    }
}
