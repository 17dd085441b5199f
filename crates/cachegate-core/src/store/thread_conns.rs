//! Per-thread Redis connections for the Redis tier's reads on lasting threads
//! ([`crate::home::mark_thread_lasting`]: cachegate's connection threads).
//!
//! A read through the tier's shared connection crosses threads twice: the request's
//! thread hands the command to the connection's driver task on the home runtime, and the
//! driver hands the reply back, each a wake-up of another thread (on a 2-core machine
//! measured at about a tenth of a Redis-tier hit's CPU time). A connection of the
//! thread's own, whose driver runs on the same single-threaded runtime as the requests,
//! costs neither, and pipelines the reads of that thread's connections.
//!
//! Such a connection is made in the background at a thread's first read (within the
//! connect timeout); until it is up, reads use the shared connection. A thread's
//! connection is dropped, and its reads go to the shared connection for a while (the
//! breaker's cool-down) before a new one is made, when it times out or fails as a
//! connection (an I/O error, a dropped connection: it may have died without a reset); a
//! server's error reply (`LOADING`, `NOPERM`) leaves it in place. A read that found its
//! connection lost (a connection's failure; not a timeout, not an error reply) is made
//! again through the shared connection within the same deadline, when a quarter of it is
//! left ([`crate::store::RedisTier::get`]). Every thread's
//! connection is also replaced after the breaker opened ([`ThreadConnections::replace_all`]):
//! after Redis went away (restarted, failed over to another host) each thread starts
//! afresh instead of finding out on its own, each with a failure that would count against
//! the breaker.
//!
//! Each operation is bounded by the tier's timeout around it (one timer per operation;
//! the connection has no response timeout of its own). Tokio's timer driver wakes its
//! event loop (an `eventfd` write) whenever a timer is set to expire before the earliest
//! one it knew of when the loop last went idle: a thread that went idle between requests
//! with only far-off timers (header and send timeouts of seconds) would do so at nearly
//! every read (measured: one extra system call per Redis-tier hit). A *pacer* on each
//! reading thread, a timer re-armed every operation timeout for as long as reads go on
//! (it stops after a period without any), keeps such an earlier timer in place.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

use crate::metrics::StoreMetrics;

/// The name a per-thread read connection gives itself (`CLIENT SETNAME`), so that
/// `CLIENT LIST` tells them from the tier's shared connection.
pub const THREAD_CONNECTION_NAME: &str = "cachegate-thread-read";

/// One tier's per-thread connections. Cloning shares them.
#[derive(Clone)]
pub(super) struct ThreadConnections {
    /// Tells this tier's slots from other tiers' (and from those of tiers gone), and the
    /// generation a slot's connection must be of.
    shared: Arc<Shared>,
    client: redis::Client,
    config: AsyncConnectionConfig,
    op_timeout: Duration,
    connect_timeout: Duration,
    /// How long after a failed connection a thread uses the shared one before trying again.
    retry_after: Duration,
    /// `redis_thread_connections`; failed connects in `redis_errors{op="connect"}`.
    metrics: StoreMetrics,
}

struct Shared {
    /// Bumped by [`ThreadConnections::replace_all`].
    generation: AtomicU64,
    /// Numbers the connections, so that a late failure of one retires no other.
    next_id: AtomicU64,
}

