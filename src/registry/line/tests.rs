//! The line's invariants, checked beside its code: a randomized run against a reference
//! model, and the memory and lookup paths that a short run rarely reaches.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::Waker;

use super::{Line, Polled, RETAINED_WAITERS, Status};
use crate::registry::testing::{Rng, Task};

impl Line {
    /// Waiter slots allocated, live, gone or free.
    fn capacity(&self) -> usize {
        self.waiters.capacity()
    }
}

/// The task a waker wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Noop,
    Task(u64),
}

/// Tasks other than the waiters' own, which a waiter's future may move to.
const FOREIGN_TASKS: u64 = 1 << 40;

/// One waker per task, so that clones of it `will_wake` each other, and a record of the
/// tasks woken through any of them.
#[derive(Default)]
struct Wakers {
    woken: Arc<Mutex<Vec<u64>>>,
    tasks: HashMap<u64, Waker>,
}

impl Wakers {
    fn of(&mut self, who: Who) -> Waker {
        match who {
            Who::Noop => Waker::noop().clone(),
            Who::Task(id) => {
                let woken = &self.woken;
                self.tasks
                    .entry(id)
                    .or_insert_with(|| {
                        Waker::from(Arc::new(Task {
                            id,
                            woken: Arc::clone(woken),
                        }))
                    })
                    .clone()
            }
        }
    }

    /// The task that `waker` wakes, found by waking it.
    fn who(&self, waker: &Waker) -> Who {
        waker.wake_by_ref();
        let mut woken = self.woken.lock().unwrap();
        let who = match woken.as_slice() {
            [] => Who::Noop,
            [id] => Who::Task(*id),
            more => panic!("one wake woke {more:?}"),
        };
        woken.clear();
        who
    }

    /// Whether `waker` wakes `who`, without waking anything.
    fn wakes(&self, waker: &Waker, who: Who) -> bool {
        match who {
            // A clone, as the line stores: `Waker::noop()` itself need not `will_wake` one.
            Who::Noop => waker.will_wake(&Waker::noop().clone()),
            Who::Task(id) => self
                .tasks
                .get(&id)
                .is_some_and(|task| task.will_wake(waker)),
        }
    }

    fn identify(&self, waker: Option<Waker>) -> Option<Who> {
        waker.map(|waker| self.who(&waker))
    }
}

/// A live waiter as the model sees it.
#[derive(Debug)]
struct Entry {
    ticket: u64,
    granted: bool,
    /// The task its stored waker wakes, if it stores one.
    stored: Option<Who>,
}

/// The line's key as the shard keeps it, and the line as a plain list of live waiters in
/// push order.
struct Model {
    permits: u32,
    holders: u32,
    head_unstarted: bool,
    running: u32,
    line: VecDeque<Entry>,
    last_ticket: Option<u64>,
}

/// Paths of the line that a run reached: a run that never reaches one proves nothing
/// about it.
#[derive(Debug, Default)]
struct Reached {
    turns: u32,
    replaced: u32,
    needs_waker: u32,
    granted_leaves: u32,
    startable_wakers: u32,
    /// A live waiter sat away from the index its ticket gives: compaction happened, and
    /// finding it takes the binary search.
    off_guess: u32,
}

