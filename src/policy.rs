//! The [`Policy`] that classifies each request.

use crate::mode::Mode;

/// Decides, for each request, whether it is ordered behind earlier requests with the same
/// key ([`Mode::Sync`]) or passed straight through ([`Mode::Concurrent`]).
///
/// Every `Fn(&Req) -> Mode<K>` is a policy, so a closure or a function is all most
/// applications need:
///
/// ```
/// use tower_sync_engine::{Mode, Policy};
///
/// struct Message { connection_id: u64, event: String }
///
/// let policy = |msg: &Message| match msg.event.as_str() {
///     "typing" => Mode::Concurrent,
///     _ => Mode::Sync(msg.connection_id),
/// };
/// let typing = Message { connection_id: 7, event: "typing".into() };
/// assert_eq!(policy.classify(&typing), Mode::Concurrent);
/// ```
///
/// Implement it on a type of your own when the policy must work for several request
/// types, as the HTTP policies of this crate do for any request body.
///
/// The policy runs once per request, inside [`Service::call`], before the request takes
/// its place; it should be cheap, and it must not wait for the layer it belongs to.
///
/// [`Service::call`]: https://docs.rs/tower-service/0.3/tower_service/trait.Service.html#tymethod.call
pub trait Policy<Req> {
    /// What requests are ordered by. Keys are owned values (`String`, an id, a cloned
    /// header value), never borrowed from the request: the key outlives the borrow of the
    /// request that the policy gets.
    type Key;

    /// Classifies one request.
    fn classify(&self, request: &Req) -> Mode<Self::Key>;
}

impl<F, Req, K> Policy<Req> for F
where
    F: Fn(&Req) -> Mode<K>,
{
    type Key = K;

    #[inline]
    fn classify(&self, request: &Req) -> Mode<K> {
        self(request)
    }
}
