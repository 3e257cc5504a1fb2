//! Cost per request of the layer and of the alternatives users reach for, in one run.
//!
//! ```sh
//! cargo bench --bench sync_engine
//! ```
//!
//! Every benchmark reports time per request. The inner service is the same trivial
//! service returning a ready future everywhere, so the differences are the cost of the
//! ordering mechanism. Futures are polled by hand with a no-op waker where no runtime is
//! needed, so no executor cost is included; the actor and the multi-thread rows need a
//! runtime and say so in their names.
//!
//! Response futures are polled through `dyn Future`, as an executor polls a task. Without
//! that, the compiler folds the raw baseline's ready future into the loop and measures
//! nothing at all.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::Full;
use hyper::body::{Body, Bytes};
use hyper::http;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service, ServiceExt};
use tower_sync_engine::{Mode, SyncEngineLayer};

mod common;
use common::{CONCURRENT, MutexMap, echo, one_request, policy, poll_dyn, poll_now};

// ---- the actor alternative: one task and channel per key ----

type Mailbox = mpsc::UnboundedSender<(u64, oneshot::Sender<u64>)>;

fn spawn_actor() -> Mailbox {
    let (mailbox, mut inbox) = mpsc::unbounded_channel::<(u64, oneshot::Sender<u64>)>();
    tokio::spawn(async move {
        let mut inner = echo();
        while let Some((request, reply)) = inbox.recv().await {
            let response = inner.ready().await.unwrap().call(request).await.unwrap();
            let _ = reply.send(response);
        }
    });
    mailbox
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn per_request(c: &mut Criterion) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("per_request");
    group.throughput(Throughput::Elements(1));

    group.bench_function("raw service_fn", |b| {
        let mut service = echo();
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            one_request(&mut service, black_box(n), &mut cx)
        });
    });

    group.bench_function("layer Concurrent", |b| {
        let mut service = SyncEngineLayer::new(policy).layer(echo());
        let mut n = CONCURRENT;
        b.iter(|| {
            n += 1;
            one_request(&mut service, black_box(n), &mut cx)
        });
    });

    group.bench_function("layer Sync new key", |b| {
        let mut service = SyncEngineLayer::new(policy).layer(echo());
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            one_request(&mut service, black_box(n), &mut cx)
        });
    });

    group.bench_function("layer Sync new key, foldhash", |b| {
        let mut service = SyncEngineLayer::new(policy)
            .with_hasher(foldhash::fast::RandomState::default())
            .layer(echo());
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            one_request(&mut service, black_box(n), &mut cx)
        });
    });

    group.bench_function("layer Sync one key", |b| {
        let mut service = SyncEngineLayer::new(policy).layer(echo());
        b.iter(|| one_request(&mut service, black_box(7), &mut cx));
    });

    group.bench_function("ConcurrencyLimit(1)", |b| {
        let mut service = ConcurrencyLimit::new(echo(), 1);
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            one_request(&mut service, black_box(n), &mut cx)
        });
    });

    group.bench_function("map of mutexes new key", |b| {
        let map = MutexMap::default();
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            poll_now(map.run(black_box(n), echo()), &mut cx)
        });
    });

    group.bench_function("map of mutexes one key", |b| {
        let map = MutexMap::default();
        b.iter(|| poll_now(map.run(black_box(7), echo()), &mut cx));
    });

    group.bench_function("actor new key (runtime)", |b| {
        let runtime = current_thread();
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                for n in 0..iters {
                    let mailbox = spawn_actor();
                    let (reply, response) = oneshot::channel();
                    mailbox.send((n, reply)).unwrap();
                    black_box(response.await.unwrap());
                }
                started.elapsed()
            })
        });
    });

    group.bench_function("actor one key (runtime)", |b| {
        let runtime = current_thread();
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mailbox = spawn_actor();
                let started = Instant::now();
                for n in 0..iters {
                    let (reply, response) = oneshot::channel();
                    mailbox.send((n, reply)).unwrap();
                    black_box(response.await.unwrap());
                }
                started.elapsed()
            })
        });
    });

    group.finish();
}

