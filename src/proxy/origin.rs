//! Where a miss is answered: the [`Origin`] the request path sends to.
//!
//! `cachegate serve` sends to an HTTP upstream ([`super::upstream::Upstream`]); the tower
//! layer ([`crate::layer`]) sends to the service it wraps ([`ServiceOrigin`]). The request
//! path in [`super::Proxy::handle`] is the same for both.

use std::future::Future;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use super::body::{self, BoxError, ProxyBody};
use super::upstream::UpstreamError;

/// A source of responses for requests the cache cannot answer.
pub trait Origin: Send + Sync + 'static {
    /// Whether protocol upgrades (WebSocket) are tunnelled through this origin. When not,
    /// an upgrade request is passed to it as it came, with its connection.
    const TUNNELS: bool;

    /// Whether the forwarding rules rewrite `Host` and `X-Forwarded-*` for this origin (an
    /// HTTP upstream behind a proxy) or leave them and key them (a service in the same
    /// process, which sees what the client sent).
    const REWRITES_FORWARDING: bool;

    /// Whether requests that match no route go through the cache (stored when their
    /// response says so, RFC 9111, as a shared cache does) or to the origin untouched: no
    /// status headers, no rules, no limits (a service in the same process: only the
    /// routes it configured are the cache's business).
    const CACHES_UNROUTED: bool;

    /// Sends `req` and waits for the response head. Returns the response, its body
    /// streaming, and how long the head took.
    ///
    /// Errors: [`UpstreamError`] when no response came (unreachable, timed out, or the
    /// client's request body failed on the way).
    fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> impl Future<Output = Result<(Response<ProxyBody>, Duration), UpstreamError>> + Send;
}

/// The wrapped service, boxed: one concrete type whatever service it holds.
type BoxedService = BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, BoxError>;

/// An [`Origin`] made of a tower service, such as an axum `Router`: what
/// [`crate::layer::CacheLayer`] wraps. A service error is an unreachable origin (502).
#[derive(Clone)]
pub struct ServiceOrigin {
    service: BoxedService,
}

impl ServiceOrigin {
    /// Wraps `service`: any `Clone` service of HTTP requests to HTTP responses whose body
    /// yields `Bytes`.
    pub fn new<S, B>(service: S) -> Self
    where
        S: Service<Request<ProxyBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let service = service
            .map_response(|resp: Response<B>| resp.map(body::boxed))
            .map_err(Into::into);
        ServiceOrigin {
            service: BoxCloneSyncService::new(service),
        }
    }
}

impl Origin for ServiceOrigin {
    const TUNNELS: bool = false;
    const REWRITES_FORWARDING: bool = false;
    const CACHES_UNROUTED: bool = false;

    fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> impl Future<Output = Result<(Response<ProxyBody>, Duration), UpstreamError>> + Send {
        // Combinators rather than an `async` block: rustc cannot yet prove an async block
        // holding a boxed service `Send` for every lifetime of its boxed error type.
        let started = Instant::now();
        self.service
            .clone()
            .oneshot(req)
            .map(move |result| match result {
                Ok(resp) => Ok((resp, started.elapsed())),
                Err(e) => Err(UpstreamError::Unreachable(e.to_string())),
            })
    }
}
