//! Property test: random sequences of call / poll / drop / complete over a few keys,
//! requests on sets of those keys (`Mode::sync_all`, in any order, with duplicates) and
//! `Mode::Concurrent` requests, with an inner service whose readiness the test turns on
//! and off or makes fail, checked step by step against a reference model of the contract.
//!
//! The model is the contract in its simplest form. Per key, the requests not yet started
//! form a FIFO in call order. A request has its *turn* when, on each of its keys, it is
//! the front one and fewer than `permits` of that key are running; a Concurrent request
//! (no key at all) always has its turn, whatever the keys do. A request on several keys
//! counts on each of them as a request on that key alone would, and duplicates count
//! once. A request checks the inner service's readiness only when it has its turn:
//! once inside `call()`, then on every poll of its response future until it starts.
//! Ready, it calls the inner service and runs, holding its permit until its response
//! future is polled to completion or dropped. Not ready, it keeps its turn (a Sync
//! request keeps its key) and waits. Failed, it returns the error, at once when polled or
//! on the first poll when it failed inside `call()`, and gives its key up then.
//!
//! With `max_in_flight(n)`, a request on keys also needs one of the domain's `n` *slots*
//! before it checks readiness. A request asks for one when it has its turn on its keys:
//! inside `call()` if it has its turn then, otherwise on the first poll after a step gave
//! it its turn (which must have woken it); asking, it takes a free slot. Finding none
//! free, it *waits for a slot*, keeping its turn on its keys, until a step frees one and
//! *grants* it, to be taken on its next poll. A request holds its slot until it ends, in any state. A freed slot goes to
//! the waiting request whose key holds the fewest slots (for a set, the most any of its
//! keys holds); among equals, to the one whose key was granted a slot least recently
//! (for a set, the latest grant among its keys; a key never granted one, or idle since,
//! first); among equals, to the one that waited longest. A grant dropped before it is
//! taken does not count. A slot freed while nobody waits for one is free for whoever
//! asks first. Waiting requests equal on all three counts are a tie the contract leaves
//! open: the model then follows every way of breaking it, and keeps the ways the layer's
//! behaviour fits.
//!
//! After every step the test checks the order in which the inner service was called, how
//! often its readiness was checked, the handlers running per key and in all (never more
//! than `max_in_flight`), `stats()` (with `waiting_for_slot`), and that every request
//! the model says may start now has been woken. At the end every request must complete
//! and the layer must be idle.

#[path = "support/sets.rs"]
mod sets;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use proptest::prelude::*;
use sets::keys_of;
use tokio_test::task::{self, Spawn};
use tower::{Layer, Service};
use tower_sync_engine::{Mode, SyncEngineLayer};

#[derive(Debug, Clone)]
enum Op {
    /// A request for `Mode::Sync(key)`, or for `Mode::Concurrent` with no key.
    Call {
        key: Option<u8>,
    },
    /// A request for every key of `keys`: through `Mode::sync_all`, or as a
    /// `Mode::SyncAll` built `by_hand`, which may hold no key or one.
    CallSet {
        keys: Vec<u8>,
        by_hand: bool,
    },
    Poll(usize),
    Drop(usize),
    Complete(usize),
    /// From now on the inner service is ready, or not.
    Ready(bool),
    /// The next readiness check of the inner service fails.
    FailReadiness,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3).prop_map(|key| Op::Call { key: Some(key) }),
        1 => Just(Op::Call { key: None }),
        2 => prop::collection::vec(0u8..3, 2..=3).prop_map(|keys| Op::CallSet {
            keys,
            by_hand: false,
        }),
        1 => prop::collection::vec(0u8..3, 0..=3).prop_map(|keys| Op::CallSet {
            keys,
            by_hand: true,
        }),
        4 => any::<usize>().prop_map(Op::Poll),
        1 => any::<usize>().prop_map(Op::Drop),
        2 => any::<usize>().prop_map(Op::Complete),
        1 => any::<bool>().prop_map(Op::Ready),
        1 => Just(Op::FailReadiness),
    ]
}

/// A request: its mode and its id.
type Request = (Mode<u8>, usize);

/// Where a request's handler counts as running: each of its keys, or `None` for a
/// request with no key.
fn counted_on(keys: &[u8]) -> Vec<Option<u8>> {
    if keys.is_empty() {
        vec![None]
    } else {
        keys.iter().copied().map(Some).collect()
    }
}

const NOT_READY: &str = "the inner service failed its readiness check";

/// The inner service: records when it is called and when its readiness is checked, is
/// ready only while the test says so, and each handler finishes only once the test
/// completes it.
#[derive(Clone)]
struct Gates {
    state: Arc<Mutex<GateState>>,
}

