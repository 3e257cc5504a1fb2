//! With the `tracing` feature, a request that waits for its key reports the queue depth
//! when it is queued and the time it waited when it is admitted; one that does not wait
//! reports nothing.
// The exact `waited_us` values below need the clock that the paused runtime controls.
#![cfg(feature = "tokio-clock")]

mod support;

use std::time::Duration;

use support::capture::{Capture, event};
use tower::{Layer, Service, service_fn};
use tower_sync_engine::{Mode, SyncEngineLayer};

#[tokio::test(start_paused = true)]
async fn waiting_requests_report_queue_depth_and_time_waited() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

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
        capture.take_summary(),
        [
            event("queued", "queue_depth", 1),
            event("queued", "queue_depth", 2),
            event("admitted", "waited_us", 100_000),
            event("admitted", "waited_us", 150_000),
        ]
    );

    service.call(1).await.unwrap();
    assert!(capture.take().is_empty(), "an uncontended request traced");
}

#[tokio::test(start_paused = true)]
async fn queue_depth_counts_the_queued_requests_of_its_key() {
    use tokio_test::{assert_pending, assert_ready_ok, task};

    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

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
    capture.take();
    // 3 finds a free permit, but 2 is still ahead of it in line: it waits. 2 holds a
    // permit and is not queued; 3 counts itself, as `stats()` does.
    let fourth = service.call(40);
    assert_eq!(service.stats().queued, 1);
    assert_eq!(capture.take_summary(), [event("queued", "queue_depth", 1)]);
    let fifth = service.call(50);
    assert_eq!(capture.take_summary(), [event("queued", "queue_depth", 2)]);
    let (c, d, e) = tokio::join!(third, fourth, fifth);
    assert_eq!((c.unwrap(), d.unwrap(), e.unwrap()), (30, 40, 50));
}
