//! Purges across replicas through the admin API: two in-process cachegates sharing one
//! real `redis-server`.

mod common;

use std::time::Duration;

use common::{Gate, Redis, Relay, Upstream, eventually};

const CONFIG: &str = r#"
[admin]
token = "purge-token"

[[events]]
name = "leads.imported"
tags = ["kpi"]

[[routes]]
name = "kpi"
method = "GET"
path = "/kpi/*"
ttl_secs = 600
tags = ["kpi"]

[[routes]]
method = "GET"
path = "/api/*"
ttl_secs = 600

[[routes]]
method = "POST"
path = "/api/natal/chart"
ttl_secs = 600
key_body = true

[[routes]]
method = "GET"
path = "/profile/*"
ttl_secs = 600
"#;

async fn purge(gate: &Gate, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    gate.admin_post("/admin/purge", token, body).await
}

/// What an ETL job does: `redis-cli PUBLISH cachegate:events NAME`. Returns the number of
/// subscribers that received it.
async fn publish_event(redis: &Redis, name: &str) -> u64 {
    let port = redis.port.to_string();
    let name = name.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "PUBLISH",
                "cachegate:events",
                &name,
            ])
            .output()
            .expect("redis-cli (installed with redis-server)")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The time of the purge marker `field` recorded in Redis (`tag:kpi`, `all`, ...).
async fn recorded_marker(redis: &Redis, field: &str) -> Option<u64> {
    redis::cmd("HGET")
        .arg("cachegate:purges")
        .arg(field)
        .query_async(&mut redis.connection().await)
        .await
        .unwrap()
}

/// Two replicas sharing `redis`, both subscribed to the invalidation channel.
async fn two_replicas(up: &Upstream, redis: &Redis) -> (Gate, Gate) {
    let a = Gate::start(up, Some(redis), CONFIG).await;
    let b = Gate::start(up, Some(redis), CONFIG).await;
    both_subscribed(redis).await;
    (a, b)
}

/// Waits until both replicas are subscribed to the invalidation channel.
async fn both_subscribed(redis: &Redis) {
    let subscribed = eventually(Duration::from_secs(5), || async {
        redis.subscribers("cachegate:invalidate").await >= 2
    });
    assert!(subscribed.await, "replicas never subscribed");
}

