//! Foreign code that the registry runs where a panic may already be unwinding.
//!
//! The registry wakes wakers and lets go of keys and wakers in destructors: a claim gives
//! its place up in `Drop`, and a response future is dropped by the unwinding of a panic
//! that passes through its owner (a handler that panics under `block_on`, a `pin!`ned
//! future on the stack of a panicking function, a runtime's main future). A destructor
//! may also call or poll the layer. A panic that escapes a destructor while the thread is
//! already panicking aborts the process. So while the thread is panicking, that code
//! runs under `catch_unwind` and a second panic is dropped there: the first one is on its
//! way to the caller already, and is the one the caller sees. Otherwise it runs as it is,
//! and its panic propagates like any other; all that path adds is a look at the thread's
//! panic count, and only for a waker to wake or a value with drop glue to drop.
//!
//! Several steps in a row each get their own guard, made before the first step runs: if
//! a step panics outside of any unwinding, the guards of the steps after it are dropped
//! by that unwinding, and contain a panic of theirs. One `catch_unwind` around them all
//! would not do: a panic in a value dropped while unwinding inside it aborts as well.

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs the foreign code `f`, and drops a panic of its own if the thread is unwinding
/// already.
#[inline]
pub(crate) fn run(f: impl FnOnce()) {
    if std::thread::panicking() {
        contain(f);
    } else {
        f();
    }
}

/// Lets go of the foreign value `value`, as [`run`] would drop it.
#[inline]
pub(crate) fn let_go<T>(value: T) {
    if std::mem::needs_drop::<T>() && std::thread::panicking() {
        contain(move || drop(value));
    }
}

#[cold]
#[inline(never)]
fn contain(f: impl FnOnce()) {
    let mut outcome = catch_unwind(AssertUnwindSafe(f));
    // The payload's `Drop` is foreign code too.
    while let Err(payload) = outcome {
        outcome = catch_unwind(AssertUnwindSafe(move || drop(payload)));
    }
}

/// A foreign value to let go of, one of several in a row: dropped with the guard as
/// [`let_go`] drops it, also when the unwinding of an earlier step drops the guard.
pub(crate) struct LetGo<T>(pub(crate) Option<T>);

impl<T> Drop for LetGo<T> {
    #[inline]
    fn drop(&mut self) {
        // Outside of any unwinding the field is dropped right after this, as a plain
        // value, so that the guard costs no more than the check.
        if std::mem::needs_drop::<T>() && self.0.is_some() && std::thread::panicking() {
            let value = self.0.take();
            contain(move || drop(value));
        }
    }
}

/// A waker to wake, one of several steps in a row: woken when the guard is dropped, as
/// [`run`] would wake it, also when the unwinding of an earlier step drops the guard.
pub(crate) struct WakeLater(pub(crate) Option<std::task::Waker>);

impl Drop for WakeLater {
    fn drop(&mut self) {
        if let Some(waker) = self.0.take() {
            run(move || waker.wake());
        }
    }
}
