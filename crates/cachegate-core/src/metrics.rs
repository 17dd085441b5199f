//! The tiers' Prometheus metrics, registered into a registry the caller owns.
//!
//! Every series exists from registration on (at zero until counted), so a dashboard never
//! has to tell "no such series" from "nothing happened".

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// One `key="value"` label pair.
type Label = [(&'static str, &'static str); 1];

/// A counter family with a single label, such as `tier` or `op`, whose every value is
/// exported from the start (at zero until counted).
#[derive(Clone, Debug)]
pub struct LabeledCounter {
    key: &'static str,
    values: &'static [&'static str],
    family: Family<Label, Counter>,
}

impl LabeledCounter {
    /// A family labelled `key`, with a series for each of `values`.
    pub fn new(key: &'static str, values: &'static [&'static str]) -> Self {
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

    /// Adds `n` to the counter labelled `value`.
    pub fn inc_by(&self, value: &'static str, n: u64) {
        self.family.get_or_create(&[(self.key, value)]).inc_by(n);
    }

    /// A handle on the counter labelled `value` (it shares the count).
    pub fn handle(&self, value: &'static str) -> Counter {
        self.family.get_or_create(&[(self.key, value)]).clone()
    }

    /// The count labelled `value` (0 if never incremented).
    pub fn get(&self, value: &'static str) -> u64 {
        self.family.get(&[(self.key, value)]).map_or(0, |c| c.get())
    }

    /// `(value, count)` for every declared value, in declaration order.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        self.values.iter().map(|v| (*v, self.get(v))).collect()
    }

    /// Registers the family as `name` in `registry`.
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        registry.register(name, help, self.family.clone());
    }
}

/// Circuit-breaker states as exported by `redis_breaker_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Redis is used (0).
    Closed = 0,
    /// Redis is skipped until the cool-down ends (1).
    Open = 1,
    /// One probe request is trying Redis (2).
    HalfOpen = 2,
}

impl BreakerState {
    /// `closed`, `open` or `half-open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }

    /// The state a gauge value stands for (anything unknown reads as closed).
    pub fn from_gauge(value: i64) -> Self {
        match value {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

/// The tiers' metrics. Names are relative to the registry's prefix (the proxy uses
/// `cachegate`, giving e.g. `cachegate_stores_total{tier="redis"}`).
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    /// `stores_total{tier}`: entries written, by `tier` (`memory`, `redis`).
    pub stores: LabeledCounter,
    /// `redis_errors_total{op}`: Redis failures and timeouts, by `op` (`get`, `set`, `del`;
    /// `connect`: a connection thread's own read connection could not be made).
    pub redis_errors: LabeledCounter,
    /// `redis_rejected_entries_total`: Redis entries treated as misses because they failed
    /// authentication (forged, copied from another key, tampered) or decoding.
    pub redis_rejected_entries: Counter,
    /// `redis_breaker_state`: see [`BreakerState`].
    pub redis_breaker_state: Gauge,
    /// `redis_thread_connections`: connection threads' own Redis read connections open now
    /// (see `RedisTier::get`).
    pub redis_thread_connections: Gauge,
    /// `memory_entries`: entries in the memory tier (refreshed on demand).
    pub memory_entries: Gauge,
    /// `memory_bytes`: weighted bytes in the memory tier (refreshed on demand).
    pub memory_bytes: Gauge,
    /// `purges_total{kind}`: purges started on this replica, by `kind` (`tags`, `paths`,
    /// `keys`, `all`).
    pub purges: LabeledCounter,
    /// `purge_outcomes_total{outcome}`: how purges started here ended: `confirmed` (every
    /// replica acknowledged), `unconfirmed` (the time limit passed first), `local` (Redis
    /// not reached: this replica only).
    pub purge_outcomes: LabeledCounter,
    /// `purges_received_total`: purges from other replicas (or events) applied here.
    pub purges_received: Counter,
    /// `purged_entries_total{tier}`: entries removed because a purge covers them: from the
    /// memory tier when the purge is applied, and (`redis`) Redis entries found purged at
    /// lookup (a purge never scans Redis, so those are counted as they are met).
    pub purged_entries: LabeledCounter,
    /// `purge_marker_folds_total{store}`: times the oldest purge markers were folded into a
    /// purge of every entry stored by then: in this replica's markers (`local`: beyond
    /// [`crate::purge::MAX_TAG_MARKERS`] tags or [`crate::purge::MAX_PATTERN_MARKERS`]
    /// patterns), or in Redis's as this replica recorded a purge (`redis`: beyond
    /// [`crate::purge::MAX_SHARED_MARKERS`]; a large purge is recorded in parts, each of
    /// which may fold).
    pub purge_marker_folds: LabeledCounter,
}

/// Tier labels.
pub const TIERS: &[&str] = &["memory", "redis"];

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            stores: LabeledCounter::new("tier", TIERS),
            redis_errors: LabeledCounter::new("op", &["get", "set", "del", "connect"]),
            redis_rejected_entries: Counter::default(),
            redis_breaker_state: Gauge::default(),
            redis_thread_connections: Gauge::default(),
            memory_entries: Gauge::default(),
            memory_bytes: Gauge::default(),
            purges: LabeledCounter::new("kind", &["tags", "paths", "keys", "all"]),
            purge_outcomes: LabeledCounter::new("outcome", &["confirmed", "unconfirmed", "local"]),
            purges_received: Counter::default(),
            purged_entries: LabeledCounter::new("tier", TIERS),
            purge_marker_folds: LabeledCounter::new("store", &["local", "redis"]),
        }
    }
}

impl StoreMetrics {
    /// New metrics, registered into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = StoreMetrics::default();
        m.register_into(registry);
        m
    }

    /// Registers these metrics into `registry` (they keep counting where they are).
    pub fn register_into(&self, registry: &mut Registry) {
        let m = self;
        m.stores
            .register(registry, "stores", "Entries written by tier");
        m.redis_errors.register(
            registry,
            "redis_errors",
            "Redis failures and timeouts by operation",
        );
        registry.register(
            "redis_rejected_entries",
            "Redis entries that failed authentication or decoding and were treated as misses",
            m.redis_rejected_entries.clone(),
        );
        registry.register(
            "redis_breaker_state",
            "Redis circuit breaker: 0 closed, 1 open, 2 half-open",
            m.redis_breaker_state.clone(),
        );
        registry.register(
            "redis_thread_connections",
            "Connection threads' own Redis read connections open now",
            m.redis_thread_connections.clone(),
        );
        registry.register(
            "memory_entries",
            "Entries in the memory tier",
            m.memory_entries.clone(),
        );
        registry.register(
            "memory_bytes",
            "Weighted bytes in the memory tier",
            m.memory_bytes.clone(),
        );
        m.purges.register(
            registry,
            "purges",
            "Purges started on this replica, by kind",
        );
        m.purge_outcomes.register(
            registry,
            "purge_outcomes",
            "How purges started here ended: confirmed, unconfirmed, local",
        );
        registry.register(
            "purges_received",
            "Purges from other replicas or events applied here",
            m.purges_received.clone(),
        );
        m.purged_entries.register(
            registry,
            "purged_entries",
            "Entries removed because a purge covers them, by tier (redis: as met at lookup)",
        );
        m.purge_marker_folds.register(
            registry,
            "purge_marker_folds",
            "Times the oldest purge markers were folded into a purge of every entry stored by then",
        );
    }
}
