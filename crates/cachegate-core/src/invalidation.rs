//! Purges that reach every replica: recorded in Redis, carried over pub/sub, and
//! acknowledged.
//!
//! A purge ([`crate::store::TieredStore::purge`]) applies at once on this replica, records
//! its markers in the Redis hash `{namespace}:purges`, and publishes a message on
//! `{namespace}:invalidate`. Every replica's subscriber (`subscribe`) applies it and
//! acknowledges on `{namespace}:acks:{id}`; the purge waits for as many acknowledgements
//! as `PUBLISH` reported subscribers, up to a time limit, and reports what it got
//! ([`PurgeReport`]). A replica that (re)subscribes loads every marker from the hash
//! first, so a purge it missed while disconnected still applies.
//!
//! Message (UTF-8 lines): `v1`, the purge id (16 hex digits), the time in ms since the
//! Unix epoch, then `all`, or `tags` followed by one tag per line.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;

use crate::key::CacheKey;
use crate::metrics::StoreMetrics;
use crate::purge::Purges;
use crate::store::{RedisTier, Sweeper};

/// What a purge covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeScope {
    /// Every entry tagged with any of these tags (a tag may not contain a line break).
    Tags(Vec<String>),
    /// Every entry whose path matches any of these patterns
    /// ([`crate::purge::glob_matches`]).
    Paths(Vec<String>),
    /// The entries stored under these keys (for "purge what this request would hit").
    Keys(Vec<CacheKey>),
    /// Every entry of the namespace.
    All,
}

/// What a purge reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeReport {
    /// Whether Redis published the purge to the subscribed replicas. `false`: it applied
    /// on this replica only (Redis down).
    pub redis_reached: bool,
    /// Whether Redis also recorded the purge's markers (and deleted the Redis entries of
    /// purged keys), so that a replica (re)subscribing later applies it too. `false` when
    /// Redis refused or failed that write (out of memory under `maxmemory-policy
    /// noeviction`, a timeout) but the purge was still published: the replicas subscribed
    /// then apply it, one between subscriptions does not.
    pub recorded: bool,
    /// Replicas subscribed when the purge was published (this one included), per Redis.
    pub replicas_expected: u64,
    /// Replicas that acknowledged within the time limit.
    pub replicas_acknowledged: u64,
    /// Memory-tier entries removed, summed over this replica and the replicas that
    /// acknowledged. Redis entries are covered by a purge marker checked at lookup and are
    /// not counted (counting them would need a keyspace scan).
    pub memory_entries_purged: u64,
}

impl PurgeReport {
    /// Whether Redis recorded the purge and every replica subscribed at publication
    /// acknowledged: after a confirmed purge, no replica serves a purged entry.
    pub fn confirmed(&self) -> bool {
        self.redis_reached && self.recorded && self.replicas_acknowledged >= self.replicas_expected
    }
}

/// How a purge treats what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PurgeMode {
    /// Deleted: a miss from then on.
    #[default]
    Hard,
    /// Marked stale: kept, and served stale while one background request refreshes it
    /// (by a caller that can, such as the proxy; others treat it as a miss).
    Soft,
}

/// What an event (published on `{namespace}:events` or raised through an API) purges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPurge {
    /// What it covers (tags, paths, all...).
    pub scopes: Vec<PurgeScope>,
    /// Hard or soft.
    pub mode: PurgeMode,
}

/// A purge as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PurgeMessage {
    pub id: u64,
    pub at_ms: u64,
    pub scope: PurgeScope,
    pub mode: PurgeMode,
}

impl PurgeMessage {
    pub fn encode(&self) -> String {
        let items: Vec<String> = match &self.scope {
            PurgeScope::All => Vec::new(),
            PurgeScope::Tags(tags) => tags.clone(),
            PurgeScope::Paths(patterns) => patterns.clone(),
            PurgeScope::Keys(keys) => keys.iter().map(CacheKey::to_hex).collect(),
        };
        let kind = match self.scope {
            PurgeScope::All => "all",
            PurgeScope::Tags(_) => "tags",
            PurgeScope::Paths(_) => "paths",
            PurgeScope::Keys(_) => "keys",
        };
        let soft = if self.mode == PurgeMode::Soft {
            "soft-"
        } else {
            ""
        };
        let mut out = format!("v1\n{:016x}\n{}\n{soft}{kind}", self.id, self.at_ms);
        for item in items {
            out.push('\n');
            out.push_str(&item);
        }
        out
    }

