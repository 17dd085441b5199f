//! The memory tier: a moka cache bounded by bytes, with a per-entry TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use crate::entry::{CachedResponse, now_ms};
use crate::key::CacheKey;

/// Expires each entry when its own freshness runs out.
struct EntryExpiry;

impl Expiry<CacheKey, Arc<CachedResponse>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.remaining_ttl(now_ms()))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.remaining_ttl(now_ms()))
    }
}

/// The in-process tier. Cloning shares the same cache.
#[derive(Clone)]
pub struct MemoryTier {
    cache: Cache<CacheKey, Arc<CachedResponse>>,
}

impl MemoryTier {
    /// A tier holding at most `max_bytes`, counting each entry's headers and body
    /// ([`CachedResponse::size_bytes`]); the least valuable entries are evicted first
    /// (moka's TinyLFU).
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, v: &Arc<CachedResponse>| {
                u32::try_from(v.size_bytes()).unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry)
            .build();
        MemoryTier { cache }
    }

    /// The entry for `key` if present and still fresh.
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        let entry = self.cache.get(key).await?;
        entry.is_fresh(now_ms()).then_some(entry)
    }

    /// Stores `entry` under `key` until its TTL runs out.
    pub async fn insert(&self, key: CacheKey, entry: Arc<CachedResponse>) {
        self.cache.insert(key, entry).await;
    }

    /// `(entries, weighted bytes)` after pending maintenance has run.
    pub async fn usage(&self) -> (u64, u64) {
        self.cache.run_pending_tasks().await;
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, StatusCode};

    fn entry(body_bytes: usize, ttl_secs: u32) -> Arc<CachedResponse> {
        Arc::new(CachedResponse::new(
            StatusCode::OK,
            &HeaderMap::new(),
            &vec![b'x'; body_bytes],
            now_ms(),
            ttl_secs,
            Arc::from([]),
        ))
    }

    #[tokio::test]
    async fn bounded_by_bytes() {
        let tier = MemoryTier::new(100_000);
        for i in 0..100u8 {
            tier.insert(CacheKey([i; 32]), entry(10_000, 60)).await;
        }
        let (entries, bytes) = tier.usage().await;
        assert!(bytes <= 100_000, "{bytes} bytes held");
        assert!(entries > 0 && entries < 100, "{entries} entries held");
    }

    #[tokio::test]
    async fn stale_entries_are_not_returned() {
        let tier = MemoryTier::new(1 << 20);
        let mut old = (*entry(10, 1)).clone();
        old.stored_at_ms -= 5_000;
        tier.insert(CacheKey([1; 32]), Arc::new(old)).await;
        assert!(tier.get(&CacheKey([1; 32])).await.is_none());
        tier.insert(CacheKey([2; 32]), entry(10, 60)).await;
        assert!(tier.get(&CacheKey([2; 32])).await.is_some());
    }
}
