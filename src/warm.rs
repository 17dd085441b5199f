//! Warming: answers stored before clients ask for them.
//!
//! - **Warm lists** (`cachegate warm FILE`, `POST /admin/warm`): requests replayed
//!   through the request path ([`Proxy::handle`]) with bounded concurrency, each counted
//!   as stored, already fresh or failed ([`warm_list`]). A list holds one request per
//!   line, `METHOD URL [JSON body]` or a JSON object ([`RequestSpec`]); blank lines and
//!   lines starting with `#` are skipped ([`parse_list`]).
//! - **Hot keys**: a route with `warm_hot_keys = N` counts its requests per key
//!   ([`HotKeys`], the Misra-Gries frequent-items summary, bounded in memory), and every
//!   `warm_interval_secs` takes the N most requested keys of the interval as its hot set.
//!   [`run_hot_keys`] refreshes each hot key from the upstream shortly before its entry
//!   expires, so the hottest views never expire into a miss.
//!
//! Warm requests go through the same admission, keys and storage rules as client
//! requests: a list cannot store what a client could not.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, Uri, Version, header};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::proxy::body;
use crate::proxy::origin::Origin;
use crate::proxy::refresh::Replay;
use cachegate_core::key::CacheKey;

/// The most requests one warm list may hold.
pub const MAX_LIST_REQUESTS: usize = 100_000;

/// The most hot keys a route may keep (`warm_hot_keys`).
pub const MAX_HOT_KEYS: usize = 1_000;

/// The most concurrent requests of one warm list (`POST /admin/warm?concurrency=N`).
pub const MAX_CONCURRENCY: usize = 64;

/// How often [`run_hot_keys`] looks at the hot keys' entries.
const HOT_KEY_TICK: Duration = Duration::from_secs(1);

/// How many hot keys [`run_hot_keys`] looks up at once.
const HOT_KEY_CHECKS_AT_ONCE: usize = 16;

/// A request described as data: an item of a warm list, or of a purge by request
/// (`POST /admin/purge {"requests": [...]}`). As JSON:
/// `{"method": "POST", "url": "/api/natal/chart", "headers": {"content-type":
/// "application/json"}, "body": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// The method; default `GET`.
    #[serde(default = "get")]
    pub method: String,
    /// Path and query (`/kpi/leads?region=eu`), or an absolute URL whose host becomes the
    /// `Host` header (needed with `preserve_host`).
    pub url: String,
    /// Request headers, e.g. those a route keys on, or `content-type`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The JSON body, sent as `application/json` unless `headers` names another type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

fn get() -> String {
    "GET".to_string()
}

impl RequestSpec {
    /// The HTTP/1.1 request this spec describes. Its `Host` is the URL's authority, else
    /// the `host` header given, else `localhost`.
    ///
    /// Errors: a method, URL, header name or value that HTTP does not allow.
    pub fn to_request(&self) -> Result<Request<Bytes>, String> {
        let method = Method::from_bytes(self.method.as_bytes())
            .map_err(|_| format!("method: not a method: {:?}", self.method))?;
        let uri: Uri = self.url.parse().map_err(|e| format!("url: {e}"))?;
        if uri.scheme().is_some_and(|s| s != "http" && s != "https")
            || (uri.authority().is_some() && uri.scheme().is_none())
            || !self.url.starts_with(['/', 'h', 'H'])
        {
            return Err("url: expected /path?query or http://host/path?query".to_string());
        }
        let mut builder = Request::builder()
            .method(method)
            .version(Version::HTTP_11)
            .uri(uri.path_and_query().map_or("/", |pq| pq.as_str()));
        let mut has_host = false;
        let mut has_type = false;
        for (name, value) in &self.headers {
            has_host |= name.eq_ignore_ascii_case("host");
            has_type |= name.eq_ignore_ascii_case("content-type");
            if !(name.eq_ignore_ascii_case("host") && uri.authority().is_some()) {
                builder = builder.header(name.as_str(), value.as_str());
            }
        }
        if let Some(authority) = uri.authority() {
            builder = builder.header(header::HOST, authority.as_str());
        } else if !has_host {
            builder = builder.header(header::HOST, "localhost");
        }
        let body = match &self.body {
            Some(value) => {
                if !has_type {
                    builder = builder.header(header::CONTENT_TYPE, "application/json");
                }
                Bytes::from(serde_json::to_vec(value).map_err(|e| format!("body: {e}"))?)
            }
            None => Bytes::new(),
        };
        builder.body(body).map_err(|e| format!("headers: {e}"))
    }
}

