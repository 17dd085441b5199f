//! The caching reverse proxy: the whole request path, top to bottom, in [`Proxy::handle`].
//!
//! 1. The request target: exactly one `Host` (RFC 9112 §3.2), else 400; the path
//!    normalized once ([`crate::uri::normalize_path`]) for routing, key and upstream.
//! 2. Protocol upgrades are tunnelled ([`upgrade`]); hop-by-hop headers are removed.
//! 3. Admission: kill switch, route, method, body, credentials ([`policy::check_request`]).
//! 4. For body-keyed routes, read the body (bounded in size and time) and canonicalize it
//!    (RFC 8785 over I-JSON).
//! 5. Build the cache key; apply `rollout_percent`; drop query parameters outside the key.
//! 6. Take the client's conditional headers out (answered by the cache, RFC 9110 §13.2).
//!    Look up memory, then Redis.
//! 7. On a miss, coalesce: one leader fetches from the upstream, stores if allowed and
//!    shares the response when it may; followers wait (bounded), go themselves when the
//!    answer may not be shared, and join again when the leader failed.
//!
//! Any request the cache cannot handle is passed through (BYPASS) with the same forwarding
//! rules ([`headers::Forwarding`]), and a cache fault never becomes an error response.
//! Client faults are 4xx, upstream faults 502/504.

pub mod body;
pub mod headers;
pub mod origin;
pub mod refresh;
mod switches;
pub mod upgrade;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use tokio::sync::watch;
use tokio::time::Instant;

pub use self::switches::Switches;

use self::body::{BoxError, Limited, ProxyBody, Side, Timed, body_error, read_limited};
use self::headers::Forwarding;
use self::origin::Origin;
use self::upgrade::{NotTunnelled, TunnelLimits, UpgradeRequest};
use self::upstream::{Upstream, UpstreamError};
use crate::conditional::{self, Conditions};
use crate::config::Config;
use crate::entry::{CachedResponse, Staleness, now_ms};
use crate::key::{
    BodyKeyError, CacheKey, CanonicalBodies, KeyBuilder, KeyParts, canonical_json, in_filter,
    request_key,
};
use crate::metrics::Metrics;
use crate::policy::{self, Policy, Received, RequestDirectives, RequestShape, Route, StoreRules};
use crate::status::{BypassReason, CachePhase, NoStoreReason, StaleReason, Tier};
use crate::tags;
use crate::uri::{self, normalize_path, parse_query, resolve_relative};
use crate::vary;
use crate::warm::HotKeys;

use self::refresh::{Refresh, Refresher, Replay};
use cachegate_core::coalesce::{Coalescer, Leader, Role, WaitOutcome};
use cachegate_core::home::Home;
use cachegate_core::invalidation::{PurgeMode, PurgeScope};
use cachegate_core::store::{Storable, TieredStore};

/// `Cache-Status` (RFC 9211).
const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");
/// `X-Cache-Status`: `HIT`, `MISS`, `BYPASS` or `STALE`.
const X_CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("x-cache-status");

/// Memory for remembered canonical bodies ([`CanonicalBodies`]): thousands of typical
/// request bodies.
const CANONICAL_BODIES_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Size and wait limits applied on the request path.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_request_body_bytes: usize,
    max_response_body_bytes: usize,
    coalesce_wait: Duration,
    client_body_timeout: Duration,
    keyed_body_timeout: Duration,
}

/// The request path: policy, keys, tiers, coalescing, and the [`Origin`] that answers
/// misses (an HTTP [`Upstream`] for `cachegate serve`, the wrapped service for the tower
/// layer).
pub struct Proxy<O = Upstream> {
    policy: Policy,
    keys: KeyBuilder,
    store: TieredStore<CachedResponse>,
    /// Followers get the leader's response, whether or not it was stored.
    coalescer: Coalescer<CacheKey, CachedResponse>,
    origin: O,
    forwarding: Forwarding,
    /// Where the upstream's tags are read from, and whether they reach clients.
    tag_headers: tags::TagHeaders,
    expose_tags: bool,
    /// `preserve_host`: the client's `Host` is forwarded and keyed.
    preserve_host: bool,
    /// Targeted cache-control fields and heuristic freshness.
    store_rules: StoreRules,
    /// Keep the targeted cache-control fields on responses to clients.
    forward_targeted: bool,
    /// Background refreshes (stale-while-revalidate, refresh-ahead, hot keys).
    refresher: Refresher,
    /// The canonical forms of recent `key_body` request bodies.
    canonical_bodies: CanonicalBodies,

    metrics: Arc<Metrics>,
    switches: Arc<Switches>,
    limits: Limits,
    tunnels: TunnelLimits,
}

/// What the cache path needs to know about a request once its key is built.
struct Ctx {
    /// The key looked up and stored under: the request's key, or the key of the variant
    /// it selects when the primary key holds a `Vary` marker ([`crate::vary`]).
    key: CacheKey,
    /// The request's own key (where a `Vary` marker lives).
    primary: CacheKey,
    /// The `Vary` marker found under `primary`, if any.
    marker: Option<CachedResponse>,
    /// When that marker was looked up (ms since the epoch): a re-store of its generation
    /// is stamped no later, so that a purge of `primary` made since covers it.
    marker_read_ms: u64,
    client: SocketAddr,
    method: Method,
    /// The request carries credentials: its answer is never handed to another request.
    credentialed: bool,
    /// The client's validators, taken out of the forwarded request.
    conditions: Conditions,
    /// The tags for this request ([`tags::entry_tags`]; the upstream's are added), made
    /// once the lookup missed (a hit needs none).
    tags: Vec<String>,
    /// A refresh ([`Refresh`]): fetched from the upstream even when an entry is stored.
    refresh: bool,
    /// A stale entry to serve instead of an upstream error (stale-if-error), and where it
    /// was found (how stale it is, and whether still within its window, is judged when it
    /// is served).
    stale: Option<(CachedResponse, Tier)>,
    /// A stale entry to revalidate with its validators (RFC 9111 §4.3): the upstream gets
    /// a conditional request, and a `304` refreshes the entry.
    revalidate: Option<CachedResponse>,
}

/// How a response was produced, for the status headers.
struct Outcome {
    phase: CachePhase,
    /// Freshness left (negative: stale for that long), for hits.
    ttl_secs: Option<i64>,
    fwd_status: Option<u16>,
}

/// A request cachegate refuses itself, and why (the `kind` metric label).
struct ClientFault {
    status: StatusCode,
    reason: &'static str,
    kind: &'static str,
}

/// What a [`Proxy`] shares with the rest of the process.
pub struct Shared {
    /// Builds the cache keys.
    pub keys: KeyBuilder,
    /// The tiers.
    pub store: TieredStore<CachedResponse>,
    /// The flights in progress: every request path of one cache shares it, so that one
    /// request per key reaches the origin.
    pub coalescer: Coalescer<CacheKey, CachedResponse>,
    /// Where every figure is counted.
    pub metrics: Arc<Metrics>,
    /// The kill switch and rollout.
    pub switches: Arc<Switches>,
    /// Turns true at shutdown (closes tunnels).
    pub shutdown: watch::Receiver<bool>,
}

impl Proxy<Upstream> {
    /// Builds the proxy in front of the config's HTTP upstream, from a finished config (see
    /// [`Config::finish`]), with the upstream pool's connections on `home` (see
    /// [`Upstream::new`]).
    pub fn new(config: &Config, shared: Shared, home: Home) -> Self {
        let upstream = Upstream::new(
            &config.upstream,
            home,
            shared.metrics.upstream_retries.clone(),
        );
        let forwarding = Forwarding::new(
            config.server.trusted_proxies.iter().map(|n| n.0).collect(),
            (!config.upstream.preserve_host)
                .then(|| upstream.host_header())
                .flatten(),
        );
        Proxy::with_origin(
            upstream,
            forwarding,
            config.upstream.preserve_host,
            config,
            shared,
        )
    }
}

