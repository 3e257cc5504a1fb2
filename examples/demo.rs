//! The TornadIO2 `sync_engine` scenario: one connection quickly sends several messages
//! whose handling takes different times.
//!
//! With `Mode::Sync(connection)` they finish in the order they were sent; with
//! `Mode::Concurrent` they finish in the order their work completes.
//!
//! Run with `cargo run --example demo`.

use std::time::{Duration, Instant};

use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};

struct Message {
    connection: u64,
    seq: u64,
    work: Duration,
}

/// Sends the messages as fast as possible and returns their sequence numbers in the
/// order their handling completed.
async fn run(sync: bool) -> Result<Vec<u64>, BoxError> {
    let handler = service_fn(|msg: Message| async move {
        tokio::time::sleep(msg.work).await;
        Ok::<_, BoxError>(msg.seq)
    });
    let layer = SyncEngineLayer::new(move |msg: &Message| {
        if sync {
            Mode::Sync(msg.connection)
        } else {
            Mode::Concurrent
        }
    });
    let mut service = layer.layer(handler);

    let (done, mut completed) = tokio::sync::mpsc::unbounded_channel();
    for (seq, millis) in [(1, 120), (2, 30), (3, 80), (4, 10)] {
        let message = Message {
            connection: 1,
            seq,
            work: Duration::from_millis(millis),
        };
        let response = service.ready().await?.call(message);
        let done = done.clone();
        tokio::spawn(async move { done.send(response.await) });
    }
    drop(done);
    let mut order = Vec::new();
    while let Some(result) = completed.recv().await {
        order.push(result?);
    }
    Ok(order)
}

fn line(label: &str, order: &[u64]) -> String {
    let numbers: Vec<String> = order.iter().map(u64::to_string).collect();
    format!("{label}: {}", numbers.join(" "))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("one connection sends messages 1 2 3 4; their handlers take 120, 30, 80, 10 ms");
    let started = Instant::now();
    let sync = run(true).await?;
    println!(
        "{}   ({} ms)",
        line("sync", &sync),
        started.elapsed().as_millis()
    );
    let started = Instant::now();
    let concurrent = run(false).await?;
    println!(
        "{}   ({} ms)",
        line("concurrent", &concurrent),
        started.elapsed().as_millis()
    );
    println!(
        "sync handles one message at a time in arrival order; concurrent lets fast ones overtake."
    );
    Ok(())
}
