//! Cache policy: which route a request matches, whether it may use the cache, and
//! whether (and for how long) a response may be stored.
//!
//! Defaults are the safe ones: only 2xx responses are stored unless a route says
//! otherwise; `no-store`, `no-cache`, `private`, `Set-Cookie` and `Vary: *` are never
//! stored; requests with `Authorization` or `Cookie` bypass the cache unless the route
//! keys on that header; a client's request `Cache-Control` is ignored, so clients cannot
//! force recomputation of an expensive endpoint.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, StatusCode, header};

use crate::config::RouteConfig;
use crate::key::is_json_media_type;
use crate::status::{BypassReason, NoStoreReason};
use crate::warm::HotKeys;

/// A configured route, ready for matching.
#[derive(Debug, Clone)]
pub struct Route {
    /// Name for logs and stats.
    pub name: String,
    /// The route's settings as configured, with header names lower-cased.
    pub config: RouteConfig,
    /// The route's tags, shared by every entry it stores.
    pub tags: Arc<[String]>,
    /// Its request counts per key, with `warm_hot_keys`.
    pub hot_keys: Option<Arc<HotKeys>>,
}

/// All routes, tried in order.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    routes: Vec<Route>,
}

impl Policy {
    /// Builds the policy from configured routes.
    pub fn new(routes: &[RouteConfig]) -> Self {
        let routes = routes
            .iter()
            .map(|r| {
                let mut config = r.clone();
                for h in &mut config.key_headers {
                    *h = h.to_ascii_lowercase();
                }
                Route {
                    tags: r.tags.clone().into(),
                    hot_keys: (r.warm_hot_keys > 0).then(|| {
                        Arc::new(HotKeys::new(
                            r.warm_hot_keys,
                            Duration::from_secs(r.warm_interval_secs),
                        ))
                    }),
                    name: r
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("{} {}", r.method, r.path)),
                    config,
                }
            })
            .collect();
        Policy { routes }
    }

    /// The hot-key trackers of the routes with `warm_hot_keys`.
    pub fn hot_keys(&self) -> Vec<Arc<HotKeys>> {
        self.routes
            .iter()
            .filter_map(|r| r.hot_keys.clone())
            .collect()
    }

    /// The first route matching `method` and `path`, if any. A `HEAD` request follows the
    /// first route for `GET` or `HEAD` (RFC 9110 §9.3.2: HEAD is GET without the content),
    /// so a GET route's rules (`enabled`, keys, statuses) cannot be sidestepped with HEAD.
    /// Paths match case-sensitively.
    pub fn route_for(&self, method: &Method, path: &str) -> Option<&Route> {
        let matches_method =
            |m: &Method| m == method || (method == Method::HEAD && m == Method::GET);
        self.routes
            .iter()
            .find(|r| matches_method(&r.config.method.0) && r.config.path.matches(path))
    }
}

/// What admission needs to know about a request beyond its method and headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestShape {
    /// The request carries a body (any length, any framing).
    pub has_body: bool,
    /// Its path is ambiguous ([`crate::uri::NormalPath::ambiguous`]).
    pub ambiguous_path: bool,
    /// Its query holds an invalid escape ([`crate::uri::has_invalid_escape`]).
    pub ambiguous_query: bool,
}

/// Decides whether a request may use the cache at all (before any key is built).
///
/// Errors: the [`BypassReason`] when it may not.
pub fn check_request(
    route: Option<&Route>,
    method: &Method,
    headers: &HeaderMap,
    shape: RequestShape,
) -> Result<(), BypassReason> {
    let keyed = |name: &str| route.is_some_and(|r| r.config.key_headers.iter().any(|h| h == name));
    match route {
        Some(r) if !r.config.enabled => return Err(BypassReason::RouteDisabled),
        None if method != Method::GET && method != Method::HEAD => {
            return Err(BypassReason::Method);
        }
        _ => {}
    }
    if shape.ambiguous_path {
        return Err(BypassReason::AmbiguousPath);
    }
    if shape.ambiguous_query {
        return Err(BypassReason::AmbiguousQuery);
    }
    // A body the key does not cover must not shape a shared answer (RFC 9110 §9.3.1:
    // content on GET has no defined meaning, yet some upstreams read it).
    let body_keyed = route.is_some_and(|r| r.config.key_body);
    if shape.has_body && (!body_keyed || method == Method::GET || method == Method::HEAD) {
        return Err(BypassReason::RequestBody);
    }
    if body_keyed && !is_json_media_type(headers) {
        return Err(BypassReason::ContentType);
    }
    if headers.contains_key(header::RANGE) {
        return Err(BypassReason::Range);
    }
    if headers.contains_key(header::AUTHORIZATION) && !keyed("authorization") {
        return Err(BypassReason::Authorization);
    }
    if headers.contains_key(header::COOKIE) && !keyed("cookie") {
        return Err(BypassReason::Cookie);
    }
    Ok(())
}

