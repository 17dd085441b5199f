//! Test harness: a real upstream HTTP server, a real `redis-server` on a free port, and
//! cachegate itself, in-process or as a separate process. Everything listens on 127.0.0.1.

#![allow(dead_code, unused_imports)]

mod gate;
pub mod raw;
mod redis;
mod relay;
mod upstream;

use std::net::TcpListener as StdListener;
use std::process::Command;
use std::time::{Duration, Instant};

pub use self::gate::{Gate, GateProcess};
pub use self::redis::Redis;
pub use self::relay::Relay;
pub use self::upstream::Upstream;

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

/// Sends a signal (`-STOP`, `-CONT`, `-HUP`, ...) to a process this test started.
fn signal(sig: &str, pid: &str) {
    let _ = Command::new("kill").args([sig, pid]).status();
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
