//! Body plumbing: the boxed body type used on both sides of the proxy, reading a body up
//! to a limit without losing what was read when the limit is passed, and time limits on a
//! body that trickles or stalls ([`Timed`]).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::future::Future;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// The error type carried by proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body as the proxy passes it on: streamed or in memory.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body with byte chunks.
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// The outcome of [`read_limited`].
pub enum Limited<B> {
    /// The whole body, at most `limit` bytes.
    Complete(Bytes),
    /// The body is larger than `limit`: what was read, followed by the rest, untouched.
    TooLarge(PrefixedBody<B>),
}

/// Reads `body` into memory if it has at most `limit` bytes. A larger body is returned as a
/// [`PrefixedBody`] that replays the bytes already read, so nothing is lost.
///
/// Errors: the body's own error while reading (e.g. the peer closed the connection).
pub async fn read_limited<B>(mut body: B, limit: usize) -> Result<Limited<B>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Ok(Limited::TooLarge(PrefixedBody::new(Bytes::new(), body)));
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                return Ok(Limited::TooLarge(PrefixedBody::new(buf.freeze(), body)));
            }
        }
        // Trailers are dropped: cached responses are stored without them.
    }
    // An exact-size copy: a stored body must not keep read buffers or spare capacity alive.
    Ok(Limited::Complete(Bytes::copy_from_slice(&buf)))
}

/// Which side of the proxy a body comes from, so that its failures are blamed on the right
/// party: a client fault is a 4xx, an upstream fault a 502/504.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's request body.
    Client,
    /// The upstream's response body.
    Upstream,
}

