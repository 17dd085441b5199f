//! A real HTTP upstream for the tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

/// A real HTTP upstream. Every response is JSON echoing the request, with `n`, a counter
/// that grows with every request the upstream answers, so a cached answer is recognisable.
/// Request headers steer it (they are not part of any cache key unless a test says so):
/// `x-test-status`, `x-test-cache-control`, `x-test-set-cookie`, `x-test-delay-ms`,
/// `x-test-body-bytes` (pads the body to that size), `x-test-vary` (its `Vary`),
/// `x-test-etag` (its `ETag`; a request
/// whose `If-None-Match` matches it gets `304`). A `Range` request gets a `206`.
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    /// Requests being answered now, and the most ever at once.
    in_flight: Arc<(AtomicUsize, AtomicUsize)>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let in_flight = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let flights = in_flight.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                let flights = flights.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let counter = counter.clone();
                        let flights = flights.clone();
                        async move {
                            let now = flights.0.fetch_add(1, Ordering::SeqCst) + 1;
                            flights.1.fetch_max(now, Ordering::SeqCst);
                            let resp = answer(req, &counter).await;
                            flights.0.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            hits,
            in_flight,
        }
    }

    /// Requests the upstream is answering now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.0.load(Ordering::SeqCst)
    }

    /// The most requests the upstream was answering at once.
    pub fn max_in_flight(&self) -> usize {
        self.in_flight.1.load(Ordering::SeqCst)
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn answer(req: Request<Incoming>, counter: &AtomicUsize) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = header("x-test-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
        .collect();
    let mut doc = json!({
        "n": n,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "body": String::from_utf8_lossy(&body),
        "headers": headers,
    })
    .to_string();
    if let Some(size) = header("x-test-body-bytes").and_then(|v| v.parse::<usize>().ok()) {
        while doc.len() < size {
            doc.push(' ');
        }
    }
    let etag = header("x-test-etag");
    if let Some(tag) = etag.filter(|tag| header("if-none-match") == Some(*tag)) {
        let resp = Response::builder().status(304).header("etag", tag);
        return resp.body(Full::new(Bytes::new())).unwrap();
    }
    if header("range").is_some() {
        let resp = Response::builder()
            .status(206)
            .header("content-range", format!("bytes 0-0/{}", doc.len()));
        return resp
            .body(Full::new(Bytes::from(doc[..1].to_string())))
            .unwrap();
    }
    let mut resp = Response::builder()
        .status(
            header("x-test-status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(200u16),
        )
        .header("content-type", "application/json");
    if let Some(etag) = etag {
        resp = resp.header("etag", etag);
    }
    if let Some(cc) = header("x-test-cache-control") {
        resp = resp.header("cache-control", cc);
    }
    if let Some(cookie) = header("x-test-set-cookie") {
        resp = resp.header("set-cookie", cookie);
    }
    if let Some(vary) = header("x-test-vary") {
        resp = resp.header("vary", vary);
    }
    if let Some(keys) = header("x-test-surrogate-key") {
        resp = resp.header("surrogate-key", keys);
    }
    if let Some(tags) = header("x-test-cache-tag") {
        resp = resp.header("cache-tag", tags);
    }
    resp.body(Full::new(Bytes::from(doc))).unwrap()
}
