//! The HTTP flavour under axum: a session's key is held until its response body has
//! ended or been dropped, an overload is a 503, and other sessions never wait.
//!
//! Every wait is bounded: under paused time a stuck request fails the test at once
//! instead of hanging it.
#![cfg(feature = "http")]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_sync_engine::error::{Limit, Overloaded};
use tower_sync_engine::http::{
    ByExtension, ByHeader, HttpSyncEngine, HttpSyncEngineLayer, by_extension, by_header,
};
use tower_sync_engine::{Mode, Policy, ServiceBuilderExt, SyncEngineLayer};

#[path = "support/report_app.rs"]
mod report_app;

use report_app::{Shared, edit, stream_report};

const SESSION: &str = "x-session-id";

/// Longer than anything a passing test waits for.
const BOUND: Duration = Duration::from_secs(10);

async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {BOUND:?}"))
}

// ---- the application ----

async fn no_content() -> StatusCode {
    StatusCode::NO_CONTENT
}

fn routes() -> Router<Shared> {
    Router::new()
        .route("/edit", post(edit))
        .route("/report", get(stream_report))
        .route("/empty", post(no_content))
}

fn session_layer() -> HttpSyncEngineLayer<ByHeader, HeaderValue> {
    SyncEngineLayer::new(by_header(SESSION)).for_http()
}

/// The routes behind a fresh session layer: the app, its layer (for `stats()`), and
/// what its handlers share.
fn session_app() -> (Router, HttpSyncEngineLayer<ByHeader, HeaderValue>, Shared) {
    let shared = Shared::default();
    let layer = session_layer();
    let app = routes().layer(layer.clone()).with_state(shared.clone());
    (app, layer, shared)
}

fn request(method: Method, path: &str, session: Option<&str>) -> Request<Body> {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(session) = session {
        request = request.header(SESSION, session);
    }
    request.body(Body::empty()).unwrap()
}

fn report(session: Option<&str>) -> Request<Body> {
    request(Method::GET, "/report", session)
}

fn edit_request(session: Option<&str>, tag: &str) -> Request<Body> {
    request(Method::POST, &format!("/edit?{tag}"), session)
}

async fn send(app: &Router, request: Request<Body>) -> Response<Body> {
    let path = request.uri().to_string();
    bounded(&path, app.clone().oneshot(request)).await.unwrap()
}

async fn text(response: Response<Body>) -> String {
    let body = bounded("body", response.into_body().collect()).await;
    String::from_utf8(body.unwrap().to_bytes().to_vec()).unwrap()
}

/// Sends `request` from a task of its own and returns its answer's text.
fn spawn_send(
    app: &Router,
    request: Request<Body>,
) -> tokio::task::JoinHandle<(StatusCode, String)> {
    let app = app.clone();
    tokio::spawn(async move {
        let response = app.oneshot(request).await.unwrap();
        (response.status(), text(response).await)
    })
}

/// Long enough, in paused time, for every runnable task to have run as far as it can.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

// ---- the example, as written ----

#[tokio::test(start_paused = true)]
async fn the_router_example_orders_a_session_behind_its_streamed_report() {
    let shared = Shared::default();
    let lines = shared.next_report_streams();
    let app = Router::new()
        .route("/edit", post(edit))
        .route("/report", get(stream_report))
        .layer(
            SyncEngineLayer::new(by_header("x-session-id"))
                .max_queue_per_key(32)
                .for_http(),
        )
        .with_state(shared.clone());

    let report = send(&app, report(Some("alice"))).await;
    let edit = spawn_send(&app, edit_request(Some("alice"), "after"));
    lines.send("revenue\n").unwrap();
    settle().await;
    assert_eq!(
        shared.log(),
        ["report"],
        "the edit waits for the report's body"
    );

    drop(lines);
    assert_eq!(text(report).await, "revenue\n");
    let (status, tag) = bounded("edit", edit).await.unwrap();
    assert_eq!((status, tag.as_str()), (StatusCode::OK, "after"));
    assert_eq!(shared.log(), ["report", "edit after"]);
}

// ---- overload ----

