//! Configuration: the TOML file, command-line overrides and environment overrides.
//!
//! A config file is parsed with `serde` + `toml`; unknown fields are rejected, and every
//! error names the file, the line and column, the field and what was expected
//! ([`ConfigError`]). Values that need checking (URLs, methods, path patterns, percentages)
//! are checked while deserializing, so their errors point at the offending line too.

mod error;
mod values;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use self::error::ConfigError;
use self::error::{Source, field_at, line_col};
pub use self::values::{MethodName, PathPattern, Percent, ProxyNet, RedisUrl, UpstreamUrl};

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
    /// Limits on client connections and which peers are trusted proxies.
    pub server: ServerConfig,
    /// The origin every request is forwarded to.
    pub upstream: UpstreamConfig,
    /// Switches and limits of the cache itself.
    pub cache: CacheConfig,
    /// The shared Redis/Valkey tier; absent means memory tier only.
    pub redis: Option<RedisConfig>,
    /// Routes with their caching policies, tried in order; the first match wins.
    pub routes: Vec<RouteConfig>,
    /// The admin API's access and purge settings.
    pub admin: AdminConfig,
    /// Named events (e.g. an ETL import) and what each purges.
    pub events: Vec<EventConfig>,
    /// The file and text it was parsed from, for errors found by [`Config::finish`].
    #[serde(skip)]
    source: Option<Source>,
}

/// One `[[events]]` entry: an event name and what it purges on every replica. An event is
/// raised by `POST /admin/events/{name}` or `PUBLISH {namespace}:events {name}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventConfig {
    /// The event's name, e.g. `leads.imported`.
    pub name: String,
    /// Tags to purge.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Path patterns to purge (globs anchored to the whole path, `*` any run).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Routes (by name) whose entries to purge.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Purge the whole namespace.
    #[serde(default)]
    pub all: bool,
    /// Mark stale instead of deleting: entries are served stale while one background
    /// request refreshes each (see `POST /admin/purge`'s `soft`).
    #[serde(default)]
    pub soft: bool,
}

impl Config {
    /// What the event `name` purges; `None` for an unknown name.
    pub fn event_scope(&self, name: &str) -> Option<cachegate_core::invalidation::EventPurge> {
        event_scope(&self.events, name)
    }
}

/// What the event `name` purges among `events`; `None` for an unknown name.
pub fn event_scope(
    events: &[EventConfig],
    name: &str,
) -> Option<cachegate_core::invalidation::EventPurge> {
    use cachegate_core::invalidation::{EventPurge, PurgeMode};
    let event = events.iter().find(|e| e.name == name)?;
    let scopes = crate::tags::purge_scopes(event.all, &event.tags, &event.routes, &event.paths);
    let mode = if event.soft {
        PurgeMode::Soft
    } else {
        PurgeMode::Hard
    };
    Some(EventPurge { scopes, mode })
}

/// `[admin]`: who may call the mutating admin endpoints (`POST /admin/purge`), and how
/// long a purge waits for the other replicas.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The bearer token the mutating endpoints require (`Authorization: Bearer <token>`),
    /// also `CACHEGATE_ADMIN_TOKEN`. Absent: those endpoints answer 403.
    pub token: Option<String>,
    /// How long a purge waits for the other replicas' acknowledgements, in milliseconds.
    /// Default 1000; at most [`MAX_ACK_TIMEOUT_MS`] (a purge's reply waits about this
    /// long at most, plus its Redis round trips).
    pub ack_timeout_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token: None,
            ack_timeout_ms: 1000,
        }
    }
}

/// `[upstream]`: where requests go and how long cachegate waits for them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of the origin, `http://host:port` with an optional path prefix.
    pub url: Option<UpstreamUrl>,
    /// Limit on establishing a TCP connection to the origin, in milliseconds. Default 1000.
    pub connect_timeout_ms: u64,
    /// Limit on waiting for the origin's response head, in milliseconds (then 504).
    /// Default 30000.
    pub response_timeout_ms: u64,
    /// Limit on the idle time between two chunks of the origin's response body (and before
    /// the first), in milliseconds. Default 30000.
    pub body_timeout_ms: u64,
    /// Limit on one whole upstream exchange, from sending the request to the last byte of
    /// the response body, in milliseconds. Default 120000.
    pub total_timeout_ms: u64,
    /// How long an idle pooled connection to the origin is kept for reuse, in milliseconds
    /// (at least 1). Default 30000. Set it below the origin's own keep-alive timeout (Node
    /// 5 s, gunicorn 2 s) so that cachegate stops reusing a connection before the origin
    /// closes it; a safe request caught by that race is sent again anyway
    /// ([`crate::proxy::upstream::Upstream::send`]).
    pub pool_idle_timeout_ms: u64,
    /// `true` forwards the client's `Host` and puts it in the cache key; `false` (default)
    /// sends the upstream URL's host, so that a client cannot steer the upstream with it.
    pub preserve_host: bool,
}