struct GateState {
    called: Vec<usize>,
    completed: HashSet<usize>,
    wakers: HashMap<usize, Waker>,
    ready: bool,
    fail_next: bool,
    readiness_checks: usize,
    /// Tasks whose readiness check found the service not ready.
    unready: Vec<Waker>,
    /// Handlers called and not dropped yet, by key: a request on several keys counts on
    /// each, a Concurrent one under `None`.
    running: HashMap<Option<u8>, usize>,
    /// Handlers of requests on keys called and not dropped yet, each counted once.
    keyed_running: usize,
}

struct GateFuture {
    counted_on: Vec<Option<u8>>,
    id: usize,
    gates: Gates,
}

impl Service<Request> for Gates {
    type Response = usize;
    type Error = &'static str;
    type Future = GateFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let mut state = self.state.lock().unwrap();
        state.readiness_checks += 1;
        if std::mem::take(&mut state.fail_next) {
            return Poll::Ready(Err(NOT_READY));
        }
        if state.ready {
            return Poll::Ready(Ok(()));
        }
        if !state
            .unready
            .iter()
            .any(|waker| waker.will_wake(cx.waker()))
        {
            state.unready.push(cx.waker().clone());
        }
        Poll::Pending
    }

    fn call(&mut self, (mode, id): Request) -> GateFuture {
        let counted_on = counted_on(&keys_of(&mode));
        let mut state = self.state.lock().unwrap();
        state.called.push(id);
        for key in &counted_on {
            *state.running.entry(*key).or_default() += 1;
        }
        if counted_on[0].is_some() {
            state.keyed_running += 1;
        }
        GateFuture {
            counted_on,
            id,
            gates: self.clone(),
        }
    }
}

impl Future for GateFuture {
    type Output = Result<usize, &'static str>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.gates.state.lock().unwrap();
        if state.completed.contains(&self.id) {
            return Poll::Ready(Ok(self.id));
        }
        state.wakers.insert(self.id, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for GateFuture {
    fn drop(&mut self) {
        let mut state = self.gates.state.lock().unwrap();
        for key in &self.counted_on {
            *state.running.get_mut(key).unwrap() -= 1;
        }
        if self.counted_on[0].is_some() {
            state.keyed_running -= 1;
        }
    }
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            state: Arc::new(Mutex::new(GateState {
                called: Vec::new(),
                completed: HashSet::new(),
                wakers: HashMap::new(),
                ready: true,
                fail_next: false,
                readiness_checks: 0,
                unready: Vec::new(),
                running: HashMap::new(),
                keyed_running: 0,
            })),
        }
    }
}

