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
//! The key's hash is computed once, outside any lock, and stirred (`spread`) so that
//! every bit depends on the low bits of the hasher's output. Keys are spread over a fixed
//! number of shards by bits of that value that the shard's own table does not use; each
//! shard is a `Mutex` around its live keys: the first few in slots inside the shard
//! itself, the rest in a hash table ([`keys`]). A claim keeps the hash, the id of its
//! key's entry and where the entry sat (a slot or a bucket), so a finishing request finds
//! its entry again without hashing or comparing keys, usually without probing.
//!
//! Each shard is reference-counted on its own and a claim keeps only its shard alive,
//! so requests on different shards share no cache line at all: not a lock, not a
//! reference count. The domain-wide key count behind `max_keys` exists only when that
//! limit is set, and is touched only when a key's entry is created or removed.
//!
//! Per key the shard keeps:
//!
//! - `holders`: claims holding one of the key's `permits` (whether started or not);
//! - the *line* ([`line`](mod@line)): claims that could not start when they were made
//!   and have not called the inner service yet, in call order. Its front one may have
//!   been granted a permit; the rest wait for their turn without one;
//! - `head_unstarted`: one claim holds a permit, comes before the whole line, and has not
//!   called the inner service yet.
//!
//! A claim may call the inner service only when it is *the head*: it holds a permit and
//! every earlier claim on its key has started or gone. When the key is free and nobody is
//! in line, `call()` makes the new claim the head at once and no line is touched: the
//! uncontended path is one lookup and one lock on each side.
//!
//! Hand-off: a permit is granted only to a claim that may start, so whenever a permit is
//! freed (a claim finished or was dropped) or the head starts or leaves, the line's front
//! waiter is granted a free permit, if no claim is the unstarted head, and woken. A woken
//! waiter becomes the head on its next poll.
//!
//! # Invariants
//!
//! These hold whenever a shard's lock is free:
//!
//! 1. `holders <= permits`.
//! 2. A waiter holds a permit only if it may start: it is the front of the line and no
//!    claim is the unstarted head. So at most one waiter holds a permit, `holders` counts
//!    the running claims, the unstarted head and that waiter, and `max_queue_per_key`
//!    bounds the waiters without one. If the line's front waits for a permit and no claim
//!    is the unstarted head, `holders == permits`.
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
//! 6. **No foreign code runs between a change to a shard and the moment the claim that
//!    owns the change is in its final state, nor under a shard's lock.** Foreign code is
//!    a key's `Drop`, `Hash` and `Eq`, a waker's `clone`, `wake` and `drop`, a tracing
//!    subscriber, the policy and the inner service. `Hash` and the policy run before the
//!    lock is taken; a waker is cloned before it, and the registry only *moves* wakers
//!    under the lock; keys and wakers that the shard lets go of are dropped, and wakers
//!    woken, after the lock is released ([`shard::Deferred`]), and only once the claim
//!    that caused it records what it holds; tracing events are emitted after that too.
//!    A new claim comes back with the caller's key, when the shard kept an equal one,
//!    and its `queued` event ([`Claimed`]): the caller lets go of both once the claim
//!    is in the response future. So a panic anywhere leaves the registry as if the
//!    request had been dropped, and a waker or key that re-enters the layer (reading
//!    `stats()`, say) cannot deadlock it.
//!
//!    The one exception is `K: Eq`, which a lookup must call under the lock. It runs
//!    before anything is changed, and the lock knows no poisoning, so it may panic; but
//!    an `Eq` that re-enters the layer waits for the lock it runs under (the crate docs
//!    say so under "What is not guaranteed").
//!
//!    The keys and wakers let go of after the lock, and the wakers woken, go through
//!    [`foreign`]. A claim releases in `Drop`, which may run while a panic unwinds (a
//!    response future dropped on its way out), and a second panic escaping a destructor
//!    then aborts the process; so while the thread is panicking, that code runs under
//!    `catch_unwind` and a panic of its own is dropped. The shard's state is final by
//!    then, so the release is complete either way and no hand-off is lost.
//!
//! With one permit per key, nothing can be granted while the head holds the key, so the
//! head skips telling the shard that it started and clears its mark when it releases.
//! That saves a lock per request on the common path.
//!
//! # The cap
//!
//! With `max_in_flight`, a claim that is the head of its keys also needs a slot of the
//! domain's cap before it may call the inner service ([`cap`], whose docs give the
//! algorithm and its invariants). The cap adds per key only what its fairness rule
//! needs, in the key's shard, and gone with the key's entry: a flag in the entry while
//! a request waits for a slot as the key's unstarted head, and the key's latest grant
//! in the shard's limits ([`shard::Limits`]), which the removal of an entry clears
//! whichever claim removes it. A domain without a cap has none of it.
//!
//! # Memory
//!
//! An idle key costs nothing: its entry is removed in the step that makes it idle. A
//! shard's table shrinks with hysteresis (see `Shard::after_removal`): a steady load
//! does not reallocate, and a burst's memory is given back as it drains, fully once the
//! shard is empty. A line's memory follows its live waiters (see [`line`](mod@line)).
//!
//! With a hasher whose output is constant (or keys whose `Hash` is), every key of a
//! domain lands in one bucket of one shard and each request compares keys linearly:
//! `max_keys` bounds that cost.
//!
//! # Performance
//!
//! What shapes the code for speed, for this module and `shard`, `line` and `foreign`.
//! Each item names the rows of `benches/instructions.rs` it protects; CI's instruction
//! gate (`.ci/instruction-gate`) holds those rows to `benches/instructions.budget`, and
//! the sites carry a `// PERF:` pointer.
//!
//! - **The shards' lock is parking_lot's** (all `layer_sync_*` rows, `hand_off_layer`):
//!   std's `Mutex` keeps poison bookkeeping on both sides of every critical section,
//!   which the registry has no use for; 25 fewer instructions per new-key request.
//! - **A shard's first keys live in its own slots** ([`keys`]; `layer_sync_live_key`,
//!   `hand_off_layer`, and two workers sharing a layer): an uncontended request then
//!   writes only the shard's own lines and its reference count, not a table's control
//!   bytes and bucket besides. Two workers on random keys of one layer did 1.16–1.18×
//!   the work of one with the slots, against 0.78–0.79× before (BENCHMARKS.md, "Two
//!   workers, one layer").
//! - **The lines a request writes** (`cargo bench --bench two_workers`): the shard's
//!   lock comes first in its cell, and right behind it the id counter and the first key
//!   slot (`repr(C)` on `ShardCell`, `Shard` and `Keys`), so that a request on a key of
//!   an otherwise idle shard writes the lock's cache line and the reference count's, and
//!   no other. Against four lines before, in alternating runs: two workers did 1.25×
//!   the work of one with foldhash (1.10× before), and 1.36× with SipHash either way
//!   (BENCHMARKS.md, "Two workers, one layer").
//! - **The claim's layout** (`layer_sync_new_key`): its small fields come first, in a
//!   fixed order (`repr(C)`), so that no enum wrapping a claim (`Result`, `Option`, the
//!   turn's states) puts its tag or payload inside the shard pointer. Written in pieces,
//!   the pointer is read back whole right after (a move of the claim), and a load that
//!   spans several earlier stores cannot take its value from them: a stall on every
//!   request.
//! - **Sets of keys and the cap stay off this path** ([`all`]'s Performance section,
//!   `layer_sync_*`, `hand_off_layer`): a claim that leads a `Mode::SyncAll` request's
//!   set, is parked in one, or needs a slot of the cap is told apart by a byte of
//!   flags, its *route*, not by a type; a claim with no flag takes the plain path, and
//!   every other one a cold function. Every `Mode::Sync` claim is built with no flag,
//!   whatever its domain, and takes its domain's flag only where the cap acts: as it
//!   starts inside `call()` (`Turn::start_capped`, out of line too), or when
//!   [`poll_head`](Claim::poll_head) finds that its turn has come. A claim that never
//!   needed a slot (one dropped in line) leaves by the plain release, which is why a
//!   key's share of the cap lives where that release clears it. So a domain without a
//!   cap runs none of the cap's code, and touches no state of it. Its rows are at or
//!   under their budgets from before the cap (BENCHMARKS.md, "What the cap costs a
//!   domain without one").
//! - **The start notice** (`hand_off_layer`, `layer_sync_live_key`, and keys with more
//!   than one permit): whether a claim tells anyone that it started is checked inline
//!   ([`Claim::started`]), and the notice is a function of its own: as one function, the
//!   check was a call on every request that waited, at 839 live key and 1,485 hand-off
//!   against 817 and 1,465. The shard is told through the claim's fields
//!   (`notify_started`), not its address, which would force a claim held in registers
//!   out to memory first.
//! - **The line's steps are inlined** into the registry's (`layer_sync_live_key`,
//!   `hand_off_layer`): `Line` is not generic, so without `#[inline]` its `push`,
//!   `grant_front` and `poll`, and `Shard::state_mut`, stay calls into this crate's own
//!   code from the generic code built in the user's crate. With the four inlined, live
//!   key 817 → 806 and hand-off 1,465 → 1,454; leaving out one at a time measured
//!   818 / 1,466 (`push`), 822 / 1,449 (`grant_front`), 827 / 1,503 (`poll`) and
//!   819 / 1,480 (`state_mut`). Inlining `startable` as well changed nothing.
//! - **`Shard::claim` is always inlined** into `call()`'s `Mode::Sync` step
//!   (`layer_sync_new_key`, `layer_sync_live_key`): left to the compiler, those rows
//!   measured 35 and 22 instructions more.
//! - **The uncontended release** (`layer_sync_new_key`, `layer_sync_all_two_new_keys`):
//!   a claim holding a permit first asks for the entry its hint names to be removed if
//!   the key's only request leaves with nobody in line (`Shard::leave_alone`,
//!   [`keys::Keys::take_if`]): one look at the entry, nothing to wake, only the key to let
//!   go of. `Shard::leave` and its `Deferred` are for every other release. Against the
//!   same code without that step, new key 416 → 355 and two new keys 2,027 → 1,931; a
//!   release that fails the check pays for it, live key 816 → 844 and hand-off 1,456 →
//!   1,490. The same check made inside `Shard::leave`, after its lookup, measured 406,
//!   825 and 1,466.
//! - **Separate guards, inlined** (`hand_off_layer`, `layer_sync_live_key`): the values
//!   a release or a poll lets go of ([`foreign::LetGo`]) are dropped from separate
//!   locals, not a tuple, whose drop the compiler does not always inline: a call on
//!   every hand-off. `Deferred::run` and `let_go_of`, which hold those guards, are
//!   always inlined: as calls they cost 30 to 50 instructions more per hand-off.
//! - **A claim's hint is the entry's address** (`layer_sync_live_key`,
//!   `hand_off_layer`): a release checks the entry where the hint says
//!   ([`keys::Keys::get_mut`], which repairs a stale hint) and removes it there
//!   ([`keys::Keys::remove`]), with no value in between saying where the entry was.
//!   Passing such a value from the lookup to the removal measured live key 876 and
//!   hand-off 1,537, against 844 and 1,490.
//! - **Rare work out of line** (`hand_off_layer`): a line's tidying checks are inline and
//!   the tidying itself, rarely needed, is a function of its own; the same for the
//!   binary search that finds a waiter once the line has been compacted, and for the
//!   scan past gone waiters that finds the line's next waiting one when it is not the
//!   one right behind the granted front (1,454 → 1,432).