/// Checks the line after a step against its invariants and the model; `step` says which.
fn check(line: &Line, model: &Model, wakers: &Wakers, reached: &mut Reached, step: &str) {
    let waiting = model.line.iter().filter(|entry| !entry.granted).count();
    assert_eq!(line.live() as usize, model.line.len(), "{step}: live()");
    assert_eq!(line.waiting() as usize, waiting, "{step}: waiting()");
    assert_eq!(line.is_empty(), model.line.is_empty(), "{step}: is_empty()");

    // Invariant 1: tickets increase from front to back.
    let slots = &line.waiters;
    assert!(
        slots
            .iter()
            .zip(slots.iter().skip(1))
            .all(|(a, b)| a.ticket < b.ticket),
        "{step}: tickets out of order"
    );
    // Invariant 2: the front is live.
    if let Some(front) = slots.front() {
        assert_ne!(front.status, Status::Gone, "{step}: gone front");
    }
    // Invariant 3: at most one waiter granted, the front one.
    let granted: Vec<usize> = (0..slots.len())
        .filter(|&index| slots[index].status == Status::Granted)
        .collect();
    assert!(
        granted.is_empty() || granted == [0],
        "{step}: granted at {granted:?}"
    );
    assert_eq!(
        line.granted as usize,
        granted.len(),
        "{step}: granted count"
    );
    // Invariant 4: `first_waiting` is the first waiting waiter.
    if let Some(first) = slots.iter().find(|waiter| waiter.status == Status::Waiting) {
        assert_eq!(line.first_waiting, first.ticket, "{step}: first_waiting");
    }

    // The live waiters are the model's, in push order, with the same permits and wakers.
    let live: Vec<(u64, bool)> = slots
        .iter()
        .filter(|waiter| waiter.status != Status::Gone)
        .map(|waiter| (waiter.ticket, waiter.status == Status::Granted))
        .collect();
    let expected: Vec<(u64, bool)> = model
        .line
        .iter()
        .map(|entry| (entry.ticket, entry.granted))
        .collect();
    assert_eq!(live, expected, "{step}: live waiters");
    let stored = slots
        .iter()
        .filter(|waiter| waiter.status != Status::Gone)
        .map(|waiter| waiter.waker.as_ref());
    for (waker, entry) in stored.zip(&model.line) {
        match (waker, entry.stored) {
            (None, None) => {}
            (Some(waker), Some(who)) if wakers.wakes(waker, who) => {}
            (waker, expected) => panic!(
                "{step}: ticket {} stores a waker of {:?}, not {expected:?}",
                entry.ticket,
                waker.map(|waker| wakers.who(waker)),
            ),
        }
    }

    // The shard's count of permits: running claims, the unstarted head, the granted front.
    assert_eq!(
        model.holders,
        model.running + u32::from(model.head_unstarted) + granted.len() as u32,
        "{step}: holders"
    );
    assert!(model.holders <= model.permits, "{step}: holders > permits");

    // Memory follows the live waiters: gone ones outnumber neither the live ones nor the
    // retained slots (a push may come after the last compaction), and the capacity stays
    // within eight times the length.
    let len = slots.len();
    let live = line.live as usize;
    assert!(
        len - live <= live.max(RETAINED_WAITERS),
        "{step}: {len} slots for {live} live waiters"
    );
    let capacity = line.capacity();
    assert!(
        capacity <= RETAINED_WAITERS || capacity < 8 * len,
        "{step}: capacity {capacity} for {len} slots"
    );

    if let Some(front) = slots.front() {
        if (0..len).any(|index| slots[index].ticket - front.ticket != index as u64) {
            reached.off_guess += 1;
        }
    }
}

/// Waiters a line may hold in the randomized run: long enough to compact and shrink,
/// short enough that a run checks many lines.
const MAX_QUEUE: usize = 100;

/// One random operation of the shard on the line, checked against the model.
fn step(
    line: &mut Line,
    model: &mut Model,
    wakers: &mut Wakers,
    rng: &mut Rng,
    reached: &mut Reached,
    growing: bool,
) -> String {
    let roll = rng.below(100);
    let (claim_chance, leave_chance) = if growing { (40, 25) } else { (5, 50) };
    if roll < claim_chance {
        // `KeyState::join`: a claim starts at once when nobody is in line, no claim is the
        // unstarted head and a permit is free; otherwise it joins the line.
        if model.line.is_empty() && !model.head_unstarted && model.holders < model.permits {
            model.holders += 1;
            model.head_unstarted = true;
            return "claim as head".into();
        }
        if model.line.len() >= MAX_QUEUE {
            return "claim rejected".into();
        }
        let ticket = line.push();
        if let Some(last) = model.last_ticket {
            assert!(ticket > last, "push: ticket {ticket} after {last}");
        }
        model.last_ticket = Some(ticket);
        model.line.push_back(Entry {
            ticket,
            granted: false,
            stored: None,
        });
        return format!("push {ticket}");
    }
    let roll = rng.below(100);
    if model.line.is_empty() || roll < 30 {
        return shard_step(line, model, wakers, rng, reached);
    }
    // The front is polled often: it is the one whose turn may come.
    let index = if rng.percent(30) {
        0
    } else {
        rng.below(model.line.len())
    };
    let ticket = model.line[index].ticket;
    if roll < 100 - leave_chance {
        poll(line, model, wakers, rng, reached, index)
    } else {
        // A waiter's request is dropped, granted or not.
        let entry = model.line.remove(index).expect("index is in the line");
        let (granted, waker) = line.leave(ticket);
        assert_eq!(granted, entry.granted, "leave {ticket}: granted");
        assert_eq!(
            wakers.identify(waker),
            entry.stored,
            "leave {ticket}: the waker it stored"
        );
        if granted {
            model.holders -= 1;
            reached.granted_leaves += 1;
        }
        format!("leave {ticket}")
    }
}

