//! The library API: a [`Cache`] of serde values with [`Cache::get_or_set`], on the same
//! tiers, keys, envelopes and coalescing as the proxy.
//!
//! A `get_or_set` call flows like this:
//!
//! 1. The caller's string key becomes a keyed hash ([`KeyBuilder::key_for`]).
//! 2. Unless [`Options::force_refresh`]: the memory tier, then Redis. A fresh value is
//!    returned at once; with [`Options::refresh_ahead`], a value with less than that share
//!    of its TTL left is also refreshed by one detached, coalesced background task. A
//!    value past its freshness but kept for [`Options::stale_if_error`] is remembered as a
//!    fallback.
//! 3. Otherwise one caller per key (the leader) runs the computation; the others wait for
//!    it (at most [`CacheBuilder::coalesce_wait`], then they compute themselves) and get
//!    its value, or its error. A leader that goes away (its future dropped) hands over to
//!    one of the waiters. A value that a purge made while it was computed covers (it is
//!    stamped with when its computation started) goes to the leader only: the waiters
//!    join again, once, and one of them computes anew.
//! 4. A value is stored in the memory tier at once and in Redis in the background. An
//!    error is never stored; with a stale fallback within `stale_if_error`, the stale value
//!    is returned instead (marked [`Source::Stale`]).
//!
//! Redis faults never fail a call: they are misses, and the computation runs.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use crate::coalesce::{Coalescer, Role, WaitOutcome};
use crate::codec::{Codec, CodecError, Postcard};
use crate::envelope::EnvelopeKeys;
use crate::invalidation::{PurgeReport, PurgeScope};
use crate::key::{CacheKey, KeyBuilder};
use crate::metrics::{BreakerState, LabeledCounter, StoreMetrics, TIERS};
use crate::now_ms;
use crate::store::{
    MemoryTier, RedisOptions, RedisSetupError, RedisTier, Storable, Tier, TieredStore,
};

/// A computation's error as every waiter gets it: shared, type-erased (downcast it with
/// `err.downcast_ref::<YourError>()`).
pub type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why [`Cache::get_or_set`] returned no value.
#[derive(Debug, Clone)]
pub enum Error {
    /// The computation failed (for this caller, or for the leader it waited on), and no
    /// stale value within `stale_if_error` was there to fall back on. Never cached.
    Compute(SharedError),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The cause is the error's source, for reporters that walk the chain.
            Error::Compute(_) => write!(f, "computation failed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Compute(e) => Some(e.as_ref()),
        }
    }
}

/// The error waiters get when the computation they waited on panicked; the caller that ran
/// it gets the panic itself.
#[derive(Debug)]
pub struct ComputationPanicked;

impl std::fmt::Display for ComputationPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the computation panicked")
    }
}

impl std::error::Error for ComputationPanicked {}

/// A panic's payload, to resume unwinding with.
type Panic = Box<dyn std::any::Any + Send>;

/// Why a [`Cache`] could not be built.
#[derive(Debug)]
pub enum BuildError {
    /// The Redis options cannot be used (a bad URL, an unreadable CA file).
    Redis(RedisSetupError),
    /// A Redis tier was asked for without a key secret: replicas sharing Redis must share
    /// the secret that keys and seals the entries.
    MissingSecret,
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::Redis(e) => write!(f, "{e}"),
            BuildError::MissingSecret => {
                write!(f, "a Redis tier needs a key secret shared by every replica")
            }
        }
    }
}

impl std::error::Error for BuildError {}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A fresh value from the memory tier.
    Memory,
    /// A fresh value from the Redis tier (now also in the memory tier).
    Redis,
    /// Computed by this call.
    Computed,
    /// Computed by a concurrent call for the same key, which this one waited on.
    Coalesced,
    /// A value past its freshness, returned because the computation failed
    /// (`stale_if_error`).
    Stale,
}

/// A value and where it came from.
#[derive(Debug, Clone)]
pub struct Fetched<V> {
    /// The value.
    pub value: V,
    /// Where it came from.
    pub source: Source,
}

impl<V> Fetched<V> {
    /// Whether the value is stale ([`Source::Stale`]).
    pub fn is_stale(&self) -> bool {
        self.source == Source::Stale
    }
}

/// Per-call options. `Options::default()` uses the cache's default TTL and nothing else.
///
/// ```
/// use std::time::Duration;
/// use cachegate_core::Options;
///
/// let options = Options::default()
///     .ttl(Duration::from_secs(30))
///     .tags(["kpi", "kpi:region:eu"])
///     .refresh_ahead(0.5)
///     .stale_if_error(Duration::from_secs(300));
/// assert_eq!(options.ttl_value(), Some(Duration::from_secs(30)));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Options {
    ttl: Option<Duration>,
    tags: Vec<String>,
    force_refresh: bool,
    refresh_ahead: Option<f64>,
    stale_if_error: Option<Duration>,
}

impl Options {
    /// Freshness lifetime of a value stored by this call (whole seconds, at least 1), from
    /// when it was computed (it is stamped with when its computation started, so that a
    /// purge made while it ran covers it); default: the cache's
    /// [`CacheBuilder::default_ttl`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use cachegate_core::{Cache, Options, Source};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let cache: Cache<u32> = Cache::builder().build().unwrap();
    /// let one_second = Options::default().ttl(Duration::from_secs(1));
    /// cache.get_or_set("k", &one_second, || async { Ok::<_, std::io::Error>(1) }).await.unwrap();
    /// assert_eq!(cache.get("k").await, Some(1));
    /// tokio::time::sleep(Duration::from_millis(1100)).await;
    /// assert_eq!(cache.get("k").await, None, "expired");
    /// # });
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Tags (surrogate keys) stored with the value, for purges by tag. Stored in clear
    /// text inside the sealed envelope: no personal data in tags.
    ///
    /// ```
    /// # use cachegate_core::{Cache, Options};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let cache: Cache<u32> = Cache::builder().build().unwrap();
    /// let tagged = Options::default().tags(["kpi", "kpi:region:eu"]);
    /// cache.set("kpi:leads:eu", 7, &tagged).unwrap();
    /// assert_eq!(cache.get("kpi:leads:eu").await, Some(7));
    /// # });
    /// ```
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// Computes and overwrites even when a fresh value is stored.
    ///
    /// ```
    /// # use cachegate_core::{Cache, Options, Source};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let cache: Cache<String> = Cache::builder().build().unwrap();
    /// cache.set("report", "before the import".into(), &Options::default()).unwrap();
    /// let fresh = cache
    ///     .get_or_set("report", &Options::default().force_refresh(), || async {
    ///         Ok::<_, std::io::Error>("after the import".to_string())
    ///     })
    ///     .await
    ///     .unwrap();
    /// assert_eq!((fresh.value.as_str(), fresh.source), ("after the import", Source::Computed));
    /// assert_eq!(cache.get("report").await.as_deref(), Some("after the import"));
    /// # });
    /// ```
    pub fn force_refresh(mut self) -> Self {
        self.force_refresh = true;
        self
    }

