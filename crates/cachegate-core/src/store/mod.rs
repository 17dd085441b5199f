//! Storage tiers and the two-tier lookup: memory first, then Redis; a Redis hit fills the
//! memory tier; a store writes memory at once and Redis in the background.

pub mod breaker;
pub mod memory;
pub mod redis;
mod thread_conns;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::envelope::EnvelopeKeys;
use crate::invalidation::{self, EventRules, PurgeMessage, PurgeMode, PurgeReport, PurgeScope};
use crate::key::CacheKey;
use crate::metrics::StoreMetrics;
use crate::now_ms;
use crate::purge::Purges;

pub use self::memory::MemoryTier;
pub use self::redis::{RedisOptions, RedisSetupError, RedisTier};

/// Where an entry was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// The in-process memory tier.
    Memory,
    /// The shared Redis/Valkey tier.
    Redis,
}

impl Tier {
    /// Every tier, for metric and stats listings.
    pub const ALL: [Tier; 2] = [Tier::Memory, Tier::Redis];

    /// The label: `memory` or `redis`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Redis => "redis",
        }
    }
}

/// What the tiers can hold: a value with its freshness, that knows its memory cost and
/// how to turn itself into the bytes sealed into a Redis envelope and back.
///
/// Cloning must be cheap (a reference count): a memory-tier hit returns a clone.
pub trait Storable: Clone + Send + Sync + 'static {
    /// When the value was produced, in milliseconds since the Unix epoch.
    fn stored_at_ms(&self) -> u64;

    /// Freshness lifetime from [`Storable::stored_at_ms`], in seconds.
    fn ttl_secs(&self) -> u32;

    /// How long the entry is kept past its freshness, in seconds, so that it can still be
    /// served stale (stale-if-error, refresh) or revalidated. Default 0: dropped once stale.
    fn grace_secs(&self) -> u32 {
        0
    }

    /// Whether any of the entry's tags (surrogate keys) satisfies `pred`; purges by tag
    /// ask this ([`crate::purge::Purges`]). Default: no tags.
    fn any_tag(&self, pred: &mut dyn FnMut(&str) -> bool) -> bool {
        let _ = pred;
        false
    }

    /// Bytes the entry costs in the memory tier, per-entry overhead included: the memory
    /// tier's weight, so that its budget bounds real memory.
    fn size_bytes(&self) -> usize;

    /// The bytes sealed into the Redis envelope.
    fn to_payload(&self) -> Vec<u8>;

    /// The value back from [`Storable::to_payload`]'s bytes; `None` when they are not a
    /// well-formed payload of this type (another format version, for instance): a miss.
    fn from_payload(payload: &[u8]) -> Option<Self>;

    /// Freshness left at `now_ms`; zero once stale.
    fn remaining_ttl(&self, now_ms: u64) -> Duration {
        let expires = self
            .stored_at_ms()
            .saturating_add(u64::from(self.ttl_secs()) * 1000);
        Duration::from_millis(expires.saturating_sub(now_ms))
    }

    /// Whether the value is fresh at `now_ms`.
    fn is_fresh(&self, now_ms: u64) -> bool {
        !self.remaining_ttl(now_ms).is_zero()
    }

    /// Whether the value is still kept at `now_ms`: fresh, or stale for less than
    /// [`Storable::grace_secs`].
    fn is_kept(&self, now_ms: u64) -> bool {
        let kept_for = u64::from(self.ttl_secs()) + u64::from(self.grace_secs());
        now_ms < self.stored_at_ms().saturating_add(kept_for * 1000)
    }

    /// How long ago the value was stored, in whole seconds (an HTTP `Age`).
    fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms()) / 1000
    }
}

