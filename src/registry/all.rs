//! `Mode::SyncAll`: one request's place on several keys, taken in one step.
//!
//! # Algorithm
//!
//! [`Registry::claim_all`] hashes every key outside any lock, sorts the keys by shard
//! (and hash) and drops duplicates. It then locks each shard the set touches, **in
//! ascending shard order**, and keeps every one of those locks until the request has a
//! place on every key: on each key it takes the place a `Mode::Sync` request would take
//! (the head if the key is free, the back of its line otherwise), under that key's
//! shard lock like any other claim. Only then are the locks released, together.
//!
//! The request then has one [`Claim`] per key, each exactly what a `Mode::Sync` request
//! holds, so every key's line, permit and hand-off work as before. Its response future
//! carries the claim on its first key, which *leads* the set: the claims on the other
//! keys are parked in the lead's shard ([`Sets`]), and are taken out only while the
//! lead is polled, started or dropped, never under a shard's lock. The request may call
//! the inner service once it is the head of every one of its keys ([`poll_heads`]); it
//! stays the unstarted head of the keys it reached first while it waits for the others.
//! Dropping the lead drops each key's claim, which gives that place up and passes the
//! key on, as a dropped `Mode::Sync` request does.
//!
//! # Performance
//!
//! - **A lead, not a claim type of two kinds** (`layer_sync_new_key`,
//!   `layer_sync_live_key`, `layer_concurrent`): a `Mode::Sync` request's claim is the
//!   type it was, with a `leads_set` flag in what was padding, tested when it is polled,
//!   started and dropped. A claim enum of one key or a boxed set, and a response future
//!   whose state tells one key from several, each cost 2–4% on those rows: the drop of
//!   every response future became a call, or a jump table.
//! - **Scratch and parked claims inline** (`layer_sync_all_two_new_keys`,
//!   `layer_sync_all_two_live_keys`, in `benches/instructions_sets.rs`): the keys, shard
//!   guards, events and spare keys of a set of up to 4 keys, and the other keys' claims
//!   of a set of up to 3, live in `SmallVec`s, so that such a request allocates nothing
//!   here; with `Vec`s, and the other keys' claims gathered after placing, the
//!   two-new-keys row measured 2,301 instructions; 1,973 now. What such a request
//!   still allocates is its `Mode::SyncAll`'s box and vector.
//! - **Set numbers index a table** ([`Sets`]): no hashing on a set's way through.
//!
//! # One order on every key, and no deadlock
//!
//! Call a placement's *moment* the instant at which it holds all of its shard locks (for
//! a `Mode::Sync` request, its one lock). Two placements that share a key both hold that
//! key's shard lock at their moments, so their lock-holding intervals on that shard do
//! not overlap, and the one that took its place first on that key has the earlier
//! moment. Every key's line is therefore in the order of the moments, and two requests
//! that share several keys are in the same order on each of them: whichever placed
//! first, placed first on all of them.
//!
//! A request waits only for claims ahead of it on its keys, which are claims with an
//! earlier moment: every edge of the wait-for graph points to an earlier moment, so the
//! graph has no cycle, and no set of requests can wait for each other. This holds for
//! any mix of single- and multi-key requests and any `permits_per_key`, since a claim's
//! permit on a key depends only on the claims ahead of it on that key.
//!
//! Locking in one global order makes the placements themselves deadlock-free: a
//! placement holding shard `i` waits only for shards above `i`, and every other code path
//! holds one shard lock at a time.
//!
//! # Limits, all or nothing
//!
//! A key whose line is full (`max_queue_per_key`) or a new key over `max_keys` rejects
//! the placement there. The places taken so far are then given back exactly as dropped
//! requests give theirs, right after the locks are released, before `call()` returns the
//! rejection: nothing of the request is left on any key. Until then, a request that
//! lined up behind one of those places is simply passed the key when it is given back.
//!
//! # Foreign code
//!
//! As everywhere in the registry, no foreign code runs under a shard's lock except
//! `K: Eq` during a lookup: keys are hashed and compared for duplicates before any lock
//! is taken, and the keys the placement does not keep (duplicates, keys already live in
//! their shard, keys after a rejection) are dropped after the locks are released, each
//! under its own guard ([`LetGo`]), so that one key's panicking `Drop` cannot abort the
//! process by making another panic while unwinding. If `K: Eq` panics during a lookup,
//! the locks are released first (they are declared after the claims taken so far) and
//! those claims are then dropped, giving their places back.

