//! One spelling per request target: path normalization and query parsing.
//!
//! The normalized path is computed once per request and used for route matching, for the
//! cache key and for the forwarded request, so that no two of them can disagree about what
//! a request asks for (RFC 3986 §6.2.2). Query parameters are parsed once into
//! [`QueryParam`]s, which keep their raw spelling for forwarding and a normalized spelling
//! for the key.
//!
//! Every function here is total: any input gives an answer, none panics.

use std::borrow::Cow;

/// A path normalized by [`normalize_path`], and whether its meaning depends on how the
/// upstream decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    /// The normalized path: starts with `/`, unreserved escapes decoded, other escapes with
    /// upper-case hex, no empty or dot segments.
    pub path: String,
    /// The path holds an encoded `/`, `\`, `;` or NUL, or a raw `\` or `;` (path parameters,
    /// which Tomcat, Jetty and Spring strip before routing): upstreams disagree on what such
    /// a path names, so a request for it is not cached.
    pub ambiguous: bool,
}

/// Normalizes a request path (RFC 3986 §6.2.2 syntax-based normalization):
///
/// 1. percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, the
///    hex digits of other escapes upper-cased, and a `%` that starts no valid escape is
///    written `%25`;
/// 2. runs of `/` become one `/`;
/// 3. dot segments are removed (RFC 3986 §5.2.4); `..` above the root stays at the root.
///
/// ```
/// use cachegate::uri::normalize_path;
/// assert_eq!(normalize_path("/api/%61ccount//me").path, "/api/account/me");
/// assert_eq!(normalize_path("/kpi/../api/./account/me").path, "/api/account/me");
/// assert_eq!(normalize_path("/a%2fb").path, "/a%2Fb");
/// assert!(normalize_path("/a%2fb").ambiguous);
/// ```
pub fn normalize_path(raw: &str) -> NormalPath {
    if is_normal(raw) {
        // Already in the normal form (the common case): nothing to decode or remove.
        return NormalPath {
            path: raw.to_owned(),
            ambiguous: false,
        };
    }
    normalize_slowly(raw)
}

/// A path pattern (`*` matching any run of characters) in the spelling [`normalize_path`]
/// gives request paths, so that it matches however it was written: bytes a path may not
/// hold as they are (beyond ASCII, spaces, controls, `"`, `<`, `>`, `^`, `{`, `|`, `}`,
/// the backquote) are percent-encoded as UTF-8, escapes normalized, runs of `/` made one.
/// Leading `*`s stay as they are (`*.json` matches any path ending so). Used for route
/// patterns and purges by path, which are compared with normalized paths.
///
/// Errors: a pattern with a `.` or `..` segment (no normalized path has one, and resolving
/// it could swallow a `*`), saying so.
///
/// ```
/// use cachegate::uri::normalize_pattern;
/// assert_eq!(normalize_pattern("/api/caf%c3%a9/*").unwrap(), "/api/caf%C3%A9/*");
/// assert_eq!(normalize_pattern("/api/café/*").unwrap(), "/api/caf%C3%A9/*");
/// assert_eq!(normalize_pattern("/%7Eu//a/b*").unwrap(), "/~u/a/b*");
/// assert_eq!(normalize_pattern("*/kpi/*").unwrap(), "*/kpi/*");
/// assert!(normalize_pattern("/a/*/../b").is_err());
/// ```
pub fn normalize_pattern(raw: &str) -> Result<String, String> {
    let encoded = percent_encoded(raw, is_path_byte);
    let rest = encoded.trim_start_matches('*');
    let mut pattern = encoded[..encoded.len() - rest.len()].to_string();
    let rest = normalize_percent(rest);
    if rest
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err("holds a `.` or `..` segment, which no normalized path has".to_string());
    }
    let mut slash = false;
    for c in rest.chars() {
        if !(c == '/' && slash) {
            pattern.push(c);
        }
        slash = c == '/';
    }
    Ok(pattern)
}

