//! A tracing subscriber that keeps this crate's events, and can panic on one of them
//! once; shared by the tracing and foreign-code tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

/// One event from this crate: its level, its message, and its numeric fields.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Captured {
    pub level: Option<Level>,
    pub message: String,
    pub numbers: Vec<(&'static str, u64)>,
}

impl Visit for Captured {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.numbers.push((field.name(), value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

/// Keeps every event with this crate's target; with [`Capture::panicking_on`], panics
/// once, on the first event with that message.
#[derive(Clone, Default)]
pub struct Capture {
    events: Arc<Mutex<Vec<Captured>>>,
    fatal: Option<&'static str>,
    armed: Arc<AtomicBool>,
}

impl Capture {
    pub fn panicking_on(message: &'static str) -> Self {
        Capture {
            fatal: Some(message),
            armed: Arc::new(AtomicBool::new(true)),
            ..Capture::default()
        }
    }

    /// The events so far, taken out.
    pub fn take(&self) -> Vec<Captured> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    /// The events so far as (message, field, value), taken out.
    pub fn take_summary(&self) -> Vec<(String, &'static str, u64)> {
        self.take()
            .into_iter()
            .flat_map(|event| {
                let message = event.message;
                event
                    .numbers
                    .into_iter()
                    .map(move |(field, value)| (message.clone(), field, value))
            })
            .collect()
    }

    /// True once the panic it was armed with has happened.
    pub fn has_panicked(&self) -> bool {
        self.fatal.is_some() && !self.armed.load(Ordering::SeqCst)
    }
}

impl Subscriber for Capture {
    // Other tests of the same binary run on other threads without a subscriber: asking
    // each time keeps their "never" from sticking to the layer's callsites.
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target() == "tower_sync_engine"
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut captured = Captured {
            level: Some(*event.metadata().level()),
            ..Captured::default()
        };
        event.record(&mut captured);
        if self.fatal == Some(captured.message.as_str()) && self.armed.swap(false, Ordering::SeqCst)
        {
            panic!("injected: a subscriber panicked on {}", captured.message);
        }
        self.events.lock().unwrap().push(captured);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// An event as `Capture::take_summary` lists it.
pub fn event(message: &str, field: &'static str, value: u64) -> (String, &'static str, u64) {
    (message.to_owned(), field, value)
}

/// Listens for the layer's events on this thread. Every test of a binary that relies on
/// events calls this (or sets a subscriber of its own) before it touches a layer:
/// `tracing` caches a callsite's interest for the whole process, and a callsite first
/// reached on a thread without a subscriber, while another test's subscriber is the only
/// one alive, is cached as "never", so that the tests that rely on events would miss them.
pub fn listen() -> tracing::subscriber::DefaultGuard {
    tracing::subscriber::set_default(Capture::default())
}
