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

use http::{HeaderMap, HeaderName, Method, StatusCode, header};

use crate::config::RouteConfig;
use crate::entry::Freshness;
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
                for h in config.vary_headers.iter_mut().flatten() {
                    *h = h.to_ascii_lowercase();
                }
                for d in &mut config.request_cache_control {
                    *d = d.to_ascii_lowercase();
                }
                Route {
                    tags: r.tags.clone().into(),
                    hot_keys: (r.warm_hot_keys > 0).then(|| {
                        Arc::new(HotKeys::new(
                            r.warm_hot_keys,
                            Duration::from_secs(r.warm_interval_secs),
                        ))
                    }),
                    name: r.display_name(),
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
    /// Its query is ambiguous on its route ([`ambiguous_query`]).
    pub ambiguous_query: bool,
}

/// Whether a request's query could mean different things to different upstreams in a way
/// the key would not tell apart: it holds an invalid escape
/// ([`crate::uri::has_invalid_escape`]), or `route` forwards parameters outside its key
/// and one of them could be read as a keyed one
/// ([`crate::key::unkeyed_may_read_as_keyed`]).
pub fn ambiguous_query(query: Option<&str>, route: Option<&Route>) -> bool {
    let Some(query) = query else { return false };
    let forwards_unkeyed = |r: &&Route| r.config.forward_unkeyed_query;
    crate::uri::has_invalid_escape(query)
        || route.filter(forwards_unkeyed).is_some_and(|r| {
            r.config.key_query.as_deref().is_some_and(|keyed| {
                crate::key::unkeyed_may_read_as_keyed(&crate::uri::parse_query(query), keyed)
            })
        })
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
    // One pass over the names: cheaper than a hashed lookup per field on every request.
    let (mut range, mut authorization, mut cookie) = (false, false, false);
    for name in headers.keys() {
        range |= name == header::RANGE;
        authorization |= name == header::AUTHORIZATION;
        cookie |= name == header::COOKIE;
    }
    if range {
        return Err(BypassReason::Range);
    }
    if authorization && !keyed("authorization") {
        return Err(BypassReason::Authorization);
    }
    if cookie && !keyed("cookie") {
        return Err(BypassReason::Cookie);
    }
    Ok(())
}

/// Whether a request carries credentials (`Authorization`, `Cookie`): its response is
/// never handed to another request, even one with the same key.
pub fn credentialed(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| name == header::AUTHORIZATION || name == header::COOKIE)
}

/// The request `Cache-Control` directives a route honours (RFC 9111 §5.2.1), those it
/// lists in `request_cache_control`; by default none (a client cannot force an expensive
/// recomputation or ask for staler answers).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestDirectives {
    /// `no-cache`: fetched from the upstream (and stored), whatever is stored.
    pub no_cache: bool,
    /// `only-if-cached`: answered from the cache or with `504`, never fetched.
    pub only_if_cached: bool,
    /// `max-stale[=N]`: a stale entry (stale for at most N seconds; `u64::MAX` without a
    /// value) may be served, unless it must be revalidated.
    pub max_stale: Option<u64>,
    /// `min-fresh=N`: an entry with less than N seconds of freshness left is not served.
    pub min_fresh: Option<u64>,
}

/// The request directives a route may honour.
pub const REQUEST_DIRECTIVES: [&str; 4] = ["no-cache", "only-if-cached", "max-stale", "min-fresh"];