    /// A share of the TTL, from 0 to 1: a fresh hit with less than this share of its TTL
    /// left returns at once and starts one background refresh (coalesced per key, limited
    /// by [`CacheBuilder::max_background_refreshes`]). 0.5 refreshes in the second half of
    /// the TTL.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use cachegate_core::{Cache, Options, Source};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let cache: Cache<u32> = Cache::builder().build().unwrap();
    /// let options = Options::default().ttl(Duration::from_secs(2)).refresh_ahead(0.9);
    /// cache.get_or_set("k", &options, || async { Ok::<_, std::io::Error>(1) }).await.unwrap();
    /// tokio::time::sleep(Duration::from_millis(300)).await; // less than 90% of the TTL left
    /// let hit = cache
    ///     .get_or_set("k", &options, || async { Ok::<_, std::io::Error>(2) })
    ///     .await
    ///     .unwrap();
    /// assert_eq!((hit.value, hit.source), (1, Source::Memory)); // at once, refresh started
    /// let landed = async {
    ///     while cache.get("k").await != Some(2) {
    ///         tokio::task::yield_now().await;
    ///     }
    /// };
    /// tokio::time::timeout(Duration::from_secs(5), landed).await.expect("the refresh lands");
    /// # });
    /// ```
    pub fn refresh_ahead(mut self, share: f64) -> Self {
        self.refresh_ahead = Some(share.clamp(0.0, 1.0));
        self
    }

    /// Keeps a stored value this long past its freshness (whole seconds), and returns it,
    /// marked [`Source::Stale`], when a computation fails within that time.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use cachegate_core::{Cache, Options, Source};
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let cache: Cache<u32> = Cache::builder().build().unwrap();
    /// let options = Options::default()
    ///     .ttl(Duration::from_secs(1))
    ///     .stale_if_error(Duration::from_secs(60));
    /// cache.get_or_set("k", &options, || async { Ok::<_, std::io::Error>(1) }).await.unwrap();
    /// tokio::time::sleep(Duration::from_millis(1100)).await; // stale now
    /// let fallback = cache
    ///     .get_or_set("k", &options, || async { Err::<u32, _>(std::io::Error::other("db down")) })
    ///     .await
    ///     .unwrap();
    /// assert_eq!((fallback.value, fallback.source), (1, Source::Stale));
    /// # });
    /// ```
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = Some(window);
        self
    }

    /// The TTL set with [`Options::ttl`], if any.
    pub fn ttl_value(&self) -> Option<Duration> {
        self.ttl
    }
}

/// Builds a [`Cache`].
///
/// ```
/// use std::time::Duration;
/// use cachegate_core::Cache;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let cache: Cache<String> = Cache::builder()
///     .memory_max_bytes(64 << 20)
///     .namespace("kpi")
///     .key_secret(b"a long random secret shared by every replica")
///     .default_ttl(Duration::from_secs(30))
///     .build()
///     .unwrap();
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct CacheBuilder {
    memory_max_bytes: u64,
    max_entry_bytes: u64,
    redis: Option<RedisOptions>,
    namespace: String,
    key_secret: Option<Vec<u8>>,
    default_ttl: Duration,
    encrypt: bool,
    coalesce_wait: Duration,
    max_background_refreshes: usize,
    ack_timeout: Duration,
}

impl Default for CacheBuilder {
    fn default() -> Self {
        CacheBuilder {
            memory_max_bytes: 64 << 20,
            max_entry_bytes: 4 << 20,
            redis: None,
            namespace: "cachegate".into(),
            key_secret: None,
            default_ttl: Duration::from_secs(60),
            encrypt: true,
            coalesce_wait: Duration::from_secs(30),
            max_background_refreshes: 64,
            ack_timeout: Duration::from_millis(1000),
        }
    }
}

impl CacheBuilder {
    /// Memory-tier budget in bytes, counting each value as its encoded (postcard) size plus
    /// a fixed overhead. Default 64 MiB; 0 turns the memory tier off. A value whose decoded
    /// form is much larger than its encoding (many small strings, maps) costs more than
    /// it counts: size the budget for the decoded values, or store them in a compact form.
    pub fn memory_max_bytes(mut self, bytes: u64) -> Self {
        self.memory_max_bytes = bytes;
        self
    }

    /// The largest value (encoded, with its overhead) the memory tier must hold; larger
    /// ones go to Redis only. Default 4 MiB.
    pub fn max_entry_bytes(mut self, bytes: u64) -> Self {
        self.max_entry_bytes = bytes;
        self
    }

    /// A shared Redis/Valkey tier (URL, TLS CA, timeouts, breaker: the proxy's settings).
    /// Needs [`CacheBuilder::key_secret`].
    pub fn redis(mut self, options: RedisOptions) -> Self {
        self.redis = Some(options);
        self
    }

