//! Prometheus metrics (text exposition format) and the JSON stats derived from them.
//!
//! Label values come from the decision enums in [`crate::status`], so a metric label and
//! the `Cache-Status` header always agree.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::{Map, Value, json};

use crate::status::CachePhase;

/// Labels of `cachegate_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `hit`, `miss`, `collapsed` or `bypass` ([`CachePhase::status_label`]).
    pub status: &'static str,
    /// The tier, `stored`, or the no-store / bypass reason ([`CachePhase::reason_label`]).
    pub reason: &'static str,
}

/// One `key="value"` label pair.
type Label = [(&'static str, &'static str); 1];

/// A counter family with a single label, such as `tier` or `outcome`, whose every value is
/// exported from start-up (at zero until counted).
#[derive(Clone, Debug)]
pub struct LabeledCounter {
    key: &'static str,
    values: &'static [&'static str],
    family: Family<Label, Counter>,
}

impl LabeledCounter {
    fn new(key: &'static str, values: &'static [&'static str]) -> Self {
        let family = Family::<Label, Counter>::default();
        for v in values {
            let _ = family.get_or_create(&[(key, *v)]);
        }
        LabeledCounter {
            key,
            values,
            family,
        }
    }

    /// Adds one to the counter labelled `value`.
    pub fn inc(&self, value: &'static str) {
        self.family.get_or_create(&[(self.key, value)]).inc();
    }

    /// A handle on the counter labelled `value`, for code that counts without `Metrics`
    /// (it shares the count).
    pub fn handle(&self, value: &'static str) -> Counter {
        self.family.get_or_create(&[(self.key, value)]).clone()
    }

    /// The count labelled `value` (0 if never incremented).
    pub fn get(&self, value: &'static str) -> u64 {
        self.family.get(&[(self.key, value)]).map_or(0, |c| c.get())
    }

    fn by_value(&self) -> Value {
        Value::Object(
            self.values
                .iter()
                .map(|v| (v.to_string(), json!(self.get(v))))
                .collect(),
        )
    }
}

/// Circuit-breaker states as exported by `cachegate_redis_breaker_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Redis is used (0).
    Closed = 0,
    /// Redis is skipped until the cool-down ends (1).
    Open = 1,
    /// One probe request is trying Redis (2).
    HalfOpen = 2,
}

