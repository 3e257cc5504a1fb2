//! The `metrics` feature: the counters and the wait histogram that requests record, and
//! the gauges a sampler sets, read back from a recorder of the test's own.
//!
//! The recorder is installed for the test's thread only (`set_default_local_recorder`),
//! and the runtime is tokio's current-thread one, so every request records into it. On a
//! paused clock with `tokio-clock` (which `--all-features` enables), the waits are exact.

#![cfg(feature = "metrics")]

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::atomics::AtomicU64;
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Label, Metadata, Recorder, SharedString,
    Unit,
};
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_sync_engine::error::{Limit, Overloaded};
use tower_sync_engine::metrics::{
    DEEPEST_QUEUE, IN_FLIGHT, KEYS, QUEUED, REJECTIONS_TOTAL, WAIT_SECONDS, WAITS_TOTAL,
};
use tower_sync_engine::{Mode, SyncEngineLayer};

// ---- a recorder that keeps everything ----

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

/// Keeps every metric by its key (name and labels), and every description.
#[derive(Default)]
struct Captured {
    counters: Mutex<HashMap<Key, Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<Key, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<Key, Arc<Samples>>>,
    described: Mutex<Vec<(String, Option<Unit>)>>,
    /// A counter of this name panics when registered, as a faulty recorder might.
    panics_on: Option<&'static str>,
}

impl Captured {
    fn counter(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(&key(name, labels))
            .map_or(0, |value| value.load(Ordering::SeqCst))
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Option<f64> {
        self.gauges
            .lock()
            .unwrap()
            .get(&key(name, labels))
            .map(|bits| f64::from_bits(bits.load(Ordering::SeqCst)))
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &'static str)]) -> Vec<f64> {
        self.histograms
            .lock()
            .unwrap()
            .get(&key(name, labels))
            .map_or_else(Vec::new, |samples| samples.0.lock().unwrap().clone())
    }

    /// Every metric name recorded, of any type.
    fn names(&self) -> Vec<String> {
        let counters = self.counters.lock().unwrap();
        let gauges = self.gauges.lock().unwrap();
        let histograms = self.histograms.lock().unwrap();
        let mut names: Vec<String> = (counters.keys())
            .chain(gauges.keys())
            .chain(histograms.keys())
            .map(|key| key.name().to_owned())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|&(key, value)| Label::from_static_parts(key, value))
        .collect();
    Key::from_parts(name, labels)
}

impl Recorder for Captured {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        self.described
            .lock()
            .unwrap()
            .push((key.as_str().to_owned(), unit));
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        self.describe_counter(key, unit, SharedString::const_str(""));
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        self.describe_counter(key, unit, SharedString::const_str(""));
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if self.panics_on == Some(key.name()) {
            panic!("the recorder failed on {}", key.name());
        }
        let counter = self
            .counters
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        Counter::from_arc(counter)
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let gauge = self
            .gauges
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        Gauge::from_arc(gauge)
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let samples = self
            .histograms
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        Histogram::from_arc(samples)
    }
}

// ---- the service under test ----

/// A request: its key and how long its handler works, in milliseconds.
type Job = (u64, u64);

fn by_key(job: &Job) -> Mode<u64> {
    Mode::Sync(job.0)
}

/// Works for the job's time on tokio's clock and answers its key.
fn worker() -> impl Service<Job, Response = u64, Error = BoxError, Future: Send> + Clone + Send {
    service_fn(|(key, ms): Job| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, BoxError>(key)
    })
}

fn secs(ms: u64) -> f64 {
    Duration::from_millis(ms).as_secs_f64()
}

const DOCS: [(&str, &str); 1] = [("domain", "docs")];

fn limit_of(error: &BoxError) -> Limit {
    error
        .downcast_ref::<Overloaded>()
        .expect("rejected by a limit")
        .limit()
}

// ---- the tests ----