/// `raw` with every byte `keep` refuses written as a `%XX` escape (RFC 3986 §2.1).
///
/// ```
/// use cachegate::uri::{percent_encoded, unreserved};
/// assert_eq!(percent_encoded("a b?c#d/é", unreserved), "a%20b%3Fc%23d%2F%C3%A9");
/// ```
pub fn percent_encoded(raw: &str, keep: fn(u8) -> bool) -> String {
    let mut encoded = String::with_capacity(raw.len());
    for &b in raw.as_bytes() {
        if keep(b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    encoded
}

/// Whether `b` may stand as it is in a request path (RFC 3986 §3.3 `pchar`, `/`, `%`),
/// or in a request target as hyper accepts it (`\`, which [`normalize_path`] judges).
fn is_path_byte(b: u8) -> bool {
    unreserved(b) || sub_delim(b) || matches!(b, b':' | b'@' | b'/' | b'%' | b'\\')
}

/// Whether `value` is a `Host` header value RFC 9112 §3.2 allows: empty, or
/// `uri-host [ ":" port ]` (RFC 3986 §3.2.2): an IP literal in brackets, or a name of
/// unreserved characters, percent-escapes and sub-delimiters (an IPv4 address is one);
/// no user information (`@`), path, space or control.
///
/// ```
/// use cachegate::uri::is_host_value;
/// assert!(is_host_value(b"api.example:8080") && is_host_value(b"[::1]:80") && is_host_value(b""));
/// assert!(!is_host_value(b"user@victim.example") && !is_host_value(b"a b") && !is_host_value(b"a:b"));
/// ```
pub fn is_host_value(value: &[u8]) -> bool {
    let (host, port): (&[u8], &[u8]) = if value.first() == Some(&b'[') {
        let Some(end) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &value[1..end];
        // IPv6 or IPvFuture, with an RFC 6874 zone (`%25eth0`).
        if literal.is_empty()
            || !literal.iter().all(|&b| {
                b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'%' | b'-' | b'_' | b'~')
            })
        {
            return false;
        }
        match &value[end + 1..] {
            [] => (&[], &[]),
            [b':', port @ ..] => (&[], port),
            _ => return false,
        }
    } else {
        match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon + 1..]),
            None => (value, &[]),
        }
    };
    port.iter().all(u8::is_ascii_digit)
        && host
            .iter()
            .all(|&b| unreserved(b) || sub_delim(b) || b == b'%')
}

/// Whether `raw` is its own normal form: starts with `/`, holds no `%`, `\` or `;`, no
/// empty segment but a trailing one, and no dot segment.
/// One pass over the bytes (it runs on every request).
fn is_normal(raw: &str) -> bool {
    let Some((b'/', rest)) = raw.as_bytes().split_first() else {
        return false;
    };
    // The current segment's length, and how many of its bytes are dots.
    let (mut len, mut dots) = (0usize, 0usize);
    let dot_segment = |len: usize, dots: usize| len > 0 && len <= 2 && dots == len;
    for &b in rest {
        match b {
            b'%' | b'\\' | b';' => return false,
            b'/' => {
                if len == 0 || dot_segment(len, dots) {
                    return false;
                }
                (len, dots) = (0, 0);
            }
            b'.' => (len, dots) = (len + 1, dots + 1),
            _ => len += 1,
        }
    }
    !dot_segment(len, dots)
}

/// [`normalize_path`] for a path that is not already normal.
fn normalize_slowly(raw: &str) -> NormalPath {
    let decoded = normalize_percent(raw);
    let ambiguous = has_invalid_escape(raw)
        || decoded.contains("%2F")
        || decoded.contains("%5C")
        || decoded.contains("%00")
        || decoded.contains("%3B")
        || decoded.contains('\\')
        || decoded.contains(';');
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/') {
        trailing_slash = false;
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        path.push('/');
        path.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        path.push('/');
    }
    NormalPath { path, ambiguous }
}