use std::hash::{BuildHasher, Hash};
use std::task::{Context, Poll};

use smallvec::SmallVec;

use super::foreign::LetGo;
use super::shard::Deferred;
use super::{Claim, Queued, Registry, ShardCell, route, spread};
use crate::error::Overloaded;
use crate::sync::{Arc, Mutex};
use crate::trace;

/// A multi-key claim just taken, and the foreign code the caller still runs for it: one
/// `queued` event per key it waits on, and the keys the registry did not keep.
#[must_use = "a claim gives its places up when dropped"]
pub(crate) struct ClaimedAll<K> {
    /// The lead claim, or the only one for a set of one distinct key.
    pub(crate) claim: Claim<K>,
    pub(crate) queued: SmallVec<[Queued; INLINE_KEYS]>,
    pub(crate) spare_keys: SpareKeys<K>,
}

/// Keys of a set that its scratch space holds without allocating.
// PERF: layer_sync_all_two_new_keys, layer_sync_all_two_live_keys.
const INLINE_KEYS: usize = 4;

/// The other keys' claims that a parked set holds without allocating: a set of up to
/// three keys.
const INLINE_OTHERS: usize = 2;

/// Keys the registry did not keep, to let go of once the claim is in place; each is
/// dropped under its own guard.
pub(crate) struct SpareKeys<K>(SmallVec<[LetGo<K>; INLINE_KEYS]>);

impl<K> SpareKeys<K> {
    fn push(&mut self, key: K) {
        self.0.push(LetGo(Some(key)));
    }

    /// Drops the keys. If one's `Drop` panics, the others are still dropped, each under
    /// its guard, by the unwinding.
    pub(crate) fn let_go(self) {
        drop(self);
    }
}