impl Gates {
    fn complete(&self, id: usize) {
        let mut state = self.state.lock().unwrap();
        state.completed.insert(id);
        let waker = state.wakers.remove(&id);
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn set_ready(&self, ready: bool) {
        self.state.lock().unwrap().ready = ready;
        if ready {
            self.wake_unready();
        }
    }

    fn fail_next(&self) {
        self.state.lock().unwrap().fail_next = true;
        // The next check answers at once, so the tasks waiting for readiness must look.
        self.wake_unready();
    }

    fn wake_unready(&self) {
        let unready = std::mem::take(&mut self.state.lock().unwrap().unready);
        unready.into_iter().for_each(Waker::wake);
    }

    fn called(&self) -> Vec<usize> {
        self.state.lock().unwrap().called.clone()
    }

    fn readiness_checks(&self) -> usize {
        self.state.lock().unwrap().readiness_checks
    }

    fn running(&self, key: Option<u8>) -> usize {
        let state = self.state.lock().unwrap();
        state.running.get(&key).copied().unwrap_or(0)
    }

    fn keyed_running(&self) -> usize {
        self.state.lock().unwrap().keyed_running
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Status {
    /// Not started: waits for its turn, for a slot, or for readiness.
    Pending,
    /// Its readiness check failed inside `call()`: it returns the error when polled.
    Failed,
    Running {
        completed: bool,
    },
    Done,
    Dropped,
}

/// Where a request stands with the domain's slots (`max_in_flight`).
#[derive(Debug, Clone, PartialEq)]
enum Slot {
    /// Needs none: no `max_in_flight`, or a request with no key.
    Unneeded,
    /// Has not had its turn on its keys yet, so has not asked for one.
    NotAsked,
    /// Has its turn and found every slot taken, in the step `since`.
    Waiting { since: u64 },
    /// Was granted a slot when another request gave it up, or as it got its turn, and
    /// has not been polled since: `previous` is what its keys' grant history was before,
    /// restored if it is dropped before it uses the slot.
    Granted { previous: Vec<(u8, Option<u64>)> },
    /// Holds a slot it has used: it took it inside `call()`, or was polled since the
    /// grant.
    Held,
    /// Has ended: holds nothing.
    Gone,
}

/// What a poll of a response future gives.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Polled {
    Pending,
    Answered,
    Failed,
}

/// The reference model.
#[derive(Clone, PartialEq)]
struct Model {
    permits: usize,
    max_in_flight: Option<usize>,
    /// Each request's distinct keys; none for a Concurrent request.
    keys_of: Vec<Vec<u8>>,
    status: Vec<Status>,
    slot: Vec<Slot>,
    not_started: HashMap<u8, VecDeque<usize>>,
    running: HashMap<Option<u8>, usize>,
    called: Vec<usize>,
    ready: bool,
    fail_next: bool,
    readiness_checks: usize,
    /// Slots granted or held.
    slots_in_use: usize,
    /// The step of each key's last grant of a slot, while the key is not idle.
    last_grant: HashMap<u8, u64>,
    /// Counts the steps that grant slots or make requests wait for one.
    clock: u64,
}

/// A waiting request's place in the order of grants, least first: the slots its keys
/// hold (the most of any of them), its keys' last grant (the latest; `None`, never, comes
/// first) and when it began to wait.
type Rank = (usize, Option<u64>, u64);

impl Model {
    fn new(permits: usize, max_in_flight: Option<usize>) -> Self {
        Model {
            permits,
            max_in_flight,
            keys_of: Vec::new(),
            status: Vec::new(),
            slot: Vec::new(),
            not_started: HashMap::new(),
            running: HashMap::new(),
            called: Vec::new(),
            ready: true,
            fail_next: false,
            readiness_checks: 0,
            slots_in_use: 0,
            last_grant: HashMap::new(),
            clock: 0,
        }
    }

    fn running(&self, key: Option<u8>) -> usize {
        self.running.get(&key).copied().unwrap_or(0)
    }

    /// Nothing before the not-started request `id` keeps it from starting: on each of its
    /// keys (if it has any), it is the first not started, and fewer than `permits` of
    /// that key run.
    fn has_turn(&self, id: usize) -> bool {
        self.keys_of[id].iter().all(|&key| {
            self.not_started[&key].front() == Some(&id) && self.running(Some(key)) < self.permits
        })
    }

    /// The request `id` may check readiness and start as far as the slots go.
    fn has_slot(&self, id: usize) -> bool {
        matches!(
            self.slot[id],
            Slot::Unneeded | Slot::Granted { .. } | Slot::Held
        )
    }

    /// Polled now, the request would start or fail, or ask for a slot: it must have been
    /// woken.
    fn may_start(&self, id: usize) -> bool {
        self.status[id] == Status::Pending
            && self.has_turn(id)
            && ((self.has_slot(id) && (self.ready || self.fail_next))
                || self.slot[id] == Slot::NotAsked)
    }

    /// Requests waiting for a slot.
    fn waiting_for_slot(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.slot.len()).filter(|&id| matches!(self.slot[id], Slot::Waiting { .. }))
    }

    /// Handlers of requests on keys running, each counted once.
    fn keyed_running(&self) -> usize {
        (0..self.status.len())
            .filter(|&id| {
                !self.keys_of[id].is_empty() && matches!(self.status[id], Status::Running { .. })
            })
            .count()
    }

    /// Slots held by requests on `key`.
    fn slots_of(&self, key: u8) -> usize {
        (0..self.slot.len())
            .filter(|&id| {
                matches!(self.slot[id], Slot::Granted { .. } | Slot::Held)
                    && self.keys_of[id].contains(&key)
            })
            .count()
    }

    fn rank(&self, id: usize) -> Rank {
        let Slot::Waiting { since } = self.slot[id] else {
            unreachable!("only a waiting request is ranked")
        };
        let keys = &self.keys_of[id];
        let held = keys.iter().map(|&key| self.slots_of(key)).max();
        let granted = keys
            .iter()
            .map(|key| self.last_grant.get(key).copied())
            .max();
        (held.unwrap_or(0), granted.flatten(), since)
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Grants the request `id` a slot.
    fn grant(&mut self, id: usize) {
        let now = self.tick();
        let mut previous = Vec::new();
        for &key in &self.keys_of[id] {
            previous.push((key, self.last_grant.insert(key, now)));
        }
        self.slots_in_use += 1;
        self.slot[id] = Slot::Granted { previous };
    }

    /// The request `id`, which has its turn and the slot it needs, checks readiness and
    /// starts if it is ready.
    fn try_start(&mut self, id: usize) -> Poll<Result<(), ()>> {
        self.readiness_checks += 1;
        if std::mem::take(&mut self.fail_next) {
            return Poll::Ready(Err(()));
        }
        if !self.ready {
            return Poll::Pending;
        }
        for &key in &self.keys_of[id] {
            let front = self.not_started.get_mut(&key).unwrap().pop_front();
            assert_eq!(front, Some(id), "only the first not started may start");
        }
        for key in counted_on(&self.keys_of[id]) {
            *self.running.entry(key).or_default() += 1;
        }
        self.status[id] = Status::Running { completed: false };
        self.called.push(id);
        Poll::Ready(Ok(()))
    }

    /// A new request on `keys` (distinct), numbered by its call; every way the step can
    /// end.
    fn call(mut self, keys: Vec<u8>) -> Vec<Model> {
        let id = self.status.len();
        for &key in &keys {
            self.not_started.entry(key).or_default().push_back(id);
        }
        let slot = match self.max_in_flight {
            Some(_) if !keys.is_empty() => Slot::NotAsked,
            _ => Slot::Unneeded,
        };
        self.keys_of.push(keys);
        self.status.push(Status::Pending);
        self.slot.push(slot);
        if self.has_turn(id) {
            if self.slot[id] == Slot::NotAsked {
                // Nobody waits for a slot while one is free.
                if Some(self.slots_in_use) < self.max_in_flight {
                    self.grant(id);
                    self.slot[id] = Slot::Held;
                } else {
                    let since = self.tick();
                    self.slot[id] = Slot::Waiting { since };
                }
            }
            if self.has_slot(id) && self.try_start(id) == Poll::Ready(Err(())) {
                self.status[id] = Status::Failed;
            }
        }
        self.settled()
    }

    /// A poll of the request `id`: what it gives, and every way the step can end.
    fn poll(mut self, id: usize) -> (Polled, Vec<Model>) {
        if let Slot::Granted { .. } = self.slot[id] {
            // Polled, it takes the slot it was granted: the grant counts from now on.
            self.slot[id] = Slot::Held;
        }
        if self.slot[id] == Slot::NotAsked
            && self.status[id] == Status::Pending
            && self.has_turn(id)
        {
            // Its first poll since its turn came: it asks for a slot. Nobody waits for one
            // while one is free.
            if Some(self.slots_in_use) < self.max_in_flight {
                self.grant(id);
                self.slot[id] = Slot::Held;
            } else {
                let since = self.tick();
                self.slot[id] = Slot::Waiting { since };
            }
        }
        let polled = match self.status[id] {
            Status::Pending if self.has_turn(id) && self.has_slot(id) => match self.try_start(id) {
                Poll::Ready(Err(())) => {
                    self.end(id, Status::Done);
                    Polled::Failed
                }
                _ => Polled::Pending,
            },
            Status::Failed => {
                self.end(id, Status::Done);
                Polled::Failed
            }
            Status::Running { completed: true } => {
                self.end(id, Status::Done);
                Polled::Answered
            }
            _ => Polled::Pending,
        };
        (polled, self.settled())
    }

    /// The request ends as `status` (its future dropped); every way the step can end.
    fn finish(mut self, id: usize, status: Status) -> Vec<Model> {
        self.end(id, status);
        self.settled()
    }

    /// The request ends as `status`: it leaves each of its keys' lines, or its permits
    /// are free, and it gives up its slot or its wait for one.
    fn end(&mut self, id: usize, status: Status) {
        match self.status[id] {
            Status::Pending | Status::Failed => {
                for key in &self.keys_of[id] {
                    self.not_started.get_mut(key).unwrap().retain(|&x| x != id);
                }
            }
            Status::Running { .. } => {
                for key in counted_on(&self.keys_of[id]) {
                    *self.running.get_mut(&key).unwrap() -= 1;
                }
            }
            Status::Done | Status::Dropped => unreachable!("its future is gone"),
        }
        match std::mem::replace(&mut self.slot[id], Slot::Gone) {
            Slot::Granted { previous } => {
                self.slots_in_use -= 1;
                // Given up unused: the grant never counted.
                for (key, grant) in previous {
                    match grant {
                        Some(grant) => self.last_grant.insert(key, grant),
                        None => self.last_grant.remove(&key),
                    };
                }
            }
            Slot::Held => self.slots_in_use -= 1,
            _ => {}
        }
        self.status[id] = status;
    }

    /// After a step: idle keys forget their grants, and the free slots go to the waiting
    /// requests in rank order.
    /// Returns one model for every way of breaking the ties between equal ranks.
    fn settled(mut self) -> Vec<Model> {
        let Some(max) = self.max_in_flight else {
            return vec![self];
        };
        let idle: Vec<u8> = self
            .last_grant
            .keys()
            .copied()
            .filter(|key| {
                self.running(Some(*key)) == 0
                    && self.not_started.get(key).is_none_or(VecDeque::is_empty)
            })
            .collect();
        for key in idle {
            self.last_grant.remove(&key);
        }
        let mut settled = Vec::new();
        let mut open = vec![self];
        while let Some(model) = open.pop() {
            let waiting: Vec<(Rank, usize)> = model
                .waiting_for_slot()
                .map(|id| (model.rank(id), id))
                .collect();
            let Some(&(first, _)) = waiting.iter().min() else {
                settled.push(model);
                continue;
            };
            if model.slots_in_use == max {
                settled.push(model);
                continue;
            }
            for &(_, id) in waiting.iter().filter(|(rank, _)| *rank == first) {
                let mut next = model.clone();
                next.grant(id);
                open.push(next);
            }
        }
        for model in &settled {
            model.check_itself();
        }
        settled
    }

    /// The model's own invariants.
    fn check_itself(&self) {
        let held = (0..self.slot.len())
            .filter(|&id| matches!(self.slot[id], Slot::Granted { .. } | Slot::Held))
            .count();
        assert_eq!(held, self.slots_in_use, "slots in use");
        if let Some(max) = self.max_in_flight {
            assert!(
                self.slots_in_use <= max,
                "{} slots in use",
                self.slots_in_use
            );
            if self.waiting_for_slot().next().is_some() {
                assert_eq!(self.slots_in_use, max, "a slot free while requests wait");
            }
        }
        for id in self.waiting_for_slot() {
            assert!(
                self.has_turn(id),
                "request {id} waits for a slot without its turn"
            );
        }
    }

    /// (keys, in_flight, queued) as the contract defines them: a key's running requests
    /// hold a permit each, and its first request not started holds one too when fewer
    /// than `permits` run; the rest of those not started are queued. A request on several
    /// keys counts so on each of them. Concurrent requests are not counted.
    fn stats(&self) -> (usize, usize, usize) {
        let mut totals = (0, 0, 0);
        for (&key, not_started) in &self.not_started {
            let running = self.running(Some(key));
            let granted = usize::from(!not_started.is_empty() && running < self.permits);
            if running + not_started.len() > 0 {
                totals.0 += 1;
                totals.1 += running + granted;
                totals.2 += not_started.len() - granted;
            }
        }
        totals
    }
}

type Future_ = Spawn<tower_sync_engine::ResponseFuture<Gates, Request, u8>>;

/// What the layer shows after a step, to hold each model against.
struct Seen<'a> {
    gates: &'a Gates,
    layer: &'a SyncEngineLayer<fn(&Request) -> Mode<u8>, u8>,
    futures: &'a [Option<Future_>],
    polled: &'a [bool],
}

impl Seen<'_> {
    /// Whether `model` fits what the layer shows.
    fn fits(&self, model: &Model) -> Result<(), TestCaseError> {
        let gates = self.gates;
        prop_assert_eq!(gates.called(), model.called.clone(), "inner call order");
        prop_assert_eq!(
            gates.readiness_checks(),
            model.readiness_checks,
            "readiness checks"
        );
        for key in [None, Some(0), Some(1), Some(2)] {
            let running = gates.running(key);
            prop_assert_eq!(running, model.running(key), "handlers of {:?}", key);
            prop_assert!(
                key.is_none() || running <= model.permits,
                "{} of {:?}",
                running,
                key
            );
        }
        let keyed = gates.keyed_running();
        prop_assert_eq!(keyed, model.keyed_running(), "handlers on keys");
        if let Some(max) = model.max_in_flight {
            prop_assert!(
                keyed <= max,
                "{} handlers on keys, max_in_flight {}",
                keyed,
                max
            );
        }
        let stats = self.layer.stats();
        prop_assert_eq!((stats.keys, stats.in_flight, stats.queued), model.stats());
        prop_assert_eq!(
            stats.waiting_for_slot,
            model.waiting_for_slot().count(),
            "waiting_for_slot"
        );
        for (id, future) in self.futures.iter().enumerate() {
            if let Some(future) = future {
                if self.polled[id] && model.may_start(id) {
                    prop_assert!(
                        future.is_woken(),
                        "request {} may start but was not woken",
                        id
                    );
                }
            }
        }
        Ok(())
    }
}

