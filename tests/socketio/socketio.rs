//! This package's `examples/socketio.rs` end to end, on loopback, with sioc: a Socket.IO v5
//! client library, over WebSocket and over HTTP long-polling, on a multi-threaded runtime.
//!
//! Every wait is bounded, so a lost event fails the test instead of hanging it.
//!
//! The client is sioc, which numbers its acks. rust_socketio 0.6 draws each ack id at
//! random below 999: with twenty acks in flight, about one time in six two of them share
//! an id, and an answer goes to the wrong callback.

#[allow(dead_code)]
#[path = "examples/socketio.rs"]
mod socketio;

use std::future::pending;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::{FutureExt, future};
use serde_json::{Value, json};
use sioc::prelude::*;
use socketio::{Server, ServerMode};
use socketioxide::TransportType;
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite;
use url::Url;

/// The longest any single step may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

/// `work`, with an ack. The field is the event's one argument, sent as it is, so that the
/// tests can also send payloads the server must refuse.
#[derive(Debug, EventType, SerializePayload)]
#[sioc(event(name = "work", ack = "Reply"))]
struct Work(Value);

/// `typing`, with an ack.
#[derive(Debug, EventType, SerializePayload)]
#[sioc(event(name = "typing", ack = "Reply"))]
struct Typing(Value);

/// An event the server does not know.
#[derive(Debug, EventType, SerializePayload)]
#[sioc(event(name = "dance"))]
struct Dance(Value);

/// Any ack: its one argument.
#[derive(Debug, AckType, DeserializePayload)]
struct Reply(Value);

#[derive(Clone, Copy, Debug)]
enum Transport {
    WebSocket,
    Polling,
}

async fn start(mode: ServerMode) -> (Url, Server) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (app, server) = socketio::app(mode);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (Url::parse(&format!("http://{addr}")).unwrap(), server)
}

/// A client connected to namespace `/`.
struct Client {
    /// Keeps the connection's tasks running.
    _client: sioc::client::Client,
    tx: SocketSender,
    rx: SocketReceiver,
    sid: String,
}

async fn connect(url: &Url, transport: Transport) -> Client {
    let builder = ClientBuilder::new(url.clone());
    let client = match transport {
        Transport::WebSocket => builder.transport(TransportStrategy::WebSocket).open(),
        // Starts on long-polling and, like a client behind a proxy that blocks WebSockets,
        // never manages to upgrade: every packet goes over HTTP requests.
        Transport::Polling => builder
            .transport(TransportStrategy::Polling)
            .websocket_connector(|_: Url| pending::<Result<WebSocketStream, tungstenite::Error>>())
            .open(),
    }
    .unwrap();
    let (tx, mut rx) = client.connect("/").await.unwrap();
    let sid = match timeout(WAIT, rx.recv()).await {
        Ok(Some(Signal::Connect(connect))) => connect.sid.to_string(),
        other => panic!("expected the namespace to connect, got {other:?}"),
    };
    Client {
        _client: client,
        tx,
        rx,
        sid,
    }
}

/// The next event the server emitted to this client: its name and first argument.
async fn next_event(client: &mut Client) -> (String, Value) {
    loop {
        let signal = timeout(WAIT, client.rx.recv())
            .await
            .expect("an event within the time limit")
            .expect("the connection stays open");
        match signal {
            Signal::Event(event) => {
                let mut args: Vec<Value> = serde_json::from_str(&event.payload).unwrap();
                let name = args.remove(0).as_str().unwrap().to_owned();
                let first = args.into_iter().next().unwrap_or(Value::Null);
                return (name, first);
            }
            Signal::Connect(_) => continue,
            other => panic!("the socket should stay connected, got {other:?}"),
        }
    }
}

fn seq(value: &Value) -> u64 {
    value["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected {{\"seq\": u64}}, got {value}"))
}

/// Sends one `work` event per `(seq, delay_ms)`, all at once, each asking for an ack.
/// Returns the sequence numbers of the acks and of the `done` events, each in the order
/// they arrived.
async fn send_work(client: &mut Client, frames: &[(u64, u64)]) -> (Vec<u64>, Vec<u64>) {
    // Yields each ack as it arrives: the client completes them in the order their packets
    // come in, and `FuturesUnordered` yields completed futures in the order they woke.
    let mut acks = FuturesUnordered::new();
    for &(seq, delay_ms) in frames {
        let work = Work(json!({ "seq": seq, "delay_ms": delay_ms }));
        acks.push(client.tx.emit(work).await.unwrap());
    }
    let count = frames.len();
    let ack_order = async {
        let mut order = Vec::new();
        while let Some(ack) = acks.next().await {
            order.push(seq(&ack.expect("an ack").payload.0));
        }
        order
    };
    let done_order = async {
        let mut order = Vec::new();
        while order.len() < count {
            let (name, data) = next_event(client).await;
            assert_eq!(name, "done", "{data}");
            order.push(seq(&data));
        }
        order
    };
    timeout(WAIT, future::join(ack_order, done_order))
        .await
        .expect("every ack and done event within the time limit")
}

