//! Configuration: the TOML file, command-line overrides and environment overrides.
//!
//! A config file is parsed with `serde` + `toml`; unknown fields are rejected, and every
//! error names the file, the line and column, the field and what was expected
//! ([`ConfigError`]). Values that need checking (URLs, methods, path patterns, percentages)
//! are checked while deserializing, so their errors point at the offending line too.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The whole configuration of one `cachegate serve` process.
///
/// Every field has a default except the upstream URL, which must come from the file
/// (`[upstream] url`) or from `--upstream`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the proxy listens on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/stats`). Default `127.0.0.1:9090`.
    pub admin_listen: SocketAddr,
    /// The origin every request is forwarded to.
    pub upstream: UpstreamConfig,
    /// Switches and limits of the cache itself.
    pub cache: CacheConfig,
    /// The shared Redis/Valkey tier; absent means memory tier only.
    pub redis: Option<RedisConfig>,
    /// Routes with their caching policies, tried in order; the first match wins.
    pub routes: Vec<RouteConfig>,
}

/// `[upstream]`: where requests go and how long cachegate waits for them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of the origin, `http://host:port` with an optional path prefix.
    pub url: Option<UpstreamUrl>,
    /// Limit on establishing a TCP connection to the origin, in milliseconds. Default 1000.
    pub connect_timeout_ms: u64,
    /// Limit on waiting for the origin's response head, in milliseconds. Default 30000.
    pub response_timeout_ms: u64,
}

/// `[cache]`: the kill switch, rollout, key secret, memory-tier size and other limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// `false` makes cachegate a pure pass-through (env `CACHEGATE_ENABLED`). Default `true`.
    pub enabled: bool,
    /// Share of cache keys, 0-100, that are cached; chosen deterministically by key
    /// (env `CACHEGATE_ROLLOUT_PERCENT`). Default 100.
    pub rollout_percent: Percent,
    /// Prefix of every cache key, so that several apps can share one Redis. Default `cachegate`.
    pub namespace: String,
    /// Secret for the keyed hash of cache keys (env `CACHEGATE_KEY_SECRET`). Required when
    /// Redis is configured; a random per-process secret is used otherwise.
    pub key_secret: Option<String>,
    /// Largest request body read for a body-keyed route, in bytes; larger bodies pass
    /// through uncached. Default 1 MiB.
    pub max_request_body_bytes: usize,
    /// Largest response body stored, in bytes; larger responses stream through uncached.
    /// Default 8 MiB.
    pub max_response_body_bytes: usize,
    /// Capacity of the in-process memory tier in bytes, counting each entry's headers and
    /// body. Default 256 MiB.
    pub memory_max_bytes: u64,
    /// How long a coalesced request waits for the request already in flight for its key
    /// before going to the upstream itself, in milliseconds. Default 10000.
    pub coalesce_wait_ms: u64,
}

/// `[redis]`: the shared tier.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: RedisUrl,
    /// PEM file of the CA that signed the server's certificate, for `rediss://` servers
    /// whose CA is not a public one. Absent: the public web PKI roots are trusted.
    pub tls_ca_file: Option<PathBuf>,
    /// Limit on one Redis operation, in milliseconds. Default 100.
    pub op_timeout_ms: u64,
    /// Limit on establishing a connection to Redis, in milliseconds. Default 500.
    pub connect_timeout_ms: u64,
    /// Consecutive failures that open the circuit breaker. Default 3.
    pub breaker_failures: u32,
    /// How long an open breaker skips Redis before probing it again, in milliseconds.
    /// Default 2000.
    pub breaker_cooldown_ms: u64,
}

