//! A policy for axum's path parameters: [`by_path_param`].
//!
//! # How the value is read
//!
//! axum matches the route when the `Router` is called, percent-decodes every parameter
//! of the matched route once, and keeps the decoded values in the request's extensions,
//! where its `Path` and `RawPathParams` extractors read them. That extension's type is
//! private to axum, and the extractors are async and take `&mut Parts`, while a policy
//! sees `&Request<B>`. So the policy builds a `Parts` of its own holding a copy of the
//! request's extensions and calls `RawPathParams::from_request_parts` on it, polling the
//! future once. It reads the extensions and returns at once, without waiting for
//! anything, so one poll with a no-op waker completes it; the key is then the very text
//! axum's `Path<String>` hands the handler, decoded by axum's own code.
//!
//! The cost, per request, is the copy of the extensions (what axum's routing and the
//! layers outside put there: three small values under a plain `Router`, the original
//! URI, the matched route and the parameters), the copy of the parameter list, and the
//! key's own allocation: a handful of small allocations, about four times what
//! [`by_header`](super::by_header) costs. The alternative, a `from_fn` middleware that
//! extracts `Path` and inserts the value as an extension for
//! [`by_extension`](super::by_extension), costs about as much (its boxed futures, the
//! extracted and the inserted value) and is two layers that must be added in the right
//! order; in the wrong order, or with one of them missing, `by_extension` finds nothing
//! and every request runs unordered, without a sign.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use ::http::Request;
use axum::extract::FromRequestParts;
use axum::extract::RawPathParams;
use axum::extract::rejection::RawPathParamsRejection;

use crate::mode::Mode;
use crate::policy::Policy;

/// Orders requests by the value of the axum path parameter `name`, decoded as axum's
/// `Path` extractor decodes it; requests whose route has no such parameter are
/// `Mode::Concurrent`.
///
/// `name` is the parameter's name as the route writes it between braces, without them:
/// `by_path_param("id")` for `/docs/{id}/edits`, `by_path_param("rest")` for a wildcard
/// `/files/{*rest}`.
///
/// The key is the percent-decoded value, a `String`: the text a handler's
/// `Path<String>` receives. `/docs/alpha/edits` and `/docs/%61lpha/edits` reach the
/// same handler with the same `id`, so they are one key and run one at a time; the raw
/// path, or a segment cut from it, would make them two keys and let them run at once.
///
/// # Where the layer goes
///
/// axum finds a request's path parameters when its `Router` matches the route, so the
/// layer must run after that: add it with `Router::layer` or `Router::route_layer`
/// (which wrap each route), or to one route (`post(edit).layer(..)`); a layer added to a
/// nested router works too. Around the whole `Router`, with `ServiceBuilder` or as the
/// service given to hyper, it runs before routing, when there are no parameters yet.
///
/// # Panics
///
/// - Made with a `name` that cannot name a parameter: empty, or holding `{`, `}` or `/`,
///   or starting with `*` or `:` (the wildcard marker, and axum 0.7's syntax). The
///   message says how to write it.
/// - Called with a request that has no path parameters at all, though its path starts
///   with `/`: the layer runs before axum's routing, as above, or wraps a service that
///   is not a `Router`. The message names the fix. Such a request cannot be keyed by the
///   parameter, and running it unordered would break the order the policy promises
///   without a sign, so the misplaced layer fails loudly on its first request instead
///   (as tokio's timers do outside a runtime).
///
/// # Requests without the parameter
///
/// Each is `Mode::Concurrent`, passed straight through:
///
/// - A request whose route has no parameter `name`: `/health` beside `/docs/{id}`, or
///   one that no route matched and axum's fallback answers (axum gives those an empty
///   parameter list). **Check the spelling:** a name no route uses makes every request
///   concurrent, as a misspelled header does for [`by_header`](super::by_header).
/// - A request whose path parameters are not valid UTF-8 once decoded: axum's `Path`
///   and `RawPathParams` reject it with `400 Bad Request` before the handler runs, so it
///   touches no document.
/// - A request whose path does not start with `/` (`OPTIONS *`, `CONNECT host:443`):
///   no route can match it, and axum's fallback answers it without parameters.
///
/// A name that appears more than once (a router under `nest_service` inside a route
/// that captures the same name) is keyed by its last value, the innermost route's, the
/// one a `Path<HashMap<String, String>>` keeps.
///
/// ```
/// use axum::{Router, body::Body, extract::Path, http::Request, routing::{get, post}};
/// use tower::ServiceExt;
/// use tower_sync_engine::SyncEngineLayer;
/// use tower_sync_engine::http::by_path_param;
///
/// async fn edit(Path(id): Path<String>) -> String {
///     format!("edited {id}")
/// }
///
/// let layer = SyncEngineLayer::new(by_path_param("id")).max_queue_per_key(32).for_http();
/// let app: Router = Router::new()
///     .route("/docs/{id}/edits", post(edit))
///     .route("/health", get(|| async { "ok" }))
///     .layer(layer.clone());
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// // `%61` is `a`: the same document as `/docs/alpha/edits`, and the same key.
/// let request = Request::post("/docs/%61lpha/edits").body(Body::empty()).unwrap();
/// let response = app.clone().oneshot(request).await.unwrap();
/// assert_eq!(layer.stats().in_flight, 1, "the body holds the key `alpha`");
/// drop(response);
/// assert!(layer.stats().is_idle());
/// # });
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
#[track_caller]
pub fn by_path_param(name: &str) -> ByPathParam {
    if name.is_empty()
        || name.contains(['{', '}', '/'])
        || name.starts_with('*')
        || name.starts_with(':')
    {
        let bare = name.trim_matches(['{', '}', '/', '*', ':']);
        panic!(
            "by_path_param: {name:?} is not a path parameter name; write the name a route \
             puts between braces, without them and without a wildcard's `*`: \
             by_path_param({bare:?}) for \"/docs/{{{bare}}}\""
        );
    }
    ByPathParam {
        name: name.to_owned(),
    }
}

