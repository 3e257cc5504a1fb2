//! How a policy classifies a request.

/// What a policy decides for one request.
///
/// A policy is any `Fn(&Req) -> Mode<K>`; it runs once per request, inside
/// [`Service::call`](tower_service::Service::call).
///
/// The key is the application's choice of ordering domain:
///
/// | key | reproduces |
/// |---|---|
/// | connection id | TornadIO2 wrapping the whole `on_event`: one message at a time per connection |
/// | `(connection id, event name)` | decorating one handler with `sync_engine` |
/// | user id, document id | ordering across connections |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode<K> {
    /// Run after every earlier request with the same key has completed or been dropped,
    /// in the order `call()` was invoked.
    Sync(K),
    /// Go straight to the inner service. The request takes no place in any queue, is
    /// never delayed by one, and touches no shared state.
    Concurrent,
}
