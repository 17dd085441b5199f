//! A tower layer that gives a Rust service what `cachegate serve` gives an app from the
//! outside: the same routes and policies, body-keyed `POST` caching, status headers
//! (`X-Cache-Status`, RFC 9211 `Cache-Status`), coalescing, memory and Redis tiers, and
//! metrics, in the same process and without a sidecar.
//!
//! A request that matches one of the layer's `[[routes]]` flows through [`CacheService`]
//! exactly as through the proxy ([`crate::proxy::Proxy::handle`]); a miss calls the wrapped
//! service instead of an HTTP upstream. What differs, because the layer lives inside the
//! service:
//! - a request that matches no route goes to the service untouched (no status headers, no
//!   rules, no limits, not counted): the proxy would cache it by its `Cache-Control` as a
//!   shared cache does, the layer leaves it alone;
//! - `Host` and the forwarding headers (`X-Forwarded-Host`, `-Proto`, ..., `Forwarded`'s
//!   host and proto) are passed on and put into the cache key (the service sees them);
//! - WebSocket upgrades go to the service untouched.
//!
//! ```
//! use cachegate::layer::CacheLayer;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let layer = CacheLayer::from_toml(r#"
//!     [cache]
//!     key_secret = "a long random secret"
//!     [[routes]]
//!     method = "POST"
//!     path = "/api/natal/chart"
//!     ttl_secs = 3600
//!     key_body = true
//! "#).unwrap();
//! let app = service_fn(|req: Request<_>| async move {
//!     let body = BodyExt::collect(req.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(body)))
//! });
//! let service = layer.layer(app);
//! let chart = || {
//!     Request::post("/api/natal/chart")
//!         .header("host", "natal.example")
//!         .header("content-type", "application/json")
//!         .body(Full::new(bytes::Bytes::from(r#"{"date":"1815-12-10"}"#)))
//!         .unwrap()
//! };
//! let first = service.clone().oneshot(chart()).await.unwrap();
//! assert_eq!(first.headers()["x-cache-status"], "MISS");
//! let second = service.clone().oneshot(chart()).await.unwrap();
//! assert_eq!(second.headers()["x-cache-status"], "HIT");
//! # });
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tower::{Layer, Service};

use cachegate_core::coalesce::Coalescer;
use cachegate_core::key::CacheKey;

use crate::config::{Config, ConfigError};
use crate::entry::CachedResponse;
use crate::metrics::Metrics;
use crate::proxy::body::{BoxError, ProxyBody};
use crate::proxy::headers::Forwarding;
use crate::proxy::origin::ServiceOrigin;
use crate::proxy::{Proxy, Shared, Switches};
use crate::server::StartError;

/// Why a [`CacheLayer`] could not be built.
#[derive(Debug)]
pub enum LayerError {
    /// The configuration is invalid (file, line and field when it came from TOML).
    Config(ConfigError),
    /// The Redis settings cannot be used.
    Start(StartError),
}