/// The policy made by [`by_path_param`]: `Mode::Sync` of the decoded value of the
/// request's path parameter, `Mode::Concurrent` when its route has none of that name.
///
/// See [`by_path_param`] for where the layer must go, and for what it does with
/// requests that have no path parameters.
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
#[derive(Clone, Debug)]
pub struct ByPathParam {
    name: String,
}

impl ByPathParam {
    /// The name of the path parameter this policy reads.
    pub fn param_name(&self) -> &str {
        &self.name
    }
}

impl<B> Policy<Request<B>> for ByPathParam {
    type Key = String;

    fn classify(&self, request: &Request<B>) -> Mode<String> {
        match path_params(request) {
            Ok(params) => match params.iter().filter(|&(name, _)| name == self.name).last() {
                Some((_, value)) => Mode::Sync(value.to_owned()),
                None => Mode::Concurrent,
            },
            Err(RawPathParamsRejection::MissingPathParams(_))
                if request.uri().path().starts_with('/') =>
            {
                panic!(
                    "by_path_param({:?}): the request to {:?} has no path parameters: axum \
                     finds them when its Router matches a route, so add this layer with \
                     Router::layer or Router::route_layer, not around the Router",
                    self.name,
                    request.uri().path(),
                );
            }
            // A request that no route can match, or whose parameters axum's extractors
            // reject before any handler runs.
            Err(_) => Mode::Concurrent,
        }
    }
}

/// The request's path parameters, read by axum's `RawPathParams` extractor.
fn path_params<B>(request: &Request<B>) -> Result<RawPathParams, RawPathParamsRejection> {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.extensions = request.extensions().clone();
    let extract = pin!(RawPathParams::from_request_parts(&mut parts, &()));
    match extract.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(params) => params,
        // axum 0.8's `RawPathParams` reads the extensions and returns without an await.
        Poll::Pending => unreachable!(
            "axum's RawPathParams extractor waited for something; \
             by_path_param needs it to read the request's extensions at once"
        ),
    }
}