/// A warm list line that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListError {
    /// The 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ListError {}

/// Reads a warm list: one request per line, either `METHOD URL [JSON body]`
/// (`POST /api/natal/chart {"date": "1990-01-01"}`) or a [`RequestSpec`] as a JSON object.
/// Blank lines and lines starting with `#` are skipped. Returns each request with its
/// 1-based line number.
///
/// Errors: the first line that is not a request (a [`ListError`] naming it), or more than
/// [`MAX_LIST_REQUESTS`] requests. Nothing is replayed from a list with an error.
pub fn parse_list(text: &str) -> Result<Vec<(usize, RequestSpec)>, ListError> {
    let mut list = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let error = |message: String| ListError {
            line: i + 1,
            message,
        };
        if list.len() == MAX_LIST_REQUESTS {
            return Err(error(format!(
                "more than {MAX_LIST_REQUESTS} requests: split the list"
            )));
        }
        let spec = if line.starts_with('{') {
            serde_json::from_str::<RequestSpec>(line).map_err(|e| error(e.to_string()))?
        } else {
            let (method, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim_start();
            let (url, body) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            if url.is_empty() {
                return Err(error("expected METHOD URL [JSON body]".to_string()));
            }
            let body = body.trim();
            let body = if body.is_empty() {
                None
            } else {
                let value = serde_json::from_str(body)
                    .map_err(|e| error(format!("body: not JSON: {e}")))?;
                Some(value)
            };
            RequestSpec {
                method: method.to_string(),
                url: url.to_string(),
                headers: BTreeMap::new(),
                body,
            }
        };
        spec.to_request().map_err(error)?;
        list.push((i + 1, spec));
    }
    Ok(list)
}

/// What one warm request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmOutcome {
    /// Fetched from the upstream and stored.
    Stored,
    /// Already stored and fresh (a hit), or fetched by a concurrent request.
    Fresh,
    /// Not stored: `detail` says why (the `Cache-Status` detail, e.g. `no-store`,
    /// `upstream-error`, a bypass reason; `not cacheable: ...` for a request refused
    /// before it was sent), `status` is the answer's HTTP status (0: not sent).
    Failed {
        /// The HTTP status of the answer; 0 when it was not sent.
        status: u16,
        /// Why nothing was stored.
        detail: String,
    },
}

impl WarmOutcome {
    /// The metric label: `stored`, `fresh` or `failed`.
    pub fn label(&self) -> &'static str {
        match self {
            WarmOutcome::Stored => "stored",
            WarmOutcome::Fresh => "fresh",
            WarmOutcome::Failed { .. } => "failed",
        }
    }

    /// Reads the outcome off an answer of the request path: its own `Cache-Status`
    /// member (RFC 9211, the last one) says hit, collapsed, stored or why not.
    pub fn of<B>(resp: &Response<B>) -> WarmOutcome {
        let value = resp
            .headers()
            .get_all("cache-status")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        let ours = value
            .rsplit(',')
            .map(str::trim)
            .find(|m| m.starts_with("cachegate"))
            .unwrap_or("");
        let params: Vec<&str> = ours.split(';').map(str::trim).skip(1).collect();
        // `stored` first: a revalidated entry is a hit that was stored again.
        if params.contains(&"stored") {
            return WarmOutcome::Stored;
        }
        if params.iter().any(|p| *p == "hit" || *p == "collapsed") {
            return WarmOutcome::Fresh;
        }
        let detail = params
            .iter()
            .find_map(|p| p.strip_prefix("detail="))
            .unwrap_or("not-stored")
            .to_string();
        WarmOutcome::Failed {
            status: resp.status().as_u16(),
            detail,
        }
    }
}

/// The result of a warm list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WarmReport {
    /// Requests replayed.
    pub requests: usize,
    /// Fetched and stored.
    pub stored: usize,
    /// Already fresh.
    pub fresh: usize,
    /// Not stored.
    pub failed: usize,
    /// The first [`WarmReport::MAX_FAILURES`] failures, in list order.
    pub failures: Vec<WarmFailure>,
}

/// One failed warm request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WarmFailure {
    /// Its line in the list.
    pub line: usize,
    /// The HTTP status of the answer; 0 when it was not sent (not cacheable).
    pub status: u16,
    /// Why nothing was stored.
    pub detail: String,
}

