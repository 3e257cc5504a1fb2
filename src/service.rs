//! The [`SyncEngine`] service.
//!
//! Readiness is documented on [`SyncEngine`] itself, where users read it.

use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::task::{Context, Poll};

use tower_service::Service;

use crate::error::BoxError;
use crate::future::ResponseFuture;
use crate::mode::Mode;
use crate::policy::Policy;
use crate::registry::Registry;
use crate::stats::Stats;
use crate::sync::Arc;
use crate::turn::{Turn, TurnOf};

/// Runs `Mode::Sync` requests with the same key one at a time (or `permits_per_key` at a
/// time), in the order of `call()`; passes `Mode::Concurrent` requests straight through.
///
/// Built by [`SyncEngineLayer`](crate::SyncEngineLayer), or by [`SyncEngine::new`] for a
/// domain of its own. Every service built by one layer value, and every clone of those
/// services, shares that layer's ordering domain. See the [crate docs](crate#guarantees)
/// for the guarantees.
///
/// ```
/// use tower::{Service, ServiceExt, service_fn};
/// use tower_sync_engine::{Mode, SyncEngine};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// struct Edit { document: String, text: String }
///
/// let save = service_fn(|edit: Edit| async move { Ok::<_, tower::BoxError>(edit.text.len()) });
/// let mut service = SyncEngine::new(save, |edit: &Edit| Mode::Sync(edit.document.clone()));
///
/// let edit = Edit { document: "notes".into(), text: "hello".into() };
/// assert_eq!(service.ready().await?.call(edit).await?, 5);
/// assert!(service.stats().is_idle());
/// # Ok(())
/// # }
/// ```
///
/// # Readiness
///
/// [`SyncEngine::poll_ready`] is always ready. A `Mode::Sync` call that has to wait for
/// its key takes the service's handle on the inner service (leaving a clone in its place,
/// as tower-service's docs recommend) and moves it into the response future, which
/// drives `poll_ready` on it only once the request's turn has come, immediately before
/// calling it. This is the arrangement of tower's `Oneshot` and `Steer` and of axum's
/// `HandleError`.
///
/// A `Mode::Concurrent` call, and a `Mode::Sync` call whose key is free (its turn has
/// come at once), ask the inner service whether it is ready (polling it with a no-op
/// waker) and, if it is, call it at once: the response future then only drives the inner
/// future. If it is not ready, the response future waits for readiness as above, with
/// its own waker (and, for `Mode::Sync`, holding the key).
///
/// This means:
///
/// - a request waiting for its key holds no inner capacity, so a saturated key never
///   starves the others of a `ConcurrencyLimit` permit or a `Buffer` slot;
/// - inner readiness is polled before every inner call;
/// - backpressure from the inner service shows up as a pending response future, not as
///   a pending `poll_ready`. Put load shedding inside this layer, or bound it with
///   `max_queue_per_key` and `max_keys`.
pub struct SyncEngine<S, P, K, H = RandomState> {
    inner: S,
    policy: P,
    registry: Arc<Registry<K, H>>,
}

impl<S, P, K> SyncEngine<S, P, K> {
    /// Wraps `inner` in a new ordering domain of its own, with default settings.
    ///
    /// Equivalent to `SyncEngineLayer::new(policy).layer(inner)`; use the layer to share
    /// one domain between several services or to change the settings.
    pub fn new(inner: S, policy: P) -> Self {
        let registry = Registry::new(RandomState::new());
        registry.build();
        SyncEngine::from_parts(inner, policy, Arc::new(registry))
    }
}

impl<S, P, K, H> SyncEngine<S, P, K, H> {
    /// A service in the domain of `registry`, which is built already.
    pub(crate) fn from_parts(inner: S, policy: P, registry: Arc<Registry<K, H>>) -> Self {
        SyncEngine {
            inner,
            policy,
            registry,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Current counts of the ordering domain this service belongs to.
    pub fn stats(&self) -> Stats {
        self.registry.stats()
    }
}

impl<S, P, K, H, Req> Service<Req> for SyncEngine<S, P, K, H>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    P: Policy<Req, Key = K>,
    K: Hash + Eq,
    H: BuildHasher,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, K>;

    /// Always ready: inner readiness is polled by the response future once the request's
    /// turn has come (see [Readiness](SyncEngine#readiness)).
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// Classifies the request and, for `Mode::Sync`, takes its place in its key's line
    /// before returning. A request over a configured limit gets a future that resolves
    /// at once to [`Overloaded`](crate::error::Overloaded).
    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        self.start(request, ResponseFuture::new)
    }
}

impl<S, P, K, H> SyncEngine<S, P, K, H> {
    /// Classifies `request` and takes its place: the first step of `call()`, shared with
    /// the HTTP flavour, whose services wrap this one. `wrap` builds the flavour's
    /// response future around the request's turn.
    ///
    /// The `Mode::Sync` step runs out of line, so that a `Mode::Concurrent` request pays
    /// for its own small stack frame and stores only, not for the registers and stores
    /// of the `Sync` path that the compiler would otherwise merge with its own.
    #[inline(always)]
    pub(crate) fn start<Req, T>(
        &mut self,
        request: Req,
        wrap: impl FnOnce(TurnOf<S, Req, K>) -> T,
    ) -> T
    where
        S: Service<Req> + Clone,
        P: Policy<Req, Key = K>,
        K: Hash + Eq,
        H: BuildHasher,
    {
        match self.policy.classify(&request) {
            Mode::Concurrent => wrap(Turn::concurrent(&mut self.inner, request)),
            Mode::Sync(key) => self.start_sync(key, request, wrap),
        }
    }

    #[inline(never)]
    fn start_sync<Req, T>(
        &mut self,
        key: K,
        request: Req,
        wrap: impl FnOnce(TurnOf<S, Req, K>) -> T,
    ) -> T
    where
        S: Service<Req> + Clone,
        K: Hash + Eq,
        H: BuildHasher,
    {
        Turn::sync(&mut self.inner, &self.registry, key, request, wrap)
    }
}

impl<S: Clone, P: Clone, K, H> Clone for SyncEngine<S, P, K, H> {
    fn clone(&self) -> Self {
        SyncEngine {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
            registry: Arc::clone(&self.registry),
        }
    }
}

impl<S: fmt::Debug, P, K, H> fmt::Debug for SyncEngine<S, P, K, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncEngine")
            .field("inner", &self.inner)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}