/// Waits, within the time limit, until `condition` holds.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The server saw each of its sockets arrive over `transport`.
fn assert_transport(server: &Server, transport: Transport) {
    let expected = match transport {
        Transport::WebSocket => TransportType::Websocket,
        Transport::Polling => TransportType::Polling,
    };
    let sockets = server.io().sockets();
    assert!(!sockets.is_empty());
    for socket in sockets {
        assert_eq!(socket.transport_type(), expected);
    }
}

/// 20 events sent at once, slow first: the handlers finish in reverse unless something
/// keeps them in order. Event `seq` works for `(21 - seq) * step_ms` ms.
fn decreasing_delays(step_ms: u64) -> Vec<(u64, u64)> {
    (1..=20).map(|seq| (seq, (21 - seq) * step_ms)).collect()
}

/// Three clients side by side: each gets its acks and `done` events in the order it sent
/// them, and none waits for another.
async fn three_clients_side_by_side(transport: Transport) {
    let (url, server) = start(ServerMode::Sync).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&url, transport).await);
    }
    assert_transport(&server, transport);

    let frames = decreasing_delays(3);
    let sent: Vec<u64> = frames.iter().map(|&(seq, _)| seq).collect();
    let one_client = Duration::from_millis(frames.iter().map(|&(_, ms)| ms).sum());

    let started = Instant::now();
    let results =
        future::join_all(clients.iter_mut().map(|client| send_work(client, &frames))).await;
    let elapsed = started.elapsed();

    for (acks, dones) in results {
        assert_eq!(acks, sent, "acks in send order");
        assert_eq!(dones, sent, "done events in send order");
    }
    // Each client's events ran one at a time: at least one client's total...
    assert!(elapsed >= one_client, "{elapsed:?} < {one_client:?}");
    // ...and the clients ran side by side: far from three clients' total.
    assert!(
        elapsed < one_client * 2,
        "{elapsed:?} >= 2 × {one_client:?}"
    );

    eventually("the layer is idle", || server.stats().is_idle()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_over_websocket_keeps_each_sockets_order_and_sockets_run_side_by_side() {
    three_clients_side_by_side(Transport::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_over_long_polling_keeps_each_sockets_order_and_sockets_run_side_by_side() {
    three_clients_side_by_side(Transport::Polling).await;
}

/// Without the ordering, the same client gets the fast events' answers first.
async fn concurrent_reorders(transport: Transport) {
    let (url, server) = start(ServerMode::Concurrent).await;
    let mut client = connect(&url, transport).await;
    assert_transport(&server, transport);

    // Event 1 must still be working when event 20 has finished: 285 ms apart, so that a
    // busy machine, slow to send the 20 events, does not change the order.
    let frames = decreasing_delays(15);
    let (acks, dones) = send_work(&mut client, &frames).await;

    let position = |order: &[u64], seq: u64| order.iter().position(|&s| s == seq).unwrap();
    for order in [&acks, &dones] {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (1..=20).collect::<Vec<_>>(),
            "every event answered once"
        );
        // Event 20 works for 15 ms, event 1 for 300 ms.
        assert!(position(order, 20) < position(order, 1), "{order:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_over_websocket_answers_in_completion_order() {
    concurrent_reorders(Transport::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_over_long_polling_answers_in_completion_order() {
    concurrent_reorders(Transport::Polling).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_concurrent_and_does_not_wait_behind_work() {
    let (url, _server) = start(ServerMode::Sync).await;
    let typist = connect(&url, Transport::WebSocket).await;
    let mut other = connect(&url, Transport::WebSocket).await;

    let work = typist
        .tx
        .emit(Work(json!({ "seq": 1, "delay_ms": 500 })))
        .await
        .unwrap();
    let typing = typist.tx.emit(Typing(json!({}))).await.unwrap();
    timeout(WAIT, typing).await.unwrap().unwrap();
    // `typing` was answered while the `work` sent before it still ran.
    let mut work = Box::pin(work);
    assert!((&mut work).now_or_never().is_none());

    let (name, data) = next_event(&mut other).await;
    assert_eq!(
        (name.as_str(), &data),
        ("typing", &json!({ "id": typist.sid }))
    );

    let ack = timeout(WAIT, work).await.unwrap().unwrap();
    assert_eq!(ack.payload.0, json!({ "seq": 1 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_get_an_error_event_and_the_socket_stays_usable() {
    let (url, _server) = start(ServerMode::Sync).await;
    let mut client = connect(&url, Transport::WebSocket).await;

    let bad = [
        json!("not an object"),
        json!({ "seq": "one", "delay_ms": 1 }),
        json!({ "seq": 1 }),
        json!({ "seq": 1, "delay_ms": 1, "extra": true }),
    ];
    for payload in bad {
        let ack = client.tx.emit(Work(payload.clone())).await.unwrap();
        let (name, data) = next_event(&mut client).await;
        assert_eq!(name, "error", "{payload} → {data}");
        assert_eq!(data["event"], "work");
        let message = data["message"].as_str().unwrap();
        assert!(message.contains("\"seq\": u64"), "{message}");
        // The ack, which the client asked for, carries the same message.
        let ack = timeout(WAIT, ack).await.unwrap().unwrap();
        assert_eq!(ack.payload.0, json!({ "error": message }));
    }

    client.tx.emit(Dance(json!({}))).await.unwrap();
    let (name, data) = next_event(&mut client).await;
    assert_eq!(name, "error");
    assert_eq!(data["event"], "dance");

    // Still connected, still in order.
    let frames = [(7, 20), (8, 0)];
    assert_eq!(
        send_work(&mut client, &frames).await,
        (vec![7, 8], vec![7, 8])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_leaves_with_events_queued_lets_them_finish_and_leaves_the_layer_idle() {
    let (url, server) = start(ServerMode::Sync).await;
    let client = connect(&url, Transport::WebSocket).await;

    let mut acks = Vec::new();
    for seq in 1..=5 {
        let work = Work(json!({ "seq": seq, "delay_ms": 150 }));
        acks.push(client.tx.emit(work).await.unwrap());
    }
    // The first has run: the other four are running or waiting.
    let first = timeout(WAIT, acks.remove(0)).await.unwrap().unwrap();
    assert_eq!(first.payload.0, json!({ "seq": 1 }));
    client.tx.disconnect().await;
    eventually("the server drops the socket", || {
        server.io().sockets().is_empty()
    })
    .await;

    // Gone, but its events still hold the line (see "Disconnects" in the example)...
    let stats = server.stats();
    assert!(!stats.is_idle(), "{stats:?}");
    assert_eq!(stats.keys, 1, "{stats:?}");
    // ...until the last one has run; then nothing is left.
    eventually("the layer is idle", || server.stats().is_idle()).await;
    assert_eq!(server.work_done(), 5);
}

/// How many sockets `an_event_sent_the_moment_the_socket_connects_is_answered` connects,
/// one after the other.
const EAGER_CLIENTS: u64 = 100;

/// Every socket sends its first event the moment its CONNECT arrives. socketioxide sends
/// CONNECT before it calls the connect handler, in a task of its own, and only between the
/// two marks the socket connected: an event that comes in before the handler is registered
/// is dropped, and one that comes in before the mark has its emits refused, without an
/// error on either side. The windows are narrow, so this connects many sockets, one at a
/// time, each with the other runtime thread idle to take the event. Registered in a
/// middleware, with the answers held until the connect handler has run (the example's
/// `register_on_connect` and `mark_connected`), every first event gets its ack and its
/// `done` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sent_the_moment_the_socket_connects_is_answered() {
    let (url, _server) = start(ServerMode::Sync).await;
    let mut lost = Vec::new();
    for seq in 0..EAGER_CLIENTS {
        let mut client = connect(&url, Transport::WebSocket).await;
        let work = Work(json!({ "seq": seq, "delay_ms": 0 }));
        let ack = client.tx.emit(work).await.unwrap();
        let answers = timeout(WAIT, async {
            let ack = ack.await.expect("an ack").payload.0;
            (ack, next_event(&mut client).await)
        })
        .await;
        match answers {
            Ok((ack, (name, data))) => {
                assert_eq!(ack, json!({ "seq": seq }));
                assert_eq!((name.as_str(), data), ("done", json!({ "seq": seq })));
            }
            Err(_) => lost.push(seq),
        }
    }
    assert!(
        lost.is_empty(),
        "no ack or no done event for the first event of sockets {lost:?}"
    );
}
