//! One shard of the registry: the keys that hash to it and their waiting lines.
//!
//! Everything here runs under the shard's lock and none of it blocks. The only foreign
//! code it runs is `K: Eq` during a lookup (which changes nothing) and the drop of a key
//! that a rejected or redundant `call()` brought. Wakers are woken and dropped, and
//! removed keys dropped, by the caller after the lock is released: see [`Deferred`].
//! See the parent module for the algorithm and its invariants.

use std::task::{Context, Poll, Waker};

use hashbrown::{HashTable, hash_table};
use slab::Slab;

use crate::error::{Limit, Overloaded};

/// The end of a line, or "no waiter".
const NIL: u32 = u32::MAX;

/// Table capacity a shard keeps when it empties, so that a steady trickle of requests
/// does not allocate on every call. Small on purpose: idle keys should cost (almost)
/// nothing.
const RETAINED_KEYS: usize = 3;

/// Waiter slots a shard keeps when its last waiter leaves, for the same reason.
const RETAINED_WAITERS: usize = 4;

/// The state of every live key that hashes to this shard.
///
/// `repr(C)` keeps what every request writes (the lock word before it, the table's
/// header, `next_id`, `in_flight`) on one cache line, apart from the waiter slab that
/// only contended keys touch and the limits every request reads.
#[repr(C)]
pub(super) struct Shard<K> {
    keys: HashTable<KeyState<K>>,
    /// Identifies a key's entry for the lifetime of that entry. A claim finds its entry
    /// again by `(hash, id)`, so releasing never compares keys, and a claim can never
    /// touch a later entry for the same key.
    next_id: u64,
    lines: Lines,
}

/// The waiting lines of a shard's keys, and its counts. Kept apart from the key table
/// so that both can be borrowed at once.
#[repr(C)]
struct Lines {
    /// Sum of `holders` over this shard's keys.
    in_flight: usize,
    /// Sum of `queued` over this shard's keys.
    queued: usize,
    /// Nodes of every line in this shard. A waiter's index is stable for its lifetime,
    /// which gives O(1) removal when a queued request is dropped.
    waiters: Slab<Waiter>,
}

/// One live key.
struct KeyState<K> {
    key: K,
    hash: u64,
    id: u64,
    /// Claims holding one of the key's permits, started or not.
    holders: u32,
    /// Claims in the line that wait for a permit.
    queued: u32,
    /// A claim holds a permit, comes before every claim in the line, and has not called
    /// the inner service yet. No one in the line may start before it does.
    head_unstarted: bool,
    /// The line: claims that have not started, in call order (after the unstarted head).
    head: u32,
    tail: u32,
    /// The first waiter in the line without a permit; every waiter before it has one.
    next_grant: u32,
}

/// A claim's node in its key's line.
struct Waiter {
    prev: u32,
    next: u32,
    /// Holds one of the key's permits. Granted waiters form a prefix of the line.
    granted: bool,
    waker: Option<Waker>,
}

/// The limits a shard enforces when a claim is taken.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub(super) permits: u32,
    pub(super) max_queue: usize,
}

/// Where a new claim stands after `Shard::claim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Position {
    /// It holds a permit and every earlier claim on the key has started: it may start now.
    Head,
    /// It waits in the line at `node`; `depth` requests of its key (itself included)
    /// now wait for a permit.
    Waiting { node: u32, depth: u32 },
}

/// What a shard operation leaves for after the lock is released, so that no executor
/// code (waking or dropping a waker) and no key's `Drop` runs under the lock.
#[must_use = "run it once the shard's lock is released"]
pub(super) struct Deferred<K> {
    /// A claim that may start now.
    pub(super) wake: Option<Waker>,
    /// The key of an entry that went idle and was removed.
    pub(super) removed_key: Option<K>,
    /// A waker that was replaced or whose waiter left the line.
    stale: Option<Waker>,
}

impl<K> Deferred<K> {
    fn new(wake: Option<Waker>, removed_key: Option<K>, stale: Option<Waker>) -> Self {
        Deferred {
            wake,
            removed_key,
            stale,
        }
    }

    pub(super) fn run(self) {
        drop(self.removed_key);
        drop(self.stale);
        if let Some(waker) = self.wake {
            waker.wake();
        }
    }
}

impl<K> Default for Shard<K> {
    fn default() -> Self {
        Shard {
            keys: HashTable::new(),
            next_id: 0,
            lines: Lines {
                in_flight: 0,
                queued: 0,
                waiters: Slab::new(),
            },
        }
    }
}

