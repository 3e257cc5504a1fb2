//! A Socket.IO server (socketioxide on axum) whose every event, from every socket, goes
//! through one `SyncEngine` keyed by socket id: TornadIO2's `sync_engine` around a whole
//! `on_event`.
//!
//! ```sh
//! cargo run -p tower-sync-engine-socketio-tests --example socketio -- --addr 127.0.0.1:3000 --mode sync
//! ```
//!
//! It belongs to the workspace package of its tests (`tests/socketio/`), not to the crate's
//! own examples: socketioxide brings its own versions of tungstenite and matchit beside
//! axum's, and needs a newer Rust than the crate, so the crate's other examples and tests
//! build without it.
//!
//! Namespace `/`, for Socket.IO v5 clients over WebSocket or HTTP long-polling:
//!
//! - `work` with `{"seq": <u64>, "delay_ms": <u64>}`: the handler works for about
//!   `delay_ms`, then answers the client's ack with `{"seq": <u64>}` (when the client asked
//!   for one) and emits `done` with `{"seq": <u64>}` to that socket.
//! - `typing`, with any payload: relayed at once as `typing` with `{"id": <socket id>}` to
//!   the namespace's other sockets, then acked with `{}`. The policy makes it
//!   `Mode::Concurrent` by its name, so it never waits behind the socket's `work`.
//! - A bad payload or an unknown event gets an `error` event with
//!   `{"event": <name>, "message": <text>}` (and, when the client asked for an ack, the ack
//!   `{"error": <text>}`); the socket stays connected.
//!
//! With `--mode sync` a socket's `work` events run one at a time in the order the socket
//! sent them, so its acks and `done` events come in that order. With `--mode concurrent`
//! they run at once and answer in completion order. Sockets never wait for each other.
//!
//! # Call the service in the synchronous part of the handler
//!
//! socketioxide handles an event in two steps. First, in the order the packets arrive on
//! the socket's transport, it runs the extractors and calls the handler function. Then it
//! `tokio::spawn`s the future that the handler returned. A multi-threaded runtime starts
//! those spawned tasks in no particular order.
//!
//! An event takes its place in its socket's line inside [`Service::call`]. So `call()`
//! belongs in the first step: the handler is a plain closure (not `async`) that calls the
//! service and returns the response future, and only the waiting is spawned. That is
//! [`on_event`], the handler this server uses:
//!
//! ```text
//! socket.on_fallback(move |socket, Event(name), TryData(data), ack| {
//!     let response = events.clone().call(SocketEvent { .. });  // in packet order
//!     async move { response.await }                           // spawned
//! });
//! ```
//!
//! An `async` handler that calls the service in its body (`async move |..| { events.call(..)
//! .await }`) looks the same but calls it only when its spawned task first runs, and two
//! events of one socket can then take their places in either order: the layer faithfully
//! keeps an order that is already wrong. [`on_event_called_late`] is that handler, kept
//! for comparison and not used. Put it in [`app`] instead of [`on_event`] and the sync tests
//! in `tests/socketio/socketio.rs` fail: tokio's multi-threaded scheduler runs the task
//! spawned last first, so the last of a burst of events read together tends to take its
//! place first.
//! Use [`on_event`].
//!
//! The handler itself has to be in place before the socket's first event, and the connect
//! handler is too late for that, even as a plain closure: socketioxide sends the client
//! its CONNECT packet first, and calls the connect handler after, in a task of its own. A
//! client answers CONNECT with its first events at once, and when that task's thread is
//! switched out between the two steps, they arrive with no handler and are dropped, with
//! no error on either side. A connect middleware runs before the socket joins its
//! namespace and before CONNECT is sent, so [`app`] registers `on_event` there
//! ([`register_on_connect`]).
//!
//! Between the same two steps socketioxide marks the socket connected, and until then it
//! refuses every emit on it (`SocketError::Closed`): an event that arrives in between runs,
//! but its `done` or `error` event is dropped. The connect handler comes right after that
//! mark, so [`mark_connected`] sets a signal of the socket's, and each event's spawned part
//! waits for it before the dispatcher's future starts. That costs nothing in order, which
//! `call()` has already fixed.
//!
//! The glue is a few lines of this example rather than a feature of the crate: it depends
//! on socketioxide's handler traits and minimum Rust, which the layer itself does not.
//!
//! # Disconnects
//!
//! Events that a socket sent before it disconnected still run, in order, to completion:
//! that is what socketioxide does with any handler (it does not cancel spawned handlers),
//! and an event the server has received may have effects the client counts on. Their acks
//! and `done` events have nowhere to go and are dropped. `max_queue_per_key`
//! ([`MAX_QUEUED_PER_SOCKET`]) bounds the work a client can leave behind; once the last
//! one finishes, the socket's key is gone and the layer's `stats()` is idle again. To drop them instead, race each response future
//! against a signal set by `socket.on_disconnect`: dropping a response future leaves the
//! line at once.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::Sid;
use tokio::net::TcpListener;
use tokio::sync::SetOnce;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, service_fn};
use tower_sync_engine::{Mode, Stats, SyncEngine, SyncEngineLayer};

