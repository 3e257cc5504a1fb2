//! An axum HTTP service where requests with the same `x-session-id` run one at a time,
//! in arrival order, each until its response body has ended; requests without the
//! header, and `GET /status`, run concurrently.
//!
//! ```sh
//! cargo run --example http_session -- --addr 127.0.0.1:3000
//!
//! # Then, in another terminal:
//! # one session, one request at a time: `b` is answered after `a`, though it is faster.
//! curl -sX POST -H 'x-session-id: alice' 'http://127.0.0.1:3000/work?ms=500&tag=a' -w '\n' & sleep 0.1; curl -sX POST -H 'x-session-id: alice' 'http://127.0.0.1:3000/work?ms=10&tag=b' -w '\n'; wait
//!
//! # A streamed report holds its session until its last line: `after` comes after it.
//! curl -sN -H 'x-session-id: alice' 'http://127.0.0.1:3000/report?lines=5&ms=300' & sleep 0.1; curl -sX POST -H 'x-session-id: alice' 'http://127.0.0.1:3000/work?ms=0&tag=after' -w '\n'; wait
//!
//! # `/status` never waits, even for a busy session: it shows the session held.
//! curl -sN -H 'x-session-id: alice' 'http://127.0.0.1:3000/report?lines=3&ms=500' > /dev/null & sleep 0.1; curl -s -H 'x-session-id: alice' http://127.0.0.1:3000/status; wait
//! ```
//!
//! With the crate's `metrics` feature, `GET /metrics` is the Prometheus text page of the
//! layer's metrics (domain `sessions`), rendered by `metrics-exporter-prometheus`; the
//! gauges are sampled on each request for the page:
//!
//! ```sh
//! cargo run --example http_session --features metrics -- --addr 127.0.0.1:3000
//!
//! # Two requests wait behind a slow one, then the page shows them.
//! for tag in a b c; do curl -sX POST -H 'x-session-id: alice' "http://127.0.0.1:3000/work?ms=300&tag=$tag" -o /dev/null & done; wait
//! curl -s http://127.0.0.1:3000/metrics | grep '^tower_sync_engine'
//! ```
//!
//! The stack, outermost first: `TraceLayer`; `explain_overload`, which gives the `503`
//! that the ordering layer answers an overload with a text body; a 2 s `TimeoutLayer`
//! (answering `408`), which covers the wait for the session and the handler up to its
//! response head, not the streamed body; and the ordering layer, `for_http()`, with no
//! `HandleErrorLayer`: it is as infallible as the handlers.
//!
//! Every response carries `x-served-by: ADDR`, the instance's listening address, so that
//! behind a load balancer (`deploy/cluster.sh`) a client sees where each request went.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Query, Request};
use axum::http::{HeaderValue, Response, StatusCode};
use axum::routing::{get, post};
use serde::Deserialize;
use tower::{BoxError, ServiceBuilder};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tower_sync_engine::error::Overloaded;
use tower_sync_engine::http::by_header;
use tower_sync_engine::{Mode, Policy, SyncEngineLayer};

/// The header that names a session.
pub const SESSION: &str = "x-session-id";

/// The response header that names the instance that served a request.
pub const SERVED_BY: &str = "x-served-by";

#[derive(Deserialize)]
struct Work {
    ms: u64,
    tag: String,
}

/// Answers `tag` after `ms` milliseconds.
async fn work(Query(work): Query<Work>) -> String {
    tokio::time::sleep(Duration::from_millis(work.ms)).await;
    work.tag
}

#[derive(Deserialize)]
struct Report {
    #[serde(default = "Report::default_lines")]
    lines: u32,
    #[serde(default = "Report::default_ms")]
    ms: u64,
}

impl Report {
    fn default_lines() -> u32 {
        5
    }

    fn default_ms() -> u64 {
        200
    }
}