    pub fn decode(text: &str) -> Option<PurgeMessage> {
        let mut lines = text.split('\n');
        if lines.next()? != "v1" {
            return None;
        }
        let id = u64::from_str_radix(lines.next()?, 16).ok()?;
        let at_ms = lines.next()?.parse().ok()?;
        let kind = lines.next()?;
        let (mode, kind) = match kind.strip_prefix("soft-") {
            Some(kind) => (PurgeMode::Soft, kind),
            None => (PurgeMode::Hard, kind),
        };
        let scope = match kind {
            "all" => PurgeScope::All,
            "tags" => PurgeScope::Tags(lines.map(str::to_string).collect()),
            "paths" => PurgeScope::Paths(lines.map(str::to_string).collect()),
            "keys" => PurgeScope::Keys(lines.map(key_from_hex).collect::<Option<_>>()?),
            _ => return None,
        };
        Some(PurgeMessage {
            id,
            at_ms,
            scope,
            mode,
        })
    }

    /// The markers this purge records in Redis (`soft:`-prefixed for a soft purge).
    pub fn markers(&self) -> Vec<(String, u64)> {
        let markers = self.hard_markers();
        if self.mode == PurgeMode::Hard {
            return markers;
        }
        markers
            .into_iter()
            .map(|(field, at)| (format!("soft:{field}"), at))
            .collect()
    }

    fn hard_markers(&self) -> Vec<(String, u64)> {
        match &self.scope {
            PurgeScope::All => vec![("all".to_string(), self.at_ms)],
            PurgeScope::Tags(tags) => tags
                .iter()
                .map(|t| (format!("tag:{t}"), self.at_ms))
                .collect(),
            PurgeScope::Paths(patterns) => patterns
                .iter()
                .map(|p| (format!("path:{p}"), self.at_ms))
                .collect(),
            PurgeScope::Keys(keys) => keys
                .iter()
                .map(|k| (format!("key:{}", k.to_hex()), self.at_ms))
                .collect(),
        }
    }
}

/// Applies a purge to local markers.
pub(crate) fn apply(purges: &Purges, scope: &PurgeScope, at_ms: u64) {
    match scope {
        PurgeScope::All => purges.purge_all(at_ms),
        PurgeScope::Tags(tags) => purges.purge_tags(tags, at_ms),
        PurgeScope::Paths(patterns) => purges.purge_paths(patterns, at_ms),
        PurgeScope::Keys(keys) => purges.purge_keys(keys, at_ms),
    }
}

/// Maps an event name (published on `{namespace}:events`) to what it purges; `None` for
/// an unknown name (logged, ignored).
pub type EventRules = Arc<dyn Fn(&str) -> Option<EventPurge> + Send + Sync>;

/// The hard and the soft purge markers of one cache.
#[derive(Clone)]
pub(crate) struct Markers {
    pub hard: Arc<Purges>,
    pub soft: Arc<Purges>,
}

impl Markers {
    fn of(&self, mode: PurgeMode) -> &Purges {
        match mode {
            PurgeMode::Hard => &self.hard,
            PurgeMode::Soft => &self.soft,
        }
    }
}

/// Applies markers loaded from Redis (`soft:`-prefixed ones to the soft markers); path
/// patterns in one pass per mode.
fn apply_markers(markers: &Markers, loaded: &[(String, u64)]) {
    let (mut hard_paths, mut soft_paths) = (Vec::new(), Vec::new());
    for (field, at_ms) in loaded {
        let (purges, paths, field) = match field.strip_prefix("soft:") {
            Some(field) => (&*markers.soft, &mut soft_paths, field),
            None => (&*markers.hard, &mut hard_paths, field.as_str()),
        };
        if field == "all" {
            purges.purge_all(*at_ms);
        } else if let Some(tag) = field.strip_prefix("tag:") {
            purges.purge_tags(&[tag], *at_ms);
        } else if let Some(pattern) = field.strip_prefix("path:") {
            paths.push((pattern, *at_ms));
        } else if let Some(key) = field.strip_prefix("key:").and_then(key_from_hex) {
            purges.purge_keys(&[key], *at_ms);
        }
    }
    for (purges, paths) in [(&markers.hard, hard_paths), (&markers.soft, soft_paths)] {
        if !paths.is_empty() {
            purges.purge_paths_at(paths);
        }
    }
}

