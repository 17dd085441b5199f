//! Body plumbing: the boxed body type used on both sides of the proxy, and reading a body
//! up to a limit without losing what was read when the limit is passed.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// The error type carried by proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body as the proxy passes it on: streamed or in memory.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Boxes any body with byte chunks.
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
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
    Ok(Limited::Complete(buf.freeze()))
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
}