/// One `name[=value]` pair of a query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryParam<'a> {
    /// The pair as the client spelled it, for forwarding.
    pub raw: &'a str,
    /// The name, percent-normalized as in [`normalize_path`].
    pub name: Cow<'a, str>,
    /// The value, percent-normalized; `None` when the pair has no `=` (`?debug`), which is
    /// not the same as an empty value (`?debug=`).
    pub value: Option<Cow<'a, str>>,
}

/// A relative reference (RFC 3986 §4.2: no scheme, no authority, e.g. `item-2?x=1`,
/// `../b`, `?page=2`) resolved against a request target's `base_path` and `base_query`
/// (§5.2.2, with the merge of §5.2.3; dot segments are left to [`normalize_path`]): the
/// path and query it names. `None` for a reference that is not relative (a scheme, `//`)
/// or starts with `/` (already a path). A fragment is dropped.
///
/// ```
/// use cachegate::uri::resolve_relative;
/// assert_eq!(resolve_relative("/items/1", Some("a=1"), "2?x=1").as_deref(), Some("/items/2?x=1"));
/// assert_eq!(resolve_relative("/items/1", Some("a=1"), "").as_deref(), Some("/items/1?a=1"));
/// assert_eq!(resolve_relative("/items/1", None, "?page=2").as_deref(), Some("/items/1?page=2"));
/// assert_eq!(resolve_relative("/items/1", None, "../b#top").as_deref(), Some("/items/../b"));
/// assert_eq!(resolve_relative("/items/1", None, "https://x/"), None);
/// ```
pub fn resolve_relative(
    base_path: &str,
    base_query: Option<&str>,
    reference: &str,
) -> Option<String> {
    let reference = reference.split('#').next().unwrap_or("");
    let scheme = reference
        .split_once(':')
        .is_some_and(|(s, _)| !s.contains(['/', '?']));
    if scheme || reference.starts_with('/') {
        return None;
    }
    let (path, query) = match reference.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (reference, None),
    };
    let mut out = if path.is_empty() {
        base_path.to_string()
    } else {
        let directory = base_path.rfind('/').map_or("/", |i| &base_path[..=i]);
        format!("{directory}{path}")
    };
    match (path.is_empty(), query, base_query) {
        (_, Some(query), _) | (true, None, Some(query)) => {
            out.push('?');
            out.push_str(query);
        }
        _ => {}
    }
    Some(out)
}

/// Splits a query string on `&` into its non-empty pairs, in the client's order.
///
/// ```
/// use cachegate::uri::parse_query;
/// let q = parse_query("b=2&a&a=&%61=x");
/// assert_eq!(q.len(), 4);
/// assert_eq!(q[1].value, None);
/// assert_eq!(q[2].value.as_deref(), Some(""));
/// assert_eq!(q[3].name, "a");
/// ```
pub fn parse_query(query: &str) -> Vec<QueryParam<'_>> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|raw| {
            let (name, value) = match raw.split_once('=') {
                Some((n, v)) => (n, Some(normalize_percent(v))),
                None => (raw, None),
            };
            QueryParam {
                raw,
                name: normalize_percent(name),
                value,
            }
        })
        .collect()
}

/// A query parameter name as the loosest common upstream reads it: escapes decoded, then
/// [`fold`]ed. Two names that fold equal may name one parameter to some upstream, so
/// [`crate::key::request_key`] keeps their order and a forwarded unkeyed parameter may not
/// fold equal to a keyed one.
///
/// ```
/// use cachegate::uri::folded_name;
/// let fold = |n: &str| folded_name(n).collect::<Vec<u8>>();
/// assert_eq!(fold("User.Id"), fold("user_id"));
/// assert_eq!(fold("%20b%5B%5D"), fold("b"));
/// assert_eq!(fold("%5Bb%5D"), fold("b"));
/// assert_eq!(fold("%C4%B1d"), fold("ID")); // dotless ı
/// assert_eq!(fold("%E2%84%AAey"), fold("key")); // Kelvin sign
/// assert_eq!(fold("%E2%84%AB"), fold("%E2%84%AB")); // Angstrom sign: kept as it is
/// assert_ne!(fold("%E2%84%AB"), fold("%E2%AB"));
/// assert_ne!(fold("b"), fold("bx"));
/// ```
pub fn folded_name(name: &str) -> impl Iterator<Item = u8> + '_ {
    fold(percent_decoded(name.as_bytes()))
}