/// `[server]`: limits on client connections.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Limit on receiving a request head (and on an idle keep-alive connection waiting
    /// for the next one), in milliseconds. Default 10000.
    pub header_read_timeout_ms: u64,
    /// Limit on the idle time between two chunks of a client's request body, in
    /// milliseconds (then 408). Default 10000.
    pub client_body_timeout_ms: u64,
    /// Limit on reading a whole request body that the cache keys on (routes with
    /// `key_body`, bodies of at most `max_request_body_bytes`), from the request's arrival,
    /// in milliseconds (then 408): a client trickling its body cannot hold a connection for
    /// longer. Default 30000.
    pub keyed_body_timeout_ms: u64,
    /// Limit on how long a response write may wait for the client to accept any byte, in
    /// milliseconds (nginx's `send_timeout`); then the connection is closed. Default 60000.
    pub client_send_timeout_ms: u64,
    /// Limit on the time a tunnelled (WebSocket) connection may carry no byte in either
    /// direction, in milliseconds; then both sides are closed. Default 300000.
    pub tunnel_idle_timeout_ms: u64,
    /// Open client connections at most, tunnels included; further clients wait in the
    /// listen backlog until one closes. Default 10000.
    pub max_connections: usize,
    /// Threads that serve client connections, each with its own event loop; a connection
    /// is served by one of them for its life (nginx's and Envoy's model: no hand-offs of a
    /// connection between cores), and goes to the one serving the fewest connections.
    /// Default: two per CPU the process may use, so that a thread preempted by another
    /// process on the same cores holds up fewer connections (on 2 cores shared with the
    /// load generator, p99 about half that of one per CPU at the same throughput; see
    /// docs/benchmarks.md); at most 1024. A request that holds its thread's core for long
    /// (a large keyed body made canonical) delays the other connections of that thread.
    /// `0` serves connections on the shared work-stealing runtime instead, where it delays
    /// none, at a cost per request on small machines (on 2 cores, 0.74-0.77x of the
    /// memory-tier hit throughput of the default: docs/benchmarks.md).
    pub connection_threads: Option<usize>,
    /// Peers (addresses or CIDR ranges, e.g. `10.0.0.0/8`) whose forwarding headers
    /// (`X-Forwarded-*`, `Forwarded`, ...) and client-address headers (`X-Real-IP`, ...)
    /// are passed on; from any other peer they are replaced. Default none.
    pub trusted_proxies: Vec<ProxyNet>,
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
    /// Keep the upstream's tag headers (`Surrogate-Key`, `Cache-Tag`) on responses to
    /// clients. Default `false`: they are read into the entry's tags and removed.
    pub expose_tags: bool,
    /// The response header holding space-separated tags. Default `surrogate-key`.
    pub surrogate_key_header: String,
    /// The response header holding comma-separated tags. Default `cache-tag`.
    pub cache_tag_header: String,
    /// Targeted cache-control fields (RFC 9213) cachegate obeys, in precedence order: the
    /// first one a response carries with a valid value replaces its `Cache-Control` and
    /// `Expires` for cachegate. Default `["cachegate-cache-control",
    /// "cdn-cache-control"]`.
    pub targeted_cache_control: Vec<String>,
    /// Keep the targeted fields on responses to clients. Default `false`: removed, since
    /// they were meant for cachegate.
    pub forward_targeted_cache_control: bool,
    /// Heuristic freshness (RFC 9111 §4.2.2) for responses that match no route and give
    /// no explicit freshness: a tenth of the time since `Last-Modified`, at most a day.
    /// Default `false`: such responses are not stored.
    pub heuristic_freshness: bool,
    /// How long past its freshness a response with a validator (`ETag`,
    /// `Last-Modified`) is kept, to be revalidated with a conditional request instead of
    /// fetched again (RFC 9111 §4.3), in seconds. Default 3600; 0: never revalidated.
    pub revalidate_grace_secs: u64,
    /// Background refreshes (stale-while-revalidate, refresh-ahead) that may run at once;
    /// more wait in a queue of 1024, beyond which a refresh is skipped (the entry is then
    /// refreshed by a later request). Default 16.
    pub max_background_refreshes: usize,
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
    /// Encrypt stored responses (XChaCha20-Poly1305, key derived from `key_secret`, the
    /// cache key as associated data). `false` stores them readable but still
    /// authenticated. Default `true`.
    pub encrypt: bool,
    /// Consecutive failures that open the circuit breaker. Default 3.
    pub breaker_failures: u32,
    /// How long an open breaker skips Redis before probing it again, in milliseconds.
    /// Default 2000.
    pub breaker_cooldown_ms: u64,
    /// Reads on connection threads go through a Redis connection of each thread's own
    /// (up to `[server] connection_threads` connections besides the shared one). Default
    /// `true`; `false`: all through the shared connection.
    pub thread_connections: bool,
}

