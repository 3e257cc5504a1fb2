//! The handlers of the HTTP tests' application: `edit` answers at once, `report` streams
//! a body the test prepares, and both log what they did.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::Uri;
use tokio::sync::mpsc;

/// What the handlers did, and the bodies `/report` hands out.
#[derive(Clone, Default)]
pub struct Shared {
    log: Arc<Mutex<Vec<String>>>,
    bodies: Arc<Mutex<VecDeque<Body>>>,
}

impl Shared {
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Logs `entry`.
    pub fn record(&self, entry: impl Into<String>) {
        self.log.lock().unwrap().push(entry.into());
    }

    /// The next `/report` streams what is sent on the returned sender, and ends when it
    /// is dropped.
    pub fn next_report_streams(&self) -> mpsc::UnboundedSender<&'static str> {
        let (lines, mut receiver) = mpsc::unbounded_channel::<&'static str>();
        let stream = futures::stream::poll_fn(move |cx| {
            receiver
                .poll_recv(cx)
                .map(|line| line.map(Ok::<_, Infallible>))
        });
        self.bodies
            .lock()
            .unwrap()
            .push_back(Body::from_stream(stream));
        lines
    }
}

/// Logs `edit <query>` and answers the query.
pub async fn edit(State(shared): State<Shared>, uri: Uri) -> String {
    let tag = uri.query().unwrap_or_default().to_owned();
    shared.record(format!("edit {tag}"));
    tag
}

/// Logs `report` and answers with the next prepared body.
pub async fn stream_report(State(shared): State<Shared>) -> Body {
    shared.record("report");
    let body = shared.bodies.lock().unwrap().pop_front();
    body.unwrap_or_else(|| Body::from("report"))
}
