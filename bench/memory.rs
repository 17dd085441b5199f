//! Memory-tier budget benchmark: fills the memory tier of an in-process cachegate with
//! `N` tiny distinct entries through real HTTP (a hyper upstream and client in the same
//! process), then prints what the tier counts against `memory_max_bytes` and what the
//! process really holds.
//!
//! Run through `bench/memory.sh`, which builds in release mode and runs one fresh process
//! per size: `cargo bench --bench memory -- ENTRIES MEMORY_MAX_BYTES`.
//!
//! Columns: entries sent; entries held; bytes counted by the tier (its weight); RSS;
//! RSS growth over the warmed-up baseline; real bytes per held entry (growth / held);
//! payload per entry (key + header names and values + body); real overhead per entry
//! beyond that payload.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// The tiny response every entry holds: a 2-byte JSON body and three headers (hyper adds
/// `date`).
const BODY: &[u8] = b"{}";
const CONTENT_TYPE: &str = "application/json";
const CACHE_CONTROL: &str = "max-age=600";

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    // The warm-up's answers go through the upstream and are never stored.
                    let cache_control = if req.uri().path().starts_with("/warm/") {
                        "no-store"
                    } else {
                        CACHE_CONTROL
                    };
                    let resp = Response::builder()
                        .header("content-type", CONTENT_TYPE)
                        .header("cache-control", cache_control)
                        .body(Full::new(Bytes::from_static(BODY)))
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .filter_map(|a| a.parse::<u64>().ok());
    let entries = args.next().unwrap_or(10_000) as usize;
    let max_bytes = args.next().unwrap_or(16 << 20);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run(entries, max_bytes));
}

async fn run(entries: usize, max_bytes: u64) {
    let origin = upstream().await;
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[cache]\nmemory_max_bytes = {max_bytes}\n[upstream]\nurl = \"http://{origin}\"\n"
    );
    let config = cachegate::config::Config::from_toml(&toml, None)
        .unwrap()
        .finish(&Default::default(), |_| None)
        .unwrap();
    let running = cachegate::server::start(config).await.unwrap();
    let base = format!("http://{}", running.listen_addr);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    let client = Arc::new(client);

    // Warm up the 32 client and upstream connections, their buffers and the allocator's
    // per-thread arenas with the same concurrency as the fill (answers marked no-store, so
    // nothing is stored), then take the baseline.
    let fill = |keys: usize, prefix: &'static str| {
        let next = Arc::new(AtomicUsize::new(0));
        (0..32)
            .map(|_| {
                let (client, next, base) = (client.clone(), next.clone(), base.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= keys {
                            break;
                        }
                        let uri = format!("{base}/{prefix}/{i}").parse().unwrap();
                        let resp = client.get(uri).await.unwrap();
                        let _ = resp.into_body().collect().await;
                    }
                })
            })
            .collect::<Vec<_>>()
    };
    for w in fill(20_000, "warm") {
        w.await.unwrap();
    }
    let baseline = rss_bytes();

    let workers = fill(entries, "e");
    for w in workers {
        w.await.unwrap();
    }
    let stats: serde_json::Value = {
        let uri = format!("http://{}/stats", running.admin_addr)
            .parse()
            .unwrap();
        let body = client.get(uri).await.unwrap().into_body().collect().await;
        serde_json::from_slice(&body.unwrap().to_bytes()).unwrap()
    };
    let held = stats["memory"]["entries"].as_u64().unwrap_or(0).max(1);
    let counted = stats["memory"]["bytes"].as_u64().unwrap_or(0);
    let rss = rss_bytes();
    let growth = rss.saturating_sub(baseline);
    // key + header names and values + body, as stored.
    let payload = 32
        + "content-type".len()
        + CONTENT_TYPE.len()
        + "cache-control".len()
        + CACHE_CONTROL.len()
        + "date".len()
        + "Sun, 22 Nov 2026 00:00:00 GMT".len()
        + BODY.len();
    let real_per_entry = growth / held;
    println!(
        "{entries:>9} sent {held:>9} held  counted {:>7.1} MB  rss {:>7.1} MB  growth {:>7.1} MB  real/entry {real_per_entry:>5} B  payload/entry {payload:>3} B  overhead/entry {:>5} B  max {:.1} MB",
        counted as f64 / 1e6,
        rss as f64 / 1e6,
        growth as f64 / 1e6,
        real_per_entry.saturating_sub(payload as u64),
        max_bytes as f64 / 1e6,
    );
    running.shutdown().await;
}