mod all;
mod cap;
mod foreign;
mod keys;
mod line;
mod settings;
mod shard;
#[cfg(test)]
mod testing;

use std::hash::{BuildHasher, Hash};
use std::num::NonZeroUsize;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker, ready};

pub(crate) use self::all::ClaimedAll;
use self::all::Sets;
use self::cap::Cap;
pub(crate) use self::cap::MAX_IN_FLIGHT;
pub(crate) use self::foreign::let_go;
use self::foreign::{LetGo, WakeLater};
use self::line::Polled;
pub(crate) use self::settings::Settings;
use self::settings::UNBOUNDED;
use self::shard::{KeyBudget, Leaving, Position, Shard};
use crate::error::Overloaded;
use crate::stats::Stats;
use crate::sync::{Arc, Mutex, MutexGuard};
use crate::trace;

/// Shards per available core. Two workers spraying requests over random keys collide on
/// a shard with probability about 1/shards per request, and a collision on the shard's
/// lock can cost a futex round trip; 32 per core keeps that rare. An idle shard costs
/// about 520 bytes: its cell (lock, settings, slots) and the pointer to it.
const SHARDS_PER_CORE: usize = 32;

/// Upper bound on the shard count.
const MAX_SHARDS: usize = 1024;

/// The bits of the stirred hash that pick a shard: above the ones any shard's table
/// uses to pick a bucket, below the seven that tag the bucket.
const SHARD_SHIFT: u32 = 32;