impl<O: Origin> Proxy<O> {
    /// Builds the request path in front of `origin`, with `config`'s routes and limits,
    /// `forwarding` rules, and the client's `Host` keyed when `preserve_host`.
    pub fn with_origin(
        origin: O,
        forwarding: Forwarding,
        preserve_host: bool,
        config: &Config,
        shared: Shared,
    ) -> Self {
        let Shared {
            keys,
            store,
            coalescer,
            metrics,
            switches,
            shutdown,
        } = shared;
        let open_tunnels = metrics.open_tunnels.clone();
        Proxy {
            policy: Policy::new(&config.routes),
            keys,
            store,
            coalescer,
            origin,
            forwarding,
            tag_headers: tags::TagHeaders {
                surrogate_key: config.cache.surrogate_key_header.to_ascii_lowercase(),
                cache_tag: config.cache.cache_tag_header.to_ascii_lowercase(),
            },
            expose_tags: config.cache.expose_tags,
            preserve_host,
            store_rules: StoreRules {
                targeted: config
                    .cache
                    .targeted_cache_control
                    .iter()
                    .filter_map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
                    .collect(),
                heuristic_freshness: config.cache.heuristic_freshness,
                revalidate_grace_secs: config.cache.revalidate_grace_secs,
            },
            forward_targeted: config.cache.forward_targeted_cache_control,
            refresher: Refresher::new(
                config.cache.max_background_refreshes,
                Duration::from_millis(config.upstream.total_timeout_ms.max(1)),
            ),
            canonical_bodies: CanonicalBodies::new(CANONICAL_BODIES_MAX_BYTES),
            metrics,
            switches,
            limits: Limits {
                max_request_body_bytes: config.cache.max_request_body_bytes,
                max_response_body_bytes: config.cache.max_response_body_bytes,
                coalesce_wait: Duration::from_millis(config.cache.coalesce_wait_ms),
                client_body_timeout: Duration::from_millis(
                    config.server.client_body_timeout_ms.max(1),
                ),
                keyed_body_timeout: Duration::from_millis(
                    config.server.keyed_body_timeout_ms.max(1),
                ),
            },
            tunnels: TunnelLimits {
                idle_timeout: Duration::from_millis(config.server.tunnel_idle_timeout_ms.max(1)),
                shutdown,
                open: open_tunnels,
            },
        }
    }

    /// Answers one client request. Never fails: client faults become 4xx, upstream faults
    /// 502/504 with a short plain-text reason, cache faults are misses.
    pub async fn handle<B>(&self, req: Request<B>, client: SocketAddr) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        // The ways out that leave the hit path (`bypass`, `fetch`, `tunnel`, `pass_on`,
        // `untouched`) are awaited from the heap (`Box::pin`): held inline, their futures
        // (1.6-3 KB each) made this one 5 KB, copied whole several times on every request
        // on its way into hyper; a hit now moves only what the hit path holds (2.5 KB).
        // One spelling of the path, for routing, the key and the upstream.
        let target = normalize_path(req.uri().path());
        if !O::CACHES_UNROUTED && self.policy.route_for(req.method(), &target.path).is_none() {
            return Box::pin(self.untouched(req, client)).await;
        }
        let (mut parts, body) = req.into_parts();

        // The request target: one Host, a form a reverse proxy serves, one spelling of the
        // path.
        if let Err(fault) = check_host(&parts)
            .and_then(|()| check_target_form(&parts))
            .and_then(|()| take_target_host(&mut parts))
        {
            return self.refuse(fault);
        }
        let query = parts.uri.query().map(str::to_owned);
        if target.path != parts.uri.path() && !is_asterisk_form(&parts) {
            set_path_and_query(&mut parts, &target.path, query.as_deref());
        }
        let has_body = !body.is_end_stream();
        let body = if has_body {
            let timeout = self.limits.client_body_timeout;
            body::boxed(Timed::new(body, Side::Client, timeout, None))
        } else {
            body::boxed(body)
        };

        if is_asterisk_form(&parts) {
            // `OPTIONS *` asks about the server, not a resource: passed on as it is.
            headers::remove_hop_by_hop(&mut parts.headers);
            return Box::pin(self.bypass(parts, body, client, BypassReason::Method)).await;
        }
        if headers::wants_upgrade(&parts.headers) {
            if O::TUNNELS {
                return Box::pin(self.tunnel(parts, body, client)).await;
            }
            // The origin is the service itself: it gets the upgrade, connection and all.
            return Box::pin(self.pass_on(parts, body, BypassReason::Upgrade)).await;
        }
        headers::remove_hop_by_hop(&mut parts.headers);

        // Admission: may this request use the cache at all?
        if !self.switches.enabled() {
            return Box::pin(self.bypass(parts, body, client, BypassReason::Disabled)).await;
        }
        let route = self.policy.route_for(&parts.method, &target.path);
        let shape = RequestShape {
            has_body,
            ambiguous_path: target.ambiguous,
            ambiguous_query: policy::ambiguous_query(query.as_deref(), route),
        };
        if let Err(reason) = policy::check_request(route, &parts.method, &parts.headers, shape) {
            return Box::pin(self.bypass(parts, body, client, reason)).await;
        }

        // The body, for routes that key on it.
        let (body, canonical_body, keyed_body) = match route.filter(|r| r.config.key_body) {
            None => (body, None, None),
            // Read whole for the key: it must arrive in time, however it trickles (what
            // goes on to the upstream past `max_request_body_bytes` is the upstream's to
            // bound).
            Some(_) => match tokio::time::timeout(
                self.limits.keyed_body_timeout,
                read_limited(body, self.limits.max_request_body_bytes),
            )
            .await
            {
                Err(_) => return self.refuse(BODY_TIMEOUT),
                Ok(Ok(Limited::Complete(bytes))) => match self.canonical_bodies.canonical(&bytes) {
                    Ok(canonical) => (body::full(bytes.clone()), Some(canonical), Some(bytes)),
                    Err(e) => {
                        let reason = match e {
                            BodyKeyError::MalformedJson => BypassReason::MalformedBody,
                            BodyKeyError::NotIJson => BypassReason::NotIJson,
                        };
                        return Box::pin(self.bypass(parts, body::full(bytes), client, reason))
                            .await;
                    }
                },
                Ok(Ok(Limited::TooLarge(rest))) => {
                    return Box::pin(self.bypass(
                        parts,
                        body::boxed(rest),
                        client,
                        BypassReason::OversizedBody,
                    ))
                    .await;
                }
                Ok(Err(e)) => return self.refuse(request_body_fault(&e)),
            },
        };

        // The key, and whether it is in the rollout. A trusted proxy's forwarded origin
        // reaches the upstream, so it is keyed.
        let params = parse_query(query.as_deref().unwrap_or(""));
        let query_filter = route.and_then(|r| r.config.key_query.as_deref());
        let key = self.key_of(
            &parts,
            &target.path,
            &params,
            route,
            canonical_body.as_deref(),
            client,
        );
        if !self.switches.rolled_out(&key) {
            return Box::pin(self.bypass(parts, body, client, BypassReason::Rollout)).await;
        }
        // A stored answer may not depend on a parameter the key ignores.
        if query_filter.is_some() && !route.is_some_and(|r| r.config.forward_unkeyed_query) {
            let kept: Vec<&str> = params
                .iter()
                .filter(|p| in_filter(query_filter, &p.name))
                .map(|p| p.raw)
                .collect();
            let kept = (!kept.is_empty()).then(|| kept.join("&"));
            set_path_and_query(&mut parts, &target.path, kept.as_deref());
        }

        // From here on the cache answers: the client's own conditions are evaluated by
        // cachegate, and the upstream gets an unconditional request whose full response
        // can be stored and shared.
        let ctx = Ctx {
            key,
            primary: key,
            marker: None,
            marker_read_ms: 0,
            client,
            method: parts.method.clone(),
            credentialed: policy::credentialed(&parts.headers),
            conditions: Conditions::take(&mut parts.headers),
            tags: Vec::new(),
            refresh: parts.extensions.get::<Refresh>().is_some(),
            stale: None,
            revalidate: None,
        };
        // What a refresh of this key would send: its keyed parts only.
        let key_headers = route.map_or(&[][..], |r| &r.config.key_headers[..]);
        // Hot-key warming counts the route's requests per key, keeping a copy of a key's
        // request to refresh it with. Never a credentialed one.
        if let Some(hot_keys) = route.and_then(|r| r.hot_keys.as_deref())
            && !ctx.refresh
            && !ctx.credentialed
            && (!has_body || keyed_body.is_some())
            && parts.method != Method::HEAD
        {
            hot_keys.record(&key, || {
                let body = keyed_body.clone().unwrap_or_default();
                Replay::keyed(&parts, key_headers, body, client)
            });
        }

