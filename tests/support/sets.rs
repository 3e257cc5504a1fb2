//! Requests that carry their mode, their keys, handlers the test lets finish, and HTTP
//! requests that name their keys: shared by the tests of `Mode::sync_all`.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::task::{Context, Poll, Waker};

use tower_sync_engine::{Mode, Stats, SyncEngineLayer};

/// A request: its id, and the mode the policy hands the layer for it.
#[derive(Debug, Clone)]
pub struct Req {
    pub id: u64,
    pub mode: Mode<u64>,
}

pub type Policy = fn(&Req) -> Mode<u64>;

/// The policy: the mode the request carries.
pub fn by_mode(request: &Req) -> Mode<u64> {
    request.mode.clone()
}

/// A layer whose policy is [`by_mode`].
pub fn layer() -> SyncEngineLayer<Policy, u64> {
    SyncEngineLayer::new(by_mode as Policy)
}

/// A request ordered on every key of `keys`, through `Mode::sync_all`.
pub fn all(id: u64, keys: impl IntoIterator<Item = u64>) -> Req {
    Req {
        id,
        mode: Mode::sync_all(keys),
    }
}

/// A request ordered on `key` alone.
pub fn one(id: u64, key: u64) -> Req {
    Req {
        id,
        mode: Mode::Sync(key),
    }
}

/// `(keys, in_flight, queued)`.
pub fn counts(stats: Stats) -> (usize, usize, usize) {
    (stats.keys, stats.in_flight, stats.queued)
}

/// Sorted, without duplicates.
pub fn distinct<K: Ord>(mut keys: Vec<K>) -> Vec<K> {
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The distinct keys a mode orders against, sorted; none for `Mode::Concurrent`.
pub fn keys_of<K: Ord + Clone>(mode: &Mode<K>) -> Vec<K> {
    distinct(match mode {
        Mode::Sync(key) => vec![key.clone()],
        Mode::SyncAll(keys) => keys.to_vec(),
        Mode::Concurrent => Vec::new(),
    })
}

/// Which handlers the test has let finish, and the wakers of those still waiting to.
#[derive(Default)]
pub struct Finishes {
    finished: HashSet<u64>,
    wakers: HashMap<u64, Waker>,
}

impl Finishes {
    /// Polls the handler of `id`: ready with its id once it may finish, else pending,
    /// keeping the waker for [`Finishes::finish`].
    pub fn poll(&mut self, id: u64, cx: &mut Context<'_>) -> Poll<u64> {
        if self.finished.contains(&id) {
            return Poll::Ready(id);
        }
        self.wakers.insert(id, cx.waker().clone());
        Poll::Pending
    }

    /// Lets the handler of `id` finish, now or whenever it is called; returns the waker
    /// to wake, once the lock this sits under is released.
    pub fn finish(&mut self, id: u64) -> Option<Waker> {
        self.finished.insert(id);
        self.wakers.remove(&id)
    }

    /// Whether the handler of `id` may finish.
    pub fn is_finished(&self, id: u64) -> bool {
        self.finished.contains(&id)
    }
}

/// HTTP requests that name their keys in an extension.
#[cfg(feature = "http")]
pub mod http {
    use axum::http::Request;
    use tower_sync_engine::Mode;

    /// The keys a request names, in its extensions.
    #[derive(Clone)]
    pub struct Keys(pub Vec<u64>);

    /// A request whose body is its id, naming `keys`.
    pub fn request(id: u64, keys: &[u64]) -> Request<u64> {
        let mut request = Request::new(id);
        request.extensions_mut().insert(Keys(keys.to_vec()));
        request
    }

    /// The policy: every key the request names, through `Mode::sync_all`.
    pub fn by_keys(request: &Request<u64>) -> Mode<u64> {
        Mode::sync_all(request.extensions().get::<Keys>().unwrap().0.clone())
    }
}
