//! The pooled HTTP/1.1 client that sends requests to the origin.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::Body as _;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use super::body::{ProxyBody, Side, Timed, body_error};
use crate::config::{UpstreamConfig, UpstreamUrl};
use cachegate_core::home::Home;

/// Why the upstream gave no response.
#[derive(Debug)]
pub enum UpstreamError {
    /// Connecting or sending failed (answered with 502).
    Unreachable(String),
    /// The upstream answered, but not with a response a client could use (answered with
    /// 502, never stored): a head that does not parse (conflicting `Content-Length`, a
    /// malformed status line or header), or one of the replies [`reply_fault`] names.
    Malformed(String),
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

/// The HTTP connector, with each connection stamped with the time it was opened
/// ([`OpenedAt`], in its `Connected` extras), so that a failed request can tell a reused
/// connection from a new one.
#[derive(Clone)]
struct StampingConnector(HttpConnector);

/// When an upstream connection was opened.
#[derive(Clone, Copy, Debug)]
struct OpenedAt(Instant);

/// An upstream connection and when it was opened.
struct StampedConnection {
    io: TokioIo<tokio::net::TcpStream>,
    opened_at: Instant,
}

impl tower::Service<Uri> for StampingConnector {
    type Response = StampedConnection;
    type Error = <HttpConnector as tower::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<StampedConnection, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.0.call(dst);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(StampedConnection {
                io,
                opened_at: Instant::now(),
            })
        })
    }
}

impl Connection for StampedConnection {
    fn connected(&self) -> Connected {
        self.io.connected().extra(OpenedAt(self.opened_at))
    }
}

impl hyper::rt::Read for StampedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for StampedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The origin and a connection pool to it.
#[derive(Clone)]
pub struct Upstream {
    client: Client<StampingConnector, ProxyBody>,
    /// Where the pool's connections are opened and driven (see [`Home`]).
    home: Home,
    base: UpstreamUrl,
    response_timeout: Duration,
    body_timeout: Duration,
    total_timeout: Duration,
    /// Requests sent again after a reused connection closed under them.
    retries: Counter,
}

impl Upstream {
    /// A client for `config.url` with the configured connect and response timeouts and
    /// pool idle timeout, whose
    /// connections are opened and driven on `home` (see [`Home`]; it must outlive the
    /// client), whichever runtime sends a request; requests sent again (see
    /// [`Upstream::send`]) are counted in `retries`.
    ///
    /// Panics if `config.url` is `None`; [`crate::config::Config::finish`] rules that out.
    pub fn new(config: &UpstreamConfig, home: Home, retries: Counter) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(
            config.connect_timeout_ms.max(1),
        )));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(AtHomeExecutor(home.clone()))
            .pool_idle_timeout(Duration::from_millis(config.pool_idle_timeout_ms.max(1)))
            // Idle connections past the timeout are closed by a background task, not only
            // found expired at the next checkout (an upstream without a keep-alive timeout
            // would otherwise keep a burst's connections open).
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_max_idle_per_host(256)
            // hyper's default of 100 response header fields refuses answers that reach
            // clients fine without cachegate; the parse buffer stays bounded (~400 KB).
            .http1_max_headers(MAX_RESPONSE_HEADERS)
            .build(StampingConnector(connector));
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
            retries,
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
    /// A request with a safe method (`GET`, `HEAD`, `OPTIONS`, `TRACE`; RFC 9110 §9.2.1)
    /// and no body whose pooled, reused connection closes or is reset before a whole
    /// response head arrives (the origin's keep-alive timeout ran out while the request was
    /// on its way) is sent once more (RFC 9112 §9.3.1.1), within the same head deadline and
    /// only while a quarter of it is left, and counted in `upstream_retries`. On a
    /// connection opened for it, such a failure is the origin's answer (it drops the
    /// request, or sheds load): not retried, as Go's HTTP client does. Any other request is
    /// sent once: its body is gone, or sending it twice could do twice what it asks (a
    /// `DELETE` applied once would answer 404 the second time). The returned duration is
    /// that of the attempt that answered.
    ///
    /// Errors: [`UpstreamError::Malformed`] when the reply is no valid answer to `req` (a
    /// head that does not parse, or see [`reply_fault`]; the connection is closed),
    /// [`UpstreamError::Unreachable`] when the connection or the exchange fails,
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
        let head_deadline = started + head_limit;
        let again = replayable(&req).then(|| copy_without_body(&req));
        let asked = Asked::of(&req);
        let mut sent_at = started;
        let mut outcome =
            tokio::time::timeout_at(head_deadline, self.home.run(self.client.request(req))).await;
        if let (Some(again), Ok(Err(e))) = (again, &outcome)
            && closed_before_response(e)
            && opened_before(e, started)
            && head_deadline.saturating_duration_since(Instant::now()) >= head_limit / 4
        {
            tracing::debug!(error = %error_chain(e), "upstream connection closed under a request; sending it again");
            self.retries.inc();
            sent_at = Instant::now();
            outcome =
                tokio::time::timeout_at(head_deadline, self.home.run(self.client.request(again)))
                    .await;
        }
        match outcome {
            Ok(Ok(resp)) => {
                if let Some(fault) = reply_fault(&resp, asked) {
                    return Err(UpstreamError::Malformed(fault.to_string()));
                }
                let elapsed = sent_at.elapsed();
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
                _ if unparsable(&e) => UpstreamError::Malformed(error_chain(&e)),
                _ => UpstreamError::Unreachable(error_chain(&e)),
            }),
            Err(_) => Err(UpstreamError::Timeout),
        }
    }
}