        // Lookup: memory, then Redis (a refresh goes to the upstream). A fresh entry is a
        // hit (and may start a refresh-ahead); a stale one is served at once while one
        // background request refreshes it (stale-while-revalidate), or kept to answer an
        // upstream error (stale-if-error), or ignored.
        let mut ctx = ctx;
        // The request's time (RFC 9111 §4.2.3's `now`): what a memory-tier hit is judged
        // at, one clock read; read again after whatever may have waited on Redis.
        let mut now = now_ms();
        let mut found = self.store.lookup_marked(&key, now).await;
        // Vary: the primary key holds a marker; the variant this request selects has its
        // own key. A soft-purged marker counts as none: the next answer stored starts a
        // new generation, so every variant is fetched again.
        if let Some((marker, _, soft_purged)) = &found
            && marker.is_vary_marker()
        {
            if *soft_purged {
                found = None;
            } else {
                ctx.key = vary::variant_key(
                    &self.keys,
                    &key,
                    marker.vary_generation(),
                    &marker.vary_names(),
                    &parts.headers,
                );
                ctx.marker = Some(marker.clone());
                ctx.marker_read_ms = now;
                now = judged_at(&found, now);
                found = self.store.lookup_marked(&ctx.key, now).await;
            }
        }
        let key = ctx.key;
        let now = judged_at(&found, now);
        // A refresh of this entry sends the keyed parts of this request, and the headers
        // its variant is selected by (in the variant key already). Made only when a
        // refresh is queued.
        let replay = || {
            let body = keyed_body.clone().unwrap_or_default();
            match &ctx.marker {
                None => Replay::keyed(&parts, key_headers, body, client),
                Some(marker) => {
                    let mut headers = key_headers.to_vec();
                    headers.extend(marker.vary_names());
                    Replay::keyed(&parts, &headers, body, client)
                }
            }
        };
        // The request's own Cache-Control, where the route honours it.
        let directives = route.map_or_else(RequestDirectives::default, |r| {
            RequestDirectives::parse(&parts.headers, &r.config.request_cache_control)
        });
        if directives.no_cache {
            // Fetched and stored again, whatever is stored (still one request per key).
            ctx.refresh = true;
        }
        // A refresh of an entry with a validator asks the upstream whether it changed
        // rather than for all of it (RFC 9111 §4.3.1).
        if ctx.refresh
            && (ctx.method == Method::GET || ctx.method == Method::HEAD)
            && let Some((entry, _, _)) = &found
            && !entry.is_vary_marker()
            && entry.has_validator()
        {
            ctx.revalidate = Some(entry.clone());
        }
        if !ctx.refresh
            && let Some((entry, tier, soft_purged)) = found
        {
            let replay = || replay().map(Arc::new);
            let staleness = entry.staleness(now);
            if soft_purged {
                // A soft purge marked it stale: served stale while one background request
                // refreshes it (removed if that stores nothing); never when it must be
                // revalidated; without background refreshes, a miss.
                if !entry.freshness().must_revalidate
                    && self
                        .refresher
                        .request_after_soft_purge(&key, entry.stored_at_ms(), replay)
                {
                    let outcome = stale(StaleReason::SoftPurge, tier, staleness.stale_secs(), None);
                    return self.serve_entry(&entry, &ctx, outcome, now);
                }
            } else {
                match staleness {
                    Staleness::Fresh { left }
                        if directives.min_fresh.is_some_and(|min| left.as_secs() < min) =>
                    {
                        // Not fresh enough for this request: fetched again.
                        ctx.refresh = true;
                    }
                    Staleness::Stale { secs }
                        if !entry.freshness().must_revalidate
                            && directives.max_stale.is_some_and(|max| secs <= max) =>
                    {
                        let outcome = stale(StaleReason::MaxStale, tier, secs, None);
                        return self.serve_entry(&entry, &ctx, outcome, now);
                    }
                    Staleness::Fresh { left } => {
                        if refresh_ahead_due(route, &entry, left) {
                            self.refresher
                                .request(&key, entry.stored_at_ms(), replay, None);
                        }
                        return self.serve_entry(&entry, &ctx, hit(&entry, tier, now), now);
                    }
                    Staleness::Stale { secs } => {
                        let f = entry.freshness();
                        if secs <= u64::from(f.stale_while_revalidate_secs)
                            && self
                                .refresher
                                .request(&key, entry.stored_at_ms(), replay, None)
                        {
                            let outcome = stale(StaleReason::Revalidating, tier, secs, None);
                            return self.serve_entry(&entry, &ctx, outcome, now);
                        }
                        let can_revalidate = secs <= u64::from(f.revalidate_secs)
                            && (ctx.method == Method::GET || ctx.method == Method::HEAD);
                        if can_revalidate {
                            ctx.revalidate = Some(entry.clone());
                        }
                        if secs <= u64::from(f.stale_if_error_secs) {
                            ctx.stale = Some((entry, tier));
                        }
                    }
                }
            }
        }