/// Folds a decoded parameter name: leading punctuation, spaces and brackets dropped (Rack
/// reads `[b]` and `]b` as `b`, `qs` reads `[b]` as `b`, PHP drops leading spaces), cut at
/// the next `[` or `]` (PHP and Rack read `b[]` and `b[x]` as `b`) or NUL, and only ASCII
/// letters (lower-cased), digits and non-ASCII bytes kept (ASP.NET compares names
/// case-insensitively; PHP reads `b.x`, `b x` and `b+x` as `b_x`). The non-ASCII letters
/// whose simple case mapping is an ASCII letter (`ı` and `İ`, `ſ`, the Kelvin sign) count
/// as that letter (.NET's `OrdinalIgnoreCase`, Java's `equalsIgnoreCase`).
pub fn fold(name: impl Iterator<Item = u8>) -> impl Iterator<Item = u8> {
    let kept = |c: &u8| c.is_ascii_alphanumeric() || !c.is_ascii();
    let mut bytes = name.peekable();
    // A byte read ahead for a sequence that turned out not to be one of the letters.
    let mut held: Option<u8> = None;
    let letters = std::iter::from_fn(move || {
        if let Some(c) = held.take() {
            return Some(c);
        }
        let c = bytes.next()?;
        let ascii = match c {
            0xC4 => bytes.next_if(|&n| n == 0xB0 || n == 0xB1).map(|_| b'i'),
            0xC5 => bytes.next_if_eq(&0xBF).map(|_| b's'),
            0xE2 => bytes.next_if_eq(&0x84).and_then(|_| {
                let kelvin = bytes.next_if_eq(&0xAA).map(|_| b'k');
                held = kelvin.is_none().then_some(0x84);
                kelvin
            }),
            _ => None,
        };
        Some(ascii.unwrap_or(c))
    });
    letters
        .skip_while(move |c| !kept(c))
        .take_while(|&c| !matches!(c, b'[' | b']' | 0))
        .filter(kept)
        .map(|c| c.to_ascii_lowercase())
}

/// `s` with its valid percent-escapes decoded (others kept as they are).
pub fn percent_decoded(s: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let &c = s.get(i)?;
        let escaped = match (
            c,
            s.get(i + 1).copied().and_then(hex_value),
            s.get(i + 2).copied().and_then(hex_value),
        ) {
            (b'%', Some(h), Some(l)) => Some(h << 4 | l),
            _ => None,
        };
        i += if escaped.is_some() { 3 } else { 1 };
        Some(escaped.unwrap_or(c))
    })
}

/// Whether `s` holds a `%` that starts no valid escape (`%zz`, a trailing `%`). What an
/// upstream makes of one differs (kept as is, dropped with its pair, rejected), so a path
/// or query holding one is ambiguous: [`normalize_percent`] writes it `%25`, which would
/// give `%zz` and `%25zz` one key.
///
/// ```
/// use cachegate::uri::has_invalid_escape;
/// assert!(has_invalid_escape("q=%zz"));
/// assert!(has_invalid_escape("100%"));
/// assert!(!has_invalid_escape("q=%25zz&r=%41"));
/// ```
pub fn has_invalid_escape(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        c == b'%'
            && !(b.get(i + 1).is_some_and(|h| h.is_ascii_hexdigit())
                && b.get(i + 2).is_some_and(|l| l.is_ascii_hexdigit()))
    })
}

