//! `max_in_flight(n)`: at most `n` `Mode::Sync` and `Mode::SyncAll` requests of a domain
//! run at once, `Mode::Concurrent` requests pass by, and a freed slot goes to the waiting
//! request whose key holds the fewest slots, then to the key granted one least recently,
//! then to the request that has waited longest.
//!
//! Times are read from tokio's paused clock, so every start time asserted below is
//! exact; nothing is measured against the wall clock.
//!
//! Every test listens for the layer's events before it touches a layer (see
//! `support::capture::listen`), so that the test that checks them never finds their
//! callsites cached as disabled by another test running beside it.

mod support;

#[cfg(feature = "http")]
#[path = "support/report_app.rs"]
mod report_app;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use support::Rng;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder, service_fn};
use tower_sync_engine::error::{BoxError, Limit, Overloaded};
use tower_sync_engine::{Mode, Stats, SyncEngineLayer};

// ---- requests, and a handler that records when each one runs ----

/// A request: ordered on `keys` (none: `Mode::Concurrent`), working for `ms` on tokio's
/// clock, answering with `seq`.
#[derive(Debug, Clone)]
struct Job {
    keys: Vec<u64>,
    seq: u64,
    ms: u64,
}

impl Job {
    fn on(key: u64, seq: u64, ms: u64) -> Job {
        Job {
            keys: vec![key],
            seq,
            ms,
        }
    }

    fn on_all(keys: &[u64], seq: u64, ms: u64) -> Job {
        Job {
            keys: keys.to_vec(),
            seq,
            ms,
        }
    }

    fn concurrent(seq: u64, ms: u64) -> Job {
        Job {
            keys: Vec::new(),
            seq,
            ms,
        }
    }
}

fn policy(job: &Job) -> Mode<u64> {
    Mode::sync_all(job.keys.iter().copied())
}

type Policy = fn(&Job) -> Mode<u64>;

fn layer(max_in_flight: usize) -> SyncEngineLayer<Policy, u64> {
    SyncEngineLayer::new(policy as Policy).max_in_flight(max_in_flight)
}

/// One handler start: which request, on which keys, when (since the board was made).
#[derive(Debug, Clone)]
struct Start {
    seq: u64,
    keys: Vec<u64>,
    at: Duration,
}

/// What the handlers did: their starts in order, and how many ordered (not
/// `Mode::Concurrent`) handlers ran at once, at most.
#[derive(Clone)]
struct Board {
    origin: Instant,
    state: Arc<Mutex<BoardState>>,
}

#[derive(Default)]
struct BoardState {
    starts: Vec<Start>,
    ends: Vec<u64>,
    running: usize,
    max_running: usize,
}

impl Board {
    fn new() -> Board {
        Board {
            origin: Instant::now(),
            state: Arc::default(),
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn start(&self, job: &Job) -> Running {
        let mut state = self.state.lock().unwrap();
        state.starts.push(Start {
            seq: job.seq,
            keys: job.keys.clone(),
            at: self.now(),
        });
        let ordered = !job.keys.is_empty();
        if ordered {
            state.running += 1;
            state.max_running = state.max_running.max(state.running);
        }
        Running {
            board: self.clone(),
            ordered,
        }
    }

    fn end(&self, seq: u64) {
        self.state.lock().unwrap().ends.push(seq);
    }

    fn starts(&self) -> Vec<Start> {
        self.state.lock().unwrap().starts.clone()
    }

    /// The requests started so far, in start order.
    fn started(&self) -> Vec<u64> {
        self.starts().iter().map(|start| start.seq).collect()
    }

    fn started_at(&self, seq: u64) -> Option<Duration> {
        self.starts()
            .iter()
            .find(|start| start.seq == seq)
            .map(|start| start.at)
    }

    #[track_caller]
    fn start_index(&self, seq: u64) -> usize {
        let started = self.started();
        started
            .iter()
            .position(|&s| s == seq)
            .unwrap_or_else(|| panic!("request {seq} never started: {started:?}"))
    }

    fn ends(&self) -> Vec<u64> {
        self.state.lock().unwrap().ends.clone()
    }

    /// Ordered handlers running now (a cancelled one stops counting when it is dropped).
    fn running(&self) -> usize {
        self.state.lock().unwrap().running
    }

    fn max_running(&self) -> usize {
        self.state.lock().unwrap().max_running
    }
}

/// Counts an ordered handler as running until its future completes or is dropped.
struct Running {
    board: Board,
    ordered: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.ordered {
            if let Ok(mut state) = self.board.state.lock() {
                state.running -= 1;
            }
        }
    }
}

type Handler = BoxCloneSyncService<Job, u64, BoxError>;

/// Records its start, works for `job.ms` on tokio's clock (0: yields once), records its
/// end, and answers with `job.seq`.
fn handler(board: &Board) -> Handler {
    let board = board.clone();
    BoxCloneSyncService::new(service_fn(move |job: Job| {
        let board = board.clone();
        async move {
            let _running = board.start(&job);
            if job.ms == 0 {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_millis(job.ms)).await;
            }
            board.end(job.seq);
            Ok::<_, BoxError>(job.seq)
        }
    }))
}

type Engine = tower_sync_engine::SyncEngine<Handler, Policy, u64>;

fn spawn_call(service: &mut Engine, job: Job) -> JoinHandle<Result<u64, BoxError>> {
    tokio::spawn(service.call(job))
}