    /// Every key starts with this namespace, and Redis keys are `{namespace}:v2:{hash}`.
    /// Default `cachegate`. Use one namespace per value type: postcard does not describe
    /// types, so two caches of different types under one namespace could read each
    /// other's values for equal keys.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The secret that keys and seals entries (any length; long and random). Replicas
    /// sharing Redis must share it. Default: a random per-process secret (memory tier only).
    pub fn key_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.key_secret = Some(secret.as_ref().to_vec());
        self
    }

    /// TTL of values stored without [`Options::ttl`]. Default 60 s.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// `false` stores values in Redis readable (still authenticated). Default `true`:
    /// sealed with XChaCha20-Poly1305.
    pub fn encrypt(mut self, encrypt: bool) -> Self {
        self.encrypt = encrypt;
        self
    }

    /// Longest wait on another caller's computation of the same key before computing
    /// itself; also the limit on a background refresh. Default 30 s.
    pub fn coalesce_wait(mut self, wait: Duration) -> Self {
        self.coalesce_wait = wait;
        self
    }

    /// How long a purge waits for the other replicas' acknowledgements. Default 1 s; at
    /// most [`crate::store::MAX_ACK_TIMEOUT`] (one minute: a longer one is cut to it).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout.min(crate::store::MAX_ACK_TIMEOUT);
        self
    }

    /// Background refreshes (`refresh_ahead`) running at once, at most; beyond, a hit
    /// starts none (a later hit will). Default 64.
    pub fn max_background_refreshes(mut self, n: usize) -> Self {
        self.max_background_refreshes = n;
        self
    }

    /// Builds the cache. Must be called within a Tokio runtime when Redis is configured
    /// (the connection is made lazily, on first use: a Redis that is down does not fail
    /// the build).
    ///
    /// Errors: [`BuildError::Redis`] for unusable Redis options,
    /// [`BuildError::MissingSecret`] for Redis without a key secret.
    pub fn build<V, C>(self) -> Result<Cache<V, C>, BuildError>
    where
        V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        C: Codec,
    {
        let metrics = CacheMetrics::default();
        let secret = match (&self.key_secret, &self.redis) {
            (Some(secret), _) => secret.clone(),
            (None, Some(_)) => return Err(BuildError::MissingSecret),
            (None, None) => crate::random_secret().to_vec(),
        };
        let redis = match &self.redis {
            Some(options) => Some(
                RedisTier::new(options, &self.namespace, metrics.store.clone())
                    .map_err(BuildError::Redis)?,
            ),
            None => None,
        };
        let store = TieredStore::new(
            MemoryTier::new(self.memory_max_bytes, self.max_entry_bytes),
            redis,
            EnvelopeKeys::new(&secret, self.encrypt),
            metrics.store.clone(),
        );
        store.start_invalidation(None);
        Ok(Cache {
            inner: Arc::new(Inner {
                keys: KeyBuilder::new(&secret, &self.namespace),
                store,
                flights: Coalescer::default(),
                default_ttl: self.default_ttl,
                coalesce_wait: self.coalesce_wait,
                refreshes: Arc::new(Semaphore::new(self.max_background_refreshes)),
                ack_timeout: self.ack_timeout,
                metrics,
            }),
        })
    }
}

/// The library's metrics. Register them into your registry with
/// [`CacheMetrics::register`]; names are relative to the registry's prefix.
#[derive(Clone, Debug)]
pub struct CacheMetrics {
    /// The tiers' metrics (stores, Redis errors, rejected entries, breaker, memory size).
    pub store: StoreMetrics,
    /// `hits_total{tier}`: fresh values found, by tier.
    pub hits: LabeledCounter,
    /// `misses_total`: calls that found no fresh value.
    pub misses: Counter,
    /// `computations_total{outcome}`: computations run (foreground and background), by
    /// `outcome` (`ok`, `error`).
    pub computations: LabeledCounter,
    /// `coalesced_waits_total{outcome}`: calls that waited on another's computation, by
    /// `outcome` (`served`, `error`, `retried`, `timeout`, `purged`: a purge made while it
    /// was computed covers the value, and the call joined again).
    pub coalesced_waits: LabeledCounter,
    /// `stale_served_total`: stale values returned after a failed computation.
    pub stale_served: Counter,
    /// `background_refreshes_total{outcome}`: refresh-ahead refreshes, by `outcome`
    /// (`started`, `skipped`: the limit was reached).
    pub background_refreshes: LabeledCounter,
}

impl Default for CacheMetrics {
    fn default() -> Self {
        CacheMetrics {
            store: StoreMetrics::default(),
            hits: LabeledCounter::new("tier", TIERS),
            misses: Counter::default(),
            computations: LabeledCounter::new("outcome", &["ok", "error"]),
            coalesced_waits: LabeledCounter::new(
                "outcome",
                &["served", "error", "retried", "timeout", "purged"],
            ),
            stale_served: Counter::default(),
            background_refreshes: LabeledCounter::new("outcome", &["started", "skipped"]),
        }
    }
}

impl CacheMetrics {
    /// Registers every metric into `registry` (they keep counting for the cache).
    pub fn register(&self, registry: &mut Registry) {
        self.store.register_into(registry);
        self.hits
            .register(registry, "hits", "Fresh values found, by tier");
        registry.register(
            "misses",
            "Calls that found no fresh value",
            self.misses.clone(),
        );
        self.computations
            .register(registry, "computations", "Computations run, by outcome");
        self.coalesced_waits.register(
            registry,
            "coalesced_waits",
            "Calls that waited on another call's computation, by outcome",
        );
        registry.register(
            "stale_served",
            "Stale values returned after a failed computation",
            self.stale_served.clone(),
        );
        self.background_refreshes.register(
            registry,
            "background_refreshes",
            "Refresh-ahead refreshes, by outcome",
        );
    }

    /// A snapshot of every figure (the `/stats` of the library).
    pub fn snapshot(&self) -> CacheStats {
        CacheStats {
            hits_memory: self.hits.get("memory"),
            hits_redis: self.hits.get("redis"),
            misses: self.misses.get(),
            computations_ok: self.computations.get("ok"),
            computations_error: self.computations.get("error"),
            coalesced_waits: self.coalesced_waits.counts().iter().map(|(_, n)| n).sum(),
            stale_served: self.stale_served.get(),
            background_refreshes: self.background_refreshes.get("started"),
            stores_memory: self.store.stores.get("memory"),
            stores_redis: self.store.stores.get("redis"),
            redis_errors: self
                .store
                .redis_errors
                .counts()
                .iter()
                .map(|(_, n)| n)
                .sum(),
            redis_rejected_entries: self.store.redis_rejected_entries.get(),
            redis_breaker: BreakerState::from_gauge(self.store.redis_breaker_state.get()),
            memory_entries: self.store.memory_entries.get().max(0) as u64,
            memory_bytes: self.store.memory_bytes.get().max(0) as u64,
        }
    }
}

