//! What the criterion suite (`sync_engine.rs`) and the instruction counts
//! (`instructions.rs`) share: the inner service, the policy, one request's steps, and
//! the hand-written map of mutexes users compare the layer with.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tower::{Service, ServiceExt};
use tower_sync_engine::Mode;

/// The inner service of every row: a `service_fn` whose async block answers at once and
/// allocates nothing.
pub fn echo()
-> impl Service<u64, Response = u64, Error = Infallible, Future: Send> + Copy + Send + 'static {
    tower::service_fn(|n: u64| async move { Ok::<_, Infallible>(n) })
}

/// Requests with the top bit set are `Mode::Concurrent`; the rest are keyed by value.
pub fn policy(request: &u64) -> Mode<u64> {
    if request >> 63 == 1 {
        Mode::Concurrent
    } else {
        Mode::Sync(*request)
    }
}

pub const CONCURRENT: u64 = 1 << 63;

/// One request through `service`: ready, call, and poll to completion. Every row's
/// futures complete on their first poll, except where a row says otherwise.
#[inline]
pub fn one_request<S>(service: &mut S, request: u64, cx: &mut Context<'_>) -> S::Response
where
    S: Service<u64>,
    S::Error: std::fmt::Debug,
{
    match service.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("not ready"),
    }
    poll_dyn(pin!(service.call(request)), cx).expect("no error")
}

/// Polls once through a vtable, as an executor does; panics unless complete.
#[inline]
pub fn poll_dyn<T>(future: Pin<&mut dyn Future<Output = T>>, cx: &mut Context<'_>) -> T {
    match black_box(future).poll(cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("not complete"),
    }
}

// ---- the hand-written alternative: a map of async mutexes with cleanup ----

/// `Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>`, removing a key's mutex when the
/// last user leaves, as users write it.
#[derive(Clone, Default)]
pub struct MutexMap {
    pub locks: Arc<Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>>,
}

impl MutexMap {
    pub async fn run<S>(&self, key: u64, mut inner: S) -> u64
    where
        S: Service<u64, Response = u64, Error = Infallible>,
    {
        let lock = {
            let mut locks = self.locks.lock().unwrap();
            Arc::clone(locks.entry(key).or_default())
        };
        let guard = lock.lock().await;
        let response = inner.ready().await.unwrap().call(key).await.unwrap();
        drop(guard);
        let mut locks = self.locks.lock().unwrap();
        // The map's reference and ours: nobody else holds or waits for it.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(&key);
        }
        response
    }
}

pub fn poll_now<F: Future>(future: F, cx: &mut Context<'_>) -> F::Output {
    poll_dyn(pin!(future), cx)
}