impl RequestDirectives {
    /// The directives of the request's `Cache-Control` among `honoured` (lower-case names
    /// from [`REQUEST_DIRECTIVES`]). An unparsable field is ignored as a whole.
    pub fn parse(headers: &HeaderMap, honoured: &[String]) -> Self {
        let mut out = RequestDirectives::default();
        if honoured.is_empty() {
            return out;
        }
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(directives) = directives(value.as_bytes()) else {
                return RequestDirectives::default();
            };
            for (name, arg) in directives {
                let name = name.to_ascii_lowercase();
                if !honoured.contains(&name) {
                    continue;
                }
                let secs = arg.as_deref().and_then(delta_seconds);
                match name.as_str() {
                    "no-cache" => out.no_cache = true,
                    "only-if-cached" => out.only_if_cached = true,
                    // A bare `max-stale`: any staleness; an invalid value: ignored.
                    "max-stale" => match (&arg, secs) {
                        (None, _) => out.max_stale = Some(u64::MAX),
                        (Some(_), Some(secs)) => out.max_stale = Some(secs),
                        (Some(_), None) => {}
                    },
                    "min-fresh" => out.min_fresh = secs.or(out.min_fresh),
                    _ => {}
                }
            }
        }
        out
    }
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
    /// `must-revalidate` or `proxy-revalidate`: never served stale.
    pub must_revalidate: bool,
    /// `stale-while-revalidate`, in seconds (RFC 5861 §3).
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error`, in seconds (RFC 5861 §4).
    pub stale_if_error: Option<u64>,
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
        CacheControl::parse_field(headers, &header::CACHE_CONTROL)
    }

    /// Like [`CacheControl::parse`], for the field `name` (a targeted field such as
    /// `CDN-Cache-Control`, RFC 9213, has the same syntax).
    ///
    /// Errors: as [`CacheControl::parse`].
    pub fn parse_field(headers: &HeaderMap, name: &HeaderName) -> Result<Self, Unparsable> {
        let mut cc = CacheControl::default();
        for value in headers.get_all(name) {
            for (name, arg) in directives(value.as_bytes())? {
                let secs = || arg.as_deref().and_then(delta_seconds).ok_or(Unparsable);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "max-age" => once(&mut cc.max_age, secs()?),
                    "s-maxage" => once(&mut cc.s_maxage, secs()?),
                    "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                    "stale-while-revalidate" => once(&mut cc.stale_while_revalidate, secs()?),
                    "stale-if-error" => once(&mut cc.stale_if_error, secs()?),
                    _ => {}
                }
            }
        }
        Ok(cc)
    }
}

/// Records `secs` for a directive that may appear once. Given again with another value
/// (`max-age=0, max-age=600`, in one field line or across lines), it is 0: RFC 9111
/// §4.2.1 lets a cache use the first or consider the response stale, and stale is what a
/// header appended by another layer (often to stop caching) most likely meant.
fn once(slot: &mut Option<u64>, secs: u64) {
    *slot = Some(match *slot {
        Some(before) if before != secs => 0,
        _ => secs,
    });
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

/// The response-side settings of the storage decision, from `[cache]`.
#[derive(Debug, Clone, Default)]
pub struct StoreRules {
    /// Targeted cache-control fields (RFC 9213) in precedence order, lower-cased, e.g.
    /// `cachegate-cache-control`, `cdn-cache-control`: the first one present with a valid
    /// value is used instead of `Cache-Control` and `Expires`.
    pub targeted: Vec<HeaderName>,
    /// Heuristic freshness (RFC 9111 §4.2.2) for responses without explicit freshness
    /// that match no route: a tenth of the time since `Last-Modified`, at most a day.
    pub heuristic_freshness: bool,
    /// How long past its freshness a response with a validator (`ETag`, `Last-Modified`)
    /// is kept to be revalidated (RFC 9111 §4.3), in seconds.
    pub revalidate_grace_secs: u64,
}

/// When a response arrived, for its age (RFC 9111 §4.2.3).
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// The local time its head arrived (`response_time`).
    pub at: SystemTime,
    /// From sending the request to the head's arrival (`response_time - request_time`).
    pub response_delay: Duration,
}

impl Received {
    /// A response that arrived now, `response_delay` after its request was sent.
    pub fn now(response_delay: Duration) -> Self {
        Received {
            at: SystemTime::now(),
            response_delay,
        }
    }

    /// When its request was sent (RFC 9111 §4.2.3 `request_time`): `at` less the response
    /// delay. Entries are stamped with it, so that a purge made while the request was in
    /// flight covers the answer it brings (a purge's markers cover what was stored at or
    /// before their time).
    pub fn requested_at(&self) -> SystemTime {
        self.at.checked_sub(self.response_delay).unwrap_or(self.at)
    }

    /// [`Received::requested_at`] in milliseconds since the Unix epoch: what an entry made
    /// from this response is stamped with.
    pub fn requested_at_ms(&self) -> u64 {
        cachegate_core::ms_since_epoch(self.requested_at())
    }
}

/// The longest heuristic freshness lifetime, in seconds (a day).
const MAX_HEURISTIC_SECS: u64 = 86_400;

/// Status codes that are heuristically cacheable (RFC 9110 §15.1), 206 aside: a partial
/// response is never stored.
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Decides whether a response may be stored and how it ages ([`Freshness`]).
///
/// The reasons that make a response private to its requester are checked first, whatever
/// the status, so that an `Err` with a [`NoStoreReason::shareable`] reason always means
/// "may be handed to another request": an unparsable `Cache-Control` or `Vary` (fail
/// closed), `private`, `no-store` / `no-cache`, `Set-Cookie`, then `Vary` on a
/// header outside the key. Only then come the status and the lifetime.
///
/// The directives are those of the first targeted field in `rules` with a valid value
/// (RFC 9213: `Cache-Control` and `Expires` are then ignored), else `Cache-Control`.
///
/// With a route, its `ttl_secs` is the lifetime from the answer's arrival, to the second
/// below (the entry is stamped when its request was sent, [`Received::requested_at`], so
/// the response delay's whole seconds are added to the TTL counted from that stamp),
/// statuses are the route's
/// (default any 2xx), and its `stale_*_secs` (else the response's `stale-while-revalidate`
/// / `stale-if-error`, RFC 5861) the stale windows. Without one, RFC 9111 as a shared
/// cache: the explicit freshness (`s-maxage`, `max-age`, then `Expires` minus `Date`,
/// §4.2.1; an invalid `Expires` is in the past, §5.3) minus the age the response already
/// had (§4.2.3), for the heuristically cacheable statuses (RFC 9110 §15.1: 200, 203, 204,
/// 300, 301, 308, 404, 405, 410, 414, 501), or their heuristic freshness when `rules`
/// allow it and none is given (§4.2.2). `must-revalidate`,
/// `proxy-revalidate`, and `s-maxage` without an explicit stale directive, forbid serving
/// it stale (§4.2.4).
///
/// Errors: the [`NoStoreReason`] when the response must not be stored.
pub fn storable(
    route: Option<&Route>,
    status: StatusCode,
    headers: &HeaderMap,
    received: Received,
    rules: &StoreRules,
) -> Result<Freshness, NoStoreReason> {
    let unparsable = |_| NoStoreReason::Unparsable;
    let (cc, targeted) = directives_for_us(headers, &rules.targeted).map_err(unparsable)?;
    let vary = vary_names(headers).map_err(unparsable)?;
    if cc.private {
        return Err(NoStoreReason::Private);
    }
    // `no-cache` (RFC 9111 §5.2.2.4): stored only to be revalidated on every use, which
    // needs a validator.
    let has_validator =
        headers.contains_key(header::ETAG) || http_date(headers, header::LAST_MODIFIED).is_some();
    if cc.no_store || (cc.no_cache && !has_validator) {
        return Err(NoStoreReason::NoStore);
    }
    // `Set-Cookie2` (RFC 2965, obsolete) too: a server still sending it means it per user.
    if headers.contains_key(header::SET_COOKIE) || headers.contains_key("set-cookie2") {
        return Err(NoStoreReason::SetCookie);
    }
    // Vary (§4.1): `*` never matches; other names beyond the key make variants, when the
    // route accepts them (`vary_headers`).
    let key_headers: &[String] = route.map_or(&[], |r| &r.config.key_headers);
    let accepted = route.and_then(|r| r.config.vary_headers.as_deref());
    let refused = |name: &String| {
        name == "*" || (!key_headers.contains(name) && accepted.is_some_and(|a| !a.contains(name)))
    };
    if vary.iter().any(refused) {
        return Err(NoStoreReason::Vary);
    }
    // A partial response (206) is never stored: it is not the whole representation.
    if status == StatusCode::PARTIAL_CONTENT || status.is_informational() {
        return Err(NoStoreReason::Status);
    }
    let initial_age = corrected_initial_age(headers, received);
    let stale_windows = |route_swr: Option<u64>, route_sie: Option<u64>| {
        let swr = route_swr.or(cc.stale_while_revalidate).unwrap_or(0);
        let sie = route_sie.or(cc.stale_if_error).unwrap_or(0);
        let explicit_stale = route_swr.is_some()
            || route_sie.is_some()
            || cc.stale_while_revalidate.is_some()
            || cc.stale_if_error.is_some();
        let must_revalidate = cc.must_revalidate || (cc.s_maxage.is_some() && !explicit_stale);
        (swr, sie, must_revalidate)
    };
    let (lifetime, age_spent, (swr, sie, must_revalidate)) = match route {
        Some(r) => {
            let ok = match r.config.cache_statuses.as_ref() {
                Some(allowed) => allowed.contains(&status.as_u16()),
                None => status.is_success(),
            };
            if !ok {
                return Err(NoStoreReason::Status);
            }
            let cfg = &r.config;
            let windows =
                if cfg.stale_while_revalidate_secs.is_some() || cfg.stale_if_error_secs.is_some() {
                    // The route's own stale policy stands whatever the response says.
                    (
                        cfg.stale_while_revalidate_secs.unwrap_or(0),
                        cfg.stale_if_error_secs.unwrap_or(0),
                        false,
                    )
                } else {
                    stale_windows(None, None)
                };
            // The route's TTL runs from about the answer's arrival: the entry is stamped
            // when its request was sent, so the response delay's whole seconds are added
            // (never fresher than the route says; at most a second less).
            let delay_secs = received.response_delay.as_secs();
            (cfg.ttl_secs.saturating_add(delay_secs), 0, windows)
        }
        None => {
            // `no-cache`: never fresh (revalidated on every use), whatever else it says.
            let explicit = if cc.no_cache {
                Some(0)
            } else {
                explicit_freshness(&cc, headers, targeted, received.at)
            };
            if !heuristically_cacheable(status) {
                return Err(NoStoreReason::Status);
            }
            let lifetime = match explicit {
                Some(l) => l,
                None if rules.heuristic_freshness => {
                    heuristic_freshness(headers, received.at).ok_or(NoStoreReason::NoFreshness)?
                }
                None => return Err(NoStoreReason::NoFreshness),
            };
            (lifetime, initial_age, stale_windows(None, None))
        }
    };
    // Freshness already spent upstream is not given again; an answer that arrives stale
    // is stored only to be served stale or revalidated, its windows shortened by how stale
    // it is. `no-cache`: never fresh, revalidated on every use.
    let (lifetime, must_revalidate) = if cc.no_cache {
        (0, true)
    } else {
        (lifetime, must_revalidate)
    };
    let ttl = lifetime.saturating_sub(age_spent);
    let overshoot = age_spent.saturating_sub(lifetime);
    let (swr, sie) = if must_revalidate {
        (0, 0)
    } else {
        (swr.saturating_sub(overshoot), sie.saturating_sub(overshoot))
    };
    let revalidate = if has_validator {
        rules.revalidate_grace_secs
    } else {
        0
    };
    if ttl == 0 && swr == 0 && sie == 0 && revalidate == 0 {
        return Err(NoStoreReason::NoFreshness);
    }
    let secs = |v: u64| v.min(u64::from(u32::MAX)) as u32;
    Ok(Freshness {
        ttl_secs: secs(ttl),
        initial_age_secs: secs(initial_age),
        stale_while_revalidate_secs: secs(swr),
        stale_if_error_secs: secs(sie),
        must_revalidate,
        revalidate_secs: secs(revalidate),
    })
}

/// The directives that apply to cachegate: the first of the `targeted` fields present with
/// a valid value (RFC 9213 §2.1, [`targeted_directives`]), else `Cache-Control`; and
/// whether a targeted one was used.
///
/// Errors: [`Unparsable`] when `Cache-Control` applies and is off the grammar.
fn directives_for_us(
    headers: &HeaderMap,
    targeted: &[HeaderName],
) -> Result<(CacheControl, bool), Unparsable> {
    for name in targeted {
        if let Some(cc) = targeted_directives(headers, name) {
            return Ok((cc, true));
        }
    }
    Ok((CacheControl::parse(headers)?, false))
}

/// The directives of the targeted field `name` (RFC 9213 §2.1): a Structured Field
/// Dictionary (RFC 8941) whose `max-age`, `s-maxage`, `stale-while-revalidate` and
/// `stale-if-error` are non-negative Integers and whose flags are Booleans; `None` when
/// the field is absent, empty or invalid in any part (it is then ignored as a whole).
fn targeted_directives(headers: &HeaderMap, name: &HeaderName) -> Option<CacheControl> {
    let mut lines = headers.get_all(name).iter();
    let mut joined = lines.next()?.as_bytes().to_vec();
    for line in lines {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(line.as_bytes());
    }
    let dictionary: sfv::Dictionary = sfv::Parser::new(&joined).parse().ok()?;
    if dictionary.is_empty() {
        return None;
    }
    let mut cc = CacheControl::default();
    for (key, entry) in &dictionary {
        let sfv::ListEntry::Item(item) = entry else {
            return None;
        };
        let seconds = || {
            let n = i64::from(item.bare_item.as_integer()?);
            u64::try_from(n).ok().map(|n| n.min(1 << 31))
        };
        let flag = || item.bare_item.as_boolean();
        match key.as_str() {
            "max-age" => cc.max_age = Some(seconds()?),
            "s-maxage" => cc.s_maxage = Some(seconds()?),
            "stale-while-revalidate" => cc.stale_while_revalidate = Some(seconds()?),
            "stale-if-error" => cc.stale_if_error = Some(seconds()?),
            "no-store" => cc.no_store = flag()?,
            "no-cache" => cc.no_cache = flag()?,
            "private" => cc.private = flag()?,
            "must-revalidate" | "proxy-revalidate" => cc.must_revalidate |= flag()?,
            _ => {}
        }
    }
    Some(cc)
}

/// The response's age when its request was sent, in seconds: RFC 9111 §4.2.3's
/// `corrected_initial_age` less the response delay, that is the larger of
/// `request_time - Date` and `Age`. Entries age from `request_time`
/// ([`Received::requested_at`]), so that their age at any later time is the RFC's
/// `current_age` (the response delay counted once).
fn corrected_initial_age(headers: &HeaderMap, received: Received) -> u64 {
    let apparent_age = http_date(headers, header::DATE)
        .and_then(|date| received.requested_at().duration_since(date).ok())
        .map_or(0, |d| d.as_secs());
    apparent_age.max(upstream_age(headers))
}

/// Heuristic freshness (RFC 9111 §4.2.2): a tenth of the time since `Last-Modified`
/// (measured from `Date`, else `now`), at most [`MAX_HEURISTIC_SECS`]; `None` without a
/// valid `Last-Modified`.
fn heuristic_freshness(headers: &HeaderMap, now: SystemTime) -> Option<u64> {
    let modified = http_date(headers, header::LAST_MODIFIED)?;
    let base = http_date(headers, header::DATE).unwrap_or(now);
    let since = base.duration_since(modified).ok()?.as_secs();
    Some((since / 10).min(MAX_HEURISTIC_SECS)).filter(|&s| s > 0)
}

/// The `Age` the upstream sent (RFC 9111 §5.1), in seconds: the first value of the first
/// field line (`Age: 0, 7200` is 0). A value that is not delta-seconds (`abc`, `-1`,
/// `1.5`) is ignored (0), as the cache-tests suite expects of a shared cache: `Age` only
/// shortens freshness, so ignoring a broken one never lets a response be shared that
/// should not be.
fn upstream_age(headers: &HeaderMap) -> u64 {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| delta_seconds(v.trim()))
        .unwrap_or(0)
}

/// The HTTP-date (RFC 9110 §5.6.7) in header `name`, if present and well-formed.
pub fn http_date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    httpdate::parse_http_date(headers.get(name)?.to_str().ok()?).ok()
}

/// The explicit freshness lifetime of a response in seconds, RFC 9111 §4.2.1: `s-maxage`,
/// `max-age`, then `Expires` minus `Date` (else `now`), unless the directives came from a
/// `targeted` field (RFC 9213: `Expires` is then ignored). An `Expires` that is not an
/// HTTP-date means "already expired" (§5.3): 0.
fn explicit_freshness(
    cc: &CacheControl,
    headers: &HeaderMap,
    targeted: bool,
    now: SystemTime,
) -> Option<u64> {
    if let Some(s) = cc.s_maxage.or(cc.max_age) {
        return Some(s);
    }
    if targeted || !headers.contains_key(header::EXPIRES) {
        return None;
    }
    let Some(expires) = http_date(headers, header::EXPIRES) else {
        return Some(0);
    };
    let base = http_date(headers, header::DATE).unwrap_or(now);
    Some(expires.duration_since(base).map_or(0, |d| d.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::header_map as headers;

    /// The TTL [`storable`] gives a response that arrived just now, at once.
    fn storable_ttl(
        route: Option<&Route>,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Result<u32, NoStoreReason> {
        let received = Received::now(Duration::ZERO);
        storable(route, status, headers, received, &StoreRules::default()).map(|f| f.ttl_secs)
    }

    /// An answer that took 3 s is stamped when its request was sent and counts its age
    /// from then: its `Age` is RFC 9111 §4.2.3's `current_age` (the delay counted once),
    /// and it expires when the RFC says, neither earlier nor later.
    #[test]
    fn entries_age_from_when_their_request_was_sent() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let received = Received {
            at,
            response_delay: Duration::from_millis(3_000),
        };
        assert_eq!(received.requested_at_ms(), 999_997_000);
        let date = |t| http::HeaderValue::from_str(&httpdate::fmt_http_date(t)).unwrap();
        let rules = StoreRules::default();
        // `Age: 10`: 10 s old when sent, 13 s old on arrival (corrected_initial_age).
        let aged = headers(&[("cache-control", "max-age=60"), ("age", "10")]);
        let f = storable(None, StatusCode::OK, &aged, received, &rules).unwrap();
        assert_eq!((f.initial_age_secs, f.ttl_secs), (10, 50));
        // `Date` 5 s before the request was sent: apparent age 5 s then.
        let mut dated = headers(&[("cache-control", "max-age=60")]);
        dated.insert(header::DATE, date(at - Duration::from_secs(8)));
        let f = storable(None, StatusCode::OK, &dated, received, &rules).unwrap();
        assert_eq!((f.initial_age_secs, f.ttl_secs), (5, 55));
        // No response delay: the age is `Age`, the TTL what is left of `max-age`.
        let instant = Received {
            at,
            response_delay: Duration::ZERO,
        };
        let f = storable(None, StatusCode::OK, &aged, instant, &rules).unwrap();
        assert_eq!((f.initial_age_secs, f.ttl_secs), (10, 50));
        // A route's TTL runs from about the answer's arrival: from the stamp, plus the
        // delay's whole seconds (2 s here), so a slow upstream's entry is not stale on
        // arrival, and never fresher than the route says.
        let cfg: crate::config::Config =
            toml::from_str("[[routes]]\nmethod='GET'\npath='/*'\nttl_secs=5\n").unwrap();
        let policy = Policy::new(&cfg.routes);
        let route = policy.route_for(&Method::GET, "/x");
        let slow = Received {
            at,
            response_delay: Duration::from_millis(2_500),
        };
        let f = storable(route, StatusCode::OK, &headers(&[]), slow, &rules).unwrap();
        assert_eq!((f.initial_age_secs, f.ttl_secs), (0, 7));
    }

    #[test]
    fn unmatched_follows_upstream_freshness() {
        let ok = StatusCode::OK;
        let mut current = HeaderMap::new();
        let now = SystemTime::now();
        let date = |t| http::HeaderValue::from_str(&httpdate::fmt_http_date(t)).unwrap();
        current.insert(header::DATE, date(now));
        current.insert(header::EXPIRES, date(now + Duration::from_secs(60)));
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
            Ok(60)
        );
        for code in [302, 500, 503] {
            let status = StatusCode::from_u16(code).unwrap();
            let h = headers(&[("cache-control", "max-age=60")]);
            assert_eq!(storable_ttl(None, status, &h), Err(NoStoreReason::Status));
        }
        assert_eq!(storable_ttl(None, ok, &current), Ok(60));
        // A Date long past is the age the response arrived with (RFC 9111 §4.2.3).
        assert_eq!(
            storable_ttl(
                None,
                ok,
                &headers(&[
                    ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                    ("expires", "Sun, 06 Nov 1994 08:50:37 GMT")
                ])
            ),
            Err(NoStoreReason::NoFreshness)
        );
        // An invalid Expires is in the past (§5.3); max-age wins over it.
        assert_eq!(
            storable_ttl(None, ok, &headers(&[("expires", "0")])),
            Err(NoStoreReason::NoFreshness)
        );
        assert_eq!(
            storable_ttl(
                None,
                ok,
                &headers(&[("expires", "tomorrow"), ("cache-control", "max-age=60")])
            ),
            Ok(60)
        );
    }

    /// A directive given twice with two values makes the response stale (RFC 9111
    /// §4.2.1): a `max-age=0` appended by another layer is not outvoted.
    #[test]
    fn a_directive_given_twice_with_two_values_is_zero() {
        let parse =
            |pairs: &[(&'static str, &'static str)]| CacheControl::parse(&headers(pairs)).unwrap();
        for pairs in [
            &[("cache-control", "max-age=0, max-age=600")][..],
            &[("cache-control", "max-age=600, max-age=0")],
            &[
                ("cache-control", "max-age=600"),
                ("cache-control", "max-age=0"),
            ],
            &[("cache-control", "max-age=5, max-age=6, max-age=7")],
        ] {
            assert_eq!(parse(pairs).max_age, Some(0), "{pairs:?}");
            let ttl = storable_ttl(None, StatusCode::OK, &headers(pairs));
            assert_eq!(ttl, Err(NoStoreReason::NoFreshness), "{pairs:?}");
        }
        let cc = parse(&[(
            "cache-control",
            "s-maxage=60, s-maxage=1, stale-while-revalidate=30, stale-while-revalidate=5, stale-if-error=9, stale-if-error=10",
        )]);
        assert_eq!(cc.s_maxage, Some(0));
        assert_eq!(cc.stale_while_revalidate, Some(0));
        assert_eq!(cc.stale_if_error, Some(0));
        // The same value twice is that value.
        let cc = parse(&[("cache-control", "max-age=60, s-maxage=30, max-age=60")]);
        assert_eq!((cc.max_age, cc.s_maxage), (Some(60), Some(30)));
    }

    #[test]
    fn targeted_fields_are_structured_dictionaries() {
        let cdn = [HeaderName::from_static("cdn-cache-control")];
        let parse = |pairs: &[(&'static str, &'static str)]| {
            directives_for_us(&headers(pairs), &cdn).unwrap()
        };
        let (cc, targeted) = parse(&[
            ("cdn-cache-control", "max-age=60"),
            ("cache-control", "no-store"),
        ]);
        assert!(targeted && cc.max_age == Some(60) && !cc.no_store);
        let (cc, _) = parse(&[("cdn-cache-control", "private")]);
        assert!(cc.private);
        // Invalid in any part: ignored, Cache-Control applies.
        for bad in [
            "max-age=10000, &&&&&",
            "max-age=\"10000\"",
            "max-age=-1",
            "max-age=1.5",
            "",
        ] {
            let (cc, targeted) =
                parse(&[("cdn-cache-control", bad), ("cache-control", "no-store")]);
            assert!(!targeted && cc.no_store, "{bad:?}");
        }
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
        let markers: [(&'static str, &'static str); 7] = [
            ("cache-control", "private"),
            ("cache-control", "no-store"),
            ("cache-control", "no-cache=\"set-cookie\""),
            ("set-cookie", "sid=1"),
            ("set-cookie2", "sid=1; Version=1"),
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
        // Age: the first value of the first line; an invalid one is ignored.
        for (age, ttl) in [
            ("-1", 60),
            ("abc", 60),
            ("1.5", 60),
            ("0, 50", 60),
            ("50, 0", 10),
        ] {
            let h = headers(&[("cache-control", "max-age=60"), ("age", age)]);
            assert_eq!(storable_ttl(None, ok, &h), Ok(ttl), "{age}");
        }
        let mut two = headers(&[("cache-control", "max-age=60"), ("age", "0")]);
        two.append(header::AGE, http::HeaderValue::from_static("50"));
        assert_eq!(storable_ttl(None, ok, &two), Ok(60));
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