/// Keeps Redis writes in the order they were asked for. Writes go out on background
/// tasks, which may run in any order: each write and removal takes a sequence number when
/// it is asked for, and under its key's stripe lock, a write older than the newest one
/// sent or claimed for that stripe is dropped (the newer value, or the removal, stands).
/// Keys share 256 stripes, so a rare reordered write for another key of the stripe is
/// dropped too: a later miss, never a wrong value.
///
/// The backlog is bounded: a stripe holds at most [`MAX_PENDING_WRITES`] writes waiting
/// for it (one is sent at a time, each within the operation timeout); a write beyond that
/// is dropped at once (older writes of its stripe still queued are then dropped too) and
/// counted as a failed `set`, so that a slow Redis cannot pile up tasks and payloads. A
/// removal claims its stripe before it waits (the writes queued ahead of it are dropped
/// when their turn comes), so it waits for the write being sent and the removals queued
/// ahead of it, not for queued writes.
#[derive(Clone)]
struct WriteOrder {
    next: Arc<AtomicU64>,
    stripes: Arc<[Stripe]>,
}

/// One stripe of [`WriteOrder`].
#[derive(Default)]
struct Stripe {
    /// The newest sequence number sent, or claimed by a removal.
    newest: AtomicU64,
    /// Writes asked for and not yet sent or dropped (their tasks may not have started).
    pending: std::sync::atomic::AtomicUsize,
    /// Told when `pending` falls to zero.
    settled: tokio::sync::Notify,
    lock: tokio::sync::Mutex<()>,
}

/// Most writes one stripe of `WriteOrder` holds (256 stripes).
pub const MAX_PENDING_WRITES: usize = 8;

/// The longest a purge waits for the other replicas' acknowledgements: one minute. A
/// longer `ack_timeout` given to [`TieredStore::purge`] (or
/// [`crate::CacheBuilder::ack_timeout`]) is cut to this, so that no purge waits unbounded.
pub const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// A write counted in its stripe's backlog (index `.1`) until dropped.
struct PendingWrite(WriteOrder, usize);

impl Drop for PendingWrite {
    fn drop(&mut self) {
        let stripe = &self.0.stripes[self.1];
        if stripe.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            stripe.settled.notify_waiters();
        }
    }
}

impl WriteOrder {
    fn new() -> Self {
        WriteOrder {
            next: Arc::new(AtomicU64::new(1)),
            stripes: (0..256).map(|_| Stripe::default()).collect(),
        }
    }

    fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn stripe(&self, key: &CacheKey) -> &Stripe {
        &self.stripes[usize::from(key.0[31])]
    }

    /// Counts the write numbered `seq` of `key` into its stripe's backlog, when there is
    /// room: `None` (the write is dropped, and older writes of the stripe still queued
    /// with it) when the backlog is full.
    fn admit(&self, key: &CacheKey, seq: u64) -> Option<PendingWrite> {
        let stripe = self.stripe(key);
        if stripe.pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING_WRITES {
            if stripe.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                stripe.settled.notify_waiters();
            }
            // Older writes still queued must not land after this one was dropped.
            stripe.newest.fetch_max(seq, Ordering::AcqRel);
            return None;
        }
        Some(PendingWrite(self.clone(), usize::from(key.0[31])))
    }

    /// Returns once no write of `key`'s stripe is pending (each sent and answered, or
    /// dropped). Writes that keep coming keep it waiting: callers bound the wait.
    async fn settled(&self, key: &CacheKey) {
        let stripe = self.stripe(key);
        loop {
            let told = stripe.settled.notified();
            tokio::pin!(told);
            told.as_mut().enable();
            if stripe.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            told.await;
        }
    }

    /// Writes `envelope` under `key` as the write numbered `seq` (admitted with
    /// `pending`), unless a newer write or a removal of its stripe came first. Returns
    /// whether Redis confirmed.
    async fn write(
        &self,
        redis: &RedisTier,
        key: &CacheKey,
        seq: u64,
        envelope: bytes::Bytes,
        keep_secs: u64,
        pending: PendingWrite,
    ) -> bool {
        let stripe = self.stripe(key);
        let _pending = pending;
        let _turn = stripe.lock.lock().await;
        if stripe.newest.fetch_max(seq, Ordering::AcqRel) > seq {
            return false; // superseded: a later write or removal already went to Redis
        }
        redis.set(key, envelope, keep_secs).await
    }

    /// Deletes `key` from Redis as the write numbered `seq`: any write asked for before it
    /// and still pending is dropped. Returns whether Redis confirmed.
    ///
    /// The removal runs on its own task, so that a caller giving up on it (dropping the
    /// future) cannot leave its claim made and its `DEL` unsent.
    async fn delete(&self, redis: &RedisTier, key: &CacheKey, seq: u64) -> bool {
        let removal = self.delete_in_background(redis, key, seq);
        removal.await.unwrap_or(false)
    }

    /// Like [`WriteOrder::delete`], on a task of the Redis tier's home runtime.
    fn delete_in_background(
        &self,
        redis: &RedisTier,
        key: &CacheKey,
        seq: u64,
    ) -> tokio::task::JoinHandle<bool> {
        let (order, redis, key) = (self.clone(), redis.clone(), *key);
        redis.home().clone().spawn(async move {
            let stripe = order.stripe(&key);
            stripe.newest.fetch_max(seq, Ordering::AcqRel);
            let _turn = stripe.lock.lock().await;
            redis.del(&key).await
        })
    }
}