/// What the shard does to a key besides its line's waiters: hand-offs, and the claims
/// that hold permits starting and finishing.
fn shard_step(
    line: &mut Line,
    model: &mut Model,
    wakers: &Wakers,
    rng: &mut Rng,
    reached: &mut Reached,
) -> String {
    match rng.below(5) {
        // `KeyState::pass_on`, in two halves: a permit is granted only when no claim is
        // the unstarted head, and the waker may be taken later or never.
        0 | 1 if !model.head_unstarted => {
            let before = model.holders;
            line.grant_front(&mut model.holders, model.permits);
            let grants = before < model.permits
                && !model.line.is_empty()
                && !model.line.iter().any(|entry| entry.granted);
            if grants {
                // Invariant 4: the permit goes to the first waiting waiter.
                model.line[0].granted = true;
                assert_eq!(model.holders, before + 1, "grant: holders");
                "grant the front".into()
            } else {
                assert_eq!(model.holders, before, "grant nobody: holders");
                "grant nobody".into()
            }
        }
        2 if !model.head_unstarted => {
            let expected = match model.line.front_mut() {
                Some(front) if front.granted => front.stored.take(),
                _ => None,
            };
            let got = wakers.identify(line.startable());
            assert_eq!(got, expected, "startable");
            if got.is_some() {
                reached.startable_wakers += 1;
            }
            "startable".into()
        }
        3 if model.head_unstarted => {
            if rng.percent(80) {
                model.running += 1;
                model.head_unstarted = false;
                "the head starts".into()
            } else {
                model.holders -= 1;
                model.head_unstarted = false;
                "the head is dropped".into()
            }
        }
        _ if model.running > 0 => {
            model.running -= 1;
            model.holders -= 1;
            "a running claim finishes".into()
        }
        _ => "nothing".into(),
    }
}

/// Polls the waiter at `index` of the model from its own task, or from another one its
/// future moved to, with or without a `fresh` clone of that task's waker.
fn poll(
    line: &mut Line,
    model: &mut Model,
    wakers: &mut Wakers,
    rng: &mut Rng,
    reached: &mut Reached,
    index: usize,
) -> String {
    let ticket = model.line[index].ticket;
    let current_who = match rng.below(10) {
        0 => Who::Noop,
        1 => Who::Task(FOREIGN_TASKS + rng.below(3) as u64),
        _ => Who::Task(ticket),
    };
    let current = wakers.of(current_who);
    let offered = rng.percent(50);
    let mut fresh = offered.then(|| current.clone());
    let polled = line.poll(ticket, model.head_unstarted, &mut fresh, &current);
    // Only the granted front may take its turn, and only when no claim is the unstarted
    // head: the waiter whose turn comes is always the first live ticket.
    let its_turn = !model.head_unstarted && index == 0 && model.line[0].granted;
    let entry = &mut model.line[index];
    match polled {
        Polled::Head(waker, _) => {
            assert!(its_turn, "poll {ticket}: took a turn that is not its own");
            assert_eq!(
                wakers.identify(waker),
                entry.stored,
                "poll {ticket}: the turn carries the stored waker"
            );
            assert_eq!(fresh.is_some(), offered, "poll {ticket}: fresh is not kept");
            model.line.pop_front();
            model.head_unstarted = true;
            reached.turns += 1;
            format!("poll {ticket}: its turn")
        }
        Polled::Wait(replaced) => {
            assert!(!its_turn, "poll {ticket}: its turn was not taken");
            if entry.stored == Some(current_who) {
                assert!(
                    replaced.is_none(),
                    "poll {ticket}: replaced a waker that wakes the task"
                );
                assert_eq!(
                    fresh.is_some(),
                    offered,
                    "poll {ticket}: took fresh for nothing"
                );
            } else {
                assert!(offered, "poll {ticket}: stored no waker, yet waits");
                assert!(fresh.is_none(), "poll {ticket}: fresh was not taken");
                assert_eq!(
                    wakers.identify(replaced),
                    entry.stored,
                    "poll {ticket}: the replaced waker"
                );
                entry.stored = Some(current_who);
                reached.replaced += 1;
            }
            format!("poll {ticket}: waits")
        }
        Polled::NeedsWaker => {
            assert!(!its_turn, "poll {ticket}: its turn was not taken");
            assert!(!offered, "poll {ticket}: asked for a waker it was given");
            assert_ne!(
                entry.stored,
                Some(current_who),
                "poll {ticket}: asked for a waker it has"
            );
            reached.needs_waker += 1;
            format!("poll {ticket}: needs a waker")
        }
    }
}

