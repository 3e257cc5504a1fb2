//! The shard's invariants, checked beside its code: a randomized run of a few keys
//! against a reference model of each (the registry's invariants 1 to 4, the hand-off's
//! wakes and the limits), and the memory and release paths that the model does not see.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Waker;

use super::{
    Deferred, KeyBudget, KeyState, Leaving, Place, Position, RETAINED_KEYS, RETAINED_LINES, Shard,
};
use crate::error::Limit;
use crate::registry::keys::INLINE_KEYS;
use crate::registry::line::{Line, Polled};
use crate::registry::settings::{Settings, UNBOUNDED};
use crate::registry::testing::{Rng, Task};

impl<K> Shard<K> {
    /// The entry `(hash, id)`, if it is live.
    fn entry(&self, hash: u64, id: u64) -> Option<&KeyState<K>> {
        self.keys
            .iter()
            .find(|state| state.hash == hash && state.id == id)
    }

    /// Whether any entry has `hash`: each key of these tests has a hash of its own.
    fn has_hash(&self, hash: u64) -> bool {
        self.keys.iter().any(|state| state.hash == hash)
    }

    /// Keys the shard has room for without growing its table.
    fn capacity(&self) -> usize {
        self.keys.room()
    }

    /// Empty lines kept for the next keys that queue.
    fn spare_lines(&self) -> usize {
        self.spare_lines.len()
    }

    /// Live keys whose latest grant of the cap the shard keeps.
    fn grants(&self) -> usize {
        self.limits.as_ref().map_or(0, |limits| limits.grants.len())
    }
}

impl KeyBudget {
    /// Keys that hold a place in the budget.
    fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

/// The tasks of a run, by id, and the log of their wakes.
#[derive(Default)]
struct Tasks {
    woken: Arc<Mutex<Vec<usize>>>,
    wakers: Vec<Waker>,
}

impl Tasks {
    fn spawn(&mut self) -> usize {
        let id = self.wakers.len();
        self.wakers.push(Waker::from(Arc::new(Task {
            id,
            woken: Arc::clone(&self.woken),
        })));
        id
    }

    fn waker(&self, id: usize) -> Waker {
        self.wakers[id].clone()
    }

    /// Whether `waker` is one of task `id`'s, without waking anything.
    fn is_of(&self, waker: &Waker, id: usize) -> bool {
        self.wakers[id].will_wake(waker)
    }

    /// The tasks woken since the last call, in order.
    fn woken(&self) -> Vec<usize> {
        std::mem::take(&mut *self.woken.lock().unwrap())
    }
}

/// Runs `deferred` as a claim does after the lock, and returns the tasks it woke.
fn run(deferred: Deferred<u64>, tasks: &Tasks) -> Vec<usize> {
    assert!(tasks.woken().is_empty(), "a wake before the deferred ran");
    deferred.run();
    tasks.woken()
}

fn settings(permits_per_key: u32, max_queue_per_key: usize, max_keys: usize) -> Settings {
    Settings {
        permits_per_key,
        max_queue_per_key,
        max_keys,
        ..Settings::default()
    }
}

/// Keys of the randomized run.
const KEYS: usize = 5;

/// Their hashes: the first three share their low bits, so they compete for one bucket
/// and a lookup probes past the others; the top bits, which tag a bucket, differ.
const HASHES: [u64; KEYS] = [
    0xA000_0000_0000_0011,
    0xB000_0000_0000_0011,
    0xC000_0000_0000_0011,
    0x1234_5678_9ABC_DEF0,
    0x0FED_CBA9_8765_4321,
];

/// Where a request of the run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// In its key's line with `ticket`.
    Waiting { ticket: u64 },
    /// The unstarted head.
    Head,
    /// Called the inner service.
    Running,
}

/// A live claim as its request keeps it.
#[derive(Debug)]
struct Request {
    /// Its place in the order of `claim` calls, over the whole run.
    serial: u64,
    key: usize,
    id: u64,
    bucket: u32,
    stage: Stage,
    /// The task its future runs on.
    task: usize,
    /// The task whose waker its waiter stores in the line, if any.
    stored: Option<usize>,
}

/// One key as the model sees it: requests by serial.
#[derive(Debug, Default)]
struct KeyModel {
    running: Vec<u64>,
    head: Option<u64>,
    /// In `claim` order.
    line: VecDeque<u64>,
    /// Its entry's id while it is live.
    id: Option<u64>,
    /// The last request that became its head.
    last_head: Option<u64>,
}

impl KeyModel {
    fn is_live(&self) -> bool {
        !self.running.is_empty() || self.head.is_some() || !self.line.is_empty()
    }

    /// The front waiter if it may start: no unstarted head, and a permit free for it.
    fn startable(&self, permits: u32) -> Option<u64> {
        if self.head.is_none() && self.running.len() < permits as usize {
            self.line.front().copied()
        } else {
            None
        }
    }

