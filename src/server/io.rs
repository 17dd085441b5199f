//! The client connection's socket, as hyper (and, after an upgrade, the tunnel) sees it:
//! a bound on how long a write may wait for the client, a bound on how long the next
//! request head may take ([`HeadClock`]), and the connection's permit.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

use super::workers::ThreadSlot;

/// What a connection holds while open: one of `max_connections`, counted in a gauge, and
/// its place on a connection thread.
pub struct ConnTicket {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
    _thread: Option<ThreadSlot>,
}

impl ConnTicket {
    /// Takes `permit` and counts the connection in `open` until dropped.
    pub fn new(permit: OwnedSemaphorePermit, open: Gauge) -> Self {
        open.inc();
        ConnTicket {
            _permit: permit,
            open,
            _thread: None,
        }
    }

    /// Keeps `slot` (the connection's count on its connection thread) until dropped.
    pub fn on_thread(mut self, slot: ThreadSlot) -> Self {
        self._thread = Some(slot);
        self
    }
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The request-head deadline of one connection (hyper's `header_read_timeout`, kept
/// cheaply): while no request is being answered, the next request head must be complete
/// within `timeout` of the moment the previous response was fully written to the socket
/// (or of the connection's start), however the client spreads its bytes; an idle
/// keep-alive connection is closed then too.
///
/// Shared by the socket ([`ClientIo`], which enforces it on reads and starts it on the
/// first completed flush after a response) and the connection's service, which marks each
/// request's start ([`HeadClock::request_started`]) and the drop of its response body
/// ([`HeadClock::response_ended`]: hyper may still hold the body's bytes then, so the
/// deadline waits for the flush). One timer per connection is re-armed lazily, when it
/// fires early, so that a request costs no timer operation.
pub struct HeadClock {
    timeout: Duration,
    started: Instant,
    /// Requests whose response is not yet finished.
    in_flight: AtomicU32,
    /// When the last response was fully written, in nanoseconds since `started`.
    idle_since_nanos: AtomicU64,
    /// A response body was dropped; the deadline starts once the socket has been flushed.
    awaiting_flush: AtomicBool,
    /// Request bodies not yet dropped: their reads are not head reads, even after the
    /// response went out (an upstream may answer before the upload ends).
    request_bodies: AtomicU32,
    /// After a protocol upgrade the socket carries a tunnel: no more heads.
    upgraded: AtomicBool,
}

impl HeadClock {
    /// A clock for a connection opened now, allowing `timeout` for each request head.
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(HeadClock {
            timeout,
            started: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since_nanos: AtomicU64::new(0),
            awaiting_flush: AtomicBool::new(false),
            request_bodies: AtomicU32::new(0),
            upgraded: AtomicBool::new(false),
        })
    }

    /// A request head arrived: no head deadline until its response has ended.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A response body has been dropped (all of it handed to hyper, or given up on): once
    /// the socket is flushed, the next head is due within the timeout.
    pub fn response_ended(&self) {
        self.awaiting_flush.store(true, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// The socket was flushed: if a response ended before and none is being answered, the
    /// wait for the next head starts now. Returns whether it did.
    fn flushed(&self) -> bool {
        if self.in_flight.load(Ordering::Acquire) > 0
            || !self.awaiting_flush.swap(false, Ordering::Relaxed)
        {
            return false;
        }
        let nanos = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since_nanos.fetch_max(nanos, Ordering::Relaxed);
        true
    }

    /// A request body is being read (until [`HeadClock::request_body_dropped`]): no head
    /// deadline meanwhile; `client_body_timeout` bounds it.
    pub fn request_body_started(&self) {
        self.request_bodies.fetch_add(1, Ordering::Relaxed);
    }

    /// A request body was dropped (read, or given up on). If it outlived its response, the
    /// wait for the next head starts now.
    pub fn request_body_dropped(&self) {
        let nanos = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since_nanos.fetch_max(nanos, Ordering::Relaxed);
        self.request_bodies.fetch_sub(1, Ordering::Release);
    }

    /// The connection became a tunnel: the deadline no longer applies.
    pub fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }

    /// When the next head is due, if one is awaited.
    fn due(&self) -> Due {
        if self.in_flight.load(Ordering::Acquire) > 0
            || self.awaiting_flush.load(Ordering::Relaxed)
            || self.upgraded.load(Ordering::Relaxed)
        {
            return Due::Never;
        }
        if self.request_bodies.load(Ordering::Acquire) > 0 {
            // Its drop may wake nobody (hyper lets go of a chunked body's channel first):
            // look again a timeout later.
            return Due::Recheck(Instant::now() + self.timeout);
        }
        let idle_since = Duration::from_nanos(self.idle_since_nanos.load(Ordering::Relaxed));
        Due::At(self.started + idle_since + self.timeout)
    }
}

/// What a [`HeadClock`] says about the next request head.
enum Due {
    /// No head is awaited (a request is being answered, or the connection is a tunnel).
    Never,
    /// No deadline yet (a request body outlived its response), but look again then.
    Recheck(Instant),
    /// The head is due then.
    At(Instant),
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
    /// The request-head deadline, and its timer (armed while a head is awaited; re-armed
    /// only when it fires before the deadline).
    head: Arc<HeadClock>,
    head_timer: Option<Pin<Box<Sleep>>>,
    _ticket: ConnTicket,
}

impl<S> ClientIo<S> {
    /// Wraps `inner`, holding `ticket` until dropped; a write given up on counts in
    /// `send_timeouts`; reads fail once `head`'s deadline has passed.
    pub fn new(
        inner: S,
        send_timeout: Duration,
        send_timeouts: Counter,
        head: Arc<HeadClock>,
        ticket: ConnTicket,
    ) -> Self {
        ClientIo {
            inner,
            send_timeout,
            deadline: None,
            send_timeouts,
            head,
            head_timer: None,
            _ticket: ticket,
        }
    }

    /// After a read found nothing to read: fails it once the awaited head is overdue, and
    /// otherwise makes sure the task is woken at the deadline.
    fn check_head(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        loop {
            let (deadline, enforced) = match self.head.due() {
                Due::Never => return None,
                Due::Recheck(at) => (at, false),
                Due::At(at) => (at, true),
            };
            let timer = self
                .head_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            match timer.as_mut().poll(cx) {
                Poll::Pending => return None,
                Poll::Ready(()) if enforced && Instant::now() >= deadline => {
                    return Some(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no complete request head within header_read_timeout",
                    ));
                }
                // Armed for an earlier moment (the connection has answered since, or it was
                // a recheck): armed again for what is due now.
                Poll::Ready(()) => timer.as_mut().reset(deadline),
            }
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
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if result.is_pending()
            && let Some(overdue) = self.check_head(cx)
        {
            return Poll::Ready(Err(overdue));
        }
        result
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
        if matches!(result, Poll::Ready(Ok(()))) && self.head.flushed() {
            // The response is out: the wait for the next head starts, and the timer is
            // armed here, so that the task wakes at the deadline even if nothing is read.
            let _ = self.check_head(cx);
        }
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

    /// A socket whose request heads are due within 1 s.
    fn head_socket() -> (
        ClientIo<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<HeadClock>,
    ) {
        let Socket { io, far, head, .. } = socket(1024, 60_000, 1000);
        (io, far, head)
    }

    /// Asserts that the next read fails as overdue exactly 1 s after `from`.
    async fn overdue_one_second_after(io: &mut ClientIo<tokio::io::DuplexStream>, from: Instant) {
        let mut buf = [0u8; 8];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(from.elapsed(), Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_fails_after_the_send_timeout() {
        let Socket {
            mut io,
            mut far,
            permits,
            open,
            timeouts,
            ..
        } = socket(64, 500, 3_600_000);
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
        let Socket {
            mut io,
            mut far,
            timeouts,
            ..
        } = socket(64, 500, 3_600_000);
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

    /// A socket over an in-memory pipe of `pipe` bytes, with its permit, gauge, counter
    /// and head clock.
    struct Socket {
        io: ClientIo<tokio::io::DuplexStream>,
        far: tokio::io::DuplexStream,
        permits: Arc<Semaphore>,
        open: Gauge,
        timeouts: Counter,
        head: Arc<HeadClock>,
    }

    fn socket(pipe: usize, send_timeout_ms: u64, head_timeout_ms: u64) -> Socket {
        let permits = Arc::new(Semaphore::new(1));
        let (near, far) = tokio::io::duplex(pipe);
        let (open, timeouts) = (Gauge::default(), Counter::default());
        let ticket = ConnTicket::new(permits.clone().try_acquire_owned().unwrap(), open.clone());
        let head = HeadClock::new(Duration::from_millis(head_timeout_ms));
        let io = ClientIo::new(
            near,
            Duration::from_millis(send_timeout_ms),
            timeouts.clone(),
            head.clone(),
            ticket,
        );
        Socket {
            io,
            far,
            permits,
            open,
            timeouts,
            head,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_never_completes_fails_the_read_at_the_deadline_however_it_trickles() {
        let Socket {
            mut io, mut far, ..
        } = socket(1024, 60_000, 1000);
        let started = Instant::now();
        let trickle = tokio::spawn(async move {
            // A byte every 300 ms: progress, but no complete head.
            for _ in 0..10 {
                if far.write_all(b"G").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            far
        });
        let mut buf = [0u8; 64];
        let err = loop {
            match io.read(&mut buf).await {
                Ok(n) => assert!(n > 0),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_millis(1000));
        drop(trickle);
    }

    /// Counts its wake-ups.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker that counts its wake-ups, and the count.
    fn counting_waker() -> (Arc<Wakes>, std::task::Waker) {
        let wakes = Arc::new(Wakes(Default::default()));
        (wakes.clone(), std::task::Waker::from(wakes))
    }

    #[tokio::test(start_paused = true)]
    async fn the_flush_after_a_response_arms_the_deadline_without_any_read() {
        let (mut io, _far, head) = head_socket();
        head.request_started();
        head.response_ended();
        // hyper flushes the response and then reads nothing: the task must still be woken
        // at the deadline, to find the connection overdue and close it.
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "woken before the deadline"
        );
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "not woken at the deadline"
        );
        let mut buf = [0u8; 8];
        let mut buf = ReadBuf::new(&mut buf);
        match Pin::new(&mut io).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            other => panic!("the overdue connection was not failed: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_that_outlives_its_response_is_not_timed_as_a_head() {
        let (mut io, _far, head) = head_socket();
        head.request_started();
        head.request_body_started();
        // The upstream answered early: the response is out, the upload goes on.
        head.response_ended();
        io.flush().await.unwrap();
        let mut buf = [0u8; 8];
        let waited = tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf)).await;
        assert!(
            waited.is_err(),
            "a request body read was cut by the head deadline"
        );
        // The body is done with: the next head is due one timeout from now.
        head.request_body_dropped();
        overdue_one_second_after(&mut io, Instant::now()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_dropped_after_the_last_read_still_gets_its_connection_closed() {
        // hyper read for the next head while the body was alive, then the body was dropped
        // and nothing woke the connection: the recheck timer must.
        let (mut io, _far, head) = head_socket();
        head.request_started();
        head.request_body_started();
        head.response_ended();
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        let mut bytes = [0u8; 8];
        let mut poll_read = |io: &mut ClientIo<_>, cx: &mut Context<'_>| {
            let mut buf = ReadBuf::new(&mut bytes);
            Pin::new(io).poll_read(cx, &mut buf)
        };
        assert!(poll_read(&mut io, &mut cx).is_pending());
        tokio::time::advance(Duration::from_millis(500)).await;
        head.request_body_dropped();
        // The recheck (a timeout after that read) wakes the task; the read it makes finds
        // the head not yet overdue (due a timeout after the drop) and waits on.
        tokio::time::advance(Duration::from_millis(501)).await;
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "no recheck");
        assert!(poll_read(&mut io, &mut cx).is_pending());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            2,
            "not woken at the deadline"
        );
        match poll_read(&mut io, &mut cx) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            other => panic!("the overdue connection was not failed: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_head_deadline_while_a_request_is_answered_and_a_fresh_one_after() {
        let (mut io, mut far, head) = head_socket();
        head.request_started();
        let mut buf = [0u8; 64];
        // Long past the timeout: the request is still being answered.
        let waited = tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf)).await;
        assert!(
            waited.is_err(),
            "the read ended while a request was in flight"
        );
        // Its body is dropped, but hyper may still hold its bytes: no deadline until the
        // socket has been flushed.
        head.response_ended();
        let waited = tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf)).await;
        assert!(
            waited.is_err(),
            "the deadline started before the response was written"
        );
        // Flushed: the next head is due one timeout from now.
        io.flush().await.unwrap();
        overdue_one_second_after(&mut io, Instant::now()).await;
        // A tunnel after an upgrade has no head deadline.
        let (mut io, _far2, head) = head_socket();
        head.upgraded();
        let waited = tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf)).await;
        assert!(waited.is_err(), "a tunnel was cut by the head deadline");
        far.write_all(b"x").await.unwrap();
    }
}