impl<K, H> Registry<K, H>
where
    K: Hash + Eq,
    H: BuildHasher,
{
    /// Takes the request's place on every key of `keys` in one step, or rejects it, and
    /// then holds no place on any key. `keys` must not be empty. A set of one distinct
    /// key takes the place a `Mode::Sync` request takes, by the same steps.
    pub(crate) fn claim_all(&self, keys: Vec<K>) -> Result<ClaimedAll<K>, Overloaded> {
        debug_assert!(!keys.is_empty(), "an empty set is Mode::Concurrent");
        let shards = self.shards();
        let mut spare_keys = SpareKeys(SmallVec::new());
        // Hash and compare (foreign code) before any lock is taken. The keys wait in
        // `pending` until the registry keeps them or lets go of them, so that if a key's
        // `Hash` or `Eq` panics, the others are dropped as guarantee 6 says. Declared
        // before the locks, it is dropped after they are released.
        let mut pending = Pending(keys.into_iter().map(|key| (0, 0, key)).collect());
        for (shard, hash, key) in pending.0.iter_mut() {
            *hash = spread(self.hasher.hash_one(&*key));
            *shard = shard_index(*hash, shards.len());
        }
        // In descending order, so that popping the last takes the keys in shard order.
        pending
            .0
            .sort_unstable_by(|(shard, hash, _), (other_shard, other_hash, _)| {
                (other_shard, other_hash).cmp(&(shard, hash))
            });
        // Duplicates are next to each other, or at least in the same run of equal
        // hashes: keep the first of each, and move the rest to the end to let go of.
        let mut kept = 0;
        for next in 0..pending.0.len() {
            let (shard, hash, ref key) = pending.0[next];
            let duplicate = pending.0[..kept]
                .iter()
                .rev()
                .take_while(|&&(other_shard, other_hash, _)| {
                    (other_shard, other_hash) == (shard, hash)
                })
                .any(|(_, _, other)| other == key);
            if !duplicate {
                pending.0.swap(kept, next);
                kept += 1;
            }
        }
        for (_, _, key) in pending.0.drain(kept..) {
            spare_keys.push(key);
        }
        // The first claim, in shard order, leads; the others are parked with it.
        let mut lead: Option<Claim<K>> = None;
        let mut others: SmallVec<[Claim<K>; INLINE_OTHERS]> = SmallVec::new();
        let mut queued = SmallVec::new();
        let mut rejected = None;
        {
            // Declared after the claims: if `K: Eq` panics under these locks, they are
            // released before the claims taken so far give their places back.
            let mut locked: SmallVec<[_; INLINE_KEYS]> = SmallVec::new();
            let mut locked_shard = usize::MAX;
            while let Some((shard, hash, key)) = pending.0.pop() {
                let cell = &shards[shard];
                if shard != locked_shard {
                    locked.push(cell.lock());
                    locked_shard = shard;
                }
                let guard = locked.last_mut().expect("the key's shard is locked");
                let (placed, spare_key) = guard.claim(&cell.settings, hash, key);
                if let Some(key) = spare_key {
                    spare_keys.push(key);
                }
                match placed {
                    Ok(place) => {
                        let (claim, waits) = Claim::placed(cell, hash, place);
                        if lead.is_none() {
                            lead = Some(claim);
                        } else {
                            others.push(claim);
                        }
                        queued.extend(waits);
                    }
                    Err(overloaded) => {
                        rejected = Some(overloaded);
                        break;
                    }
                }
            }
        }
        // The locks are released: the keys after a rejection can be let go of.
        for (_, _, key) in pending.0.drain(..) {
            spare_keys.push(key);
        }
        if let Some(overloaded) = rejected {
            // Each place taken is given back as a dropped request gives it back.
            drop((lead, others));
            spare_keys.let_go();
            trace::rejected(overloaded.limit(), self.settings.metrics_domain);
            return Err(overloaded);
        }
        // The first claim leads; the vector keeps the others, in shard order.
        let mut lead = lead.expect("a set has a key");
        if !others.is_empty() {
            let cell = Arc::clone(&lead.cell);
            cell.sets.lead(&mut lead, others);
        }
        Ok(ClaimedAll {
            claim: lead,
            queued,
            spare_keys,
        })
    }
}

/// A set's keys with their shards and hashes, on their way into the registry. Dropped
/// while a panic unwinds (a key's `Hash` or `Eq` panicked), it drops each key under its
/// own guard, so that a key whose `Drop` panics too cannot abort the process.
struct Pending<K>(SmallVec<[(usize, u64, K); INLINE_KEYS]>);

impl<K> Drop for Pending<K> {
    fn drop(&mut self) {
        if std::mem::needs_drop::<K>() && !self.0.is_empty() && std::thread::panicking() {
            for (_, _, key) in self.0.drain(..) {
                drop(LetGo(Some(key)));
            }
        }
    }
}

/// The shard of a stirred hash; see `Registry::claim`.
#[inline]
pub(super) fn shard_index(hash: u64, shards: usize) -> usize {
    (hash >> super::SHARD_SHIFT) as usize & (shards - 1)
}

/// Sets whose room an empty [`Sets`] table keeps.
const RETAINED_SETS: usize = 8;

