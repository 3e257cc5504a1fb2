//! The [`SyncEngine`] service.
//!
//! Readiness is documented on [`SyncEngine`] itself, where users read it.
//!
//! # Performance
//!
//! `call()` classifies the request inline and runs the `Mode::Sync` step out of line
//! (`start_sync`), so that a `Mode::Concurrent` request does not pay for that step's
//! saved registers and larger stack frame, which the compiler would otherwise share
//! with the pass-through arm (`layer_concurrent` in `benches/instructions.rs`, held by
//! CI's instruction gate).

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
use crate::turn::Turn;

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
/// [`SyncEngine::poll_ready`] is always ready: the layer reserves nothing in the inner
/// service. Each request reaches the inner service in one of two places.
///
/// - **Inside `call()`**, when the request can start at once: a `Mode::Concurrent`
///   request, and a `Mode::Sync` request whose key is free: no other request holds or
///   waits for its key (with `permits_per_key(n)`: none waits for it, fewer than `n`
///   hold it, and each of those has called the inner service). `call()` polls the inner
///   service's `poll_ready` once, with a no-op waker, and if that returns ready, calls
///   the inner service's `call` before it returns; the response future then only drives
///   the inner future.
/// - **From the response future**, for a `Mode::Sync` request that has to wait for its
///   key. `call()` only takes the service's handle on the inner service (leaving a clone
///   in its place, as tower-service's docs recommend) and moves it into the response
///   future, which polls `poll_ready` on it with its own waker once the request's turn
///   has come, and calls it as soon as it is ready. A request whose inner service was
///   not ready in `call()` continues the same way (holding its key meanwhile, for
///   `Mode::Sync`). A request that a limit rejects never reaches the inner service.
///
/// This is the arrangement of tower's `Oneshot` and `Steer` and of axum's `HandleError`,
/// with a shortcut for the requests that can start at once. It means:
///
/// - a request waiting for its key holds no inner capacity, so a saturated key never
///   starves the others of a `ConcurrencyLimit` permit or a `Buffer` slot;
/// - inner readiness is polled before every inner call;
/// - backpressure from the inner service shows up as a pending response future, not as
///   a pending `poll_ready`. Put load shedding inside this layer, or bound it with
///   `max_queue_per_key` and `max_keys`.
///
/// # Where the inner service runs
///
/// For a request that starts at once, the inner service's `poll_ready` and `call` run
/// inside `call()`: on the caller's thread, in its task and its runtime context, and
/// under any lock the caller holds. Whatever they do happens there: a `service_fn`
/// closure's work before it returns its future, a `Timeout` starting its timer, a
/// panic, which unwinds out of `call()` (a `Mode::Sync` request gives its place up).
/// For a request that waited, they run in whichever task, on whichever thread, polls
/// its response future, from the first poll after its turn has come. Hence:
///
/// - **Make `call()` where the inner stack can run.** With a layer inside that needs the
///   runtime, such as tower's `Timeout`, which starts a tokio timer in its `call`, that
///   is inside the runtime: `call()` from a thread outside it panics for a request that
///   starts at once ("there is no reactor running"), though not for one that has to
///   wait.
/// - **A timeout inside the layer starts at `call()` for a request that starts at once**,
///   and only once its turn has come for a request that waited. Either way it covers
///   the handler and not the wait for the key (a timeout outside covers both).
/// - **A lock held across `call()` is held while the inner service runs**, so the inner
///   service's `poll_ready` and `call` must not take it.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use tower::{Service, service_fn};
/// use tower_sync_engine::{Mode, SyncEngine};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let calls = Arc::new(AtomicUsize::new(0));
/// let counted = Arc::clone(&calls);
/// let handler = service_fn(move |n: u32| {
///     // Runs when the inner service is called, before the returned future is polled.
///     counted.fetch_add(1, Ordering::SeqCst);
///     async move { Ok::<_, tower::BoxError>(n) }
/// });
/// let mut service = SyncEngine::new(handler, |_: &u32| Mode::Sync("connection"));
///
/// let first = service.call(1); // the key is free: the handler is called here
/// assert_eq!(calls.load(Ordering::SeqCst), 1);
/// let second = service.call(2); // the key is busy: not yet
/// assert_eq!(calls.load(Ordering::SeqCst), 1);
///
/// assert_eq!(first.await?, 1);
/// assert_eq!(second.await?, 2); // called by its response future, once its turn came
/// assert_eq!(calls.load(Ordering::SeqCst), 2);
/// # Ok(())
/// # }
/// ```
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

    /// Always ready: inner readiness is polled for each request, inside `call()` when the
    /// request can start at once, otherwise by its response future once its turn has
    /// come (see [Readiness](SyncEngine#readiness)).
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// Classifies the request and, for `Mode::Sync`, takes its place in its key's line
    /// before returning. A request over a configured limit gets a future that resolves
    /// at once to [`Overloaded`](crate::error::Overloaded).
    ///
    /// A `Mode::Concurrent` request, and a `Mode::Sync` request whose key is free, reach
    /// the inner service here: its `poll_ready` (with a no-op waker) and, when that is
    /// ready, its `call` run inside this `call()`, in the caller's thread, task and
    /// runtime, under any lock the caller holds. A request that waits for its key
    /// reaches it from its response future once its turn has come. So make `call()`
    /// where the inner stack can run: inside the runtime if an inner layer such as
    /// `Timeout` needs its timer (see
    /// [Where the inner service runs](SyncEngine#where-the-inner-service-runs)).
    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        self.start(request)
    }
}

