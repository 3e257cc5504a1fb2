//! A Tower layer that handles a client's messages one at a time, in arrival order,
//! without blocking the runtime.
//!
//! This is TornadIO2's `sync_engine` decorator as a [`tower`](https://docs.rs/tower)
//! middleware. A *policy* looks at each request and says either
//! [`Mode::Sync(key)`](Mode::Sync), to run it after every earlier request with the same
//! key, or [`Mode::Concurrent`], to pass it straight through. The key is the
//! application's choice: a connection id serializes a whole `on_event` dispatcher, a
//! `(connection, event)` pair serializes one handler, a document id orders edits from
//! every connection.
//!
//! # The scenario
//!
//! A client quickly sends two messages. The first takes a long time to handle, the
//! second is fast. In `Sync` mode the second is handled after the first, so the
//! responses come in the order sent; in `Concurrent` mode the second overtakes it.
//!
//! ```
//! use std::time::Duration;
//! use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
//! use tower_sync_engine::{Mode, SyncEngineLayer};
//!
//! struct Message { connection: u64, seq: u32, work: Duration }
//!
//! /// Sends a slow message and then a fast one; returns the order their handling finished.
//! async fn finish_order(sync: bool) -> Vec<u32> {
//!     let handler = service_fn(|msg: Message| async move {
//!         tokio::time::sleep(msg.work).await;
//!         Ok::<_, BoxError>(msg.seq)
//!     });
//!     let layer = SyncEngineLayer::new(move |msg: &Message| {
//!         if sync { Mode::Sync(msg.connection) } else { Mode::Concurrent }
//!     });
//!     let mut service = layer.layer(handler);
//!
//!     let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
//!     for (seq, millis) in [(1, 300), (2, 10)] {
//!         let message = Message { connection: 7, seq, work: Duration::from_millis(millis) };
//!         // `call` takes the message's place in line before it returns.
//!         let response = service.ready().await.unwrap().call(message);
//!         let done = done.clone();
//!         tokio::spawn(async move { done.send(response.await.unwrap()).unwrap() });
//!     }
//!     drop(done);
//!     let mut order = Vec::new();
//!     while let Some(seq) = finished.recv().await {
//!         order.push(seq);
//!     }
//!     order
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! assert_eq!(finish_order(true).await, [1, 2]);
//! assert_eq!(finish_order(false).await, [2, 1]);
//! # }
//! ```
//!
//! # Guarantees
//!
#![doc = include_str!("../docs/guarantees.md")]
//!
//! # What is not guaranteed
//!
//! - **A handler that waits for its own key deadlocks.** A handler for key `k` that calls
//!   the same domain with `Mode::Sync(k)` and awaits the response waits for itself.
//! - **A key's `Eq` that calls back into its own layer deadlocks.** Looking a key up
//!   compares it with the live keys of its shard while that shard is locked, so an `Eq`
//!   that reads the same layer's `stats()` or calls its services waits for that lock. An
//!   `Eq` may panic (guarantee 6); `Hash`, which runs before the lock is taken, may also
//!   call back into the layer.
//! - **A policy or key that panics, or a key type whose `Hash` is constant, is not made
//!   good.** A panicking request is dropped (guarantee 6); keys that all hash alike make
//!   every request compare its key with every live key (see
//!   [`with_hasher`](SyncEngineLayer::with_hasher)).
//! - **A response future that is never polled holds its place.** The key passes on when
//!   the future completes or is dropped; a future that is kept but never polled again
//!   blocks the requests behind it. Spawn the futures, or put a timeout around them.
//! - **Order between different keys**, and between `Sync` and `Concurrent` requests, is
//!   whatever the runtime makes of it.
//! - **Order across processes.** One layer orders one process's requests; see the
//!   README for routing by key when you run several.
//!
//! # Failure semantics
//!
//! - **A handler error or panic releases the key**, and the next request runs, as in
//!   TornadIO2. The error goes to that request's caller only; a panic unwinds through
//!   the response future, and dropping it passes the key on.
//! - **No "fail the rest of the queue" mode.** Akka-style streams fail everything queued
//!   behind an error. This layer does not: it orders requests and never interprets
//!   responses, and whether a failed message poisons the ones after it, and when the key
//!   recovers, is protocol knowledge. A handler that needs it can keep per-key failure
//!   state and answer the following requests itself, still in order.
//! - **Dropping every service and the layer does not strand anyone.** Each request
//!   keeps its shard of the registry alive, so queued requests still run in order as
//!   the ones ahead of them complete or are dropped.
//! - **[`Overloaded`](error::Overloaded) says which limit was hit**, through
//!   [`Overloaded::limit`](error::Overloaded::limit): `max_queue_per_key` or `max_keys`.
//!
//! # Readiness and errors
//!
//! [`SyncEngine`] is always ready. A `Mode::Concurrent` request, and a `Mode::Sync`
//! request whose key is free, reach the inner service inside `call()`: its `poll_ready`
//! (with a no-op waker) and, when that is ready, its `call` run there, in the caller's
//! thread, task and runtime and under any lock the caller holds. A request that waits
//! for its key, or whose inner service was not ready in `call()`, reaches it from its
//! response future, which polls its own handle on the inner service for readiness once
//! the turn has come; the inner service must therefore be `Clone` (tower's `Buffer` puts
//! one that is not behind a handle that is, as the README shows). So make `call()`
//! where the inner stack can run: inside the runtime if a layer inside, such as
//! `Timeout`, needs its timer (see
//! [Where the inner service runs](SyncEngine#where-the-inner-service-runs)).
//!
//! Errors are boxed into [`BoxError`](error::BoxError), as with tower's other fallible
//! middleware; this crate's own error is [`error::Overloaded`]. The HTTP flavour keeps
//! the inner service's error type instead (see [With axum](#with-axum)).
//!
//! # Several keys at once
//!
//! A transfer between two accounts, a move from one room to another, an edit that
//! touches two documents: each must be ordered against every key it touches. Give such
//! a request [`Mode::sync_all`]:
//!
//! ```
//! use tower::{BoxError, Layer, Service, service_fn};
//! use tower_sync_engine::{Mode, SyncEngineLayer};
//!
//! enum Op { Deposit { account: u64 }, Transfer { from: u64, to: u64 }, Balance }
//!
//! fn by_accounts(op: &Op) -> Mode<u64> {
//!     match op {
//!         Op::Deposit { account } => Mode::Sync(*account),
//!         // Ordered against both accounts, in whatever order the request names them.
//!         Op::Transfer { from, to } => Mode::sync_all([*from, *to]),
//!         Op::Balance => Mode::Concurrent,
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let bank = service_fn(|_op: Op| async move { Ok::<_, BoxError>(()) });
//! let layer = SyncEngineLayer::new(by_accounts);
//! let mut service = layer.layer(bank);
//!
//! let first = service.call(Op::Transfer { from: 1, to: 2 });
//! let second = service.call(Op::Transfer { from: 2, to: 1 });
//! let deposit = service.call(Op::Deposit { account: 1 });
//! // The first transfer holds both accounts; the second waits on both, the deposit on
//! // account 1, behind the second: one order, the order of the calls, on every key.
//! let stats = layer.stats();
//! assert_eq!((stats.keys, stats.in_flight, stats.queued), (2, 2, 3));
//! first.await?;
//! second.await?;
//! deposit.await?;
//! # Ok(())
//! # }
//! ```
//!
//! **How.** Inside `call()`, the request takes its place in every key's line in one
//! step: it locks the shards of its keys in ascending shard order, joins each key's line
//! (or takes a free key) exactly as a `Mode::Sync` request would, and only then releases
//! the locks. Two requests that share a key both hold that key's shard lock while they
//! take their places, so whichever took its places first did so on every key they
//! share: every line agrees on one order, the order of those steps, which is the order
//! of the `call()`s whenever one returns before the next begins. A request waits only
//! for requests ahead of it, which took their places earlier, so no set of requests can
//! wait for each other in a cycle: **no deadlock can form**, for any mix of single- and
//! multi-key requests, any key order inside a set and any `permits_per_key`, without
//! deadlock detection and without retries. The request is called once it is the head of
//! every one of its keys' lines.
//!
//! **The rest is as for one key**, on every key of the set:
//!
//! - Duplicated keys count once; [`Mode::sync_all`] of no keys is `Mode::Concurrent`,
//!   and of one key `Mode::Sync`.
//! - Dropping the response future in any state (waiting on every key, head on some,
//!   running) gives up every place at once and passes each key on.
//! - Limits are all or nothing: if any key's line is full (`max_queue_per_key`) or the
//!   request's new keys would pass `max_keys`, `call()` answers
//!   [`Overloaded`](error::Overloaded) at once and leaves nothing behind on any key.
//! - The HTTP flavour holds every key until the response body ends.
//! - Foreign code (the keys' `Hash`, `Eq` and `Drop`, wakers, subscribers) keeps the
//!   guarantees it has for one key.
//!
//! **Counts and events are per key.** In [`Stats`], a request on several keys is counted
//! on each of them: in `in_flight` once for every key whose permit it holds, in `queued`
//! once for every key it waits on; `keys` counts distinct keys. With `tracing`, it emits
//! one `queued` event for every key it waits on, and one `admitted` event as it becomes
//! the head of each of those. With `metrics`, `tower_sync_engine_waits_total` and
//! `tower_sync_engine_wait_seconds` count and time each key it waited on, and a
//! rejection counts once.
//!
//! **A convoy.** While a multi-key request waits for one of its keys, it holds its place
//! on the others, and requests behind it there wait too: a transfer stuck behind a slow
//! request on account 2 holds up later deposits to account 1. That is the price of one
//! order on every key. Keep sets to the keys a request must be ordered against (read
//! balances with `Mode::Concurrent`), keep handlers short, and bound the wait with a
//! timeout outside the layer and the lines with
//! [`max_queue_per_key`](SyncEngineLayer::max_queue_per_key).
//!
//! `examples/ledger.rs` runs thousands of random transfers this way from many tasks,
//! checks that money is conserved and every account runs in call order, and compares one
//! global lock (correct, slower) and per-account mutexes locked in request order, which
//! deadlock.
//!
//! # Fair share of shared capacity
//!
//! Per-key order protects each key from itself, not keys from each other. Behind the
//! layer sits capacity every key shares: a database pool, a downstream API, the CPU.
//! [`max_in_flight(n)`](SyncEngineLayer::max_in_flight) caps the `Mode::Sync` and
//! `Mode::SyncAll` requests of the whole domain that are between their inner call and
//! their completion at `n`, and shares those `n` *slots* fairly between keys:
//!
//! - A request that is free to start on its keys but finds every slot taken waits for
//!   one. It keeps its place on its keys (nothing behind it there starts first, so at
//!   most one request per key waits for a slot: the key's next to start), still counts
//!   against [`max_queue_per_key`](SyncEngineLayer::max_queue_per_key), and holds no
//!   inner capacity: its inner service's readiness is polled only once it has a slot.
//!   It asks for one inside `call()` when its keys are free then, and otherwise on the
//!   first poll of its response future after its turn on its keys has come, as it would
//!   poll the inner service's readiness; a slot that frees before that goes to the
//!   requests already waiting for one, or to whoever asks first if none is.
//! - **A freed slot goes to the waiting request whose key holds the fewest slots; among
//!   equals, to the one whose key was granted a slot least recently (a key never granted
//!   one first); among equals, to the one that has waited longest.** With one permit per
//!   key that is round robin across keys: a hot key with a backlog of 50 and five quiet
//!   keys that arrive after it get the slots in turns, not after the backlog. A key's
//!   history lasts while the key is live; a key that goes idle starts afresh.
//! - A `Mode::SyncAll` request takes one slot, counted on each of its keys, and waits
//!   as its busiest key: the most slots any of its keys holds, the latest grant any of
//!   them had.
//! - `Mode::Concurrent` requests are not counted and never wait (guarantee 3).
//! - Dropping a request in any state (waiting for a slot, granted one and not yet
//!   polled, running) frees its slot at once, and the slot goes on by the same rule. Over
//!   HTTP a request holds its slot until its response body ends.
//! - One layer value is one domain, so under axum one cap spans every route the layer
//!   is on; tower's `ConcurrencyLimit` inside the layer is FIFO, and a `Router::layer`
//!   gives each route a semaphore of its own.
//!
//! [`Stats::waiting_for_slot`] counts the requests waiting for a slot. With `tracing`, a
//! request that has to wait for one emits `slot_queued`, and `slot_granted` with
//! `waited_us` once it has one.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use tower::{BoxError, Layer, Service, service_fn};
//! use tower_sync_engine::{Mode, SyncEngineLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let started = Arc::new(Mutex::new(Vec::new()));
//! let log = Arc::clone(&started);
//! let handler = service_fn(move |(tenant, n): (&'static str, u32)| {
//!     log.lock().unwrap().push((tenant, n));
//!     async move {
//!         tokio::time::sleep(Duration::from_millis(10)).await; // the shared resource
//!         Ok::<_, BoxError>(())
//!     }
//! });
//! // One slot for the whole domain, shared by every tenant.
//! let layer = SyncEngineLayer::new(|(tenant, _): &(&'static str, u32)| Mode::Sync(*tenant))
//!     .max_in_flight(1);
//! let mut service = layer.layer(handler);
//!
//! let mut calls = Vec::new();
//! for n in 0..5 {
//!     calls.push(tokio::spawn(service.call(("hot", n)))); // a backlog on one tenant
//! }
//! calls.push(tokio::spawn(service.call(("quiet", 0)))); // then one quiet request
//! for call in calls {
//!     call.await??;
//! }
//! // The quiet tenant was served second, not after the hot tenant's backlog.
//! assert_eq!(started.lock().unwrap()[..3], [("hot", 0), ("quiet", 0), ("hot", 1)]);
//! # Ok(())
//! # }
//! ```
//!
//! **Where the cores meet.** While nobody waits for a slot, a request takes one with a
//! single compare-and-swap on the cap's state word and gives it back with another: that
//! word's cache line is the only state every capped request touches besides its own
//! key's shard (whose lock it takes once more than without the cap, to note the
//! key's grant for the rule). Waiting, the rule and the hand-off of a freed slot take the cap's lock,
//! and a grant scans the waiting requests, at most one per key. Without `max_in_flight`
//! nothing of this exists: no shared counter, no lock.
//!
//! # Composition
//!
//! - A `Timeout` **outside** this layer covers the time spent waiting for the key as
//!   well as the handler; when it fires, the request leaves the queue.
//! - A `Timeout` **inside** covers the handler only; when it fires, the key passes on.
//!   It starts when the inner service is called: in `call()` for a request whose key
//!   is free (or a `Mode::Concurrent` one) when the inner stack is ready then, and once
//!   its turn has come for a request that waited. tower's `Timeout` starts a tokio timer
//!   in its `call`, so with it inside, make `call()` inside the tokio runtime.
//! - Waiting happens inside the response future, so a tracing or metrics layer outside
//!   (such as tower-http's `TraceLayer`) counts the wait in the request's latency.
//! - Load shedding and `ConcurrencyLimit` go **inside**. The layer is always ready, so a
//!   `LoadShed` outside it never sheds, and a `ConcurrencyLimit` outside takes its permit
//!   in `poll_ready`, before the request has its key, and keeps it while the request
//!   waits. Inside, they are polled once the request's turn has come, and see the
//!   handler's real capacity. Under axum, whose `Router::layer` wraps each route on its
//!   own, tower's `GlobalConcurrencyLimitLayer` is one limit for every route. The README
//!   shows both stacks.
//! - With the `builder` feature, `ServiceBuilderExt` adds
//!   `ServiceBuilder::new().sync_engine(policy)`.
//!
//! # With axum
//!
//! Use the HTTP flavour, `SyncEngineLayer::for_http` (feature `http`, on by default).
//! Build the layer once: axum applies it to every route and clones the service for each
//! request, and all of those share the layer's ordering domain.
//!
//! ```
//! use std::convert::Infallible;
//! use axum::{Router, body::Body, routing::{get, post}};
//! use tower_sync_engine::SyncEngineLayer;
//! use tower_sync_engine::http::by_header;
//!
//! async fn edit() -> &'static str {
//!     "saved"
//! }
//!
//! async fn stream_report() -> Body {
//!     let lines = ["revenue\n", "costs\n"].map(Ok::<_, Infallible>);
//!     Body::from_stream(futures::stream::iter(lines))
//! }
//!
//! // Requests with the same session header run one at a time; others run concurrently.
//! let app: Router = Router::new()
//!     .route("/edit", post(edit))
//!     .route("/report", get(stream_report))
//!     .layer(SyncEngineLayer::new(by_header("x-session-id")).max_queue_per_key(32).for_http());
//! # drop(app);
//! ```
//!
//! - **A session is held until its response body has ended** or been dropped, not only
//!   until the handler returns, so a streamed report finishes before the session's next
//!   request starts. Routes whose bodies never end (server-sent events) should be
//!   `Mode::Concurrent`; see the `http` module for that and for timeouts and slow readers.
//! - **No `HandleErrorLayer`:** the error type is the handlers' own (`Infallible`), and an
//!   overload is answered with `503 Service Unavailable` and the
//!   [`Overloaded`](error::Overloaded) value in the response's extensions.
//! - **Policies:** `http::by_header` and `http::by_extension` for the usual keys,
//!   `http::by_path_param` (feature `axum`) for a route's path parameter such as the
//!   `id` of `/docs/{id}`, decoded as axum's `Path` decodes it, or any closure over the
//!   request.
//!
//! The plain layer works under axum too, with tower's usual `HandleErrorLayer` for its
//! [`BoxError`](error::BoxError); it releases a session when the handler returns, before
//! a streamed body is sent. `examples/http_session.rs` runs the HTTP flavour with
//! tower-http's `TraceLayer` and `TimeoutLayer`, a streamed route and a concurrent one.
//!
//! # Metrics
//!
//! With the `metrics` feature (off by default), the layer records through the
//! [`metrics`](https://docs.rs/metrics) facade, into whatever recorder the application
//! installs (`metrics-exporter-prometheus`, say); it depends on no exporter. Requests that
//! get their key at once record nothing and read no clock; a request that waits counts
//! itself and records its wait; a rejection is counted by limit. The gauges are sampled,
//! not updated by requests: a `MetricsSampler`, from `SyncEngineLayer::metrics_sampler`,
//! sets them when the metrics are read.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `tower_sync_engine_waits_total` | counter | `domain` | requests that could not start at once and waited for their key |
//! | `tower_sync_engine_wait_seconds` | histogram | `domain` | for each request that waited, the seconds from `call()` until its turn |
//! | `tower_sync_engine_rejections_total` | counter | `domain`, `limit` | requests rejected at once, by limit: `max_queue_per_key` or `max_keys` |
//! | `tower_sync_engine_keys` | gauge | `domain` | live keys ([`Stats::keys`]), when last sampled |
//! | `tower_sync_engine_in_flight` | gauge | `domain` | requests holding a permit ([`Stats::in_flight`]), when last sampled |
//! | `tower_sync_engine_queued` | gauge | `domain` | requests waiting for their turn ([`Stats::queued`]), when last sampled |
//! | `tower_sync_engine_deepest_queue` | gauge | `domain` | the most requests waiting on any one key, when last sampled |
//!
//! `domain` is the name given with `SyncEngineLayer::metrics_domain`, which tells two
//! domains of one process apart; without one, the metrics have no `domain` label. The
//! `metrics` module has the details, the names as constants, `describe()` for the
//! recorder's help texts, and an example; `examples/http_session.rs` serves the metrics
//! at `GET /metrics` through `metrics-exporter-prometheus`.
//!
//! # Features
//!
//! - `builder` (default): `ServiceBuilderExt`, which adds `.sync_engine(policy)` to
//!   tower's `ServiceBuilder`.
//! - `tracing` (default): `DEBUG` events with target `tower_sync_engine` for requests
//!   that wait for their key: `queued` with `queue_depth`, the requests of its key that
//!   wait for their turn, itself included (what [`Stats::queued`] counts), and
//!   `admitted` with `waited_us`, the microseconds between joining its key's line
//!   (inside `call()`) and the request's turn. Requests that get their key at once emit
//!   nothing and read no clock. The wait is timed with
//!   `std::time::Instant`: like the layer itself, the default features work with any
//!   runtime, or none.
//! - `http` (default): the HTTP flavour, `SyncEngineLayer::for_http()`, in the `http`
//!   module: responses answer overloads with `503`, keep the inner service's error type,
//!   and hold a session's key until the response body ends; `by_header` and
//!   `by_extension` policies. It adds the `http` and `http-body` crates.
//! - `axum` (implies `http`): `http::by_path_param`, which keys requests by an axum
//!   route's path parameter, percent-decoded by axum's own `RawPathParams` extractor,
//!   so that `/docs/alpha` and `/docs/%61lpha` are one key. It adds axum, without its
//!   default features.
//! - `metrics`: counters, a histogram and gauges through the `metrics` facade, in the
//!   `metrics` module (see [Metrics](#metrics)). It adds the `metrics` crate, and no
//!   exporter.
//! - `tokio-clock` (implies `tracing`): time the wait with `tokio::time::Instant`
//!   instead. Under a paused tokio clock (tokio's `test-util` feature,
//!   `#[tokio::test(start_paused = true)]`), `waited_us` is then exact and reproducible,
//!   which tests that assert on it need, and so is the `metrics` feature's wait
//!   histogram. It adds a dependency on tokio's `time` feature.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

#[cfg(feature = "builder")]
mod builder;
pub mod error;
mod future;
#[cfg(feature = "http")]
pub mod http;
mod layer;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
mod mode;
mod policy;
mod registry;
mod service;
mod stats;
mod sync;
mod trace;
mod turn;

#[cfg(feature = "builder")]
pub use self::builder::ServiceBuilderExt;
pub use self::future::ResponseFuture;
pub use self::layer::SyncEngineLayer;
pub use self::mode::Mode;
pub use self::policy::Policy;
pub use self::service::SyncEngine;
pub use self::stats::Stats;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
