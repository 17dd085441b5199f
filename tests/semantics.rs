//! HTTP caching semantics (RFC 9111, RFC 5861, RFC 9213) against a scripted upstream: each
//! scenario says what the upstream answers to its n-th request and checks what clients get
//! and what the upstream received.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::raw::{RawUpstream, Script};
use common::{Gate, Redis, Reply, eventually};

/// A response with `status`, `headers` and `body`, framed by Content-Length.
fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> Script {
    let mut s = format!(
        "HTTP/1.1 {status} Scripted\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        s.push_str(&format!("{name}: {value}\r\n"));
    }
    s.push_str("\r\n");
    s.push_str(body);
    Script::Reply(s.into_bytes())
}

/// A scripted upstream that also records the head of every request it receives.
async fn scripted<F>(script: F) -> (RawUpstream, Arc<Mutex<Vec<String>>>)
where
    F: Fn(usize) -> Script + Send + Sync + 'static,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let up = RawUpstream::start(move |head, n| {
        record.lock().unwrap().push(head.to_ascii_lowercase());
        script(n)
    })
    .await;
    (up, seen)
}

fn header_num(reply: &Reply, name: &str) -> u64 {
    reply
        .header(name)
        .parse()
        .unwrap_or_else(|_| panic!("{name}: {:?}", reply.header(name)))
}

// 1. Freshness (RFC 9111 §4.2): the age the response arrived with counts.
#[tokio::test]
async fn age_counts_the_age_the_response_arrived_with() {
    let (up, _) = scripted(|_| {
        reply(
            200,
            &[("cache-control", "max-age=100"), ("age", "30")],
            "aged",
        )
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    let first = gate.get("/aged").await;
    assert_eq!(first.cache(), "MISS");
    let hit = gate.get("/aged").await;
    assert_eq!(hit.cache(), "HIT");
    // Age is the current age: 30 on arrival plus the time stored (§4.2.3, §5.1).
    let age = header_num(&hit, "age");
    assert!((30..=32).contains(&age), "age {age}");
    // 70 s of freshness were left, not 100.
    let status = hit.header("cache-status");
    let ttl: u64 = status
        .split(';')
        .find_map(|p| p.trim().strip_prefix("ttl="))
        .unwrap()
        .parse()
        .unwrap();
    assert!((68..=70).contains(&ttl), "{status}");
    assert_eq!(up.requests(), 1);

    // A Date in the past without Age: the apparent age counts too.
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(40));
    let (old, _) = scripted(move |_| {
        reply(
            200,
            &[("cache-control", "max-age=100"), ("date", &date)],
            "old",
        )
    })
    .await;
    let gate = Gate::start_at(&old.url(), None, "", "").await;
    gate.get("/old").await;
    let age = header_num(&gate.get("/old").await, "age");
    assert!((40..=42).contains(&age), "age {age}");
}

// 1. Heuristically cacheable statuses with explicit freshness are stored; heuristic
// freshness is an option, off by default.
#[tokio::test]
async fn statuses_and_heuristic_freshness() {
    let modified =
        httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(20 * 86_400));
    let script = move |status: u16, cc: &'static str| {
        let modified = modified.clone();
        move |_| {
            let mut headers = vec![("last-modified", modified.as_str())];
            if !cc.is_empty() {
                headers.push(("cache-control", cc));
            }
            reply(status, &headers, "x")
        }
    };
    for (status, cc, heuristic, stored) in [
        (404, "max-age=60", false, true),
        (410, "max-age=60", false, true),
        (302, "max-age=60", false, false),
        (503, "max-age=60", false, false),
        (200, "", false, false),
        (200, "", true, true),
        (404, "", true, true),
    ] {
        let (up, _) = scripted(script(status, cc)).await;
        let config = format!("[cache]\nheuristic_freshness = {heuristic}\n");
        let gate = Gate::start_at(&up.url(), None, &config, "").await;
        gate.get("/s").await;
        let again = gate.get("/s").await;
        let expected = if stored { "HIT" } else { "MISS" };
        assert_eq!(
            again.cache(),
            expected,
            "{status} {cc:?} heuristic={heuristic}"
        );
        if stored && cc.is_empty() {
            // A tenth of 20 days, capped at a day.
            assert!(
                again.header("cache-status").contains("ttl=86"),
                "{}",
                again.header("cache-status")
            );
        }
    }
}

