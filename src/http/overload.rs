//! What the HTTP flavour answers a request that a limit rejected.
//!
//! The answer's settings are a few bytes that every service and response future of a
//! layer carries by value, as tower-http's `Timeout` carries its status code: copying
//! them costs less than reaching them through a pointer, and needs no reference count.
//! The body is chosen by a type, [`OverloadBody`], rather than by a flag, so that the
//! bound a text body needs (`From<String>`) applies only to the layers that ask for one.

use std::fmt;
use std::marker::PhantomData;
use std::num::NonZeroU32;

use ::http::header::{CONTENT_TYPE, RETRY_AFTER};
use ::http::{HeaderMap, HeaderValue, Response, StatusCode};

use super::body::ResponseBody;
use crate::error::Overloaded;

/// How the HTTP flavour makes the body of its answer to a request that a limit
/// rejected: [`EmptyOverloadBody`] by default, [`TextOverloadBody`] after
/// [`describe_overload`](super::HttpSyncEngineLayer::describe_overload).
///
/// The trait is sealed: the two types above are its only implementations.
pub trait OverloadBody<B>: sealed::Sealed {
    /// The body of the answer to a request rejected for `overloaded`, with the headers
    /// that describe it added to `headers`.
    #[doc(hidden)]
    fn body(overloaded: Overloaded, headers: &mut HeaderMap) -> B;
}

/// The default [`OverloadBody`]: an empty body, `B::default()`, as tower-http's
/// `TimeoutLayer` answers `408`. Nothing about the domain's limits reaches the client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmptyOverloadBody;

/// The [`OverloadBody`] that names the limit, set by
/// [`describe_overload`](super::HttpSyncEngineLayer::describe_overload): the
/// [`Overloaded`] error's message as a `text/plain; charset=utf-8` body, such as
/// `request rejected: its key's queue is full (max_queue_per_key)`. The response body
/// type must implement `From<String>`, as axum's `Body` and `http_body_util::Full` do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TextOverloadBody;

impl<B: Default> OverloadBody<B> for EmptyOverloadBody {
    #[inline]
    fn body(_: Overloaded, _: &mut HeaderMap) -> B {
        B::default()
    }
}

impl<B: From<String>> OverloadBody<B> for TextOverloadBody {
    fn body(overloaded: Overloaded, headers: &mut HeaderMap) -> B {
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        B::from(overloaded.to_string())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::EmptyOverloadBody {}
    impl Sealed for super::TextOverloadBody {}
}

/// The name of `D` without its module path.
fn type_name<D>() -> &'static str {
    let path = std::any::type_name::<D>();
    path.rsplit("::").next().unwrap_or(path)
}

/// A layer's answer to an overload: its status, its `Retry-After`, and, as a type, its
/// body. Eight bytes, copied into each service and response future.
pub(crate) struct Answer<D> {
    status: StatusCode,
    /// Whole seconds; checked to be more than zero where it is set.
    retry_after: Option<NonZeroU32>,
    body: PhantomData<fn() -> D>,
}

// What the "eight bytes" above promise, kept true.
const _: () = assert!(std::mem::size_of::<Answer<TextOverloadBody>>() == 8);

impl<D> Answer<D> {
    /// `503 Service Unavailable`, no `Retry-After`.
    #[inline]
    pub(crate) const fn new() -> Self {
        Answer {
            status: StatusCode::SERVICE_UNAVAILABLE,
            retry_after: None,
            body: PhantomData,
        }
    }

    /// The same answer with another status; checked by the layer's setter.
    pub(crate) const fn with_status(self, status: StatusCode) -> Self {
        Answer { status, ..self }
    }

    /// The same answer with `Retry-After: seconds`.
    pub(crate) const fn with_retry_after(self, seconds: NonZeroU32) -> Self {
        Answer {
            retry_after: Some(seconds),
            ..self
        }
    }

    /// The same status and `Retry-After`, with the body `E` makes.
    pub(crate) const fn with_body<E>(self) -> Answer<E> {
        Answer {
            status: self.status,
            retry_after: self.retry_after,
            body: PhantomData,
        }
    }

    /// The response to a request that a limit rejected for `overloaded`: no key held,
    /// and the reason in the extensions for the layers outside.
    #[cold]
    pub(crate) fn respond<B, K>(self, overloaded: Overloaded) -> Response<ResponseBody<B, K>>
    where
        D: OverloadBody<B>,
    {
        let mut headers = HeaderMap::new();
        let body = D::body(overloaded, &mut headers);
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds.get()));
        }
        let mut response = Response::new(ResponseBody::new_released(body));
        *response.status_mut() = self.status;
        *response.headers_mut() = headers;
        response.extensions_mut().insert(overloaded);
        response
    }
}

impl<D> Clone for Answer<D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D> Copy for Answer<D> {}

impl<D> fmt::Debug for Answer<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverloadAnswer")
            .field("status", &self.status)
            .field("retry_after_secs", &self.retry_after)
            .field("body", &format_args!("{}", type_name::<D>()))
            .finish()
    }
}
