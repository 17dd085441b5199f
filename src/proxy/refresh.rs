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
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, Uri, Version};
use tokio::sync::{mpsc, watch};

use super::Proxy;
use super::body::{self, ProxyBody};
use super::origin::Origin;
use crate::metrics::Metrics;
use crate::warm::WarmOutcome;
use cachegate_core::key::CacheKey;

/// Refreshes waiting for a slot, at most; beyond, a refresh is skipped.
const QUEUE_LEN: usize = 1024;

/// A request as the request path forwarded it, kept to be sent again. Held in memory only,
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
    /// Keeps a copy of a request: its head as the client sent it (before forwarding rules),
    /// its body (empty, or the keyed JSON body), and the client's address (forwarding
    /// rules depend on it).
    pub fn new(parts: &http::request::Parts, body: Bytes, client: SocketAddr) -> Self {
        Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body,
            client,
        }
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
        req.extensions_mut().insert(Refresh);
        req
    }
}

/// Marks a request as a refresh: the request path skips the lookup and fetches from the
/// upstream (still one request per key), and does not count it as a hot-key request.
/// Only cachegate sets it; a client cannot.
#[derive(Debug, Clone, Copy)]
pub struct Refresh;

/// The queue of background refreshes, one per key at a time.
pub struct Refresher {
    tx: mpsc::Sender<(CacheKey, Replay)>,
    rx: Mutex<Option<mpsc::Receiver<(CacheKey, Replay)>>>,
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
    /// with, only when a refresh is queued. Returns whether `key` will be refreshed: queued
    /// now or already pending. `false` when nothing refreshes in the background (no
    /// worker) or the queue is full: the caller then treats the entry as it would without
    /// background refreshes.
    pub fn request(&self, key: &CacheKey, replay: impl FnOnce() -> Replay) -> bool {
        if !self.running.load(Ordering::Acquire) {
            return false;
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.contains(key) {
            return true;
        }
        match self.tx.try_send((*key, replay())) {
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
/// refresher's limit at once, each replayed through [`Proxy::handle`] and abandoned after
/// its timeout; counted in `background_refreshes_total{outcome}`. Call once per proxy
/// (a second call returns at once).
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
    let work = tokio_stream_of(rx).for_each_concurrent(refresher.limit, |(key, replay)| {
        let proxy = &proxy;
        let metrics = &metrics;
        async move {
            let refresher = proxy.refresher();
            let resp = proxy.handle(replay.to_request(), replay.client);
            let label = match tokio::time::timeout(refresher.timeout, resp).await {
                Ok(resp) => WarmOutcome::of(&resp).label(),
                Err(_) => "timeout",
            };
            metrics.background_refreshes.inc(label);
            refresher.done(&key);
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