/// Streams `lines` lines, one every `ms` milliseconds. The handler returns at once; the
/// session stays held until the last line has been sent.
async fn report(Query(report): Query<Report>) -> Body {
    let lines = futures::stream::unfold(1, move |line| async move {
        if line > report.lines {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(report.ms)).await;
        let text = format!("line {line} of {}\n", report.lines);
        Some((Ok::<_, Infallible>(text), line + 1))
    });
    Body::from_stream(lines)
}

/// The ordering layer answers an overload with `503`, an empty body, and the reason in
/// the response's extensions; this says the reason in the body.
fn explain_overload<B>(response: Response<B>) -> Response<Body>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    match response.extensions().get::<Overloaded>() {
        Some(overloaded) => {
            let reason = overloaded.to_string();
            response.map(|_| Body::from(reason))
        }
        None => response.map(Body::new),
    }
}

/// The process's Prometheus recorder, installed on first use, with the layer's metrics
/// described and its wait histogram in buckets (without buckets the exporter renders a
/// summary, whose quantiles cannot be aggregated across instances).
#[cfg(feature = "metrics")]
fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    use tower_sync_engine::metrics::WAIT_SECONDS;

    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        let buckets = [0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5];
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(WAIT_SECONDS.to_owned()), &buckets)
            .expect("buckets are not empty")
            .install_recorder()
            .expect("no other recorder is installed");
        tower_sync_engine::metrics::describe();
        handle
    })
}

/// The routes behind one layer value: they share one ordering domain, so a session's
/// requests are ordered across all of them.
pub fn app(max_queue_per_session: usize) -> Router {
    let session = by_header(SESSION);
    let by_session = SyncEngineLayer::new(move |request: &Request| {
        // The status and metrics pages need no order, and must answer while a session is
        // busy.
        if matches!(request.uri().path(), "/status" | "/metrics") {
            Mode::Concurrent
        } else {
            session.classify(request)
        }
    })
    .max_queue_per_key(max_queue_per_session);
    #[cfg(feature = "metrics")]
    let by_session = by_session.metrics_domain("sessions");
    #[cfg(feature = "metrics")]
    let page = {
        let (handle, sampler) = (prometheus(), by_session.metrics_sampler());
        move || async move {
            // The gauges are set here, when they are read, not by every request.
            sampler.sample();
            handle.run_upkeep();
            handle.render()
        }
    };
    #[cfg(not(feature = "metrics"))]
    let page = || async {
        (
            StatusCode::NOT_FOUND,
            "built without the metrics feature: cargo run --example http_session --features metrics\n",
        )
    };
    let by_session = by_session.for_http();
    let domain = by_session.clone();

    Router::new()
        .route("/work", post(work))
        .route("/other", post(work))
        .route("/report", get(report))
        .route(
            "/status",
            get(move || async move { format!("{:?}\n", domain.stats()) }),
        )
        .route("/metrics", get(page))
        .layer(
            ServiceBuilder::new()
                .layer(TraceLayer::new_for_http())
                .map_response(explain_overload)
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    Duration::from_secs(2),
                ))
                .layer(by_session),
        )
}

/// Adds `x-served-by: ADDR` to every response of `app`, errors included.
pub fn served_by(app: Router, instance: SocketAddr) -> Router {
    let name = HeaderValue::try_from(instance.to_string()).expect("an address is a header value");
    app.layer(axum::middleware::map_response(
        move |mut response: Response<Body>| {
            let name = name.clone();
            async move {
                response.headers_mut().insert(SERVED_BY, name);
                response
            }
        },
    ))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    use std::io::IsTerminal;

    // Quiet unless asked: `TraceLayer` logs every request at DEBUG, which under load is
    // hundreds of megabytes. `RUST_LOG=tower_http=debug,tower_sync_engine=debug` shows
    // each request and each wait for a session.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,http_session=info,tower_sync_engine=info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a terminal, not for a file or a pipe.
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let mut addr: SocketAddr = "127.0.0.1:3000".parse()?;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--addr", Some(value)) => addr = value.parse()?,
            _ => {
                eprintln!("usage: http_session [--addr HOST:PORT]");
                std::process::exit(2);
            }
        }
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let app = served_by(app(16), listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
