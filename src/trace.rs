//! Events for requests that wait for their key, behind the `tracing` feature, and the
//! metrics recorded at the same places, behind the `metrics` feature.
//!
//! A request that gets its key at once emits nothing and records nothing. The clock is
//! read (in `call()`, before the request takes its place) only when these events are
//! enabled: without a subscriber that wants them, no request reads the clock there. With
//! the `metrics` feature, a request that joins its key's line and has no time yet reads
//! the clock when it joins, inside `call()`, so that the wait histogram has a start; a
//! request that gets its key at once still reads no clock. A request that has to wait
//! emits, at `DEBUG` level with target `tower_sync_engine`:
//!
//! - `queued`, with `queue_depth`: how many requests of its key are queued (what
//!   [`Stats::queued`](crate::Stats::queued) counts, for that key), itself included, so at
//!   least 1;
//! - `admitted`, with `waited_us`: microseconds from `call()` until it became the head of
//!   its key, free to start.
//!
//! A `Mode::SyncAll` request emits both for every key it waits on: one `queued` per such
//! key, in `call()`, and one `admitted` as it becomes the head of each. The metrics count
//! and time each of those keys the same way.
//!
//! The wait is timed with `std::time::Instant`, so the events need no runtime. With the
//! `tokio-clock` feature it is timed with `tokio::time::Instant` instead: a paused tokio
//! clock (`tokio::time::pause`, `#[tokio::test(start_paused = true)]`) then gives exact,
//! reproducible values, for the events and for the wait histogram alike.
//!
//! With `metrics`, the same two places count the request that waited and record its wait
//! (see the [`metrics`](crate::metrics) module), and a rejection by a limit is counted.
//!
//! # Performance
//!
//! A request that waits checks the level inline and builds its event out of line
//! (`#[cold]`), so that it pays one load and compare when nobody listens
//! (`hand_off_layer`, `layer_sync_live_key`). The metrics, off by default, are recorded
//! out of line too, and only for requests that wait or are rejected.

use crate::error::Limit;
#[cfg(feature = "metrics")]
pub(crate) use crate::metrics::Domain;

// The clock that times a wait.
#[cfg(all(
    any(feature = "tracing", feature = "metrics"),
    not(feature = "tokio-clock")
))]
use std::time::Instant;
#[cfg(feature = "tokio-clock")]
use tokio::time::Instant;
#[cfg(feature = "tracing")]
use tracing::Level;

/// The label of a domain's metrics: nothing without the `metrics` feature.
#[cfg(not(feature = "metrics"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Domain;

#[cfg(not(feature = "metrics"))]
impl Domain {
    pub(crate) const NONE: Domain = Domain;
}

/// When a request's wait began: the time of its `call()` if the events were enabled
/// then, or, with `metrics`, of its joining its key's line.
#[cfg(any(feature = "tracing", feature = "metrics"))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct CalledAt(Option<Instant>);

/// Nothing to time without `tracing` or `metrics`.
#[cfg(not(any(feature = "tracing", feature = "metrics")))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct CalledAt;

/// The time of `call()`, if anyone listens for the events.
#[inline]
pub(crate) fn called_at() -> CalledAt {
    #[cfg(feature = "tracing")]
    if tracing::enabled!(target: "tower_sync_engine", Level::DEBUG) {
        return CalledAt(Some(Instant::now()));
    }
    #[cfg(any(feature = "tracing", feature = "metrics"))]
    return CalledAt(None);
    #[cfg(not(any(feature = "tracing", feature = "metrics")))]
    return CalledAt;
}

impl CalledAt {
    /// The start of the wait of a request that joins its key's line now. With `metrics`,
    /// a request without a time reads the clock here: only requests that wait do.
    #[inline(always)]
    pub(crate) fn or_now(self) -> Self {
        #[cfg(feature = "metrics")]
        if self.0.is_none() {
            return CalledAt(Some(Instant::now()));
        }
        self
    }
}

