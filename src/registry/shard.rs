//! One shard of the registry: the live keys that hash to it, and their lines.
//!
//! Everything here runs under the shard's lock, and none of it blocks. The only foreign
//! code it runs is `K: Eq` while looking a key up, which happens before anything is
//! changed. Keys, wakers to wake and wakers to drop are handed back to the caller, which
//! lets go of them after the lock is released ([`Deferred`]). See the parent module for
//! the algorithm and its invariants.

use std::task::Waker;

use super::cap::Grants;
use super::foreign::{self, LetGo};
use super::keys::{Entry, Keys};
use super::line::{Line, Polled};
use super::settings::Settings;
use crate::error::{Limit, Overloaded};
use crate::sync::{Arc, AtomicUsize, Ordering};

/// Table capacity a shard keeps, whatever happens: enough for the few keys a shard holds
/// at a time under light traffic, so that they come and go without reallocating.
const RETAINED_KEYS: usize = 7;

/// Spare lines a shard keeps when it empties after a burst far beyond `RETAINED_KEYS`
/// keys: as few as steady traffic on a handful of keys needs.
const RETAINED_LINES: usize = 1;

/// How fast `demand` forgets a peak: by 1/64 on each key removal.
const DEMAND_DECAY_SHIFT: u32 = 6;

/// `demand` is kept in 1/256ths of a key, so that its decay works on small counts too.
const DEMAND_ONE: u32 = 256;

/// The state of every live key that hashes to this shard.
///
/// In a fixed order: the id counter and the first of the key slots come right after the
/// lock, in its cache line, so that a request on a key of an otherwise idle shard writes
/// that line and no other of the shard's.
// PERF: two_workers, random keys, foldhash (registry Performance: the lines a request
// writes).
#[repr(C)]
pub(super) struct Shard<K> {
    /// Identifies a key's entry for the lifetime of that entry. A claim finds its entry
    /// again by `(hash, id)`, so releasing never compares keys, and a claim can never
    /// touch a later entry for the same key.
    next_id: u64,
    keys: Keys<KeyState<K>>,
    /// The recent peak of live keys, decaying with each removal (in `DEMAND_ONE`ths).
    /// The table shrinks only when it is far larger than this, so that a steady load that
    /// swings between a few and a few dozen keys does not reallocate back and forth.
    demand: u32,
    /// What the domain's limits keep here; `None` in a domain without `max_keys` and
    /// `max_in_flight`.
    limits: Option<Box<Limits>>,
    /// Empty lines kept from keys that went idle, for the next keys that need one; never
    /// more than the table has room for keys (see `Shard::keep_line`). Boxed because a
    /// line moves between this list and a key's entry, which holds it boxed.
    #[expect(
        clippy::vec_box,
        reason = "lines move to and from `KeyState::line` as boxes"
    )]
    spare_lines: Vec<Box<Line>>,
}

/// What a domain's limits keep in each of its shards, behind one pointer that is tested
/// once as a key's entry is made and once as it is removed: a domain with neither limit
/// pays one test for both.
pub(super) struct Limits {
    /// Live keys across every shard of the domain, against `max_keys`.
    budget: Option<Arc<KeyBudget>>,
    /// The latest grant of the domain's cap (`max_in_flight`) to each live key of the
    /// shard that has had one.
    grants: Grants,
}

/// One live key.
struct KeyState<K> {
    key: K,
    hash: u64,
    id: u64,
    /// Claims holding one of the key's permits: running, the unstarted head, and the
    /// line's front waiter once it has been granted one (invariant 2).
    holders: u32,
    /// A claim holds a permit, comes before every claim in the line, and has not called
    /// the inner service yet. No one in the line may start before it does.
    head_unstarted: bool,
    /// The unstarted head waits for a slot of the domain's cap: it counts against
    /// `max_queue_per_key`.
    slot_waiter: bool,
    /// Claims that have not left the line yet; `None` until the key first has one.
    line: Option<Box<Line>>,
}

