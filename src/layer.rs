//! The [`SyncEngineLayer`].

use std::fmt;
use std::hash::RandomState;

use tower_layer::Layer;

use crate::registry::{MAX_IN_FLIGHT, Registry, Settings};
use crate::service::SyncEngine;
use crate::stats::Stats;
use crate::sync::Arc;

/// Applies [`SyncEngine`] to services: one layer value is one ordering domain.
///
/// Every service this layer builds, and every clone of the layer and of those services,
/// shares one registry of keys. That is what makes the layer work under axum, which
/// applies a layer once per route and clones the service for every request. Two calls
/// of [`SyncEngineLayer::new`] make two independent domains.
///
/// The settings belong to the domain: set them right after `new`, before the layer is
/// cloned or builds a service. Calling a setter later panics, because clones and services
/// already share the domain and would not see the change.
///
/// ```
/// use std::time::Duration;
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
/// use tower_sync_engine::{Mode, SyncEngineLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// struct Message { connection_id: u64, body: String }
///
/// let layer = SyncEngineLayer::new(|msg: &Message| Mode::Sync(msg.connection_id))
///     .permits_per_key(1)
///     .max_queue_per_key(1024)
///     .max_keys(100_000);
/// let mut service = ServiceBuilder::new()
///     .layer(layer.clone())
///     .timeout(Duration::from_secs(5))
///     .service(service_fn(|msg: Message| async move {
///         Ok::<_, tower::BoxError>(msg.body.len())
///     }));
///
/// let first = service.ready().await?.call(Message { connection_id: 1, body: "hi".into() });
/// let second = service.ready().await?.call(Message { connection_id: 1, body: "you".into() });
/// // The clone kept outside sees the domain the service works in.
/// assert_eq!((layer.stats().in_flight, layer.stats().queued), (1, 1));
/// assert_eq!((first.await?, second.await?), (2, 3));
/// assert!(layer.stats().is_idle());
/// # Ok(())
/// # }
/// ```
pub struct SyncEngineLayer<P, K, H = RandomState> {
    policy: P,
    registry: Arc<Registry<K, H>>,
}

impl<P, K> SyncEngineLayer<P, K> {
    /// Creates a layer with a new ordering domain that classifies each request with
    /// `policy`: any `Fn(&Req) -> Mode<K>`, or another [`Policy`](crate::Policy).
    ///
    /// Defaults: one permit per key, unbounded queues, unbounded keys, and std's
    /// [`RandomState`] hasher, which resists HashDoS when keys come from clients.
    pub fn new(policy: P) -> Self {
        SyncEngineLayer {
            policy,
            registry: Arc::new(Registry::new(RandomState::new())),
        }
    }
}

impl<P, K, H> SyncEngineLayer<P, K, H> {
    /// Uses `hasher` to spread keys over the registry.
    ///
    /// Keys often come from clients; keep a DoS-resistant hasher (the default) unless
    /// keys are trusted. A fast seeded hasher such as foldhash saves a few nanoseconds per
    /// request. An identity or integer hasher (nohash-style, for integer ids) works too:
    /// keys spread over the registry as long as the hasher's low bits differ between
    /// keys. A hasher, or a key whose `Hash`, gives every key the same value makes each
    /// request compare its key with every live key, linear in the number of live keys;
    /// [`max_keys`](Self::max_keys) bounds that cost.
    ///
    /// # Panics
    ///
    /// If the layer has been cloned or has built a service already (see the type's docs).
    #[track_caller]
    pub fn with_hasher<H2>(self, hasher: H2) -> SyncEngineLayer<P, K, H2> {
        // No closures on the way to a panic: `#[track_caller]` does not reach into them.
        let Some(registry) = Arc::try_unwrap(self.registry)
            .ok()
            .and_then(|registry| registry.with_hasher(hasher))
        else {
            already_shared("with_hasher")
        };
        SyncEngineLayer {
            policy: self.policy,
            registry: Arc::new(registry),
        }
    }

    /// How many requests with the same key may run at once (default 1). They are still
    /// started in call order.
    ///
    /// # Panics
    ///
    /// If `permits` is 0 or greater than `u32::MAX`, or if the layer has been cloned or
    /// has built a service already.
    #[track_caller]
    pub fn permits_per_key(mut self, permits: usize) -> Self {
        let Some(permits) = u32::try_from(permits).ok().filter(|&permits| permits >= 1) else {
            panic!("permits_per_key must be between 1 and u32::MAX, got {permits}")
        };
        self.settings_mut("permits_per_key").permits_per_key = permits;
        self
    }

    /// How many requests may wait for their turn on a busy key (default: unbounded). A
    /// request that would wait beyond this gets [`Overloaded`](crate::error::Overloaded)
    /// at once and leaves no trace. A key is busy when a request cannot start on it at
    /// once: every permit is taken, or an earlier request has not started yet (its inner
    /// service not ready, or its future not polled since its turn came). 0 means a
    /// request whose key is busy is always rejected. The requests counted are those in
    /// [`Stats::queued`](crate::Stats::queued), and, with
    /// [`max_in_flight`](Self::max_in_flight), the key's request that waits for a slot
    /// (at most one per key: the next to start).
    ///
    /// # Panics
    ///
    /// If the layer has been cloned or has built a service already.
    #[track_caller]
    pub fn max_queue_per_key(mut self, max: usize) -> Self {
        self.settings_mut("max_queue_per_key").max_queue_per_key = max;
        self
    }

