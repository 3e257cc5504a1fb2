//! Property test: random sequences of call / poll / drop / complete over a few keys,
//! checked step by step against a reference model of the contract.
//!
//! The model is the contract in its simplest form: per key, the requests not yet
//! started form a FIFO in call order; a request whose key has nobody waiting and a free
//! permit starts in `call()` (the inner service is ready); otherwise the front one starts
//! when it is polled and fewer than `permits` of its key are running; a running request
//! holds its permit until its response future is polled to completion or dropped. After every step the test
//! checks the order in which the inner service was called, readiness, `stats()`, and
//! that every request the model says may start now has been woken.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use proptest::prelude::*;
use tokio_test::task::{self, Spawn};
use tower::{Layer, Service};
use tower_sync_engine::{Mode, SyncEngineLayer};

#[derive(Debug, Clone)]
enum Op {
    Call { key: u8 },
    Poll(usize),
    Drop(usize),
    Complete(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3).prop_map(|key| Op::Call { key }),
        4 => any::<usize>().prop_map(Op::Poll),
        1 => any::<usize>().prop_map(Op::Drop),
        2 => any::<usize>().prop_map(Op::Complete),
    ]
}

/// The inner service: records when it is called; each handler finishes only once the
/// test completes it.
#[derive(Clone, Default)]
struct Gates {
    state: Arc<Mutex<GateState>>,
}

#[derive(Default)]
struct GateState {
    called: Vec<usize>,
    completed: HashSet<usize>,
    wakers: HashMap<usize, Waker>,
}

struct GateFuture {
    id: usize,
    gates: Gates,
}

impl Service<(u8, usize)> for Gates {
    type Response = usize;
    type Error = std::convert::Infallible;
    type Future = GateFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (_, id): (u8, usize)) -> GateFuture {
        self.state.lock().unwrap().called.push(id);
        GateFuture {
            id,
            gates: self.clone(),
        }
    }
}

impl Future for GateFuture {
    type Output = Result<usize, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.gates.state.lock().unwrap();
        if state.completed.contains(&self.id) {
            return Poll::Ready(Ok(self.id));
        }
        state.wakers.insert(self.id, cx.waker().clone());
        Poll::Pending
    }
}

impl Gates {
    fn complete(&self, id: usize) {
        let mut state = self.state.lock().unwrap();
        state.completed.insert(id);
        if let Some(waker) = state.wakers.remove(&id) {
            waker.wake();
        }
    }

