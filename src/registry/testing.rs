//! What the registry's unit tests share: a small random number generator, and a task
//! whose wakes are logged.

use std::sync::{Arc, Mutex};
use std::task::Wake;

/// xorshift64: enough to vary the operations, and the same run for the same seed.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        // Spread small seeds over the bits; xorshift never leaves 0.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(super) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub(super) fn percent(&mut self, chance: u64) -> bool {
        self.next() % 100 < chance
    }
}

/// A task whose wakes are logged, by id, in a log shared by every task of a run.
pub(super) struct Task<Id> {
    pub(super) id: Id,
    pub(super) woken: Arc<Mutex<Vec<Id>>>,
}

impl<Id: Copy + Send + Sync + 'static> Wake for Task<Id> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.lock().unwrap().push(self.id);
    }
}
