//! Purge-by-tag cost: fills a cache with `N` values carrying one tag (memory tier and a
//! real `redis-server`, two replicas subscribed), then times `invalidate_tags` for that
//! tag until every replica has acknowledged, and checks that the values are misses.
//!
//! Run through `bench/purge.sh`: `cargo bench --bench purge -- N` (default 100000). Starts
//! its own `redis-server` on a free loopback port and stops it by its PID.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cachegate::engine::{Cache, Options, RedisOptions};

struct RedisServer(Child, u16);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server() -> RedisServer {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed");
    // Owned from here on: stopped by its PID whatever happens next.
    let server = RedisServer(child, port);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    for _ in 0..500 {
        if client.get_connection().is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("redis-server did not start");
}

fn replica(port: u16) -> Cache<u64> {
    Cache::builder()
        .namespace("bench-purge")
        .key_secret(b"bench")
        .memory_max_bytes(1 << 30)
        .redis(RedisOptions::new(format!("redis://127.0.0.1:{port}")))
        .build()
        .unwrap()
}

fn main() {
    let entries: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let server = redis_server();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (a, b) = (replica(server.1), replica(server.1));
        while !(a.in_sync() && b.in_sync()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let tagged = Options::default()
            .ttl(Duration::from_secs(3600))
            .tags(["kpi"]);
        // In batches, letting the background Redis writes land (bounded: writes that
        // time out are dropped by design, the purge does not depend on them).
        for batch in (0..entries).collect::<Vec<_>>().chunks(1000) {
            for &i in batch {
                a.set(&format!("k{i}"), i, &tagged).unwrap();
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while a.stats().stores_redis < batch[batch.len() - 1] + 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let in_redis = a.stats().stores_redis;
        assert_eq!(b.get("k0").await, Some(0));
        let started = Instant::now();
        let report = a.invalidate_tags(&["kpi"]).await;
        let elapsed = started.elapsed();
        assert!(report.confirmed(), "{report:?}");
        assert_eq!(a.get(&format!("k{}", entries - 1)).await, None);
        assert_eq!(b.get("k0").await, None);
        println!(
            "entries={entries} in_redis={in_redis} purge_ms={:.2} replicas_acknowledged={} memory_entries_purged={} confirmed={}",
            elapsed.as_secs_f64() * 1000.0,
            report.replicas_acknowledged,
            report.memory_entries_purged,
            report.confirmed()
        );
    });
    drop(server);
}
