//! Wrapping a whole `on_event` dispatcher, at both of TornadIO2's granularities.
//!
//! An event router (`Service<Event>`) dispatches by event name to several handler
//! services, and the layer wraps the whole router:
//!
//! - key = connection: the whole `on_event` is serialized, like wrapping `on_event` with
//!   `sync_engine`;
//! - key = (connection, event name): each handler is serialized on its own, like
//!   decorating individual handlers.
//!
//! `typing` and `ping` are `Mode::Concurrent` in both: their order does not matter.
//!
//! Run with `cargo run --example dispatcher`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};

/// One Socket.IO-style event from a connection.
#[derive(Debug, Clone)]
pub struct Event {
    pub connection: u64,
    pub name: &'static str,
    pub id: u64,
    pub work: Duration,
}

impl Event {
    pub fn label(&self) -> String {
        format!("{}#{}", self.name, self.id)
    }
}

type Handler = BoxCloneSyncService<Event, String, BoxError>;

/// Dispatches each event to the handler registered for its name: the `on_event` of the
/// connection.
#[derive(Clone)]
pub struct EventRouter {
    handlers: Arc<HashMap<&'static str, Handler>>,
}

impl EventRouter {
    /// Every event name gets a handler that works for `event.work` and answers with the
    /// event's label.
    pub fn new(names: &[&'static str]) -> Self {
        let handlers = names
            .iter()
            .map(|&name| {
                let handler = service_fn(|event: Event| async move {
                    tokio::time::sleep(event.work).await;
                    Ok::<_, BoxError>(event.label())
                });
                (name, BoxCloneSyncService::new(handler))
            })
            .collect();
        EventRouter {
            handlers: Arc::new(handlers),
        }
    }
}

impl Service<Event> for EventRouter {
    type Response = String;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each handler's readiness is awaited by `oneshot` in the returned future.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        match self.handlers.get(event.name) {
            Some(handler) => Box::pin(handler.clone().oneshot(event)),
            None => {
                let error = format!("no handler for event {:?}", event.name);
                Box::pin(async move { Err(error.into()) })
            }
        }
    }
}

/// What a serialized event is keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// The whole `on_event` of a connection.
    Connection,
    /// Each handler of a connection on its own.
    Handler,
}

/// Whether an event's order matters.
fn is_ordered(event: &Event) -> bool {
    !matches!(event.name, "typing" | "ping")
}

/// The events one connection sends in quick succession.
pub fn script() -> Vec<Event> {
    [
        ("message", 300),
        ("join", 50),
        ("message", 10),
        ("typing", 5),
        ("ping", 1),
    ]
    .into_iter()
    .zip(1..)
    .map(|((name, millis), id)| Event {
        connection: 1,
        name,
        id,
        work: Duration::from_millis(millis),
    })
    .collect()
}

/// Sends the script through the layered router; returns the labels in completion order.
pub async fn run(granularity: Granularity) -> Result<Vec<String>, BoxError> {
    let router = EventRouter::new(&["message", "join", "typing", "ping"]);
    let mut on_event = match granularity {
        Granularity::Connection => BoxCloneSyncService::new(
            SyncEngineLayer::new(|event: &Event| match is_ordered(event) {
                true => Mode::Sync(event.connection),
                false => Mode::Concurrent,
            })
            .layer(router),
        ),
        Granularity::Handler => BoxCloneSyncService::new(
            SyncEngineLayer::new(|event: &Event| match is_ordered(event) {
                true => Mode::Sync((event.connection, event.name)),
                false => Mode::Concurrent,
            })
            .layer(router),
        ),
    };

    let (done, mut completions) = tokio::sync::mpsc::unbounded_channel();
    for event in script() {
        let response = on_event.ready().await?.call(event);
        let done = done.clone();
        tokio::spawn(async move { done.send(response.await) });
    }
    drop(done);
    let mut order = Vec::new();
    while let Some(label) = completions.recv().await {
        order.push(label?);
    }
    Ok(order)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let sent: Vec<String> = script()
        .iter()
        .map(|event| format!("{} ({} ms)", event.label(), event.work.as_millis()))
        .collect();
    println!("connection 1 sends: {}", sent.join(", "));
    println!(
        "key = connection:          {}",
        run(Granularity::Connection).await?.join(" ")
    );
    println!(
        "key = (connection, event): {}",
        run(Granularity::Handler).await?.join(" ")
    );
    println!("typing and ping are Concurrent in both and finish first.");
    Ok(())
}