thread_local! {
    /// This thread's connections, one per tier (usually one tier per process).
    static SLOTS: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

struct Slot {
    /// The tier; a slot whose tier is gone is dropped at this thread's next read.
    owner: Weak<Shared>,
    generation: u64,
    /// Shared with the task that connects.
    state: Arc<Mutex<State>>,
    pacer: Arc<Pacer>,
}

enum State {
    Connecting,
    Ready(Open),
    Failed { retry_at: Instant },
}

impl State {
    /// Failed now: tried again `retry_after` from now.
    fn failed_for(retry_after: Duration) -> Self {
        State::Failed {
            retry_at: Instant::now() + retry_after,
        }
    }
}

/// An open connection, counted in `redis_thread_connections` until dropped.
struct Open {
    conn: MultiplexedConnection,
    id: u64,
    open: Gauge,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The reads of a thread's connection and whether its pacer (see the module docs) runs.
#[derive(Default)]
struct Pacer {
    reads: AtomicU64,
    running: AtomicBool,
}

/// What ended a Redis operation that failed.
#[derive(Clone, Copy)]
pub(super) enum OpFailure<'a> {
    /// No answer within the operation timeout.
    TimedOut,
    /// The operation failed.
    Error(&'a redis::RedisError),
}

impl OpFailure<'_> {
    /// Whether it says something about the connection: a timeout (it may have died
    /// without a reset), an I/O error, a dropped or unusable connection; not an error reply
    /// of a server that answered (`LOADING`, `NOPERM`, `OOM`).
    pub(super) fn is_connection_failure(self) -> bool {
        match self {
            OpFailure::TimedOut => true,
            OpFailure::Error(e) => {
                e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error()
            }
        }
    }
}

impl ThreadConnections {
    /// Connections to `client`'s server whose operations the caller limits to
    /// `op_timeout`, each connect limited to `connect_timeout`; a thread whose connection
    /// failed waits `retry_after` before it tries again. Open connections are counted in
    /// `metrics.redis_thread_connections`, failed connects in `redis_errors{op="connect"}`.
    pub(super) fn new(
        client: redis::Client,
        op_timeout: Duration,
        connect_timeout: Duration,
        retry_after: Duration,
        metrics: StoreMetrics,
    ) -> Self {
        ThreadConnections {
            shared: Arc::new(Shared {
                generation: AtomicU64::new(0),
                next_id: AtomicU64::new(0),
            }),
            client,
            // No response timeout: the caller's bounds each operation, sending included.
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(None),
            op_timeout,
            connect_timeout,
            retry_after,
            metrics,
        }
    }

    /// The calling thread's connection and its id, when the thread is lasting and its
    /// connection is up. Otherwise `None` (use the shared connection); on a lasting thread
    /// without a current connection, one is started in the background (unless one is being
    /// made, or the last attempt failed less than `retry_after` ago).
    pub(super) fn here(&self) -> Option<(MultiplexedConnection, u64)> {
        if !crate::home::thread_is_lasting() {
            return None;
        }
        let generation = self.shared.generation.load(Ordering::Acquire);
        SLOTS.with_borrow_mut(|slots| {
            // Slots of tiers gone (usually there are none: one tier, one slot).
            slots.retain(|slot| slot.owner.strong_count() > 0);
            let at = match slots.iter().position(|slot| self.owns(slot)) {
                Some(at) if slots[at].generation == generation => at,
                Some(at) => {
                    // Replaced: the old connection is dropped (its driver ends).
                    slots[at] = self.connect(generation);
                    return None;
                }
                None => {
                    slots.push(self.connect(generation));
                    return None;
                }
            };
            let slot = &slots[at];
            let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
            match &*state {
                State::Ready(open) => {
                    let conn = (open.conn.clone(), open.id);
                    drop(state);
                    self.pace(&slot.pacer);
                    Some(conn)
                }
                State::Connecting => None,
                State::Failed { retry_at } if Instant::now() < *retry_at => None,
                State::Failed { .. } => {
                    *state = State::Connecting;
                    drop(state);
                    self.spawn_connect(slot.state.clone());
                    None
                }
            }
        })
    }

    /// Reports that an operation on the calling thread's connection `id` failed: a
    /// timeout or a connection's failure drops the connection (if it is still the
    /// thread's), reads go to the shared connection for `retry_after`, then a new
    /// connection is made. A server's error reply leaves it in place.
    pub(super) fn failed_here(&self, id: u64, failure: OpFailure<'_>) {
        if !failure.is_connection_failure() {
            return;
        }
        SLOTS.with_borrow_mut(|slots| {
            if let Some(slot) = slots.iter().find(|slot| self.owns(slot)) {
                let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
                if matches!(&*state, State::Ready(open) if open.id == id) {
                    *state = State::failed_for(self.retry_after);
                }
            }
        });
    }

    /// Makes every thread replace its connection at its next read (called when the
    /// breaker opens).
    pub(super) fn replace_all(&self) {
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn owns(&self, slot: &Slot) -> bool {
        std::ptr::eq(slot.owner.as_ptr(), Arc::as_ptr(&self.shared))
    }

    fn connect(&self, generation: u64) -> Slot {
        let state = Arc::new(Mutex::new(State::Connecting));
        self.spawn_connect(state.clone());
        Slot {
            owner: Arc::downgrade(&self.shared),
            generation,
            state,
            pacer: Arc::default(),
        }
    }

    /// Counts a read and starts the thread's pacer if it is not running.
    fn pace(&self, pacer: &Arc<Pacer>) {
        pacer.reads.fetch_add(1, Ordering::Relaxed);
        if pacer.running.swap(true, Ordering::Relaxed) {
            return;
        }
        let (pacer, period) = (pacer.clone(), self.op_timeout);
        tokio::spawn(async move {
            let mut seen = pacer.reads.load(Ordering::Relaxed);
            loop {
                tokio::time::sleep(period).await;
                let reads = pacer.reads.load(Ordering::Relaxed);
                if reads == seen {
                    // A read from here on starts another (this runs on the reading
                    // thread: no read comes between the load and the store).
                    pacer.running.store(false, Ordering::Relaxed);
                    return;
                }
                seen = reads;
            }
        });
    }

    /// Connects on this thread's runtime (a lasting thread has one; without one, the slot
    /// is marked failed).
    fn spawn_connect(&self, state: Arc<Mutex<State>>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            *state.lock().unwrap_or_else(PoisonError::into_inner) =
                State::failed_for(self.retry_after);
            return;
        };
        let (client, config) = (self.client.clone(), self.config.clone());
        let (limit, retry_after) = (self.connect_timeout, self.retry_after);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let metrics = self.metrics.clone();
        runtime.spawn(async move {
            let connect = async {
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                // Named for `CLIENT LIST`; a server that refuses the name (an ACL) is no
                // reason not to use the connection.
                let _ = redis::cmd("CLIENT")
                    .arg("SETNAME")
                    .arg(THREAD_CONNECTION_NAME)
                    .query_async::<()>(&mut conn)
                    .await;
                redis::RedisResult::Ok(conn)
            };
            let next = match tokio::time::timeout(limit, connect).await {
                Ok(Ok(conn)) => {
                    let open = metrics.redis_thread_connections.clone();
                    open.inc();
                    State::Ready(Open { conn, id, open })
                }
                failed => {
                    metrics.redis_errors.inc("connect");
                    match failed {
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "redis tier: thread connection failed")
                        }
                        _ => tracing::debug!("redis tier: thread connection timed out"),
                    }
                    State::failed_for(retry_after)
                }
            };
            let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
            // Only the attempt this slot waits for fills it.
            if matches!(*state, State::Connecting) {
                *state = next;
            }
        });
    }
}