#[tokio::test(start_paused = true)]
async fn overload_is_a_503_with_an_empty_body_and_the_reason_in_the_extensions() {
    let shared = Shared::default();
    let lines = shared.next_report_streams();
    let layer = SyncEngineLayer::new(by_header(SESSION))
        .max_queue_per_key(1)
        .max_keys(1)
        .for_http();
    let app = routes().layer(layer.clone()).with_state(shared.clone());

    let report = send(&app, report(Some("s"))).await;
    let queued = spawn_send(&app, edit_request(Some("s"), "queued"));
    settle().await;
    assert_eq!((layer.stats().in_flight, layer.stats().queued), (1, 1));

    let rejected = send(&app, edit_request(Some("s"), "rejected")).await;
    assert_eq!(rejected.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        rejected.extensions().get::<Overloaded>(),
        Some(&Overloaded::new(Limit::MaxQueuePerKey))
    );
    assert_eq!(text(rejected).await, "");

    let other_key = send(&app, edit_request(Some("t"), "other")).await;
    assert_eq!(other_key.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        other_key
            .extensions()
            .get::<Overloaded>()
            .map(Overloaded::limit),
        Some(Limit::MaxKeys)
    );

    // Requests without the header are Concurrent: never rejected.
    let free = send(&app, edit_request(None, "free")).await;
    assert_eq!(text(free).await, "free");

    drop((lines, report));
    assert_eq!(
        bounded("queued", queued).await.unwrap(),
        (StatusCode::OK, "queued".to_owned())
    );
    assert_eq!(shared.log(), ["report", "edit free", "edit queued"]);
    assert!(layer.stats().is_idle());
}

// ---- the key is held until the body ends ----

#[tokio::test(start_paused = true)]
async fn the_next_request_of_a_session_starts_only_after_the_previous_body_ended() {
    let (app, layer, shared) = session_app();
    let lines = shared.next_report_streams();

    let mut body = send(&app, report(Some("alice"))).await.into_body();
    let edit = spawn_send(&app, edit_request(Some("alice"), "next"));

    // Frames flow, and the session stays held between them.
    for line in ["one\n", "two\n"] {
        lines.send(line).unwrap();
        let frame = bounded("frame", body.frame()).await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), line);
        settle().await;
        assert_eq!(shared.log(), ["report"]);
        assert_eq!((layer.stats().in_flight, layer.stats().queued), (1, 1));
    }

    // The end of the stream is the end of the request.
    drop(lines);
    assert!(bounded("end", body.frame()).await.is_none());
    assert_eq!(
        bounded("edit", edit).await.unwrap(),
        (StatusCode::OK, "next".to_owned())
    );
    assert_eq!(shared.log(), ["report", "edit next"]);
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_body_mid_stream_releases_the_session_at_once() {
    let (app, layer, shared) = session_app();
    let lines = shared.next_report_streams();

    let mut body = send(&app, report(Some("alice"))).await.into_body();
    let edit = spawn_send(&app, edit_request(Some("alice"), "next"));
    lines.send("one\n").unwrap();
    bounded("frame", body.frame()).await.unwrap().unwrap();
    settle().await;
    assert_eq!(layer.stats().queued, 1);

    // The client went away: the session passes to the edit in the same step.
    drop(body);
    assert_eq!((layer.stats().in_flight, layer.stats().queued), (1, 0));
    assert_eq!(
        bounded("edit", edit).await.unwrap(),
        (StatusCode::OK, "next".to_owned())
    );
    assert!(layer.stats().is_idle());
    drop(lines);
}

#[tokio::test(start_paused = true)]
async fn a_body_at_its_end_releases_at_once_without_being_polled() {
    let (app, layer, _shared) = session_app();

    // 204, an empty body, and a HEAD response: none of them is ever polled here.
    let no_content = send(&app, request(Method::POST, "/empty", Some("s"))).await;
    assert_eq!(no_content.status(), StatusCode::NO_CONTENT);
    assert!(no_content.body().is_end_stream());
    assert!(layer.stats().is_idle());

    let head = send(&app, request(Method::HEAD, "/report", Some("s"))).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert!(layer.stats().is_idle());

    // And the session's next request runs while those responses are still around.
    let next = send(&app, edit_request(Some("s"), "next")).await;
    assert_eq!(text(next).await, "next");
    assert!(layer.stats().is_idle());
    drop((no_content, head));
}