// The other example servers' command line, shared with them.
#[path = "../../../examples/common/server_args.rs"]
mod server_args;

pub use server_args::ServerMode;

/// How many events a socket may have waiting; more are answered with `error`.
pub const MAX_QUEUED_PER_SOCKET: usize = 1024;

/// One event from one socket: what the whole `on_event` dispatcher receives.
pub struct SocketEvent {
    socket: SocketRef,
    name: String,
    /// The event's first argument, or why it could not be read.
    data: Result<Value, String>,
    ack: AckSender,
}

impl SocketEvent {
    fn new(
        socket: &SocketRef,
        name: &str,
        data: Result<Value, socketioxide::ParserError>,
        ack: AckSender,
    ) -> Self {
        SocketEvent {
            socket: socket.clone(),
            name: name.to_owned(),
            data: data.map_err(|error| error.to_string()),
            ack,
        }
    }
}

/// `work`'s payload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Work {
    seq: u64,
    delay_ms: u64,
}

/// The ack and the `done` event of a `work` event.
#[derive(Debug, Serialize)]
struct Done {
    seq: u64,
}

type Policy = fn(&SocketEvent) -> Mode<Sid>;

/// Every event of every socket goes through this one service.
pub type Events = SyncEngine<BoxCloneSyncService<SocketEvent, (), BoxError>, Policy, Sid>;

/// `--mode sync`: a socket's events one at a time, except `typing`, whose order does not
/// matter.
fn by_socket(event: &SocketEvent) -> Mode<Sid> {
    match event.name.as_str() {
        "typing" => Mode::Concurrent,
        _ => Mode::Sync(event.socket.id),
    }
}

/// `--mode concurrent`: every event at once, as socketioxide runs them by itself.
fn all_concurrent(_: &SocketEvent) -> Mode<Sid> {
    Mode::Concurrent
}

/// What a running server exposes to its owner (and to the tests).
#[derive(Clone)]
pub struct Server {
    layer: SyncEngineLayer<Policy, Sid>,
    io: SocketIo,
    work_done: Arc<AtomicU64>,
}

impl Server {
    /// The ordering domain's counts: sockets with events running or waiting.
    pub fn stats(&self) -> Stats {
        self.layer.stats()
    }

    /// The socketioxide handle: connected sockets, their transports.
    pub fn io(&self) -> &SocketIo {
        &self.io
    }

    /// How many `work` events have finished, whether or not their socket was still there.
    pub fn work_done(&self) -> u64 {
        self.work_done.load(Ordering::Relaxed)
    }
}

/// The `on_event` dispatcher behind the layer: one handler per event name.
fn dispatcher(work_done: Arc<AtomicU64>) -> BoxCloneSyncService<SocketEvent, (), BoxError> {
    BoxCloneSyncService::new(service_fn(move |event: SocketEvent| {
        let work_done = Arc::clone(&work_done);
        async move {
            match event.name.as_str() {
                "work" => work(event, &work_done).await,
                "typing" => typing(event).await,
                other => {
                    let message = format!("unknown event {other:?}: expected work or typing");
                    reject(event, message);
                }
            }
            Ok::<_, BoxError>(())
        }
    }))
}

async fn work(event: SocketEvent, work_done: &AtomicU64) {
    let parsed = match &event.data {
        Ok(data) => Work::deserialize(data)
            .map_err(|error| format!("expected {{\"seq\": u64, \"delay_ms\": u64}}: {error}")),
        Err(error) => Err(error.clone()),
    };
    let work = match parsed {
        Ok(work) => work,
        Err(message) => return reject(event, message),
    };
    tokio::time::sleep(Duration::from_millis(work.delay_ms)).await;
    let done = Done { seq: work.seq };
    // A socket that has gone can take neither; its events still run (see the module docs).
    let _ = event.ack.send(&done);
    let _ = event.socket.emit("done", &done);
    work_done.fetch_add(1, Ordering::Relaxed);
}

