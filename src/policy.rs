//! Cache policy: which route a request matches, whether it may use the cache, and
//! whether (and for how long) a response may be stored.
//!
//! Defaults are the safe ones: only 2xx responses are stored unless a route says
//! otherwise; `no-store`, `no-cache`, `private`, `Set-Cookie` and `Vary: *` are never
//! stored; requests with `Authorization` or `Cookie` bypass the cache unless the route
//! keys on that header; a client's request `Cache-Control` is ignored, so clients cannot
//! force recomputation of an expensive endpoint.

use std::time::SystemTime;

use http::{HeaderMap, Method, StatusCode, header};

use crate::config::RouteConfig;
use crate::status::{BypassReason, NoStoreReason};

/// A configured route, ready for matching.
#[derive(Debug, Clone)]
pub struct Route {
    /// Name for logs and stats.
    pub name: String,
    /// The route's settings as configured, with header names lower-cased.
    pub config: RouteConfig,
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

    /// The first route matching `method` and `path`, if any.
    pub fn route_for(&self, method: &Method, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.config.method.0 == method && r.config.path.matches(path))
    }
}

/// Decides whether a request may use the cache at all (before any key is built).
///
/// Errors: the [`BypassReason`] when it may not.
pub fn check_request(
    route: Option<&Route>,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(), BypassReason> {
    let keyed = |name: &str| route.is_some_and(|r| r.config.key_headers.iter().any(|h| h == name));
    match route {
        Some(r) if !r.config.enabled => return Err(BypassReason::RouteDisabled),
        None if method != Method::GET && method != Method::HEAD => {
            return Err(BypassReason::Method);
        }
        _ => {}
    }
    if headers.contains_key(header::UPGRADE) {
        return Err(BypassReason::Unsupported);
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

/// The directives of a `Cache-Control` header that matter to a shared cache
/// (RFC 9111 §5.2.2).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (a stored response would need revalidation on every use).
    pub no_cache: bool,
    /// `private`.
    pub private: bool,
    /// `max-age`, in seconds.
    pub max_age: Option<u64>,
    /// `s-maxage`, in seconds (shared caches only).
    pub s_maxage: Option<u64>,
}

impl CacheControl {
    /// Parses every `Cache-Control` field line in `headers`. Unknown directives are ignored;
    /// a malformed delta-seconds value is treated as absent.
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut cc = CacheControl::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for directive in value.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let secs = || arg.and_then(|a| a.parse::<u64>().ok());
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "max-age" => cc.max_age = secs(),
                    "s-maxage" => cc.s_maxage = secs(),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Decides whether a response may be stored and for how long.
///
/// With a route, its `ttl_secs` is the lifetime; without one, the response's explicit
/// freshness (`s-maxage`, `max-age`, then `Expires` minus `Date`, RFC 9111 §4.2.1) is,
/// and a response without explicit freshness is not stored.
/// `key_headers` are the request headers in the key, to judge `Vary`.
///
/// Errors: the [`NoStoreReason`] when the response must not be stored.
pub fn storable_ttl(
    route: Option<&Route>,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<u32, NoStoreReason> {
    // A partial response (206) is never stored: it is not the whole representation.
    let status_ok = status != StatusCode::PARTIAL_CONTENT
        && match route.and_then(|r| r.config.cache_statuses.as_ref()) {
            Some(allowed) => allowed.contains(&status.as_u16()),
            None => status.is_success(),
        };
    if !status_ok {
        return Err(NoStoreReason::Status);
    }
    let cc = CacheControl::parse(headers);
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
    for value in headers.get_all(header::VARY) {
        let Ok(value) = value.to_str() else {
            return Err(NoStoreReason::Vary);
        };
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let name = name.to_ascii_lowercase();
            if name == "*" || !key_headers.contains(&name) {
                return Err(NoStoreReason::Vary);
            }
        }
    }
    let ttl = match route {
        Some(r) => r.config.ttl_secs,
        None => explicit_freshness(&cc, headers).ok_or(NoStoreReason::NoFreshness)?,
    };
    if ttl == 0 {
        return Err(NoStoreReason::NoFreshness);
    }
    Ok(ttl.min(u64::from(u32::MAX)) as u32)
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
            check_request(None, &Method::GET, &h),
            Err(BypassReason::Authorization)
        );
        assert_eq!(
            check_request(None, &Method::POST, &headers(&[])),
            Err(BypassReason::Method)
        );
        let cfg: crate::config::Config = toml::from_str(
            "[[routes]]\nmethod='GET'\npath='/me'\nttl_secs=5\nkey_headers=['Authorization']\n",
        )
        .unwrap();
        let policy = Policy::new(&cfg.routes);
        let route = policy.route_for(&Method::GET, "/me");
        assert!(route.is_some());
        assert_eq!(check_request(route, &Method::GET, &h), Ok(()));
    }
}