#[tokio::test(start_paused = true)]
async fn concurrent_bodies_hold_nothing() {
    let (app, layer, shared) = session_app();
    let lines = shared.next_report_streams();

    let mut body = send(&app, report(None)).await.into_body();
    assert!(layer.stats().is_idle());
    lines.send("one\n").unwrap();
    bounded("frame", body.frame()).await.unwrap().unwrap();
    assert!(layer.stats().is_idle());

    // A Concurrent request runs while the open body of another is still streaming.
    let edit = send(&app, edit_request(None, "free")).await;
    assert_eq!(text(edit).await, "free");
    drop((lines, body));
}

#[tokio::test(start_paused = true)]
async fn other_sessions_never_wait_for_a_body() {
    let (app, layer, shared) = session_app();
    let lines = shared.next_report_streams();

    let body = send(&app, report(Some("alice"))).await.into_body();
    for bob in 0..3 {
        let edit = send(&app, edit_request(Some("bob"), &format!("bob{bob}"))).await;
        assert_eq!(text(edit).await, format!("bob{bob}"));
    }
    assert_eq!(layer.stats().in_flight, 1, "alice's body still holds alice");
    drop((lines, body));
    assert!(layer.stats().is_idle());
}

// ---- by_extension ----

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct UserId(u64);

fn as_user(mut request: Request<Body>, user: u64) -> Request<Body> {
    request.extensions_mut().insert(UserId(user));
    request
}

#[tokio::test(start_paused = true)]
async fn by_extension_orders_by_the_extension_and_passes_requests_without_it() {
    let shared = Shared::default();
    let lines = shared.next_report_streams();
    let layer = SyncEngineLayer::new(by_extension::<UserId>())
        .max_queue_per_key(4)
        .for_http();
    let app = routes().layer(layer.clone()).with_state(shared.clone());

    let body = send(&app, as_user(report(None), 1)).await.into_body();
    let same_user = spawn_send(&app, as_user(edit_request(None, "user1"), 1));
    let other_user = send(&app, as_user(edit_request(None, "user2"), 2)).await;
    assert_eq!(text(other_user).await, "user2");
    let anonymous = send(&app, edit_request(None, "anonymous")).await;
    assert_eq!(text(anonymous).await, "anonymous");
    settle().await;
    assert_eq!(shared.log(), ["report", "edit user2", "edit anonymous"]);

    drop((lines, body));
    assert_eq!(
        bounded("same user", same_user).await.unwrap(),
        (StatusCode::OK, "user1".to_owned())
    );
    assert!(layer.stats().is_idle());
}

// ---- the body's frames, errors and hints ----

/// One data frame, then trailers, with an exact size hint; or an error on first poll.
#[derive(Debug)]
struct Scripted {
    frames: VecDeque<Result<Frame<Bytes>, std::io::Error>>,
    hint: SizeHint,
}

impl Scripted {
    fn data_then_trailers() -> Self {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        Scripted {
            frames: VecDeque::from([
                Ok(Frame::data(Bytes::from_static(b"hello"))),
                Ok(Frame::trailers(trailers)),
            ]),
            hint: SizeHint::with_exact(5),
        }
    }

    fn failing() -> Self {
        Scripted {
            frames: VecDeque::from([Err(std::io::Error::other("upstream reset"))]),
            hint: SizeHint::default(),
        }
    }
}

impl HttpBody for Scripted {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.frames.pop_front())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

impl Default for Scripted {
    fn default() -> Self {
        Scripted {
            frames: VecDeque::new(),
            hint: SizeHint::with_exact(0),
        }
    }
}

fn scripted_service(
    make: fn() -> Scripted,
) -> HttpSyncEngine<
    impl Service<Request<()>, Response = Response<Scripted>, Error = Infallible, Future: Send> + Clone,
    impl Policy<Request<()>, Key = HeaderValue> + Clone,
    HeaderValue,
> {
    let inner = service_fn(move |_: Request<()>| async move { Ok(Response::new(make())) });
    HttpSyncEngine::new(inner, by_header(SESSION))
}

fn held_request() -> Request<()> {
    Request::get("/").header(SESSION, "s").body(()).unwrap()
}

#[tokio::test]
async fn size_hint_and_trailers_pass_through() {
    let mut service = scripted_service(Scripted::data_then_trailers);
    let response = service.ready().await.unwrap().call(held_request());
    let body = response.await.unwrap().into_body();
    assert_eq!(body.size_hint().exact(), Some(5));
    assert_eq!(service.stats().in_flight, 1);

    let collected = body.collect().await.unwrap();
    assert_eq!(
        collected.trailers().unwrap().get("x-checksum").unwrap(),
        "abc"
    );
    assert_eq!(collected.to_bytes(), "hello");
    assert!(service.stats().is_idle());
}