/// Counts a request that joined its key's line, and emits the `queued` event if anyone
/// listens.
// PERF: hand_off_layer (module docs, Performance).
#[inline]
pub(crate) fn queued(depth: u32, domain: Domain) {
    #[cfg(feature = "metrics")]
    crate::metrics::record_queued(domain);
    #[cfg(not(feature = "metrics"))]
    let Domain = domain;
    #[cfg(feature = "tracing")]
    if tracing::level_enabled!(Level::DEBUG) {
        queued_event(depth);
    }
    #[cfg(not(feature = "tracing"))]
    let _ = depth;
}

#[cfg(feature = "tracing")]
#[cold]
#[inline(never)]
fn queued_event(depth: u32) {
    tracing::debug!(
        target: "tower_sync_engine",
        queue_depth = depth,
        "queued"
    );
}

/// Records the wait of a request that became the head of its key, and emits the
/// `admitted` event. `since` is set only when the events were enabled at `call()`, or
/// with `metrics`, for every request that waited.
#[inline]
pub(crate) fn admitted(since: CalledAt, domain: Domain) {
    #[cfg(any(feature = "tracing", feature = "metrics"))]
    if let Some(since) = since.0 {
        admitted_after(since, domain);
    }
    #[cfg(not(any(feature = "tracing", feature = "metrics")))]
    let (CalledAt, Domain) = (since, domain);
}

#[cfg(any(feature = "tracing", feature = "metrics"))]
#[cold]
#[inline(never)]
fn admitted_after(since: Instant, domain: Domain) {
    let waited = since.elapsed();
    #[cfg(feature = "metrics")]
    crate::metrics::record_wait(domain, waited);
    #[cfg(not(feature = "metrics"))]
    let Domain = domain;
    // With `metrics` every waiting request has a time, whether or not the events were
    // enabled at its `call()`: ask again.
    #[cfg(feature = "tracing")]
    if !cfg!(feature = "metrics") || tracing::enabled!(target: "tower_sync_engine", Level::DEBUG) {
        tracing::debug!(
            target: "tower_sync_engine",
            waited_us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
            "admitted"
        );
    }
}

/// Emits the `slot_queued` event: a request free to start on its keys found every slot
/// of the domain's cap taken.
#[inline]
pub(crate) fn slot_queued(domain: Domain) {
    #[cfg(not(feature = "metrics"))]
    let Domain = domain;
    #[cfg(feature = "metrics")]
    let _ = domain;
    #[cfg(feature = "tracing")]
    if tracing::level_enabled!(Level::DEBUG) {
        slot_queued_event();
    }
}

#[cfg(feature = "tracing")]
#[cold]
#[inline(never)]
fn slot_queued_event() {
    tracing::debug!(target: "tower_sync_engine", "slot_queued");
}

/// Emits the `slot_granted` event of a request that waited for a slot since `since` (set
/// only when the events were enabled as it began to wait).
#[inline]
pub(crate) fn slot_granted(since: CalledAt, domain: Domain) {
    #[cfg(not(feature = "metrics"))]
    let Domain = domain;
    #[cfg(feature = "metrics")]
    let _ = domain;
    #[cfg(feature = "tracing")]
    if let Some(since) = since.0 {
        slot_granted_event(since);
    }
    #[cfg(not(feature = "tracing"))]
    let _ = since;
}

#[cfg(feature = "tracing")]
#[cold]
#[inline(never)]
fn slot_granted_event(since: Instant) {
    tracing::debug!(
        target: "tower_sync_engine",
        waited_us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX),
        "slot_granted"
    );
}

/// Counts a request that `limit` rejected.
#[inline]
pub(crate) fn rejected(limit: Limit, domain: Domain) {
    #[cfg(feature = "metrics")]
    crate::metrics::record_rejected(domain, limit);
    #[cfg(not(feature = "metrics"))]
    let (_, Domain) = (limit, domain);
}