/// Longer than anything a passing test waits for: on the paused clock, a request that
/// never finishes fails its test at once instead of hanging it.
const BOUND: Duration = Duration::from_secs(60);

async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {BOUND:?}: wedged"))
}

async fn join_all(calls: Vec<JoinHandle<Result<u64, BoxError>>>) {
    for call in calls {
        bounded("a request", call).await.unwrap().unwrap();
    }
}

/// Lets every spawned task run as far as it can without moving the paused clock.
async fn yield_many() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Moves the paused clock to `ms` after `origin`, running every timer on the way.
async fn at(origin: Instant, ms: u64) {
    tokio::time::sleep_until(origin + Duration::from_millis(ms)).await;
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// The error of a request that must have been rejected in `call()`.
fn rejection<F, T>(future: F) -> BoxError
where
    F: Future<Output = Result<T, BoxError>>,
{
    match futures::FutureExt::now_or_never(future) {
        Some(Err(error)) => error,
        Some(Ok(_)) => panic!("the request ran instead of being rejected"),
        None => panic!("the request was queued instead of being rejected"),
    }
}

// ---- fair share ----

/// One permit per key, one slot: a key with a deep backlog does not hold up keys that
/// arrive after it. Each quiet key gets a slot before the hot key's third request.
#[tokio::test(start_paused = true)]
async fn quiet_keys_start_before_the_third_request_of_a_hot_backlog() {
    let _events = support::capture::listen();
    const HOT: u64 = 1;
    let board = Board::new();
    let layer = layer(1);
    let mut service = layer.layer(handler(&board));

    let mut calls = Vec::new();
    for seq in 0..50 {
        calls.push(spawn_call(&mut service, Job::on(HOT, seq, 10)));
    }
    let quiet: Vec<u64> = (1_000..1_005).collect();
    for (key, &seq) in (100..).zip(&quiet) {
        calls.push(spawn_call(&mut service, Job::on(key, seq, 10)));
    }
    yield_many().await;
    // The hot key's first request runs; the rest of its backlog waits behind it on its
    // key, and the five quiet requests, free on their keys, wait for the slot.
    assert_eq!(board.started(), [0]);
    assert_eq!(layer.stats().waiting_for_slot, 5, "{:?}", layer.stats());
    join_all(calls).await;

    let third_hot = board.start_index(2);
    for &seq in &quiet {
        let index = board.start_index(seq);
        assert!(
            index < third_hot,
            "quiet request {seq} started at position {index}, after the hot key's third \
             (position {third_hot}): {:?}",
            board.started()
        );
    }
    assert_eq!(board.max_running(), 1);
    // One slot: the 55 requests of 10 ms ran one after another.
    assert_eq!(board.now(), ms(550));
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

/// With one permit per key, the slot goes round the keys.
#[tokio::test(start_paused = true)]
async fn with_one_permit_per_key_one_slot_goes_round_robin() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(1);
    let mut service = layer.layer(handler(&board));
    let mut calls = Vec::new();
    // Keys 1, 2 and 3 each send four requests, all before any runs: seq = key * 10 + n.
    for key in 1..=3 {
        for n in 0..4 {
            calls.push(spawn_call(&mut service, Job::on(key, key * 10 + n, 10)));
        }
    }
    join_all(calls).await;
    assert_eq!(
        board.started(),
        [10, 20, 30, 11, 21, 31, 12, 22, 32, 13, 23, 33]
    );
    // One at a time, back to back.
    let times: Vec<Duration> = board.starts().iter().map(|start| start.at).collect();
    assert_eq!(times, (0..12).map(|n| ms(10 * n)).collect::<Vec<_>>());
    assert_eq!(board.max_running(), 1);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

/// Four slots, four permits per key: a hot key holds all four slots with more queued; a
/// new key gets the first slot that frees after it arrives, not the hot key's next
/// request.
#[tokio::test(start_paused = true)]
async fn a_new_key_gets_the_first_slot_that_frees_after_it_arrives() {
    let _events = support::capture::listen();
    const HOT: u64 = 1;
    const NEW: u64 = 2;
    let board = Board::new();
    let layer = SyncEngineLayer::new(policy as Policy)
        .permits_per_key(4)
        .max_in_flight(4);
    let mut service = layer.layer(handler(&board));
    let origin = board.origin;

    // Slots free at 100, 200, 300 and 400 ms.
    let mut calls: Vec<_> = (0..4)
        .map(|seq| spawn_call(&mut service, Job::on(HOT, seq, 100 * (seq + 1))))
        .collect();
    // Queued on the hot key, behind its four permits.
    calls.extend((4..10).map(|seq| spawn_call(&mut service, Job::on(HOT, seq, 10))));
    yield_many().await;
    assert_eq!(board.started(), [0, 1, 2, 3]);

    at(origin, 10).await;
    calls.push(spawn_call(&mut service, Job::on(NEW, 100, 10)));
    yield_many().await;
    assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());
    assert_eq!(board.started_at(100), None, "no slot was free at 10 ms");

    join_all(calls).await;
    assert_eq!(
        board.started_at(100),
        Some(ms(100)),
        "the new key waited past the first freed slot: {:?}",
        board.starts()
    );
    // The hot key's next request started once the new key's request had finished.
    assert_eq!(board.started_at(4), Some(ms(110)), "{:?}", board.starts());
    assert_eq!(board.max_running(), 4);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

/// Fewest slots first, even against a request that has waited longer: with eight
/// permits per key and four slots, the hot key's fifth request waits for a slot from the
/// start (the requests behind it wait for it to start, on their key), and a new key
/// arriving later still gets the next slot.
#[tokio::test(start_paused = true)]
async fn the_key_holding_fewest_slots_goes_before_requests_that_waited_longer() {
    let _events = support::capture::listen();
    const HOT: u64 = 1;
    let board = Board::new();
    let layer = SyncEngineLayer::new(policy as Policy)
        .permits_per_key(8)
        .max_in_flight(4);
    let mut service = layer.layer(handler(&board));
    let origin = board.origin;

    let mut calls: Vec<_> = (0..4)
        .map(|seq| spawn_call(&mut service, Job::on(HOT, seq, 100 * (seq + 1))))
        .collect();
    calls.extend((4..8).map(|seq| spawn_call(&mut service, Job::on(HOT, seq, 1_000))));
    yield_many().await;
    assert_eq!(board.started(), [0, 1, 2, 3]);
    let stats = layer.stats();
    assert_eq!((stats.waiting_for_slot, stats.queued), (1, 3), "{stats:?}");

    at(origin, 10).await;
    calls.push(spawn_call(&mut service, Job::on(2, 100, 10)));
    yield_many().await;
    assert_eq!(layer.stats().waiting_for_slot, 2, "{:?}", layer.stats());

    join_all(calls).await;
    assert_eq!(board.started_at(100), Some(ms(100)), "{:?}", board.starts());
    assert_eq!(board.started_at(4), Some(ms(110)), "{:?}", board.starts());
    assert_eq!(board.max_running(), 4);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

/// Fewest slots goes before least recently granted: a key holding two slots, last
/// granted before another key, still waits while that key holds none.
#[tokio::test(start_paused = true)]
async fn the_key_holding_fewest_slots_goes_before_the_key_granted_least_recently() {
    let _events = support::capture::listen();
    const A: u64 = 1;
    const B: u64 = 2;
    let board = Board::new();
    let layer = SyncEngineLayer::new(policy as Policy)
        .permits_per_key(8)
        .max_in_flight(3);
    let mut service = layer.layer(handler(&board));

    let calls = vec![
        // A takes two slots, B the third: A was last granted before B.
        spawn_call(&mut service, Job::on(A, 0, 1_000)),
        spawn_call(&mut service, Job::on(A, 1, 1_000)),
        spawn_call(&mut service, Job::on(B, 10, 100)),
        // Both wait for a slot; A's has waited longer.
        spawn_call(&mut service, Job::on(A, 2, 10)),
        spawn_call(&mut service, Job::on(B, 11, 10)),
    ];
    yield_many().await;
    assert_eq!(board.started(), [0, 1, 10]);
    assert_eq!(layer.stats().waiting_for_slot, 2, "{:?}", layer.stats());

    join_all(calls).await;
    // At 100 ms B's slot frees: B holds none then, A two.
    assert_eq!(board.started_at(11), Some(ms(100)), "{:?}", board.starts());
    assert_eq!(board.started_at(2), Some(ms(110)), "{:?}", board.starts());
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

/// Least recently granted goes before waited longest, and a key that went idle is
/// forgotten: when it comes back it counts as never granted.
#[tokio::test(start_paused = true)]
async fn a_key_that_went_idle_comes_back_as_never_granted() {
    let _events = support::capture::listen();
    const D: u64 = 1;
    const Y: u64 = 2;
    const A: u64 = 3;
    const Z: u64 = 4;
    let board = Board::new();
    let layer = layer(2);
    let mut service = layer.layer(handler(&board));
    let origin = board.origin;

    let mut calls = vec![
        // D is granted first, then Y; both slots are taken.
        spawn_call(&mut service, Job::on(D, 0, 10)),
        spawn_call(&mut service, Job::on(D, 1, 10)),
        spawn_call(&mut service, Job::on(Y, 10, 100)),
        // A waits for a slot; at 10 ms D's first request ends and A, never granted,
        // goes before D's second.
        spawn_call(&mut service, Job::on(A, 20, 10)),
    ];
    at(origin, 15).await;
    assert_eq!(board.started(), [0, 10, 20]);
    // Z waits too; at 20 ms A's request ends, A goes idle, and Z, never granted, goes
    // before D (granted at 0 ms).
    calls.push(spawn_call(&mut service, Job::on(Z, 30, 50)));
    at(origin, 25).await;
    assert_eq!(board.started(), [0, 10, 20, 30]);
    // A comes back. If it were remembered (granted at 10 ms) D (granted at 0 ms) would
    // go first; forgotten, it has never been granted, and goes before D.
    calls.push(spawn_call(&mut service, Job::on(A, 21, 10)));
    join_all(calls).await;

    assert_eq!(board.started_at(21), Some(ms(70)), "{:?}", board.starts());
    assert_eq!(board.started_at(1), Some(ms(80)), "{:?}", board.starts());
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

/// A request waiting for a slot keeps its place on its keys: the requests behind it on
/// any of them, even with a free permit, start after it.
#[tokio::test(start_paused = true)]
async fn a_request_waiting_for_a_slot_keeps_its_place_on_its_keys() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = SyncEngineLayer::new(policy as Policy)
        .permits_per_key(2)
        .max_in_flight(1);
    let mut service = layer.layer(handler(&board));

    let calls = vec![
        spawn_call(&mut service, Job::on(1, 0, 100)),
        // Waits for the slot on keys 2 and 3.
        spawn_call(&mut service, Job::on_all(&[2, 3], 1, 10)),
        // Behind it on key 2 and on key 3, though each key has a second permit.
        spawn_call(&mut service, Job::on(2, 2, 10)),
        spawn_call(&mut service, Job::on(3, 3, 10)),
    ];
    yield_many().await;
    assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());
    join_all(calls).await;
    assert_eq!(board.started()[..2], [0, 1]);
    assert_eq!(board.started_at(1), Some(ms(100)));
    // Then one slot for the other two, one after the other, in either order: their keys
    // were last granted together, and they began to wait together.
    let mut rest = [board.started_at(2).unwrap(), board.started_at(3).unwrap()];
    rest.sort();
    assert_eq!(rest, [ms(110), ms(120)]);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

// ---- the bound ----

/// Many keys, random durations and arrivals, single- and two-key requests, and
/// concurrent ones: never more than `max_in_flight` ordered handlers at once, each key
/// still in call order.
#[tokio::test(start_paused = true)]
async fn never_more_than_max_in_flight_ordered_handlers_run_at_once() {
    let _events = support::capture::listen();
    for (seed, max_in_flight, permits) in [(1, 3, 1), (2, 5, 3), (3, 1, 2), (4, 8, 1)] {
        let mut rng = Rng::new(seed);
        let board = Board::new();
        let layer = SyncEngineLayer::new(policy as Policy)
            .permits_per_key(permits)
            .max_in_flight(max_in_flight);
        let mut service = layer.layer(handler(&board));
        let mut calls = Vec::new();
        for seq in 0..400 {
            let work = rng.below(20);
            let job = match rng.below(10) {
                0 => Job::concurrent(seq, work),
                1 => {
                    let first = rng.below(12);
                    Job::on_all(&[first, (first + 1 + rng.below(11)) % 12], seq, work)
                }
                _ => Job::on(rng.below(12), seq, work),
            };
            calls.push(spawn_call(&mut service, job));
            if rng.chance(30) {
                tokio::time::sleep(ms(rng.below(5))).await;
            }
            assert!(board.running() <= max_in_flight, "seed {seed}");
        }
        join_all(calls).await;
        assert_eq!(board.ends().len(), 400, "seed {seed}");
        assert!(
            board.max_running() <= max_in_flight,
            "seed {seed}: {} ordered handlers ran at once, max_in_flight({max_in_flight})",
            board.max_running()
        );
        assert_eq!(
            board.max_running(),
            max_in_flight,
            "seed {seed}: the load never filled the slots"
        );
        if permits == 1 {
            // Each key still started its requests in call order.
            let starts = board.starts();
            for key in 0..12 {
                let of_key: Vec<u64> = starts
                    .iter()
                    .filter(|start| start.keys.contains(&key))
                    .map(|start| start.seq)
                    .collect();
                assert!(
                    of_key.windows(2).all(|pair| pair[0] < pair[1]),
                    "seed {seed}: key {key} out of order: {of_key:?}"
                );
            }
        }
        assert!(layer.stats().is_idle(), "seed {seed}: {:?}", layer.stats());
    }
}

/// The same bound with requests polled on two worker threads. No time is asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_max_in_flight_on_two_worker_threads() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(3);
    let mut service = layer.layer(handler(&board));
    let mut rng = Rng::new(7);
    let calls: Vec<_> = (0..2_000)
        .map(|seq| {
            let job = match rng.below(8) {
                0 => Job::concurrent(seq, 0),
                1 => Job::on_all(&[rng.below(16), 16 + rng.below(16)], seq, 0),
                _ => Job::on(rng.below(32), seq, 0),
            };
            spawn_call(&mut service, job)
        })
        .collect();
    join_all(calls).await;
    assert_eq!(board.ends().len(), 2_000);
    assert!(board.max_running() <= 3, "{}", board.max_running());
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

// ---- Mode::Concurrent ----

#[tokio::test(start_paused = true)]
async fn concurrent_requests_are_not_counted_and_never_wait_while_the_slots_are_full() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(1);
    let mut service = layer.layer(handler(&board));

    let mut calls = vec![
        spawn_call(&mut service, Job::on(1, 0, 100)),
        spawn_call(&mut service, Job::on(2, 1, 10)),
    ];
    // The slot is taken and a request waits for it; concurrent requests run at once,
    // however many.
    let concurrent: Vec<_> = (100..110)
        .map(|seq| spawn_call(&mut service, Job::concurrent(seq, 10)))
        .collect();
    yield_many().await;
    assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());
    join_all(concurrent).await;
    assert_eq!(board.now(), ms(10));
    for seq in 100..110 {
        assert_eq!(board.started_at(seq), Some(Duration::ZERO));
    }
    assert_eq!(board.started_at(1), None, "still waiting for the slot");
    assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());

    // And running concurrent requests take no slot from an ordered one.
    calls.extend((200..205).map(|seq| spawn_call(&mut service, Job::concurrent(seq, 1_000))));
    join_all(calls.drain(..2).collect()).await;
    assert_eq!(board.started_at(1), Some(ms(100)));
    let free = board.now();
    calls.push(spawn_call(&mut service, Job::on(3, 2, 10)));
    yield_many().await;
    assert_eq!(
        board.started_at(2),
        Some(free),
        "an ordered request waited for concurrent ones"
    );
    join_all(calls).await;
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

// ---- cancellation ----

#[tokio::test(start_paused = true)]
async fn dropping_a_request_waiting_for_a_slot_passes_nothing_and_wedges_nothing() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(1);
    let mut service = layer.layer(handler(&board));

    let mut running = task::spawn(service.call(Job::on(1, 0, 100)));
    assert_pending!(running.poll());
    let mut first = task::spawn(service.call(Job::on(2, 1, 10)));
    let mut second = task::spawn(service.call(Job::on(3, 2, 10)));
    assert_pending!(first.poll());
    assert_pending!(second.poll());
    assert_eq!(layer.stats().waiting_for_slot, 2, "{:?}", layer.stats());

    drop(first);
    assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());
    // The slot is still taken: the other waiter does not start.
    assert_pending!(second.poll());
    assert_eq!(board.started(), [0]);

    tokio::time::advance(ms(100)).await;
    assert_eq!(assert_ready_ok!(running.poll()), 0);
    drop(running);
    assert!(
        second.is_woken(),
        "the freed slot did not reach the next waiter"
    );
    assert_eq!(layer.stats().waiting_for_slot, 0, "{:?}", layer.stats());
    assert_pending!(second.poll());
    assert_eq!(board.started(), [0, 2]);
    assert_eq!(board.started_at(2), Some(ms(100)));
    tokio::time::advance(ms(10)).await;
    assert_eq!(assert_ready_ok!(second.poll()), 2);
    drop(second);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    // Nothing is left behind: the next request on the dropped one's key runs at once.
    assert_eq!(
        bounded("a request", service.call(Job::on(2, 3, 0)))
            .await
            .unwrap(),
        3
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_a_request_granted_a_slot_but_not_yet_polled_passes_the_slot_at_once() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(1);
    let mut service = layer.layer(handler(&board));

    let mut running = task::spawn(service.call(Job::on(1, 0, 100)));
    assert_pending!(running.poll());
    let mut granted = task::spawn(service.call(Job::on(2, 1, 10)));
    let mut next = task::spawn(service.call(Job::on(3, 2, 10)));
    assert_pending!(granted.poll());
    assert_pending!(next.poll());

    tokio::time::advance(ms(100)).await;
    assert_eq!(assert_ready_ok!(running.poll()), 0);
    drop(running);
    // The slot went to the request that has waited longest, which is not polled yet.
    assert!(granted.is_woken());
    assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());
    assert_eq!(board.started(), [0]);

    drop(granted);
    assert!(next.is_woken(), "the slot was not passed on");
    assert_eq!(layer.stats().waiting_for_slot, 0, "{:?}", layer.stats());
    assert_pending!(next.poll());
    assert_eq!(board.started(), [0, 2]);
    assert_eq!(board.started_at(2), Some(ms(100)));
    tokio::time::advance(ms(10)).await;
    assert_eq!(assert_ready_ok!(next.poll()), 2);
    drop(next);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    assert_eq!(
        bounded("a request", service.call(Job::on(2, 3, 0)))
            .await
            .unwrap(),
        3
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_a_running_request_passes_its_slot_at_once() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(1);
    let mut service = layer.layer(handler(&board));

    let mut running = task::spawn(service.call(Job::on(1, 0, 1_000)));
    assert_pending!(running.poll());
    let mut waiting = task::spawn(service.call(Job::on(2, 1, 10)));
    assert_pending!(waiting.poll());
    assert_eq!(board.running(), 1);

    drop(running);
    assert_eq!(board.running(), 0, "the handler's future was not dropped");
    assert!(waiting.is_woken(), "the slot was not passed on");
    assert_eq!(layer.stats().waiting_for_slot, 0, "{:?}", layer.stats());
    assert_pending!(waiting.poll());
    assert_eq!(board.started(), [0, 1]);
    assert_eq!(board.started_at(1), Some(Duration::ZERO));
    tokio::time::advance(ms(10)).await;
    assert_eq!(assert_ready_ok!(waiting.poll()), 1);
    drop(waiting);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    assert_eq!(
        bounded("a request", service.call(Job::on(1, 2, 0)))
            .await
            .unwrap(),
        2
    );
}

/// Drops in every state at once, from tasks: every slot comes back and the domain ends
/// idle.
#[tokio::test(start_paused = true)]
async fn aborting_requests_in_every_state_leaves_the_domain_idle() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(2);
    let mut service = layer.layer(handler(&board));
    let calls: Vec<_> = (0..60)
        .map(|seq| spawn_call(&mut service, Job::on(seq % 7, seq, 10 + seq % 13)))
        .collect();
    tokio::time::sleep(ms(25)).await;
    for call in calls.iter().step_by(3) {
        call.abort();
    }
    let mut finished = 0;
    for call in calls {
        if let Ok(answer) = bounded("a request", call).await {
            answer.unwrap();
            finished += 1;
        }
    }
    assert!(finished >= 40, "{finished}");
    assert!(board.max_running() <= 2);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    // The slots all came back: two new keys run side by side at once.
    let started = board.now();
    let both = [
        spawn_call(&mut service, Job::on(100, 1_000, 10)),
        spawn_call(&mut service, Job::on(101, 1_001, 10)),
    ];
    join_all(both.into()).await;
    assert_eq!(board.now() - started, ms(10));
}

