//! The HTTP flavour's answer to an overload: its status, its `Retry-After` and its body,
//! as the layer's settings choose them, and the default left as it was.

use std::convert::Infallible;
use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, Request, Response, StatusCode};
use axum::routing::post;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Body as HttpBody;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_sync_engine::SyncEngineLayer;
use tower_sync_engine::error::{Limit, Overloaded};
use tower_sync_engine::http::{
    ByHeader, EmptyOverloadBody, HttpSyncEngineLayer, OverloadBody, TextOverloadBody, by_header,
};

const SESSION: &str = "x-session-id";

/// Longer than anything a passing test waits for.
const BOUND: Duration = Duration::from_secs(10);

/// A layer for one live session with one request waiting, so that both limits are easy
/// to reach: a second request waiting on the session hits `max_queue_per_key`, and any
/// other session hits `max_keys`.
fn tight() -> SyncEngineLayer<ByHeader, HeaderValue> {
    SyncEngineLayer::new(by_header(SESSION))
        .max_queue_per_key(1)
        .max_keys(1)
}

fn app<D>(layer: HttpSyncEngineLayer<ByHeader, HeaderValue, std::hash::RandomState, D>) -> Router
where
    D: OverloadBody<Body> + 'static,
{
    Router::new()
        .route("/edit", post(|| async { "saved" }))
        .layer(layer)
}

fn edit(session: &str) -> Request<Body> {
    Request::post("/edit")
        .header(SESSION, session)
        .body(Body::empty())
        .unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> Response<Body> {
    tokio::time::timeout(BOUND, app.clone().oneshot(request))
        .await
        .expect("answered in time")
        .unwrap()
}

async fn text<B: HttpBody<Error: std::fmt::Debug>>(response: Response<B>) -> String {
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The answers to the two limits of [`tight`], in that order, with the domain left
/// idle afterwards.
async fn overloads<D>(
    layer: HttpSyncEngineLayer<ByHeader, HeaderValue, std::hash::RandomState, D>,
) -> [Response<Body>; 2]
where
    D: OverloadBody<Body> + 'static,
{
    let app = app(layer.clone());
    // The first request's body holds the session until it is dropped; the second waits.
    let running = send(&app, edit("alice")).await;
    let waiting = tokio::spawn({
        let app = app.clone();
        async move { text(send(&app, edit("alice")).await).await }
    });
    while layer.stats().queued == 0 {
        tokio::task::yield_now().await;
    }

    let full_line = send(&app, edit("alice")).await;
    let too_many_keys = send(&app, edit("bob")).await;
    assert_eq!(
        full_line
            .extensions()
            .get::<Overloaded>()
            .map(Overloaded::limit),
        Some(Limit::MaxQueuePerKey)
    );
    assert_eq!(
        too_many_keys
            .extensions()
            .get::<Overloaded>()
            .map(Overloaded::limit),
        Some(Limit::MaxKeys)
    );

    drop(running);
    assert_eq!(
        waiting.await.unwrap(),
        "saved",
        "the rejections cost nothing"
    );
    assert!(layer.stats().is_idle());
    [full_line, too_many_keys]
}

#[tokio::test(start_paused = true)]
async fn the_default_answer_is_an_empty_503_with_the_reason_in_the_extensions() {
    for response in overloads(tight().for_http()).await {
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        // axum's router adds `content-length: 0`; the layer adds nothing.
        let added: Vec<_> = response
            .headers()
            .keys()
            .filter(|name| *name != CONTENT_LENGTH)
            .collect();
        assert!(added.is_empty(), "{:?}", response.headers());
        assert_eq!(text(response).await, "");
    }
}

#[tokio::test(start_paused = true)]
async fn under_axum_an_overload_can_be_a_429_with_retry_after() {
    let layer = tight()
        .for_http()
        .overload_status(StatusCode::TOO_MANY_REQUESTS)
        .retry_after(Duration::from_secs(3));
    for response in overloads(layer).await {
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "3");
        assert!(response.headers().get(CONTENT_TYPE).is_none());
        assert_eq!(text(response).await, "", "a body only when asked for");
    }
}

#[tokio::test(start_paused = true)]
async fn a_described_overload_names_the_limit_in_a_text_body() {
    let layer = tight().for_http().describe_overload();
    let [full_line, too_many_keys] = overloads(layer).await;
    for (response, expected) in [
        (
            full_line,
            "request rejected: its key's queue is full (max_queue_per_key)",
        ),
        (
            too_many_keys,
            "request rejected: too many live keys (max_keys)",
        ),
    ] {
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        assert!(response.headers().get(RETRY_AFTER).is_none());
        let overloaded = *response.extensions().get::<Overloaded>().unwrap();
        let body = text(response).await;
        assert_eq!(body, expected);
        assert_eq!(body, overloaded.to_string(), "the error's own message");
    }
}

#[tokio::test(start_paused = true)]
async fn the_settings_combine_in_any_order() {
    let layer = tight()
        .for_http()
        .describe_overload()
        .retry_after(Duration::from_millis(200))
        .overload_status(StatusCode::INSUFFICIENT_STORAGE);
    let [full_line, _] = overloads(layer).await;
    assert_eq!(full_line.status(), StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(full_line.headers()[RETRY_AFTER], "1");
    assert_eq!(
        text(full_line).await,
        "request rejected: its key's queue is full (max_queue_per_key)"
    );
}

/// The `Retry-After` of a layer whose one session is busy, for a second session.
async fn retry_after_for(after: Duration) -> HeaderValue {
    let layer = SyncEngineLayer::new(by_header(SESSION))
        .max_keys(1)
        .for_http()
        .retry_after(after);
    let mut service = layer.layer(service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"saved"))))
    }));
    let request = |session| Request::get("/").header(SESSION, session).body(());
    // A response future that is not polled yet holds its session.
    let held = service.ready().await.unwrap().call(request("a").unwrap());
    let rejected = service.ready().await.unwrap().call(request("b").unwrap());
    let rejected = rejected.await.unwrap();
    drop(held);
    assert_eq!(rejected.status(), StatusCode::SERVICE_UNAVAILABLE);
    rejected.headers()[RETRY_AFTER].clone()
}

