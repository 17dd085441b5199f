//! The shared Redis tier against a real `redis-server` started on a free port: sharing
//! between processes, corrupt entries, and Redis failing (paused, killed, restarted).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Gate, GateProcess, Redis, Upstream, eventually};
use redis::AsyncCommands;

const ROUTES: &str = r#"
[[routes]]
method = "POST"
path = "/api/natal/chart"
ttl_secs = 60
key_body = true

[[routes]]
method = "GET"
path = "/kpi/*"
ttl_secs = 60
"#;

fn process_config(up: &Upstream, redis: &Redis) -> String {
    format!(
        "{ROUTES}\n[upstream]\nurl = \"{}\"\n[redis]\nurl = \"{}\"\n",
        up.url(),
        redis.url()
    )
}

#[tokio::test]
async fn two_processes_share_one_redis() {
    let up = Upstream::start().await;
    let redis = Redis::start().await;
    let first = GateProcess::start(&process_config(&up, &redis)).await;
    let second = GateProcess::start(&process_config(&up, &redis)).await;
    let client = common::client();
    let body = r#"{"name":"Ada","date":"1815-12-10","lat":51.5}"#;
    let post = |base: &str| {
        client
            .post(format!("{base}/api/natal/chart"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let miss = common::Reply::from(post(&first.base).await.unwrap()).await;
    assert_eq!(miss.cache(), "MISS");
    // The write to Redis happens after the response: wait for it to land.
    let stored = eventually(Duration::from_secs(5), || async {
        !redis.keys("cachegate:v2:*").await.is_empty()
    })
    .await;
    assert!(stored, "entry never reached redis");
    let hit = common::Reply::from(post(&second.base).await.unwrap()).await;
    assert_eq!(hit.cache(), "HIT");
    assert!(
        hit.header("cache-status").ends_with("detail=redis"),
        "{}",
        hit.header("cache-status")
    );
    assert_eq!(hit.body, miss.body);
    // The Redis hit filled the second process's memory tier.
    let again = common::Reply::from(post(&second.base).await.unwrap()).await;
    assert!(again.header("cache-status").ends_with("detail=memory"));
    assert_eq!(up.hits(), 1);
    // Keys hold no raw request data.
    for key in redis.keys("*").await {
        assert!(!key.contains("Ada") && !key.contains("natal"), "{key}");
    }
}

#[tokio::test]
async fn forged_copied_tampered_or_corrupt_entries_are_misses_and_counted() {
    let up = Upstream::start().await;
    let redis = Redis::start().await;
    let writer = Gate::start(&up, Some(&redis), ROUTES).await;
    assert_eq!(writer.get("/kpi/a").await.cache(), "MISS");
    assert_eq!(writer.get("/kpi/b").await.cache(), "MISS");
    assert!(
        eventually(Duration::from_secs(5), || async {
            redis.keys("cachegate:v2:*").await.len() == 2
        })
        .await
    );
    let mut conn = redis.connection().await;
    let keys = redis.keys("cachegate:v2:*").await;
    // Sealed by default: nothing of the response is readable in Redis.
    for key in &keys {
        let envelope: Vec<u8> = conn.get(key).await.unwrap();
        assert!(
            !envelope.windows(6).any(|w| w == b"\"path\""),
            "readable entry"
        );
        assert!(!envelope.windows(4).any(|w| w == b"/kpi"), "readable entry");
    }
    // Each attack on a fresh reader (empty memory tier) must be a miss and counted.
    let attacks: Vec<(&str, Vec<u8>)> = {
        let a: Vec<u8> = conn.get(&keys[0]).await.unwrap();
        let b: Vec<u8> = conn.get(&keys[1]).await.unwrap();
        let mut tampered = a.clone();
        let i = tampered.len() - 20;
        tampered[i] ^= 1;
        // A well-formed envelope for this key, written with another secret.
        let forger = cachegate::engine::envelope::EnvelopeKeys::new(b"not-the-secret", false);
        let entry = cachegate::entry::CachedResponse::new(
            http::StatusCode::OK,
            &http::HeaderMap::new(),
            b"{\"n\":999}",
            cachegate::entry::now_ms(),
            cachegate::entry::Freshness::ttl(60),
            &["kpi"],
        );
        let hex = keys[0].rsplit(':').next().unwrap();
        let mut raw = [0u8; 32];
        for (i, byte) in raw.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        let payload = cachegate::engine::store::Storable::to_payload(&entry);
        let forged = forger
            .seal(&cachegate::key::CacheKey(raw), &payload)
            .to_vec();
        vec![
            ("copied from another key", b),
            ("tampered", tampered),
            ("forged", forged),
            ("garbage", b"\x02\x01garbage".to_vec()),
        ]
    };
    let genuine: Vec<u8> = conn.get(&keys[0]).await.unwrap();
    for (what, bytes) in attacks {
        let _: () = conn.set(&keys[0], bytes).await.unwrap();
        let reader = Gate::start(&up, Some(&redis), ROUTES).await;
        let before = up.hits();
        let (a, b) = (reader.get("/kpi/a").await, reader.get("/kpi/b").await);
        let misses = [&a, &b].iter().filter(|r| r.cache() == "MISS").count();
        assert_eq!(misses, 1, "{what}: exactly the attacked key misses");
        assert!(a.n() != 999 && b.n() != 999, "{what}: forged body served");
        assert_eq!(up.hits(), before + 1, "{what}");
        assert_eq!(
            reader.stats().await["redis"]["rejected_entries"],
            1,
            "{what}"
        );
        // Put the genuine entry back for the next attack.
        let _: () = conn.set(&keys[0], genuine.clone()).await.unwrap();
    }
}

/// Sends requests over 50 keys until `stop` is set (at most 5000); every one must be a
/// 200 from the upstream or the cache. Counts what it sent in `sent`.
async fn load(gate: Arc<Gate>, stop: Arc<AtomicBool>, sent: Arc<AtomicUsize>) {
    for i in 0..5000 {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let r = gate.get(&format!("/kpi/load{}", i % 50)).await;
        assert_eq!(r.status, 200, "request {i} failed: {r:?}");
        assert!(r.n() > 0);
        sent.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn redis_paused_killed_and_restarted_never_fails_a_request() {
    let up = Upstream::start().await;
    let mut redis = Redis::start().await;
    let gate = Arc::new(
        Gate::start(
            &up,
            Some(&redis),
            &format!("{ROUTES}\n[cache]\nkey_secret = \"k\"\n"),
        )
        .await,
    );
    // Warm up through a healthy Redis.
    assert_eq!(gate.get("/kpi/warm").await.cache(), "MISS");

    // Paused: Redis accepts nothing; each request waits at most the op timeout, then the
    // breaker opens and Redis is skipped.
    redis.pause();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(load(gate.clone(), stop.clone(), sent.clone()));
    let opened = eventually(Duration::from_secs(10), || async {
        gate.stats().await["redis"]["breaker_state"] != "closed"
    })
    .await;
    assert!(opened, "breaker never opened while redis was paused");
    // Killed mid-load: the load goes on for another 50 requests at least.
    let before_kill = sent.load(Ordering::SeqCst);
    redis.kill();
    let went_on = eventually(Duration::from_secs(10), || async {
        sent.load(Ordering::SeqCst) >= before_kill + 50
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    task.await.unwrap();
    assert!(went_on, "load stalled after redis was killed");

    // Down: still fine.
    for i in 0..20 {
        assert_eq!(gate.get(&format!("/kpi/down{i}")).await.status, 200);
    }
    assert!(
        gate.stats().await["redis"]["errors"]["get"]
            .as_u64()
            .unwrap()
            > 0
    );

    // Restarted: the tier comes back by itself and new entries reach Redis again.
    redis.restart().await;
    let mut i = 0;
    let back = eventually(Duration::from_secs(15), || {
        i += 1;
        let path = format!("/kpi/back{i}");
        let gate = gate.clone();
        let redis = &redis;
        async move {
            assert_eq!(gate.get(&path).await.status, 200);
            !redis.keys("cachegate:v2:*").await.is_empty()
        }
    })
    .await;
    assert!(back, "redis tier did not come back after restart");
    assert!(
        eventually(Duration::from_secs(5), || async {
            gate.stats().await["redis"]["breaker_state"] == "closed"
        })
        .await
    );
}

#[tokio::test]
async fn redis_down_at_start_is_not_fatal() {
    let up = Upstream::start().await;
    let mut redis = Redis::start().await;
    redis.kill();
    let gate = Gate::start(&up, Some(&redis), ROUTES).await;
    let a = gate.get("/kpi/x").await;
    let b = gate.get("/kpi/x").await;
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(b.cache(), "HIT", "memory tier still works without redis");
}

#[tokio::test]
async fn acl_user_with_password_and_wrong_password() {
    let up = Upstream::start().await;
    let redis = Redis::start_with(&[
        "--user", "default", "off", "--user", "app", "on", ">s3cret", "~*", "+@all",
    ])
    .await;
    let url = format!("redis://app:s3cret@127.0.0.1:{}", redis.port);
    let gate = Gate::start_with_redis_url(&up, &url, ROUTES).await;
    assert_eq!(gate.get("/kpi/acl").await.cache(), "MISS");
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stored = eventually(Duration::from_secs(5), || {
        let mut conn = conn.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("cachegate:v2:*")
                .query_async(&mut conn)
                .await
                .unwrap();
            !keys.is_empty()
        }
    })
    .await;
    assert!(stored, "entry never reached redis with the ACL user");
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();

    // A wrong password is a Redis failure like any other: requests still succeed.
    let wrong = format!("redis://app:nope@127.0.0.1:{}", redis.port);
    let gate = Gate::start_with_redis_url(&up, &wrong, ROUTES).await;
    for _ in 0..5 {
        assert_eq!(gate.get("/kpi/acl2").await.status, 200);
    }
    let errors = &gate.stats().await["redis"]["errors"];
    let failures = errors["get"].as_u64().unwrap() + errors["set"].as_u64().unwrap();
    assert!(
        failures > 0,
        "wrong password was not counted as a redis failure"
    );
}

#[tokio::test]
async fn rediss_with_a_private_ca() {
    let up = Upstream::start().await;
    let redis = Redis::start_tls().await;
    let writer = Gate::start(&up, Some(&redis), ROUTES).await;
    assert_eq!(writer.get("/kpi/tls").await.cache(), "MISS");
    let stored = eventually(Duration::from_secs(5), || async {
        !redis.keys("cachegate:v2:*").await.is_empty()
    })
    .await;
    assert!(
        stored,
        "entry never reached redis over TLS: {}",
        writer.stats().await["redis"]
    );
    let reader = Gate::start(&up, Some(&redis), ROUTES).await;
    let hit = reader.get("/kpi/tls").await;
    assert!(
        hit.header("cache-status").ends_with("detail=redis"),
        "{:?}",
        hit.headers
    );
    assert_eq!(up.hits(), 1);
    // Reads on a connection thread go over a TLS connection of that thread's own.
    let paths = AtomicUsize::new(0);
    let own_connection = eventually(Duration::from_secs(5), || async {
        let n = paths.fetch_add(1, Ordering::SeqCst);
        assert_eq!(reader.get(&format!("/kpi/tls{n}")).await.status, 200);
        reader.redis_thread_connections().await >= 1
    });
    assert!(own_connection.await, "no thread connection over TLS");
    assert_eq!(reader.stats().await["redis"]["errors"]["connect"], 0);
}

/// A replica that acknowledges a purge late, but within the acknowledgement limit, is
/// counted: the wait for acknowledgements is bounded by its own limit, not by the
/// operation timeout of a single Redis command (nor by redis-rs's 500 ms default).
#[tokio::test]
async fn a_late_acknowledgement_within_the_limit_is_counted() {
    use cachegate_core::metrics::StoreMetrics;
    use cachegate_core::store::{RedisOptions, RedisTier};
    let redis = Redis::start().await;
    let tier = RedisTier::new(
        &RedisOptions::new(redis.url()),
        "late-ack",
        StoreMetrics::default(),
    )
    .unwrap();
    let replica = tier.clone();
    let ack = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(900)).await;
        replica.ack_purge(7, 3).await;
    });
    let started = std::time::Instant::now();
    let (acknowledged, removed) = tier.wait_acks(7, 1, Duration::from_millis(3000)).await;
    ack.await.unwrap();
    assert_eq!((acknowledged, removed), (1, 3));
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// The shared connection dies without a reset while Redis cannot be reached either: the
/// replacement made when the breaker opens fails, and the probes after it time out on the
/// dead connection. Each failed probe makes another replacement, so once Redis can be
/// reached again the tier comes back by itself (instead of after the kernel's ~15 min).
#[tokio::test]
async fn a_dead_connection_is_replaced_once_redis_can_be_reached_again() {
    let redis = Redis::start().await;
    let relay = common::Relay::start(redis.port).await;
    let up = Upstream::start().await;
    let table = format!(
        "url = \"{}\"\nbreaker_cooldown_ms = 300\nbreaker_failures = 2\n",
        relay.redis_url()
    );
    let gate = Gate::start_at(&up.url(), Some(table), ROUTES, "").await;
    assert_eq!(gate.get("/kpi/a").await.cache(), "MISS");
    // A lookup of a new path: a Redis operation (while the breaker lets it through).
    let lookups = AtomicUsize::new(0);
    let breaker_after_lookup = || async {
        let n = lookups.fetch_add(1, Ordering::SeqCst);
        gate.get(&format!("/kpi/n{n}")).await;
        gate.stats().await["redis"]["breaker_state"] == "closed"
    };
    // The connection thread's own read connection is up too: it dies with the others.
    let own_connection =
        || async { breaker_after_lookup().await && thread_readers(&redis).await >= 1 };
    assert!(eventually(Duration::from_secs(10), own_connection).await);
    relay.refuse(true);
    relay.sever();
    let opened = eventually(Duration::from_secs(10), || async {
        !breaker_after_lookup().await
    });
    assert!(opened.await, "the breaker never opened");
    // Redis stays unreachable for ten cool-downs, probed all along: every replacement
    // made meanwhile fails.
    let unreachable_until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < unreachable_until {
        breaker_after_lookup().await;
    }
    relay.refuse(false);
    let back = eventually(Duration::from_secs(10), breaker_after_lookup);
    assert!(back.await, "the Redis tier never came back");
    // The thread's read connection was made again (the dead one only timed out).
    assert!(
        eventually(Duration::from_secs(10), own_connection).await,
        "the thread's own connection was not replaced"
    );
}

/// Redis's `CLIENT LIST`: one line per connection.
async fn client_list(redis: &Redis) -> String {
    let mut conn = redis.connection().await;
    redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// The connections reading for connection threads: `CLIENT LIST` entries named as
/// cachegate names them whose last command was a `GET`.
async fn thread_readers(redis: &Redis) -> usize {
    client_list(redis)
        .await
        .lines()
        .filter(|line| line.contains("name=cachegate-thread-read") && line.contains("cmd=get"))
        .count()
}

/// Reads on connection threads go through a Redis connection of the thread's own (its
/// driver on that thread: no hand-off to another thread per read), made in the
/// background at the thread's first read; when Redis restarts they are made again, and
/// meanwhile nothing fails.
#[tokio::test]
async fn connection_threads_read_through_redis_connections_of_their_own() {
    let mut redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = format!("{ROUTES}\n[cache]\nmemory_max_bytes = 0\n");
    let gate = Gate::start(&up, Some(&redis), &config).await;
    assert_eq!(gate.get("/kpi/a").await.cache(), "MISS");
    // Every hit is a Redis hit (no memory tier); the first reads use the shared
    // connection while the thread's own is made.
    async fn redis_hit_on_own_connection(gate: &Gate, redis: &Redis) -> bool {
        let response = gate.get("/kpi/a").await;
        assert_eq!(response.status, 200);
        response.cache() == "HIT" && thread_readers(redis).await >= 1
    }
    assert!(
        eventually(Duration::from_secs(10), || redis_hit_on_own_connection(
            &gate, &redis
        ))
        .await,
        "no read went through a thread's own connection"
    );
    assert!(
        gate.redis_thread_connections().await >= 1,
        "the thread connection is not counted"
    );
    redis.restart().await;
    // The restarted Redis is empty: a miss stores the entry again.
    assert_eq!(gate.get("/kpi/a").await.status, 200);
    assert!(
        eventually(Duration::from_secs(10), || redis_hit_on_own_connection(
            &gate, &redis
        ))
        .await,
        "the thread's connection was not made again"
    );
}

/// A thread's own read connection that Redis closed (here `CLIENT KILL`; Redis's
/// `timeout` for idle clients, a restart or a failover do the same) costs no hit: the read
/// that finds it lost goes through the shared connection in the time left, and the
/// upstream is not asked.
#[tokio::test]
async fn a_read_that_finds_its_thread_connection_lost_is_still_a_hit() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let config = format!("{ROUTES}\n[cache]\nmemory_max_bytes = 0\n");
    let gate = Gate::start(&up, Some(&redis), &config).await;
    assert_eq!(gate.get("/kpi/a").await.cache(), "MISS");
    // This client's connection thread reads through a connection of its own.
    let own_connection = eventually(Duration::from_secs(10), || async {
        gate.get("/kpi/a").await.cache() == "HIT" && thread_readers(&redis).await >= 1
    });
    assert!(
        own_connection.await,
        "no read went through a thread's own connection"
    );
    let list = client_list(&redis).await;
    let mut admin = redis.connection().await;
    let ids: Vec<&str> = list
        .lines()
        .filter(|line| line.contains("name=cachegate-thread-read"))
        .filter_map(|line| line.strip_prefix("id=")?.split(' ').next())
        .collect();
    assert!(!ids.is_empty());
    for id in ids {
        let _: () = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let upstream_before = up.hits();
    for _ in 0..5 {
        let response = gate.get("/kpi/a").await;
        assert_eq!((response.status, response.cache()), (200, "HIT"));
    }
    assert_eq!(
        up.hits(),
        upstream_before,
        "a lost connection sent reads upstream"
    );
    // The lost connection was counted.
    let get_errors = gate.metrics().await.lines().find_map(|l| {
        l.strip_prefix("cachegate_redis_errors_total{op=\"get\"} ")
            .map(|n| n.trim().parse::<f64>().unwrap())
    });
    assert!(get_errors >= Some(1.0), "{get_errors:?}");
}

/// An entry that expires while Redis answers is judged when the answer is in, not when the
/// request came: without a stale window it is a miss, with one it is served stale (and
/// refreshed), never as a fresh hit with an `Age` past its freshness.
#[tokio::test]
async fn an_entry_that_expires_while_redis_answers_is_not_a_fresh_hit() {
    let redis = Redis::start().await;
    let relay = common::Relay::start(redis.port).await;
    let up = Upstream::start().await;
    let table = format!("url = \"{}\"\nop_timeout_ms = 8000\n", relay.redis_url());
    let config = r#"
[cache]
memory_max_bytes = 0

[[routes]]
method = "GET"
path = "/plain/*"
ttl_secs = 2

[[routes]]
method = "GET"
path = "/swr/*"
ttl_secs = 2
stale_while_revalidate_secs = 60
"#;
    let gate = Gate::start_at(&up.url(), Some(table), config, "").await;
    let mut stored = Vec::new();
    for path in ["/plain/a", "/swr/a"] {
        assert_eq!(gate.get(path).await.cache(), "MISS");
        // Stored at or before this moment: fresh until two seconds after it at most.
        let stored_by = tokio::time::Instant::now();
        // In Redis (the write goes in the background).
        let in_redis = eventually(Duration::from_secs(1), || async {
            gate.get(path).await.cache() == "HIT"
        });
        assert!(in_redis.await, "{path} never reached Redis");
        stored.push((path, stored_by));
    }
    // Each asked 0.8 s after it was stored (fresh then), answered 2 s later (stale then),
    // both at once.
    relay.delay_replies(Duration::from_secs(2));
    let ask = |(path, stored_by): (&'static str, tokio::time::Instant)| {
        let gate = &gate;
        async move {
            tokio::time::sleep_until(stored_by + Duration::from_millis(800)).await;
            let response = gate.get(path).await;
            let age: u64 = response.header("age").parse().unwrap_or(0);
            (response.cache().to_string(), age)
        }
    };
    let (plain, swr) = tokio::join!(ask(stored[0]), ask(stored[1]));
    // Not kept past its freshness: a miss, fetched again.
    assert_eq!(plain.0, "MISS");
    // Served stale while one background request refreshes it, with its age then.
    assert_eq!(swr.0, "STALE");
    assert!(swr.1 >= 2, "Age {}", swr.1);
}

/// With `thread_connections = false`, reads on connection threads go through the shared
/// connection: no thread makes one of its own.
#[tokio::test]
async fn thread_connections_off_reads_through_the_shared_connection() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let table = format!("{}thread_connections = false\n", redis.config_table());
    let config = format!("{ROUTES}\n[cache]\nmemory_max_bytes = 0\n");
    let gate = Gate::start_at(&up.url(), Some(table), &config, "").await;
    assert_eq!(gate.get("/kpi/a").await.cache(), "MISS");
    let hit = eventually(Duration::from_secs(10), || async {
        gate.get("/kpi/a").await.cache() == "HIT"
    });
    assert!(hit.await);
    for _ in 0..20 {
        assert_eq!(gate.get("/kpi/a").await.cache(), "HIT");
    }
    assert_eq!(thread_readers(&redis).await, 0);
}

/// The shared connection goes silent (a relay forwards nothing more from it once it sent
/// a `SETEX`, as a connection dropped without a reset) while the connection threads'
/// reads keep succeeding and so keep the breaker closed: it is still replaced after
/// `breaker_failures` failures of its own in a row, so that writes, purges and leases
/// come back.
#[tokio::test]
async fn a_silent_shared_connection_is_replaced_while_thread_reads_succeed() {
    let redis = Redis::start().await;
    let relay = common::Relay::swallowing(redis.port, b"SETEX").await;
    let up = Upstream::start().await;
    let table = format!(
        "url = \"{}\"\nbreaker_failures = 3\nbreaker_cooldown_ms = 60000\n",
        relay.redis_url()
    );
    let gate = Gate::start_at(&up.url(), Some(table), ROUTES, "").await;
    // First the thread's own read connection, with reads that store nothing (a path no
    // route caches, answered without a Cache-Control: looked up, never written), so
    // that no read below waits on the shared connection once it is silent.
    let warm = AtomicUsize::new(0);
    let own_connection = eventually(Duration::from_secs(10), || async {
        let n = warm.fetch_add(1, Ordering::SeqCst);
        assert_eq!(gate.get(&format!("/warm/{n}")).await.status, 200);
        thread_readers(&redis).await >= 1
    });
    assert!(own_connection.await, "no thread connection");
    assert_eq!(relay.swallowed(), 0, "a write went out already");
    // Each new path: a read on the thread's connection and a write in the background on
    // the shared connection, swallowed (it times out).
    let paths = AtomicUsize::new(0);
    let replaced = eventually(Duration::from_secs(10), || async {
        let n = paths.fetch_add(1, Ordering::SeqCst);
        assert_eq!(gate.get(&format!("/kpi/s{n}")).await.status, 200);
        relay.swallowed() >= 2
    });
    assert!(
        replaced.await,
        "the silent shared connection was never replaced"
    );
    assert_eq!(gate.stats().await["redis"]["breaker_state"], "closed");
}

/// A Redis tier with a home runtime (as `cachegate serve` makes it: connection threads
/// come and go, the shared runtime stays) keeps its connection when a runtime that used it
/// first ends: redis-rs starts the connection's driver task where the first operation is
/// polled, and without a home that task ends with that runtime.
#[test]
fn a_redis_tier_at_home_outlives_the_runtimes_that_use_it() {
    use cachegate_core::home::Home;
    use cachegate_core::metrics::StoreMetrics;
    use cachegate_core::store::{RedisOptions, RedisTier};
    let home = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let redis = home.block_on(Redis::start());
    let metrics = StoreMetrics::default();
    // A generous operation timeout: the first operation connects.
    let mut options = RedisOptions::new(redis.url());
    options.op_timeout_ms = 2000;
    let tier = home.block_on(async {
        RedisTier::new(&options, "home", metrics.clone())
            .unwrap()
            .with_home(Home::current())
    });
    let elsewhere = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = elsewhere();
    assert!(first.block_on(tier.ping()));
    drop(first);
    let next = elsewhere();
    assert!(
        next.block_on(tier.ping()),
        "the connection ended with a runtime"
    );
    assert!(next.block_on(tier.ping()));
    // Reads on a thread that is not lasting (a library's runtime) use the shared
    // connection: none of the thread's own would outlive that runtime.
    // (Each read is followed by a short wait in which a connection being made in the
    // background, if any, would come up and be used by the next read.)
    let key = cachegate_core::key::CacheKey([1; 32]);
    for _ in 0..10 {
        next.block_on(async {
            assert_eq!(tier.get(&key).await, None);
            tokio::time::sleep(Duration::from_millis(5)).await;
        });
    }
    assert_eq!(next.block_on(thread_readers(&redis)), 0);
    assert_eq!(metrics.redis_errors.get("get"), 0);
}
