//! Storage tiers and the two-tier lookup: memory first, then Redis; a Redis hit fills the
//! memory tier; a store writes memory at once and Redis in the background.

pub mod breaker;
pub mod memory;
pub mod redis;

use std::sync::Arc;

use crate::entry::{CachedResponse, EnvelopeKeys, now_ms};
use crate::key::CacheKey;
use crate::metrics::Metrics;
use crate::status::Tier;

pub use self::memory::MemoryTier;
pub use self::redis::RedisTier;

/// The tiers together. Cloning shares them.
#[derive(Clone)]
pub struct TieredStore {
    memory: MemoryTier,
    redis: Option<RedisTier>,
    envelope_keys: EnvelopeKeys,
    metrics: Arc<Metrics>,
}

impl TieredStore {
    /// Combines a memory tier with an optional Redis tier whose envelopes are sealed and
    /// opened with `envelope_keys`.
    pub fn new(
        memory: MemoryTier,
        redis: Option<RedisTier>,
        envelope_keys: EnvelopeKeys,
        metrics: Arc<Metrics>,
    ) -> Self {
        TieredStore {
            memory,
            redis,
            envelope_keys,
            metrics,
        }
    }

    /// Whether a Redis tier is configured.
    pub fn has_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// Looks `key` up in the memory tier, then in Redis. A fresh Redis entry is copied into
    /// the memory tier. A Redis entry that fails authentication (forged, copied from another
    /// key, altered) or decoding counts as a miss and in `redis_rejected_entries_total`.
    pub async fn lookup(&self, key: &CacheKey) -> Option<(CachedResponse, Tier)> {
        if let Some(entry) = self.memory.get(key) {
            return Some((entry, Tier::Memory));
        }
        let redis = self.redis.as_ref()?;
        let bytes = redis.get(key).await?;
        let Some(entry) = CachedResponse::decode(key, &bytes, &self.envelope_keys) else {
            self.metrics.redis_rejected_entries.inc();
            tracing::warn!(key = %key.short(), "unauthenticated or undecodable entry in redis treated as a miss");
            return None;
        };
        if !entry.is_fresh(now_ms()) {
            return None;
        }
        self.memory.insert(*key, entry.clone());
        Some((entry, Tier::Redis))
    }

    /// Looks `key` up in the memory tier only.
    pub fn lookup_memory(&self, key: &CacheKey) -> Option<CachedResponse> {
        self.memory.get(key)
    }

    /// Stores `entry` in the memory tier now and in Redis in a background task, so that the
    /// response is never delayed by Redis.
    pub async fn store(&self, key: CacheKey, entry: CachedResponse) {
        self.memory.insert(key, entry.clone());
        self.metrics.stores.inc(Tier::Memory.as_str());
        if let Some(redis) = self.redis.clone() {
            let metrics = self.metrics.clone();
            let keys = self.envelope_keys.clone();
            tokio::spawn(async move {
                let ttl = u64::from(entry.ttl_secs());
                if redis.set(&key, entry.encode(&key, &keys), ttl).await {
                    metrics.stores.inc(Tier::Redis.as_str());
                }
            });
        }
    }

    /// Refreshes the memory-tier gauges.
    pub fn refresh_gauges(&self) {
        let (entries, bytes) = self.memory.usage();
        self.metrics.memory_entries.set(entries as i64);
        self.metrics.memory_bytes.set(bytes as i64);
    }
}
