//! The library API (`cachegate_core::Cache`, re-exported as `cachegate::engine`) against a
//! real `redis-server`: sharing between instances, Redis dying mid-run, refresh-ahead,
//! stale-if-error, force-refresh, codec versions.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachegate::engine::codec::{Codec, CodecError, Postcard};
use cachegate::engine::{Cache, Options, RedisOptions, Source};
use common::{Redis, eventually};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Chart {
    sun: String,
    houses: Vec<u16>,
}

fn chart(sun: &str) -> Chart {
    Chart {
        sun: sun.into(),
        houses: (1..=12).collect(),
    }
}

/// A replica on `redis`, not yet in sync (purge markers loading).
fn replica<C: Codec>(redis: &Redis) -> Cache<Chart, C> {
    Cache::builder()
        .namespace("lib-test")
        .key_secret(b"shared by every replica")
        .redis(RedisOptions::new(redis.url()))
        .build()
        .unwrap()
}

/// A replica on `redis` that reads Redis (purge markers loaded).
async fn synced_replica<C: Codec>(redis: &Redis) -> Cache<Chart, C> {
    let cache = replica::<C>(redis);
    let synced = eventually(Duration::from_secs(5), || async { cache.in_sync() });
    assert!(synced.await, "the replica never loaded the purge markers");
    cache
}

/// A computation that counts its runs and returns `value`.
fn counted(
    runs: &Arc<AtomicUsize>,
    value: Chart,
) -> impl FnOnce() -> std::future::Ready<Result<Chart, std::io::Error>> + Send + 'static {
    let runs = runs.clone();
    move || {
        runs.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(value))
    }
}

/// `get_or_set` with the default options and a counted computation of `chart(sun)`.
async fn fetch<C: Codec>(
    cache: &Cache<Chart, C>,
    key: &str,
    runs: &Arc<AtomicUsize>,
    sun: &str,
) -> cachegate::engine::Fetched<Chart> {
    cache
        .get_or_set(key, &Options::default(), counted(runs, chart(sun)))
        .await
        .unwrap()
}

/// Waits until `cache` has written `n` entries to Redis (writes are in the background).
async fn written_to_redis<C: Codec>(cache: &Cache<Chart, C>, n: u64) {
    let written = eventually(Duration::from_secs(5), || async {
        cache.stats().stores_redis == n
    });
    assert!(written.await, "{n} Redis writes never landed");
}

#[tokio::test]
async fn a_second_replica_gets_the_first_ones_value_from_redis() {
    let redis = Redis::start().await;
    let (a, b) = (
        synced_replica::<Postcard>(&redis).await,
        synced_replica::<Postcard>(&redis).await,
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let first = fetch(&a, "natal:ada", &runs, "Sagittarius").await;
    assert_eq!(first.source, Source::Computed);
    // The Redis write is in the background: wait for it to land.
    written_to_redis(&a, 1).await;
    let second = fetch(&b, "natal:ada", &runs, "wrong").await;
    assert_eq!(
        (second.value, second.source),
        (chart("Sagittarius"), Source::Redis)
    );
    let third = fetch(&b, "natal:ada", &runs, "wrong").await;
    assert_eq!(third.source, Source::Memory);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Removal reaches Redis: the other replica's next miss computes.
    assert!(a.remove("natal:ada").await);
    let c = synced_replica::<Postcard>(&redis).await;
    assert_eq!(c.get("natal:ada").await, None);
}

#[tokio::test]
async fn redis_killed_mid_run_never_fails_a_call() {
    let mut redis = Redis::start().await;
    let cache = synced_replica::<Postcard>(&redis).await;
    let runs = Arc::new(AtomicUsize::new(0));
    for i in 0..20 {
        let key = format!("k{i}");
        fetch(&cache, &key, &runs, "a").await;
    }
    redis.kill();
    let started = Instant::now();
    for i in 0..40 {
        // Half the keys are in the memory tier, half are new: all answer.
        let key = format!("k{}", i % 40);
        let got = fetch(&cache, &key, &runs, "b").await;
        let expected = if i < 20 { "a" } else { "b" };
        assert_eq!(got.value.sun, expected, "{key}");
    }
    // Bounded by the operation timeout and the breaker, not by Redis.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 40);
    assert!(cache.stats().redis_errors > 0);
}

#[tokio::test]
async fn refresh_ahead_returns_at_once_and_refreshes_in_the_background() {
    let cache: Cache<Chart> = Cache::builder().build().unwrap();
    let options = Options::default()
        .ttl(Duration::from_secs(2))
        .refresh_ahead(0.9);
    cache
        .get_or_set("kpi", &options, || async {
            Ok::<_, std::io::Error>(chart("v1"))
        })
        .await
        .unwrap();
    // Time is what the feature is about: after 10% of the TTL, less than 90% is left.
    tokio::time::sleep(Duration::from_millis(250)).await;
    // The hit returns v1 without waiting for the refresh, whose computation is held until
    // the caller has its answer.
    let (release, mut held) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let hit = cache
        .get_or_set("kpi", &options, move || async move {
            let _ = held.wait_for(|go| *go).await;
            Ok::<_, std::io::Error>(chart("v2"))
        })
        .await
        .unwrap();
    assert_eq!((hit.value.sun.as_str(), hit.source), ("v1", Source::Memory));
    assert!(started.elapsed() < Duration::from_millis(500));
    release.send(true).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            cache.get("kpi").await.is_some_and(|c| c.sun == "v2")
        })
        .await,
        "the background refresh never landed"
    );
    assert_eq!(cache.stats().background_refreshes, 1);
}

