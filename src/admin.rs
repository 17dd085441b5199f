//! The admin listener: `/metrics` (Prometheus text format), `/healthz` and `/stats`
//! (JSON), and the mutating `POST /admin/purge`, `POST /admin/events/{name}` and
//! `POST /admin/warm`, which need the admin bearer token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cachegate_core::invalidation::{PurgeMode, PurgeReport, PurgeScope};
use cachegate_core::store::TieredStore;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde::Deserialize;
use serde_json::json;

use crate::config::EventConfig;
use crate::entry::CachedResponse;
use crate::metrics::Metrics;
use crate::proxy::body::{BoxError, Limited, ProxyBody, Side, Timed, body_error, read_limited};
use crate::proxy::{Proxy, Switches, generated, plain};
use crate::warm::{self, RequestSpec};

/// The longest tag, path pattern or route name a purge request may give, in bytes.
const MAX_PURGE_ITEM_BYTES: usize = 1024;

/// The largest purge request body read, in bytes.
const MAX_PURGE_BODY_BYTES: usize = 1 << 20;

/// The largest warm list read by `POST /admin/warm`, in bytes.
const MAX_WARM_BODY_BYTES: usize = 8 << 20;

/// The concurrency of `POST /admin/warm` without `?concurrency=N`.
const DEFAULT_WARM_CONCURRENCY: usize = 8;

/// What the admin endpoints read and act on.
#[derive(Clone)]
pub struct Admin {
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The tiers, for the memory-tier gauges and purges.
    pub store: TieredStore<CachedResponse>,
    /// The run-time switches, shown in `/stats`.
    pub switches: Arc<Switches>,
    /// The bearer token of the mutating endpoints, hashed (compared in constant time);
    /// `None`: they answer 403.
    pub token: Option<blake3::Hash>,
    /// How long a purge waits for the other replicas.
    pub ack_timeout: Duration,
    /// The configured events (`POST /admin/events/{name}`).
    pub events: Arc<Vec<EventConfig>>,
    /// The configured routes' names (`name`, else "METHOD path"): a purge by route names
    /// one of them (else `400`).
    pub route_names: Arc<Vec<String>>,
    /// The request path, to key purges by request exactly as requests are keyed.
    pub proxy: Option<Arc<Proxy>>,
    /// One warm list at a time (`POST /admin/warm` answers 429 while one runs), so that
    /// warming never sends more than its concurrency to the upstream.
    pub warm_slot: Arc<tokio::sync::Semaphore>,
    /// How long a request body may stall between bytes (`client_body_timeout_ms`); the
    /// whole body is also read within [`ADMIN_BODY_DEADLINE`].
    pub body_idle_timeout: Duration,
    /// One permit per purge, event or warm list running ([`MAX_RUNNING`] at most: more get
    /// `429`); shutdown waits for them all ([`Admin::finish_running`]).
    pub running: Arc<tokio::sync::Semaphore>,
}

/// The admin calls that change something: `POST` with the token, each run in a task of
/// its own ([`Admin::handle`]).
#[derive(Debug, Clone, Copy)]
enum Mutation {
    /// `POST /admin/purge`.
    Purge,
    /// `POST /admin/warm`.
    Warm,
    /// `POST /admin/events/{name}`.
    Event,
}

impl Mutation {
    /// The call at `path`, if it is one.
    fn of(path: &str) -> Option<Mutation> {
        match path {
            "/admin/purge" => Some(Mutation::Purge),
            "/admin/warm" => Some(Mutation::Warm),
            _ if path.starts_with("/admin/events/") => Some(Mutation::Event),
            _ => None,
        }
    }

    /// Its name in the audit log.
    fn name(self) -> &'static str {
        match self {
            Mutation::Purge => "purge",
            Mutation::Warm => "warm",
            Mutation::Event => "event",
        }
    }

    /// How to call it, for a `405`.
    fn how(self) -> &'static str {
        match self {
            Mutation::Purge => "POST a JSON purge request",
            Mutation::Warm => "POST a warm list",
            Mutation::Event => "POST to raise an event",
        }
    }
}

