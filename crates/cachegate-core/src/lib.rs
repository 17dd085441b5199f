//! cachegate's caching engine, usable on its own and shared by the `cachegate` proxy.
//!
//! The parts, in the order a lookup meets them:
//! - [`key`]: cache keys, keyed BLAKE3 hashes under a secret ([`key::KeyBuilder`]); no
//!   caller data can be read back from a key.
//! - [`store`]: the two tiers behind one [`store::TieredStore`]: an in-process memory tier
//!   bounded by bytes ([`store::MemoryTier`], quick_cache) and a shared Redis/Valkey tier
//!   ([`store::RedisTier`]) whose every operation is bounded by a timeout and guarded by a
//!   circuit breaker, so that a dead or slow Redis turns into misses, never into errors.
//!   What is stored implements [`store::Storable`].
//! - [`envelope`]: how an entry travels through Redis: versioned, authenticated with a key
//!   derived from the secret, and sealed (XChaCha20-Poly1305) by default.
//! - [`purge`]: purges by tag and of the whole namespace, as markers checked at lookup;
//!   [`invalidation`]: carried to every replica over Redis pub/sub, acknowledged.
//! - [`coalesce`]: one computation (or upstream request) per key, however many callers
//!   miss at once.
//! - [`metrics`]: the tiers' Prometheus metrics, registered into the caller's registry.
//!
//! A lookup: key -> memory tier -> (miss) Redis `GET` under the breaker -> envelope opened
//! and checked against the key -> entry copied into the memory tier. A store: memory tier
//! at once, Redis in a background task.

#![warn(missing_docs)]

pub mod cache;
pub mod coalesce;
pub mod codec;
pub mod envelope;
pub mod home;
pub mod invalidation;
pub mod key;
pub mod metrics;
pub mod purge;
pub mod store;

use std::time::{SystemTime, UNIX_EPOCH};

pub use cache::{
    BuildError, Cache, CacheBuilder, CacheMetrics, CacheStats, ComputationPanicked, Error, Fetched,
    Options, SharedError, Source,
};
pub use codec::{Codec, CodecError, Postcard};
pub use invalidation::{PurgeReport, PurgeScope};
pub use store::RedisOptions;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    ms_since_epoch(SystemTime::now())
}

/// `time` in milliseconds since the Unix epoch (0 for a time before it).
pub fn ms_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// 32 random bytes from the standard library's randomly seeded hasher: a per-process
/// secret (keys that no other process can derive) or a random id.
pub fn random_secret() -> [u8; 32] {
    random_bytes()
}

/// A random 64-bit id (purge ids, refresh lease tokens), from [`random_secret`].
pub fn random_id() -> u64 {
    u64::from_le_bytes(random_bytes()[..8].try_into().unwrap_or_default())
}

fn random_bytes() -> [u8; 32] {
    use std::hash::{BuildHasher, RandomState};
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&RandomState::new().hash_one(i).to_le_bytes());
    }
    out
}
