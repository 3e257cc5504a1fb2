//! An axum HTTP service where requests with the same `x-session-id` run one at a time,
//! in arrival order, and requests without the header run concurrently.
//!
//! ```sh
//! cargo run --example http_session -- --addr 127.0.0.1:3000
//! curl -H 'x-session-id: alice' 'http://127.0.0.1:3000/work?ms=500&tag=a'
//! ```
//!
//! The stack, outermost first: `TraceLayer`, `HandleErrorLayer` (this crate's errors
//! and timeouts become responses), a 2 s timeout (it covers the wait for the session as
//! well as the handler), and the ordering layer.
//!
//! Errors become responses the axum way, with `HandleErrorLayer`:
//! `Overloaded` → 503 Service Unavailable, timeout → 408 Request Timeout.
//!
//! Every response carries `x-served-by: ADDR`, the instance's listening address, so that
//! behind a load balancer (`deploy/cluster.sh`) a client sees where each request went.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Query, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use serde::Deserialize;
use tower::timeout::error::Elapsed;
use tower::{BoxError, ServiceBuilder};
use tower_http::trace::TraceLayer;
use tower_sync_engine::error::Overloaded;
use tower_sync_engine::{Mode, SyncEngineLayer};

/// The header that names a session.
pub const SESSION: &str = "x-session-id";

/// The response header that names the instance that served a request.
pub const SERVED_BY: &str = "x-served-by";

#[derive(Deserialize)]
struct Work {
    ms: u64,
    tag: String,
}

async fn work(Query(work): Query<Work>) -> String {
    tokio::time::sleep(Duration::from_millis(work.ms)).await;
    work.tag
}

/// Turns the stack's errors into responses.
pub async fn handle_error(error: BoxError) -> (StatusCode, String) {
    if error.is::<Overloaded>() {
        (StatusCode::SERVICE_UNAVAILABLE, error.to_string())
    } else if error.is::<Elapsed>() {
        (StatusCode::REQUEST_TIMEOUT, "request timed out".to_owned())
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
    }
}

/// Two routes behind one layer value: they share one ordering domain, so a session's
/// requests are ordered across both.
pub fn app(max_queue_per_session: usize) -> Router {
    let by_session =
        SyncEngineLayer::new(|request: &Request| match request.headers().get(SESSION) {
            Some(session) => Mode::Sync(session.clone()),
            None => Mode::Concurrent,
        })
        .max_queue_per_key(max_queue_per_session);

    Router::new()
        .route("/work", post(work))
        .route("/other", post(work))
        .layer(
            ServiceBuilder::new()
                .layer(TraceLayer::new_for_http())
                .layer(HandleErrorLayer::new(handle_error))
                .timeout(Duration::from_secs(2))
                .layer(by_session),
        )
}

/// Adds `x-served-by: ADDR` to every response of `app`, errors included.
pub fn served_by(app: Router, instance: SocketAddr) -> Router {
    let name = HeaderValue::try_from(instance.to_string()).expect("an address is a header value");
    app.layer(axum::middleware::map_response(
        move |mut response: Response| {
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