/// One ordering domain: the state shared by a layer, every service it builds and their
/// clones. Its shards are built when the domain is first used, with the settings it has
/// by then.
pub(crate) struct Registry<K, H> {
    settings: Settings,
    hasher: H,
    shards: OnceLock<Box<[Arc<ShardCell<K>>]>>,
}

/// A shard, aligned so that no two shards share a pair of cache lines (x86 prefetches
/// lines in pairs).
// PERF: two_workers, random keys, foldhash (Performance: the lines a request writes).
#[repr(C, align(128))]
struct ShardCell<K> {
    /// First, so that the lock shares its cache line with what an uncontended request
    /// writes under it ([`Shard`]'s layout).
    shard: Mutex<Shard<K>>,
    /// The domain's settings, beside the lock, where every request of the shard reads
    /// them: a claim keeps only its shard alive, not the registry.
    settings: Settings,
    /// The places that `Mode::SyncAll` requests led from this shard hold on their other
    /// keys ([`all`]).
    sets: Sets<K>,
    /// The domain's cap, when `max_in_flight` is set ([`cap`]).
    cap: Option<Arc<Cap>>,
    /// The flag a claim of the domain takes once its request may need a slot:
    /// [`route::CAPPED`] in a capped domain, nothing otherwise.
    route: u8,
    /// Whether a claim that starts must tell the shard or the cap: more than one permit
    /// per key, or a cap.
    announces_starts: bool,
}

