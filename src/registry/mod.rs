//! The keyed registry: who holds each key, and who waits for it, in call order.
//!
//! # Algorithm
//!
//! Every `Mode::Sync(key)` request takes a [`Claim`] on its key inside `call()`,
//! synchronously, before any future is polled. That is what fixes the order: a claim's
//! place in its key's line is decided by the time `call()` returns, and nothing the
//! executor does later (polling in reverse, polling late, polling on another thread) can
//! change it. An async primitive such as `tokio::sync::Semaphore` enqueues a waiter on
//! its first poll instead, which is why none is used here.
//!
//! Keys are spread over a fixed number of shards by their hash; each shard is a
//! `Mutex` around a hash table of live keys and a slab of waiter nodes. The hash is
//! computed once, outside the lock, and kept by the claim, so a finishing request finds
//! its key again without hashing or comparing keys. Different keys in different shards
//! never contend.
//!
//! Each shard is reference-counted on its own and a claim keeps only its shard alive,
//! so requests on different shards share no cache line at all: not a lock, not a
//! reference count. The registry-wide key count behind `max_keys` exists only when that
//! limit is set, and is touched only when a key is created or removed.
//!
//! Per key the shard keeps:
//!
//! - `holders`: claims holding one of the key's `permits` (whether started or not);
//! - the *line*: claims that have not called the inner service yet, in call order, as a
//!   doubly linked list threaded through the shard's slab, so a dropped waiter leaves in
//!   O(1). A prefix of the line has been granted a permit; the rest waits for one;
//! - `head_unstarted`: one claim holds a permit, comes before the whole line, and has not
//!   called the inner service yet.
//!
//! A claim may call the inner service only when it is *the head*: it holds a permit and
//! every earlier claim on its key has started or gone. When the key is free and nobody is
//! in line, `call()` makes the new claim the head at once and no waiter node is
//! allocated: the uncontended path is one lookup and one lock on each side.
//!
//! Hand-off: whenever a permit is freed (a claim finished or was dropped) it is granted
//! to the first waiter without one, and whenever the head starts or leaves, the next
//! granted waiter, if any, is woken. A woken waiter becomes the head on its next poll.
//!
//! # Invariants
//!
//! These hold whenever a shard's lock is free:
//!
//! 1. `holders <= permits`.
//! 2. The granted waiters are a prefix of the line, and `next_grant` is the first waiter
//!    without a permit. If anyone waits for a permit, `holders == permits`.
//! 3. At most one claim is the unstarted head; while there is one, no waiter may start.
//!    Together with 2 this makes the order in which the inner service is called the
//!    order of `call()`.
//! 4. A key's entry exists exactly while `holders > 0` or its line is not empty. The
//!    critical section that makes a key idle removes its entry, so an entry is never
//!    removed while a request for that key runs or waits. Entries are identified by an
//!    id that is never reused, so a claim can never act on a later entry of its key.
//! 5. A claim that is dropped, in any state, gives back what it holds under the lock in
//!    `Drop`: a queued waiter leaves the line, and a permit (granted while waiting, held
//!    but never used, or held by a running request) goes to the next waiter. No path
//!    releases after an `.await`, so cancellation and panics cannot lose a permit.
//! 6. Executor code never runs under a shard's lock: wakers are woken and dropped, and
//!    removed keys dropped, after it is released (`shard::Deferred`). A waker whose
//!    drop or wake re-enters the registry cannot deadlock it.
//!
//! With one permit per key, nothing can be granted while the head holds the key, so the
//! head skips telling the shard that it started and clears its mark when it releases.
//! That saves a lock per request on the common path.

mod shard;

use std::hash::{BuildHasher, Hash};
use std::num::NonZeroUsize;
use std::task::{Context, Poll};

use self::shard::{Limits, Position, Shard};
use crate::error::{Limit, Overloaded};
use crate::stats::Stats;
use crate::sync::{Arc, AtomicUsize, Mutex, MutexGuard, Ordering};
use crate::trace::{self, QueuedAt};

/// Shards per available core. Two workers spraying requests over random keys collide on
/// a shard with probability about 1/shards per request, and a collision on a std
/// `Mutex` can cost a futex round trip; 32 per core keeps that rare. An idle shard costs
/// 256 bytes.
const SHARDS_PER_CORE: usize = 32;

/// Upper bound on the shard count.
const MAX_SHARDS: usize = 1024;

/// The settings of one ordering domain.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Config {
    pub(crate) permits_per_key: usize,
    pub(crate) max_queue_per_key: Option<usize>,
    pub(crate) max_keys: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            permits_per_key: 1,
            max_queue_per_key: None,
            max_keys: None,
        }
    }
}

/// One ordering domain: the state shared by a layer and every service it builds.
pub(crate) struct Registry<K, H> {
    shards: Box<[Arc<ShardCell<K>>]>,
    hasher: H,
    config: Config,
}

/// A shard and what its claims need besides it. Aligned so that no two shards, and no
/// shard and its reference count, share a pair of cache lines (x86 prefetches lines in
/// pairs); `repr(C)` keeps the shard's hot line first (see `Shard`).
#[repr(C, align(128))]
struct ShardCell<K> {
    shard: Mutex<Shard<K>>,
    limits: Limits,
    /// Shared by every shard of the registry; only when `max_keys` is set.
    key_count: Option<Arc<KeyCount>>,
}

/// Live keys across all shards, against `max_keys`.
struct KeyCount {
    live: AtomicUsize,
    max: usize,
}

/// A request's place on its key, from `call()` until the request is done.
///
/// Dropping it, in any state, gives the place up and lets the next claim in line go.
pub(crate) struct Claim<K> {
    cell: Arc<ShardCell<K>>,
    hash: u64,
    id: u64,
    state: ClaimState,
}

