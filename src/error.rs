//! Errors returned by [`SyncEngine`](crate::SyncEngine).
//!
//! Like the rest of tower's fallible middleware, the service's error type is
//! [`BoxError`]. Errors from the inner service pass through unchanged inside the box;
//! errors produced by this crate are the types below, and can be told apart with
//! [`downcast_ref`](std::error::Error#method.downcast_ref):
//!
//! ```
//! use tower_sync_engine::error::{BoxError, Limit, Overloaded};
//!
//! fn status(error: &BoxError) -> u16 {
//!     match error.downcast_ref::<Overloaded>() {
//!         Some(overloaded) if overloaded.limit() == Limit::MaxKeys => 503,
//!         Some(_) => 429,
//!         None => 500,
//!     }
//! }
//!
//! let error: BoxError = Overloaded::new(Limit::MaxQueuePerKey).into();
//! assert_eq!(status(&error), 429);
//! ```

use std::fmt;

/// The boxed error type of [`SyncEngine`](crate::SyncEngine); the same type as
/// `tower::BoxError`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A `Mode::Sync` request was rejected at once because a configured limit was reached.
///
/// Nothing of the request was kept: it holds no place in any queue, and its key was not
/// created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Overloaded {
    limit: Limit,
}

/// The limit that rejected a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// The key already had `max_queue_per_key` requests waiting.
    MaxQueuePerKey,
    /// The request's key was not live, and `max_keys` keys already were.
    MaxKeys,
}

impl Overloaded {
    /// Creates an `Overloaded` error for `limit`.
    pub const fn new(limit: Limit) -> Self {
        Overloaded { limit }
    }

    /// The limit that rejected the request.
    pub const fn limit(&self) -> Limit {
        self.limit
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.limit {
            Limit::MaxQueuePerKey => {
                f.write_str("request rejected: its key's queue is full (max_queue_per_key)")
            }
            Limit::MaxKeys => f.write_str("request rejected: too many live keys (max_keys)"),
        }
    }
}

impl std::error::Error for Overloaded {}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::MaxQueuePerKey => "max_queue_per_key",
            Limit::MaxKeys => "max_keys",
        })
    }
}