/// A snapshot of a cache's figures since it was built ([`Cache::stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStats {
    /// Fresh values found in the memory tier.
    pub hits_memory: u64,
    /// Fresh values found in the Redis tier.
    pub hits_redis: u64,
    /// Calls that found no fresh value.
    pub misses: u64,
    /// Computations that returned a value.
    pub computations_ok: u64,
    /// Computations that returned an error.
    pub computations_error: u64,
    /// Calls that waited on another call's computation.
    pub coalesced_waits: u64,
    /// Stale values returned after a failed computation.
    pub stale_served: u64,
    /// Background refreshes started.
    pub background_refreshes: u64,
    /// Values written to the memory tier.
    pub stores_memory: u64,
    /// Values written to Redis.
    pub stores_redis: u64,
    /// Redis operations that failed or timed out.
    pub redis_errors: u64,
    /// Redis entries rejected (forged, copied, tampered, other codec version).
    pub redis_rejected_entries: u64,
    /// The Redis circuit breaker.
    pub redis_breaker: BreakerState,
    /// Entries in the memory tier.
    pub memory_entries: u64,
    /// Weighted bytes in the memory tier.
    pub memory_bytes: u64,
}

/// A cache of `V` values (any serde type), encoded with codec `C` for Redis. Cloning
/// shares the cache.
///
/// ```
/// use std::time::Duration;
/// use cachegate_core::{Cache, Options, Source};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let cache: Cache<u64> = Cache::builder().build().unwrap();
/// let first = cache
///     .get_or_set("kpi:leads:today", &Options::default(), || async {
///         Ok::<_, std::io::Error>(42)
///     })
///     .await
///     .unwrap();
/// assert_eq!((first.value, first.source), (42, Source::Computed));
/// let again = cache
///     .get_or_set("kpi:leads:today", &Options::default(), || async {
///         Ok::<_, std::io::Error>(0)
///     })
///     .await
///     .unwrap();
/// assert_eq!((again.value, again.source), (42, Source::Memory));
/// # });
/// ```
pub struct Cache<V, C = Postcard> {
    inner: Arc<Inner<V, C>>,
}

impl<V, C> Clone for Cache<V, C> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
        }
    }
}

type Flight<V, C> = Result<Stored<V, C>, SharedError>;

struct Inner<V, C> {
    keys: KeyBuilder,
    store: TieredStore<Stored<V, C>>,
    flights: Coalescer<CacheKey, Flight<V, C>>,
    default_ttl: Duration,
    coalesce_wait: Duration,
    refreshes: Arc<Semaphore>,
    ack_timeout: Duration,
    metrics: CacheMetrics,
}

impl Cache<(), Postcard> {
    /// A builder with the defaults (64 MiB memory tier, no Redis, 60 s TTL).
    pub fn builder() -> CacheBuilder {
        CacheBuilder::default()
    }
}

impl<V, C> Cache<V, C>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    C: Codec,
{
    /// The value for `key`: a fresh stored one, or the result of `compute`, run once per
    /// key however many callers ask at once (see the module docs for the whole flow).
    ///
    /// `compute` must be `'static` (move what it needs into it): with
    /// [`Options::refresh_ahead`] it may run on a detached task after this call returned.
    ///
    /// Errors: [`Error::Compute`] when the computation failed (this caller's, or the one
    /// it waited on) and no stale value within [`Options::stale_if_error`] was kept.
    pub async fn get_or_set<F, Fut, E>(
        &self,
        key: &str,
        options: &Options,
        compute: F,
    ) -> Result<Fetched<V>, Error>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let inner = &self.inner;
        let key = inner.keys.key_for(key);
        let mut stale = None;
        let found = if options.force_refresh {
            None
        } else {
            inner.store.lookup(&key).await
        };
        if let Some((entry, tier)) = found {
            let now = now_ms();
            if entry.is_fresh(now) {
                inner.metrics.hits.inc(tier.as_str());
                if let Some(share) = options.refresh_ahead {
                    let left = entry.remaining_ttl(now).as_secs_f64();
                    if left < share * f64::from(entry.ttl_secs()) {
                        self.refresh_in_background(key, options.clone(), compute);
                    }
                }
                let source = match tier {
                    Tier::Memory => Source::Memory,
                    Tier::Redis => Source::Redis,
                };
                return Ok(entry.fetched(source));
            }
            stale = Some(entry);
        }
        inner.metrics.misses.inc();
        let stale_fallback = |stale: &Option<Stored<V, C>>, error: SharedError| match stale {
            Some(entry) if within(entry, options.stale_if_error) => {
                inner.metrics.stale_served.inc();
                Ok(entry.fetched(Source::Stale))
            }
            _ => Err(Error::Compute(error)),
        };
        let deadline = tokio::time::Instant::now() + inner.coalesce_wait;
        let waits = &inner.metrics.coalesced_waits;
        let mut rejoined_after_purge = false;
        loop {
            let follower = match inner.flights.join(&key) {
                Role::Leader(leader) => {
                    // A flight that ended between this call's lookup and its join stored
                    // its value first: take it instead of computing again.
                    let landed = (!options.force_refresh)
                        .then(|| inner.store.lookup_memory(&key))
                        .flatten()
                        .filter(|entry| entry.is_fresh(now_ms()));
                    if let Some(entry) = landed {
                        leader.share(Ok(entry.clone()));
                        return Ok(entry.fetched(Source::Coalesced));
                    }
                    let result = match self.compute_and_store(key, options, compute).await {
                        Ok(result) => result,
                        Err(panic) => {
                            leader.share(Err(panicked()));
                            std::panic::resume_unwind(panic);
                        }
                    };
                    leader.share(result.clone());
                    return match result {
                        Ok(stored) => Ok(stored.fetched(Source::Computed)),
                        Err(e) => stale_fallback(&stale, e),
                    };
                }
                Role::Follower(follower) => follower,
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match follower.wait(left).await {
                WaitOutcome::Shared(Ok(stored))
                    if !rejoined_after_purge && inner.store.is_purged(&key, &stored) =>
                {
                    // A purge made since the computation started covers its value: given
                    // to the caller that computed it only. The waiters join again, once
                    // (the next computation starts after they all arrived), so that none
                    // gets a value a purge confirmed before it called, and purges faster
                    // than the computation cannot turn a flight into a stampede. The
                    // stale fallback from before the purge goes too.
                    waits.inc("purged");
                    rejoined_after_purge = true;
                    stale = None;
                }
                WaitOutcome::Shared(Ok(stored)) => {
                    waits.inc("served");
                    return Ok(stored.fetched(Source::Coalesced));
                }
                WaitOutcome::Shared(Err(e)) => {
                    waits.inc("error");
                    return stale_fallback(&stale, e);
                }
                WaitOutcome::Failed => waits.inc("retried"),
                WaitOutcome::Released | WaitOutcome::TimedOut => {
                    waits.inc("timeout");
                    let result = self
                        .compute_and_store(key, options, compute)
                        .await
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    return match result {
                        Ok(stored) => Ok(stored.fetched(Source::Computed)),
                        Err(e) => stale_fallback(&stale, e),
                    };
                }
            }
        }
    }