#[tokio::test(start_paused = true)]
async fn waits_rejections_and_the_wait_histogram_count_exactly_what_happened() {
    let recorder = Captured::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let layer = SyncEngineLayer::new(by_key)
        .max_queue_per_key(2)
        .max_keys(1)
        .metrics_domain("docs");
    let mut service = layer.layer(worker());

    // Key 1: the first request runs for 100 ms; two wait behind it, the second of them
    // for the first's 100 ms and the next one's 50; a third cannot wait (max_queue_per_key).
    let first = tokio::spawn(service.ready().await.unwrap().call((1, 100)));
    let second = tokio::spawn(service.ready().await.unwrap().call((1, 50)));
    let third = tokio::spawn(service.ready().await.unwrap().call((1, 10)));
    let full = service
        .ready()
        .await
        .unwrap()
        .call((1, 0))
        .await
        .unwrap_err();
    assert_eq!(limit_of(&full), Limit::MaxQueuePerKey);
    // Key 2 is not live while key 1 is, the one key max_keys allows.
    let no_room = service
        .ready()
        .await
        .unwrap()
        .call((2, 0))
        .await
        .unwrap_err();
    assert_eq!(limit_of(&no_room), Limit::MaxKeys);

    assert_eq!(recorder.counter(WAITS_TOTAL, &DOCS), 2);
    let rejected = |limit| recorder.counter(REJECTIONS_TOTAL, &[DOCS[0], ("limit", limit)]);
    assert_eq!(rejected("max_queue_per_key"), 1);
    assert_eq!(rejected("max_keys"), 1);
    // Nobody has had their turn after waiting yet.
    assert_eq!(recorder.histogram(WAIT_SECONDS, &DOCS), Vec::<f64>::new());

    for request in [first, second, third] {
        assert_eq!(request.await.unwrap().unwrap(), 1);
    }
    let waits = recorder.histogram(WAIT_SECONDS, &DOCS);
    // The first request got its key at once and recorded no wait.
    assert_eq!(waits.len(), 2, "{waits:?}");
    if cfg!(feature = "tokio-clock") {
        assert_eq!(waits, [secs(100), secs(150)]);
    }
    assert_eq!(recorder.counter(WAITS_TOTAL, &DOCS), 2);
    assert!(layer.stats().is_idle());
}

