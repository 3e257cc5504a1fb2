//! An invalid setting panics at construction, and the panic names the user's line, not
//! the crate's.

use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use tower_sync_engine::http::by_header;
use tower_sync_engine::{Mode, SyncEngineLayer};

type Layer = SyncEngineLayer<fn(&u64) -> Mode<u64>, u64>;

/// A setting, and a way to get it wrong.
type Case = (&'static str, Box<dyn Fn()>);

fn layer() -> Layer {
    SyncEngineLayer::new(|n: &u64| Mode::Sync(*n))
}

#[test]
fn a_setting_that_panics_points_at_the_callers_line() {
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let record = Arc::clone(&seen);
    panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|l| l.file().to_owned())
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| {
                info.payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
            })
            .unwrap_or_default();
        record.lock().unwrap().push((message, location));
    }));
    let cases: [Case; 8] = [
        (
            "permits_per_key",
            Box::new(|| drop(layer().permits_per_key(0))),
        ),
        ("max_keys", Box::new(|| drop(layer().max_keys(0)))),
        (
            "max_queue_per_key",
            Box::new(|| {
                let layer = layer();
                let _clone = layer.clone();
                drop(layer.max_queue_per_key(1));
            }),
        ),
        (
            "with_hasher",
            Box::new(|| {
                let layer = layer();
                let _clone = layer.clone();
                drop(layer.with_hasher(std::hash::RandomState::new()));
            }),
        ),
        (
            "permits_per_key",
            Box::new(|| {
                let layer = layer();
                let _clone = layer.clone();
                drop(layer.permits_per_key(2));
            }),
        ),
        ("by_header", Box::new(|| drop(by_header("not a header")))),
        (
            "overload_status",
            Box::new(|| drop(layer().for_http().overload_status(StatusCode::OK))),
        ),
        (
            "retry_after",
            Box::new(|| drop(layer().for_http().retry_after(Duration::ZERO))),
        ),
    ];
    for (setting, case) in &cases {
        assert!(
            panic::catch_unwind(AssertUnwindSafe(case)).is_err(),
            "{setting}"
        );
    }
    let _ = panic::take_hook();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), cases.len());
    for ((setting, _), (message, file)) in cases.iter().zip(seen.iter()) {
        assert!(message.contains(setting), "{setting}: {message}");
        assert_eq!(file, file!(), "{setting} panicked in {file}: {message}");
    }
}
