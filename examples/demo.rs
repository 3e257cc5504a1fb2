//! TornadIO2's `sync_engine` scenario, for real.
//!
//! One connection quickly sends four messages. Each handler fetches a URL with an async
//! HTTP client (the seed's `AsyncHTTPClient.fetch`) from a slow backend that this
//! program starts on `127.0.0.1:0`; the backend takes a different time for each.
//!
//! - `Mode::Sync(connection)`: the responses complete in the order the messages were sent.
//! - `Mode::Concurrent`: they complete in the order the backend answers.
//!
//! Run with `cargo run --example demo`. No flags; nothing outside the process is used.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};

/// Message number and how long the backend takes to answer its fetch.
const MESSAGES: [(u64, u64); 4] = [(1, 800), (2, 200), (3, 500), (4, 20)];

/// What the connection sends.
struct Message {
    connection: u64,
    seq: u64,
    backend_ms: u64,
}

/// One mode's result.
pub struct Run {
    /// Message numbers in the order their responses completed.
    pub completed: Vec<u64>,
    pub elapsed: Duration,
}

/// Starts the slow backend: `GET /work?seq=S&ms=N` answers `S` after N milliseconds.
async fn start_backend() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let serve = hyper::service::service_fn(|request: Request<Incoming>| async move {
                let query = request.uri().query().unwrap_or_default();
                let param = |name: &str| -> u64 {
                    query
                        .split('&')
                        .filter_map(|pair| pair.split_once('='))
                        .find(|(key, _)| *key == name)
                        .and_then(|(_, value)| value.parse().ok())
                        .unwrap_or(0)
                };
                tokio::time::sleep(Duration::from_millis(param("ms"))).await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                    param("seq").to_string(),
                ))))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), serve)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Sends every message on one connection as fast as possible through the layer.
async fn run(backend: SocketAddr, sync: bool) -> Result<Run, BoxError> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    // The handler: fetch a URL, as the seed's `on_message` does.
    let handler = service_fn(move |msg: Message| {
        let client = client.clone();
        async move {
            let uri = format!(
                "http://{backend}/work?seq={}&ms={}",
                msg.seq, msg.backend_ms
            );
            let response = client.get(uri.parse()?).await?;
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(std::str::from_utf8(&body)?.parse::<u64>()?)
        }
    });
    let layer = SyncEngineLayer::new(move |msg: &Message| {
        if sync {
            Mode::Sync(msg.connection)
        } else {
            Mode::Concurrent
        }
    });
    let mut service = layer.layer(handler);

    let started = Instant::now();
    let (done, mut completions) = tokio::sync::mpsc::unbounded_channel();
    for (seq, backend_ms) in MESSAGES {
        let message = Message {
            connection: 1,
            seq,
            backend_ms,
        };
        // The message's place in line is taken here, before anything is awaited.
        let response = service.ready().await?.call(message);
        let done = done.clone();
        tokio::spawn(async move { done.send(response.await) });
    }
    drop(done);
    let mut completed = Vec::new();
    while let Some(result) = completions.recv().await {
        completed.push(result?);
    }
    Ok(Run {
        completed,
        elapsed: started.elapsed(),
    })
}

/// Runs both modes and returns the report's lines.
pub async fn report() -> Result<Vec<String>, BoxError> {
    let backend = start_backend().await?;
    let mut lines = vec![format!(
        "one connection sends messages 1 2 3 4; each handler fetches from a backend that takes {} ms",
        MESSAGES.map(|(_, ms)| ms.to_string()).join(", ")
    )];
    for (label, sync) in [("sync", true), ("concurrent", false)] {
        let run = run(backend, sync).await?;
        let order: Vec<String> = run.completed.iter().map(u64::to_string).collect();
        lines.push(format!("{label}: {}", order.join(" ")));
        lines.push(format!("  ({label} took {} ms)", run.elapsed.as_millis()));
    }
    lines.push(
        "sync handles the connection's messages one at a time in arrival order; \
         concurrent lets fast ones overtake."
            .to_owned(),
    );
    Ok(lines)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    for line in report().await? {
        println!("{line}");
    }
    Ok(())
}