impl RedisConfig {
    /// The engine's connection options for this table.
    pub fn options(&self) -> cachegate_core::store::RedisOptions {
        cachegate_core::store::RedisOptions {
            url: self.url.0.clone(),
            tls_ca_file: self.tls_ca_file.clone(),
            op_timeout_ms: self.op_timeout_ms,
            connect_timeout_ms: self.connect_timeout_ms,
            breaker_failures: self.breaker_failures,
            breaker_cooldown_ms: self.breaker_cooldown_ms,
            thread_connections: self.thread_connections,
        }
    }
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
    /// Only `application/json` and `*+json` bodies that are I-JSON (RFC 7493) are keyed;
    /// others pass through uncached.
    #[serde(default)]
    pub key_body: bool,
    /// With `key_query`, whether query parameters outside it are still forwarded to the
    /// upstream. Default `false`: they are removed, so that a stored answer never depends
    /// on a parameter the key ignores.
    #[serde(default)]
    pub forward_unkeyed_query: bool,
    /// Tags (surrogate keys) attached to stored entries.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Response statuses that may be stored; absent means any 2xx.
    #[serde(default)]
    pub cache_statuses: Option<Vec<u16>>,
    /// Hot-key warming: keep this many most-requested keys of each interval fresh by
    /// refreshing them from the upstream shortly before they expire (see [`crate::warm`]).
    /// Default 0 (off); at most 1000.
    #[serde(default)]
    pub warm_hot_keys: usize,
    /// The interval over which requests are counted for `warm_hot_keys`, in seconds.
    /// Default 60; at least 1.
    #[serde(default = "sixty")]
    pub warm_interval_secs: u64,
    /// Seconds past its TTL during which an entry is served stale (`STALE`) while one
    /// background request refreshes it (RFC 5861 §3). Absent: the response's
    /// `stale-while-revalidate`, if any.
    #[serde(default)]
    pub stale_while_revalidate_secs: Option<u64>,
    /// Seconds past its TTL during which an entry is served instead of an upstream error
    /// (a 500, 502, 503 or 504, or no answer in time; RFC 5861 §4). Absent: the
    /// response's `stale-if-error`, if any.
    #[serde(default)]
    pub stale_if_error_secs: Option<u64>,
    /// The request `Cache-Control` directives this route honours (RFC 9111 §5.2.1), among
    /// `no-cache`, `only-if-cached`, `max-stale`, `min-fresh`. Default none: the request's
    /// `Cache-Control` is ignored.
    #[serde(default)]
    pub request_cache_control: Vec<String>,
    /// The `Vary` headers (case-insensitive) a response of this route may vary on beyond
    /// `key_headers`: it is then stored as one variant per value (RFC 9111 §4.1). Absent:
    /// any; `[]`: none (a response that varies beyond the key is not stored).
    #[serde(default)]
    pub vary_headers: Option<Vec<String>>,
    /// Refresh-ahead: a hit on an entry with less than this share of its TTL left (0 to 1,
    /// e.g. 0.5) is served as a HIT and starts one background refresh. Absent: off.
    #[serde(default)]
    pub refresh_ahead: Option<f64>,
}

impl RouteConfig {
    /// The route's name: `name`, else `METHOD path` (what logs, `/stats`, purges by route
    /// and `[[events]] routes` call it).
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{} {}", self.method, self.path))
    }
}

fn sixty() -> u64 {
    60
}

fn yes() -> bool {
    true
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            server: ServerConfig::default(),
            upstream: UpstreamConfig::default(),
            cache: CacheConfig::default(),
            redis: None,
            routes: Vec::new(),
            admin: AdminConfig::default(),
            events: Vec::new(),
            source: None,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: None,
            connect_timeout_ms: 1000,
            response_timeout_ms: 30_000,
            body_timeout_ms: 30_000,
            total_timeout_ms: 120_000,
            pool_idle_timeout_ms: 30_000,
            preserve_host: false,
        }
    }
}

/// The most `[server] connection_threads` allowed.
pub const MAX_CONNECTION_THREADS: usize = 1024;

/// The longest `[admin] ack_timeout_ms` a config may give: one minute, the engine's bound
/// ([`cachegate_core::store::MAX_ACK_TIMEOUT`]).
pub const MAX_ACK_TIMEOUT_MS: u64 = cachegate_core::store::MAX_ACK_TIMEOUT.as_millis() as u64;

