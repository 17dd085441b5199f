//! Checked config values: each parses from a string and reports what was expected, so
//! that the TOML parser can point at the offending line.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Implements `Deserialize`/`Serialize` through `FromStr`/`Display`, so that a bad value is
/// reported by the TOML parser at its own line.
macro_rules! string_value {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

/// The origin's base URL: `http://host:port` plus an optional path prefix (no query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `host:port` as given.
    pub authority: String,
    /// The path prefix without a trailing `/` (empty for none).
    pub path_prefix: String,
}

impl FromStr for UpstreamUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // Checked first, and the URL not repeated: it would show the password (a `/`,
        // `?` or `#` in one moves the `@` out of what parses as the authority).
        if s.contains('@') {
            return Err(
                "the upstream URL holds an '@': user information (user:password@) is not \
                 accepted (it would be sent to the upstream and written to the logs)"
                    .to_string(),
            );
        }
        let uri: http::Uri = s
            .parse()
            .map_err(|e| format!("expected an http:// URL, found {s:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "expected an http:// URL (TLS to the upstream is not supported yet), found {s:?}"
                ));
            }
            Some(other) => {
                return Err(format!(
                    "expected an http:// URL, found the scheme {other:?} in {s:?}"
                ));
            }
            None => {
                return Err(format!(
                    "expected an http:// URL, found {s:?}: add the scheme, e.g. \"http://{s}\""
                ));
            }
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("expected http://host:port, found {s:?}"))?;
        let authority = authority.to_string();
        if uri.query().is_some() {
            return Err(format!("the upstream URL must not have a query: {s:?}"));
        }
        let path_prefix = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl {
            authority,
            path_prefix,
        })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path_prefix)
    }
}
string_value!(UpstreamUrl);

/// A Redis URL (`redis://` or `rediss://`), checked by redis-rs's own parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl(pub String);

impl RedisUrl {
    /// The URL with any password replaced by `***`, for display.
    pub fn redacted(&self) -> String {
        match self.0.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split(':').next().unwrap_or("");
                    format!("{scheme}://{user}:***@{host}")
                }
                None => self.0.clone(),
            },
            None => self.0.clone(),
        }
    }
}

impl FromStr for RedisUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
            return Err(format!(
                "expected a redis:// or rediss:// URL, found {:?}",
                RedisUrl(s.to_string()).redacted()
            ));
        }
        redis::Client::open(s).map_err(|e| format!("invalid Redis URL: {e}"))?;
        Ok(RedisUrl(s.to_string()))
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_value!(RedisUrl);

/// An HTTP method name such as `GET` or `POST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodName(pub http::Method);

impl FromStr for MethodName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let upper = s.to_ascii_uppercase();
        match upper.as_str() {
            "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" => Ok(MethodName(
                upper.parse().map_err(|_| "bad method".to_string())?,
            )),
            _ => Err(format!(
                "expected an HTTP method such as GET or POST, found {s:?}"
            )),
        }
    }
}

impl fmt::Display for MethodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}
string_value!(MethodName);

/// A path pattern: a literal path where `*` matches any run of characters, `/` included.
/// `/api/natal/chart` matches only itself; `/kpi/*` matches `/kpi/revenue/daily`. Held in
/// the spelling request paths are matched in ([`crate::uri::normalize_pattern`]):
/// `/caf%c3%a9/*` and `/café/*` both match a request for `/caf%C3%A9/x`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern(String);

impl PathPattern {
    /// Whether `path` (without query) matches this pattern.
    pub fn matches(&self, path: &str) -> bool {
        cachegate_core::purge::glob_matches(&self.0, path)
    }
}

impl FromStr for PathPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!(
                "expected a path pattern starting with '/', found {s:?}"
            ));
        }
        if s.contains('?') {
            return Err(format!(
                "a path pattern must not contain a query (use key_query): {s:?}"
            ));
        }
        // Compared with normalized request paths: spelled the same way.
        crate::uri::normalize_pattern(s)
            .map(PathPattern)
            .map_err(|e| format!("path pattern {s:?}: {e}"))
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_value!(PathPattern);

/// A trusted proxy: an IP address or a CIDR range (`10.0.0.0/8`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyNet(pub ipnet::IpNet);

impl FromStr for ProxyNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        s.parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map(ProxyNet)
            .map_err(|_| {
                format!("expected an IP address or CIDR range such as 10.0.0.0/8, found {s:?}")
            })
    }
}

impl fmt::Display for ProxyNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
string_value!(ProxyNet);

/// A percentage from 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent(pub u8);

impl FromStr for Percent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().parse::<u8>() {
            Ok(n) if n <= 100 => Ok(Percent(n)),
            _ => Err(format!(
                "expected a whole number from 0 to 100, found {s:?}"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        n.to_string().parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        let p: PathPattern = "/kpi/*".parse().unwrap();
        assert!(p.matches("/kpi/revenue"));
        assert!(p.matches("/kpi/revenue/daily"));
        assert!(!p.matches("/kpix"));
        let exact: PathPattern = "/api/natal/chart".parse().unwrap();
        assert!(exact.matches("/api/natal/chart"));
        assert!(!exact.matches("/api/natal/chart/x"));
        let mid: PathPattern = "/u/*/profile".parse().unwrap();
        assert!(mid.matches("/u/42/profile"));
        assert!(!mid.matches("/u/42/settings"));
    }

    #[test]
    fn upstream_urls_with_user_information_are_refused_without_echoing_it() {
        for url in [
            "http://user:s3cret@127.0.0.1:8000",
            "https://user:s3cret@127.0.0.1:8000/x",
            "http://s3cret@127.0.0.1:8000/",
            "http://bob:s3cret/UP3@127.0.0.1:8000",
            "http://user:1234/s3cret@127.0.0.1:80",
            "http://user:12?s3cret@127.0.0.1",
            "user:s3cret/x@127.0.0.1:80",
        ] {
            let e = url.parse::<UpstreamUrl>().unwrap_err();
            assert!(
                e.contains("user information") && !e.contains("s3cret"),
                "{e}"
            );
        }
        for ok in [
            "http://127.0.0.1:8000",
            "http://[::1]:8000/x",
            "http://[::1]/",
            "http://a.example",
        ] {
            assert!(ok.parse::<UpstreamUrl>().is_ok(), "{ok}");
        }
        let ok: UpstreamUrl = "http://127.0.0.1:/api/v1".parse().unwrap();
        assert_eq!(ok.path_prefix, "/api/v1");
    }

    #[test]
    fn redacts_password() {
        let u = RedisUrl("redis://app:s3cret@127.0.0.1:6379/0".into());
        assert_eq!(u.redacted(), "redis://app:***@127.0.0.1:6379/0");
    }
}
