//! The memory tier: a concurrent cache bounded by bytes (quick_cache, S3-FIFO-like
//! eviction), where an entry stops being returned when its own freshness runs out.

use std::sync::Arc;

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use super::Storable;
use crate::key::CacheKey;
use crate::now_ms;

/// Weighs an entry by the bytes it really holds ([`Storable::size_bytes`]).
#[derive(Clone)]
struct EntryWeighter;

impl<V: Storable> Weighter<CacheKey, V> for EntryWeighter {
    fn weight(&self, _key: &CacheKey, value: &V) -> u64 {
        value.size_bytes() as u64
    }
}

/// A typical entry size, used only to size the cache's tables ahead (they grow as needed).
const TYPICAL_ENTRY_BYTES: u64 = 2048;

/// The in-process tier. Cloning shares the same cache.
///
/// Entries no longer kept ([`Storable::is_kept`]: past their freshness and grace) are not
/// returned and are removed when looked up; until then they count against the budget like
/// any other entry and are evicted by the eviction policy, never by time.
pub struct MemoryTier<V> {
    cache: Arc<Cache<CacheKey, V, EntryWeighter>>,
}

impl<V> Clone for MemoryTier<V> {
    fn clone(&self) -> Self {
        MemoryTier {
            cache: self.cache.clone(),
        }
    }
}

impl<V: Storable> MemoryTier<V> {
    /// A tier holding at most `max_bytes`, counting each entry's
    /// [`Storable::size_bytes`]; entries seen once are evicted before entries seen again
    /// (quick_cache's CLOCK-Pro / S3-FIFO policy).
    pub fn new(max_bytes: u64) -> Self {
        let estimated_items = (max_bytes / TYPICAL_ENTRY_BYTES).clamp(16, 1 << 20) as usize;
        let cache = Cache::with_weighter(estimated_items, max_bytes.max(1), EntryWeighter);
        MemoryTier {
            cache: Arc::new(cache),
        }
    }

    /// The entry for `key` if present and still kept (fresh, or stale within its grace).
    /// An entry no longer kept is removed.
    pub fn get(&self, key: &CacheKey) -> Option<V> {
        let entry = self.cache.get(key)?;
        if entry.is_kept(now_ms()) {
            return Some(entry);
        }
        let stored_at = entry.stored_at_ms();
        self.cache.remove_if(key, |held| {
            held.stored_at_ms() == stored_at && !held.is_kept(now_ms())
        });
        None
    }

    /// Stores `entry` under `key`, replacing what was there. An entry heavier than the
    /// whole budget is not stored.
    pub fn insert(&self, key: CacheKey, entry: V) {
        self.cache.insert(key, entry);
    }

    /// Removes `key`'s entry, if any.
    pub fn remove(&self, key: &CacheKey) {
        self.cache.remove(key);
    }

    /// `(entries, weighted bytes)`.
    pub fn usage(&self) -> (u64, u64) {
        (self.cache.len() as u64, self.cache.weight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test entry: `bytes` of weight, stored at `stored_at_ms`, fresh for `ttl_secs`.
    #[derive(Clone)]
    struct Blob {
        bytes: usize,
        stored_at_ms: u64,
        ttl_secs: u32,
    }

    impl Storable for Blob {
        fn stored_at_ms(&self) -> u64 {
            self.stored_at_ms
        }
        fn ttl_secs(&self) -> u32 {
            self.ttl_secs
        }
        fn size_bytes(&self) -> usize {
            self.bytes
        }
        fn to_payload(&self) -> Vec<u8> {
            Vec::new()
        }
        fn from_payload(_: Vec<u8>) -> Option<Self> {
            None
        }
    }

    fn entry(bytes: usize, stored_at_ms: u64, ttl_secs: u32) -> Blob {
        Blob {
            bytes,
            stored_at_ms,
            ttl_secs,
        }
    }

    #[test]
    fn bounded_by_bytes() {
        let tier = MemoryTier::new(100_000);
        for i in 0..100u8 {
            tier.insert(CacheKey([i; 32]), entry(10_000, now_ms(), 60));
        }
        let (entries, bytes) = tier.usage();
        assert!(bytes <= 100_000, "{bytes} bytes held");
        assert!(entries > 0 && entries < 100, "{entries} entries held");
    }

    #[test]
    fn stale_entries_are_not_returned_and_are_removed() {
        let tier = MemoryTier::new(1 << 20);
        tier.insert(CacheKey([1; 32]), entry(10, now_ms() - 5_000, 1));
        assert_eq!(tier.usage().0, 1);
        assert!(tier.get(&CacheKey([1; 32])).is_none());
        assert_eq!(tier.usage().0, 0);
        tier.insert(CacheKey([2; 32]), entry(10, now_ms(), 60));
        assert!(tier.get(&CacheKey([2; 32])).is_some());
        tier.remove(&CacheKey([2; 32]));
        assert!(tier.get(&CacheKey([2; 32])).is_none());
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_not_held() {
        let tier = MemoryTier::new(10_000);
        tier.insert(CacheKey([3; 32]), entry(20_000, now_ms(), 60));
        assert!(tier.get(&CacheKey([3; 32])).is_none());
        assert!(tier.usage().1 <= 10_000);
    }
}
