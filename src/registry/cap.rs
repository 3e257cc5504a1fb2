//! `max_in_flight`: one cap on the requests of a whole domain, shared fairly by its keys.
//!
//! # Algorithm
//!
//! A *slot* is what a `Mode::Sync` or `Mode::SyncAll` request needs, besides its keys, to
//! call the inner service; the domain has `max_in_flight` of them. A request asks for a
//! slot once it is the head of every one of its keys (so it never holds a slot while it
//! waits behind its own key), before it polls the inner service's readiness (so it holds
//! no inner capacity while it waits for a slot), and keeps it until its claim is
//! dropped: when its response future completes or is dropped, or, over HTTP, when its
//! response body ends. `Mode::Concurrent` requests take no claim and no slot.
//!
//! The count of slots in use lives in one word, [`Cap::state`], with a `WAITING` flag
//! (some request waits for a slot and has not been granted one) and a grant number that
//! every grant increments. While nobody waits, a request takes a slot with one
//! compare-and-swap on that word and gives it back with another: **that word's cache
//! line is where the cores meet**, and the only state every capped request touches
//! besides its own shard. Everything else is per key, in the key's shard.
//!
//! A request that finds every slot taken, or finds others waiting, joins the waiters
//! ([`Queue`]) under the cap's lock, while it still holds the locks of its keys' shards.
//! A slot given back while someone waits is not returned to the count: the releasing
//! request hands it, under the cap's lock, to the waiter the rule below picks, marks
//! that waiter granted and wakes it. The waiter takes the slot on its next poll and
//! leaves the queue. So a slot is never free while a request waits for one, and a
//! request that arrives later cannot overtake the waiters through the word.
//!
//! # The rule
//!
//! A freed slot goes to the waiting request whose key holds the fewest slots; among
//! equals, to the one whose key was granted a slot least recently, a key never granted
//! one first; among equals, to the one that has waited longest. A `Mode::SyncAll`
//! request holds a slot on each of its keys, and waits as its busiest key: the most
//! slots any of its keys holds, the latest grant any of them had.
//!
//! - **Slots held by a key.** A waiter is the unstarted head of each of its keys, so the
//!   other claims that hold the key's permits have all started, and each of those took
//!   a slot first: the key holds `holders - 1` slots. The waiter reads that under the
//!   key's shard lock as it joins the queue, and marks the key (`slot_waiter`) under the
//!   same lock. While it waits, the key's count can only fall (nothing else on the key
//!   can start before it), and each claim that falls from it tells the queue: as it
//!   leaves the key, under the shard's lock, it finds the mark and takes a slot off the
//!   count of the ungranted waiter on that key ([`fell`]). The read, the mark and every
//!   departure are ordered by the one shard lock, and the waiter cannot leave the key
//!   (nor another take its place) while it is held, so every departure is counted
//!   exactly once: before the read, or through the mark.
//! - **When a key was last granted.** Each grant takes the next grant number, and the
//!   key's shard keeps the latest one ([`Grants`]) for as long as the key is live: the
//!   number goes when the key's entry is removed, by whichever claim removes it, as
//!   everything else of an idle key goes. Grant numbers are compared by their distance
//!   from the current one, modulo 2<sup>39</sup>.
//! - **How long a request has waited.** Waiters are numbered as they join.
//!
//! A grant scans the waiters, at most one per key (each is the unstarted head of its
//! keys), so it costs O(waiting keys), on the slow path only.
//!
//! # Invariants
//!
//! These hold whenever the cap's lock is free:
//!
//! 1. Slots in use (the word's count) = requests holding a slot + waiters granted one and
//!    not yet polled. So at most `max_in_flight` requests hold one.
//! 2. `WAITING` is set exactly when some waiter has not been granted a slot, and then
//!    every slot is in use. The flag changes only under the cap's lock; the count
//!    changes under it or by a compare-and-swap that fails when the flag is set.
//! 3. A request is in the queue from the moment it finds no slot until it takes the one
//!    it was granted or is dropped; a dropped waiter that had been granted a slot hands
//!    it on by the rule, as a finished request does. No path gives a slot back after an
//!    `.await`, so cancellation and panics cannot lose one.
//! 4. Locks nest one way only: a shard's lock, then the cap's. A request joining the
//!    queue holds its keys' shard locks (taken in ascending shard order) and then takes
//!    the cap's lock; a claim that leaves a key on which a request waits for a slot
//!    takes the cap's lock under its shard's ([`fell`]); everything else holds one of
//!    them at a time. No foreign code runs under either: wakers are cloned before, and
//!    woken and dropped after, and tracing events are emitted once the claim's state
//!    records what it holds (the registry's invariant 6).

