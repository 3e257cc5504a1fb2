//! With the `tracing` feature, a request that waits for its key reports the queue depth
//! when it is queued and the time it waited when it is admitted; one that does not wait
//! reports nothing.
// The exact `waited_us` values below need the clock that the paused runtime controls.
#![cfg(feature = "tokio-clock")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{Layer, Service, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// (message, numeric fields) of every event from this crate.
type Captured = Arc<Mutex<Vec<(String, Vec<(String, u64)>)>>>;

struct Capture(Captured);

#[derive(Default)]
struct Fields {
    message: String,
    numbers: Vec<(String, u64)>,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.numbers.push((field.name().to_owned(), value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
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
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.0
            .lock()
            .unwrap()
            .push((fields.message, fields.numbers));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn event(message: &str, field: &str, value: u64) -> (String, Vec<(String, u64)>) {
    (message.to_owned(), vec![(field.to_owned(), value)])
}

#[tokio::test(start_paused = true)]
async fn waiting_requests_report_queue_depth_and_time_waited() {
    let captured = Captured::default();
    let _guard = tracing::subscriber::set_default(Capture(captured.clone()));

    let mut service =
        SyncEngineLayer::new(|_: &u64| Mode::Sync(0)).layer(service_fn(|ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, std::convert::Infallible>(ms)
        }));
    let calls: Vec<_> = [100, 50, 10]
        .into_iter()
        .map(|ms| tokio::spawn(service.call(ms)))
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(
        *captured.lock().unwrap(),
        [
            event("queued", "queue_depth", 1),
            event("queued", "queue_depth", 2),
            event("admitted", "waited_us", 100_000),
            event("admitted", "waited_us", 150_000),
        ]
    );

    captured.lock().unwrap().clear();
    service.call(1).await.unwrap();
    assert!(
        captured.lock().unwrap().is_empty(),
        "an uncontended request traced"
    );
}

#[tokio::test(start_paused = true)]
async fn queue_depth_counts_a_waiter_that_holds_a_spare_permit() {
    use tokio_test::{assert_pending, assert_ready_ok, task};

    let captured = Captured::default();
    let _guard = tracing::subscriber::set_default(Capture(captured.clone()));

    let mut service = SyncEngineLayer::new(|_: &u64| Mode::Sync(0))
        .permits_per_key(2)
        .layer(service_fn(|ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, std::convert::Infallible>(ms)
        }));
    // 0 and 1 take both permits; 2 waits for one.
    let mut first = task::spawn(service.call(10));
    let mut second = task::spawn(service.call(20));
    let third = task::spawn(service.call(30));
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    tokio::time::advance(Duration::from_millis(20)).await;
    // 0 ends: 2 gets its permit but is not polled yet. 1 ends: a permit is free.
    assert_ready_ok!(first.poll());
    assert_ready_ok!(second.poll());
    captured.lock().unwrap().clear();
    // 3 finds a free permit, but 2 is still ahead of it in line: it waits, and counts
    // itself and the request ahead.
    let fourth = service.call(40);
    assert_eq!(
        *captured.lock().unwrap(),
        [event("queued", "queue_depth", 2)]
    );
    let (c, d) = tokio::join!(third, fourth);
    assert_eq!((c.unwrap(), d.unwrap()), (30, 40));
}