// ---- no inner capacity while waiting ----

/// Counts the inner service's `poll_ready` calls.
#[derive(Clone)]
struct CountReady<S> {
    inner: S,
    polls: Arc<AtomicUsize>,
}

impl<S: Service<Job>> Service<Job> for CountReady<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, job: Job) -> S::Future {
        self.inner.call(job)
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_waiting_for_a_slot_does_not_poll_inner_readiness() {
    let _events = support::capture::listen();
    let board = Board::new();
    let polls = Arc::new(AtomicUsize::new(0));
    let layer = layer(1);
    let mut service = layer.layer(CountReady {
        inner: handler(&board),
        polls: Arc::clone(&polls),
    });

    let mut running = task::spawn(service.call(Job::on(1, 0, 100)));
    assert_pending!(running.poll());
    let before = polls.load(Ordering::SeqCst);
    assert!(before >= 1);

    let mut waiting = task::spawn(service.call(Job::on(2, 1, 10)));
    for _ in 0..3 {
        assert_pending!(waiting.poll());
    }
    assert_eq!(
        polls.load(Ordering::SeqCst),
        before,
        "a request without a slot polled the inner service's readiness"
    );

    tokio::time::advance(ms(100)).await;
    assert_ready_ok!(running.poll());
    drop(running);
    assert_pending!(waiting.poll());
    assert!(polls.load(Ordering::SeqCst) > before);
    assert_eq!(board.started(), [0, 1]);
    tokio::time::advance(ms(10)).await;
    assert_ready_ok!(waiting.poll());
}

/// With a `ConcurrencyLimit` of two inside, one ordered request running and three
/// waiting for the single slot: had any of them taken a permit of the limit, a
/// concurrent request would wait for it.
#[tokio::test(start_paused = true)]
async fn requests_waiting_for_a_slot_leave_an_inner_concurrency_limit_to_others() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(1);
    let mut service = ServiceBuilder::new()
        .layer(layer.clone())
        .concurrency_limit(2)
        .service(handler(&board));