    /// Claims holding a permit (invariant 2): running, the unstarted head, and the front
    /// waiter once it may start.
    fn holders(&self, permits: u32) -> u32 {
        (self.running.len()
            + usize::from(self.head.is_some())
            + usize::from(self.startable(permits).is_some())) as u32
    }

    /// Waiters without a permit: what `max_queue_per_key` bounds.
    fn waiting(&self, permits: u32) -> usize {
        self.line.len() - usize::from(self.startable(permits).is_some())
    }
}

/// Paths of the shard that a run reached: a run that never reaches one proves nothing
/// about it.
#[derive(Debug, Default)]
struct Reached {
    queued: u32,
    turns: u32,
    needs_waker: u32,
    replaced: u32,
    woken_by_start: u32,
    woken_by_leave: u32,
    granted_leaves: u32,
    head_leaves: u32,
    removals: u32,
    new_entries_of_removed_keys: u32,
    max_queue_rejections: u32,
    max_keys_rejections: u32,
}

struct Run {
    rng: Rng,
    settings: Settings,
    budget: Option<Arc<KeyBudget>>,
    shard: Shard<u64>,
    keys: Vec<KeyModel>,
    requests: Vec<Request>,
    tasks: Tasks,
    next_serial: u64,
    last_id: Option<u64>,
    /// Keys whose entry has been removed at least once.
    removed: [bool; KEYS],
    reached: Reached,
}

impl Run {
    /// A run with settings drawn from `seed`, adding what it reaches to `reached`.
    fn new(seed: u64, reached: Reached) -> Self {
        let mut rng = Rng::new(seed);
        let permits = 1 + (seed % 3) as u32;
        let max_queue = [UNBOUNDED, UNBOUNDED, 0, 1, 2, 3][rng.below(6)];
        let max_keys = [UNBOUNDED, UNBOUNDED, 1, 2, 3][rng.below(5)];
        let budget = (max_keys != UNBOUNDED).then(|| Arc::new(KeyBudget::new(max_keys)));
        Run {
            rng,
            settings: settings(permits, max_queue, max_keys),
            shard: Shard::new(budget.clone(), false),
            budget,
            keys: (0..KEYS).map(|_| KeyModel::default()).collect(),
            requests: Vec::new(),
            tasks: Tasks::default(),
            next_serial: 0,
            last_id: None,
            removed: [false; KEYS],
            reached,
        }
    }

    fn permits(&self) -> u32 {
        self.settings.permits_per_key
    }

    fn live_keys(&self) -> usize {
        self.keys.iter().filter(|key| key.is_live()).count()
    }

    fn index_of(&self, serial: u64) -> usize {
        self.requests
            .iter()
            .position(|request| request.serial == serial)
            .expect("the model's requests are live")
    }

    /// The front waiter of each key that may start.
    fn startable(&self) -> Vec<Option<u64>> {
        let permits = self.permits();
        self.keys.iter().map(|key| key.startable(permits)).collect()
    }

    /// `serial` became its key's head: in `claim` order (invariant 3).
    fn became_head(&mut self, key: usize, serial: u64) {
        let model = &mut self.keys[key];
        assert!(
            model.head.is_none(),
            "request {serial} became a second unstarted head of key {key}"
        );
        if let Some(last) = model.last_head {
            assert!(
                serial > last,
                "request {serial} became the head of key {key} after request {last}"
            );
        }
        model.head = Some(serial);
        model.last_head = Some(serial);
    }

    /// One random operation, checked as it happens; returns what it did.
    fn step(&mut self, draining: bool) -> String {
        let (claim, poll, start) = if draining { (10, 40, 60) } else { (45, 70, 80) };
        let roll = self.rng.below(100);
        let before = self.startable();
        // A claim or a poll wakes nothing, not even under the lock: the log would show it.
        let (what, woken) = if roll < claim {
            let key = self.rng.below(KEYS);
            (self.claim(key), self.tasks.woken())
        } else if roll < poll {
            (self.poll(), self.tasks.woken())
        } else if roll < start {
            self.start()
        } else {
            self.leave()
        };
        self.check_wakes(&before, &woken, &what);
        what
    }

    /// Liveness: a front waiter that may start now and could not before was woken by
    /// the operation that let it, through the waker it stored, and nothing else was.
    fn check_wakes(&mut self, before: &[Option<u64>], woken: &[usize], what: &str) {
        let mut expected = Vec::new();
        for (key, now) in self.startable().into_iter().enumerate() {
            let Some(serial) = now else { continue };
            if before[key] == Some(serial) {
                continue;
            }
            let index = self.index_of(serial);
            // The line gives its waker away to wake it: a granted waiter stores none.
            if let Some(task) = self.requests[index].stored.take() {
                expected.push(task);
            }
        }
        assert_eq!(woken, expected.as_slice(), "{what}: tasks woken");
        if !woken.is_empty() {
            if what.starts_with("start") {
                self.reached.woken_by_start += 1;
            } else {
                self.reached.woken_by_leave += 1;
            }
        }
    }

