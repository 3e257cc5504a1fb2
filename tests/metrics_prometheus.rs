//! The metrics of `examples/http_session.rs` as a Prometheus server sees them: the
//! example's app serves `GET /metrics` on loopback, Debian's `prometheus` scrapes it every
//! second, and a known load must show in Prometheus's query API with the values it
//! implies. `promtool check metrics` must accept the page.
//!
//! # Requirements and skipping
//!
//! The test needs `prometheus` and `promtool` (Debian's `prometheus` package) on `PATH`.
//! Without them it prints `skipped: prometheus not installed` and passes, so that `cargo
//! test` passes on a fresh machine; when the `CI` environment variable is set (`.ci/run`
//! installs the package), a missing program fails it instead.
//!
//! # How it runs
//!
//! The example's `app()` runs in this test's process, on a port of its own choosing, with
//! the example's Prometheus recorder (`metrics-exporter-prometheus`), installed for the
//! whole process: this file holds one test, so no other load reaches that recorder.
//! Prometheus runs from a fresh directory under cargo's `target/tmp` (its configuration
//! and storage; kept when the test fails), listens on a loopback port that was free a
//! moment before (retried if another process took it), and is killed by its id when the
//! test ends, also when it panics. Every wait has a deadline.

#![cfg(feature = "metrics")]

#[allow(dead_code)]
#[path = "../examples/http_session.rs"]
mod http_session;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

#[path = "support/programs.rs"]
mod programs;
use programs::{Process, RunDir, free_port, require};

/// A program of Debian's `prometheus` package; see [`require`].
fn require_program(name: &str) -> Option<PathBuf> {
    require(
        name,
        &[],
        "prometheus",
        "the Prometheus test (tests/metrics_prometheus.rs)",
    )
}

/// Requests of the hot session that wait behind its first one: as many as the example
/// may queue per session, so that every further request is rejected.
const WAITERS: usize = 4;
/// Requests of the hot session sent while its line is full: each rejected by
/// `max_queue_per_key`.
const REJECTED: usize = 3;
/// How long the session's first request works. Its waiters finish within the example's
/// 2 s timeout, which covers their wait.
const HEAD_MS: u64 = 1_000;
/// Upper bound on any request, start-up wait or query wait.
const WAIT: Duration = Duration::from_secs(20);

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Prometheus, scraping `target` every second, with its files in `dir`.
struct Prometheus {
    addr: SocketAddr,
    _process: Process,
}

async fn start_prometheus(program: &Path, dir: &RunDir, target: SocketAddr) -> Prometheus {
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: http_session\n    scrape_interval: 1s\n    \
         scrape_timeout: 1s\n    static_configs:\n      - targets: ['{target}']\n"
    );
    std::fs::write(dir.0.join("prometheus.yml"), config).unwrap();
    for _attempt in 0..5 {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
        let child = Command::new(program)
            .arg(format!(
                "--config.file={}",
                dir.0.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut process = Process(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if process.has_exited() {
                let log = dir.read("prometheus.log");
                if log.contains("address already in use") {
                    break; // another process took the port: try another
                }
                panic!("prometheus did not start:\n{log}");
            }
            if get(addr, "/-/ready")
                .await
                .is_ok_and(|(status, _)| status == 200)
            {
                return Prometheus {
                    addr,
                    _process: process,
                };
            }
            assert!(
                Instant::now() < deadline,
                "prometheus was not ready in {WAIT:?}:\n{}",
                dir.read("prometheus.log")
            );
            sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("prometheus found no free port in 5 attempts");
}

// ---- requests ----

/// One request on a connection of its own, so that requests never queue behind each
/// other in the client. Answers the status and the body.
async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    session: Option<&str>,
) -> Result<(u16, String), Error> {
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(target)
            .header("host", addr.to_string());
        if let Some(session) = session {
            request = request.header(http_session::SESSION, session);
        }
        let response = sender
            .send_request(request.body(Empty::<Bytes>::new())?)
            .await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    timeout(WAIT, exchange).await?
}

async fn get(addr: SocketAddr, target: &str) -> Result<(u16, String), Error> {
    request(addr, "GET", target, None).await
}

/// A request of the hot session, answered with its status.
async fn work(app: SocketAddr, ms: u64, tag: &str) -> u16 {
    let target = format!("/work?ms={ms}&tag={tag}");
    let (status, _) = request(app, "POST", &target, Some("hot"))
        .await
        .expect("the example answers");
    status
}

/// Waits until the example's `/status` page, its domain's `Stats`, shows `counts`.
async fn until_status(app: SocketAddr, counts: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, status) = get(app, "/status").await.expect("the status page");
        if status.contains(counts) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the status never showed {counts}: {status}"
        );
        sleep(Duration::from_millis(5)).await;
    }
}

