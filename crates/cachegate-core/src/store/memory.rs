//! The memory tier: a concurrent cache bounded by bytes (quick_cache, S3-FIFO-like
//! eviction), where an entry stops being returned when its own freshness runs out.

use std::sync::Arc;

use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};

use super::Storable;
use crate::key::CacheKey;

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
///
/// The cache is split into shards for concurrency, and one entry must fit in one shard:
/// the number of shards is chosen so that an entry of `max_entry_bytes` fits
/// ([`MemoryTier::max_entry_bytes`] tells the exact limit); a heavier entry is refused by
/// [`MemoryTier::insert`], never silently dropped.
pub struct MemoryTier<V> {
    cache: Arc<Cache<CacheKey, V, EntryWeighter>>,
    /// 0 (made with `max_bytes` 0): the tier holds nothing, and its lookups and stores
    /// touch no lock.
    max_entry_bytes: u64,
}

impl<V> Clone for MemoryTier<V> {
    fn clone(&self) -> Self {
        MemoryTier {
            cache: self.cache.clone(),
            max_entry_bytes: self.max_entry_bytes,
        }
    }
}

/// The share of a shard one entry may take: quick_cache admits an entry up to its shard's
/// hot target (97% of the shard by default); a little below, to stay clear of rounding.
const ENTRY_SHARE_OF_SHARD: f64 = 0.95;