/// The tiers together. Cloning shares them.
#[derive(Clone)]
pub struct TieredStore<V> {
    memory: MemoryTier<V>,
    redis: Option<RedisTier>,
    envelope_keys: EnvelopeKeys,
    metrics: StoreMetrics,
    order: WriteOrder,
    purges: Arc<Purges>,
    /// Soft purge markers: the entries they cover are stale ([`PurgeMode::Soft`]).
    soft: Arc<Purges>,
    /// The queue of [`TieredStore::purge_keys_in_background`], started on first use.
    invalidations: Arc<std::sync::OnceLock<tokio::sync::mpsc::Sender<Vec<CacheKey>>>>,
}

impl<V: Storable> TieredStore<V> {
    /// Combines a memory tier with an optional Redis tier whose envelopes are sealed and
    /// opened with `envelope_keys`; counts into `metrics`.
    pub fn new(
        memory: MemoryTier<V>,
        redis: Option<RedisTier>,
        envelope_keys: EnvelopeKeys,
        metrics: StoreMetrics,
    ) -> Self {
        let folds = metrics.purge_marker_folds.handle("local");
        TieredStore {
            memory,
            redis,
            envelope_keys,
            order: WriteOrder::new(),
            purges: Arc::new(Purges::counting_folds(folds.clone())),
            soft: Arc::new(Purges::counting_folds(folds)),
            metrics,
            invalidations: Arc::default(),
        }
    }

    /// Whether a Redis tier is configured.
    pub fn has_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// The Redis tier, if configured.
    pub fn redis(&self) -> Option<&RedisTier> {
        self.redis.as_ref()
    }

    /// Looks `key` up in the memory tier, then in Redis, and returns what is still kept
    /// ([`Storable::is_kept`]: fresh, or stale within its grace); the caller decides what
    /// a stale entry is good for. A Redis entry is copied into the memory tier. A Redis
    /// entry that fails authentication (forged, copied from another key, altered) or
    /// decoding is a miss, counted in `redis_rejected_entries_total`.
    ///
    /// A stale memory entry does not hide Redis: another replica may have stored a fresh
    /// value there; the stale one is returned only when Redis has nothing fresher.
    pub async fn lookup(&self, key: &CacheKey) -> Option<(V, Tier)> {
        match self.lookup_marked(key, now_ms()).await? {
            (_, _, true) => None,
            (entry, tier, false) => Some((entry, tier)),
        }
    }

