//! Cache keys: what identifies a reusable response, as a keyed hash.
//!
//! A key covers namespace + method + normalized path (+ the client's `Host` on
//! `preserve_host` routes) + query parameters sorted by name + the selected request
//! headers + the canonical JSON body (RFC 8785, JSON Canonicalization Scheme, over I-JSON
//! bodies only: [`canonical_json`]). It is a keyed BLAKE3 hash under a secret: birth dates and similar inputs have
//! little entropy, so an unkeyed hash could be reversed by guessing. No raw request data
//! is kept in a key.

use http::{HeaderMap, Method};

mod json;

pub use self::json::{BodyKeyError, CanonicalBodies, canonical_json, is_json_media_type};
use crate::uri::{QueryParam, fold, folded_name, percent_decoded};
pub use cachegate_core::key::{CacheKey, KeyBuilder};

/// The parts of a request that a route lets into the key.
pub struct KeyParts<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The normalized request path ([`crate::uri::normalize_path`]), without the query.
    pub path: &'a str,
    /// The `Host` the upstream gets, when the route forwards the client's (`preserve_host`).
    pub host: Option<&'a str>,
    /// The origin a trusted proxy says the client asked for (its `X-Forwarded-Host`,
    /// `-Proto`, `-Port`, `-Prefix` and `Forwarded` `host`/`proto`, see
    /// [`crate::proxy::headers::forwarded_origin`]): forwarded to the upstream, so keyed.
    pub forwarded: Option<&'a [u8]>,
    /// The parsed query parameters ([`crate::uri::parse_query`]), in the client's order.
    pub query: &'a [QueryParam<'a>],
    /// Query parameter names to keep; `None` keeps all.
    pub query_filter: Option<&'a [String]>,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// Lower-case names of headers that enter the key.
    pub header_names: &'a [String],
    /// The canonical JSON body, when the route keys on it.
    pub canonical_body: Option<&'a [u8]>,
    /// The request's `Content-Type`, keyed with the body: an upstream may read a body by
    /// its charset or media type.
    pub content_type: Option<&'a [u8]>,
}

/// The key of a request: its parts hashed under `keys` (namespace first). Each part is
/// length-prefixed, so no two different requests can be spelled into the same input.
///
/// Query parameters are sorted by [`folded_name`] only: the order of repeated values of one
/// name is kept (many frameworks read `?id=1&id=2` as a list), and so is the order of
/// names some upstream may read as one (`?B=1&b=2`, `?b.x=1&b_x=2`: one of them wins, or
/// both make a list); a pair without `=` is told apart from one with an empty value.
pub fn request_key(keys: &KeyBuilder, parts: &KeyParts<'_>) -> CacheKey {
    // Serialize into one buffer and hash once: much cheaper than many small updates.
    let body_len = parts.canonical_body.map_or(0, <[u8]>::len);
    let mut fields = keys.fields(256 + body_len);
    let mut field = |bytes: &[u8]| fields.push(bytes);
    field(parts.method.as_str().as_bytes());
    field(parts.path.as_bytes());
    match parts.host {
        Some(host) => {
            field(b"host");
            field(host.to_ascii_lowercase().as_bytes());
        }
        None => field(b"nohost"),
    }
    if let Some(forwarded) = parts.forwarded {
        field(b"forwarded");
        field(forwarded);
    }
    let mut params: Vec<&QueryParam<'_>> = parts
        .query
        .iter()
        .filter(|p| in_filter(parts.query_filter, &p.name))
        .collect();
    // A stable sort: values of one (folded) name keep their order.
    params.sort_by(|a, b| folded_name(&a.name).cmp(folded_name(&b.name)));
    field(&(params.len() as u32).to_le_bytes());
    for p in &params {
        field(p.name.as_bytes());
        match &p.value {
            Some(v) => {
                field(b"=");
                field(v.as_bytes());
            }
            None => field(b""),
        }
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
            field(parts.content_type.unwrap_or(b""));
            field(body);
        }
        None => field(b"nobody"),
    }
    keys.finish(&fields)
}

/// Whether a query parameter named `name` passes a route's `key_query` filter (`None`:
/// every parameter does).
pub fn in_filter(filter: Option<&[String]>, name: &str) -> bool {
    filter.is_none_or(|keep| keep.iter().any(|n| n == name))
}