        // Past the lookup: what an entry stored for this request will be tagged with.
        ctx.tags = tags::entry_tags(route, &target.path, &params);
        if directives.only_if_cached {
            // RFC 9111 §5.2.1.7: nothing usable stored, and the request forbids fetching.
            let phase = CachePhase::Miss(Err(NoStoreReason::OnlyIfCached));
            let resp = plain(
                StatusCode::GATEWAY_TIMEOUT,
                "not in the cache (only-if-cached)",
            );
            return self.finish(resp, miss(phase, None), Some(&key));
        }
        // A request that went round a forwarding loop would wait on its own flight.
        if self.forwarding.looped(&parts.headers) {
            let phase = CachePhase::Miss(Err(NoStoreReason::UpstreamError));
            return self.finish(self.forwarding_loop(), miss(phase, None), Some(&key));
        }
        // Miss: one request per key goes to the upstream. A follower whose leader failed
        // joins again, so that one of them leads the next attempt.
        let deadline = Instant::now() + self.limits.coalesce_wait;
        // The flight joined: the key's, a variant's, or that of the requests that select
        // the same variant of an answer that varied and was not stored (one hop at most).
        // `flight_names`: the headers its requests all have the same values of; an answer
        // that varies on exactly these may be shared.
        let mut flight = ctx.key;
        let mut flight_names = ctx
            .marker
            .as_ref()
            .map(CachedResponse::vary_names)
            .unwrap_or_default();
        let mut hopped = false;
        let mut rejoined_after_purge = false;
        loop {
            let follower = match self.coalescer.join(&flight) {
                Role::Leader(leader) => {
                    return Box::pin(self.fetch(parts, body, route, &ctx, Some(leader))).await;
                }
                Role::Follower(follower) => follower,
            };
            let waits = &self.metrics.coalesced_waits;
            match follower
                .wait(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                WaitOutcome::Shared(entry)
                    if !rejoined_after_purge
                        && (self.store.is_purged(&ctx.primary, &entry)
                            || (ctx.key != ctx.primary
                                && self.store.is_purged(&ctx.key, &entry))) =>
                {
                    // A purge, or an unsafe request to the target (RFC 9111 §4.4), made
                    // since the leader's request was sent covers its answer: served to the
                    // leader's own requester only. The waiters join again, once (one of
                    // them leads a new request, sent after they all arrived: whatever
                    // purge covers its answer was made while they waited), so that none
                    // gets what a purge confirmed before it arrived, and purges made
                    // faster than the upstream answers cannot turn a flight into a
                    // stampede. What the lookup kept from before the purge goes too.
                    waits.inc("purged");
                    rejoined_after_purge = true;
                    ctx.revalidate = None;
                    ctx.stale = None;
                    continue;
                }
                WaitOutcome::Shared(entry)
                    if let names = vary::variant_names(&entry.headers(), key_headers)
                        && names != flight_names =>
                {
                    // The leader's answer varies on headers this request was not selected
                    // by: it may not share it. It takes the variant it selects (stored by
                    // now if it is the leader's), else waits on, or leads, that variant's
                    // own flight.
                    let (primary, headers) = (ctx.primary, parts.headers.clone());
                    let read_ms = now_ms();
                    match self.store.lookup(&primary).await {
                        Some((marker, _)) if marker.is_vary_marker() => {
                            let names = marker.vary_names();
                            let generation = marker.vary_generation();
                            let variant = vary::variant_key(
                                &self.keys, &primary, generation, &names, &headers,
                            );
                            ctx.marker = Some(marker);
                            ctx.marker_read_ms = read_ms;
                            if variant == ctx.key {
                                // The same marker it had: not shareable after all.
                                return Box::pin(self.fetch(parts, body, route, &ctx, None)).await;
                            }
                            ctx.key = variant;
                            flight = variant;
                            flight_names = names;
                            // Fresh only (not one kept stale for its grace).
                            let now = now_ms();
                            if let Some(found) = self
                                .store
                                .lookup_memory(&ctx.key)
                                .filter(|found| found.is_fresh(now))
                            {
                                waits.inc("served");
                                let outcome =
                                    miss(CachePhase::Collapsed, Some(found.status().as_u16()));
                                return self.serve_entry(&found, &ctx, outcome, now);
                            }
                            continue;
                        }
                        // Nothing stored to select a variant by (the answer was not
                        // stored: an error, no freshness): the requests that select the
                        // same variant of it share one flight of their own, keyed by their
                        // values of the headers it varies on under a generation no marker
                        // has, so that an upstream in trouble gets one request per variant,
                        // not one per waiter.
                        _ if !hopped => {
                            flight = vary::variant_key(
                                &self.keys,
                                &primary,
                                vary::UNSTORED_GENERATION,
                                &names,
                                &headers,
                            );
                            (flight_names, hopped) = (names, true);
                            continue;
                        }
                        _ => {
                            waits.inc("released");
                            return Box::pin(self.fetch(parts, body, route, &ctx, None)).await;
                        }
                    }
                }
                WaitOutcome::Shared(entry) => {
                    waits.inc("served");
                    let status = entry.status().as_u16();
                    // The leader got an upstream error: a stale entry at hand answers it.
                    if matches!(status, 500 | 502 | 503 | 504)
                        && let Some(resp) = self.serve_stale_if_error(&ctx, Some(status))
                    {
                        return resp;
                    }
                    let outcome = miss(CachePhase::Collapsed, Some(status));
                    return self.serve_entry(&entry, &ctx, outcome, now_ms());
                }
                WaitOutcome::Released => {
                    waits.inc("released");
                    return Box::pin(self.fetch(parts, body, route, &ctx, None)).await;
                }
                WaitOutcome::TimedOut => {
                    waits.inc("timeout");
                    return Box::pin(self.fetch(parts, body, route, &ctx, None)).await;
                }
                WaitOutcome::Failed => {
                    waits.inc("retried");
                    // The leader failed: with a stale entry at hand, that is the answer.
                    if let Some(resp) = self.serve_stale_if_error(&ctx, None) {
                        return resp;
                    }
                }
            }
        }
    }

    /// Forwards a cacheable request to the upstream, stores the response when policy allows,
    /// and (as leader) shares it with followers when it may be given to another request.
    /// A leader dropped without sharing or releasing fails the flight: its followers join
    /// again.
    async fn fetch(
        &self,
        mut parts: Parts,
        body: ProxyBody,
        route: Option<&Route>,
        ctx: &Ctx,
        leader: Option<Leader<CacheKey, CachedResponse>>,
    ) -> Response<ProxyBody> {
        let key = &ctx.key;
        // A flight that ended between our lookup and our join has just stored its entry.
        let now = now_ms();
        if !ctx.refresh
            && let Some(entry) = self.store.lookup_memory(key)
            && entry.is_fresh(now)
            && !entry.is_vary_marker()
        {
            if let Some(leader) = leader {
                leader.share(entry.clone());
            }
            return self.serve_entry(&entry, ctx, hit(&entry, Tier::Memory, now), now);
        }
        // Kept to select the variant a response that varies is stored as.
        let request_headers = parts.headers.clone();
        // A stale entry with validators: ask whether it is still good (RFC 9111 §4.3.1),
        // keeping the plain request to ask again if the answer is about another version.
        let mut unconditional = None;
        if let Some(stored) = &ctx.revalidate {
            let mut again = Request::new(());
            *again.method_mut() = parts.method.clone();
            *again.uri_mut() = parts.uri.clone();
            *again.version_mut() = parts.version;
            *again.headers_mut() = parts.headers.clone();
            unconditional = Some(again.into_parts().0);
            conditional::add_validators(&mut parts.headers, &stored.headers());
        }
        // RFC 9111 §4.3.5: a HEAD answer may show the GET entry of the target outdated.
        let get_key = (parts.method == Method::HEAD).then(|| {
            parts.method = Method::GET;
            let key = self.key_for_parts(&parts, &Bytes::new(), ctx.client).ok();
            parts.method = Method::HEAD;
            key
        });
        let mut sent = self.send(parts, body, ctx.client).await;
        if let (Ok((head, ..)), Some(stored)) = (&sent, &ctx.revalidate)
            && head.status == StatusCode::NOT_MODIFIED
        {
            // A 304 that lost a field a cache decides by (`Connection` named it) cannot
            // refresh the entry either.
            if conditional::same_version(&stored.headers(), &head.headers)
                && head.extensions.get::<PolicyFieldsRemoved>().is_none()
                && let Ok((head, _, _, received)) = sent
            {
                return self.revalidated(stored, &head.headers, received, route, ctx, leader);
            }
            // A 304 about another version (another ETag) cannot refresh the stored body
            // (RFC 9111 §4.3.4): the whole response is fetched again.
            if let Some(again) = unconditional {
                sent = self.send(again, body::empty(), ctx.client).await;
            }
        }
        let (mut head, resp_body, response_tags, received) = match sent {
            Ok(sent) => sent,
            Err(error_response) => {
                if let Some(resp) = self.serve_stale_if_error(ctx, None) {
                    return resp;
                }
                let phase = CachePhase::Miss(Err(NoStoreReason::UpstreamError));
                return self.finish(error_response, miss(phase, None), Some(key));
            }
        };
        let fwd_status = Some(head.status.as_u16());
        // RFC 5861 §4: an error is a 500, 502, 503 or 504.
        if matches!(head.status.as_u16(), 500 | 502 | 503 | 504)
            && let Some(resp) = self.serve_stale_if_error(ctx, fwd_status)
        {
            return resp;
        }
        let decision = if head.extensions.get::<PolicyFieldsRemoved>().is_some() {
            // What it said about caching was removed on the way: fail closed.
            Err(NoStoreReason::Unparsable)
        } else {
            policy::storable(
                route,
                head.status,
                &head.headers,
                received,
                &self.store_rules,
            )
        };
        // May another request have this answer? Never when it is private to its requester
        // (whatever its status) or the request was credentialed, even on a per-credential key.
        let shareable = !ctx.credentialed && decision.as_ref().err().is_none_or(|r| r.shareable());
        if decision.is_err() && !shareable {
            // Neither stored nor shared: stream it; followers go to the upstream themselves.
            if let Some(leader) = leader {
                leader.release();
            }
            let reason = decision.err().unwrap_or(NoStoreReason::Private);
            self.strip_targeted(&mut head.headers);
            let resp = Response::from_parts(head, body::boxed(resp_body));
            return self.finish(
                resp,
                miss(CachePhase::Miss(Err(reason)), fwd_status),
                Some(key),
            );
        }
        let bytes = match read_limited(resp_body, self.limits.max_response_body_bytes).await {
            Ok(Limited::Complete(bytes)) => bytes,
            Ok(Limited::TooLarge(rest)) => {
                if let Some(leader) = leader {
                    leader.release();
                }
                self.strip_targeted(&mut head.headers);
                let resp = Response::from_parts(head, body::boxed(rest));
                let phase = CachePhase::Miss(Err(NoStoreReason::TooLarge));
                return self.finish(resp, miss(phase, fwd_status), Some(key));
            }
            Err(e) => {
                let timed_out = body_error(e.as_ref()).is_some_and(|b| b.timed_out);
                let (status, kind, text) = if timed_out {
                    (
                        StatusCode::GATEWAY_TIMEOUT,
                        "body-timeout",
                        "upstream response body timed out",
                    )
                } else {
                    (
                        StatusCode::BAD_GATEWAY,
                        "body",
                        "upstream response body failed",
                    )
                };
                self.metrics.upstream_errors.inc(kind);
                tracing::warn!(error = %e, "upstream response body failed");
                if let Some(resp) = self.serve_stale_if_error(ctx, fwd_status) {
                    return resp;
                }
                let phase = CachePhase::Miss(Err(NoStoreReason::UpstreamError));
                return self.finish(plain(status, text), miss(phase, fwd_status), Some(key));
            }
        };
        let entry = CachedResponse::new(
            head.status,
            &head.headers,
            &bytes,
            // Stamped when its request was sent: a purge made meanwhile covers it.
            received.requested_at_ms(),
            decision.unwrap_or_default(),
            &[&ctx.tags[..], &response_tags[..]].concat(),
        );
        // An entry no tier holds (heavier than the memory tier's limit, no Redis) is
        // reported as too large, not as stored.
        let decision = match decision {
            Ok(_) if !self.store_response(ctx, &request_headers, route, &entry) => {
                Err(NoStoreReason::TooLarge)
            }
            other => other,
        };
        // Judged only for a HEAD answer that is stored: once per its lifetime, not at every
        // client's will.
        if let Some(Some(get_key)) = get_key
            && decision.is_ok()
            && entry.status() == StatusCode::OK
        {
            self.judge_stored_get(get_key, &request_headers, &entry.headers());
        }
        match leader {
            Some(leader) if shareable => leader.share(entry.clone()),
            Some(leader) => leader.release(),
            None => {}
        }
        let outcome = miss(CachePhase::Miss(decision.map(|_| ())), fwd_status);
        self.serve_entry(&entry, ctx, outcome, now_ms())
    }

    /// Marks stale, on every replica (a soft purge, RFC 9111 §4.3.5: "consider the stored
    /// response stale"), the `GET` entry stored under `get_key` when the variant of it
    /// that `request_headers` select, held in this replica's memory tier, is shown to be
    /// of another version by a stored `200` answer to a `HEAD` request for the same target
    /// with headers `head` ([`conditional::head_contradicts`]). Never waits.
    fn judge_stored_get(
        &self,
        get_key: CacheKey,
        request_headers: &http::HeaderMap,
        head: &http::HeaderMap,
    ) {
        let Some(mut stored) = self.store.lookup_memory(&get_key) else {
            return;
        };
        if stored.is_vary_marker() {
            let variant = vary::variant_key(
                &self.keys,
                &get_key,
                stored.vary_generation(),
                &stored.vary_names(),
                request_headers,
            );
            match self.store.lookup_memory(&variant) {
                Some(entry) => stored = entry,
                None => return,
            }
        }
        if conditional::head_contradicts(&stored.headers(), head) {
            // The primary key: its variants are fetched again too.
            let store = self.store.clone();
            let scope = PurgeScope::Keys(vec![get_key]);
            tokio::spawn(async move {
                store.purge_as(scope, PurgeMode::Soft, Duration::ZERO).await;
            });
        }
    }

    /// Stores `entry`, the response to the request of `ctx` (whose headers are
    /// `request_headers`): under the request's key, or, when it varies on headers beyond
    /// the key, as the variant the request selects, with a `Vary` marker under the
    /// request's key (a new one, starting a new generation, when there was none or it
    /// named other headers). Returns whether a tier holds it.
    fn store_response(
        &self,
        ctx: &Ctx,
        request_headers: &http::HeaderMap,
        route: Option<&Route>,
        entry: &CachedResponse,
    ) -> bool {
        let key_headers = route.map_or(&[][..], |r| &r.config.key_headers[..]);
        let names = vary::variant_names(&entry.headers(), key_headers);
        if names.is_empty() {
            return self.store.store(ctx.primary, entry.clone());
        }
        let now = now_ms();
        // Stamped like the entry (when its request was sent), so that a purge of the
        // primary key made while it was in flight covers the marker too; the generation
        // (the time now) only tells generations apart.
        let stamp = entry.stored_at_ms();
        // The marker lives at least as long as the variants (and is stored again, same
        // generation, once half its life has passed, so that they stay reachable).
        let lifetime = entry.ttl_secs().saturating_add(entry.grace_secs());
        let generation = match &ctx.marker {
            Some(marker) if marker.vary_names() == names => {
                let generation = marker.vary_generation();
                let half_life = u64::from(marker.ttl_secs()) * 500;
                if now.saturating_sub(marker.stored_at_ms()) > half_life
                    || marker.ttl_secs() < lifetime
                {
                    // Its generation was read before this request waited and was sent: a
                    // purge made since must cover the re-stored marker too.
                    let stamp = stamp.min(ctx.marker_read_ms);
                    let again = CachedResponse::vary_marker(&names, generation, stamp, lifetime);
                    self.store.store(ctx.primary, again);
                }
                generation
            }
            _ => {
                let marker = CachedResponse::vary_marker(&names, now, stamp, lifetime);
                self.store.store(ctx.primary, marker);
                now
            }
        };
        let variant = vary::variant_key(
            &self.keys,
            &ctx.primary,
            generation,
            &names,
            request_headers,
        );
        self.store.store(variant, entry.clone())
    }

    /// A `304` to a revalidation: the stored entry, its headers updated with the 304's
    /// (RFC 9111 §4.3.4, §3.2: framing and content coding kept), its freshness computed
    /// again from them, stored, shared with the followers and served.
    fn revalidated(
        &self,
        stored: &CachedResponse,
        not_modified: &http::HeaderMap,
        received: Received,
        route: Option<&Route>,
        ctx: &Ctx,
        leader: Option<Leader<CacheKey, CachedResponse>>,
    ) -> Response<ProxyBody> {
        let (mut headers, body) = stored.parts();
        conditional::update_stored_headers(&mut headers, not_modified);
        let decision = policy::storable(
            route,
            stored.status(),
            &headers,
            received,
            &self.store_rules,
        );
        let tags: Vec<String> = stored.tags().map(str::to_string).collect();
        let entry = CachedResponse::new(
            stored.status(),
            &headers,
            &body,
            received.requested_at_ms(),
            decision.unwrap_or_default(),
            &tags,
        );
        let stored_now = decision.is_ok() && self.store.store(ctx.key, entry.clone());
        let shareable = !ctx.credentialed && decision.as_ref().err().is_none_or(|r| r.shareable());
        match leader {
            Some(leader) if shareable => leader.share(entry.clone()),
            Some(leader) => leader.release(),
            None => {}
        }
        let outcome = Outcome {
            phase: CachePhase::Revalidated(stored_now),
            ttl_secs: None,
            fwd_status: Some(304),
        };
        self.serve_entry(&entry, ctx, outcome, now_ms())
    }

    /// Passes a request through to the upstream, streaming both ways, without the cache.
    async fn bypass(
        &self,
        parts: Parts,
        body: ProxyBody,
        client: SocketAddr,
        reason: BypassReason,
    ) -> Response<ProxyBody> {
        let phase = CachePhase::Bypass(reason);
        // RFC 9111 §4.4: what an unsafe request changes is invalidated once it succeeds.
        let target = is_unsafe(&parts.method).then(|| {
            let pq = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
            (pq.to_string(), parts.headers.clone())
        });
        match self.send(parts, body, client).await {
            Ok((mut head, resp_body, _, _)) => {
                if let Some((pq, headers)) = target
                    && !head.status.is_client_error()
                    && !head.status.is_server_error()
                {
                    self.invalidate_after_unsafe(&pq, &headers, &head.headers, client);
                }
                self.strip_targeted(&mut head.headers);
                let outcome = miss(phase, Some(head.status.as_u16()));
                let resp = Response::from_parts(head, body::boxed(resp_body));
                self.finish(resp, outcome, None)
            }
            Err(error_response) => self.finish(error_response, miss(phase, None), None),
        }
    }

    /// Invalidates, on every replica, what a successful unsafe request to `target` (path
    /// and query) changed (RFC 9111 §4.4): the `GET` and `HEAD` entries of its target URI,
    /// and of the `Location` and `Content-Location` of the response when they are on the
    /// same origin (a path, or an absolute URL whose authority is the request's `Host`).
    /// Keyed with the request's own headers, so a route's other keyed variants stay.
    /// Applies here at once; the other replicas are reached in the background.
    fn invalidate_after_unsafe(
        &self,
        target: &str,
        headers: &http::HeaderMap,
        response: &http::HeaderMap,
        client: SocketAddr,
    ) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let mut targets = vec![target.to_string()];
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(value) = response.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            // A relative reference (`item-2`, `?page=2`): resolved against the target.
            let (base_path, base_query) = match target.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (target, None),
            };
            if let Some(pq) = resolve_relative(base_path, base_query, value) {
                targets.push(pq);
                continue;
            }
            let Ok(uri) = value.parse::<http::Uri>() else {
                continue;
            };
            let same_origin = match uri.authority() {
                // `//host/p` is a network-path reference, not a path: never ours without
                // the authority check.
                None => uri.path().starts_with('/') && !value.starts_with("//"),
                Some(authority) => host.is_some_and(|h| h.eq_ignore_ascii_case(authority.as_str())),
            };
            if same_origin && let Some(pq) = uri.path_and_query() {
                targets.push(pq.as_str().to_string());
            }
        }
        let mut keys = Vec::with_capacity(targets.len() * 2);
        for pq in &targets {
            for method in [Method::GET, Method::HEAD] {
                let Ok(uri) = pq.parse::<http::Uri>() else {
                    continue;
                };
                let mut req = Request::new(());
                *req.method_mut() = method;
                *req.uri_mut() = uri;
                *req.headers_mut() = headers.clone();
                let (parts, ()) = req.into_parts();
                let path = normalize_path(parts.uri.path()).path;
                let params = parse_query(parts.uri.query().unwrap_or(""));
                let route = self.policy.route_for(&parts.method, &path);
                keys.push(self.key_of(&parts, &path, &params, route, None, client));
            }
        }
        self.store.purge_keys_in_background(keys);
    }

    /// The cache key of a request: the one place it is computed, for lookups and for
    /// purges by request. `path` is the normalized path, `params` the parsed query,
    /// `canonical_body` the RFC 8785 body on `key_body` routes. A trusted proxy's forwarded
    /// origin reaches the upstream, so it is keyed.
    fn key_of(
        &self,
        parts: &Parts,
        path: &str,
        params: &[crate::uri::QueryParam<'_>],
        route: Option<&Route>,
        canonical_body: Option<&[u8]>,
        client: SocketAddr,
    ) -> CacheKey {
        let forwarded = (!O::REWRITES_FORWARDING || self.forwarding.trusts(client.ip()))
            .then(|| headers::forwarded_origin(&parts.headers))
            .flatten();
        request_key(
            &self.keys,
            &KeyParts {
                method: &parts.method,
                path,
                host: (self.preserve_host || !O::REWRITES_FORWARDING)
                    .then(|| host_str(parts))
                    .flatten(),
                forwarded: forwarded.as_deref(),
                query: params,
                query_filter: route.and_then(|r| r.config.key_query.as_deref()),
                headers: &parts.headers,
                header_names: route.map_or(&[], |r| &r.config.key_headers),
                canonical_body,
                content_type: canonical_body
                    .and(parts.headers.get(header::CONTENT_TYPE))
                    .map(HeaderValue::as_bytes),
            },
        )
    }

    /// The key a request would be looked up under, for "purge what this request would
    /// hit": `request` carries the method, URL (path and query; the `Host` header for
    /// `preserve_host`), the headers and, on `key_body` routes, the JSON body, and is keyed
    /// exactly as [`Proxy::handle`] keys it for a client that is not a trusted proxy.
    ///
    /// Errors: a body a `key_body` route cannot key (not JSON, not I-JSON).
    pub fn key_for_purge(&self, request: Request<Bytes>) -> Result<CacheKey, &'static str> {
        let (parts, body) = request.into_parts();
        self.key_for_parts(&parts, &body, NO_CLIENT)
    }

    /// The keys a purge by request covers: [`Proxy::key_for_purge`]'s, and for a `GET`,
    /// the `HEAD` entry of the same target too (stored under its own key).
    ///
    /// Errors: as [`Proxy::key_for_purge`].
    pub fn keys_for_purge(&self, request: Request<Bytes>) -> Result<Vec<CacheKey>, &'static str> {
        let (mut parts, body) = request.into_parts();
        let mut keys = vec![self.key_for_parts(&parts, &body, NO_CLIENT)?];
        if parts.method == Method::GET {
            parts.method = Method::HEAD;
            keys.push(self.key_for_parts(&parts, &body, NO_CLIENT)?);
        }
        Ok(keys)
    }

    /// The key of the request `parts` with `body`, made by `client` (a purge by request:
    /// no client, so no forwarded origin is trusted).
    fn key_for_parts(
        &self,
        parts: &Parts,
        body: &Bytes,
        client: SocketAddr,
    ) -> Result<CacheKey, &'static str> {
        let target = normalize_path(parts.uri.path());
        let params = parse_query(parts.uri.query().unwrap_or(""));
        let route = self.policy.route_for(&parts.method, &target.path);
        let canonical = match route.filter(|r| r.config.key_body) {
            Some(_) => Some(canonical_json(body).map_err(|_| "the body is not I-JSON")?),
            None => None,
        };
        Ok(self.key_of(
            parts,
            &target.path,
            &params,
            route,
            canonical.as_deref(),
            client,
        ))
    }

    /// The background refreshes, for [`refresh::run_refreshes`].
    pub fn refresher(&self) -> &Refresher {
        &self.refresher
    }

    /// Whether an entry for `key` stored after `since_ms` is held, in memory or in Redis
    /// (another replica's refresh): a refresh asked for an entry stored then is not
    /// needed any more. A newer Redis entry is copied into memory.
    pub async fn stored_since(&self, key: &CacheKey, since_ms: u64) -> bool {
        let in_memory = self
            .store
            .lookup_memory(key)
            .is_some_and(|entry| entry.stored_at_ms() > since_ms);
        in_memory || self.store.newer_from_redis(key, since_ms).await.is_some()
    }

    /// Whether this replica should refresh `key` now (see
    /// [`TieredStore::try_refresh_lease`]).
    pub async fn try_refresh_lease(&self, key: &CacheKey, ttl: Duration, token: u64) -> bool {
        self.store.try_refresh_lease(key, ttl, token).await
    }

    /// Gives back `key`'s refresh lease (see [`TieredStore::release_refresh_lease`]).
    pub async fn release_refresh_lease(&self, key: &CacheKey, token: u64) {
        self.store.release_refresh_lease(key, token).await;
    }

    /// Removes `key`'s entry from every tier (a soft-purged entry whose refresh stored
    /// nothing: it is not served stale any longer).
    pub async fn remove_entry(&self, key: &CacheKey) {
        self.store.remove(key).await;
    }

    /// Serves the stale entry `ctx` holds for stale-if-error (RFC 5861 §4) in place of an
    /// upstream error (`fwd_status`: its status; `None`: no answer); `None` without one.
    fn serve_stale_if_error(
        &self,
        ctx: &Ctx,
        fwd_status: Option<u16>,
    ) -> Option<Response<ProxyBody>> {
        let (entry, tier) = ctx.stale.as_ref()?;
        // Judged again now: the upstream may have taken its whole timeout to fail.
        let now = now_ms();
        let secs = entry.staleness(now).stale_secs();
        if secs > u64::from(entry.freshness().stale_if_error_secs) {
            return None;
        }
        let outcome = stale(StaleReason::IfError, *tier, secs, fwd_status);
        Some(self.serve_entry(entry, ctx, outcome, now))
    }

    /// Whether this cache decides by the response field `name`: one of
    /// [`headers::is_cache_field`], a configured targeted cache-control field, or a
    /// configured tag header (an entry stored without its tags escapes purges by tag).
    fn decides_by(&self, name: &http::HeaderName) -> bool {
        headers::is_cache_field(name)
            || self.store_rules.targeted.contains(name)
            // (Lower-cased from the config, as header names are.)
            || name.as_str() == self.tag_headers.surrogate_key
            || name.as_str() == self.tag_headers.cache_tag
    }

    /// Removes the targeted cache-control fields (RFC 9213) meant for cachegate from a
    /// response to a client, unless configured to keep them.
    fn strip_targeted(&self, headers: &mut http::HeaderMap) {
        let targeted = &self.store_rules.targeted;
        // Removed only when one is there: one pass over the names instead of a hashed
        // removal per targeted field on every hit.
        if !self.forward_targeted && headers.keys().any(|name| targeted.contains(name)) {
            for name in targeted {
                headers.remove(name);
            }
        }
    }

    /// Counts a request whose handling panicked (`cachegate_panics_total`).
    pub fn count_panic(&self) {
        self.metrics.panics.inc();
    }

    /// The hot-key trackers of the routes with `warm_hot_keys`, for [`crate::warm::run_hot_keys`].
    pub fn hot_key_trackers(&self) -> Vec<Arc<HotKeys>> {
        self.policy.hot_keys()
    }

    /// Whether the entry for `key` is due for a refresh: gone, or with no more than
    /// `lead(ttl)` of its freshness left. A due memory entry is compared with Redis first:
    /// an entry another replica stored since is copied into memory, and the key is due only
    /// if that one is too.
    pub async fn refresh_due(&self, key: &CacheKey, lead: impl Fn(Duration) -> Duration) -> bool {
        let due = |entry: &CachedResponse, now: u64| {
            let ttl = Duration::from_secs(entry.ttl_secs().into());
            entry.remaining_ttl(now) <= lead(ttl)
        };
        let local = self.store.lookup_memory(key);
        if local.as_ref().is_some_and(|e| !due(e, now_ms())) {
            return false;
        }
        let newer_than = local.as_ref().map_or(0, CachedResponse::stored_at_ms);
        match self.store.newer_from_redis(key, newer_than).await {
            // Judged after the round trip.
            Some(entry) => due(&entry, now_ms()),
            None => true,
        }
    }

    /// Whether a request would use the cache at all (a route, or `GET`/`HEAD` without
    /// one, and admission, [`policy::check_request`]): warm lists replay only such
    /// requests, so that a list cannot make the upstream do what a cacheable request would
    /// not. Errors: why not, as a bypass reason label (`method`, `authorization`, ...).
    pub fn check_cacheable(&self, request: &Request<Bytes>) -> Result<(), &'static str> {
        let target = normalize_path(request.uri().path());
        let route = self.policy.route_for(request.method(), &target.path);
        if route.is_none() && !O::CACHES_UNROUTED {
            return Err("no-route");
        }
        let shape = RequestShape {
            has_body: !request.body().is_empty(),
            ambiguous_path: target.ambiguous,
            ambiguous_query: policy::ambiguous_query(request.uri().query(), route),
        };
        policy::check_request(route, request.method(), request.headers(), shape)
            .map_err(BypassReason::as_str)
    }

    /// Sends a request that is none of the cache's business to the origin as it came and
    /// returns its response as it is (only an origin failure becomes a 502).
    ///
    /// A successful unsafe request still invalidates what it changed (RFC 9111 §4.4).
    async fn untouched<B>(&self, req: Request<B>, client: SocketAddr) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let target = is_unsafe(req.method()).then(|| {
            let path = normalize_path(req.uri().path()).path;
            let pq = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            (pq, req.headers().clone())
        });
        match self.origin.send(req.map(body::boxed)).await {
            Ok((resp, _)) => {
                if let Some((pq, headers)) = target
                    && !resp.status().is_client_error()
                    && !resp.status().is_server_error()
                {
                    self.invalidate_after_unsafe(&pq, &headers, resp.headers(), client);
                }
                resp
            }
            Err(e) => self.upstream_failure(e),
        }
    }

    /// Passes a request to the origin exactly as it came (headers, extensions, connection
    /// upgrade), without the cache: for an origin that is the service itself.
    async fn pass_on(
        &self,
        parts: Parts,
        body: ProxyBody,
        reason: BypassReason,
    ) -> Response<ProxyBody> {
        let phase = CachePhase::Bypass(reason);
        match self.origin.send(Request::from_parts(parts, body)).await {
            Ok((resp, _)) => {
                let fwd_status = Some(resp.status().as_u16());
                self.finish(resp, miss(phase, fwd_status), None)
            }
            Err(e) => self.finish(self.upstream_failure(e), miss(phase, None), None),
        }
    }

    /// Tunnels a protocol upgrade (WebSocket) to the upstream; never cached.
    async fn tunnel(
        &self,
        mut parts: Parts,
        body: ProxyBody,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let phase = CachePhase::Bypass(BypassReason::Upgrade);
        let upgrade = UpgradeRequest::take(&mut parts.extensions);
        headers::remove_hop_by_hop(&mut parts.headers);
        let Some(upgrade) = upgrade else {
            return self
                .bypass(parts, body, client, BypassReason::Upgrade)
                .await;
        };
        if self.forwarding.looped(&parts.headers) {
            return self.finish(self.forwarding_loop(), miss(phase, None), None);
        }
        upgrade.restore_headers(&mut parts.headers);
        self.forwarding.apply(&mut parts.headers, client);
        let resp = match self.origin.send(Request::from_parts(parts, body)).await {
            Ok((resp, _)) => resp,
            Err(e) => return self.finish(self.upstream_failure(e), miss(phase, None), None),
        };
        let fwd_status = Some(resp.status().as_u16());
        let resp = match upgrade.tunnel(resp, self.tunnels.clone()) {
            Ok(switching) => switching.map(|()| body::empty()),
            Err(NotTunnelled::Answer(other)) => {
                let (mut head, resp_body) = other.into_parts();
                headers::own_response_framing(&mut head.headers, false);
                Response::from_parts(head, body::boxed(resp_body))
            }
            Err(NotTunnelled::WrongProtocol) => {
                self.metrics.upstream_errors.inc("malformed");
                plain(
                    StatusCode::BAD_GATEWAY,
                    "upstream switched to a protocol other than WebSocket",
                )
            }
        };
        self.finish(resp, miss(phase, fwd_status), None)
    }

    /// Applies the forwarding rules, sends to the upstream and records its latency. Returns
    /// the response head with cachegate's own framing ([`headers::own_response_framing`]),
    /// and the streaming body. Errors are turned into the response that the client gets.
    async fn send(
        &self,
        mut parts: Parts,
        body: ProxyBody,
        client: SocketAddr,
    ) -> Result<(http::response::Parts, ProxyBody, Vec<String>, Received), Response<ProxyBody>>
    {
        if O::REWRITES_FORWARDING {
            if self.forwarding.looped(&parts.headers) {
                return Err(self.forwarding_loop());
            }
            self.forwarding.apply(&mut parts.headers, client);
        } else {
            headers::strip_overrides(&mut parts.headers);
        }
        let head_request = parts.method == Method::HEAD;
        match self.origin.send(Request::from_parts(parts, body)).await {
            Ok((resp, elapsed)) => {
                self.metrics
                    .upstream_duration
                    .observe(elapsed.as_secs_f64());
                let (mut head, body) = resp.into_parts();
                let named = headers::own_response_framing(&mut head.headers, head_request);
                if named.iter().any(|name| self.decides_by(name)) {
                    head.extensions.insert(PolicyFieldsRemoved);
                }
                let tags = tags::take_response_tags(
                    &mut head.headers,
                    &self.tag_headers,
                    self.expose_tags,
                );
                Ok((head, body, tags, Received::now(elapsed)))
            }
            Err(e) => Err(self.upstream_failure(e)),
        }
    }

    /// The response for a failed exchange: 502/504 for the upstream's faults, 400/408 when
    /// the client's request body failed or stalled.
    fn upstream_failure(&self, e: UpstreamError) -> Response<ProxyBody> {
        match e {
            UpstreamError::Unreachable(reason) => {
                self.metrics.upstream_errors.inc("unreachable");
                tracing::warn!(%reason, "upstream unreachable");
                plain(StatusCode::BAD_GATEWAY, "upstream unreachable")
            }
            UpstreamError::Malformed(reason) => {
                self.metrics.upstream_errors.inc("malformed");
                tracing::warn!(%reason, "upstream reply malformed");
                plain(StatusCode::BAD_GATEWAY, "upstream reply malformed")
            }
            UpstreamError::Timeout => {
                self.metrics.upstream_errors.inc("timeout");
                tracing::warn!("upstream timed out");
                plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out")
            }
            UpstreamError::ClientBody { timed_out } => {
                self.refuse(if timed_out { BODY_TIMEOUT } else { BAD_BODY })
            }
        }
    }

    /// The answer to a request that already went through this process (a forwarding
    /// loop, [`Forwarding::looped`]): `508 Loop Detected` (RFC 5842 §7.2), counted as an
    /// upstream error of kind `loop`.
    fn forwarding_loop(&self) -> Response<ProxyBody> {
        self.metrics.upstream_errors.inc("loop");
        tracing::warn!("forwarding loop: the upstream URL leads back to this cachegate");
        plain(StatusCode::LOOP_DETECTED, "forwarding loop")
    }

    /// A client fault answered by cachegate itself, counted by kind.
    fn refuse(&self, fault: ClientFault) -> Response<ProxyBody> {
        self.metrics.client_errors.inc(fault.kind);
        tracing::debug!(
            status = fault.status.as_u16(),
            kind = fault.kind,
            "client error"
        );
        let mut resp = plain(fault.status, fault.reason);
        if fault.status == StatusCode::METHOD_NOT_ALLOWED {
            // RFC 9110 §15.5.6: a 405 lists the methods that are served.
            resp.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        resp
    }

    /// Builds the response for a stored or shared entry: the entry itself, or `304 Not
    /// Modified` when the client's conditions say it has it already. Its `Age` is the
    /// entry's age at `now_ms`: the time it is served at (for an entry served straight
    /// from the lookup, the time it was judged at, a moment before).
    fn serve_entry(
        &self,
        entry: &CachedResponse,
        ctx: &Ctx,
        outcome: Outcome,
        now_ms: u64,
    ) -> Response<ProxyBody> {
        let is_get = ctx.method == Method::GET || ctx.method == Method::HEAD;
        let (headers, stored_body) = entry.parts();
        let mut resp = if is_get
            && entry.status() == StatusCode::OK
            && ctx.conditions.not_modified(&headers)
        {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            *resp.headers_mut() = conditional::not_modified_headers(headers);
            resp
        } else {
            let body = if ctx.method == Method::HEAD {
                body::empty()
            } else {
                body::full(stored_body)
            };
            let mut resp = Response::new(body);
            *resp.status_mut() = entry.status();
            *resp.headers_mut() = headers;
            resp
        };
        if let CachePhase::Hit(_) | CachePhase::Stale(..) | CachePhase::Revalidated(_) =
            outcome.phase
        {
            // RFC 9111 §5.1: the current age, the age it arrived with included.
            // Digits copied once (`HeaderValue::from(u64)` allocates twice).
            let mut digits = itoa::Buffer::new();
            match HeaderValue::from_str(digits.format(entry.current_age_secs(now_ms))) {
                Ok(age) => drop(resp.headers_mut().insert(header::AGE, age)),
                // Digits always make a value; never the stored `Age` sent on unchanged.
                Err(_) => drop(resp.headers_mut().remove(header::AGE)),
            }
        }
        // Stored with the entry (a revalidation recomputes freshness from them), never
        // sent on.
        self.strip_targeted(resp.headers_mut());
        self.finish(resp, outcome, Some(&ctx.key))
    }

    /// Adds `X-Cache-Status` and `Cache-Status` (RFC 9211: our member goes last), counts the
    /// request and logs it (key hash only, never raw request data).
    fn finish(
        &self,
        mut resp: Response<ProxyBody>,
        outcome: Outcome,
        key: Option<&CacheKey>,
    ) -> Response<ProxyBody> {
        let phase = outcome.phase;
        let headers = resp.headers_mut();
        let mut ours = String::with_capacity(64);
        phase.write_cache_status(&mut ours, outcome.ttl_secs, outcome.fwd_status);
        // The upstream's caches' members come first, in order, from every line they came
        // in, as bytes (RFC 9211 §2; RFC 9110 §5.3: lines of a list field combine with
        // commas; empty ones add nothing). Without any, nothing is allocated here.
        let mut upstream = Vec::new();
        for line in headers.get_all(&CACHE_STATUS) {
            let line = line.as_bytes().trim_ascii();
            if !line.is_empty() {
                upstream.extend_from_slice(line);
                upstream.extend_from_slice(b", ");
            }
        }
        let value = if upstream.is_empty() {
            HeaderValue::try_from(ours).ok()
        } else {
            upstream.extend_from_slice(ours.as_bytes());
            HeaderValue::from_bytes(&upstream).ok()
        };
        if let Some(value) = value {
            headers.insert(CACHE_STATUS, value);
        }
        headers.insert(
            X_CACHE_STATUS,
            HeaderValue::from_static(phase.x_cache_status()),
        );
        self.metrics.record(phase);
        tracing::debug!(
            status = resp.status().as_u16(),
            cache = phase.status_label(),
            reason = phase.reason_label(),
            key = key.map(CacheKey::short).unwrap_or_default(),
            "request"
        );
        resp
    }
}

