//! Keys from axum path parameters: `by_path_param` keys a request by the parameter's
//! value as axum's `Path` extractor decodes it, so two spellings of one id are one key.
//!
//! Every wait is bounded: under paused time a stuck request fails the test at once
//! instead of hanging it.
#![cfg(feature = "axum")]

use std::collections::HashMap;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_sync_engine::http::{ByPathParam, HttpSyncEngineLayer, by_path_param};
use tower_sync_engine::{Mode, Policy, SyncEngineLayer};

/// Longer than anything a passing test waits for.
const BOUND: Duration = Duration::from_secs(10);

/// How long an edit's handler works.
const WORK: Duration = Duration::from_millis(100);

async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {BOUND:?}"))
}

/// What the handlers did, in order.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, event: String) {
        self.0.lock().unwrap().push(event);
    }

    fn events(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// Edits the document `id` for a while and answers with the `id` it was given.
async fn edit(State(log): State<Log>, Path(id): Path<String>) -> String {
    log.push(format!("start {id}"));
    tokio::time::sleep(WORK).await;
    log.push(format!("end {id}"));
    id
}

/// The layer under test: one key per document.
fn document_layer() -> HttpSyncEngineLayer<ByPathParam, String> {
    SyncEngineLayer::new(by_path_param("id")).for_http()
}

fn documents(layer: HttpSyncEngineLayer<ByPathParam, String>) -> (Router, Log) {
    let log = Log::default();
    let app = Router::new()
        .route("/docs/{id}/edits", post(edit))
        .layer(layer)
        .with_state(log.clone());
    (app, log)
}

fn request(method: Method, uri: &str) -> Request {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap()
}

/// Sends `request` from a task of its own and returns its status and text.
fn spawn_send(app: &Router, request: Request) -> tokio::task::JoinHandle<(StatusCode, String)> {
    let app = app.clone();
    tokio::spawn(async move {
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    })
}

async fn send(app: &Router, request: Request) -> (StatusCode, String) {
    let what = request.uri().to_string();
    bounded(&what, spawn_send(app, request)).await.unwrap()
}

/// Less than `WORK`: long enough, in paused time, for every runnable task to have run
/// as far as it can, and short enough that no edit has finished.
async fn settle() {
    tokio::time::sleep(WORK / 10).await;
}

// ---- one document, one key ----

#[tokio::test(start_paused = true)]
async fn a_percent_encoded_id_is_the_same_key_and_waits_its_turn() {
    let layer = document_layer();
    let (app, log) = documents(layer.clone());

    let plain = spawn_send(&app, request(Method::POST, "/docs/alpha/edits"));
    settle().await;
    // `%61` is `a`: the handler gets the same `id`, so the edit must wait.
    let encoded = spawn_send(&app, request(Method::POST, "/docs/%61lpha/edits"));
    settle().await;
    assert_eq!(
        log.events(),
        ["start alpha"],
        "the encoded spelling waits for the plain one"
    );
    let stats = layer.stats();
    assert_eq!((stats.keys, stats.queued), (1, 1), "{stats:?}");

    assert_eq!(
        bounded("plain", plain).await.unwrap(),
        (StatusCode::OK, "alpha".to_owned())
    );
    assert_eq!(
        bounded("encoded", encoded).await.unwrap(),
        (StatusCode::OK, "alpha".to_owned())
    );
    assert_eq!(
        log.events(),
        ["start alpha", "end alpha", "start alpha", "end alpha"]
    );
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn different_ids_run_at_once() {
    let layer = document_layer();
    let (app, log) = documents(layer.clone());

    let alpha = spawn_send(&app, request(Method::POST, "/docs/alpha/edits"));
    let beta = spawn_send(&app, request(Method::POST, "/docs/beta/edits"));
    settle().await;
    let mut started = log.events();
    started.sort();
    assert_eq!(started, ["start alpha", "start beta"], "neither waits");
    assert_eq!(layer.stats().keys, 2);

    assert_eq!(bounded("alpha", alpha).await.unwrap().0, StatusCode::OK);
    assert_eq!(bounded("beta", beta).await.unwrap().0, StatusCode::OK);
    assert!(layer.stats().is_idle());
}

// ---- the key is what `Path` decodes ----

/// The decisions of a recording policy, in order.
type Seen = Arc<Mutex<Vec<Mode<String>>>>;

/// A layer whose policy is `by_path_param("id")`, recording every decision.
fn recording_layer() -> (
    HttpSyncEngineLayer<impl Policy<Request, Key = String> + Clone, String>,
    Seen,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let policy = by_path_param("id");
    let record = Arc::clone(&seen);
    let layer = SyncEngineLayer::new(move |request: &Request| {
        let mode = policy.classify(request);
        record.lock().unwrap().push(mode.clone());
        mode
    })
    .for_http();
    (layer, seen)
}

fn last(seen: &Mutex<Vec<Mode<String>>>) -> Mode<String> {
    seen.lock().unwrap().pop().expect("the policy ran")
}

#[tokio::test]
async fn the_key_is_the_id_the_handler_extracts() {
    let (layer, seen) = recording_layer();
    let app = Router::new()
        .route(
            "/docs/{id}/edits",
            post(|Path(id): Path<String>| async { id }),
        )
        .layer(layer);

    for (uri, id) in [
        ("/docs/alpha/edits", "alpha"),
        ("/docs/%61lpha/edits", "alpha"),
        ("/docs/%61%6C%70%68%61/edits", "alpha"),
        ("/docs/al%2Fpha/edits", "al/pha"),
        ("/docs/caf%C3%A9/edits", "café"),
        ("/docs/a%20b/edits", "a b"),
        // A `+` is a `+` in a path, and decoding happens once.
        ("/docs/a+b/edits", "a+b"),
        ("/docs/%2561/edits", "%61"),
    ] {
        let (status, extracted) = send(&app, request(Method::POST, uri)).await;
        assert_eq!((status, extracted.as_str()), (StatusCode::OK, id), "{uri}");
        assert_eq!(last(&seen), Mode::Sync(id.to_owned()), "{uri}");
    }
}

#[tokio::test]
async fn requests_without_the_parameter_run_concurrently() {
    let (layer, seen) = recording_layer();
    let app = Router::new()
        .route(
            "/docs/{id}/edits",
            post(|Path(id): Path<String>| async { id }),
        )
        .route(
            "/users/{user}",
            get(|Path(user): Path<String>| async { user }),
        )
        .route("/health", get(|| async { "ok" }))
        // The handler reads the raw path, so that the request reaches it.
        .route(
            "/raw/{id}",
            get(|request: Request| async move { request.uri().to_string() }),
        )
        .layer(layer);

    for (method, uri, status) in [
        // A route without the parameter, with another one, or with none.
        (Method::GET, "/health", StatusCode::OK),
        (Method::GET, "/users/alice", StatusCode::OK),
        // No route: axum's fallback, which the layer wraps too.
        (Method::GET, "/nowhere", StatusCode::NOT_FOUND),
        (Method::GET, "/", StatusCode::NOT_FOUND),
        // Paths no route can match.
        (Method::OPTIONS, "*", StatusCode::NOT_FOUND),
        (Method::CONNECT, "example.com:443", StatusCode::NOT_FOUND),
        // Not UTF-8 once decoded: `Path` rejects it, and no handler that reads the id runs.
        (Method::POST, "/docs/%FF/edits", StatusCode::BAD_REQUEST),
        (Method::GET, "/raw/%FF", StatusCode::OK),
    ] {
        let (answered, _) = send(&app, request(method, uri)).await;
        assert_eq!(answered, status, "{uri}");
        assert_eq!(last(&seen), Mode::Concurrent, "{uri}");
    }
}

// ---- where the layer goes ----

#[tokio::test]
async fn route_nested_and_route_layers_see_the_parameters() {
    let (layer, seen) = recording_layer();
    let handler = |Path(id): Path<String>| async { id };

    let route_layer = Router::new()
        .route("/docs/{id}", get(handler))
        .route_layer(layer.clone());
    let one_route = Router::new().route("/docs/{id}", get(handler).layer(layer.clone()));
    let nested = Router::new().nest(
        "/api",
        Router::new()
            .route("/docs/{id}", get(handler))
            .layer(layer.clone()),
    );
    for (app, uri) in [
        (route_layer, "/docs/%61lpha"),
        (one_route, "/docs/%61lpha"),
        (nested, "/api/docs/%61lpha"),
    ] {
        let (status, id) = send(&app, request(Method::GET, uri)).await;
        assert_eq!((status, id.as_str()), (StatusCode::OK, "alpha"), "{uri}");
        assert_eq!(last(&seen), Mode::Sync("alpha".to_owned()), "{uri}");
    }

    // A router under `nest_service` routes again and adds its parameters to the outer
    // route's: a name both capture is keyed by the inner value, as a map extractor has it.
    let inner = Router::new().route(
        "/files/{id}",
        get(|Path(params): Path<HashMap<String, String>>| async move { params["id"].clone() })
            .layer(layer),
    );
    let app = Router::new().nest_service("/docs/{id}", inner);
    let (status, id) = send(&app, request(Method::GET, "/docs/outer/files/inner")).await;
    assert_eq!((status, id.as_str()), (StatusCode::OK, "inner"));
    assert_eq!(last(&seen), Mode::Sync("inner".to_owned()));
}

/// Calls `service` with `request` and returns the panic's message.
fn panic_message<S: Service<Request>>(mut service: S, request: Request) -> String {
    let panic = catch_unwind(AssertUnwindSafe(|| drop(service.call(request))))
        .expect_err("the call panics");
    match panic.downcast::<String>() {
        Ok(message) => *message,
        Err(panic) => panic.downcast_ref::<&str>().unwrap().to_string(),
    }
}

#[tokio::test]
async fn a_layer_outside_the_router_panics_naming_the_fix() {
    let layer = document_layer();
    let (app, _) = documents(document_layer());

    // Around the router, the layer runs before routing, when no parameters exist.
    let around = ServiceBuilder::new().layer(layer.clone()).service(app);
    let message = panic_message(around, request(Method::POST, "/docs/alpha/edits"));
    assert!(
        message.contains(r#"by_path_param("id")"#)
            && message.contains(r#""/docs/alpha/edits""#)
            && message.contains("Router::layer or Router::route_layer"),
        "{message}"
    );

    // The same around a service that is no router.
    let handler = layer.layer(service_fn(|_: Request| async {
        Ok::<_, std::convert::Infallible>(axum::response::Response::new(Body::empty()))
    }));
    let message = panic_message(handler, request(Method::GET, "/docs/alpha"));
    assert!(message.contains("has no path parameters"), "{message}");

    // The domain is untouched.
    assert!(layer.stats().is_idle());
}

// ---- the name ----

#[test]
fn a_name_that_cannot_name_a_parameter_panics_showing_the_right_one() {
    for (name, shown) in [
        ("{id}", r#"by_path_param("id")"#),
        (":id", r#"by_path_param("id")"#),
        ("*rest", r#"by_path_param("rest")"#),
        ("{*rest}", r#"by_path_param("rest")"#),
        ("/id", r#"by_path_param("id")"#),
        ("", "is not a path parameter name"),
    ] {
        let panic = catch_unwind(|| by_path_param(name)).expect_err(name);
        let message = panic.downcast::<String>().unwrap();
        assert!(message.contains(shown), "{name:?}: {message}");
    }
}

#[test]
fn the_policy_is_a_cheap_value() {
    fn clone_debug_send_sync<T: Clone + std::fmt::Debug + Send + Sync + 'static>(_: &T) {}
    let policy = by_path_param("id");
    clone_debug_send_sync(&policy);
    assert_eq!(policy.param_name(), "id");
    assert!(format!("{policy:?}").contains("id"));
}