#[test]
fn random_operations_keep_the_invariants_and_match_a_model() {
    let mut reached = Reached::default();
    for seed in 1..=64 {
        let mut rng = Rng::new(seed);
        let mut line = Line::default();
        let mut wakers = Wakers::default();
        let mut model = Model {
            permits: 1 + rng.below(3) as u32,
            holders: 0,
            head_unstarted: false,
            running: 0,
            line: VecDeque::new(),
            last_ticket: None,
        };
        for round in 0..2_000 {
            // Bursts of claims, then drains: lines long enough to compact and shrink.
            let growing = (round / 150) % 2 == 0;
            let what = step(
                &mut line,
                &mut model,
                &mut wakers,
                &mut rng,
                &mut reached,
                growing,
            );
            check(
                &line,
                &model,
                &wakers,
                &mut reached,
                &format!("seed {seed}, step {round}, {what}"),
            );
        }
    }
    assert!(reached.turns > 0, "{reached:?}");
    assert!(reached.replaced > 0, "{reached:?}");
    assert!(reached.needs_waker > 0, "{reached:?}");
    assert!(reached.granted_leaves > 0, "{reached:?}");
    assert!(reached.startable_wakers > 0, "{reached:?}");
    assert!(reached.off_guess > 0, "{reached:?}");
}

/// Every waiter's turn, front first, as the shard hands them out with one permit: each
/// must be the front, hold the permit and find its own waker stored (if `wakers`).
fn take_turns_in_order(line: &mut Line, tickets: &[u64], wakers: Option<&mut Wakers>) {
    let mut holders = 0;
    let mut wakers = wakers;
    for &ticket in tickets {
        line.grant_front(&mut holders, 1);
        assert_eq!(holders, 1, "ticket {ticket} was granted the permit");
        let woken = line.startable();
        let current = match wakers.as_deref_mut() {
            Some(wakers) => {
                assert_eq!(
                    wakers.identify(woken),
                    Some(Who::Task(ticket)),
                    "ticket {ticket}: its own task is woken for its turn"
                );
                wakers.of(Who::Task(ticket))
            }
            None => Waker::noop().clone(),
        };
        let polled = line.poll(ticket, false, &mut None, &current);
        assert!(
            matches!(polled, Polled::Head(None, _)),
            "ticket {ticket}: its turn, got {polled:?}"
        );
        // It starts and finishes: its permit is free for the next one.
        holders -= 1;
    }
    assert!(line.is_empty());
}

/// Orders in which `memory_follows_the_live_waiters` drops every waiter but the last of
/// `n`: from the front, from the back, and from the middle outwards.
fn leaving_orders(n: u64) -> Vec<(&'static str, Vec<u64>)> {
    let front_first: Vec<u64> = (0..n - 1).collect();
    let back_first: Vec<u64> = (0..n - 1).rev().collect();
    let middle = (n - 1) / 2;
    let mut middle_out = front_first.clone();
    middle_out.sort_by_key(|&ticket| (ticket.abs_diff(middle), ticket));
    vec![
        ("front first", front_first),
        ("back first", back_first),
        ("middle out", middle_out),
    ]
}

#[test]
fn memory_follows_the_live_waiters() {
    const WAITERS: u64 = 10_000;
    for (order, leaving) in leaving_orders(WAITERS) {
        let mut line = Line::default();
        let tickets: Vec<u64> = (0..WAITERS).map(|_| line.push()).collect();
        assert!(line.capacity() >= WAITERS as usize);
        for (left, &ticket) in leaving.iter().enumerate() {
            let (granted, waker) = line.leave(ticket);
            assert!(!granted && waker.is_none(), "{order}: leave {ticket}");
            // Gone waiters never outnumber the live ones for long, and the capacity
            // follows the length: a bound in live waiters, whatever the order.
            let live = line.live() as usize;
            assert_eq!(live, WAITERS as usize - left - 1);
            assert!(
                line.capacity() <= (16 * live).max(8 * RETAINED_WAITERS),
                "{order}: capacity {} for {live} live waiters",
                line.capacity()
            );
        }
        // Back to the retained slots: no more, and no fewer, so that a few waiters at a
        // time do not reallocate.
        assert_eq!(
            line.capacity(),
            RETAINED_WAITERS,
            "{order}: capacity for the last waiter"
        );
        // The last one is still found, and takes its turn.
        take_turns_in_order(&mut line, &tickets[tickets.len() - 1..], None);
    }
}

