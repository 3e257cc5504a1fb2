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
//! After every step the test checks the order in which the inner service was called, how
//! often its readiness was checked, the handlers running per key, `stats()`, and that
//! every request the model says may start now has been woken. At the end every request
//! must complete and the layer must be idle.

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
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Status {
    /// Not started: waits for its turn, or for readiness.
    Pending,
    /// Its readiness check failed inside `call()`: it returns the error when polled.
    Failed,
    Running {
        completed: bool,
    },
    Done,
    Dropped,
}

/// What a poll of a response future gives.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Polled {
    Pending,
    Answered,
    Failed,
}

/// The reference model.
struct Model {
    permits: usize,
    /// Each request's distinct keys; none for a Concurrent request.
    keys_of: Vec<Vec<u8>>,
    status: Vec<Status>,
    not_started: HashMap<u8, VecDeque<usize>>,
    running: HashMap<Option<u8>, usize>,
    called: Vec<usize>,
    ready: bool,
    fail_next: bool,
    readiness_checks: usize,
}

impl Model {
    fn new(permits: usize) -> Self {
        Model {
            permits,
            keys_of: Vec::new(),
            status: Vec::new(),
            not_started: HashMap::new(),
            running: HashMap::new(),
            called: Vec::new(),
            ready: true,
            fail_next: false,
            readiness_checks: 0,
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

    /// Polled now, the request would start or fail: it must have been woken.
    fn may_start(&self, id: usize) -> bool {
        self.status[id] == Status::Pending && self.has_turn(id) && (self.ready || self.fail_next)
    }

    /// The request `id`, which has its turn, checks readiness and starts if it is ready.
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

    /// A new request on `keys` (distinct); returns its id.
    fn call(&mut self, keys: Vec<u8>) -> usize {
        let id = self.status.len();
        for &key in &keys {
            self.not_started.entry(key).or_default().push_back(id);
        }
        self.keys_of.push(keys);
        self.status.push(Status::Pending);
        if self.has_turn(id) && self.try_start(id) == Poll::Ready(Err(())) {
            self.status[id] = Status::Failed;
        }
        id
    }

    fn poll(&mut self, id: usize) -> Polled {
        match self.status[id] {
            Status::Pending if self.has_turn(id) => match self.try_start(id) {
                Poll::Ready(Err(())) => {
                    self.finish(id, Status::Done);
                    Polled::Failed
                }
                _ => Polled::Pending,
            },
            Status::Failed => {
                self.finish(id, Status::Done);
                Polled::Failed
            }
            Status::Running { completed: true } => {
                self.finish(id, Status::Done);
                Polled::Answered
            }
            _ => Polled::Pending,
        }
    }

    /// The request ends as `status`: it leaves each of its keys' lines, or its permits
    /// are free.
    fn finish(&mut self, id: usize, status: Status) {
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
        self.status[id] = status;
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

fn run(permits: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let gates = Gates::default();
    let layer =
        SyncEngineLayer::new(|request: &Request| request.0.clone()).permits_per_key(permits);
    let mut service = layer.layer(gates.clone());
    let mut model = Model::new(permits);
    let mut futures: Vec<Option<Future_>> = Vec::new();
    let mut polled = Vec::new();

    for op in ops {
        let count = futures.len();
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
                let id = model.call(keys_of(&mode));
                futures.push(Some(task::spawn(service.call((mode, id)))));
                polled.push(false);
            }
            Op::Poll(_) | Op::Drop(_) | Op::Complete(_) if count == 0 => continue,
            Op::Poll(i) => {
                let id = i % count;
                let Some(future) = futures[id].as_mut() else {
                    continue;
                };
                let expected = model.poll(id);
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
                prop_assert_eq!(outcome, expected, "poll of request {}", id);
                polled[id] = true;
                if outcome != Polled::Pending {
                    futures[id] = None;
                }
            }
            Op::Drop(i) => {
                let id = i % count;
                if futures[id].take().is_some() {
                    model.finish(id, Status::Dropped);
                }
            }
            Op::Complete(i) => {
                let id = i % count;
                if model.status[id] == (Status::Running { completed: false }) {
                    model.status[id] = Status::Running { completed: true };
                    gates.complete(id);
                }
            }
            Op::Ready(ready) => {
                model.ready = ready;
                gates.set_ready(ready);
            }
            Op::FailReadiness => {
                model.fail_next = true;
                gates.fail_next();
            }
        }

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
                key.is_none() || running <= permits,
                "{} of {:?}",
                running,
                key
            );
        }
        let stats = layer.stats();
        prop_assert_eq!((stats.keys, stats.in_flight, stats.queued), model.stats());
        for (id, future) in futures.iter().enumerate() {
            if let Some(future) = future {
                if polled[id] && model.may_start(id) {
                    prop_assert!(
                        future.is_woken(),
                        "request {} may start but was not woken",
                        id
                    );
                }
            }
        }
    }

    // Liveness: make the inner service ready, complete everything and drive it; nothing
    // may be left stuck.
    gates.set_ready(true);
    for _ in 0..=futures.len() {
        for (id, slot) in futures.iter_mut().enumerate() {
            if let Some(future) = slot {
                gates.complete(id);
                if future.poll().is_ready() {
                    *slot = None;
                }
            }
        }
    }
    prop_assert!(futures.iter().all(Option::is_none), "requests left stuck");
    prop_assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    for key in [None, Some(0), Some(1), Some(2)] {
        prop_assert_eq!(gates.running(key), 0, "handlers of {:?} left", key);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn layer_matches_the_reference_model(
        permits in 1usize..=3,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        run(permits, ops)?;
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
    run(2, ops).unwrap();
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
        run(permits, ops.clone()).unwrap();
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
        run(permits, ops.clone()).unwrap();
    }
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
        ops in prop::collection::vec(long_line_op(), 150..400),
    ) {
        run(permits, ops)?;
    }
}