#[tokio::test]
async fn stale_if_error_returns_the_last_value_marked_stale() {
    let cache: Cache<Chart> = Cache::builder().build().unwrap();
    let short = Options::default()
        .ttl(Duration::from_secs(1))
        .stale_if_error(Duration::from_secs(60));
    cache
        .get_or_set("kpi", &short, || async {
            Ok::<_, std::io::Error>(chart("last good"))
        })
        .await
        .unwrap();
    // Past its freshness (1 s), within the stale window.
    assert!(
        eventually(Duration::from_secs(3), || async {
            cache.get("kpi").await.is_none()
        })
        .await
    );
    let failed = || async { Err::<Chart, _>(std::io::Error::other("database down")) };
    let stale = cache.get_or_set("kpi", &short, failed).await.unwrap();
    assert!(stale.is_stale());
    assert_eq!(stale.value.sun, "last good");
    // Without stale_if_error the error is returned, and never cached.
    let plain = Options::default().ttl(Duration::from_secs(1));
    let err = cache.get_or_set("kpi", &plain, failed).await.unwrap_err();
    let cachegate::engine::Error::Compute(cause) = &err;
    assert!(
        cause.to_string().contains("database down"),
        "{err}: {cause}"
    );
    let recovered = cache
        .get_or_set("kpi", &plain, || async {
            Ok::<_, std::io::Error>(chart("new"))
        })
        .await
        .unwrap();
    assert_eq!(
        (recovered.value.sun.as_str(), recovered.source),
        ("new", Source::Computed)
    );
    assert_eq!(cache.stats().stale_served, 1);
}

