//! The client connection's socket, as hyper (and, after an upgrade, the tunnel) sees it:
//! a bound on how long a write may wait for the client, and the connection's permit.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

/// What a connection holds while open: one of `max_connections`, counted in a gauge.
pub struct ConnTicket {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl ConnTicket {
    /// Takes `permit` and counts the connection in `open` until dropped.
    pub fn new(permit: OwnedSemaphorePermit, open: Gauge) -> Self {
        open.inc();
        ConnTicket {
            _permit: permit,
            open,
        }
    }
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A client socket whose writes fail with [`io::ErrorKind::TimedOut`] once the client has
/// accepted no byte for `send_timeout` (nginx's `send_timeout`): a client that stops
/// reading a large response cannot hold its connection, its permit and the response's
/// memory for ever. The timer runs only while a write is waiting; progress restarts it.
///
/// It also holds the connection's [`ConnTicket`] (its permit, one of `max_connections`),
/// so the permit is given back only when the socket is dropped: after the HTTP connection
/// ends, or after the tunnel it was upgraded to (WebSocket) ends.
pub struct ClientIo<S> {
    inner: S,
    send_timeout: Duration,
    /// Armed while a write is pending.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Counts writes given up on (`client_errors{kind="send-timeout"}`).
    send_timeouts: Counter,
    _ticket: ConnTicket,
}

impl<S> ClientIo<S> {
    /// Wraps `inner`, holding `ticket` until dropped; a write given up on counts in
    /// `send_timeouts`.
    pub fn new(
        inner: S,
        send_timeout: Duration,
        send_timeouts: Counter,
        ticket: ConnTicket,
    ) -> Self {
        ClientIo {
            inner,
            send_timeout,
            deadline: None,
            send_timeouts,
            _ticket: ticket,
        }
    }

    /// After a write returned `result`: disarms the timer on progress; on `Pending`, arms
    /// it (once) and fails the write when it has run out.
    fn bound<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.deadline = None;
            return result;
        }
        let timeout = self.send_timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        ready!(deadline.as_mut().poll(cx));
        self.deadline = None;
        self.send_timeouts.inc();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client accepted no data within send_timeout",
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bound(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bound(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.bound(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.bound(cx, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Semaphore;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_fails_after_the_send_timeout() {
        let permits = Arc::new(Semaphore::new(1));
        let (near, mut far) = tokio::io::duplex(64);
        let permit = permits.clone().try_acquire_owned().unwrap();
        let (open, timeouts) = (Gauge::default(), Counter::default());
        let ticket = ConnTicket::new(permit, open.clone());
        let mut io = ClientIo::new(near, Duration::from_millis(500), timeouts.clone(), ticket);
        assert_eq!(open.get(), 1);
        // Fills the 64-byte pipe, then waits: the peer does not read.
        let started = Instant::now();
        let err = io.write_all(&[b'x'; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(timeouts.get(), 1);
        assert!(started.elapsed() >= Duration::from_millis(500));
        // The permit is held until the socket is dropped.
        assert_eq!(permits.available_permits(), 0);
        drop(io);
        assert_eq!(permits.available_permits(), 1);
        assert_eq!(open.get(), 0);
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
        let permits = Arc::new(Semaphore::new(1));
        let (near, mut far) = tokio::io::duplex(64);
        let permit = permits.try_acquire_owned().unwrap();
        let ticket = ConnTicket::new(permit, Gauge::default());
        let timeouts = Counter::default();
        let mut io = ClientIo::new(near, Duration::from_millis(500), timeouts.clone(), ticket);
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 16];
            loop {
                // Slower than the whole write, faster than the send timeout per chunk.
                tokio::time::sleep(Duration::from_millis(300)).await;
                match far.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got += n,
                }
            }
        });
        io.write_all(&[b'x'; 256]).await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), 256);
        assert_eq!(timeouts.get(), 0);
    }
}
