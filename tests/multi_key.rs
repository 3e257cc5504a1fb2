//! `Mode::sync_all`: a request ordered on several keys at once. Its place is taken on
//! every key inside `call()`, it is called once it heads every one of its keys, and
//! cancellation, limits, the HTTP flavour, foreign code, `stats()` and the tracing events
//! treat each key of the set as they treat the key of a `Mode::Sync` request.
//!
//! Most tests drive the response futures by hand, with an inner service whose handlers
//! finish only when the test says so, and assert each step exactly.

#[path = "support/sets.rs"]
mod sets;
mod support;

use std::collections::HashMap;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use sets::{Finishes, Policy, Req, all, counts, keys_of, layer, one};
use support::{KEY_DROP_PANIC, Key, Rng};
use tokio_test::task::{self, Spawn};
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service};
use tower_sync_engine::error::{BoxError, Limit, Overloaded};
use tower_sync_engine::{Mode, ResponseFuture, SyncEngine, SyncEngineLayer};

// ---------------------------------------------------------------------------------------
// The harness: requests that carry their mode, and handlers the test finishes.
// ---------------------------------------------------------------------------------------

/// A `Mode::SyncAll` built by hand, whatever the number of keys.
fn set(id: u64, keys: impl IntoIterator<Item = u64>) -> Req {
    Req {
        id,
        mode: Mode::SyncAll(Box::new(keys.into_iter().collect())),
    }
}

/// What the inner service saw: a handler called, and a handler gone (completed or
/// dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Called(u64),
    Ended(u64),
}

/// The inner service: logs each call and the end of each handler, counts the handlers
/// running per key, and lets a handler finish only once the test calls `finish`.
#[derive(Clone, Default)]
struct Handlers {
    state: Arc<Mutex<HandlerState>>,
}

#[derive(Default)]
struct HandlerState {
    log: Vec<Step>,
    finishes: Finishes,
    running: HashMap<u64, usize>,
    max_running: HashMap<u64, usize>,
}

struct Handler {
    id: u64,
    keys: Vec<u64>,
    handlers: Handlers,
}

impl Service<Req> for Handlers {
    type Response = u64;
    type Error = BoxError;
    type Future = Handler;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Handler {
        let keys = keys_of(&request.mode);
        let mut state = self.state.lock().unwrap();
        state.log.push(Step::Called(request.id));
        for &key in &keys {
            let running = state.running.entry(key).or_default();
            *running += 1;
            let now = *running;
            let max = state.max_running.entry(key).or_default();
            *max = (*max).max(now);
        }
        Handler {
            id: request.id,
            keys,
            handlers: self.clone(),
        }
    }
}

impl Future for Handler {
    type Output = Result<u64, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.handlers.state.lock().unwrap();
        state.finishes.poll(self.id, cx).map(Ok)
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let mut state = self.handlers.state.lock().unwrap();
        state.log.push(Step::Ended(self.id));
        for key in &self.keys {
            *state.running.get_mut(key).unwrap() -= 1;
        }
    }
}

