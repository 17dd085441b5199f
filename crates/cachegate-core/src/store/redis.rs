//! The Redis/Valkey tier: envelopes stored with `SET key value EX ttl`, read with `GET`.
//!
//! Every operation is bounded by `op_timeout_ms`; failures feed a [`Breaker`] so that a
//! dead or slow Redis costs at most a few timeouts before it is skipped, and is probed
//! again after the cool-down. redis-rs's `ConnectionManager` reconnects by itself, so the
//! tier comes back when Redis does.
//!
//! Reads (`GET`) on a lasting thread ([`crate::home::mark_thread_lasting`], cachegate's
//! connection threads) go through a connection of that thread's own while the breaker is
//! closed (`store/thread_conns.rs`); everything else, and reads elsewhere, through the
//! shared connection.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use super::breaker::Breaker;
use super::thread_conns::{OpFailure, ThreadConnections};
use crate::home::Home;
use crate::key::CacheKey;
use crate::metrics::{BreakerState, StoreMetrics};

/// How to reach Redis and how long to wait for it.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: String,
    /// PEM file of the CA that signed the server's certificate, for `rediss://` servers
    /// whose CA is not a public one. `None`: the public web PKI roots are trusted.
    pub tls_ca_file: Option<PathBuf>,
    /// Limit on one Redis operation, in milliseconds. Default 100.
    pub op_timeout_ms: u64,
    /// Limit on establishing a connection, in milliseconds. Default 500.
    pub connect_timeout_ms: u64,
    /// Consecutive failures that open the circuit breaker. Default 3.
    pub breaker_failures: u32,
    /// How long an open breaker skips Redis before probing it again, in milliseconds.
    /// Default 2000.
    pub breaker_cooldown_ms: u64,
    /// Reads on a lasting thread ([`crate::home::mark_thread_lasting`]) go through a
    /// connection of that thread's own (see [`RedisTier::get`]). Default `true`; `false`
    /// keeps one connection per tier, for a Redis whose connection limit is tight.
    pub thread_connections: bool,
}

impl RedisOptions {
    /// Options for `url` with the defaults above.
    pub fn new(url: impl Into<String>) -> Self {
        RedisOptions {
            url: url.into(),
            tls_ca_file: None,
            op_timeout_ms: 100,
            connect_timeout_ms: 500,
            breaker_failures: 3,
            breaker_cooldown_ms: 2000,
            thread_connections: true,
        }
    }
}

/// Why a Redis tier could not be created.
#[derive(Debug)]
pub struct RedisSetupError(pub String);

impl std::fmt::Display for RedisSetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "redis: {}", self.0)
    }
}

impl std::error::Error for RedisSetupError {}

/// Which connection an operation went through.
#[derive(Clone, Copy)]
enum Via {
    /// The shared connection, as of this epoch (`RedisTier::shared_epoch`).
    Shared(u64),
    /// The calling thread's connection with this id.
    Thread(u64),
}

/// Markers recorded per script call by [`RedisTier::record_purges`].
const MARKERS_PER_SCRIPT: usize = 1_000;

/// Markers read per `ZSCAN` or `HSCAN` page by [`RedisTier::load_purges`].
pub const MARKER_PAGE: usize = 1_000;

/// The most `ZSCAN` (or `HSCAN`) pages [`RedisTier::load_purges`] reads per set: far more
/// than [`crate::purge::MAX_KEY_MARKERS`] (or [`crate::purge::MAX_SHARED_MARKERS`]) need.
const MAX_MARKER_PAGES: usize = 4 * crate::purge::MAX_KEY_MARKERS / MARKER_PAGE + 16;

/// The shared tier. Cloning shares the connection and the breaker.
#[derive(Clone)]
pub struct RedisTier {
    /// Where the connections' tasks and the reconnects run.
    home: Home,
    client: redis::Client,
    /// The shared connection; replaced by a new one when the breaker opens (see
    /// [`RedisTier::guarded`]).
    conn: Arc<RwLock<ConnectionManager>>,
    manager_config: ConnectionManagerConfig,
    /// A replacement connection is being made.
    reconnecting: Arc<AtomicBool>,
    /// The reads' per-thread connections on lasting threads.
    thread_conns: ThreadConnections,
    /// Failures in a row of operations on the shared connection (timeouts and a
    /// connection's failures), since it was last replaced.
    shared_failures: Arc<AtomicU32>,
    /// Bumped each time the shared connection is replaced: late failures of the one
    /// replaced are not counted against the new one.
    shared_epoch: Arc<AtomicU64>,
    /// `breaker_failures`.
    breaker_failures: u32,
    /// `thread_connections`.
    thread_reads: bool,
    op_timeout: Duration,
    connect_timeout: Duration,
    namespace: String,
    breaker: Arc<Breaker>,
    prefix: String,
    metrics: StoreMetrics,
}