    /// How many keys may be live at once (default: unbounded). A request for a key that is
    /// not live while `max` keys are gets [`Overloaded`](crate::error::Overloaded) at once;
    /// requests for live keys are unaffected.
    ///
    /// # Panics
    ///
    /// If `max` is 0, which would reject every `Mode::Sync` request, or if the layer has
    /// been cloned or has built a service already.
    #[track_caller]
    pub fn max_keys(mut self, max: usize) -> Self {
        assert!(max >= 1, "max_keys must be at least 1, got 0");
        self.settings_mut("max_keys").max_keys = max;
        self
    }

    /// How many `Mode::Sync` and `Mode::SyncAll` requests of the whole domain may be
    /// between their inner call and their completion at once (default: unbounded); with
    /// the HTTP flavour, until their response body ends. `Mode::Concurrent` requests are
    /// not counted and never wait.
    ///
    /// A request that is free to start on its key (or keys) but finds every slot taken
    /// waits for one, keeping its place on its keys and holding no inner capacity. A
    /// freed slot goes to the waiting request whose key holds the fewest slots, then to
    /// the one whose key was granted a slot least recently (a key never granted one
    /// first), then to the one that has waited longest: see
    /// [Fair share of shared capacity](crate#fair-share-of-shared-capacity).
    ///
    /// # Panics
    ///
    /// If `max` is 0 or greater than 16,777,215 (2<sup>24</sup> − 1), or if the layer
    /// has been cloned or has built a service already.
    #[track_caller]
    pub fn max_in_flight(mut self, max: usize) -> Self {
        if max == 0 || max > MAX_IN_FLIGHT {
            panic!("max_in_flight must be between 1 and {MAX_IN_FLIGHT}, got {max}")
        }
        self.settings_mut("max_in_flight").max_in_flight = max;
        self
    }

    /// Current counts of this layer's ordering domain.
    pub fn stats(&self) -> Stats {
        self.registry.stats()
    }

    #[track_caller]
    fn settings_mut(&mut self, setting: &str) -> &mut Settings {
        match Arc::get_mut(&mut self.registry).and_then(Registry::settings_mut) {
            Some(settings) => settings,
            None => already_shared(setting),
        }
    }
}

#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
impl<P, K, H> SyncEngineLayer<P, K, H> {
    /// Names this ordering domain in its metrics: every metric it records, and every gauge
    /// its [`metrics_sampler`](Self::metrics_sampler) sets, carries the label
    /// `domain="name"`, which tells two domains of one process apart. Without a name, the
    /// metrics have no `domain` label. See the [`metrics`](crate::metrics) module.
    ///
    /// The name is `'static` because it is copied, without allocating, into every shard's
    /// settings and every label; a name made at run time can be leaked once per domain
    /// with [`String::leak`].
    ///
    /// # Panics
    ///
    /// If the layer has been cloned or has built a service already.
    #[track_caller]
    pub fn metrics_domain(mut self, name: &'static str) -> Self {
        self.settings_mut("metrics_domain").metrics_domain = crate::metrics::Domain::named(name);
        self
    }

    /// A sampler that sets this domain's gauges from its current counts, each time it is
    /// told to: on each scrape of the metrics, or on an interval. See
    /// [`MetricsSampler`](crate::metrics::MetricsSampler).
    ///
    /// The sampler shares the domain, as a clone of the layer does: configure the layer
    /// first.
    pub fn metrics_sampler(&self) -> crate::metrics::MetricsSampler
    where
        K: Send + 'static,
        H: Send + Sync + 'static,
    {
        crate::metrics::MetricsSampler::new(Arc::clone(&self.registry))
    }
}

#[cfg(feature = "http")]
impl<P, K, H> SyncEngineLayer<P, K, H> {
    /// The HTTP flavour of this layer, in **the same ordering domain**: its services take
    /// `http::Request`s, keep a `Mode::Sync` request's key until its response body has
    /// ended or been dropped, answer an overload with a `503 Service Unavailable`
    /// response, and pass the inner service's error type through unchanged, so axum's
    /// `Router::layer` takes the layer as it is.
    ///
    /// The settings, the [`stats`](Self::stats) and the keys are the domain's: configure
    /// the layer before calling this, and keep a clone of this layer (taken before
    /// `for_http`) to order plain services in the same domain. See the
    /// [`http`](crate::http) module for the mechanism and its caveats.
    ///
    /// ```
    /// use axum::{Router, routing::post};
    /// use tower_sync_engine::SyncEngineLayer;
    /// use tower_sync_engine::http::by_header;
    ///
    /// let app: Router = Router::new()
    ///     .route("/edit", post(|| async { "saved" }))
    ///     .layer(SyncEngineLayer::new(by_header("x-session-id")).max_queue_per_key(32).for_http());
    /// # drop(app);
    /// ```
    pub fn for_http(self) -> crate::http::HttpSyncEngineLayer<P, K, H> {
        crate::http::HttpSyncEngineLayer::new(self)
    }
}

#[track_caller]
fn already_shared(setting: &str) -> ! {
    panic!(
        "SyncEngineLayer::{setting} called on a layer that is cloned or in use: \
         configure the layer before cloning it or building services, because they all \
         share one ordering domain"
    )
}

impl<S, P: Clone, K, H> Layer<S> for SyncEngineLayer<P, K, H> {
    type Service = SyncEngine<S, P, K, H>;

    fn layer(&self, inner: S) -> Self::Service {
        self.registry.build();
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
            .field("settings", self.registry.settings())
            .finish_non_exhaustive()
    }
}
