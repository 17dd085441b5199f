//! `get_or_set` against its floor and its hand-written alternative, in one run:
//!
//! - `memory_hit/*`: a warm key. `cachegate` is `Cache::get_or_set` (keyed BLAKE3 of the
//!   key, memory-tier lookup, freshness check, clone of the value); `moka` is
//!   `moka::future::Cache::get_with` on the same value, the floor.
//! - `redis_hit/*`: every call a Redis `GET` (a replica that has not seen the key).
//!   `cachegate` runs with its memory tier off, so each call opens a sealed envelope and
//!   decodes it; `moka_redis` is a hand-written moka + redis-rs: moka miss (capacity 0),
//!   `GET`, postcard decode, no authentication.
//!
//! Run: `cargo bench -p cachegate-core --bench get_or_set`. The Redis rows start their own
//! `redis-server` on a free loopback port (skipped when it is not installed) and stop it
//! by its PID at the end.

use std::hint::black_box;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cachegate_core::{Cache, Options, RedisOptions};
use criterion::{Criterion, criterion_group, criterion_main};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Chart {
    sun: String,
    moon: String,
    ascendant: String,
    houses: Vec<f64>,
}

fn chart() -> Chart {
    Chart {
        sun: "Sagittarius 17.9".into(),
        moon: "Capricorn 4.2".into(),
        ascendant: "Virgo 28.1".into(),
        houses: (0..12).map(|h| f64::from(h) * 30.0 + 1.5).collect(),
    }
}

const KEY: &str = "natal:1815-12-10T12:00:51.5074:-0.1278";

fn compute() -> std::future::Ready<Result<Chart, std::io::Error>> {
    std::future::ready(Ok(chart()))
}

fn memory_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ours: Cache<Chart> = rt.block_on(async {
        let cache = Cache::builder().key_secret(b"bench").build().unwrap();
        cache
            .get_or_set(KEY, &Options::default(), compute)
            .await
            .unwrap();
        cache
    });
    let options = Options::default();
    let moka: moka::future::Cache<String, Chart> = moka::future::Cache::new(10_000);
    rt.block_on(moka.insert(KEY.to_string(), chart()));
    let mut group = c.benchmark_group("memory_hit");
    group.bench_function("cachegate", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(ours.get_or_set(KEY, &options, compute).await.unwrap()) })
    });
    group.bench_function("moka", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(moka.get_with(KEY.to_string(), async { chart() }).await) })
    });
    group.finish();
}

/// A `redis-server` on a free port, stopped by its PID when dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> Option<RedisServer> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = RedisServer { child, port };
        let client = redis::Client::open(server.url()).ok()?;
        for _ in 0..200 {
            if client.get_connection().is_ok() {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_hit(c: &mut Criterion) {
    let Some(server) = RedisServer::start() else {
        eprintln!("redis-server not available: redis_hit rows skipped");
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let options = Options::default().ttl(Duration::from_secs(3600));
    let ours: Cache<Chart> = rt.block_on(async {
        let cache = Cache::builder()
            .key_secret(b"bench")
            .memory_max_bytes(0)
            .redis(RedisOptions::new(server.url()))
            .build()
            .unwrap();
        cache.get_or_set(KEY, &options, compute).await.unwrap();
        // The Redis write is in the background: wait for it.
        while cache.stats().stores_redis == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cache
    });
    // The hand-written alternative: moka in front (capacity 0: every call misses it), then
    // a multiplexed redis-rs connection and postcard.
    let (moka, conn) = rt.block_on(async {
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let bytes = postcard::to_stdvec(&chart()).unwrap();
        let _: () = conn.set_ex("baseline:chart", bytes, 3600).await.unwrap();
        (moka::future::Cache::<String, Chart>::new(0), conn)
    });
    let mut group = c.benchmark_group("redis_hit");
    group.bench_function("cachegate", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(ours.get_or_set(KEY, &options, compute).await.unwrap()) })
    });
    group.bench_function("moka_redis", |b| {
        b.to_async(&rt).iter(|| async {
            let cached = moka.get("baseline:chart").await;
            let value = match cached {
                Some(v) => v,
                None => {
                    let mut conn = conn.clone();
                    let bytes: Vec<u8> = conn.get("baseline:chart").await.unwrap();
                    let v: Chart = postcard::from_bytes(&bytes).unwrap();
                    moka.insert("baseline:chart".to_string(), v.clone()).await;
                    v
                }
            };
            black_box(value)
        })
    });
    group.finish();
    assert_eq!(
        ours.stats().hits_memory,
        0,
        "every cachegate call must go to Redis"
    );
    drop(server);
}

criterion_group!(benches, memory_hit, redis_hit);
criterion_main!(benches);
