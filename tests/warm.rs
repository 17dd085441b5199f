//! Warming: warm lists through `POST /admin/warm` and `cachegate warm FILE`, and hot keys
//! refreshed before they expire, against a real upstream.

mod common;

use std::time::{Duration, Instant};

use common::{Gate, Upstream, eventually};

const CONFIG: &str = r#"
[admin]
token = "warm-token"

[[routes]]
method = "GET"
path = "/kpi/*"
ttl_secs = 600

[[routes]]
method = "POST"
path = "/api/natal/chart"
ttl_secs = 600
key_body = true
"#;

/// A list with two GETs, one body-keyed POST and (line 6) a request whose answer is
/// `no-store`: it can never be stored.
const LIST: &str = "# the dashboard's views\nGET /kpi/leads?region=eu\nGET /kpi/overview\n\nPOST /api/natal/chart {\"date\": \"1990-01-01\", \"lat\": 51.5}\n{\"url\": \"/kpi/private\", \"headers\": {\"x-test-cache-control\": \"no-store\"}}\n";

async fn warm(gate: &Gate, token: Option<&str>, list: &str) -> (u16, serde_json::Value) {
    gate.admin_post("/admin/warm?concurrency=2", token, list)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_list_stores_what_clients_then_hit() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, CONFIG).await;

    let (status, report) = warm(&gate, Some("warm-token"), LIST).await;
    assert_eq!(status, 207, "{report}");
    assert_eq!(report["requests"], 4, "{report}");
    assert_eq!(report["stored"], 3, "{report}");
    assert_eq!(report["fresh"], 0, "{report}");
    assert_eq!(report["failed"], 1, "{report}");
    assert_eq!(report["failures"][0]["line"], 6, "{report}");
    assert_eq!(report["failures"][0]["detail"], "no-store", "{report}");
    assert_eq!(up.hits(), 4);

    // Clients hit what was warmed, the POST under its canonical body.
    assert_eq!(gate.get("/kpi/leads?region=eu").await.cache(), "HIT");
    assert_eq!(gate.get("/kpi/overview").await.cache(), "HIT");
    let chart = gate
        .post_json(
            "/api/natal/chart",
            r#"{ "lat": 51.50, "date": "1990-01-01" }"#,
        )
        .await;
    assert_eq!(chart.cache(), "HIT");
    assert_eq!(up.hits(), 4);

    // Again: already fresh, nothing fetched.
    let list = LIST.replace(
        "{\"url\": \"/kpi/private\", \"headers\": {\"x-test-cache-control\": \"no-store\"}}\n",
        "",
    );
    let (status, report) = warm(&gate, Some("warm-token"), &list).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["fresh"], 3, "{report}");
    assert_eq!(report["stored"], 0, "{report}");
    assert_eq!(up.hits(), 4);

    let metrics = gate.metrics().await;
    assert!(
        metrics.contains(r#"cachegate_warm_requests_total{outcome="stored"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cachegate_warm_requests_total{outcome="fresh"} 3"#),
        "{metrics}"
    );
    assert_eq!(gate.stats().await["warm"]["requests"]["failed"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_list_or_no_token_warms_nothing() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, CONFIG).await;

    let (status, _) = warm(&gate, None, "GET /kpi/a\n").await;
    assert_eq!(status, 401);
    let (status, _) = warm(&gate, Some("wrong"), "GET /kpi/a\n").await;
    assert_eq!(status, 401);
    // Line 2 is not a request: nothing is replayed, not even line 1.
    let (status, reply) = warm(&gate, Some("warm-token"), "GET /kpi/a\nGET\n").await;
    assert_eq!(status, 400);
    assert!(reply.as_str().unwrap().contains("line 2"), "{reply}");
    let (status, _) = warm(&gate, Some("warm-token"), "POST /api/natal/chart {oops\n").await;
    assert_eq!(status, 400);
    assert_eq!(up.hits(), 0);
    assert_eq!(gate.get("/kpi/a").await.cache(), "MISS");

    let resp = gate
        .client
        .post(format!("{}/admin/warm?concurrency=0", gate.admin))
        .bearer_auth("warm-token")
        .body("GET /kpi/b\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Without a configured token, the endpoint is off.
    let open = Gate::start(&up, None, "").await;
    let (status, reply) = warm(&open, Some("anything"), "GET /kpi/a\n").await;
    assert_eq!(status, 403);
    assert!(reply.as_str().unwrap().contains("CACHEGATE_ADMIN_TOKEN"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_command_replays_a_file_with_counts() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, CONFIG).await;
    let dir = tempfile::tempdir().unwrap();
    let run = |file: std::path::PathBuf, token: &'static str| {
        let admin = gate.admin.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_cachegate"))
                .arg("warm")
                .arg(file)
                .args(["--admin", &admin, "--concurrency", "4"])
                .env("CACHEGATE_ADMIN_TOKEN", token)
                .output()
                .unwrap()
        })
    };

    let file = dir.path().join("warm.txt");
    std::fs::write(&file, LIST).unwrap();
    let out = run(file.clone(), "warm-token").await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("4 requests: 3 stored, 0 already fresh, 1 failed"),
        "{stdout}"
    );
    assert!(stdout.contains("line 6: status 200, no-store"), "{stdout}");
    assert_eq!(gate.get("/kpi/overview").await.cache(), "HIT");

    // More requests than one batch (4 x 4): every one counted, and a failure in a later
    // batch named by its line in the file (a DELETE is never sent: not cacheable).
    let many: String = (0..40).map(|i| format!("GET /kpi/n{i}\n")).collect();
    let file = dir.path().join("many.txt");
    std::fs::write(
        &file,
        format!("{many}GET /kpi/overview\n# a comment\nDELETE /kpi/n1\n"),
    )
    .unwrap();
    let hits = up.hits();
    let out = run(file, "warm-token").await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("42 requests: 40 stored, 1 already fresh, 1 failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 43: status 0, not cacheable: method"),
        "{stdout}"
    );
    assert_eq!(up.hits(), hits + 40);

    // A bad line: exit 2 naming it, nothing sent.
    let hits = up.hits();
    let file = dir.path().join("bad.txt");
    std::fs::write(&file, "GET /kpi/x\nGET /kpi/y {\n").unwrap();
    let out = run(file.clone(), "warm-token").await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.txt: line 2"), "{stderr}");
    assert_eq!(up.hits(), hits);

    // A wrong token: exit 2, nothing sent.
    let file = dir.path().join("one.txt");
    std::fs::write(&file, "GET /kpi/z\n").unwrap();
    let out = run(file, "wrong").await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    assert_eq!(up.hits(), hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_are_refreshed_before_they_expire() {
    let up = Upstream::start().await;
    let config = r#"
[[routes]]
method = "GET"
path = "/kpi/*"
ttl_secs = 3
warm_hot_keys = 1
warm_interval_secs = 1
"#;
    let gate = Gate::start(&up, None, config).await;
    assert_eq!(gate.get("/kpi/cold").await.cache(), "MISS");
    assert_eq!(gate.get("/kpi/hot").await.cache(), "MISS");
    let started = Instant::now();
    // Steady load on the hot key for longer than its TTL, until the upstream has seen
    // two refreshes: every answer is a hit.
    // A header outside the key, sent with every request, never reaches a refresh: it
    // must not shape what everyone gets.
    let mut answers = 0;
    let mut last = None;
    let deadline = started + Duration::from_secs(20);
    while (started.elapsed() < Duration::from_millis(4500) || up.hits() < 4)
        && Instant::now() < deadline
    {
        let req = gate
            .client
            .get(gate.url("/kpi/hot"))
            .header("x-shape", "evil");
        let reply = common::Reply::from(req.send().await.unwrap()).await;
        assert_eq!(
            reply.cache(),
            "HIT",
            "a hot key expired into a miss after {:?}",
            started.elapsed()
        );
        answers += 1;
        last = Some(reply);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = last.unwrap();
    assert!(last.n() > 2, "not a refreshed answer: {}", last.n());
    assert!(
        last.json()["headers"].get("x-shape").is_none(),
        "{}",
        last.json()
    );
    assert!(
        up.hits() >= 4,
        "no refreshes: {} upstream requests",
        up.hits()
    );
    assert!(answers > 20);
    // The cold key (requested once) was not among the hot keys: it expired.
    assert_eq!(gate.get("/kpi/cold").await.cache(), "MISS");
    let refreshed = gate.stats().await["warm"]["hot_key_refreshes"]["stored"]
        .as_u64()
        .unwrap();
    assert!(refreshed >= 2, "{refreshed}");

    // Without requests, the hot set empties: refreshes stop.
    let quiet = eventually(Duration::from_secs(10), || async {
        let before = up.hits();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        up.hits() == before
    });
    assert!(
        quiet.await,
        "hot keys kept being refreshed without requests"
    );
}

#[test]
fn warm_settings_are_checked() {
    let check = |route: &str| {
        let toml = format!(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n[[routes]]\nmethod = \"GET\"\npath = \"/a\"\nttl_secs = 5\n{route}"
        );
        cachegate::config::Config::from_toml(&toml, None)
            .unwrap()
            .finish(&Default::default(), |_| None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(check("warm_hot_keys = 100\n").is_ok());
    let err = check("warm_hot_keys = 5000\n").unwrap_err();
    assert!(err.contains("routes[0].warm_hot_keys"), "{err}");
    let err = check("warm_interval_secs = 0\n").unwrap_err();
    assert!(err.contains("routes[0].warm_interval_secs"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_redis_take_turns_refreshing_a_hot_key() {
    let (up, redis) = (Upstream::start().await, common::Redis::start().await);
    // The upstream takes 0.6 s per answer (the delay header is keyed, so refreshes send
    // it too): long enough that the replicas' once-a-second checks find the key due while
    // one refreshes it, short enough to land 1.4 s before the entry expires.
    let config = r#"
[[routes]]
method = "GET"
path = "/kpi/*"
ttl_secs = 3
warm_hot_keys = 1
warm_interval_secs = 1
key_headers = ["x-test-delay-ms"]
"#;
    let a = Gate::start(&up, Some(&redis), config).await;
    let b = Gate::start(&up, Some(&redis), config).await;
    let get = |gate: &Gate| {
        let req = gate
            .client
            .get(gate.url("/kpi/hot"))
            .header("x-test-delay-ms", "600");
        async move { common::Reply::from(req.send().await.unwrap()).await }
    };
    get(&a).await;
    let shared = eventually(Duration::from_secs(5), || async {
        get(&b).await.cache() == "HIT"
    });
    assert!(shared.await, "b never found a's entry in Redis");
    assert_eq!(up.max_in_flight(), 1);
    // Steady load on both replicas for twice the TTL: every answer is a hit, the key is
    // refreshed, and never by both replicas at once.
    let hits_before = up.hits();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        for gate in [&a, &b] {
            let reply = get(gate).await;
            assert_eq!(reply.cache(), "HIT", "after {:?}", started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up.hits() - hits_before >= 2, "no refreshes");
    assert_eq!(
        up.max_in_flight(),
        1,
        "both replicas refreshed the key at once"
    );
}

/// A warm list that stalls on its way in holds no warm slot and is cut at the body
/// timeout (`408`): another list is warmed meanwhile.
#[tokio::test]
async fn a_stalled_warm_list_blocks_no_other_and_is_cut() {
    use tokio::io::AsyncReadExt;
    let up = Upstream::start().await;
    let config = format!("{CONFIG}\n[server]\nclient_body_timeout_ms = 500\n");
    let gate = Gate::start(&up, None, &config).await;
    let mut stalled = common::raw::post_to_admin(
        &gate.admin,
        "/admin/warm",
        "warm-token",
        100,
        "GET /kpi/a\n",
    )
    .await;
    let (status, report) = warm(&gate, Some("warm-token"), "GET /kpi/leads\n").await;
    assert_eq!(status, 200, "{report}");
    let mut answer = Vec::new();
    let read = stalled.read_to_end(&mut answer);
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("cut at the body timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// A shutdown (SIGTERM) lets a warm list whose client has left run to its end (bounded)
/// rather than cutting it half done; the same holds for purges.
#[tokio::test]
async fn a_shutdown_lets_a_running_warm_list_finish() {
    let up = Upstream::start().await;
    let config = format!("{CONFIG}\n[upstream]\nurl = \"{}\"\n", up.url());
    let mut gate = common::GateProcess::start(&config).await;
    let list: String = (0..3)
        .map(|i| {
            format!(
                "{{\"url\": \"/kpi/slow{i}\", \"headers\": {{\"x-test-delay-ms\": \"700\"}}}}\n"
            )
        })
        .collect();
    let path = "/admin/warm?concurrency=1";
    let client =
        common::raw::post_to_admin(&gate.admin, path, "warm-token", list.len(), &list).await;
    let started = eventually(Duration::from_secs(5), || async { up.hits() >= 1 });
    assert!(started.await, "the list is running");
    drop(client);
    gate.terminate();
    let deadline = Instant::now() + Duration::from_secs(15);
    while gate.try_exit().is_none() {
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        up.hits(),
        3,
        "the list ran to its end before the process exited"
    );
}