/// Keeps the models that fit what the layer shows, once each; fails with the first
/// misfit when none does.
fn keep_fitting(models: Vec<Model>, seen: &Seen<'_>) -> Result<Vec<Model>, TestCaseError> {
    let mut kept: Vec<Model> = Vec::new();
    let mut misfit = None;
    for model in models {
        match seen.fits(&model) {
            Ok(()) if !kept.contains(&model) => kept.push(model),
            Ok(()) => {}
            Err(error) => {
                misfit.get_or_insert(error);
            }
        }
    }
    match misfit {
        Some(error) if kept.is_empty() => Err(error),
        _ => Ok(kept),
    }
}

/// Runs `ops` against the layer and the model, with `permits` per key and, if given,
/// `max_in_flight`; returns the order in which the inner service was called.
fn run(
    permits: usize,
    max_in_flight: Option<usize>,
    ops: Vec<Op>,
) -> Result<Vec<usize>, TestCaseError> {
    let gates = Gates::default();
    let layer = SyncEngineLayer::new((|request: &Request| request.0.clone()) as fn(&_) -> _)
        .permits_per_key(permits);
    let layer = match max_in_flight {
        Some(max) => layer.max_in_flight(max),
        None => layer,
    };
    let mut service = layer.layer(gates.clone());
    let mut models = vec![Model::new(permits, max_in_flight)];
    let mut futures: Vec<Option<Future_>> = Vec::new();
    let mut polled = Vec::new();

    for (step, op) in ops.into_iter().enumerate() {
        let count = futures.len();
        let shown = format!("step {step}, {op:?}");
        match op {
            Op::Call { .. } | Op::CallSet { .. } => {
                let mode = match op {
                    Op::Call { key: Some(key) } => Mode::Sync(key),
                    Op::Call { key: None } => Mode::Concurrent,
                    Op::CallSet {
                        keys,
                        by_hand: false,
                    } => Mode::sync_all(keys),
                    Op::CallSet {
                        keys,
                        by_hand: true,
                    } => Mode::SyncAll(Box::new(keys)),
                    _ => unreachable!("a call"),
                };
                let keys = keys_of(&mode);
                models = models
                    .into_iter()
                    .flat_map(|model| model.call(keys.clone()))
                    .collect();
                futures.push(Some(task::spawn(service.call((mode, count)))));
                polled.push(false);
            }
            Op::Poll(_) | Op::Drop(_) | Op::Complete(_) if count == 0 => continue,
            Op::Poll(i) => {
                let id = i % count;
                let Some(future) = futures[id].as_mut() else {
                    continue;
                };
                let outcome = match future.poll() {
                    Poll::Pending => Polled::Pending,
                    Poll::Ready(Ok(answer)) => {
                        prop_assert_eq!(answer, id);
                        Polled::Answered
                    }
                    Poll::Ready(Err(error)) => {
                        prop_assert_eq!(error.to_string(), NOT_READY);
                        Polled::Failed
                    }
                };
                let mut expected = None;
                models = models
                    .into_iter()
                    .flat_map(|model| {
                        let (predicted, models) = model.poll(id);
                        expected.get_or_insert(predicted);
                        models.into_iter().filter(move |_| predicted == outcome)
                    })
                    .collect();
                prop_assert!(
                    !models.is_empty(),
                    "{}: poll of request {}: {:?}, the model expected {:?}",
                    shown,
                    id,
                    outcome,
                    expected
                );
                polled[id] = true;
                if outcome != Polled::Pending {
                    futures[id] = None;
                }
            }
            Op::Drop(i) => {
                let id = i % count;
                if futures[id].take().is_some() {
                    models = models
                        .into_iter()
                        .flat_map(|model| model.finish(id, Status::Dropped))
                        .collect();
                }
            }
            Op::Complete(i) => {
                let id = i % count;
                // Every model fits the inner call order, so they agree on who runs.
                if models[0].status[id] == (Status::Running { completed: false }) {
                    for model in &mut models {
                        model.status[id] = Status::Running { completed: true };
                    }
                    gates.complete(id);
                }
            }
            Op::Ready(ready) => {
                for model in &mut models {
                    model.ready = ready;
                }
                gates.set_ready(ready);
            }
            Op::FailReadiness => {
                for model in &mut models {
                    model.fail_next = true;
                }
                gates.fail_next();
            }
        }

        let seen = Seen {
            gates: &gates,
            layer: &layer,
            futures: &futures,
            polled: &polled,
        };
        models = keep_fitting(models, &seen)
            .map_err(|error| TestCaseError::fail(format!("{shown}: {error}")))?;
    }

    // Liveness: make the inner service ready, complete everything and drive it; nothing
    // may be left stuck, and never more than `max_in_flight` handlers on keys run.
    gates.set_ready(true);
    for _ in 0..=futures.len() {
        for (id, slot) in futures.iter_mut().enumerate() {
            if let Some(future) = slot {
                gates.complete(id);
                if future.poll().is_ready() {
                    *slot = None;
                }
                let keyed = gates.keyed_running();
                prop_assert!(
                    max_in_flight.is_none_or(|max| keyed <= max),
                    "{} handlers on keys, max_in_flight {:?}",
                    keyed,
                    max_in_flight
                );
            }
        }
    }
    prop_assert!(futures.iter().all(Option::is_none), "requests left stuck");
    let stats = layer.stats();
    prop_assert!(stats.is_idle(), "{:?}", stats);
    prop_assert_eq!(stats.waiting_for_slot, 0, "{:?}", stats);
    for key in [None, Some(0), Some(1), Some(2)] {
        prop_assert_eq!(gates.running(key), 0, "handlers of {:?} left", key);
    }
    Ok(gates.called())
}

