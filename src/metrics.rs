//! Prometheus metrics (text exposition format) and the JSON stats derived from them.
//!
//! Label values come from the decision enums in [`crate::status`], so a metric label and
//! the `Cache-Status` header always agree.

use cachegate_core::metrics::{BreakerState, StoreMetrics, TIERS};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

pub use cachegate_core::metrics::LabeledCounter;

use crate::status::CachePhase;

/// The outcomes of warm requests ([`crate::warm::WarmOutcome::label`]).
const WARM_OUTCOMES: &[&str] = &["stored", "fresh", "failed"];

/// Labels of `cachegate_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `hit`, `miss`, `collapsed` or `bypass` ([`CachePhase::status_label`]).
    pub status: &'static str,
    /// The tier, `stored`, or the no-store / bypass reason ([`CachePhase::reason_label`]).
    pub reason: &'static str,
}

/// Every metric cachegate exports. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    /// Requests by cache status and reason.
    pub requests: Family<RequestLabels, Counter>,
    /// Hits by `tier` (`memory`, `redis`).
    pub hits: LabeledCounter,
    /// The tiers' own metrics: stores by tier, Redis errors, rejected entries, breaker
    /// state, memory-tier size.
    pub store: StoreMetrics,
    /// Coalesced waits by `outcome`: `served`, `timeout`, `retried` (the leader went
    /// away), `released` (the leader's response could not be shared), `purged` (a purge
    /// made while it was in flight covers it: the waiter joined again).
    pub coalesced_waits: LabeledCounter,
    /// Upstream response-head latency, in seconds.
    pub upstream_duration: Histogram,
    /// Upstream failures by `kind`: `unreachable`, `timeout`, `body`.
    pub upstream_errors: LabeledCounter,
    /// Safe requests sent to the upstream again because their reused connection closed
    /// before a response head ([`crate::proxy::upstream::Upstream::send`]).
    pub upstream_retries: Counter,
    /// Client faults, by `kind`: `host`, `target`, `method`, `body`, `body-timeout`
    /// (requests refused),
    /// `send-timeout` (connections closed because the client stopped reading).
    pub client_errors: LabeledCounter,
    /// Request handlers that panicked (answered with 500; no request data is logged).
    pub panics: Counter,
    /// Open client connections of the proxy listener, tunnels included (each holds one of
    /// `max_connections`).
    pub open_connections: Gauge,
    /// Open tunnels (upgraded WebSocket connections).
    pub open_tunnels: Gauge,
    /// `thread_connections{thread}`: open client connections per connection thread
    /// (`[server] connection_threads`), tunnels included: how evenly they are spread.
    pub thread_connections: Family<ThreadLabels, Gauge>,
    /// `events_total{name}`: events raised, by configured name (`unknown` for others: the
    /// label set stays bounded).
    pub events: Family<EventLabels, Counter>,
    /// `warm_requests_total{outcome}`: warm-list requests by outcome (`stored`, `fresh`,
    /// `failed`).
    pub warm_requests: LabeledCounter,
    /// `requests_total` handles in [`CachePhase::all`] order ([`CachePhase::index`]).
    by_phase: Vec<Counter>,
    /// `hits_total` handles: memory, redis.
    hits_by_tier: [Counter; 2],
    /// `hot_key_refreshes_total{outcome}`: hot-key refreshes by outcome (`stored`,
    /// `fresh`: a concurrent request fetched it, `failed`, `timeout`: abandoned).
    pub hot_key_refreshes: LabeledCounter,
    /// `background_refreshes_total{outcome}`: stale-while-revalidate and refresh-ahead
    /// refreshes by outcome (`stored`, `fresh`, `failed`, `timeout`: abandoned).
    pub background_refreshes: LabeledCounter,
}

/// Labels of `cachegate_thread_connections`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThreadLabels {
    /// The connection thread's number, from 0.
    pub thread: u32,
}