/// Whether a request carries credentials (`Authorization`, `Cookie`): its response is
/// never handed to another request, even one with the same key.
pub fn credentialed(headers: &HeaderMap) -> bool {
    headers.contains_key(header::AUTHORIZATION) || headers.contains_key(header::COOKIE)
}

/// A response header that cachegate could not parse; the response is not stored or shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unparsable;

/// The directives of a `Cache-Control` header that matter to a shared cache
/// (RFC 9111 §5.2.2).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache`, qualified or not (a stored response would need revalidation on every use).
    pub no_cache: bool,
    /// `private`, qualified or not.
    pub private: bool,
    /// `max-age`, in seconds.
    pub max_age: Option<u64>,
    /// `s-maxage`, in seconds (shared caches only).
    pub s_maxage: Option<u64>,
}

impl CacheControl {
    /// Parses every `Cache-Control` field line in `headers` by the grammar of RFC 9111
    /// §5.2: `directive = token [ "=" ( token / quoted-string ) ]`, comma-separated.
    /// Unknown directives are ignored.
    ///
    /// Errors: [`Unparsable`] for anything off the grammar (a non-ASCII byte, a stray
    /// character, an unterminated quoted string) and for a `max-age` / `s-maxage` that is
    /// not delta-seconds. The caller fails closed: such a response is not stored.
    pub fn parse(headers: &HeaderMap) -> Result<Self, Unparsable> {
        let mut cc = CacheControl::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            for (name, arg) in directives(value.as_bytes())? {
                let secs = || arg.as_deref().and_then(delta_seconds).ok_or(Unparsable);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "max-age" => cc.max_age = Some(secs()?),
                    "s-maxage" => cc.s_maxage = Some(secs()?),
                    _ => {}
                }
            }
        }
        Ok(cc)
    }
}

/// `1*DIGIT` (RFC 9111 §1.2.2); values past 2^31 are capped there, as the RFC allows.
fn delta_seconds(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(u64::MAX).min(1 << 31))
}

/// `tchar` of RFC 9110 §5.6.2.
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Splits one field value into `(name, argument)` directives.
fn directives(v: &[u8]) -> Result<Vec<(String, Option<String>)>, Unparsable> {
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ows = |i: &mut usize| {
        while *i < v.len() && (v[*i] == b' ' || v[*i] == b'\t') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> Result<String, Unparsable> {
        let start = *i;
        while *i < v.len() && tchar(v[*i]) {
            *i += 1;
        }
        if start == *i {
            return Err(Unparsable);
        }
        Ok(String::from_utf8_lossy(&v[start..*i]).into_owned())
    };
    loop {
        skip_ows(&mut i);
        while i < v.len() && v[i] == b',' {
            i += 1;
            skip_ows(&mut i);
        }
        if i >= v.len() {
            return Ok(out);
        }
        let name = token(&mut i)?;
        skip_ows(&mut i);
        let mut arg = None;
        if i < v.len() && v[i] == b'=' {
            i += 1;
            skip_ows(&mut i);
            if i < v.len() && v[i] == b'"' {
                i += 1;
                let mut s = Vec::new();
                loop {
                    match v.get(i) {
                        None => return Err(Unparsable),
                        Some(b'"') => break,
                        Some(b'\\') => {
                            s.push(*v.get(i + 1).ok_or(Unparsable)?);
                            i += 2;
                        }
                        Some(&b) if b == b'\t' || (0x20..0x7f).contains(&b) => {
                            s.push(b);
                            i += 1;
                        }
                        Some(_) => return Err(Unparsable),
                    }
                }
                i += 1;
                arg = Some(String::from_utf8_lossy(&s).into_owned());
            } else {
                arg = Some(token(&mut i)?);
            }
            skip_ows(&mut i);
        }
        if i < v.len() && v[i] != b',' {
            return Err(Unparsable);
        }
        out.push((name, arg));
    }
}

/// The field names listed in `Vary` (lower-cased; `*` included as is).
///
/// Errors: [`Unparsable`] when a member is not a token.
fn vary_names(headers: &HeaderMap) -> Result<Vec<String>, Unparsable> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        let value = value.to_str().map_err(|_| Unparsable)?;
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !name.bytes().all(tchar) {
                return Err(Unparsable);
            }
            names.push(name.to_ascii_lowercase());
        }
    }
    Ok(names)
}