    let ordered: Vec<_> = [
        Job::on(1, 0, 100),
        Job::on(2, 1, 10),
        Job::on(3, 2, 10),
        Job::on(4, 3, 10),
    ]
    .into_iter()
    .map(|job| tokio::spawn(service.call(job)))
    .collect();
    yield_many().await;
    assert_eq!(layer.stats().waiting_for_slot, 3, "{:?}", layer.stats());

    let concurrent = tokio::spawn(service.call(Job::concurrent(100, 10)));
    assert_eq!(
        bounded("the concurrent request", concurrent)
            .await
            .unwrap()
            .unwrap(),
        100
    );
    assert_eq!(board.started_at(100), Some(Duration::ZERO));
    assert_eq!(board.now(), ms(10));
    join_all(ordered).await;
    assert_eq!(board.now(), ms(130));
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

// ---- limits ----

#[tokio::test(start_paused = true)]
async fn a_request_waiting_for_a_slot_counts_against_max_queue_per_key() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = SyncEngineLayer::new(policy as Policy)
        .max_in_flight(1)
        .max_queue_per_key(1);
    let mut service = layer.layer(handler(&board));

    let running = spawn_call(&mut service, Job::on(1, 0, 100));
    // Key 2 is free, but the slot is not: its request waits, and fills key 2's line.
    let waiting = spawn_call(&mut service, Job::on(2, 1, 10));
    yield_many().await;
    assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());
    let error = rejection(service.call(Job::on(2, 2, 10)));
    assert_eq!(
        error.downcast_ref::<Overloaded>().map(Overloaded::limit),
        Some(Limit::MaxQueuePerKey),
        "{error}"
    );
    // Another key has room for its own waiter.
    let other = spawn_call(&mut service, Job::on(3, 3, 10));
    yield_many().await;
    assert_eq!(layer.stats().waiting_for_slot, 2, "{:?}", layer.stats());

    join_all(vec![running, waiting, other]).await;
    assert_eq!(board.started(), [0, 1, 3]);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    assert_eq!(
        bounded("a request", service.call(Job::on(2, 4, 0)))
            .await
            .unwrap(),
        4
    );
}

