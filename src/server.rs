//! Start-up and the accept loops: binds the proxy and admin listeners, serves HTTP/1.1
//! connections with hyper, and shuts down gracefully.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::config::Config;
use crate::key::KeyBuilder;
use crate::metrics::Metrics;
use crate::proxy::body::ProxyBody;
use crate::proxy::{Proxy, Switches};
use crate::store::{MemoryTier, RedisTier, TieredStore};

/// Why cachegate could not start.
#[derive(Debug)]
pub enum StartError {
    /// A listener could not bind its address.
    Bind(SocketAddr, std::io::Error),
    /// The Redis tier could not be set up.
    Redis(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            StartError::Redis(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A running cachegate: its bound addresses and the handles to stop it.
pub struct Running {
    /// The proxy's bound address (useful when configured with port 0).
    pub listen_addr: SocketAddr,
    /// The admin listener's bound address.
    pub admin_addr: SocketAddr,
    /// The runtime switches (kill switch, rollout).
    pub switches: Arc<Switches>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting connections and waits (up to 10 s) for open ones to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Starts cachegate with a finished config (see [`Config::finish`]): binds both listeners
/// and spawns their accept loops on the current Tokio runtime.
///
/// Errors: [`StartError`] when a listener cannot bind or the Redis URL is unusable.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let redis = match &config.redis {
        Some(rc) => Some(
            RedisTier::new(rc, &config.cache.namespace, metrics.clone())
                .map_err(|e| StartError::Redis(e.to_string()))?,
        ),
        None => None,
    };
    let store = TieredStore::new(
        MemoryTier::new(config.cache.memory_max_bytes),
        redis,
        metrics.clone(),
    );
    let secret = match &config.cache.key_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => {
            tracing::info!("no key_secret set: cache keys use a random per-process secret");
            random_secret().to_vec()
        }
    };
    let keys = KeyBuilder::new(&secret, &config.cache.namespace);
    let switches = Arc::new(Switches::new(
        config.cache.enabled,
        config.cache.rollout_percent.0,
    ));
    let proxy = Arc::new(Proxy::new(
        &config,
        keys,
        store.clone(),
        metrics.clone(),
        switches.clone(),
    ));
    let admin = Admin {
        metrics: metrics.clone(),
        store,
        switches: switches.clone(),
    };

    let listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let listen_addr = listener
        .local_addr()
        .map_err(|e| StartError::Bind(config.listen, e))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| StartError::Bind(config.admin_listen, e))?;
    let (shutdown, rx) = watch::channel(false);
    let proxy_loop = serve(listener, rx.clone(), move |req, peer| {
        let proxy = proxy.clone();
        async move { proxy.handle(req, peer).await }
    });
    let admin_loop = serve(admin_listener, rx, move |req, _peer| {
        let admin = admin.clone();
        async move { admin.handle(req).await }
    });
    tracing::info!(
        %listen_addr,
        %admin_addr,
        upstream = %config.upstream.url.as_ref().map(ToString::to_string).unwrap_or_default(),
        routes = config.routes.len(),
        memory_max_bytes = config.cache.memory_max_bytes,
        redis = %config.redis.as_ref().map(|r| r.url.redacted()).unwrap_or_else(|| "off".into()),
        enabled = config.cache.enabled,
        rollout_percent = config.cache.rollout_percent.0,
        "cachegate listening"
    );
    Ok(Running {
        listen_addr,
        admin_addr,
        switches,
        metrics,
        shutdown,
        tasks: vec![tokio::spawn(proxy_loop), tokio::spawn(admin_loop)],
    })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Bind(addr, e))
}

/// A per-process random secret for a memory-only cache, from the standard library's
/// randomly seeded hasher.
fn random_secret() -> [u8; 32] {
    use std::hash::{BuildHasher, RandomState};
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&RandomState::new().hash_one(i).to_le_bytes());
    }
    out
}

/// Accepts connections until `shutdown` turns true, serving each with `handler`.
async fn serve<H, F>(listener: TcpListener, mut shutdown: watch::Receiver<bool>, handler: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Typically out of file descriptors: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let fut = handler(req, peer);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}
