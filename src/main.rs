//! The `cachegate` command: `serve`, `purge`, `warm` and `check-config`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cachegate::config::{Config, ConfigError, Overrides};
use clap::{Parser, Subcommand, ValueEnum};

// The server answers a request whose handler panicked with 500 and goes on serving
// (`catch_unwind` per request): a build that aborts on panic would take every connection
// down with one request.
#[cfg(not(panic = "unwind"))]
compile_error!("cachegate serve needs panic = \"unwind\" (see Cargo.toml's release profile)");

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
    /// Warm the cache from a list of requests through a running cachegate's admin API
    /// (`POST /admin/warm`), with a progress bar, then print the stored / already fresh /
    /// failed counts.
    ///
    /// FILE holds one request per line: `METHOD URL [JSON body]`, e.g.
    /// `POST /api/natal/chart {"date": "1990-01-01"}`, or a JSON object
    /// `{"method", "url", "headers", "body"}`; blank lines and `#` comments are skipped.
    ///
    /// Example: cachegate warm hot-requests.txt --concurrency 8
    ///
    /// Exit status: 0 when every request stored or found a fresh entry, 1 when some
    /// failed, 2 on errors (nothing is sent for a file with an unreadable line).
    Warm {
        /// The warm list.
        file: PathBuf,
        /// The admin listener's base URL.
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// The admin bearer token.
        #[arg(long, env = "CACHEGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Requests replayed at once (1 to 64).
        #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
        concurrency: u16,
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

/// mimalloc rather than glibc's malloc: per-thread heaps that take frees from other
/// threads without a lock (a hit's buffers are often freed on another Tokio worker than the
/// one that allocated them; glibc's arenas made those threads wait on each other).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
                Some(name) => {
                    // Every byte but the unreserved ones escaped: `?`, `#`, `/` and spaces
                    // are part of the name, not of the URL.
                    let escaped =
                        cachegate::uri::percent_encoded(&name, cachegate::uri::unreserved);
                    (format!("/admin/events/{escaped}"), String::new())
                }
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
        Command::Warm {
            file,
            admin,
            token,
            concurrency,
        } => warm(
            &file,
            admin.trim_end_matches('/'),
            &token,
            concurrency.into(),
        ),
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

/// A runtime for the admin API clients.
fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Posts `body` (of `content_type`) to the admin API at `url` with the bearer `token`;
/// returns the reply's status and text.
///
/// Errors: the request cannot be made, sent or read, or no answer came within `limit`.
async fn post(
    url: &str,
    token: &str,
    content_type: &str,
    body: String,
    limit: std::time::Duration,
) -> Result<(http::StatusCode, String), String> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let request = http::Request::post(url)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| format!("{url}: {e}"))?;
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let sent = tokio::time::timeout(limit, client.request(request));
    let response = match sent.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("{url}: {e}")),
        Err(_) => return Err(format!("{url}: no answer within {} s", limit.as_secs())),
    };
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Posts a purge `body` to the admin API at `url` and prints the reply; exit 0 when every
/// replica acknowledged.
fn purge(url: &str, token: &str, body: String) -> ExitCode {
    let runtime = match client_runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    let (status, text) = match runtime.block_on(post(
        url,
        token,
        "application/json",
        body,
        std::time::Duration::from_secs(30),
    )) {
        Ok(reply) => reply,
        Err(e) => return fail(&e),
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
}

/// Reads and checks the warm list `file`, then posts it to `{admin}/admin/warm` in batches
/// of `4 * concurrency` requests, advancing a progress bar per batch; prints the summed
/// counts and the first failures with their lines in `file`.
fn warm(file: &Path, admin: &str, token: &str, concurrency: usize) -> ExitCode {
    use cachegate::warm::{WarmFailure, WarmReport, parse_list};
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return fail(&format!("{}: {e}", file.display())),
    };
    let list = match parse_list(&text) {
        Ok(list) => list,
        Err(e) => return fail(&format!("{}: {e}", file.display())),
    };
    let runtime = match client_runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    let url = format!("{admin}/admin/warm?concurrency={concurrency}");
    let bar = indicatif::ProgressBar::new(list.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} requests ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut total = WarmReport::default();
    for batch in list.chunks(concurrency * 4) {
        let body: String = batch
            .iter()
            .filter_map(|(_, spec)| serde_json::to_string(spec).ok())
            .map(|line| line + "\n")
            .collect();
        let (status, reply) = match runtime.block_on(post(
            &url,
            token,
            "text/plain",
            body,
            // A batch of 4 x concurrency requests, each bounded by the upstream timeouts.
            std::time::Duration::from_secs(600),
        )) {
            Ok(r) => r,
            Err(e) => {
                bar.abandon();
                return fail(&e);
            }
        };
        if status != http::StatusCode::OK && status != http::StatusCode::MULTI_STATUS {
            bar.abandon();
            return fail(&format!("{url}: {status}: {}", reply.trim_end()));
        }
        let Ok(report) = serde_json::from_str::<serde_json::Value>(&reply) else {
            bar.abandon();
            return fail(&format!("{url}: not a warm report: {}", reply.trim_end()));
        };
        let count = |name: &str| report[name].as_u64().unwrap_or(0) as usize;
        total.requests += count("requests");
        total.stored += count("stored");
        total.fresh += count("fresh");
        total.failed += count("failed");
        for failure in report["failures"].as_array().into_iter().flatten() {
            // The batch was sent one request per line: its line n is the batch's item n.
            let in_batch = failure["line"].as_u64().unwrap_or(0) as usize;
            let Some((line, _)) = in_batch.checked_sub(1).and_then(|i| batch.get(i)) else {
                continue;
            };
            if total.failures.len() < WarmReport::MAX_FAILURES {
                total.failures.push(WarmFailure {
                    line: *line,
                    status: failure["status"].as_u64().unwrap_or(0) as u16,
                    detail: failure["detail"].as_str().unwrap_or("").to_string(),
                });
            }
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    println!(
        "{}: {} requests: {} stored, {} already fresh, {} failed",
        file.display(),
        total.requests,
        total.stored,
        total.fresh,
        total.failed
    );
    for failure in &total.failures {
        println!(
            "  line {}: status {}, {}",
            failure.line, failure.status, failure.detail
        );
    }
    if total.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
