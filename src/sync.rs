//! The synchronization primitives the registry is built on.
//!
//! Under `cfg(loom)` they are loom's instrumented versions, so the model tests in
//! `tests/loom/tests/registry.rs` explore every interleaving of the real registry code.

#[cfg(loom)]
pub(crate) use loom::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

#[cfg(not(loom))]
pub(crate) use parking_lot::{Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};