    /// Runs `compute`, stores a value it returns, and counts the outcome. `Err` when it
    /// panicked, with the payload.
    async fn compute_and_store<F, Fut, E>(
        &self,
        key: CacheKey,
        options: &Options,
        compute: F,
    ) -> Result<Flight<V, C>, Panic>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let metrics = &self.inner.metrics;
        // The value is stamped with when its computation started, so that a purge made
        // while it ran covers it (a purge covers what was stored at or before it).
        let started_ms = now_ms();
        // A panic is caught so that the flight ends with an error for every waiter (one
        // panic, not one per waiter); the caller resumes it.
        let outcome = match std::panic::AssertUnwindSafe(compute()).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(panic) => {
                metrics.computations.inc("error");
                return Err(panic);
            }
        };
        Ok(match outcome {
            Ok(value) => {
                metrics.computations.inc("ok");
                Ok(self.store_value(key, value, started_ms, options))
            }
            Err(e) => {
                metrics.computations.inc("error");
                let boxed: Box<dyn std::error::Error + Send + Sync> = e.into();
                Err(SharedError::from(boxed))
            }
        })
    }

    /// Wraps `value` into an entry stamped `stored_at_ms` (when its computation started;
    /// purges cover it from then, its TTL still runs from about now) and stores it; a
    /// value that cannot be encoded is returned but not stored (logged).
    fn store_value(
        &self,
        key: CacheKey,
        value: V,
        stored_at_ms: u64,
        options: &Options,
    ) -> Stored<V, C> {
        // The TTL runs from about when the value was ready: the computation's whole
        // seconds are added to the TTL counted from the stamp (never fresher than asked).
        let computing = Duration::from_secs(now_ms().saturating_sub(stored_at_ms) / 1000);
        let ttl = options
            .ttl
            .unwrap_or(self.inner.default_ttl)
            .saturating_add(computing);
        let grace = options.stale_if_error.unwrap_or_default();
        match Stored::new(value, stored_at_ms, secs(ttl), secs(grace), &options.tags) {
            Ok((stored, payload)) => {
                self.inner
                    .store
                    .store_with_payload(key, stored.clone(), payload);
                stored
            }
            Err((stored, e)) => {
                tracing::warn!(key = %key.short(), error = %e, "value not cached: it cannot be encoded");
                stored
            }
        }
    }

    /// Starts one detached refresh of `key`, unless one is in flight or the limit of
    /// background refreshes is reached. The refresh is bounded by `coalesce_wait`.
    fn refresh_in_background<F, Fut, E>(&self, key: CacheKey, options: Options, compute: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Role::Leader(leader) = self.inner.flights.join(&key) else {
            return;
        };
        let metrics = &self.inner.metrics.background_refreshes;
        let Ok(permit) = self.inner.refreshes.clone().try_acquire_owned() else {
            metrics.inc("skipped");
            return;
        };
        metrics.inc("started");
        let cache = self.clone();
        let limit = self.inner.coalesce_wait;
        tokio::spawn(async move {
            let _permit = permit;
            let computed =
                tokio::time::timeout(limit, cache.compute_and_store(key, &options, compute)).await;
            match computed {
                Ok(Ok(result)) => leader.share(result),
                Ok(Err(_panic)) => {
                    tracing::warn!(key = %key.short(), "background refresh panicked");
                    leader.share(Err(panicked()));
                }
                // A stuck refresh is abandoned: its waiters join again, a later hit retries.
                Err(_) => leader.fail(),
            }
        });
    }

    /// The fresh value stored for `key`, if any (memory tier, then Redis). Never computes.
    pub async fn get(&self, key: &str) -> Option<V> {
        let key = self.inner.keys.key_for(key);
        let (entry, tier) = self.inner.store.lookup(&key).await?;
        if !entry.is_fresh(now_ms()) {
            return None;
        }
        self.inner.metrics.hits.inc(tier.as_str());
        Some(entry.value().clone())
    }

    /// Stores `value` for `key` with `options`' TTL, tags and `stale_if_error`, replacing
    /// what was there; Redis is written in the background.
    ///
    /// Errors: [`CodecError`] when the value cannot be encoded (nothing is stored).
    pub fn set(&self, key: &str, value: V, options: &Options) -> Result<(), CodecError> {
        let key = self.inner.keys.key_for(key);
        let ttl = options.ttl.unwrap_or(self.inner.default_ttl);
        let grace = options.stale_if_error.unwrap_or_default();
        let (stored, payload) =
            Stored::<V, C>::new(value, now_ms(), secs(ttl), secs(grace), &options.tags)
                .map_err(|(_, e)| e)?;
        self.inner.store.store_with_payload(key, stored, payload);
        Ok(())
    }

    /// Removes `key` from the memory tier and from Redis. Returns whether Redis confirmed
    /// the delete (`true` without Redis); a Redis failure never raises.
    pub async fn remove(&self, key: &str) -> bool {
        let key = self.inner.keys.key_for(key);
        self.inner.store.remove(&key).await
    }

    /// Purges every value tagged with any of `tags` (see [`Options::tags`]) on every
    /// replica sharing this cache's Redis: from now on they are misses. Waits up to
    /// [`CacheBuilder::ack_timeout`] for the other replicas to acknowledge; the report
    /// says how many did ([`PurgeReport::confirmed`]). Never fails: with Redis down, the
    /// purge applies here and the report says the others were not reached.
    pub async fn invalidate_tags<S: AsRef<str>>(&self, tags: &[S]) -> PurgeReport {
        let tags = tags.iter().map(|t| t.as_ref().to_string()).collect();
        self.inner
            .store
            .purge(PurgeScope::Tags(tags), self.inner.ack_timeout)
            .await
    }

    /// Purges the values stored under `keys`, on every replica (as
    /// [`Cache::invalidate_tags`]; [`Cache::remove`] deletes them here and in Redis, but
    /// other replicas' memory tiers would keep them).
    pub async fn purge<S: AsRef<str>>(&self, keys: &[S]) -> PurgeReport {
        let keys = keys
            .iter()
            .map(|k| self.inner.keys.key_for(k.as_ref()))
            .collect();
        self.inner
            .store
            .purge(PurgeScope::Keys(keys), self.inner.ack_timeout)
            .await
    }

    /// Purges every value of the cache's namespace, on every replica (as
    /// [`Cache::invalidate_tags`]).
    pub async fn purge_all(&self) -> PurgeReport {
        self.inner
            .store
            .purge(PurgeScope::All, self.inner.ack_timeout)
            .await
    }

    /// Whether the Redis tier is in use: purge markers loaded (see
    /// [`TieredStore::in_sync`]); until then Redis entries are misses. A readiness check.
    pub fn in_sync(&self) -> bool {
        self.inner.store.in_sync()
    }

    /// The metrics, to register into a registry ([`CacheMetrics::register`]).
    pub fn metrics(&self) -> &CacheMetrics {
        &self.inner.metrics
    }

    /// A snapshot of every figure, memory-tier size refreshed.
    pub fn stats(&self) -> CacheStats {
        self.inner.store.refresh_gauges();
        self.inner.metrics.snapshot()
    }
}

