//! The examples, driven end to end.

#[allow(dead_code)]
#[path = "../examples/demo.rs"]
mod demo;
#[allow(dead_code)]
#[path = "../examples/dispatcher.rs"]
mod dispatcher;
#[allow(dead_code)]
#[path = "../examples/fair_share.rs"]
mod fair_share;
#[allow(dead_code)]
#[path = "../examples/http_session.rs"]
mod http_session;
#[allow(dead_code)]
#[path = "../examples/ledger.rs"]
mod ledger;
#[allow(dead_code)]
#[path = "../examples/soak.rs"]
mod soak;
mod support;
#[allow(dead_code)]
#[path = "../examples/websocket.rs"]
mod websocket;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tower::ServiceExt;

// ---- demo ----

#[tokio::test]
async fn demo_prints_send_order_for_sync_and_completion_order_for_concurrent() {
    let lines = demo::report().await.unwrap();
    let line = |prefix: &str| {
        lines
            .iter()
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in {lines:#?}"))
            .clone()
    };
    assert_eq!(line("sync:"), "sync: 1 2 3 4");
    // The backend takes 800, 200, 500 and 20 ms for messages 1 to 4: at least 180 ms
    // between any two, so a loaded machine cannot swap them.
    assert_eq!(line("concurrent:"), "concurrent: 4 2 3 1");
}

// ---- dispatcher ----

#[tokio::test(start_paused = true)]
async fn keyed_by_connection_the_whole_on_event_is_serialized() {
    let order = dispatcher::run(dispatcher::Granularity::Connection)
        .await
        .unwrap();
    assert_eq!(
        order,
        ["ping#5", "typing#4", "message#1", "join#2", "message#3"]
    );
}

#[tokio::test(start_paused = true)]
async fn keyed_by_connection_and_event_each_handler_is_serialized_on_its_own() {
    let order = dispatcher::run(dispatcher::Granularity::Handler)
        .await
        .unwrap();
    assert_eq!(
        order,
        ["ping#5", "typing#4", "join#2", "message#1", "message#3"]
    );
}

// ---- http_session ----

fn work(session: Option<&str>, path: &str, ms: u64, tag: &str) -> Request<Body> {
    let mut request = Request::post(format!("{path}?ms={ms}&tag={tag}"));
    if let Some(session) = session {
        request = request.header(http_session::SESSION, session);
    }
    request.body(Body::empty()).unwrap()
}

fn get(session: Option<&str>, path_and_query: &str) -> Request<Body> {
    let mut request = Request::get(path_and_query);
    if let Some(session) = session {
        request = request.header(http_session::SESSION, session);
    }
    request.body(Body::empty()).unwrap()
}

async fn send(app: &axum::Router, request: Request<Body>) -> (StatusCode, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_session_is_serialized_across_routes_and_no_session_is_concurrent() {
    let app = http_session::app(16);
    let started = Instant::now();
    let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
    for request in [
        work(Some("alice"), "/work", 300, "a1"),
        work(Some("alice"), "/other", 10, "a2"),
        work(None, "/work", 300, "n1"),
        work(None, "/work", 10, "n2"),
        work(Some("bob"), "/work", 20, "b1"),
    ] {
        let app = app.clone();
        let done = done.clone();
        tokio::spawn(async move { done.send(send(&app, request).await).unwrap() });
        // Let each request reach the layer before the next is sent.
        tokio::task::yield_now().await;
    }
    drop(done);
    let mut order = Vec::new();
    while let Some((status, tag)) = finished.recv().await {
        assert_eq!(status, StatusCode::OK);
        order.push(tag);
    }
    assert_eq!(order, ["n2", "b1", "a1", "n1", "a2"]);
    assert_eq!(started.elapsed(), Duration::from_millis(310));
}

#[tokio::test(start_paused = true)]
async fn overloaded_becomes_503_and_a_timeout_becomes_408() {
    let app = http_session::app(1);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, work(Some("s"), "/work", 1_500, "first")).await }
    });
    tokio::task::yield_now().await;
    let queued = tokio::spawn({
        let app = app.clone();
        async move { send(&app, work(Some("s"), "/work", 10, "queued")).await }
    });
    tokio::task::yield_now().await;

    // The ordering layer answers 503 itself, with no `HandleErrorLayer`; the example's
    // `explain_overload` puts the reason from the response's extensions in the body.
    let (status, body) = send(&app, work(Some("s"), "/work", 10, "rejected")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("max_queue_per_key"), "{body}");

    assert_eq!(first.await.unwrap(), (StatusCode::OK, "first".to_owned()));
    assert_eq!(queued.await.unwrap(), (StatusCode::OK, "queued".to_owned()));

    let (status, _) = send(&app, work(Some("s"), "/work", 5_000, "slow")).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_report_holds_its_session_until_its_last_line_and_status_never_waits() {
    let app = http_session::app(16);
    let started = Instant::now();
    let timed = |request: Request<Body>| {
        let app = app.clone();
        tokio::spawn(async move {
            let answer = send(&app, request).await;
            (answer, started.elapsed())
        })
    };
    let report = timed(get(Some("alice"), "/report?lines=3&ms=100"));
    tokio::task::yield_now().await;
    let after = timed(work(Some("alice"), "/work", 0, "after"));
    tokio::task::yield_now().await;

    // `/status` is Concurrent by policy: it answers at once, even for a busy session.
    let (status, stats) = send(&app, get(Some("alice"), "/status")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(stats.contains("in_flight: 1, queued: 1"), "{stats}");
    assert_eq!(started.elapsed(), Duration::ZERO);

    let ((status, lines), report_done) = report.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(lines, "line 1 of 3\nline 2 of 3\nline 3 of 3\n");
    assert_eq!(report_done, Duration::from_millis(300));
    // The handler for `after` takes no time, yet it ran only once the report had ended.
    let (answer, after_done) = after.await.unwrap();
    assert_eq!(answer, (StatusCode::OK, "after".to_owned()));
    assert_eq!(after_done, Duration::from_millis(300));
}

// ---- fair_share ----

// On the paused clock every start time is exact: with `max_in_flight`, no import starts
// while a search waits, because the first slot that frees goes to the quiet tenant, which
// holds none; behind a first-come-first-served limit, every search waits for the twelve
// imports that were waiting for a slot before it.
#[tokio::test(start_paused = true)]
async fn fair_share_gives_the_quiet_tenant_the_next_free_slot_across_routes() {
    let config = fair_share::Config::default();
    let longest_import = Duration::from_millis(fair_share::import_ms(3));

    let fair = fair_share::run(fair_share::Limiter::FairShare, &config)
        .await
        .unwrap();
    assert_eq!(fair.max_running, config.slots, "{fair:?}");
    assert_eq!(fair.searches.len(), 3);
    for search in &fair.searches {
        assert_eq!(search.imports_meanwhile, 0, "{fair:?}");
        assert!(search.waited < longest_import, "{fair:?}");
    }
    assert!(fair.problems().is_empty(), "{:?}", fair.problems());

    let fifo = fair_share::run(fair_share::Limiter::GlobalConcurrencyLimit, &config)
        .await
        .unwrap();
    assert_eq!(fifo.max_running, config.slots, "{fifo:?}");
    for search in &fifo.searches {
        assert_eq!(search.imports_meanwhile, 12, "{fifo:?}");
        assert!(search.waited > 2 * longest_import, "{fifo:?}");
    }
    // Both runs did the same work under the same cap.
    let lines = [fair.line(), fifo.line()];
    assert!(lines[0].starts_with("max_in_flight(4):"), "{lines:?}");
    assert!(
        lines[1].starts_with("GlobalConcurrencyLimitLayer(4):"),
        "{lines:?}"
    );
}

// ---- websocket ----

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn start_server(mode: websocket::ServerMode) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(websocket::serve(listener, mode));
    format!("ws://{addr}/ws")
}

