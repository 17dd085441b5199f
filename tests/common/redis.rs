//! A real `redis-server` for the tests, started on a free port and stopped by its PID.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port, signal};

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

    /// Clients subscribed to `channel` (`PUBSUB NUMSUB`).
    pub async fn subscribers(&self, channel: &str) -> u64 {
        let mut conn = self.connection().await;
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        counts.first().map_or(0, |(_, n)| *n)
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