/// Purges, events and warm lists running at once at most (their clients may have left).
pub const MAX_RUNNING: usize = 64;

/// The longest an admin request body may take to arrive, however it trickles.
const ADMIN_BODY_DEADLINE: Duration = Duration::from_secs(60);

/// The body of `POST /admin/purge`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    /// Purge every entry tagged with any of these.
    #[serde(default)]
    tags: Vec<String>,
    /// Purge every entry whose normalized path matches any of these globs (`*`: any run of
    /// characters; anchored to the whole path; never the query or body).
    #[serde(default)]
    paths: Vec<String>,
    /// Purge every entry stored by any of these routes (by name).
    #[serde(default)]
    routes: Vec<String>,
    /// Purge what each of these requests would hit.
    #[serde(default)]
    requests: Vec<RequestSpec>,
    /// Mark stale instead of deleting: covered entries are served stale (`STALE`) while
    /// one background request refreshes each, on every replica.
    #[serde(default)]
    soft: bool,
    /// Purge every entry of the namespace.
    #[serde(default)]
    all: bool,
}

impl Admin {
    /// The hashed form of a configured token, for [`Admin::token`].
    pub fn hash_token(token: &str) -> blake3::Hash {
        blake3::hash(token.as_bytes())
    }

    /// Answers one admin request from `peer`. Unknown paths get 404; read endpoints accept
    /// GET/HEAD, `/admin/purge` POST only.
    pub async fn handle<B>(&self, req: Request<B>, peer: SocketAddr) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let path = req.uri().path();
        if let Some(op) = Mutation::of(path) {
            // Method and token first: nothing else is told to a client without the token.
            if let Some(refusal) = self.admit(&req, peer, op) {
                return refusal;
            }
            let Ok(permit) = self.running.clone().try_acquire_owned() else {
                tracing::warn!(target: "audit", client = %peer, op = op.name(), "refused: too many running");
                return plain(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many purges or warm lists running: try again",
                );
            };
            // Its own task: a client that disconnects (a short timeout, Ctrl-C) does not
            // cancel a purge half done, after it applied here and before it was recorded,
            // published and written to the audit log.
            let admin = self.clone();
            let task = tokio::spawn(async move {
                let resp = admin.mutate(op, req, peer).await;
                drop(permit);
                resp
            });
            return task.await.unwrap_or_else(|_| {
                plain(StatusCode::INTERNAL_SERVER_ERROR, "admin request failed")
            });
        }
        let known = matches!(path, "/healthz" | "/metrics" | "/stats");
        if known && req.method() != Method::GET && req.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed");
        }
        match req.uri().path() {
            "/healthz" => plain(StatusCode::OK, "ok\n"),
            "/metrics" => {
                self.store.refresh_gauges();
                let text = self.metrics.encode();
                generated(
                    StatusCode::OK,
                    text,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            }
            "/stats" => {
                self.store.refresh_gauges();
                let mut stats = self.metrics.stats();
                stats["enabled"] = self.switches.enabled().into();
                stats["rollout_percent"] = self.switches.rollout_percent().into();
                stats["redis"]["configured"] = self.store.has_redis().into();
                stats["redis"]["in_sync"] = self.store.in_sync().into();
                let json = serde_json::to_string_pretty(&stats).unwrap_or_default();
                generated(StatusCode::OK, json, "application/json")
            }
            _ => plain(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /stats, /healthz, POST /admin/purge, POST /admin/events/{name} or POST /admin/warm",
            ),
        }
    }

    /// Waits up to `limit` for the purges, events and warm lists still running (those
    /// whose clients left included), so that a shutdown does not cut one half done.
    pub async fn finish_running(&self, limit: Duration) {
        let all = u32::try_from(MAX_RUNNING).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(limit, self.running.acquire_many(all)).await;
    }

    /// `POST /admin/purge`, `/admin/warm` and `/admin/events/{name}`, admitted (method
    /// and token checked).
    async fn mutate<B>(
        &self,
        op: Mutation,
        req: Request<B>,
        peer: SocketAddr,
    ) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        match op {
            Mutation::Event => {
                // Percent-decoded: a name may hold any character (`cachegate purge
                // --event` escapes all but the unreserved ones).
                let name = req.uri().path().trim_start_matches("/admin/events/");
                let bytes: Vec<u8> = crate::uri::percent_decoded(name.as_bytes()).collect();
                let name = String::from_utf8_lossy(&bytes).into_owned();
                self.event(&name, peer).await
            }
            Mutation::Warm => self.warm(req, peer).await,
            Mutation::Purge => {
                let resp = self.purge(req, peer).await;
                // Refused (an unreadable or invalid request): nothing purged.
                let status = resp.status();
                if status.is_client_error() {
                    tracing::info!(target: "audit", client = %peer, op = "purge", status = status.as_u16(), "refused: nothing purged");
                }
                resp
            }
        }
    }

    /// Reads a request body of at most `limit` bytes, stalling at most the idle timeout
    /// between bytes and arriving within [`ADMIN_BODY_DEADLINE`] (or the time `limit` takes
    /// at 30 KB/s, if longer: 280 s for a warm list); the refusal otherwise
    /// (`413` naming `too_large`, `408` for a stall, `400` for a broken body).
    async fn read_body<B>(
        &self,
        body: B,
        limit: usize,
        too_large: &'static str,
    ) -> Result<Bytes, Response<ProxyBody>>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        // The whole body at 30 KB/s at least (a full warm list in about five minutes).
        let allowed = ADMIN_BODY_DEADLINE.max(Duration::from_secs((limit / 30_000) as u64));
        let deadline = tokio::time::Instant::now() + allowed;
        let body = Timed::new(body, Side::Client, self.body_idle_timeout, Some(deadline));
        match read_limited(body, limit).await {
            Ok(Limited::Complete(bytes)) => Ok(bytes),
            Ok(Limited::TooLarge(_)) => Err(plain(StatusCode::PAYLOAD_TOO_LARGE, too_large)),
            Err(e) if body_error(e.as_ref()).is_some_and(|b| b.timed_out) => {
                Err(plain(StatusCode::REQUEST_TIMEOUT, "request body timed out"))
            }
            Err(_) => Err(plain(StatusCode::BAD_REQUEST, "unreadable request body")),
        }
    }

    /// The refusal of a mutating call `op` that is not a POST (405, saying how to call it)
    /// or lacks the admin token (see [`Admin::refusal`]; logged to the audit log); `None`:
    /// go on.
    fn admit<B>(
        &self,
        req: &Request<B>,
        peer: SocketAddr,
        op: Mutation,
    ) -> Option<Response<ProxyBody>> {
        if req.method() != Method::POST {
            return Some(plain(StatusCode::METHOD_NOT_ALLOWED, op.how()));
        }
        let refusal = self.refusal(req)?;
        tracing::warn!(target: "audit", client = %peer, op = op.name(), "refused: no valid admin token");
        Some(refusal)
    }

    /// The refusal for a request without the admin token (403 when none is configured,
    /// 401 when it is missing or wrong); `None` when it carries it.
    fn refusal<B>(&self, req: &Request<B>) -> Option<Response<ProxyBody>> {
        let Some(expected) = &self.token else {
            return Some(plain(
                StatusCode::FORBIDDEN,
                "admin endpoints are off: set [admin] token or CACHEGATE_ADMIN_TOKEN",
            ));
        };
        // Exactly one `Authorization` (a single-value field: two are no token).
        let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
        let given = values
            .next()
            .filter(|_| values.next().is_none())
            .and_then(|v| v.to_str().ok())
            // The scheme is case-insensitive (RFC 9110 §11.1).
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        // blake3::Hash compares in constant time.
        match given {
            Some(token) if Admin::hash_token(token) == *expected => None,
            _ => {
                let mut resp = plain(
                    StatusCode::UNAUTHORIZED,
                    "a valid admin bearer token is required",
                );
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Some(resp)
            }
        }
    }

    /// `POST /admin/events/{name}`: purges what the configured event maps to, on every
    /// replica (as `/admin/purge`). An unknown name is a 404 and a warning.
    async fn event(&self, name: &str, peer: SocketAddr) -> Response<ProxyBody> {
        let event = crate::config::event_scope(&self.events, name);
        self.metrics.count_event(name, event.is_some());
        let Some(event) = event else {
            tracing::warn!(client = %peer, "unknown event raised");
            return plain(
                StatusCode::NOT_FOUND,
                "unknown event: see [[events]] in the config",
            );
        };
        let reports = self.purge_scopes(event.scopes, event.mode).await;
        let confirmed = reports.iter().all(PurgeReport::confirmed);
        tracing::info!(target: "audit", client = %peer, op = "event", event = %name, confirmed, "event");
        let soft = event.mode == PurgeMode::Soft;
        purge_reply(&reports, json!({"event": name, "soft": soft}))
    }

    /// Applies every scope of one purge here and spreads each to the other replicas, all
    /// at once: the whole purge waits for acknowledgements `ack_timeout` at most, however
    /// many scopes it has (tags, paths, requests). One report per scope, in order.
    async fn purge_scopes(&self, scopes: Vec<PurgeScope>, mode: PurgeMode) -> Vec<PurgeReport> {
        futures_util::future::join_all(
            scopes
                .into_iter()
                .map(|scope| self.store.purge_as(scope, mode, self.ack_timeout)),
        )
        .await
    }

    /// `POST /admin/warm[?concurrency=N]`: replays the warm list in the body (see
    /// [`warm::parse_list`]) through the request path, at most N requests at once (default
    /// 8, at most 64), and answers the counts as JSON ([`warm::WarmReport`]): 200 when
    /// every request stored or found a fresh entry, else 207 (some failed); 400 for a list
    /// with an unreadable line (nothing is replayed).
    async fn warm<B>(&self, req: Request<B>, peer: SocketAddr) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let concurrency = match concurrency_param(req.uri().query()) {
            Ok(n) => n,
            Err(text) => return plain(StatusCode::BAD_REQUEST, text),
        };
        let Some(proxy) = &self.proxy else {
            return plain(StatusCode::BAD_REQUEST, "no request path to warm through");
        };
        let too_large = "warm list too large (8 MiB): split it";
        let body = match self
            .read_body(req.into_body(), MAX_WARM_BODY_BYTES, too_large)
            .await
        {
            Ok(bytes) => bytes,
            Err(refusal) => return refusal,
        };
        let Ok(text) = std::str::from_utf8(&body) else {
            return plain(StatusCode::BAD_REQUEST, "a warm list is UTF-8 text");
        };
        let list = match warm::parse_list(text) {
            Ok(list) => list,
            Err(e) => {
                tracing::info!(target: "audit", client = %peer, op = "warm", line = e.line, "refused: unreadable warm list");
                let text = format!(
                    "invalid warm list: {e}; expected one request per line: METHOD URL [JSON body], or a JSON object {{\"method\", \"url\", \"headers\", \"body\"}}"
                );
                return generated(StatusCode::BAD_REQUEST, text, "text/plain; charset=utf-8");
            }
        };
        // Taken once the list is read: a client slow to send one holds no slot.
        let Ok(_slot) = self.warm_slot.clone().try_acquire_owned() else {
            tracing::warn!(target: "audit", client = %peer, op = "warm", "refused: a warm list is running");
            return plain(
                StatusCode::TOO_MANY_REQUESTS,
                "a warm list is running: try again when it has finished",
            );
        };
        let report = warm::warm_list(proxy, &self.metrics, list, concurrency, peer).await;
        tracing::info!(
            target: "audit",
            client = %peer,
            op = "warm",
            requests = report.requests,
            stored = report.stored,
            fresh = report.fresh,
            failed = report.failed,
            "warm"
        );
        let status = if report.failed == 0 {
            StatusCode::OK
        } else {
            StatusCode::MULTI_STATUS
        };
        let json = serde_json::to_string(&report).unwrap_or_default();
        generated(status, json, "application/json")
    }

    /// `POST /admin/purge`: purges by tags and/or the whole namespace on every replica,
    /// and answers what was reached (200; 503 when Redis is configured but was not
    /// reached, the purge then applied on this replica only).
    async fn purge<B>(&self, req: Request<B>, peer: SocketAddr) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let too_large = "purge request too large";
        let body = match self
            .read_body(req.into_body(), MAX_PURGE_BODY_BYTES, too_large)
            .await
        {
            Ok(bytes) => bytes,
            Err(refusal) => return refusal,
        };
        // An object only (serde would also read the fields from an array, in order).
        if body.trim_ascii_start().first() != Some(&b'{') {
            return plain(
                StatusCode::BAD_REQUEST,
                "invalid purge request: expected a JSON object {\"tags\": [...], \"paths\": [...], \"routes\": [...], \"all\": false}",
            );
        }
        let request: PurgeRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                let text = format!(
                    "invalid purge request: {e}; expected {{\"tags\": [...], \"paths\": [...], \"routes\": [...], \"all\": false}}"
                );
                return generated(StatusCode::BAD_REQUEST, text, "text/plain; charset=utf-8");
            }
        };
        let items = || {
            request
                .tags
                .iter()
                .chain(&request.paths)
                .chain(&request.routes)
        };
        if items().any(|t| t.contains('\n')) {
            return plain(
                StatusCode::BAD_REQUEST,
                "a tag, path or route may not contain a line break",
            );
        }
        // Each is kept as a purge marker on every replica and in Redis (up to 50 000).
        if items().any(|t| t.len() > MAX_PURGE_ITEM_BYTES) {
            return plain(
                StatusCode::BAD_REQUEST,
                "a tag, path or route is at most 1024 bytes long",
            );
        }
        if let Some(name) = request
            .routes
            .iter()
            .find(|r| !self.route_names.contains(*r))
        {
            let text = format!("routes: no route is named {name:?}");
            return generated(StatusCode::BAD_REQUEST, text, "text/plain; charset=utf-8");
        }
        // More distinct ones than the markers kept would fold, by themselves, into a
        // purge of everything stored by then.
        let distinct =
            |items: &[String]| items.iter().collect::<std::collections::HashSet<_>>().len();
        if distinct(&request.paths) > cachegate_core::purge::MAX_PATTERN_MARKERS {
            return plain(
                StatusCode::BAD_REQUEST,
                "paths: at most 1000 distinct ones per purge (more would fold into a purge of everything)",
            );
        }
        if distinct(&request.tags) > cachegate_core::purge::MAX_TAG_MARKERS {
            return plain(
                StatusCode::BAD_REQUEST,
                "tags: at most 50000 distinct ones per purge (more would fold into a purge of everything)",
            );
        }
        let mut paths = request.paths.iter();
        if let Err(e) = paths.try_for_each(|p| crate::tags::check_path_pattern(p)) {
            let text = format!("paths: {e}");
            return generated(StatusCode::BAD_REQUEST, text, "text/plain; charset=utf-8");
        }
        // Every part is checked before anything is purged: a bad one purges nothing.
        // `all` together with tags or paths: the tags and paths are covered by `all`.
        let mut scopes =
            crate::tags::purge_scopes(request.all, &request.tags, &request.routes, &request.paths);
        if !request.requests.is_empty() {
            let Some(proxy) = &self.proxy else {
                return plain(
                    StatusCode::BAD_REQUEST,
                    "no request path to key requests with",
                );
            };
            let mut keys = Vec::with_capacity(request.requests.len());
            for (i, target) in request.requests.iter().enumerate() {
                let found = target
                    .to_request()
                    .and_then(|r| proxy.keys_for_purge(r).map_err(str::to_string));
                match found {
                    Ok(found) => keys.extend(found),
                    Err(e) => {
                        let text = format!("requests[{i}]: {e}");
                        return generated(
                            StatusCode::BAD_REQUEST,
                            text,
                            "text/plain; charset=utf-8",
                        );
                    }
                }
            }
            scopes.push(PurgeScope::Keys(keys));
        }
        let mode = if request.soft {
            PurgeMode::Soft
        } else {
            PurgeMode::Hard
        };
        let reports = self.purge_scopes(scopes, mode).await;
        if reports.is_empty() {
            return plain(
                StatusCode::BAD_REQUEST,
                "nothing to purge: give \"tags\", \"paths\", \"routes\", \"requests\" or \"all\": true",
            );
        }
        tracing::info!(
            target: "audit",
            client = %peer,
            op = "purge",
            tags = request.tags.len(),
            paths = request.paths.len(),
            routes = request.routes.len(),
            requests = request.requests.len(),
            all = request.all,
            confirmed = reports.iter().all(PurgeReport::confirmed),
            "purge"
        );
        let purged = json!({
            "tags": request.tags,
            // As matched: normalized (checked above).
            "paths": request
                .paths
                .iter()
                .map(|p| crate::uri::normalize_pattern(p).unwrap_or_else(|_| p.clone()))
                .collect::<Vec<_>>(),
            "routes": request.routes,
            "requests": request.requests.len(),
            "all": request.all,
            "soft": request.soft,
        });
        purge_reply(&reports, purged)
    }
}