    fn claim(&mut self, key: usize) -> String {
        let permits = self.permits();
        let serial = self.next_serial;
        self.next_serial += 1;
        let counts = self.shard.counts();
        let live = self.keys[key].is_live();
        let (placed, spare) = self.shard.claim(&self.settings, HASHES[key], key as u64);
        if !live {
            if self.live_keys() >= self.settings.max_keys {
                let rejected = placed.expect_err("a key beyond max_keys is rejected");
                assert_eq!(rejected.limit(), Limit::MaxKeys, "claim {serial}");
                assert_eq!(
                    spare,
                    Some(key as u64),
                    "claim {serial}: the key comes back"
                );
                assert_eq!(self.shard.counts(), counts, "claim {serial}: rejected");
                self.reached.max_keys_rejections += 1;
                return format!("claim {serial} of key {key}: max_keys");
            }
            let Ok(Place {
                id,
                bucket,
                position: Position::Head,
            }) = placed
            else {
                panic!("claim {serial} of idle key {key}: {placed:?}, not a new head");
            };
            assert_eq!(spare, None, "claim {serial}: a new entry keeps the key");
            // Invariant 4: ids are never reused, so a claim of an earlier entry of the key
            // cannot touch this one.
            if let Some(last) = self.last_id {
                assert!(id > last, "claim {serial}: id {id} after {last}");
            }
            self.last_id = Some(id);
            if self.removed[key] {
                self.reached.new_entries_of_removed_keys += 1;
            }
            self.keys[key].id = Some(id);
            self.add(serial, key, id, bucket, Stage::Head);
            self.became_head(key, serial);
            return format!("claim {serial} of key {key}: new head");
        }
        assert_eq!(
            spare,
            Some(key as u64),
            "claim {serial}: the shard kept one"
        );
        let model = &self.keys[key];
        let may_start =
            model.line.is_empty() && model.head.is_none() && model.running.len() < permits as usize;
        let waiting = model.waiting(permits);
        let key_id = model.id.expect("a live key has an id");
        if !may_start && waiting >= self.settings.max_queue_per_key {
            let rejected = placed.expect_err("a full line rejects");
            assert_eq!(rejected.limit(), Limit::MaxQueuePerKey, "claim {serial}");
            assert_eq!(self.shard.counts(), counts, "claim {serial}: rejected");
            self.reached.max_queue_rejections += 1;
            return format!("claim {serial} of key {key}: max_queue_per_key");
        }
        let place = placed.unwrap_or_else(|error| panic!("claim {serial}: {error:?}"));
        assert_eq!(place.id, key_id, "claim {serial}: the key's entry");
        match place.position {
            Position::Head => {
                assert!(
                    may_start,
                    "claim {serial} of key {key}: started out of turn"
                );
                self.add(serial, key, key_id, place.bucket, Stage::Head);
                self.became_head(key, serial);
                format!("claim {serial} of key {key}: head")
            }
            Position::Waiting { ticket, depth } => {
                assert!(!may_start, "claim {serial} of key {key}: waits for nothing");
                assert_eq!(depth as usize, waiting + 1, "claim {serial}: depth");
                if let Some(&last) = self.keys[key].line.back() {
                    let last = &self.requests[self.index_of(last)];
                    let Stage::Waiting { ticket: before } = last.stage else {
                        unreachable!("the line holds waiters")
                    };
                    assert!(ticket > before, "claim {serial}: ticket {ticket}");
                }
                self.add(serial, key, key_id, place.bucket, Stage::Waiting { ticket });
                self.keys[key].line.push_back(serial);
                self.reached.queued += 1;
                format!("claim {serial} of key {key}: waits with ticket {ticket}")
            }
        }
    }

    fn add(&mut self, serial: u64, key: usize, id: u64, bucket: u32, stage: Stage) {
        let task = self.tasks.spawn();
        self.requests.push(Request {
            serial,
            key,
            id,
            bucket,
            stage,
            task,
            stored: None,
        });
    }