async fn connect(url: &str) -> Client {
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn next_json(client: &mut Client) -> serde_json::Value {
    let message = tokio::time::timeout(Duration::from_secs(10), client.next())
        .await
        .expect("a reply within 10s")
        .expect("the connection stays open")
        .unwrap();
    serde_json::from_str(message.to_text().unwrap()).unwrap()
}

async fn send_frames(client: &mut Client, frames: &[(u64, u64)]) {
    for &(seq, delay_ms) in frames {
        let text = serde_json::json!({ "seq": seq, "delay_ms": delay_ms }).to_string();
        client.send(Message::text(text)).await.unwrap();
    }
}

async fn reply_seqs(client: &mut Client, count: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for _ in 0..count {
        seqs.push(next_json(client).await["seq"].as_u64().unwrap());
    }
    seqs
}

/// Slow first, fast later: only the layer can make the replies come in send order. The
/// delays are at least 200 ms apart, so a loaded machine cannot swap two replies.
const FRAMES: [(u64, u64); 4] = [(1, 800), (2, 200), (3, 500), (4, 0)];

#[tokio::test]
async fn websocket_sync_replies_in_send_order() {
    let url = start_server(websocket::ServerMode::Sync).await;
    let mut client = connect(&url).await;
    send_frames(&mut client, &FRAMES).await;
    assert_eq!(reply_seqs(&mut client, 4).await, [1, 2, 3, 4]);
}

#[tokio::test]
async fn websocket_concurrent_replies_in_completion_order() {
    let url = start_server(websocket::ServerMode::Concurrent).await;
    let mut client = connect(&url).await;
    send_frames(&mut client, &FRAMES).await;
    assert_eq!(reply_seqs(&mut client, 4).await, [4, 2, 3, 1]);
}

#[tokio::test]
async fn websocket_connections_do_not_wait_for_each_other() {
    let url = start_server(websocket::ServerMode::Sync).await;
    let mut slow = connect(&url).await;
    let mut fast = connect(&url).await;
    // Far longer than the fast reply can take, even on a loaded machine.
    send_frames(&mut slow, &[(1, 5_000)]).await;
    send_frames(&mut fast, &[(7, 0)]).await;
    assert_eq!(reply_seqs(&mut fast, 1).await, [7]);
    // The fast connection's reply came while the slow connection's handler still ran.
    assert!(futures::FutureExt::now_or_never(slow.next()).is_none());
    assert_eq!(reply_seqs(&mut slow, 1).await, [1]);
}

#[tokio::test]
async fn websocket_bad_frames_get_error_replies_and_the_connection_stays_up() {
    let url = start_server(websocket::ServerMode::Sync).await;
    let mut client = connect(&url).await;
    client.send(Message::text("not json")).await.unwrap();
    client
        .send(Message::text(r#"{"seq": "one", "delay_ms": 1}"#))
        .await
        .unwrap();
    client.send(Message::text(r#"{"seq": 1}"#)).await.unwrap();
    client.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    for _ in 0..4 {
        let reply = next_json(&mut client).await;
        assert!(reply["error"].is_string(), "{reply}");
    }
    send_frames(&mut client, &[(9, 0)]).await;
    assert_eq!(reply_seqs(&mut client, 1).await, [9]);
}

// ---- ledger ----

fn ledger_line<'a>(lines: &'a [String], label: &str) -> &'a str {
    lines
        .iter()
        .find(|line| line.starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line in {lines:#?}"))
}

/// Few accounts and many tasks, so that most requests share an account with another
/// one in flight.
fn small_ledger() -> ledger::Config {
    ledger::Config {
        accounts: 8,
        transfers: 400,
        deposits: 40,
        reads: 40,
        tasks: 16,
        ..ledger::Config::default()
    }
}

// On a paused clock, reaching the timeout proves a deadlock: the clock moves only when no
// task can run, to the next timer, so it passes the 1 ms round trips and reaches 2 s only
// once no task sleeps and none can run.
#[tokio::test(start_paused = true)]
async fn ledger_sync_all_keeps_the_books_where_per_account_mutexes_deadlock() {
    // The same bound turns a layer that hangs into a failure.
    let summary = tokio::time::timeout(Duration::from_secs(60), ledger::run(small_ledger()))
        .await
        .expect("the layer's and the global lock's runs finish")
        .unwrap();
    let lines = summary.lines();
    let layer = ledger_line(&lines, "sync_all layer:");
    assert!(
        layer.ends_with(" req/s, conserved, in call order"),
        "{layer}"
    );
    let global = ledger_line(&lines, "global lock:");
    assert!(global.contains(" req/s, conserved, "), "{global}");
    let per_account = ledger_line(&lines, "per-account mutexes:");
    assert!(
        per_account.contains(" deadlocked (timed out after 2 s, "),
        "{per_account}"
    );
    assert!(summary.passed(), "{summary:#?}");
}

// Threads, as the program runs on: requests of one account on both at once. The clock is
// real, so nothing timed is asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_sync_all_keeps_the_books_on_two_worker_threads() {
    let summary = ledger::run(ledger::Config {
        // Deadlocked or not, the per-account mutexes are not what this test is about.
        deadlock_timeout: Duration::from_millis(100),
        ..small_ledger()
    })
    .await
    .unwrap();
    let lines = summary.lines();
    let layer = ledger_line(&lines, "sync_all layer:");
    assert!(
        layer.ends_with(" req/s, conserved, in call order"),
        "{layer}"
    );
    assert!(summary.passed(), "{summary:#?}");
}

// ---- soak ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaled_down_soak_keeps_order_and_leaks_nothing() {
    support::quiet_handler_panics();
    let summary = soak::run(soak::Config {
        requests: 200_000,
        keys: 500,
        in_flight: 2_000,
        progress: false,
    })
    .await
    .unwrap();
    assert_eq!(summary.order_violations, 0);
    assert_eq!(summary.leaked_keys, 0);
    assert_eq!(summary.completed, summary.fault_free, "{summary:?}");
}