    /// Like [`TieredStore::lookup`], and says whether a soft purge marked the entry stale
    /// ([`PurgeMode::Soft`]): the caller may serve it stale while it refreshes it.
    /// A memory-tier entry is judged at `now_ms` (milliseconds since the Unix epoch,
    /// [`crate::now_ms`]: the caller's clock read for the request, RFC 9111 §4.2.3's
    /// `now`, so that a memory-tier hit reads the clock once); after a Redis round trip
    /// the clock is read again, and the caller should do the same for what it decides
    /// about an entry from Redis or a stale one.
    pub async fn lookup_marked(&self, key: &CacheKey, now_ms: u64) -> Option<(V, Tier, bool)> {
        let found = self.lookup_tiers(key, now_ms).await?;
        if self.is_purged(key, &found.0) {
            self.memory.remove(key);
            self.metrics.purged_entries.inc(found.1.as_str());
            if found.1 == Tier::Redis {
                // Met once: deleted, so that it is neither counted nor fetched again.
                self.remove_in_background(key);
            }
            return None;
        }
        let soft = covered(&self.soft, key, &found.0);
        Some((found.0, found.1, soft))
    }

    /// Whether a (hard) purge made on this replica or received from another covers
    /// `entry`, stored (or to be stored) under `key`: a purge by `key`, by one of its tags
    /// or its path, or of everything, made at or after the entry's stamp
    /// ([`Storable::stored_at_ms`]). For an answer handed over outside the tiers (a
    /// coalesced flight's), which a lookup would have judged.
    pub fn is_purged(&self, key: &CacheKey, entry: &V) -> bool {
        covered(&self.purges, key, entry)
    }

    /// Purges what `scope` covers on this replica at once, then on every replica through
    /// Redis (see [`crate::invalidation`]), waiting up to `ack_timeout` (at most
    /// [`MAX_ACK_TIMEOUT`]) for their acknowledgements. From then on the purged entries
    /// are misses: each replica removes them from its memory tier (a visit of every entry
    /// it holds, on a blocking thread; a purge by key removes just those keys), and Redis
    /// entries are covered by a purge marker checked at lookup (never a keyspace scan).
    /// Never fails: the report says what was reached, and how many memory-tier entries
    /// this replica and the acknowledging ones removed.
    pub async fn purge(&self, scope: PurgeScope, ack_timeout: Duration) -> PurgeReport {
        self.purge_as(scope, PurgeMode::Hard, ack_timeout).await
    }

    /// Like [`TieredStore::purge`], hard or soft: a soft purge removes nothing; it marks
    /// the entries it covers stale on every replica ([`TieredStore::lookup_marked`]), and
    /// its report counts no memory entries.
    pub async fn purge_as(
        &self,
        scope: PurgeScope,
        mode: PurgeMode,
        ack_timeout: Duration,
    ) -> PurgeReport {
        let message = self.apply_purge(scope, mode);
        self.spread_purge(message, ack_timeout).await
    }

