//! Events for requests that wait for their key, behind the `tracing` feature, and the
//! metrics recorded at the same places, behind the `metrics` feature.
//!
//! A request that gets its key at once emits nothing, records nothing and reads no
//! clock. A request that joins its key's line reads the clock as it joins, inside
//! `call()`, when `DEBUG` events are enabled at all (the maximum level alone decides:
//! no subscriber is asked, since this runs under the shard's lock), and with the
//! `metrics` feature always, so that the wait histogram has a start. A request that has
//! to wait emits, at `DEBUG` level with target `tower_sync_engine`:
//!
//! - `queued`, with `queue_depth`: how many requests of its key are queued (what
//!   [`Stats::queued`](crate::Stats::queued) counts, for that key), itself included, so at
//!   least 1;
//! - `admitted`, with `waited_us`: microseconds from joining its key's line, inside
//!   `call()`, until it became the head of its key, free to start.
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
//! (`hand_off_layer`, `layer_sync_live_key`). The clock is read by the line as a request
//! joins it ([`joined_at`]), not for every request in `call()`: a request that gets its
//! key at once does not even check whether anyone listens (`layer_sync_new_key` 355 →
//! 353, `layer_sync_live_key` 844 → 839, `hand_off_layer` 1,490 → 1,485). The metrics, off by default, are recorded
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

/// When a request's wait began (for its key's line, or for a slot of the cap), if anyone
/// may want to know.
#[cfg(any(feature = "tracing", feature = "metrics"))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct WaitStart(Option<Instant>);

/// Nothing to time without `tracing` or `metrics`.
#[cfg(not(any(feature = "tracing", feature = "metrics")))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct WaitStart;

/// The time now, if a subscriber wants this crate's `DEBUG` events: the start of a wait
/// for a slot of the cap. It asks the subscriber, foreign code, so never under a lock.
#[inline]
pub(crate) fn now_if_listened() -> WaitStart {
    #[cfg(feature = "tracing")]
    if tracing::enabled!(target: "tower_sync_engine", Level::DEBUG) {
        return WaitStart(Some(Instant::now()));
    }
    #[cfg(any(feature = "tracing", feature = "metrics"))]
    return WaitStart(None);
    #[cfg(not(any(feature = "tracing", feature = "metrics")))]
    return WaitStart;
}

/// The start of the wait of a request that joins its key's line now: the time, when
/// `DEBUG` events are enabled at all or `metrics` records waits. It runs under the
/// shard's lock, so it asks no subscriber, only the maximum level, and only requests that
/// wait run it.
#[inline]
pub(crate) fn joined_at() -> WaitStart {
    #[cfg(feature = "tracing")]
    if tracing::level_enabled!(Level::DEBUG) {
        return WaitStart(Some(Instant::now()));
    }
    #[cfg(feature = "metrics")]
    return WaitStart(Some(Instant::now()));
    #[cfg(all(feature = "tracing", not(feature = "metrics")))]
    return WaitStart(None);
    #[cfg(not(any(feature = "tracing", feature = "metrics")))]
    return WaitStart;
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
/// `admitted` event. `since` is set only when `DEBUG` events were enabled as it joined
/// its key's line, or with `metrics`, for every request that waited.
#[inline]
pub(crate) fn admitted(since: WaitStart, domain: Domain) {
    #[cfg(any(feature = "tracing", feature = "metrics"))]
    if let Some(since) = since.0 {
        admitted_after(since, domain);
    }
    #[cfg(not(any(feature = "tracing", feature = "metrics")))]
    let (WaitStart, Domain) = (since, domain);
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
    // A request has a time whenever `DEBUG` is enabled at all, or `metrics` records
    // waits: the event asks the subscriber itself.
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "tower_sync_engine",
        waited_us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
        "admitted"
    );
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
pub(crate) fn slot_granted(since: WaitStart, domain: Domain) {
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