/// One `[[routes]]` entry: which requests it matches and how they are cached.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A name for logs and `/stats`; defaults to `METHOD path`.
    #[serde(default)]
    pub name: Option<String>,
    /// The request method matched, e.g. `GET` or `POST`.
    pub method: MethodName,
    /// The path pattern matched; see [`PathPattern`].
    pub path: PathPattern,
    /// `false` turns caching off for this route (requests still pass through). Default `true`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Freshness lifetime of stored responses, in seconds.
    pub ttl_secs: u64,
    /// Query parameters that enter the cache key; absent means all of them.
    #[serde(default)]
    pub key_query: Option<Vec<String>>,
    /// Request headers (case-insensitive) that enter the cache key, hashed. Listing
    /// `authorization` or `cookie` here opts the route in to caching such requests per
    /// credential.
    #[serde(default)]
    pub key_headers: Vec<String>,
    /// Whether the canonical JSON body (RFC 8785) enters the cache key. Default `false`.
    #[serde(default)]
    pub key_body: bool,
    /// Tags (surrogate keys) attached to stored entries.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Response statuses that may be stored; absent means any 2xx.
    #[serde(default)]
    pub cache_statuses: Option<Vec<u16>>,
}

fn yes() -> bool {
    true
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            upstream: UpstreamConfig::default(),
            cache: CacheConfig::default(),
            redis: None,
            routes: Vec::new(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: None,
            connect_timeout_ms: 1000,
            response_timeout_ms: 30_000,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            rollout_percent: Percent(100),
            namespace: "cachegate".to_string(),
            key_secret: None,
            max_request_body_bytes: 1 << 20,
            max_response_body_bytes: 8 << 20,
            memory_max_bytes: 256 << 20,
            coalesce_wait_ms: 10_000,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: RedisUrl("redis://127.0.0.1:6379".to_string()),
            tls_ca_file: None,
            op_timeout_ms: 100,
            connect_timeout_ms: 500,
            breaker_failures: 3,
            breaker_cooldown_ms: 2000,
        }
    }
}

/// A configuration that could not be loaded: which file, where, and what was expected.
#[derive(Debug)]
pub struct ConfigError {
    /// The config file, when the error comes from one.
    pub file: Option<PathBuf>,
    /// 1-based line and column of the offending value, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong, naming the field and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.position) {
            (Some(file), Some((line, col))) => write!(f, "{}:{line}:{col}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, _) => {}
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn plain(message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            position: None,
            message: message.into(),
        }
    }
}