/// A cache key from its 64 hex digits.
fn key_from_hex(hex: &str) -> Option<CacheKey> {
    if hex.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(CacheKey(key))
}

/// Keeps `purges` in step with every replica: subscribes to the invalidation channel,
/// loads the recorded markers on every (re)subscription, applies and acknowledges each
/// purge. Reconnects after a failure (at most every second), after a `SUBSCRIBE` not
/// answered within the operation timeout, and when a `PING` sent after 5 s of silence is
/// not answered (a connection that died without a reset); ends when `purges` is dropped
/// (checked at least every second).
///
/// With `events`, it also listens on `{namespace}:events`: a message there is an event
/// name (`PUBLISH {namespace}:events leads.imported` from any Redis client, such as an ETL
/// job); every replica receives it, applies what the rules map it to, and records the
/// markers in Redis for replicas that were away.
pub(crate) fn subscribe(
    redis: RedisTier,
    markers: &Markers,
    events: Option<EventRules>,
    sweep: Sweeper,
    metrics: StoreMetrics,
) -> tokio::task::JoinHandle<()> {
    let purges = Arc::downgrade(&markers.hard);
    let soft = markers.soft.clone();
    redis.home().clone().spawn(async move {
        let mut backoff = Duration::from_millis(50);
        loop {
            if purges.strong_count() == 0 {
                return;
            }
            if let Some(pubsub) = redis.pubsub().await
                && run(
                    &redis,
                    pubsub,
                    (&purges, &soft),
                    events.as_ref(),
                    &sweep,
                    &metrics,
                )
                .await
            {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    })
}

/// Silence on the purge subscription after which it is checked with a `PING`.
const KEEPALIVE_AFTER: Duration = Duration::from_secs(5);

/// The least time the keep-alive `PING` is given to come back.
const KEEPALIVE_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// One subscription's life. Returns `true` when the purges are gone (stop), `false` when
/// the connection ended (reconnect).
async fn run(
    redis: &RedisTier,
    mut pubsub: redis::aio::PubSub,
    (purges, soft): (&Weak<Purges>, &Arc<Purges>),
    events: Option<&EventRules>,
    sweep: &Sweeper,
    metrics: &StoreMetrics,
) -> bool {
    let invalidate = redis.invalidate_channel();
    let mut channels = vec![invalidate.clone()];
    if events.is_some() {
        channels.push(redis.events_channel());
    }
    // redis-rs's pub/sub commands have no response timeout: a Redis that accepted the
    // connection and went silent would hold this task for ever.
    let op_timeout = redis.op_timeout();
    for channel in &channels {
        let subscribed = tokio::time::timeout(op_timeout, pubsub.subscribe(channel)).await;
        if !matches!(subscribed, Ok(Ok(()))) {
            return false;
        }
    }
    // Subscribed first, then loaded: a purge published in between is in the hash or
    // arrives as a message (applying it twice is harmless).
    let Some(markers) = redis.load_purges().await else {
        return false;
    };
    match purges.upgrade() {
        Some(hard) => {
            let both = Markers {
                hard: hard.clone(),
                soft: soft.clone(),
            };
            apply_markers(&both, &markers);
            hard.mark_synced();
        }
        None => return true,
    }
    // What this replica missed while it was away leaves its memory tier now.
    sweep(PurgeScope::All).await;
    tracing::debug!("subscribed to purges");
    redis.check_eviction_policy().await;
    let (mut sink, mut messages) = pubsub.split();
    let mut last_heard = tokio::time::Instant::now();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(1), messages.next()).await;
        let Some(purges) = purges.upgrade() else {
            return true;
        };
        let markers = Markers {
            hard: purges,
            soft: soft.clone(),
        };
        if next.is_ok() {
            last_heard = tokio::time::Instant::now();
        }
        match next {
            // A subscriber only reads: a connection that died without a reset (a NAT or
            // firewall forgetting it, a Redis host gone) would never say so, while Redis
            // dropped the subscription and purges stopped reaching this replica. After
            // `KEEPALIVE_AFTER` of silence, a `PING` must come back within the operation
            // timeout (at least `KEEPALIVE_TIMEOUT_MIN`), or the subscription is made again.
            Err(_) if last_heard.elapsed() >= KEEPALIVE_AFTER => {
                let limit = op_timeout.max(KEEPALIVE_TIMEOUT_MIN);
                match tokio::time::timeout(limit, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => last_heard = tokio::time::Instant::now(),
                    _ => {
                        tracing::warn!("purge subscription silent: reconnecting");
                        return false;
                    }
                }
            }
            Err(_) => continue,
            Ok(None) => {
                tracing::warn!("purge subscription lost: reconnecting");
                return false;
            }
            Ok(Some(msg)) if msg.get_channel_name() != invalidate => {
                let (Some(rules), Ok(name)) = (events, msg.get_payload::<String>()) else {
                    continue;
                };
                let name = name.trim();
                match rules(name) {
                    Some(event) => {
                        let at_ms = crate::now_ms();
                        for scope in event.scopes {
                            apply(markers.of(event.mode), &scope, at_ms);
                            if event.mode == PurgeMode::Hard {
                                sweep(scope.clone()).await;
                            }
                            let message = PurgeMessage {
                                id: 0,
                                at_ms,
                                scope,
                                mode: event.mode,
                            };
                            redis.record_purges(&message.markers()).await;
                        }
                        tracing::info!(target: "audit", op = "event", event = %name, "event applied");
                    }
                    // Not a configured name: whoever can publish chose it, so it is not
                    // logged (control characters, any length), only its length and a
                    // hash to compare a suspected name with.
                    None => tracing::warn!(
                        event_len = name.len(),
                        event_blake3 = %&blake3::hash(name.as_bytes()).to_hex()[..16],
                        "unknown event ignored"
                    ),
                }
            }
            Ok(Some(msg)) => {
                let Some(purge) = msg
                    .get_payload::<String>()
                    .ok()
                    .and_then(|text| PurgeMessage::decode(&text))
                else {
                    tracing::warn!("malformed purge message ignored");
                    continue;
                };
                if markers.hard.is_own(purge.id) {
                    // Applied and swept by the purge call itself.
                    redis.ack_purge(purge.id, 0).await;
                    continue;
                }
                apply(markers.of(purge.mode), &purge.scope, purge.at_ms);
                metrics.purges_received.inc();
                let removed = match purge.mode {
                    PurgeMode::Hard => sweep(purge.scope).await,
                    PurgeMode::Soft => 0,
                };
                redis.ack_purge(purge.id, removed).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaded_markers_apply_to_their_mode() {
        let markers = Markers {
            hard: Arc::new(Purges::default()),
            soft: Arc::new(Purges::default()),
        };
        let loaded: Vec<(String, u64)> = [
            ("path:/kpi/*", 200),
            ("path:/kpi/*", 100),
            ("soft:path:/api/*", 300),
            ("tag:leads", 400),
            ("soft:all", 50),
        ]
        .into_iter()
        .map(|(f, at)| (f.to_string(), at))
        .collect();
        apply_markers(&markers, &loaded);
        let covers = |purges: &Purges, at: u64, tag: &str| {
            purges.covers(at, |pred: &mut dyn FnMut(&str) -> bool| pred(tag))
        };
        assert!(covers(&markers.hard, 200, "path:/kpi/x"), "the later time");
        assert!(!covers(&markers.hard, 201, "path:/kpi/x"));
        assert!(!covers(&markers.hard, 100, "path:/api/x"), "soft only");
        assert!(covers(&markers.soft, 300, "path:/api/x"));
        assert!(covers(&markers.hard, 400, "leads"));
        assert!(covers(&markers.soft, 50, "anything"));
        assert!(!covers(&markers.hard, 50, "anything"));
    }

    #[test]
    fn messages_round_trip_and_reject_garbage() {
        for scope in [
            PurgeScope::All,
            PurgeScope::Tags(vec!["kpi".into(), "kpi:region:eu".into()]),
            PurgeScope::Tags(vec![]),
            PurgeScope::Paths(vec!["/kpi/*".into()]),
            PurgeScope::Keys(vec![CacheKey([7; 32]), CacheKey([0xa0; 32])]),
        ] {
            for mode in [PurgeMode::Hard, PurgeMode::Soft] {
                let m = PurgeMessage {
                    id: 0xabcdef,
                    at_ms: 1_790_000_000_000,
                    scope: scope.clone(),
                    mode,
                };
                assert_eq!(PurgeMessage::decode(&m.encode()), Some(m));
            }
        }
        for garbage in [
            "",
            "v2\n1\n2\nall",
            "v1\nzz\n2\nall",
            "v1\n1\n2\nsome",
            "v1\n1\n2\nkeys\nabc",
        ] {
            assert_eq!(PurgeMessage::decode(garbage), None, "{garbage:?}");
        }
    }
}