/// Labels of `cachegate_events_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// A configured event name, or `unknown`.
    pub name: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates every metric and registers it in its own registry under the `cachegate_`
    /// prefix ([`Metrics::encode`]).
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        for phase in CachePhase::all() {
            let _ = requests.get_or_create(&RequestLabels {
                status: phase.status_label(),
                reason: phase.reason_label(),
            });
        }
        let hits = LabeledCounter::new("tier", TIERS);
        let by_phase: Vec<Counter> = CachePhase::all()
            .map(|phase| {
                requests
                    .get_or_create(&RequestLabels {
                        status: phase.status_label(),
                        reason: phase.reason_label(),
                    })
                    .clone()
            })
            .collect();
        let hits_by_tier = [hits.handle("memory"), hits.handle("redis")];
        let coalesced_waits = LabeledCounter::new(
            "outcome",
            &["served", "timeout", "retried", "released", "purged"],
        );
        let upstream_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let upstream_errors = LabeledCounter::new(
            "kind",
            &[
                "unreachable",
                "malformed",
                "loop",
                "timeout",
                "body",
                "body-timeout",
            ],
        );
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
        let open_connections = Gauge::default();
        let open_tunnels = Gauge::default();
        let thread_connections = Family::<ThreadLabels, Gauge>::default();
        let events = Family::<EventLabels, Counter>::default();
        let _ = events.get_or_create(&EventLabels {
            name: "unknown".into(),
        });
        let store = StoreMetrics::default();
        let warm_requests = LabeledCounter::new("outcome", WARM_OUTCOMES);
        let hot_key_refreshes =
            LabeledCounter::new("outcome", &["stored", "fresh", "failed", "timeout"]);
        let background_refreshes =
            LabeledCounter::new("outcome", &["stored", "fresh", "failed", "timeout"]);
        let mut metrics = Metrics {
            registry: Registry::default(),
            requests,
            hits,
            store,
            coalesced_waits,
            upstream_duration,
            upstream_errors,
            upstream_retries: Counter::default(),
            client_errors,
            panics,
            open_connections,
            open_tunnels,
            thread_connections,
            events,
            warm_requests,
            hot_key_refreshes,
            background_refreshes,
            by_phase,
            hits_by_tier,
        };
        let mut registry = Registry::with_prefix("cachegate");
        metrics.register_into(&mut registry);
        metrics.registry = registry;
        metrics
    }

    /// Registers every metric into `registry` as well (names relative to its prefix, e.g.
    /// `requests_total`; the proxy's own registry uses the prefix `cachegate`). The
    /// metrics keep counting into both.
    pub fn register_into(&self, r: &mut Registry) {
        r.register(
            "requests",
            "Requests by cache status and reason",
            self.requests.clone(),
        );
        self.hits.register(r, "hits", "Cache hits by tier");
        self.store.register_into(r);
        self.coalesced_waits.register(
            r,
            "coalesced_waits",
            "Requests that waited on another request for the same key, by outcome",
        );
        r.register(
            "upstream_duration_seconds",
            "Time to the upstream's response head",
            self.upstream_duration.clone(),
        );
        self.upstream_errors
            .register(r, "upstream_errors", "Upstream failures by kind");
        r.register(
            "upstream_retries",
            "Safe requests sent to the upstream again after their reused connection closed before a response head",
            self.upstream_retries.clone(),
        );
        self.client_errors.register(
            r,
            "client_errors",
            "Client faults by kind (refused requests, clients that stopped reading)",
        );
        r.register(
            "panics",
            "Request handlers that panicked and were answered with 500",
            self.panics.clone(),
        );
        r.register(
            "open_connections",
            "Open client connections of the proxy listener, tunnels included",
            self.open_connections.clone(),
        );
        r.register(
            "events",
            "Events raised, by configured name (unknown for others)",
            self.events.clone(),
        );
        self.warm_requests.register(
            r,
            "warm_requests",
            "Warm-list requests by outcome (stored, fresh, failed)",
        );
        self.hot_key_refreshes.register(
            r,
            "hot_key_refreshes",
            "Hot-key refreshes by outcome (stored, fresh, failed)",
        );
        self.background_refreshes.register(
            r,
            "background_refreshes",
            "Stale-while-revalidate and refresh-ahead refreshes by outcome",
        );
        r.register(
            "open_tunnels",
            "Open tunnels (upgraded WebSocket connections)",
            self.open_tunnels.clone(),
        );
        r.register(
            "thread_connections",
            "Open client connections per connection thread, tunnels included",
            self.thread_connections.clone(),
        );
    }

    /// The gauge of connection thread `thread` in `thread_connections`.
    pub fn thread_gauge(&self, thread: u32) -> Gauge {
        self.thread_connections
            .get_or_create(&ThreadLabels { thread })
            .clone()
    }

    /// Exports an `events_total` series for each configured event name.
    pub fn declare_events<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for name in names {
            let _ = self
                .events
                .get_or_create(&EventLabels { name: name.into() });
        }
    }

    /// Counts one raised event: its name if configured (declared), else `unknown`.
    pub fn count_event(&self, name: &str, known: bool) {
        let name = if known { name } else { "unknown" };
        self.events
            .get_or_create(&EventLabels { name: name.into() })
            .inc();
    }

    /// Counts one finished request.
    pub fn record(&self, phase: CachePhase) {
        if let Some(counter) = self.by_phase.get(phase.index()) {
            counter.inc();
        }
        if let CachePhase::Hit(tier) = phase {
            self.hits_by_tier[usize::from(tier != cachegate_core::store::Tier::Memory)].inc();
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

    /// A typed snapshot of every figure: what `/stats` serves, for code that embeds the
    /// proxy or the tower layer.
    pub fn snapshot(&self) -> Stats {
        let mut by_status: BTreeMap<&'static str, StatusCounts> = BTreeMap::new();
        let mut total = 0;
        for phase in CachePhase::all() {
            let labels = RequestLabels {
                status: phase.status_label(),
                reason: phase.reason_label(),
            };
            let n = self.requests.get(&labels).map_or(0, |c| c.get());
            total += n;
            let entry = by_status.entry(phase.status_label()).or_default();
            entry.total += n;
            if n > 0 {
                *entry.by_reason.entry(phase.reason_label()).or_default() += n;
            }
        }
        let counts = |c: &LabeledCounter| c.counts().into_iter().collect::<BTreeMap<_, _>>();
        Stats {
            requests: RequestCounts { total, by_status },
            hits_by_tier: counts(&self.hits),
            stores_by_tier: counts(&self.store.stores),
            coalesced_waits: counts(&self.coalesced_waits),
            upstream_errors: counts(&self.upstream_errors),
            upstream_retries: self.upstream_retries.get(),
            client_errors: counts(&self.client_errors),
            panics: self.panics.get(),
            redis: RedisStats {
                errors: counts(&self.store.redis_errors),
                rejected_entries: self.store.redis_rejected_entries.get(),
                breaker_state: BreakerState::from_gauge(self.store.redis_breaker_state.get())
                    .as_str(),
            },
            memory: MemoryStats {
                entries: self.store.memory_entries.get().max(0) as u64,
                bytes: self.store.memory_bytes.get().max(0) as u64,
            },
            connections: ConnectionStats {
                open: self.open_connections.get().max(0) as u64,
                tunnels: self.open_tunnels.get().max(0) as u64,
            },
            purges: PurgeStats {
                by_kind: counts(&self.store.purges),
                outcomes: counts(&self.store.purge_outcomes),
                received: self.store.purges_received.get(),
                marker_folds: counts(&self.store.purge_marker_folds),
            },
            warm: WarmStats {
                requests: counts(&self.warm_requests),
                hot_key_refreshes: counts(&self.hot_key_refreshes),
            },
            background_refreshes: counts(&self.background_refreshes),
        }
    }

    /// The JSON document served at `/stats`: [`Metrics::snapshot`] serialized.
    pub fn stats(&self) -> Value {
        serde_json::to_value(self.snapshot()).unwrap_or(Value::Null)
    }
}

/// A snapshot of the proxy's (or the tower layer's) figures since start: the typed form of
/// `/stats`. Counts by label are keyed by the label value.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Requests by cache status and reason.
    pub requests: RequestCounts,
    /// Hits by tier (`memory`, `redis`).
    pub hits_by_tier: BTreeMap<&'static str, u64>,
    /// Entries written by tier.
    pub stores_by_tier: BTreeMap<&'static str, u64>,
    /// Coalesced waits by outcome.
    pub coalesced_waits: BTreeMap<&'static str, u64>,
    /// Upstream failures by kind.
    pub upstream_errors: BTreeMap<&'static str, u64>,
    /// Safe requests sent to the upstream again after their reused connection closed
    /// before a response head.
    pub upstream_retries: u64,
    /// Client faults by kind.
    pub client_errors: BTreeMap<&'static str, u64>,
    /// Request handlers that panicked.
    pub panics: u64,
    /// The Redis tier.
    pub redis: RedisStats,
    /// The memory tier (as of the last refresh of its gauges).
    pub memory: MemoryStats,
    /// Open client connections (proxy listener).
    pub connections: ConnectionStats,
    /// Purges started here by kind, how they ended, and purges received from others.
    pub purges: PurgeStats,
    /// Warm-list requests and hot-key refreshes by outcome.
    pub warm: WarmStats,
    /// Background refreshes (stale-while-revalidate, refresh-ahead) by outcome.
    pub background_refreshes: BTreeMap<&'static str, u64>,
}

