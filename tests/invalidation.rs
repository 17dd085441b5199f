//! Purges across replicas through the admin API: two in-process cachegates sharing one
//! real `redis-server`.

mod common;

use std::time::Duration;

use common::{Gate, Redis, Upstream, eventually};

const CONFIG: &str = r#"
[admin]
token = "purge-token"

[[routes]]
method = "GET"
path = "/kpi/*"
ttl_secs = 600
tags = ["kpi"]

[[routes]]
method = "GET"
path = "/profile/*"
ttl_secs = 600
"#;

async fn purge(gate: &Gate, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let mut req = gate
        .client
        .post(format!("{}/admin/purge", gate.admin))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
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
    let up = Upstream::start().await;
    let redis = Redis::start().await;
    let (a, b) = (
        Gate::start(&up, Some(&redis), CONFIG).await,
        Gate::start(&up, Some(&redis), CONFIG).await,
    );
    both_subscribed(&redis).await;
    // Each replica holds both entries in its memory tier.
    for gate in [&a, &b] {
        for path in ["/kpi/leads", "/profile/ada"] {
            gate.get(path).await;
            assert_eq!(gate.get(path).await.cache(), "HIT", "{path}");
        }
    }
    let (status, reply) = purge(&a, Some("purge-token"), r#"{"tags": ["kpi"]}"#).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["confirmed"], true, "{reply}");
    assert_eq!(reply["replicas_expected"], 2, "{reply}");
    assert_eq!(reply["replicas_acknowledged"], 2, "{reply}");
    // Confirmed: no replica answers HIT for the purged entry; others stay.
    for gate in [&a, &b] {
        assert_eq!(gate.get("/kpi/leads").await.cache(), "MISS");
        assert_eq!(gate.get("/profile/ada").await.cache(), "HIT");
    }
    let (status, reply) = purge(&b, Some("purge-token"), r#"{"all": true}"#).await;
    assert_eq!((status, reply["confirmed"].as_bool()), (200, Some(true)));
    for gate in [&a, &b] {
        assert_eq!(gate.get("/profile/ada").await.cache(), "MISS");
    }
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
    let (status, reply) = purge(&gate, Some("purge-token"), r#"{"paths": ["/kpi/*"]}"#).await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply.as_str().unwrap_or("").contains("paths"), "{reply}");
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
