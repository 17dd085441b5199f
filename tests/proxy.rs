//! End-to-end tests of the proxy with the memory tier: real upstream, real sockets, real
//! HTTP client.

mod common;

use std::time::{Duration, Instant};

use common::{Gate, Upstream, eventually};

const ROUTES: &str = r#"
[[routes]]
method = "POST"
path = "/api/natal/chart"
ttl_secs = 60
key_body = true
tags = ["natal"]

[[routes]]
method = "GET"
path = "/kpi/*"
ttl_secs = 30

[[routes]]
method = "GET"
path = "/short/*"
ttl_secs = 1

[[routes]]
method = "GET"
path = "/off/*"
ttl_secs = 30
enabled = false
"#;

const CHART: &str = r#"{"name":"Ada","date":"1815-12-10","time":"12:00","lat":51.5,"lon":-0.12,"tz":"Europe/London"}"#;
const CHART_REORDERED: &str = r#"{ "tz": "Europe/London", "lon": -0.120, "lat": 5.15e1,
    "time": "12:00", "date": "1815-12-10", "name": "Ada" }"#;

#[tokio::test]
async fn miss_then_hit_with_identical_response() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    let first = gate.get("/kpi/revenue?month=11").await;
    assert_eq!(first.cache(), "MISS");
    assert_eq!(
        first.header("cache-status"),
        "cachegate; fwd=miss; fwd-status=200; stored"
    );
    let second = gate.get("/kpi/revenue?month=11").await;
    assert_eq!(second.cache(), "HIT");
    assert!(
        second
            .header("cache-status")
            .starts_with("cachegate; hit; ttl=")
    );
    assert!(second.header("cache-status").ends_with("detail=memory"));
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("content-type"), "application/json");
    assert!(second.header("age").parse::<u64>().is_ok());
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn different_query_or_body_misses_reordered_json_hits() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    assert_eq!(gate.get("/kpi/a?x=1&y=2").await.cache(), "MISS");
    assert_eq!(gate.get("/kpi/a?y=2&x=1").await.cache(), "HIT");
    assert_eq!(gate.get("/kpi/a?x=2&y=2").await.cache(), "MISS");

    let first = gate.post_json("/api/natal/chart", CHART).await;
    assert_eq!(first.cache(), "MISS");
    let reordered = gate.post_json("/api/natal/chart", CHART_REORDERED).await;
    assert_eq!(
        reordered.cache(),
        "HIT",
        "RFC 8785: same JSON, other spelling"
    );
    assert_eq!(reordered.body, first.body);
    let other = gate
        .post_json("/api/natal/chart", &CHART.replace("Ada", "Bob"))
        .await;
    assert_eq!(other.cache(), "MISS");
    assert_eq!(up.hits(), 4);

    // A whole number spelled as a float is a float to a typed upstream (Python, Java):
    // not the integer's entry. Spelled as a float either way, one entry.
    let whole = CHART.replace("51.5", "51");
    assert_eq!(
        gate.post_json("/api/natal/chart", &whole).await.cache(),
        "MISS"
    );
    let float = CHART.replace("51.5", "51.0");
    assert_eq!(
        gate.post_json("/api/natal/chart", &float).await.cache(),
        "MISS"
    );
    let exponent = CHART.replace("51.5", "5.1e1");
    assert_eq!(
        gate.post_json("/api/natal/chart", &exponent).await.cache(),
        "HIT"
    );
    assert_eq!(
        gate.post_json("/api/natal/chart", &whole).await.cache(),
        "HIT"
    );
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    let stored_at = Instant::now();
    assert_eq!(gate.get("/short/x").await.cache(), "MISS");
    assert_eq!(gate.get("/short/x").await.cache(), "HIT");
    let expired = eventually(Duration::from_secs(5), || async {
        gate.get("/short/x").await.cache() == "MISS"
    })
    .await;
    assert!(expired, "entry with ttl_secs = 1 never expired");
    assert!(
        stored_at.elapsed() >= Duration::from_millis(900),
        "expired too early"
    );
}

#[tokio::test]
async fn concurrent_misses_send_one_upstream_request() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let client = gate.client.clone();
        let url = gate.url("/kpi/slow");
        tasks.push(tokio::spawn(async move {
            let resp = client
                .get(url)
                .header("x-test-delay-ms", "700")
                .send()
                .await
                .unwrap();
            common::Reply::from(resp).await
        }));
    }
    let mut bodies = std::collections::HashSet::new();
    for t in tasks {
        let reply = t.await.unwrap();
        assert_eq!(reply.status, 200);
        bodies.insert(reply.body);
    }
    assert_eq!(
        up.hits(),
        1,
        "exactly one upstream request for 200 concurrent misses"
    );
    assert_eq!(bodies.len(), 1);
    let stats = gate.stats().await;
    assert!(stats["coalesced_waits"]["served"].as_u64().unwrap() > 0);
}

