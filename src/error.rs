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
/// created. The response future returns the error on its first poll, boxed as a
/// [`BoxError`]; [`limit`](Overloaded::limit) says which limit was hit.
///
/// ```
/// use tower::{Layer, Service, ServiceExt, service_fn};
/// use tower_sync_engine::error::{BoxError, Limit, Overloaded};
/// use tower_sync_engine::{Mode, SyncEngineLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// // One request per key may wait; a third request for a busy key is turned away.
/// let layer = SyncEngineLayer::new(|key: &u64| Mode::Sync(*key)).max_queue_per_key(1);
/// let mut service = layer.layer(service_fn(|key: u64| async move { Ok::<_, BoxError>(key) }));
///
/// let running = service.ready().await?.call(7);
/// let waiting = service.ready().await?.call(7);
/// let error = service.ready().await?.call(7).await.unwrap_err();
///
/// let overloaded = error.downcast_ref::<Overloaded>().expect("rejected by a limit");
/// assert_eq!(overloaded.limit(), Limit::MaxQueuePerKey);
/// assert_eq!(error.to_string(), "request rejected: its key's queue is full (max_queue_per_key)");
///
/// // The rejected request left nothing behind: the two others run as before.
/// assert_eq!((running.await?, waiting.await?), (7, 7));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Overloaded {
    limit: Limit,
}

/// The limit that rejected a request.
///
/// The two limits call for different answers: [`MaxQueuePerKey`](Limit::MaxQueuePerKey)
/// means one client or document is sending faster than it is served, and only that key
/// is affected; [`MaxKeys`](Limit::MaxKeys) means the whole layer is at its bound. The
/// enum is `#[non_exhaustive]`, so a `match` needs a wildcard arm:
///
/// ```
/// use std::time::Duration;
/// use tower_sync_engine::error::{Limit, Overloaded};
///
/// /// How long to tell the client to wait before retrying, as in `Retry-After`.
/// fn retry_after(error: &Overloaded) -> Duration {
///     match error.limit() {
///         Limit::MaxQueuePerKey => Duration::from_secs(1),
///         Limit::MaxKeys => Duration::from_secs(10),
///         _ => Duration::from_secs(5),
///     }
/// }
///
/// assert_eq!(retry_after(&Overloaded::new(Limit::MaxKeys)), Duration::from_secs(10));
/// assert_eq!(Limit::MaxKeys.to_string(), "max_keys");
/// ```
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