/// 1000 requests queued on one key, then driven in order: the cost of a hand-off,
/// including each request's enqueueing.
fn hand_off(c: &mut Criterion) {
    const QUEUED: usize = 1000;
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("hand_off_1000_queued");
    group.throughput(Throughput::Elements(QUEUED as u64));

    group.bench_function("layer", |b| {
        let mut service = SyncEngineLayer::new(policy).layer(echo());
        let mut futures = Vec::with_capacity(QUEUED);
        b.iter(|| {
            futures.extend((0..QUEUED).map(|_| Box::pin(service.call(7))));
            for future in &mut futures[1..] {
                assert!(future.as_mut().poll(&mut cx).is_pending());
            }
            for future in &mut futures {
                assert!(future.as_mut().poll(&mut cx).is_ready());
            }
            futures.clear();
        });
    });

    group.bench_function("tokio Semaphore(1)", |b| {
        let semaphore = Arc::new(Semaphore::new(1));
        let mut futures = Vec::with_capacity(QUEUED);
        b.iter(|| {
            let first = semaphore.clone().try_acquire_owned().unwrap();
            futures.extend((1..QUEUED).map(|_| Box::pin(semaphore.clone().acquire_owned())));
            for future in &mut futures {
                assert!(future.as_mut().poll(&mut cx).is_pending());
            }
            drop(black_box(first));
            for future in &mut futures {
                match future.as_mut().poll(&mut cx) {
                    Poll::Ready(permit) => drop(black_box(permit)),
                    Poll::Pending => panic!("not handed off"),
                }
            }
            futures.clear();
        });
    });

    group.bench_function("map of mutexes", |b| {
        let map = MutexMap::default();
        let mut futures = Vec::with_capacity(QUEUED);
        b.iter(|| {
            // Hold the key so that every request queues on its first poll.
            let lock = Arc::clone(map.locks.lock().unwrap().entry(7).or_default());
            let first = lock.clone().try_lock_owned().unwrap();
            drop(lock);
            futures.extend((0..QUEUED).map(|_| Box::pin(map.run(7, echo()))));
            for future in &mut futures {
                assert!(future.as_mut().poll(&mut cx).is_pending());
            }
            drop(black_box(first));
            for future in &mut futures {
                assert!(future.as_mut().poll(&mut cx).is_ready());
            }
            futures.clear();
        });
    });

    group.bench_function("actor (runtime)", |b| {
        let runtime = current_thread();
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mailbox = spawn_actor();
                let started = Instant::now();
                for _ in 0..iters {
                    let responses: Vec<_> = (0..QUEUED as u64)
                        .map(|n| {
                            let (reply, response) = oneshot::channel();
                            mailbox.send((n, reply)).unwrap();
                            response
                        })
                        .collect();
                    for response in responses {
                        black_box(response.await.unwrap());
                    }
                }
                started.elapsed()
            })
        });
    });

    group.finish();
}

/// A key not live before, per request, while `live` other keys are held. "cold": each
/// request's key is new, so its table slot is rarely in cache; "hot": requests cycle
/// over 1000 keys, so what is measured is the data structure, not memory latency.
fn live_keys(c: &mut Criterion) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("new_key_with_live_keys");
    group.throughput(Throughput::Elements(1));
    for live in [1u64, 10_000, 1_000_000] {
        for (label, cycle) in [("layer cold", u64::MAX), ("layer hot", 1_000)] {
            group.bench_with_input(BenchmarkId::new(label, live), &live, |b, &live| {
                let mut service = SyncEngineLayer::new(policy).layer(echo());
                let held: Vec<_> = (0..live).map(|key| service.call(key)).collect();
                let mut n = 0u64;
                b.iter(|| {
                    n += 1;
                    one_request(&mut service, black_box((1 << 40) + n % cycle), &mut cx)
                });
                drop(held);
            });
        }
        group.bench_with_input(
            BenchmarkId::new("map of mutexes cold", live),
            &live,
            |b, &live| {
                let map = MutexMap::default();
                let guards: Vec<_> = {
                    let mut locks = map.locks.lock().unwrap();
                    (0..live)
                        .map(|key| {
                            let lock = Arc::clone(locks.entry(key).or_default());
                            lock.try_lock_owned().unwrap()
                        })
                        .collect()
                };
                let mut n = 1 << 40;
                b.iter(|| {
                    n += 1;
                    poll_now(map.run(black_box(n), echo()), &mut cx)
                });
                drop(guards);
            },
        );
    }
    group.finish();
}

/// Passes a `u64` key through unchanged: an identity hasher, as nohash-style hashers for
/// integer ids are, and the way a benchmark chooses each key's shard.
#[derive(Clone, Copy, Default)]
struct Identity;

struct Unchanged(u64);