impl std::fmt::Display for LayerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerError::Config(e) => write!(f, "{e}"),
            LayerError::Start(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for LayerError {}

/// The layer: configuration, tiers, in-flight requests and metrics, shared by every
/// service it wraps (a framework may apply a layer once per route or per connection: all
/// of them are one cache). Cloning shares them.
#[derive(Clone)]
pub struct CacheLayer {
    config: Arc<Config>,
    shared: Arc<LayerShared>,
}

struct LayerShared {
    keys: cachegate_core::key::KeyBuilder,
    store: cachegate_core::store::TieredStore<CachedResponse>,
    coalescer: Coalescer<CacheKey, CachedResponse>,
    metrics: Arc<Metrics>,
    switches: Arc<Switches>,
    /// Never turns true: the layer opens no tunnels.
    shutdown: watch::Receiver<bool>,
    _shutdown_tx: watch::Sender<bool>,
}

impl CacheLayer {
    /// A layer configured like `cachegate serve`, from the same TOML (`[cache]`, `[redis]`,
    /// `[[routes]]`; `listen`, `[server]` and `[upstream]` are not used). Must be called
    /// within a Tokio runtime when Redis is configured.
    ///
    /// Errors: [`LayerError::Config`] for invalid TOML or Redis without a key secret,
    /// [`LayerError::Start`] for unusable Redis settings.
    pub fn from_toml(text: &str) -> Result<CacheLayer, LayerError> {
        let config = Config::from_toml(text, None).map_err(LayerError::Config)?;
        CacheLayer::new(config)
    }

    /// A layer for a parsed configuration (see [`CacheLayer::from_toml`]).
    ///
    /// Errors: as [`CacheLayer::from_toml`].
    pub fn new(config: Config) -> Result<CacheLayer, LayerError> {
        config.check_cache().map_err(LayerError::Config)?;
        let metrics = Arc::new(Metrics::new());
        let home = cachegate_core::home::Home::none();
        let (keys, store) =
            crate::server::engine(&config, &metrics, home).map_err(LayerError::Start)?;
        let switches = Arc::new(Switches::new(
            config.cache.enabled,
            config.cache.rollout_percent.0,
        ));
        let (shutdown_tx, shutdown) = watch::channel(false);
        Ok(CacheLayer {
            config: Arc::new(config),
            shared: Arc::new(LayerShared {
                keys,
                store,
                coalescer: Coalescer::default(),
                metrics,
                switches,
                shutdown,
                _shutdown_tx: shutdown_tx,
            }),
        })
    }

    /// The metrics: [`Metrics::encode`] for the Prometheus text, [`Metrics::snapshot`] for
    /// the typed `/stats`-style snapshot, [`Metrics::stats`] for it as JSON.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Registers every metric into the caller's `registry` too.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.shared.metrics.register_into(registry);
    }

    /// The kill switch and rollout, to change at run time.
    pub fn switches(&self) -> &Arc<Switches> {
        &self.shared.switches
    }
}

impl<S, B> Layer<S> for CacheLayer
where
    S: Service<Request<ProxyBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Service = CacheService;

    /// Wraps `inner`. Called within a Tokio runtime, it also starts the background
    /// refreshes (stale-while-revalidate, refresh-ahead, `warm_hot_keys`), which stop when
    /// the last clone of the service is dropped; elsewhere a stale entry is a miss and hot
    /// keys are not refreshed.
    fn layer(&self, inner: S) -> CacheService {
        let shared = &self.shared;
        let proxy = Proxy::with_origin(
            ServiceOrigin::new(inner),
            Forwarding::default(),
            true,
            &self.config,
            Shared {
                keys: shared.keys.clone(),
                store: shared.store.clone(),
                coalescer: shared.coalescer.clone(),
                metrics: shared.metrics.clone(),
                switches: shared.switches.clone(),
                shutdown: shared.shutdown.clone(),
            },
        );
        let proxy = Arc::new(proxy);
        let (stop, stopped) = watch::channel(false);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let metrics = shared.metrics.clone();
            runtime.spawn(crate::proxy::refresh::run_refreshes(
                proxy.clone(),
                metrics,
                stopped.clone(),
            ));
            runtime.spawn(crate::warm::run_hot_keys(proxy.clone(), stopped));
        }
        CacheService {
            proxy,
            _stop: Arc::new(stop),
        }
    }
}

/// The wrapped service: answers from the cache, or calls the inner service once per key.
/// Never fails: the inner service's errors become `502`, cache faults are misses.
#[derive(Clone)]
pub struct CacheService {
    proxy: Arc<Proxy<ServiceOrigin>>,
    /// Dropped with the last clone: the background refreshes stop.
    _stop: Arc<watch::Sender<bool>>,
}

/// The client address the request path sees when the server did not provide one.
const UNKNOWN_CLIENT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

impl<B> Service<Request<B>> for CacheService
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner service is cloned per call and driven to readiness then.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let proxy = self.proxy.clone();
        let client = req
            .extensions()
            .get::<SocketAddr>()
            .copied()
            .unwrap_or(UNKNOWN_CLIENT);
        Box::pin(async move { Ok(proxy.handle(req, client).await) })
    }
}