#[tokio::test]
async fn a_body_error_releases_the_key_and_reaches_the_reader() {
    let mut service = scripted_service(Scripted::failing);
    let response = service.ready().await.unwrap().call(held_request());
    let mut body = response.await.unwrap().into_body();
    assert_eq!(service.stats().in_flight, 1);

    let error = body.frame().await.unwrap().unwrap_err();
    assert_eq!(error.to_string(), "upstream reset");
    assert!(
        service.stats().is_idle(),
        "the key passed on with the error"
    );
    drop(body);
}

#[tokio::test]
async fn a_body_that_reports_its_end_after_its_last_frame_releases_then() {
    let inner = service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(
            "all of it",
        ))))
    });
    let mut service = HttpSyncEngine::new(inner, by_header(SESSION));
    let response = service.ready().await.unwrap().call(held_request());
    let mut body = response.await.unwrap().into_body();
    assert_eq!(service.stats().in_flight, 1);

    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "all of it");
    // Not polled for its end: `is_end_stream` said it, which is all hyper waits for.
    assert!(body.is_end_stream());
    assert!(service.stats().is_idle());
}

#[tokio::test]
async fn an_inner_error_releases_the_key_and_passes_through_unboxed() {
    #[derive(Debug, PartialEq)]
    struct Refused;
    let inner = service_fn(|_: Request<()>| async { Err::<Response<Scripted>, _>(Refused) });
    let mut service = HttpSyncEngine::new(inner, by_header(SESSION));
    let response = service.ready().await.unwrap().call(held_request());
    assert_eq!(response.await.unwrap_err(), Refused);
    assert!(service.stats().is_idle());
}

// ---- one domain, both flavours ----

#[tokio::test(start_paused = true)]
async fn for_http_shares_the_domain_with_the_plain_layer() {
    let layer = SyncEngineLayer::new(by_header(SESSION)).max_queue_per_key(1);
    let http = layer.clone().for_http();
    let shared = Shared::default();
    let lines = shared.next_report_streams();
    let app = routes().layer(http.clone()).with_state(shared.clone());
    let mut plain = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|request: Request<Body>| async move {
            Ok::<_, Infallible>(request.uri().to_string())
        }));

    let body = send(&app, report(Some("s"))).await.into_body();
    assert_eq!(layer.stats(), http.stats());
    assert_eq!(layer.stats().in_flight, 1);

    // A plain request of the same session queues behind the HTTP body, and the limit
    // set on the plain layer applies to both.
    let queued = plain.ready().await.unwrap().call(report(Some("s")));
    let rejected = send(&app, edit_request(Some("s"), "over")).await;
    assert_eq!(rejected.status(), StatusCode::SERVICE_UNAVAILABLE);

    drop((lines, body));
    assert_eq!(bounded("plain", queued).await.unwrap(), "/report");
    assert!(http.stats().is_idle());
}

// ---- what compiles with no annotations ----

#[tokio::test]
async fn both_helpers_infer_their_key_in_both_flavours() {
    // The HTTP flavour with a setting chained, under axum.
    let _: Router = Router::new()
        .route("/edit", post(|| async { "saved" }))
        .layer(
            SyncEngineLayer::new(by_header("x-session-id"))
                .max_queue_per_key(32)
                .for_http(),
        )
        .layer(
            SyncEngineLayer::new(by_extension::<UserId>())
                .max_queue_per_key(32)
                .for_http(),
        );

    // The plain flavour under axum, whose `BoxError` needs a `HandleErrorLayer`.
    async fn unavailable(_: tower::BoxError) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }
    let _: Router = Router::new()
        .route("/edit", post(|| async { "saved" }))
        .layer(
            ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(unavailable))
                .sync_engine(by_header("x-session-id")),
        );

    // The plain flavour through `ServiceBuilder`, serving `Request<Body>`.
    let echo = service_fn(|_: Request<Body>| async { Ok::<_, tower::BoxError>("ok") });
    let by_session = ServiceBuilder::new()
        .sync_engine(by_header("x-session-id"))
        .service(echo);
    let by_user = ServiceBuilder::new()
        .sync_engine(by_extension::<UserId>())
        .service(echo);
    assert_eq!(by_session.oneshot(report(Some("s"))).await.unwrap(), "ok");
    let user = as_user(report(None), 1);
    assert_eq!(by_user.oneshot(user).await.unwrap(), "ok");
}