/// The `concurrency` query parameter of `POST /admin/warm`, default
/// [`DEFAULT_WARM_CONCURRENCY`].
fn concurrency_param(query: Option<&str>) -> Result<usize, &'static str> {
    let mut concurrency = DEFAULT_WARM_CONCURRENCY;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("concurrency", n)) => {
                concurrency = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=warm::MAX_CONCURRENCY).contains(n))
                    .ok_or("concurrency: a whole number from 1 to 64")?;
            }
            _ => return Err("unknown query parameter: only concurrency=N is accepted"),
        }
    }
    Ok(concurrency)
}

/// The JSON reply to a purge: what was `purged`, whether Redis was reached (else 503) and
/// recorded it ([`PurgeReport::recorded`]),
/// replicas expected and acknowledged (the weakest of `reports`), memory-tier entries
/// removed on this replica and the acknowledging ones.
fn purge_reply(reports: &[PurgeReport], purged: serde_json::Value) -> Response<ProxyBody> {
    let reached = reports.iter().all(|r| r.redis_reached);
    let recorded = reports.iter().all(|r| r.recorded);
    let confirmed = reports.iter().all(PurgeReport::confirmed);
    let expected = reports
        .iter()
        .map(|r| r.replicas_expected)
        .min()
        .unwrap_or(0);
    let acknowledged = reports
        .iter()
        .map(|r| r.replicas_acknowledged)
        .min()
        .unwrap_or(0);
    let memory_entries: u64 = reports.iter().map(|r| r.memory_entries_purged).sum();
    let status = if reached {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let reply = json!({
        "purged": purged,
        "redis_reached": reached,
        "recorded": recorded,
        "replicas_expected": expected,
        "replicas_acknowledged": acknowledged,
        "confirmed": confirmed,
        // Redis entries are covered by purge markers checked at lookup, never scanned for:
        // their number is not known.
        "entries_purged": {"memory": memory_entries, "redis": null},
        "detail": if reached && recorded {
            "applied on every replica that acknowledged"
        } else if reached {
            "Redis did not record the purge (out of memory?): published to the replicas \
             expected, which apply it, but their acknowledgements, written to Redis, may not \
             come, and a replica between subscriptions misses it: send it again once Redis \
             has room"
        } else {
            "Redis not reached: applied on this replica only, other replicas not reached"
        },
    });
    generated(status, reply.to_string(), "application/json")
}
