//! Header rules for a proxy: hop-by-hop removal (RFC 9110 §7.6.1), what a client may and
//! may not send on to the upstream, and message framing.
//!
//! A request's answer may be shared with other clients, so nothing a client sends outside
//! the cache key may steer the upstream: the client's `Host` is replaced by the upstream's
//! (unless `preserve_host`, which puts it in the key), its forwarding headers are replaced
//! by cachegate's own (unless it is a trusted proxy), and method/URL override headers are
//! removed.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// Headers that apply to one connection only and are never forwarded or stored
/// (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and `Proxy-Connection`, and h2c's
/// connection-specific `HTTP2-Settings`, RFC 7540 §3.2.1).
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Headers some frameworks read to change a request's method or URL. They are removed
/// from every request: the cache key is built from the real method and URL. Besides
/// these names, any name with the word `original` is one ([`is_override`]).
const OVERRIDES: [&str; 12] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-rewrite-url",
    "x-override-url",
    "x-http-host-override",
    "x-host-override",
    "x-request-uri",
    "x-request-url",
    "base-url",
    "x-base-url",
    "x-proxy-url",
];

/// Last words of header names that carry a client address ([`is_client_address`]).
const ADDRESS_WORDS: [&str; 9] = [
    "ip", "ipv4", "ipv6", "addr", "address", "clientip", "socketip", "remoteip", "realip",
];

/// Last words of header names that tell the origin a request was addressed to
/// ([`is_origin_fact`]).
const ORIGIN_WORDS: [&str; 6] = ["scheme", "proto", "ssl", "https", "host", "port"];

/// Origin headers no word rule names ([`is_origin_fact`]): Cloudflare's `CF-Visitor`
/// (`{"scheme":"https"}`, read by some applications for the scheme).
const ORIGIN_NAMES: [&str; 1] = ["cf-visitor"];

/// The words of a header name (split at `-`).
fn words(name: &str) -> std::str::Split<'_, char> {
    name.split('-')
}

/// Whether a header is set by browsers only (`Sec-`: Fetch Metadata, Client Hints such as
/// `Sec-CH-Prefers-Color-Scheme`; scripts cannot set them): never one of the classes
/// below, whatever its words.
fn is_browser_set(name: &str) -> bool {
    name.starts_with("sec-")
}

/// Whether a request header may change the method or URL an upstream reads (removed from
/// every request): [`OVERRIDES`], and every name with the word `original`
/// (`X-Original-URL`, `X-Original-Host`, `X-Envoy-Original-Path`,
/// `X-Original-Forwarded-For`, ...).
fn is_override(name: &str) -> bool {
    !is_browser_set(name) && (OVERRIDES.contains(&name) || words(name).any(|w| w == "original"))
}

/// Whether a request header carries a client address, as proxies and CDNs set them (from
/// a client that is not a trusted proxy they are spoofed, and removed; never keyed): every
/// name whose last word is one of [`ADDRESS_WORDS`] (`X-Real-IP`, `Client-IP`,
/// `CF-Connecting-IP`, `X-Remote-Addr`, `X-Client-Address`, `X-Azure-ClientIP`, ...), and
/// the `for` headers of forwarding (`X-Forwarded-For`, `Forwarded-For`).
fn is_client_address(name: &str) -> bool {
    let last = words(name).next_back().unwrap_or("");
    !is_browser_set(name)
        && (ADDRESS_WORDS.contains(&last) || (is_forwarding_name(name) && last == "for"))
}

/// Whether a name is a forwarding header's: starting `x-forwarded`, or with the word
/// `forwarded`.
fn is_forwarding_name(name: &str) -> bool {
    name.starts_with("x-forwarded") || words(name).any(|w| w == "forwarded")
}

