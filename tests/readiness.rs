//! Inner readiness is polled before every inner call, and only once the request's turn
//! has come: a request waiting for its key never holds inner capacity.

mod support;

use std::time::Duration;

use support::{Msg, Recorder, handler};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tower::{Layer, Service, ServiceBuilder};
use tower_sync_engine::{Mode, SyncEngineLayer};
use tower_test::mock;

#[tokio::test]
async fn readiness_is_polled_only_by_the_request_whose_turn_it_is() {
    let (inner, mut handle) = mock::pair::<u32, u32>();
    handle.allow(0);
    let layer = SyncEngineLayer::new(|_: &u32| Mode::Sync("connection"));
    let mut service = layer.layer(inner);

    // Always ready: nothing is reserved in the inner service by the layer itself.
    let mut ready = task::spawn(futures::future::poll_fn(|cx| service.poll_ready(cx)));
    assert_ready_ok!(ready.poll());
    drop(ready);
    let mut first = task::spawn(service.call(1));
    let mut second = task::spawn(service.call(2));
    assert_pending!(second.poll());
    assert_pending!(first.poll());

    // One unit of inner capacity appears. The queued request is polled first but must
    // not take it (the mock would hand it to whoever polls readiness first).
    handle.allow(1);
    assert_pending!(second.poll());
    assert_pending!(first.poll()); // ready, called; now waits for the response
    let (request, respond) = handle.next_request().await.unwrap();
    assert_eq!(request, 1);

    respond.send_response(10);
    assert_eq!(assert_ready_ok!(first.poll()), 10);
    assert!(second.is_woken());
    // Its turn: it polls readiness (none left) and waits for it, holding the key.
    assert_pending!(second.poll());
    assert_eq!(layer.stats().in_flight, 1);
    handle.allow(1);
    assert!(second.is_woken());
    assert_pending!(second.poll());
    let (request, respond) = handle.next_request().await.unwrap();
    assert_eq!(request, 2);
    respond.send_response(20);
    assert_eq!(assert_ready_ok!(second.poll()), 20);
    assert!(layer.stats().is_idle());
}

#[tokio::test]
async fn concurrent_requests_also_poll_readiness_before_calling() {
    let (inner, mut handle) = mock::pair::<u32, u32>();
    handle.allow(0);
    let mut service = SyncEngineLayer::new(|_: &u32| Mode::<u32>::Concurrent).layer(inner);
    let mut call = task::spawn(service.call(1));
    assert_pending!(call.poll());
    handle.allow(1);
    assert!(call.is_woken());
    assert_pending!(call.poll());
    let (request, respond) = handle.next_request().await.unwrap();
    assert_eq!(request, 1);
    respond.send_response(2);
    assert_eq!(assert_ready_ok!(call.poll()), 2);
}

#[tokio::test]
async fn an_inner_readiness_error_is_returned_and_releases_the_key() {
    let (inner, mut handle) = mock::pair::<u32, u32>();
    let layer = SyncEngineLayer::new(|_: &u32| Mode::Sync(0));
    let mut service = layer.layer(inner);
    handle.send_error("inner broke");
    let mut first = task::spawn(service.call(1));
    let mut second = task::spawn(service.call(2));
    assert_pending!(second.poll());
    let error = assert_ready!(first.poll()).unwrap_err();
    assert_eq!(error.to_string(), "inner broke");
    assert!(second.is_woken());
    handle.allow(1);
    assert_pending!(second.poll());
    let (request, respond) = handle.next_request().await.unwrap();
    assert_eq!(request, 2);
    respond.send_response(3);
    assert_eq!(assert_ready_ok!(second.poll()), 3);
}

#[tokio::test(start_paused = true)]
async fn a_queued_key_does_not_starve_other_keys_of_an_inner_concurrency_limit() {
    let recorder = Recorder::default();
    let mut service = ServiceBuilder::new()
        .layer(SyncEngineLayer::new(|msg: &Msg| Mode::Sync(msg.key)))
        .concurrency_limit(1)
        .service(handler(&recorder));
    let first = tokio::spawn(service.call(Msg::new(1, 0, 100)));
    // Queued behind `first` on key 1: it must not sit on the single permit while waiting.
    let second = tokio::spawn(service.call(Msg::new(1, 1, 100)));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let other_key = tokio::spawn(service.call(Msg::new(2, 2, 100)));

    for call in [first, second, other_key] {
        call.await.unwrap().unwrap();
    }
    // Key 2 asked for the permit before key 1's second request had its turn.
    assert_eq!(recorder.ends(), [0, 2, 1]);
}

#[tokio::test]
async fn a_ready_inner_service_gets_a_concurrent_request_inside_call() {
    let (inner, mut handle) = mock::pair::<u32, u32>();
    handle.allow(1);
    let mut service = SyncEngineLayer::new(|_: &u32| Mode::<u32>::Concurrent).layer(inner);
    let call = service.call(1);
    // The inner service was called before the response future was ever polled.
    let (request, respond) = handle.next_request().await.unwrap();
    assert_eq!(request, 1);
    respond.send_response(2);
    assert_eq!(call.await.unwrap(), 2);
}

#[tokio::test]
async fn an_inner_readiness_error_reaches_a_concurrent_request() {
    let (inner, mut handle) = mock::pair::<u32, u32>();
    handle.send_error("inner broke");
    let mut service = SyncEngineLayer::new(|_: &u32| Mode::<u32>::Concurrent).layer(inner);
    let error = service.call(1).await.unwrap_err();
    assert_eq!(error.to_string(), "inner broke");
}
