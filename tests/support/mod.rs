//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod capture;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::BoxError;
use tower::util::BoxCloneSyncService;

/// A message as a connection would send it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub key: u64,
    pub seq: u64,
    pub work: Duration,
    pub panic: bool,
}

impl Msg {
    pub fn new(key: u64, seq: u64, work_ms: u64) -> Self {
        Msg {
            key,
            seq,
            work: Duration::from_millis(work_ms),
            panic: false,
        }
    }
}

/// What the handler saw, in the order it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Start(u64, u64),
    End(u64, u64),
}

/// Records handler starts and ends, and checks that no key ever runs more than
/// `max_per_key` handlers at once.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<Mutex<RecorderState>>,
}

#[derive(Default)]
struct RecorderState {
    events: Vec<Event>,
    running: HashMap<u64, usize>,
    max_running: HashMap<u64, usize>,
}

impl Recorder {
    pub fn events(&self) -> Vec<Event> {
        self.inner.lock().unwrap().events.clone()
    }

    /// The sequence numbers of one key's handler starts, in start order.
    pub fn starts(&self, key: u64) -> Vec<u64> {
        self.events()
            .into_iter()
            .filter_map(|event| match event {
                Event::Start(k, seq) if k == key => Some(seq),
                _ => None,
            })
            .collect()
    }

    /// The sequence numbers of all handler ends, in end order.
    pub fn ends(&self) -> Vec<u64> {
        self.events()
            .into_iter()
            .filter_map(|event| match event {
                Event::End(_, seq) => Some(seq),
                _ => None,
            })
            .collect()
    }

    /// The largest number of handlers of one key that ran at once.
    pub fn max_running(&self, key: u64) -> usize {
        self.inner
            .lock()
            .unwrap()
            .max_running
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    fn start(&self, key: u64, seq: u64) -> RunningGuard {
        let mut state = self.inner.lock().unwrap();
        state.events.push(Event::Start(key, seq));
        let running = state.running.entry(key).or_default();
        *running += 1;
        let now = *running;
        let max = state.max_running.entry(key).or_default();
        *max = (*max).max(now);
        RunningGuard {
            recorder: self.clone(),
            key,
        }
    }

    fn end(&self, key: u64, seq: u64) {
        self.inner.lock().unwrap().events.push(Event::End(key, seq));
    }
}

/// Counts a handler as running until it is dropped, so that a cancelled handler stops
/// counting.
struct RunningGuard {
    recorder: Recorder,
    key: u64,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if let Ok(mut state) = self.recorder.inner.lock() {
            *state.running.get_mut(&self.key).unwrap() -= 1;
        }
    }
}

pub type Handler = BoxCloneSyncService<Msg, u64, BoxError>;

/// A handler that records its start, works for `msg.work` on tokio's clock (panicking
/// instead if `msg.panic`), records its end, and answers with the sequence number.
pub fn handler(recorder: &Recorder) -> Handler {
    let recorder = recorder.clone();
    BoxCloneSyncService::new(tower::service_fn(move |msg: Msg| {
        let recorder = recorder.clone();
        async move {
            let _running = recorder.start(msg.key, msg.seq);
            if msg.work.is_zero() {
                // Still give other tasks (and other workers) a chance to interleave.
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(msg.work).await;
            }
            if msg.panic {
                panic!("handler for message {} panicked", msg.seq);
            }
            recorder.end(msg.key, msg.seq);
            Ok::<_, BoxError>(msg.seq)
        }
    }))
}

/// Keeps the panics that tests provoke on purpose out of the output.
pub fn quiet_handler_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or_default();
            let provoked =
                message.starts_with("handler for message") || message.starts_with("injected");
            if !provoked {
                default(info);
            }
        }));
    });
}

/// A small deterministic generator, so randomized tests can print and replay their seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the `Drop` of an explosive [`Key`] panics with.
pub const KEY_DROP_PANIC: &str = "injected: a key's drop panicked";

/// A key whose `Drop` panics when `explosive` is set, outside of any unwinding. Equal and
/// hashed by `id` only, so an explosive key and a harmless one are the same key.
#[derive(Debug)]
pub struct Key {
    pub id: u64,
    pub explosive: bool,
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        if self.explosive && !std::thread::panicking() {
            panic!("{KEY_DROP_PANIC}");
        }
    }
}

/// Every key hashes alike, so that every key (and every set's lead) is in one shard, and
/// every lookup compares keys: the worst case for a table.
#[derive(Clone, Copy, Debug, Default)]
pub struct OneShard;

impl std::hash::BuildHasher for OneShard {
    type Hasher = Constant;

    fn build_hasher(&self) -> Constant {
        Constant
    }
}

/// The hasher of [`OneShard`]: every value hashes to 7.
pub struct Constant;

impl std::hash::Hasher for Constant {
    fn finish(&self) -> u64 {
        7
    }

    fn write(&mut self, _: &[u8]) {}
}