const BAD_BODY: ClientFault = ClientFault {
    status: StatusCode::BAD_REQUEST,
    reason: "request body could not be read",
    kind: "body",
};

const BODY_TIMEOUT: ClientFault = ClientFault {
    status: StatusCode::REQUEST_TIMEOUT,
    reason: "request body timed out",
    kind: "body-timeout",
};

/// Marks an upstream response whose `Connection` named a field a cache decides by (such as
/// `Cache-Control`), removed as hop-by-hop ([`headers::remove_hop_by_hop`]): not stored,
/// not shared.
#[derive(Clone, Copy)]
struct PolicyFieldsRemoved;

/// The client of a request made by cachegate itself (a purge by request): no address,
/// so never a trusted proxy.
const NO_CLIENT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one `Host`; no request has two; its
/// value is `uri-host [ ":" port ]` (RFC 3986 §3.2.2), or empty.
fn check_host(parts: &Parts) -> Result<(), ClientFault> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() || (first.is_none() && parts.version == Version::HTTP_11) {
        return Err(ClientFault {
            status: StatusCode::BAD_REQUEST,
            reason: "a request needs exactly one Host header",
            kind: "host",
        });
    }
    if first.is_some_and(|host| !uri::is_host_value(host.as_bytes())) {
        return Err(ClientFault {
            status: StatusCode::BAD_REQUEST,
            reason: "the Host header is not a host[:port]",
            kind: "host",
        });
    }
    Ok(())
}