impl<V: Storable> MemoryTier<V> {
    /// A tier holding at most `max_bytes`, counting each entry's
    /// [`Storable::size_bytes`], that holds entries of up to `max_entry_bytes` (or up to
    /// the whole budget, when smaller); entries seen once are evicted before entries seen
    /// again (quick_cache's CLOCK-Pro / S3-FIFO policy). `max_bytes` 0: a tier that holds
    /// nothing (every lookup misses and every store is refused, without taking a lock).
    pub fn new(max_bytes: u64, max_entry_bytes: u64) -> Self {
        let off = max_bytes == 0;
        let max_bytes = max_bytes.max(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let fitting =
            (max_bytes as f64 * ENTRY_SHARE_OF_SHARD / max_entry_bytes.max(1) as f64) as u64;
        let shards = prev_power_of_two(fitting.clamp(1, cores * 4));
        let estimated_items = (max_bytes / TYPICAL_ENTRY_BYTES).clamp(16, 1 << 20) as usize;
        let options = OptionsBuilder::new()
            .shards(shards as usize)
            .estimated_items_capacity(estimated_items)
            .weight_capacity(max_bytes)
            .build()
            .expect("shards, capacity and weight are all set");
        let cache = Cache::with_options(
            options,
            EntryWeighter,
            DefaultHashBuilder::default(),
            DefaultLifecycle::default(),
        );
        let max_entry_bytes = (cache.shard_capacity() as f64 * ENTRY_SHARE_OF_SHARD) as u64;
        MemoryTier {
            cache: Arc::new(cache),
            max_entry_bytes: if off { 0 } else { max_entry_bytes },
        }
    }

    /// The heaviest entry ([`Storable::size_bytes`]) this tier holds.
    pub fn max_entry_bytes(&self) -> u64 {
        self.max_entry_bytes
    }

    /// The entry for `key` if present and still kept (fresh, or stale within its grace)
    /// at `now_ms` (milliseconds since the Unix epoch, [`crate::now_ms`]). An entry no
    /// longer kept is removed.
    pub fn get(&self, key: &CacheKey, now_ms: u64) -> Option<V> {
        if self.max_entry_bytes == 0 {
            return None;
        }
        let entry = self.cache.get(key)?;
        if entry.is_kept(now_ms) {
            return Some(entry);
        }
        let stored_at = entry.stored_at_ms();
        self.cache.remove_if(key, |held| {
            held.stored_at_ms() == stored_at && !held.is_kept(now_ms)
        });
        None
    }

    /// Stores `entry` under `key`, replacing what was there, and returns `true`. An entry
    /// heavier than [`MemoryTier::max_entry_bytes`] is not held: what was stored under
    /// `key` is removed (it is older than `entry`) and `false` is returned.
    pub fn insert(&self, key: CacheKey, entry: V) -> bool {
        if self.max_entry_bytes == 0 {
            return false;
        }
        if entry.size_bytes() as u64 > self.max_entry_bytes {
            self.cache.remove(&key);
            return false;
        }
        self.cache.insert(key, entry);
        true
    }

    /// Removes `key`'s entry, if any.
    pub fn remove(&self, key: &CacheKey) {
        self.cache.remove(key);
    }

    /// Removes `key`'s entry if `purged` says so; returns whether it did.
    pub fn remove_if(&self, key: &CacheKey, purged: impl FnOnce(&V) -> bool) -> bool {
        self.cache.remove_if(key, purged).is_some()
    }

    /// Removes every entry `purged` says so of, shard by shard (each shard is locked while
    /// it is visited); returns how many it removed. Costs one visit per entry held.
    pub fn remove_where(&self, purged: impl Fn(&CacheKey, &V) -> bool) -> u64 {
        let removed = std::cell::Cell::new(0u64);
        self.cache.retain(|key, entry| {
            let gone = purged(key, entry);
            removed.set(removed.get() + u64::from(gone));
            !gone
        });
        removed.get()
    }

    /// `(entries, weighted bytes)`.
    pub fn usage(&self) -> (u64, u64) {
        (self.cache.len() as u64, self.cache.weight())
    }
}

/// The largest power of two not above `n` (`n` at least 1).
fn prev_power_of_two(n: u64) -> u64 {
    1 << (63 - n.max(1).leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::now_ms;

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
        fn from_payload(_: &[u8]) -> Option<Self> {
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
    fn a_zero_budget_holds_nothing() {
        let tier = MemoryTier::new(0, 1 << 16);
        assert!(!tier.insert(CacheKey([1; 32]), entry(1, now_ms(), 60)));
        assert!(tier.get(&CacheKey([1; 32]), now_ms()).is_none());
        assert_eq!((tier.max_entry_bytes(), tier.usage()), (0, (0, 0)));
    }

    #[test]
    fn bounded_by_bytes() {
        let tier = MemoryTier::new(100_000, 10_000);
        for i in 0..100u8 {
            tier.insert(CacheKey([i; 32]), entry(10_000, now_ms(), 60));
        }
        let (entries, bytes) = tier.usage();
        assert!(bytes <= 100_000, "{bytes} bytes held");
        assert!(entries > 0 && entries < 100, "{entries} entries held");
    }

    #[test]
    fn stale_entries_are_not_returned_and_are_removed() {
        let tier = MemoryTier::new(1 << 20, 1 << 16);
        tier.insert(CacheKey([1; 32]), entry(10, now_ms() - 5_000, 1));
        assert_eq!(tier.usage().0, 1);
        assert!(tier.get(&CacheKey([1; 32]), now_ms()).is_none());
        assert_eq!(tier.usage().0, 0);
        tier.insert(CacheKey([2; 32]), entry(10, now_ms(), 60));
        assert!(tier.get(&CacheKey([2; 32]), now_ms()).is_some());
        tier.remove(&CacheKey([2; 32]));
        assert!(tier.get(&CacheKey([2; 32]), now_ms()).is_none());
    }

    #[test]
    fn entries_up_to_the_max_entry_size_are_held_whatever_the_shards() {
        // Budgets and entry sizes where a per-core shard split would refuse the entry.
        for (budget, max_entry) in [
            (4 << 20, 600 << 10),
            (16 << 20, 8 << 20),
            (256 << 20, 9 << 20),
        ] {
            let tier = MemoryTier::new(budget, max_entry);
            assert!(tier.max_entry_bytes() >= max_entry, "{budget} {max_entry}");
            assert!(tier.insert(CacheKey([4; 32]), entry(max_entry as usize, now_ms(), 60)));
            assert!(
                tier.get(&CacheKey([4; 32]), now_ms()).is_some(),
                "{budget} {max_entry}"
            );
        }
    }

    #[test]
    fn an_entry_larger_than_the_limit_is_refused_and_replaces_nothing_stale() {
        let tier = MemoryTier::new(10_000, 5_000);
        assert!(tier.insert(CacheKey([3; 32]), entry(100, now_ms(), 60)));
        assert!(!tier.insert(CacheKey([3; 32]), entry(20_000, now_ms(), 60)));
        // The older, smaller entry is gone: a reader never gets it after a newer store.
        assert!(tier.get(&CacheKey([3; 32]), now_ms()).is_none());
        assert!(tier.usage().1 <= 10_000);
    }
}
