//! The cachegate process and its signals: SIGHUP changes the kill switch and rollout
//! without a rebuild or restart; SIGTERM stops it cleanly.

mod common;

use std::time::Duration;

use common::{GateProcess, Upstream, eventually};

fn config(up: &Upstream, cache: &str) -> String {
    format!(
        "[cache]\n{cache}\n[upstream]\nurl = \"{}\"\n[[routes]]\nmethod = \"GET\"\npath = \"/kpi/*\"\nttl_secs = 60\n",
        up.url()
    )
}

async fn status(client: &reqwest::Client, url: &str) -> String {
    let resp = client.get(url).send().await.unwrap();
    resp.headers()["x-cache-status"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn sighup_applies_kill_switch_and_rollout() {
    let up = Upstream::start().await;
    let gate = GateProcess::start(&config(&up, "enabled = true")).await;
    let client = common::client();
    let url = format!("{}/kpi/a", gate.base);
    assert_eq!(status(&client, &url).await, "MISS");
    assert_eq!(status(&client, &url).await, "HIT");

    gate.reload(&config(&up, "enabled = false"));
    let off = eventually(Duration::from_secs(5), || async {
        status(&client, &url).await == "BYPASS"
    })
    .await;
    assert!(off, "kill switch not applied on SIGHUP");

    gate.reload(&config(&up, "enabled = true\nrollout_percent = 0"));
    let on = eventually(Duration::from_secs(5), || async {
        let resp = client.get(&url).send().await.unwrap();
        resp.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("detail=rollout")
    })
    .await;
    assert!(on, "rollout not applied on SIGHUP");

    gate.reload(&config(&up, "enabled = true\nrollout_percent = 100"));
    let back = eventually(Duration::from_secs(5), || async {
        status(&client, &url).await == "HIT"
    })
    .await;
    assert!(back, "switches not restored");
}

#[tokio::test]
async fn sigterm_stops_the_process_cleanly() {
    let up = Upstream::start().await;
    let mut gate = GateProcess::start(&config(&up, "enabled = true")).await;
    let client = common::client();
    assert_eq!(
        status(&client, &format!("{}/kpi/t", gate.base)).await,
        "MISS"
    );
    gate.terminate();
    let mut exit = None;
    let stopped = eventually(Duration::from_secs(15), || {
        exit = exit.or_else(|| gate.try_exit());
        let done = exit.is_some();
        async move { done }
    })
    .await;
    assert!(stopped, "cachegate did not stop on SIGTERM");
    assert_eq!(exit, Some(0));
}

#[tokio::test]
async fn logs_have_no_colour_codes_off_a_terminal_and_warn_when_redis_is_down() {
    use std::process::{Command, Stdio};
    let log = tempfile::NamedTempFile::new().unwrap();
    let (listen, admin, dead_redis) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_cachegate"))
        .args(["serve", "--upstream", "http://127.0.0.1:9"])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--redis", &format!("redis://127.0.0.1:{dead_redis}")])
        .env("CACHEGATE_KEY_SECRET", "test-secret")
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let warned = common::eventually(Duration::from_secs(10), || async {
        std::fs::read_to_string(log.path()).is_ok_and(|t| t.contains("redis is unreachable"))
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(warned, "no start-up warning: {text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file: {text:?}"
    );
}