#[tokio::test]
async fn force_refresh_computes_and_overwrites_a_fresh_value() {
    let redis = Redis::start().await;
    let (a, b) = (
        synced_replica::<Postcard>(&redis).await,
        synced_replica::<Postcard>(&redis).await,
    );
    let runs = Arc::new(AtomicUsize::new(0));
    fetch(&a, "k", &runs, "old").await;
    let forced = a
        .get_or_set(
            "k",
            &Options::default().force_refresh(),
            counted(&runs, chart("new")),
        )
        .await
        .unwrap();
    assert_eq!(
        (forced.value.sun.as_str(), forced.source),
        ("new", Source::Computed)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // Overwritten in Redis too.
    written_to_redis(&a, 2).await;
    assert_eq!(b.get("k").await.map(|c| c.sun), Some("new".into()));
}

/// Postcard under a newer version number: what an upgraded replica would write.
struct PostcardV2;

impl Codec for PostcardV2 {
    const ID: u8 = Postcard::ID;
    const VERSION: u8 = Postcard::VERSION + 1;

    fn encode<V: Serialize>(value: &V, out: &mut Vec<u8>) -> Result<(), CodecError> {
        Postcard::encode(value, out)
    }

    fn decode<V: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<V, CodecError> {
        Postcard::decode(bytes)
    }
}

#[tokio::test]
async fn a_value_written_by_another_codec_version_is_a_miss() {
    let redis = Redis::start().await;
    let old = synced_replica::<Postcard>(&redis).await;
    old.get_or_set("k", &Options::default(), || async {
        Ok::<_, std::io::Error>(chart("written by v1"))
    })
    .await
    .unwrap();
    written_to_redis(&old, 1).await;
    let new = synced_replica::<PostcardV2>(&redis).await;
    let got = new
        .get_or_set("k", &Options::default(), || async {
            Ok::<_, std::io::Error>(chart("computed by v2"))
        })
        .await
        .unwrap();
    assert_eq!(
        (got.value.sun.as_str(), got.source),
        ("computed by v2", Source::Computed)
    );
    assert_eq!(new.stats().redis_rejected_entries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_of_one_thousand_callers_runs_one_computation() {
    let cache: Cache<Chart> = Cache::builder().build().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (release, held) = tokio::sync::watch::channel(false);
    let calls: Vec<_> = (0..1000)
        .map(|_| {
            let (cache, runs, mut held) = (cache.clone(), runs.clone(), held.clone());
            tokio::spawn(async move {
                cache
                    .get_or_set("cold", &Options::default(), move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = held.wait_for(|go| *go).await;
                        Ok::<_, std::io::Error>(chart("once"))
                    })
                    .await
            })
        })
        .collect();
    // Every caller has joined (as the leader or a waiter) before the computation ends.
    assert!(
        eventually(Duration::from_secs(5), || async {
            cache.metrics().misses.get() == 1000
        })
        .await
    );
    release.send(true).unwrap();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().value, chart("once"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_value_never_comes_back_from_a_pending_write() {
    let redis = Redis::start().await;
    let cache = synced_replica::<Postcard>(&redis).await;
    for i in 0..30 {
        let key = format!("k{i}");
        cache
            .set(&key, chart("secret"), &Options::default())
            .unwrap();
        cache
            .set(&key, chart("newer secret"), &Options::default())
            .unwrap();
        assert!(cache.remove(&key).await);
    }
    // The writes were asked for before the removals: none may land after them. Watch
    // Redis for a while (what is checked is that nothing appears).
    let mut conn = redis.connection().await;
    let watch_until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < watch_until {
        let size: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        assert_eq!(size, 0, "a removed key came back");
        tokio::task::yield_now().await;
    }
    let fresh = synced_replica::<Postcard>(&redis).await;
    for i in 0..30 {
        assert_eq!(fresh.get(&format!("k{i}")).await, None);
    }
}

#[tokio::test]
async fn a_stale_memory_entry_does_not_hide_a_fresh_value_in_redis() {
    let redis = Redis::start().await;
    let (a, b) = (
        synced_replica::<Postcard>(&redis).await,
        synced_replica::<Postcard>(&redis).await,
    );
    let short = Options::default()
        .ttl(Duration::from_secs(1))
        .stale_if_error(Duration::from_secs(60));
    b.set("kpi", chart("v1"), &short).unwrap();
    written_to_redis(&b, 1).await;
    // b's copy goes stale (kept for stale_if_error); meanwhile a stores v2 in Redis.
    assert!(
        eventually(Duration::from_secs(3), || async {
            b.get("kpi").await.is_none()
        })
        .await
    );
    a.set("kpi", chart("v2"), &Options::default()).unwrap();
    written_to_redis(&a, 1).await;
    assert_eq!(b.get("kpi").await.map(|c| c.sun), Some("v2".into()));
    let runs = Arc::new(AtomicUsize::new(0));
    let got = fetch(&b, "kpi", &runs, "computed").await;
    assert_eq!(
        (got.value.sun.as_str(), runs.load(Ordering::SeqCst)),
        ("v2", 0)
    );
}

#[tokio::test]
async fn a_tag_purge_reaches_every_replica_and_says_so() {
    let redis = Redis::start().await;
    let (a, b) = (
        synced_replica::<Postcard>(&redis).await,
        synced_replica::<Postcard>(&redis).await,
    );
    let kpi = Options::default().tags(["kpi"]);
    a.set("leads", chart("v1"), &kpi).unwrap();
    a.set("profile", chart("ada"), &Options::default()).unwrap();
    written_to_redis(&a, 2).await;
    // b holds both in its own memory tier now.
    assert_eq!(b.get("leads").await.map(|c| c.sun), Some("v1".into()));
    assert!(b.get("profile").await.is_some());
    // Both replicas subscribed (each acknowledges its own purges too).
    assert!(
        eventually(Duration::from_secs(5), || async {
            redis.subscribers("lib-test:invalidate").await == 2
        })
        .await
    );
    let report = a.invalidate_tags(&["kpi"]).await;
    assert!(report.confirmed(), "{report:?}");
    assert_eq!(
        (report.replicas_expected, report.replicas_acknowledged),
        (2, 2)
    );
    // Confirmed: no replica serves the purged entry, from memory or Redis.
    assert_eq!(b.get("leads").await, None);
    assert_eq!(a.get("leads").await, None);
    assert!(b.get("profile").await.is_some(), "untagged entries stay");
    // A replica that starts later never serves the purged entry: it loads the purge
    // from Redis before it trusts Redis entries.
    let c = replica::<Postcard>(&redis);
    assert_eq!(c.get("leads").await, None);
    assert!(
        eventually(Duration::from_secs(5), || async {
            c.get("profile").await.is_some()
        })
        .await,
        "Redis entries are served once the markers are loaded"
    );
    // By key: gone on both replicas, other keys stay.
    a.set("other", chart("o"), &Options::default()).unwrap();
    written_to_redis(&a, 3).await;
    assert!(b.get("other").await.is_some());
    let report = b.purge(&["profile"]).await;
    assert!(report.confirmed(), "{report:?}");
    assert_eq!(
        (a.get("profile").await, b.get("profile").await),
        (None, None)
    );
    assert!(a.get("other").await.is_some() && b.get("other").await.is_some());
    let report = b.purge_all().await;
    assert!(report.confirmed(), "{report:?}");
    assert_eq!(a.get("other").await, None);
}

#[tokio::test]
async fn a_purge_with_redis_down_applies_here_and_says_the_others_were_not_reached() {
    let mut redis = Redis::start().await;
    let cache = synced_replica::<Postcard>(&redis).await;
    cache
        .set("leads", chart("v1"), &Options::default().tags(["kpi"]))
        .unwrap();
    redis.kill();
    let report = cache.invalidate_tags(&["kpi"]).await;
    assert!(!report.redis_reached && !report.confirmed(), "{report:?}");
    assert_eq!(cache.get("leads").await, None);
}

#[tokio::test]
async fn a_replica_that_lost_its_subscription_applies_the_purges_it_missed_on_reconnect() {
    let redis = Redis::start().await;
    let (a, b) = (
        synced_replica::<Postcard>(&redis).await,
        synced_replica::<Postcard>(&redis).await,
    );
    b.set("leads", chart("v1"), &Options::default().tags(["kpi"]))
        .unwrap();
    assert!(b.get("leads").await.is_some());
    // Cut every subscription (what a Redis restart or a network cut does), then purge
    // before the replicas are back: b cannot receive the message.
    let mut conn = redis.connection().await;
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    let report = a.invalidate_tags(&["kpi"]).await;
    assert!(report.redis_reached, "{report:?}");
    // On resubscribing, b loads the markers it missed and stops serving the entry.
    let dropped = eventually(Duration::from_secs(5), || async {
        b.get("leads").await.is_none()
    });
    assert!(
        dropped.await,
        "b still serves a purged entry after reconnecting"
    );
}

/// A burst of writes that Redis does not take (writes paused: every `SET` waits, below the
/// operation timeout) cannot pile up: each of the 256 stripes holds at most
/// `MAX_PENDING_WRITES` waiting writes, and the others are dropped at once and counted as
/// Redis errors, their values still in the memory tier.
#[tokio::test]
async fn a_slow_redis_bounds_the_write_backlog() {
    use cachegate::engine::store::MAX_PENDING_WRITES;
    let redis = Redis::start().await;
    let cache: Cache<Chart> = Cache::builder()
        .namespace("backlog")
        .key_secret(b"backlog test")
        .redis(RedisOptions {
            op_timeout_ms: 30_000,
            ..RedisOptions::new(redis.url())
        })
        .build()
        .unwrap();
    let synced = eventually(Duration::from_secs(5), || async { cache.in_sync() });
    assert!(synced.await);
    let mut conn = redis.connection().await;
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10_000)
        .arg("WRITE")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let writes = 5_000;
    for i in 0..writes {
        cache
            .set(&format!("k{i}"), chart("Leo"), &Options::default())
            .unwrap();
    }
    let most_waiting = (256 * MAX_PENDING_WRITES) as u64;
    let dropped = eventually(Duration::from_secs(5), || async {
        cache.stats().redis_errors >= writes - most_waiting
    });
    assert!(
        dropped.await,
        "{} writes dropped",
        cache.stats().redis_errors
    );
    assert_eq!(
        cache.get("k4999").await,
        Some(chart("Leo")),
        "in the memory tier"
    );
    redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
}