impl WarmReport {
    /// How many failures a report lists.
    pub const MAX_FAILURES: usize = 20;
}

/// Replays `list` (from [`parse_list`]) through `proxy`, at most `concurrency` requests
/// at once (clamped to 1..=[`MAX_CONCURRENCY`]), as requests from `client`; counts each
/// outcome in `warm_requests_total{outcome}`. A request that would not use the cache
/// ([`Proxy::check_cacheable`]: no route, an unsafe method, credentials the route does not
/// key on, ...) is not sent and counts as failed. Every request is bounded by the request
/// path's own timeouts.
pub async fn warm_list<O: Origin>(
    proxy: &Proxy<O>,
    metrics: &Metrics,
    list: Vec<(usize, RequestSpec)>,
    concurrency: usize,
    client: SocketAddr,
) -> WarmReport {
    let concurrency = concurrency.clamp(1, MAX_CONCURRENCY);
    let mut report = WarmReport {
        requests: list.len(),
        ..WarmReport::default()
    };
    let mut outcomes = futures_util::stream::iter(list)
        .map(|(line, spec)| async move {
            let request = spec
                .to_request()
                .and_then(|req| match proxy.check_cacheable(&req) {
                    Ok(()) => Ok(req),
                    Err(reason) => Err(format!("not cacheable: {reason}")),
                });
            let outcome = match request {
                Ok(req) => {
                    let resp = proxy.handle(req.map(body::full), client).await;
                    WarmOutcome::of(&resp)
                }
                // Refused here: nothing was sent.
                Err(detail) => WarmOutcome::Failed { status: 0, detail },
            };
            (line, outcome)
        })
        .buffer_unordered(concurrency);
    while let Some((line, outcome)) = outcomes.next().await {
        metrics.warm_requests.inc(outcome.label());
        match outcome {
            WarmOutcome::Stored => report.stored += 1,
            WarmOutcome::Fresh => report.fresh += 1,
            WarmOutcome::Failed { status, detail } => {
                report.failed += 1;
                report.failures.push(WarmFailure {
                    line,
                    status,
                    detail,
                });
            }
        }
    }
    // The first failures in list order (they finish in any order).
    report.failures.sort_by_key(|f| f.line);
    report.failures.truncate(WarmReport::MAX_FAILURES);
    report
}

/// A route's request counts per key (the Misra-Gries summary: at most
/// [`HotKeys::capacity`] counters; any key requested more than `requests / capacity` times
/// in an interval is among them) and its current hot set.
///
/// Memory stays bounded whatever the traffic: the counters are bounded, and a key's
/// request is copied ([`Replay::keyed`]: keyed parts only, bodies up to 64 KiB) only from
/// its second request of an interval, within [`REPLAY_BUDGET_BYTES`] per route.
#[derive(Debug)]
pub struct HotKeys {
    hot_keys: usize,
    interval: Duration,
    state: Mutex<HotState>,
}

/// The bytes of request copies one route's counters may hold.
pub const REPLAY_BUDGET_BYTES: usize = 8 << 20;

#[derive(Debug)]
struct HotState {
    counts: HashMap<CacheKey, Counted>,
    /// Bytes of the copies `counts` holds.
    replay_bytes: usize,
    hot: Vec<HotKey>,
    rotated_at: Instant,
}

#[derive(Debug)]
struct Counted {
    count: u64,
    replay: Option<Arc<Replay>>,
}

/// One key of the hot set.
#[derive(Debug, Clone)]
struct HotKey {
    key: CacheKey,
    replay: Arc<Replay>,
    /// Its last refresh stored nothing: not tried again before the next interval.
    failed: bool,
}

impl HotKeys {
    /// Tracks the `hot_keys` most requested keys (clamped to [`MAX_HOT_KEYS`]) over
    /// intervals of `interval`.
    pub fn new(hot_keys: usize, interval: Duration) -> Self {
        HotKeys {
            hot_keys: hot_keys.min(MAX_HOT_KEYS),
            interval: interval.max(Duration::from_secs(1)),
            state: Mutex::new(HotState {
                counts: HashMap::new(),
                replay_bytes: 0,
                hot: Vec::new(),
                rotated_at: Instant::now(),
            }),
        }
    }