impl ServerConfig {
    /// The number of connection threads: `connection_threads`, or two per CPU the process
    /// may use (`std::thread::available_parallelism`, 1 CPU when unknown); at most
    /// [`MAX_CONNECTION_THREADS`]. 0: none.
    pub fn connection_threads(&self) -> usize {
        let threads = self.connection_threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            2 * cpus
        });
        threads.min(MAX_CONNECTION_THREADS)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout_ms: 10_000,
            client_body_timeout_ms: 10_000,
            keyed_body_timeout_ms: 30_000,
            client_send_timeout_ms: 60_000,
            tunnel_idle_timeout_ms: 300_000,
            max_connections: 10_000,
            connection_threads: None,
            trusted_proxies: Vec::new(),
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
            expose_tags: false,
            surrogate_key_header: "surrogate-key".into(),
            cache_tag_header: "cache-tag".into(),
            coalesce_wait_ms: 10_000,
            targeted_cache_control: vec![
                "cachegate-cache-control".into(),
                "cdn-cache-control".into(),
            ],
            forward_targeted_cache_control: false,
            heuristic_freshness: false,
            revalidate_grace_secs: 3600,
            max_background_refreshes: 16,
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
            encrypt: true,
            breaker_failures: 3,
            breaker_cooldown_ms: 2000,
            thread_connections: true,
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
        let mut config = toml::from_str::<Config>(text).map_err(|e| {
            let position = e.span().map(|span| line_col(text, span.start));
            let message = without_value(e.message().trim_end());
            let message = message.as_str();
            let message = match e.span().and_then(|span| field_at(text, span.start)) {
                Some(table) if message.starts_with("missing field `") => {
                    let missing = message
                        .trim_start_matches("missing field `")
                        .trim_end_matches('`');
                    format!("field `{table}.{missing}`: missing; every [{table}] table needs it")
                }
                Some(field) => format!("field `{field}`: {}", plain_words(&field, message)),
                None => message.to_string(),
            };
            ConfigError::in_file(file.map(Path::to_path_buf), position, message)
        })?;
        config.source = Some(Source {
            file: file.map(Path::to_path_buf),
            text: text.into(),
        });
        Ok(config)
    }

    /// Reads and parses a config file.
    ///
    /// Errors: the file cannot be read, or [`Config::from_toml`] fails.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let message = format!("cannot read config file: {e}");
            ConfigError::in_file(Some(path.to_path_buf()), None, message)
        })?;
        Config::from_toml(&text, Some(path))
    }

    /// Applies command-line overrides, then the environment (`CACHEGATE_ENABLED`,
    /// `CACHEGATE_ROLLOUT_PERCENT`, `CACHEGATE_KEY_SECRET`), then checks the result.
    ///
    /// Errors: an override or environment value is malformed, the upstream URL is
    /// missing, Redis is configured without a key secret, or a setting is past its bound
    /// (`server.connection_threads` over [`MAX_CONNECTION_THREADS`], `admin.ack_timeout_ms`
    /// over [`MAX_ACK_TIMEOUT_MS`], the checks of [`Config::check_cache`]).
    pub fn finish(
        self,
        overrides: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let source = self.source.clone();
        let mut config = self
            .apply_and_check(overrides, env)
            .map_err(|e| match &source {
                Some(source) => e.located(source),
                None => e,
            })?;
        // Its text may hold secrets: not kept for the life of the process.
        config.source = None;
        Ok(config)
    }

    fn apply_and_check(
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
        if let Some(v) = env("CACHEGATE_ENABLED").filter(|v| !v.is_empty()) {
            self.cache.enabled = parse_bool(&v).ok_or_else(|| {
                ConfigError::plain(format!(
                    "CACHEGATE_ENABLED: expected true or false, found {v:?}"
                ))
            })?;
        }
        if let Some(v) = env("CACHEGATE_ROLLOUT_PERCENT").filter(|v| !v.is_empty()) {
            self.cache.rollout_percent = v
                .parse()
                .map_err(|e| ConfigError::plain(format!("CACHEGATE_ROLLOUT_PERCENT: {e}")))?;
        }
        // Empty: unset (`${TOKEN:-}` in a compose file), for every variable.
        if let Some(v) = env("CACHEGATE_KEY_SECRET").filter(|v| !v.is_empty()) {
            self.cache.key_secret = Some(v);
        }
        if let Some(v) = env("CACHEGATE_ADMIN_TOKEN").filter(|v| !v.is_empty()) {
            if v.trim() != v {
                return Err(ConfigError::plain(
                    "CACHEGATE_ADMIN_TOKEN: spaces around it, so no request could give it",
                ));
            }
            self.admin.token = Some(v);
        }
        self.check_cache()?;
        // A bearer token travels in a header value: visible ASCII (RFC 9110 §5.5).
        if let Some(token) = &self.admin.token
            && (token.trim().is_empty()
                || token.trim() != token
                || !token.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        {
            return Err(ConfigError::at_field(
                "admin.token",
                "empty, with spaces around it, or with characters other than visible ASCII, so no request could give it: set a token, or remove it to turn the admin endpoints off",
            ));
        }
        if let Some(n) = self.server.connection_threads
            && n > MAX_CONNECTION_THREADS
        {
            return Err(ConfigError::at_field(
                "server.connection_threads",
                format!("at most {MAX_CONNECTION_THREADS}, found {n}"),
            ));
        }
        if self.admin.ack_timeout_ms > MAX_ACK_TIMEOUT_MS {
            return Err(ConfigError::at_field(
                "admin.ack_timeout_ms",
                format!(
                    "at most {MAX_ACK_TIMEOUT_MS}, found {}",
                    self.admin.ack_timeout_ms
                ),
            ));
        }
        // A zero here would cut every request or connection at once (or, clamped, at
        // 1 ms): refused rather than read as "none".
        let positive: [(&str, u64); 10] = [
            (
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
            ),
            (
                "upstream.response_timeout_ms",
                self.upstream.response_timeout_ms,
            ),
            ("upstream.body_timeout_ms", self.upstream.body_timeout_ms),
            ("upstream.total_timeout_ms", self.upstream.total_timeout_ms),
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            (
                "server.client_body_timeout_ms",
                self.server.client_body_timeout_ms,
            ),
            (
                "server.keyed_body_timeout_ms",
                self.server.keyed_body_timeout_ms,
            ),
            (
                "server.client_send_timeout_ms",
                self.server.client_send_timeout_ms,
            ),
            (
                "server.tunnel_idle_timeout_ms",
                self.server.tunnel_idle_timeout_ms,
            ),
            ("server.max_connections", self.server.max_connections as u64),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::at_field(*field, "at least 1, found 0"));
        }
        if self.upstream.url.is_none() {
            return Err(ConfigError::plain(
                "upstream.url: missing; give `[upstream] url = \"http://host:port\"` in the config file or --upstream",
            ));
        }
        Ok(self)
    }

    /// Checks what the cache itself needs, upstream aside (the tower layer has none): a
    /// TLS CA only with `rediss://`, a key secret whenever Redis is configured, and route
    /// warming settings in range.
    ///
    /// Errors: the first of those that does not hold.
    pub fn check_cache(&self) -> Result<(), ConfigError> {
        for name in &self.cache.targeted_cache_control {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::at_field(
                    "cache.targeted_cache_control",
                    format!("{name:?} is not a header name"),
                ));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if route.warm_hot_keys > crate::warm::MAX_HOT_KEYS {
                return Err(ConfigError::at_field(
                    format!("routes[{i}].warm_hot_keys"),
                    format!(
                        "at most {}, found {}",
                        crate::warm::MAX_HOT_KEYS,
                        route.warm_hot_keys
                    ),
                ));
            }
            if route
                .refresh_ahead
                .is_some_and(|share| !(share > 0.0 && share < 1.0))
            {
                return Err(ConfigError::at_field(
                    format!("routes[{i}].refresh_ahead"),
                    "a share of the TTL between 0 and 1 (exclusive), e.g. 0.5",
                ));
            }
            if let Some(unknown) = route.request_cache_control.iter().find(|d| {
                !crate::policy::REQUEST_DIRECTIVES.contains(&d.to_ascii_lowercase().as_str())
            }) {
                return Err(ConfigError::at_field(
                    format!("routes[{i}].request_cache_control"),
                    format!(
                        "{unknown:?} is not one of no-cache, only-if-cached, max-stale, min-fresh"
                    ),
                ));
            }
            let headers = route.vary_headers.iter().flatten();
            if let Some(bad) = route
                .key_headers
                .iter()
                .chain(headers)
                .find(|name| http::HeaderName::from_bytes(name.as_bytes()).is_err())
            {
                let field = if route.key_headers.contains(bad) {
                    "key_headers"
                } else {
                    "vary_headers"
                };
                return Err(ConfigError::at_field(
                    format!("routes[{i}].{field}"),
                    format!("{bad:?} is not a header name"),
                ));
            }
            if let Some(bad) = route
                .cache_statuses
                .iter()
                .flatten()
                .find(|&&status| !(200..=599).contains(&status) || status == 206)
            {
                return Err(ConfigError::at_field(
                    format!("routes[{i}].cache_statuses"),
                    format!(
                        "{bad} cannot be stored: statuses from 200 to 599, 206 (a partial response) aside"
                    ),
                ));
            }
            let mut tags = route.tags.iter();
            if let Err(e) = tags.try_for_each(|t| crate::tags::check_template(t)) {
                return Err(ConfigError::at_field(format!("routes[{i}].tags"), e));
            }
            if route.warm_interval_secs == 0 {
                return Err(ConfigError::at_field(
                    format!("routes[{i}].warm_interval_secs"),
                    "at least 1 second",
                ));
            }
        }
        for (field, name) in [
            (
                "cache.surrogate_key_header",
                &self.cache.surrogate_key_header,
            ),
            ("cache.cache_tag_header", &self.cache.cache_tag_header),
        ] {
            // Empty: none read.
            if !name.is_empty() && http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::at_field(
                    field,
                    format!("{name:?} is not a header name"),
                ));
            }
        }
        let route_names: Vec<String> = self.routes.iter().map(RouteConfig::display_name).collect();
        for (i, route) in self.routes.iter().enumerate() {
            if let Some(j) = self.routes[..i]
                .iter()
                .position(|r| r.method == route.method && r.path == route.path)
            {
                return Err(ConfigError::at_field(
                    format!("routes[{i}].path"),
                    format!("routes[{j}] has the same method and path: this one would never match"),
                ));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if route.key_body && matches!(route.method.0, http::Method::GET | http::Method::HEAD) {
                return Err(ConfigError::at_field(
                    format!("routes[{i}].key_body"),
                    "a GET or HEAD with a body is never cached: key_body is for POST-like routes",
                ));
            }
            if route.forward_unkeyed_query && route.key_query.is_none() {
                return Err(ConfigError::at_field(
                    format!("routes[{i}].forward_unkeyed_query"),
                    "only used with key_query (without it, every parameter is keyed)",
                ));
            }
        }
        for (i, event) in self.events.iter().enumerate() {
            if self.events[..i].iter().any(|e| e.name == event.name) {
                return Err(ConfigError::at_field(
                    format!("events[{i}].name"),
                    format!("{:?} names an earlier event too", event.name),
                ));
            }
        }
        for (i, event) in self.events.iter().enumerate() {
            if let Some(unknown) = event.routes.iter().find(|r| !route_names.contains(r)) {
                return Err(ConfigError::at_field(
                    format!("events[{i}].routes"),
                    format!(
                        "no route is named {unknown:?} (a route's `name`, else \"METHOD path\")"
                    ),
                ));
            }
            let mut paths = event.paths.iter();
            if let Err(e) = paths.try_for_each(|p| crate::tags::check_path_pattern(p)) {
                return Err(ConfigError::at_field(format!("events[{i}].paths"), e));
            }
        }
        if let Some(redis) = &self.redis
            && redis.tls_ca_file.is_some()
            && !redis.url.0.starts_with("rediss://")
        {
            return Err(ConfigError::at_field(
                "redis.tls_ca_file",
                "only used with a rediss:// URL",
            ));
        }
        if self.redis.is_some() && self.cache.key_secret.as_deref().unwrap_or("").is_empty() {
            return Err(ConfigError::at_field(
                "cache.key_secret",
                "required when Redis is configured (replicas must derive the same cache keys); set it in [cache] or CACHEGATE_KEY_SECRET",
            ));
        }
        Ok(())
    }

    /// The effective config as TOML, with the key secret redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.cache.key_secret.is_some() {
            shown.cache.key_secret = Some("<redacted>".to_string());
        }
        if shown.admin.token.is_some() {
            shown.admin.token = Some("<redacted>".to_string());
        }
        if let Some(redis) = &mut shown.redis {
            redis.url = RedisUrl(redis.url.redacted());
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Says "a whole number of bytes" where serde says "u64", naming the unit from the field's
/// suffix (`_bytes`, `_ms`, `_secs`, `_percent`).
/// `message` without the value it quotes (`invalid type: integer `123`, expected a
/// string`: the value may be a secret, in an inline table the field is not told apart;
/// the line and column show where it is).
fn without_value(message: &str) -> String {
    let Some(rest) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
    else {
        return message.to_string();
    };
    let head = message.len() - rest.len();
    // The value: `...` (numbers, booleans, ...) or "..." (strings, escaped as in Rust).
    let Some(open) = rest.find(['`', '"']) else {
        return message.to_string();
    };
    let quote = rest.as_bytes()[open];
    let mut escaped = false;
    let close = rest[open + 1..].bytes().position(|b| {
        let end = !escaped && b == quote;
        escaped = !escaped && b == b'\\' && quote == b'"';
        end
    });
    match close {
        Some(close) => {
            let (start, end) = (head + open, head + open + 1 + close + 1);
            let start = if message[..start].ends_with(' ') {
                start - 1
            } else {
                start
            };
            format!("{}{}", &message[..start], &message[end..])
        }
        None => message[..head + open].trim_end().to_string(),
    }
}

fn plain_words(field: &str, message: &str) -> String {
    // A secret's value is never repeated (the message reaches logs on a reload).
    let last = field.rsplit('.').next().unwrap_or(field);
    let secret = last.contains("secret") || last.contains("token") || last.contains("password");
    if secret && message.starts_with("invalid") {
        return "expected a string (the value given is not shown: it is a secret)".to_string();
    }
    let unit = [
        ("_bytes", " of bytes"),
        ("_ms", " of milliseconds"),
        ("_secs", " of seconds"),
        ("_connections", " of connections"),
        ("_failures", " of failures"),
    ]
    .iter()
    .find(|(suffix, _)| field.ends_with(suffix))
    .map_or("", |(_, unit)| unit);
    let mut out = message.to_string();
    for ty in ["u64", "u32", "u16", "u8", "usize", "i64"] {
        out = out.replace(
            &format!("expected {ty}"),
            &format!("expected a whole number{unit} (0 or more)"),
        );
    }
    out
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_line_and_field() {
        let shown_for = |text: &str| {
            Config::from_toml(text, Some(Path::new("c.toml")))
                .unwrap_err()
                .to_string()
        };
        let shown = shown_for("[cache]\nrollout_percent = 150\n");
        assert!(shown.starts_with("c.toml:2:"), "{shown}");
        assert!(shown.contains("0 to 100"), "{shown}");

        let text = "[[routes]]\nmethod = \"GET\"\npath = \"/kpi/*\"\nttl = 30\n";
        let shown = shown_for(text);
        assert!(shown.contains("ttl"), "{shown}");
        assert!(shown.contains("c.toml:"), "{shown}");

        // A table missing a required field is named by its own line, with the field.
        let text = "[[routes]]\nmethod = \"GET\"\npath = \"/a\"\nttl_secs = 5\n\n[[routes]]\nmethod = \"GET\"\npath = \"/b\"\n";
        let shown = shown_for(text);
        assert!(shown.starts_with("c.toml:6:"), "{shown}");
        assert!(shown.contains("`routes.ttl_secs`: missing"), "{shown}");
        // Named by that table, not the one before it.
        let text = "[upstream]\nurl = \"http://127.0.0.1:1\"\n\n[[routes]]\nmethod = \"GET\"\npath = \"/b\"\n";
        let shown = shown_for(text);
        assert!(shown.starts_with("c.toml:4:"), "{shown}");
        assert!(shown.contains("`routes.ttl_secs`: missing"), "{shown}");

        // A secret given with the wrong type is not echoed, in a table or inline.
        for text in [
            "[cache]\nkey_secret = 1234567890\n",
            "[admin]\ntoken = 98765432109\n",
            "admin = { token = 98765432109 }\n",
            "cache = { key_secret = 1234567890 }\n",
            "admin = \"98765-token\"\n",
            "redis = \"redis://:12345pw@127.0.0.1:6379\"\n",
            "admin = \"98765 \\\" quoted\"\n",
        ] {
            let shown = shown_for(text);
            assert!(
                !shown.contains("98765") && !shown.contains("12345"),
                "{shown}"
            );
        }
        let text = "[cache]\nmemory_max_bytes = \"lots\"\n";
        let shown = Config::from_toml(text, None).unwrap_err().to_string();
        assert!(
            shown.contains("expected a whole number of bytes"),
            "{shown}"
        );
        let text = "[upstream]\nurl = \"127.0.0.1:8000\"\n";
        let shown = Config::from_toml(text, None).unwrap_err().to_string();
        assert!(
            shown.contains("http://127.0.0.1:8000") && !shown.contains("TLS"),
            "{shown}"
        );
    }

    /// Errors found after parsing (ranges, checks across fields) name the file, the line
    /// of the field at fault and the field; a field the file lacks, its table's line.
    #[test]
    fn checks_after_parsing_name_file_line_and_field() {
        let check = |text: &str| {
            Config::from_toml(text, Some(Path::new("c.toml")))
                .unwrap()
                .finish(&Overrides::default(), |_| None)
                .unwrap_err()
                .to_string()
        };
        let up = "[upstream]\nurl = \"http://127.0.0.1:1\"\n";
        let routes = "[[routes]]\nmethod = \"GET\"\npath = \"/a\"\nttl_secs = 5\n\n[[routes]]\nmethod = \"GET\"\npath = \"/b\"\nttl_secs = 5\nrefresh_ahead = 1.5\n";
        let cases = [
            (routes, "c.toml:12:17: routes[1].refresh_ahead: "),
            (
                "[admin]\nack_timeout_ms = 99999999\n",
                "c.toml:4:18: admin.ack_timeout_ms: at most",
            ),
            // Missing in the file: its table's line, or the file alone without the table.
            (
                "[cache]\nenabled = true\n[redis]\nurl = \"redis://127.0.0.1:2\"\n",
                "c.toml:3:1: cache.key_secret (not set in this table): required",
            ),
            (
                "[redis]\nurl = \"redis://127.0.0.1:2\"\n",
                "c.toml: cache.key_secret: required",
            ),
            // A zero limit would cut everything at once.
            (
                "[server]\nheader_read_timeout_ms = 0\n",
                "c.toml:4:26: server.header_read_timeout_ms: at least 1, found 0",
            ),
            (
                "[server]\nmax_connections = 0\n",
                "c.toml:4:19: server.max_connections: at least 1",
            ),
        ];
        for (rest, expected) in cases {
            let shown = check(&format!("{up}{rest}"));
            assert!(shown.starts_with(expected), "{shown}");
        }
        // Set by the environment, not the file: no file named.
        let shown = Config::from_toml(up, Some(Path::new("c.toml")))
            .unwrap()
            .finish(&Overrides::default(), |name| {
                (name == "CACHEGATE_ROLLOUT_PERCENT").then(|| "x".to_string())
            })
            .unwrap_err()
            .to_string();
        assert!(shown.starts_with("CACHEGATE_ROLLOUT_PERCENT"), "{shown}");
    }

    /// Mistakes across fields are refused at start-up, naming the field.
    #[test]
    fn ambiguous_or_unusable_settings_are_refused() {
        let check = |rest: &str| {
            let text = format!("[upstream]\nurl = \"http://127.0.0.1:1\"\n{rest}");
            Config::from_toml(&text, None)
                .unwrap()
                .finish(&Overrides::default(), |_| None)
                .unwrap_err()
                .to_string()
        };
        let route = |extra: &str| {
            format!("[[routes]]\nmethod = \"GET\"\npath = \"/a\"\nttl_secs = 5\n{extra}\n")
        };
        let cases = [
            (format!("{}{}", route(""), route("name = \"b\"")), "routes[1].path"),
            (route("key_body = true"), "routes[0].key_body"),
            (route("forward_unkeyed_query = true"), "routes[0].forward_unkeyed_query"),
            ("[[events]]\nname = \"e\"\ntags = [\"t\"]\n[[events]]\nname = \"e\"\ntags = [\"u\"]\n".to_string(), "events[1].name"),
            ("[cache]\nsurrogate_key_header = \"bad header\"\n".to_string(), "cache.surrogate_key_header"),
            ("[admin]\ntoken = \"  \"\n".to_string(), "admin.token"),
            ("[admin]\ntoken = \" t \"\n".to_string(), "admin.token"),
            ("[admin]\ntoken = \"t\u{00f6}k\"\n".to_string(), "admin.token"),
            ("[admin]\ntoken = \"a\\nb\"\n".to_string(), "admin.token"),
        ];
        for (rest, field) in cases {
            let shown = check(&rest);
            assert!(shown.starts_with(field), "{rest}: {shown}");
        }
        // From the environment: empty is unset; spaces are named there, not in the file.
        let with_env = |token: &'static str| {
            let text =
                "[upstream]\nurl = \"http://127.0.0.1:1\"\n[admin]\ntoken = \"file-token\"\n";
            Config::from_toml(text, Some(Path::new("c.toml")))
                .unwrap()
                .finish(&Overrides::default(), move |name| {
                    (name == "CACHEGATE_ADMIN_TOKEN").then(|| token.to_string())
                })
        };
        assert_eq!(
            with_env("").unwrap().admin.token.as_deref(),
            Some("file-token")
        );
        let shown = with_env(" t").unwrap_err().to_string();
        assert!(shown.starts_with("CACHEGATE_ADMIN_TOKEN"), "{shown}");
    }

    /// Values that would never match or never work are refused at start-up, not ignored.
    #[test]
    fn values_that_cannot_work_are_refused() {
        let check = |route: &str, events: &str| {
            let text = format!(
                "[upstream]\nurl = \"http://127.0.0.1:1\"\n[[routes]]\nname = \"kpi\"\nmethod = \"GET\"\npath = \"/kpi/*\"\nttl_secs = 5\n{route}\n[[routes]]\nmethod = \"GET\"\npath = \"/b\"\nttl_secs = 5\n{events}"
            );
            Config::from_toml(&text, Some(Path::new("c.toml")))
                .unwrap()
                .finish(&Overrides::default(), |_| None)
                .err()
                .map(|e| e.to_string())
        };
        let refused = [
            (
                "key_headers = [\"bad header\"]",
                "",
                "c.toml:8:15: routes[0].key_headers: ",
            ),
            (
                "vary_headers = [\"a:b\"]",
                "",
                "c.toml:8:16: routes[0].vary_headers: ",
            ),
            (
                "cache_statuses = [200, 999]",
                "",
                "c.toml:8:18: routes[0].cache_statuses: 999",
            ),
            (
                "cache_statuses = [206]",
                "",
                "routes[0].cache_statuses: 206",
            ),
            (
                "cache_statuses = [101]",
                "",
                "routes[0].cache_statuses: 101",
            ),
            (
                "tags = [\"kpi:{query.region\"]",
                "",
                "routes[0].tags: \"kpi:{query.region\": a `{` without",
            ),
            (
                "tags = [\"{path.0}\"]",
                "",
                "routes[0].tags: \"{path.0}\": `{path.0}` is neither",
            ),
            ("tags = [\"{host}\"]", "", "`{host}` is neither"),
            (
                "",
                "[[events]]\nname = \"etl\"\nroutes = [\"kpi\", \"nope\"]\n",
                "c.toml:15:10: events[0].routes: no route is named \"nope\"",
            ),
            (
                "",
                "[[events]]\nname = \"etl\"\npaths = [\"/kpi/*\", \"kpi/*\"]\n",
                "c.toml:15:9: events[0].paths: \"kpi/*\": a path pattern starts with '/'",
            ),
            (
                "",
                "[[events]]\nname = \"etl\"\npaths = [\"/kpi/*/../x\"]\n",
                "events[0].paths: \"/kpi/*/../x\": holds a `.` or `..` segment",
            ),
        ];
        for (route, events, expected) in refused {
            let shown = check(route, events).unwrap_or_default();
            assert!(shown.contains(expected), "{route}{events}: {shown}");
        }
        let accepted = [(
            "key_headers = [\"X-Tenant\"]\ncache_statuses = [200, 404, 503]\ntags = [\"kpi\", \"kpi:{query.region}\", \"{path.2}\"]",
            "[[events]]\nname = \"etl\"\nroutes = [\"kpi\", \"GET /b\"]\n",
        )];
        for (route, events) in accepted {
            assert_eq!(check(route, events), None, "{route}{events}");
        }
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
}