// ---- several keys ----

#[tokio::test(start_paused = true)]
async fn a_sync_all_request_takes_one_slot() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(2);
    let mut service = layer.layer(handler(&board));

    let calls = vec![
        spawn_call(&mut service, Job::on_all(&[1, 2], 0, 100)),
        spawn_call(&mut service, Job::on(3, 1, 100)),
        spawn_call(&mut service, Job::on(4, 2, 10)),
    ];
    yield_many().await;
    // Two keys, one slot: the request on key 3 has the second.
    assert_eq!(board.started(), [0, 1]);
    assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());
    join_all(calls).await;
    assert_eq!(board.started_at(2), Some(ms(100)));
    assert_eq!(board.max_running(), 2);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

#[tokio::test(start_paused = true)]
async fn a_sync_all_request_waiting_for_a_slot_is_one_waiter() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(1);
    let mut service = layer.layer(handler(&board));

    let running = spawn_call(&mut service, Job::on(1, 0, 100));
    let waiting = spawn_call(&mut service, Job::on_all(&[2, 3], 1, 10));
    yield_many().await;
    assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());
    join_all(vec![running, waiting]).await;
    assert_eq!(board.started_at(1), Some(ms(100)));
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());
}

// ---- construction ----

#[test]
#[should_panic(expected = "max_in_flight")]
fn zero_max_in_flight_panics_naming_the_setting() {
    let _ = SyncEngineLayer::<_, u64>::new(policy as Policy).max_in_flight(0);
}