/// Keys from 100 on name a pair: 100 + k is ordered on keys k and k + 1.
fn by_key_or_pair(job: &Job) -> Mode<u64> {
    match job.0.checked_sub(100) {
        Some(first) => Mode::sync_all([first, first + 1]),
        None => Mode::Sync(job.0),
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_on_two_keys_counts_a_wait_on_each_and_a_rejection_once() {
    let recorder = Captured::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let layer = SyncEngineLayer::new(by_key_or_pair)
        .max_queue_per_key(1)
        .metrics_domain("docs");
    let mut service = layer.layer(worker());

    // Keys 1 and 2 run for 100 ms; the pair waits on both; a second pair finds both
    // lines full and is rejected, once, leaving nothing behind.
    let one = tokio::spawn(service.ready().await.unwrap().call((1, 100)));
    let two = tokio::spawn(service.ready().await.unwrap().call((2, 100)));
    let pair = tokio::spawn(service.ready().await.unwrap().call((101, 10)));
    let full = service
        .ready()
        .await
        .unwrap()
        .call((101, 0))
        .await
        .unwrap_err();
    assert_eq!(limit_of(&full), Limit::MaxQueuePerKey);
    assert_eq!(recorder.counter(WAITS_TOTAL, &DOCS), 2);
    let rejected = recorder.counter(REJECTIONS_TOTAL, &[DOCS[0], ("limit", "max_queue_per_key")]);
    assert_eq!(rejected, 1);

    for request in [one, two, pair] {
        request.await.unwrap().unwrap();
    }
    let waits = recorder.histogram(WAIT_SECONDS, &DOCS);
    assert_eq!(waits.len(), 2, "one wait for each key: {waits:?}");
    if cfg!(feature = "tokio-clock") {
        assert_eq!(waits, [secs(100), secs(100)]);
    }
    assert!(layer.stats().is_idle());
}

#[tokio::test(start_paused = true)]
async fn a_request_that_gets_its_key_at_once_records_nothing() {
    let recorder = Captured::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let layer = SyncEngineLayer::new(by_key).metrics_domain("docs");
    let mut service = layer.layer(worker());

    for key in 0..3 {
        assert_eq!(
            service
                .ready()
                .await
                .unwrap()
                .call((key, 10))
                .await
                .unwrap(),
            key
        );
    }
    assert_eq!(recorder.names(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_before_its_turn_counts_as_a_wait_and_records_no_wait_time() {
    let recorder = Captured::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let layer = SyncEngineLayer::new(by_key).metrics_domain("docs");
    let mut service = layer.layer(worker());

    let running = tokio::spawn(service.ready().await.unwrap().call((1, 100)));
    let waiting = service.ready().await.unwrap().call((1, 10));
    assert_eq!(recorder.counter(WAITS_TOTAL, &DOCS), 1);
    drop(waiting);
    running.await.unwrap().unwrap();

    assert_eq!(recorder.counter(WAITS_TOTAL, &DOCS), 1);
    assert_eq!(recorder.histogram(WAIT_SECONDS, &DOCS), Vec::<f64>::new());
}

#[tokio::test(start_paused = true)]
async fn the_sampler_sets_the_gauges_to_the_domains_counts_and_deepest_line() {
    let recorder = Captured::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let layer = SyncEngineLayer::new(by_key).metrics_domain("docs");
    let sampler = layer.metrics_sampler();
    let mut service = layer.layer(worker());

    // Nothing is set until the sampler is told to, and requests never set the gauges.
    assert_eq!(recorder.gauge(KEYS, &DOCS), None);
    sampler.sample();
    for gauge in [KEYS, IN_FLIGHT, QUEUED, DEEPEST_QUEUE] {
        assert_eq!(recorder.gauge(gauge, &DOCS), Some(0.0), "{gauge}");
    }

    // Key 1: one running, two waiting; key 2: one running, one waiting; key 3: one running.
    let mut requests = Vec::new();
    for (key, ms) in [(1, 100), (1, 10), (1, 10), (2, 100), (2, 10), (3, 100)] {
        requests.push(tokio::spawn(service.ready().await.unwrap().call((key, ms))));
    }
    assert_eq!(recorder.gauge(KEYS, &DOCS), Some(0.0));
    sampler.sample();
    assert_eq!(recorder.gauge(KEYS, &DOCS), Some(3.0));
    assert_eq!(recorder.gauge(IN_FLIGHT, &DOCS), Some(3.0));
    assert_eq!(recorder.gauge(QUEUED, &DOCS), Some(3.0));
    assert_eq!(recorder.gauge(DEEPEST_QUEUE, &DOCS), Some(2.0));

    // When key 1's first request ends, the next one starts and one request is left
    // waiting on each of keys 1 and 2.
    tokio::time::sleep(Duration::from_millis(105)).await;
    sampler.sample();
    assert_eq!(recorder.gauge(KEYS, &DOCS), Some(2.0));
    assert_eq!(recorder.gauge(IN_FLIGHT, &DOCS), Some(2.0));
    assert_eq!(recorder.gauge(QUEUED, &DOCS), Some(1.0));
    assert_eq!(recorder.gauge(DEEPEST_QUEUE, &DOCS), Some(1.0));

    for request in requests {
        request.await.unwrap().unwrap();
    }
    sampler.sample();
    for gauge in [KEYS, IN_FLIGHT, QUEUED, DEEPEST_QUEUE] {
        assert_eq!(recorder.gauge(gauge, &DOCS), Some(0.0), "{gauge}");
    }
}

/// Hashes every key alike, so that all keys of a domain share one shard.
#[derive(Default)]
struct OneBucket;

impl Hasher for OneBucket {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, _: &[u8]) {}
}

#[tokio::test(start_paused = true)]
async fn the_deepest_line_is_one_keys_line_when_keys_share_a_shard() {
    let recorder = Captured::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    // Named before the hasher is chosen: the name stays with the domain's settings.
    let layer = SyncEngineLayer::new(by_key)
        .metrics_domain("one_shard")
        .with_hasher(BuildHasherDefault::<OneBucket>::default());
    let sampler = layer.metrics_sampler();
    let mut service = layer.layer(worker());

    // Key 1: two waiting; key 2: one waiting.
    let mut requests = Vec::new();
    for (key, ms) in [(1, 100), (1, 10), (1, 10), (2, 100), (2, 10)] {
        requests.push(tokio::spawn(service.ready().await.unwrap().call((key, ms))));
    }
    sampler.sample();
    let one_shard = [("domain", "one_shard")];
    assert_eq!(recorder.gauge(QUEUED, &one_shard), Some(3.0));
    assert_eq!(recorder.gauge(DEEPEST_QUEUE, &one_shard), Some(2.0));
    assert_eq!(recorder.counter(WAITS_TOTAL, &one_shard), 3);
    for request in requests {
        request.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn the_domain_label_tells_two_domains_apart_and_is_absent_without_a_name() {
    let recorder = Captured::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let named = SyncEngineLayer::new(by_key).metrics_domain("docs");
    let unnamed = SyncEngineLayer::new(by_key);
    let (unnamed_sampler, named_sampler) = (unnamed.metrics_sampler(), named.metrics_sampler());
    let mut docs = named.layer(worker());
    let mut other = unnamed.layer(worker());

    // Two waits in the named domain, one in the other, on the same key.
    let mut requests = Vec::new();
    for named in [true, true, true, false, false] {
        let service = if named { &mut docs } else { &mut other };
        requests.push(tokio::spawn(service.ready().await.unwrap().call((1, 10))));
    }
    named_sampler.sample();
    unnamed_sampler.sample();
    assert_eq!(recorder.counter(WAITS_TOTAL, &DOCS), 2);
    assert_eq!(recorder.counter(WAITS_TOTAL, &[]), 1);
    assert_eq!(recorder.gauge(QUEUED, &DOCS), Some(2.0));
    assert_eq!(recorder.gauge(QUEUED, &[]), Some(1.0));

    for request in requests {
        request.await.unwrap().unwrap();
    }
    assert_eq!(recorder.histogram(WAIT_SECONDS, &DOCS).len(), 2);
    assert_eq!(recorder.histogram(WAIT_SECONDS, &[]).len(), 1);
}

#[test]
fn describe_gives_every_metric_its_unit() {
    let recorder = Captured::default();
    metrics::with_local_recorder(&recorder, tower_sync_engine::metrics::describe);
    let described = recorder.described.lock().unwrap().clone();
    assert_eq!(
        described,
        [
            (WAITS_TOTAL.to_owned(), Some(Unit::Count)),
            (WAIT_SECONDS.to_owned(), Some(Unit::Seconds)),
            (REJECTIONS_TOTAL.to_owned(), Some(Unit::Count)),
            (KEYS.to_owned(), Some(Unit::Count)),
            (IN_FLIGHT.to_owned(), Some(Unit::Count)),
            (QUEUED.to_owned(), Some(Unit::Count)),
            (DEEPEST_QUEUE.to_owned(), Some(Unit::Count)),
        ]
    );
    for (name, _) in &described {
        assert!(name.starts_with("tower_sync_engine_"), "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_recorder_that_panics_when_a_request_waits_leaves_no_phantom_waiter() {
    let recorder = Captured {
        panics_on: Some(WAITS_TOTAL),
        ..Captured::default()
    };
    let _local = metrics::set_default_local_recorder(&recorder);
    let layer = SyncEngineLayer::new(by_key);
    let mut service = layer.layer(worker());

    let running = tokio::spawn(service.ready().await.unwrap().call((1, 100)));
    // The request that would wait is counted in `call()`, once its place is in its
    // response future: the panic drops that future, and the place with it.
    let ready = service.ready().await.unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ready.call((1, 10))));
    assert!(panicked.is_err());
    let stats = layer.stats();
    assert_eq!((stats.keys, stats.in_flight, stats.queued), (1, 1, 0));

    assert_eq!(running.await.unwrap().unwrap(), 1);
    assert!(layer.stats().is_idle());
    // The key is free again: the next request gets it at once.
    assert_eq!(
        service.ready().await.unwrap().call((1, 0)).await.unwrap(),
        1
    );
}

#[test]
#[should_panic(expected = "metrics_domain called on a layer that is cloned or in use")]
fn naming_a_domain_in_use_panics() {
    let layer: SyncEngineLayer<_, u64> = SyncEngineLayer::new(by_key);
    let _sampler = layer.metrics_sampler();
    let _ = layer.metrics_domain("late");
}