/// The claims that the `Mode::SyncAll` requests led from one shard hold on their other
/// keys: a table of slots, each set in the slot its number names.
///
/// A lead claim's `ticket` is the number of its set here, except while the lead is
/// polled or released: its own ticket in its key's line is kept with the set and put
/// back for that time. (A key's id cannot name a set, since every claim on a key shares
/// it, and a line ticket cannot either, since a key's tickets start again when it gets a
/// new line.) A number is reused only once its set has been given up.
pub(super) struct Sets<K>(Mutex<Slots<K>>);

struct Slots<K> {
    slots: Vec<Slot<K>>,
    /// The first free slot, and through each free one the next.
    free: Option<usize>,
    /// Slots holding a set, parked or out.
    used: usize,
}

enum Slot<K> {
    Free {
        next: Option<usize>,
    },
    Parked(Set<K>),
    /// Taken out while its lead is polled or started.
    Out,
}

/// What a lead keeps here: its ticket in its key's line, and its claims on its other
/// keys.
struct Set<K> {
    line_ticket: u64,
    others: SmallVec<[Claim<K>; INLINE_OTHERS]>,
}

impl<K> Default for Sets<K> {
    fn default() -> Self {
        Sets(Mutex::new(Slots {
            slots: Vec::new(),
            free: None,
            used: 0,
        }))
    }
}

impl<K> Sets<K> {
    /// Parks `others` for the lead, and makes its `ticket` the set's number.
    fn lead(&self, lead: &mut Claim<K>, mut others: SmallVec<[Claim<K>; INLINE_OTHERS]>) {
        // In a capped domain every claim of the set takes the cap's flag, which a
        // `Mode::Sync` claim takes only once it may need a slot: the set's lead asks for
        // its slot, and the others give theirs up by the capped release. In a domain
        // without a cap, the other keys' claims keep the plain route.
        let capped = lead.cell.route;
        if capped != 0 {
            lead.route |= capped;
            for claim in &mut others {
                claim.route |= capped | route::PARKED;
            }
        }
        let set = Set {
            line_ticket: lead.ticket,
            others,
        };
        let mut table = self.lock();
        let number = match table.free {
            Some(free) => {
                let Slot::Free { next } = table.slots[free] else {
                    unreachable!("the free list holds free slots")
                };
                table.free = next;
                table.slots[free] = Slot::Parked(set);
                free
            }
            None => {
                table.slots.push(Slot::Parked(set));
                table.slots.len() - 1
            }
        };
        table.used += 1;
        drop(table);
        lead.ticket = number as u64;
        lead.route |= route::LEADS_SET;
    }

    /// Takes set `number` out while its lead is polled or started.
    fn take_out(&self, number: u64) -> Option<Set<K>> {
        let mut table = self.lock();
        let slot = table.slots.get_mut(number as usize)?;
        match std::mem::replace(slot, Slot::Out) {
            Slot::Parked(set) => Some(set),
            other => {
                *slot = other;
                None
            }
        }
    }

    /// Parks set `number` again once its lead's poll or start is over.
    fn put_back(&self, number: u64, set: Set<K>) {
        if let Some(slot @ Slot::Out) = self.lock().slots.get_mut(number as usize) {
            *slot = Slot::Parked(set);
        }
    }