impl Handlers {
    /// Lets the handler of `id` complete, now or whenever it is called.
    fn finish(&self, id: u64) {
        let waker = self.state.lock().unwrap().finishes.finish(id);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The ids the inner service was called with, in order.
    fn called(&self) -> Vec<u64> {
        self.log()
            .into_iter()
            .filter_map(|step| match step {
                Step::Called(id) => Some(id),
                Step::Ended(_) => None,
            })
            .collect()
    }

    /// The ids called and not yet let finish, in call order.
    fn unfinished(&self) -> Vec<u64> {
        let called = self.called();
        let state = self.state.lock().unwrap();
        called
            .into_iter()
            .filter(|id| !state.finishes.is_finished(*id))
            .collect()
    }

    fn log(&self) -> Vec<Step> {
        self.state.lock().unwrap().log.clone()
    }

    fn max_running(&self, key: u64) -> usize {
        let state = self.state.lock().unwrap();
        state.max_running.get(&key).copied().unwrap_or(0)
    }
}

type Engine = SyncEngine<Handlers, Policy, u64>;
type Call = Spawn<ResponseFuture<Handlers, Req, u64>>;

/// A service of `layer` over fresh handlers.
fn serve(layer: &SyncEngineLayer<Policy, u64>) -> (Engine, Handlers) {
    let handlers = Handlers::default();
    (layer.layer(handlers.clone()), handlers)
}

fn call(service: &mut Engine, request: Req) -> Call {
    task::spawn(service.call(request))
}

/// Finishes the handler of `id` and polls its response future to its answer.
fn complete(handlers: &Handlers, id: u64, future: &mut Call) {
    handlers.finish(id);
    assert_eq!(assert_ready_ok!(future.poll()), id);
}

/// The limit that rejected a request in `call()`: its future is ready at its first poll.
fn rejection(future: ResponseFuture<Handlers, Req, u64>) -> Limit {
    match futures::FutureExt::now_or_never(future) {
        Some(Err(error)) => error
            .downcast_ref::<Overloaded>()
            .unwrap_or_else(|| panic!("not Overloaded: {error}"))
            .limit(),
        Some(Ok(id)) => panic!("request {id} ran instead of being rejected"),
        None => panic!("the request was queued instead of being rejected"),
    }
}

/// Every pair of `requests` (in call order) that shares a key ran one after the other:
/// the later one was called only after the earlier one's handler was gone.
fn assert_one_order_on_every_key(log: &[Step], requests: &[Req]) {
    let at = |step: Step| log.iter().position(|&logged| logged == step);
    for (i, earlier) in requests.iter().enumerate() {
        for later in &requests[i + 1..] {
            let shared: Vec<u64> = keys_of(&later.mode)
                .into_iter()
                .filter(|key| keys_of(&earlier.mode).contains(key))
                .collect();
            if shared.is_empty() {
                continue;
            }
            let called = at(Step::Called(later.id))
                .unwrap_or_else(|| panic!("request {} never ran: {log:?}", later.id));
            let ended = at(Step::Ended(earlier.id))
                .unwrap_or_else(|| panic!("request {} never ended: {log:?}", earlier.id));
            assert!(
                ended < called,
                "request {} (keys {shared:?} shared with {}) ran before {} ended: {log:?}",
                later.id,
                earlier.id,
                earlier.id
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Order on every key
// ---------------------------------------------------------------------------------------

#[test]
fn a_multi_key_request_is_called_only_once_it_heads_every_one_of_its_keys() {
    for first_free in [1, 2] {
        let layer = layer();
        let (mut service, handlers) = serve(&layer);
        let mut holders = HashMap::from([
            (1, call(&mut service, one(1, 1))),
            (2, call(&mut service, one(2, 2))),
        ]);
        let mut transfer = call(&mut service, all(3, [1, 2]));
        assert_pending!(transfer.poll());
        assert_eq!(handlers.called(), [1, 2]);
        assert_eq!(counts(layer.stats()), (2, 2, 2));

        // One key comes free: the transfer heads it (and holds its permit), but the other
        // key is still taken.
        let other_free = 3 - first_free;
        complete(&handlers, first_free, holders.get_mut(&first_free).unwrap());
        assert!(transfer.is_woken());
        assert_pending!(transfer.poll());
        assert_eq!(handlers.called(), [1, 2], "called heading one key of two");
        assert_eq!(counts(layer.stats()), (2, 2, 1));

        complete(&handlers, other_free, holders.get_mut(&other_free).unwrap());
        assert!(transfer.is_woken());
        assert_pending!(transfer.poll());
        assert_eq!(handlers.called(), [1, 2, 3]);
        assert_eq!(counts(layer.stats()), (2, 2, 0));
        complete(&handlers, 3, &mut transfer);
        assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    }
}

#[test]
fn later_requests_on_any_of_its_keys_wait_for_a_multi_key_request() {
    let layer = layer();
    let (mut service, handlers) = serve(&layer);
    // Both keys free: called inside `call()`.
    let mut transfer = call(&mut service, all(1, [1, 2]));
    let mut on_one = call(&mut service, one(2, 1));
    let mut on_two = call(&mut service, one(3, 2));
    let mut elsewhere = call(&mut service, one(4, 3));
    let mut across = call(&mut service, all(5, [2, 3]));
    for future in [&mut on_one, &mut on_two, &mut across] {
        assert_pending!(future.poll());
    }
    assert_eq!(
        handlers.called(),
        [1, 4],
        "only a key it does not name is free"
    );
    assert_eq!(counts(layer.stats()), (3, 3, 4));

    complete(&handlers, 1, &mut transfer);
    assert!(on_one.is_woken() && on_two.is_woken());
    assert_pending!(on_one.poll());
    assert_pending!(on_two.poll());
    assert_eq!(handlers.called(), [1, 4, 2, 3]);

    // `across` waits for `on_two` on key 2 and `elsewhere` on key 3.
    complete(&handlers, 4, &mut elsewhere);
    assert_pending!(across.poll());
    complete(&handlers, 2, &mut on_one);
    complete(&handlers, 3, &mut on_two);
    assert!(across.is_woken());
    assert_pending!(across.poll());
    assert_eq!(handlers.called(), [1, 4, 2, 3, 5]);
    complete(&handlers, 5, &mut across);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

#[test]
fn key_order_inside_a_set_does_not_matter() {
    let orders: [[u64; 3]; 6] = [
        [1, 2, 3],
        [1, 3, 2],
        [2, 1, 3],
        [2, 3, 1],
        [3, 1, 2],
        [3, 2, 1],
    ];
    for first in orders {
        for second in orders {
            let label = format!("{first:?} then {second:?}");
            let layer = layer();
            let (mut service, handlers) = serve(&layer);
            let mut a = call(&mut service, all(1, first));
            let mut b = call(&mut service, all(2, second));
            let mut on_one = call(&mut service, one(3, 1));
            let mut on_three = call(&mut service, one(4, 3));
            for future in [&mut b, &mut on_one, &mut on_three] {
                assert_pending!(future.poll());
            }
            assert_eq!(handlers.called(), [1], "{label}");
            assert_eq!(counts(layer.stats()), (3, 3, 5), "{label}");

            complete(&handlers, 1, &mut a);
            assert_pending!(b.poll());
            assert_pending!(on_one.poll());
            assert_pending!(on_three.poll());
            assert_eq!(handlers.called(), [1, 2], "{label}");

            complete(&handlers, 2, &mut b);
            assert_pending!(on_one.poll());
            assert_pending!(on_three.poll());
            assert_eq!(handlers.called(), [1, 2, 3, 4], "{label}");
            complete(&handlers, 3, &mut on_one);
            complete(&handlers, 4, &mut on_three);
            assert!(layer.stats().is_idle(), "{label}: {:?}", layer.stats());
        }
    }
}

/// Requests over five keys: single keys, sets of two and three in any order, duplicates.
fn mixed_request(rng: &mut Rng, id: u64) -> Req {
    let mut keys: Vec<u64> = (0..=rng.below(3)).map(|_| rng.below(5)).collect();
    match rng.below(4) {
        0 => one(id, keys[0]),
        1 => set(id, keys),
        _ => {
            keys.push(rng.below(5));
            all(id, keys)
        }
    }
}

#[test]
fn overlapping_sets_keep_one_order_on_every_key_however_they_are_polled() {
    for seed in 0..64 {
        let mut rng = Rng::new(seed);
        let layer = layer();
        let (mut service, handlers) = serve(&layer);
        let requests: Vec<Req> = (0..24).map(|id| mixed_request(&mut rng, id)).collect();
        let mut futures: Vec<Option<Call>> = requests
            .iter()
            .map(|request| Some(call(&mut service, request.clone())))
            .collect();
        // Polled in reverse, and finished in a random order among those running.
        let mut rounds = 0;
        while futures.iter().any(Option::is_some) {
            rounds += 1;
            assert!(rounds < 1_000, "seed {seed}: stuck: {:?}", handlers.log());
            for slot in futures.iter_mut().rev() {
                if let Some(future) = slot {
                    if future.poll().is_ready() {
                        *slot = None;
                    }
                }
            }
            let running = handlers.unfinished();
            if !running.is_empty() {
                handlers.finish(running[rng.below(running.len() as u64) as usize]);
            }
        }
        assert_one_order_on_every_key(&handlers.log(), &requests);
        for key in 0..5 {
            assert!(handlers.max_running(key) <= 1, "seed {seed}, key {key}");
        }
        assert!(layer.stats().is_idle(), "seed {seed}: {:?}", layer.stats());
    }
}

#[test]
fn two_permits_per_key_mean_two_on_each_key_of_a_set() {
    let layer = layer().permits_per_key(2);
    let (mut service, handlers) = serve(&layer);
    let mut a = call(&mut service, one(1, 1));
    // Key 1 has a free permit and key 2 is free: called at once.
    let mut t = call(&mut service, all(2, [1, 2]));
    let mut b = call(&mut service, one(3, 1));
    let mut c = call(&mut service, one(4, 2));
    let mut u = call(&mut service, all(5, [2, 1]));
    let mut d = call(&mut service, one(6, 2));
    for future in [&mut a, &mut t, &mut b, &mut c, &mut u, &mut d] {
        assert_pending!(future.poll());
    }
    assert_eq!(handlers.called(), [1, 2, 4]);
    // Key 1: a and t hold its permits, b and u wait. Key 2: t and c hold them, u and d
    // wait.
    assert_eq!(counts(layer.stats()), (2, 4, 4));

    complete(&handlers, 1, &mut a);
    assert_pending!(b.poll());
    assert_pending!(u.poll());
    assert_eq!(handlers.called(), [1, 2, 4, 3]);

    // A permit of key 2 comes free: u is next there, but key 1 is full, so u waits and
    // keeps d behind it although key 2 has a free permit.
    complete(&handlers, 4, &mut c);
    assert_pending!(u.poll());
    assert_pending!(d.poll());
    assert_eq!(handlers.called(), [1, 2, 4, 3]);
    assert_eq!(counts(layer.stats()), (2, 4, 2));

    complete(&handlers, 2, &mut t);
    assert_pending!(u.poll());
    assert_pending!(d.poll());
    assert_eq!(handlers.called(), [1, 2, 4, 3, 5, 6]);
    assert_eq!(counts(layer.stats()), (2, 4, 0));
    for (id, future) in [(3, &mut b), (5, &mut u), (6, &mut d)] {
        complete(&handlers, id, future);
    }
    assert_eq!((handlers.max_running(1), handlers.max_running(2)), (2, 2));
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

// ---------------------------------------------------------------------------------------
// Duplicates, empty sets, sets of one key
// ---------------------------------------------------------------------------------------

#[test]
fn duplicated_keys_count_once() {
    let layer = layer();
    let (mut service, handlers) = serve(&layer);
    let mut repeated = call(&mut service, set(1, [1, 1, 1]));
    assert_pending!(repeated.poll());
    assert_eq!(handlers.called(), [1]);
    assert_eq!(counts(layer.stats()), (1, 1, 0));

    // One place on each distinct key, whatever the repetitions.
    let mut pair = call(&mut service, all(2, [2, 3, 2, 3, 3]));
    assert_pending!(pair.poll());
    assert_eq!(handlers.called(), [1, 2]);
    assert_eq!(counts(layer.stats()), (3, 3, 0));

    let mut waiting = call(&mut service, all(3, [1, 2, 1, 1]));
    assert_pending!(waiting.poll());
    assert_eq!(counts(layer.stats()), (3, 3, 2), "one place per key");

    complete(&handlers, 1, &mut repeated);
    assert_pending!(waiting.poll());
    assert_eq!(counts(layer.stats()), (3, 3, 1));
    complete(&handlers, 2, &mut pair);
    assert_pending!(waiting.poll());
    assert_eq!(handlers.called(), [1, 2, 3]);
    assert_eq!(counts(layer.stats()), (2, 2, 0));
    complete(&handlers, 3, &mut waiting);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

#[test]
fn an_empty_set_built_by_hand_is_concurrent() {
    assert_eq!(Mode::<u64>::sync_all([]), Mode::Concurrent);
    let layer = layer();
    let (mut service, handlers) = serve(&layer);
    let mut holder = call(&mut service, one(1, 1));
    let mut queued = call(&mut service, all(2, [1, 2]));
    assert_pending!(queued.poll());
    let before = layer.stats();

    // Called inside `call()` although every key is busy, and counted nowhere.
    let mut empty = call(&mut service, set(3, []));
    assert_eq!(handlers.called(), [1, 3]);
    assert_eq!(layer.stats(), before);
    complete(&handlers, 3, &mut empty);
    assert_eq!(layer.stats(), before);

    complete(&handlers, 1, &mut holder);
    assert_pending!(queued.poll());
    complete(&handlers, 2, &mut queued);
    assert_eq!(handlers.called(), [1, 3, 2]);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

#[test]
fn a_set_of_one_key_is_mode_sync() {
    assert_eq!(Mode::sync_all([7]), Mode::Sync(7));
    assert_eq!(Mode::sync_all(vec![7]), Mode::Sync(7));
    // Built by hand, or of one key repeated, it still lines up with `Mode::Sync`
    // requests of that key, and counts as one of them.
    for alone in [set(2, [7]), set(2, [7, 7])] {
        let layer = layer();
        let (mut service, handlers) = serve(&layer);
        let mut first = call(&mut service, one(1, 7));
        let mut second = call(&mut service, alone);
        let mut third = call(&mut service, one(3, 7));
        assert_pending!(second.poll());
        assert_pending!(third.poll());
        assert_eq!(counts(layer.stats()), (1, 1, 2));
        complete(&handlers, 1, &mut first);
        assert_pending!(second.poll());
        assert_pending!(third.poll());
        assert_eq!(handlers.called(), [1, 2]);
        assert_eq!(counts(layer.stats()), (1, 1, 1));
        complete(&handlers, 2, &mut second);
        assert_pending!(third.poll());
        complete(&handlers, 3, &mut third);
        assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    }
}

// ---------------------------------------------------------------------------------------
// The convoy
// ---------------------------------------------------------------------------------------

#[test]
fn a_later_request_on_a_free_key_waits_behind_a_multi_key_request_waiting_for_another() {
    for permits in [1, 2] {
        let layer = layer().permits_per_key(permits);
        let (mut service, handlers) = serve(&layer);
        // Key 2 is full; key 1 is free.
        let mut holders: Vec<Call> = (0..permits as u64)
            .map(|id| call(&mut service, one(10 + id, 2)))
            .collect();
        let mut transfer = call(&mut service, all(1, [1, 2]));
        let mut deposit = call(&mut service, one(2, 1));
        assert_pending!(transfer.poll());
        assert_pending!(deposit.poll());
        // Nothing runs on key 1, yet the deposit waits: the transfer, ahead of it, holds
        // key 1 while it waits for key 2.
        assert_eq!(handlers.called().len(), permits);
        assert_eq!(
            counts(layer.stats()),
            (2, permits + 1, 2),
            "{permits} permits"
        );

        for (id, holder) in (10..).zip(&mut holders) {
            complete(&handlers, id, holder);
        }
        assert!(transfer.is_woken());
        assert_pending!(transfer.poll());
        assert_eq!(handlers.called()[permits..], [1]);
        if permits == 1 {
            assert!(!deposit.is_woken());
            complete(&handlers, 1, &mut transfer);
        }
        // With two permits, the deposit runs beside the transfer once it has started.
        assert!(deposit.is_woken());
        assert_pending!(deposit.poll());
        assert_eq!(handlers.called()[permits..], [1, 2]);
        if permits == 2 {
            complete(&handlers, 1, &mut transfer);
        }
        complete(&handlers, 2, &mut deposit);
        assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    }
}

// ---------------------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------------------

#[test]
fn dropping_a_multi_key_request_queued_on_every_key_frees_each_place() {
    let layer = layer();
    let (mut service, handlers) = serve(&layer);
    let mut on_one = call(&mut service, one(1, 1));
    let mut on_two = call(&mut service, one(2, 2));
    let mut transfer = call(&mut service, all(3, [1, 2]));
    let mut next_one = call(&mut service, one(4, 1));
    let mut next_two = call(&mut service, one(5, 2));
    for future in [&mut transfer, &mut next_one, &mut next_two] {
        assert_pending!(future.poll());
    }
    assert_eq!(counts(layer.stats()), (2, 2, 4));

    drop(transfer);
    assert_eq!(counts(layer.stats()), (2, 2, 2));
    complete(&handlers, 1, &mut on_one);
    assert!(next_one.is_woken());
    assert_pending!(next_one.poll());
    complete(&handlers, 2, &mut on_two);
    assert!(next_two.is_woken());
    assert_pending!(next_two.poll());
    assert_eq!(handlers.called(), [1, 2, 4, 5]);
    complete(&handlers, 4, &mut next_one);
    complete(&handlers, 5, &mut next_two);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

#[test]
fn dropping_a_multi_key_request_that_heads_some_keys_passes_them_on_at_once() {
    let layer = layer();
    let (mut service, handlers) = serve(&layer);
    let mut on_two = call(&mut service, one(1, 2));
    // Heads keys 1 and 3 (free when it was called), waits on key 2.
    let mut transfer = call(&mut service, all(2, [1, 2, 3]));
    let mut next_one = call(&mut service, one(3, 1));
    let mut next_two = call(&mut service, one(4, 2));
    let mut next_three = call(&mut service, one(5, 3));
    for future in [&mut transfer, &mut next_one, &mut next_two, &mut next_three] {
        assert_pending!(future.poll());
    }
    assert_eq!(counts(layer.stats()), (3, 3, 4));

    drop(transfer);
    assert!(next_one.is_woken() && next_three.is_woken());
    assert!(!next_two.is_woken());
    assert_eq!(counts(layer.stats()), (3, 3, 1));
    assert_pending!(next_one.poll());
    assert_pending!(next_three.poll());
    assert_pending!(next_two.poll());
    assert_eq!(handlers.called(), [1, 3, 5]);

    complete(&handlers, 1, &mut on_two);
    assert_pending!(next_two.poll());
    assert_eq!(handlers.called(), [1, 3, 5, 4]);
    for (id, future) in [(3, &mut next_one), (4, &mut next_two), (5, &mut next_three)] {
        complete(&handlers, id, future);
    }
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

#[test]
fn dropping_a_multi_key_request_handed_its_last_key_passes_every_key_on_at_once() {
    let layer = layer();
    let (mut service, handlers) = serve(&layer);
    let mut on_two = call(&mut service, one(1, 2));
    let mut transfer = call(&mut service, all(2, [1, 2]));
    let mut next_one = call(&mut service, one(3, 1));
    let mut next_two = call(&mut service, one(4, 2));
    for future in [&mut transfer, &mut next_one, &mut next_two] {
        assert_pending!(future.poll());
    }

    // Key 2 is handed to the transfer, which is woken but not polled again: it holds
    // both keys' permits, and has not been called.
    complete(&handlers, 1, &mut on_two);
    assert!(transfer.is_woken());
    assert_eq!(counts(layer.stats()), (2, 2, 2));

    drop(transfer);
    assert!(next_one.is_woken() && next_two.is_woken());
    assert_eq!(counts(layer.stats()), (2, 2, 0));
    assert_pending!(next_one.poll());
    assert_pending!(next_two.poll());
    assert_eq!(handlers.called(), [1, 3, 4]);
    complete(&handlers, 3, &mut next_one);
    complete(&handlers, 4, &mut next_two);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

#[test]
fn dropping_a_running_multi_key_request_passes_every_key_on_at_once() {
    for permits in [1, 2] {
        let layer = layer().permits_per_key(permits);
        let (mut service, handlers) = serve(&layer);
        let mut transfer = call(&mut service, all(1, [1, 2, 3]));
        assert_pending!(transfer.poll());
        // With two permits a second set shares the keys; the next ones wait either way.
        let mut beside = (permits == 2).then(|| call(&mut service, all(2, [3, 2, 1])));
        let mut next_one = call(&mut service, one(3, 1));
        let mut next_two = call(&mut service, all(4, [2, 3]));
        assert_pending!(next_one.poll());
        assert_pending!(next_two.poll());
        let running = permits;
        assert_eq!(counts(layer.stats()), (3, 3 * running, 3), "{permits}");

        drop(transfer);
        assert!(next_one.is_woken() && next_two.is_woken(), "{permits}");
        assert_eq!(counts(layer.stats()), (3, 3 * running, 0), "{permits}");
        assert_pending!(next_one.poll());
        assert_pending!(next_two.poll());
        let mut expected = vec![1];
        expected.extend((permits == 2).then_some(2));
        expected.extend([3, 4]);
        assert_eq!(handlers.called(), expected);
        assert_eq!(
            handlers.log()[permits],
            Step::Ended(1),
            "dropped before the others ran"
        );
        if let Some(beside) = &mut beside {
            complete(&handlers, 2, beside);
        }
        complete(&handlers, 3, &mut next_one);
        complete(&handlers, 4, &mut next_two);
        assert!(layer.stats().is_idle(), "{permits}: {:?}", layer.stats());
    }
}

// ---------------------------------------------------------------------------------------
// Limits, all or nothing
// ---------------------------------------------------------------------------------------

#[test]
fn a_full_line_on_one_key_rejects_the_whole_set_and_leaves_nothing_on_the_others() {
    // Each round has a domain of its own, so its keys land on other shards, in another
    // order: the full key is reached before or after some of the others.
    for round in 0..16u64 {
        let layer = layer().max_queue_per_key(1);
        let (mut service, handlers) = serve(&layer);
        // Key 0: a holder and a full line. Key 1: a holder, room in its line. Keys 2 to
        // 7: free.
        let mut holder_zero = call(&mut service, one(100, 0));
        let mut waiter_zero = call(&mut service, one(101, 0));
        let mut holder_one = call(&mut service, one(102, 1));
        assert_pending!(waiter_zero.poll());
        let before = layer.stats();
        assert_eq!(counts(before), (2, 2, 1));

        let mut keys: Vec<u64> = (0..8).collect();
        keys.rotate_left(round as usize % 8);
        let rejected = service.call(all(1, keys));
        assert_eq!(rejection(rejected), Limit::MaxQueuePerKey, "round {round}");
        assert_eq!(layer.stats(), before, "round {round}");

        // Every free key is free: its next request is called inside `call()`.
        let mut free: Vec<Call> = (2..8)
            .map(|key| call(&mut service, one(key, key)))
            .collect();
        assert_eq!(
            handlers.called(),
            [100, 102, 2, 3, 4, 5, 6, 7],
            "round {round}"
        );
        // Key 1's line has its one place free, and the next request there runs right
        // after the holder.
        let mut next_one = call(&mut service, one(8, 1));
        assert_pending!(next_one.poll());
        complete(&handlers, 102, &mut holder_one);
        assert_pending!(next_one.poll());
        assert_eq!(handlers.called().last(), Some(&8), "round {round}");

        complete(&handlers, 100, &mut holder_zero);
        assert_pending!(waiter_zero.poll());
        complete(&handlers, 101, &mut waiter_zero);
        complete(&handlers, 8, &mut next_one);
        for (key, future) in (2..).zip(&mut free) {
            complete(&handlers, key, future);
        }
        assert!(
            layer.stats().is_idle(),
            "round {round}: {:?}",
            layer.stats()
        );
    }
}

#[test]
fn max_keys_counts_the_new_keys_of_a_set_all_or_nothing() {
    for round in 0..16u64 {
        let layer = layer().max_keys(4);
        let (mut service, handlers) = serve(&layer);
        let mut holder = call(&mut service, one(100, 0));
        let before = layer.stats();

        // Key 0 is live; keys 1 to 4 would make five.
        let mut keys: Vec<u64> = (0..5).collect();
        keys.rotate_left(round as usize % 5);
        assert_eq!(
            rejection(service.call(all(1, keys))),
            Limit::MaxKeys,
            "round {round}"
        );
        assert_eq!(layer.stats(), before, "round {round}");

        // The three new keys that fit are all still to be had, in one set.
        let mut three = call(&mut service, all(2, [3, 1, 2]));
        assert_eq!(handlers.called(), [100, 2], "round {round}");
        assert_eq!(counts(layer.stats()), (4, 4, 0));
        assert_eq!(
            rejection(service.call(one(3, 5))),
            Limit::MaxKeys,
            "round {round}"
        );
        // A set of live keys needs no new one.
        let mut live = call(&mut service, all(4, [0, 3]));
        assert_pending!(live.poll());
        assert_eq!(counts(layer.stats()), (4, 4, 2));

        complete(&handlers, 100, &mut holder);
        complete(&handlers, 2, &mut three);
        assert_pending!(live.poll());
        complete(&handlers, 4, &mut live);
        assert!(
            layer.stats().is_idle(),
            "round {round}: {:?}",
            layer.stats()
        );
        // Every key was given back: four new keys fit again.
        let mut fresh: Vec<Call> = (5..9)
            .map(|key| call(&mut service, one(10 + key, key)))
            .collect();
        assert_eq!(counts(layer.stats()), (4, 4, 0), "round {round}");
        for (key, future) in (5..).zip(&mut fresh) {
            complete(&handlers, 10 + key, future);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The HTTP flavour
// ---------------------------------------------------------------------------------------

#[cfg(feature = "http")]
mod http_flavour {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use axum::body::Body;
    use axum::http::{Request, Response};
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;
    use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
    use tower::{Service, service_fn};
    use tower_sync_engine::http::HttpSyncEngine;

    use super::counts;
    use crate::sets::http::{by_keys, request};

    /// How the streamed body of the multi-key request goes away.
    #[derive(Debug, Clone, Copy)]
    enum Release {
        Ends,
        Dropped,
    }

    #[tokio::test]
    async fn the_http_flavour_holds_every_key_until_the_body_ends() {
        for release in [Release::Ends, Release::Dropped] {
            let called = Arc::new(Mutex::new(Vec::new()));
            let (lines, receiver) = mpsc::unbounded_channel::<&'static str>();
            let stream = Arc::new(Mutex::new(Some(receiver)));
            let inner = {
                let called = called.clone();
                service_fn(move |request: Request<u64>| {
                    let id = *request.body();
                    called.lock().unwrap().push(id);
                    // Request 1 streams what the test sends; the others answer at once.
                    let body = if id == 1 {
                        let mut receiver = stream.lock().unwrap().take().unwrap();
                        Body::from_stream(futures::stream::poll_fn(move |cx| {
                            receiver
                                .poll_recv(cx)
                                .map(|line| line.map(Ok::<_, Infallible>))
                        }))
                    } else {
                        Body::from("done")
                    };
                    std::future::ready(Ok::<_, Infallible>(Response::new(body)))
                })
            };
            let mut service = HttpSyncEngine::new(inner, by_keys);
            let mut transfer = task::spawn(service.call(request(1, &[1, 2])));
            let mut body = assert_ready_ok!(transfer.poll()).into_body();
            let mut on_one = task::spawn(service.call(request(2, &[1])));
            let mut on_two = task::spawn(service.call(request(3, &[2])));
            assert_pending!(on_one.poll());
            assert_pending!(on_two.poll());
            assert_eq!(counts(service.stats()), (2, 2, 2), "{release:?}");

            // The head is out and frames flow: both keys stay held.
            lines.send("one\n").unwrap();
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "one\n");
            assert!(!on_one.is_woken() && !on_two.is_woken(), "{release:?}");
            assert_eq!(*called.lock().unwrap(), [1], "{release:?}");

            match release {
                Release::Ends => {
                    drop(lines);
                    assert!(body.frame().await.is_none());
                }
                Release::Dropped => {
                    drop(body);
                    drop(lines);
                }
            }
            // Both keys pass on in the same step.
            assert!(on_one.is_woken() && on_two.is_woken(), "{release:?}");
            assert_eq!(counts(service.stats()), (2, 2, 0), "{release:?}");
            let first = assert_ready!(on_one.poll()).unwrap();
            let second = assert_ready!(on_two.poll()).unwrap();
            assert_eq!(*called.lock().unwrap(), [1, 2, 3], "{release:?}");
            drop((first, second));
            assert!(
                service.stats().is_idle(),
                "{release:?}: {:?}",
                service.stats()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Foreign code: keys whose `Drop` panics
// ---------------------------------------------------------------------------------------

/// A request whose set is built by hand from `(id, explosive)` keys, in that order.
#[derive(Debug, Clone)]
struct Keyed {
    id: u64,
    keys: Vec<(u64, bool)>,
}

fn by_explosive_keys(request: &Keyed) -> Mode<Key> {
    Mode::SyncAll(Box::new(
        request
            .keys
            .iter()
            .map(|&(id, explosive)| Key { id, explosive })
            .collect(),
    ))
}

type KeyedLayer = SyncEngineLayer<fn(&Keyed) -> Mode<Key>, Key>;

/// A service whose inner handler records the request's id and answers at once.
fn keyed_service(
    layer: &KeyedLayer,
) -> (
    impl Service<Keyed, Response = u64, Error = BoxError> + use<>,
    Arc<Mutex<Vec<u64>>>,
) {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let recorded = starts.clone();
    let inner = tower::service_fn(move |request: Keyed| {
        recorded.lock().unwrap().push(request.id);
        std::future::ready(Ok::<_, BoxError>(request.id))
    });
    (layer.layer(inner), starts)
}

fn keyed(id: u64, keys: &[(u64, bool)]) -> Keyed {
    Keyed {
        id,
        keys: keys.to_vec(),
    }
}

fn assert_panics_with_key_drop(f: impl FnOnce()) {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("no key's drop panicked");
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    assert_eq!(message, KEY_DROP_PANIC);
}

#[test]
fn a_key_whose_drop_panics_among_duplicates_wedges_no_key() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    let layer: KeyedLayer = SyncEngineLayer::new(by_explosive_keys as fn(&Keyed) -> Mode<Key>);
    let (mut service, starts) = keyed_service(&layer);
    let mut holder = task::spawn(service.call(keyed(1, &[(1, false)])));

    // Key 1 is live, so both copies of it are let go of in `call()`, and one panics; key
    // 2 was free, and its place is given back too.
    let set = [(1, true), (2, false), (1, false), (2, false)];
    assert_panics_with_key_drop(|| drop(service.call(keyed(2, &set))));
    assert_eq!(counts(layer.stats()), (1, 1, 0), "{:?}", layer.stats());

    // Two explosive copies of a new key: the registry keeps one, and the request, its key
    // free, is called inside `call()`; then the other copy panics there, and the
    // unwinding drops the request, giving its place up and letting go of the kept copy,
    // whose panic is contained. The process goes on.
    assert_panics_with_key_drop(|| drop(service.call(keyed(3, &[(5, true), (5, true)]))));
    assert_eq!(counts(layer.stats()), (1, 1, 0), "{:?}", layer.stats());

    let mut behind = task::spawn(service.call(keyed(4, &[(2, false), (1, false), (5, false)])));
    assert_pending!(behind.poll());
    assert_eq!(assert_ready_ok!(holder.poll()), 1);
    assert_eq!(assert_ready_ok!(behind.poll()), 4);
    assert_eq!(*starts.lock().unwrap(), [1, 3, 4]);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

#[test]
fn a_key_whose_drop_panics_after_a_rejection_wedges_no_key() {
    support::quiet_handler_panics();
    let _events = support::capture::listen();
    for round in 0..16 {
        // A domain of its own each round: its keys land on other shards.
        let layer: KeyedLayer =
            SyncEngineLayer::new(by_explosive_keys as fn(&Keyed) -> Mode<Key>).max_queue_per_key(0);
        let (mut service, starts) = keyed_service(&layer);
        // Keys 1 and 2 are busy: a set naming them is rejected at whichever comes first
        // in shard order. Its copy of key 1 is let go of in `call()`, and so is key 3's,
        // from the set or, if it was placed before the rejection, from its entry.
        let mut holder_one = task::spawn(service.call(keyed(1, &[(1, false)])));
        let mut holder_two = task::spawn(service.call(keyed(2, &[(2, false)])));
        let before = layer.stats();
        let mut set = vec![(1, true), (2, false), (3, true), (4, false)];
        set.rotate_left(round % 4);
        assert_panics_with_key_drop(|| drop(service.call(keyed(3, &set))));
        assert_eq!(layer.stats(), before, "round {round}");

        // Keys 3 and 4 are free, keys 1 and 2 pass on as before.
        let mut free = task::spawn(service.call(keyed(4, &[(4, false), (3, false)])));
        assert_eq!(assert_ready_ok!(free.poll()), 4);
        assert_eq!(assert_ready_ok!(holder_one.poll()), 1);
        assert_eq!(assert_ready_ok!(holder_two.poll()), 2);
        let mut after = task::spawn(service.call(keyed(5, &[(1, false), (2, false)])));
        assert_eq!(assert_ready_ok!(after.poll()), 5);
        assert_eq!(*starts.lock().unwrap(), [1, 2, 4, 5], "round {round}");
        assert!(
            layer.stats().is_idle(),
            "round {round}: {:?}",
            layer.stats()
        );
    }
}

// ---------------------------------------------------------------------------------------
// `stats()` and the tracing events, per key
// ---------------------------------------------------------------------------------------

#[cfg(feature = "tracing")]
mod events {
    use std::time::Duration;

    use crate::support::capture::{Capture, event};
    use tokio_test::assert_pending;

    use super::*;

    /// The time waited as the events report it: exact on the paused tokio clock, which
    /// the `tokio-clock` feature uses; without it, the events read the system clock,
    /// and only the field is checked.
    fn waited(micros: u64) -> u64 {
        if cfg!(feature = "tokio-clock") {
            micros
        } else {
            0
        }
    }

    fn take(capture: &Capture) -> Vec<(String, &'static str, u64)> {
        let mut events = capture.take_summary();
        if !cfg!(feature = "tokio-clock") {
            for (_, field, value) in &mut events {
                if *field == "waited_us" {
                    *value = 0;
                }
            }
        }
        events
    }

    fn sorted(mut events: Vec<(String, &'static str, u64)>) -> Vec<(String, &'static str, u64)> {
        events.sort();
        events
    }

    #[tokio::test(start_paused = true)]
    async fn a_multi_key_request_is_counted_and_traced_once_per_key() {
        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let tick = Duration::from_millis(10);
        let layer = layer();
        let (mut service, handlers) = serve(&layer);

        let mut on_one = call(&mut service, one(1, 1));
        let mut on_two = call(&mut service, one(2, 2));
        let mut behind_two = call(&mut service, one(3, 2));
        assert_eq!(take(&capture), [event("queued", "queue_depth", 1)]);

        // Waits on keys 1 and 2, with that key's depth each; heads key 3 at once.
        let mut transfer = call(&mut service, all(4, [3, 2, 1]));
        assert_eq!(
            sorted(take(&capture)),
            [
                event("queued", "queue_depth", 1),
                event("queued", "queue_depth", 2),
            ]
        );
        assert_eq!(counts(layer.stats()), (3, 3, 3));
        let mut on_three = call(&mut service, one(5, 3));
        assert_eq!(take(&capture), [event("queued", "queue_depth", 1)]);
        assert_eq!(counts(layer.stats()), (3, 3, 4));
        for future in [&mut behind_two, &mut transfer, &mut on_three] {
            assert_pending!(future.poll());
        }

        // Key 1 comes free: the transfer heads it, and is admitted there only.
        tokio::time::advance(tick).await;
        complete(&handlers, 1, &mut on_one);
        assert_pending!(transfer.poll());
        assert_eq!(
            take(&capture),
            [event("admitted", "waited_us", waited(10_000))]
        );
        assert_eq!(counts(layer.stats()), (3, 3, 3));

        tokio::time::advance(tick).await;
        complete(&handlers, 2, &mut on_two);
        assert_pending!(behind_two.poll());
        assert_eq!(
            take(&capture),
            [event("admitted", "waited_us", waited(20_000))]
        );
        assert_eq!(counts(layer.stats()), (3, 3, 2));

        // Its last key: admitted there, and called.
        tokio::time::advance(tick).await;
        complete(&handlers, 3, &mut behind_two);
        assert_pending!(transfer.poll());
        assert_eq!(
            take(&capture),
            [event("admitted", "waited_us", waited(30_000))]
        );
        assert_eq!(handlers.called(), [1, 2, 3, 4]);
        assert_eq!(counts(layer.stats()), (3, 3, 1));

        tokio::time::advance(tick).await;
        complete(&handlers, 4, &mut transfer);
        assert_pending!(on_three.poll());
        assert_eq!(
            take(&capture),
            [event("admitted", "waited_us", waited(40_000))]
        );
        assert_eq!(counts(layer.stats()), (1, 1, 0));
        complete(&handlers, 5, &mut on_three);
        assert!(layer.stats().is_idle(), "{:?}", layer.stats());

        // A set that finds every key free emits nothing; one that is rejected, nothing.
        let mut free = call(&mut service, all(6, [1, 2, 3]));
        complete(&handlers, 6, &mut free);
        let limited = super::layer().max_queue_per_key(0);
        let (mut limited_service, limited_handlers) = serve(&limited);
        let mut holder = call(&mut limited_service, one(7, 2));
        assert_eq!(
            rejection(limited_service.call(all(8, [1, 2, 3]))),
            Limit::MaxQueuePerKey
        );
        complete(&limited_handlers, 7, &mut holder);
        assert_eq!(take(&capture), []);
    }
}
