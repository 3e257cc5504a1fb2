//! A point-in-time view of an ordering domain.

/// Counts of one ordering domain, from [`SyncEngineLayer::stats`](crate::SyncEngineLayer::stats)
/// or [`SyncEngine::stats`](crate::SyncEngine::stats).
///
/// The registry is sharded; the counts are summed one shard at a time, so they are exact
/// whenever no request is being admitted or finishing at the same moment. All three are
/// zero once every request has completed or been dropped.
///
/// Reading them visits every shard, so they suit a metrics gauge sampled now and then
/// rather than a check on every request.
///
/// The counts are per key: a `Mode::SyncAll` request is counted on each of its keys, in
/// `in_flight` for every key whose permit it holds and in `queued` for every key it
/// waits on (see [Several keys at once](crate#several-keys-at-once)).
///
/// ```
/// use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
/// use tower_sync_engine::{Mode, SyncEngineLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let layer = SyncEngineLayer::new(|key: &u64| Mode::Sync(*key));
/// let mut service = layer.layer(service_fn(|key: u64| async move { Ok::<_, BoxError>(key) }));
///
/// // Two requests for key 1 and one for key 2: the first of each key holds its permit
/// // from `call()` on, the second request for key 1 waits behind the first.
/// let first = service.ready().await?.call(1);
/// let second = service.ready().await?.call(1);
/// let other = service.ready().await?.call(2);
/// let stats = layer.stats();
/// assert_eq!((stats.keys, stats.in_flight, stats.queued), (2, 2, 1));
/// // Every service the layer builds shares its ordering domain, and its counts.
/// assert_eq!(service.stats(), stats);
///
/// assert_eq!(first.await?, 1);
/// assert_eq!(second.await?, 1);
/// drop(other); // dropped before it ran: its key goes idle too
/// assert!(layer.stats().is_idle());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Stats {
    /// Keys that some request holds or waits for. Idle keys are not stored.
    pub keys: usize,
    /// Permits held: `Mode::Sync` requests holding one of their key's permits (running,
    /// or allowed to start and not yet polled), and a `Mode::SyncAll` request once for
    /// every key whose permit it holds. With the HTTP flavour, a request holds its
    /// permits until its response body ends.
    pub in_flight: usize,
    /// Places waiting for their turn: `Mode::Sync` requests behind a request that holds
    /// their key's last permit, or behind one that has not started yet, and a
    /// `Mode::SyncAll` request once for every key it waits on. They hold no permit;
    /// [`max_queue_per_key`](crate::SyncEngineLayer::max_queue_per_key) bounds them.
    pub queued: usize,
    /// Requests waiting for a slot of the domain's
    /// [`max_in_flight`](crate::SyncEngineLayer::max_in_flight) cap: each is the head of
    /// its keys (counted in `in_flight` for each) and has not been granted a slot yet.
    /// Always 0 without the cap.
    pub waiting_for_slot: usize,
}

impl Stats {
    /// True when nothing holds or waits for any key.
    pub const fn is_idle(&self) -> bool {
        self.keys == 0 && self.in_flight == 0 && self.queued == 0 && self.waiting_for_slot == 0
    }
}