/// Overrides from the command line; `None` keeps the file's value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--admin-listen`.
    pub admin_listen: Option<SocketAddr>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--redis`.
    pub redis: Option<String>,
}

impl Config {
    /// Parses a config from TOML text. `file` is only used to name the file in errors.
    ///
    /// Errors: a [`ConfigError`] with the line, column and field of the first problem.
    pub fn from_toml(text: &str, file: Option<&Path>) -> Result<Config, ConfigError> {
        toml::from_str::<Config>(text).map_err(|e| {
            let position = e.span().map(|span| line_col(text, span.start));
            let message = e.message().trim_end();
            let message = match e.span().and_then(|span| field_at(text, span.start)) {
                Some(field) => format!("field `{field}`: {message}"),
                None => message.to_string(),
            };
            ConfigError {
                file: file.map(Path::to_path_buf),
                position,
                message,
            }
        })
    }

    /// Reads and parses a config file.
    ///
    /// Errors: the file cannot be read, or [`Config::from_toml`] fails.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            position: None,
            message: format!("cannot read config file: {e}"),
        })?;
        Config::from_toml(&text, Some(path))
    }

    /// Applies command-line overrides, then the environment (`CACHEGATE_ENABLED`,
    /// `CACHEGATE_ROLLOUT_PERCENT`, `CACHEGATE_KEY_SECRET`), then checks the result.
    ///
    /// Errors: an override or environment value is malformed, the upstream URL is
    /// missing, or Redis is configured without a key secret.
    pub fn finish(
        mut self,
        overrides: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        if let Some(listen) = overrides.listen {
            self.listen = listen;
        }
        if let Some(admin) = overrides.admin_listen {
            self.admin_listen = admin;
        }
        if let Some(url) = &overrides.upstream {
            let url = url
                .parse()
                .map_err(|e| ConfigError::plain(format!("--upstream: {e}")))?;
            self.upstream.url = Some(url);
        }
        if let Some(url) = &overrides.redis {
            let url = url
                .parse()
                .map_err(|e| ConfigError::plain(format!("--redis: {e}")))?;
            self.redis.get_or_insert_with(RedisConfig::default).url = url;
        }
        if let Some(v) = env("CACHEGATE_ENABLED") {
            self.cache.enabled = parse_bool(&v).ok_or_else(|| {
                ConfigError::plain(format!(
                    "CACHEGATE_ENABLED: expected true or false, found {v:?}"
                ))
            })?;
        }
        if let Some(v) = env("CACHEGATE_ROLLOUT_PERCENT") {
            self.cache.rollout_percent = v
                .parse()
                .map_err(|e| ConfigError::plain(format!("CACHEGATE_ROLLOUT_PERCENT: {e}")))?;
        }
        if let Some(v) = env("CACHEGATE_KEY_SECRET") {
            self.cache.key_secret = Some(v);
        }
        if let Some(redis) = &self.redis
            && redis.tls_ca_file.is_some()
            && !redis.url.0.starts_with("rediss://")
        {
            return Err(ConfigError::plain(
                "redis.tls_ca_file: only used with a rediss:// URL",
            ));
        }
        if self.upstream.url.is_none() {
            return Err(ConfigError::plain(
                "upstream.url: missing; give `[upstream] url = \"http://host:port\"` in the config file or --upstream",
            ));
        }
        if self.redis.is_some() && self.cache.key_secret.as_deref().unwrap_or("").is_empty() {
            return Err(ConfigError::plain(
                "cache.key_secret: required when Redis is configured (replicas must derive the same cache keys); set it in [cache] or CACHEGATE_KEY_SECRET",
            ));
        }
        Ok(self)
    }

    /// The effective config as TOML, with the key secret redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.cache.key_secret.is_some() {
            shown.cache.key_secret = Some("<redacted>".to_string());
        }
        if let Some(redis) = &mut shown.redis {
            redis.url = RedisUrl(redis.url.redacted());
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// The dotted name of the field whose value starts at `offset`: the enclosing table
/// header plus the key on that line (e.g. `cache.rollout_percent`, `routes.ttl_secs`).
fn field_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[line_start..line_end];
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .chain(std::iter::once(line.trim()))
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(t), None) => Some(t),
        (None, None) => None,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

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
        let uri: http::Uri = s
            .parse()
            .map_err(|e| format!("expected an http:// URL, found {s:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "expected an http:// URL (TLS to the upstream is not supported yet), found {s:?}"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("expected http://host:port, found {s:?}"))?
            .to_string();
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
/// `/api/natal/chart` matches only itself; `/kpi/*` matches `/kpi/revenue/daily`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern(String);

impl PathPattern {
    /// Whether `path` (without query) matches this pattern.
    pub fn matches(&self, path: &str) -> bool {
        glob_match(self.0.as_bytes(), path.as_bytes())
    }
}

fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative wildcard matching with a single backtrack point.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
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
        Ok(PathPattern(s.to_string()))
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_value!(PathPattern);

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
    fn error_names_line_and_field() {
        let text = "[cache]\nrollout_percent = 150\n";
        let err = Config::from_toml(text, Some(Path::new("c.toml"))).unwrap_err();
        let shown = err.to_string();
        assert!(shown.starts_with("c.toml:2:"), "{shown}");
        assert!(shown.contains("0 to 100"), "{shown}");

        let text = "[[routes]]\nmethod = \"GET\"\npath = \"/kpi/*\"\nttl = 30\n";
        let shown = Config::from_toml(text, Some(Path::new("c.toml")))
            .unwrap_err()
            .to_string();
        assert!(shown.contains("ttl"), "{shown}");
        assert!(shown.contains("c.toml:"), "{shown}");
    }

    #[test]
    fn redis_requires_secret() {
        let c = Config::from_toml(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n[redis]\nurl = \"redis://127.0.0.1:2\"\n",
            None,
        )
        .unwrap();
        let err = c.finish(&Overrides::default(), |_| None).unwrap_err();
        assert!(err.to_string().contains("key_secret"));
    }

    #[test]
    fn redacts_password() {
        let u = RedisUrl("redis://app:s3cret@127.0.0.1:6379/0".into());
        assert_eq!(u.redacted(), "redis://app:***@127.0.0.1:6379/0");
    }
}