/// Refuses the request-target forms a reverse proxy does not serve (RFC 9112 §3.2):
/// `CONNECT` (cachegate is not a forward proxy) gets `405`; the authority form with any
/// other method, and the asterisk form with any method but `OPTIONS`, get `400`.
fn check_target_form(parts: &Parts) -> Result<(), ClientFault> {
    if parts.method == Method::CONNECT {
        return Err(ClientFault {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: "CONNECT is not served: this is a reverse proxy",
            kind: "method",
        });
    }
    if parts.uri.scheme().is_none() && parts.uri.authority().is_some() {
        // Authority form (`GET host:port`) is for CONNECT only (RFC 9112 §3.2.3).
        return Err(ClientFault {
            status: StatusCode::BAD_REQUEST,
            reason: "the authority-form target is for CONNECT only",
            kind: "target",
        });
    }
    if parts.uri.path() == "*" && !is_asterisk_form(parts) {
        return Err(ClientFault {
            status: StatusCode::BAD_REQUEST,
            reason: "the asterisk-form target is for OPTIONS only",
            kind: "target",
        });
    }
    Ok(())
}

/// RFC 9112 §3.2.2: a request in absolute form (`GET http://host/path`) names its host in
/// the target, and the `Host` header is ignored and replaced by it, so that the `Host`
/// keyed and forwarded with `preserve_host` is the one the target names. A target with
/// another scheme than `http` or `https`, with userinfo (`http://user@host/`, which RFC
/// 9110 §4.2.4 forbids) or with a host that is not a `host[:port]` gets `400`.
fn take_target_host(parts: &mut Parts) -> Result<(), ClientFault> {
    let Some(authority) = parts
        .uri
        .authority()
        .filter(|_| parts.uri.scheme().is_some())
    else {
        return Ok(());
    };
    if !matches!(parts.uri.scheme_str(), Some("http" | "https")) {
        return Err(ClientFault {
            status: StatusCode::BAD_REQUEST,
            reason: "the absolute-form target is not an http or https URI",
            kind: "target",
        });
    }
    const NOT_A_HOST: ClientFault = ClientFault {
        status: StatusCode::BAD_REQUEST,
        reason: "the absolute-form target's authority is not a host[:port]",
        kind: "target",
    };
    let host = authority.as_str();
    if host.contains('@') || !uri::is_host_value(host.as_bytes()) {
        return Err(NOT_A_HOST);
    }
    let host = HeaderValue::from_str(host).map_err(|_| NOT_A_HOST)?;
    parts.headers.insert(header::HOST, host);
    Ok(())
}

