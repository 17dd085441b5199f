//! Cache keys: what identifies a reusable response, as a keyed hash.
//!
//! A key covers namespace + method + normalized path + sorted query parameters + the
//! selected request headers + the canonical JSON body (RFC 8785, JSON Canonicalization
//! Scheme). It is a keyed BLAKE3 hash under a secret: birth dates and similar inputs have
//! little entropy, so an unkeyed hash could be reversed by guessing. No raw request data
//! is kept in a key.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, Method};

/// A cache key: 32 bytes of keyed BLAKE3 over the request's identifying parts.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Lower-case hex of the whole key (64 characters).
    pub fn to_hex(&self) -> String {
        use fmt::Write;
        let mut s = String::with_capacity(64);
        for b in self.0 {
            let _ = write!(s, "{b:02x}");
        }
        s
    }

    /// The first 12 hex characters, enough to tell keys apart in logs.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }

    /// A bucket from 0 to 99 derived from the key, for `rollout_percent`.
    pub fn rollout_bucket(&self) -> u8 {
        (u16::from_be_bytes([self.0[0], self.0[1]]) % 100) as u8
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.short())
    }
}

/// Why a request body could not enter a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKeyError {
    /// The body is not valid JSON.
    MalformedJson,
}

/// Builds [`CacheKey`]s under one secret and namespace.
#[derive(Clone)]
pub struct KeyBuilder {
    secret: [u8; 32],
    namespace: String,
}

/// The parts of a request that a route lets into the key.
pub struct KeyParts<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The request path, without the query.
    pub path: &'a str,
    /// The raw query string, if any.
    pub query: Option<&'a str>,
    /// Query parameter names to keep; `None` keeps all.
    pub query_filter: Option<&'a [String]>,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// Lower-case names of headers that enter the key.
    pub header_names: &'a [String],
    /// The canonical JSON body, when the route keys on it.
    pub canonical_body: Option<&'a [u8]>,
}

impl KeyBuilder {
    /// A builder whose hash key is derived from `secret` (any length) with BLAKE3's key
    /// derivation, so that the same secret gives the same keys on every replica.
    pub fn new(secret: &[u8], namespace: &str) -> Self {
        KeyBuilder {
            secret: blake3::derive_key("cachegate 2026-11 cache key v1", secret),
            namespace: namespace.to_string(),
        }
    }

    /// Hashes the parts into a key. Each part is length-prefixed, so no two different
    /// requests can be spelled into the same input.
    pub fn build(&self, parts: &KeyParts<'_>) -> CacheKey {
        // Serialize into one buffer and hash once: much cheaper than many small updates.
        let body_len = parts.canonical_body.map_or(0, <[u8]>::len);
        let mut buf = Vec::with_capacity(256 + body_len);
        let mut field = |bytes: &[u8]| {
            buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            buf.extend_from_slice(bytes);
        };
        field(self.namespace.as_bytes());
        field(parts.method.as_str().as_bytes());
        field(normalize_percent(parts.path).as_bytes());
        let mut pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = parts
            .query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (normalize_percent(k), normalize_percent(v))
            })
            .filter(|(k, _)| {
                parts
                    .query_filter
                    .is_none_or(|keep| keep.iter().any(|n| n == k))
            })
            .collect();
        pairs.sort_unstable();
        field(&(pairs.len() as u32).to_le_bytes());
        for (k, v) in &pairs {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        let mut names: Vec<&String> = parts.header_names.iter().collect();
        names.sort_unstable();
        for name in names {
            field(name.as_bytes());
            let values = parts.headers.get_all(name.as_str());
            field(&(values.iter().count() as u32).to_le_bytes());
            for v in values {
                field(v.as_bytes());
            }
        }
        match parts.canonical_body {
            Some(body) => {
                field(b"body");
                field(body);
            }
            None => field(b"nobody"),
        }
        CacheKey(*blake3::keyed_hash(&self.secret, &buf).as_bytes())
    }
}

/// Canonicalizes a JSON body by RFC 8785 (JCS): object members sorted, no insignificant
/// whitespace, numbers spelled as ECMAScript does.
///
/// Errors: [`BodyKeyError::MalformedJson`] when `body` is not JSON.
///
/// ```
/// use cachegate::key::canonical_json;
/// let a = canonical_json(br#"{"lat": 51.50, "name": "Ada"}"#).unwrap();
/// let b = canonical_json(br#"{"name":"Ada","lat":5.15e1}"#).unwrap();
/// assert_eq!(a, b);
/// assert_eq!(a, br#"{"lat":51.5,"name":"Ada"}"#);
/// ```
pub fn canonical_json(body: &[u8]) -> Result<Vec<u8>, BodyKeyError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| BodyKeyError::MalformedJson)?;
    serde_jcs::to_vec(&value).map_err(|_| BodyKeyError::MalformedJson)
}

/// RFC 3986 §6.2.2 normalization: percent-encoded unreserved characters are decoded and
/// the hex digits of the remaining escapes upper-cased.
fn normalize_percent(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = &s[i + 1..i + 3];
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    out.push(b as char);
                } else {
                    out.push('%');
                    out.push_str(&hex.to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: &KeyBuilder, path: &str, query: Option<&str>, body: Option<&[u8]>) -> CacheKey {
        b.build(&KeyParts {
            method: &Method::POST,
            path,
            query,
            query_filter: None,
            headers: &HeaderMap::new(),
            header_names: &[],
            canonical_body: body,
        })
    }

    #[test]
    fn json_order_and_spelling_do_not_matter() {
        let a = canonical_json(br#"{"b": 1.0, "a": [1, 2e0], "c": "x"}"#).unwrap();
        let b = canonical_json(br#"{"a":[1,2],"c":"x","b":1}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            canonical_json(b"{bad").unwrap_err(),
            BodyKeyError::MalformedJson
        );
    }

    #[test]
    fn query_order_and_percent_case_do_not_matter() {
        let b = KeyBuilder::new(b"s", "ns");
        assert_eq!(
            key(&b, "/a%2f", Some("x=1&y=2"), None),
            key(&b, "/a%2F", Some("y=2&x=1"), None)
        );
        assert_eq!(key(&b, "/%61", None, None), key(&b, "/a", None, None));
        assert_ne!(
            key(&b, "/a", Some("x=1"), None),
            key(&b, "/a", Some("x=2"), None)
        );
        assert_ne!(key(&b, "/a", None, Some(b"{}")), key(&b, "/a", None, None));
    }

    #[test]
    fn secret_and_namespace_change_the_key() {
        let k1 = key(&KeyBuilder::new(b"s1", "ns"), "/a", None, None);
        let k2 = key(&KeyBuilder::new(b"s2", "ns"), "/a", None, None);
        let k3 = key(&KeyBuilder::new(b"s1", "other"), "/a", None, None);
        assert_ne!(k1, k2);
        assert_ne!(k1, k3);
    }

    #[test]
    fn truncated_escape_is_kept() {
        assert_eq!(normalize_percent("a%2"), "a%2");
        assert_eq!(normalize_percent("%"), "%");
    }
}