    /// How many keys are counted at once: 8 per hot key.
    pub fn capacity(&self) -> usize {
        self.hot_keys * 8
    }

    /// Counts one request for `key`. On the key's second request of an interval, `replay`
    /// makes the copy to refresh it with (outside the lock; `None`: it cannot be copied),
    /// if the route's copies fit in [`REPLAY_BUDGET_BYTES`].
    pub fn record(&self, key: &CacheKey, replay: impl FnOnce() -> Option<Replay>) {
        let wants_copy = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let within_budget = state.replay_bytes < REPLAY_BUDGET_BYTES;
            if let Some(counted) = state.counts.get_mut(key) {
                counted.count += 1;
                counted.replay.is_none() && within_budget
            } else {
                if state.counts.len() >= self.capacity() {
                    // Misra-Gries: a new key when every counter is taken lowers all of
                    // them by one, and frees those at zero; the new key is not counted.
                    let mut freed = 0;
                    state.counts.retain(|_, c| {
                        c.count -= 1;
                        if c.count == 0 {
                            freed += c.replay.as_ref().map_or(0, |r| r.size_bytes());
                        }
                        c.count > 0
                    });
                    state.replay_bytes -= freed;
                    return;
                }
                state.counts.insert(
                    *key,
                    Counted {
                        count: 1,
                        replay: None,
                    },
                );
                false
            }
        };
        if !wants_copy {
            return;
        }
        let Some(copy) = replay() else {
            return;
        };
        let size = copy.size_bytes();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.replay_bytes + size > REPLAY_BUDGET_BYTES {
            return;
        }
        if let Some(counted) = state.counts.get_mut(key)
            && counted.replay.is_none()
        {
            counted.replay = Some(Arc::new(copy));
            state.replay_bytes += size;
        }
    }

    /// At the end of an interval, the counted keys' top `hot_keys` (those with a copy to
    /// refresh them with) become the hot set and the counts start again. Returns the hot
    /// set to look at now.
    fn hot_set(&self, now: Instant) -> Vec<HotKey> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.duration_since(state.rotated_at) >= self.interval {
            state.rotated_at = now;
            state.replay_bytes = 0;
            let mut counted: Vec<(CacheKey, Counted)> = state.counts.drain().collect();
            counted.sort_by_key(|(_, c)| std::cmp::Reverse(c.count));
            state.hot = counted
                .into_iter()
                .take(self.hot_keys)
                .filter_map(|(key, c)| {
                    Some(HotKey {
                        key,
                        replay: c.replay?,
                        failed: false,
                    })
                })
                .collect();
        }
        state.hot.clone()
    }

    /// Leaves `key` out of the hot set's refreshes until the next interval: its refresh
    /// stored nothing.
    pub(crate) fn mark_failed(&self, key: &CacheKey) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(hot) = state.hot.iter_mut().find(|h| h.key == *key) {
            hot.failed = true;
        }
    }
}

/// How long before its expiry a hot key is refreshed: a tenth of its TTL, at least two
/// ticks (so that a tick cannot miss it), at most 30 s.
fn refresh_lead(ttl: Duration) -> Duration {
    (ttl / 10).clamp(2 * HOT_KEY_TICK, Duration::from_secs(30))
}

