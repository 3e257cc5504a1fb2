//! The HTTP flavour: a session's key is held until its response body ends, an overload
//! is a `503` response (or the status, `Retry-After` and text body you choose), and
//! policies for the usual keys.
//!
//! [`SyncEngineLayer::for_http`](crate::SyncEngineLayer::for_http) turns a layer into an
//! [`HttpSyncEngineLayer`] for services of `http::Request<ReqBody>` that answer
//! `http::Response<ResBody>`, in the same ordering domain. [`by_header`] and
//! [`by_extension`] are the policies most HTTP services need, and `by_path_param`
//! (feature `axum`) keys by an axum route's path parameter:
//!
//! ```
//! use std::convert::Infallible;
//! use axum::{Router, body::Body, routing::{get, post}};
//! use tower_sync_engine::SyncEngineLayer;
//! use tower_sync_engine::http::by_header;
//!
//! async fn edit() -> &'static str {
//!     "saved"
//! }
//!
//! async fn stream_report() -> Body {
//!     let lines = ["revenue\n", "costs\n"].map(Ok::<_, Infallible>);
//!     Body::from_stream(futures::stream::iter(lines))
//! }
//!
//! let app: Router = Router::new()
//!     .route("/edit", post(edit))
//!     .route("/report", get(stream_report))
//!     .layer(SyncEngineLayer::new(by_header("x-session-id")).max_queue_per_key(32).for_http());
//! # drop(app);
//! ```
//!
//! # Done is when the body has ended
//!
//! A handler that streams its body (a download, a report, chunked JSON, a proxied
//! upstream) has not finished when its future resolves: the body is still being
//! produced, often by the handler's own state. If the next request of the same session
//! started then, it would run alongside the stream it was meant to follow. So a
//! `Mode::Sync` request's place on its key moves, with the response, into the
//! [`ResponseBody`], and the key passes to the next request only when that body:
//!
//! - has reported its end: `poll_frame` returned `None`, or `is_end_stream()` is true
//!   after a frame; a body that is already at its end when the response is built (`204`,
//!   `304`, a `HEAD` response, an empty body) releases the key at once, even if nobody
//!   ever polls it;
//! - has returned an error from `poll_frame`;
//! - or has been dropped: the client disconnected, the server gave up on the connection,
//!   or an outer layer replaced the body.
//!
//! A `Mode::Concurrent` response body holds nothing, and polling it costs one branch more
//! than polling the inner body. Frames, trailers and size hints pass through unchanged.
//! Releasing from the body is the same step as dropping a response future in the plain
//! flavour, so every guarantee in the [crate docs](crate#guarantees) holds with
//! "response future" read as "response future, then response body".
//!
//! # Errors and overload
//!
//! - The service's error type is the inner service's, unchanged (not boxed): with axum's
//!   `Infallible` handlers the service is infallible too, and `Router::layer` takes it
//!   with no `HandleErrorLayer`.
//! - A request rejected by [`max_queue_per_key`](crate::SyncEngineLayer::max_queue_per_key)
//!   or [`max_keys`](crate::SyncEngineLayer::max_keys) is answered by the layer itself,
//!   by default with `503 Service Unavailable` and an empty body (`ResBody::default()`,
//!   as tower-http's `TimeoutLayer` answers `408`). The
//!   [`Overloaded`](crate::error::Overloaded) value is in the response's extensions
//!   whatever the answer, so outer layers can tell which limit was hit.
//! - The HTTP layer's settings change the answer, as tower-http's
//!   `TimeoutLayer::with_status_code` does for timeouts:
//!   [`overload_status`](HttpSyncEngineLayer::overload_status) (`429 Too Many
//!   Requests` is the usual alternative), [`retry_after`](HttpSyncEngineLayer::retry_after)
//!   (a `Retry-After` header in whole seconds, rounded up) and
//!   [`describe_overload`](HttpSyncEngineLayer::describe_overload) (a short text body
//!   naming the limit, off by default so that nothing about the server's limits
//!   reaches clients unless asked for; it needs a body type that is `From<String>`, as
//!   axum's is). A status that is not a `4xx` or `5xx` error, and a zero
//!   `retry_after`, panic where they are set.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, body::Body, http::{Request, StatusCode}, routing::post};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_sync_engine::SyncEngineLayer;
//! use tower_sync_engine::http::by_header;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = SyncEngineLayer::new(by_header("x-session-id"))
//!     .max_queue_per_key(32)
//!     .max_keys(1) // one live session at a time, to show the answer
//!     .for_http()
//!     .overload_status(StatusCode::TOO_MANY_REQUESTS)
//!     .retry_after(Duration::from_millis(1500))
//!     .describe_overload();
//! let app: Router = Router::new()
//!     .route("/edit", post(|| async { "saved" }))
//!     .layer(layer);
//!
//! let edit = |session| Request::post("/edit").header("x-session-id", session).body(Body::empty());
//! // Alice's session is live until her response body has been read or dropped.
//! let alice = app.clone().oneshot(edit("alice").unwrap()).await.unwrap();
//! let bob = app.clone().oneshot(edit("bob").unwrap()).await.unwrap();
//!
//! assert_eq!(bob.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(bob.headers()["retry-after"], "2");
//! let text = bob.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(text, "request rejected: too many live keys (max_keys)");
//! # drop(alice);
//! # }
//! ```
//!
//! # Policies and type inference
//!
//! [`by_header`] and [`by_extension`] return policy types ([`ByHeader`],
//! [`ByExtension`]) that implement [`Policy`](crate::Policy) for `Request<B>` with every
//! body type `B`. [`SyncEngineLayer::new`](crate::SyncEngineLayer::new) constrains
//! nothing, so the layer's key type stays open until the layer wraps a service of
//! `Request<B>`, where the policy's key settles it. Settings chain after `new` and
//! nothing needs naming, with either flavour:
//!
//! ```
//! use axum::{Router, body::Body, http::Request, routing::post};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_sync_engine::{ServiceBuilderExt, SyncEngineLayer};
//! use tower_sync_engine::http::{by_extension, by_header};
//!
//! #[derive(Clone, PartialEq, Eq, Hash)]
//! struct UserId(u64);
//!
//! let app: Router = Router::new()
//!     .route("/edit", post(|| async { "saved" }))
//!     .layer(SyncEngineLayer::new(by_header("x-session-id")).max_queue_per_key(32).for_http())
//!     .layer(SyncEngineLayer::new(by_extension::<UserId>()).max_keys(10_000).for_http());
//!
//! // Plain: the key type is settled where the service is called with a `Request<Body>`.
//! let plain = ServiceBuilder::new()
//!     .sync_engine(by_header("x-session-id"))
//!     .service(service_fn(|_: Request<Body>| async { Ok::<_, tower::BoxError>("saved") }));
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let saved = plain.oneshot(Request::new(Body::empty())).await.unwrap();
//! # assert_eq!(saved, "saved");
//! # });
//! # drop(app);
//! ```
//!
//! (A layer that is made but never wraps a service leaves its key type open, and the
//! compiler asks for it.) Any other policy works too: a closure over the request (name its argument's type,
//! for instance `&axum::extract::Request`), or a type of your own implementing `Policy`.
//! Keys are owned values: a `HeaderValue` copied with `HeaderValue::from_bytes`, as
//! [`by_header`] does, a `String`, an id. Not a `HeaderValue` clone: it shares the
//! request's buffer, the connection's read buffer under hyper, and keeps it alive for as
//! long as the key is live.
//!
//! # Keys from path parameters
//!
//! Under axum, `by_path_param("id")` (feature `axum`) orders requests by the route's
//! `{id}` parameter, percent-decoded as axum's `Path` extractor decodes it: the key is
//! the text a handler's `Path<String>` receives. `/docs/alpha/edits` and
//! `/docs/%61lpha/edits` reach the same handler with the same `id`, so they are one key.
//! A key cut from the raw path (`uri().path().strip_prefix("/docs/")`) makes them two
//! keys, and the two edits of one document run at once.
//!
//! axum finds the parameters when its `Router` matches a route, so add the layer with
//! `Router::layer` or `Router::route_layer`, which wrap each route. Around the whole
//! `Router` it would run before routing, with no parameters to read: the policy then
//! panics on the first request, naming the fix, rather than run every request unordered.
//! Routes without the parameter (`/health` beside `/docs/{id}`) and the fallback's `404`s
//! are `Mode::Concurrent`.
//!
//! It is one policy rather than a recipe (a `from_fn` middleware extracting `Path` into
//! an extension for [`by_extension`]) because the recipe is two layers that must be
//! stacked in the right order: stacked the other way, `by_extension` finds no extension
//! and every request runs unordered, without a sign. The policy reads the parameters
//! through axum's own `RawPathParams` extractor, so the decoding is axum's.
//!
//! # Bodies that never end
//!
//! Holding the key until the body ends has a consequence: a body that streams for as long
//! as the client listens (server-sent events, long polling, a live log) holds its
//! session's key for that long, and the session's next request waits for it. Make such
//! routes `Mode::Concurrent`, by path or by method:
//!
//! ```
//! use axum::{Router, extract::Request, http::Method, routing::{get, post}};
//! use tower_sync_engine::{Mode, Policy, SyncEngineLayer};
//! use tower_sync_engine::http::by_header;
//!
//! let session = by_header("x-session-id");
//! let layer = SyncEngineLayer::new(move |request: &Request| {
//!     if request.uri().path().starts_with("/events") || request.method() == Method::OPTIONS {
//!         // A stream that never ends, and a request that needs no order.
//!         Mode::Concurrent
//!     } else {
//!         session.classify(request)
//!     }
//! })
//! .for_http();
//!
//! let app: Router = Router::new()
//!     .route("/edit", post(|| async { "saved" }))
//!     .route("/events", get(|| async { "an endless stream, in a real service" }))
//!     .layer(layer);
//! # drop(app);
//! ```
//!
//! # Upgrades
//!
//! A `101 Switching Protocols` response, such as the answer to a WebSocket handshake, has
//! an empty body, so its key passes on as soon as the response is built, while the
//! upgraded connection goes on: the session's next request runs beside the WebSocket.
//! That is intended. From the `101` on, the connection is no longer an HTTP exchange:
//! the layer sees neither its messages nor its end, and holding the key until it closes
//! would stall the session's requests for the WebSocket's whole life. To order a
//! WebSocket's messages with the session's requests, call each message through a plain
//! layer in the same domain, as [One domain, both flavours](#one-domain-both-flavours)
//! shows: every message then takes its place in the session's line, between its
//! requests.
//!
//! # Timeouts and slow readers
//!
//! - A timeout **outside** this layer (tower-http's `TimeoutLayer`, answering `408`)
//!   covers the wait for the key and the handler up to its response head. When it fires
//!   while the request waits, the request leaves the line.
//! - A timeout **inside** covers the handler up to its response head; when it fires, the
//!   key passes on.
//! - Neither covers the body, which holds the key after both have let the response
//!   through. A body that is slow to *produce* is bounded by a body timeout such as
//!   tower-http's `ResponseBodyTimeoutLayer` (between frames) or
//!   `ResponseBodyDeadlineLayer` (whole body), on either side of this layer: when it
//!   fails the body, the key passes on.
//! - A client that *reads* slowly holds its own session's key, never another's: the
//!   server polls the body as fast as that client reads, and other keys share nothing
//!   with it. The same session's later requests wait behind it; bound them with
//!   `max_queue_per_key` (a full line is answered `503` at once) and a timeout outside
//!   (a request that waits too long is answered `408`). A body deadline fires when the
//!   server next polls the body, that is when the client reads again; a client that
//!   stops reading altogether holds its key until its connection closes, so bound
//!   connections at the server, or make routes with large bodies `Mode::Concurrent`.
//!
//! # One domain, both flavours
//!
//! `for_http` takes the layer by value. To order other services in the same domain, such
//! as a WebSocket message handler beside the HTTP routes, clone the layer first: the
//! HTTP layer and the plain one then share settings, keys and [`stats`](crate::Stats),
//! and their requests queue behind one another in call order. A plain request holds its
//! key until its response future completes; an HTTP one until its body ends. The policy
//! must classify both request types with the same key type:
//!
//! ```
//! use axum::http::Request;
//! use tower::{Layer, service_fn};
//! use tower_sync_engine::{Mode, Policy, SyncEngineLayer};
//!
//! struct Message { session: String, text: String }
//!
//! #[derive(Clone)]
//! struct BySession;
//!
//! impl<B> Policy<Request<B>> for BySession {
//!     type Key = String;
//!     fn classify(&self, request: &Request<B>) -> Mode<String> {
//!         match request.headers().get("x-session-id").and_then(|v| v.to_str().ok()) {
//!             Some(session) => Mode::Sync(session.to_owned()),
//!             None => Mode::Concurrent,
//!         }
//!     }
//! }
//!
//! impl Policy<Message> for BySession {
//!     type Key = String;
//!     fn classify(&self, message: &Message) -> Mode<String> {
//!         Mode::Sync(message.session.clone())
//!     }
//! }
//!
//! let layer = SyncEngineLayer::new(BySession).max_queue_per_key(32);
//! let http = layer.clone().for_http();
//! let messages = layer.layer(service_fn(|message: Message| async move {
//!     Ok::<_, tower::BoxError>(message.text.len())
//! }));
//! # fn is_service<S: tower::Service<Message>>(_: &S) {}
//! # is_service(&messages);
//! # drop(http);
//! ```

mod body;
mod future;
mod layer;
mod overload;
#[cfg(feature = "axum")]
mod path;
mod policy;
mod service;

pub use self::body::ResponseBody;
pub use self::future::ResponseFuture;
pub use self::layer::HttpSyncEngineLayer;
pub use self::overload::{EmptyOverloadBody, OverloadBody, TextOverloadBody};
#[cfg(feature = "axum")]
pub use self::path::{ByPathParam, by_path_param};
pub use self::policy::{ByExtension, ByHeader, by_extension, by_header};
pub use self::service::HttpSyncEngine;
