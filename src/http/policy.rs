//! Policies for the usual HTTP keys: a header, or an extension set by an earlier layer.
//!
//! Each is a type implementing [`Policy`] for `http::Request<B>` with every body type `B`,
//! and nothing about the layer's types is fixed when the policy is made. The layer's key
//! type is left open until the layer is used on a service of `Request<B>`, where the
//! policy's `Key` settles it; so a setting can be chained after
//! `SyncEngineLayer::new(policy)`, and neither the body type nor the key needs naming.

use std::any::type_name;
use std::fmt;
use std::marker::PhantomData;

use ::http::Request;
use ::http::header::{HeaderName, HeaderValue};

use crate::mode::Mode;
use crate::policy::Policy;

/// Orders requests by the value of the header `name`; requests without it are
/// `Mode::Concurrent`.
///
/// `name` is anything `HeaderName` can be parsed from: `&str`, `String`, bytes, or a
/// `HeaderName` such as `http::header::AUTHORIZATION`. Header names are
/// case-insensitive, so `"X-Session-Id"` and `"x-session-id"` are the same policy.
///
/// The key is the header's value, compared byte for byte (an empty value is a key like
/// any other). **A repeated header is keyed by its first value**, the one
/// `HeaderMap::get` returns and so the one a handler reading the header sees: the
/// request is ordered with the session it will act on. Keying by all the values instead
/// would let a request for session `a` that also carries `b` run alongside `a`'s other
/// requests.
///
/// **The key owns its bytes**: it is a copy of the value, with the same [`is_sensitive`]
/// flag, not a clone. A server parses the headers in place, so a request's `HeaderValue`
/// is a slice of its connection's read buffer (several kilobytes under hyper), and a
/// clone shares that whole buffer. The layer keeps a key for as long as its session
/// stays busy, possibly long after the request it came from has been handled and its
/// connection closed; a cloned key would keep that buffer alive all the while, for every
/// live key. The copy costs one allocation of the value's length per `Mode::Sync`
/// request.
///
/// [`is_sensitive`]: https://docs.rs/http/1/http/header/struct.HeaderValue.html#method.is_sensitive
///
/// # Panics
///
/// If `name` is not a valid header name; the message names it.
///
/// ```
/// use axum::{Router, body::Body, http::Request, routing::post};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use tower_sync_engine::{Mode, Policy, ServiceBuilderExt, SyncEngineLayer};
/// use tower_sync_engine::http::by_header;
///
/// let policy = by_header("x-session-id");
/// let request = Request::get("/").header("x-session-id", "alice").body(()).unwrap();
/// assert_eq!(policy.classify(&request), Mode::Sync("alice".parse().unwrap()));
/// assert_eq!(policy.classify(&Request::get("/").body(()).unwrap()), Mode::Concurrent);
///
/// // The HTTP flavour, settings chained, as an axum layer:
/// let app: Router = Router::new()
///     .route("/edit", post(|| async { "saved" }))
///     .layer(SyncEngineLayer::new(by_header("x-session-id")).max_queue_per_key(32).for_http());
///
/// // The plain flavour, through `ServiceBuilder`:
/// let service = ServiceBuilder::new()
///     .sync_engine(by_header("x-session-id"))
///     .service(service_fn(|_: Request<Body>| async { Ok::<_, tower::BoxError>("saved") }));
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let saved = service.oneshot(Request::new(Body::empty())).await.unwrap();
/// # assert_eq!(saved, "saved");
/// # });
/// # drop(app);
/// ```
#[track_caller]
pub fn by_header<N: AsRef<[u8]>>(name: N) -> ByHeader {
    let name = name.as_ref();
    match HeaderName::from_bytes(name) {
        Ok(name) => ByHeader { name },
        Err(_) => panic!(
            "by_header: {:?} is not a valid HTTP header name",
            String::from_utf8_lossy(name)
        ),
    }
}

/// The policy made by [`by_header`]: `Mode::Sync(value)` of the request's first value of
/// the header, `Mode::Concurrent` when it has none.
///
/// The key is a copy of the value that owns exactly its bytes, so that a live key never
/// keeps the request's, or its connection's, read buffer alive (see [`by_header`]).
#[derive(Clone, Debug)]
pub struct ByHeader {
    name: HeaderName,
}

