//! Client conditional requests (`If-None-Match`, `If-Modified-Since`), answered by the cache.
//!
//! A request that may use the cache is sent to the upstream without its conditional
//! headers, so that the upstream returns a full response that can be stored and shared
//! (never a `304` that another client would receive). The client's own conditions are then
//! evaluated against the full response, as RFC 9110 §13.2.2 orders them, and a `304 Not
//! Modified` is sent when they say so.

use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::policy::http_date;

/// The conditional request headers (RFC 9110 §13.1), all taken out of a request the cache
/// answers.
const CONDITIONAL: [HeaderName; 5] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

/// Whether a request carries a precondition (any of the conditional request headers,
/// RFC 9110 §13.1).
pub fn is_conditional(headers: &HeaderMap) -> bool {
    headers.keys().any(|name| CONDITIONAL.contains(name))
}

/// The validators a client sent, taken out of its request.
#[derive(Debug, Default, Clone)]
pub struct Conditions {
    if_none_match: Option<HeaderValue>,
    if_modified_since: Option<SystemTime>,
}

impl Conditions {
    /// Removes every conditional header from `headers` (`If-None-Match`,
    /// `If-Modified-Since`, `If-Match`, `If-Unmodified-Since`, `If-Range`) and keeps the two
    /// that a cache answers for GET/HEAD.
    pub fn take(headers: &mut HeaderMap) -> Self {
        // Most requests hold none: one pass over the names is cheaper than five removals.
        if !is_conditional(headers) {
            return Conditions::default();
        }
        let if_none_match = headers.remove(header::IF_NONE_MATCH);
        let if_modified_since = http_date(headers, header::IF_MODIFIED_SINCE);
        headers.remove(header::IF_MODIFIED_SINCE);
        headers.remove(header::IF_MATCH);
        headers.remove(header::IF_UNMODIFIED_SINCE);
        headers.remove(header::IF_RANGE);
        Conditions {
            if_none_match,
            if_modified_since,
        }
    }

    /// Whether the client already has the response described by `headers` (status 200), so
    /// that `304 Not Modified` is the answer. `If-None-Match` takes precedence over
    /// `If-Modified-Since` (RFC 9110 §13.2.2); tags compare weakly (§8.8.3.2).
    pub fn not_modified(&self, headers: &HeaderMap) -> bool {
        if let Some(inm) = &self.if_none_match {
            let Ok(inm) = inm.to_str() else { return false };
            let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
                return false;
            };
            return inm.trim() == "*"
                || inm
                    .split(',')
                    .any(|tag| weak(tag.trim()) == weak(etag.trim()));
        }
        if let Some(since) = self.if_modified_since {
            return http_date(headers, header::LAST_MODIFIED).is_some_and(|lm| lm <= since);
        }
        false
    }
}

fn weak(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// The headers of a `304 Not Modified` made from a full response's headers: the same
/// metadata without the representation's length (RFC 9110 §15.4.5).
/// Adds the validators of a stored response (`headers`) to a request to the upstream, to
/// revalidate it (RFC 9111 §4.3.1): `If-None-Match` with its `ETag`, `If-Modified-Since`
/// with its `Last-Modified`.
pub fn add_validators(request: &mut HeaderMap, stored: &HeaderMap) {
    if let Some(etag) = stored.get(header::ETAG) {
        request.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = stored.get(header::LAST_MODIFIED) {
        request.insert(header::IF_MODIFIED_SINCE, modified.clone());
    }
}

/// Whether a `304` (`not_modified`) is about the stored response (`stored`): its `ETag`,
/// when it has one, is the stored one (RFC 9111 §4.3.4 selects stored responses by their
/// validators). A 304 without an `ETag` is taken to be about the stored response (it
/// answered the validators the cache sent).
pub fn same_version(stored: &HeaderMap, not_modified: &HeaderMap) -> bool {
    match not_modified.get(header::ETAG) {
        None => true,
        Some(etag) => stored.get(header::ETAG) == Some(etag),
    }
}

/// Whether a `200` answer to a `HEAD` request (`head`) shows that a stored `GET` response
/// of the same target (`stored`) is of another version (RFC 9111 §4.3.5): an `ETag` both
/// have that differs by the weak comparison (RFC 9110 §8.8.3.2: `W/"x"` and `"x"` agree,
/// as a body compressed on the fly may be marked weak), or a `Last-Modified` both have
/// that differs. Without a validator in common there is no evidence, and `Content-Length`
/// is none (it differs between codings and with dynamic bodies).
pub fn head_contradicts(stored: &HeaderMap, head: &HeaderMap) -> bool {
    let opaque = |v: &HeaderValue| {
        let b = v.as_bytes().trim_ascii();
        b.strip_prefix(b"W/").unwrap_or(b).to_vec()
    };
    let etags = (stored.get(header::ETAG), head.get(header::ETAG));
    let modified = (
        stored.get(header::LAST_MODIFIED),
        head.get(header::LAST_MODIFIED),
    );
    matches!(etags, (Some(a), Some(b)) if opaque(a) != opaque(b))
        || matches!(modified, (Some(a), Some(b)) if a != b)
}

/// Updates a stored response's headers with those of a `304` that revalidated it
/// (RFC 9111 §4.3.4, §3.2): each field the 304 carries replaces the stored one, except the
/// framing and content-coding fields (`Content-Length`, `Content-Encoding`,
/// `Transfer-Encoding`, `Content-Range`), which describe the stored body.
pub fn update_stored_headers(stored: &mut HeaderMap, not_modified: &HeaderMap) {
    const KEPT: [header::HeaderName; 4] = [
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::TRANSFER_ENCODING,
        header::CONTENT_RANGE,
    ];
    for name in not_modified.keys() {
        if KEPT.contains(name) {
            continue;
        }
        stored.remove(name);
        for value in not_modified.get_all(name) {
            stored.append(name.clone(), value.clone());
        }
    }
}

/// The headers of a `304 Not Modified` answered from a full stored response (no length).
pub fn not_modified_headers(mut full: HeaderMap) -> HeaderMap {
    full.remove(header::CONTENT_LENGTH);
    full
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::header_map as with;

    #[test]
    fn takes_all_conditionals() {
        let mut req = with(&[
            ("if-none-match", "\"a\""),
            ("if-match", "\"b\""),
            ("if-range", "\"c\""),
            ("accept", "*/*"),
        ]);
        let c = Conditions::take(&mut req);
        assert_eq!(req.len(), 1);
        assert!(c.not_modified(&with(&[("etag", "W/\"a\"")])));
        assert!(!c.not_modified(&with(&[("etag", "\"z\"")])));
        assert!(!c.not_modified(&with(&[])));
    }

    #[test]
    fn if_modified_since() {
        let mut req = with(&[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")]);
        let c = Conditions::take(&mut req);
        assert!(c.not_modified(&with(&[("last-modified", "Sun, 06 Nov 1994 08:00:00 GMT")])));
        assert!(!c.not_modified(&with(&[("last-modified", "Mon, 07 Nov 1994 08:00:00 GMT")])));
        assert!(!Conditions::default().not_modified(&with(&[("etag", "\"a\"")])));
    }
}
