//! One key's waiting line: the requests that have not called the inner service yet, in
//! call order.
//!
//! # Layout
//!
//! The line is a `VecDeque` of waiters sorted by *ticket*, a number the line hands out
//! in call order. A claim remembers its ticket, not a position, so the line is free to
//! move waiters in memory: it compacts and shrinks while requests are still waiting,
//! and its memory follows the number of live waiters, not the longest line it ever had.
//!
//! A waiter whose request is dropped in the middle of the line is marked [`Status::Gone`]
//! and left in place, so leaving is O(1) and the tickets after it keep their positions.
//! Gone waiters are popped as soon as they reach the front, and the line is compacted
//! once they outnumber the live ones, which keeps the cost amortized O(1) per waiter and
//! the memory proportional to the live waiters.
//!
//! # Invariants
//!
//! 1. Tickets increase from front to back.
//! 2. The front waiter, if any, is live (never `Gone`).
//! 3. At most one waiter holds a permit (`Granted`), and it is the front one: a permit is
//!    granted only to the waiter that may start next.
//! 4. When some live waiter has no permit, `first_waiting` is the ticket of the first one.
//!
//! Finding a waiter is O(1) while no waiter in front of it has been compacted away (its
//! index is its ticket minus the front's), and a binary search otherwise.

use std::collections::VecDeque;
use std::task::Waker;

use crate::trace::{self, WaitStart};

/// Waiter slots a line keeps: it never shrinks below this, so that a key with a few
/// waiters at a time does not reallocate.
const RETAINED_WAITERS: usize = 8;

/// Waiters of one key that have not called the inner service yet, in call order.
#[derive(Debug, Default)]
pub(super) struct Line {
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
    /// Waiters whose request is still there.
    live: u32,
    /// Live waiters that hold a permit: 0, or 1 for the front one.
    granted: u32,
    /// The ticket of the first live waiter without a permit, when there is one.
    first_waiting: u64,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    status: Status,
    waker: Option<Waker>,
    /// When its request was called, for the `admitted` event.
    since: WaitStart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Waits for a permit.
    Waiting,
    /// Holds a permit: it may start on its next poll.
    Granted,
    /// Its request was dropped; the slot is reclaimed later.
    Gone,
}

/// What polling a waiter found.
#[derive(Debug)]
pub(super) enum Polled {
    /// The waiter left the line at its front: it may start now. Carries the waker it no
    /// longer needs, and when its request was called.
    Head(Option<Waker>, WaitStart),
    /// Still waiting; carries the waker replaced by the current one, if any.
    Wait(Option<Waker>),
    /// Still waiting, and the stored waker would not wake the current task; call again
    /// with a clone of the current waker.
    NeedsWaker,
}

impl Line {
    /// True when no live waiter is left.
    pub(super) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Live waiters without a permit.
    pub(super) fn waiting(&self) -> u32 {
        self.live - self.granted
    }

    /// Live waiters, with or without a permit.
    #[cfg(test)]
    pub(super) fn live(&self) -> u32 {
        self.live
    }