    /// Gives set `number` up, for its lead's drop, and frees its slot.
    fn remove(&self, number: u64) -> Option<Set<K>> {
        let mut table = self.lock();
        let index = number as usize;
        let set = match table.slots.get(index) {
            Some(Slot::Parked(_) | Slot::Out) => {
                let next = table.free;
                match std::mem::replace(&mut table.slots[index], Slot::Free { next }) {
                    Slot::Parked(set) => Some(set),
                    _ => None,
                }
            }
            _ => return None,
        };
        table.free = Some(index);
        table.used -= 1;
        // Memory comes back: an empty table keeps room for a few sets only.
        if table.used == 0 && table.slots.capacity() > RETAINED_SETS {
            table.slots = Vec::new();
            table.free = None;
        }
        set
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, Slots<K>> {
        #[cfg(not(loom))]
        return self.0.lock();
        #[cfg(loom)]
        return self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
}

/// A lead whose set is out of its parking place while the lead is polled or started,
/// with the lead's line ticket back in place: parked again when dropped, also when a
/// poll panics.
struct Unparked<'a, K> {
    lead: &'a mut Claim<K>,
    cell: Arc<ShardCell<K>>,
    number: u64,
    set: Set<K>,
}

impl<'a, K> Unparked<'a, K> {
    fn take(lead: &'a mut Claim<K>) -> Self {
        let cell = Arc::clone(&lead.cell);
        let number = lead.ticket;
        let set = cell.sets.take_out(number).unwrap_or_else(|| Set {
            line_ticket: number,
            others: SmallVec::new(),
        });
        lead.ticket = set.line_ticket;
        Unparked {
            lead,
            cell,
            number,
            set,
        }
    }
}

impl<K> Drop for Unparked<'_, K> {
    fn drop(&mut self) {
        let set = Set {
            line_ticket: self.lead.ticket,
            others: std::mem::take(&mut self.set.others),
        };
        self.lead.ticket = self.number;
        self.cell.sets.put_back(self.number, set);
    }
}

/// Resolves once the lead and every other claim of its set is the head of its key. Each
/// claim still in line keeps the task's waker in its line, so whichever key comes free
/// last wakes the task.
#[cold]
#[inline(never)]
pub(super) fn poll_heads<K>(lead: &mut Claim<K>, cx: &mut Context<'_>) -> Poll<()> {
    let mut unparked = Unparked::take(lead);
    let mut ready = unparked.lead.poll_own_head(cx).is_ready();
    for claim in &mut unparked.set.others {
        ready &= claim.poll_head(cx).is_ready();
    }
    if ready {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}

/// Records on every key of the lead's set that the inner service has been called (more
/// than one permit per key), then wakes the claims that may now start: every start is
/// recorded before any wake, which is foreign code, runs, and a wake that panics does not
/// keep the others from running.
#[cold]
#[inline(never)]
pub(super) fn started<K>(lead: &mut Claim<K>) {
    let mut unparked = Unparked::take(lead);
    let mut wakes: SmallVec<[WakeOnDrop<K>; INLINE_KEYS]> = SmallVec::new();
    wakes.push(WakeOnDrop(Some(unparked.lead.record_start())));
    for claim in &mut unparked.set.others {
        if claim.notifies_start() {
            wakes.push(WakeOnDrop(Some(claim.record_start())));
        }
    }
    drop(unparked);
    // Each runs as it is dropped: in order, or, after one has panicked, while that panic
    // unwinds, when `Deferred::run` contains any further panic.
    drop(wakes);
}

/// A start's wake, run when dropped.
struct WakeOnDrop<K>(Option<Deferred<K>>);

impl<K> Drop for WakeOnDrop<K> {
    fn drop(&mut self) {
        if let Some(deferred) = self.0.take() {
            deferred.run();
        }
    }
}

/// Gives up every place of the set a dropped lead holds: its own, then the others, also
/// when giving its own up panics (a wake is foreign code).
#[cold]
#[inline(never)]
pub(super) fn release_set<K>(lead: &mut Claim<K>) {
    let set = lead.cell.sets.remove(lead.ticket);
    let _others = set.map(|set| {
        lead.ticket = set.line_ticket;
        set.others
    });
    if lead.route & route::CAPPED != 0 {
        lead.release_capped();
    } else {
        lead.release();
    }
}

/// Runs `f` on the lead and the claims on its set's other keys, in shard order, with the
/// set out of its parking place.
pub(super) fn with_others<K, R>(
    lead: &mut Claim<K>,
    f: impl FnOnce(&mut Claim<K>, &mut [Claim<K>]) -> R,
) -> R {
    let mut unparked = Unparked::take(lead);
    let Unparked { lead, set, .. } = &mut unparked;
    f(lead, &mut set.others)
}