/// Whether a request header tells an upstream the origin the request was addressed to,
/// as a proxy in front saw it (from a client that is not a trusted proxy it is spoofed,
/// and removed; from a trusted one it is kept and keyed, [`forwarded_origin`]): every
/// forwarding header but the client addresses (`X-Forwarded-Host`, `-Proto`, `-Prefix`,
/// `Forwarded-Host`, ...), and every name with the word `scheme` or whose last word is
/// one of [`ORIGIN_WORDS`] (`X-Scheme`, `X-URL-Scheme`, `Front-End-Https`, `X-ARR-SSL`,
/// `X-Host`, `X-Real-Host`, `X-Port`, ...), and [`ORIGIN_NAMES`]; not `Host` itself, and not `Forwarded`, whose
/// parameters are judged apart.
pub fn is_origin_fact(name: &str) -> bool {
    if is_browser_set(name) || matches!(name, "host" | "forwarded") || is_client_address(name) {
        return false;
    }
    let last = words(name).next_back().unwrap_or("");
    is_forwarding_name(name)
        || words(name).any(|w| w == "scheme")
        || ORIGIN_WORDS.contains(&last)
        || ORIGIN_NAMES.contains(&name)
}

/// Removes hop-by-hop headers, including `Upgrade` and every header named in
/// `Connection`. Upgrades are tunnelled separately ([`super::upgrade`]). Returns the
/// names `Connection` nominated (removed as RFC 9110 §7.6.1 requires; empty for most
/// messages), so that a response that loses a field a cache decides by is not stored
/// ([`is_cache_field`]).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> Vec<HeaderName> {
    // Most messages hold none: one pass over the names is cheaper than ten removals.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return Vec::new();
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    named
}

/// Whether a cache decides by the response field `name` whatever its configuration:
/// `Cache-Control` and any targeted one (`CDN-Cache-Control`, ...), `Pragma`, `Expires`,
/// `Age`, `Date`, `Set-Cookie`, `Vary`, `Surrogate-Control`. (The configured targeted
/// fields and tag headers are the caller's to add.)
pub fn is_cache_field(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.ends_with("cache-control")
        || matches!(
            name,
            "pragma"
                | "expires"
                | "age"
                | "date"
                | "set-cookie"
                | "set-cookie2"
                | "vary"
                | "surrogate-control"
        )
}

/// Whether a request asks for a WebSocket upgrade and nothing else: every protocol its
/// `Upgrade` lines list is `websocket`, and `Connection` names `upgrade` (RFC 9110 §7.8,
/// RFC 6455 §4.1). Any other upgrade, alone or listed with `websocket` (such as `h2c`,
/// whose frames would carry headers past the forwarding rules), is not tunnelled: its
/// `Upgrade` is removed with the other hop-by-hop headers.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let mut protocols = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty())
        .peekable();
    protocols.peek().is_some()
        && protocols.all(|p| p.eq_ignore_ascii_case(b"websocket"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The request-side forwarding rules: which peers are trusted proxies and which `Host`
/// the upstream gets.
#[derive(Debug, Clone, Default)]
pub struct Forwarding {
    /// Peers whose `X-Forwarded-*` / `Forwarded` headers are kept.
    pub trusted_proxies: Vec<IpNet>,
    /// The `Host` the upstream gets; `None` keeps the client's (`preserve_host`).
    pub upstream_host: Option<HeaderValue>,
    /// This process's `CDN-Loop` entry, `cachegate-{8 hex digits}` (random per process;
    /// `None`: none added, no loop detected).
    cdn_loop: Option<HeaderValue>,
}

/// The `CDN-Loop` request header (RFC 8586).
const CDN_LOOP: HeaderName = HeaderName::from_static("cdn-loop");

impl Forwarding {
    /// The rules for forwarding to an upstream: `trusted_proxies`, the `upstream_host`
    /// (`None` keeps the client's), and a `CDN-Loop` entry of this process's own.
    pub fn new(trusted_proxies: Vec<IpNet>, upstream_host: Option<HeaderValue>) -> Self {
        let pseudonym = format!("cachegate-{:08x}", cachegate_core::random_id() as u32);
        Forwarding {
            trusted_proxies,
            upstream_host,
            cdn_loop: HeaderValue::from_str(&pseudonym).ok(),
        }
    }

    /// Whether a request already went through this process: its `CDN-Loop` lists this
    /// process's entry (RFC 8586 §2: comma-separated `cdn-id *( ";" parameter )`, compared
    /// without regard to case). Such a request went round a forwarding loop (an upstream
    /// URL leading back here, directly or through other proxies), and forwarding it again
    /// would go round again (or wait on its own coalesced request).
    pub fn looped(&self, headers: &HeaderMap) -> bool {
        let Some(own) = &self.cdn_loop else {
            return false;
        };
        headers
            .get_all(CDN_LOOP)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|entry| {
                let id = entry.split(|&b| b == b';').next().unwrap_or_default();
                id.trim_ascii().eq_ignore_ascii_case(own.as_bytes())
            })
    }

    /// Whether `peer` is a trusted proxy.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// Rewrites a request's headers for the upstream: hop-by-hop headers were removed
    /// already; this sets `Host`, removes override headers, replaces forwarding headers
    /// (appending to a trusted proxy's `X-Forwarded-For`), appends this process's
    /// `CDN-Loop` entry (RFC 8586; not `Via`, RFC 9110 §7.6.3, whose presence turns off
    /// compression in nginx's default `gzip_proxied off`), and drops `Content-Length`, which
    /// the HTTP client sets from the body it actually sends.
    pub fn apply(&self, headers: &mut HeaderMap, client: SocketAddr) {
        if let Some(host) = &self.upstream_host {
            headers.insert(header::HOST, host.clone());
        }
        strip_overrides(headers);
        let trusted = self.trusts(client.ip());
        let ip = client.ip().to_canonical().to_string();
        let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) if trusted => format!("{prev}, {ip}"),
            _ => ip,
        };
        if !trusted {
            let spoofable: Vec<HeaderName> = headers
                .keys()
                .filter(|n| {
                    let n = n.as_str();
                    n == "forwarded" || is_origin_fact(n) || is_client_address(n)
                })
                .cloned()
                .collect();
            for name in spoofable {
                headers.remove(name);
            }
        }
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert("x-forwarded-for", v);
        }
        if !headers.contains_key("x-forwarded-proto") {
            headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        }
        if let Some(id) = &self.cdn_loop {
            headers.append(CDN_LOOP, id.clone());
        }
    }
}