/// cachegate with the test routes and `cache` as its `[cache]` table.
async fn gate_with_cache(up: &Upstream, cache: &str) -> Gate {
    Gate::start(up, None, &format!("[cache]\n{cache}\n{ROUTES}")).await
}

/// Sends a GET for `path` with the given request headers.
async fn send(gate: &Gate, path: &str, headers: &[(&str, &str)]) -> common::Reply {
    let mut req = gate.client.get(gate.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    common::Reply::from(req.send().await.unwrap()).await
}

/// Sends `path` twice with the given request headers; returns both replies.
async fn twice(
    gate: &Gate,
    path: &str,
    headers: &[(&str, &str)],
) -> (common::Reply, common::Reply) {
    (
        send(gate, path, headers).await,
        send(gate, path, headers).await,
    )
}

#[tokio::test]
async fn private_responses_are_never_shared() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 6] = [
        (
            "/kpi/private",
            &[("x-test-cache-control", "private")],
            "detail=private",
        ),
        (
            "/kpi/no-store",
            &[("x-test-cache-control", "no-store")],
            "detail=no-store",
        ),
        (
            "/kpi/cookie",
            &[("x-test-set-cookie", "sid=1")],
            "detail=set-cookie",
        ),
        ("/kpi/error", &[("x-test-status", "500")], "detail=status"),
        (
            "/kpi/notfound",
            &[("x-test-status", "404")],
            "detail=status",
        ),
        (
            "/kpi/auth",
            &[("authorization", "Bearer abc")],
            "detail=authorization",
        ),
    ];
    for (path, headers, detail) in cases {
        let before = up.hits();
        let (a, b) = twice(&gate, path, headers).await;
        assert_ne!(b.cache(), "HIT", "{path} was served from the cache");
        assert_ne!(a.n(), b.n(), "{path}: second reply is the first one again");
        assert!(
            b.header("cache-status").contains(detail),
            "{path}: {}",
            b.header("cache-status")
        );
        assert_eq!(up.hits() - before, 2, "{path}");
    }
    let (_, cookie_req) = twice(&gate, "/kpi/c", &[("cookie", "sid=2")]).await;
    assert_eq!(cookie_req.cache(), "BYPASS");
    // Upstream errors pass back as they are.
    let (err, _) = twice(&gate, "/kpi/e", &[("x-test-status", "503")]).await;
    assert_eq!(err.status, 503);
}

#[tokio::test]
async fn unmatched_get_follows_upstream_cache_control_and_other_methods_bypass() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    let (a, b) = twice(
        &gate,
        "/fresh",
        &[("x-test-cache-control", "public, max-age=60")],
    )
    .await;
    assert_eq!((a.cache(), b.cache()), ("MISS", "HIT"));
    let (_, b) = twice(&gate, "/nofresh", &[]).await;
    assert_eq!(b.cache(), "MISS");
    assert!(b.header("cache-status").contains("detail=no-freshness"));
    let put = gate
        .client
        .put(gate.url("/fresh"))
        .body("x")
        .send()
        .await
        .unwrap();
    let put = common::Reply::from(put).await;
    assert_eq!(put.cache(), "BYPASS");
    assert_eq!(put.json()["body"], "x");
    let (_, off) = twice(&gate, "/off/x", &[]).await;
    assert_eq!(off.cache(), "BYPASS");
    assert!(off.header("cache-status").contains("detail=route-disabled"));
}