/// Whether forwarding the parameters outside `filter` (a route's `key_query`, with
/// `forward_unkeyed_query`) could let one of them reach the upstream as a keyed parameter,
/// which would store an answer to values the key does not hold. True when a pair outside
/// the filter, with its escapes decoded (some upstreams decode before they split) and split
/// on `&` and `;` (a separator to upstreams following the old HTML form rules, e.g.
/// Python's `urllib.parse` before 3.9.2), holds a name that folds ([`fold`]) to that of a
/// keyed parameter: `B`, `b[]`, `[b]`, `b.`, `+b`, `x;b=`, `x%26b%3D` for `b`. An escaped
/// `=` alone (base64 padding) or an encoded URL without such a name is no separator.
///
/// Such a request is ambiguous, and passes through uncached.
///
/// ```
/// use cachegate::key::unkeyed_may_read_as_keyed;
/// use cachegate::uri::parse_query;
/// let keyed = ["b".to_string()];
/// let ambiguous = |q: &str| unkeyed_may_read_as_keyed(&parse_query(q), &keyed);
/// assert!(!ambiguous("b=good&utm_source=mail&sig=abc%3D%3D"));
/// assert!(!ambiguous("b=good&ref=https%3A%2F%2Fx.example%2F%3Fa%3D1"));
/// assert!(ambiguous("b=good&utm=x;b=evil"));
/// assert!(ambiguous("b=good&utm=x%26b%3Devil"));
/// assert!(ambiguous("b=good&B=evil"));
/// assert!(ambiguous("b=good&%5Bb%5D=evil"));
/// assert!(!ambiguous("b=good;b=evil")); // keyed: its whole value is in the key
/// ```
pub fn unkeyed_may_read_as_keyed(query: &[QueryParam<'_>], filter: &[String]) -> bool {
    let keyed = |name: &[u8]| {
        filter
            .iter()
            .any(|k| folded_name(k).eq(fold(name.iter().copied())))
    };
    query
        .iter()
        .filter(|p| !in_filter(Some(filter), &p.name))
        .any(|p| {
            let decoded: Vec<u8> = percent_decoded(p.raw.as_bytes()).collect();
            decoded
                .split(|&c| c == b'&' || c == b';')
                .any(|pair| keyed(pair.split(|&c| c == b'=').next().unwrap_or(pair)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: &KeyBuilder, path: &str, query: Option<&str>, body: Option<&[u8]>) -> CacheKey {
        let path = crate::uri::normalize_path(path).path;
        let query = crate::uri::parse_query(query.unwrap_or(""));
        request_key(
            b,
            &KeyParts {
                method: &Method::POST,
                path: &path,
                host: None,
                forwarded: None,
                query: &query,
                query_filter: None,
                headers: &HeaderMap::new(),
                header_names: &[],
                canonical_body: body,
                content_type: None,
            },
        )
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
    fn unkeyed_names_that_case_fold_to_keyed_ones_are_ambiguous() {
        let keyed = ["id".to_string(), "s".to_string(), "k".to_string()];
        for q in [
            "id=1&%C4%B1d=2",
            "id=1&%C4%B0D=2",
            "s=1&%C5%BF=2",
            "k=1&%E2%84%AA=2",
        ] {
            let query = crate::uri::parse_query(q);
            assert!(unkeyed_may_read_as_keyed(&query, &keyed), "{q}");
        }
        let query = crate::uri::parse_query("id=1&%E2%84%AB=2&%C4%B2=3");
        assert!(!unkeyed_may_read_as_keyed(&query, &keyed));
    }

    #[test]
    fn names_an_upstream_may_read_as_one_keep_their_order() {
        let b = KeyBuilder::new(b"k", "ns");
        for (x, y) in [
            ("B=1&b=2", "b=2&B=1"),
            ("b.x=1&b_x=2", "b_x=2&b.x=1"),
            ("b%5B%5D=1&b=2", "b=2&b%5B%5D=1"),
            ("%5Bb%5D=1&b=2", "b=2&%5Bb%5D=1"),
            ("]b=1&b=2", "b=2&]b=1"),
        ] {
            assert_ne!(
                key(&b, "/p", Some(x), None),
                key(&b, "/p", Some(y), None),
                "{x}"
            );
        }
        // Names that fold apart are still sorted: the client's order does not matter.
        assert_eq!(
            key(&b, "/p", Some("Z=1&a=2"), None),
            key(&b, "/p", Some("a=2&Z=1"), None)
        );
    }

    #[test]
    fn repeated_parameters_keep_their_order_and_bare_names_differ() {
        let b = KeyBuilder::new(b"s", "ns");
        let k = |q| key(&b, "/a", Some(q), None);
        assert_ne!(k("id=1&id=2"), k("id=2&id=1"));
        assert_eq!(k("id=1&x=0&id=2"), k("x=0&id=1&id=2"));
        assert_ne!(k("debug"), k("debug="));
        assert_ne!(k("a=b&c"), k("a=b%26c"));
    }
}
