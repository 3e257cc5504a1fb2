//! Bounds reject at once with a typed error, leave nothing behind, and never slow other
//! keys; invalid settings panic at construction.

mod support;

use std::time::Duration;

use support::{Msg, Recorder, handler};
use tokio::time::Instant;
use tower::{Layer, Service};
use tower_sync_engine::error::{BoxError, Limit, Overloaded};
use tower_sync_engine::{Mode, SyncEngineLayer};

fn by_key(msg: &Msg) -> Mode<u64> {
    Mode::Sync(msg.key)
}

/// The error of a request that must have been rejected in `call()`: its future is ready
/// at its first poll. Fails, instead of waiting, if the request was queued.
fn rejection<F, T>(future: F) -> BoxError
where
    F: std::future::Future<Output = Result<T, BoxError>>,
{
    match futures::FutureExt::now_or_never(future) {
        Some(Err(error)) => error,
        Some(Ok(_)) => panic!("the request ran instead of being rejected"),
        None => panic!("the request was queued instead of being rejected"),
    }
}

fn limit_of(error: &BoxError) -> Limit {
    error
        .downcast_ref::<Overloaded>()
        .unwrap_or_else(|| panic!("not Overloaded: {error}"))
        .limit()
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_rejects_at_once_and_a_dropped_waiter_stops_counting() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key).max_queue_per_key(1);
    let mut service = layer.layer(handler(&recorder));
    let running = tokio::spawn(service.call(Msg::new(1, 0, 100)));
    let waiting = service.call(Msg::new(1, 1, 10));

    let error = rejection(service.call(Msg::new(1, 2, 10)));
    assert_eq!(limit_of(&error), Limit::MaxQueuePerKey);
    assert_eq!(
        error.to_string(),
        Overloaded::new(Limit::MaxQueuePerKey).to_string()
    );
    assert_eq!(layer.stats().queued, 1);

    drop(waiting);
    let accepted = tokio::spawn(service.call(Msg::new(1, 3, 10)));
    running.await.unwrap().unwrap();
    assert_eq!(accepted.await.unwrap().unwrap(), 3);
    assert_eq!(recorder.starts(1), [0, 3]);
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn max_queue_zero_rejects_whenever_the_key_is_busy() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key).max_queue_per_key(0);
    let mut service = layer.layer(handler(&recorder));
    let running = tokio::spawn(service.call(Msg::new(1, 0, 100)));
    let error = rejection(service.call(Msg::new(1, 1, 10)));
    assert_eq!(limit_of(&error), Limit::MaxQueuePerKey);
    running.await.unwrap().unwrap();
    assert_eq!(service.call(Msg::new(1, 2, 10)).await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn max_keys_rejects_new_keys_but_not_live_ones() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key).max_keys(2);
    let mut service = layer.layer(handler(&recorder));
    let a = tokio::spawn(service.call(Msg::new(1, 0, 100)));
    let b = tokio::spawn(service.call(Msg::new(2, 1, 100)));

    let error = rejection(service.call(Msg::new(3, 2, 10)));
    assert_eq!(limit_of(&error), Limit::MaxKeys);
    assert_eq!(layer.stats().keys, 2, "a rejected key was created");

    // A live key still accepts requests.
    let queued_on_live_key = tokio::spawn(service.call(Msg::new(1, 3, 10)));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    queued_on_live_key.await.unwrap().unwrap();
    // Key 1 and 2 went idle, so a new key fits again.
    assert_eq!(service.call(Msg::new(3, 4, 10)).await.unwrap(), 4);
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_flood_on_one_key_does_not_slow_the_others() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key).max_queue_per_key(4);
    let mut service = layer.layer(handler(&recorder));
    let busy = tokio::spawn(service.call(Msg::new(1, 0, 1_000)));
    tokio::task::yield_now().await;

    let started = Instant::now();
    let others: Vec<_> = (2..12)
        .map(|key| tokio::spawn(service.call(Msg::new(key, key, 50))))
        .collect();
    let accepted: Vec<_> = (100..104)
        .map(|seq| tokio::spawn(service.call(Msg::new(1, seq, 1))))
        .collect();
    assert_eq!(layer.stats().queued, 4);
    let mut rejected = 0;
    for seq in 104..10_100 {
        let error = rejection(service.call(Msg::new(1, seq, 1)));
        assert_eq!(limit_of(&error), Limit::MaxQueuePerKey);
        rejected += 1;
    }
    // Rejections cost no time at all on the paused clock.
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(rejected, 10_000 - 4);
    assert_eq!(recorder.starts(1), [0]);
    assert_eq!(layer.stats().queued, 4);
    for other in others {
        other.await.unwrap().unwrap();
    }
    assert_eq!(started.elapsed(), Duration::from_millis(50));

    busy.await.unwrap().unwrap();
    for future in accepted {
        future.await.unwrap().unwrap();
    }
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_distinct_keys_hits_max_keys_and_others_keep_their_latency() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key).max_keys(100);
    let mut service = layer.layer(handler(&recorder));
    let live: Vec<_> = (0..10)
        .map(|key| tokio::spawn(service.call(Msg::new(key, key, 50))))
        .collect();
    tokio::task::yield_now().await;

    let started = Instant::now();
    let mut held = Vec::new();
    let mut rejected = 0;
    for key in 1_000..101_000 {
        let future = service.call(Msg::new(key, key, 1_000));
        if held.len() < 90 {
            held.push(future);
        } else {
            let error = rejection(future);
            assert_eq!(limit_of(&error), Limit::MaxKeys);
            rejected += 1;
        }
    }
    assert_eq!(rejected, 100_000 - 90);
    assert_eq!(layer.stats().keys, 100);
    for call in live {
        call.await.unwrap().unwrap();
    }
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    drop(held);
    assert!(layer.stats().is_idle());
}