#[tokio::test]
async fn bad_bodies_pass_through_untouched_and_uncached() {
    let up = Upstream::start().await;
    let gate = gate_with_cache(&up, "max_request_body_bytes = 64").await;
    let malformed = "{\"name\": \"Ada\", oops";
    for _ in 0..2 {
        let r = gate.post_json("/api/natal/chart", malformed).await;
        assert_eq!(r.cache(), "BYPASS");
        assert!(r.header("cache-status").contains("detail=malformed-body"));
        assert_eq!(
            r.json()["body"],
            malformed,
            "the upstream got the body as sent"
        );
    }
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(5000));
    let r = gate.post_json("/api/natal/chart", &big).await;
    assert_eq!(r.cache(), "BYPASS");
    assert!(r.header("cache-status").contains("detail=oversized-body"));
    assert_eq!(r.json()["body"], big.as_str());
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn kill_switch_and_rollout() {
    let up = Upstream::start().await;
    let off = gate_with_cache(&up, "enabled = false").await;
    let (_, b) = twice(&off, "/kpi/k", &[]).await;
    assert_eq!(b.cache(), "BYPASS");
    assert!(b.header("cache-status").contains("detail=disabled"));

    let gate = Gate::start(&up, None, ROUTES).await;
    gate.switches().set_enabled(false);
    assert_eq!(twice(&gate, "/kpi/live", &[]).await.1.cache(), "BYPASS");
    gate.switches().set_enabled(true);
    assert_eq!(twice(&gate, "/kpi/live", &[]).await.1.cache(), "HIT");

    let half = gate_with_cache(&up, "rollout_percent = 50").await;
    let (mut cached, mut bypassed) = (0, 0);
    for i in 0..40 {
        let path = format!("/kpi/r{i}");
        let (a, b) = twice(&half, &path, &[]).await;
        match (a.cache(), b.cache()) {
            ("MISS", "HIT") => cached += 1,
            ("BYPASS", "BYPASS") => bypassed += 1,
            other => panic!("{path}: rollout not deterministic by key: {other:?}"),
        }
    }
    assert!(
        cached > 5 && bypassed > 5,
        "cached {cached}, bypassed {bypassed}"
    );

    let none = gate_with_cache(&up, "rollout_percent = 0").await;
    let (_, b) = twice(&none, "/kpi/z", &[]).await;
    assert!(b.header("cache-status").contains("detail=rollout"));
}

#[tokio::test]
async fn metrics_and_stats_count_requests() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    twice(&gate, "/kpi/m", &[]).await;
    twice(&gate, "/kpi/p", &[("authorization", "x")]).await;
    let text = gate.metrics().await;
    for line in [
        "cachegate_requests_total{status=\"hit\",reason=\"memory\"} 1",
        "cachegate_requests_total{status=\"miss\",reason=\"stored\"} 1",
        "cachegate_requests_total{status=\"bypass\",reason=\"authorization\"} 2",
        "cachegate_hits_total{tier=\"memory\"} 1",
        "cachegate_memory_entries 1",
        "cachegate_upstream_duration_seconds_count 3",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    let stats = gate.stats().await;
    assert_eq!(stats["requests"]["total"], 4);
    assert_eq!(stats["requests"]["by_status"]["hit"]["total"], 1);
    assert_eq!(stats["hits_by_tier"]["memory"], 1);
    assert_eq!(stats["enabled"], true);
    assert_eq!(stats["rollout_percent"], 100);
    assert_eq!(stats["redis"]["configured"], false);
    let health = common::admin_text(&gate.client, &gate.admin, "/healthz").await;
    assert_eq!(health.trim(), "ok");
}

