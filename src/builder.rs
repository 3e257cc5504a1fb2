//! [`ServiceBuilderExt`]: `.sync_engine(policy)` on tower's [`ServiceBuilder`].

use tower::ServiceBuilder;
use tower_layer::Stack;

use crate::layer::SyncEngineLayer;

mod sealed {
    pub trait Sealed<L> {}

    impl<L> Sealed<L> for tower::ServiceBuilder<L> {}
}

/// Adds this crate's layer to tower's [`ServiceBuilder`].
///
/// The trait is sealed: it is implemented for `ServiceBuilder` only.
///
/// ```
/// use std::time::Duration;
/// use tower::{ServiceBuilder, service_fn};
/// use tower_sync_engine::{Mode, ServiceBuilderExt};
///
/// struct Message { connection_id: u64 }
///
/// let service = ServiceBuilder::new()
///     .sync_engine(|msg: &Message| Mode::Sync(msg.connection_id))
///     .timeout(Duration::from_secs(5))
///     .service(service_fn(|msg: Message| async move {
///         Ok::<_, tower::BoxError>(msg.connection_id)
///     }));
/// # fn assert_service<S: tower::Service<Message>>(_: S) {}
/// # assert_service(service);
/// ```
///
/// For settings such as `max_queue_per_key`, build the layer and add it with
/// [`ServiceBuilder::layer`]; keep a clone of it to read its [`stats`](SyncEngineLayer::stats).
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// Orders requests with [`SyncEngineLayer::new(policy)`](SyncEngineLayer::new):
    /// a new ordering domain with default settings.
    fn sync_engine<P, K>(self, policy: P) -> ServiceBuilder<Stack<SyncEngineLayer<P, K>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn sync_engine<P, K>(self, policy: P) -> ServiceBuilder<Stack<SyncEngineLayer<P, K>, L>> {
        self.layer(SyncEngineLayer::new(policy))
    }
}