#[test]
fn the_policies_are_cheap_values() {
    fn clone_debug_send_sync<T: Clone + std::fmt::Debug + Send + Sync + 'static>(_: &T) {}
    let header = by_header("X-Session-Id");
    clone_debug_send_sync(&header);
    assert_eq!(header.header_name(), "x-session-id");
    assert_eq!(
        by_header(axum::http::header::AUTHORIZATION).header_name(),
        "authorization"
    );
    let extension: ByExtension<UserId> = by_extension();
    clone_debug_send_sync(&extension);
    assert!(format!("{extension:?}").contains("UserId"));
}

#[test]
fn a_repeated_header_is_keyed_by_its_first_value() {
    let request = Request::get("/")
        .header(SESSION, "alice")
        .header(SESSION, "bob")
        .body(())
        .unwrap();
    assert_eq!(
        by_header(SESSION).classify(&request),
        Mode::Sync(HeaderValue::from_static("alice"))
    );
}

#[test]
#[should_panic(expected = "\"x session\" is not a valid HTTP header name")]
fn an_invalid_header_name_panics_naming_it() {
    by_header("x session");
}

// ---- a key from a header owns its bytes ----

/// A connection's read buffer, as a server parses a request in place: the header values
/// are slices of it. Records when it is freed.
struct ReadBuffer {
    bytes: Vec<u8>,
    freed: Arc<AtomicBool>,
}

impl AsRef<[u8]> for ReadBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        self.freed.store(true, Ordering::SeqCst);
    }
}

/// A request whose session header is a slice of a 16 KiB read buffer, and the flag set
/// once nothing keeps that buffer alive any more.
fn request_in_buffer(
    method: Method,
    path: &str,
    session: &str,
) -> (Request<Body>, Arc<AtomicBool>) {
    let freed = Arc::new(AtomicBool::new(false));
    let head = format!("{method} {path} HTTP/1.1\r\n{SESSION}: {session}\r\n\r\n");
    let mut bytes = head.into_bytes();
    let start = bytes.len() - session.len() - 4;
    bytes.resize(16 * 1024, 0);
    let buffer = bytes::Bytes::from_owner(ReadBuffer {
        bytes,
        freed: freed.clone(),
    });
    let value = HeaderValue::from_maybe_shared(buffer.slice(start..start + session.len()));
    let value = value.unwrap();
    assert_eq!(value, session);
    drop(buffer);

    let mut request = request(method, path, None);
    request.headers_mut().insert(SESSION, value);
    assert!(!freed.load(Ordering::SeqCst), "the header keeps its buffer");
    (request, freed)
}

#[test]
fn by_header_keys_own_their_bytes_and_keep_the_sensitive_flag() {
    let (mut request, freed) = request_in_buffer(Method::POST, "/edit", "alice");
    request
        .headers_mut()
        .get_mut(SESSION)
        .unwrap()
        .set_sensitive(true);

    let Mode::Sync(key) = by_header(SESSION).classify(&request) else {
        panic!("a request with the header is Sync");
    };
    drop(request);
    assert!(
        freed.load(Ordering::SeqCst),
        "the key keeps the buffer alive"
    );
    assert_eq!(key, "alice");
    assert!(key.is_sensitive());

    let plain = Request::get("/").header(SESSION, "bob").body(()).unwrap();
    let Mode::Sync(key) = by_header(SESSION).classify(&plain) else {
        panic!("a request with the header is Sync");
    };
    assert!(!key.is_sensitive());
}