impl std::hash::Hasher for Unchanged {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("keys are u64")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl std::hash::BuildHasher for Identity {
    type Hasher = Unchanged;
    fn build_hasher(&self) -> Unchanged {
        Unchanged(0)
    }
}

/// The registry's shard for `key` under the identity hasher, modulo 8: the registry
/// stirs the hash (`registry::spread`) and takes the shard from bits 32 and up. Copied
/// here so that the "disjoint shards" rows can give each task keys of its own shards.
fn shard_mod_8(key: u64) -> u64 {
    let stirred = (key ^ (key >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (stirred >> 32) & 7
}

/// 10,000 keys for each of 8 tasks, each task's in shards of its own.
fn disjoint_keys() -> Vec<Vec<u64>> {
    let mut keys: Vec<Vec<u64>> = (0..8).map(|_| Vec::with_capacity(10_000)).collect();
    let mut key = 0;
    while keys.iter().any(|task| task.len() < 10_000) {
        let task = &mut keys[shard_mod_8(key) as usize];
        if task.len() < 10_000 {
            task.push(key);
        }
        key += 1;
    }
    keys
}

/// Throughput on a multi-thread runtime: 8 tasks, each sending requests over its own
/// 10k keys.
///
/// - "random keys": keys hash anywhere, so both workers touch every shard and shard state
///   moves between the cores' caches; with the default hasher, and with an identity
///   hasher (integer ids under a nohash-style hasher), which must spread as well;
/// - "disjoint shards": each task's keys land in its own shards. With no global lock or
///   counter on the path, 2 workers do about twice the work of 1.
fn multi_thread(c: &mut Criterion) {
    const TASKS: u64 = 8;
    const PER_TASK: u64 = 20_000;
    let mut group = c.benchmark_group("multi_thread_many_keys");
    group.throughput(Throughput::Elements(TASKS * PER_TASK));
    let disjoint = std::sync::Arc::new(disjoint_keys());
    let random = |_: &[Vec<u64>], task: u64, n: u64| task * 10_000 + n % 10_000;
    let own_shards =
        |keys: &[Vec<u64>], task: u64, n: u64| keys[task as usize][(n % 10_000) as usize];
    type KeyOf = fn(&[Vec<u64>], u64, u64) -> u64;
    for (label, key, identity) in [
        ("random keys, workers", random as KeyOf, false),
        ("random keys, identity hasher, workers", random, true),
        ("disjoint shards, workers", own_shards, true),
    ] {
        for workers in [1, 2] {
            group.bench_with_input(BenchmarkId::new(label, workers), &workers, |b, &workers| {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .build()
                    .unwrap();
                let service = if identity {
                    tower::util::BoxCloneSyncService::new(
                        SyncEngineLayer::new(policy)
                            .with_hasher(Identity)
                            .layer(echo()),
                    )
                } else {
                    tower::util::BoxCloneSyncService::new(
                        SyncEngineLayer::new(policy).layer(echo()),
                    )
                };
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += runtime.block_on(async {
                            let started = Instant::now();
                            let tasks: Vec<_> = (0..TASKS)
                                .map(|task| {
                                    let mut service = service.clone();
                                    let keys = disjoint.clone();
                                    tokio::spawn(async move {
                                        for n in 0..PER_TASK {
                                            let response = service.call(key(&keys, task, n)).await;
                                            black_box(response.unwrap());
                                        }
                                    })
                                })
                                .collect();
                            for task in tasks {
                                task.await.unwrap();
                            }
                            started.elapsed()
                        });
                    }
                    total
                });
            });
        }
    }
    group.finish();
}

// ---- the HTTP flavour against the plain layer ----

/// An HTTP request whose body is the `u64` the other rows send.
type HttpRequest = http::Request<u64>;

/// The inner HTTP service: answers at once with a one-frame body.
fn http_echo()
-> impl Service<HttpRequest, Response = http::Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Copy
+ Send
+ 'static {
    tower::service_fn(|_: HttpRequest| async move {
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

/// `policy` for HTTP requests.
fn http_policy(request: &HttpRequest) -> Mode<u64> {
    policy(request.body())
}

/// One HTTP request through `service`, and its response body read to its end: that is
/// when the HTTP flavour releases the key.
#[inline]
fn one_http_request<S, B>(service: &mut S, request: u64, cx: &mut Context<'_>) -> usize
where
    S: Service<HttpRequest, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
{
    match service.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("not ready"),
    }
    let response = poll_dyn(pin!(service.call(http::Request::new(request))), cx);
    let mut body = pin!(response.expect("no error").into_body());
    let mut frames = 0;
    loop {
        match black_box(body.as_mut()).poll_frame(cx) {
            Poll::Ready(Some(Ok(_))) => frames += 1,
            Poll::Ready(None) => return frames,
            _ => panic!("the body did not end"),
        }
    }
}

/// The cost of holding the key until the response body ends: each row is ready, call,
/// poll, and the body read to its end, through the plain layer (which releases when the
/// response future completes) and through `for_http()`.
fn http_per_request(c: &mut Criterion) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut group = c.benchmark_group("http_per_request");
    group.throughput(Throughput::Elements(1));

    group.bench_function("raw service_fn", |b| {
        let mut service = http_echo();
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            one_http_request(&mut service, black_box(n), &mut cx)
        });
    });

    for (mode, first, cycle) in [
        ("Concurrent", CONCURRENT, u64::MAX),
        ("Sync new key", 0, u64::MAX),
        ("Sync one key", 7, 1),
    ] {
        group.bench_function(format!("plain {mode}"), |b| {
            let mut service = SyncEngineLayer::new(http_policy).layer(http_echo());
            let mut n = 0u64;
            b.iter(|| {
                n += 1;
                one_http_request(&mut service, black_box(first + n % cycle), &mut cx)
            });
        });
        group.bench_function(format!("http {mode}"), |b| {
            let mut service = SyncEngineLayer::new(http_policy)
                .for_http()
                .layer(http_echo());
            let mut n = 0u64;
            b.iter(|| {
                n += 1;
                one_http_request(&mut service, black_box(first + n % cycle), &mut cx)
            });
        });
    }

    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = per_request, http_per_request, hand_off, live_keys, multi_thread
}
criterion_main!(benches);