// 5. Targeted cache control (RFC 9213) takes precedence and is not forwarded.
#[tokio::test]
async fn targeted_cache_control_wins_and_stays_with_cachegate() {
    let (up, _) = scripted(|_| {
        reply(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=60"),
            ],
            "cdn",
        )
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    let first = gate.get("/cdn").await;
    assert_eq!(first.cache(), "MISS");
    assert_eq!(first.header("cache-control"), "no-store");
    assert_eq!(first.header("cdn-cache-control"), "");
    let hit = gate.get("/cdn").await;
    assert_eq!(hit.cache(), "HIT");
    assert_eq!(hit.header("cdn-cache-control"), "");
    assert_eq!(up.requests(), 1);

    // Cachegate-Cache-Control is the more specific: it wins over CDN-Cache-Control.
    let (up, _) = scripted(|_| {
        reply(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "max-age=60"),
                ("cachegate-cache-control", "no-store"),
            ],
            "ours",
        )
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    gate.get("/ours").await;
    assert_eq!(gate.get("/ours").await.cache(), "MISS");
    assert_eq!(up.requests(), 2);

    // Configured to forward them, clients see them.
    let (up, _) = scripted(|_| reply(200, &[("cdn-cache-control", "max-age=60")], "fwd")).await;
    let config = "[cache]\nforward_targeted_cache_control = true\n";
    let gate = Gate::start_at(&up.url(), None, config, "").await;
    assert_eq!(
        gate.get("/fwd").await.header("cdn-cache-control"),
        "max-age=60"
    );
}

// 6. stale-while-revalidate: 100 concurrent stale hits, one background request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    // The first answer arrives already stale (Age past max-age) within its
    // stale-while-revalidate window; the refresh brings a fresh one.
    let (up, seen) = scripted(|n| {
        if n == 0 {
            reply(
                200,
                &[
                    ("cache-control", "max-age=10, stale-while-revalidate=600"),
                    ("age", "20"),
                ],
                "v1",
            )
        } else {
            reply(200, &[("cache-control", "max-age=600")], "v2")
        }
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    assert_eq!(gate.get("/kpi").await.cache(), "MISS");
    let requests = (0..100).map(|_| gate.get("/kpi"));
    let replies = futures_util::future::join_all(requests).await;
    let stale = replies.iter().filter(|r| r.cache() == "STALE").count();
    assert!(stale >= 1, "no stale answer");
    for r in &replies {
        match r.cache() {
            "STALE" => {
                assert_eq!(r.body, "v1");
                let status = r.header("cache-status");
                assert!(status.contains("fwd=stale"), "{status}");
                assert!(status.contains("detail=stale-while-revalidate"), "{status}");
                assert!(header_num(r, "age") >= 20);
            }
            "HIT" => assert_eq!(r.body, "v2"),
            other => panic!("{other}"),
        }
    }
    let refreshed = eventually(Duration::from_secs(5), || async {
        gate.get("/kpi").await.cache() == "HIT"
    });
    assert!(refreshed.await);
    assert_eq!(gate.get("/kpi").await.body, "v2");
    // Exactly one background request, whatever the number of stale hits.
    assert_eq!(up.requests(), 2, "{:?}", seen.lock().unwrap());
    let stats = gate.stats().await;
    assert_eq!(stats["background_refreshes"]["stored"], 1, "{stats}");
    // Counted by reason (the wait for the refresh may have met more stale answers).
    let counted = stats["requests"]["by_status"]["stale"]["by_reason"]["stale-while-revalidate"]
        .as_u64()
        .unwrap();
    assert!(counted >= stale as u64, "{stats}");
}

// 6. stale-if-error: an upstream error or an upstream that is gone gets the stale entry.
#[tokio::test]
async fn stale_if_error_answers_upstream_errors_with_the_stale_entry() {
    let (up, _) = scripted(|n| match n {
        0 => reply(
            200,
            &[
                ("cache-control", "max-age=10, stale-if-error=600"),
                ("age", "20"),
            ],
            "last good",
        ),
        1 => reply(503, &[], "down for maintenance"),
        _ => Script::ReplyAndClose(Vec::new()),
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    assert_eq!(gate.get("/report").await.body, "last good");
    // 503 from the upstream: the stale entry instead.
    let r = gate.get("/report").await;
    assert_eq!(
        (r.status, r.cache(), r.body.as_str()),
        (200, "STALE", "last good")
    );
    let status = r.header("cache-status");
    assert!(status.contains("fwd-status=503"), "{status}");
    assert!(status.contains("detail=stale-if-error"), "{status}");
    // No answer at all: the stale entry again (when the GET went over the pooled
    // connection, it was sent once more on a new one, which closed too).
    let r = gate.get("/report").await;
    assert_eq!(
        (r.status, r.cache(), r.body.as_str()),
        (200, "STALE", "last good")
    );
    let retries = gate.stats().await["upstream_retries"].as_u64().unwrap();
    assert!(retries <= 1, "{retries}");
    assert_eq!(up.requests(), 3 + retries as usize);

    // must-revalidate forbids serving it stale: the error goes through.
    let (up, _) = scripted(|n| match n {
        0 => reply(
            200,
            &[
                (
                    "cache-control",
                    "max-age=10, stale-if-error=600, must-revalidate",
                ),
                ("age", "20"),
            ],
            "strict",
        ),
        _ => reply(503, &[], "down"),
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    gate.get("/strict").await;
    let r = gate.get("/strict").await;
    assert_eq!((r.status, r.cache()), (503, "MISS"));
}

/// The stale-if-error window is judged when the error is answered, not when the request
/// came: an upstream that takes its whole timeout to fail may carry the entry past it.
#[tokio::test]
async fn stale_if_error_is_judged_when_the_error_arrives() {
    let (up, _) = scripted(|n| match n {
        // Stale by 10 s when it arrives, usable for 12 s past its freshness.
        0 => reply(
            200,
            &[
                ("cache-control", "max-age=10, stale-if-error=12"),
                ("age", "20"),
            ],
            "last good",
        ),
        // No answer: the upstream's response timeout (3 s) runs out.
        _ => Script::Stall(Vec::new()),
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    assert_eq!(gate.get("/report").await.body, "last good");
    // Within the window when looked up (about 10 s stale), past it (13 s) when the
    // timeout ends: the error goes through.
    let r = gate.get("/report").await;
    assert_eq!(r.status, 504, "{} {}", r.cache(), r.body);
}

// 6. Route options: stale windows set by the route, whatever the response says.
#[tokio::test]
async fn route_stale_options_apply_without_response_directives() {
    let (up, _) = scripted(|n| match n {
        0 => reply(200, &[("age", "0")], "route v1"),
        _ => reply(502, &[], "bad gateway"),
    })
    .await;
    let config =
        "[[routes]]\nmethod = \"GET\"\npath = \"/r/*\"\nttl_secs = 1\nstale_if_error_secs = 600\n";
    let gate = Gate::start_at(&up.url(), None, config, "").await;
    gate.get("/r/x").await;
    let stale = eventually(Duration::from_secs(5), || async {
        gate.get("/r/x").await.cache() == "STALE"
    });
    assert!(stale.await, "the route's stale-if-error did not apply");
}

// 7. Refresh-ahead keeps a key always HIT under steady load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_keeps_a_hot_key_a_hit() {
    let (up, _) = scripted(|n| reply(200, &[], &format!("v{n}"))).await;
    let config =
        "[[routes]]\nmethod = \"GET\"\npath = \"/kpi/*\"\nttl_secs = 2\nrefresh_ahead = 0.5\n";
    let gate = Gate::start_at(&up.url(), None, config, "").await;
    assert_eq!(gate.get("/kpi/leads").await.cache(), "MISS");
    let started = Instant::now();
    let mut bodies = std::collections::BTreeSet::new();
    // Twice the TTL of steady load: every answer a hit, the entry refreshed meanwhile.
    while started.elapsed() < Duration::from_secs(4) {
        let r = gate.get("/kpi/leads").await;
        assert_eq!(r.cache(), "HIT", "after {:?}", started.elapsed());
        bodies.insert(r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(bodies.len() >= 2, "never refreshed: {bodies:?}");
    assert!(up.requests() >= 2);
}

// 4. Unsafe methods invalidate their target (and Location) on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_invalidate_their_target_on_every_replica() {
    // GETs are cacheable; a POST answers 201 with a Location, a PUT to /fail answers 500.
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = counter.clone();
    let up = RawUpstream::start(move |head, _| {
        let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if head.starts_with("GET") {
            reply(200, &[("cache-control", "max-age=600")], &format!("v{n}"))
        } else if head.starts_with("PUT /items/1") {
            reply(500, &[], "failed")
        } else if head.starts_with("POST /items/5") {
            // A relative reference (RFC 3986 §4.2), resolved against /items/5.
            reply(201, &[("location", "4?x=1")], "")
        } else {
            reply(201, &[("location", "/items/2")], "")
        }
    })
    .await;
    let redis = Redis::start().await;
    let a = Gate::start_at(&up.url(), Some(redis.config_table()), "", "").await;
    let b = Gate::start_at(&up.url(), Some(redis.config_table()), "", "").await;
    let subscribed = eventually(Duration::from_secs(5), || async {
        redis.subscribers("cachegate:invalidate").await >= 2
    });
    assert!(subscribed.await);
    for gate in [&a, &b] {
        for path in ["/items/1", "/items/2", "/items/3"] {
            gate.get(path).await;
            assert_eq!(gate.get(path).await.cache(), "HIT", "{path}");
        }
    }
    // A failed unsafe request invalidates nothing.
    let put = a.client.put(a.url("/items/1")).send().await.unwrap();
    assert_eq!(put.status(), 500);
    assert_eq!(a.get("/items/1").await.cache(), "HIT");
    // A successful one invalidates its target and its Location, here and on b.
    let post = a.client.post(a.url("/items/1")).send().await.unwrap();
    assert_eq!(post.status(), 201);
    assert_eq!(a.get("/items/1").await.cache(), "MISS");
    assert_eq!(a.get("/items/2").await.cache(), "MISS");
    assert_eq!(a.get("/items/3").await.cache(), "HIT");
    let reached_b = eventually(Duration::from_secs(5), || async {
        // a stored new answers: b must not serve the ones from before the POST.
        b.get("/items/2").await.body != "v1"
    });
    assert!(reached_b.await);
    assert_eq!(b.get("/items/3").await.cache(), "HIT");
    a.get("/items/4?x=1").await;
    assert_eq!(a.get("/items/4?x=1").await.cache(), "HIT");
    let post = a.client.post(a.url("/items/5")).send().await.unwrap();
    assert_eq!(post.status(), 201);
    assert_eq!(a.get("/items/4?x=1").await.cache(), "MISS");
    assert_eq!(a.get("/items/3").await.cache(), "HIT");
}

// Route POST caching by body is a lookup, not an invalidation.
#[tokio::test]
async fn a_body_keyed_post_route_is_a_lookup_not_an_invalidation() {
    let up = common::Upstream::start().await;
    let config = "[[routes]]\nmethod = \"GET\"\npath = \"/api/*\"\nttl_secs = 600\n\n[[routes]]\nmethod = \"POST\"\npath = \"/api/chart\"\nttl_secs = 600\nkey_body = true\n";
    let gate = Gate::start(&up, None, config).await;
    gate.get("/api/chart").await;
    assert_eq!(gate.get("/api/chart").await.cache(), "HIT");
    gate.post_json("/api/chart", r#"{"a":1}"#).await;
    assert_eq!(
        gate.post_json("/api/chart", r#"{"a":1}"#).await.cache(),
        "HIT"
    );
    assert_eq!(gate.get("/api/chart").await.cache(), "HIT");
}

// 2. Validation (RFC 9111 §4.3): a stale entry with a validator is revalidated, and a 304
// refreshes its headers and freshness.
#[tokio::test]
async fn stale_entries_are_revalidated_and_304_updates_them() {
    let (up, seen) = scripted(|n| match n {
        // Arrives stale (Age past max-age): kept only to be revalidated.
        0 => reply(
            200,
            &[
                ("cache-control", "max-age=1"),
                ("age", "5"),
                ("etag", "\"v1\""),
                ("x-version", "1"),
                ("content-type", "text/plain"),
            ],
            "full body",
        ),
        _ => reply(
            304,
            &[
                ("cache-control", "max-age=600"),
                ("etag", "\"v1\""),
                ("x-version", "2"),
            ],
            "",
        ),
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    let first = gate.get("/doc").await;
    assert_eq!((first.cache(), first.body.as_str()), ("MISS", "full body"));
    let second = gate.get("/doc").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, "full body");
    assert_eq!(second.cache(), "HIT");
    assert_eq!(
        second.header("x-version"),
        "2",
        "the 304's headers replace the stored ones"
    );
    assert_eq!(second.header("content-type"), "text/plain");
    let status = second.header("cache-status");
    assert!(
        status.contains("fwd-status=304") && status.contains("detail=revalidated"),
        "{status}"
    );
    {
        let seen = seen.lock().unwrap();
        assert!(!seen[0].contains("if-none-match"), "{}", seen[0]);
        assert!(seen[1].contains("if-none-match: \"v1\""), "{}", seen[1]);
    }
    // Fresh again for 600 s: a plain hit.
    let third = gate.get("/doc").await;
    assert_eq!((third.cache(), third.header("x-version")), ("HIT", "2"));
    assert!(third.header("cache-status").contains("ttl="));
    assert_eq!(up.requests(), 2);
    // The client's own conditional is answered by the cache.
    let conditional = gate
        .client
        .get(gate.url("/doc"))
        .header("if-none-match", "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(conditional.status(), 304);
    assert_eq!(up.requests(), 2);
}

/// The answer to a `HEAD` request: the head of a `length`-byte body, without it.
fn head_reply(headers: &[(&str, &str)], length: usize) -> Script {
    let mut s = format!("HTTP/1.1 200 Scripted\r\nContent-Length: {length}\r\n");
    for (name, value) in headers {
        s.push_str(&format!("{name}: {value}\r\n"));
    }
    s.push_str("\r\n");
    Script::Reply(s.into_bytes())
}

/// RFC 9111 §4.3.5: a stored `200` answer to a `HEAD` request whose `ETag` or
/// `Last-Modified` contradicts the stored `GET` response of the target marks that entry
/// stale (on every replica), and it is fetched again; one that agrees with it (by the weak
/// comparison), differs only in length, or is not stored (any client could send it at
/// will) leaves it a hit.
#[tokio::test]
async fn a_head_answer_showing_another_version_marks_the_stored_get_stale() {
    const V1: &str = "version one";
    let cc = ("cache-control", "max-age=600");
    // By request line: a path's GET is answered with version one until its HEAD is
    // answered, then with version two (however many refreshes that takes).
    let headed = Arc::new(Mutex::new(Vec::<String>::new()));
    let up = RawUpstream::start(move |head, _| {
        let line = head.lines().next().unwrap_or("").to_ascii_lowercase();
        let mut words = line.split(' ');
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let mut headed = headed.lock().unwrap();
        if method == "head" {
            headed.push(path.to_string());
            let length = V1.len();
            return match path {
                "/same" => head_reply(&[cc, ("etag", "\"v1\"")], length),
                "/length" => head_reply(&[cc], length + 1),
                "/weak" => head_reply(&[cc, ("etag", "\"v1\"")], length),
                // No freshness: not stored (though it could be shared).
                "/unstored" => head_reply(&[("etag", "\"v2\"")], length),
                "/etag" => head_reply(&[cc, ("etag", "\"v2\"")], length),
                _ => head_reply(
                    &[cc, ("last-modified", "Tue, 03 Nov 2026 10:00:00 GMT")],
                    length,
                ),
            };
        }
        if headed.iter().any(|p| p == path) {
            return reply(200, &[cc, ("etag", "\"v2\"")], "version two");
        }
        match path {
            "/length" => reply(200, &[cc], V1),
            "/weak" => reply(200, &[cc, ("etag", "W/\"v1\"")], V1),
            "/modified" => reply(
                200,
                &[cc, ("last-modified", "Mon, 02 Nov 2026 10:00:00 GMT")],
                V1,
            ),
            _ => reply(200, &[cc, ("etag", "\"v1\"")], V1),
        }
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    let head = |path: &'static str| {
        let req = gate.client.head(gate.url(path));
        async move { Reply::from(req.send().await.unwrap()).await }
    };
    let kept = ["/same", "/length", "/weak", "/unstored"];
    for path in kept {
        assert_eq!(gate.get(path).await.cache(), "MISS", "{path}");
        assert_eq!(head(path).await.status, 200, "{path}");
    }
    for path in ["/etag", "/modified"] {
        assert_eq!(gate.get(path).await.cache(), "MISS", "{path}");
        assert_eq!(gate.get(path).await.cache(), "HIT", "{path}");
        assert_eq!(head(path).await.status, 200, "{path}");
        let renewed = eventually(Duration::from_secs(5), || async {
            gate.get(path).await.body == "version two"
        });
        assert!(
            renewed.await,
            "{path}: the GET entry outlived a HEAD answer about another version"
        );
    }
    // (Checked after the waits above: a purge the first HEADs started has applied.)
    for path in kept {
        let got = gate.get(path).await;
        assert_eq!((got.cache(), got.body.as_str()), ("HIT", V1), "{path}");
    }
}

/// A response whose `Connection` names `Cache-Control`, `Set-Cookie` or another field a
/// cache decides by loses that field as hop-by-hop (RFC 9110 §7.6.1), and is therefore
/// neither stored nor shared, even on a route with its own TTL: it may have said
/// `private`. Naming another field changes nothing.
#[tokio::test]
async fn a_response_naming_its_cache_fields_hop_by_hop_is_not_stored() {
    let (up, _) = scripted(|n| match n {
        0 | 1 => reply(
            200,
            &[
                ("connection", "cache-control"),
                ("cache-control", "private, max-age=600"),
            ],
            "private",
        ),
        2 | 3 => reply(
            200,
            &[("connection", "x-trace, Set-Cookie"), ("set-cookie", "s=1")],
            "cookie",
        ),
        4 | 5 => reply(
            200,
            &[
                ("connection", "cdn-cache-control"),
                ("cdn-cache-control", "no-store"),
            ],
            "cdn",
        ),
        // A tag header lost: stored untagged, purges by tag would miss it.
        6 | 7 => reply(
            200,
            &[("connection", "surrogate-key"), ("surrogate-key", "kpi")],
            "tagged",
        ),
        // `Age` lost: fresher than it is.
        8 | 9 => reply(200, &[("connection", "age"), ("age", "590")], "aged"),
        _ => reply(200, &[("connection", "x-trace"), ("x-trace", "1")], "plain"),
    })
    .await;
    let route = "[[routes]]\nmethod = \"GET\"\npath = \"/r/*\"\nttl_secs = 600\n";
    let gate = Gate::start_at(&up.url(), None, route, "").await;
    for path in ["/r/private", "/r/cookie", "/r/cdn", "/r/tagged", "/r/aged"] {
        let first = gate.get(path).await;
        assert!(first.header("cache-control").is_empty(), "{path}");
        assert!(first.header("set-cookie").is_empty(), "{path}");
        let second = gate.get(path).await;
        assert_eq!(second.cache(), "MISS", "{path}: stored");
        assert!(
            second.header("cache-status").contains("detail=unparsable"),
            "{path}: {}",
            second.header("cache-status")
        );
    }
    assert_eq!(up.requests(), 10);
    assert_eq!(gate.get("/r/plain").await.cache(), "MISS");
    assert_eq!(gate.get("/r/plain").await.cache(), "HIT");

    // A 304 that so lost its `Cache-Control` refreshes nothing: the whole response is
    // fetched again.
    let (up, _) = scripted(|n| match n {
        0 => reply(
            200,
            &[
                ("cache-control", "max-age=1"),
                ("age", "5"),
                ("etag", "\"v1\""),
            ],
            "old",
        ),
        1 => reply(
            304,
            &[
                ("connection", "cache-control"),
                ("cache-control", "private, max-age=600"),
                ("etag", "\"v1\""),
            ],
            "",
        ),
        _ => reply(
            200,
            &[("cache-control", "max-age=600"), ("etag", "\"v2\"")],
            "new",
        ),
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    assert_eq!(gate.get("/doc").await.body, "old");
    let again = gate.get("/doc").await;
    assert_eq!(again.body, "new", "{}", again.header("cache-status"));
    assert_eq!(up.requests(), 3);
}

// 2. `no-cache` with a validator: stored, revalidated on every use.
#[tokio::test]
async fn no_cache_responses_are_revalidated_on_every_use() {
    let (up, seen) = scripted(|n| match n {
        0 => reply(
            200,
            &[
                ("cache-control", "no-cache"),
                ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ],
            "checked",
        ),
        _ => reply(304, &[("cache-control", "no-cache")], ""),
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    assert_eq!(gate.get("/nc").await.cache(), "MISS");
    for _ in 0..2 {
        let r = gate.get("/nc").await;
        assert_eq!((r.cache(), r.body.as_str()), ("HIT", "checked"));
        assert!(r.header("cache-status").contains("detail=revalidated"));
    }
    assert_eq!(up.requests(), 3);
    let third = seen.lock().unwrap()[2].clone();
    assert!(
        third.contains("if-modified-since: sun, 06 nov 1994 08:49:37 gmt"),
        "{third}"
    );
    // Without a validator, no-cache is not stored.
    let (up, _) = scripted(|_| reply(200, &[("cache-control", "no-cache")], "x")).await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    gate.get("/x").await;
    assert_eq!(gate.get("/x").await.cache(), "MISS");
}

/// GET `path` with the given request headers, and the test upstream's steering headers
/// (freshness and `Vary`).
async fn get_varied(gate: &Gate, path: &str, vary: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = gate
        .client
        .get(gate.url(path))
        .header("x-test-cache-control", "max-age=600")
        .header("x-test-vary", vary);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    Reply::from(req.send().await.unwrap()).await
}

/// The value of request header `name` the upstream saw for the answer `reply` carries.
fn seen_by_upstream(reply: &Reply, name: &str) -> String {
    reply.json()["headers"][name]
        .as_str()
        .unwrap_or("<absent>")
        .to_string()
}

// 3. Vary (RFC 9111 §4.1): one variant per value, with two and three headers.
#[tokio::test]
async fn vary_stores_one_variant_per_combination_of_values() {
    let up = common::Upstream::start().await;
    let gate = Gate::start(&up, None, "").await;
    let vary = "Accept-Language, X-Tenant";
    let combos: [&[(&str, &str)]; 5] = [
        &[("accept-language", "de")],
        &[("accept-language", "fr")],
        &[("accept-language", "de"), ("x-tenant", "a")],
        &[("accept-language", "de"), ("x-tenant", "b")],
        &[],
    ];
    for combo in combos {
        let r = get_varied(&gate, "/v2", vary, combo).await;
        assert_eq!(r.cache(), "MISS", "{combo:?}");
        assert!(
            r.header("cache-status").contains("stored"),
            "{}",
            r.header("cache-status")
        );
    }
    let misses = up.hits();
    for combo in combos {
        let r = get_varied(&gate, "/v2", vary, combo).await;
        assert_eq!(r.cache(), "HIT", "{combo:?}");
        for name in ["accept-language", "x-tenant"] {
            let sent = combo
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("<absent>", |(_, v)| v);
            assert_eq!(
                seen_by_upstream(&r, name),
                sent,
                "{combo:?}: another variant served"
            );
        }
    }
    assert_eq!(up.hits(), misses);
    // Values are never merged: another spelling is another variant.
    let r = get_varied(&gate, "/v2", vary, &[("accept-language", "DE")]).await;
    assert_eq!(r.cache(), "MISS");

    // Three headers.
    let vary3 = "accept-language, x-tenant, x-region";
    let a = [
        ("accept-language", "de"),
        ("x-tenant", "a"),
        ("x-region", "eu"),
    ];
    let b = [
        ("accept-language", "de"),
        ("x-tenant", "a"),
        ("x-region", "us"),
    ];
    for combo in [&a, &b] {
        assert_eq!(get_varied(&gate, "/v3", vary3, combo).await.cache(), "MISS");
    }
    for combo in [&a, &b] {
        let r = get_varied(&gate, "/v3", vary3, combo).await;
        assert_eq!(r.cache(), "HIT");
        assert_eq!(seen_by_upstream(&r, "x-region"), combo[2].1);
    }
}

// 3. Vary: * never matches; a route may refuse to vary.
#[tokio::test]
async fn vary_star_never_matches_and_routes_can_refuse_variants() {
    let up = common::Upstream::start().await;
    let config = "[[routes]]\nmethod = \"GET\"\npath = \"/strict/*\"\nttl_secs = 600\nvary_headers = [\"accept-language\"]\n";
    let gate = Gate::start(&up, None, config).await;
    for _ in 0..2 {
        let r = get_varied(&gate, "/star", "*", &[]).await;
        assert_eq!(r.cache(), "MISS");
        assert!(r.header("cache-status").contains("detail=vary"));
    }
    // Accepted by the route: variants.
    get_varied(
        &gate,
        "/strict/a",
        "accept-language",
        &[("accept-language", "de")],
    )
    .await;
    let r = get_varied(
        &gate,
        "/strict/a",
        "accept-language",
        &[("accept-language", "de")],
    )
    .await;
    assert_eq!(r.cache(), "HIT");
    // Not accepted: not stored.
    for _ in 0..2 {
        let r = get_varied(&gate, "/strict/b", "x-tenant", &[("x-tenant", "a")]).await;
        assert_eq!(r.cache(), "MISS");
    }
}

// 3. Concurrent first requests with different values never get each other's variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_their_own_variant() {
    let up = common::Upstream::start().await;
    let gate = Gate::start(&up, None, "").await;
    let requests = (0..20).map(|i| {
        let language = if i % 2 == 0 { "de" } else { "fr" };
        let gate = &gate;
        async move {
            let headers = [("accept-language", language), ("x-test-delay-ms", "200")];
            (
                language,
                get_varied(gate, "/race", "accept-language", &headers).await,
            )
        }
    });
    for (language, reply) in futures_util::future::join_all(requests).await {
        assert_eq!(seen_by_upstream(&reply, "accept-language"), language);
    }
    // Still one upstream request per variant: the waiters of the other variant coalesce
    // on it.
    assert_eq!(up.hits(), 2);
}

// 3. An answer that varies but is not stored (an error, no freshness) leaves its waiters
// to one flight per variant: one upstream request per variant after the first, not one per
// waiter, when an upstream in trouble says `Vary: Accept-Encoding` on its 503s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_share_an_unstored_varying_answer_per_variant() {
    let up = common::Upstream::start().await;
    let gate = Gate::start(&up, None, "").await;
    // A 503, and a 200 without freshness: neither stored.
    for (path, status) in [("/down", 503), ("/nofresh", 200)] {
        let before = up.hits();
        let requests = (0..20).map(|i| {
            let encoding = if i % 2 == 0 { "gzip" } else { "br" };
            let req = gate
                .client
                .get(gate.url(path))
                .header("accept-encoding", encoding)
                .header("x-test-vary", "accept-encoding")
                .header("x-test-status", status.to_string())
                .header("x-test-delay-ms", "1000");
            async move { (encoding, Reply::from(req.send().await.unwrap()).await) }
        });
        for (encoding, reply) in futures_util::future::join_all(requests).await {
            assert_eq!(reply.status, status, "{path}");
            assert_eq!(
                seen_by_upstream(&reply, "accept-encoding"),
                encoding,
                "{path}"
            );
        }
        // The first request, then one per variant (the waiters cannot tell which variant
        // the first one selected): 3, not 20.
        let sent = up.hits() - before;
        assert!(sent <= 3, "{path}: {sent} upstream requests");
    }
}

// 3 and 6. A background refresh of a variant refreshes that variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_variant_is_refreshed_as_that_variant() {
    let up = RawUpstream::start(|head, n| {
        let language = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("accept-language: ")
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "none".into());
        reply(
            200,
            &[
                ("vary", "accept-language"),
                ("cache-control", "max-age=1, stale-while-revalidate=600"),
            ],
            &format!("{language} {n}"),
        )
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    let get = |language: &'static str| {
        let req = gate
            .client
            .get(gate.url("/sv"))
            .header("accept-language", language);
        async move { Reply::from(req.send().await.unwrap()).await }
    };
    assert_eq!(get("fr").await.body, "fr 0");
    let refreshed = eventually(Duration::from_secs(10), || async {
        let r = get("fr").await;
        // Stale, then refreshed in the background: a later answer, still French.
        assert!(r.body.starts_with("fr "), "{}", r.body);
        r.body != "fr 0"
    });
    assert!(refreshed.await, "the French variant was never refreshed");
}

// 8. The request's Cache-Control: ignored by default, honoured where a route opts in.
#[tokio::test]
async fn request_cache_control_is_opt_in_per_route() {
    let (up, _) = scripted(|n| {
        reply(
            200,
            &[
                ("cache-control", "max-age=10"),
                ("age", if n == 0 { "15" } else { "0" }),
            ],
            &format!("v{n}"),
        )
    })
    .await;
    let config = "[[routes]]\nmethod = \"GET\"\npath = \"/open/*\"\nttl_secs = 2\nstale_if_error_secs = 60\nrequest_cache_control = [\"no-cache\", \"only-if-cached\", \"max-stale\", \"min-fresh\"]\n";
    let gate = Gate::start_at(&up.url(), None, config, "").await;
    let get = |path: &'static str, cc: &'static str| {
        let req = gate.client.get(gate.url(path)).header("cache-control", cc);
        async move { Reply::from(req.send().await.unwrap()).await }
    };
    // Unrouted: a client's no-cache does not force a recomputation (the first answer
    // arrives stale and is not stored; the second is).
    get("/closed", "").await;
    assert_eq!(get("/closed", "").await.cache(), "MISS");
    assert_eq!(get("/closed", "no-cache").await.cache(), "HIT");
    // only-if-cached with nothing stored: 504, the upstream not asked.
    let before = up.requests();
    let r = get("/open/a", "only-if-cached").await;
    assert_eq!(r.status, 504);
    assert_eq!(up.requests(), before);
    // Stored, then no-cache fetches again; min-fresh beyond what is left fetches again.
    get("/open/a", "").await;
    assert_eq!(get("/open/a", "").await.cache(), "HIT");
    let before = up.requests();
    assert_eq!(get("/open/a", "no-cache").await.cache(), "MISS");
    assert_eq!(up.requests(), before + 1);
    assert_eq!(get("/open/a", "only-if-cached").await.cache(), "HIT");
    assert_eq!(get("/open/a", "min-fresh=100").await.cache(), "MISS");
    // max-stale: a stale entry (kept for its stale-if-error window) is served, marked so.
    let stale = eventually(Duration::from_secs(5), || async {
        let r = get("/open/a", "max-stale=60").await;
        r.cache() == "STALE" && r.header("cache-status").contains("detail=max-stale")
    });
    assert!(stale.await);
}

#[test]
fn unknown_request_directives_are_config_errors() {
    let toml = "[upstream]\nurl = \"http://127.0.0.1:1\"\n[[routes]]\nmethod = \"GET\"\npath = \"/a\"\nttl_secs = 5\nrequest_cache_control = [\"max-age\"]\n";
    let err = cachegate::config::Config::from_toml(toml, None)
        .unwrap()
        .finish(&Default::default(), |_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("routes[0].request_cache_control"), "{err}");
}

// 6. stale-if-error also answers requests that waited on a background refresh that got
// the error (the refresh itself has no stale entry to fall back on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_answers_the_waiters_of_a_failed_refresh() {
    let (up, _) = scripted(|n| match n {
        // Arrives 10 s stale: 1 s of stale-while-revalidate left, 590 s of stale-if-error.
        0 => reply(
            200,
            &[
                (
                    "cache-control",
                    "max-age=10, stale-while-revalidate=11, stale-if-error=600",
                ),
                ("age", "20"),
            ],
            "last good",
        ),
        // A slow 503 (its head trickles in over about 2.5 s).
        _ => Script::Trickle(
            b"H".to_vec(),
            b"TTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy".to_vec(),
            Duration::from_millis(60),
        ),
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    gate.get("/r").await;
    // Within stale-while-revalidate: served stale, one background refresh starts.
    assert_eq!(gate.get("/r").await.cache(), "STALE");
    // Past that window (a time window, so a sleep), while the refresh still waits for its
    // 503: these requests wait on it, and get the stale entry instead of its error.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let replies = futures_util::future::join_all((0..5).map(|_| gate.get("/r"))).await;
    for r in &replies {
        assert_eq!(
            (r.status, r.cache(), r.body.as_str()),
            (200, "STALE", "last good")
        );
        assert!(r.header("cache-status").contains("detail=stale-if-error"));
    }
}

// 2. A 304 about another version (another ETag) does not refresh the stored body.
#[tokio::test]
async fn a_304_for_another_etag_fetches_the_whole_response_again() {
    let (up, seen) = scripted(|n| match n {
        0 => reply(
            200,
            &[
                ("cache-control", "max-age=1"),
                ("age", "5"),
                ("etag", "\"v1\""),
            ],
            "old body",
        ),
        1 => reply(
            304,
            &[("cache-control", "max-age=600"), ("etag", "\"v2\"")],
            "",
        ),
        _ => reply(
            200,
            &[("cache-control", "max-age=600"), ("etag", "\"v2\"")],
            "new body",
        ),
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    gate.get("/e").await;
    let r = gate.get("/e").await;
    assert_eq!((r.status, r.body.as_str()), (200, "new body"));
    assert_eq!(r.header("etag"), "\"v2\"");
    assert_eq!(up.requests(), 3);
    let third = seen.lock().unwrap()[2].clone();
    assert!(!third.contains("if-none-match"), "{third}");
    assert_eq!(gate.get("/e").await.body, "new body");
}

// A soft-purged entry whose refresh stores nothing is not served stale any longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_purged_entry_the_upstream_no_longer_allows_is_removed() {
    let (up, _) = scripted(|n| match n {
        0 => reply(200, &[], "cached once"),
        _ => reply(200, &[("cache-control", "no-store")], "not cacheable now"),
    })
    .await;
    let config = "[admin]\ntoken = \"t\"\n\n[[routes]]\nname = \"kpi\"\nmethod = \"GET\"\npath = \"/kpi/*\"\nttl_secs = 600\n";
    let gate = Gate::start_at(&up.url(), None, config, "").await;
    gate.get("/kpi/a").await;
    assert_eq!(gate.get("/kpi/a").await.cache(), "HIT");
    let (status, _) = gate
        .admin_post(
            "/admin/purge",
            Some("t"),
            r#"{"routes": ["kpi"], "soft": true}"#,
        )
        .await;
    assert_eq!(status, 200);
    let first = gate.get("/kpi/a").await;
    assert_eq!(
        (first.cache(), first.body.as_str()),
        ("STALE", "cached once")
    );
    let removed = eventually(Duration::from_secs(5), || async {
        gate.get("/kpi/a").await.body == "not cacheable now"
    });
    assert!(removed.await, "the soft-purged entry kept being served");
}

// 6 and 2. A background refresh of an entry with a validator revalidates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_refreshes_revalidate_entries_with_validators() {
    let (up, seen) = scripted(|n| match n {
        0 => reply(
            200,
            &[
                ("cache-control", "max-age=10, stale-while-revalidate=600"),
                ("age", "20"),
                ("etag", "\"e1\""),
            ],
            "the body",
        ),
        _ => reply(
            304,
            &[("cache-control", "max-age=600"), ("etag", "\"e1\"")],
            "",
        ),
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    gate.get("/b").await;
    assert_eq!(gate.get("/b").await.cache(), "STALE");
    let refreshed = eventually(Duration::from_secs(5), || async {
        let r = gate.get("/b").await;
        r.cache() == "HIT" && r.body == "the body"
    });
    assert!(refreshed.await);
    assert_eq!(up.requests(), 2);
    let second = seen.lock().unwrap()[1].clone();
    assert!(second.contains("if-none-match: \"e1\""), "{second}");
    assert_eq!(gate.stats().await["background_refreshes"]["stored"], 1);
}

/// RFC 9211 §2: cachegate's `Cache-Status` member goes after every member the upstream's
/// caches sent, from every line they came in (RFC 9110 §5.3), in one field.
#[tokio::test]
async fn cache_status_follows_every_upstream_member() {
    let (up, _) = scripted(|_| {
        reply(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("cache-status", "OriginCache; fwd=uri-miss"),
                ("cache-status", ""),
                ("cache-status", "ShieldCache; hit, EdgeCache; fwd=miss"),
            ],
            "x",
        )
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    let upstream = "OriginCache; fwd=uri-miss, ShieldCache; hit, EdgeCache; fwd=miss, ";
    for (expected, ours) in [
        ("MISS", "cachegate; fwd=miss; fwd-status=200; stored"),
        ("HIT", "cachegate; hit; ttl=*; detail=memory"),
    ] {
        let r = gate.get("/x").await;
        assert_eq!(r.cache(), expected);
        let lines: Vec<_> = r.headers.get_all("cache-status").iter().collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let value = lines[0].to_str().unwrap();
        let member = value
            .strip_prefix(upstream)
            .unwrap_or_else(|| panic!("{value}"));
        let (before, after) = ours.split_once('*').unwrap_or((ours, ""));
        assert!(
            member.starts_with(before) && member.ends_with(after) && !member.contains(','),
            "{value}"
        );
    }
}