    /// Polls a waiting request: often a front that may start, as the hand-off wakes it.
    fn poll(&mut self) -> String {
        let startable: Vec<u64> = self.startable().into_iter().flatten().collect();
        let waiting: Vec<u64> = self
            .requests
            .iter()
            .filter(|request| matches!(request.stage, Stage::Waiting { .. }))
            .map(|request| request.serial)
            .collect();
        let serial = if !startable.is_empty() && self.rng.percent(60) {
            startable[self.rng.below(startable.len())]
        } else if waiting.is_empty() {
            return "poll: nobody waits".into();
        } else {
            waiting[self.rng.below(waiting.len())]
        };
        let index = self.index_of(serial);
        // A future may move to another task between polls.
        if self.rng.percent(10) {
            self.requests[index].task = self.tasks.spawn();
        }
        let request = &mut self.requests[index];
        let Stage::Waiting { ticket } = request.stage else {
            unreachable!("a waiting request")
        };
        let key = request.key;
        let its_turn = self.keys[key].startable(self.settings.permits_per_key) == Some(serial);
        let current = self.tasks.waker(request.task);
        // As a claim does: a clone of its waker only until it has stored one, and then
        // one more when the shard asks for it. Sometimes one regardless.
        let mut offered = request.stored.is_none() || self.rng.percent(20);
        let polled = loop {
            let mut fresh = offered.then(|| current.clone());
            let polled = self.shard.poll_head(
                HASHES[key],
                request.id,
                &mut request.bucket,
                ticket,
                &mut fresh,
                &current,
            );
            match polled {
                Polled::NeedsWaker => {
                    assert!(!offered, "poll {serial}: asked for the waker it was given");
                    assert_ne!(
                        request.stored,
                        Some(request.task),
                        "poll {serial}: asked for a waker it stores"
                    );
                    self.reached.needs_waker += 1;
                    offered = true;
                }
                Polled::Head(..) => {
                    assert_eq!(fresh.is_some(), offered, "poll {serial}: took the clone");
                    break polled;
                }
                Polled::Wait(ref replaced) => {
                    let stores_it = request.stored == Some(request.task);
                    assert_eq!(
                        fresh.is_some(),
                        offered && stores_it,
                        "poll {serial}: the clone is taken exactly when it is needed"
                    );
                    match (replaced, request.stored) {
                        (None, None) => {}
                        (None, Some(task)) => assert!(stores_it, "poll {serial}: {task} lost"),
                        (Some(waker), Some(task)) => {
                            assert!(!stores_it, "poll {serial}: replaced the task's own");
                            assert!(
                                self.tasks.is_of(waker, task),
                                "poll {serial}: the replaced waker is the stored one"
                            );
                            self.reached.replaced += 1;
                        }
                        (Some(_), None) => panic!("poll {serial}: replaced nothing"),
                    }
                    break polled;
                }
            }
        };
        match polled {
            Polled::Head(waker, _) => {
                assert!(its_turn, "poll {serial}: took a turn that is not its own");
                assert!(
                    waker.is_none(),
                    "poll {serial}: the grant took its waker to wake it"
                );
                request.stage = Stage::Head;
                let front = self.keys[key].line.pop_front();
                assert_eq!(front, Some(serial), "poll {serial}: the front of the line");
                self.became_head(key, serial);
                self.reached.turns += 1;
                format!("poll {serial} of key {key}: its turn")
            }
            Polled::Wait(_) => {
                assert!(!its_turn, "poll {serial}: its turn was not taken");
                request.stored = Some(request.task);
                format!("poll {serial} of key {key}: waits")
            }
            Polled::NeedsWaker => unreachable!("asked again with a waker"),
        }
    }

    /// The unstarted head of a random key calls the inner service.
    fn start(&mut self) -> (String, Vec<usize>) {
        let heads: Vec<u64> = self.keys.iter().filter_map(|key| key.head).collect();
        if heads.is_empty() {
            return ("start: no head".into(), Vec::new());
        }
        let serial = heads[self.rng.below(heads.len())];
        let index = self.index_of(serial);
        let request = &mut self.requests[index];
        let key = request.key;
        let deferred =
            self.shard
                .start(&self.settings, HASHES[key], request.id, &mut request.bucket);
        assert!(deferred.stale.is_none(), "start {serial}: a stale waker");
        assert!(deferred.removed_key.is_none(), "start {serial}: a key");
        request.stage = Stage::Running;
        let model = &mut self.keys[key];
        model.head = None;
        model.running.push(serial);
        let woken = run(deferred, &self.tasks);
        (format!("start {serial} of key {key}"), woken)
    }

    /// A random request leaves, in whatever state it is.
    fn leave(&mut self) -> (String, Vec<usize>) {
        if self.requests.is_empty() {
            return ("leave: nobody".into(), Vec::new());
        }
        let permits = self.permits();
        let index = self.rng.below(self.requests.len());
        let mut request = self.requests.swap_remove(index);
        let (serial, key) = (request.serial, request.key);
        let model = &mut self.keys[key];
        let (leaving, what) = match request.stage {
            Stage::Waiting { ticket } => {
                if model.startable(permits) == Some(serial) {
                    self.reached.granted_leaves += 1;
                }
                let at = model.line.iter().position(|&s| s == serial);
                model.line.remove(at.expect("a waiter is in its line"));
                (Leaving::Line { ticket }, "waiting")
            }
            Stage::Head => {
                model.head = None;
                self.reached.head_leaves += 1;
                (Leaving::Permit { was_head: true }, "head")
            }
            Stage::Running => {
                let at = model.running.iter().position(|&s| s == serial);
                model
                    .running
                    .swap_remove(at.expect("a running request runs"));
                (Leaving::Permit { was_head: false }, "running")
            }
        };
        let idle = !model.is_live();
        let deferred = self.shard.leave(
            &self.settings,
            HASHES[key],
            request.id,
            &mut request.bucket,
            leaving,
        );
        match (&deferred.stale, request.stored) {
            (None, None) => {}
            (Some(stale), Some(task)) => assert!(
                self.tasks.is_of(stale, task),
                "leave {serial}: the stale waker is its own"
            ),
            (stale, stored) => panic!(
                "leave {serial}: stale waker {}, stored {stored:?}",
                stale.is_some()
            ),
        }
        // Invariant 4: the step that makes the key idle removes its entry, and hands the
        // key back to be dropped after the lock.
        let removed_key = deferred.removed_key;
        assert_eq!(
            removed_key,
            idle.then_some(key as u64),
            "leave {serial} of key {key}: the key handed back"
        );
        if idle {
            self.keys[key].id = None;
            self.removed[key] = true;
            self.reached.removals += 1;
        }
        let woken = run(deferred, &self.tasks);
        (format!("leave {serial} of key {key}, {what}"), woken)
    }