#[test]
#[should_panic(expected = "permits_per_key must be between 1 and u32::MAX, got 0")]
fn zero_permits_panics_with_the_setting_named() {
    let _ = SyncEngineLayer::<_, u64>::new(by_key).permits_per_key(0);
}

#[test]
#[should_panic(expected = "max_keys must be at least 1")]
fn zero_max_keys_panics_with_the_setting_named() {
    let _ = SyncEngineLayer::<_, u64>::new(by_key).max_keys(0);
}

#[test]
fn debug_shows_the_settings() {
    let layer = SyncEngineLayer::<_, u64>::new(by_key)
        .permits_per_key(3)
        .max_queue_per_key(8)
        .max_keys(9);
    let debug = format!("{layer:?}");
    for expected in ["permits_per_key: 3", "max_queue_per_key: 8", "max_keys: 9"] {
        assert!(debug.contains(expected), "{debug}");
    }
}

/// A key whose first request holds a permit but has not started (its inner service is
/// not ready) is busy: with two permits per key, the next request still has to wait for
/// the first to start, so it is queued, not in flight, and `max_queue_per_key(0)`
/// rejects it.
#[tokio::test]
async fn a_request_behind_an_unstarted_head_is_queued_and_counts_against_the_queue_limit() {
    use tokio_test::{assert_pending, assert_ready_ok, task};
    use tower_test::mock;

    for max_queue in [0, 1] {
        let (inner, mut handle) = mock::pair::<u32, u32>();
        handle.allow(0);
        let layer = SyncEngineLayer::new(|_: &u32| Mode::Sync(0u8))
            .permits_per_key(2)
            .max_queue_per_key(max_queue);
        let mut service = layer.layer(inner);

        // The key is free: the first request holds a permit, waiting for readiness.
        let mut first = task::spawn(service.call(1));
        assert_pending!(first.poll());
        assert_eq!((layer.stats().in_flight, layer.stats().queued), (1, 0));

        let second = service.call(2);
        if max_queue == 0 {
            let error = futures::FutureExt::now_or_never(second)
                .expect("rejected at once")
                .expect_err("the key is busy: a request would have to wait");
            assert_eq!(
                error.downcast_ref::<Overloaded>().map(Overloaded::limit),
                Some(Limit::MaxQueuePerKey)
            );
            assert_eq!((layer.stats().in_flight, layer.stats().queued), (1, 0));
            continue;
        }
        // With room for one, it waits: queued, holding no permit until the first starts.
        let mut second = task::spawn(second);
        assert_pending!(second.poll());
        assert_eq!((layer.stats().in_flight, layer.stats().queued), (1, 1));
        // The line is full.
        let third = futures::FutureExt::now_or_never(service.call(3))
            .expect("rejected at once")
            .expect_err("the line is full");
        assert_eq!(
            third.downcast_ref::<Overloaded>().map(Overloaded::limit),
            Some(Limit::MaxQueuePerKey)
        );

        // The first starts: the second is granted the free permit and may start too.
        handle.allow(2);
        assert_pending!(first.poll());
        let (request, respond_first) = handle.next_request().await.unwrap();
        assert_eq!(request, 1);
        assert!(second.is_woken());
        assert_eq!((layer.stats().in_flight, layer.stats().queued), (2, 0));
        assert_pending!(second.poll());
        let (request, respond_second) = handle.next_request().await.unwrap();
        assert_eq!(request, 2);
        respond_second.send_response(20);
        respond_first.send_response(10);
        assert_eq!(assert_ready_ok!(second.poll()), 20);
        assert_eq!(assert_ready_ok!(first.poll()), 10);
        assert!(layer.stats().is_idle());
    }
}