/// Live keys across the shards of one domain, when `max_keys` is set. Taken when a key's
/// entry is created and given back when it is removed, both by the shard that holds the
/// entry, under its lock, so that the count never runs ahead of the entries.
pub(super) struct KeyBudget {
    live: AtomicUsize,
    max: usize,
}

/// Where a new claim stands, and how to find its entry again.
#[derive(Debug, Clone, Copy)]
pub(super) struct Place {
    pub(super) id: u64,
    pub(super) bucket: u32,
    pub(super) position: Position,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Position {
    /// Holds a permit and every earlier claim has started: it may start now.
    Head,
    /// In the line with `ticket`; `depth` claims of its key are queued (in the line
    /// without a permit), itself included.
    Waiting { ticket: u64, depth: u32 },
}

/// What a claim gives back when it leaves.
#[derive(Debug, Clone, Copy)]
pub(super) enum Leaving {
    /// It held a permit. `was_head` if it was still marked as the unstarted head.
    Permit { was_head: bool },
    /// It was still in the line.
    Line { ticket: u64 },
}

/// What a shard operation leaves for after the lock is released, so that no executor
/// code and no key's `Drop` runs under the lock. [`Deferred::run`] wakes first: if
/// dropping something then panics, no hand-off has been lost.
#[must_use = "run it once the shard's lock is released"]
pub(super) struct Deferred<K> {
    wake: Option<Waker>,
    stale: Option<Waker>,
    removed_key: Option<K>,
}

impl<K> Deferred<K> {
    /// Runs from a claim's `Drop` too, possibly while a panic unwinds, so every step goes
    /// through [`foreign`]: a panic of one lets the others run, and none aborts the
    /// process.
    // PERF: layer_sync_live_key, hand_off_layer (registry Performance: separate guards,
    // inlined).
    #[inline(always)]
    pub(super) fn run(self) {
        let Deferred {
            wake,
            stale,
            removed_key,
        } = self;
        // Guarded before the wake, so that a panic in it still lets go of them.
        // PERF: hand_off_layer (registry Performance: separate guards).
        let removed_key = LetGo(removed_key);
        let stale = LetGo(stale);
        if let Some(waker) = wake {
            foreign::run(move || waker.wake());
        }
        drop(stale);
        drop(removed_key);
    }
}

impl Limits {
    /// The entry of key `(hash, id)` has been removed.
    fn removed(&mut self, hash: u64, id: u64) {
        if let Some(budget) = &self.budget {
            budget.give_back();
        }
        self.grants.forget(hash, id);
    }
}

impl KeyBudget {
    pub(super) fn new(max: usize) -> Self {
        KeyBudget {
            live: AtomicUsize::new(0),
            max,
        }
    }

