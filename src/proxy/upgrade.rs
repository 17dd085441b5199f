//! Protocol upgrades (WebSocket, RFC 6455; RFC 9110 §7.8): tunnelled to the upstream,
//! never cached.
//!
//! The request goes to the upstream with its `Upgrade` and `Connection: upgrade`. When the
//! upstream answers `101 Switching Protocols`, the client gets that answer and both
//! connections are joined byte for byte until either side closes, the tunnel carries no
//! byte either way for `tunnel_idle_timeout_ms`, or cachegate shuts down. Any other answer
//! is passed back as it is. A tunnel keeps its client connection's permit
//! (`max_connections`) until it closes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// What bounds a tunnel's life besides its two ends.
#[derive(Clone)]
pub struct TunnelLimits {
    /// Longest time without a byte in either direction.
    pub idle_timeout: Duration,
    /// Turns true when cachegate shuts down: open tunnels are closed.
    pub shutdown: watch::Receiver<bool>,
    /// Open tunnels (`cachegate_open_tunnels`).
    pub open: Gauge,
}

/// The client side of a WebSocket upgrade ([`super::headers::wants_upgrade`]), to take
/// over once the upstream agrees.
pub struct UpgradeRequest {
    client: OnUpgrade,
}

/// Why an upgrade request was not tunnelled.
pub enum NotTunnelled<B> {
    /// The upstream did not switch protocols: its answer is passed back as it is.
    Answer(Response<B>),
    /// The upstream switched to something other than WebSocket: an upstream fault (502).
    WrongProtocol,
}

impl UpgradeRequest {
    /// Takes the client connection from a request's extensions. `None` when it cannot be
    /// taken over (the server was not built with upgrades).
    pub fn take(extensions: &mut http::Extensions) -> Option<Self> {
        Some(UpgradeRequest {
            client: extensions.remove::<OnUpgrade>()?,
        })
    }

    /// Puts the upgrade back on a request whose hop-by-hop headers were removed: exactly
    /// `Upgrade: websocket` and `Connection: upgrade`, whatever else the client listed.
    pub fn restore_headers(&self, headers: &mut HeaderMap) {
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }

    /// When `upstream` is a `101` to WebSocket, joins the two connections in a background
    /// task and returns the `101` head for the client (with `Upgrade: websocket` and
    /// `Connection: upgrade`). Otherwise [`NotTunnelled`].
    pub fn tunnel<B>(
        self,
        mut upstream: Response<B>,
        limits: TunnelLimits,
    ) -> Result<Response<()>, NotTunnelled<B>> {
        if upstream.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(NotTunnelled::Answer(upstream));
        }
        let websocket = super::headers::wants_upgrade(&{
            let mut h = upstream.headers().clone();
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h
        });
        let server = upstream.extensions_mut().remove::<OnUpgrade>();
        let (Some(server), true) = (server, websocket) else {
            return Err(NotTunnelled::WrongProtocol);
        };
        let (head, _) = upstream.into_parts();
        let mut headers = head.headers;
        super::headers::remove_hop_by_hop(&mut headers);
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let client = self.client;
        tokio::spawn(async move {
            let (client, server) = match tokio::join!(client, server) {
                (Ok(c), Ok(s)) => (c, s),
                _ => {
                    tracing::debug!("upgrade failed on one side");
                    return;
                }
            };
            join(TokioIo::new(client), TokioIo::new(server), limits).await;
        });
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *resp.headers_mut() = headers;
        Ok(resp)
    }
}

/// Copies bytes both ways until either side closes, the tunnel is idle for
/// `limits.idle_timeout`, or shutdown; then both sides are dropped (closed).
async fn join<C, S>(client: C, server: S, mut limits: TunnelLimits)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _open = Counted::new(limits.open.clone());
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Active {
        inner: client,
        start,
        last: last.clone(),
    };
    let mut server = Active {
        inner: server,
        start,
        last: last.clone(),
    };
    let idle = async {
        loop {
            let since_start = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = start + since_start + limits.idle_timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let shutdown = async {
        let _ = limits.shutdown.wait_for(|stop| *stop).await;
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut server) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
        }
        () = idle => tracing::debug!("tunnel closed: idle"),
        () = shutdown => tracing::debug!("tunnel closed: shutting down"),
    }
}

/// Counts a tunnel in a gauge while it lives.
struct Counted(Gauge);

impl Counted {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Counted(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A tunnel side that records when it last moved a byte (milliseconds since `start`).
struct Active<T> {
    inner: T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Active<T> {
    fn moved(&self, bytes: usize) {
        if bytes > 0 {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.fetch_max(ms, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.moved(read);
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.moved(n);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(idle_ms: u64) -> (watch::Sender<bool>, TunnelLimits) {
        let (tx, rx) = watch::channel(false);
        let limits = TunnelLimits {
            idle_timeout: Duration::from_millis(idle_ms),
            shutdown: rx,
            open: Gauge::default(),
        };
        (tx, limits)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_tunnel_is_closed_and_an_active_one_is_not() {
        let (client_near, mut client) = tokio::io::duplex(1024);
        let (server_near, mut server) = tokio::io::duplex(1024);
        let (_tx, limits) = limits(1_000);
        let open = limits.open.clone();
        let start = Instant::now();
        let tunnel = tokio::spawn(join(client_near, server_near, limits));
        // Traffic every 600 ms keeps it open past the idle timeout.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(600)).await;
            client.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            assert_eq!(open.get(), 1);
        }
        // Then silence: closed one idle timeout after the last byte.
        tunnel.await.unwrap();
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(3_400), "{elapsed:?}");
        assert_eq!(open.get(), 0);
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_an_open_tunnel() {
        let (client_near, mut client) = tokio::io::duplex(1024);
        let (server_near, _server) = tokio::io::duplex(1024);
        let (tx, limits) = limits(60_000);
        let tunnel = tokio::spawn(join(client_near, server_near, limits));
        tx.send(true).unwrap();
        tunnel.await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
