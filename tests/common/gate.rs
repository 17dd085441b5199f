//! cachegate under test: in this process, or as its own process.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Redis, Reply, Upstream, admin_text, client, eventually, free_port, signal};

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
        Gate::start_at(&upstream.url(), redis, config, "").await
    }

    /// Starts cachegate in front of the upstream at `url`; `upstream_extra` adds lines to
    /// the `[upstream]` table (timeouts, `preserve_host`).
    pub async fn start_at(
        url: &str,
        redis: Option<String>,
        config: &str,
        upstream_extra: &str,
    ) -> Gate {
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{config}\n[upstream]\nurl = \"{url}\"\nresponse_timeout_ms = 3000\n{upstream_extra}\n"
        );
        if let Some(table) = redis {
            toml.push_str(&format!("[redis]\n{table}"));
        }
        Gate::start_toml(&toml).await
    }

    /// Starts cachegate with the whole configuration `toml` (`listen`, `admin_listen` and
    /// `[upstream]` included).
    pub async fn start_toml(toml: &str) -> Gate {
        let config = cachegate::config::Config::from_toml(toml, None)
            .unwrap()
            .finish(&Default::default(), |name| {
                (name == "CACHEGATE_KEY_SECRET").then(|| "test-secret".to_string())
            })
            .unwrap();
        let running = cachegate::server::start(config).await.unwrap();
        let gate = Gate {
            base: format!("http://{}", running.listen_addr),
            admin: format!("http://{}", running.admin_addr),
            running: Some(running),
            client: client(),
        };
        // With Redis, Redis entries are served once the purge markers are loaded: wait for
        // that (bounded: a Redis that refuses us never gets there, and tests say so).
        let _ = eventually(Duration::from_secs(3), || async {
            gate.stats().await["redis"]["in_sync"] == true
        })
        .await;
        gate
    }

    /// The proxy's `host:port`, for raw sockets.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
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

    /// POSTs `body` to the admin listener's `path` (with the bearer `token`, if any);
    /// returns the status and the reply as JSON (a JSON string when it is not JSON).
    pub async fn admin_post(
        &self,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .client
            .post(format!("{}{path}", self.admin))
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

    pub async fn metrics(&self) -> String {
        admin_text(&self.client, &self.admin, "/metrics").await
    }

    /// `cachegate_thread_connections`: open connections per connection thread.
    pub async fn thread_connections(&self) -> Vec<i64> {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("cachegate_thread_connections{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect()
    }

    /// `cachegate_redis_thread_connections`: the connection threads' own Redis read
    /// connections.
    pub async fn redis_thread_connections(&self) -> i64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix("cachegate_redis_thread_connections "))
            .map_or(0, |n| n.trim().parse().unwrap())
    }

    pub async fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&admin_text(&self.client, &self.admin, "/stats").await).unwrap()
    }

    pub fn switches(&self) -> &cachegate::proxy::Switches {
        &self.running.as_ref().unwrap().switches
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
        Self::start_logging_to(config_toml, Stdio::null()).await
    }

    /// As [`GateProcess::start`], its log (stderr) written to `log`.
    pub async fn start_logging_to(config_toml: &str, log: impl Into<Stdio>) -> GateProcess {
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
            .stderr(log)
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
        // As for `Gate`: with Redis, Redis entries are served once the purge markers are
        // loaded; wait for that (bounded: a Redis that refuses us never gets there).
        let stats = format!("{}/stats", gate.admin);
        let _ = eventually(Duration::from_secs(3), || {
            let (c, stats) = (c.clone(), stats.clone());
            async move {
                let Ok(resp) = c.get(&stats).send().await else {
                    return false;
                };
                let stats: serde_json::Value = resp.json().await.unwrap_or_default();
                stats["redis"]["configured"] == false || stats["redis"]["in_sync"] == true
            }
        })
        .await;
        gate
    }
}

impl GateProcess {
    /// Sends SIGTERM to this process (by its PID).
    pub fn terminate(&self) {
        signal("-TERM", &self.child.id().to_string());
    }

    /// The exit code, once the process has exited.
    pub fn try_exit(&mut self) -> Option<i32> {
        self.child
            .try_wait()
            .ok()
            .flatten()
            .map(|s| s.code().unwrap_or(-1))
    }

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