    /// Purges `keys` without waiting, for purges a response must not wait for (the
    /// invalidation by an unsafe method, RFC 9111 §4.4, which any client can cause): they
    /// apply on this replica before the call returns (its lookups miss them from then on),
    /// and reach the other replicas in batches ([`INVALIDATION_BATCH_KEYS`] keys or
    /// [`INVALIDATION_BATCH_WAIT`], one message each, nobody waiting for
    /// acknowledgements), through a bounded queue: when it is full, they apply here only
    /// (counted as `purge_outcomes_total{outcome="local"}`). Call within a Tokio runtime.
    pub fn purge_keys_in_background(&self, keys: Vec<CacheKey>) {
        let at_ms = now_ms();
        self.purges.purge_keys(&keys, at_ms);
        self.metrics.purges.inc("keys");
        let removed = sweep_keys(&self.memory, &self.purges, &keys);
        self.metrics
            .purged_entries
            .inc_by(Tier::Memory.as_str(), removed);
        let Some(redis) = &self.redis else {
            return;
        };
        let queue = self.invalidations.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(INVALIDATION_QUEUE);
            let purges = Arc::downgrade(&self.purges);
            let metrics = self.metrics.clone();
            let spread = spread_invalidations(redis.clone(), purges, metrics, rx);
            redis.home().spawn(spread);
            tx
        });
        if queue.try_send(keys).is_err() {
            self.metrics.purge_outcomes.inc("local");
        }
    }

    /// Applies a purge's markers on this replica and counts it.
    fn apply_purge(&self, scope: PurgeScope, mode: PurgeMode) -> PurgeMessage {
        let message = PurgeMessage {
            id: crate::random_id(),
            at_ms: now_ms(),
            scope,
            mode,
        };
        let markers = match mode {
            PurgeMode::Hard => &self.purges,
            PurgeMode::Soft => &self.soft,
        };
        invalidation::apply(markers, &message.scope, message.at_ms);
        // This replica's own subscription acknowledges without sweeping again.
        self.purges.note_own(message.id);
        self.metrics.purges.inc(match message.scope {
            PurgeScope::Tags(_) => "tags",
            PurgeScope::Paths(_) => "paths",
            PurgeScope::Keys(_) => "keys",
            PurgeScope::All => "all",
        });
        message
    }

    /// Sweeps this replica's memory tier and reaches the others (see
    /// [`TieredStore::purge`]).
    async fn spread_purge(&self, message: PurgeMessage, ack_timeout: Duration) -> PurgeReport {
        let ack_timeout = ack_timeout.min(MAX_ACK_TIMEOUT);
        // The other replicas are reached while this one sweeps its memory tier.
        let sweep = async {
            match message.mode {
                PurgeMode::Hard => self.sweeper()(message.scope.clone()).await,
                PurgeMode::Soft => 0,
            }
        };
        let (swept, mut report) = tokio::join!(sweep, self.purge_everywhere(&message, ack_timeout));
        report.memory_entries_purged += swept;
        self.metrics.purge_outcomes.inc(if !report.redis_reached {
            "local"
        } else if report.confirmed() {
            "confirmed"
        } else {
            "unconfirmed"
        });
        report
    }

    /// Records and publishes an applied purge, and waits for the acknowledgements.
    async fn purge_everywhere(&self, message: &PurgeMessage, ack_timeout: Duration) -> PurgeReport {
        let mut report = PurgeReport {
            redis_reached: false,
            recorded: false,
            replicas_expected: 1,
            replicas_acknowledged: 1,
            memory_entries_purged: 0,
        };
        let Some(redis) = &self.redis else {
            (report.redis_reached, report.recorded) = (true, true); // nothing else to reach
            return report;
        };
        // Published even when Redis refuses the record (out of memory): the replicas
        // subscribed now still apply it.
        report.recorded = redis.record_purges(&message.markers()).await;
        let Some(subscribers) = redis.publish_purge(&message.encode()).await else {
            return report;
        };
        report.redis_reached = true;
        report.replicas_expected = subscribers;
        // This replica's own subscription acknowledges too (with 0: it swept above).
        (report.replicas_acknowledged, report.memory_entries_purged) =
            redis.wait_acks(message.id, subscribers, ack_timeout).await;
        report
    }

    /// Whether this replica should refresh `key` now: without Redis always; with it, when
    /// it takes the key's refresh lease for `ttl` with `token` (or Redis does not answer),
    /// so that replicas sharing Redis do not all refresh the same key at once.
    pub async fn try_refresh_lease(&self, key: &CacheKey, ttl: Duration, token: u64) -> bool {
        match &self.redis {
            Some(redis) => redis.try_lease(key, ttl, token).await.unwrap_or(true),
            None => true,
        }
    }

    /// Gives back the refresh lease of `key` taken with `token`
    /// ([`TieredStore::try_refresh_lease`]) once its refresh is done, so that the next one,
    /// by any replica, need not wait for it to expire; a lease another replica took since
    /// (ours expired) is left alone. The Redis writes of `key`'s stripe asked for before
    /// are waited for first (at most twice the operation timeout), so that a replica taking
    /// the lease next finds the refreshed entry in Redis.
    pub async fn release_refresh_lease(&self, key: &CacheKey, token: u64) {
        if let Some(redis) = &self.redis {
            let _ = tokio::time::timeout(redis.op_timeout() * 2, self.order.settled(key)).await;
            redis.release_lease(key, token).await;
        }
    }

    /// Whether this store serves Redis entries: always without invalidation; with it, once
    /// the purge markers have been loaded from Redis (until then Redis entries are misses,
    /// since a purge this replica has not seen could cover them).
    pub fn in_sync(&self) -> bool {
        self.purges.trusted()
    }

    /// Starts keeping this store's purge markers in step with the other replicas (a
    /// background task; nothing without a Redis tier), and with `events`, applying the
    /// events published on `{namespace}:events`. Call once, within a Tokio runtime.
    pub fn start_invalidation(&self, events: Option<EventRules>) {
        if let Some(redis) = &self.redis {
            self.purges.expect_sync();
            let markers = invalidation::Markers {
                hard: self.purges.clone(),
                soft: self.soft.clone(),
            };
            invalidation::subscribe(
                redis.clone(),
                &markers,
                events,
                self.sweeper(),
                self.metrics.clone(),
            );
        }
    }

    /// Removes what a purge covers from the memory tier ([`sweep`]) on a blocking thread,
    /// and counts it in `purged_entries_total{tier="memory"}`. Holds the purge markers
    /// weakly (the invalidation task must not keep them alive).
    fn sweeper(&self) -> Sweeper {
        let memory = self.memory.clone();
        let purges = Arc::downgrade(&self.purges);
        let metrics = self.metrics.clone();
        Arc::new(move |scope: PurgeScope| {
            let memory = memory.clone();
            let purges = purges.clone();
            let metrics = metrics.clone();
            Box::pin(async move {
                let Some(purges) = purges.upgrade() else {
                    return 0;
                };
                let removed = match &scope {
                    PurgeScope::Keys(keys) => sweep_keys(&memory, &purges, keys),
                    _ => tokio::task::spawn_blocking(move || sweep(&memory, &purges))
                        .await
                        .unwrap_or(0),
                };
                metrics
                    .purged_entries
                    .inc_by(Tier::Memory.as_str(), removed);
                removed
            })
        })
    }

    async fn lookup_tiers(&self, key: &CacheKey, now_ms: u64) -> Option<(V, Tier)> {
        let in_memory = self.memory.get(key, now_ms);
        if let Some(entry) = &in_memory
            && (entry.is_fresh(now_ms) || self.redis.is_none())
        {
            return Some((entry.clone(), Tier::Memory));
        }
        // Until this replica has loaded the purge markers, a Redis entry may be one that
        // was purged: not served (a miss) until then.
        let from_redis = if self.purges.trusted() {
            self.lookup_redis(key).await
        } else {
            None
        };
        // Time has passed (up to the operation timeout).
        let now_ms = crate::now_ms();
        match (from_redis, in_memory) {
            (Some(entry), stale) if entry.is_fresh(now_ms) || stale.is_none() => {
                self.memory.insert(*key, entry.clone());
                Some((entry, Tier::Redis))
            }
            (_, Some(stale)) => Some((stale, Tier::Memory)),
            (other, None) => other.map(|entry| (entry, Tier::Redis)),
        }
    }

    /// The entry Redis holds for `key`, if kept; rejected envelopes are counted.
    async fn lookup_redis(&self, key: &CacheKey) -> Option<V> {
        let redis = self.redis.as_ref()?;
        let mut bytes = redis.get(key).await?;
        let Some(entry) = self
            .envelope_keys
            .open_in_place(key, &mut bytes)
            .and_then(V::from_payload)
        else {
            self.metrics.redis_rejected_entries.inc();
            tracing::warn!(key = %key.short(), "unauthenticated or undecodable entry in redis treated as a miss");
            return None;
        };
        entry.is_kept(now_ms()).then_some(entry)
    }

    /// The entry Redis holds for `key` if it was stored after `newer_than_ms` (and is kept
    /// and not purged): copied into the memory tier and returned. `None` without one, or
    /// until the purge markers are loaded.
    pub async fn newer_from_redis(&self, key: &CacheKey, newer_than_ms: u64) -> Option<V> {
        if !self.purges.trusted() {
            return None;
        }
        let entry = self.lookup_redis(key).await?;
        if entry.stored_at_ms() <= newer_than_ms
            || self.is_purged(key, &entry)
            || covered(&self.soft, key, &entry)
        {
            return None;
        }
        self.memory.insert(*key, entry.clone());
        Some(entry)
    }

    /// Looks `key` up in the memory tier only (purged entries, soft purges included, are
    /// misses).
    pub fn lookup_memory(&self, key: &CacheKey) -> Option<V> {
        self.memory
            .get(key, now_ms())
            .filter(|entry| !self.is_purged(key, entry) && !covered(&self.soft, key, entry))
    }

    /// Stores `entry` in the memory tier now and in Redis in a background task (kept for
    /// its TTL plus grace), so that the caller is never delayed by Redis. Returns whether
    /// it is stored anywhere: held by the memory tier (see
    /// [`MemoryTier::max_entry_bytes`]) or on its way to Redis.
    pub fn store(&self, key: CacheKey, entry: V) -> bool {
        self.store_inner(key, entry, None)
    }

    /// Like [`TieredStore::store`], with the entry's payload ([`Storable::to_payload`])
    /// already at hand, so that it is not encoded twice.
    pub fn store_with_payload(&self, key: CacheKey, entry: V, payload: Vec<u8>) -> bool {
        self.store_inner(key, entry, Some(payload))
    }

    fn store_inner(&self, key: CacheKey, entry: V, payload: Option<Vec<u8>>) -> bool {
        let in_memory = self.memory.insert(key, entry.clone());
        if in_memory {
            self.metrics.stores.inc(Tier::Memory.as_str());
        }
        let Some(redis) = self.redis.clone() else {
            return in_memory;
        };
        // Taken now, in call order: the background write is dropped if a later write or
        // removal of its stripe got there first (see `WriteOrder`).
        let seq = self.order.next();
        let Some(pending) = self.order.admit(&key, seq) else {
            redis.count_dropped_write();
            return in_memory;
        };
        let (metrics, keys, order) = (
            self.metrics.clone(),
            self.envelope_keys.clone(),
            self.order.clone(),
        );
        // On the Redis tier's home runtime: a write outlives the request that made it.
        redis.home().clone().spawn(async move {
            let keep_secs = u64::from(entry.ttl_secs()) + u64::from(entry.grace_secs());
            let payload = payload.unwrap_or_else(|| entry.to_payload());
            let envelope = keys.seal(&key, &payload);
            if order
                .write(&redis, &key, seq, envelope, keep_secs, pending)
                .await
            {
                metrics.stores.inc(Tier::Redis.as_str());
            }
        });
        true
    }

    /// Deletes `key` from Redis on a background task, in write order (see [`WriteOrder`]).
    fn remove_in_background(&self, key: &CacheKey) {
        let Some(redis) = &self.redis else {
            return;
        };
        let seq = self.order.next();
        drop(self.order.delete_in_background(redis, key, seq));
    }

    /// Removes `key` from the memory tier and from Redis. Returns whether Redis confirmed
    /// (always `true` without a Redis tier); a Redis failure is counted, never raised.
    pub async fn remove(&self, key: &CacheKey) -> bool {
        self.memory.remove(key);
        let Some(redis) = &self.redis else {
            return true;
        };
        // After every write stored before this call, and before any still pending.
        let seq = self.order.next();
        self.order.delete(redis, key, seq).await
    }

    /// Refreshes the memory-tier gauges.
    pub fn refresh_gauges(&self) {
        let (entries, bytes) = self.memory.usage();
        self.metrics.memory_entries.set(entries as i64);
        self.metrics.memory_bytes.set(bytes as i64);
    }

    /// The metrics this store counts into.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }
}