    fn try_take(&self) -> bool {
        self.live
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |live| {
                (live < self.max).then_some(live + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<K> Shard<K> {
    /// A shard of a domain with a `max_keys` `budget`, if any, and a cap, if `capped`.
    pub(super) fn new(budget: Option<Arc<KeyBudget>>, capped: bool) -> Self {
        let limits = (budget.is_some() || capped).then(|| {
            Box::new(Limits {
                budget,
                grants: Grants::default(),
            })
        });
        Shard {
            keys: Keys::new(),
            next_id: 0,
            demand: 0,
            limits,
            spare_lines: Vec::new(),
        }
    }

    /// Takes a place for `key` in call order, or rejects the request.
    ///
    /// `key` is handed back when the shard does not keep it (its key was live already,
    /// or the request was rejected), for the caller to drop after the lock is released.
    // PERF: layer_sync_new_key, layer_sync_live_key (see the module's Performance section).
    #[inline(always)]
    pub(super) fn claim(
        &mut self,
        settings: &Settings,
        hash: u64,
        key: K,
    ) -> (Result<Place, Overloaded>, Option<K>)
    where
        K: Eq,
    {
        // `K::eq` runs here, before anything is changed; growing the table for the
        // insertion below is not a change any claim owns.
        if let Some((state, bucket)) = self.keys.find(hash, |state| state.key == key) {
            let place = state
                .join(settings, &mut self.spare_lines)
                .map(|position| Place {
                    id: state.id,
                    bucket,
                    position,
                });
            return (place, Some(key));
        }
        if let Some(budget) = self
            .limits
            .as_ref()
            .and_then(|limits| limits.budget.as_ref())
        {
            if !budget.try_take() {
                return (Err(Overloaded::new(Limit::MaxKeys)), Some(key));
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let (_, bucket) = self.keys.insert(KeyState {
            key,
            hash,
            id,
            holders: 1,
            head_unstarted: true,
            slot_waiter: false,
            line: None,
        });
        let place = Place {
            id,
            bucket,
            position: Position::Head,
        };
        (Ok(place), None)
    }

    /// Polls the waiting claim `(hash, id)` with `ticket`; see [`Line::poll`]. When its
    /// turn has come, it becomes the unstarted head.
    pub(super) fn poll_head(
        &mut self,
        hash: u64,
        id: u64,
        bucket: &mut u32,
        ticket: u64,
        fresh: &mut Option<Waker>,
        current: &Waker,
    ) -> Polled {
        let state = self.state_mut(hash, id, bucket);
        let head_unstarted = state.head_unstarted;
        let polled = state
            .line_mut()
            .poll(ticket, head_unstarted, fresh, current);
        if let Polled::Head(..) = polled {
            state.head_unstarted = true;
        }
        polled
    }

    /// The unstarted head has called the inner service: the next claim may start.
    pub(super) fn start(
        &mut self,
        settings: &Settings,
        hash: u64,
        id: u64,
        bucket: &mut u32,
    ) -> Deferred<K> {
        let permits = settings.permits_per_key;
        let state = self.state_mut(hash, id, bucket);
        state.head_unstarted = false;
        let wake = state.pass_on(permits);
        Deferred {
            wake,
            stale: None,
            removed_key: None,
        }
    }

    /// The release of a claim that holds its key alone, with nobody in line: when its
    /// entry is where `bucket` says, removes it and hands the key back. `None` when the
    /// claim must [`leave`](Self::leave) instead.
    // PERF: layer_sync_new_key (registry Performance: the uncontended release).
    #[inline(always)]
    pub(super) fn leave_alone(&mut self, id: u64, bucket: u32) -> Option<K> {
        let state = self.keys.take_if(bucket, id, |state| {
            state.holders == 1 && state.line.is_none()
        })?;
        Some(self.removed(state))
    }

    /// A claim finished or was dropped: gives back what it held, passes a free permit on
    /// to the next claim in call order, and removes the key's entry if nothing holds or
    /// waits for it.
    #[inline]
    pub(super) fn leave(
        &mut self,
        settings: &Settings,
        hash: u64,
        id: u64,
        bucket: &mut u32,
        leaving: Leaving,
    ) -> Deferred<K> {
        let permits = settings.permits_per_key;
        let state = self.keys.get_mut(hash, id, bucket);
        let stale = match leaving {
            Leaving::Permit { was_head } => {
                state.holders -= 1;
                if was_head {
                    state.head_unstarted = false;
                }
                None
            }
            Leaving::Line { ticket } => {
                let (granted, waker) = state.line_mut().leave(ticket);
                if granted {
                    state.holders -= 1;
                }
                waker
            }
        };
        if let Some(wake) = state.pass_on(permits) {
            return Deferred {
                wake: Some(wake),
                stale,
                removed_key: None,
            };
        }
        if state.holders > 0 || state.line.as_ref().is_some_and(|line| !line.is_empty()) {
            return Deferred {
                wake: None,
                stale,
                removed_key: None,
            };
        }
        // Idle: the entry goes in the same critical section (invariant 4).
        let state = self.keys.remove(*bucket);
        Deferred {
            wake: None,
            stale,
            removed_key: Some(self.removed(state)),
        }
    }

    /// The entry of a key that went idle has been removed: gives back its place in the
    /// key budget, forgets its grant, keeps its line, and lets the table shrink. Returns
    /// the key, to let go of once the lock is released.
    #[inline]
    fn removed(&mut self, state: KeyState<K>) -> K {
        if let Some(limits) = &mut self.limits {
            limits.removed(state.hash, state.id);
        }
        if let Some(line) = state.line {
            self.keep_line(line);
        }
        if self.keys.table().capacity() > RETAINED_KEYS {
            self.after_removal();
        }
        state.key
    }

    /// What the cap's rule reads of the live key `(hash, id)`: the claims holding its
    /// permits, and the key's latest grant.
    pub(super) fn share(&mut self, hash: u64, id: u64, bucket: &mut u32) -> (u32, Option<u64>) {
        let holders = self.state_mut(hash, id, bucket).holders;
        (holders, self.limits().grants.get(hash, id))
    }

    /// A request took a slot with number `grant` as the live key `(hash, id)`'s unstarted
    /// head: the key's latest grant, and nobody waits for a slot on it any more.
    pub(super) fn took_slot(&mut self, hash: u64, id: u64, bucket: &mut u32, grant: u64) {
        self.state_mut(hash, id, bucket).slot_waiter = false;
        self.limits_mut().grants.set(hash, id, grant);
    }

    /// Whether the unstarted head of the live key `(hash, id)` waits for a slot.
    pub(super) fn has_slot_waiter(&mut self, hash: u64, id: u64, bucket: &mut u32) -> bool {
        self.state_mut(hash, id, bucket).slot_waiter
    }

    /// Marks whether the unstarted head of the live key `(hash, id)` waits for a slot.
    pub(super) fn set_slot_waiter(&mut self, hash: u64, id: u64, bucket: &mut u32, waits: bool) {
        self.state_mut(hash, id, bucket).slot_waiter = waits;
    }

    /// The shard's limits; only a capped domain's claims ask for them.
    fn limits(&self) -> &Limits {
        self.limits
            .as_deref()
            .expect("a capped domain's shard keeps limits")
    }

    fn limits_mut(&mut self) -> &mut Limits {
        self.limits
            .as_deref_mut()
            .expect("a capped domain's shard keeps limits")
    }

    /// Number of live keys, claims holding a permit and claims waiting for one.
    pub(super) fn counts(&self) -> (usize, usize, usize) {
        self.keys.iter().fold(
            (self.keys.len(), 0, 0),
            |(keys, holding, waiting), state| {
                let queued = state.line.as_ref().map_or(0, |line| line.waiting());
                (
                    keys,
                    holding + state.holders as usize,
                    waiting + queued as usize,
                )
            },
        )
    }

    /// The most claims waiting for their turn on one of the shard's keys.
    #[cfg(feature = "metrics")]
    pub(super) fn deepest_queue(&self) -> usize {
        self.keys
            .iter()
            .map(|state| {
                state
                    .line
                    .as_ref()
                    .map_or(0, |line| line.waiting() as usize)
            })
            .max()
            .unwrap_or(0)
    }

    /// Gives table memory back after a burst, with hysteresis: the table shrinks only
    /// when it is eight times larger than the recent peak of live keys, to twice that
    /// peak, and back to `RETAINED_KEYS` when the shard empties while its table has room
    /// for more than four times that many. A load that swings within those bounds never
    /// reallocates. The spare lines follow: never more than the shard has room for keys,
    /// and one once the shard has emptied that way. A table of `RETAINED_KEYS` never shrinks, so this
    /// runs only for larger ones.
    fn after_removal(&mut self) {
        let len = self.keys.len();
        let before = u32::try_from(len + 1).unwrap_or(u32::MAX >> 8);
        let table = self.keys.table();
        self.demand -= self.demand >> DEMAND_DECAY_SHIFT;
        self.demand = self
            .demand
            .max(before.saturating_mul(DEMAND_ONE).min(u32::MAX >> 1));
        let capacity = table.capacity();
        let (target, lines) = if len == 0 && capacity > 4 * RETAINED_KEYS {
            (RETAINED_KEYS, RETAINED_LINES)
        } else {
            let demand = self.demand.div_ceil(DEMAND_ONE) as usize;
            if capacity < 8 * demand {
                return;
            }
            let target = (2 * demand).max(RETAINED_KEYS);
            (target, target)
        };
        table.shrink_to(target, |state| state.hash);
        let lines = lines.min(self.keys.room());
        if self.spare_lines.len() > lines {
            self.spare_lines.truncate(lines);
            self.spare_lines.shrink_to_fit();
        }
    }

    /// Keeps the empty line of a key that went idle for the next key that needs one,
    /// while the shard keeps fewer spare lines than its table has room for keys: then a
    /// load that makes the same number of keys queue again and again finds their lines
    /// ready, and what an idle shard keeps is bounded by what its table keeps.
    fn keep_line(&mut self, mut line: Box<Line>) {
        if self.spare_lines.len() < self.keys.room() {
            line.recycle();
            self.spare_lines.push(line);
        }
    }

    // PERF: layer_sync_live_key, hand_off_layer (registry Performance: the line's steps are
    // inlined).
    #[inline]
    fn state_mut(&mut self, hash: u64, id: u64, bucket: &mut u32) -> &mut KeyState<K> {
        self.keys.get_mut(hash, id, bucket)
    }
}

impl<K> Entry for KeyState<K> {
    #[inline]
    fn hash(&self) -> u64 {
        self.hash
    }

    #[inline]
    fn id(&self) -> u64 {
        self.id
    }
}

impl<K> KeyState<K> {
    /// A claim for a key that is live already: it becomes the head if the key is free,
    /// and joins the line otherwise, or is rejected when the line is full.
    #[expect(
        clippy::vec_box,
        reason = "the shard's spare lines, see `Shard::spare_lines`"
    )]
    fn join(
        &mut self,
        settings: &Settings,
        spare_lines: &mut Vec<Box<Line>>,
    ) -> Result<Position, Overloaded> {
        let (line_empty, waiting) = self
            .line
            .as_ref()
            .map_or((true, 0), |line| (line.is_empty(), line.waiting()));
        if line_empty && !self.head_unstarted && self.holders < settings.permits_per_key {
            self.holders += 1;
            self.head_unstarted = true;
            return Ok(Position::Head);
        }
        // It cannot start now, so it waits for its turn, without a permit (invariant 2).
        if waiting as usize + usize::from(self.slot_waiter) >= settings.max_queue_per_key {
            // Nothing has been changed, so rejecting leaves nothing behind.
            return Err(Overloaded::new(Limit::MaxQueuePerKey));
        }
        let line = self
            .line
            .get_or_insert_with(|| spare_lines.pop().unwrap_or_default());
        let ticket = line.push();
        Ok(Position::Waiting {
            ticket,
            depth: line.waiting(),
        })
    }

    /// Grants a free permit to the front of the line if it may start now (no claim is the
    /// unstarted head, and no waiter holds a permit already), and returns the waker of a
    /// front waiter that holds one: it is woken to start.
    fn pass_on(&mut self, permits: u32) -> Option<Waker> {
        let line = self.line.as_mut()?;
        if self.head_unstarted {
            return None;
        }
        line.grant_front(&mut self.holders, permits);
        line.startable()
    }

    fn line_mut(&mut self) -> &mut Line {
        self.line
            .as_mut()
            .expect("a waiting claim's key has a line")
    }
}

#[cfg(test)]
mod tests;