impl<K> Shard<K> {
    /// Takes a place for `key` in call order, or rejects the request.
    ///
    /// `admit_new_key` is asked before a key entry is created, and only then; it enforces
    /// `max_keys` across all shards.
    pub(super) fn claim(
        &mut self,
        hash: u64,
        key: K,
        limits: Limits,
        admit_new_key: impl FnOnce() -> Result<(), Overloaded>,
    ) -> Result<(u64, Position), Overloaded>
    where
        K: Eq,
    {
        let entry = match self
            .keys
            .entry(hash, |state| state.key == key, |state| state.hash)
        {
            hash_table::Entry::Occupied(occupied) => occupied.into_mut(),
            hash_table::Entry::Vacant(vacant) => {
                admit_new_key()?;
                let id = self.next_id;
                self.next_id += 1;
                vacant.insert(KeyState::new(key, hash, id)).into_mut()
            }
        };

        if entry.head == NIL && !entry.head_unstarted && entry.holders < limits.permits {
            entry.holders += 1;
            entry.head_unstarted = true;
            self.lines.in_flight += 1;
            return Ok((entry.id, Position::Head));
        }

        let granted = entry.holders < limits.permits;
        if !granted && entry.queued as usize >= limits.max_queue {
            // The entry existed before this call (a new one takes the branch above), so
            // rejecting leaves nothing behind.
            return Err(Overloaded::new(Limit::MaxQueuePerKey));
        }

        let lines = &mut self.lines;
        let node = index(lines.waiters.insert(Waiter {
            prev: entry.tail,
            next: NIL,
            granted,
            waker: None,
        }));
        if entry.tail == NIL {
            entry.head = node;
        } else {
            lines.waiters[entry.tail as usize].next = node;
        }
        entry.tail = node;
        if granted {
            // Only granted waiters are in the line (invariant 2), so the prefix stays whole.
            entry.holders += 1;
            lines.in_flight += 1;
        } else {
            entry.queued += 1;
            lines.queued += 1;
            if entry.next_grant == NIL {
                entry.next_grant = node;
            }
        }
        let depth = entry.queued;
        Ok((entry.id, Position::Waiting { node, depth }))
    }

    /// Checks whether the waiter at `node` may start; if so it leaves the line and
    /// becomes the unstarted head. Otherwise its waker is stored for the hand-off.
    ///
    /// Also returns the waker it no longer needs, for the caller to drop after unlocking.
    pub(super) fn poll_turn(
        &mut self,
        hash: u64,
        id: u64,
        node: u32,
        cx: &mut Context<'_>,
    ) -> (Poll<()>, Option<Waker>) {
        let entry = find(&mut self.keys, hash, id);
        let waiter = &mut self.lines.waiters[node as usize];
        if waiter.granted && entry.head == node && !entry.head_unstarted {
            let waiter = entry.unlink(&mut self.lines.waiters, node);
            entry.head_unstarted = true;
            self.lines.shrink_waiters();
            return (Poll::Ready(()), waiter.waker);
        }
        let stale = match &waiter.waker {
            Some(waker) if waker.will_wake(cx.waker()) => None,
            _ => waiter.waker.replace(cx.waker().clone()),
        };
        (Poll::Pending, stale)
    }

    /// The unstarted head has called the inner service: the next claim may start.
    pub(super) fn start(&mut self, hash: u64, id: u64) -> Deferred<K> {
        let entry = find(&mut self.keys, hash, id);
        entry.head_unstarted = false;
        Deferred::new(entry.startable_head(&mut self.lines.waiters), None, None)
    }

    /// A claim holding a permit finished or was dropped. `was_head` says whether it was
    /// still marked as the unstarted head.
    pub(super) fn release(
        &mut self,
        hash: u64,
        id: u64,
        was_head: bool,
        limits: Limits,
    ) -> Deferred<K> {
        let mut occupied = find_entry(&mut self.keys, hash, id);
        let entry = occupied.get_mut();
        entry.holders -= 1;
        self.lines.in_flight -= 1;
        if was_head {
            entry.head_unstarted = false;
        }
        let waker = self.lines.pass_on(entry, limits);
        let removed = remove_if_idle(occupied);
        if removed.is_some() {
            self.shrink_keys();
        }
        Deferred::new(waker, removed, None)
    }

    /// A claim still in the line was dropped, granted or not.
    pub(super) fn abandon(&mut self, hash: u64, id: u64, node: u32, limits: Limits) -> Deferred<K> {
        let mut occupied = find_entry(&mut self.keys, hash, id);
        let entry = occupied.get_mut();
        let waiter = entry.unlink(&mut self.lines.waiters, node);
        if waiter.granted {
            entry.holders -= 1;
            self.lines.in_flight -= 1;
        } else {
            entry.queued -= 1;
            self.lines.queued -= 1;
        }
        let waker = self.lines.pass_on(entry, limits);
        self.lines.shrink_waiters();
        let removed = remove_if_idle(occupied);
        if removed.is_some() {
            self.shrink_keys();
        }
        Deferred::new(waker, removed, waiter.waker)
    }