/// The flags of [`Claim::route`]. A claim with none takes the plain route: a
/// `Mode::Sync` claim of a domain without a cap.
mod route {
    /// The claim leads a `Mode::SyncAll` request's set ([`all`](super::all)).
    pub(super) const LEADS_SET: u8 = 1;
    /// The claim's domain has a cap ([`cap`](super::cap)).
    pub(super) const CAPPED: u8 = 1 << 1;
    /// The claim is one of a set's other keys, parked with its lead.
    pub(super) const PARKED: u8 = 1 << 2;
    /// The claim's request holds a slot of the cap: counted on the claim's key, and
    /// given back when the request's lead (or only) claim is dropped.
    pub(super) const SLOT: u8 = 1 << 3;
    /// The claim's request waits for a slot, or was granted one and has not taken it.
    pub(super) const ENQUEUED: u8 = 1 << 4;
}

/// A request's place on its key, from `call()` until the request is done.
///
/// Dropping it, in any state, gives the place up and lets the next claim in line go.
///
/// The claim of a `Mode::SyncAll` request on its first key *leads* the set: it owns the
/// request's places on its other keys, parked in its shard ([`all`]), is the head only
/// once each of them is, and gives them all up when dropped.
// PERF: layer_sync_new_key (the module's Performance section: the claim's layout).
#[repr(C)]
pub(crate) struct Claim<K> {
    state: ClaimState,
    /// What else the claim does besides holding its place ([`route`]): lead a set, hold
    /// a slot of the cap. Tested when it is polled, started and dropped.
    route: u8,
    /// Where the key's entry was last seen in the shard's table.
    bucket: u32,
    cell: Arc<ShardCell<K>>,
    hash: u64,
    id: u64,
    /// Its place in its key's line, while it waits.
    ticket: u64,
}

/// Kept small, with the claim's other fields, because every response future carries a
/// claim and is moved around by executors.
#[derive(Clone, Copy, Debug)]
enum ClaimState {
    /// In the line with `ticket`. `registered` once a waker of this claim's task is
    /// stored in the line.
    InLine { registered: bool },
    /// Holds a permit. `head` while it is still marked as the unstarted head.
    Holding { head: bool },
}

impl ClaimState {
    /// The state, ticket and `queued` event of a claim that took a place at `position`.
    #[inline]
    fn placed(position: Position, settings: &Settings) -> (Self, u64, Option<Queued>) {
        match position {
            Position::Head => (ClaimState::Holding { head: true }, 0, None),
            Position::Waiting { ticket, depth } => (
                ClaimState::InLine { registered: false },
                ticket,
                Some(Queued {
                    depth,
                    domain: settings.metrics_domain,
                }),
            ),
        }
    }
}

