//! Events for requests that wait for their key, behind the `tracing` feature.
//!
//! A request that gets its key at once emits nothing, and the clock is read (in `call()`,
//! before the request takes its place) only when these events are enabled: without a
//! subscriber that wants them, no request reads the clock. A request that has to wait
//! emits, at `DEBUG` level with target `tower_sync_engine`:
//!
//! - `queued`, with `queue_depth`: how many requests of its key are queued (what
//!   [`Stats::queued`](crate::Stats::queued) counts, for that key), itself included, so at
//!   least 1;
//! - `admitted`, with `waited_us`: microseconds from `call()` until it became the head of
//!   its key, free to start.
//!
//! The wait is timed with `std::time::Instant`, so the events need no runtime. With the
//! `tokio-clock` feature it is timed with `tokio::time::Instant` instead: a paused tokio
//! clock (`tokio::time::pause`, `#[tokio::test(start_paused = true)]`) then gives exact,
//! reproducible values.
//!
//! # Performance
//!
//! A request that waits checks the level inline and builds its event out of line
//! (`#[cold]`), so that it pays one load and compare when nobody listens
//! (`hand_off_layer`, `layer_sync_live_key`).

pub(crate) use self::imp::{CalledAt, admitted, called_at, queued};

#[cfg(feature = "tracing")]
mod imp {
    #[cfg(not(feature = "tokio-clock"))]
    use std::time::Instant;
    #[cfg(feature = "tokio-clock")]
    use tokio::time::Instant;
    use tracing::Level;

    /// When a request joined its key's line, if anyone listens.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct CalledAt(Option<Instant>);

    /// The time of `call()`, if anyone listens for the events.
    #[inline]
    pub(crate) fn called_at() -> CalledAt {
        if tracing::enabled!(target: "tower_sync_engine", Level::DEBUG) {
            CalledAt(Some(Instant::now()))
        } else {
            CalledAt(None)
        }
    }

    /// Emits the `queued` event if anyone listens.
    // PERF: hand_off_layer (module docs, Performance).
    #[inline]
    pub(crate) fn queued(depth: u32) {
        if tracing::level_enabled!(Level::DEBUG) {
            queued_event(depth);
        }
    }

    #[cold]
    #[inline(never)]
    fn queued_event(depth: u32) {
        tracing::debug!(
            target: "tower_sync_engine",
            queue_depth = depth,
            "queued"
        );
    }

    /// `since` is set only when the events were enabled at `call()`.
    #[inline]
    pub(crate) fn admitted(since: CalledAt) {
        if let Some(since) = since.0 {
            admitted_event(since);
        }
    }

    #[cold]
    #[inline(never)]
    fn admitted_event(since: Instant) {
        let waited = since.elapsed();
        tracing::debug!(
            target: "tower_sync_engine",
            waited_us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
            "admitted"
        );
    }
}

#[cfg(not(feature = "tracing"))]
mod imp {
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct CalledAt;

    #[inline]
    pub(crate) fn called_at() -> CalledAt {
        CalledAt
    }

    #[inline]
    pub(crate) fn queued(_depth: u32) {}

    #[inline]
    pub(crate) fn admitted(_since: CalledAt) {}
}
