//! Background refreshes: a stored entry fetched again from the upstream without holding a
//! client, for stale-while-revalidate (RFC 5861 §3), refresh-ahead and hot keys.
//!
//! A refresh replays the request that found the entry ([`Replay`]) through the request
//! path with the [`Refresh`] mark: the lookup is skipped, the fetch is coalesced with any
//! request in flight for the key, and the answer is stored by the usual rules. The
//! [`Refresher`] queues at most one refresh per key at a time, runs a bounded number at
//! once on detached tasks ([`run_refreshes`]), and abandons one that outlives its timeout,
//! so that a later request can start it again.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderMap, Method, Request, Uri, Version, header};
use std::panic::AssertUnwindSafe;
use tokio::sync::{mpsc, watch};

use super::Proxy;
use super::body::{self, ProxyBody};
use super::origin::Origin;
use crate::metrics::Metrics;
use crate::warm::{HotKeys, WarmOutcome};
use cachegate_core::key::CacheKey;

/// Refreshes waiting for a slot, at most; beyond, a refresh is skipped.
const QUEUE_LEN: usize = 1024;

/// The largest body a [`Replay`] keeps, in bytes: requests with larger bodies are not
/// refreshed in the background (their next request after expiry is a miss).
pub const MAX_REPLAY_BODY_BYTES: usize = 64 << 10;

/// How much longer than a refresh's time limit a replica holds the key's refresh lease in
/// Redis (see [`cachegate_core::store::TieredStore::try_refresh_lease`]).
const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// Clears a key from the pending refreshes when dropped.
struct PendingGuard<'a> {
    refresher: &'a Refresher,
    key: CacheKey,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.refresher.done(&self.key);
    }
}

/// What a refresh sends: the parts of a request its cache key covers, and nothing else, so
/// that no header outside the key shapes what is stored for everyone. Held in memory only,
/// never logged.
#[derive(Debug)]
pub struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    client: SocketAddr,
}

impl Replay {
    /// Keeps what a refresh of this request needs, as the request path holds it once keyed
    /// (normalized path, query reduced to the keyed parameters): method, target, `Host`,
    /// `Content-Type` with the keyed `body`, the route's `key_headers`, the forwarded-origin
    /// headers (keyed for trusted peers) and the client's address (forwarding rules depend
    /// on it). `None` for a body over [`MAX_REPLAY_BODY_BYTES`].
    pub fn keyed(
        parts: &http::request::Parts,
        key_headers: &[String],
        body: Bytes,
        client: SocketAddr,
    ) -> Option<Self> {
        if body.len() > MAX_REPLAY_BODY_BYTES {
            return None;
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &parts.headers {
            let n = name.as_str();
            let kept = name == header::HOST
                || (name == header::CONTENT_TYPE && !body.is_empty())
                || key_headers.iter().any(|h| h == n)
                || super::headers::is_origin_fact(n)
                || name == header::FORWARDED;
            if kept {
                headers.append(name.clone(), value.clone());
            }
        }
        Some(Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers,
            body,
            client,
        })
    }

    /// Bytes the copy holds (headers, target and body), for memory budgets.
    pub fn size_bytes(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        headers + self.uri.to_string().len() + self.body.len() + 128
    }

