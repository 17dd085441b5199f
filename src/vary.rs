//! `Vary` (RFC 9111 §4.1): a response that varies on request headers outside the cache key
//! is stored as one variant per combination of those headers' values.
//!
//! The primary key (the request's cache key) holds a *marker* naming the headers the
//! responses vary on ([`crate::entry::CachedResponse::vary_marker`]); each variant is
//! stored under a secondary key ([`variant_key`]) built from the primary key, the marker's
//! generation (when it was stored) and the request's values of those headers. Values are
//! taken as they are (each field line trimmed, lines joined with `,`; an absent header is
//! told apart from an empty one): two requests share a variant only when their values are
//! byte for byte the same, so normalization never merges different values. A new marker
//! (the response's `Vary` changed, or the marker was purged or expired) starts a new
//! generation, so variants stored under an older one are never found again.

use http::HeaderMap;

use cachegate_core::key::{CacheKey, KeyBuilder};

/// The second field of a variant key: NUL is not a token character, so it never equals a
/// method (request keys) or the library's string-key marker.
const VARIANT_DOMAIN: &[u8] = b"\0variant";

/// The header names in a response's `Vary` (lower-cased, sorted, without duplicates) that
/// are not already in the key (`key_headers`): the headers its variants differ by. Empty
/// when it does not vary beyond the key. (`Vary: *` is refused before a response is
/// stored.)
pub fn variant_names(response: &HeaderMap, key_headers: &[String]) -> Vec<String> {
    let mut names: Vec<String> = response
        .get_all(http::header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty() && n != "*" && !key_headers.contains(n))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The generation no `Vary` marker has (markers take the time they were made): the
/// flights of requests that select the same variant of an answer that was not stored are
/// keyed under it ([`variant_key`]).
pub const UNSTORED_GENERATION: u64 = u64::MAX;

/// The key of the variant of `primary` that a request with `headers` selects, under the
/// marker of generation `generation_ms` naming `names`.
pub fn variant_key(
    keys: &KeyBuilder,
    primary: &CacheKey,
    generation_ms: u64,
    names: &[String],
    headers: &HeaderMap,
) -> CacheKey {
    let mut fields = keys.fields(128);
    fields.push(VARIANT_DOMAIN);
    fields.push(&primary.0);
    fields.push(&generation_ms.to_be_bytes());
    for name in names {
        fields.push(name.as_bytes());
        let mut lines = headers.get_all(name.as_str()).iter().peekable();
        if lines.peek().is_none() {
            fields.push(b"\0absent");
            continue;
        }
        let mut value = Vec::new();
        for (i, line) in lines.enumerate() {
            if i > 0 {
                value.push(b',');
            }
            value.extend_from_slice(line.as_bytes().trim_ascii());
        }
        fields.push(&value);
    }
    keys.finish(&fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::header_map;

    #[test]
    fn names_beyond_the_key() {
        let h = header_map(&[
            ("vary", "Accept-Language, accept-encoding"),
            ("vary", "x-a,accept-language"),
        ]);
        assert_eq!(
            variant_names(&h, &["accept-encoding".into()]),
            ["accept-language", "x-a"]
        );
        assert!(variant_names(&header_map(&[]), &[]).is_empty());
    }

    #[test]
    fn values_are_never_merged() {
        let keys = KeyBuilder::new(b"s", "ns");
        let primary = CacheKey([1; 32]);
        let names = vec!["accept-language".to_string(), "x-a".to_string()];
        let key = |pairs: &[(&'static str, &'static str)]| {
            variant_key(&keys, &primary, 7, &names, &header_map(pairs))
        };
        let de = key(&[("accept-language", "de")]);
        assert_eq!(de, key(&[("accept-language", " de ")]));
        for other in [
            key(&[("accept-language", "DE")]),
            key(&[("accept-language", "de"), ("x-a", "")]),
            key(&[("accept-language", "de,fr")]),
            key(&[]),
            key(&[("x-a", "de")]),
        ] {
            assert_ne!(de, other);
        }
        // Absent and empty differ; two lines are one joined value.
        assert_ne!(key(&[]), key(&[("accept-language", "")]));
        assert_eq!(
            key(&[("accept-language", "de"), ("accept-language", "fr")]),
            key(&[("accept-language", "de,fr")])
        );
        // Another generation or primary key: another variant.
        let h = header_map(&[("accept-language", "de")]);
        assert_ne!(de, variant_key(&keys, &primary, 8, &names, &h));
        assert_ne!(de, variant_key(&keys, &CacheKey([2; 32]), 7, &names, &h));
    }
}
