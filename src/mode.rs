//! How a policy classifies a request.

/// What a policy decides for one request.
///
/// A policy is any `Fn(&Req) -> Mode<K>`; it runs once per request, inside
/// [`Service::call`].
///
/// [`Service::call`]: https://docs.rs/tower-service/0.3/tower_service/trait.Service.html#tymethod.call
///
/// The key is the application's choice of ordering domain:
///
/// | key | reproduces |
/// |---|---|
/// | connection id | TornadIO2 wrapping the whole `on_event`: one message at a time per connection |
/// | `(connection id, event name)` | decorating one handler with `sync_engine` |
/// | user id, document id | ordering across connections |
///
/// # Keys are owned
///
/// `K` is one type for every request, so a key cannot borrow from the request it was
/// taken from; and the registry keeps the key while the request waits and runs, after
/// the request itself has been moved into the inner service. Copy what identifies the
/// key into a value of its own.
///
/// A header is copied too, not cloned: a `HeaderValue` clone shares the request's
/// buffer, which under a server such as hyper is the connection's whole read buffer, and
/// keeps it alive for as long as the key is live. The `http` module's `by_header` makes
/// that copy for you:
///
/// ```
/// use axum::http::{HeaderValue, Request};
/// use tower_sync_engine::{Mode, SyncEngineLayer};
///
/// // A header, copied: the key owns its bytes and pins no request buffer.
/// fn by_session(request: &Request<()>) -> Mode<HeaderValue> {
///     match request.headers().get("x-session-id") {
///         Some(session) => match HeaderValue::from_bytes(session.as_bytes()) {
///             Ok(session) => Mode::Sync(session),
///             // Unreachable for a parsed request, whose values are valid.
///             Err(_) => Mode::Concurrent,
///         },
///         None => Mode::Concurrent,
///     }
/// }
///
/// // A `String`, when the key is text borrowed from the request.
/// fn by_document(request: &Request<()>) -> Mode<String> {
///     match request.headers().get("x-document-id").map(|id| id.to_str()) {
///         Some(Ok(document)) => Mode::Sync(document.to_owned()),
///         // Not visible ASCII: no document of ours.
///         Some(Err(_)) | None => Mode::Concurrent,
///     }
/// }
///
/// // An integer id, copied out of the message.
/// struct Message { connection_id: u64 }
/// fn by_connection(message: &Message) -> Mode<u64> {
///     Mode::Sync(message.connection_id)
/// }
///
/// let request = Request::post("/edit")
///     .header("x-session-id", "alice")
///     .header("x-document-id", "42")
///     .body(())?;
/// assert_eq!(by_session(&request), Mode::Sync(HeaderValue::from_static("alice")));
/// assert_eq!(by_document(&request), Mode::Sync("42".to_owned()));
/// assert_eq!(by_connection(&Message { connection_id: 7 }), Mode::Sync(7));
///
/// // Functions and closures alike are policies. The key type is inferred where the
/// // layer wraps a service; a layer that wraps none yet needs it named.
/// let layer: SyncEngineLayer<_, HeaderValue> = SyncEngineLayer::new(by_session);
/// # drop(layer);
/// # Ok::<(), axum::http::Error>(())
/// ```
///
/// A key must be equal for requests that mean the same thing. A path segment is not such
/// a key as it stands: `/documents/42` and `/documents/%34%32` reach the same handler
/// with the same document id, but `uri().path().strip_prefix("/documents/")` makes them
/// two keys, and their edits run at once. Under axum, the `http` module's
/// `by_path_param("id")` (feature `axum`) keys by the route's `{id}` parameter, decoded
/// as axum's `Path` decodes it; elsewhere, percent-decode the segment before it
/// becomes a key.
///
/// A key borrowed from the request does not compile: rustc reports "lifetime may not
/// live long enough" and "return type of closure is `Mode<&'2 str>`". Make it owned,
/// here with `.to_owned()`, or copy the `HeaderValue` as above:
///
/// ```compile_fail
/// use axum::http::Request;
/// use tower_sync_engine::{Mode, SyncEngineLayer};
///
/// let layer = SyncEngineLayer::new(|request: &Request<()>| {
///     match request.headers().get("x-session-id") {
///         // Borrows from `request`: does not compile.
///         Some(session) => Mode::Sync(session.to_str().unwrap()),
///         None => Mode::Concurrent,
///     }
/// });
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Mode<K> {
    /// Go straight to the inner service. The request takes no place in any queue, is
    /// never delayed by one, and touches no shared state.
    // PERF: layer_concurrent. First, so that its tag is zero and a pass-through is
    // told apart by one test.
    Concurrent,
    /// Run after every earlier request with the same key has completed or been dropped,
    /// in the order `call()` was invoked.
    Sync(K),
    /// Run after every earlier request that shares **any** of these keys has completed or
    /// been dropped: ordered on every key at once, in the order `call()` was invoked.
    /// Build it with [`Mode::sync_all`].
    ///
    /// The request takes its place in every key's line in one step, inside `call()`, so
    /// every line agrees on one order and no set of requests can wait for each other in
    /// a cycle: there is no deadlock, whatever the keys and their order in each set (see
    /// [Several keys at once](crate#several-keys-at-once)). Duplicated keys count once;
    /// no keys at all behaves as [`Mode::Concurrent`], and one key exactly as
    /// [`Mode::Sync`].
    ///
    /// A `Vec`, because a set is built from whatever a request names (two accounts, a
    /// list of documents) and may have any length; boxed, so that a `Mode` stays as
    /// small as it was before this variant (two words for a `u64` key) and every
    /// policy's answer is as cheap to return.
    // PERF: layer_concurrent, layer_sync_new_key.
    SyncAll(Box<Vec<K>>),
}

impl<K> Mode<K> {
    /// A request ordered against every key of `keys` at once: [`Mode::SyncAll`], or
    /// [`Mode::Concurrent`] when `keys` is empty and [`Mode::Sync`] when it holds one key.
    ///
    /// ```
    /// use tower_sync_engine::Mode;
    ///
    /// // A transfer is ordered against both accounts: it waits for every earlier request
    /// // on either one, and every later request on either waits for it.
    /// struct Transfer { from: u64, to: u64, amount: u64 }
    /// fn by_accounts(transfer: &Transfer) -> Mode<u64> {
    ///     Mode::sync_all([transfer.from, transfer.to])
    /// }
    ///
    /// let transfer = Transfer { from: 1, to: 2, amount: 10 };
    /// assert_eq!(by_accounts(&transfer), Mode::SyncAll(Box::new(vec![1, 2])));
    /// assert_eq!(Mode::sync_all([7]), Mode::Sync(7));
    /// assert_eq!(Mode::<u64>::sync_all([]), Mode::Concurrent);
    /// # let _ = transfer.amount;
    /// ```
    pub fn sync_all(keys: impl IntoIterator<Item = K>) -> Mode<K> {
        let mut keys: Vec<K> = keys.into_iter().collect();
        match keys.len() {
            0 => Mode::Concurrent,
            1 => Mode::Sync(keys.pop().expect("one key")),
            _ => Mode::SyncAll(Box::new(keys)),
        }
    }
}