#[test]
#[should_panic(expected = "max_in_flight")]
fn max_in_flight_above_2_pow_24_minus_1_panics_naming_the_setting() {
    let _ = SyncEngineLayer::<_, u64>::new(policy as Policy).max_in_flight(16_777_216);
}

#[test]
#[should_panic(expected = "max_in_flight")]
fn zero_max_in_flight_panics_on_the_way_to_a_service_builder() {
    let _ = ServiceBuilder::new()
        .layer(SyncEngineLayer::<_, u64>::new(policy as Policy).max_in_flight(0))
        .service(handler(&Board::new()));
}

#[cfg(feature = "http")]
#[test]
#[should_panic(expected = "max_in_flight")]
fn zero_max_in_flight_panics_on_the_way_to_for_http() {
    use axum::http::HeaderValue;
    use tower_sync_engine::http::by_header;
    let _ = SyncEngineLayer::<_, HeaderValue>::new(by_header("x-tenant"))
        .max_in_flight(0)
        .for_http();
}

#[test]
fn the_largest_max_in_flight_is_accepted_and_shown() {
    let layer = SyncEngineLayer::<_, u64>::new(policy as Policy).max_in_flight(16_777_215);
    let debug = format!("{layer:?}");
    assert!(debug.contains("max_in_flight: 16777215"), "{debug}");
    let layer = SyncEngineLayer::<_, u64>::new(policy as Policy).max_in_flight(3);
    assert!(format!("{layer:?}").contains("max_in_flight: 3"));
}