impl<S, P, K, H> SyncEngine<S, P, K, H> {
    /// Classifies `request` and takes its place: the first step of `call()`, shared with
    /// the HTTP flavour, whose services wrap this one. Returns the flavour's response
    /// future `T`, built around the request's [`Turn`].
    #[inline]
    pub(crate) fn start<Req, T>(&mut self, request: Req) -> T
    where
        S: Service<Req> + Clone,
        P: Policy<Req, Key = K>,
        K: Hash + Eq,
        H: BuildHasher,
        T: From<Turn<S, Req, K>>,
    {
        match self.policy.classify(&request) {
            Mode::Concurrent => T::from(Turn::concurrent(&mut self.inner, request)),
            Mode::Sync(key) => self.start_sync(key, request),
            Mode::SyncAll(keys) => self.start_sync_all(keys, request),
        }
    }

    /// The `Mode::Sync` step of [`start`](Self::start).
    // PERF: layer_concurrent (module docs, Performance).
    #[inline(never)]
    fn start_sync<Req, T>(&mut self, key: K, request: Req) -> T
    where
        S: Service<Req> + Clone,
        K: Hash + Eq,
        H: BuildHasher,
        T: From<Turn<S, Req, K>>,
    {
        Turn::sync(&mut self.inner, &self.registry, key, request)
    }

    /// The `Mode::SyncAll` step of [`start`](Self::start). An empty set is
    /// `Mode::Concurrent`.
    // PERF: layer_sync_new_key, layer_concurrent. Out of line, so that the single-key
    // path stays as it was; cold, so that the pass-through keeps its branch layout (69 →
    // 68 instructions per `Mode::Concurrent` request).
    #[cold]
    #[inline(never)]
    #[expect(
        clippy::box_collection,
        clippy::boxed_local,
        reason = "the box `Mode::SyncAll` carries is opened here, out of the keyed path"
    )]
    fn start_sync_all<Req, T>(&mut self, keys: Box<Vec<K>>, request: Req) -> T
    where
        S: Service<Req> + Clone,
        K: Hash + Eq,
        H: BuildHasher,
        T: From<Turn<S, Req, K>>,
    {
        if keys.is_empty() {
            return T::from(Turn::concurrent(&mut self.inner, request));
        }
        Turn::sync_all(&mut self.inner, &self.registry, *keys, request)
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