impl<K, H> Registry<K, H> {
    pub(crate) fn new(hasher: H) -> Self {
        Registry {
            settings: Settings::default(),
            hasher,
            shards: OnceLock::new(),
        }
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The settings, to change before the domain is used; `None` once it is (its shards
    /// exist, and requests may hold them).
    pub(crate) fn settings_mut(&mut self) -> Option<&mut Settings> {
        self.shards.get().is_none().then_some(&mut self.settings)
    }

    /// The same settings with another hasher, for a domain not in use yet.
    pub(crate) fn with_hasher<H2>(self, hasher: H2) -> Option<Registry<K, H2>> {
        self.shards.get().is_none().then(|| Registry {
            settings: self.settings,
            hasher,
            shards: OnceLock::new(),
        })
    }

    /// Builds the shards if this is the domain's first use.
    pub(crate) fn build(&self) {
        self.shards();
    }

    #[inline]
    fn shards(&self) -> &[Arc<ShardCell<K>>] {
        self.shards.get_or_init(|| {
            let count = if cfg!(loom) {
                // Keeps the models small: every shard is a loom object in every execution.
                2
            } else {
                std::thread::available_parallelism()
                    .map_or(1, NonZeroUsize::get)
                    .saturating_mul(SHARDS_PER_CORE)
                    .next_power_of_two()
                    .min(MAX_SHARDS)
            };
            let budget = (self.settings.max_keys != UNBOUNDED)
                .then(|| Arc::new(KeyBudget::new(self.settings.max_keys)));
            let cap = (self.settings.max_in_flight != UNBOUNDED)
                .then(|| Arc::new(Cap::new(self.settings.max_in_flight)));
            (0..count)
                .map(|_| {
                    Arc::new(ShardCell {
                        settings: self.settings,
                        shard: Mutex::new(Shard::new(budget.clone(), cap.is_some())),
                        sets: Sets::default(),
                        route: if cap.is_some() { route::CAPPED } else { 0 },
                        announces_starts: self.settings.permits_per_key > 1 || cap.is_some(),
                        cap: cap.clone(),
                    })
                })
                .collect()
        })
    }

    /// Sums the shards one at a time; exact whenever no request is being admitted or
    /// released concurrently. Costs a pass over the live keys.
    pub(crate) fn stats(&self) -> Stats {
        let Some(shards) = self.shards.get() else {
            return Stats::default();
        };
        let mut stats = shards.iter().fold(Stats::default(), |mut stats, cell| {
            let (keys, in_flight, queued) = cell.lock().counts();
            stats.keys += keys;
            stats.in_flight += in_flight;
            stats.queued += queued;
            stats
        });
        if let Some(cap) = &shards[0].cap {
            stats.waiting_for_slot = cap.waiting();
        }
        stats
    }

    /// The most claims waiting for their turn on any one key (what [`stats`](Self::stats)
    /// counts as queued, for that key). Visits every shard under its lock and every live
    /// key: for a metrics sampler, never for a request.
    #[cfg(feature = "metrics")]
    pub(crate) fn deepest_queue(&self) -> usize {
        let Some(shards) = self.shards.get() else {
            return 0;
        };
        shards
            .iter()
            .map(|cell| cell.lock().deepest_queue())
            .max()
            .unwrap_or(0)
    }
}

impl<K, H> Registry<K, H>
where
    K: Hash + Eq,
    H: BuildHasher,
{
    /// Takes `key`'s next place in call order, or rejects the request if a limit is hit.
    ///
    /// What remains to do once the claim is in its final place (dropping a spare key,
    /// announcing a queued request) comes back with it, in [`Claimed`]: both run
    /// foreign code, and a claim that is still a local value when foreign code may
    /// unwind has to be kept in memory and copied into place.
    #[inline]
    pub(crate) fn claim(&self, key: K) -> Result<Claimed<K>, Overloaded> {
        let hash = spread(self.hasher.hash_one(&key));
        let shards = self.shards();
        let cell = &shards[(hash >> SHARD_SHIFT) as usize & (shards.len() - 1)];
        let (placed, spare_key) = cell.lock().claim(&cell.settings, hash, key);
        // No foreign code runs until the claim that owns the change exists; from then on
        // a panic drops the claim, which gives its place up like any dropped request.
        let place = match placed {
            Ok(place) => place,
            Err(overloaded) => {
                let_go(spare_key);
                trace::rejected(overloaded.limit(), cell.settings.metrics_domain);
                return Err(overloaded);
            }
        };
        let (state, ticket, queued) = ClaimState::placed(place.position, &cell.settings);
        // PERF: layer_sync_new_key. Built here rather than by `Claim::placed`, whose
        // tuple the claim goes through: 4 instructions more per request.
        Ok(Claimed {
            claim: Claim {
                state,
                route: 0,
                bucket: place.bucket,
                cell: Arc::clone(cell),
                hash,
                id: place.id,
                ticket,
            },
            queued,
            spare_key,
        })
    }
}

/// A claim just taken, and the foreign code the caller still runs for it: announcing
/// `queued` ([`Queued::announce`], a tracing event) and letting go of `spare_key` (a
/// key's `Drop`).
///
/// The claim owns its change to the shard already, so a panic in either drops the claim
/// and gives its place up (invariant 6). What the caller must do:
///
/// - run both once the claim is in the value that will own it (the response future),
///   not while building that value: a claim in a local when foreign code may unwind is
///   kept in memory for the unwinding path and copied into place afterwards (the
///   Performance section of `turn.rs`);
/// - let go of `spare_key` with [`let_go`] before that value is returned, not as part
///   of returning it: a drop that panics while a value is being returned leaks the value
///   (rust-lang/rust#47949), and with it the claim. `tests/foreign.rs`,
///   `a_key_whose_drop_panics_in_call_does_not_wedge_its_key`, fails when it is dropped
///   later, and `a_subscriber_that_panics_on_queued_leaves_no_phantom_waiter` when a
///   panicking `queued` event leaves the claim behind.
#[must_use = "a claim gives its place up when dropped"]
pub(crate) struct Claimed<K> {
    pub(crate) claim: Claim<K>,
    /// Set when the claim joined its key's line.
    pub(crate) queued: Option<Queued>,
    /// The caller's key, when the shard kept an equal one: dropped after the claim is
    /// in place, since its `Drop` is foreign code, and through [`let_go`].
    pub(crate) spare_key: Option<K>,
}

/// A request that waits for a slot of the cap: the `slot_queued` event to emit once its
/// claim is in place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotQueued {
    domain: trace::Domain,
}

impl SlotQueued {
    /// Emits the `slot_queued` event.
    pub(crate) fn announce(self) {
        trace::slot_queued(self.domain);
    }
}

/// A claim that joined its key's line: the `queued` event to emit once it is in place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Queued {
    depth: u32,
    /// The label of the domain's metrics (nothing without the `metrics` feature).
    domain: trace::Domain,
}