#[tokio::test]
async fn retry_after_is_in_whole_seconds_rounded_up() {
    for (after, header) in [
        (Duration::from_nanos(1), "1"),
        (Duration::from_secs(1), "1"),
        (Duration::from_millis(1001), "2"),
        (Duration::from_millis(1500), "2"),
        (Duration::from_secs(120), "120"),
        (Duration::from_secs(u64::from(u32::MAX)), "4294967295"),
        (Duration::MAX, "4294967295"),
    ] {
        assert_eq!(retry_after_for(after).await, header, "{after:?}");
    }
}

#[tokio::test]
async fn two_http_layers_of_one_domain_answer_each_their_own_way() {
    let plain = tight();
    let services = plain.clone().for_http();
    let api = plain
        .for_http()
        .overload_status(StatusCode::TOO_MANY_REQUESTS)
        .describe_overload();
    let handler = service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"saved"))))
    });
    let mut pages = services.layer(handler);
    let mut api = api.layer(handler);
    let request = |session| Request::get("/").header(SESSION, session).body(());

    let held = pages.ready().await.unwrap().call(request("a").unwrap());
    let held = held.await.unwrap();
    // One domain: the session the pages hold counts against the API's `max_keys` too.
    let from_api = api.ready().await.unwrap().call(request("b").unwrap());
    let from_api = from_api.await.unwrap();
    let from_pages = pages.ready().await.unwrap().call(request("b").unwrap());
    let from_pages = from_pages.await.unwrap();

    assert_eq!(from_api.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        text(from_api).await,
        "request rejected: too many live keys (max_keys)"
    );
    assert_eq!(from_pages.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(text(from_pages).await, "");
    drop(held);
    assert!(pages.stats().is_idle());
}

/// A body type with `Default` and without `From<String>`: the default answer needs no
/// more of it than before.
#[tokio::test]
async fn the_default_answer_asks_only_default_of_the_body() {
    let layer = SyncEngineLayer::new(by_header(SESSION))
        .max_keys(1)
        .for_http()
        .overload_status(StatusCode::TOO_MANY_REQUESTS)
        .retry_after(Duration::from_secs(1));
    let mut service = layer.layer(service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    }));
    let request = |session| Request::get("/").header(SESSION, session).body(());
    let held = service.ready().await.unwrap().call(request("a").unwrap());
    let rejected = service.ready().await.unwrap().call(request("b").unwrap());
    let rejected = rejected.await.unwrap();
    assert_eq!(rejected.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(rejected.headers()[RETRY_AFTER], "1");
    assert!(rejected.into_body().is_end_stream());
    assert_eq!(held.await.unwrap().status(), StatusCode::OK);
    assert!(layer.stats().is_idle(), "an empty body ends at once");
}

#[test]
fn overload_status_takes_client_and_server_errors_only() {
    for code in [400, 404, 429, 499, 500, 503, 599] {
        let status = StatusCode::from_u16(code).unwrap();
        let layer = tight().for_http().overload_status(status);
        assert!(
            format!("{layer:?}").contains(&code.to_string()),
            "{layer:?}"
        );
    }
    for code in [100, 101, 200, 204, 301, 304, 399, 600, 999] {
        let status = StatusCode::from_u16(code).unwrap();
        let panicked = panic::catch_unwind(AssertUnwindSafe(|| {
            drop(tight().for_http().overload_status(status))
        }));
        let message = panicked.expect_err("not an error status");
        let message = message.downcast_ref::<String>().unwrap();
        assert!(
            message.contains("overload_status") && message.contains(&code.to_string()),
            "{message}"
        );
    }
}

#[test]
fn the_answer_types_are_cheap_values() {
    fn copy_debug_send_sync<T: Copy + std::fmt::Debug + Default + Send + Sync + 'static>() {}
    copy_debug_send_sync::<EmptyOverloadBody>();
    copy_debug_send_sync::<TextOverloadBody>();
    let layer = tight()
        .for_http()
        .overload_status(StatusCode::TOO_MANY_REQUESTS)
        .retry_after(Duration::from_secs(5))
        .describe_overload();
    let debug = format!("{layer:?}");
    assert!(
        debug.contains("429") && debug.contains("retry_after_secs: Some(5)"),
        "{debug}"
    );
    assert!(debug.contains("TextOverloadBody"), "{debug}");
}
