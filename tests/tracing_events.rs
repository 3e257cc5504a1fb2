//! With the `tracing` feature, whichever clock times the waits, a request that waits for
//! its key emits `queued` and then `admitted`, and one that does not wait emits nothing.
//!
//! The futures are polled by hand, outside any runtime, and no time value is asserted:
//! with the default clock (`std::time::Instant`) the events need no runtime at all.
//! `tests/tracing.rs` checks the exact times waited on a paused tokio clock.
#![cfg(feature = "tracing")]

use std::convert::Infallible;
use std::future::ready;
use std::sync::{Arc, Mutex};

use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{Layer, Service, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// One event from this crate: its level, its message, and its numeric fields.
#[derive(Debug, Default)]
struct Captured {
    level: Option<Level>,
    message: String,
    numbers: Vec<(&'static str, u64)>,
}

impl Visit for Captured {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.numbers.push((field.name(), value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

/// A subscriber that keeps every event with this crate's target.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

impl Capture {
    fn take(&self) -> Vec<Captured> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Subscriber for Capture {
    // The tests of this binary run on several threads, some without a subscriber: asking
    // each time keeps their "never" from sticking to the layer's callsites.
    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target() == "tower_sync_engine"
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut captured = Captured {
            level: Some(*event.metadata().level()),
            ..Captured::default()
        };
        event.record(&mut captured);
        self.0.lock().unwrap().push(captured);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

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