/// `text` percent-encoded for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// The value of an instant query that selects at most one series, through Prometheus's
/// HTTP API; `None` while it selects none.
async fn query(prometheus: SocketAddr, promql: &str) -> Option<f64> {
    let target = format!("/api/v1/query?query={}", encode(promql));
    let (status, body) = get(prometheus, &target).await.expect("the query API");
    assert_eq!(status, 200, "{promql}: {body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON from the API");
    let result = answer["data"]["result"].as_array().expect("a vector");
    assert!(result.len() <= 1, "{promql} selects several series: {body}");
    let value = result.first()?["value"][1]
        .as_str()
        .expect("a sample value");
    Some(value.parse().expect("a number"))
}

/// Waits until `promql` has the value `expected` in Prometheus, which scrapes every
/// second: the page may not have been scraped since the load.
async fn until_query(prometheus: SocketAddr, promql: &str, expected: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = query(prometheus, promql).await;
        if value == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{promql} was {value:?} after {WAIT:?}, expected {expected}"
        );
        sleep(Duration::from_millis(200)).await;
    }
}

// ---- the test ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_waits_and_rejections_that_a_known_load_implies() {
    let (Some(prometheus), Some(promtool)) =
        (require_program("prometheus"), require_program("promtool"))
    else {
        return;
    };
    let dir = RunDir::new("metrics-prometheus");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, http_session::app(WAITERS))
            .await
            .unwrap()
    });
    let server = start_prometheus(&prometheus, &dir, app).await;
    until_query(server.addr, r#"up{job="http_session"}"#, 1.0).await;

    // One request holds the session; `WAITERS` wait behind it, each sent once the one
    // before is in line, so that the line is full; `REJECTED` more are turned away.
    let head = tokio::spawn(work(app, HEAD_MS, "head"));
    until_status(app, "in_flight: 1, queued: 0,").await;
    let mut waiters = Vec::new();
    for waiter in 1..=WAITERS {
        waiters.push(tokio::spawn(work(app, 10, "waiter")));
        until_status(app, &format!("in_flight: 1, queued: {waiter},")).await;
    }
    for _ in 0..REJECTED {
        assert_eq!(work(app, 10, "rejected").await, 503);
    }
    assert_eq!(head.await.unwrap(), 200);
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap(), 200);
    }

    let sessions = r#"domain="sessions""#;
    let waited = WAITERS as f64;
    until_query(
        server.addr,
        &format!("tower_sync_engine_wait_seconds_count{{{sessions}}}"),
        waited,
    )
    .await;
    // A histogram (buckets), not a summary: every wait is in the `+Inf` bucket.
    let every_wait = format!(r#"tower_sync_engine_wait_seconds_bucket{{{sessions},le="+Inf"}}"#);
    until_query(server.addr, &every_wait, waited).await;
    let waits = format!("tower_sync_engine_waits_total{{{sessions}}}");
    until_query(server.addr, &waits, waited).await;
    let rejections =
        format!(r#"tower_sync_engine_rejections_total{{{sessions},limit="max_queue_per_key"}}"#);
    until_query(server.addr, &rejections, REJECTED as f64).await;
    let max_keys = format!(r#"tower_sync_engine_rejections_total{{{sessions},limit="max_keys"}}"#);
    assert_eq!(query(server.addr, &max_keys).await, None);
    // The gauges, sampled on each scrape: nothing is left once the load is done.
    for gauge in ["keys", "in_flight", "queued", "deepest_queue"] {
        let gauge = format!("tower_sync_engine_{gauge}{{{sessions}}}");
        until_query(server.addr, &gauge, 0.0).await;
    }

    // The page itself passes Prometheus's own linter.
    let (status, page) = get(app, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        page.contains("# HELP tower_sync_engine_wait_seconds "),
        "{page}"
    );
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let output = check.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics rejected the page:\n{}{}\n{page}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