/// Warming figures, by outcome (`stored`, `fresh`, `failed`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WarmStats {
    /// Warm-list requests (`cachegate warm`, `POST /admin/warm`).
    pub requests: BTreeMap<&'static str, u64>,
    /// Hot-key refreshes (`warm_hot_keys`).
    pub hot_key_refreshes: BTreeMap<&'static str, u64>,
}

/// Purge figures.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PurgeStats {
    /// Started on this replica, by kind (`tags`, `paths`, `keys`, `all`).
    pub by_kind: BTreeMap<&'static str, u64>,
    /// How they ended (`confirmed`, `unconfirmed`, `local`).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Applied here from other replicas or events.
    pub received: u64,
    /// Times the oldest purge markers were folded into a purge of everything stored by
    /// then, in this replica's markers (`local`) or in Redis's (`redis`).
    pub marker_folds: BTreeMap<&'static str, u64>,
}

/// Requests, in all and by status.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RequestCounts {
    /// Every request counted.
    pub total: u64,
    /// By `X-Cache-Status` label (`hit`, `miss`, `collapsed`, `bypass`, ...).
    pub by_status: BTreeMap<&'static str, StatusCounts>,
}

/// Requests of one status.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StatusCounts {
    /// Requests with this status.
    pub total: u64,
    /// By reason label; reasons never seen are left out.
    pub by_reason: BTreeMap<&'static str, u64>,
}

/// The Redis tier's figures.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RedisStats {
    /// Failures and timeouts by operation.
    pub errors: BTreeMap<&'static str, u64>,
    /// Entries rejected (forged, copied, tampered, undecodable).
    pub rejected_entries: u64,
    /// `closed`, `open` or `half-open`.
    pub breaker_state: &'static str,
}

/// The memory tier's size.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MemoryStats {
    /// Entries held.
    pub entries: u64,
    /// Weighted bytes held.
    pub bytes: u64,
}

/// Open client connections.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Open connections, tunnels included.
    pub open: u64,
    /// Open tunnels.
    pub tunnels: u64,
}