    fn called(&self) -> Vec<usize> {
        self.state.lock().unwrap().called.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Status {
    Pending,
    Running { completed: bool },
    Done,
    Dropped,
}

/// The reference model.
struct Model {
    permits: usize,
    key_of: Vec<u8>,
    status: Vec<Status>,
    not_started: HashMap<u8, VecDeque<usize>>,
    running: HashMap<u8, usize>,
    called: Vec<usize>,
}

impl Model {
    fn may_start(&self, id: usize) -> bool {
        let key = self.key_of[id];
        self.status[id] == Status::Pending
            && self.not_started[&key].front() == Some(&id)
            && self.running.get(&key).copied().unwrap_or(0) < self.permits
    }

    /// (keys, in_flight, queued) as the contract defines them.
    fn stats(&self) -> (usize, usize, usize) {
        let mut totals = (0, 0, 0);
        for (key, waiting) in &self.not_started {
            let running = self.running.get(key).copied().unwrap_or(0);
            if running + waiting.len() == 0 {
                continue;
            }
            let holding = (running + waiting.len()).min(self.permits);
            totals.0 += 1;
            totals.1 += holding;
            totals.2 += running + waiting.len() - holding;
        }
        totals
    }
}

type Future_ = Spawn<tower_sync_engine::ResponseFuture<Gates, (u8, usize), u8>>;

fn run(permits: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let gates = Gates::default();
    let layer = SyncEngineLayer::new(|request: &(u8, usize)| Mode::Sync(request.0))
        .permits_per_key(permits);
    let mut service = layer.layer(gates.clone());
    let mut model = Model {
        permits,
        key_of: Vec::new(),
        status: Vec::new(),
        not_started: HashMap::new(),
        running: HashMap::new(),
        called: Vec::new(),
    };
    let mut futures: Vec<Option<Future_>> = Vec::new();
    let mut polled = Vec::new();

    for op in ops {
        let count = futures.len();
        match op {
            Op::Call { key } => {
                let id = count;
                futures.push(Some(task::spawn(service.call((key, id)))));
                polled.push(false);
                model.key_of.push(key);
                model.status.push(Status::Pending);
                model.not_started.entry(key).or_default().push_back(id);
                if model.may_start(id) {
                    // The key was free: the request started inside `call()`.
                    model.not_started.get_mut(&key).unwrap().pop_front();
                    *model.running.entry(key).or_default() += 1;
                    model.status[id] = Status::Running { completed: false };
                    model.called.push(id);
                }
            }
            Op::Poll(_) | Op::Drop(_) | Op::Complete(_) if count == 0 => continue,
            Op::Poll(i) => {
                let id = i % count;
                let Some(future) = futures[id].as_mut() else {
                    continue;
                };
                let key = model.key_of[id];
                let expected_ready = match model.status[id] {
                    Status::Pending if model.may_start(id) => {
                        model.not_started.get_mut(&key).unwrap().pop_front();
                        *model.running.entry(key).or_default() += 1;
                        model.status[id] = Status::Running { completed: false };
                        model.called.push(id);
                        false
                    }
                    Status::Running { completed: true } => {
                        *model.running.get_mut(&key).unwrap() -= 1;
                        model.status[id] = Status::Done;
                        true
                    }
                    _ => false,
                };
                let ready = match future.poll() {
                    Poll::Ready(output) => {
                        prop_assert_eq!(output.unwrap(), id);
                        true
                    }
                    Poll::Pending => false,
                };
                prop_assert_eq!(ready, expected_ready, "poll of request {}", id);
                polled[id] = true;
                if ready {
                    futures[id] = None;
                }
            }
            Op::Drop(i) => {
                let id = i % count;
                if futures[id].take().is_none() {
                    continue;
                }
                let key = model.key_of[id];
                match model.status[id] {
                    Status::Pending => {
                        model
                            .not_started
                            .get_mut(&key)
                            .unwrap()
                            .retain(|&x| x != id);
                    }
                    Status::Running { .. } => *model.running.get_mut(&key).unwrap() -= 1,
                    Status::Done | Status::Dropped => unreachable!("its future is gone"),
                }
                model.status[id] = Status::Dropped;
            }
            Op::Complete(i) => {
                let id = i % count;
                if model.status[id] == (Status::Running { completed: false }) {
                    model.status[id] = Status::Running { completed: true };
                    gates.complete(id);
                }
            }
        }

        prop_assert_eq!(gates.called(), model.called.clone(), "inner call order");
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

    // Liveness: complete everything and drive it; nothing may be left stuck.
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
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

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
    let ops = vec![
        Call { key: 0 },
        Call { key: 0 },
        Call { key: 0 },
        Poll(1),
        Poll(2),
        Drop(1),
        Poll(0),
        Poll(2),
    ];
    run(2, ops).unwrap();
}

/// One key, many calls and drops, few completions: long lines with holes in the middle,
/// so that lines are compacted while requests still wait and waiters are found by the
/// out-of-line binary search, with every step checked against the model.
fn long_line_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Call { key: 0 }),
        1 => Just(Op::Call { key: 1 }),
        2 => any::<usize>().prop_map(Op::Poll),
        5 => any::<usize>().prop_map(Op::Drop),
        1 => any::<usize>().prop_map(Op::Complete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn long_lines_with_holes_match_the_reference_model(
        permits in 1usize..=3,
        ops in prop::collection::vec(long_line_op(), 150..400),
    ) {
        run(permits, ops)?;
    }
}
