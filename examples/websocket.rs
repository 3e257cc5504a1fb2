//! An axum WebSocket server whose per-connection order comes from the layer alone.
//!
//! ```sh
//! cargo run --example websocket -- --addr 127.0.0.1:3000 --mode sync
//! ```
//!
//! `GET /ws` upgrades to a WebSocket. Each text frame is JSON
//! `{"seq": <u64>, "delay_ms": <u64>}`; the handler works for about `delay_ms` and then
//! replies `{"seq": <u64>}` on the same connection.
//!
//! The read loop never waits for handlers: it hands each message to the layered service
//! and keeps reading. With `--mode sync` the layer keys requests by connection, so a
//! connection's replies come in the order it sent; with `--mode concurrent` they come in
//! completion order. Connections never wait for each other. A bad frame gets an
//! `{"error": ...}` reply and the connection stays open.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};

#[path = "common/server_args.rs"]
mod server_args;

pub use server_args::ServerMode;

/// A client frame.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Frame {
    seq: u64,
    delay_ms: u64,
}

/// A message on its way to the handler.
pub struct Event {
    connection: u64,
    seq: u64,
    delay: Duration,
    /// The connection's outgoing frames. The handler replies itself, as a Socket.IO
    /// handler emits, so the reply order is the handler completion order.
    reply: mpsc::UnboundedSender<Message>,
}

type EventService = BoxCloneSyncService<Event, (), BoxError>;

/// The handler behind the layer: work for `delay`, then reply with the sequence number.
fn handler()
-> impl Service<Event, Response = (), Error = BoxError, Future: Send> + Clone + Send + Sync + 'static
{
    service_fn(|event: Event| async move {
        tokio::time::sleep(event.delay).await;
        let reply = serde_json::json!({ "seq": event.seq }).to_string();
        // The client may have gone; that is not the handler's error.
        let _ = event.reply.send(Message::Text(reply.into()));
        Ok::<_, BoxError>(())
    })
}

#[derive(Clone)]
struct AppState {
    events: EventService,
    next_connection: Arc<AtomicU64>,
}

/// The axum app: `GET /ws`.
pub fn app(ordering: ServerMode) -> Router {
    let layer = SyncEngineLayer::new(move |event: &Event| match ordering {
        ServerMode::Sync => Mode::Sync(event.connection),
        ServerMode::Concurrent => Mode::Concurrent,
    });
    let state = AppState {
        events: BoxCloneSyncService::new(layer.layer(handler())),
        next_connection: Arc::new(AtomicU64::new(0)),
    };
    Router::new().route("/ws", get(upgrade)).with_state(state)
}

/// Serves the app on `listener` until the process ends.
pub async fn serve(listener: TcpListener, ordering: ServerMode) -> std::io::Result<()> {
    axum::serve(listener, app(ordering)).await
}

async fn upgrade(ws: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    let connection = state.next_connection.fetch_add(1, Ordering::Relaxed);
    ws.on_upgrade(move |socket| connection_loop(socket, connection, state.events))
}

async fn connection_loop(socket: WebSocket, connection: u64, mut events: EventService) {
    let (mut sink, mut stream) = socket.split();
    let (reply, mut outgoing) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::spawn(async move {
        while let Some(message) = outgoing.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
    });

    while let Some(Ok(message)) = stream.next().await {
        let frame = match message {
            Message::Text(text) => serde_json::from_str::<Frame>(&text)
                .map_err(|error| format!("expected {{\"seq\": u64, \"delay_ms\": u64}}: {error}")),
            Message::Binary(_) => Err("binary frames are not supported".to_owned()),
            Message::Close(_) => break,
            // axum answers pings itself.
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                let _ = reply.send(Message::Text(
                    serde_json::json!({ "error": error }).to_string().into(),
                ));
                continue;
            }
        };
        let event = Event {
            connection,
            seq: frame.seq,
            delay: Duration::from_millis(frame.delay_ms),
            reply: reply.clone(),
        };
        // `call` takes the message's place on its connection; the read loop moves on.
        let Ok(service) = events.ready().await else {
            break;
        };
        let response = service.call(event);
        let reply = reply.clone();
        let seq = frame.seq;
        tokio::spawn(async move {
            if let Err(error) = response.await {
                let message = serde_json::json!({ "seq": seq, "error": error.to_string() });
                let _ = reply.send(Message::Text(message.to_string().into()));
            }
        });
    }
    drop(reply);
    // Replies still being handled keep the writer alive until they are sent.
    let _ = writer.await;
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (addr, ordering) = server_args::parse_or_exit("websocket");
    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    serve(listener, ordering).await?;
    Ok(())
}