#[tokio::test(start_paused = true)]
async fn a_held_key_does_not_keep_its_request_buffer_alive() {
    let (app, layer, shared) = session_app();
    let lines = shared.next_report_streams();

    // The report's body has not ended, so its session's key is live; the request itself
    // is gone, handled.
    let (report, freed) = request_in_buffer(Method::GET, "/report", "alice");
    let body = send(&app, report).await.into_body();
    assert_eq!((layer.stats().keys, layer.stats().in_flight), (1, 1));
    assert!(
        freed.load(Ordering::SeqCst),
        "the live key keeps the buffer"
    );

    // It is still the session's key: the session's next request waits for the body.
    let edit = spawn_send(&app, edit_request(Some("alice"), "next"));
    settle().await;
    assert_eq!(shared.log(), ["report"]);
    drop((lines, body));
    assert_eq!(
        bounded("edit", edit).await.unwrap(),
        (StatusCode::OK, "next".to_owned())
    );
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_session_that_moves_on_does_not_keep_its_first_request_buffer_alive() {
    // The requests to `/hold` run until the test adds a permit.
    let permits = Arc::new(tokio::sync::Semaphore::new(0));
    let inner = service_fn({
        let permits = permits.clone();
        move |request: Request<Body>| {
            let hold = request.uri().path() == "/hold";
            drop(request);
            let permits = permits.clone();
            async move {
                if hold {
                    permits.acquire().await.unwrap().forget();
                }
                Ok::<_, Infallible>(())
            }
        }
    });
    let layer = SyncEngineLayer::new(by_header(SESSION));
    let service = ServiceBuilder::new().layer(layer.clone()).service(inner);

    // The session's first request, read from one connection, and its next, read from
    // another, waiting behind it.
    let (first, first_freed) = request_in_buffer(Method::POST, "/hold", "alice");
    let first = tokio::spawn(service.clone().oneshot(first));
    let (second, second_freed) = request_in_buffer(Method::POST, "/hold", "alice");
    let second = tokio::spawn(service.clone().oneshot(second));
    settle().await;
    assert_eq!((layer.stats().in_flight, layer.stats().queued), (1, 1));

    // The first is done and its connection gone; the second keeps the session busy,
    // and the registry keeps the key the first request brought.
    permits.add_permits(1);
    bounded("first", first).await.unwrap().unwrap();
    settle().await;
    assert_eq!((layer.stats().keys, layer.stats().in_flight), (1, 1));
    assert!(
        first_freed.load(Ordering::SeqCst),
        "the session's key keeps the first connection's buffer"
    );
    assert!(second_freed.load(Ordering::SeqCst));

    permits.add_permits(1);
    bounded("second", second).await.unwrap().unwrap();
    assert!(layer.stats().is_idle());
}

// ---- over a real hyper server on loopback ----

mod loopback {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket, TcpStream};

    use axum::extract::ws::WebSocketUpgrade;

    use super::*;

    /// 64 MiB: far more than the socket buffers and hyper's write buffer hold, so a
    /// client that does not read keeps the body from ending.
    const BIG_CHUNKS: usize = 1024;
    const CHUNK: usize = 64 * 1024;

    async fn forever() -> Body {
        let ticks = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((Ok::<_, Infallible>(Bytes::from_static(b"tick\n")), ()))
        });
        Body::from_stream(ticks)
    }

    async fn big(State(shared): State<Shared>) -> Body {
        shared.record("big".to_owned());
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        let chunks = (0..BIG_CHUNKS).map(move |_| Ok::<_, Infallible>(chunk.clone()));
        Body::from_stream(futures::stream::iter(chunks))
    }

    /// A WebSocket that stays open until the client goes away, logging both ends.
    async fn websocket(State(shared): State<Shared>, upgrade: WebSocketUpgrade) -> Response<Body> {
        upgrade.on_upgrade(move |mut socket| async move {
            shared.record("ws open".to_owned());
            while let Some(Ok(_)) = socket.recv().await {}
            shared.record("ws closed".to_owned());
        })
    }

    /// Serves the app on an ephemeral loopback port with axum's hyper server.
    async fn serve(
        layer: HttpSyncEngineLayer<ByHeader, HeaderValue>,
        shared: &Shared,
    ) -> SocketAddr {
        let app = routes()
            .route("/forever", get(forever))
            .route("/big", get(big))
            .route("/ws", get(websocket))
            .layer(layer)
            .with_state(shared.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    /// Connects (with a small receive buffer when `small_buffer`) and writes a request
    /// whose connection closes after the response.
    async fn open(addr: SocketAddr, head: &str, session: &str, small_buffer: bool) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        if small_buffer {
            socket.set_recv_buffer_size(4096).unwrap();
        }
        let mut stream = bounded("connect", socket.connect(addr)).await.unwrap();
        let request = format!(
            "{head} HTTP/1.1\r\nhost: loopback\r\n{SESSION}: {session}\r\n\
             connection: close\r\ncontent-length: 0\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        stream
    }

    /// The whole response, read until the server closes the connection.
    async fn read_all(mut stream: TcpStream) -> Vec<u8> {
        let mut response = Vec::new();
        bounded("response", stream.read_to_end(&mut response))
            .await
            .unwrap();
        response
    }

    async fn exchange(addr: SocketAddr, head: &str, session: &str) -> String {
        let stream = open(addr, head, session, false).await;
        String::from_utf8(read_all(stream).await).unwrap()
    }

    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        bounded(what, async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_client_that_disconnects_mid_stream_releases_its_session() {
        let shared = Shared::default();
        let layer = session_layer();
        let addr = serve(layer.clone(), &shared).await;

        let mut client = open(addr, "GET /forever", "s", false).await;
        let mut received = Vec::new();
        while !String::from_utf8_lossy(&received).contains("tick") {
            let mut buffer = [0; 1024];
            let read = bounded("ticks", client.read(&mut buffer)).await.unwrap();
            assert_ne!(read, 0, "the stream never ends by itself");
            received.extend_from_slice(&buffer[..read]);
        }

        let next = tokio::spawn(exchange(addr, "POST /edit?after", "s"));
        eventually("the next request queues", || layer.stats().queued == 1).await;
        assert_eq!(shared.log(), Vec::<String>::new());

        // The server's next write fails, hyper drops the body, and the session passes on.
        drop(client);
        let response = bounded("next", next).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("after"), "{response}");
        eventually("the domain is idle", || layer.stats().is_idle()).await;
    }

    #[tokio::test]
    async fn an_upgrade_passes_the_session_on_while_the_upgraded_connection_runs() {
        let shared = Shared::default();
        let layer = session_layer();
        let addr = serve(layer.clone(), &shared).await;

        let mut socket = bounded("connect", TcpStream::connect(addr)).await.unwrap();
        let handshake = format!(
            "GET /ws HTTP/1.1\r\nhost: loopback\r\n{SESSION}: s\r\n\
             connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        socket.write_all(handshake.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0; 1];
            let read = bounded("the 101", socket.read(&mut byte)).await.unwrap();
            assert_ne!(read, 0, "the server closed before its answer");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");

        // The 101's body is empty: the session passed on when the response was built.
        assert!(layer.stats().is_idle());
        eventually("the WebSocket runs", || shared.log() == ["ws open"]).await;

        // The session's next request runs beside the open WebSocket.
        let beside = exchange(addr, "POST /edit?beside", "s").await;
        assert!(beside.ends_with("beside"), "{beside}");
        assert_eq!(shared.log(), ["ws open", "edit beside"]);

        drop(socket);
        eventually("the WebSocket closes", || shared.log().len() == 3).await;
        assert_eq!(shared.log(), ["ws open", "edit beside", "ws closed"]);
    }

    #[tokio::test]
    async fn a_slow_reader_delays_only_its_own_session() {
        let shared = Shared::default();
        let layer = session_layer();
        let addr = serve(layer.clone(), &shared).await;

        // The slow client reads the start of a large body, then stops reading.
        let mut slow = open(addr, "GET /big", "slow", true).await;
        let mut start = [0; 1024];
        bounded("the start", slow.read_exact(&mut start))
            .await
            .unwrap();
        assert!(start.starts_with(b"HTTP/1.1 200"));
        assert_eq!(layer.stats().in_flight, 1);

        // Another session is served meanwhile.
        let other = exchange(addr, "POST /edit?other", "other").await;
        assert!(other.ends_with("other"), "{other}");
        assert_eq!(
            layer.stats().in_flight,
            1,
            "the slow body still holds its session"
        );

        // The slow session's next request waits for the body, however long that takes.
        let same = tokio::spawn(exchange(addr, "POST /edit?same", "slow"));
        eventually("the same session queues", || layer.stats().queued == 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!same.is_finished());
        assert_eq!(shared.log(), ["big", "edit other"]);

        // Once the client has read it all, the session passes on.
        let rest = read_all(slow).await;
        assert!(start.len() + rest.len() > BIG_CHUNKS * CHUNK);
        let same = bounded("same", same).await.unwrap();
        assert!(same.ends_with("same"), "{same}");
        assert_eq!(shared.log(), ["big", "edit other", "edit same"]);
        eventually("the domain is idle", || layer.stats().is_idle()).await;
    }
}