use std::task::{Context, Poll, Waker};

use hashbrown::HashTable;
use smallvec::SmallVec;

use super::foreign::{self, LetGo};
use super::shard::Shard;
use super::{Claim, ShardCell, route};
use crate::sync::{AtomicU64, Mutex, MutexGuard, Ordering};
use crate::trace;

/// The largest `max_in_flight`: the count of slots in use has 24 bits of [`Cap::state`].
pub(crate) const MAX_IN_FLIGHT: usize = (1 << IN_USE_BITS) - 1;

const IN_USE_BITS: u32 = 24;
/// The slots in use, in the low bits of the state word.
const IN_USE: u64 = (1 << IN_USE_BITS) - 1;
/// Some waiter has not been granted a slot yet.
const WAITING: u64 = 1 << IN_USE_BITS;
/// The grant number, in the high bits: it wraps, and is compared by distance.
const GRANT_SHIFT: u32 = IN_USE_BITS + 1;
const GRANT_ONE: u64 = 1 << GRANT_SHIFT;
const GRANT_MASK: u64 = u64::MAX >> GRANT_SHIFT;

/// The slots of one capped domain, shared by its shards.
#[repr(align(128))]
pub(super) struct Cap {
    /// Slots in use, `WAITING`, and the grant number.
    state: AtomicU64,
    limit: u64,
    queue: Mutex<Queue>,
}

/// The requests waiting for a slot.
#[derive(Default)]
struct Queue {
    /// In no order: a grant scans them all, and at most one waits per key.
    waiters: Vec<Waiter>,
    next_number: u64,
    /// Waiters not granted a slot yet.
    ungranted: usize,
}

/// A claim's key, as the cap knows it: its shard's address and the key entry's id.
type Identity = (usize, u64);

struct Waiter {
    /// Its lead claim's key: at most one request per key waits, so the key's shard and
    /// entry id name it while it is queued.
    lead: Identity,
    /// Its place in the order of waiting.
    number: u64,
    /// The slots each of its keys holds.
    loads: SmallVec<[(Identity, u32); 1]>,
    /// The latest grant any of its keys had.
    last_grant: Option<u64>,
    /// The grant number of the slot it was granted, until it takes it.
    granted: Option<u64>,
    waker: Option<Waker>,
    /// When it began to wait, for the `slot_granted` event.
    since: trace::WaitStart,
}

/// How asking for a slot ended.
pub(super) enum Taken {
    Slot,
    Queued,
}

impl Cap {
    pub(super) fn new(limit: usize) -> Self {
        Cap {
            state: AtomicU64::new(0),
            limit: limit as u64,
            queue: Mutex::new(Queue::default()),
        }
    }

    /// Requests waiting for a slot, not granted one yet.
    pub(super) fn waiting(&self) -> usize {
        self.lock().ungranted
    }

    /// Slots taken or granted.
    #[cfg(test)]
    pub(super) fn in_use(&self) -> u64 {
        self.state.load(Ordering::Acquire) & IN_USE
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        #[cfg(not(loom))]
        return self.queue.lock();
        #[cfg(loom)]
        return self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }

    /// Takes a free slot if nobody waits for one; returns its grant number.
    fn try_take(&self) -> Option<u64> {
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            if state & WAITING != 0 || state & IN_USE >= self.limit {
                return None;
            }
            let next = state.wrapping_add(1 + GRANT_ONE);
            match self
                .state
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(next >> GRANT_SHIFT),
                Err(actual) => state = actual,
            }
        }
    }

    /// Gives a slot back, if nobody waits for one; false if someone does, and the slot
    /// must be handed on under the lock.
    fn try_give_back(&self) -> bool {
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            if state & WAITING != 0 {
                return false;
            }
            debug_assert!(state & IN_USE > 0, "a slot is given back only once");
            match self.state.compare_exchange_weak(
                state,
                state - 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => state = actual,
            }
        }
    }

    /// Under the lock: takes a free slot for a request that would otherwise wait, or
    /// sets `WAITING` for it. Returns the grant number if it took one.
    fn take_or_wait(&self) -> Option<u64> {
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            let next = if state & WAITING == 0 && state & IN_USE < self.limit {
                state.wrapping_add(1 + GRANT_ONE)
            } else {
                state | WAITING
            };
            match self
                .state
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) if next & WAITING == 0 => return Some(next >> GRANT_SHIFT),
                Ok(_) => return None,
                Err(actual) => state = actual,
            }
        }
    }

    /// Under the lock: hands a slot that its holder gives up to the waiter the rule
    /// picks, or gives it back if nobody waits. Returns the waker of the waiter.
    fn hand_on(&self, queue: &mut Queue) -> Option<Waker> {
        if queue.ungranted == 0 {
            // Nobody waits, so nothing sets the flag until the lock is released.
            self.state.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let now = self
            .state
            .fetch_add(GRANT_ONE, Ordering::AcqRel)
            .wrapping_add(GRANT_ONE)
            >> GRANT_SHIFT;
        let chosen = queue
            .waiters
            .iter_mut()
            .filter(|waiter| waiter.granted.is_none())
            .min_by_key(|waiter| waiter.rank(now))
            .expect("an ungranted waiter is queued");
        chosen.granted = Some(now);
        let waker = chosen.waker.take();
        self.one_fewer_ungranted(queue);
        waker
    }

    /// Under the lock: a waiter was granted a slot or left without one. The flag falls
    /// with the last ungranted waiter.
    fn one_fewer_ungranted(&self, queue: &mut Queue) {
        queue.ungranted -= 1;
        if queue.ungranted == 0 {
            self.state.fetch_and(!WAITING, Ordering::AcqRel);
        }
    }
}

impl Queue {
    /// Takes the waiter at `index` out of the queue; an emptied queue gives back the
    /// memory of a burst.
    fn remove(&mut self, index: usize) -> Waiter {
        let waiter = self.waiters.swap_remove(index);
        if self.waiters.is_empty() && self.waiters.capacity() > RETAINED_WAITERS {
            self.waiters = Vec::new();
        }
        waiter
    }

    /// Where the request led by the claim on key `lead` waits.
    fn position(&self, lead: Identity) -> Option<usize> {
        self.waiters.iter().position(|waiter| waiter.lead == lead)
    }
}

impl Waiter {
    /// The waiter's place in the rule: fewest slots held, then the key granted least
    /// recently (never first), then the longest wait.
    fn rank(&self, now: u64) -> (u32, std::cmp::Reverse<u64>, u64) {
        let slots = self
            .loads
            .iter()
            .map(|&(_, slots)| slots)
            .max()
            .unwrap_or(0);
        let age = self
            .last_grant
            .map_or(u64::MAX, |grant| now.wrapping_sub(grant) & GRANT_MASK);
        (slots, std::cmp::Reverse(age), self.number)
    }
}

/// The latest grant to each live key of a shard that has had one, by the key's hash and
/// entry id. A key's grant is forgotten when its entry is removed.
#[derive(Default)]
pub(super) struct Grants(HashTable<Grant>);

struct Grant {
    hash: u64,
    id: u64,
    number: u64,
}

impl Grants {
    pub(super) fn get(&self, hash: u64, id: u64) -> Option<u64> {
        self.0
            .find(hash, |grant| grant.id == id)
            .map(|grant| grant.number)
    }