async fn typing(event: SocketEvent) {
    let typing = json!({ "id": event.socket.id.to_string() });
    let _ = event.socket.broadcast().emit("typing", &typing).await;
    let _ = event.ack.send(&json!({}));
}

/// Answers a bad event with `error` (and its ack, if the client asked for one).
fn reject(event: SocketEvent, message: String) {
    let _ = event.ack.send(&json!({ "error": message }));
    send_error(&event.socket, &event.name, message);
}

fn send_error(socket: &SocketRef, event: &str, message: String) {
    let _ = socket.emit("error", &json!({ "event": event, "message": message }));
}

/// Set once socketioxide has marked its socket connected, which it does after it has sent
/// the client CONNECT; until then, the socket's emits fail (see the module docs).
#[derive(Clone, Default)]
struct Connected(Arc<SetOnce<()>>);

/// The right handler: `call()` in the synchronous part, so each event takes its place in
/// its socket's line in the order socketioxide received it. Register it from a connect
/// middleware ([`register_on_connect`]), with [`mark_connected`] as the connect handler.
pub fn on_event(socket: &SocketRef, events: Events) {
    let connected = Connected::default();
    socket.extensions.insert(connected.clone());
    socket.on_fallback(
        move |socket: SocketRef,
              Event(name): Event,
              TryData(data): TryData<Value>,
              ack: AckSender| {
            let event = SocketEvent::new(&socket, &name, data, ack);
            // `SyncEngine::poll_ready` is always ready, so the service is called at once.
            let response = events.clone().call(event);
            let connected = connected.clone();
            // Spawned by socketioxide: waits for the event's turn and runs the handler.
            async move {
                // The dispatcher's future has not started yet: it answers only once the
                // socket is marked connected, so that its emits are not refused.
                connected.0.wait().await;
                if let Err(error) = response.await {
                    // `Overloaded`: the socket already has `MAX_QUEUED_PER_SOCKET` waiting.
                    send_error(&socket, &name, error.to_string());
                }
            }
        },
    );
}

/// The wrong handler, for comparison; not used. The body of an `async` handler runs in
/// the task socketioxide spawns, so `call()` runs whenever the runtime first polls that
/// task, and two events of a socket may take their places in either order.
#[allow(dead_code)]
pub fn on_event_called_late(socket: &SocketRef, events: Events) {
    socket.on_fallback(
        async move |socket: SocketRef,
                    Event(name): Event,
                    TryData(data): TryData<Value>,
                    ack: AckSender| {
            let event = SocketEvent::new(&socket, &name, data, ack);
            if let Err(error) = events.clone().call(event).await {
                send_error(&socket, &name, error.to_string());
            }
        },
    );
}

/// A connect middleware that registers [`on_event`] on each socket. socketioxide runs it
/// before the socket joins the namespace and before it sends the client CONNECT, so no
/// event can arrive first (see the module docs). It never refuses a socket.
pub fn register_on_connect(
    events: Events,
) -> impl Fn(SocketRef) -> Ready<Result<(), Infallible>> + Clone + Send + Sync + 'static {
    move |socket: SocketRef| {
        on_event(&socket, events.clone());
        ready(Ok(()))
    }
}

/// The connect handler: socketioxide calls it right after it marks the socket connected,
/// so it lets the events that arrived before that answer (see [`on_event`]).
pub fn mark_connected(socket: SocketRef) -> Ready<()> {
    if let Some(Connected(connected)) = socket.extensions.get::<Connected>() {
        // Only the first call sets it; socketioxide calls this once per socket.
        let _ = connected.set(());
    }
    ready(())
}

/// The axum app, with socketioxide mounted as a layer, and its [`Server`] handle.
pub fn app(ordering: ServerMode) -> (Router, Server) {
    let policy: Policy = match ordering {
        ServerMode::Sync => by_socket,
        ServerMode::Concurrent => all_concurrent,
    };
    let layer = SyncEngineLayer::new(policy).max_queue_per_key(MAX_QUEUED_PER_SOCKET);
    let work_done = Arc::new(AtomicU64::new(0));
    let events: Events = layer.layer(dispatcher(Arc::clone(&work_done)));

    let (socketio, io) = SocketIo::new_layer();
    // `on_event` goes in before CONNECT is sent: in a middleware, not the connect handler.
    io.ns("/", mark_connected.with(register_on_connect(events)));
    let server = Server {
        layer,
        io,
        work_done,
    };
    (Router::new().layer(socketio), server)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (addr, ordering) = server_args::parse_or_exit("socketio");
    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let (app, _server) = app(ordering);
    axum::serve(listener, app).await?;
    Ok(())
}