    /// Adds a waiter at the back, without a permit, and returns its ticket. Its wait is
    /// timed from now, when anyone may want to know ([`trace::joined_at`]).
    // PERF: layer_sync_live_key, hand_off_layer (registry Performance: the line's steps
    // are inlined).
    #[inline]
    pub(super) fn push(&mut self) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if self.waiting() == 0 {
            self.first_waiting = ticket;
        }
        self.live += 1;
        self.waiters.push_back(Waiter {
            ticket,
            status: Status::Waiting,
            waker: None,
            since: trace::joined_at(),
        });
        ticket
    }

    /// Gives a free permit (`holders < permits`) to the front waiter, unless a waiter
    /// holds one already. The caller checks that no earlier claim is unstarted: a permit
    /// goes only to a waiter that may start (invariant 3).
    // PERF: layer_sync_live_key, hand_off_layer (registry Performance: the line's steps
    // are inlined).
    #[inline]
    pub(super) fn grant_front(&mut self, holders: &mut u32, permits: u32) {
        if *holders < permits && self.granted == 0 {
            if let Some(front) = self.waiters.front_mut() {
                // The front is live (invariant 2) and, with nobody granted, waiting.
                debug_assert_eq!(front.ticket, self.first_waiting);
                front.status = Status::Granted;
                self.granted = 1;
                *holders += 1;
                self.advance_first_waiting(1);
            }
        }
    }

    /// The waker of the front waiter if it holds a permit. Taken, not cloned: the waiter
    /// is woken once and registers again if its poll finds it cannot start after all.
    pub(super) fn startable(&mut self) -> Option<Waker> {
        match self.waiters.front_mut() {
            Some(front) if front.status == Status::Granted => front.waker.take(),
            _ => None,
        }
    }

    /// Polls the waiter with `ticket`. It leaves the line if it is the front one, holds a
    /// permit and no earlier claim is unstarted; otherwise it keeps a waker for the
    /// current task, taking it from `fresh`, a clone the caller made before locking.
    // PERF: layer_sync_live_key, hand_off_layer (registry Performance: the line's steps
    // are inlined).
    #[inline]
    pub(super) fn poll(
        &mut self,
        ticket: u64,
        head_unstarted: bool,
        fresh: &mut Option<Waker>,
        current: &Waker,
    ) -> Polled {
        // A waiter whose turn has come is the front one (invariant 2 and the prefix of
        // granted waiters), so it is checked first, without looking the ticket up.
        let its_turn = !head_unstarted
            && self
                .waiters
                .front()
                .is_some_and(|front| front.ticket == ticket && front.status == Status::Granted);
        if its_turn {
            let waiter = self.waiters.pop_front().expect("the front waiter exists");
            self.live -= 1;
            self.granted -= 1;
            self.tidy();
            return Polled::Head(waiter.waker, waiter.since);
        }
        let index = self.index_of(ticket);
        let waiter = &mut self.waiters[index];
        match &waiter.waker {
            Some(stored) if stored.will_wake(current) => Polled::Wait(None),
            _ => match fresh.take() {
                Some(waker) => Polled::Wait(waiter.waker.replace(waker)),
                None => Polled::NeedsWaker,
            },
        }
    }

    /// Removes the waiter with `ticket`, whose request was dropped. Returns whether it
    /// held a permit, and its waker.
    pub(super) fn leave(&mut self, ticket: u64) -> (bool, Option<Waker>) {
        let index = self.index_of(ticket);
        let waiter = &mut self.waiters[index];
        let granted = waiter.status == Status::Granted;
        waiter.status = Status::Gone;
        let waker = waiter.waker.take();
        self.live -= 1;
        if granted {
            self.granted -= 1;
        } else if ticket == self.first_waiting {
            self.advance_first_waiting(index + 1);
        }
        self.tidy();
        (granted, waker)
    }

    /// Prepares an empty line to serve another key: no memory beyond what a line keeps.
    pub(super) fn recycle(&mut self) {
        debug_assert!(self.waiters.is_empty(), "an empty line has no waiter left");
        self.waiters.shrink_to(RETAINED_WAITERS);
    }

    /// Pops gone waiters off the front (invariant 2), compacts the line once gone
    /// waiters outnumber the live ones, and gives memory back once the line is mostly
    /// empty.
    // PERF: layer_sync_live_key, hand_off_layer (registry Performance: rare work out of
    // line; a call measured 22 and 17 instructions more).
    #[inline(always)]
    fn tidy(&mut self) {
        if self.front_is_gone() || self.needs_compaction() || self.needs_shrinking() {
            self.tidy_now();
        }
    }

    fn tidy_now(&mut self) {
        while self.front_is_gone() {
            self.waiters.pop_front();
        }
        if self.needs_compaction() {
            self.waiters.retain(|waiter| waiter.status != Status::Gone);
        }
        if self.needs_shrinking() {
            let len = self.waiters.len();
            self.waiters.shrink_to((len * 2).max(RETAINED_WAITERS));
        }
    }

    /// The front waiter's request was dropped (invariant 2 wants it popped).
    #[inline]
    fn front_is_gone(&self) -> bool {
        self.waiters
            .front()
            .is_some_and(|front| front.status == Status::Gone)
    }

    /// Gone waiters outnumber the live ones, in a line longer than it keeps anyway.
    #[inline]
    fn needs_compaction(&self) -> bool {
        let (len, live) = (self.waiters.len(), self.live as usize);
        len - live > live && len > RETAINED_WAITERS
    }

    /// The line holds at most an eighth of its room, and more room than it keeps.
    #[inline]
    fn needs_shrinking(&self) -> bool {
        let capacity = self.waiters.capacity();
        capacity > RETAINED_WAITERS && self.waiters.len() * 8 <= capacity
    }

    /// Moves `first_waiting` to the first waiting waiter at or after `index`.
    fn advance_first_waiting(&mut self, index: usize) {
        // Every live waiter holds a permit: there is no first waiting one to find.
        if self.waiting() == 0 {
            return;
        }
        // Usually the waiter right behind: only gone waiters can lie between the two.
        // PERF: hand_off_layer (registry Performance: rare work out of line).
        match self.waiters.get(index) {
            Some(next) if next.status == Status::Waiting => self.first_waiting = next.ticket,
            _ => self.find_first_waiting(index),
        }
    }

    #[inline(never)]
    fn find_first_waiting(&mut self, index: usize) {
        if let Some(next) = self
            .waiters
            .range(index..)
            .find(|waiter| waiter.status == Status::Waiting)
        {
            self.first_waiting = next.ticket;
        }
    }

    /// The index of the live waiter with `ticket`.
    #[inline]
    fn index_of(&self, ticket: u64) -> usize {
        let front = self.waiters.front().map_or(ticket, |front| front.ticket);
        // Usually the waiter is where its ticket says: nothing in front of it has been
        // compacted away (the front one, polled or granted, is the common case).
        let guess = usize::try_from(ticket - front).unwrap_or(usize::MAX);
        match self.waiters.get(guess) {
            Some(waiter) if waiter.ticket == ticket => guess,
            _ => self.search(ticket),
        }
    }

    fn search(&self, ticket: u64) -> usize {
        self.waiters
            .binary_search_by_key(&ticket, |waiter| waiter.ticket)
            .expect("a live claim's waiter is in its line")
    }
}

#[cfg(test)]
mod tests;