    pub(super) fn set(&mut self, hash: u64, id: u64, number: u64) {
        self.0
            .entry(hash, |grant| grant.id == id, |grant| grant.hash)
            .or_insert(Grant { hash, id, number })
            .into_mut()
            .number = number;
    }

    /// Keys with a grant.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn forget(&mut self, hash: u64, id: u64) {
        if self.0.is_empty() {
            return;
        }
        if let Ok(grant) = self.0.find_entry(hash, |grant| grant.id == id) {
            grant.remove();
            if self.0.is_empty() {
                self.0.shrink_to(RETAINED_GRANTS, |grant| grant.hash);
            }
        }
    }
}

/// Room for keys' grants an emptied shard keeps.
const RETAINED_GRANTS: usize = 8;

/// Room for waiters an emptied queue keeps.
const RETAINED_WAITERS: usize = 8;

/// One key of a request asking for a slot: its shard, and its entry there.
struct KeyOf<'a, K> {
    cell: &'a ShardCell<K>,
    hash: u64,
    id: u64,
    bucket: u32,
}

impl<'a, K> KeyOf<'a, K> {
    fn of(claim: &'a Claim<K>) -> Self {
        KeyOf {
            cell: &claim.cell,
            hash: claim.hash,
            id: claim.id,
            bucket: claim.bucket,
        }
    }

    fn identity(&self) -> Identity {
        (std::ptr::from_ref(self.cell) as usize, self.id)
    }
}

/// The identity of a claim's key.
fn identity<K>(claim: &Claim<K>) -> Identity {
    KeyOf::of(claim).identity()
}