/// Every metric cachegate exports. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    /// Requests by cache status and reason.
    pub requests: Family<RequestLabels, Counter>,
    /// Hits by `tier` (`memory`, `redis`).
    pub hits: LabeledCounter,
    /// Entries written, by `tier`.
    pub stores: LabeledCounter,
    /// Coalesced waits by `outcome`: `served`, `timeout`, `retried` (the leader's response
    /// could not be shared or the leader went away).
    pub coalesced_waits: LabeledCounter,
    /// Upstream response-head latency, in seconds.
    pub upstream_duration: Histogram,
    /// Upstream failures by `kind`: `unreachable`, `timeout`, `body`.
    pub upstream_errors: LabeledCounter,
    /// Redis failures and timeouts by `op`: `get`, `set`.
    pub redis_errors: LabeledCounter,
    /// Redis entries rejected as misses: failed authentication (forged, copied from another
    /// key, tampered) or decoding (corrupt, unknown version).
    pub redis_rejected_entries: Counter,
    /// Client faults, by `kind`: `host`, `target`, `method`, `body`, `body-timeout`
    /// (requests refused),
    /// `send-timeout` (connections closed because the client stopped reading).
    pub client_errors: LabeledCounter,
    /// Request handlers that panicked (answered with 500; no request data is logged).
    pub panics: Counter,
    /// Circuit-breaker state, see [`BreakerState`].
    pub redis_breaker_state: Gauge,
    /// Entries in the memory tier (approximate, refreshed on scrape).
    pub memory_entries: Gauge,
    /// Weighted size of the memory tier in bytes (refreshed on scrape).
    pub memory_bytes: Gauge,
    /// Open client connections of the proxy listener, tunnels included (each holds one of
    /// `max_connections`).
    pub open_connections: Gauge,
    /// Open tunnels (upgraded WebSocket connections).
    pub open_tunnels: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `cachegate_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cachegate");
        let requests = Family::<RequestLabels, Counter>::default();
        for phase in CachePhase::all() {
            let _ = requests.get_or_create(&RequestLabels {
                status: phase.status_label(),
                reason: phase.reason_label(),
            });
        }
        const TIERS: &[&str] = &["memory", "redis"];
        let hits = LabeledCounter::new("tier", TIERS);
        let stores = LabeledCounter::new("tier", TIERS);
        let coalesced_waits =
            LabeledCounter::new("outcome", &["served", "timeout", "retried", "released"]);
        let upstream_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let upstream_errors =
            LabeledCounter::new("kind", &["unreachable", "timeout", "body", "body-timeout"]);
        let redis_errors = LabeledCounter::new("op", &["get", "set"]);
        let redis_rejected_entries = Counter::default();
        let client_errors = LabeledCounter::new(
            "kind",
            &[
                "host",
                "target",
                "method",
                "body",
                "body-timeout",
                "send-timeout",
            ],
        );
        let panics = Counter::default();
        let redis_breaker_state = Gauge::default();
        let memory_entries = Gauge::default();
        let memory_bytes = Gauge::default();
        let open_connections = Gauge::default();
        let open_tunnels = Gauge::default();
        let r = &mut registry;
        r.register(
            "requests",
            "Requests by cache status and reason",
            requests.clone(),
        );
        r.register("hits", "Cache hits by tier", hits.family.clone());
        r.register("stores", "Entries written by tier", stores.family.clone());
        r.register(
            "coalesced_waits",
            "Requests that waited on another request for the same key, by outcome",
            coalesced_waits.family.clone(),
        );
        r.register(
            "upstream_duration_seconds",
            "Time to the upstream's response head",
            upstream_duration.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream failures by kind",
            upstream_errors.family.clone(),
        );
        r.register(
            "redis_errors",
            "Redis failures and timeouts by operation",
            redis_errors.family.clone(),
        );
        r.register(
            "redis_rejected_entries",
            "Redis entries that failed authentication or decoding and were treated as misses",
            redis_rejected_entries.clone(),
        );
        r.register(
            "client_errors",
            "Client faults by kind (refused requests, clients that stopped reading)",
            client_errors.family.clone(),
        );
        r.register(
            "panics",
            "Request handlers that panicked and were answered with 500",
            panics.clone(),
        );
        r.register(
            "redis_breaker_state",
            "Redis circuit breaker: 0 closed, 1 open, 2 half-open",
            redis_breaker_state.clone(),
        );
        r.register(
            "memory_entries",
            "Entries in the memory tier",
            memory_entries.clone(),
        );
        r.register(
            "memory_bytes",
            "Weighted bytes in the memory tier",
            memory_bytes.clone(),
        );
        r.register(
            "open_connections",
            "Open client connections of the proxy listener, tunnels included",
            open_connections.clone(),
        );
        r.register(
            "open_tunnels",
            "Open tunnels (upgraded WebSocket connections)",
            open_tunnels.clone(),
        );
        Metrics {
            registry,
            requests,
            hits,
            stores,
            coalesced_waits,
            upstream_duration,
            upstream_errors,
            redis_errors,
            redis_rejected_entries,
            client_errors,
            panics,
            redis_breaker_state,
            memory_entries,
            memory_bytes,
            open_connections,
            open_tunnels,
        }
    }

    /// Counts one finished request.
    pub fn record(&self, phase: CachePhase) {
        self.requests
            .get_or_create(&RequestLabels {
                status: phase.status_label(),
                reason: phase.reason_label(),
            })
            .inc();
        if let CachePhase::Hit(tier) = phase {
            self.hits.inc(tier.as_str());
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The JSON document served at `/stats`: request counts by status and reason, hits by
    /// tier, coalescing, upstream and Redis figures, memory-tier size.
    pub fn stats(&self) -> Value {
        let mut by_status: Map<String, Value> = Map::new();
        let mut total = 0;
        for phase in CachePhase::all() {
            let labels = RequestLabels {
                status: phase.status_label(),
                reason: phase.reason_label(),
            };
            let n = self.requests.get(&labels).map_or(0, |c| c.get());
            total += n;
            let entry = by_status
                .entry(phase.status_label())
                .or_insert_with(|| json!({"total": 0, "by_reason": {}}));
            entry["total"] = json!(entry["total"].as_u64().unwrap_or(0) + n);
            if n > 0 {
                entry["by_reason"][phase.reason_label()] = json!(n);
            }
        }
        json!({
            "requests": {"total": total, "by_status": by_status},
            "hits_by_tier": self.hits.by_value(),
            "stores_by_tier": self.stores.by_value(),
            "coalesced_waits": self.coalesced_waits.by_value(),
            "upstream_errors": self.upstream_errors.by_value(),
            "client_errors": self.client_errors.by_value(),
            "panics": self.panics.get(),
            "redis": {
                "errors": self.redis_errors.by_value(),
                "rejected_entries": self.redis_rejected_entries.get(),
                "breaker_state": match self.redis_breaker_state.get() {
                    1 => "open",
                    2 => "half-open",
                    _ => "closed",
                },
            },
            "memory": {
                "entries": self.memory_entries.get(),
                "bytes": self.memory_bytes.get(),
            },
            "connections": {
                "open": self.open_connections.get(),
                "tunnels": self.open_tunnels.get(),
            },
        })
    }
}