#[tokio::test]
async fn a_tag_purge_on_one_replica_is_confirmed_by_both_and_neither_hits_afterwards() {
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let (a, b) = two_replicas(&up, &redis).await;
    // Each replica holds both entries in its memory tier.
    for gate in [&a, &b] {
        for path in ["/kpi/leads", "/profile/ada"] {
            gate.get(path).await;
            assert_eq!(gate.get(path).await.cache(), "HIT", "{path}");
        }
    }
    let before = up.hits();
    let (status, reply) = purge(&a, Some("purge-token"), r#"{"tags": ["kpi"]}"#).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["confirmed"], true, "{reply}");
    assert_eq!(reply["replicas_expected"], 2, "{reply}");
    assert_eq!(reply["replicas_acknowledged"], 2, "{reply}");
    // Both replicas removed their copy of /kpi/leads from their memory tier at once.
    assert_eq!(reply["entries_purged"]["memory"], 2, "{reply}");
    assert!(reply["entries_purged"]["redis"].is_null(), "{reply}");
    let (stats_a, stats_b) = (a.stats().await, b.stats().await);
    assert_eq!(stats_a["purges"]["by_kind"]["tags"], 1);
    assert_eq!(stats_a["purges"]["outcomes"]["confirmed"], 1);
    assert_eq!(stats_b["purges"]["received"], 1);
    // Confirmed: no replica serves the purged entry (the first to be asked fetches it
    // again and shares the new one through Redis); others stay.
    for gate in [&a, &b] {
        assert!(computed_after(&gate.get("/kpi/leads").await, before));
        assert_eq!(gate.get("/profile/ada").await.cache(), "HIT");
    }
    let before = up.hits();
    let (status, reply) = purge(&b, Some("purge-token"), r#"{"all": true}"#).await;
    assert_eq!((status, reply["confirmed"].as_bool()), (200, Some(true)));
    for gate in [&a, &b] {
        assert!(computed_after(&gate.get("/profile/ada").await, before));
    }
}

/// A purge (or an unsafe request to the same target, RFC 9111 §4.4) made while a miss
/// waits on the upstream covers the answer that miss brings back: the entry is stamped
/// with the time its request was sent, not the time its answer arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_made_while_a_miss_is_in_flight_covers_its_answer() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, CONFIG).await;
    // The last two answer with `Vary`: their variant is stored under a `Vary` marker at
    // the primary key, which a purge by key (here an unsafe request) must cover too.
    let cases: [(&str, Option<&str>); 6] = [
        ("/kpi/tag", Some(r#"{"tags": ["kpi"]}"#)),
        ("/kpi/path", Some(r#"{"paths": ["/kpi/path"]}"#)),
        ("/kpi/all", Some(r#"{"all": true}"#)),
        ("/kpi/unsafe", None),
        ("/kpi/vary-tag", Some(r#"{"tags": ["kpi"]}"#)),
        ("/kpi/vary-unsafe", None),
    ];
    for (path, purge_body) in cases {
        let vary = if path.contains("vary") {
            "accept-language"
        } else {
            ""
        };
        let slow = gate
            .client
            .get(gate.url(path))
            .header("x-test-delay-ms", "400")
            .header("x-test-vary", vary)
            .send();
        let slow = tokio::spawn(slow);
        let reached = eventually(Duration::from_secs(5), || async { up.in_flight() == 1 });
        assert!(reached.await, "{path}: the miss never reached the upstream");
        match purge_body {
            Some(body) => {
                let (status, reply) = purge(&gate, Some("purge-token"), body).await;
                assert_eq!(status, 200, "{path}: {reply}");
            }
            None => {
                let post = gate.client.post(gate.url(path)).send().await.unwrap();
                assert_eq!(post.status(), 200, "{path}");
            }
        }
        // A request made after the purge waits on the same flight; the answer it brings
        // is purged already, so the request goes to the upstream again.
        let waiting = gate
            .client
            .get(gate.url(path))
            .header("x-test-vary", vary)
            .send();
        let waiting = tokio::spawn(waiting);
        let first = common::Reply::from(slow.await.unwrap().unwrap()).await;
        assert_eq!(first.cache(), "MISS", "{path}");
        let waited = common::Reply::from(waiting.await.unwrap().unwrap()).await;
        assert_eq!(waited.cache(), "MISS", "{path}");
        assert!(
            waited.n() > first.n(),
            "{path}: a request made after the purge got the answer from before it"
        );
        let after = gate.get(path).await;
        assert_eq!((after.cache(), after.n()), ("HIT", waited.n()), "{path}");
    }
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(r#"cachegate_coalesced_waits_total{outcome="purged"} 6"#),
        "the requests made after the purges did not wait on the flights: {metrics}"
    );
}

#[tokio::test]
async fn unauthorized_or_malformed_purges_purge_nothing() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, CONFIG).await;
    gate.get("/kpi/leads").await;
    for token in [None, Some("wrong")] {
        let (status, _) = purge(&gate, token, r#"{"tags": ["kpi"]}"#).await;
        assert_eq!(status, 401);
    }
    // The scheme is case-insensitive (RFC 9110 §11.1); another scheme is not a token.
    for (authorization, expected) in [("bearer purge-token", 200), ("Basic purge-token", 401)] {
        let status = gate
            .client
            .post(format!("{}/admin/purge", gate.admin))
            .header("authorization", authorization)
            .body(r#"{"tags": ["none"]}"#)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, expected, "{authorization}");
    }
    // Two `Authorization` fields are no token, whichever comes first.
    for pair in [
        ["Bearer purge-token", "Bearer x"],
        ["Bearer x", "Bearer purge-token"],
    ] {
        let status = gate
            .client
            .post(format!("{}/admin/purge", gate.admin))
            .header("authorization", pair[0])
            .header("authorization", pair[1])
            .body(r#"{"tags": ["kpi"]}"#)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 401, "{pair:?}");
    }
    let (status, reply) = purge(&gate, Some("purge-token"), r#"{"urls": ["/kpi/leads"]}"#).await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply.as_str().unwrap_or("").contains("urls"), "{reply}");
    // Parts that would purge nothing, or everything, or grow the markers without end.
    let long_tag = format!(r#"{{"tags": ["kpi", "{}"]}}"#, "t".repeat(1025));
    let many_paths = format!(
        r#"{{"paths": [{}]}}"#,
        (0..1001)
            .map(|i| format!(r#""/none/{i}/*""#))
            .collect::<Vec<_>>()
            .join(",")
    );
    // An array for the object, an unknown admin path: refused as such.
    let (status, reply) = purge(
        &gate,
        Some("purge-token"),
        r#"[["kpi"],[],[],[],false,false]"#,
    )
    .await;
    assert_eq!(status, 400, "{reply}");
    let (status, _) = gate
        .admin_post("/admin/purge/", Some("purge-token"), "{}")
        .await;
    assert_eq!(status, 404);
    // A route without a name is named "METHOD path".
    let (status, reply) = purge(&gate, Some("purge-token"), r#"{"routes": ["GET /api/*"]}"#).await;
    assert_eq!(status, 200, "{reply}");
    for bad in [
        r#"{"tags": ["kpi"], "routes": ["no-such-route"]}"#,
        long_tag.as_str(),
        many_paths.as_str(),
    ] {
        let (status, reply) = purge(&gate, Some("purge-token"), bad).await;
        assert_eq!(status, 400, "{reply}");
    }
    assert_eq!(gate.get("/kpi/leads").await.cache(), "HIT");
    // One bad part (a request that cannot be keyed) and nothing is purged, tags included.
    let mixed = r#"{"tags": ["kpi"], "requests": [{"url": "/api/natal/chart", "method": "POST", "body": [1]}, {"url": "%%"}]}"#;
    let (status, reply) = purge(&gate, Some("purge-token"), mixed).await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(gate.get("/kpi/leads").await.cache(), "HIT");
    // Without a configured token the endpoint is off, and says how to turn it on.
    let open = Gate::start(&up, None, "").await;
    let (status, reply) = purge(&open, Some("anything"), r#"{"all": true}"#).await;
    assert_eq!(status, 403);
    assert!(
        reply
            .as_str()
            .unwrap_or("")
            .contains("CACHEGATE_ADMIN_TOKEN")
    );
}

#[tokio::test]
async fn with_redis_down_a_purge_applies_locally_and_answers_503() {
    let up = Upstream::start().await;
    let mut redis = Redis::start().await;
    let gate = Gate::start(&up, Some(&redis), CONFIG).await;
    gate.get("/kpi/leads").await;
    assert_eq!(gate.get("/kpi/leads").await.cache(), "HIT");
    redis.kill();
    let (status, reply) = purge(&gate, Some("purge-token"), r#"{"tags": ["kpi"]}"#).await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(reply["redis_reached"], false);
    assert_eq!(gate.get("/kpi/leads").await.cache(), "MISS");
}

#[tokio::test]
async fn entries_carry_templated_route_tags_and_the_upstreams_tag_headers() {
    let up = Upstream::start().await;
    let config = r#"
[admin]
token = "purge-token"

[[routes]]
method = "GET"
path = "/report/*"
ttl_secs = 600
tags = ["report", "region:{query.region}", "report:{path.2}"]
"#;
    let gate = Gate::start(&up, None, config).await;
    let get = |path: &'static str, surrogate: &'static str, cache_tag: &'static str| {
        let req = gate
            .client
            .get(gate.url(path))
            .header("x-test-surrogate-key", surrogate)
            .header("x-test-cache-tag", cache_tag);
        async move { common::Reply::from(req.send().await.unwrap()).await }
    };
    let first = get("/report/leads?region=eu", "etl:leads overview", "team-a").await;
    // The tag headers are read into the entry and not passed on.
    assert!(first.headers.get("surrogate-key").is_none());
    assert!(first.headers.get("cache-tag").is_none());
    get("/report/leads?region=us", "", "").await;
    get("/report/churn?region=eu", "", "").await;
    for path in [
        "/report/leads?region=eu",
        "/report/leads?region=us",
        "/report/churn?region=eu",
    ] {
        assert_eq!(get(path, "", "").await.cache(), "HIT", "{path}");
    }
    // Each kind of tag purges exactly what carries it.
    let cases: [(&str, &[&str]); 4] = [
        (r#"{"tags": ["etl:leads"]}"#, &["/report/leads?region=eu"]),
        (r#"{"tags": ["region:us"]}"#, &["/report/leads?region=us"]),
        (
            r#"{"tags": ["report:churn"]}"#,
            &["/report/churn?region=eu"],
        ),
        (r#"{"tags": ["team-a", "overview"]}"#, &[]),
    ];
    for (body, purged) in cases {
        let (status, reply) = purge(&gate, Some("purge-token"), body).await;
        assert_eq!(status, 200, "{reply}");
        for path in purged {
            assert_eq!(get(path, "", "").await.cache(), "MISS", "{body} {path}");
        }
    }
    let exposed = Gate::start(&up, None, &format!("[cache]\nexpose_tags = true\n{config}")).await;
    let resp = exposed
        .client
        .get(exposed.url("/report/x"))
        .header("x-test-surrogate-key", "a b")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["surrogate-key"], "a b");
}

#[tokio::test]
async fn an_event_published_on_redis_or_raised_by_the_admin_api_purges_on_every_replica() {
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let (a, b) = two_replicas(&up, &redis).await;
    let warm = || async {
        for gate in [&a, &b] {
            for path in ["/kpi/leads", "/profile/ada"] {
                gate.get(path).await;
                assert_eq!(gate.get(path).await.cache(), "HIT", "{path}");
            }
        }
    };
    warm().await;
    // What an ETL job does: `redis-cli PUBLISH cachegate:events leads.imported`.
    let before = up.hits();
    let receivers = publish_event(&redis, "leads.imported").await;
    assert_eq!(receivers, 2);
    for gate in [&a, &b] {
        let purged = eventually(Duration::from_secs(5), || async {
            computed_after(&gate.get("/kpi/leads").await, before)
        });
        assert!(purged.await, "the event did not purge");
        assert_eq!(gate.get("/profile/ada").await.cache(), "HIT");
    }
    warm().await;
    let raise = |gate: &Gate, name: &str| {
        let req = gate
            .client
            .post(format!("{}/admin/events/{name}", gate.admin))
            .bearer_auth("purge-token");
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let before = up.hits();
    let (status, reply) = raise(&b, "leads.imported").await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains(r#""confirmed":true"#), "{reply}");
    for gate in [&a, &b] {
        assert!(computed_after(&gate.get("/kpi/leads").await, before));
    }
    let (status, _) = raise(&a, "no.such.event").await;
    assert_eq!(status, 404);
    let metrics = b.metrics().await;
    assert!(
        metrics.contains(r#"cachegate_events_total{name="leads.imported"} 2"#),
        "{metrics}"
    );
    assert!(
        a.metrics()
            .await
            .contains(r#"cachegate_events_total{name="unknown"} 1"#)
    );
    // An unknown event on the channel is ignored, never a crash.
    publish_event(&redis, "no.such.event").await;
    assert_eq!(a.get("/profile/ada").await.cache(), "HIT");
}

#[tokio::test]
async fn path_patterns_are_anchored_and_routes_purge_by_name() {
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let (a, b) = two_replicas(&up, &redis).await;
    let paths = [
        "/kpi/leads/eu",
        "/kpi/leads/us?x=1",
        "/kpi/leads-archive/x",
        "/api/kpi/leads/x",
        "/profile/ada",
    ];
    let warm = || async {
        for gate in [&a, &b] {
            for path in paths {
                gate.get(path).await;
                assert_eq!(gate.get(path).await.cache(), "HIT", "{path}");
            }
        }
    };
    warm().await;
    let before = up.hits();
    let (status, reply) = purge(&a, Some("purge-token"), r#"{"paths": ["/kpi/leads/*"]}"#).await;
    assert_eq!(
        (status, reply["confirmed"].as_bool()),
        (200, Some(true)),
        "{reply}"
    );
    purged_exactly(&[&a, &b], &paths, before, |path| {
        path.starts_with("/kpi/leads/")
    })
    .await;
    warm().await;
    let before = up.hits();
    let (status, reply) = purge(&b, Some("purge-token"), r#"{"routes": ["kpi"]}"#).await;
    assert_eq!(
        (status, reply["confirmed"].as_bool()),
        (200, Some(true)),
        "{reply}"
    );
    purged_exactly(&[&a, &b], &paths, before, |path| path.starts_with("/kpi/")).await;
}

/// Whether `reply` was computed by the upstream after it had answered `before` requests:
/// not an entry stored before a purge.
fn computed_after(reply: &common::Reply, before: usize) -> bool {
    reply.n() as usize > before
}

/// Asserts that on every gate, exactly the paths `purged` says are answered with a
/// response computed after the upstream's `before`th request; the others are hits on
/// entries from before.
async fn purged_exactly(
    gates: &[&Gate],
    paths: &[&str],
    before: usize,
    purged: impl Fn(&str) -> bool,
) {
    for gate in gates {
        for path in paths {
            let reply = gate.get(path).await;
            if purged(path) {
                assert!(
                    computed_after(&reply, before),
                    "{path}: purged entry served"
                );
            } else {
                assert_eq!(reply.cache(), "HIT", "{path}");
                assert!(!computed_after(&reply, before), "{path}");
            }
        }
    }
}

#[tokio::test]
async fn a_purge_by_request_removes_what_that_body_keyed_post_would_hit() {
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let (a, b) = two_replicas(&up, &redis).await;
    let ada = r#"{"date":"1815-12-10","time":"12:00"}"#;
    let alan = r#"{"date":"1912-06-23","time":"02:15"}"#;
    for gate in [&a, &b] {
        for body in [ada, alan] {
            gate.post_json("/api/natal/chart", body).await;
            assert_eq!(
                gate.post_json("/api/natal/chart", body).await.cache(),
                "HIT"
            );
        }
    }
    // The same birth data spelled differently is the same key (RFC 8785).
    let request = r#"{"requests": [{"method": "POST", "url": "/api/natal/chart",
        "headers": {"content-type": "application/json"},
        "body": {"time": "12:00", "date": "1815-12-10"}}]}"#;
    let before = up.hits();
    let (status, reply) = purge(&a, Some("purge-token"), request).await;
    assert_eq!(
        (status, reply["confirmed"].as_bool()),
        (200, Some(true)),
        "{reply}"
    );
    for gate in [&a, &b] {
        let reply = gate.post_json("/api/natal/chart", ada).await;
        assert!(computed_after(&reply, before), "purged chart served");
        assert_eq!(
            gate.post_json("/api/natal/chart", alan).await.cache(),
            "HIT"
        );
    }
    // A body the route cannot key is a clear 400, and nothing is purged.
    let bad = r#"{"requests": [{"method": "POST", "url": "/api/natal/chart", "body": "not an object", "headers": {"content-type": "application/json"}}, {"url": "%%"}]}"#;
    let (status, reply) = purge(&a, Some("purge-token"), bad).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply.as_str().unwrap_or("").starts_with("requests[1]"),
        "{reply}"
    );
}

/// A cachegate process in front of `up` on `redis`, logging to the returned file, once
/// it is subscribed to the events channel (and so to the invalidation channel).
async fn subscribed_process_logging(
    up: &Upstream,
    redis: &Redis,
) -> (common::GateProcess, tempfile::NamedTempFile) {
    let config = format!(
        "{CONFIG}\n[upstream]\nurl = \"{}\"\n[redis]\n{}",
        up.url(),
        redis.config_table()
    );
    let log = tempfile::NamedTempFile::new().unwrap();
    let gate = common::GateProcess::start_logging_to(&config, log.reopen().unwrap()).await;
    let subscribed = eventually(Duration::from_secs(10), || async {
        redis.subscribers("cachegate:events").await == 1
    });
    assert!(subscribed.await, "no events subscriber");
    (gate, log)
}

// Whoever can publish on the events channel chooses an unknown name: it is not written to
// the log (no forged lines, no unbounded ones), only its length and hash.
#[tokio::test]
async fn an_unknown_published_event_name_is_not_logged() {
    let up = Upstream::start().await;
    let redis = Redis::start().await;
    let (_gate, log) = subscribed_process_logging(&up, &redis).await;
    let name = format!(
        "evil\n{{\"level\":\"ERROR\",\"forged\":1}}{}",
        "x".repeat(10_000)
    );
    assert_eq!(publish_event(&redis, &name).await, 1);
    let read = || std::fs::read_to_string(log.path()).unwrap();
    let logged = eventually(Duration::from_secs(5), || async {
        read().contains("unknown event ignored")
    });
    assert!(logged.await, "{}", read());
    let text = read();
    assert!(
        !text.contains("forged") && !text.contains("xxxxxxxx"),
        "{text}"
    );
    assert!(text.contains("event_len"), "{text}");
}

#[tokio::test]
async fn three_cachegate_processes_confirm_a_purge_and_apply_a_published_event() {
    let up = Upstream::start().await;
    let redis = Redis::start().await;
    let config = format!(
        "{CONFIG}\n[upstream]\nurl = \"{}\"\n[redis]\n{}",
        up.url(),
        redis.config_table()
    );
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(common::GateProcess::start(&config).await);
    }
    let client = reqwest::Client::new();
    // The cache status and the upstream's request count `n` of an answer.
    let answer = |base: &str, path: &str| {
        let req = client.get(format!("{base}{path}"));
        async move { common::Reply::from(req.send().await.unwrap()).await }
    };
    let cache_status = |base: &str, path: &str| {
        let reply = answer(base, path);
        async move { reply.await.cache().to_string() }
    };
    let subscribed = eventually(Duration::from_secs(10), || async {
        redis.subscribers("cachegate:invalidate").await == 3
    });
    assert!(subscribed.await, "three subscribers expected");
    let warm = || async {
        for replica in &replicas {
            for path in ["/kpi/leads", "/profile/ada"] {
                cache_status(&replica.base, path).await;
                assert_eq!(cache_status(&replica.base, path).await, "HIT", "{path}");
            }
        }
    };
    warm().await;
    let before = up.hits();
    let resp = client
        .post(format!("{}/admin/purge", replicas[1].admin))
        .bearer_auth("purge-token")
        .body(r#"{"tags": ["kpi"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reply: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (
            reply["confirmed"].as_bool(),
            reply["replicas_acknowledged"].as_u64()
        ),
        (Some(true), Some(3)),
        "{reply}"
    );
    for replica in &replicas {
        let reply = answer(&replica.base, "/kpi/leads").await;
        assert!(computed_after(&reply, before), "{}", replica.base);
        assert_eq!(cache_status(&replica.base, "/profile/ada").await, "HIT");
    }
    warm().await;
    let before = up.hits();
    let receivers = publish_event(&redis, "leads.imported").await;
    assert_eq!(receivers, 3);
    for replica in &replicas {
        let purged = eventually(Duration::from_secs(5), || async {
            computed_after(&answer(&replica.base, "/kpi/leads").await, before)
        });
        assert!(purged.await, "the event did not reach {}", replica.base);
    }

    // Connections cut during a purge: channels are forbidden (which disconnects every
    // subscriber and stops them resubscribing), so no replica can receive the purge; it
    // is recorded in Redis all the same. Allowed again, each replica resubscribes, loads
    // the markers it missed, and serves no purged entry.
    warm().await;
    let before = up.hits();
    let mut conn = redis.connection().await;
    let acl = |rule: &'static str| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg("default").arg(rule);
        cmd
    };
    let () = acl("resetchannels").query_async(&mut conn).await.unwrap();
    let cut = eventually(Duration::from_secs(5), || async {
        redis.subscribers("cachegate:invalidate").await == 0
    });
    assert!(cut.await, "the subscriptions were not cut");
    let resp = client
        .post(format!("{}/admin/purge", replicas[0].admin))
        .bearer_auth("purge-token")
        .body(r#"{"tags": ["kpi"]}"#)
        .send()
        .await
        .unwrap();
    // Recorded, but not published: this replica says the others were not reached.
    assert_eq!(resp.status(), 503);
    for replica in &replicas[1..] {
        assert_eq!(cache_status(&replica.base, "/kpi/leads").await, "HIT");
    }
    let () = acl("allchannels").query_async(&mut conn).await.unwrap();
    let resubscribed = eventually(Duration::from_secs(10), || async {
        redis.subscribers("cachegate:invalidate").await == 3
    });
    assert!(resubscribed.await, "the replicas did not resubscribe");
    for replica in &replicas {
        let purged = eventually(Duration::from_secs(5), || async {
            computed_after(&answer(&replica.base, "/kpi/leads").await, before)
        });
        assert!(purged.await, "{} serves a purged entry", replica.base);
        assert_eq!(cache_status(&replica.base, "/profile/ada").await, "HIT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_command_is_a_client_of_the_admin_api() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, CONFIG).await;
    gate.get("/kpi/leads").await;
    assert_eq!(gate.get("/kpi/leads").await.cache(), "HIT");
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_cachegate"))
                .arg("purge")
                .args(args)
                .env_remove("CACHEGATE_ADMIN_TOKEN")
                .output()
                .unwrap()
        })
    };
    let args = |token: &str| {
        vec![
            "--admin".into(),
            gate.admin.clone(),
            "--token".into(),
            token.into(),
            "--tag".into(),
            "kpi".into(),
        ]
    };
    let out = run(args("purge-token")).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains(r#""confirmed":true"#), "{stdout}");
    assert_eq!(gate.get("/kpi/leads").await.cache(), "MISS");
    let out = run(args("wrong")).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    // An event whose name holds URL syntax is raised by that name, whole.
    let name = "leads imported?full=1#x/y%41";
    let config = CONFIG.replace("name = \"leads.imported\"", &format!("name = {name:?}"));
    let gate = Gate::start(&up, None, &config).await;
    gate.get("/kpi/leads").await;
    assert_eq!(gate.get("/kpi/leads").await.cache(), "HIT");
    let event = vec![
        "--admin".into(),
        gate.admin.clone(),
        "--token".into(),
        "purge-token".into(),
        "--event".into(),
        name.into(),
    ];
    let out = run(event).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(gate.get("/kpi/leads").await.cache(), "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_purge_serves_stale_while_one_request_refreshes_on_every_replica() {
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let (a, b) = two_replicas(&up, &redis).await;
    for gate in [&a, &b] {
        gate.get("/kpi/leads").await;
        assert_eq!(gate.get("/kpi/leads").await.cache(), "HIT");
        gate.get("/profile/ada").await;
    }
    let before = up.hits();
    let (status, reply) = purge(
        &a,
        Some("purge-token"),
        r#"{"tags": ["kpi"], "soft": true}"#,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["confirmed"], true, "{reply}");
    assert_eq!(reply["purged"]["soft"], true, "{reply}");
    // Nothing removed: marked stale.
    assert_eq!(reply["entries_purged"]["memory"], 0, "{reply}");
    for gate in [&a, &b] {
        // The entry from before is served at once, marked stale, while it is refreshed.
        let first = gate.get("/kpi/leads").await;
        if first.cache() == "STALE" {
            assert!(!computed_after(&first, before));
            let status = first.header("cache-status");
            assert!(status.contains("detail=soft-purge"), "{status}");
        } else {
            // The other replica refreshed it already and shared it through Redis.
            assert!(computed_after(&first, before), "{}", first.cache());
        }
        let refreshed = eventually(Duration::from_secs(5), || async {
            let r = gate.get("/kpi/leads").await;
            r.cache() == "HIT" && computed_after(&r, before)
        });
        assert!(refreshed.await, "never refreshed");
        assert_eq!(gate.get("/profile/ada").await.cache(), "HIT");
    }
    // One background request per replica at most (the second may find the first's).
    let refreshes = up.hits() - before;
    assert!((1..=2).contains(&refreshes), "{refreshes}");
}

// Replicas take turns refreshing a soft-purged key through a lease in Redis; one that gets
// the lease just after another gave it back finds that refresh in Redis and does not
// compute the answer again (the lease is given back once the entry is in Redis, and asked
// about again under the lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_refreshing_a_soft_purged_key_compute_it_once() {
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let (a, b) = two_replicas(&up, &redis).await;
    for gate in [&a, &b] {
        gate.get("/kpi/leads").await;
        assert_eq!(gate.get("/kpi/leads").await.cache(), "HIT");
    }
    for round in 0..30 {
        let before = up.hits();
        let (status, reply) = purge(
            &a,
            Some("purge-token"),
            r#"{"tags": ["kpi"], "soft": true}"#,
        )
        .await;
        assert_eq!(
            (status, &reply["confirmed"]),
            (200, &true.into()),
            "{reply}"
        );
        // Both replicas serve the entry from before and ask for a refresh at once.
        let (ra, rb) = tokio::join!(a.get("/kpi/leads"), b.get("/kpi/leads"));
        assert_eq!(
            (ra.cache(), rb.cache()),
            ("STALE", "STALE"),
            "round {round}"
        );
        for gate in [&a, &b] {
            let refreshed = eventually(Duration::from_secs(5), || async {
                let r = gate.get("/kpi/leads").await;
                r.cache() == "HIT" && computed_after(&r, before)
            });
            assert!(refreshed.await, "round {round}: never refreshed");
        }
        assert_eq!(up.hits() - before, 1, "round {round}: refreshed twice");
    }
}

#[tokio::test]
async fn events_can_purge_paths_and_routes_softly() {
    let config = format!(
        "{CONFIG}\n[[events]]\nname = \"profiles.changed\"\npaths = [\"/profile/*\"]\nsoft = true\n\n[[events]]\nname = \"api.changed\"\nroutes = [\"kpi\"]\n"
    );
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, &config).await;
    for path in ["/profile/ada", "/kpi/leads"] {
        gate.get(path).await;
        assert_eq!(gate.get(path).await.cache(), "HIT");
    }
    let raise = |name: &'static str| {
        let req = gate
            .client
            .post(format!("{}/admin/events/{name}", gate.admin))
            .bearer_auth("purge-token");
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(raise("profiles.changed").await, 200);
    assert_eq!(gate.get("/profile/ada").await.cache(), "STALE");
    assert_eq!(gate.get("/kpi/leads").await.cache(), "HIT");
    assert_eq!(raise("api.changed").await, 200);
    assert_eq!(gate.get("/kpi/leads").await.cache(), "MISS");
}

/// A Redis that accepts the purge subscription's connection but never answers its
/// `SUBSCRIBE` cannot hold the subscriber: the command is bounded by the operation timeout
/// and the subscription is made again on a new connection.
#[tokio::test]
async fn a_subscribe_never_answered_is_tried_again() {
    let redis = Redis::start().await;
    let relay = Relay::swallowing(redis.port, b"SUBSCRIBE").await;
    let up = Upstream::start().await;
    let _gate = Gate::start_with_redis_url(&up, &relay.redis_url(), CONFIG).await;
    let retried = eventually(Duration::from_secs(10), || async { relay.swallowed() >= 3 });
    assert!(
        retried.await,
        "one SUBSCRIBE left unanswered held the subscriber"
    );
}

/// A purge subscription cut without a reset (a NAT or firewall forgetting the connection:
/// Redis drops the subscriber, the replica's socket stays open and silent) is noticed by
/// the keep-alive `PING` and made again, and purges reach the replica again.
#[tokio::test]
async fn a_subscription_cut_silently_is_made_again() {
    let redis = Redis::start().await;
    let relay = Relay::start(redis.port).await;
    let up = Upstream::start().await;
    let cut = Gate::start_with_redis_url(&up, &relay.redis_url(), CONFIG).await;
    let other = Gate::start(&up, Some(&redis), CONFIG).await;
    let channel = "cachegate:invalidate";
    let subscribers = |n: u64| {
        let redis = &redis;
        eventually(Duration::from_secs(20), move || async move {
            redis.subscribers(channel).await == n
        })
    };
    assert!(subscribers(2).await, "both replicas subscribed");
    relay.sever();
    assert!(subscribers(1).await, "Redis dropped the cut subscriber");
    assert!(
        relay.held().await >= 1,
        "the cut connections stay open on the replica's side"
    );
    // 5 s of silence, a PING unanswered for 1 s, then a new subscription.
    assert!(subscribers(2).await, "the cut replica subscribed again");

    // A purge from the other replica reaches it and is acknowledged by both.
    purged_on_both(&cut, &other).await;
}

/// Caches `/kpi/leads` on `a`, then purges tag `kpi` from `b` until both replicas
/// acknowledge (up to 15 s), and checks that `a` lost the entry.
async fn purged_on_both(a: &Gate, b: &Gate) {
    assert_eq!(a.get("/kpi/leads").await.cache(), "MISS");
    assert_eq!(a.get("/kpi/leads").await.cache(), "HIT");
    let confirmed = eventually(Duration::from_secs(15), || async {
        let (status, reply) = purge(b, Some("purge-token"), r#"{"tags":["kpi"]}"#).await;
        status == 200 && reply["replicas_acknowledged"] == 2 && reply["confirmed"] == true
    });
    assert!(confirmed.await, "the purge is confirmed by both replicas");
    assert_eq!(a.get("/kpi/leads").await.cache(), "MISS", "purged on a");
}

/// A replica (re)subscribing while Redis holds the most key markers it keeps (100 k, which
/// any client can cause with unsafe requests to cached paths, RFC 9111 §4.4) loads them
/// all and subscribes: the markers are read in pages, each within the operation timeout
/// (40 ms here).
#[tokio::test]
async fn a_replica_subscribes_with_the_most_key_markers_recorded() {
    let redis = Redis::start().await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut conn = redis.connection().await;
    for batch in 0..100u64 {
        let mut zadd = redis::cmd("ZADD");
        zadd.arg("cachegate:purged-keys");
        for i in 0..1000u64 {
            zadd.arg(now_ms - 60_000 + i)
                .arg(format!("{:064x}", batch * 1000 + i));
        }
        zadd.query_async::<()>(&mut conn).await.unwrap();
    }
    let up = Upstream::start().await;
    // A tight operation timeout, so that one read of all the markers cannot fit in it on a
    // fast machine either.
    let redis_table = format!("{}op_timeout_ms = 40\n", redis.config_table());
    let a = Gate::start_at(&up.url(), Some(redis_table.clone()), CONFIG, "").await;
    let b = Gate::start_at(&up.url(), Some(redis_table), CONFIG, "").await;
    purged_on_both(&a, &b).await;
}

/// A purge of several parts (tags, paths, requests) that one subscriber never
/// acknowledges waits `ack_timeout_ms` once, not once per part, and says it is not
/// confirmed.
#[tokio::test]
async fn a_purge_of_several_parts_waits_for_acknowledgements_once() {
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let config = CONFIG.replace("[admin]\n", "[admin]\nack_timeout_ms = 1000\n");
    let gate = Gate::start(&up, Some(&redis), &config).await;
    // Counted by PUBLISH, silent after.
    let mut silent = redis.client().get_async_pubsub().await.unwrap();
    silent.subscribe("cachegate:invalidate").await.unwrap();
    both_subscribed(&redis).await;
    let started = std::time::Instant::now();
    let body = r#"{"tags": ["kpi"], "paths": ["/profile/*"], "requests": [{"url": "/api/x"}]}"#;
    let (status, reply) = purge(&gate, Some("purge-token"), body).await;
    let waited = started.elapsed();
    assert_eq!(
        (status, reply["confirmed"].as_bool()),
        (200, Some(false)),
        "{reply}"
    );
    // It did wait for the silent subscriber, and only once (one wait per part: 3 s).
    assert!(waited >= Duration::from_millis(1000), "{waited:?}");
    assert!(waited < Duration::from_millis(2500), "waited {waited:?}");
    drop(silent);
}

/// Tag and path markers recorded in Redis are capped
/// (`cachegate_core::purge::MAX_SHARED_MARKERS`): beyond, the oldest are removed and folded
/// into the namespace marker, so that what they purged stays purged, on a replica that
/// loads the markers afterwards too, and the hash a replica loads stays bounded.
#[tokio::test]
async fn the_oldest_tag_markers_in_redis_fold_into_a_purge_of_what_was_stored_by_then() {
    use cachegate_core::purge::MAX_SHARED_MARKERS;
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let a = Gate::start(&up, Some(&redis), CONFIG).await;
    assert_eq!(a.get("/kpi/leads").await.cache(), "MISS");
    let mut conn = redis.connection().await;
    // The entry (tagged `kpi` by its route) reaches Redis in the background.
    let entry_pattern = format!("cachegate:v2:{}", "?".repeat(64));
    let stored = eventually(Duration::from_secs(5), || {
        let (mut conn, pattern) = (conn.clone(), entry_pattern.clone());
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut conn)
                .await
                .unwrap();
            !keys.is_empty()
        }
    });
    assert!(stored.await, "the entry reached Redis");
    // History: `kpi` purged after the entry was stored, then as many other tag purges as
    // Redis keeps, recorded as a replica records them; `kpi` ranked oldest, though purged
    // again later (its rank as a replica on an older version, or with a clock behind,
    // would leave it): the fold goes by the later time.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut seed = redis::pipe();
    seed.cmd("HSET")
        .arg("cachegate:purges")
        .arg("tag:kpi")
        .arg(now_ms + 2);
    seed.cmd("ZADD")
        .arg("cachegate:purge-order")
        .arg(now_ms)
        .arg("tag:kpi");
    for batch in 0..(MAX_SHARED_MARKERS / 1000) {
        let (mut hset, mut zadd) = (redis::cmd("HSET"), redis::cmd("ZADD"));
        hset.arg("cachegate:purges");
        zadd.arg("cachegate:purge-order");
        for i in 0..1000 {
            let field = format!("tag:user:{}", batch * 1000 + i);
            hset.arg(&field).arg(now_ms + 1);
            zadd.arg(now_ms + 1).arg(&field);
        }
        seed.add_command(hset).add_command(zadd);
    }
    seed.query_async::<()>(&mut conn).await.unwrap();
    // One more purge: the oldest quarter and more fold, `tag:kpi` with them.
    let (status, reply) = purge(&a, Some("purge-token"), r#"{"tags": ["fresh"]}"#).await;
    assert_eq!(status, 200, "{reply}");
    let (fields, ranked, all): (usize, usize, Option<u64>) = redis::pipe()
        .hlen("cachegate:purges")
        .zcard("cachegate:purge-order")
        .hget("cachegate:purges", "all")
        .query_async(&mut conn)
        .await
        .unwrap();
    let keep = MAX_SHARED_MARKERS / 4 * 3;
    assert_eq!(ranked, keep);
    assert_eq!(
        fields,
        keep + 1,
        "the kept markers and the namespace marker"
    );
    assert_eq!(all, Some(now_ms + 2));
    assert_eq!(recorded_marker(&redis, "tag:kpi").await, None, "folded");
    let folds = &a.stats().await["purges"]["marker_folds"];
    assert_eq!((&folds["redis"], &folds["local"]), (&1.into(), &0.into()));
    // A replica that starts now loads the markers: the entry is purged for it; the one
    // it stores instead is newer than the fold and served.
    let before = up.hits();
    let b = Gate::start(&up, Some(&redis), CONFIG).await;
    let in_sync = eventually(Duration::from_secs(5), || async {
        b.stats().await["redis"]["in_sync"] == true
    });
    assert!(in_sync.await, "b loaded the markers");
    assert!(computed_after(&b.get("/kpi/leads").await, before));
    assert_eq!(b.get("/kpi/leads").await.cache(), "HIT");
}

/// A purge of many tags is recorded in Redis whole (in parts, so that no script holds
/// Redis for long).
#[tokio::test]
async fn a_purge_of_thousands_of_tags_is_recorded_whole() {
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let a = Gate::start(&up, Some(&redis), CONFIG).await;
    let mut tags: Vec<String> = (0..2_499).map(|i| format!("user:{i}")).collect();
    tags.push("kpi".into());
    let body = serde_json::json!({ "tags": tags }).to_string();
    let (status, reply) = purge(&a, Some("purge-token"), &body).await;
    assert_eq!(status, 200, "{reply}");
    let mut conn = redis.connection().await;
    let fields: usize = redis::cmd("HLEN")
        .arg("cachegate:purges")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fields, 2_500);
}

/// Purges of more distinct tags in all than a replica and Redis keep fold the oldest on
/// both, and say so in the metrics; one purge of more than that is refused.
#[tokio::test]
async fn folds_are_counted_where_they_happen() {
    use cachegate_core::purge::{MAX_SHARED_MARKERS, MAX_TAG_MARKERS};
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let a = Gate::start(&up, Some(&redis), CONFIG).await;
    let n = MAX_TAG_MARKERS.max(MAX_SHARED_MARKERS) + 1;
    let tags: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
    let body = serde_json::json!({ "tags": tags }).to_string();
    let (status, reply) = purge(&a, Some("purge-token"), &body).await;
    assert_eq!(status, 400, "{reply}");
    let (first, last) = tags.split_at(n - 1);
    for part in [first, last] {
        let body = serde_json::json!({ "tags": part }).to_string();
        let (status, reply) = purge(&a, Some("purge-token"), &body).await;
        assert_eq!(status, 200, "{reply}");
    }
    let folds = &a.stats().await["purges"]["marker_folds"];
    assert_eq!((&folds["local"], &folds["redis"]), (&1.into(), &1.into()));
    let metrics = a.metrics().await;
    assert!(
        metrics.contains("cachegate_purge_marker_folds_total{store=\"local\"} 1"),
        "{metrics}"
    );
}

/// Route patterns and purges by path are compared with normalized request paths
/// (`uri::normalize_path`): however they are spelled (escapes in lower case, escapes of
/// unreserved characters, raw UTF-8, `//`, `.` segments), they match the requests they
/// name. Before, a carve-out spelled `%c3%a9` was skipped (its requests cached by the
/// route after it), and a purge so spelled was confirmed and purged nothing.
#[tokio::test]
async fn route_and_purge_patterns_match_however_they_are_spelled() {
    let up = Upstream::start().await;
    let config = r#"
[admin]
token = "purge-token"

[[routes]]
method = "GET"
path = "/api/caf%c3%a9/*"
ttl_secs = 600
enabled = false

[[routes]]
method = "GET"
path = "/api/straße/*"
ttl_secs = 600
enabled = false

[[routes]]
method = "GET"
path = "/api/*"
ttl_secs = 600

[[routes]]
method = "GET"
path = "/kpi/*"
ttl_secs = 600
"#;
    let gate = Gate::start(&up, None, config).await;
    for path in [
        "/api/caf%C3%A9/me",
        "/api/caf%c3%a9/me",
        "/api/stra%C3%9Fe/me",
    ] {
        gate.get(path).await;
        let again = gate.get(path).await;
        assert_eq!(
            again.cache(),
            "BYPASS",
            "{path}: the disabled route was skipped"
        );
    }
    assert_eq!(gate.get("/api/other").await.cache(), "MISS");
    assert_eq!(gate.get("/api/other").await.cache(), "HIT");

    // (stored request path, the purge's spelling of it)
    let spellings = [
        ("/kpi/caf%C3%A9", "/kpi/caf%c3%a9"),
        ("/kpi/stra%C3%9Fe", "/kpi/straße"),
        ("/kpi/~u", "/kpi/%7Eu"),
        ("/kpi/a/b", "/kpi/a//b"),
        ("/kpi/d/e", "/kpi/d//e*"),
        ("/kpi/f/g.json", "*/f/*.json"),
    ];
    for (path, pattern) in spellings {
        gate.get(path).await;
        assert_eq!(gate.get(path).await.cache(), "HIT", "{path}");
        let body = serde_json::json!({ "paths": [pattern] }).to_string();
        let (status, reply) = purge(&gate, Some("purge-token"), &body).await;
        assert_eq!(status, 200, "{pattern}: {reply}");
        let matched = reply["purged"]["paths"][0].as_str().unwrap_or("");
        assert!(
            !matched.contains("//") && !matched.contains("%c3"),
            "{reply}"
        );
        assert_eq!(
            gate.get(path).await.cache(),
            "MISS",
            "{pattern}: the purge missed {path}"
        );
    }
    // A pattern that could match no path is refused, and purges nothing.
    gate.get("/kpi/x").await;
    for bad in ["kpi/*", "/kpi/*/../x", "/kpi/%2e/x"] {
        let body = serde_json::json!({ "paths": [bad] }).to_string();
        let (status, reply) = purge(&gate, Some("purge-token"), &body).await;
        assert_eq!(status, 400, "{bad}: {reply}");
    }
    assert_eq!(gate.get("/kpi/x").await.cache(), "HIT");
}

/// A Redis out of memory (`maxmemory` reached, `noeviction`) refuses to record a purge's
/// markers but still publishes it: the other replica applies it, and the reply says the
/// purge was not recorded (so not confirmed) instead of "Redis not reached".
#[tokio::test]
async fn a_purge_redis_cannot_record_still_reaches_the_replicas() {
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let config = CONFIG.replace("[admin]\n", "[admin]\nack_timeout_ms = 500\n");
    let a = Gate::start(&up, Some(&redis), &config).await;
    let b = Gate::start(&up, Some(&redis), &config).await;
    both_subscribed(&redis).await;
    assert_eq!(a.get("/kpi/leads").await.cache(), "MISS");
    assert_eq!(a.get("/kpi/leads").await.cache(), "HIT");
    let mut conn = redis.connection().await;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .arg("maxmemory")
        .arg(1)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let (status, reply) = purge(&b, Some("purge-token"), r#"{"tags":["kpi"]}"#).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (
            &reply["redis_reached"],
            &reply["recorded"],
            &reply["confirmed"]
        ),
        (&true.into(), &false.into(), &false.into()),
        "{reply}"
    );
    let recorded = recorded_marker(&redis, "tag:kpi").await;
    assert_eq!(recorded, None, "Redis did refuse the record");
    // A hit until `a` applies the published purge (at once: no acknowledgement can come).
    let purged = eventually(Duration::from_secs(5), || async {
        a.get("/kpi/leads").await.cache() == "MISS"
    });
    assert!(purged.await, "purged on a");
}

/// A Redis whose `maxmemory-policy` may evict keys without a TTL (the purge markers) is
/// named in a warning when a replica subscribes; the default `noeviction` is not.
#[tokio::test]
async fn an_eviction_policy_that_can_drop_purge_markers_is_warned_of() {
    let up = Upstream::start().await;
    for (policy, warned) in [("allkeys-lru", true), ("noeviction", false)] {
        let redis = Redis::start_with(&["--maxmemory-policy", policy]).await;
        let (gate, log) = subscribed_process_logging(&up, &redis).await;
        let read = || std::fs::read_to_string(log.path()).unwrap();
        let logged = eventually(Duration::from_secs(3), || async {
            read().contains("may evict purge markers")
        });
        assert_eq!(logged.await, warned, "{policy}: {}", read());
        drop(gate);
    }
}

/// A purge whose client hangs up as soon as it sent it (a short timeout, Ctrl-C) is still
/// carried out whole: recorded in Redis and applied on the other replica.
#[tokio::test]
async fn a_purge_whose_client_hangs_up_is_carried_out() {
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let (a, b) = two_replicas(&up, &redis).await;
    assert_eq!(b.get("/kpi/leads").await.cache(), "MISS");
    assert_eq!(b.get("/kpi/leads").await.cache(), "HIT");
    let body = r#"{"tags":["kpi"]}"#;
    let s =
        common::raw::post_to_admin(&a.admin, "/admin/purge", "purge-token", body.len(), body).await;
    drop(s);
    let purged = eventually(Duration::from_secs(5), || async {
        b.get("/kpi/leads").await.cache() == "MISS"
    });
    assert!(purged.await, "the purge reached the other replica");
    assert!(
        recorded_marker(&redis, "tag:kpi").await.is_some(),
        "recorded in Redis"
    );
}

/// A purge refused after its token was accepted (nothing purged) still writes its audit
/// line, with the status and without what it named.
#[tokio::test]
async fn a_refused_purge_is_audited_without_its_contents() {
    let (up, redis) = (Upstream::start().await, Redis::start().await);
    let (gate, log) = subscribed_process_logging(&up, &redis).await;
    let reply = reqwest::Client::new()
        .post(format!("{}/admin/purge", gate.admin))
        .bearer_auth("purge-token")
        .body(r#"{"routes": ["route-named-xyzzy"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    let read = || std::fs::read_to_string(log.path()).unwrap();
    let logged = eventually(Duration::from_secs(5), || async {
        read().contains("refused: nothing purged")
    });
    assert!(logged.await, "{}", read());
    let text = read();
    assert!(text.contains("400") && !text.contains("xyzzy"), "{text}");
}