/// Asks for a slot for the request whose claims are `lead` and `others` (a
/// `Mode::SyncAll` request's other keys, in shard order), now the head of every key.
/// Takes one, or queues the request with `waker` (none inside `call()`).
pub(super) fn take<K>(lead: &mut Claim<K>, others: &mut [Claim<K>], waker: Option<Waker>) -> Taken {
    let cap = lead.cell.cap();
    let since = trace::now_if_listened();
    let taken = {
        let mut keys: SmallVec<[KeyOf<'_, K>; 4]> = SmallVec::new();
        keys.push(KeyOf::of(lead));
        keys.extend(others.iter().map(KeyOf::of));
        // In ascending shard order, as `claim_all` takes them: the claims are in that
        // order, and keys of one shard share its lock.
        let mut guards: SmallVec<[MutexGuard<'_, Shard<K>>; 4]> = SmallVec::new();
        let mut guard_of: SmallVec<[usize; 4]> = SmallVec::new();
        for (index, key) in keys.iter().enumerate() {
            let shared = index > 0 && std::ptr::eq(keys[index - 1].cell, key.cell);
            if !shared {
                guards.push(key.cell.lock());
            }
            guard_of.push(guards.len() - 1);
        }
        let grant = match cap.try_take() {
            Some(grant) => Some(grant),
            None => {
                let mut loads = SmallVec::new();
                let mut last_grant: Option<u64> = None;
                for (key, &guard) in keys.iter_mut().zip(&guard_of) {
                    let (holders, key_grant) =
                        guards[guard].share(key.hash, key.id, &mut key.bucket);
                    loads.push((key.identity(), holders.saturating_sub(1)));
                    if let Some(grant) = key_grant {
                        last_grant = Some(last_grant.map_or(grant, |last: u64| {
                            // The later of the two, by distance from either.
                            if grant.wrapping_sub(last) & GRANT_MASK < GRANT_MASK / 2 {
                                grant
                            } else {
                                last
                            }
                        }));
                    }
                }
                let mut queue = cap.lock();
                let grant = cap.take_or_wait();
                if grant.is_none() {
                    let number = queue.next_number;
                    queue.next_number += 1;
                    queue.ungranted += 1;
                    let lead = keys[0].identity();
                    debug_assert!(
                        queue.waiters.iter().all(|waiter| waiter.lead != lead),
                        "one waiter per key"
                    );
                    queue.waiters.push(Waiter {
                        lead,
                        number,
                        loads,
                        last_grant,
                        granted: None,
                        waker,
                        since,
                    });
                }
                grant
            }
        };
        for (key, &guard) in keys.iter_mut().zip(&guard_of) {
            let shard = &mut guards[guard];
            match grant {
                Some(grant) => shard.took_slot(key.hash, key.id, &mut key.bucket, grant),
                None => shard.set_slot_waiter(key.hash, key.id, &mut key.bucket, true),
            }
        }
        grant
    };
    match taken {
        Some(_) => {
            mark(lead, others, route::SLOT);
            Taken::Slot
        }
        None => {
            mark(lead, others, route::ENQUEUED);
            Taken::Queued
        }
    }
}

/// Sets `flag` on every claim of a request.
fn mark<K>(lead: &mut Claim<K>, others: &mut [Claim<K>], flag: u8) {
    lead.route |= flag;
    for claim in others {
        claim.route |= flag;
    }
}

/// Resolves once the request of `lead` holds a slot: takes one if it is not queued yet,
/// or takes the one it was granted.
pub(super) fn poll_slot<K>(
    lead: &mut Claim<K>,
    others: &mut [Claim<K>],
    cx: &mut Context<'_>,
) -> Poll<()> {
    if lead.route & route::SLOT != 0 {
        return Poll::Ready(());
    }
    if lead.route & route::ENQUEUED == 0 {
        return match take(lead, others, Some(cx.waker().clone())) {
            Taken::Slot => Poll::Ready(()),
            Taken::Queued => {
                trace::slot_queued(lead.cell.settings.metrics_domain);
                Poll::Pending
            }
        };
    }
    let cap = lead.cell.cap();
    let fresh = cx.waker().clone();
    let mut queue = cap.lock();
    let index = queue
        .position(identity(lead))
        .expect("a queued request is in the queue");
    let waiter = &mut queue.waiters[index];
    if waiter.granted.is_none() {
        let stale = waiter.waker.replace(fresh);
        drop(queue);
        drop(stale);
        return Poll::Pending;
    }
    let waiter = queue.remove(index);
    drop(queue);
    let grant = waiter.granted.expect("granted, as checked above");
    for claim in std::iter::once(&mut *lead).chain(others.iter_mut()) {
        claim
            .cell
            .lock()
            .took_slot(claim.hash, claim.id, &mut claim.bucket, grant);
        claim.route = (claim.route & !route::ENQUEUED) | route::SLOT;
    }
    // The grant was made for this task's waker; the one replaced, if any, goes too.
    drop(LetGo(waiter.waker));
    drop(fresh);
    trace::slot_granted(waiter.since, lead.cell.settings.metrics_domain);
    Poll::Ready(())
}

/// The request of `lead` leaves the queue, dropped while waiting for a slot or before
/// taking the one it was granted; that one goes to the next waiter by the rule. Returns
/// the waker to wake and the one to drop, for the caller to run once the request's other
/// places are given up too.
pub(super) fn withdraw<K>(lead: &Claim<K>) -> (Option<Waker>, Option<Waker>) {
    let cap = lead.cell.cap();
    let mut queue = cap.lock();
    let Some(index) = queue.position(identity(lead)) else {
        return (None, None);
    };
    let waiter = queue.remove(index);
    let wake = if waiter.granted.is_some() {
        cap.hand_on(&mut queue)
    } else {
        cap.one_fewer_ungranted(&mut queue);
        None
    };
    drop(queue);
    (wake, waiter.waker)
}

/// The request of `lead` gives its slot back: to the count if nobody waits, otherwise
/// to the next waiter by the rule.
pub(super) fn give_back<K>(cell: &ShardCell<K>) {
    let cap = cell.cap();
    if cap.try_give_back() {
        return;
    }
    let wake = cap.hand_on(&mut cap.lock());
    if let Some(waker) = wake {
        foreign::run(move || waker.wake());
    }
}

/// A claim whose request held a slot lets go of its key, on which another request waits
/// for a slot: that waiter's count for the key falls by one. Called under the key's
/// shard lock, so the waiter cannot leave the key, nor another take its place, before
/// its count is lowered.
pub(super) fn fell<K>(claim: &Claim<K>) {
    let key = identity(claim);
    let mut queue = claim.cell.cap().lock();
    let load = queue
        .waiters
        .iter_mut()
        .filter(|waiter| waiter.granted.is_none())
        .find_map(|waiter| waiter.loads.iter_mut().find(|(of, _)| *of == key));
    if let Some((_, slots)) = load {
        *slots = slots.saturating_sub(1);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn waiter(number: u64, slots: u32, last_grant: Option<u64>) -> Waiter {
        Waiter {
            lead: (0, number),
            number,
            loads: SmallVec::from_elem(((0, number), slots), 1),
            last_grant,
            granted: None,
            waker: None,
            since: trace::now_if_listened(),
        }
    }

    #[test]
    fn the_rule_orders_by_slots_then_last_grant_then_wait() {
        let now = 100;
        let busy = waiter(0, 1, None);
        let recent = waiter(1, 0, Some(99));
        let older = waiter(2, 0, Some(50));
        let never = waiter(3, 0, None);
        let never_later = waiter(4, 0, None);
        let mut ranked = [&busy, &recent, &older, &never, &never_later];
        ranked.sort_by_key(|waiter| waiter.rank(now));
        let order: Vec<u64> = ranked.iter().map(|waiter| waiter.number).collect();
        assert_eq!(order, [3, 4, 2, 1, 0]);
    }

    #[test]
    fn grant_numbers_are_compared_across_their_wrap() {
        // Granted just before the number wrapped, against just after: the earlier grant
        // is the older one.
        let now = 5;
        let before_wrap = waiter(0, 0, Some(GRANT_MASK - 2));
        let after_wrap = waiter(1, 0, Some(2));
        assert!(before_wrap.rank(now) < after_wrap.rank(now));
    }

    #[test]
    fn the_state_word_counts_slots_and_stops_taking_while_someone_waits() {
        let cap = Cap::new(2);
        let first = cap.try_take().expect("a free slot");
        let second = cap.try_take().expect("a free slot");
        assert_eq!(second, first + 1, "every grant takes the next number");
        assert_eq!(cap.try_take(), None, "both slots are taken");
        assert_eq!(cap.in_use(), 2);
        // A request that has to wait sets the flag: a slot given back is then handed on
        // under the lock, and nobody takes one through the word.
        assert_eq!(cap.take_or_wait(), None);
        assert!(!cap.try_give_back());
        assert_eq!(cap.in_use(), 2);
        let mut queue = Queue::default();
        assert!(cap.hand_on(&mut queue).is_none(), "nobody was queued");
        assert_eq!(cap.in_use(), 1);
        cap.state.fetch_and(!WAITING, Ordering::AcqRel);
        assert!(cap.try_give_back());
        assert_eq!(cap.in_use(), 0);
    }

    #[test]
    fn a_slot_handed_on_goes_to_the_waiter_the_rule_picks_and_stays_in_use() {
        let cap = Cap::new(1);
        assert!(cap.try_take().is_some());
        let mut queue = Queue::default();
        for waiter in [waiter(0, 0, Some(1)), waiter(1, 0, None)] {
            assert_eq!(cap.take_or_wait(), None);
            queue.waiters.push(waiter);
            queue.ungranted += 1;
        }
        assert!(cap.hand_on(&mut queue).is_none(), "no waker was stored");
        assert_eq!(cap.in_use(), 1, "the slot passed on, not back");
        let granted: Vec<u64> = queue
            .waiters
            .iter()
            .filter(|waiter| waiter.granted.is_some())
            .map(|waiter| waiter.number)
            .collect();
        assert_eq!(granted, [1], "the key never granted a slot goes first");
        assert_eq!(queue.ungranted, 1);
        assert_ne!(cap.state.load(Ordering::Acquire) & WAITING, 0);
        assert!(cap.hand_on(&mut queue).is_none());
        assert_eq!(queue.ungranted, 0);
        assert_eq!(
            cap.state.load(Ordering::Acquire) & WAITING,
            0,
            "the flag falls with the last ungranted waiter"
        );
    }
}