/// The most header fields an upstream response head may hold (more: 502).
pub const MAX_RESPONSE_HEADERS: usize = 256;

/// What a request asked for that decides which replies are valid answers to it.
#[derive(Debug, Clone, Copy)]
struct Asked {
    /// It carried `Upgrade` (a tunnelled WebSocket handshake).
    upgrade: bool,
    /// It carried a precondition ([`crate::conditional::is_conditional`]).
    conditional: bool,
}

impl Asked {
    fn of<B>(req: &Request<B>) -> Asked {
        let h = req.headers();
        Asked {
            upgrade: h.contains_key(http::header::UPGRADE),
            conditional: crate::conditional::is_conditional(h),
        }
    }
}

/// Why an upstream reply, whose head parsed, is still no answer to the request that
/// `asked`; `None` when it is one:
/// - `101 Switching Protocols` to a request that asked for no upgrade (RFC 9110 §15.2.2:
///   a server switches only to a protocol the client listed in `Upgrade`);
/// - `304 Not Modified` to a request without a precondition (RFC 9110 §15.4.5: only a
///   conditional request is answered so; the client has no stored response to complete);
/// - a transfer coding other than `chunked` (RFC 9112 §6.1, §7): its content would
///   still be encoded once the framing is removed, and stored and relayed as if it were
///   not.
fn reply_fault<B>(resp: &Response<B>, asked: Asked) -> Option<&'static str> {
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS && !asked.upgrade {
        return Some("101 Switching Protocols to a request without Upgrade");
    }
    if resp.status() == http::StatusCode::NOT_MODIFIED && !asked.conditional {
        return Some("304 Not Modified to an unconditional request");
    }
    let other_coding = resp
        .headers()
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"chunked"));
    other_coding.then_some("a transfer coding other than chunked")
}

/// Whether `e` is a response head that does not parse (hyper's parse errors: an invalid
/// or conflicting `Content-Length`, a malformed status line or header, too many headers).
fn unparsable(e: &hyper_util::client::legacy::Error) -> bool {
    sources(e).any(|inner| {
        inner
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
    })
}

/// Whether the connection `e` happened on was opened before `started`: a pooled
/// connection reused for this request, not one opened for it.
fn opened_before(e: &hyper_util::client::legacy::Error, started: Instant) -> bool {
    let Some(connected) = e.connect_info() else {
        return false;
    };
    let mut extras = http::Extensions::new();
    connected.get_extras(&mut extras);
    extras
        .get::<OpenedAt>()
        .is_some_and(|opened| opened.0 < started)
}

/// Whether `req` may be sent twice: a safe method (RFC 9110 §9.2.1) and no body.
fn replayable(req: &Request<ProxyBody>) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) && req.body().is_end_stream()
}

/// The same request (method, target, version, headers), with an empty body.
fn copy_without_body(req: &Request<ProxyBody>) -> Request<ProxyBody> {
    let mut copy = Request::new(super::body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// Whether the exchange failed because the connection closed (or was reset, or refused
/// the write) after the request was handed to it and before a whole response head
/// arrived; not a failure to connect, not a malformed response, not a request the client
/// gave up on. (A request a reused connection could not even start is sent again by
/// hyper-util itself.)
fn closed_before_response(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    sources(e).any(|inner| {
        if let Some(h) = inner.downcast_ref::<hyper::Error>() {
            h.is_incomplete_message()
        } else if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            )
        } else {
            false
        }
    })
}