#[derive(Clone, Copy, Debug)]
enum ClaimState {
    /// In the line at `node` since `since`.
    Waiting { node: u32, since: QueuedAt },
    /// Holds a permit. `head` while it is still marked as the unstarted head.
    Holding { head: bool },
}

impl<K, H> Registry<K, H> {
    pub(crate) fn new(config: Config, hasher: H) -> Self {
        let shards = if cfg!(loom) {
            // Keeps the models small: every shard is a loom object in every execution.
            2
        } else {
            std::thread::available_parallelism()
                .map_or(1, NonZeroUsize::get)
                .saturating_mul(SHARDS_PER_CORE)
                .next_power_of_two()
                .min(MAX_SHARDS)
        };
        let limits = Limits {
            permits: u32::try_from(config.permits_per_key).unwrap_or(u32::MAX),
            max_queue: config.max_queue_per_key.unwrap_or(usize::MAX),
        };
        let key_count = config.max_keys.map(|max| {
            Arc::new(KeyCount {
                live: AtomicUsize::new(0),
                max,
            })
        });
        Registry {
            shards: (0..shards)
                .map(|_| {
                    Arc::new(ShardCell {
                        shard: Mutex::new(Shard::default()),
                        limits,
                        key_count: key_count.clone(),
                    })
                })
                .collect(),
            hasher,
            config,
        }
    }

    pub(crate) fn config(&self) -> Config {
        self.config
    }

    pub(crate) fn hasher(&self) -> &H {
        &self.hasher
    }

    /// Sums the shards one at a time; exact whenever no request is being admitted or
    /// released concurrently.
    pub(crate) fn stats(&self) -> Stats {
        self.shards
            .iter()
            .fold(Stats::default(), |mut stats, cell| {
                let (keys, in_flight, queued) = cell.lock().counts();
                stats.keys += keys;
                stats.in_flight += in_flight;
                stats.queued += queued;
                stats
            })
    }
}

impl<K, H> Registry<K, H>
where
    K: Hash + Eq,
    H: BuildHasher,
{
    /// Takes `key`'s next place in call order, or rejects the request if a limit is hit.
    pub(crate) fn claim(&self, key: K) -> Result<Claim<K>, Overloaded> {
        let hash = self.hasher.hash_one(&key);
        // The low bits pick a bucket inside the shard's table and the top seven are its
        // tag, so the shard is chosen from bits neither uses.
        let cell = &self.shards[(hash >> 48) as usize & (self.shards.len() - 1)];
        let admit_new_key = || match &cell.key_count {
            None => Ok(()),
            Some(count) => count
                .live
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |live| {
                    (live < count.max).then_some(live + 1)
                })
                .map(drop)
                .map_err(|_| Overloaded::new(Limit::MaxKeys)),
        };
        let (id, position) = cell.lock().claim(hash, key, cell.limits, admit_new_key)?;
        let state = match position {
            Position::Head => ClaimState::Holding { head: true },
            Position::Waiting { node, depth } => ClaimState::Waiting {
                node,
                since: trace::queued(depth),
            },
        };
        Ok(Claim {
            cell: Arc::clone(cell),
            hash,
            id,
            state,
        })
    }
}

impl<K> ShardCell<K> {
    /// Locks the shard, ignoring poisoning: the shard's state is consistent whenever user
    /// code can panic under the lock (only `K::eq`, during a lookup that changes nothing).
    fn lock(&self) -> MutexGuard<'_, Shard<K>> {
        self.shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<K> Claim<K> {
    /// Resolves once this claim is the head of its key and may call the inner service.
    #[inline]
    pub(crate) fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.state {
            ClaimState::Holding { .. } => Poll::Ready(()),
            ClaimState::Waiting { node, since } => self.poll_waiting(node, since, cx),
        }
    }

    fn poll_waiting(&mut self, node: u32, since: QueuedAt, cx: &mut Context<'_>) -> Poll<()> {
        let (turn, stale) = self.cell.lock().poll_turn(self.hash, self.id, node, cx);
        drop(stale);
        if turn.is_ready() {
            trace::admitted(since);
            self.state = ClaimState::Holding { head: true };
        }
        turn
    }

    /// Records that the inner service has been called, so the next claim may start.
    #[inline]
    pub(crate) fn started(&mut self) {
        // With one permit nobody can be granted while this claim holds the key, so
        // nobody waits for its start: the mark is cleared when it releases instead.
        if matches!(self.state, ClaimState::Holding { head: true }) && self.cell.limits.permits > 1
        {
            self.notify_started();
        }
    }

    fn notify_started(&mut self) {
        let deferred = self.cell.lock().start(self.hash, self.id);
        self.state = ClaimState::Holding { head: false };
        deferred.run();
    }

    /// Out of line, so that dropping a response future without a claim stays cheap.
    #[inline(never)]
    fn give_up(&mut self) {
        let cell = &*self.cell;
        let mut shard = cell.lock();
        let deferred = match self.state {
            ClaimState::Waiting { node, .. } => {
                shard.abandon(self.hash, self.id, node, cell.limits)
            }
            ClaimState::Holding { head } => shard.release(self.hash, self.id, head, cell.limits),
        };
        if let (Some(_), Some(count)) = (&deferred.removed_key, &cell.key_count) {
            // Under the lock, so that the count never runs ahead of the entries.
            count.live.fetch_sub(1, Ordering::Relaxed);
        }
        drop(shard);
        deferred.run();
    }
}

impl<K> Drop for Claim<K> {
    fn drop(&mut self) {
        self.give_up();
    }
}

impl<K, H> std::fmt::Debug for Registry<K, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("shards", &self.shards.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<K> std::fmt::Debug for Claim<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}
