//! [`ServiceBuilderExt`]: `.sync_engine(policy)` on tower's [`ServiceBuilder`].

use tower::ServiceBuilder;
use tower_layer::Stack;

use crate::layer::SyncEngineLayer;

mod sealed {
    pub trait Sealed<L> {}

    impl<L> Sealed<L> for tower::ServiceBuilder<L> {}
}

/// Adds this crate's layer to tower's [`ServiceBuilder`].
///
/// The trait is sealed: it is implemented for `ServiceBuilder` only.
///
/// ```
/// use std::time::Duration;
/// use tower::{ServiceBuilder, service_fn};
/// use tower_sync_engine::{Mode, ServiceBuilderExt};
///
/// struct Message { connection_id: u64 }
///
/// let service = ServiceBuilder::new()
///     .sync_engine(|msg: &Message| Mode::Sync(msg.connection_id))
///     .timeout(Duration::from_secs(5))
///     .service(service_fn(|msg: Message| async move {
///         Ok::<_, tower::BoxError>(msg.connection_id)
///     }));
/// # fn assert_service<S: tower::Service<Message>>(_: S) {}
/// # assert_service(service);
/// ```
///
/// For settings such as `max_queue_per_key`, build the layer and add it with
/// [`ServiceBuilder::layer`]; keep a clone of it to read its
/// [`stats`](SyncEngineLayer::stats).
///
/// [`ServiceBuilder`]: https://docs.rs/tower/0.5/tower/builder/struct.ServiceBuilder.html
/// [`ServiceBuilder::layer`]: https://docs.rs/tower/0.5/tower/builder/struct.ServiceBuilder.html#method.layer
#[cfg_attr(docsrs, doc(cfg(feature = "builder")))]
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// Orders requests with [`SyncEngineLayer::new(policy)`](SyncEngineLayer::new):
    /// a new ordering domain with default settings.
    ///
    /// Give the closure's parameter its type. Here the request type is only known from
    /// the service added later, so rustc cannot infer it from `|req| …`: it stops with
    /// E0282 "type annotations needed". Write the request type of the service below the
    /// layer (or use a ready-made policy such as the `http` module's `by_header`):
    ///
    /// ```
    /// use axum::body::Body;
    /// use axum::http::{HeaderValue, Request};
    /// use tower::{BoxError, ServiceBuilder, service_fn};
    /// use tower_sync_engine::{Mode, ServiceBuilderExt};
    ///
    /// let service = ServiceBuilder::new()
    ///     // A copy of the header, not a clone, which would keep the request's buffer alive.
    ///     .sync_engine(|req: &Request<Body>| match req.headers().get("x-session-id") {
    ///         Some(session) => match HeaderValue::from_bytes(session.as_bytes()) {
    ///             Ok(session) => Mode::Sync(session),
    ///             Err(_) => Mode::Concurrent,
    ///         },
    ///         None => Mode::Concurrent,
    ///     })
    ///     .service(service_fn(|_req: Request<Body>| async { Ok::<_, BoxError>("done") }));
    /// # fn assert_service<S: tower::Service<Request<Body>>>(_: S) {}
    /// # assert_service(service);
    /// ```
    ///
    /// Without the annotation:
    ///
    /// ```compile_fail,E0282
    /// # use axum::body::Body;
    /// # use axum::http::{HeaderValue, Request};
    /// # use tower::{BoxError, ServiceBuilder, service_fn};
    /// # use tower_sync_engine::{Mode, ServiceBuilderExt};
    /// let service = ServiceBuilder::new()
    ///     .sync_engine(|req| match req.headers().get("x-session-id") {
    ///         Some(session) => match HeaderValue::from_bytes(session.as_bytes()) {
    ///             Ok(session) => Mode::Sync(session),
    ///             Err(_) => Mode::Concurrent,
    ///         },
    ///         None => Mode::Concurrent,
    ///     })
    ///     .service(service_fn(|_req: Request<Body>| async { Ok::<_, BoxError>("done") }));
    /// ```
    ///
    /// A function works as well as a closure: `.sync_engine(by_session)` with
    /// `fn by_session(req: &Request<Body>) -> Mode<HeaderValue>`.
    fn sync_engine<P, K>(self, policy: P) -> ServiceBuilder<Stack<SyncEngineLayer<P, K>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn sync_engine<P, K>(self, policy: P) -> ServiceBuilder<Stack<SyncEngineLayer<P, K>, L>> {
        self.layer(SyncEngineLayer::new(policy))
    }
}