#[tokio::test]
async fn upstream_failures_are_502_and_504() {
    // Nothing listens on this port.
    let dead = common::free_port();
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:{dead}\"\n"
    );
    let config = cachegate::config::Config::from_toml(&toml, None)
        .unwrap()
        .finish(&Default::default(), |_| None)
        .unwrap();
    let running = cachegate::server::start(config).await.unwrap();
    let client = common::client();
    let r = client
        .get(format!("http://{}/kpi/x", running.listen_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.text().await.unwrap(), "upstream unreachable");

    let up = Upstream::start().await;
    let slow = Gate::start(&up, None, ROUTES).await; // response_timeout_ms = 3000
    let r = slow
        .client
        .get(slow.url("/kpi/too-slow"))
        .header("x-test-delay-ms", "4000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_and_forwarded_for_added() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    let r = gate
        .client
        .get(gate.url("/echo"))
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("x-end-to-end", "2")
        .send()
        .await
        .unwrap();
    let r = common::Reply::from(r).await;
    let seen = &r.json()["headers"];
    assert!(seen.get("x-hop").is_none(), "{seen}");
    assert_eq!(seen["x-end-to-end"], "2");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
}

#[tokio::test]
async fn large_responses_stream_through_uncached() {
    let up = Upstream::start().await;
    let gate = gate_with_cache(&up, "max_response_body_bytes = 1000").await;
    let (a, b) = twice(&gate, "/kpi/big", &[("x-test-body-bytes", "5000")]).await;
    assert_eq!(a.body.len(), 5000);
    assert_eq!(b.cache(), "MISS");
    assert!(b.header("cache-status").contains("detail=too-large"));
}

#[tokio::test]
async fn concurrent_private_responses_are_not_shared_with_waiters() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let req = gate
            .client
            .get(gate.url("/kpi/mine"))
            .header("x-test-delay-ms", "300")
            .header("x-test-set-cookie", "sid=secret");
        tasks.push(tokio::spawn(async move {
            common::Reply::from(req.send().await.unwrap()).await
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for t in tasks {
        let reply = t.await.unwrap();
        assert_eq!(reply.status, 200);
        assert!(
            seen.insert(reply.n()),
            "two clients got the same private response"
        );
    }
    assert_eq!(up.hits(), 20);
}

#[tokio::test]
async fn client_no_cache_cannot_force_recomputation() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    let (_, b) = twice(
        &gate,
        "/kpi/expensive",
        &[("cache-control", "no-cache"), ("pragma", "no-cache")],
    )
    .await;
    assert_eq!(b.cache(), "HIT");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn routes_choose_the_query_parameters_and_headers_in_the_key() {
    let up = Upstream::start().await;
    let gate = Gate::start(
        &up,
        None,
        r#"
[[routes]]
method = "GET"
path = "/report"
ttl_secs = 60
key_query = ["from", "to"]
key_headers = ["Accept-Language"]

[[routes]]
method = "GET"
path = "/me"
ttl_secs = 60
key_headers = ["authorization"]
"#,
    )
    .await;
    let lang = |l: &'static str| [("accept-language", l)];
    let g = &gate;
    let cache = |path: &'static str, l: &'static str| async move {
        send(g, path, &lang(l)).await.cache().to_string()
    };
    assert_eq!(cache("/report?from=1&to=2&utm=a", "de").await, "MISS");
    // A parameter outside key_query does not change the key; one inside does.
    assert_eq!(cache("/report?to=2&from=1&utm=b", "de").await, "HIT");
    assert_eq!(cache("/report?from=1&to=3", "de").await, "MISS");
    // A keyed header does.
    assert_eq!(cache("/report?from=1&to=2", "fr").await, "MISS");

    // Credentials in the key: one entry per token, never shared across tokens.
    let alice = [("authorization", "Bearer alice")];
    let bob = [("authorization", "Bearer bob")];
    let (a1, a2) = twice(&gate, "/me", &alice).await;
    assert_eq!((a1.cache(), a2.cache()), ("MISS", "HIT"));
    let (b1, _) = twice(&gate, "/me", &bob).await;
    assert_eq!(b1.cache(), "MISS");
    assert_ne!(b1.body, a1.body);
}

#[tokio::test]
async fn client_conditionals_are_answered_by_the_cache() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    let etag = ("x-test-etag", "\"v1\"");
    // A conditional first request still fetches (and stores) the full response; the client
    // that has it gets a 304.
    let first = send(&gate, "/kpi/etag", &[etag, ("if-none-match", "\"v1\"")]).await;
    assert_eq!((first.status, first.cache()), (304, "MISS"));
    assert!(first.body.is_empty());
    assert_eq!(first.header("etag"), "\"v1\"");
    // Another client without the validator gets the full stored response, not a 304.
    let full = send(&gate, "/kpi/etag", &[etag]).await;
    assert_eq!((full.status, full.cache()), (200, "HIT"));
    assert_eq!(full.json()["path"], "/kpi/etag");
    assert!(full.json()["headers"].get("if-none-match").is_none());
    // A matching validator on a hit: 304; a stale one: the full response.
    let again = send(&gate, "/kpi/etag", &[("if-none-match", "W/\"v1\"")]).await;
    assert_eq!((again.status, again.cache()), (304, "HIT"));
    let other = send(&gate, "/kpi/etag", &[("if-none-match", "\"v0\"")]).await;
    assert_eq!(other.status, 200);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn range_requests_pass_through_and_partial_responses_are_not_stored() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, ROUTES).await;
    let part = send(&gate, "/kpi/range", &[("range", "bytes=0-0")]).await;
    assert_eq!((part.status, part.cache()), (206, "BYPASS"));
    assert!(part.header("cache-status").contains("detail=range"));
    let full = send(&gate, "/kpi/range", &[]).await;
    assert_eq!((full.status, full.cache()), (200, "MISS"));
}

#[tokio::test]
async fn a_route_may_store_other_statuses_and_head_is_its_own_entry() {
    let up = Upstream::start().await;
    let gate = Gate::start(
        &up,
        None,
        r#"
[[routes]]
method = "GET"
path = "/lookup/*"
ttl_secs = 60
cache_statuses = [200, 404]
"#,
    )
    .await;
    let not_found = [("x-test-status", "404")];
    let (a, b) = twice(&gate, "/lookup/missing", &not_found).await;
    assert_eq!((a.status, a.cache()), (404, "MISS"));
    assert_eq!((b.status, b.cache()), (404, "HIT"));
    let gone = [("x-test-status", "410")];
    assert_eq!(twice(&gate, "/lookup/gone", &gone).await.1.cache(), "MISS");

    // Unmatched HEAD follows Cache-Control like GET, under its own key.
    let fresh = ("x-test-cache-control", "max-age=60");
    let head = || async {
        let req = gate.client.head(gate.url("/h")).header(fresh.0, fresh.1);
        common::Reply::from(req.send().await.unwrap()).await
    };
    assert_eq!(head().await.cache(), "MISS");
    let hit = head().await;
    assert_eq!(hit.cache(), "HIT");
    assert!(hit.body.is_empty());
    let get = send(&gate, "/h", &[fresh]).await;
    assert_eq!(
        get.cache(),
        "MISS",
        "GET must not be answered with the HEAD entry"
    );
    assert!(!get.body.is_empty());
}

/// Connections served on connection threads (two per CPU by default, or a set number) and
/// on the shared runtime (`connection_threads = 0`) behave alike: a stampede over many
/// connections is one upstream request, and a shutdown lets the request in progress finish.
#[tokio::test]
async fn connection_threads_or_the_shared_runtime_serve_alike() {
    // Two per CPU by default.
    let default = 2 * std::thread::available_parallelism().map_or(1, |n| n.get());
    for (threads, expected) in [
        ("", default),
        ("connection_threads = 0", 0),
        ("connection_threads = 3", 3),
    ] {
        let up = Upstream::start().await;
        let mut gate = Gate::start(&up, None, &format!("[server]\n{threads}\n{ROUTES}")).await;
        // Three idle connections: spread over the threads, one per thread while there are
        // fewer connections than threads, and counted per thread.
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(tokio::net::TcpStream::connect(gate.addr()).await.unwrap());
        }
        let spread = |counts: &[i64]| {
            counts.len() == expected
                && counts.iter().sum::<i64>() == if expected == 0 { 0 } else { 3 }
                && counts.iter().max() <= Some(&(3_u64.div_ceil(expected.max(1) as u64) as i64))
        };
        assert!(
            eventually(Duration::from_secs(5), || async {
                spread(&gate.thread_connections().await)
            })
            .await,
            "{threads:?}: {:?}",
            gate.thread_connections().await
        );
        drop(idle);
        let requests = (0..12).map(|_| {
            // A client each: twelve connections.
            let (client, url) = (common::client(), gate.url("/kpi/stampede"));
            async move {
                let resp = client
                    .get(url)
                    .header("x-test-delay-ms", "200")
                    .send()
                    .await
                    .unwrap();
                (resp.status().as_u16(), resp.text().await.unwrap())
            }
        });
        let replies = futures_util::future::join_all(requests).await;
        assert_eq!(up.hits(), 1, "{threads:?}");
        assert!(
            replies.iter().all(|r| r.0 == 200 && r.1 == replies[0].1),
            "{threads:?}: {replies:?}"
        );
        assert_eq!(gate.get("/kpi/stampede").await.cache(), "HIT");
        // A slow request in progress when shutdown starts gets its answer.
        let slow = {
            let (client, url) = (gate.client.clone(), gate.url("/kpi/slow"));
            tokio::spawn(async move {
                client
                    .get(url)
                    .header("x-test-delay-ms", "300")
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        };
        assert!(eventually(Duration::from_secs(5), || async { up.hits() == 2 }).await);
        let shutdown = gate.running.take().unwrap().shutdown();
        tokio::time::timeout(Duration::from_secs(15), shutdown)
            .await
            .expect("shutdown ends");
        assert_eq!(slow.await.unwrap().unwrap(), 200, "{threads:?}");
    }
}

#[test]
fn settings_past_their_bounds_are_config_errors() {
    for (setting, expected) in [
        (
            "[server]\nconnection_threads = 1025\n",
            "server.connection_threads: at most 1024",
        ),
        (
            "[admin]\nack_timeout_ms = 60001\n",
            "admin.ack_timeout_ms: at most 60000, found 60001",
        ),
    ] {
        let toml = format!("{setting}[upstream]\nurl = \"http://127.0.0.1:1\"\n");
        let err = cachegate::config::Config::from_toml(&toml, None)
            .unwrap()
            .finish(&Default::default(), |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{err}");
    }
}