/// Whether `b` is an RFC 3986 unreserved character (§2.3).
pub fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// `sub-delims` of RFC 3986 §2.2.
fn sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §6.2.2.1-2: decodes escapes of unreserved characters, upper-cases the hex of
/// the others, and writes a `%` that starts no valid escape as `%25`. Works on bytes, so
/// any UTF-8 input is handled.
pub fn normalize_percent(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(s.len() + 2);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let escape = bytes
            .get(i + 1)
            .and_then(|&h| hex_value(h))
            .zip(bytes.get(i + 2).and_then(|&l| hex_value(l)));
        match escape {
            Some((h, l)) if unreserved(h * 16 + l) => {
                out.push(h * 16 + l);
                i += 3;
            }
            Some(_) => {
                out.push(b'%');
                out.push(bytes[i + 1].to_ascii_uppercase());
                out.push(bytes[i + 2].to_ascii_uppercase());
                i += 3;
            }
            None => {
                out.extend_from_slice(b"%25");
                i += 1;
            }
        }
    }
    // Only ASCII bytes were replaced, by ASCII bytes: the result is still UTF-8.
    Cow::Owned(
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths() {
        let n = |p: &str| normalize_path(p).path;
        assert_eq!(n("/"), "/");
        assert_eq!(n(""), "/");
        assert_eq!(n("/a/b/"), "/a/b/");
        assert_eq!(n("/a/./b/../c"), "/a/c");
        assert_eq!(n("/../../x"), "/x");
        assert_eq!(n("/a/%2e%2E/b"), "/b");
        assert_eq!(n("//a///b"), "/a/b");
        assert_eq!(n("/a/.."), "/");
        assert_eq!(n("/%7euser"), "/~user");
        assert_eq!(n("/%e2%82%ac"), "/%E2%82%AC");
        assert_eq!(n("/100%"), "/100%25");
        assert!(normalize_path("/100%").ambiguous);
        assert!(normalize_path("/a%zzb").ambiguous);
        assert!(!normalize_path("/a%25zzb").ambiguous);
        assert_eq!(n("/%a\u{e9}"), "/%25a\u{e9}");
        assert!(normalize_path("/a%5cb").ambiguous);
        assert!(normalize_path("/a\\b").ambiguous);
        assert!(!normalize_path("/a/b").ambiguous);
        assert!(normalize_path("/api/account;/me").ambiguous);
        assert!(normalize_path("/api/account%3bx=1/me").ambiguous);
    }

    #[test]
    fn percent() {
        assert_eq!(normalize_percent("a%2"), "a%252");
        assert_eq!(normalize_percent("%"), "%25");
        assert_eq!(normalize_percent("%41%2f"), "A%2F");
    }

    proptest! {
        #[test]
        fn normalization_is_total_and_idempotent(s in any::<String>()) {
            let once = normalize_path(&s);
            prop_assert!(once.path.starts_with('/'));
            prop_assert!(!once.path.contains("//"));
            prop_assert_eq!(normalize_path(&once.path).path, once.path.clone());
            let q = parse_query(&s);
            for p in q {
                prop_assert_eq!(normalize_percent(&p.name), p.name.clone());
            }
        }

        #[test]
        fn the_fast_path_agrees_with_the_full_normalization(
            s in prop_oneof![any::<String>(), "(/([a-z.;%\\\\]{0,3}|%2[eEfF]|\\.\\.?)){0,6}/?"]
        ) {
            prop_assert_eq!(normalize_path(&s), normalize_slowly(&s));
        }

        #[test]
        fn no_dot_segments_survive(segs in proptest::collection::vec("(\\.|\\.\\.|%2e|%2E%2e|[a-z]{1,3}|)", 0..12)) {
            let p = format!("/{}", segs.join("/"));
            let n = normalize_path(&p).path;
            prop_assert!(!n.split('/').any(|s| s == "." || s == ".."), "{} -> {}", p, n);
        }
    }
}