#[tokio::test(start_paused = true)]
async fn the_cap_holds_through_service_builder_layer() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(1);
    let mut service = ServiceBuilder::new()
        .layer(layer.clone())
        .service(handler(&board));
    let calls: Vec<_> = [Job::on(1, 0, 100), Job::on(2, 1, 10)]
        .into_iter()
        .map(|job| tokio::spawn(service.call(job)))
        .collect();
    join_all(calls).await;
    assert_eq!(board.started_at(1), Some(ms(100)));
    assert_eq!(board.max_running(), 1);
}

// ---- stats and events ----

#[tokio::test(start_paused = true)]
async fn stats_count_the_requests_waiting_for_a_slot() {
    let _events = support::capture::listen();
    let board = Board::new();
    let layer = layer(2);
    let mut service = layer.layer(handler(&board));

    let mut running: Vec<_> = (0..2)
        .map(|seq| task::spawn(service.call(Job::on(seq, seq, 100))))
        .collect();
    let mut waiting: Vec<_> = (2..5)
        .map(|seq| task::spawn(service.call(Job::on(seq, seq, 10))))
        .collect();
    for request in running.iter_mut().chain(waiting.iter_mut()) {
        assert_pending!(request.poll());
    }
    let stats = layer.stats();
    assert_eq!(stats.waiting_for_slot, 3, "{stats:?}");
    assert!(!stats.is_idle());
    assert_eq!(service.stats(), stats);

    drop(waiting.pop());
    assert_eq!(layer.stats().waiting_for_slot, 2);
    tokio::time::advance(ms(100)).await;
    for request in &mut running {
        assert_ready_ok!(request.poll());
    }
    drop(running);
    assert_eq!(layer.stats().waiting_for_slot, 0);
    for request in &mut waiting {
        // Granted a slot: it starts on its next poll, and is done 10 ms later.
        assert_pending!(request.poll());
        tokio::time::advance(ms(10)).await;
        assert_ready_ok!(request.poll());
    }
    drop(waiting);
    assert!(layer.stats().is_idle(), "{:?}", layer.stats());

    // A domain with nothing but a slot waiter is not idle.
    let mut stats = Stats::default();
    assert!(stats.is_idle());
    stats.waiting_for_slot = 1;
    assert!(!stats.is_idle());
}

#[cfg(feature = "tracing")]
#[tokio::test(start_paused = true)]
async fn waiting_for_a_slot_emits_slot_queued_then_slot_granted() {
    use support::capture::Capture;
    use tracing::Level;

    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

    let board = Board::new();
    let layer = layer(1);
    let mut service = layer.layer(handler(&board));

    let running = spawn_call(&mut service, Job::on(1, 0, 100));
    yield_many().await;
    assert!(
        capture.take().is_empty(),
        "a request with a free slot traced"
    );

    let waiting = spawn_call(&mut service, Job::on(2, 1, 10));
    yield_many().await;
    let queued = capture.take();
    assert_eq!(
        queued
            .iter()
            .map(|event| event.message.as_str())
            .collect::<Vec<_>>(),
        ["slot_queued"],
        "{queued:?}"
    );

    join_all(vec![running, waiting]).await;
    let granted = capture.take();
    assert_eq!(
        granted
            .iter()
            .map(|event| event.message.as_str())
            .collect::<Vec<_>>(),
        ["slot_granted"],
        "{granted:?}"
    );
    let waited: Vec<u64> = granted[0]
        .numbers
        .iter()
        .filter(|(name, _)| *name == "waited_us")
        .map(|&(_, value)| value)
        .collect();
    assert_eq!(waited.len(), 1, "no waited_us field: {granted:?}");
    // Exact only on the clock the paused runtime controls.
    #[cfg(feature = "tokio-clock")]
    assert_eq!(waited[0], 100_000);
    assert!(
        queued
            .iter()
            .chain(&granted)
            .all(|event| event.level == Some(Level::DEBUG))
    );

    // A request that finds a free slot emits nothing.
    bounded("a request", service.call(Job::on(3, 2, 10)))
        .await
        .unwrap();
    assert!(
        capture.take().is_empty(),
        "a request with a free slot traced"
    );
}

