//! The `cachegate` command line: config validation and its error messages.

use std::io::Write;
use std::process::{Command, Output};

fn cachegate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cachegate"))
        .args(args)
        .env_remove("CACHEGATE_KEY_SECRET")
        .env_remove("CACHEGATE_ENABLED")
        .env_remove("CACHEGATE_ROLLOUT_PERCENT")
        .output()
        .unwrap()
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn bad_config_names_file_line_and_field() {
    let f = config_file(
        "[upstream]\nurl = \"http://127.0.0.1:8000\"\n\n[[routes]]\nmethod = \"GET\"\npath = \"/kpi/*\"\nttl_sec = 30\n",
    );
    let path = f.path().to_str().unwrap();
    for args in [vec!["check-config", path], vec!["serve", "--config", path]] {
        let out = cachegate(&args);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{path}:7:")), "{err}");
        assert!(err.contains("ttl_sec"), "{err}");
    }
}

#[test]
fn bad_values_are_explained() {
    let cases = [
        ("[upstream]\nurl = \"ftp://x\"\n", "2:", "http:// URL"),
        ("[cache]\nrollout_percent = 101\n", "2:", "0 to 100"),
        (
            "[[routes]]\nmethod = \"FETCH\"\npath = \"/\"\nttl_secs = 1\n",
            "2:",
            "HTTP method",
        ),
        (
            "[[routes]]\nmethod = \"GET\"\npath = \"kpi\"\nttl_secs = 1\n",
            "3:",
            "starting with '/'",
        ),
        ("listen = \"nowhere\"\n", "1:", "listen"),
    ];
    for (text, line, expected) in cases {
        let f = config_file(text);
        let out = cachegate(&["check-config", f.path().to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(err.contains(&format!(":{line}")), "{text}: {err}");
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
fn missing_upstream_and_secret_are_errors() {
    let f = config_file("[cache]\nenabled = true\n");
    let err =
        String::from_utf8_lossy(&cachegate(&["check-config", f.path().to_str().unwrap()]).stderr)
            .to_string();
    assert!(err.contains("upstream.url"), "{err}");
    let f = config_file(
        "[upstream]\nurl = \"http://127.0.0.1:1\"\n[redis]\nurl = \"redis://127.0.0.1:2\"\n",
    );
    let err =
        String::from_utf8_lossy(&cachegate(&["check-config", f.path().to_str().unwrap()]).stderr)
            .to_string();
    assert!(err.contains("key_secret"), "{err}");
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let f = config_file(
        "[upstream]\nurl = \"http://127.0.0.1:8000\"\n[cache]\nkey_secret = \"hunter2\"\n[redis]\nurl = \"redis://app:pw@127.0.0.1:6379\"\n",
    );
    let out = cachegate(&["check-config", f.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:8080\""), "{text}");
    assert!(text.contains("op_timeout_ms = 100"), "{text}");
    assert!(
        !text.contains("hunter2") && !text.contains(":pw@"),
        "{text}"
    );
}

#[test]
fn version_and_help() {
    let out = cachegate(&["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cachegate "));
    let help = String::from_utf8_lossy(&cachegate(&["serve", "--help"]).stdout).to_string();
    for flag in [
        "--listen",
        "--upstream",
        "--redis",
        "--admin-listen",
        "--config",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} missing from help");
    }
}

#[test]
fn shipped_example_configs_are_valid() {
    for file in ["config/astrology.toml", "config/kpi-dashboard.toml"] {
        let out = Command::new(env!("CARGO_BIN_EXE_cachegate"))
            .args(["check-config", file])
            .env("CACHEGATE_KEY_SECRET", "example")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