/// No `max_in_flight` half the time; else 1 to 3 slots for the domain.
fn max_in_flight() -> impl Strategy<Value = Option<usize>> {
    prop::option::of(1usize..=3)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn layer_matches_the_reference_model(
        permits in 1usize..=3,
        max_in_flight in max_in_flight(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        run(permits, max_in_flight, ops)?;
    }
}

/// Dropping the head while the next request was granted but not yet polled, with two
/// permits: the grant must move on to the third request in line.
#[test]
fn regression_grant_moves_past_a_dropped_granted_waiter() {
    use Op::*;
    let key = Some(0);
    let ops = vec![
        Call { key },
        Call { key },
        Call { key },
        Poll(1),
        Poll(2),
        Drop(1),
        Poll(0),
        Poll(2),
    ];
    for max_in_flight in [None, Some(1), Some(2)] {
        run(2, max_in_flight, ops.clone()).unwrap();
    }
}

/// A free key whose inner service is not ready: the request keeps its key while a second
/// one queues behind it and a Concurrent one runs; then its readiness check fails in its
/// response future, and the key passes on.
#[test]
fn a_request_waiting_for_readiness_keeps_its_key_until_the_check_fails() {
    use Op::*;
    let (key, concurrent) = (Some(0), None);
    let ops = vec![
        Ready(false),
        Call { key },
        Call { key },
        Poll(1),
        Poll(0),
        Ready(true),
        Call { key: concurrent },
        Poll(2),
        FailReadiness,
        Poll(0),
        Poll(1),
    ];
    for permits in 1..=3 {
        for max_in_flight in [None, Some(1), Some(2)] {
            run(permits, max_in_flight, ops.clone()).unwrap();
        }
    }
}

/// A set that heads key 0 and waits on key 1 is handed key 1 and dropped before it is
/// polled again; then a set in the other key order, and a request on each key, line up
/// behind the next holder: every key passes on, in call order, with any permits.
#[test]
fn a_set_handed_its_last_key_and_dropped_passes_every_key_on() {
    use Op::*;
    let set = |keys: Vec<u8>| CallSet {
        keys,
        by_hand: false,
    };
    let ops = vec![
        Call { key: Some(1) },
        set(vec![0, 1]),
        Call { key: Some(0) },
        Call { key: Some(1) },
        Poll(1),
        Poll(2),
        Poll(3),
        Complete(0),
        Poll(0),
        Drop(1),
        set(vec![1, 0, 1]),
        Poll(4),
        Poll(2),
        Poll(3),
        Complete(2),
        Complete(3),
        Poll(2),
        Poll(3),
        Poll(4),
    ];
    for permits in 1..=3 {
        for max_in_flight in [None, Some(1), Some(2)] {
            run(permits, max_in_flight, ops.clone()).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------
// `max_in_flight`: the order of grants, step by step, on top of the model's checks
// ---------------------------------------------------------------------------------------

/// Completes the running request `id` and polls it to its end.
fn finish_running(id: usize) -> [Op; 2] {
    [Op::Complete(id), Op::Poll(id)]
}

/// Two permits on key 0, two slots: key 0 runs request 0 and key 2 request 1. Request 2
/// (key 0) and then request 3 (key 1) are free on their keys and wait for a slot. When
/// key 2's request ends, its slot goes to key 1, which holds no slot, not to key 0, which
/// holds one, although request 2 has waited longer.
#[test]
fn a_freed_slot_goes_to_the_key_holding_the_fewest() {
    use Op::*;
    let mut ops = vec![
        Call { key: Some(0) },
        Call { key: Some(2) },
        Call { key: Some(0) },
        Call { key: Some(1) },
        Poll(0),
        Poll(1),
        Poll(2),
        Poll(3),
    ];
    ops.extend(finish_running(1));
    ops.extend([Poll(2), Poll(3)]);
    ops.extend(finish_running(3));
    ops.extend(finish_running(0));
    ops.extend([Poll(2)]);
    ops.extend(finish_running(2));
    assert_eq!(run(2, Some(2), ops).unwrap(), [0, 1, 3, 2]);
}

/// One slot. Request 1 waits behind request 0 on key 0; request 2 (key 1) waits for the
/// slot. When request 0 ends, request 1 has its turn, but key 0 was granted a slot and key
/// 1 never was: the slot goes to request 2. Request 3 (key 2) then waits for the slot,
/// after request 1: when request 2 ends (and key 1 goes idle), key 2, never granted one,
/// goes before key 0, although request 1 has waited longer.
#[test]
fn a_freed_slot_goes_to_the_key_granted_one_least_recently() {
    use Op::*;
    let mut ops = vec![
        Call { key: Some(0) },
        Call { key: Some(0) },
        Call { key: Some(1) },
        Poll(1),
        Poll(2),
    ];
    ops.extend(finish_running(0));
    ops.extend([Poll(2), Call { key: Some(2) }, Poll(3), Poll(1)]);
    ops.extend(finish_running(2));
    ops.extend([Poll(1), Poll(3)]);
    ops.extend(finish_running(3));
    ops.extend([Poll(1)]);
    ops.extend(finish_running(1));
    for permits in 1..=2 {
        assert_eq!(run(permits, Some(1), ops.clone()).unwrap(), [0, 2, 3, 1]);
    }
}

/// One slot. Requests 2 (key 1) and 4 (key 2) wait for it from `call()`; request 2,
/// which waited longer, is granted the slot freed by request 0 (key 0), and dropped before
/// it is polled: the slot passes on at once, to request 4, and the dropped grant does not
/// count for key 1. Requests 1 (key 0) and 3 (key 1), whose turns came meanwhile, ask for
/// a slot when polled, request 1 first; when request 4 ends, request 3 goes first all the
/// same: key 1 was never granted a slot it used, key 0 was.
#[test]
fn a_slot_granted_and_dropped_unused_passes_on_and_does_not_count() {
    use Op::*;
    let mut ops = vec![
        Call { key: Some(0) },
        Call { key: Some(0) },
        Call { key: Some(1) },
        Call { key: Some(1) },
        Call { key: Some(2) },
        Poll(1),
        Poll(2),
        Poll(3),
        Poll(4),
    ];
    ops.extend(finish_running(0));
    ops.extend([Drop(2), Poll(1), Poll(3), Poll(4)]);
    ops.extend(finish_running(4));
    ops.extend([Poll(3), Poll(1)]);
    ops.extend(finish_running(3));
    ops.extend([Poll(1)]);
    ops.extend(finish_running(1));
    assert_eq!(run(1, Some(1), ops).unwrap(), [0, 4, 3, 1]);
}

/// A set ranks by the most slots any of its keys holds. Three permits per key and three
/// slots: key 2 runs request 0, key 0 requests 1 and 2. The set on keys 0 and 1 (request
/// 3) and then request 4 (key 2) wait for a slot. When request 2 ends, the set's keys hold
/// one slot at most, as key 2 does; key 2 was granted one before key 0, so request 4 goes
/// first.
#[test]
fn a_set_ranks_by_the_busiest_of_its_keys() {
    use Op::*;
    let mut ops = vec![
        Call { key: Some(2) },
        Call { key: Some(0) },
        Call { key: Some(0) },
        CallSet {
            keys: vec![0, 1],
            by_hand: false,
        },
        Call { key: Some(2) },
        Poll(3),
        Poll(4),
    ];
    ops.extend(finish_running(2));
    ops.extend([Poll(3), Poll(4)]);
    ops.extend(finish_running(4));
    ops.extend([Poll(3)]);
    ops.extend(finish_running(3));
    assert_eq!(run(3, Some(3), ops).unwrap(), [0, 1, 2, 4, 3]);
}

/// One slot. Request 1 waits behind request 0 on key 0; when request 0 ends, request 1
/// has its turn, and is woken to ask for a slot on its next poll. Request 2, on key 1,
/// called before that poll, finds the freed slot and takes it inside `call()`; request 1,
/// polled then, waits for it.
#[test]
fn a_request_given_its_turn_asks_for_a_slot_on_its_next_poll() {
    use Op::*;
    let mut ops = vec![Call { key: Some(0) }, Call { key: Some(0) }, Poll(1)];
    ops.extend(finish_running(0));
    ops.extend([Call { key: Some(1) }, Poll(2), Poll(1)]);
    ops.extend(finish_running(2));
    ops.extend([Poll(1)]);
    ops.extend(finish_running(1));
    assert_eq!(run(1, Some(1), ops).unwrap(), [0, 2, 1]);
}

/// One slot, taken: a Concurrent request runs inside `call()` all the same, and a request
/// on a free key waits without its readiness being checked.
#[test]
fn concurrent_requests_take_no_slot() {
    use Op::*;
    let ops = vec![
        Call { key: Some(0) },
        Call { key: None },
        Call { key: Some(1) },
        Poll(2),
        Poll(1),
        Complete(1),
        Poll(1),
        Complete(0),
        Poll(0),
        Poll(2),
    ];
    assert_eq!(run(1, Some(1), ops).unwrap(), [0, 1, 2]);
}

/// One key, many calls and drops, few completions: long lines with holes in the middle,
/// so that lines are compacted while requests still wait and waiters are found by the
/// out-of-line binary search, with every step checked against the model. Some requests
/// name a second key too, and hold their place in both lines.
fn long_line_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Call { key: Some(0) }),
        1 => Just(Op::Call { key: Some(1) }),
        1 => Just(Op::CallSet {
            keys: vec![1, 0],
            by_hand: false,
        }),
        2 => any::<usize>().prop_map(Op::Poll),
        5 => any::<usize>().prop_map(Op::Drop),
        1 => any::<usize>().prop_map(Op::Complete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn long_lines_with_holes_match_the_reference_model(
        permits in 1usize..=3,
        max_in_flight in max_in_flight(),
        ops in prop::collection::vec(long_line_op(), 150..400),
    ) {
        run(permits, max_in_flight, ops)?;
    }
}