    /// The shard against the model, after every operation.
    fn check(&self, step: &str) {
        let permits = self.permits();
        let live_keys = self.live_keys();
        let in_flight: u32 = self.keys.iter().map(|key| key.holders(permits)).sum();
        let queued: usize = self.keys.iter().map(|key| key.waiting(permits)).sum();
        assert_eq!(
            self.shard.counts(),
            (live_keys, in_flight as usize, queued),
            "{step}: counts() (keys, in flight, queued)"
        );
        if let Some(budget) = &self.budget {
            assert_eq!(budget.live(), live_keys, "{step}: the key budget");
        }
        for (key, model) in self.keys.iter().enumerate() {
            let Some(id) = model.id else {
                // Invariant 4: nothing holds or waits, so there is no entry.
                assert!(!model.is_live());
                assert!(
                    !self.shard.has_hash(HASHES[key]),
                    "{step}: idle key {key} has an entry"
                );
                continue;
            };
            let state = self
                .shard
                .entry(HASHES[key], id)
                .unwrap_or_else(|| panic!("{step}: live key {key} has no entry {id}"));
            assert_eq!(state.key, key as u64, "{step}: key {key}'s entry");
            let (live, waiting) = state
                .line
                .as_ref()
                .map_or((0, 0), |line| (line.live(), line.waiting()));
            let granted = live - waiting;
            // Invariant 1.
            assert!(
                state.holders <= permits,
                "{step}: key {key}: {} holders of {permits} permits",
                state.holders
            );
            // Invariant 2: a waiter holds a permit only if it may start, and a front that
            // waits for one while no claim is unstarted waits because none is free.
            assert!(granted <= 1, "{step}: key {key}: {granted} granted waiters");
            assert!(
                granted == 0 || !state.head_unstarted,
                "{step}: key {key}: a waiter holds a permit behind the unstarted head"
            );
            if waiting > 0 && granted == 0 && !state.head_unstarted {
                assert_eq!(
                    state.holders, permits,
                    "{step}: key {key}: the front waits while a permit is free"
                );
            }
            // Invariant 3, and the model's count of each kind of claim.
            assert_eq!(
                state.head_unstarted,
                model.head.is_some(),
                "{step}: key {key}: the unstarted head"
            );
            assert_eq!(
                state.holders,
                model.holders(permits),
                "{step}: key {key}: holders"
            );
            assert_eq!(
                (live as usize, granted == 1),
                (model.line.len(), model.startable(permits).is_some()),
                "{step}: key {key}: the line (waiters, front granted)"
            );
        }
    }
}

#[test]
fn random_operations_keep_the_invariants_and_match_a_model() {
    let mut reached = Reached::default();
    for seed in 1..=96 {
        let mut run = Run::new(seed, reached);
        for round in 0..2_000 {
            // Bursts of claims, then drains: lines form, and keys go idle and come back.
            let draining = (round / 100) % 2 == 1;
            let what = run.step(draining);
            run.check(&format!(
                "seed {seed} ({:?}), step {round}, {what}",
                run.settings
            ));
        }
        reached = run.reached;
    }
    let Reached {
        queued,
        turns,
        needs_waker,
        replaced,
        woken_by_start,
        woken_by_leave,
        granted_leaves,
        head_leaves,
        removals,
        new_entries_of_removed_keys,
        max_queue_rejections,
        max_keys_rejections,
    } = reached;
    for (path, count) in [
        ("queued", queued),
        ("turns", turns),
        ("needs_waker", needs_waker),
        ("replaced", replaced),
        ("woken_by_start", woken_by_start),
        ("woken_by_leave", woken_by_leave),
        ("granted_leaves", granted_leaves),
        ("head_leaves", head_leaves),
        ("removals", removals),
        ("new_entries_of_removed_keys", new_entries_of_removed_keys),
        ("max_queue_rejections", max_queue_rejections),
        ("max_keys_rejections", max_keys_rejections),
    ] {
        assert!(count > 0, "the run never reached {path}");
    }
}