#[test]
fn a_recycled_line_keeps_its_retained_slots_and_no_more() {
    let mut line = Line::default();
    let tickets: Vec<u64> = (0..1_000).map(|_| line.push()).collect();
    take_turns_in_order(&mut line, &tickets, None);
    assert_eq!(line.capacity(), RETAINED_WAITERS, "after the burst drained");
    line.recycle();
    assert_eq!(line.capacity(), RETAINED_WAITERS, "recycled");

    // Every path that empties a line shrinks it already; `recycle` must do so on its own
    // for a line emptied any other way.
    let mut line = Line::default();
    line.waiters.reserve(1_000);
    line.recycle();
    assert_eq!(
        line.capacity(),
        RETAINED_WAITERS,
        "recycled with spare room"
    );

    // A few waiters at a time: the retained slots stay, so the next key's waiters do not
    // allocate, and the recycled line serves them in order.
    let tickets: Vec<u64> = (0..RETAINED_WAITERS).map(|_| line.push()).collect();
    take_turns_in_order(&mut line, &tickets, None);
    line.recycle();
    assert_eq!(line.capacity(), RETAINED_WAITERS);
    let tickets: Vec<u64> = (0..3).map(|_| line.push()).collect();
    assert_eq!(line.capacity(), RETAINED_WAITERS);
    take_turns_in_order(&mut line, &tickets, None);
}

#[test]
fn tickets_find_their_waiters_after_compaction() {
    let mut line = Line::default();
    let mut wakers = Wakers::default();
    let tickets: Vec<u64> = (0..1_000).map(|_| line.push()).collect();
    // Two of every three leave, the front one stays: gone waiters come to outnumber the
    // live ones behind a live front, and the line is compacted. Leaving every second one
    // would never compact, so no lookup would need the binary search.
    let (staying, leaving): (Vec<u64>, Vec<u64>) =
        tickets.iter().partition(|&&ticket| ticket % 3 == 0);
    for &ticket in &leaving {
        let (granted, waker) = line.leave(ticket);
        assert!(!granted && waker.is_none(), "leave {ticket}");
    }
    let front = line.waiters[0].ticket;
    let off_guess = (0..line.waiters.len())
        .filter(|&index| line.waiters[index].ticket - front != index as u64)
        .count();
    assert!(off_guess > 0, "the line was not compacted");

    // Each remaining waiter registers its own task's waker, which must land in its slot.
    for &ticket in &staying {
        let current = wakers.of(Who::Task(ticket));
        let mut fresh = Some(current.clone());
        let polled = line.poll(ticket, false, &mut fresh, &current);
        assert!(
            matches!(polled, Polled::Wait(None)) && fresh.is_none(),
            "ticket {ticket}: {polled:?}"
        );
        let polled = line.poll(ticket, false, &mut None, &current);
        assert!(
            matches!(polled, Polled::Wait(None)),
            "ticket {ticket}: {polled:?}"
        );
    }
    // Every fifth of them leaves again, found by the search; its own waker comes back.
    let (leaving, staying): (Vec<u64>, Vec<u64>) = staying
        .iter()
        .partition(|&&ticket| ticket % 5 == 0 && ticket != 0);
    for &ticket in &leaving {
        let (granted, waker) = line.leave(ticket);
        assert!(!granted);
        assert_eq!(
            wakers.identify(waker),
            Some(Who::Task(ticket)),
            "leave {ticket}"
        );
    }
    assert_eq!(line.live() as usize, staying.len());
    // The rest take their turns in push order, each woken through its own waker.
    take_turns_in_order(&mut line, &staying, Some(&mut wakers));
}

#[test]
fn a_granted_front_waits_while_an_earlier_claim_is_unstarted() {
    // The shard never grants a permit while a claim is the unstarted head (invariant 2 of
    // the registry), so the randomized run never meets this; `poll` promises it anyway.
    let mut line = Line::default();
    let ticket = line.push();
    let mut holders = 1;
    line.grant_front(&mut holders, 2);
    assert_eq!(holders, 2);
    let noop = Waker::noop().clone();
    let polled = line.poll(ticket, true, &mut Some(noop.clone()), &noop);
    assert!(matches!(polled, Polled::Wait(None)), "{polled:?}");
    assert_eq!((line.live(), line.waiting()), (1, 0));
    let polled = line.poll(ticket, false, &mut None, &noop);
    assert!(matches!(polled, Polled::Head(Some(_), _)), "{polled:?}");
    assert!(line.is_empty());
}