// ---- the HTTP flavour ----

#[cfg(feature = "http")]
mod http_flavour {
    //! Under axum, one layer on two routes: the slot is held until the response body
    //! has ended or been dropped, and the cap spans both routes.

    use std::time::Duration;

    use axum::Router;
    use axum::body::Body;
    use axum::http::{HeaderValue, Method, Request, Response, StatusCode};
    use axum::routing::{get, post};
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    use tower_sync_engine::SyncEngineLayer;
    use tower_sync_engine::http::{ByHeader, HttpSyncEngineLayer, by_header};

    use super::bounded;

    const TENANT: &str = "x-tenant";

    use super::report_app::{Shared, edit, stream_report as report};

    fn app(max_in_flight: usize) -> (Router, HttpSyncEngineLayer<ByHeader, HeaderValue>, Shared) {
        let shared = Shared::default();
        let layer = SyncEngineLayer::new(by_header(TENANT))
            .max_in_flight(max_in_flight)
            .for_http();
        let app = Router::new()
            .route("/edit", post(edit))
            .route("/report", get(report))
            .layer(layer.clone())
            .with_state(shared.clone());
        (app, layer, shared)
    }

    fn request(method: Method, path: &str, tenant: Option<&str>) -> Request<Body> {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(tenant) = tenant {
            request = request.header(TENANT, tenant);
        }
        request.body(Body::empty()).unwrap()
    }

    async fn send(app: &Router, request: Request<Body>) -> Response<Body> {
        bounded("response", app.clone().oneshot(request))
            .await
            .unwrap()
    }

    fn spawn_edit(
        app: &Router,
        tenant: Option<&str>,
        tag: &str,
    ) -> tokio::task::JoinHandle<(StatusCode, String)> {
        let app = app.clone();
        let request = request(Method::POST, &format!("/edit?{tag}"), tenant);
        tokio::spawn(async move {
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        })
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_slot_is_held_until_the_response_body_ends_across_routes() {
        let _events = super::support::capture::listen();
        let (app, layer, shared) = app(1);
        let lines = shared.next_report_streams();

        // Tenant a's report has answered, but its body is still streaming: it holds the
        // slot, and tenant b's edit, on another route and another key, waits for it.
        let mut body = send(&app, request(Method::GET, "/report", Some("a")))
            .await
            .into_body();
        let edit = spawn_edit(&app, Some("b"), "b");
        for line in ["one\n", "two\n"] {
            lines.send(line).unwrap();
            let frame = bounded("frame", body.frame()).await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), line);
            settle().await;
            assert_eq!(shared.log(), ["report"]);
            assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());
        }

        // A request without the header is concurrent: it does not wait for the slot.
        let free = bounded("free", spawn_edit(&app, None, "free"))
            .await
            .unwrap();
        assert_eq!(free, (StatusCode::OK, "free".to_owned()));
        assert_eq!(shared.log(), ["report", "edit free"]);

        // The end of the stream frees the slot.
        drop(lines);
        assert!(bounded("end", body.frame()).await.is_none());
        assert_eq!(
            bounded("edit", edit).await.unwrap(),
            (StatusCode::OK, "b".to_owned())
        );
        assert_eq!(shared.log(), ["report", "edit free", "edit b"]);
        assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_body_mid_stream_frees_the_slot_at_once() {
        let _events = super::support::capture::listen();
        let (app, layer, shared) = app(1);
        let lines = shared.next_report_streams();

        let mut body = send(&app, request(Method::GET, "/report", Some("a")))
            .await
            .into_body();
        let edit = spawn_edit(&app, Some("b"), "b");
        lines.send("one\n").unwrap();
        bounded("frame", body.frame()).await.unwrap().unwrap();
        settle().await;
        assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());

        drop(body);
        assert_eq!(layer.stats().waiting_for_slot, 0, "{:?}", layer.stats());
        assert_eq!(
            bounded("edit", edit).await.unwrap(),
            (StatusCode::OK, "b".to_owned())
        );
        assert_eq!(shared.log(), ["report", "edit b"]);
        assert!(layer.stats().is_idle(), "{:?}", layer.stats());
        drop(lines);
    }

    /// The slot is the domain's, not the route's: with two slots, two open report bodies
    /// of two tenants leave a third tenant's edit waiting.
    #[tokio::test(start_paused = true)]
    async fn two_open_bodies_fill_two_slots() {
        let _events = super::support::capture::listen();
        let (app, layer, shared) = app(2);
        let first = shared.next_report_streams();
        let second = shared.next_report_streams();
        let a = send(&app, request(Method::GET, "/report", Some("a"))).await;
        let b = send(&app, request(Method::GET, "/report", Some("b"))).await;
        let edit = spawn_edit(&app, Some("c"), "c");
        settle().await;
        assert_eq!(shared.log(), ["report", "report"]);
        assert_eq!(layer.stats().waiting_for_slot, 1, "{:?}", layer.stats());

        drop(first);
        let lines = bounded("a", a.into_body().collect()).await.unwrap();
        assert!(lines.to_bytes().is_empty());
        assert_eq!(
            bounded("edit", edit).await.unwrap(),
            (StatusCode::OK, "c".to_owned())
        );
        drop((second, b));
        assert!(layer.stats().is_idle(), "{:?}", layer.stats());
    }
}
