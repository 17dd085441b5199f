//! The attack suite: one test per defect class of the hardening pass, against real
//! sockets, scripted raw-socket upstreams and raw-socket clients.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::raw::{RawUpstream, Script, exchange, parse_responses, read_to_close};
use common::{Gate, Reply, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(5);

/// A body-keyed `POST /chart` route.
const CHART_ROUTE: &str =
    "[[routes]]\nmethod = \"POST\"\npath = \"/chart\"\nttl_secs = 60\nkey_body = true\n";

async fn get_with(gate: &Gate, path: &str, headers: &[(&str, &str)]) -> Reply {
    send_with(gate, "GET", path, headers).await
}

async fn send_with(gate: &Gate, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = gate.client.request(method.parse().unwrap(), gate.url(path));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    Reply::from(req.send().await.unwrap()).await
}

fn ok(body: &str, extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// 1. A private answer is never given to another request, whatever its status.
#[tokio::test]
async fn private_answers_are_never_shared_under_coalescing_whatever_the_status() {
    let up = Upstream::start().await;
    let gate = Gate::start(
        &up,
        None,
        r#"
[[routes]]
method = "GET"
path = "/p/*"
ttl_secs = 60
cache_statuses = [200, 302, 404, 500]

[[routes]]
method = "GET"
path = "/me/*"
ttl_secs = 60
key_headers = ["authorization"]
cache_statuses = [200, 302, 404, 500]

[[routes]]
method = "GET"
path = "/mc/*"
ttl_secs = 60
key_headers = ["cookie"]
cache_statuses = [200, 302, 404, 500]
"#,
    )
    .await;
    let markers: [(&str, &str, &str); 6] = [
        ("set-cookie", "/p", "x-test-set-cookie"),
        ("private", "/p", "x-test-cache-control"),
        ("no-store", "/p", "x-test-cache-control"),
        ("credentialed", "/me", "authorization"),
        ("cookie", "/mc", "cookie"),
        ("shareable control", "/p", "x-test-none"),
    ];
    let mut cases = Vec::new();
    for status in ["200", "302", "404", "500"] {
        for (marker, prefix, header) in markers {
            let value = match marker {
                "set-cookie" => "sid=first-client-session",
                "credentialed" => "Bearer same-user",
                "cookie" => "sid=same-user",
                "shareable control" => "-",
                other => other,
            };
            let path = format!("{prefix}/{}-{status}", marker.replace(' ', "-"));
            cases.push((status, marker, header, value, path));
        }
    }
    let mut tasks = Vec::new();
    for (status, marker, header, value, path) in cases {
        let client = gate.client.clone();
        let url = gate.url(&path);
        tasks.push(tokio::spawn(async move {
            let mut reqs = Vec::new();
            for _ in 0..50 {
                let req = client
                    .get(&url)
                    .header("x-test-status", status)
                    .header("x-test-delay-ms", "300")
                    .header(header, value);
                reqs.push(async move { Reply::from(req.send().await.unwrap()).await });
            }
            let replies = futures_util::future::join_all(reqs).await;
            let distinct: HashSet<u64> = replies.iter().map(Reply::n).collect();
            let collapsed = replies
                .iter()
                .filter(|r| r.header("cache-status").contains("collapsed"))
                .count();
            (status, marker, distinct.len(), collapsed, replies)
        }));
    }
    for task in tasks {
        let (status, marker, distinct, collapsed, replies) = task.await.unwrap();
        assert!(replies.iter().all(|r| r.status.to_string() == status));
        match marker {
            "shareable control" => {
                assert_eq!(distinct, 1, "{status}: a shareable answer is shared");
                assert!(collapsed > 0, "{status}: the control coalesced");
            }
            // Stored per credential, so later requests with the same token may HIT it;
            // never handed over while in flight.
            "credentialed" | "cookie" => assert_eq!(collapsed, 0, "{status} {marker}"),
            _ => assert_eq!(
                distinct, 50,
                "{status} {marker}: an answer went to another client"
            ),
        }
    }
}

// 2. The length a client gets is the length of the body it gets.
#[tokio::test]
async fn upstream_framing_conflicts_never_desync_the_client() {
    let evil_body = "0123456789ABCDEF-smuggled";
    let up = RawUpstream::start(move |head, _| {
        let chunked = format!(
            "{:x}\r\n{evil_body}\r\n0\r\n\r\n",
            evil_body.len()
        );
        if head.starts_with("GET /both") {
            Script::Reply(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nCache-Control: max-age=60\r\n\r\n{chunked}"
                )
                .into_bytes(),
            )
        } else if head.starts_with("GET /identity") {
            Script::ReplyAndClose(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: identity\r\nCache-Control: max-age=60\r\n\r\n{evil_body}"
                )
                .into_bytes(),
            )
        } else {
            Script::Reply(ok("second", "Cache-Control: max-age=60\r\n"))
        }
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    for path in ["/both", "/identity"] {
        // Twice: the MISS, then the HIT replayed from the cache.
        for round in 0..2 {
            let pipelined = format!(
                "GET {path} HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            );
            let bytes = exchange(&gate.addr(), pipelined.as_bytes(), LIMIT).await;
            let responses = parse_responses(&bytes);
            assert_eq!(responses.len(), 2, "{path} round {round}: {responses:?}");
            let first = &responses[0];
            if first.status == 200 {
                let len: usize = first.header("content-length").unwrap().parse().unwrap();
                assert_eq!(len, first.body.len(), "{path} round {round}");
            }
            assert_eq!(responses[1].body, b"second", "{path} round {round}");
        }
    }
}

// 2b. An upstream reply that is no valid answer (a head that does not parse, a 101 nobody
// asked for, a 304 to an unconditional request, a transfer coding other than chunked) is
// a 502 on every path, never stored; an answer with many header fields is an answer.
#[tokio::test]
async fn upstream_replies_that_answer_nothing_are_502_and_never_stored() {
    let up = RawUpstream::start(|head, _| {
        let path = head.split(' ').nth(1).unwrap_or("");
        let fresh = "Cache-Control: max-age=60\r\n";
        let reply = match path {
            "/coded" => format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n{fresh}\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
            "/gzip-chunked" => format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n{fresh}\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
            "/switch" => "HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n".to_string(),
            "/not-modified" => format!("HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n{fresh}\r\n"),
            "/two-lengths" => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n{fresh}\r\nhello!"
            ),
            _ => {
                let many: String = (0..200).map(|i| format!("X-Field-{i}: {i}\r\n")).collect();
                return Script::Reply(ok("many", &format!("{many}{fresh}")));
            }
        };
        Script::ReplyAndClose(reply.into_bytes())
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    for path in [
        "/coded",
        "/gzip-chunked",
        "/switch",
        "/not-modified",
        "/two-lengths",
    ] {
        // GET twice (a stored answer would spare the upstream the second), then DELETE.
        for method in ["GET", "GET", "DELETE"] {
            let before = up.requests();
            let r = send_with(&gate, method, path, &[]).await;
            assert_eq!(
                (r.status, r.body.trim()),
                (502, "upstream reply malformed"),
                "{method} {path}"
            );
            assert_eq!(up.requests(), before + 1, "{method} {path}: stored");
        }
    }
    // More fields than HTTP clients take by default (100): read with a raw socket.
    for expected in ["MISS", "HIT"] {
        let get = b"GET /many HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        let responses = parse_responses(&exchange(&gate.addr(), get, LIMIT).await);
        let many = &responses[0];
        assert_eq!(
            (many.status, many.header("x-cache-status")),
            (200, Some(expected))
        );
        assert_eq!(many.header("x-field-199"), Some("199"));
    }
}

// 2c. An upstream URL that leads back to cachegate makes a forwarding loop: each process
// appends a `CDN-Loop` entry of its own, and a request that comes back with it is answered
// 508 (on the cached path, where it would wait on its own flight, on the bypass path and
// on the WebSocket tunnel).
#[tokio::test]
async fn a_forwarding_loop_ends_in_508() {
    let port = common::free_port();
    let gate = Gate::start_toml(&format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:{port}\"\n"
    ))
    .await;
    for (method, path) in [("GET", "/loop"), ("POST", "/loop")] {
        let r = send_with(&gate, method, path, &[("cdn-loop", "edge")]).await;
        assert_eq!(
            (r.status, r.body.trim()),
            (508, "forwarding loop"),
            "{method}"
        );
    }
    // A WebSocket handshake: tunnelled, not through the cached path.
    let mut s = TcpStream::connect(gate.addr()).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    let got = read_until(&mut s, b"forwarding loop").await;
    assert!(
        got.starts_with(b"HTTP/1.1 508"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let loops = &gate.stats().await["upstream_errors"]["loop"];
    assert_eq!(
        loops.as_u64(),
        Some(3),
        "one hop each refused, the first passed its 508 back (or closed the tunnel)"
    );
}

// 3b. With forward_unkeyed_query, a parameter outside the key that some upstream could
// read as a keyed one (another separator, an escaped one, a name that folds equal) makes
// the request ambiguous: passed through, not cached, so it cannot store an answer for
// `b=evil` under `b=good`'s key. Names that fold equal keep their order in the key.
#[tokio::test]
async fn unkeyed_parameters_that_could_read_as_keyed_ones_are_not_cached() {
    let up = Upstream::start().await;
    let routes = r#"
[[routes]]
method = "GET"
path = "/chart"
ttl_secs = 60
key_query = ["b"]
forward_unkeyed_query = true

[[routes]]
method = "GET"
path = "/all"
ttl_secs = 60
"#;
    let gate = Gate::start(&up, None, routes).await;
    for q in [
        "b=good&utm=x;b=evil",
        "b=good&utm=x%26b%3Devil",
        "b=good&b%3dx=evil",
        "b=good&B=evil",
        "b=good&b%5B%5D=evil",
        "b=good&b.=evil",
        "b=good&+b=evil",
        "b=good&%5Bb%5D=evil",
        "b=good&[b=evil",
        "b=good&]b=evil",
        "b=good&utm=x;b",
    ] {
        let r = gate.get(&format!("/chart?{q}")).await;
        assert_eq!(r.cache(), "BYPASS", "{q}");
        assert!(
            r.header("cache-status").ends_with("detail=ambiguous-query"),
            "{q}"
        );
        assert_eq!(r.json()["query"], q, "{q} reaches the upstream as it came");
    }
    // Nothing was stored under b=good's key; ordinary unkeyed parameters (base64 padding,
    // an encoded URL) still share it.
    assert_eq!(gate.get("/chart?b=good&utm=1").await.cache(), "MISS");
    for q in [
        "b=good&sig=abc%3D%3D",
        "b=good&ref=https%3A%2F%2Fx.example%2F%3Fa%3D1",
    ] {
        assert_eq!(gate.get(&format!("/chart?{q}")).await.cache(), "HIT", "{q}");
    }
    let hit = gate.get("/chart?utm=2&b=good").await;
    assert_eq!(hit.cache(), "HIT");
    assert_eq!(hit.json()["query"], "b=good&utm=1");

    // Every parameter keyed: names some upstream reads as one keep the client's order.
    assert_eq!(gate.get("/all?B=1&b=2").await.cache(), "MISS");
    assert_eq!(gate.get("/all?b=2&B=1").await.cache(), "MISS");
    assert_eq!(gate.get("/all?z=1&a=2").await.cache(), "MISS");
    assert_eq!(gate.get("/all?a=2&z=1").await.cache(), "HIT");
}

// 3. Inputs outside the key never reach the upstream.
#[tokio::test]
async fn request_inputs_outside_the_key_never_reach_the_upstream() {
    let up = Upstream::start().await;
    let routes = r#"
[[routes]]
method = "GET"
path = "/report"
ttl_secs = 60
key_query = ["from"]
"#;
    let gate = Gate::start(&up, None, routes).await;
    let upstream_host = up.addr.to_string();
    let spoof = [
        ("host", "evil.example"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-for", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6;host=evil.example"),
        ("x-http-method-override", "DELETE"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        // Other spellings of the same inputs.
        ("x_forwarded_host", "evil.example"),
        ("x_http_method_override", "DELETE"),
        ("x-host", "evil.example"),
        ("x-original-host", "evil.example"),
        ("x-forwarded", "host=evil.example"),
        ("x-forwarded-ssl", "on"),
        ("x-url-scheme", "https"),
        ("true-client-ip", "6.6.6.6"),
        // The same classes under other names (scheme, address, original, forwarded).
        ("x-scheme", "https"),
        ("x-real-scheme", "https"),
        ("x-remote-addr", "6.6.6.6"),
        ("x-originating-ip", "6.6.6.6"),
        ("forwarded-for", "6.6.6.6"),
        ("forwarded-host", "evil.example"),
        ("x-envoy-original-path", "/admin"),
        ("x-base-url", "https://evil.example"),
    ];
    let first = get_with(&gate, "/page?x=1", &spoof).await;
    let seen = &first.json()["headers"];
    assert_eq!(seen["host"], upstream_host.as_str());
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    let replaced = ["host", "x-forwarded-proto", "x-forwarded-for"];
    for gone in spoof.map(|(name, _)| name) {
        if replaced.contains(&gone) {
            continue;
        }
        assert!(seen.get(gone).is_none(), "{gone} reached the upstream");
    }

    // Query parameters outside key_query are not forwarded.
    let r = gate.get("/report?from=1&debug=evil&from=2").await;
    assert_eq!(r.json()["query"], "from=1&from=2");

    // A GET with a body bypasses the cache.
    let body_get = gate
        .client
        .get(gate.url("/page?x=2"))
        .body("{\"evil\":1}")
        .send()
        .await
        .unwrap();
    let body_get = Reply::from(body_get).await;
    assert_eq!(body_get.cache(), "BYPASS");
    assert!(
        body_get
            .header("cache-status")
            .ends_with("detail=request-body")
    );

    // Two Host headers, none on HTTP/1.1, or one that is not host[:port]: 400, nothing
    // forwarded.
    let before = up.hits();
    let mut requests = vec![
        "GET /page HTTP/1.1\r\nHost: a\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
            .to_string(),
        "GET /page HTTP/1.1\r\nConnection: close\r\n\r\n".to_string(),
    ];
    for host in [
        "a b",
        "user@victim.example",
        "a/b",
        "a:b",
        "[::1",
        "[::1]x",
        "a?b",
    ] {
        requests.push(format!(
            "GET /page HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ));
    }
    for request in &requests {
        let responses = parse_responses(&exchange(&gate.addr(), request.as_bytes(), LIMIT).await);
        assert_eq!(responses[0].status, 400, "{request:?}");
    }
    assert_eq!(up.hits(), before);
    for host in [
        "a.example:8080",
        "[::1]:80",
        "10.0.0.1",
        "xn--caf-dma.example",
    ] {
        let request = format!("GET /page HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let responses = parse_responses(&exchange(&gate.addr(), request.as_bytes(), LIMIT).await);
        assert_eq!(responses[0].status, 200, "{request:?}");
    }
    let http10 = exchange(&gate.addr(), b"GET /page?x=3 HTTP/1.0\r\n\r\n", LIMIT).await;
    let http10 = String::from_utf8_lossy(&http10);
    assert!(
        http10.starts_with("HTTP/1.0 200") || http10.starts_with("HTTP/1.1 200"),
        "{http10}"
    );

    // Trusted proxies keep their forwarding headers; preserve_host keys on the Host.
    let trusting = Gate::start_at(
        &up.url(),
        None,
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n[[routes]]\nmethod = \"GET\"\npath = \"/v\"\nttl_secs = 60\n",
        "preserve_host = true\n",
    )
    .await;
    let a = get_with(
        &trusting,
        "/v",
        &[("host", "a.example"), ("x-forwarded-for", "9.9.9.9")],
    )
    .await;
    assert_eq!(a.json()["headers"]["host"], "a.example");
    assert_eq!(a.json()["headers"]["x-forwarded-for"], "9.9.9.9, 127.0.0.1");
    let b = get_with(&trusting, "/v", &[("host", "b.example")]).await;
    assert_eq!(b.cache(), "MISS", "another Host is another key");
    let a2 = get_with(&trusting, "/v", &[("host", "a.example")]).await;
    assert_eq!((a2.cache(), a2.n()), ("HIT", a.n()));
    // An absolute-form target names the host; the Host header is replaced by it (RFC
    // 9112 §3.2.2), for the key and for the upstream alike.
    for (target, status, host) in [
        ("http://c.example/v", 200, Some("c.example")),
        ("http://a.example/v", 200, Some("a.example")),
        ("http://user@a.example/v", 400, None),
        ("ftp://a.example/v", 400, None),
    ] {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n");
        let responses =
            parse_responses(&exchange(&trusting.addr(), request.as_bytes(), LIMIT).await);
        assert_eq!(responses[0].status, status, "{target}");
        if let Some(host) = host {
            let seen: serde_json::Value = serde_json::from_slice(&responses[0].body).unwrap();
            assert_eq!(seen["headers"]["host"], host, "{target}");
            let hit = responses[0].header("x-cache-status") == Some("HIT");
            assert_eq!(
                hit,
                host == "a.example",
                "{target}: keyed by the target's host"
            );
        }
    }

    // A trusted proxy's forwarded origin reaches the upstream, so it is keyed; the client
    // address it forwards is not.
    let origins: [&[(&str, &str)]; 7] = [
        &[("x-forwarded-ssl", "on")],
        &[("x-forwarded-scheme", "https")],
        &[("x-forwarded-host", "a.example")],
        &[("x-forwarded-host", "b.example")],
        &[
            ("x-forwarded-host", "a.example"),
            ("x-forwarded-proto", "https"),
        ],
        &[("forwarded", "for=1.1.1.1;host=a.example;proto=https")],
        &[("x-forwarded-prefix", "/tenant")],
    ];
    let mut seen = Vec::new();
    for headers in origins {
        let r = get_with(
            &trusting,
            "/v",
            &[&[("host", "a.example")], headers].concat(),
        )
        .await;
        assert_eq!(r.cache(), "MISS", "{headers:?} got another origin's answer");
        for (name, value) in headers {
            assert_eq!(r.json()["headers"][*name], *value);
        }
        seen.push(r.n());
    }
    let again = get_with(
        &trusting,
        "/v",
        &[
            ("host", "a.example"),
            ("forwarded", "for=2.2.2.2;host=a.example;proto=https"),
        ],
    )
    .await;
    assert_eq!((again.cache(), again.n()), ("HIT", seen[5]));
}

// 4. Query spellings that upstreams tell apart get different keys.
#[tokio::test]
async fn repeated_and_bare_query_parameters_are_told_apart() {
    let up = Upstream::start().await;
    let gate = Gate::start(
        &up,
        None,
        "[[routes]]\nmethod = \"GET\"\npath = \"/q\"\nttl_secs = 60\n",
    )
    .await;
    assert_eq!(gate.get("/q?id=1&id=2").await.cache(), "MISS");
    assert_eq!(gate.get("/q?id=2&id=1").await.cache(), "MISS");
    assert_eq!(gate.get("/q?b=0&id=1&id=2").await.cache(), "MISS");
    assert_eq!(gate.get("/q?id=1&b=0&id=2").await.cache(), "HIT");
    assert_eq!(gate.get("/q?debug").await.cache(), "MISS");
    assert_eq!(gate.get("/q?debug=").await.cache(), "MISS");
    // An invalid escape is read differently by upstreams (kept, dropped with its pair):
    // never merged with its encoded spelling, it bypasses.
    let invalid = gate.get("/q?q=%zz").await;
    assert_eq!(invalid.cache(), "BYPASS");
    assert!(
        invalid
            .header("cache-status")
            .ends_with("detail=ambiguous-query")
    );
    assert_eq!(gate.get("/q?q=%25zz").await.cache(), "MISS");
    assert_eq!(gate.get("/q?q=%zz").await.cache(), "BYPASS");
}

// 5. JSON bodies that differ never share a key.
#[tokio::test]
async fn bodies_outside_i_json_or_not_json_bypass() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, CHART_ROUTE).await;
    let detail = |r: &Reply| {
        r.header("cache-status")
            .rsplit("detail=")
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(
        gate.post_json("/chart", r#"{"id":9007199254740992}"#)
            .await
            .cache(),
        "MISS"
    );
    for body in [
        r#"{"id":9007199254740993}"#,
        r#"{"x":0.1000000000000000000000001}"#,
        r#"{"date":"1815-12-10","date":"2000-01-01"}"#,
    ] {
        let r = gate.post_json("/chart", body).await;
        assert_eq!(
            (r.cache(), detail(&r).as_str()),
            ("BYPASS", "not-i-json"),
            "{body}"
        );
    }
    let form = gate
        .client
        .post(gate.url("/chart"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"id":9007199254740992}"#)
        .send()
        .await
        .unwrap();
    let form = Reply::from(form).await;
    assert_eq!(
        (form.cache(), detail(&form).as_str()),
        ("BYPASS", "content-type")
    );
    let typed = gate
        .client
        .post(gate.url("/chart"))
        .header("content-type", "application/vnd.api+json; charset=utf-8")
        .body(r#"{"id":9007199254740992}"#)
        .send()
        .await
        .unwrap();
    // The Content-Type is keyed with the body: an upstream may read them differently.
    assert_eq!(Reply::from(typed).await.cache(), "MISS");
    assert_eq!(
        gate.post_json("/chart", r#"{ "id" : 9007199254740992 }"#)
            .await
            .cache(),
        "HIT"
    );
}

// 3b. Request-target forms a reverse proxy does not serve are refused; `OPTIONS *` and
// absolute-form targets are passed on as what they mean.
#[tokio::test]
async fn request_target_forms_are_served_or_refused_as_they_mean() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines = seen.clone();
    let up = RawUpstream::start(move |head, _| {
        lines
            .lock()
            .unwrap()
            .push(head.lines().next().unwrap_or("").to_string());
        Script::Reply(ok("ok", ""))
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    let cases: [(&str, u16); 6] = [
        ("OPTIONS * HTTP/1.1\r\nHost: a\r\n", 200),
        ("GET example.com:80 HTTP/1.1\r\nHost: a\r\n", 400),
        ("OPTIONS example.com:80 HTTP/1.1\r\nHost: a\r\n", 400),
        (
            "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n",
            405,
        ),
        ("GET * HTTP/1.1\r\nHost: a\r\n", 400),
        ("GET http://evil.example/x HTTP/1.1\r\nHost: a\r\n", 200),
    ];
    for (head, status) in cases {
        let request = format!("{head}Connection: close\r\n\r\n");
        let responses = parse_responses(&exchange(&gate.addr(), request.as_bytes(), LIMIT).await);
        assert_eq!(responses[0].status, status, "{head:?}");
        if status == 405 {
            assert!(responses[0].header("allow").is_some());
        }
    }
    assert_eq!(
        *seen.lock().unwrap(),
        ["OPTIONS * HTTP/1.1", "GET /x HTTP/1.1"],
        "what the upstream was asked"
    );
    let errors = &gate.stats().await["client_errors"];
    assert_eq!(
        (errors["method"].as_u64(), errors["target"].as_u64()),
        (Some(1), Some(3))
    );
}

// 6. No input panics the request path.
#[tokio::test]
async fn malformed_escapes_and_odd_targets_never_panic() {
    let up = Upstream::start().await;
    let gate = Gate::start(
        &up,
        None,
        "[[routes]]\nmethod = \"GET\"\npath = \"/kpi/*\"\nttl_secs = 60\n",
    )
    .await;
    let targets: [&[u8]; 6] = [
        b"/kpi/%a%C3%A9",
        b"/kpi/x?q=%a\xc3\xa9&%=%%",
        b"/kpi/%",
        b"/kpi/%%2",
        b"/kpi/a?%e2%82",
        b"/kpi/\xc3\xa9",
    ];
    for target in targets {
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(target);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let responses = parse_responses(&exchange(&gate.addr(), &req, LIMIT).await);
        assert_eq!(responses.len(), 1, "{}", String::from_utf8_lossy(target));
        assert!(
            responses[0].status < 500,
            "{}",
            String::from_utf8_lossy(target)
        );
    }
    assert_eq!(gate.stats().await["panics"], 0);
}

// 7. An unparsable Cache-Control fails closed.
#[tokio::test]
async fn unparsable_freshness_headers_are_not_stored() {
    let up = RawUpstream::start(|head, _| {
        let extra: &[u8] = if head.starts_with("GET /byte") {
            b"Cache-Control: max-age=60, priv\xe9ate\r\n"
        } else if head.starts_with("GET /vary") {
            b"Cache-Control: max-age=60\r\nVary: accept language\r\n"
        } else if head.starts_with("GET /age") {
            // An invalid Age is ignored (stored), an invalid Cache-Control is not.
            b"Cache-Control: max-age=60\r\nAge: soon\r\n"
        } else {
            // RFC 9111 §5.3: an invalid Expires is in the past (stale), not an error.
            b"Expires: someday\r\n"
        };
        let mut reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n".to_vec();
        reply.extend_from_slice(extra);
        reply.extend_from_slice(b"\r\nok");
        Script::Reply(reply)
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "").await;
    for path in ["/byte", "/vary", "/expires"] {
        for _ in 0..2 {
            let r = gate.get(path).await;
            assert_eq!(r.cache(), "MISS", "{path}");
            let detail = if path == "/expires" {
                "detail=no-freshness"
            } else {
                "detail=unparsable"
            };
            assert!(r.header("cache-status").ends_with(detail), "{path}");
        }
    }
    assert_eq!(up.requests(), 6);
    gate.get("/age").await;
    assert_eq!(gate.get("/age").await.cache(), "HIT");
}

// 9. Every wait is bounded, and a failed leader hands its followers a new one.
#[tokio::test]
async fn stalled_upstream_bodies_are_cut_and_followers_get_one_new_leader() {
    let up = RawUpstream::start(|_, n| {
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 20\r\nCache-Control: max-age=60\r\n\r\n";
        if n == 0 {
            Script::Stall(format!("{head}0123").into_bytes())
        } else {
            Script::Reply(format!("{head}01234567890123456789").into_bytes())
        }
    })
    .await;
    let gate = Gate::start_at(&up.url(), None, "", "body_timeout_ms = 300\n").await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, url) = (gate.client.clone(), gate.url("/stall"));
        tasks.push(tokio::spawn(async move {
            match client.get(url).send().await {
                Ok(r) => Reply::from(r).await.status,
                Err(_) => 0,
            }
        }));
        if tasks.len() == 1 {
            // Let the first become the leader.
            common::eventually(LIMIT, || async { up.requests() == 1 }).await;
        }
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waits were not bounded"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        19,
        "{statuses:?}"
    );
    assert_eq!(
        up.requests(),
        2,
        "one more upstream request, not one per follower"
    );
    assert_eq!(gate.stats().await["upstream_errors"]["body-timeout"], 1);
}

#[tokio::test]
async fn a_trickling_upstream_is_cut_at_the_total_timeout() {
    let up = RawUpstream::start(|_, _| {
        let head =
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nCache-Control: max-age=60\r\n\r\n".to_vec();
        Script::Trickle(head, vec![b'x'; 100], Duration::from_millis(50))
    })
    .await;
    let gate = Gate::start_at(
        &up.url(),
        None,
        "",
        "body_timeout_ms = 1000\ntotal_timeout_ms = 600\n",
    )
    .await;
    let started = Instant::now();
    let r = gate.get("/trickle").await;
    assert_eq!(r.status, 504);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn stalling_clients_are_cut_and_connections_are_capped() {
    let up = Upstream::start().await;
    let gate = Gate::start(
        &up,
        None,
        &format!("[server]\nclient_body_timeout_ms = 300\nheader_read_timeout_ms = 400\nmax_connections = 2\n{CHART_ROUTE}"),
    )
    .await;
    // A request body that stalls: 408, on a keyed route and on a passed-through one.
    for path in ["/chart", "/other"] {
        let mut s = TcpStream::connect(gate.addr()).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"a\":"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let out = read_to_close(&mut s, LIMIT).await;
        assert!(
            String::from_utf8_lossy(&out).starts_with("HTTP/1.1 408"),
            "{path}: {}",
            String::from_utf8_lossy(&out)
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    // A request head that stalls: the connection is closed.
    let mut s = TcpStream::connect(gate.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
    let started = Instant::now();
    let _ = read_to_close(&mut s, LIMIT).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "header read was not bounded"
    );
    drop(s);

    // max_connections = 2: a third client waits until one of two closes.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gate.addr()).await.unwrap();
        s.write_all(b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    let mut third = TcpStream::connect(gate.addr()).await.unwrap();
    third
        .write_all(b"GET /third HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(200), third.read_exact(&mut buf)).await;
    assert!(
        early.is_err(),
        "a third connection was served while two were open"
    );
    drop(held.remove(0));
    tokio::time::timeout(LIMIT, third.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
}

// The request-head deadline (hyper's `header_read_timeout`) closes a keep-alive connection
// that goes silent after a response, and never cuts a large response that a slow client
// takes longer than the deadline to read (a cache hit's body is handed to hyper whole,
// long before the client has it). Guards against deadlines tied to the wrong moment.
#[tokio::test]
async fn the_head_deadline_closes_idle_keep_alives_and_never_cuts_a_slow_download() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, "[server]\nheader_read_timeout_ms = 400\n").await;
    const BODY_BYTES: usize = 6_000_000;
    let request = format!(
        "GET /big HTTP/1.1\r\nHost: a\r\nx-test-body-bytes: {BODY_BYTES}\r\n\
         x-test-cache-control: public, max-age=60\r\n\r\n"
    );
    // A request, its whole response (a miss), then silence: closed at the deadline.
    let mut s = TcpStream::connect(gate.addr()).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();
    let out = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(
        out.len() > BODY_BYTES,
        "the response was cut: {} bytes",
        out.len()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an idle keep-alive connection was not closed"
    );
    // The same response from the cache, read slowly through a small receive buffer: it
    // takes the client well over the deadline, and arrives whole.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(32 * 1024).unwrap();
    let mut s = socket.connect(gate.addr().parse().unwrap()).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let complete = loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break false,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
        let Some(head_end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
        assert!(head.contains("x-cache-status: hit"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("a content-length");
        if got.len() >= head_end + 4 + length {
            break true;
        }
    };
    assert!(
        complete,
        "a slow download was cut after {} bytes, {:?}",
        got.len(),
        started.elapsed()
    );
    assert!(
        started.elapsed() > Duration::from_millis(400),
        "the download was not slower than the deadline: the test proves nothing"
    );
    // Then silence after that hit: closed at the deadline too.
    let idle = Instant::now();
    let rest = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(rest.is_empty());
    assert!(
        idle.elapsed() < Duration::from_secs(5),
        "a keep-alive connection idle after a hit was not closed"
    );
}

// 8. The memory tier holds every entry up to the largest response it may store, and an
// entry no tier holds is reported as too large, never as stored.
#[tokio::test]
async fn large_entries_are_held_or_reported_not_stored() {
    let up = Upstream::start().await;
    let route = "[[routes]]\nmethod = \"GET\"\npath = \"/big\"\nttl_secs = 60\n";
    let big = |gate: &Gate| {
        let req = gate.client.get(gate.url("/big"));
        async move {
            Reply::from(
                req.header("x-test-body-bytes", "614400")
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let gate = Gate::start(
        &up,
        None,
        &format!("[cache]\nmemory_max_bytes = 4194304\n{route}"),
    )
    .await;
    let first = big(&gate).await;
    assert_eq!(first.body.len(), 614_400);
    assert!(
        first.header("cache-status").contains("stored"),
        "{}",
        first.header("cache-status")
    );
    let second = big(&gate).await;
    assert_eq!((second.cache(), second.n()), ("HIT", first.n()));

    let small = Gate::start(
        &up,
        None,
        &format!("[cache]\nmemory_max_bytes = 102400\n{route}"),
    )
    .await;
    let refused = big(&small).await;
    assert!(
        refused.header("cache-status").ends_with("detail=too-large"),
        "{}",
        refused.header("cache-status")
    );
    assert_eq!(big(&small).await.cache(), "MISS");
    assert_eq!(small.stats().await["stores_by_tier"]["memory"], 0);
}

// 9. A client that stops reading a response is cut at the send timeout, and gives its
// connection slot back.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_the_send_timeout() {
    const BIG: usize = 32 << 20;
    let big = {
        let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
        r.resize(r.len() + BIG, b'x');
        std::sync::Arc::new(r)
    };
    let up = RawUpstream::start(move |head, _| {
        if head.starts_with("GET /big ") {
            Script::Reply(big.to_vec())
        } else {
            Script::Reply(ok("small", ""))
        }
    })
    .await;
    let gate = Gate::start_at(
        &up.url(),
        None,
        "[server]\nclient_send_timeout_ms = 300\nmax_connections = 1\n",
        "",
    )
    .await;
    // A client with a small receive window that asks for 32 MB and reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(gate.addr().parse().unwrap()).await.unwrap();
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            gate.stats().await["client_errors"]["send-timeout"] == 1
        })
        .await,
        "a client that stopped reading was never cut"
    );
    assert!(
        common::eventually(LIMIT, || async {
            gate.stats().await["connections"]["open"] == 0
        })
        .await
    );
    // The only connection slot is free again.
    let reply = tokio::time::timeout(LIMIT, gate.get("/small"))
        .await
        .unwrap();
    assert_eq!(reply.body, "small");
    drop(stalled);
}

// 11. Route matching, the key and the upstream see one path.
#[tokio::test]
async fn path_spellings_cannot_escape_a_disabled_route() {
    let up = Upstream::start().await;
    let gate = Gate::start(
        &up,
        None,
        r#"
[[routes]]
method = "GET"
path = "/api/account/*"
ttl_secs = 60
enabled = false

[[routes]]
method = "GET"
path = "/*"
ttl_secs = 60
"#,
    )
    .await;
    for path in [
        "/api/account/me",
        "/api/%61ccount/me",
        "/api//account/me",
        "/kpi/../api/account/me",
        "/kpi/%2e%2E/api/./account/me",
        "/api/account/x/../me",
    ] {
        for _ in 0..2 {
            let r = gate.get(path).await;
            assert_eq!(r.cache(), "BYPASS", "{path}");
            assert_eq!(r.json()["path"], "/api/account/me", "{path}");
        }
    }
    // An encoded slash or a path parameter means different paths to different upstreams:
    // never cached.
    for path in [
        "/kpi/..%2Fapi/account/me",
        "/api/account;/me",
        "/api/account;x=1/me",
    ] {
        let r = gate.get(path).await;
        assert!(
            r.header("cache-status").ends_with("detail=ambiguous-path"),
            "{path}"
        );
    }
    // HEAD follows the GET route: the disabled route cannot be sidestepped.
    let head = gate
        .client
        .head(gate.url("/api/account/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(Reply::from(head).await.cache(), "BYPASS");
}

// 12. Upgrades are tunnelled, never cached.
#[tokio::test]
async fn websocket_upgrades_are_tunnelled_both_ways() {
    let up = RawUpstream::start(|head, _| {
        let head = head.to_ascii_lowercase();
        if head.starts_with("get /wrong ") {
            return Script::Reply(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n".to_vec());
        }
        if !head.contains("upgrade: websocket") {
            let seen = if head.contains("upgrade:") { "upgrade" } else { "plain" };
            return Script::Reply(ok(seen, ""));
        }
        Script::Echo(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nhello from upstream|".to_vec())
    })
    .await;
    let gate = Gate::start_at(
        &up.url(),
        None,
        "[server]\ntunnel_idle_timeout_ms = 500\n",
        "",
    )
    .await;
    let (mut s, text) = open_websocket(&gate).await;
    assert!(text.starts_with("http/1.1 101"), "{text}");
    assert!(text.contains("upgrade: websocket"), "{text}");
    assert!(text.contains("x-cache-status: bypass"), "{text}");
    s.write_all(b"ping from client").await.unwrap();
    let mut echo = [0u8; 16];
    tokio::time::timeout(LIMIT, s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping from client");
    // The tunnel keeps its connection slot while open.
    let stats = gate.stats().await;
    assert_eq!(stats["connections"]["tunnels"], 1, "{stats}");
    assert_eq!(stats["connections"]["open"], 1, "{stats}");
    // Silent both ways for tunnel_idle_timeout_ms: closed, slot given back.
    let started = Instant::now();
    let rest = read_to_close(&mut s, LIMIT).await;
    assert!(rest.is_empty() && started.elapsed() < LIMIT);
    assert!(
        common::eventually(LIMIT, || async {
            let stats = gate.stats().await;
            stats["connections"]["tunnels"] == 0 && stats["connections"]["open"] == 0
        })
        .await
    );

    // Only WebSocket is tunnelled: an h2c upgrade would carry headers past the forwarding
    // rules, so it goes on as a plain request without its Upgrade.
    let h2c = exchange(
        &gate.addr(),
        b"GET /h2c HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    let h2c = String::from_utf8_lossy(&h2c);
    assert!(h2c.starts_with("HTTP/1.1 200"), "{h2c}");
    assert!(h2c.ends_with("plain"), "the upstream saw an upgrade: {h2c}");
    // An upstream that switches to another protocol is an upstream fault.
    let wrong = exchange(
        &gate.addr(),
        b"GET /wrong HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    let wrong = String::from_utf8_lossy(&wrong);
    assert!(wrong.starts_with("HTTP/1.1 502"), "{wrong}");
    // Nor when it is listed next to websocket, on one line or two.
    for upgrade in [
        "Upgrade: h2c, websocket\r\n",
        "Upgrade: h2c\r\nUpgrade: websocket\r\n",
    ] {
        let request = format!(
            "GET /h2c HTTP/1.1\r\nHost: a\r\n{upgrade}Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: close\r\n\r\n"
        );
        let out = exchange(&gate.addr(), request.as_bytes(), Duration::from_millis(500)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("plain"),
            "{upgrade:?}: {out}"
        );
    }
}

// A tunnel is not waiting for a request head: the head deadline (`header_read_timeout_ms`)
// does not cut it, however long it lasts, while its traffic goes on.
#[tokio::test]
async fn tunnels_outlive_the_request_head_deadline() {
    let up = RawUpstream::start(|_, _| {
        Script::Echo(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nhello from upstream|".to_vec())
    })
    .await;
    let config = "[server]\nheader_read_timeout_ms = 200\ntunnel_idle_timeout_ms = 5000\n";
    let gate = Gate::start_at(&up.url(), None, config, "").await;
    let (mut s, text) = open_websocket(&gate).await;
    assert!(text.starts_with("http/1.1 101"), "{text}");
    // Four head deadlines long, a message every half deadline: every echo comes back.
    for i in 0..8u8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ping = [b'0' + i; 8];
        s.write_all(&ping).await.unwrap();
        let mut echo = [0u8; 8];
        tokio::time::timeout(LIMIT, s.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(echo, ping);
    }
}

#[tokio::test]
async fn tunnels_count_against_max_connections_and_close_at_shutdown() {
    let up = RawUpstream::start(|_, _| {
        Script::Echo(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nhello from upstream|".to_vec())
    })
    .await;
    let mut gate = Gate::start_at(&up.url(), None, "[server]\nmax_connections = 1\n", "").await;
    let (mut tunnel, _) = open_websocket(&gate).await;
    // The tunnel still counts on its connection thread after the upgrade.
    assert_eq!(gate.thread_connections().await.iter().sum::<i64>(), 1);
    // The only slot is the tunnel's: another client waits.
    let mut second = TcpStream::connect(gate.addr()).await.unwrap();
    second
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(200), second.read_exact(&mut buf)).await;
    assert!(early.is_err(), "served while the tunnel held the only slot");
    // Shutdown closes the open tunnel instead of waiting out its 10 s grace.
    let started = Instant::now();
    gate.running.take().unwrap().shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let rest = read_to_close(&mut tunnel, LIMIT).await;
    assert!(rest.is_empty());
}

/// Opens a WebSocket tunnel through `gate` and reads up to the upstream's greeting.
/// Returns the socket and the lower-cased text read.
async fn open_websocket(gate: &Gate) -> (TcpStream, String) {
    let mut s = TcpStream::connect(gate.addr()).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    let got = read_until(&mut s, b"hello from upstream|").await;
    (s, String::from_utf8_lossy(&got).to_ascii_lowercase())
}

/// Reads from `s` until what came ends with `suffix` (within [`LIMIT`] per read).
async fn read_until(s: &mut TcpStream, suffix: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    while !got.ends_with(suffix) {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(LIMIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

// 13. A client's malformed body is a client fault.
#[tokio::test]
async fn malformed_request_bodies_are_400_not_502() {
    let up = Upstream::start().await;
    let gate = Gate::start(&up, None, CHART_ROUTE).await;
    for path in ["/chart", "/other"] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\nzz\r\n"
        );
        let out = exchange(&gate.addr(), req.as_bytes(), LIMIT).await;
        assert!(
            String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
            "{path}: {}",
            String::from_utf8_lossy(&out)
        );
    }
    assert_eq!(gate.stats().await["client_errors"]["body"], 2);
    assert_eq!(gate.stats().await["upstream_errors"]["unreachable"], 0);
}

/// A body a `key_body` route reads whole, trickled one byte at a time just inside the idle
/// limit: cut with 408 at `keyed_body_timeout_ms` from the request's arrival, instead of
/// holding the connection for as long as the client keeps trickling.
#[tokio::test]
async fn a_trickled_keyed_body_is_cut_at_its_deadline() {
    let up = Upstream::start().await;
    let gate = Gate::start(
        &up,
        None,
        &format!(
            "[server]\nclient_body_timeout_ms = 2000\nkeyed_body_timeout_ms = 800\n{CHART_ROUTE}"
        ),
    )
    .await;
    let mut s = TcpStream::connect(gate.addr()).await.unwrap();
    let head = "POST /chart HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    // One byte every 100 ms, 20 times the deadline's worth, until the answer comes.
    let mut answer = [0u8; 64];
    let mut got = 0;
    for _ in 0..160 {
        tokio::select! {
            n = s.read(&mut answer) => {
                got = n.unwrap_or(0);
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if s.write_all(b" ").await.is_err() {
                    break;
                }
            }
        }
    }
    let elapsed = started.elapsed();
    assert!(
        String::from_utf8_lossy(&answer[..got]).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer[..got])
    );
    assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(up.hits(), 0);
}