impl ByHeader {
    /// The header this policy reads.
    pub fn header_name(&self) -> &HeaderName {
        &self.name
    }
}

impl<B> Policy<Request<B>> for ByHeader {
    type Key = HeaderValue;

    #[inline]
    fn classify(&self, request: &Request<B>) -> Mode<HeaderValue> {
        match request.headers().get(&self.name) {
            Some(value) => Mode::Sync(owned(value)),
            None => Mode::Concurrent,
        }
    }
}

/// A copy of `value` that owns exactly its bytes.
///
/// A server's `HeaderValue` is usually a slice of the connection's read buffer, and a
/// clone would share, and so keep alive, that whole buffer for as long as the registry
/// keeps the key: after the request has been handled, and after its connection has
/// closed, while later requests keep the session busy. `from_bytes` is the cheapest safe
/// copy: one allocation of the value's length (none for an empty value) and one scan of
/// its bytes, which `from_maybe_shared(Bytes::copy_from_slice(..))` would do as well.
#[inline]
fn owned(value: &HeaderValue) -> HeaderValue {
    // Only a value made with the unsafe `from_maybe_shared_unchecked` can hold bytes that
    // `from_bytes` rejects (hyper's HTTP/1 parser, which makes its values that way, lets
    // none of them through); keying by a clone keeps such a request ordered, at the cost
    // of sharing its buffer.
    let mut key = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
    key.set_sensitive(value.is_sensitive());
    key
}

/// Orders requests by their extension of type `T`, such as a user id that an
/// authentication layer outside this one inserted; requests without one are
/// `Mode::Concurrent`.
///
/// The key is a clone of the extension, so `T` should be cheap to clone (an id, an
/// `Arc`), and it must be `Hash + Eq` to key the layer.
///
/// ```
/// use axum::{Router, body::Body, http::Request, routing::post};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use tower_sync_engine::{Mode, Policy, ServiceBuilderExt, SyncEngineLayer};
/// use tower_sync_engine::http::by_extension;
///
/// #[derive(Clone, PartialEq, Eq, Hash, Debug)]
/// struct UserId(u64);
///
/// let mut request = Request::get("/").body(()).unwrap();
/// request.extensions_mut().insert(UserId(7));
/// assert_eq!(by_extension::<UserId>().classify(&request), Mode::Sync(UserId(7)));
///
/// // The HTTP flavour, settings chained, as an axum layer:
/// let app: Router = Router::new()
///     .route("/edit", post(|| async { "saved" }))
///     .layer(SyncEngineLayer::new(by_extension::<UserId>()).max_queue_per_key(32).for_http());
///
/// // The plain flavour, through `ServiceBuilder`:
/// let service = ServiceBuilder::new()
///     .sync_engine(by_extension::<UserId>())
///     .service(service_fn(|_: Request<Body>| async { Ok::<_, tower::BoxError>("saved") }));
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let saved = service.oneshot(Request::new(Body::empty())).await.unwrap();
/// # assert_eq!(saved, "saved");
/// # });
/// # drop(app);
/// ```
pub fn by_extension<T>() -> ByExtension<T> {
    ByExtension { _key: PhantomData }
}

/// The policy made by [`by_extension`]: `Mode::Sync` of a clone of the request's `T`
/// extension, `Mode::Concurrent` when it has none.
pub struct ByExtension<T> {
    // Holds no `T`: the policy is `Send`, `Sync`, `Clone` and `Debug` whatever `T` is.
    _key: PhantomData<fn() -> T>,
}

impl<T, B> Policy<Request<B>> for ByExtension<T>
where
    T: Clone + Send + Sync + 'static,
{
    type Key = T;

    #[inline]
    fn classify(&self, request: &Request<B>) -> Mode<T> {
        match request.extensions().get::<T>() {
            Some(key) => Mode::Sync(key.clone()),
            None => Mode::Concurrent,
        }
    }
}

impl<T> Clone for ByExtension<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for ByExtension<T> {}

impl<T> fmt::Debug for ByExtension<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ByExtension<{}>", type_name::<T>())
    }
}
