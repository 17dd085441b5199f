//! Test harness: a real upstream HTTP server, a real `redis-server` on a free port, and
//! cachegate itself, in-process or as a separate process. Everything listens on 127.0.0.1.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real HTTP upstream. Every response is JSON echoing the request, with `n`, a counter
/// that grows with every request the upstream answers, so a cached answer is recognisable.
/// Request headers steer it (they are not part of any cache key unless a test says so):
/// `x-test-status`, `x-test-cache-control`, `x-test-set-cookie`, `x-test-delay-ms`,
/// `x-test-body-bytes` (pads the body to that size), `x-test-etag` (its `ETag`; a request
/// whose `If-None-Match` matches it gets `304`). A `Range` request gets a `206`.
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let counter = counter.clone();
                        async move { Ok::<_, Infallible>(answer(req, &counter).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, hits }
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn answer(req: Request<Incoming>, counter: &AtomicUsize) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = header("x-test-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
        .collect();
    let mut doc = json!({
        "n": n,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "body": String::from_utf8_lossy(&body),
        "headers": headers,
    })
    .to_string();
    if let Some(size) = header("x-test-body-bytes").and_then(|v| v.parse::<usize>().ok()) {
        while doc.len() < size {
            doc.push(' ');
        }
    }
    let etag = header("x-test-etag");
    if let Some(tag) = etag.filter(|tag| header("if-none-match") == Some(*tag)) {
        let resp = Response::builder().status(304).header("etag", tag);
        return resp.body(Full::new(Bytes::new())).unwrap();
    }
    if header("range").is_some() {
        let resp = Response::builder()
            .status(206)
            .header("content-range", format!("bytes 0-0/{}", doc.len()));
        return resp
            .body(Full::new(Bytes::from(doc[..1].to_string())))
            .unwrap();
    }
    let mut resp = Response::builder()
        .status(
            header("x-test-status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(200u16),
        )
        .header("content-type", "application/json");
    if let Some(etag) = etag {
        resp = resp.header("etag", etag);
    }
    if let Some(cc) = header("x-test-cache-control") {
        resp = resp.header("cache-control", cc);
    }
    if let Some(cookie) = header("x-test-set-cookie") {
        resp = resp.header("set-cookie", cookie);
    }
    resp.body(Full::new(Bytes::from(doc))).unwrap()
}

/// A real `redis-server` on a free loopback port, killed when dropped.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    args: Vec<String>,
    /// The CA certificate (PEM) when the server speaks TLS only.
    pub tls_ca: Option<PathBuf>,
}

impl Redis {
    pub async fn start() -> Redis {
        Redis::start_with(&[]).await
    }

    /// Starts with extra `redis-server` arguments (e.g. ACL users).
    pub async fn start_with(args: &[&str]) -> Redis {
        let mut redis = Redis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| a.to_string()).collect(),
            tls_ca: None,
        };
        redis.spawn().await;
        redis
    }

    /// Starts a TLS-only server with a certificate for 127.0.0.1 signed by a fresh private
    /// CA (made with the `openssl` command).
    pub async fn start_tls() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let (ca, ca_key, cert, key, csr, ext) = (
            path("ca.pem"),
            path("ca.key"),
            path("cert.pem"),
            path("key.pem"),
            path("server.csr"),
            path("ext.cnf"),
        );
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        let steps: [Vec<&str>; 3] = [
            vec![
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=cachegate-test-ca",
                "-keyout",
                &ca_key,
                "-out",
                &ca,
            ],
            vec![
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
            vec![
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
        ];
        for args in steps {
            let ok = Command::new("openssl")
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl must be installed");
            assert!(ok.success(), "openssl {args:?} failed");
        }
        let cert = PathBuf::from(cert);
        let key = PathBuf::from(key);
        let ca = PathBuf::from(ca);
        let port = free_port();
        let mut redis = Redis {
            port,
            child: None,
            args: vec![
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                cert.to_str().unwrap().into(),
                "--tls-key-file".into(),
                key.to_str().unwrap().into(),
                "--tls-ca-cert-file".into(),
                ca.to_str().unwrap().into(),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
            tls_ca: Some(ca),
            dir,
        };
        redis.spawn().await;
        redis
    }

    /// A redis-rs client for this server (trusting its CA when it speaks TLS).
    pub fn client(&self) -> redis::Client {
        match &self.tls_ca {
            None => redis::Client::open(self.url()).unwrap(),
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            )
            .unwrap(),
        }
    }

    async fn spawn(&mut self) {
        let plain_port = if self.tls_ca.is_some() { 0 } else { self.port };
        let child = Command::new(redis_server())
            .args(["--port", &plain_port.to_string()])
            .args(&self.args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see .ci/run)");
        self.child = Some(child);
        let client = self.client();
        let up = eventually(Duration::from_secs(10), || {
            let client = client.clone();
            async move { ping(client).await }
        })
        .await;
        assert!(up, "redis-server did not come up on port {}", self.port);
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The body of cachegate's `[redis]` table for this server.
    pub fn config_table(&self) -> String {
        let mut table = format!("url = \"{}\"\n", self.url());
        if let Some(ca) = &self.tls_ca {
            table.push_str(&format!("tls_ca_file = \"{}\"\n", ca.display()));
        }
        table
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        signal("-STOP", &self.pid());
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        signal("-CONT", &self.pid());
    }

    /// Kills the server outright (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal("-CONT", &child.id().to_string());
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: nothing was persisted).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut conn = self.connection().await;
        redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(sig: &str, pid: &str) {
    let _ = Command::new("kill").args([sig, pid]).status();
}

fn redis_server() -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = PathBuf::from(dir).join("redis-server");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("redis-server")
}