/// Checks the freshness fields cachegate reads besides `Cache-Control`: every `Expires`
/// must be an HTTP-date (RFC 9111 §5.3) and every `Age` delta-seconds (§5.1).
fn check_freshness_fields(headers: &HeaderMap) -> Result<(), Unparsable> {
    for v in headers.get_all(header::EXPIRES) {
        let v = v.to_str().map_err(|_| Unparsable)?;
        httpdate::parse_http_date(v).map_err(|_| Unparsable)?;
    }
    for v in headers.get_all(header::AGE) {
        delta_seconds(v.to_str().map_err(|_| Unparsable)?.trim()).ok_or(Unparsable)?;
    }
    Ok(())
}

/// Decides whether a response may be stored and for how long.
///
/// The reasons that make a response private to its requester are checked first, whatever
/// the status, so that an `Err` with a [`NoStoreReason::shareable`] reason always means
/// "may be handed to another request": an unparsable `Cache-Control`, `Vary`, `Expires`
/// or `Age` (fail closed), `private`, `no-store` / `no-cache`, `Set-Cookie`, then `Vary`
/// on a header outside the key. Only then come the status and the lifetime.
///
/// With a route, its `ttl_secs` is the lifetime; without one, the response's explicit
/// freshness (`s-maxage`, `max-age`, then `Expires` minus `Date`, RFC 9111 §4.2.1) is,
/// and a response without explicit freshness is not stored.
///
/// Errors: the [`NoStoreReason`] when the response must not be stored.
pub fn storable_ttl(
    route: Option<&Route>,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<u32, NoStoreReason> {
    let unparsable = |_| NoStoreReason::Unparsable;
    let cc = CacheControl::parse(headers).map_err(unparsable)?;
    let vary = vary_names(headers).map_err(unparsable)?;
    check_freshness_fields(headers).map_err(unparsable)?;
    if cc.private {
        return Err(NoStoreReason::Private);
    }
    if cc.no_store || cc.no_cache {
        return Err(NoStoreReason::NoStore);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NoStoreReason::SetCookie);
    }
    let key_headers: &[String] = route.map_or(&[], |r| &r.config.key_headers);
    if vary
        .iter()
        .any(|name| name == "*" || !key_headers.contains(name))
    {
        return Err(NoStoreReason::Vary);
    }
    // A partial response (206) is never stored: it is not the whole representation.
    let status_ok = status != StatusCode::PARTIAL_CONTENT
        && match route.and_then(|r| r.config.cache_statuses.as_ref()) {
            Some(allowed) => allowed.contains(&status.as_u16()),
            None => status.is_success(),
        };
    if !status_ok {
        return Err(NoStoreReason::Status);
    }
    let ttl = match route {
        Some(r) => r.config.ttl_secs,
        // Freshness already spent upstream (`Age`, RFC 9111 §4.2.3) is not given again.
        None => explicit_freshness(&cc, headers)
            .ok_or(NoStoreReason::NoFreshness)?
            .saturating_sub(upstream_age(headers)),
    };
    if ttl == 0 {
        return Err(NoStoreReason::NoFreshness);
    }
    Ok(ttl.min(u64::from(u32::MAX)) as u32)
}

/// The largest `Age` the upstream sent, in seconds (0 when none); checked well-formed
/// before.
fn upstream_age(headers: &HeaderMap) -> u64 {
    headers
        .get_all(header::AGE)
        .iter()
        .filter_map(|v| v.to_str().ok().and_then(|v| delta_seconds(v.trim())))
        .max()
        .unwrap_or(0)
}

/// The HTTP-date (RFC 9110 §5.6.7) in header `name`, if present and well-formed.
pub fn http_date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    httpdate::parse_http_date(headers.get(name)?.to_str().ok()?).ok()
}

