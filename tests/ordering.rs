//! Order is fixed in `call()`, whatever the polling order; domains are per layer value;
//! `Mode::Concurrent` goes straight through.

mod support;

use std::time::Duration;

use support::{Event, Handler, Msg, Recorder, handler};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{Layer, Service, ServiceExt};
use tower_sync_engine::{Mode, SyncEngine, SyncEngineLayer};

fn by_key(msg: &Msg) -> Mode<u64> {
    Mode::Sync(msg.key)
}

/// Checks that each of `key`'s handlers started only after the previous one ended.
fn assert_one_at_a_time(recorder: &Recorder, key: u64) {
    let events: Vec<Event> = recorder
        .events()
        .into_iter()
        .filter(|event| matches!(event, Event::Start(k, _) | Event::End(k, _) if *k == key))
        .collect();
    for pair in events.chunks(2) {
        match pair {
            [Event::Start(_, a), Event::End(_, b)] => assert_eq!(a, b, "{events:?}"),
            _ => panic!("handlers of key {key} overlapped: {events:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn seed_scenario_sync_finishes_in_send_order_concurrent_in_completion_order() {
    for (sync, expected) in [(true, [1, 2]), (false, [2, 1])] {
        let recorder = Recorder::default();
        let layer = SyncEngineLayer::new(move |msg: &Msg| {
            if sync {
                Mode::Sync(msg.key)
            } else {
                Mode::Concurrent
            }
        });
        let mut service = layer.layer(handler(&recorder));
        let slow = service.call(Msg::new(7, 1, 300));
        let fast = service.call(Msg::new(7, 2, 10));
        let (slow, fast) = tokio::join!(tokio::spawn(slow), tokio::spawn(fast));
        assert_eq!((slow.unwrap().unwrap(), fast.unwrap().unwrap()), (1, 2));
        assert_eq!(recorder.ends(), expected, "sync = {sync}");
    }
}

#[tokio::test(start_paused = true)]
async fn futures_spawned_in_reverse_run_in_call_order() {
    let recorder = Recorder::default();
    let mut service = SyncEngineLayer::new(by_key).layer(handler(&recorder));
    // Later messages are faster, so any reordering would show in the end order too.
    let futures: Vec<_> = (0..20)
        .map(|seq| service.call(Msg::new(1, seq, 40 - seq)))
        .collect();
    let tasks: Vec<_> = futures.into_iter().rev().map(tokio::spawn).collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(recorder.starts(1), (0..20).collect::<Vec<_>>());
    assert_one_at_a_time(&recorder, 1);
    assert!(service.stats().is_idle());
}

#[tokio::test]
async fn a_future_polled_first_still_waits_for_earlier_calls() {
    let recorder = Recorder::default();
    let mut service = SyncEngineLayer::new(by_key).layer(handler(&recorder));
    let mut first = task::spawn(service.call(Msg::new(1, 0, 0)));
    let mut second = task::spawn(service.call(Msg::new(1, 1, 0)));

    assert_pending!(second.poll());
    assert!(recorder.events().is_empty(), "the second call ran first");

    // The first is polled late, long after the second; it still goes first.
    assert_pending!(first.poll()); // yields once inside the handler
    assert_eq!(recorder.starts(1), [0]);
    assert_ready_ok!(first.poll());
    assert!(second.is_woken());
    assert_pending!(second.poll());
    assert_ready_ok!(second.poll());
    assert_eq!(recorder.starts(1), [0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_across_two_worker_threads() {
    let recorder = Recorder::default();
    let mut service = SyncEngineLayer::new(by_key).layer(handler(&recorder));
    let mut futures = Vec::new();
    for seq in 0..2_000u64 {
        futures.push(service.call(Msg::new(seq % 8, seq, 0)));
    }
    // Spawn in reverse so later calls reach the workers first.
    let tasks: Vec<_> = futures.into_iter().rev().map(tokio::spawn).collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    for key in 0..8 {
        let expected: Vec<u64> = (0..2_000).filter(|seq| seq % 8 == key).collect();
        assert_eq!(recorder.starts(key), expected, "key {key}");
        assert_one_at_a_time(&recorder, key);
    }
    assert!(service.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn permits_per_key_bounds_concurrency_and_starts_in_call_order() {
    let recorder = Recorder::default();
    let mut service = SyncEngineLayer::new(by_key)
        .permits_per_key(2)
        .layer(handler(&recorder));
    let futures: Vec<_> = (0..9)
        .map(|seq| service.call(Msg::new(1, seq, 10 + (seq % 3) * 7)))
        .collect();
    // The first two found the key free and were called in `call()`. Poll all in
    // reverse, by hand: nobody else may start before a permit comes free.
    let mut futures: Vec<_> = futures.into_iter().map(task::spawn).collect();
    for future in futures.iter_mut().rev() {
        assert_pending!(future.poll());
    }
    // Their handlers record their start when first polled, here in reverse.
    assert_eq!(recorder.starts(1), [1, 0]);
    let tasks: Vec<_> = futures
        .into_iter()
        .rev()
        .map(|future| tokio::spawn(future.into_inner()))
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // Every later request started only once a permit came free, in call order.
    assert_eq!(recorder.starts(1)[2..], (2..9).collect::<Vec<_>>());
    assert_eq!(recorder.max_running(1), 2);
}

#[tokio::test(start_paused = true)]
async fn two_permits_let_two_run_at_once() {
    let recorder = Recorder::default();
    let mut service = SyncEngineLayer::new(by_key)
        .permits_per_key(2)
        .layer(handler(&recorder));
    let started = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|seq| tokio::spawn(service.call(Msg::new(1, seq, 100))))
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(started.elapsed(), Duration::from_millis(200));
    assert_eq!(recorder.max_running(1), 2);
}

#[tokio::test(start_paused = true)]
async fn services_and_clones_from_one_layer_share_one_domain() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key);
    let mut first = layer.layer(handler(&recorder));
    let mut second = layer.clone().layer(handler(&recorder));
    let mut clone = first.clone();
    let calls = [
        tokio::spawn(first.call(Msg::new(1, 0, 30))),
        tokio::spawn(second.call(Msg::new(1, 1, 20))),
        tokio::spawn(clone.call(Msg::new(1, 2, 10))),
    ];
    assert_eq!(layer.stats().queued, 2);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(recorder.ends(), [0, 1, 2]);
    assert_one_at_a_time(&recorder, 1);
}

#[tokio::test(start_paused = true)]
async fn a_fresh_clone_per_request_is_still_ordered() {
    // axum applies the layer once and clones the service for every request.
    let recorder = Recorder::default();
    let service = SyncEngineLayer::new(by_key).layer(handler(&recorder));
    let calls: Vec<_> = (0..5)
        .map(|seq| {
            let mut per_request = service.clone();
            tokio::spawn(per_request.call(Msg::new(3, seq, 50 - seq * 10)))
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(recorder.ends(), [0, 1, 2, 3, 4]);
}

/// Sends one request on key 1 through each layer at once and checks that neither
/// waited for the other.
async fn assert_independent<P>(a: SyncEngineLayer<P, u64>, b: SyncEngineLayer<P, u64>)
where
    P: Fn(&Msg) -> Mode<u64> + Clone,
{
    let recorder = Recorder::default();
    let mut a = a.layer(handler(&recorder));
    let mut b = b.layer(handler(&recorder));
    let started = Instant::now();
    let (x, y) = tokio::join!(a.call(Msg::new(1, 0, 100)), b.call(Msg::new(1, 1, 100)));
    x.unwrap();
    y.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(recorder.max_running(1), 2);
}

#[tokio::test(start_paused = true)]
async fn two_layers_are_independent_domains() {
    assert_independent(SyncEngineLayer::new(by_key), SyncEngineLayer::new(by_key)).await;
}

#[test]
#[should_panic(
    expected = "SyncEngineLayer::max_queue_per_key called on a layer that is cloned or in use"
)]
fn a_setting_on_a_cloned_layer_panics_instead_of_splitting_the_domain() {
    let original = SyncEngineLayer::<_, u64>::new(by_key);
    let _clone = original.clone();
    let _ = original.max_queue_per_key(8);
}

#[test]
#[should_panic(
    expected = "SyncEngineLayer::permits_per_key called on a layer that is cloned or in use"
)]
fn a_setting_on_a_layer_in_use_panics() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::<_, u64>::new(by_key);
    let service = layer.layer(handler(&recorder));
    drop(service);
    // The domain was built for the service; its shards may still be held by requests.
    let _ = layer.permits_per_key(2);
}

#[tokio::test(start_paused = true)]
async fn clones_of_a_configured_layer_share_its_domain_and_settings() {
    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(by_key).max_queue_per_key(1);
    let mut a = layer.clone().layer(handler(&recorder));
    let mut b = layer.clone().layer(handler(&recorder));
    let running = tokio::spawn(a.call(Msg::new(1, 0, 10)));
    let queued = tokio::spawn(b.call(Msg::new(1, 1, 10)));
    // The queue of one is shared: a third request on either service is rejected.
    let error = a.call(Msg::new(1, 2, 10)).await.unwrap_err();
    assert!(
        error.is::<tower_sync_engine::error::Overloaded>(),
        "{error}"
    );
    running.await.unwrap().unwrap();
    queued.await.unwrap().unwrap();
    assert_eq!(recorder.starts(1), [0, 1]);
}

#[tokio::test(start_paused = true)]
async fn different_keys_do_not_wait_for_each_other() {
    let recorder = Recorder::default();
    let mut service = SyncEngineLayer::new(by_key).layer(handler(&recorder));
    let started = Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|key| tokio::spawn(service.call(Msg::new(key, key, 100))))
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(started.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_are_not_delayed_and_touch_no_queue() {
    let recorder = Recorder::default();
    // Sequence numbers from 100 up are "typing" events: Concurrent.
    let layer = SyncEngineLayer::new(|msg: &Msg| {
        if msg.seq >= 100 {
            Mode::Concurrent
        } else {
            Mode::Sync(msg.key)
        }
    });
    let mut service = layer.layer(handler(&recorder));
    let slow = tokio::spawn(service.call(Msg::new(1, 0, 10_000)));
    let queued = tokio::spawn(service.call(Msg::new(1, 1, 10)));
    tokio::task::yield_now().await;
    let before = layer.stats();
    assert_eq!((before.keys, before.in_flight, before.queued), (1, 1, 1));

    let started = Instant::now();
    let typing = service.call(Msg::new(1, 100, 5));
    assert_eq!(
        layer.stats(),
        before,
        "a Concurrent call changed the registry"
    );
    assert_eq!(typing.await.unwrap(), 100);
    assert_eq!(started.elapsed(), Duration::from_millis(5));

    slow.await.unwrap().unwrap();
    queued.await.unwrap().unwrap();
    assert_eq!(recorder.ends(), [100, 0, 1]);
}

#[tokio::test(start_paused = true)]
async fn keys_are_compared_by_value_not_by_hash() {
    let recorder = Recorder::default();
    // Every key to the same hash: the worst case for a table.
    let layer = SyncEngineLayer::new(by_key).with_hasher(support::OneShard);
    let mut service = layer.layer(handler(&recorder));
    let started = Instant::now();
    let calls: Vec<_> = (0..30)
        .map(|seq| tokio::spawn(service.call(Msg::new(seq % 3, seq, 100))))
        .collect();
    assert_eq!(layer.stats().keys, 3);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // Three keys, ten requests each, 100ms each: 1s, not 3s and not 100ms.
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    for key in 0..3 {
        assert_eq!(
            recorder.starts(key),
            (0..30).filter(|s| s % 3 == key).collect::<Vec<_>>()
        );
        assert_one_at_a_time(&recorder, key);
    }
    assert!(layer.stats().is_idle());
}

/// Sends a slow message and then a fast one on one key; the slow one must finish first.
async fn assert_orders_one_key<P>(mut service: SyncEngine<Handler, P, u64>, recorder: &Recorder)
where
    P: Fn(&Msg) -> Mode<u64>,
{
    let calls = [
        tokio::spawn(service.call(Msg::new(1, 0, 30))),
        tokio::spawn(service.call(Msg::new(1, 1, 10))),
    ];
    assert_eq!(service.stats().queued, 1);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(recorder.ends(), [0, 1]);
}

#[tokio::test(start_paused = true)]
async fn sync_engine_new_makes_a_domain_of_its_own() {
    let recorder = Recorder::default();
    let service = SyncEngine::new(handler(&recorder), by_key);
    assert_orders_one_key(service, &recorder).await;
}

#[tokio::test]
async fn service_builder_and_oneshot_work() {
    let recorder = Recorder::default();
    let service = tower::ServiceBuilder::new()
        .layer(SyncEngineLayer::new(by_key))
        .service(handler(&recorder));
    assert_eq!(service.oneshot(Msg::new(1, 5, 0)).await.unwrap(), 5);
}

#[test]
fn the_response_future_is_send_and_static() {
    fn assert_send_static<T: Send + 'static>(_: &T) {}
    let recorder = Recorder::default();
    let mut service = SyncEngineLayer::new(by_key).layer(handler(&recorder));
    let future = service.call(Msg::new(1, 0, 0));
    assert_send_static(&future);
    assert_send_static(&service);
}

#[cfg(feature = "builder")]
#[tokio::test(start_paused = true)]
async fn service_builder_ext_adds_the_layer() {
    use tower_sync_engine::ServiceBuilderExt;

    let recorder = Recorder::default();
    let service = tower::ServiceBuilder::new()
        .sync_engine(by_key)
        .service(handler(&recorder));
    assert_orders_one_key(service, &recorder).await;
}

#[tokio::test]
async fn every_finished_future_panics_with_the_same_message_when_polled_again() {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    let recorder = Recorder::default();
    let layer = SyncEngineLayer::new(|msg: &Msg| {
        if msg.seq == 0 {
            Mode::Sync(msg.key)
        } else {
            Mode::Concurrent
        }
    })
    .max_queue_per_key(0);
    let mut service = layer.layer(handler(&recorder));
    let held = service.call(Msg::new(1, 0, 0));
    for (label, future) in [
        ("sync", service.call(Msg::new(2, 0, 0))),
        ("concurrent", service.call(Msg::new(1, 1, 0))),
        ("rejected", service.call(Msg::new(1, 0, 0))),
    ] {
        let mut future = task::spawn(future);
        while future.poll().is_pending() {}
        let panic = catch_unwind(AssertUnwindSafe(|| future.poll())).unwrap_err();
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied());
        assert_eq!(
            message,
            Some("ResponseFuture polled after completion"),
            "{label}"
        );
    }
    drop(held);
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_waiter_polled_before_the_one_ahead_of_it_does_not_start() {
    let recorder = Recorder::default();
    let mut service = SyncEngineLayer::new(by_key)
        .permits_per_key(2)
        .layer(handler(&recorder));
    // 0 and 1 take the two permits and start in `call()`; 2 and 3 wait for a permit.
    let mut running: Vec<_> = (0..2)
        .map(|seq| task::spawn(service.call(Msg::new(1, seq, 10))))
        .collect();
    let mut second_in_line = task::spawn(service.call(Msg::new(1, 2, 10)));
    let mut third_in_line = task::spawn(service.call(Msg::new(1, 3, 10)));
    for future in &mut running {
        assert_pending!(future.poll());
    }
    assert_eq!(recorder.starts(1), [0, 1]);
    assert_pending!(third_in_line.poll());
    assert_pending!(second_in_line.poll());

    // Both permits come free: 2 is granted one, and 3 waits for 2 to start (a permit
    // goes only to a request that may start); neither has been polled since.
    tokio::time::advance(Duration::from_millis(10)).await;
    for future in &mut running {
        assert_ready_ok!(future.poll());
    }
    assert_eq!((service.stats().in_flight, service.stats().queued), (1, 1));
    assert_pending!(third_in_line.poll());
    assert_eq!(
        recorder.starts(1),
        [0, 1],
        "a granted waiter overtook the one before it"
    );
    assert!(second_in_line.is_woken());
    assert_pending!(second_in_line.poll());
    assert!(third_in_line.is_woken());
    assert_pending!(third_in_line.poll());
    assert_eq!(recorder.starts(1), [0, 1, 2, 3]);
    tokio::time::advance(Duration::from_millis(10)).await;
    assert_ready_ok!(second_in_line.poll());
    assert_ready_ok!(third_in_line.poll());
    assert!(service.stats().is_idle());
}
