//! Heap bytes per idle key, per active key and per queued request, for the layer and for
//! the actor alternative, measured with a counting allocator.
//!
//! ```sh
//! cargo bench --bench memory
//! ```
//!
//! The callers' own memory (the response futures, held in a vector allocated before each
//! measurement) is not counted: only what the ordering mechanism itself allocates.

#[path = "../tests/support/counting.rs"]
mod counting;

use std::collections::HashMap;
use std::task::{Context, Waker};

use counting::{Echo, live_bytes as live};

use tokio::sync::{mpsc, oneshot};
use tower::{Layer, Service};
use tower_sync_engine::{Mode, SyncEngineLayer};

const N: usize = 100_000;

fn per(bytes: isize, count: usize) -> f64 {
    bytes as f64 / count as f64
}

fn main() {
    let mut cx = Context::from_waker(Waker::noop());
    let layer = SyncEngineLayer::new(|key: &u64| Mode::Sync(*key));
    let mut service = layer.layer(Echo);

    // Every shard keeps a few slots when it empties, so that steady traffic does not
    // allocate; reported on its own, and excluded from the per-key figures.
    let constructed = live();
    for key in 0..N as u64 {
        drop(service.call(key));
    }
    let retained = live() - constructed;

    // Idle keys: requests that ran to completion leave nothing behind.
    let before = live();
    for key in 0..N as u64 {
        let mut future = std::pin::pin!(service.call(key));
        assert!(future.as_mut().poll(&mut cx).is_ready());
    }
    let idle = live() - before;

    // Active keys: N distinct keys, each held by one admitted request.
    let mut held = Vec::with_capacity(N);
    let before = live();
    held.extend((0..N as u64).map(|key| service.call(key)));
    let active = live() - before;
    drop(held);

    // Queued requests: N requests waiting on one key.
    let mut held = Vec::with_capacity(N);
    held.push(service.call(7));
    let before = live();
    held.extend((1..N).map(|_| service.call(7)));
    let queued = live() - before;
    drop(held);
    assert!(layer.stats().is_idle());

    // The actor alternative: a task and a channel per key, waiting for messages.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (actor_key, actor_queued) = runtime.block_on(async {
        let mut mailboxes = HashMap::with_capacity(N);
        let before = live();
        for key in 0..N as u64 {
            let (mailbox, mut inbox) = mpsc::unbounded_channel::<(u64, oneshot::Sender<u64>)>();
            tokio::spawn(async move {
                while let Some((request, reply)) = inbox.recv().await {
                    let _ = reply.send(request);
                }
            });
            mailboxes.insert(key, mailbox);
        }
        tokio::task::yield_now().await;
        let per_key = live() - before;

        // Messages queued in one actor's mailbox (the actor does not run meanwhile).
        let mut replies = Vec::with_capacity(N);
        let before = live();
        for n in 0..N as u64 {
            let (reply, response) = oneshot::channel();
            mailboxes[&0].send((n, reply)).unwrap();
            replies.push(response);
        }
        let queued = live() - before;
        (per_key, queued)
    });
    drop(runtime);

    println!("heap bytes allocated by the ordering mechanism ({N} of each):");
    println!("(an idle registry keeps {retained} bytes of slots across all its shards)");
    println!("| | tower-sync-engine | actor per key |");
    println!("|---|---|---|");
    println!(
        "| per idle key | {:.1} | n/a (an actor lives until stopped) |",
        per(idle, N)
    );
    println!(
        "| per active key | {:.1} | {:.1} |",
        per(active, N),
        per(actor_key, N)
    );
    println!(
        "| per queued request | {:.1} | {:.1} |",
        per(queued, N - 1),
        per(actor_queued, N)
    );
}
