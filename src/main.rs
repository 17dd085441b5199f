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