/// The explicit freshness lifetime of a response in seconds, RFC 9111 §4.2.1.
fn explicit_freshness(cc: &CacheControl, headers: &HeaderMap) -> Option<u64> {
    if let Some(s) = cc.s_maxage.or(cc.max_age) {
        return Some(s);
    }
    let expires = http_date(headers, header::EXPIRES)?;
    let base = http_date(headers, header::DATE).unwrap_or_else(SystemTime::now);
    Some(expires.duration_since(base).map_or(0, |d| d.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::header_map as headers;

    #[test]
    fn unmatched_follows_upstream_freshness() {
        let ok = StatusCode::OK;
        assert_eq!(
            storable_ttl(
                None,
                ok,
                &headers(&[("cache-control", "public, max-age=60")])
            ),
            Ok(60)
        );
        assert_eq!(
            storable_ttl(
                None,
                ok,
                &headers(&[("cache-control", "max-age=60, s-maxage=5")])
            ),
            Ok(5)
        );
        assert_eq!(
            storable_ttl(None, ok, &headers(&[])),
            Err(NoStoreReason::NoFreshness)
        );
        assert_eq!(
            storable_ttl(
                None,
                ok,
                &headers(&[("cache-control", "private, max-age=60")])
            ),
            Err(NoStoreReason::Private)
        );
        assert_eq!(
            storable_ttl(
                None,
                ok,
                &headers(&[("cache-control", "max-age=60"), ("vary", "*")])
            ),
            Err(NoStoreReason::Vary)
        );
        assert_eq!(
            storable_ttl(
                None,
                StatusCode::NOT_FOUND,
                &headers(&[("cache-control", "max-age=60")])
            ),
            Err(NoStoreReason::Status)
        );
        assert_eq!(
            storable_ttl(
                None,
                ok,
                &headers(&[
                    ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                    ("expires", "Sun, 06 Nov 1994 08:50:37 GMT")
                ])
            ),
            Ok(60)
        );
    }

    #[test]
    fn credentials_bypass_unless_keyed() {
        let h = headers(&[("authorization", "Bearer x")]);
        assert_eq!(
            check_request(None, &Method::GET, &h, RequestShape::default()),
            Err(BypassReason::Authorization)
        );
        assert_eq!(
            check_request(None, &Method::POST, &headers(&[]), RequestShape::default()),
            Err(BypassReason::Method)
        );
        let cfg: crate::config::Config = toml::from_str(
            "[[routes]]\nmethod='GET'\npath='/me'\nttl_secs=5\nkey_headers=['Authorization']\n",
        )
        .unwrap();
        let policy = Policy::new(&cfg.routes);
        let route = policy.route_for(&Method::GET, "/me");
        assert!(route.is_some());
        assert_eq!(
            check_request(route, &Method::GET, &h, RequestShape::default()),
            Ok(())
        );
    }

    #[test]
    fn private_markers_win_over_every_status() {
        let cfg: crate::config::Config =
            toml::from_str("[[routes]]\nmethod='GET'\npath='/*'\nttl_secs=5\n").unwrap();
        let policy = Policy::new(&cfg.routes);
        let route = policy.route_for(&Method::GET, "/x");
        let markers: [(&'static str, &'static str); 6] = [
            ("cache-control", "private"),
            ("cache-control", "no-store"),
            ("cache-control", "no-cache=\"set-cookie\""),
            ("set-cookie", "sid=1"),
            ("cache-control", "max-age=5, \"x"),
            ("vary", "*"),
        ];
        for code in [200, 204, 302, 304, 404, 500, 503] {
            let status = StatusCode::from_u16(code).unwrap();
            for r in [route, None] {
                for marker in markers {
                    let reason = storable_ttl(r, status, &headers(&[marker])).unwrap_err();
                    assert!(!reason.shareable(), "{code} {marker:?} -> {reason:?}");
                }
            }
        }
    }

    #[test]
    fn unparsable_freshness_fails_closed() {
        let ok = StatusCode::OK;
        for bad in [
            ("cache-control", "public, max-age=60, \"oops"),
            ("cache-control", "max-age=abc"),
            ("cache-control", "max-age=60; private"),
            ("cache-control", "max-age=\"60"),
            ("vary", "accept language"),
            ("expires", "tomorrow"),
            ("age", "-1"),
        ] {
            let h = headers(&[bad, ("cache-control", "max-age=60")]);
            assert_eq!(
                storable_ttl(None, ok, &h),
                Err(NoStoreReason::Unparsable),
                "{bad:?}"
            );
        }
        let mut h = headers(&[("cache-control", "max-age=60")]);
        h.append(
            "cache-control",
            http::HeaderValue::from_bytes(b"priv\xe9ate").unwrap(),
        );
        assert_eq!(storable_ttl(None, ok, &h), Err(NoStoreReason::Unparsable));
        let quoted = headers(&[("cache-control", "private=\"a, b\", max-age=5")]);
        assert_eq!(storable_ttl(None, ok, &quoted), Err(NoStoreReason::Private));
        let fine = headers(&[("cache-control", "public , max-age=\"60\" ,, x=y")]);
        assert_eq!(storable_ttl(None, ok, &fine), Ok(60));
        let aged = headers(&[("cache-control", "max-age=60"), ("age", "50")]);
        assert_eq!(storable_ttl(None, ok, &aged), Ok(10));
        let spent = headers(&[("cache-control", "max-age=60"), ("age", "60")]);
        assert_eq!(
            storable_ttl(None, ok, &spent),
            Err(NoStoreReason::NoFreshness)
        );
    }

    proptest::proptest! {
        #[test]
        fn parsing_any_header_value_is_total(v in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Ok(value) = http::HeaderValue::from_bytes(&v) {
                let mut h = HeaderMap::new();
                for name in ["cache-control", "vary", "expires", "age"] {
                    h.insert(name, value.clone());
                }
                let _ = storable_ttl(None, StatusCode::OK, &h);
            }
        }
    }
}