/// Hashes for the focused tests: distinct in their low bits, as many as there are keys.
fn hash_of(key: u64) -> u64 {
    key.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A claim of a focused test: enough to find its entry and leave.
struct Held {
    key: u64,
    id: u64,
    bucket: u32,
    ticket: Option<u64>,
}

fn claim(shard: &mut Shard<u64>, settings: &Settings, key: u64) -> Held {
    let (placed, _spare) = shard.claim(settings, hash_of(key), key);
    let place = placed.expect("no limit is set");
    let ticket = match place.position {
        Position::Head => None,
        Position::Waiting { ticket, .. } => Some(ticket),
    };
    Held {
        key,
        id: place.id,
        bucket: place.bucket,
        ticket,
    }
}

/// `held` leaves, as an unstarted head or a waiter; returns the key handed back.
fn leave(shard: &mut Shard<u64>, settings: &Settings, mut held: Held) -> Option<u64> {
    let leaving = match held.ticket {
        None => Leaving::Permit { was_head: true },
        Some(ticket) => Leaving::Line { ticket },
    };
    let mut deferred = shard.leave(
        settings,
        hash_of(held.key),
        held.id,
        &mut held.bucket,
        leaving,
    );
    let removed = deferred.removed_key.take();
    deferred.run();
    removed
}

/// Makes `key` queue: a head and one waiter behind it, so that the key needs a line.
fn queue(shard: &mut Shard<u64>, settings: &Settings, key: u64) -> [Held; 2] {
    let head = claim(shard, settings, key);
    let waiter = claim(shard, settings, key);
    assert!(
        head.ticket.is_none() && waiter.ticket.is_some(),
        "key {key}"
    );
    [head, waiter]
}

/// The head leaves, the waiter takes its turn and leaves: the key goes idle.
fn drain(shard: &mut Shard<u64>, settings: &Settings, [head, waiter]: [Held; 2]) {
    let key = head.key;
    assert_eq!(
        leave(shard, settings, head),
        None,
        "key {key}: still waited for"
    );
    let mut bucket = waiter.bucket;
    let noop = Waker::noop();
    let polled = shard.poll_head(
        hash_of(key),
        waiter.id,
        &mut bucket,
        waiter.ticket.expect("a waiter"),
        &mut None,
        noop,
    );
    assert!(matches!(polled, Polled::Head(..)), "key {key}: {polled:?}");
    let head = Held {
        bucket,
        ticket: None,
        ..waiter
    };
    assert_eq!(leave(shard, settings, head), Some(key), "key {key}: idle");
}

/// Where each live key's line is, to tell a reused line from a new one.
fn lines_of(shard: &Shard<u64>) -> Vec<*const Line> {
    shard
        .keys
        .iter()
        .filter_map(|state| state.line.as_deref().map(|line| line as *const Line))
        .collect()
}

#[test]
fn a_keys_grant_goes_with_its_entry_whichever_claim_removes_it() {
    let settings = Settings::default();
    let mut shard = Shard::new(None, true);
    // The head takes a slot; a second request on the key waits in line and, dropped
    // there, never asks for one: it leaves by the plain release, and the key's grant
    // still goes with the entry.
    let [mut head, waiter] = queue(&mut shard, &settings, 1);
    shard.took_slot(hash_of(1), head.id, &mut head.bucket, 7);
    assert_eq!(
        shard.share(hash_of(1), head.id, &mut head.bucket),
        (1, Some(7))
    );
    assert_eq!(leave(&mut shard, &settings, head), None);
    assert_eq!(shard.grants(), 1, "the key is live: its grant is kept");
    assert_eq!(leave(&mut shard, &settings, waiter), Some(1));
    assert_eq!((shard.counts(), shard.grants()), ((0, 0, 0), 0));

    // The same when the key's only request took the slot.
    let mut alone = claim(&mut shard, &settings, 2);
    shard.took_slot(hash_of(2), alone.id, &mut alone.bucket, 8);
    assert_eq!(leave(&mut shard, &settings, alone), Some(2));
    assert_eq!(shard.grants(), 0);

    // A later entry of the key starts with no history.
    let mut again = claim(&mut shard, &settings, 2);
    assert_eq!(
        shard.share(hash_of(2), again.id, &mut again.bucket),
        (1, None)
    );
    assert_eq!(leave(&mut shard, &settings, again), Some(2));
}

#[test]
fn keys_that_queue_again_reuse_the_lines_of_keys_gone_idle() {
    let settings = Settings::default();
    let mut shard = Shard::new(None, false);
    let first: Vec<[Held; 2]> = (0..3)
        .map(|key| queue(&mut shard, &settings, key))
        .collect();
    let lines = lines_of(&shard);
    assert_eq!(lines.len(), 3);
    for held in first {
        drain(&mut shard, &settings, held);
    }
    assert_eq!(shard.counts(), (0, 0, 0));
    assert_eq!(shard.spare_lines(), 3, "the idle keys' lines are kept");

    // Other keys queue: they take the kept lines, and allocate none.
    let second: Vec<[Held; 2]> = (10..13)
        .map(|key| queue(&mut shard, &settings, key))
        .collect();
    assert_eq!(shard.spare_lines(), 0);
    let mut reused = lines_of(&shard);
    reused.sort();
    let mut lines = lines;
    lines.sort();
    assert_eq!(reused, lines, "the new keys' lines are the kept ones");

    // A key that never queues needs no line, and takes none.
    for held in second {
        drain(&mut shard, &settings, held);
    }
    let alone = claim(&mut shard, &settings, 20);
    assert!(shard.entry(hash_of(20), alone.id).unwrap().line.is_none());
    assert_eq!(leave(&mut shard, &settings, alone), Some(20));
    assert_eq!(shard.spare_lines(), 3);
}

#[test]
fn a_shard_that_empties_after_a_burst_keeps_a_small_table_and_one_line() {
    // Far beyond `RETAINED_KEYS`, and more than four times it: the burst's table is
    // given back in full when the shard empties.
    const BURST: u64 = 100;
    let settings = Settings::default();
    let mut shard = Shard::new(None, false);
    let burst: Vec<[Held; 2]> = (0..BURST)
        .map(|key| queue(&mut shard, &settings, key))
        .collect();
    let peak = shard.capacity();
    assert!(peak >= BURST as usize);
    for held in burst {
        drain(&mut shard, &settings, held);
        assert!(
            shard.spare_lines() <= shard.capacity(),
            "{} spare lines for a table of {}",
            shard.spare_lines(),
            shard.capacity()
        );
    }
    assert_eq!(shard.counts(), (0, 0, 0));
    assert!(
        shard.capacity() < peak && shard.capacity() <= INLINE_KEYS + RETAINED_KEYS,
        "an empty shard keeps a table of {} after a peak of {peak}",
        shard.capacity()
    );
    assert_eq!(shard.spare_lines(), RETAINED_LINES, "spare lines kept");
}

#[test]
fn spare_lines_never_outnumber_the_table_capacity() {
    // Enough keys that the table shrinks while keys are still live: the spare lines
    // follow it down, not only when the shard empties.
    const BURST: u64 = 1_000;
    let settings = Settings::default();
    let mut shard = Shard::new(None, false);
    let burst: Vec<[Held; 2]> = (0..BURST)
        .map(|key| queue(&mut shard, &settings, key))
        .collect();
    let peak = shard.capacity();
    let mut shrank_while_live = false;
    let mut most_spare = 0;
    for held in burst {
        drain(&mut shard, &settings, held);
        let (capacity, spare) = (shard.capacity(), shard.spare_lines());
        assert!(
            spare <= capacity,
            "{spare} spare lines for a table of {capacity}"
        );
        most_spare = most_spare.max(spare);
        shrank_while_live |= capacity < peak && shard.counts().0 > 0;
    }
    assert!(shrank_while_live, "the table never shrank before emptying");
    assert!(
        most_spare > 100,
        "the run kept too few lines to test the bound"
    );
    assert_eq!(shard.counts(), (0, 0, 0));
}

#[test]
fn the_uncontended_release_removes_the_entry_and_hands_the_key_back() {
    let budget = Arc::new(KeyBudget::new(1));
    let settings = settings(2, UNBOUNDED, 1);
    let mut shard = Shard::new(Some(Arc::clone(&budget)), false);
    let tasks = Tasks::default();
    for round in 0..3 {
        let (placed, spare) = shard.claim(&settings, hash_of(7), 7);
        let mut place = placed.expect("the key budget is free again");
        assert!(matches!(place.position, Position::Head), "round {round}");
        assert_eq!(spare, None);
        assert_eq!((shard.counts(), budget.live()), ((1, 1, 0), 1));
        let removed = if round % 2 == 0 {
            // The claim's own release: the fast path.
            shard.leave_alone(place.id, place.bucket)
        } else {
            let mut deferred = shard.leave(
                &settings,
                hash_of(7),
                place.id,
                &mut place.bucket,
                Leaving::Permit { was_head: true },
            );
            assert!(deferred.wake.is_none() && deferred.stale.is_none());
            let removed = deferred.removed_key.take();
            assert_eq!(run(deferred, &tasks), Vec::<usize>::new());
            removed
        };
        // Gone in the same step, and the key is dropped after the lock, not under it.
        assert_eq!(removed, Some(7), "round {round}: the key");
        assert_eq!((shard.counts(), budget.live()), ((0, 0, 0), 0));
        assert!(!shard.has_hash(hash_of(7)), "round {round}: the entry");
    }

    // With a second holder the entry stays until the last one leaves. The second claim
    // waited for the first one's start, so the key has a line, empty by then: the last
    // release takes the general path, and must remove the entry all the same.
    let mut first = claim(&mut shard, &settings, 7);
    let (placed, spare) = shard.claim(&settings, hash_of(7), 7);
    assert_eq!(spare, Some(7), "the shard keeps the first key");
    let mut second = placed.expect("a second permit");
    assert!(matches!(second.position, Position::Waiting { .. }));
    let deferred = shard.start(&settings, hash_of(7), first.id, &mut first.bucket);
    assert_eq!(run(deferred, &tasks), Vec::<usize>::new());
    let Position::Waiting { ticket, .. } = second.position else {
        unreachable!()
    };
    let polled = shard.poll_head(
        hash_of(7),
        second.id,
        &mut second.bucket,
        ticket,
        &mut None,
        Waker::noop(),
    );
    assert!(matches!(polled, Polled::Head(None, _)), "{polled:?}");
    let deferred = shard.leave(
        &settings,
        hash_of(7),
        first.id,
        &mut first.bucket,
        Leaving::Permit { was_head: false },
    );
    assert_eq!(
        deferred.removed_key, None,
        "the second claim still holds the key"
    );
    assert_eq!(run(deferred, &tasks), Vec::<usize>::new());
    assert_eq!(shard.counts(), (1, 1, 0));
    let deferred = shard.leave(
        &settings,
        hash_of(7),
        second.id,
        &mut second.bucket,
        Leaving::Permit { was_head: true },
    );
    assert_eq!(deferred.removed_key, Some(7));
    assert_eq!(run(deferred, &tasks), Vec::<usize>::new());
    assert_eq!((shard.counts(), budget.live()), ((0, 0, 0), 0));
}

/// Where `key`'s entry is now: the hint a claim made now would keep.
fn hint_of(shard: &mut Shard<u64>, key: u64) -> u32 {
    let (_, hint) = shard
        .keys
        .find(hash_of(key), |state| state.key == key)
        .expect("a live key");
    hint
}

#[test]
fn the_release_of_a_lone_claim_removes_only_its_own_idle_entry() {
    let settings = settings(1, UNBOUNDED, UNBOUNDED);
    let mut shard = Shard::new(None, false);
    // More keys than the shard's slots: the last ones live in its table, which grows
    // as they come, and moves the entries it has.
    let keys = 4 * INLINE_KEYS;
    let mut held: Vec<Held> = (0..keys as u64)
        .map(|key| claim(&mut shard, &settings, key))
        .collect();
    assert!(held.iter().all(|held| held.ticket.is_none()));
    let first_in_table = &held[INLINE_KEYS];
    let (moved_id, stale) = (first_in_table.id, first_in_table.bucket);
    assert_eq!(stale & (1 << 31), 0, "a key past the slots is in the table");
    assert_ne!(
        stale,
        hint_of(&mut shard, INLINE_KEYS as u64),
        "the entry moved"
    );
    let hints: Vec<u32> = (0..keys as u64)
        .map(|key| hint_of(&mut shard, key))
        .collect();

    // A hint that names another key's entry, in a slot or in the table, or no entry, or
    // where the entry was before the table moved it: nothing is removed.
    assert_eq!(shard.leave_alone(held[0].id, hints[1]), None);
    assert_eq!(shard.leave_alone(held[keys - 1].id, hints[keys - 2]), None);
    assert_eq!(shard.leave_alone(held[keys - 1].id, u32::MAX >> 1), None);
    assert_eq!(shard.leave_alone(moved_id, stale), None);
    assert_eq!(shard.counts(), (keys, keys, 0));

    // A key with a request in line is not idle when its holder leaves.
    let waiter = claim(&mut shard, &settings, 0);
    assert!(waiter.ticket.is_some());
    assert_eq!(shard.leave_alone(held[0].id, hints[0]), None);
    assert_eq!(shard.counts(), (keys, keys, 1));
    drain(&mut shard, &settings, [held.remove(0), waiter]);

    // The claim whose hint went stale leaves by the general release, which finds its
    // entry by its hash.
    let moved = held.remove(INLINE_KEYS - 1);
    assert_eq!(moved.id, moved_id);
    assert_eq!(
        leave(&mut shard, &settings, moved),
        Some(INLINE_KEYS as u64)
    );

    // Every other lone claim's entry goes, in a slot or in the table, its key handed
    // back.
    for held in held {
        let hint = hint_of(&mut shard, held.key);
        assert_eq!(shard.leave_alone(held.id, hint), Some(held.key));
    }
    assert_eq!(shard.counts(), (0, 0, 0));
}

#[test]
fn an_uncontended_request_writes_the_lock_line_of_its_shard_and_no_other() {
    let registry = crate::registry::Registry::<u64, _>::new(std::hash::RandomState::new());
    for cell in registry.shards() {
        let start = Arc::as_ptr(cell) as usize;
        assert_eq!(start % 128, 0, "a shard starts a pair of cache lines");
        let line = start..start + 64;
        // The lock is in the mutex's first bytes, before the shard it guards.
        let shard = cell.shard.data_ptr() as usize;
        assert_eq!(shard - start, 8, "the lock, then the shard");
        let shard = cell.lock();
        // What a request on a key of an idle shard writes: the id counter and the first
        // slot, beside the lock.
        let next_id = &raw const shard.next_id as usize;
        let first_slot = &raw const shard.keys as usize;
        let slot_end = first_slot + size_of::<Option<KeyState<u64>>>();
        assert!(line.contains(&next_id), "the id counter");
        assert!(
            line.contains(&first_slot) && slot_end <= line.end,
            "the first slot"
        );
    }
}