/// RFC 9110 §9.2.1: every method but `GET`, `HEAD`, `OPTIONS` and `TRACE` is unsafe (or
/// unknown, which a cache treats as unsafe, RFC 9111 §4.4).
fn is_unsafe(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// The time to judge a looked-up entry at: `now` (read before the lookup) for a
/// memory-tier entry fresh then, which came without a round trip; the clock read again
/// for anything else (from Redis, or a stale memory entry that made the lookup ask
/// Redis), so that an entry that expired while Redis answered is not taken as fresh.
fn judged_at(found: &Option<(CachedResponse, Tier, bool)>, now: u64) -> u64 {
    match found {
        Some((entry, Tier::Memory, _)) if entry.is_fresh(now) => now,
        _ => now_ms(),
    }
}

/// `OPTIONS *` (RFC 9112 §3.2.4).
fn is_asterisk_form(parts: &Parts) -> bool {
    parts.method == Method::OPTIONS && parts.uri.path() == "*" && parts.uri.query().is_none()
}

/// The client's `Host`, for `preserve_host`.
fn host_str(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
}

/// Points the request at `path` with `query`; the upstream URL's origin is added later.
fn set_path_and_query(parts: &mut Parts, path: &str, query: Option<&str>) {
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    if let Ok(pq) = PathAndQuery::try_from(pq) {
        parts.uri = pq.into();
    }
}

/// The client fault behind a failed read of a request body: a stall (408) or a malformed
/// or interrupted body (400).
fn request_body_fault(e: &BoxError) -> ClientFault {
    if body_error(e.as_ref()).is_some_and(|b| b.timed_out) {
        BODY_TIMEOUT
    } else {
        BAD_BODY
    }
}

/// A hit on `entry` from `tier`, with the freshness it has left at `now_ms` (when it was
/// judged fresh).
fn hit(entry: &CachedResponse, tier: Tier, now_ms: u64) -> Outcome {
    Outcome {
        phase: CachePhase::Hit(tier),
        ttl_secs: Some(entry.remaining_ttl(now_ms).as_secs() as i64),
        fwd_status: None,
    }
}

/// A stale entry served, `stale_secs` past its freshness, for `reason`; `fwd_status`: the
/// upstream's error status (stale-if-error).
fn stale(reason: StaleReason, tier: Tier, stale_secs: u64, fwd_status: Option<u16>) -> Outcome {
    Outcome {
        phase: CachePhase::Stale(reason, tier),
        ttl_secs: Some(-(stale_secs.min(i64::MAX as u64) as i64)),
        fwd_status,
    }
}

/// Whether a hit on `entry` with `left` of its freshness should start a refresh-ahead:
/// its route says `refresh_ahead = share` and less than that share of its TTL is left.
fn refresh_ahead_due(route: Option<&Route>, entry: &CachedResponse, left: Duration) -> bool {
    route
        .and_then(|r| r.config.refresh_ahead)
        .is_some_and(|share| left.as_secs_f64() < share * f64::from(entry.ttl_secs()))
}

fn miss(phase: CachePhase, fwd_status: Option<u16>) -> Outcome {
    Outcome {
        phase,
        ttl_secs: None,
        fwd_status,
    }
}

/// A short plain-text response generated by cachegate itself.
pub fn plain(status: StatusCode, reason: &'static str) -> Response<ProxyBody> {
    generated(status, reason, "text/plain; charset=utf-8")
}

/// A response generated by cachegate itself: `status`, `body`, and its `Content-Type`.
pub fn generated(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
