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

use crate::status::{BypassReason, CachePhase, NoStoreReason, Tier};

/// Labels of `cachegate_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `hit`, `miss`, `collapsed` or `bypass` ([`CachePhase::status_label`]).
    pub status: &'static str,
    /// The tier, `stored`, or the no-store / bypass reason ([`CachePhase::reason_label`]).
    pub reason: &'static str,
}

/// A single `tier`, `op`, `kind` or `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    /// The label value.
    pub name: &'static str,
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
    /// Hits by tier (`memory`, `redis`).
    pub hits: Family<NameLabel, Counter>,
    /// Entries written, by tier.
    pub stores: Family<NameLabel, Counter>,
    /// Coalesced waits by outcome: `served`, `timeout`, `retried` (the leader's response
    /// could not be shared or the leader went away).
    pub coalesced_waits: Family<NameLabel, Counter>,
    /// Upstream response-head latency, in seconds.
    pub upstream_duration: Histogram,
    /// Upstream failures by kind: `unreachable`, `timeout`, `body`.
    pub upstream_errors: Family<NameLabel, Counter>,
    /// Redis failures by operation: `get`, `set`.
    pub redis_errors: Family<NameLabel, Counter>,
    /// Redis entries that failed to decode (corrupt, foreign or unknown version).
    pub redis_corrupt_entries: Counter,
    /// Circuit-breaker state, see [`BreakerState`].
    pub redis_breaker_state: Gauge,
    /// Entries in the memory tier (approximate, refreshed on scrape).
    pub memory_entries: Gauge,
    /// Weighted size of the memory tier in bytes (refreshed on scrape).
    pub memory_bytes: Gauge,
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
        registry.register(
            "requests",
            "Requests by cache status and reason",
            requests.clone(),
        );
        let hits = Family::<NameLabel, Counter>::default();
        registry.register("hits", "Cache hits by tier (label name=tier)", hits.clone());
        let stores = Family::<NameLabel, Counter>::default();
        registry.register(
            "stores",
            "Entries written by tier (label name=tier)",
            stores.clone(),
        );
        let coalesced_waits = Family::<NameLabel, Counter>::default();
        registry.register(
            "coalesced_waits",
            "Requests that waited on another request for the same key, by outcome",
            coalesced_waits.clone(),
        );
        let upstream_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "upstream_duration_seconds",
            "Time to the upstream's response head",
            upstream_duration.clone(),
        );
        let upstream_errors = Family::<NameLabel, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by kind",
            upstream_errors.clone(),
        );
        let redis_errors = Family::<NameLabel, Counter>::default();
        registry.register(
            "redis_errors",
            "Redis failures and timeouts by operation",
            redis_errors.clone(),
        );
        let redis_corrupt_entries = Counter::default();
        registry.register(
            "redis_corrupt_entries",
            "Redis entries that failed to decode and were treated as misses",
            redis_corrupt_entries.clone(),
        );
        let redis_breaker_state = Gauge::default();
        registry.register(
            "redis_breaker_state",
            "Redis circuit breaker: 0 closed, 1 open, 2 half-open",
            redis_breaker_state.clone(),
        );
        let memory_entries = Gauge::default();
        registry.register(
            "memory_entries",
            "Entries in the memory tier",
            memory_entries.clone(),
        );
        let memory_bytes = Gauge::default();
        registry.register(
            "memory_bytes",
            "Weighted bytes in the memory tier",
            memory_bytes.clone(),
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
            redis_corrupt_entries,
            redis_breaker_state,
            memory_entries,
            memory_bytes,
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
            self.hits
                .get_or_create(&NameLabel {
                    name: tier.as_str(),
                })
                .inc();
        }
    }

    /// Increments `family{name}`.
    pub fn inc(family: &Family<NameLabel, Counter>, name: &'static str) {
        family.get_or_create(&NameLabel { name }).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    fn count(family: &Family<NameLabel, Counter>, name: &'static str) -> u64 {
        family.get(&NameLabel { name }).map_or(0, |c| c.get())
    }

    /// The JSON document served at `/stats`: request counts by status and reason, hits by
    /// tier, coalescing, upstream and Redis figures, memory-tier size.
    pub fn stats(&self) -> Value {
        let mut by_status: Map<String, Value> = Map::new();
        let phases = Tier::ALL
            .iter()
            .map(|t| CachePhase::Hit(*t))
            .chain([CachePhase::Miss(Ok(())), CachePhase::Collapsed])
            .chain(NoStoreReason::ALL.iter().map(|r| CachePhase::Miss(Err(*r))))
            .chain(BypassReason::ALL.iter().map(|r| CachePhase::Bypass(*r)));
        let mut total = 0;
        for phase in phases {
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
        let names = |family: &Family<NameLabel, Counter>, names: &[&'static str]| {
            let mut m = Map::new();
            for name in names {
                m.insert(name.to_string(), json!(Self::count(family, name)));
            }
            Value::Object(m)
        };
        json!({
            "requests": {"total": total, "by_status": by_status},
            "hits_by_tier": names(&self.hits, &["memory", "redis"]),
            "stores_by_tier": names(&self.stores, &["memory", "redis"]),
            "coalesced_waits": names(&self.coalesced_waits, &["served", "timeout", "retried"]),
            "upstream_errors": names(&self.upstream_errors, &["unreachable", "timeout", "body"]),
            "redis": {
                "errors": names(&self.redis_errors, &["get", "set"]),
                "corrupt_entries": self.redis_corrupt_entries.get(),
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
        })
    }
}