/// The errors `e` was caused by, nearest first (not `e` itself).
fn sources<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(e.source(), |inner| inner.source())
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    for inner in sources(e) {
        s.push_str(": ");
        s.push_str(&inner.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::runtime::Runtime;

    /// What a test origin does with a request head.
    #[derive(Clone, Copy)]
    enum Reply {
        /// Answers with its connection's number and keeps the connection.
        KeepAlive,
        /// Answers with its connection's number and closes the connection.
        Close,
        /// Closes the connection unanswered.
        Drop,
    }

    /// An origin that numbers its connections from 1 and does with the `head`-th request
    /// head (from 1) of connection `number` what `script(number, head)` says; returns its
    /// address and the count of connections it accepted.
    async fn scripted_origin(
        script: fn(usize, usize) -> Reply,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let number = counted.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let (mut seen, mut heads, mut buf) = (Vec::new(), 0, [0u8; 1024]);
                    while let Ok(n @ 1..) = conn.read(&mut buf).await {
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            heads += 1;
                            let reply = script(number, heads);
                            let close = match reply {
                                Reply::Drop => return,
                                Reply::Close => "connection: close\r\n",
                                Reply::KeepAlive => "",
                            };
                            let body = number.to_string();
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\n{close}content-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if conn.write_all(answer.as_bytes()).await.is_err()
                                || matches!(reply, Reply::Close)
                            {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// An origin that answers every request with its connection's number (from 1), and
    /// keeps only the first connection open.
    async fn origin() -> std::net::SocketAddr {
        let script = |number, _| {
            if number == 1 {
                Reply::KeepAlive
            } else {
                Reply::Close
            }
        };
        scripted_origin(script).await.0
    }

    /// An origin that answers every request with its connection's number (from 1), kept
    /// alive, except the second request on the first connection: that connection closes
    /// then, unanswered (the origin's keep-alive timeout running out while a request is on
    /// its way).
    async fn closing_origin() -> std::net::SocketAddr {
        let script = |number, head| {
            if number == 1 && head > 1 {
                Reply::Drop
            } else {
                Reply::KeepAlive
            }
        };
        scripted_origin(script).await.0
    }

    /// Sends `method /x` (no body) through `upstream` until one goes over a reused
    /// connection (the retry counter moves, or the request fails; at most 50 requests);
    /// returns the outcomes.
    async fn until_reused(
        upstream: &Upstream,
        method: Method,
        retries: &Counter,
    ) -> Vec<Result<String, String>> {
        let mut outcomes = Vec::new();
        for _ in 0..50 {
            let req = Request::builder()
                .method(method.clone())
                .uri("/x")
                .body(super::super::body::empty())
                .unwrap();
            let outcome = match upstream.send(req).await {
                Ok((resp, _)) => {
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    Ok(String::from_utf8(body.to_vec()).unwrap())
                }
                Err(e) => Err(format!("{e:?}")),
            };
            let failed = outcome.is_err();
            outcomes.push(outcome);
            if failed || retries.get() > 0 {
                break;
            }
            // Let the connection go back to the pool.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        outcomes
    }

    /// A GET on a connection opened for it that closes unanswered is not sent again: the
    /// origin dropped it.
    #[tokio::test]
    async fn a_request_dropped_on_a_new_connection_is_not_sent_again() {
        let (addr, accepted) = scripted_origin(|_, _| Reply::Drop).await;
        let retries = Counter::default();
        let upstream = upstream_at(addr, &retries);
        let outcomes = until_reused(&upstream, Method::GET, &retries).await;
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].is_err(), "{outcomes:?}");
        assert_eq!(retries.get(), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    fn upstream_at(addr: std::net::SocketAddr, retries: &Counter) -> Upstream {
        let config = UpstreamConfig {
            url: Some(format!("http://{addr}").parse().unwrap()),
            ..UpstreamConfig::default()
        };
        Upstream::new(&config, Home::current(), retries.clone())
    }

    /// A GET that finds its pooled connection closed by the origin is sent again on a new
    /// one: the client gets the response, not a 502.
    #[tokio::test]
    async fn a_safe_request_on_a_connection_closed_under_it_is_sent_again() {
        let retries = Counter::default();
        let upstream = upstream_at(closing_origin().await, &retries);
        let outcomes = until_reused(&upstream, Method::GET, &retries).await;
        assert!(
            outcomes.iter().all(Result::is_ok),
            "a request failed: {outcomes:?}"
        );
        assert_eq!(
            retries.get(),
            1,
            "no request went over a reused connection: {outcomes:?}"
        );
    }

    /// A POST (nor any unsafe method) is never sent twice: on a connection closed under it,
    /// it fails (a 502).
    #[tokio::test]
    async fn a_post_on_a_connection_closed_under_it_is_not_sent_again() {
        for method in [Method::POST, Method::DELETE, Method::PUT] {
            let retries = Counter::default();
            let upstream = upstream_at(closing_origin().await, &retries);
            let outcomes = until_reused(&upstream, method.clone(), &retries).await;
            assert!(
                outcomes.last().is_some_and(Result::is_err),
                "no {method} went over a reused connection: {outcomes:?}"
            );
            assert_eq!(retries.get(), 0, "{method}");
        }
    }

    /// An idle pooled connection is reused within `pool_idle_timeout_ms`, and not after.
    #[test]
    fn an_idle_connection_is_not_reused_past_the_pool_idle_timeout() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The connection each of two requests 300 ms apart went over.
        let numbers = |pool_idle_timeout_ms| {
            rt.block_on(async {
                let config = UpstreamConfig {
                    url: Some(format!("http://{}", origin().await).parse().unwrap()),
                    pool_idle_timeout_ms,
                    ..UpstreamConfig::default()
                };
                let upstream = Upstream::new(&config, Home::current(), Counter::default());
                let mut numbers = Vec::new();
                for _ in 0..2 {
                    let req = Request::get("/x")
                        .body(super::super::body::empty())
                        .unwrap();
                    let (resp, _) = upstream.send(req).await.unwrap();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    numbers.push(String::from_utf8(body.to_vec()).unwrap());
                    // Idle time is what is tested here: it can only be waited out.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                numbers
            })
        };
        assert_eq!(numbers(30_000), ["1", "1"]);
        assert_eq!(numbers(100), ["1", "2"]);
    }

    /// An idle pooled connection is closed once `pool_idle_timeout_ms` has passed, without
    /// waiting for another request to find it expired.
    #[test]
    fn an_idle_connection_is_closed_past_the_pool_idle_timeout() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (closed, on_close) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let mut answered = false;
                while let Ok(n @ 1..) = conn.read(&mut buf).await {
                    if !answered && buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        answered = true;
                        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n1";
                        conn.write_all(answer.as_bytes()).await.unwrap();
                    }
                }
                let _ = closed.send(());
            });
            let config = UpstreamConfig {
                url: Some(format!("http://{addr}").parse().unwrap()),
                pool_idle_timeout_ms: 100,
                ..UpstreamConfig::default()
            };
            let upstream = Upstream::new(&config, Home::current(), Counter::default());
            let req = Request::get("/x")
                .body(super::super::body::empty())
                .unwrap();
            let (resp, _) = upstream.send(req).await.unwrap();
            resp.into_body().collect().await.unwrap();
            let closed = tokio::time::timeout(Duration::from_secs(5), on_close).await;
            assert!(closed.is_ok(), "the idle connection was never closed");
            drop(upstream);
        });
    }

    /// The pool's connections are opened and driven on the client's home runtime: one
    /// opened for a request sent from a runtime that has ended since (a connection thread
    /// at shutdown) is still there for the next requests, from another runtime.
    #[test]
    fn pooled_connections_outlive_the_runtime_that_sent_the_request() {
        let home = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let addr = home.block_on(origin());
        let config = UpstreamConfig {
            url: Some(format!("http://{addr}").parse().unwrap()),
            ..UpstreamConfig::default()
        };
        let upstream =
            home.block_on(async { Upstream::new(&config, Home::current(), Counter::default()) });
        // The number of the origin connection a request went over.
        let send = |rt: &Runtime| {
            rt.block_on(async {
                let req = Request::get("/x")
                    .body(super::super::body::empty())
                    .unwrap();
                let (resp, _) = upstream.send(req).await.unwrap();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                String::from_utf8(body.to_vec()).unwrap()
            })
        };
        let elsewhere = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let first = elsewhere();
        assert_eq!(send(&first), "1");
        drop(first);
        // The first connection goes back to the pool once the exchange is over (on a task
        // of its own): until then a request opens another one, which the origin closes.
        let next = elsewhere();
        let reused = (0..50).any(|_| send(&next) == "1");
        assert!(
            reused,
            "the first connection ended with the runtime that opened it"
        );
    }
}