/// Keeps the hot keys of every route with `warm_hot_keys` fresh until `shutdown` turns
/// true: every second, each hot key whose stored entry (memory, then Redis: a key another
/// replica refreshed is taken from there) expires within a tenth of its TTL (2 s to 30 s)
/// or is gone (expired, purged) is queued for a background refresh
/// ([`crate::proxy::refresh`]: one per key at a time, bounded concurrency and timeout,
/// one replica per key through a Redis lease). A refresh that stores nothing (the
/// upstream failed or said `no-store`) is not tried again before the next interval.
/// Counted in `hot_key_refreshes_total{outcome}`.
pub async fn run_hot_keys<O: Origin>(proxy: Arc<Proxy<O>>, mut shutdown: watch::Receiver<bool>) {
    let trackers = proxy.hot_key_trackers();
    if trackers.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(HOT_KEY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let now = Instant::now();
        let proxy = &proxy;
        let hot: Vec<(Arc<HotKeys>, HotKey)> = trackers
            .iter()
            .flat_map(|tracker| {
                tracker
                    .hot_set(now)
                    .into_iter()
                    .filter(|hot| !hot.failed)
                    .map(|hot| (tracker.clone(), hot))
            })
            .collect();
        let checks = futures_util::stream::iter(hot).for_each_concurrent(
            HOT_KEY_CHECKS_AT_ONCE,
            |(tracker, hot)| async move {
                if proxy.refresh_due(&hot.key, refresh_lead).await {
                    let replay = || Some(hot.replay.clone());
                    proxy
                        .refresher()
                        .request(&hot.key, 0, replay, Some(tracker));
                }
            },
        );
        // The checks are lookups (bounded by Redis's operation timeout); shutdown does not
        // wait for them.
        tokio::select! {
            () = checks => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_line_forms() {
        let text = "# comment\n\nGET /kpi/leads?region=eu\nPOST /api/natal/chart {\"date\": \"1990-01-01\", \"lat\": 51.5}\n{\"method\":\"POST\",\"url\":\"http://h:1/x\",\"headers\":{\"x-tenant\":\"a\"},\"body\":[1]}\n";
        let list = parse_list(text).unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].0, 3);
        assert_eq!(list[0].1.url, "/kpi/leads?region=eu");
        assert_eq!(list[1].0, 4);
        assert_eq!(
            list[1].1.body,
            Some(serde_json::json!({"date": "1990-01-01", "lat": 51.5}))
        );
        let req = list[2].1.to_request().unwrap();
        assert_eq!(req.headers()["host"], "h:1");
        assert_eq!(req.headers()["x-tenant"], "a");
        assert_eq!(req.headers()["content-type"], "application/json");
        assert_eq!(req.uri(), "/x");
    }

    #[test]
    fn names_the_bad_line() {
        for (text, line) in [
            ("GET /a\nPOST /b {not json\n", 2),
            ("GET\n", 1),
            ("G(T /a\n", 1),
            ("GET /a\n\n{\"url\": \"/x\", \"extra\": 1}\n", 3),
            ("GET ftp://h/x\n", 1),
            ("GET h:1\n", 1),
            ("GET /a\nGET /a\u{0}b\n", 2),
        ] {
            let err = parse_list(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
        }
    }

    #[test]
    fn reads_outcomes_off_cache_status() {
        let with = |value: &str, status: u16| {
            let mut resp = Response::new(());
            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            resp.headers_mut()
                .insert("cache-status", value.parse().unwrap());
            WarmOutcome::of(&resp)
        };
        assert_eq!(
            with("cachegate; fwd=miss; fwd-status=200; stored", 200),
            WarmOutcome::Stored
        );
        assert_eq!(
            with("cachegate; hit; ttl=3; detail=memory", 200),
            WarmOutcome::Fresh
        );
        // The upstream's own member does not count, ours goes last.
        assert_eq!(
            with(
                "origin; hit; stored, cachegate; fwd=miss; fwd-status=200; detail=no-store",
                200
            ),
            WarmOutcome::Failed {
                status: 200,
                detail: "no-store".into()
            }
        );
        assert_eq!(
            with("", 502),
            WarmOutcome::Failed {
                status: 502,
                detail: "not-stored".into()
            }
        );
    }

    #[test]
    fn keeps_the_most_requested_keys() {
        let keys = cachegate_core::key::KeyBuilder::new(b"k", "test");
        let key = |i: u32| keys.key_for(&i.to_string());
        let hot = HotKeys::new(2, Duration::from_secs(1));
        let replay = || {
            let (parts, ()) = Request::new(()).into_parts();
            Replay::keyed(
                &parts,
                &[],
                Bytes::new(),
                SocketAddr::from(([127, 0, 0, 1], 1)),
            )
        };
        // Keys 1 and 2 are requested often, among many keys requested once.
        for round in 0..200u32 {
            hot.record(&key(1), replay);
            hot.record(&key(2), replay);
            hot.record(&key(1000 + round), replay);
        }
        let state = hot.state.lock().unwrap();
        assert!(state.counts.len() <= hot.capacity());
        // Keys requested once were never copied.
        let copies = state.counts.values().filter(|c| c.replay.is_some()).count();
        assert_eq!(copies, 2);
        drop(state);
        let later = Instant::now() + Duration::from_secs(2);
        let set: Vec<CacheKey> = hot.hot_set(later).into_iter().map(|h| h.key).collect();
        assert_eq!(set.len(), 2);
        assert!(set.contains(&key(1)) && set.contains(&key(2)));
    }
}
