//! The [`SyncEngineLayer`].

use std::fmt;
use std::hash::RandomState;

use tower_layer::Layer;

use crate::mode::Mode;
use crate::registry::{Config, Registry};
use crate::service::SyncEngine;
use crate::stats::Stats;
use crate::sync::Arc;

/// Applies [`SyncEngine`] to services: one ordering domain per layer value.
///
/// Every service this layer builds, and every clone of those services, shares one
/// registry of keys. That is what makes the layer work under axum, which applies a layer
/// once per route and clones the service for every request. Clones of the layer share
/// the domain too; two calls of [`SyncEngineLayer::new`] make two independent domains.
///
/// The settings methods below return a layer with a **new** ordering domain: configure
/// the layer first, then clone it or build services with it.
///
/// ```
/// use std::time::Duration;
/// use tower::{ServiceBuilder, service_fn};
/// use tower_sync_engine::{Mode, SyncEngineLayer};
///
/// struct Message { connection_id: u64, body: String }
///
/// let layer = SyncEngineLayer::new(|msg: &Message| Mode::Sync(msg.connection_id))
///     .permits_per_key(1)
///     .max_queue_per_key(1024)
///     .max_keys(100_000);
/// let service = ServiceBuilder::new()
///     .layer(layer.clone())
///     .timeout(Duration::from_secs(5))
///     .service(service_fn(|msg: Message| async move {
///         Ok::<_, tower::BoxError>(msg.body.len())
///     }));
/// assert!(layer.stats().is_idle());
/// # drop(service);
/// ```
pub struct SyncEngineLayer<P, K, H = RandomState> {
    policy: P,
    registry: Arc<Registry<K, H>>,
}

impl<P, K> SyncEngineLayer<P, K> {
    /// Creates a layer with a new ordering domain that classifies each request with
    /// `policy`.
    ///
    /// Defaults: one permit per key, unbounded queues, unbounded keys, and std's
    /// [`RandomState`] hasher, which resists HashDoS when keys come from clients.
    pub fn new<Req>(policy: P) -> Self
    where
        P: Fn(&Req) -> Mode<K>,
    {
        SyncEngineLayer {
            policy,
            registry: Arc::new(Registry::new(Config::default(), RandomState::new())),
        }
    }
}

impl<P, K, H> SyncEngineLayer<P, K, H> {
    /// Uses `hasher` to spread keys over the registry, in a new ordering domain.
    ///
    /// Keys often come from clients; keep a DoS-resistant hasher (the default) unless
    /// keys are trusted or `max_keys` bounds the damage.
    pub fn with_hasher<H2>(self, hasher: H2) -> SyncEngineLayer<P, K, H2> {
        SyncEngineLayer {
            policy: self.policy,
            registry: Arc::new(Registry::new(self.registry.config(), hasher)),
        }
    }

    /// How many requests with the same key may run at once (default 1). They are still
    /// started in call order.
    ///
    /// Returns a layer with a new ordering domain.
    ///
    /// # Panics
    ///
    /// If `permits` is 0 or greater than `u32::MAX`.
    pub fn permits_per_key(self, permits: usize) -> Self
    where
        H: Clone,
    {
        assert!(
            permits >= 1 && u32::try_from(permits).is_ok(),
            "permits_per_key must be between 1 and u32::MAX, got {permits}"
        );
        self.reconfigure(|config| config.permits_per_key = permits)
    }

    /// How many requests may wait for a busy key (default: unbounded). A request that
    /// would wait beyond this gets [`Overloaded`](crate::error::Overloaded) at once and
    /// leaves no trace. 0 means a request whose key is busy is always rejected.
    ///
    /// Returns a layer with a new ordering domain.
    pub fn max_queue_per_key(self, max: usize) -> Self
    where
        H: Clone,
    {
        self.reconfigure(|config| config.max_queue_per_key = Some(max))
    }

    /// How many keys may be live at once (default: unbounded). A request for a key that is
    /// not live while `max` keys are gets [`Overloaded`](crate::error::Overloaded) at once;
    /// requests for live keys are unaffected.
    ///
    /// Returns a layer with a new ordering domain.
    ///
    /// # Panics
    ///
    /// If `max` is 0, which would reject every `Mode::Sync` request.
    pub fn max_keys(self, max: usize) -> Self
    where
        H: Clone,
    {
        assert!(max >= 1, "max_keys must be at least 1, got 0");
        self.reconfigure(|config| config.max_keys = Some(max))
    }

    /// Current counts of this layer's ordering domain.
    pub fn stats(&self) -> Stats {
        self.registry.stats()
    }

    fn reconfigure(self, change: impl FnOnce(&mut Config)) -> Self
    where
        H: Clone,
    {
        let mut config = self.registry.config();
        change(&mut config);
        let hasher = self.registry.hasher().clone();
        SyncEngineLayer {
            policy: self.policy,
            registry: Arc::new(Registry::new(config, hasher)),
        }
    }
}

impl<S, P: Clone, K, H> Layer<S> for SyncEngineLayer<P, K, H> {
    type Service = SyncEngine<S, P, K, H>;

    fn layer(&self, inner: S) -> Self::Service {
        SyncEngine::from_parts(inner, self.policy.clone(), Arc::clone(&self.registry))
    }
}

impl<P: Clone, K, H> Clone for SyncEngineLayer<P, K, H> {
    fn clone(&self) -> Self {
        SyncEngineLayer {
            policy: self.policy.clone(),
            registry: Arc::clone(&self.registry),
        }
    }
}

impl<P, K, H> fmt::Debug for SyncEngineLayer<P, K, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncEngineLayer")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}