impl Queued {
    /// Emits the `queued` event.
    pub(crate) fn announce(self) {
        trace::queued(self.depth, self.domain);
    }
}

/// Stirs a hasher's output so that its high bits depend on its low bits (and the low
/// bits still on the high ones): the shard is picked from the middle bits, the table's
/// bucket from the low bits, and its tag from the top seven. With a hasher that only
/// spreads low bits, such as an identity hasher for integer ids, keys still spread over
/// every shard and bucket.
#[inline]
fn spread(hash: u64) -> u64 {
    (hash ^ (hash >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl<K> ShardCell<K> {
    /// Whether a claim that starts must tell the shard (the claims in line wait for it
    /// when more than one request per key may run) or first ask the cap for a slot.
    #[inline]
    fn announces_starts(&self) -> bool {
        self.announces_starts
    }

    /// The domain's cap; only a capped domain's claims ask for it.
    fn cap(&self) -> &Cap {
        self.cap
            .as_deref()
            .expect("a capped claim's domain has a cap")
    }

    /// Locks the shard. Poisoning would mean nothing here: the only foreign code that can
    /// panic under the lock is `K::eq`, during a lookup that has changed nothing. So the
    /// lock is parking_lot's, which has none, and loom's is told to ignore it.
    #[inline]
    fn lock(&self) -> MutexGuard<'_, Shard<K>> {
        #[cfg(not(loom))]
        return self.shard.lock();
        #[cfg(loom)]
        return self
            .shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
}

impl<K> Claim<K> {
    /// The claim on `cell`'s key with `hash` that took `place`, and its `queued` event if
    /// it joined the key's line.
    #[inline(always)]
    fn placed(cell: &Arc<ShardCell<K>>, hash: u64, place: shard::Place) -> (Self, Option<Queued>) {
        let (state, ticket, queued) = ClaimState::placed(place.position, &cell.settings);
        let claim = Claim {
            state,
            route: 0,
            bucket: place.bucket,
            cell: Arc::clone(cell),
            hash,
            id: place.id,
            ticket,
        };
        (claim, queued)
    }

    /// True when the shard must be told that this claim started (more than one permit
    /// per key: the claims in line wait for it), or the claim needs a slot of the cap
    /// before it starts.
    #[inline]
    pub(crate) fn notifies_start(&self) -> bool {
        matches!(self.state, ClaimState::Holding { head: true }) && self.cell.announces_starts()
    }

    /// Resolves once this claim is the head of its key and may call the inner service.
    #[inline]
    pub(crate) fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.route == 0 {
            ready!(self.poll_own_head(cx));
            // Its turn has come: in a capped domain, the request now needs a slot.
            if self.cell.route == 0 {
                return Poll::Ready(());
            }
            self.route = self.cell.route;
        }
        self.poll_head_routed(cx)
    }

    /// [`poll_head`](Self::poll_head) for a claim that leads a set, is parked in one, or
    /// needs a slot of the cap: resolves once the request is the head of every key and,
    /// in a capped domain, holds a slot.
    #[cold]
    #[inline(never)]
    fn poll_head_routed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // PERF: layer_sync_all_two_live_keys. A set's lead in a domain without a cap.
        if self.route == route::LEADS_SET {
            return all::poll_heads(self, cx);
        }
        if self.route & route::LEADS_SET != 0 {
            ready!(all::poll_heads(self, cx));
        } else {
            ready!(self.poll_own_head(cx));
            if self.route & route::PARKED != 0 {
                // Its lead asks for the request's slot.
                return Poll::Ready(());
            }
        }
        if self.route & route::CAPPED == 0 {
            return Poll::Ready(());
        }
        if self.route & route::LEADS_SET != 0 {
            all::with_others(self, |lead, others| cap::poll_slot(lead, others, cx))
        } else {
            cap::poll_slot(self, &mut [], cx)
        }
    }

    /// Whether the claim's domain has a cap.
    #[inline]
    pub(crate) fn is_capped(&self) -> bool {
        self.cell.route & route::CAPPED != 0
    }

    /// In a capped domain, asks for a slot for a request that is the head of its keys,
    /// inside `call()`: `Some` with the event to announce once the claim is in place if
    /// the request has to wait for one, `None` when it took one.
    pub(crate) fn queue_for_slot(&mut self) -> Option<SlotQueued> {
        debug_assert!(self.is_capped(), "only a capped domain has slots");
        // A `Mode::Sync` claim takes the cap's flag here, as it may first need a slot; a
        // set's claims have it already.
        self.route |= route::CAPPED;
        let taken = if self.route & route::LEADS_SET != 0 {
            all::with_others(self, |lead, others| cap::take(lead, others, None))
        } else {
            cap::take(self, &mut [], None)
        };
        match taken {
            cap::Taken::Slot => None,
            cap::Taken::Queued => Some(SlotQueued {
                domain: self.cell.settings.metrics_domain,
            }),
        }
    }

    /// [`poll_head`](Self::poll_head) on this claim's own key only.
    #[inline]
    fn poll_own_head(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.state {
            ClaimState::Holding { .. } => Poll::Ready(()),
            ClaimState::InLine { registered } => self.poll_waiting(registered, cx),
        }
    }

    fn poll_waiting(&mut self, registered: bool, cx: &mut Context<'_>) -> Poll<()> {
        // Cloning a waker runs executor code, so it happens before the lock is taken. A
        // claim that has registered before is usually polled because it was woken for
        // its turn, and then needs no clone at all.
        let mut fresh = (!registered).then(|| cx.waker().clone());
        loop {
            let mut shard = self.cell.lock();
            let polled = shard.poll_head(
                self.hash,
                self.id,
                &mut self.bucket,
                self.ticket,
                &mut fresh,
                cx.waker(),
            );
            let stale = match polled {
                Polled::Head(stale, since) => {
                    self.state = ClaimState::Holding { head: true };
                    drop(shard);
                    let_go_of(stale, fresh);
                    trace::admitted(since, self.cell.settings.metrics_domain);
                    return Poll::Ready(());
                }
                Polled::Wait(stale) => stale,
                Polled::NeedsWaker => {
                    drop(shard);
                    fresh = Some(cx.waker().clone());
                    continue;
                }
            };
            self.state = ClaimState::InLine { registered: true };
            drop(shard);
            let_go_of(stale, fresh);
            return Poll::Pending;
        }
    }

    /// Records that the inner service has been called, so the next claim may start.
    // PERF: layer_sync_live_key, hand_off_layer (Performance: the start notice).
    #[inline(always)]
    pub(crate) fn started(&mut self) {
        // With one permit nobody can be granted while this claim holds the key, so
        // nobody waits for its start: the mark is cleared when it releases instead.
        if self.notifies_start() {
            self.announce_start();
        }
    }

    /// [`started`](Self::started) for a claim whose start the claims behind it, or the
    /// cap, wait for.
    #[inline(never)]
    fn announce_start(&mut self) {
        if self.route != 0 {
            return self.started_routed();
        }
        self.record_start().run();
    }

    /// [`started`](Self::started) for a claim that leads a set or belongs to a capped
    /// domain: only more than one permit per key has a start to tell (a slot is taken
    /// before the start). A set's starts are all recorded before any of them wakes
    /// anyone.
    #[cold]
    #[inline(never)]
    fn started_routed(&mut self) {
        if self.cell.settings.permits_per_key == 1 {
            return;
        }
        if self.route & route::LEADS_SET != 0 {
            return all::started(self);
        }
        self.record_start().run();
    }

    /// Tells this claim's shard that it has started, and returns the wake to run then.
    // PERF: hand_off_layer (Performance: the start notice).
    #[inline]
    fn record_start(&mut self) -> shard::Deferred<K> {
        let (bucket, deferred) = notify_started(&self.cell, self.hash, self.id, self.bucket);
        // Recorded before the deferred wake runs any foreign code (invariant 6).
        self.bucket = bucket;
        self.state = ClaimState::Holding { head: false };
        deferred
    }
}

/// Drops the wakers a poll no longer needs. A destructor may poll while a panic unwinds,
/// so they go through [`foreign`].
// PERF: hand_off_layer, layer_sync_live_key (Performance: separate guards; a call
// measured 35 and 17 instructions more).
#[inline(always)]
fn let_go_of(stale: Option<Waker>, fresh: Option<Waker>) {
    let fresh = LetGo(fresh);
    drop(LetGo(stale));
    drop(fresh);
}

/// Tells the shard that the unstarted head `(hash, id)` has called the inner service.
/// Returns where its entry is now, and what to do once the claim has recorded it.
fn notify_started<K>(
    cell: &ShardCell<K>,
    hash: u64,
    id: u64,
    mut bucket: u32,
) -> (u32, shard::Deferred<K>) {
    let deferred = cell.lock().start(&cell.settings, hash, id, &mut bucket);
    (bucket, deferred)
}

impl<K> Drop for Claim<K> {
    #[inline]
    fn drop(&mut self) {
        if self.route != 0 {
            self.release_routed();
        } else {
            self.release();
        }
    }
}

/// Gives a request's slot back when dropped: after its places are given up, also when
/// giving them up panics (a wake is foreign code).
struct GiveBack<K>(Option<Arc<ShardCell<K>>>);

impl<K> Drop for GiveBack<K> {
    fn drop(&mut self) {
        if let Some(cell) = self.0.take() {
            cap::give_back(&cell);
        }
    }
}

impl<K> Claim<K> {
    /// [`Drop`] for a claim that leads a set, is parked in one, or belongs to a capped
    /// domain. The request's own claim (the lead, or a `Mode::Sync` claim) leaves the
    /// cap's queue first, then every place is given up, then its slot: so the waiters on
    /// its keys have been told that its keys' slots fell before the slot is handed on.
    #[cold]
    #[inline(never)]
    fn release_routed(&mut self) {
        // PERF: layer_sync_all_two_new_keys. A set's lead in a domain without a cap.
        if self.route == route::LEADS_SET {
            return all::release_set(self);
        }
        let owns_request = self.route & (route::CAPPED | route::PARKED) == route::CAPPED;
        let _give_back = GiveBack(
            (owns_request && self.route & route::SLOT != 0).then(|| Arc::clone(&self.cell)),
        );
        let (wake, stale) = if owns_request && self.route & route::ENQUEUED != 0 {
            cap::withdraw(self)
        } else {
            (None, None)
        };
        let _withdrawn = (LetGo(stale), WakeLater(wake));
        if self.route & route::LEADS_SET != 0 {
            all::release_set(self);
        } else {
            self.release_capped();
        }
    }

    /// Gives this claim's own place up in a domain with a cap. A claim whose request
    /// waited for a slot unmarks its key; one whose request held a slot tells the request
    /// waiting for a slot on its key, if any, that the key holds one fewer (the [`cap`]
    /// docs, "Slots held by a key").
    fn release_capped(&mut self) {
        let leaving = self.leaving();
        let mut shard = self.cell.lock();
        if self.route & route::ENQUEUED != 0 {
            shard.set_slot_waiter(self.hash, self.id, &mut self.bucket, false);
        } else if self.route & route::SLOT != 0
            && shard.has_slot_waiter(self.hash, self.id, &mut self.bucket)
        {
            // Under the shard's lock, the one place the cap's lock is taken inside it
            // besides `cap::take`.
            cap::fell(self);
        }
        let deferred = shard.leave(
            &self.cell.settings,
            self.hash,
            self.id,
            &mut self.bucket,
            leaving,
        );
        drop(shard);
        deferred.run();
    }

    /// What this claim gives back when it leaves its key.
    #[inline(always)]
    fn leaving(&self) -> Leaving {
        match self.state {
            ClaimState::InLine { .. } => Leaving::Line {
                ticket: self.ticket,
            },
            ClaimState::Holding { head, .. } => Leaving::Permit { was_head: head },
        }
    }

    /// Gives this claim's own place up and lets the next claim in its line go.
    // PERF: layer_sync_new_key (Performance: the uncontended release).
    #[inline(always)]
    fn release(&mut self) {
        let leaving = self.leaving();
        let mut shard = self.cell.lock();
        if let Leaving::Permit { .. } = leaving {
            if let Some(key) = shard.leave_alone(self.id, self.bucket) {
                drop(shard);
                let_go(key);
                return;
            }
        }
        let deferred = shard.leave(
            &self.cell.settings,
            self.hash,
            self.id,
            &mut self.bucket,
            leaving,
        );
        drop(shard);
        deferred.run();
    }
}

impl<K, H> std::fmt::Debug for Registry<K, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("settings", &self.settings)
            .field("shards", &self.shards.get().map(|shards| shards.len()))
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn spread_moves_low_bit_entropy_into_the_shard_bits() {
        let shards = 64;
        let mut seen = std::collections::HashSet::new();
        for id in 0..1_000u64 {
            seen.insert((spread(id) >> SHARD_SHIFT) as usize & (shards - 1));
        }
        assert_eq!(
            seen.len(),
            shards,
            "identity-hashed ids must reach every shard"
        );
    }
}