/// The shared error for a computation that panicked.
fn panicked() -> SharedError {
    Arc::new(ComputationPanicked)
}

/// Whole seconds of `d`, at least 1 when `d` is not zero, at most `u32::MAX`.
fn secs(d: Duration) -> u32 {
    let s = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    u32::try_from(s).unwrap_or(u32::MAX)
}

/// Whether `entry` went stale less than `window` ago.
fn within<V: Storable>(entry: &V, window: Option<Duration>) -> bool {
    let Some(window) = window else {
        return false;
    };
    let expired_at = entry
        .stored_at_ms()
        .saturating_add(u64::from(entry.ttl_secs()) * 1000);
    now_ms().saturating_sub(expired_at) < window.as_millis() as u64
}

/// A stored library value with its freshness and tags; one allocation, shared by clones.
struct Stored<V, C> {
    inner: Arc<StoredInner<V>>,
    _codec: PhantomData<fn() -> C>,
}

impl<V, C> Clone for Stored<V, C> {
    fn clone(&self) -> Self {
        Stored {
            inner: self.inner.clone(),
            _codec: PhantomData,
        }
    }
}

struct StoredInner<V> {
    stored_at_ms: u64,
    ttl_secs: u32,
    grace_secs: u32,
    tags: Box<[String]>,
    value: V,
    /// Length of the encoded payload, for the memory tier's weight.
    payload_len: usize,
}

/// Memory a library entry costs besides its encoded payload: the tier's slot and hash
/// table (about 90 B, see the proxy's measured entry overhead), the `Arc` and the entry
/// struct with the decoded value's inline part.
const LIBRARY_ENTRY_OVERHEAD_BYTES: usize = 128;

/// Payload layout (integers big-endian):
/// `stored_at_ms u64 | ttl_secs u32 | grace_secs u32 | n_tags u16 | { len u16 | tag }*
/// | codec id u8 | codec version u8 | value`.
fn encode_payload<V: Serialize, C: Codec>(
    value: &V,
    stored_at_ms: u64,
    ttl_secs: u32,
    grace_secs: u32,
    tags: &[String],
) -> Result<Vec<u8>, CodecError> {
    let mut payload = Vec::with_capacity(64);
    payload.extend_from_slice(&stored_at_ms.to_be_bytes());
    payload.extend_from_slice(&ttl_secs.to_be_bytes());
    payload.extend_from_slice(&grace_secs.to_be_bytes());
    payload.extend_from_slice(&(tags.len() as u16).to_be_bytes());
    for tag in tags {
        payload.extend_from_slice(&(tag.len() as u16).to_be_bytes());
        payload.extend_from_slice(tag.as_bytes());
    }
    payload.extend_from_slice(&[C::ID, C::VERSION]);
    C::encode(value, &mut payload)?;
    Ok(payload)
}

impl<V, C> Stored<V, C>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
{
    /// The entry and its payload; on an encoding error, the entry (not storable) and the
    /// error. At most `u16::MAX` tags of at most 1024 characters are kept.
    #[allow(clippy::type_complexity)]
    fn new(
        value: V,
        stored_at_ms: u64,
        ttl_secs: u32,
        grace_secs: u32,
        tags: &[String],
    ) -> Result<(Self, Vec<u8>), (Self, CodecError)> {
        let tags: Box<[String]> = tags
            .iter()
            .take(u16::MAX as usize)
            .map(|t| t.chars().take(1024).collect())
            .collect();
        let encoded = encode_payload::<V, C>(&value, stored_at_ms, ttl_secs, grace_secs, &tags);
        let stored = |payload_len| Stored {
            inner: Arc::new(StoredInner {
                stored_at_ms,
                ttl_secs,
                grace_secs,
                tags,
                value,
                payload_len,
            }),
            _codec: PhantomData,
        };
        match encoded {
            Ok(payload) => Ok((stored(payload.len()), payload)),
            Err(e) => Err((stored(0), e)),
        }
    }
}

impl<V, C> Stored<V, C> {
    fn value(&self) -> &V {
        &self.inner.value
    }

    /// The value, cloned for a caller, with where it came from.
    fn fetched(&self, source: Source) -> Fetched<V>
    where
        V: Clone,
    {
        Fetched {
            value: self.inner.value.clone(),
            source,
        }
    }
}

impl<V, C> Storable for Stored<V, C>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
{
    fn stored_at_ms(&self) -> u64 {
        self.inner.stored_at_ms
    }

    fn ttl_secs(&self) -> u32 {
        self.inner.ttl_secs
    }