/// Removes what may steer an origin but is never keyed: header names with `_` (many
/// servers, CGI, Rack, Gunicorn, read `X_Forwarded_Host` as `X-Forwarded-Host`, so every
/// rule would have a second spelling; dropped as nginx does by default,
/// `underscores_in_headers off`), the method/URL/host/scheme override headers, and
/// `Content-Length` (the client sets it from the body actually sent).
pub fn strip_overrides(headers: &mut HeaderMap) {
    let underscored: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().contains('_'))
        .cloned()
        .collect();
    for name in underscored {
        headers.remove(name);
    }
    let overrides: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_override(n.as_str()))
        .cloned()
        .collect();
    for name in overrides {
        headers.remove(name);
    }
    headers.remove(header::CONTENT_LENGTH);
}

/// The origin a trusted proxy forwards, as bytes for the cache key: every header
/// [`is_origin_fact`] names (`X-Forwarded-Host`, `-Proto`, `-Port`, `-Prefix`, `-Ssl`,
/// `-Scheme`, `-Server`, `-Uri`, `Forwarded-Host`, `X-Scheme`, `X-Host`, ...: an upstream
/// builds absolute URLs, redirects and tenant choices from them), and the `host` and
/// `proto` parameters of `Forwarded` (RFC 7239 §4, quoted strings respected). `None` when there is none. Client addresses (`X-Forwarded-For`,
/// `Forwarded: for=`, `X-Real-IP` and the like) are not included: keying them would make
/// one entry per client; an upstream that answers by client address must mark its
/// answers `private`.
///
/// Only meaningful for a trusted peer: from others these headers are replaced
/// ([`Forwarding::apply`]).
pub fn forwarded_origin(headers: &HeaderMap) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut put = |name: &[u8], value: &[u8]| {
        for part in [name, value] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
    };
    let mut names: Vec<&HeaderName> = headers
        .keys()
        .filter(|n| is_origin_fact(n.as_str()))
        .collect();
    names.sort_by_key(|n| n.as_str());
    for name in names {
        for value in headers.get_all(name) {
            put(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    for value in headers.get_all(header::FORWARDED) {
        match forwarded_pairs(value.as_bytes()) {
            Some(pairs) => {
                for (name, value) in pairs {
                    if name.eq_ignore_ascii_case(b"host") || name.eq_ignore_ascii_case(b"proto") {
                        put(&name.to_ascii_lowercase(), value);
                    }
                }
            }
            // Not parsable: an upstream may still read something from it, so all of it
            // is keyed.
            None => put(b"forwarded", value.as_bytes()),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The `name=value` pairs of a `Forwarded` header value (RFC 7239 §4): split at `,` and `;`
/// outside quoted strings; values as written (quotes included), empty elements skipped.
/// `None` for a value that is not of that form (an unterminated quoted string, a pair
/// without `=`).
fn forwarded_pairs(value: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut pairs = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for i in 0..=value.len() {
        let b = value.get(i).copied();
        if escaped {
            escaped = false;
        } else if quoted {
            match b {
                Some(b'\\') => escaped = true,
                Some(b'"') => quoted = false,
                None => return None,
                _ => {}
            }
        } else if b == Some(b'"') {
            quoted = true;
        } else if matches!(b, None | Some(b',' | b';')) {
            let pair = value[start..i].trim_ascii();
            if !pair.is_empty() {
                let eq = pair.iter().position(|&c| c == b'=')?;
                pairs.push((pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii()));
            }
            start = i + 1;
        }
    }
    // A value ending inside a quoted string (after an escape).
    (!quoted).then_some(pairs)
}

/// Makes an upstream response's framing cachegate's own: hop-by-hop headers (including
/// `Transfer-Encoding`) and `Content-Length` are removed, so the length a client gets is
/// always the length of the body it gets (RFC 9112 §6.3: a message with both is suspect).
/// The one exception is the `Content-Length` of a response to `HEAD`, which frames nothing
/// and is kept when it is a single well-formed number. Returns the names `Connection`
/// nominated ([`remove_hop_by_hop`]).
pub fn own_response_framing(headers: &mut HeaderMap, head_request: bool) -> Vec<HeaderName> {
    let had_transfer_encoding = headers.contains_key(header::TRANSFER_ENCODING);
    let named = remove_hop_by_hop(headers);
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let keep = head_request
        && !had_transfer_encoding
        && matches!(
            (lengths.next(), lengths.next()),
            (Some(v), None) if !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit)
        );
    if !keep {
        headers.remove(header::CONTENT_LENGTH);
    }
    named
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::header_map;

    #[test]
    fn strips_connection_named_headers() {
        let mut h = header_map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("content-type", "text/plain"),
        ]);
        let named = remove_hop_by_hop(&mut h);
        assert_eq!(named, ["keep-alive", "x-secret-hop"]);
        assert!(!named.iter().any(is_cache_field));
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
        for named in [
            "Cache-Control",
            "cdn-cache-control",
            "pragma, x",
            "x, set-cookie",
            "age",
        ] {
            let mut h = header_map(&[("connection", named)]);
            let named = remove_hop_by_hop(&mut h);
            assert!(named.iter().any(is_cache_field), "{named:?}");
        }
    }

    #[test]
    fn only_pure_websocket_upgrades_are_tunnelled() {
        let wants = |pairs: &[(&'static str, &'static str)]| wants_upgrade(&header_map(pairs));
        assert!(wants(&[
            ("upgrade", "websocket"),
            ("connection", "Upgrade")
        ]));
        assert!(wants(&[
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, upgrade")
        ]));
        for upgrade in [
            &[("upgrade", "h2c, websocket")][..],
            &[("upgrade", "h2c"), ("upgrade", "websocket")],
            &[("upgrade", "websocket"), ("upgrade", "h2c")],
            &[("upgrade", "")],
            &[],
        ] {
            let mut h = upgrade.to_vec();
            h.push(("connection", "upgrade"));
            assert!(!wants(&h), "{upgrade:?}");
        }
        assert!(!wants(&[("upgrade", "websocket")]));
    }

    #[test]
    fn underscore_spellings_and_override_headers_never_reach_the_upstream() {
        let fwd = Forwarding::new(
            vec!["10.0.0.0/8".parse().unwrap()],
            Some(HeaderValue::from_static("origin:80")),
        );
        // Origin facts: kept from trusted proxies only (and keyed).
        let origin_facts = [
            ("x-host", "evil.example"),
            ("x-real-host", "evil.example"),
            ("x-port", "8443"),
            ("x-url-scheme", "https"),
            ("front-end-https", "on"),
            ("x-arr-ssl", "on"),
            ("x-proto", "https"),
            ("x-scheme", "https"),
            ("x-real-scheme", "https"),
            ("cf-visitor", "{\"scheme\":\"https\"}"),
        ];
        for peer in ["127.0.0.1:5000", "10.1.2.3:5000"] {
            let mut h = header_map(&[
                ("x_forwarded_host", "evil.example"),
                ("x_http_method_override", "DELETE"),
                ("x_original_url", "/admin"),
                ("x-http-host-override", "evil.example"),
                ("x-original-host", "evil.example"),
                ("x-envoy-original-path", "/admin"),
                ("x-original-forwarded-host", "evil.example"),
                ("x-host-override", "evil.example"),
                ("x-request-uri", "/admin"),
                ("x-base-url", "https://evil.example"),
                ("accept", "application/json"),
                ("sec-ch-prefers-color-scheme", "dark"),
                ("sec-fetch-site", "same-origin"),
            ]);
            for (name, value) in origin_facts {
                h.insert(name, HeaderValue::from_static(value));
            }
            let trusted = peer.starts_with("10.");
            fwd.apply(&mut h, peer.parse().unwrap());
            let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            left.sort_unstable();
            let mut expected = vec![
                "accept",
                "cdn-loop",
                "host",
                "sec-ch-prefers-color-scheme",
                "sec-fetch-site",
                "x-forwarded-for",
                "x-forwarded-proto",
            ];
            if trusted {
                expected.extend(origin_facts.map(|(name, _)| name));
                expected.sort_unstable();
            }
            assert_eq!(left, expected, "{peer}");
        }
        let mut h = header_map(&[
            ("x-forwarded", "host=evil"),
            ("x-forwarded-ssl", "on"),
            ("true-client-ip", "6.6.6.6"),
            ("cf-connecting-ip", "6.6.6.6"),
            ("x-remote-addr", "6.6.6.6"),
            ("x-originating-ip", "6.6.6.6"),
            ("forwarded-for", "6.6.6.6"),
            ("forwarded-host", "evil.example"),
            ("x-client-address", "6.6.6.6"),
            ("x-azure-clientip", "6.6.6.6"),
            ("cf-connecting-ipv6", "::6"),
        ]);
        fwd.apply(&mut h, "127.0.0.1:5000".parse().unwrap());
        for gone in [
            "x-forwarded",
            "x-forwarded-ssl",
            "true-client-ip",
            "cf-connecting-ip",
            "x-remote-addr",
            "x-originating-ip",
            "forwarded-for",
            "forwarded-host",
            "x-client-address",
            "x-azure-clientip",
            "cf-connecting-ipv6",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn a_request_is_looped_only_when_it_carries_this_process_cdn_loop_entry() {
        let (a, b) = (Forwarding::new(vec![], None), Forwarding::new(vec![], None));
        let mut h = header_map(&[("cdn-loop", "fred, cachegate; v=1")]);
        assert!(!a.looped(&h) && !b.looped(&h));
        a.apply(&mut h, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(h.get_all("cdn-loop").iter().count(), 2);
        assert!(a.looped(&h), "{h:?}");
        assert!(!b.looped(&h), "another cachegate in the chain is no loop");
        assert!(!Forwarding::default().looped(&h));
        let own = h
            .get_all("cdn-loop")
            .iter()
            .next_back()
            .unwrap()
            .to_str()
            .unwrap();
        let spelled = format!("other, {}; p=1", own.to_ascii_uppercase());
        let other = header_map(&[("cdn-loop", Box::leak(spelled.into_boxed_str()))]);
        assert!(a.looped(&other), "case and parameters aside");
        assert!(!h.contains_key("via"));
    }

    #[test]
    fn client_forwarding_headers_are_replaced_unless_trusted() {
        let fwd = Forwarding::new(
            vec!["10.0.0.0/8".parse().unwrap()],
            Some(HeaderValue::from_static("origin:80")),
        );
        let spoofed = || {
            header_map(&[
                ("host", "evil.example"),
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-scheme", "https"),
                ("forwarded", "host=evil.example"),
                ("x-http-method-override", "DELETE"),
                ("x-original-url", "/admin"),
                ("content-length", "5"),
            ])
        };
        let mut h = spoofed();
        fwd.apply(&mut h, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(h["host"], "origin:80");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        for gone in [
            "x-forwarded-host",
            "x-forwarded-scheme",
            "forwarded",
            "x-http-method-override",
            "x-original-url",
            "content-length",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        let mut h = spoofed();
        fwd.apply(&mut h, "10.1.2.3:5000".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "evil.example");
        assert_eq!(h["x-forwarded-scheme"], "https");
        assert!(!h.contains_key("x-original-url"));
    }

    #[test]
    fn forwarded_origin_tells_origins_apart_and_ignores_client_addresses() {
        let origin = |pairs: &[(&'static str, &'static str)]| forwarded_origin(&header_map(pairs));
        assert_eq!(
            origin(&[
                ("x-forwarded-for", "1.2.3.4"),
                ("x-real-ip", "1.2.3.4"),
                ("forwarded-for", "1.2.3.4"),
                ("x-remote-addr", "1.2.3.4"),
                ("host", "a.example"),
                ("sec-ch-prefers-color-scheme", "dark"),
            ]),
            None
        );
        assert_eq!(origin(&[("forwarded", "for=1.2.3.4;by=10.0.0.1")]), None);
        let a = origin(&[("forwarded", "for=1.2.3.4;host=a.example;proto=https")]);
        let b = origin(&[("forwarded", "for=5.6.7.8; host=a.example; proto=https")]);
        assert!(a.is_some());
        assert_eq!(a, b, "the client address does not split entries");
        let distinct = [
            origin(&[("forwarded", "host=a.example")]),
            origin(&[("forwarded", "host=b.example")]),
            origin(&[("forwarded", "host=\"a.example;proto=http\"")]),
            origin(&[("forwarded", "host=\"a.example")]),
            origin(&[("forwarded", "host")]),
            origin(&[("x-forwarded-host", "a.example")]),
            origin(&[("x-forwarded-host", "b.example")]),
            origin(&[("x-forwarded-proto", "https")]),
            origin(&[("x-forwarded-port", "443")]),
            origin(&[("x-forwarded-prefix", "/tenant")]),
            origin(&[("x-forwarded-ssl", "on")]),
            origin(&[("x-forwarded-scheme", "https")]),
            origin(&[("x-forwarded-server", "a")]),
            origin(&[("x-forwarded-uri", "/a")]),
            origin(&[("forwarded-host", "a.example")]),
            origin(&[("x-scheme", "https")]),
            origin(&[("x-host", "a.example")]),
            origin(&[
                ("x-forwarded-host", "a.example"),
                ("x-forwarded-proto", "https"),
            ]),
            origin(&[
                ("x-forwarded-host", "a.example"),
                ("x-forwarded-host", "b.example"),
            ]),
        ];
        for (i, x) in distinct.iter().enumerate() {
            assert!(x.is_some(), "{i}");
            for (j, y) in distinct.iter().enumerate().skip(i + 1) {
                assert_ne!(x, y, "{i} and {j}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn forwarded_parsing_never_panics(value in proptest::collection::vec(0x20u8..0x7f, 0..64)) {
            let _ = forwarded_pairs(&value);
        }
    }

    #[test]
    fn response_framing_is_ours() {
        let mut h = header_map(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        own_response_framing(&mut h, false);
        assert!(h.is_empty());
        let mut h = header_map(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        own_response_framing(&mut h, true);
        assert!(h.is_empty());
        let mut h = header_map(&[("content-length", "5")]);
        own_response_framing(&mut h, true);
        assert_eq!(h["content-length"], "5");
        let mut h = header_map(&[("content-length", "5"), ("content-length", "6")]);
        own_response_framing(&mut h, true);
        assert!(h.is_empty());
    }
}