    /// The client the request came from.
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// The request again, marked as a [`Refresh`].
    pub fn to_request(&self) -> Request<ProxyBody> {
        let mut req = Request::new(body::full(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req.extensions_mut().insert(Refresh(()));
        req
    }
}

/// Marks a request as a refresh: the request path skips the lookup and fetches from the
/// upstream (still one request per key), and does not count it as a hot-key request.
/// Only cachegate makes one (its field is private); a client cannot.
#[derive(Debug, Clone, Copy)]
pub struct Refresh(());

/// One queued refresh.
struct Job {
    key: CacheKey,
    /// When the entry to refresh was stored: a newer one makes the job moot.
    stored_at_ms: u64,
    replay: Arc<Replay>,
    /// The route's hot keys when it is a hot key's refresh (told when it stores nothing).
    hot: Option<Arc<HotKeys>>,
    /// Remove the entry when the refresh stores nothing (a soft-purged entry).
    remove_if_not_refreshed: bool,
}

/// The queue of background refreshes, one per key at a time.
pub struct Refresher {
    tx: mpsc::Sender<Job>,
    rx: Mutex<Option<mpsc::Receiver<Job>>>,
    /// Keys queued or being refreshed.
    pending: Mutex<HashSet<CacheKey>>,
    /// [`run_refreshes`] is running: without it nothing is refreshed in the background.
    running: AtomicBool,
    /// Refreshes at once.
    limit: usize,
    /// How long one refresh may take before it is abandoned.
    timeout: Duration,
}

impl Refresher {
    /// A queue whose worker runs `limit` refreshes at once (at least 1), each abandoned
    /// after `timeout`.
    pub fn new(limit: usize, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        Refresher {
            tx,
            rx: Mutex::new(Some(rx)),
            pending: Mutex::new(HashSet::new()),
            running: AtomicBool::new(false),
            limit: limit.max(1),
            timeout,
        }
    }

    /// Asks for a background refresh of `key`; `replay` copies the request to refresh it
    /// with, only when a refresh is queued (`None`: it cannot be). Returns whether `key`
    /// will be refreshed: queued now or already pending. `false` when nothing refreshes in
    /// the background (no worker), the queue is full or the request cannot be copied: the
    /// caller then treats the entry as it would without background refreshes.
    /// `stored_at_ms`: when the entry to refresh was stored (0: none); the refresh is
    /// skipped if a newer one is stored by the time it runs. `hot`: the route's hot keys,
    /// for a hot key's refresh.
    pub fn request(
        &self,
        key: &CacheKey,
        stored_at_ms: u64,
        replay: impl FnOnce() -> Option<Arc<Replay>>,
        hot: Option<Arc<HotKeys>>,
    ) -> bool {
        self.request_job(key, stored_at_ms, replay, hot, false)
    }

    /// Like [`Refresher::request`], for an entry a soft purge marked stale: removed when
    /// its refresh stores nothing, so that it is not served stale for the rest of its life.
    pub fn request_after_soft_purge(
        &self,
        key: &CacheKey,
        stored_at_ms: u64,
        replay: impl FnOnce() -> Option<Arc<Replay>>,
    ) -> bool {
        self.request_job(key, stored_at_ms, replay, None, true)
    }

    fn request_job(
        &self,
        key: &CacheKey,
        stored_at_ms: u64,
        replay: impl FnOnce() -> Option<Arc<Replay>>,
        hot: Option<Arc<HotKeys>>,
        remove_if_not_refreshed: bool,
    ) -> bool {
        if !self.running.load(Ordering::Acquire) {
            return false;
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.contains(key) {
            return true;
        }
        let Some(replay) = replay() else {
            return false;
        };
        let job = Job {
            key: *key,
            stored_at_ms,
            replay,
            hot,
            remove_if_not_refreshed,
        };
        match self.tx.try_send(job) {
            Ok(()) => {
                pending.insert(*key);
                true
            }
            Err(_) => false,
        }
    }

    fn done(&self, key: &CacheKey) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }
}

/// Runs `proxy`'s background refreshes until `shutdown` turns true: at most the
/// refresher's limit at once, each replayed through [`Proxy::handle`] once this replica
/// holds the key's refresh lease (replicas sharing Redis take turns; a key another
/// replica is refreshing is skipped), and abandoned after its timeout. Counted in
/// `background_refreshes_total{outcome}` (`hot_key_refreshes_total` for hot keys; a
/// skipped one is not counted). Call once per proxy (a second call returns at once).
pub async fn run_refreshes<O: Origin>(
    proxy: Arc<Proxy<O>>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let refresher = proxy.refresher();
    let Some(rx) = refresher
        .rx
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    else {
        return;
    };
    refresher.running.store(true, Ordering::Release);
    let work = tokio_stream_of(rx).for_each_concurrent(refresher.limit, |job| {
        let proxy = &proxy;
        let metrics = &metrics;
        async move {
            let refresher = proxy.refresher();
            // Cleared however the job ends (a panic included): the key can be asked for
            // again.
            let _pending = PendingGuard {
                refresher,
                key: job.key,
            };
            // Refreshed since it was asked for, here or by another replica (a request that
            // found the old entry just before the refresh landed asks again): nothing to do.
            if job.stored_at_ms > 0 && proxy.stored_since(&job.key, job.stored_at_ms).await {
                return;
            }
            // The lease outlives the refresh's own time limit, so that no other replica
            // starts the same refresh meanwhile.
            // A random token, so that a replica only ever releases its own lease.
            let token = cachegate_core::random_id();
            let lease = refresher.timeout + LEASE_MARGIN;
            if !proxy.try_refresh_lease(&job.key, lease, token).await {
                return;
            }
            // Asked again under the lease: a replica that held it until just now has
            // stored its refresh in Redis before giving it back.
            if job.stored_at_ms > 0 && proxy.stored_since(&job.key, job.stored_at_ms).await {
                proxy.release_refresh_lease(&job.key, token).await;
                return;
            }
            let resp = AssertUnwindSafe(proxy.handle(job.replay.to_request(), job.replay.client))
                .catch_unwind();
            let outcome = match tokio::time::timeout(refresher.timeout, resp).await {
                Ok(Ok(resp)) => Ok(WarmOutcome::of(&resp)),
                Ok(Err(_panic)) => {
                    metrics.panics.inc();
                    Err("failed")
                }
                Err(_) => Err("timeout"),
            };
            let label = outcome.as_ref().map_or_else(|e| *e, WarmOutcome::label);
            let refreshed = matches!(outcome, Ok(WarmOutcome::Stored | WarmOutcome::Fresh));
            match &job.hot {
                Some(hot) => {
                    metrics.hot_key_refreshes.inc(label);
                    if !refreshed {
                        hot.mark_failed(&job.key);
                    }
                }
                None => metrics.background_refreshes.inc(label),
            }
            if job.remove_if_not_refreshed && !refreshed {
                // A soft-purged entry the upstream no longer gives a storable answer for:
                // not served stale any longer.
                proxy.remove_entry(&job.key).await;
            }
            proxy.release_refresh_lease(&job.key, token).await;
        }
    });
    tokio::select! {
        () = work => {}
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
    refresher.running.store(false, Ordering::Release);
}

/// The receiver as a stream.
fn tokio_stream_of<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::headers::forwarded_origin;
    use crate::test_support::header_map;

    /// A refresh sends what the key was made of: every header a trusted proxy's forwarded
    /// origin is keyed by, none other (else the refresh lands under another key).
    #[test]
    fn a_replay_keeps_exactly_the_keyed_origin_headers() {
        let pairs: [(&'static str, &'static str); 10] = [
            ("x-forwarded-host", "a.example"),
            ("forwarded-host", "a.example"),
            ("x-scheme", "https"),
            ("x-host", "a.example"),
            ("front-end-https", "on"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("accept", "text/html"),
            ("sec-ch-prefers-color-scheme", "dark"),
            ("forwarded", "host=a.example"),
        ];
        let mut req = Request::new(());
        *req.headers_mut() = header_map(&pairs);
        let (parts, ()) = req.into_parts();
        let client = "10.0.0.1:5000".parse().unwrap();
        let replay = Replay::keyed(&parts, &[], Bytes::new(), client).unwrap();
        let again = replay.to_request();
        for (name, value) in pairs {
            let keyed = forwarded_origin(&header_map(&[(name, value)])).is_some();
            assert_eq!(again.headers().contains_key(name), keyed, "{name}");
        }
        assert_eq!(
            forwarded_origin(again.headers()),
            forwarded_origin(&parts.headers),
            "the same origin is keyed"
        );
    }
}