async fn ping(client: redis::Client) -> bool {
    let Ok(Ok(mut conn)) = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return false;
    };
    match redis::cmd("PING").query_async::<String>(&mut conn).await {
        Ok(_) => true,
        // The server answers, it only wants credentials.
        Err(e) => e.to_string().contains("NOAUTH") || e.to_string().contains("WRONGPASS"),
    }
}

/// A cachegate running in this test process.
pub struct Gate {
    pub running: Option<cachegate::server::Running>,
    pub base: String,
    pub admin: String,
    pub client: reqwest::Client,
}

impl Gate {
    /// Starts cachegate in front of `upstream` with the extra TOML `config` (which must not
    /// set `listen`, `admin_listen` or `[upstream]`); `redis` adds the shared tier.
    pub async fn start(upstream: &Upstream, redis: Option<&Redis>, config: &str) -> Gate {
        Gate::start_inner(upstream, redis.map(Redis::config_table), config).await
    }

    /// Like [`Gate::start`] with an explicit Redis URL (credentials, TLS).
    pub async fn start_with_redis_url(upstream: &Upstream, url: &str, config: &str) -> Gate {
        Gate::start_inner(upstream, Some(format!("url = \"{url}\"\n")), config).await
    }

    async fn start_inner(upstream: &Upstream, redis: Option<String>, config: &str) -> Gate {
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{config}\n[upstream]\nurl = \"{}\"\nresponse_timeout_ms = 3000\n",
            upstream.url()
        );
        if let Some(table) = redis {
            toml.push_str(&format!("[redis]\n{table}"));
        }
        let config = cachegate::config::Config::from_toml(&toml, None)
            .unwrap()
            .finish(&Default::default(), |name| {
                (name == "CACHEGATE_KEY_SECRET").then(|| "test-secret".to_string())
            })
            .unwrap();
        let running = cachegate::server::start(config).await.unwrap();
        Gate {
            base: format!("http://{}", running.listen_addr),
            admin: format!("http://{}", running.admin_addr),
            running: Some(running),
            client: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> Reply {
        Reply::from(self.client.get(self.url(path)).send().await.unwrap()).await
    }

    pub async fn post_json(&self, path: &str, body: &str) -> Reply {
        let req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        Reply::from(req.send().await.unwrap()).await
    }

    pub async fn metrics(&self) -> String {
        admin_text(&self.client, &self.admin, "/metrics").await
    }

    pub async fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&admin_text(&self.client, &self.admin, "/stats").await).unwrap()
    }

    pub fn switches(&self) -> &cachegate::proxy::Switches {
        &self.running.as_ref().unwrap().switches
    }
}

pub async fn admin_text(client: &reqwest::Client, admin: &str, path: &str) -> String {
    client
        .get(format!("{admin}{path}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A response with its body read.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub async fn from(resp: reqwest::Response) -> Reply {
        Reply {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap(),
        }
    }

    pub fn cache(&self) -> &str {
        self.header("x-cache-status")
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The upstream's request counter in the body.
    pub fn n(&self) -> u64 {
        self.json()["n"].as_u64().unwrap_or(0)
    }
}

/// `cachegate` run as its own process, stopped (by PID) when dropped.
pub struct GateProcess {
    child: Child,
    pub base: String,
    pub admin: String,
    pub config: tempfile::NamedTempFile,
}

impl GateProcess {
    pub async fn start(config_toml: &str) -> GateProcess {
        use std::io::Write;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(config_toml.as_bytes()).unwrap();
        let (listen, admin) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_cachegate"))
            .arg("serve")
            .arg("--config")
            .arg(file.path())
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .env("CACHEGATE_KEY_SECRET", "test-secret")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let gate = GateProcess {
            child,
            base: format!("http://127.0.0.1:{listen}"),
            admin: format!("http://127.0.0.1:{admin}"),
            config: file,
        };
        let health = format!("{}/healthz", gate.admin);
        let c = client();
        let up = eventually(Duration::from_secs(10), || {
            let (c, health) = (c.clone(), health.clone());
            async move { c.get(&health).send().await.is_ok() }
        })
        .await;
        assert!(up, "cachegate process did not start");
        gate
    }
}

impl GateProcess {
    /// Replaces the config file and sends SIGHUP to this process (by its PID).
    pub fn reload(&self, config_toml: &str) {
        std::fs::write(self.config.path(), config_toml).unwrap();
        signal("-HUP", &self.child.id().to_string());
    }
}

impl Drop for GateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