/// Why a [`Timed`] body failed.
#[derive(Debug)]
pub struct BodyError {
    /// Whose body it was.
    pub side: Side,
    /// `true` when a time limit passed, `false` when the body itself failed.
    pub timed_out: bool,
    source: Option<BoxError>,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = match self.side {
            Side::Client => "request",
            Side::Upstream => "upstream response",
        };
        match (&self.source, self.timed_out) {
            (_, true) => write!(f, "{side} body timed out"),
            (Some(e), false) => write!(f, "{side} body failed: {e}"),
            (None, false) => write!(f, "{side} body failed"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// The first [`BodyError`] in an error's chain of sources, if any: how a body failure
/// that surfaced through the HTTP client is recognized.
pub fn body_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<BodyError>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// A body with two time limits: `idle` between frames (and before the first), and an
/// overall deadline. Either one passing ends the body with a [`BodyError`] marked
/// `timed_out`; the body's own errors become a [`BodyError`] of the same side.
///
/// The limits are kept by the clock, and a timer is armed only when the body has to wait
/// for a frame: a body whose frames are already buffered (a small request body that came
/// with its head) costs no timer at all.
pub struct Timed<B> {
    inner: B,
    side: Side,
    idle: Duration,
    /// When the last frame arrived (or the body was made): the idle limit runs from here.
    idle_from: tokio::time::Instant,
    deadline: Option<tokio::time::Instant>,
    /// Armed at the first wait, for the earlier of the idle limit and the deadline.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Timed<B> {
    /// Limits `inner` to `idle` between frames and, when given, to `deadline` overall.
    pub fn new(
        inner: B,
        side: Side,
        idle: Duration,
        deadline: Option<tokio::time::Instant>,
    ) -> Self {
        Timed {
            inner,
            side,
            idle,
            idle_from: tokio::time::Instant::now(),
            deadline,
            timer: None,
        }
    }

    fn error(&self, timed_out: bool, source: Option<BoxError>) -> BodyError {
        BodyError {
            side: self.side,
            timed_out,
            source,
        }
    }

    /// When waiting must end: the idle limit or the deadline, whichever comes first.
    fn due(&self) -> tokio::time::Instant {
        let idle_due = self.idle_from + self.idle;
        self.deadline.map_or(idle_due, |d| d.min(idle_due))
    }
}

impl<B> Body for Timed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this
            .deadline
            .is_some_and(|d| tokio::time::Instant::now() >= d)
        {
            return Poll::Ready(Some(Err(this.error(true, None))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle_from = tokio::time::Instant::now();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(this.error(false, Some(e.into()))))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let due = this.due();
                let timer = match &mut this.timer {
                    Some(timer) => {
                        if timer.deadline() != due {
                            timer.as_mut().reset(due);
                        }
                        timer
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep_until(due))),
                };
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(this.error(true, None)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that yields `prefix` and then the frames of `rest`.
pub struct PrefixedBody<B> {
    prefix: Option<Bytes>,
    rest: B,
}

impl<B> PrefixedBody<B> {
    /// Yields `prefix` (if not empty) before `rest`.
    pub fn new(prefix: Bytes, rest: B) -> Self {
        PrefixedBody {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
        }
    }
}

impl<B> Body for PrefixedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let inner = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + extra);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    fn chunked(chunks: &[&'static str]) -> impl Body<Data = Bytes, Error = BoxError> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn over_the_limit_loses_nothing() {
        let Limited::TooLarge(body) = read_limited(chunked(&["abc", "def", "ghi"]), 4)
            .await
            .unwrap()
        else {
            panic!("should be too large")
        };
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"abcdefghi");
    }

    #[tokio::test]
    async fn within_the_limit_is_complete() {
        let Limited::Complete(b) = read_limited(chunked(&["abc", "def"]), 6).await.unwrap() else {
            panic!("should fit")
        };
        assert_eq!(&b[..], b"abcdef");
    }

    proptest::proptest! {
        #[test]
        fn reading_within_a_limit_keeps_every_byte(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8), 0..6),
            limit in 0usize..40,
        ) {
            let frames: Vec<Result<Frame<Bytes>, BoxError>> =
                chunks.iter().map(|c| Ok(Frame::data(Bytes::from(c.clone())))).collect();
            let all: Vec<u8> = chunks.concat();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let got = rt.block_on(async {
                let body = StreamBody::new(futures_util::stream::iter(frames));
                match read_limited(body, limit).await.unwrap() {
                    Limited::Complete(b) => (true, b.to_vec()),
                    Limited::TooLarge(rest) => (false, rest.collect().await.unwrap().to_bytes().to_vec()),
                }
            });
            proptest::prop_assert_eq!(got.0, all.len() <= limit);
            proptest::prop_assert_eq!(got.1, all);
        }
    }

    #[tokio::test]
    async fn a_stalled_body_times_out_and_says_whose_it_was() {
        let stalled = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, BoxError>,
        >());
        let timed = Timed::new(stalled, Side::Client, Duration::from_millis(50), None);
        let err = read_limited(timed, 10).await.err().unwrap();
        let found = body_error(err.as_ref()).unwrap();
        assert!(found.timed_out);
        assert_eq!(found.side, Side::Client);

        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        let trickle = StreamBody::new(Box::pin(futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))), ()))
        })));
        let timed = Timed::new(
            trickle,
            Side::Upstream,
            Duration::from_millis(50),
            Some(deadline),
        );
        let err = read_limited(timed, 1 << 20).await.err().unwrap();
        assert!(body_error(err.as_ref()).unwrap().timed_out);
    }

    /// A body with one frame after each of `gaps_ms` (milliseconds after the previous one).
    fn frames_after(gaps_ms: &'static [u64]) -> impl Body<Data = Bytes, Error = BoxError> + Unpin {
        StreamBody::new(Box::pin(futures_util::stream::unfold(
            0,
            move |n| async move {
                let gap = *gaps_ms.get(n)?;
                tokio::time::sleep(Duration::from_millis(gap)).await;
                Some((
                    Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))),
                    n + 1,
                ))
            },
        )))
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_limit_runs_from_the_last_frame_and_the_deadline_from_the_start() {
        let idle = Duration::from_millis(50);
        // Frames 40 ms apart under a 50 ms idle limit: never idle for long, whole body read.
        let started = tokio::time::Instant::now();
        let timed = Timed::new(frames_after(&[40; 10]), Side::Client, idle, None);
        match read_limited(timed, 1 << 20).await.unwrap() {
            Limited::Complete(b) => assert_eq!(b.len(), 10),
            Limited::TooLarge(_) => panic!("not too large"),
        }
        assert_eq!(started.elapsed(), Duration::from_millis(400));

        // The same body under a 250 ms deadline: cut at the deadline.
        let started = tokio::time::Instant::now();
        let deadline = Some(started + Duration::from_millis(250));
        let timed = Timed::new(frames_after(&[40; 10]), Side::Upstream, idle, deadline);
        let err = read_limited(timed, 1 << 20).await.err().unwrap();
        assert!(body_error(err.as_ref()).unwrap().timed_out);
        assert_eq!(started.elapsed(), Duration::from_millis(250));

        // A gap longer than the idle limit after some frames: cut 50 ms after the last one.
        let started = tokio::time::Instant::now();
        let timed = Timed::new(frames_after(&[10, 10, 10, 80]), Side::Client, idle, None);
        let err = read_limited(timed, 1 << 20).await.err().unwrap();
        assert!(body_error(err.as_ref()).unwrap().timed_out);
        assert_eq!(started.elapsed(), Duration::from_millis(30 + 50));
    }
}
