//! The hit-path benchmark's baseline (`bench/hit_path.sh`): a bare hyper 1.x HTTP/1.1
//! server that answers every request with one stored response, fetched once from the
//! benchmark's origin at start, with the status headers a cachegate hit carries. No cache,
//! no routing, no keys: what serving a stored response costs in the HTTP stack alone.
//!
//! ```sh
//! cargo run --release --example bare_hyper -- 127.0.0.1:8090 http://127.0.0.1:8000/kpi/revenue
//! ```
//!
//! With `--origin`, it answers with the origin's response as it is (no status headers): a
//! fast origin for `bench/scale.sh`, which fills a million keys. With `--pinned`, each
//! connection is served on one thread with its own event loop, as many threads as
//! cachegate starts by default (the thread set its proxy listener uses,
//! [`cachegate::server::ConnThreads`]), instead of Tokio's shared work-stealing runtime.
//! With `--work-ns=N`, each request first keeps its thread busy for N nanoseconds (a
//! spin), standing in for a handler's own work: how much each runtime model loses to
//! per-request work on this machine (see docs/benchmarks.md).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(origin)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_hyper LISTEN_ADDR ORIGIN_URL [--origin] [--pinned] [--work-ns=N]");
        std::process::exit(2);
    };
    let flags: Vec<String> = args.collect();
    let as_origin = flags.iter().any(|f| f == "--origin");
    let work_ns: u64 = match flags.iter().find_map(|f| f.strip_prefix("--work-ns=")) {
        Some(n) => n.parse()?,
        None => 0,
    };
    let pinned = flags.iter().any(|f| f == "--pinned").then(|| {
        let n = cachegate::config::ServerConfig::default().connection_threads() as u32;
        cachegate::server::ConnThreads::start(n, |_| Default::default())
    });
    let pinned = pinned.transpose()?;
    let listen: SocketAddr = listen.parse()?;
    // The stored response: the origin's answer, once.
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client.get(origin.parse()?).await?;
    let status = resp.status();
    let mut headers: HeaderMap = resp.headers().clone();
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
    ] {
        headers.remove(name);
    }
    if !as_origin {
        headers.insert(header::AGE, HeaderValue::from_static("0"));
        headers.insert(
            "cache-status",
            HeaderValue::from_static("cachegate; hit; ttl=3599; detail=memory"),
        );
        headers.insert("x-cache-status", HeaderValue::from_static("HIT"));
    }
    let body = resp.into_body().collect().await?.to_bytes();

    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let (headers, body) = (headers.clone(), body.clone());
        let serve = move |stream, slot| async move {
            let _slot = slot;
            let service = service_fn(move |_req| {
                if work_ns > 0 {
                    let start = std::time::Instant::now();
                    while start.elapsed().as_nanos() < u128::from(work_ns) {
                        std::hint::spin_loop();
                    }
                }
                let mut resp = Response::new(Full::new(body.clone()));
                *resp.status_mut() = status;
                *resp.headers_mut() = headers.clone();
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        };
        match &pinned {
            None => drop(tokio::spawn(serve(stream, None))),
            Some(threads) => match stream.into_std() {
                Ok(stream) => threads.spawn(stream, |s, slot| serve(s, Some(slot))),
                Err(e) => eprintln!("could not hand a connection over: {e}"),
            },
        }
    }
}
