//! With the `tracing` feature, whichever clock times the waits, a request that waits for
//! its key emits `queued` and then `admitted`, and one that does not wait emits nothing.
//!
//! The futures are polled by hand, outside any runtime, and no time value is asserted:
//! with the default clock (`std::time::Instant`) the events need no runtime at all.
//! `tests/tracing.rs` checks the exact times waited on a paused tokio clock.
#![cfg(feature = "tracing")]

mod support;

use std::convert::Infallible;
use std::future::ready;

use support::capture::Capture;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{Layer, Service, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};
use tracing::Level;

#[test]
fn waiting_requests_emit_queued_and_admitted_without_a_runtime() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

    let mut service = SyncEngineLayer::new(|_: &u64| Mode::Sync(0))
        .layer(service_fn(|n: u64| ready(Ok::<_, Infallible>(n))));

    // The first request takes the key at once; the next two wait behind it.
    let mut first = task::spawn(service.call(1));
    let mut second = task::spawn(service.call(2));
    let mut third = task::spawn(service.call(3));
    assert_pending!(second.poll());
    assert_pending!(third.poll());
    assert_eq!(assert_ready_ok!(first.poll()), 1);
    drop(first);
    assert_eq!(assert_ready_ok!(second.poll()), 2);
    drop(second);
    assert_eq!(assert_ready_ok!(third.poll()), 3);

    let events = capture.take();
    let summary: Vec<(&str, Vec<&str>)> = events
        .iter()
        .map(|event| {
            let fields = event.numbers.iter().map(|(name, _)| *name).collect();
            (event.message.as_str(), fields)
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("queued", vec!["queue_depth"]),
            ("queued", vec!["queue_depth"]),
            ("admitted", vec!["waited_us"]),
            ("admitted", vec!["waited_us"]),
        ],
        "{events:?}"
    );
    assert!(events.iter().all(|event| event.level == Some(Level::DEBUG)));
    // Depths count the waiting requests of the key, the new one included.
    assert_eq!(events[0].numbers[0].1, 1);
    assert_eq!(events[1].numbers[0].1, 2);

    // A request that gets its key at once emits nothing.
    let mut alone = task::spawn(service.call(4));
    assert_eq!(assert_ready_ok!(alone.poll()), 4);
    assert!(capture.take().is_empty(), "an uncontended request traced");
}
