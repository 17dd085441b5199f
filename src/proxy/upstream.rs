//! The pooled HTTP/1.1 client that sends requests to the origin.

use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::body::ProxyBody;
use crate::config::{UpstreamConfig, UpstreamUrl};

/// Why the upstream gave no response.
#[derive(Debug)]
pub enum UpstreamError {
    /// Connecting or sending failed (answered with 502).
    Unreachable(String),
    /// No response head within `response_timeout_ms` (answered with 504).
    Timeout,
}

/// The origin and a connection pool to it.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, ProxyBody>,
    base: UpstreamUrl,
    response_timeout: Duration,
}

impl Upstream {
    /// A client for `config.url` with the configured connect and response timeouts.
    ///
    /// Panics if `config.url` is `None`; [`crate::config::Config::finish`] rules that out.
    pub fn new(config: &UpstreamConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(
            config.connect_timeout_ms.max(1),
        )));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build(connector);
        Upstream {
            client,
            base: config
                .url
                .clone()
                .expect("upstream url is checked at start-up"),
            response_timeout: Duration::from_millis(config.response_timeout_ms.max(1)),
        }
    }

    /// The origin's URI for a request's path and query.
    fn uri_for(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        Uri::builder()
            .scheme("http")
            .authority(self.base.authority.as_str())
            .path_and_query(format!("{}{}", self.base.path_prefix, path_and_query))
            .build()
    }

    /// Sends `req` (already stripped of hop-by-hop headers) and waits for the response head.
    /// Returns the response and how long the head took.
    ///
    /// Errors: [`UpstreamError::Unreachable`] when the connection or the exchange fails,
    /// [`UpstreamError::Timeout`] after `response_timeout_ms`.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Duration), UpstreamError> {
        *req.uri_mut() = self
            .uri_for(req.uri())
            .map_err(|e| UpstreamError::Unreachable(format!("bad upstream URI: {e}")))?;
        let started = Instant::now();
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok((resp, started.elapsed())),
            Ok(Err(e)) => Err(UpstreamError::Unreachable(error_chain(&e))),
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
