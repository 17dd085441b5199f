//! The `cachegate` command: `serve` and `check-config`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cachegate::config::{Config, ConfigError, Overrides};
use clap::{Parser, Subcommand, ValueEnum};

/// A caching reverse proxy for slow HTTP APIs: a memory tier in the process, an optional
/// shared Redis/Valkey tier, one upstream request per key.
#[derive(Parser)]
#[command(name = "cachegate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in front of an upstream.
    ///
    /// Example: cachegate serve --upstream http://127.0.0.1:8000
    Serve {
        /// TOML config file (routes, TTLs, Redis, limits); flags override it.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1:8080].
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Upstream base URL, e.g. http://127.0.0.1:8000.
        #[arg(long, value_name = "URL")]
        upstream: Option<String>,
        /// Redis/Valkey URL for the shared tier (redis:// or rediss://).
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        /// Address of the admin listener (/metrics, /stats, /healthz) [default: 127.0.0.1:9090].
        #[arg(long, value_name = "ADDR")]
        admin_listen: Option<SocketAddr>,
        /// Log format: human-readable text or one JSON object per line.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Purge on every replica through a running cachegate's admin API
    /// (`POST /admin/purge`), and print its JSON reply.
    ///
    /// Example: cachegate purge --tag kpi --path '/kpi/leads/*'
    ///
    /// Exit status: 0 when every replica acknowledged, 1 when not (or Redis was not
    /// reached: applied on that replica only), 2 on errors.
    Purge {
        /// The admin listener's base URL.
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// The admin bearer token.
        #[arg(long, env = "CACHEGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Purge entries with this tag (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Purge entries whose path matches this glob (repeatable; `*` any run).
        #[arg(long = "path", value_name = "GLOB")]
        paths: Vec<String>,
        /// Purge entries stored by this route (repeatable).
        #[arg(long = "route", value_name = "NAME")]
        routes: Vec<String>,
        /// Purge every entry of the namespace.
        #[arg(long)]
        all: bool,
        /// Raise this configured event instead (`POST /admin/events/{name}`).
        #[arg(long, value_name = "NAME", conflicts_with_all = ["tags", "paths", "routes", "all"])]
        event: Option<String>,
    },
    /// Validate a config file and print the effective config (secrets redacted).
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match load(Some(&file), &Overrides::default()) {
            Ok(config) => {
                print!("{}", config.to_redacted_toml());
                eprintln!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Purge {
            admin,
            token,
            tags,
            paths,
            routes,
            all,
            event,
        } => {
            let (path, body) = match event {
                Some(name) => (format!("/admin/events/{name}"), String::new()),
                None => {
                    let body = serde_json::json!({"tags": tags, "paths": paths, "routes": routes, "all": all});
                    ("/admin/purge".to_string(), body.to_string())
                }
            };
            purge(
                &format!("{}{path}", admin.trim_end_matches('/')),
                &token,
                body,
            )
        }
        Command::Serve {
            config,
            listen,
            upstream,
            redis,
            admin_listen,
            log_format,
        } => {
            init_logging(log_format);
            cachegate::server::install_panic_hook();
            let overrides = Overrides {
                listen,
                admin_listen,
                upstream,
                redis,
            };
            let loaded = match load(config.as_deref(), &overrides) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            serve(loaded, config, overrides)
        }
    }
}

fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
    let config = match file {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.finish(overrides, |name| std::env::var(name).ok())
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("cachegate: error: {e}");
    ExitCode::from(2)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour codes only for a person at a terminal, never in files or log collectors.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(config: Config, file: Option<PathBuf>, overrides: Overrides) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async move {
        let running = match cachegate::server::start(config).await {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        #[cfg(unix)]
        tokio::spawn(reload_on_sighup(running.switches.clone(), file, overrides));
        shutdown_signal().await;
        tracing::info!("shutting down");
        running.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// On SIGHUP, re-reads the config file and the environment and applies the switches that
/// can change while running: `enabled` and `rollout_percent`. A bad file is logged and the
/// running values are kept. Other settings need a restart.
#[cfg(unix)]
async fn reload_on_sighup(
    switches: std::sync::Arc<cachegate::proxy::Switches>,
    file: Option<PathBuf>,
    overrides: Overrides,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match load(file.as_deref(), &overrides) {
            Ok(config) => {
                switches.set_enabled(config.cache.enabled);
                switches.set_rollout_percent(config.cache.rollout_percent.0);
                tracing::info!(
                    enabled = config.cache.enabled,
                    rollout_percent = config.cache.rollout_percent.0,
                    "reloaded switches (other settings need a restart)"
                );
            }
            Err(e) => tracing::error!(error = %e, "reload failed; keeping the running config"),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Posts `body` to the admin API at `url` with the bearer `token` and prints the reply.
fn purge(url: &str, token: &str, body: String) -> ExitCode {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async {
        let request = http::Request::post(url)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body)));
        let request = match request {
            Ok(r) => r,
            Err(e) => return fail(&format!("{url}: {e}")),
        };
        let client: Client<_, Full<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let sent =
            tokio::time::timeout(std::time::Duration::from_secs(30), client.request(request));
        let response = match sent.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return fail(&format!("{url}: {e}")),
            Err(_) => return fail(&format!("{url}: no answer within 30 s")),
        };
        let status = response.status();
        let text = match response.into_body().collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(e) => return fail(&format!("{url}: {e}")),
        };
        println!("{}", text.trim_end());
        if !status.is_success() && status != http::StatusCode::SERVICE_UNAVAILABLE {
            return fail(&format!("{url}: {status}"));
        }
        let confirmed =
            serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v["confirmed"] == true);
        if confirmed {
            ExitCode::SUCCESS
        } else {
            eprintln!("cachegate: not every replica acknowledged (see the reply)");
            ExitCode::from(1)
        }
    })
}
