//! A global allocator that counts, and an inner service that allocates nothing; shared by
//! `tests/memory.rs` and `benches/memory.rs`. Including this module installs the
//! allocator for the whole binary.
//!
//! The counts are per thread: other threads of the process (another test, a runtime's
//! workers) cannot move them, so a measurement made on one thread sees only its own
//! allocations.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use tower::Service;

struct Counting;

thread_local! {
    // Constant-initialized and without destructors, so that the allocator may use them
    // at any point of a thread's life.
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count(bytes: isize, allocations: usize) {
    let _ = LIVE_BYTES.try_with(|live| live.set(live.get() + bytes));
    let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + allocations));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize, 1);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize), 0);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize, 1);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes allocated and not freed by this thread.
pub fn live_bytes() -> isize {
    LIVE_BYTES.with(Cell::get)
}

/// Allocations (and reallocations) made by this thread.
pub fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

/// An inner service that allocates nothing, so every allocation counted is the layer's.
#[derive(Clone, Copy)]
pub struct Echo;

impl Service<u64> for Echo {
    type Response = u64;
    type Error = std::convert::Infallible;
    type Future = Ready<Result<u64, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u64) -> Self::Future {
        ready(Ok(request))
    }
}

/// An inner service that allocates nothing and whose futures finish on their second
/// poll, so that a request can be left running while others queue behind it.
#[derive(Clone, Copy)]
pub struct YieldOnce;

/// The future of [`YieldOnce`]: pending once, then ready.
pub struct SecondPoll {
    request: u64,
    polled: bool,
}

impl Service<u64> for YieldOnce {
    type Response = u64;
    type Error = std::convert::Infallible;
    type Future = SecondPoll;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u64) -> Self::Future {
        SecondPoll {
            request,
            polled: false,
        }
    }
}

impl std::future::Future for SecondPoll {
    type Output = Result<u64, std::convert::Infallible>;

    fn poll(mut self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        if std::mem::replace(&mut self.polled, true) {
            Poll::Ready(Ok(self.request))
        } else {
            Poll::Pending
        }
    }
}
