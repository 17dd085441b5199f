//! The pooled HTTP/1.1 client that sends requests to the origin.

use std::time::Duration;

use http::{HeaderValue, Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;

use super::body::{ProxyBody, Side, Timed, body_error};
use crate::config::{UpstreamConfig, UpstreamUrl};
use cachegate_core::home::Home;

/// Why the upstream gave no response.
#[derive(Debug)]
pub enum UpstreamError {
    /// Connecting or sending failed (answered with 502).
    Unreachable(String),
    /// No response head within `response_timeout_ms` (answered with 504).
    Timeout,
    /// The client's request body failed or stalled while it was being sent: a client
    /// fault (answered with 400, or 408 when `timed_out`).
    ClientBody {
        /// The client stalled past `client_body_timeout_ms`.
        timed_out: bool,
    },
}

/// Runs the client's connection tasks on the client's home runtime.
#[derive(Clone)]
struct AtHomeExecutor(Home);

impl<F> hyper::rt::Executor<F> for AtHomeExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        drop(self.0.spawn(fut));
    }
}

/// The origin and a connection pool to it.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, ProxyBody>,
    /// Where the pool's connections are opened and driven (see [`Home`]): the runtime the
    /// client was made on, whichever connection thread sends a request.
    home: Home,
    base: UpstreamUrl,
    response_timeout: Duration,
    body_timeout: Duration,
    total_timeout: Duration,
}

impl Upstream {
    /// A client for `config.url` with the configured connect and response timeouts, whose
    /// connections live on the current runtime (see [`Home`]).
    ///
    /// Panics if `config.url` is `None`; [`crate::config::Config::finish`] rules that out.
    pub fn new(config: &UpstreamConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(
            config.connect_timeout_ms.max(1),
        )));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let home = Home::current();
        let client = Client::builder(AtHomeExecutor(home.clone()))
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build(connector);
        Upstream {
            client,
            home,
            base: config
                .url
                .clone()
                .expect("upstream url is checked at start-up"),
            response_timeout: Duration::from_millis(config.response_timeout_ms.max(1)),
            body_timeout: Duration::from_millis(config.body_timeout_ms.max(1)),
            total_timeout: Duration::from_millis(config.total_timeout_ms.max(1)),
        }
    }

    /// The `Host` header value the upstream gets by default: the upstream URL's authority.
    pub fn host_header(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(&self.base.authority).ok()
    }

    /// The origin's URI for a request's path and query. The asterisk form (`OPTIONS *`,
    /// RFC 9112 §3.2.4) stays as it is: it names the server, not a resource under the
    /// upstream URL's path prefix.
    fn uri_for(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let target = if path_and_query == "*" {
            "*".to_string()
        } else {
            format!("{}{}", self.base.path_prefix, path_and_query)
        };
        Uri::builder()
            .scheme("http")
            .authority(self.base.authority.as_str())
            .path_and_query(target)
            .build()
    }

    /// Sends `req` (already stripped of hop-by-hop headers) and waits for the response head,
    /// at most `response_timeout_ms` and never past `total_timeout_ms`. Returns the response,
    /// whose body is limited to `body_timeout_ms` between chunks and to the rest of
    /// `total_timeout_ms`, and how long the head took.
    ///
    /// Errors: [`UpstreamError::Unreachable`] when the connection or the exchange fails,
    /// [`UpstreamError::Timeout`] when a limit passes first, [`UpstreamError::ClientBody`]
    /// when it failed because the client's request body did.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<ProxyBody>, Duration), UpstreamError> {
        *req.uri_mut() = self
            .uri_for(req.uri())
            .map_err(|e| UpstreamError::Unreachable(format!("bad upstream URI: {e}")))?;
        let started = Instant::now();
        let deadline = started + self.total_timeout;
        let head_limit = self.response_timeout.min(self.total_timeout);
        let sent = self.home.run(self.client.request(req));
        match tokio::time::timeout(head_limit, sent).await {
            Ok(Ok(resp)) => {
                let elapsed = started.elapsed();
                let body_timeout = self.body_timeout;
                let resp = resp.map(|b| {
                    super::body::boxed(Timed::new(b, Side::Upstream, body_timeout, Some(deadline)))
                });
                Ok((resp, elapsed))
            }
            Ok(Err(e)) => Err(match body_error(&e) {
                Some(b) if b.side == Side::Client => UpstreamError::ClientBody {
                    timed_out: b.timed_out,
                },
                _ => UpstreamError::Unreachable(error_chain(&e)),
            }),
            Err(_) => Err(UpstreamError::Timeout),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

impl super::origin::Origin for Upstream {
    const TUNNELS: bool = true;
    const REWRITES_FORWARDING: bool = true;
    const CACHES_UNROUTED: bool = true;

    async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<(Response<ProxyBody>, Duration), UpstreamError> {
        Upstream::send(self, req).await
    }
}