impl RedisTier {
    /// Creates the tier without connecting: the first operation connects, so cachegate
    /// starts even while Redis is down. `rediss://` URLs use TLS (rustls), trusting
    /// `tls_ca_file` when given and the public web PKI roots otherwise.
    ///
    /// Errors: the URL cannot be used by redis-rs, or `tls_ca_file` cannot be read.
    pub fn new(
        config: &RedisOptions,
        namespace: &str,
        metrics: StoreMetrics,
    ) -> Result<Self, RedisSetupError> {
        let client = match &config.tls_ca_file {
            None => redis::Client::open(config.url.as_str()),
            Some(path) => {
                let root_cert = std::fs::read(path)
                    .map_err(|e| RedisSetupError(format!("tls_ca_file {}: {e}", path.display())))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                };
                redis::Client::build_with_tls(config.url.as_str(), certs)
            }
        }
        .map_err(|e| RedisSetupError(e.to_string()))?;
        let op_timeout = Duration::from_millis(config.op_timeout_ms.max(1));
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms.max(1));
        // The longest wait before connecting again, the shared connection's and a thread's.
        let reconnect_after = Duration::from_millis(config.breaker_cooldown_ms.max(10));
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(op_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(reconnect_after);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
            .map_err(|e| RedisSetupError(e.to_string()))?;
        Ok(RedisTier {
            home: Home::none(),
            thread_conns: ThreadConnections::new(
                client.clone(),
                op_timeout,
                connect_timeout,
                reconnect_after,
                metrics.clone(),
            ),
            shared_failures: Arc::new(AtomicU32::new(0)),
            shared_epoch: Arc::new(AtomicU64::new(0)),
            breaker_failures: config.breaker_failures.max(1),
            thread_reads: config.thread_connections,
            client,
            conn: Arc::new(RwLock::new(conn)),
            manager_config,
            reconnecting: Arc::new(AtomicBool::new(false)),
            op_timeout,
            connect_timeout,
            namespace: namespace.to_string(),
            breaker: Arc::new(
                Breaker::new(
                    config.breaker_failures,
                    Duration::from_millis(config.breaker_cooldown_ms),
                )
                .with_gauge(metrics.redis_breaker_state.clone()),
            ),
            prefix: format!("{namespace}:v2:"),
            metrics,
        })
    }

    /// Runs the tier's connections (their driver tasks, reconnects) and its background
    /// work on `home` (see [`Home`]), whichever runtime polls an operation: one busy or
    /// ended runtime then holds up or breaks no other's Redis traffic. `home` must outlive
    /// the tier and keep running. Without it (the default), each runs where it starts.
    pub fn with_home(mut self, home: Home) -> Self {
        self.home = home;
        self
    }

    /// The tier's home runtime (see [`RedisTier::with_home`]): where work left to finish in
    /// the background should run.
    pub fn home(&self) -> &Home {
        &self.home
    }

    /// The limit on one Redis operation (`op_timeout_ms`).
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// The Redis key of a cache key: `{namespace}:v2:{hex}`.
    pub fn redis_key(&self, key: &CacheKey) -> String {
        let mut redis_key = String::with_capacity(self.prefix.len() + 64);
        redis_key.push_str(&self.prefix);
        key.push_hex(&mut redis_key);
        redis_key
    }

    /// The Redis key of `key`'s refresh lease: `{namespace}:v2:lease:{hex}`.
    fn lease_key(&self, key: &CacheKey) -> String {
        format!("{}lease:{}", self.prefix, key.to_hex())
    }

    /// The shared connection.
    fn connection(&self) -> ConnectionManager {
        self.conn
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the shared connection with a new one, connected in the background (within
    /// the connect timeout) and swapped in only once connected; when it cannot connect, the
    /// old connection stays (redis-rs reconnects it itself after an error). redis-rs
    /// reconnects when a connection reports an error, never after timeouts: a connection
    /// that died without a reset (a NAT or firewall forgetting it, a Redis host gone) would
    /// only time out, until the kernel gives up on it (about 15 minutes).
    /// One attempt runs at a time; it is made each time the breaker opens, after a failed
    /// probe too.
    fn reconnect(&self) {
        if self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (client, config) = (self.client.clone(), self.manager_config.clone());
        let (conn, limit) = (self.conn.clone(), self.connect_timeout);
        let reconnecting = self.reconnecting.clone();
        let (epoch, failures) = (self.shared_epoch.clone(), self.shared_failures.clone());
        self.home.spawn(async move {
            let connect = ConnectionManager::new_with_config(client, config);
            match tokio::time::timeout(limit, connect).await {
                Ok(Ok(fresh)) => {
                    *conn.write().unwrap_or_else(PoisonError::into_inner) = fresh;
                    epoch.fetch_add(1, Ordering::AcqRel);
                    failures.store(0, Ordering::Relaxed);
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "redis tier: new connection failed"),
                Err(_) => tracing::debug!("redis tier: new connection timed out"),
            }
            reconnecting.store(false, Ordering::Release);
        });
    }

    /// Runs one operation under the breaker and the operation timeout. `None` when the
    /// breaker refused, the operation failed or it timed out. When the breaker opens (and
    /// after each failed probe), the shared connection is replaced: the failures may be
    /// those of a dead connection rather than of Redis.
    async fn guarded<T, F>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        self.guarded_until(op, Instant::now() + self.op_timeout, f)
            .await
    }

    /// [`RedisTier::guarded`] with the operation given up on at `deadline`.
    async fn guarded_until<T, F>(&self, op: &'static str, deadline: Instant, f: F) -> Option<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker.allow() {
            return None;
        }
        // (The caller took the connection just before: this is its epoch.)
        let epoch = self.shared_epoch.load(Ordering::Acquire);
        // On the home runtime: redis-rs spawns the connection's driver (and its reconnects)
        // where the first operation is polled.
        let outcome = tokio::time::timeout_at(deadline, self.home.run(f)).await;
        self.report(op, outcome, Via::Shared(epoch))
    }

    /// Reports an operation's outcome (`via` the shared connection or the calling
    /// thread's) to the breaker and the metrics. When the breaker opens, the shared
    /// connection and every thread's are replaced; the shared one also after a failed
    /// probe, and after `breaker_failures` timeouts or connection failures of its own in a
    /// row, even while reads on the threads' connections keep the breaker closed (it may
    /// have died without a reset while they did not).
    fn report<T>(
        &self,
        op: &'static str,
        outcome: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
        via: Via,
    ) -> Option<T> {
        match outcome {
            Ok(Ok(v)) => {
                if matches!(via, Via::Shared(_))
                    && self.shared_failures.load(Ordering::Relaxed) != 0
                {
                    self.shared_failures.store(0, Ordering::Relaxed);
                }
                // Nothing shared is written while the breaker stays closed.
                if self.breaker.success() {
                    tracing::info!("redis tier available again: circuit breaker closed");
                }
                Some(v)
            }
            failed => {
                let failure = match &failed {
                    Ok(Err(e)) => {
                        tracing::debug!(op, error = %e, "redis operation failed");
                        OpFailure::Error(e)
                    }
                    _ => {
                        tracing::debug!(op, "redis operation timed out");
                        OpFailure::TimedOut
                    }
                };
                self.count_failure(op, failure, via);
                if self.breaker.failure() {
                    tracing::warn!("redis tier unavailable: circuit breaker open");
                    self.thread_conns.replace_all();
                    self.reconnect();
                } else if let Via::Shared(epoch) = via
                    && epoch == self.shared_epoch.load(Ordering::Acquire)
                {
                    // A failed probe; or failures of the shared connection in a row
                    // (timeouts and a connection's failures: an error reply says nothing
                    // about the connection) while reads elsewhere keep the breaker closed.
                    let in_a_row = if failure.is_connection_failure() {
                        self.shared_failures.fetch_add(1, Ordering::Relaxed) + 1
                    } else {
                        0
                    };
                    if in_a_row >= self.breaker_failures
                        || self.breaker.state() == BreakerState::Open
                    {
                        self.reconnect();
                    }
                }
                None
            }
        }
    }

    /// Counts a failed operation in `redis_errors{op}`, and retires the thread's connection
    /// it went through when the failure was the connection's (the breaker is told by the
    /// caller).
    fn count_failure(&self, op: &'static str, failure: OpFailure<'_>, via: Via) {
        if let Via::Thread(id) = via {
            self.thread_conns.failed_here(id, failure);
        }
        self.metrics.redis_errors.inc(op);
    }

    /// Counts a write dropped before it was sent (its stripe's backlog was full, see
    /// [`super::MAX_PENDING_WRITES`]) as a failed `set`.
    pub fn count_dropped_write(&self) {
        self.metrics.redis_errors.inc("set");
    }

    /// Whether Redis answers a `PING` within the operation timeout (through the breaker).
    pub async fn ping(&self) -> bool {
        let mut conn = self.connection();
        self.guarded("get", async move {
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await
        .is_some()
    }

    /// The stored envelope for `key`, or `None` on a miss, a failure or a timeout (within
    /// `op_timeout_ms` in all). On a lasting thread (with `thread_connections`), through
    /// the thread's own connection once it is up and while the breaker is closed (see the
    /// module docs and `store/thread_conns.rs`). When that connection turns out to be lost
    /// (closed by Redis, by its `timeout` for idle clients or a restart; not a timeout,
    /// which has used the time up, nor an error reply), it is retired and, with at least a
    /// quarter of the timeout left, the read goes through the shared connection in the
    /// time left: one read, one outcome for the breaker (the lost connection is counted
    /// in `redis_errors{op="get"}` either way).
    pub async fn get(&self, key: &CacheKey) -> Option<Vec<u8>> {
        let redis_key = self.redis_key(key);
        let deadline = Instant::now() + self.op_timeout;
        if self.thread_reads
            && self.breaker.state() == BreakerState::Closed
            && let Some((mut conn, id)) = self.thread_conns.here()
        {
            let read = conn.get::<_, Option<Vec<u8>>>(&redis_key);
            match tokio::time::timeout_at(deadline, read).await {
                // Lost, with time left for the shared connection (a quarter of the
                // timeout at least: not a read given up on as soon as it starts).
                Ok(Err(e))
                    if OpFailure::Error(&e).is_connection_failure()
                        && deadline.saturating_duration_since(Instant::now())
                            >= self.op_timeout / 4 =>
                {
                    tracing::debug!(error = %e, "redis thread connection lost; read on the shared one");
                    self.count_failure("get", OpFailure::Error(&e), Via::Thread(id));
                }
                outcome => return self.report("get", outcome, Via::Thread(id)).flatten(),
            }
        }
        let mut conn = self.connection();
        self.guarded_until("get", deadline, async move {
            conn.get::<_, Option<Vec<u8>>>(redis_key).await
        })
        .await
        .flatten()
    }

    /// Stores `envelope` under `key` for `ttl_secs` (`SET … EX`). Returns whether it was
    /// written; failures are counted, never raised.
    pub async fn set(&self, key: &CacheKey, envelope: Bytes, ttl_secs: u64) -> bool {
        let mut conn = self.connection();
        let redis_key = self.redis_key(key);
        self.guarded("set", async move {
            conn.set_ex::<_, _, ()>(redis_key, envelope.as_ref(), ttl_secs.max(1))
                .await
        })
        .await
        .is_some()
    }

    /// The pub/sub channel purges travel on: `{namespace}:invalidate`.
    pub fn invalidate_channel(&self) -> String {
        format!("{}:invalidate", self.namespace)
    }

    /// The pub/sub channel event names travel on: `{namespace}:events`.
    pub fn events_channel(&self) -> String {
        format!("{}:events", self.namespace)
    }

    /// The hash of purge markers (`field` -> ms since the epoch): `{namespace}:purges`.
    fn purges_key(&self) -> String {
        format!("{}:purges", self.namespace)
    }

    fn purged_keys_key(&self) -> String {
        format!("{}:purged-keys", self.namespace)
    }

    /// The markers of `{namespace}:purges` other than the namespace ones (tags, paths, soft
    /// purges by key) ranked by time, for folding the oldest
    /// ([`crate::purge::MAX_SHARED_MARKERS`]): `{namespace}:purge-order`.
    fn purge_order_key(&self) -> String {
        format!("{}:purge-order", self.namespace)
    }

    fn acks_key(&self, id: u64) -> String {
        format!("{}:acks:{id:016x}", self.namespace)
    }

    /// Records purge markers in Redis (each keeps the latest time), so that a replica
    /// that missed a message finds them when it (re)subscribes: tag, path and namespace
    /// markers in the hash `{namespace}:purges`, key markers (one per purged key, many
    /// with invalidations by unsafe methods) in the sorted set `{namespace}:purged-keys`,
    /// scored by time and kept [`crate::purge::KEY_MARKER_RETENTION_MS`], the newest
    /// [`crate::purge::MAX_KEY_MARKERS`] at most. The entries of purged keys are deleted
    /// (`UNLINK`) at once, so that a key marker dropped later uncovers nothing in Redis
    /// (the script touches entry keys it does not declare: standalone Redis, not Cluster).
    /// The hash's other markers (tags, paths, soft purges by key) are also ranked by time
    /// in the sorted set `{namespace}:purge-order`; beyond
    /// [`crate::purge::MAX_SHARED_MARKERS`], the oldest are removed, down to three
    /// quarters, and folded into the namespace marker of their mode (`all`, `soft:all`):
    /// every entry stored by then stays purged (logged as a warning). Markers recorded
    /// before this ranking existed are ranked when recorded again, never removed
    /// otherwise. Recorded in parts of 1 000 markers, each within the
    /// operation timeout. Returns whether Redis confirmed every part (a part that failed
    /// leaves those before it recorded: a replica loading the markers later applies them,
    /// the others do not hear of the purge; recording it again is harmless).
    pub async fn record_purges(&self, markers: &[(String, u64)]) -> bool {
        let key = self.purges_key();
        let script = redis::Script::new(
            "for i = 6, #ARGV, 2 do \
               local at = tonumber(ARGV[i + 1]) \
               if string.sub(ARGV[i], 1, 4) == 'key:' then \
                 redis.call('ZADD', KEYS[2], 'GT', at, string.sub(ARGV[i], 5)) \
                 redis.call('UNLINK', ARGV[3] .. string.sub(ARGV[i], 5)) \
               else \
                 local cur = redis.call('HGET', KEYS[1], ARGV[i]) \
                 local latest = ARGV[i + 1] \
                 if not cur or tonumber(cur) < at then \
                   redis.call('HSET', KEYS[1], ARGV[i], latest) \
                 else \
                   latest = cur \
                 end \
                 if ARGV[i] ~= 'all' and ARGV[i] ~= 'soft:all' then \
                   redis.call('ZADD', KEYS[3], 'GT', latest, ARGV[i]) \
                 end \
               end \
             end \
             redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1]) \
             redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[2]) + 1)) \
             local n = redis.call('ZCARD', KEYS[3]) \
             if n > tonumber(ARGV[4]) then \
               local cut = n - tonumber(ARGV[5]) \
               local old = redis.call('ZRANGE', KEYS[3], 0, cut - 1, 'WITHSCORES') \
               local floors = {} \
               for j = 1, #old, 2 do \
                 local at = old[j + 1] \
                 local cur = redis.call('HGET', KEYS[1], old[j]) \
                 if cur and tonumber(cur) > tonumber(at) then at = cur end \
                 redis.call('HDEL', KEYS[1], old[j]) \
                 local all = 'all' \
                 if string.sub(old[j], 1, 5) == 'soft:' then all = 'soft:all' end \
                 if not floors[all] or tonumber(floors[all]) < tonumber(at) then \
                   floors[all] = at \
                 end \
               end \
               redis.call('ZREMRANGEBYRANK', KEYS[3], 0, cut - 1) \
               for all, at in pairs(floors) do \
                 local cur = redis.call('HGET', KEYS[1], all) \
                 if not cur or tonumber(cur) < tonumber(at) then \
                   redis.call('HSET', KEYS[1], all, at) \
                 end \
               end \
               return cut \
             end \
             return 0",
        );
        let cutoff = crate::now_ms().saturating_sub(crate::purge::KEY_MARKER_RETENTION_MS);
        // In parts, so that no script holds Redis (single-threaded) for long, whatever the
        // purge's size.
        for (recorded, part) in markers.chunks(MARKERS_PER_SCRIPT).enumerate() {
            let mut invocation = script.key(&key);
            invocation
                .key(self.purged_keys_key())
                .key(self.purge_order_key())
                .arg(cutoff)
                .arg(crate::purge::MAX_KEY_MARKERS)
                .arg(&self.prefix)
                .arg(crate::purge::MAX_SHARED_MARKERS)
                .arg(crate::purge::MAX_SHARED_MARKERS / 4 * 3);
            for (field, at_ms) in part {
                invocation.arg(field).arg(*at_ms);
            }
            let mut conn = self.connection();
            let folded = self
                .guarded("set", async move {
                    invocation.invoke_async::<i64>(&mut conn).await
                })
                .await;
            match folded {
                None => {
                    if recorded > 0 {
                        tracing::warn!(
                            recorded_parts = recorded,
                            "purge recorded in Redis in part only: retry it"
                        );
                    }
                    return false;
                }
                Some(n @ 1..) => {
                    self.metrics.purge_marker_folds.inc("redis");
                    tracing::warn!(
                        folded = n,
                        "too many purge markers in Redis: the oldest folded into a purge of every entry stored by then"
                    );
                }
                Some(_) => {}
            }
        }
        true
    }

    /// Every purge marker recorded in Redis (the hash and the key markers), or `None`
    /// when Redis fails. Both are read in pages of [`MARKER_PAGE`] (`HSCAN`, `ZSCAN`),
    /// each within the operation timeout and none holding the shared connection for long
    /// (the key markers: up to [`crate::purge::MAX_KEY_MARKERS`], about 9 MB, and any
    /// client can cause them with unsafe requests); a marker added or dropped meanwhile
    /// may be missed or read twice, which the subscription's messages make up for, and the
    /// namespace markers are read once more at the end, for markers folded meanwhile.
    pub async fn load_purges(&self) -> Option<Vec<(String, u64)>> {
        let hash = self.purges_key();
        let mut markers = self.scan_markers("HSCAN", &hash).await?;
        // Read again after the scan: markers folded while it ran (removed before the scan
        // reached them) are in these (`record_purges`).
        let mut conn = self.connection();
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(&hash).arg("all").arg("soft:all");
        let folded = self
            .guarded("get", async move {
                hmget.query_async::<Vec<Option<u64>>>(&mut conn).await
            })
            .await?;
        for (field, at) in ["all", "soft:all"].into_iter().zip(folded) {
            markers.extend(at.map(|at| (field.to_string(), at)));
        }
        let keys = self.scan_markers("ZSCAN", &self.purged_keys_key()).await?;
        markers.extend(keys.into_iter().map(|(hex, at)| (format!("key:{hex}"), at)));
        Some(markers)
    }

    /// Every `(field, time)` pair of the hash (`HSCAN`) or sorted set (`ZSCAN`) at `key`,
    /// read in pages of [`MARKER_PAGE`], each within the operation timeout; `None` when
    /// Redis fails or the scan does not end within [`MAX_MARKER_PAGES`] pages.
    async fn scan_markers(&self, scan_cmd: &str, key: &str) -> Option<Vec<(String, u64)>> {
        let mut markers = Vec::new();
        let mut cursor = 0u64;
        // A scan ends; the cap keeps this wait bounded whatever Redis answers.
        for _ in 0..MAX_MARKER_PAGES {
            let mut conn = self.connection();
            let mut scan = redis::cmd(scan_cmd);
            scan.arg(key).arg(cursor).arg("COUNT").arg(MARKER_PAGE);
            let (next, page) = self
                .guarded("get", async move {
                    scan.query_async::<(u64, Vec<(String, u64)>)>(&mut conn)
                        .await
                })
                .await?;
            markers.extend(page);
            if next == 0 {
                return Some(markers);
            }
            cursor = next;
        }
        None
    }

    /// Logs a warning when Redis's `maxmemory-policy` may evict keys that have no TTL
    /// (`allkeys-lru`, `allkeys-lfu`, `allkeys-random`): the purge markers have none, and
    /// a marker evicted is a purge that a replica subscribing later does not apply. Says
    /// nothing when Redis refuses `CONFIG` (a managed Redis) or does not answer within the
    /// operation timeout; not counted against the circuit breaker.
    pub async fn check_eviction_policy(&self) {
        let mut conn = self.connection();
        let mut config_get = redis::cmd("CONFIG");
        config_get.arg("GET").arg("maxmemory-policy");
        let reply = tokio::time::timeout(
            self.op_timeout,
            config_get.query_async::<Vec<String>>(&mut conn),
        )
        .await;
        if let Ok(Ok(pair)) = reply
            && let Some(policy) = pair.get(1)
            && policy.starts_with("allkeys-")
        {
            tracing::warn!(
                maxmemory_policy = %policy,
                "Redis may evict purge markers under this policy: use volatile-lru or volatile-lfu"
            );
        }
    }

    /// Publishes `message` on the invalidation channel; the number of subscribers that
    /// received it, or `None` when Redis fails.
    pub async fn publish_purge(&self, message: &str) -> Option<u64> {
        let mut conn = self.connection();
        let channel = self.invalidate_channel();
        let message = message.to_string();
        self.guarded("set", async move {
            conn.publish::<_, _, u64>(channel, message).await
        })
        .await
    }

    /// Acknowledges purge `id` with the number of memory-tier entries it removed here
    /// (`RPUSH` on its acknowledgement list, kept 60 s).
    pub async fn ack_purge(&self, id: u64, memory_entries_purged: u64) {
        let mut conn = self.connection();
        let key = self.acks_key(id);
        let _ = self
            .guarded("set", async move {
                redis::pipe()
                    .rpush(&key, memory_entries_purged)
                    .expire(&key, 60)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await;
    }

    /// Waits up to `limit` for `expected` acknowledgements of purge `id`; returns how many
    /// came and the sum of the memory-tier entries they removed. Uses its own connection
    /// (`BLPOP` blocks it).
    pub async fn wait_acks(&self, id: u64, expected: u64, limit: Duration) -> (u64, u64) {
        let deadline = tokio::time::Instant::now() + limit;
        let key = self.acks_key(id);
        // `BLPOP` blocks for up to `limit`: no per-command response timeout on this
        // connection (redis-rs's default is 500 ms); the `timeout` below bounds each wait.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(None);
        let Ok(Ok(mut conn)) = tokio::time::timeout(
            self.connect_timeout,
            self.home.run(
                self.client
                    .get_multiplexed_async_connection_with_config(&config),
            ),
        )
        .await
        else {
            return (0, 0);
        };
        let mut acknowledged = 0;
        let mut removed = 0u64;
        while acknowledged < expected {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let mut blpop = redis::cmd("BLPOP");
            blpop.arg(&key).arg(left.as_secs_f64().max(0.01));
            let pop = blpop.query_async::<Option<(String, String)>>(&mut conn);
            match tokio::time::timeout(left + self.op_timeout, pop).await {
                Ok(Ok(Some((_, count)))) => {
                    acknowledged += 1;
                    removed = removed.saturating_add(count.parse().unwrap_or(0));
                }
                _ => break,
            }
        }
        (acknowledged, removed)
    }

    /// A pub/sub connection, within the connect timeout.
    pub async fn pubsub(&self) -> Option<redis::aio::PubSub> {
        tokio::time::timeout(
            self.connect_timeout,
            self.home.run(self.client.get_async_pubsub()),
        )
        .await
        .ok()?
        .ok()
    }

    /// Takes the refresh lease of `key` for `ttl` (`SET {prefix}lease:{key} token NX PX`),
    /// so that one replica refreshes a key at a time. `Some(true)`: taken; `Some(false)`:
    /// another replica holds it; `None`: Redis did not answer (the caller goes on alone).
    pub async fn try_lease(&self, key: &CacheKey, ttl: Duration, token: u64) -> Option<bool> {
        let mut conn = self.connection();
        let lease = self.lease_key(key);
        let ms = ttl.as_millis().clamp(1, u128::from(u32::MAX)) as u64;
        self.guarded("set", async move {
            redis::cmd("SET")
                .arg(lease)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(ms)
                .query_async::<Option<String>>(&mut conn)
                .await
        })
        .await
        .map(|reply| reply.is_some())
    }

    /// Gives back the refresh lease of `key` taken with `token`, only if it is still ours
    /// (compare and delete, in one script); failures are counted, never raised.
    pub async fn release_lease(&self, key: &CacheKey, token: u64) {
        let mut conn = self.connection();
        let lease = self.lease_key(key);
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then \
               return redis.call('DEL', KEYS[1]) \
             end \
             return 0",
        );
        let mut invocation = script.key(lease);
        invocation.arg(token.to_string());
        self.guarded("del", async move {
            invocation.invoke_async::<i64>(&mut conn).await
        })
        .await;
    }

    /// Deletes `key` (`DEL`). Returns whether Redis confirmed; failures are counted, never
    /// raised.
    pub async fn del(&self, key: &CacheKey) -> bool {
        let mut conn = self.connection();
        let redis_key = self.redis_key(key);
        self.guarded("del", async move { conn.del::<_, ()>(redis_key).await })
            .await
            .is_some()
    }
}
