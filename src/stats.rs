//! A point-in-time view of an ordering domain.

/// Counts of one ordering domain, from [`SyncEngineLayer::stats`](crate::SyncEngineLayer::stats)
/// or [`SyncEngine::stats`](crate::SyncEngine::stats).
///
/// The registry is sharded; the counts are summed one shard at a time, so they are exact
/// whenever no request is being admitted or finishing at the same moment. All three are
/// zero once every request has completed or been dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Stats {
    /// Keys that some request holds or waits for. Idle keys are not stored.
    pub keys: usize,
    /// `Mode::Sync` requests holding one of their key's permits: running, or allowed to
    /// start and not yet polled.
    pub in_flight: usize,
    /// `Mode::Sync` requests waiting for a permit.
    pub queued: usize,
}

impl Stats {
    /// True when nothing holds or waits for any key.
    pub const fn is_idle(&self) -> bool {
        self.keys == 0 && self.in_flight == 0 && self.queued == 0
    }
}