    fn grace_secs(&self) -> u32 {
        self.inner.grace_secs
    }

    fn size_bytes(&self) -> usize {
        self.inner.payload_len + LIBRARY_ENTRY_OVERHEAD_BYTES
    }

    fn any_tag(&self, pred: &mut dyn FnMut(&str) -> bool) -> bool {
        self.inner.tags.iter().any(|t| pred(t))
    }

    fn to_payload(&self) -> Vec<u8> {
        let i = &self.inner;
        // Encoded once already when stored; an empty payload would decode to a miss.
        encode_payload::<V, C>(&i.value, i.stored_at_ms, i.ttl_secs, i.grace_secs, &i.tags)
            .unwrap_or_default()
    }

    fn from_payload(payload: &[u8]) -> Option<Self> {
        let r = &mut &payload[..];
        let stored_at_ms = u64::from_be_bytes(take(r, 8)?.try_into().ok()?);
        let ttl_secs = u32::from_be_bytes(take(r, 4)?.try_into().ok()?);
        let grace_secs = u32::from_be_bytes(take(r, 4)?.try_into().ok()?);
        let n_tags = u16::from_be_bytes(take(r, 2)?.try_into().ok()?);
        let mut tags = Vec::with_capacity(usize::from(n_tags).min(64));
        for _ in 0..n_tags {
            let len = u16::from_be_bytes(take(r, 2)?.try_into().ok()?);
            tags.push(std::str::from_utf8(take(r, len.into())?).ok()?.to_string());
        }
        if take(r, 2)? != [C::ID, C::VERSION] {
            return None;
        }
        let value = C::decode::<V>(r).ok()?;
        Some(Stored {
            inner: Arc::new(StoredInner {
                stored_at_ms,
                ttl_secs,
                grace_secs,
                tags: tags.into(),
                value,
                payload_len: payload.len(),
            }),
            _codec: PhantomData,
        })
    }
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if r.len() < n {
        return None;
    }
    let (head, tail) = r.split_at(n);
    *r = tail;
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cache() -> Cache<String> {
        Cache::builder().key_secret(b"test").build().unwrap()
    }

    #[test]
    fn an_ack_timeout_past_the_bound_is_cut_to_it() {
        let builder = Cache::builder().ack_timeout(Duration::MAX);
        assert_eq!(builder.ack_timeout, crate::store::MAX_ACK_TIMEOUT);
        let builder = Cache::builder().ack_timeout(Duration::from_secs(2));
        assert_eq!(builder.ack_timeout, Duration::from_secs(2));
    }