    /// Number of live keys, claims holding a permit and claims waiting for one.
    pub(super) fn counts(&self) -> (usize, usize, usize) {
        (self.keys.len(), self.lines.in_flight, self.lines.queued)
    }

    /// Returns table memory after a burst. Shrinking only once the table is a quarter
    /// full keeps a key count that hovers around one size from reallocating each call.
    #[inline]
    fn shrink_keys(&mut self) {
        let capacity = self.keys.capacity();
        if capacity > RETAINED_KEYS && self.keys.len() * 4 <= capacity {
            let target = (self.keys.len() * 2).max(RETAINED_KEYS);
            self.keys.shrink_to(target, |state| state.hash);
        }
    }
}

impl Lines {
    /// Hands free permits to waiters in call order. Returns the waker of a claim that
    /// may now start.
    fn pass_on<K>(&mut self, entry: &mut KeyState<K>, limits: Limits) -> Option<Waker> {
        let granted = entry.grant(&mut self.waiters, limits.permits);
        self.in_flight += granted as usize;
        self.queued -= granted as usize;
        entry.startable_head(&mut self.waiters)
    }

    /// Returns waiter memory once the shard's lines are empty. Slab indices are held by
    /// live claims, so the slab can only be reset, not compacted, and only when empty.
    fn shrink_waiters(&mut self) {
        if self.waiters.is_empty() && self.waiters.capacity() > RETAINED_WAITERS {
            self.waiters = Slab::with_capacity(RETAINED_WAITERS);
        }
    }
}

impl<K> KeyState<K> {
    fn new(key: K, hash: u64, id: u64) -> Self {
        KeyState {
            key,
            hash,
            id,
            holders: 0,
            queued: 0,
            head_unstarted: false,
            head: NIL,
            tail: NIL,
            next_grant: NIL,
        }
    }

    /// Gives free permits to the waiters at the front of the ungranted part of the line.
    fn grant(&mut self, waiters: &mut Slab<Waiter>, permits: u32) -> u32 {
        let mut granted = 0;
        while self.holders < permits && self.next_grant != NIL {
            let waiter = &mut waiters[self.next_grant as usize];
            waiter.granted = true;
            self.holders += 1;
            self.queued -= 1;
            granted += 1;
            self.next_grant = waiter.next;
        }
        granted
    }

    /// The waker of the line's first waiter, if it may start now.
    ///
    /// The waker is taken, not cloned: the waiter is woken once, and re-registers if its
    /// poll finds it cannot start after all.
    fn startable_head(&mut self, waiters: &mut Slab<Waiter>) -> Option<Waker> {
        if self.head_unstarted || self.head == NIL {
            return None;
        }
        let waiter = &mut waiters[self.head as usize];
        if waiter.granted {
            waiter.waker.take()
        } else {
            None
        }
    }

    /// Removes `node` from the line and frees its slot.
    fn unlink(&mut self, waiters: &mut Slab<Waiter>, node: u32) -> Waiter {
        let waiter = waiters.remove(node as usize);
        if waiter.prev == NIL {
            self.head = waiter.next;
        } else {
            waiters[waiter.prev as usize].next = waiter.next;
        }
        if waiter.next == NIL {
            self.tail = waiter.prev;
        } else {
            waiters[waiter.next as usize].prev = waiter.prev;
        }
        if self.next_grant == node {
            self.next_grant = waiter.next;
        }
        waiter
    }
}

/// The entry a live claim refers to. It exists for as long as the claim does (invariant 4).
fn find<K>(keys: &mut HashTable<KeyState<K>>, hash: u64, id: u64) -> &mut KeyState<K> {
    keys.find_mut(hash, |state| state.id == id)
        .expect("a live claim's key entry is present")
}

/// Removes the entry if nothing holds or waits for its key any more (invariant 4).
/// The removed key is handed back, to be dropped after the lock is released.
fn remove_if_idle<K>(occupied: hash_table::OccupiedEntry<'_, KeyState<K>>) -> Option<K> {
    let entry = occupied.get();
    if entry.holders > 0 || entry.head != NIL {
        return None;
    }
    Some(occupied.remove().0.key)
}

/// Like [`find`], keeping the table borrowed so the entry can be removed.
fn find_entry<K>(
    keys: &mut HashTable<KeyState<K>>,
    hash: u64,
    id: u64,
) -> hash_table::OccupiedEntry<'_, KeyState<K>> {
    keys.find_entry(hash, |state| state.id == id)
        .ok()
        .expect("a live claim's key entry is present")
}

fn index(slot: usize) -> u32 {
    u32::try_from(slot)
        .ok()
        .filter(|&slot| slot != NIL)
        .expect("fewer than u32::MAX waiters in one shard")
}