/// A random id for a purge.
/// Most keys in one batch of [`TieredStore::purge_keys_in_background`].
pub const INVALIDATION_BATCH_KEYS: usize = 512;

/// Longest a key waits for its batch of [`TieredStore::purge_keys_in_background`].
pub const INVALIDATION_BATCH_WAIT: Duration = Duration::from_millis(20);

/// Invalidations waiting to be batched, at most (each a request's few keys).
const INVALIDATION_QUEUE: usize = 4096;

/// Records and publishes the queued invalidations in batches until the store is dropped:
/// one marker write and one message per batch, no acknowledgements awaited; each batch
/// counted in `purge_outcomes_total` (`unconfirmed`: sent; `local`: Redis refused it).
async fn spread_invalidations(
    redis: RedisTier,
    purges: std::sync::Weak<Purges>,
    metrics: StoreMetrics,
    mut rx: tokio::sync::mpsc::Receiver<Vec<CacheKey>>,
) {
    while let Some(mut keys) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + INVALIDATION_BATCH_WAIT;
        while keys.len() < INVALIDATION_BATCH_KEYS {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(more)) => keys.extend(more),
                Ok(None) | Err(_) => break,
            }
        }
        let Some(purges) = purges.upgrade() else {
            return;
        };
        let message = PurgeMessage {
            id: crate::random_id(),
            at_ms: now_ms(),
            scope: PurgeScope::Keys(keys),
            mode: PurgeMode::Hard,
        };
        // Already applied here: this replica's own subscription only acknowledges it.
        purges.note_own(message.id);
        drop(purges);
        // Tried twice; a batch Redis refuses both times reached no other replica. It is
        // published even when Redis refuses to record it (out of memory): the replicas
        // subscribed now still apply it.
        let (mut recorded, mut reached) = (false, false);
        for _ in 0..2 {
            recorded = recorded || redis.record_purges(&message.markers()).await;
            reached = reached || redis.publish_purge(&message.encode()).await.is_some();
            if recorded && reached {
                break;
            }
        }
        metrics
            .purge_outcomes
            .inc(if reached { "unconfirmed" } else { "local" });
    }
}

/// Removes what a purge covers from a memory tier and returns how many entries it removed
/// (see [`TieredStore::sweeper`]).
pub(crate) type Sweeper = Arc<
    dyn Fn(PurgeScope) -> std::pin::Pin<Box<dyn std::future::Future<Output = u64> + Send>>
        + Send
        + Sync,
>;

/// Removes from `memory` every entry a purge marker in `purges` covers; returns how many.
fn sweep<V: Storable>(memory: &MemoryTier<V>, purges: &Purges) -> u64 {
    memory.remove_where(|key, entry| covered(purges, key, entry))
}

/// Removes the entries of `keys` that a purge by key covers; returns how many.
fn sweep_keys<V: Storable>(memory: &MemoryTier<V>, purges: &Purges, keys: &[CacheKey]) -> u64 {
    keys.iter()
        .filter(|key| memory.remove_if(key, |entry| covered(purges, key, entry)))
        .count() as u64
}

/// Whether a purge marker in `purges` covers `entry`, stored under `key`.
fn covered<V: Storable>(purges: &Purges, key: &CacheKey, entry: &V) -> bool {
    purges.covers(entry.stored_at_ms(), |pred| entry.any_tag(pred))
        || purges.covers_key(key, entry.stored_at_ms())
}