    #[tokio::test]
    async fn one_computation_for_concurrent_callers_and_errors_reach_every_waiter() {
        let cache = cache();
        let runs = Arc::new(AtomicUsize::new(0));
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let mut calls = Vec::new();
        for _ in 0..50 {
            let (cache, runs, mut gate) = (cache.clone(), runs.clone(), gate_rx.clone());
            calls.push(tokio::spawn(async move {
                cache
                    .get_or_set("k", &Options::default(), move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.wait_for(|open| *open).await;
                        Err::<String, _>(std::io::Error::other("upstream down"))
                    })
                    .await
            }));
        }
        // Let every call join before the computation ends.
        while cache.inner.flights.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        gate_tx.send(true).unwrap();
        for call in calls {
            let err = call.await.unwrap().unwrap_err();
            let Error::Compute(e) = err;
            assert!(e.downcast_ref::<std::io::Error>().is_some());
        }
        // On this single-threaded runtime all 50 joined before the gate opened: one ran
        // the computation, 49 got its error. Errors are not cached.
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(cache.metrics().coalesced_waits.get("error"), 49);
        assert_eq!(cache.get("k").await, None);
    }

    #[tokio::test]
    async fn a_panicking_computation_runs_once_and_its_waiters_get_an_error() {
        let cache = cache();
        let runs = Arc::new(AtomicUsize::new(0));
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let calls: Vec<_> = (0..10)
            .map(|_| {
                let (cache, runs, mut gate) = (cache.clone(), runs.clone(), gate_rx.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_set("k", &Options::default(), move || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            let _ = gate.wait_for(|open| *open).await;
                            if runs.load(Ordering::SeqCst) > 0 {
                                panic!("the computation failed badly");
                            }
                            Ok::<String, std::io::Error>(String::new())
                        })
                        .await
                })
            })
            .collect();
        while cache.inner.flights.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        gate_tx.send(true).unwrap();
        let (mut panicked, mut errors) = (0, 0);
        for call in calls {
            match call.await {
                Err(join) if join.is_panic() => panicked += 1,
                Ok(Err(Error::Compute(e))) if e.is::<ComputationPanicked>() => errors += 1,
                other => panic!("unexpected {:?}", other.map(|r| r.map(|f| f.source))),
            }
        }
        assert_eq!((runs.load(Ordering::SeqCst), panicked, errors), (1, 1, 9));
        // Nothing is poisoned: the next call computes normally.
        let ok = cache
            .get_or_set("k", &Options::default(), || async {
                Ok::<_, std::io::Error>("fine".to_string())
            })
            .await
            .unwrap();
        assert_eq!(ok.value, "fine");
    }

    #[tokio::test]
    async fn tag_and_namespace_purges_turn_stored_values_into_misses() {
        let cache = cache();
        let kpi = Options::default().tags(["kpi", "kpi:eu"]);
        cache.set("leads:eu", "12".into(), &kpi).unwrap();
        cache
            .set("leads:us", "7".into(), &Options::default().tags(["kpi"]))
            .unwrap();
        cache
            .set("profile", "ada".into(), &Options::default())
            .unwrap();
        let report = cache.invalidate_tags(&["kpi:eu"]).await;
        assert!(report.confirmed(), "{report:?}");
        assert_eq!(cache.get("leads:eu").await, None);
        assert_eq!(cache.get("leads:us").await.as_deref(), Some("7"));
        // Stored after the purge (in a later millisecond: one stored in the same
        // millisecond counts as purged, a miss rather than a stale value): not covered.
        let purged_at = now_ms();
        while now_ms() == purged_at {
            tokio::task::yield_now().await;
        }
        cache.set("leads:eu", "13".into(), &kpi).unwrap();
        assert_eq!(cache.get("leads:eu").await.as_deref(), Some("13"));
        cache.purge_all().await;
        for key in ["leads:eu", "leads:us", "profile"] {
            assert_eq!(cache.get(key).await, None, "{key}");
        }
    }

    /// A purge made while a value is being computed covers that value: it is stamped
    /// with when its computation started.
    #[tokio::test]
    async fn a_purge_made_while_a_value_is_computed_covers_it() {
        let cache = cache();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (finish, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let computing = {
            let cache = cache.clone();
            tokio::spawn(async move {
                let options = Options::default().tags(["kpi"]);
                cache
                    .get_or_set("leads", &options, || async move {
                        let _ = started_tx.send(());
                        let _ = finish_rx.await;
                        Ok::<_, std::io::Error>("old".to_string())
                    })
                    .await
            })
        };
        started.await.unwrap();
        let report = cache.invalidate_tags(&["kpi"]).await;
        assert!(report.confirmed(), "{report:?}");
        // A call made after the purge waits on the same flight; the value it brings is
        // purged already, so the call computes anew rather than take it.
        let waiting = {
            let cache = cache.clone();
            tokio::spawn(async move {
                let options = Options::default().tags(["kpi"]);
                cache
                    .get_or_set("leads", &options, || async {
                        Ok::<_, std::io::Error>("new".to_string())
                    })
                    .await
            })
        };
        // This test's runtime has one thread: the call runs up to its wait here.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        finish.send(()).unwrap();
        let computed = computing.await.unwrap().unwrap();
        assert_eq!(
            (computed.value.as_str(), computed.source),
            ("old", Source::Computed)
        );
        let waited = waiting.await.unwrap().unwrap();
        assert_eq!(
            (waited.value.as_str(), waited.source),
            ("new", Source::Computed),
            "a waiter got a value purged before it was handed over"
        );
        let waits = &cache.metrics().coalesced_waits;
        assert_eq!(
            waits.get("purged"),
            1,
            "the call did not wait on the flight"
        );
    }

    /// Waiters on a value a purge covers join again once only: the value of the next
    /// computation (started after they all called) is theirs even when a purge covers it
    /// too, so purges made faster than the computation cannot make every waiter compute.
    #[tokio::test]
    async fn waiters_join_again_once_after_a_purge() {
        let cache = cache();
        let gate = Arc::new(Semaphore::new(0));
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
        let call = |value: &'static str| {
            let (cache, gate, started_tx) = (cache.clone(), gate.clone(), started_tx.clone());
            tokio::spawn(async move {
                let options = Options::default().tags(["kpi"]);
                cache
                    .get_or_set("leads", &options, move || async move {
                        let _ = started_tx.send(());
                        gate.acquire().await.unwrap().forget();
                        Ok::<_, std::io::Error>(value.to_string())
                    })
                    .await
            })
        };
        let first = call("first");
        started.recv().await.unwrap();
        assert!(cache.invalidate_tags(&["kpi"]).await.confirmed());
        let waiters = [call("second"), call("second")];
        // This test's runtime has one thread: the calls run up to their waits here.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(1);
        assert_eq!(first.await.unwrap().unwrap().value, "first");
        // Both waiters joined again: one of them computes, once.
        started.recv().await.unwrap();
        assert!(cache.invalidate_tags(&["kpi"]).await.confirmed());
        gate.add_permits(1);
        let mut sources = Vec::new();
        for waiter in waiters {
            // Joining again a second time, a waiter would compute, held by the gate.
            let got = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("a waiter joined again after the second purge")
                .unwrap()
                .unwrap();
            assert_eq!(got.value, "second");
            sources.push(got.source);
        }
        sources.sort_by_key(|s| format!("{s:?}"));
        assert_eq!(sources, [Source::Coalesced, Source::Computed]);
        assert_eq!(cache.metrics().computations.get("ok"), 2);
        assert_eq!(cache.metrics().coalesced_waits.get("purged"), 2);
    }

    /// A TTL of `Duration::MAX` ("forever") works, also when the computation takes
    /// seconds (the time it took is added to the TTL; both saturate).
    #[tokio::test]
    async fn a_forever_ttl_survives_a_slow_computation() {
        let cache = cache();
        let forever = Options::default().ttl(Duration::MAX);
        let computed = cache
            .get_or_set("k", &forever, || async {
                tokio::time::sleep(Duration::from_millis(1_100)).await;
                Ok::<_, std::io::Error>("v".to_string())
            })
            .await
            .unwrap();
        assert_eq!(computed.value, "v");
        assert_eq!(cache.get("k").await.as_deref(), Some("v"));
    }

    #[tokio::test]
    async fn set_get_remove_and_force_refresh() {
        let cache = cache();
        cache.set("k", "v1".into(), &Options::default()).unwrap();
        assert_eq!(cache.get("k").await.as_deref(), Some("v1"));
        let forced = cache
            .get_or_set("k", &Options::default().force_refresh(), || async {
                Ok::<_, std::io::Error>("v2".to_string())
            })
            .await
            .unwrap();
        assert_eq!(
            (forced.value.as_str(), forced.source),
            ("v2", Source::Computed)
        );
        assert_eq!(cache.get("k").await.as_deref(), Some("v2"));
        assert!(cache.remove("k").await);
        assert_eq!(cache.get("k").await, None);
        let stats = cache.stats();
        assert_eq!((stats.computations_ok, stats.stores_memory), (1, 2));
    }

    #[test]
    fn payload_round_trip_and_codec_version_mismatch() {
        let (stored, payload) =
            Stored::<String, Postcard>::new("chart".into(), 1_000, 30, 60, &["a".into()])
                .ok()
                .unwrap();
        let back = Stored::<String, Postcard>::from_payload(&payload).unwrap();
        assert_eq!(back.value(), stored.value());
        assert_eq!((back.ttl_secs(), back.grace_secs()), (30, 60));
        assert_eq!(&*back.inner.tags, ["a".to_string()]);
        let mut older = payload.clone();
        let at = payload.len() - stored.value().len() - 2;
        older[at + 1] = Postcard::VERSION.wrapping_sub(1);
        assert!(Stored::<String, Postcard>::from_payload(&older).is_none());
        for n in 0..payload.len() {
            assert!(Stored::<String, Postcard>::from_payload(&payload[..n]).is_none());
        }
    }
}
