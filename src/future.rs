//! The response future of [`SyncEngine`](crate::SyncEngine).
//!
//! A thin wrapper over the request's [`Turn`](crate::turn): the key passes on as soon as
//! the inner future is gone (the turn's shortcut 3), before the output is returned.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::error::BoxError;
use crate::turn::{Failure, Turn};

pin_project! {
    /// Response future of [`SyncEngine`](crate::SyncEngine).
    ///
    /// It resolves to the inner service's response, or to its error boxed into
    /// [`BoxError`], or to [`Overloaded`](crate::error::Overloaded) when a limit rejected
    /// the request. For a `Mode::Sync` request it first waits for the request's turn on
    /// its key; dropping it at any point gives the turn up (see the crate's guarantees).
    ///
    /// It is `Send` when the inner service, its future, the request and the key are.
    /// Polling it again after it has completed panics.
    ///
    /// ```
    /// use std::future::Future;
    /// use tower::{Layer, Service, service_fn};
    /// use tower_sync_engine::{Mode, ResponseFuture, SyncEngineLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let echo = service_fn(|n: u64| async move { Ok::<_, tower::BoxError>(n) });
    /// let mut service = SyncEngineLayer::new(|n: &u64| Mode::Sync(*n % 2)).layer(echo);
    ///
    /// // The place in line is taken here, when `call` returns the future.
    /// let first = service.call(1);
    /// let second = service.call(3);
    /// assert_eq!(service.stats().queued, 1);
    ///
    /// fn is_future<F: Future>(_: &F) {}
    /// is_future(&second);
    /// assert_eq!(first.await.unwrap(), 1);
    /// assert_eq!(second.await.unwrap(), 3);
    /// assert!(service.stats().is_idle());
    /// # }
    /// ```
    pub struct ResponseFuture<S, Req, K>
    where
        S: Service<Req>,
    {
        #[pin]
        turn: Turn<S, Req, K>,
    }
}

impl<S, Req, K> From<Turn<S, Req, K>> for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
{
    #[inline]
    fn from(turn: Turn<S, Req, K>) -> Self {
        ResponseFuture { turn }
    }
}

impl<S, Req, K> Future for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut turn = self.project().turn;
        // PERF: layer_concurrent. The pass-through shortcut inline, the rest out of line.
        match turn.as_mut().poll_passing(cx) {
            Some(poll) => poll.map_err(Into::into),
            None => poll_to_end(turn, cx),
        }
    }
}

/// Every state but a pass-through: the turn, released as soon as the inner future is gone.
// PERF: layer_concurrent (see `Turn::poll_passing`).
#[inline(never)]
fn poll_to_end<S, Req, K>(
    turn: Pin<&mut Turn<S, Req, K>>,
    cx: &mut Context<'_>,
) -> Poll<Result<S::Response, BoxError>>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    turn.poll_released(cx).map_err(|failure| match failure {
        Failure::Inner(error) => error.into(),
        Failure::Rejected(overloaded) => overloaded.into(),
    })
}

impl<S, Req, K> fmt::Debug for ResponseFuture<S, Req, K>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("state", &self.turn.describe())
            .finish()
    }
}
