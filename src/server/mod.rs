//! Start-up and the accept loops: binds the proxy and admin listeners, serves HTTP/1.1
//! connections with hyper (proxy connections on connection threads, `workers.rs`), and
//! shuts down gracefully.

mod io;
mod workers;

pub use self::io::{ClientIo, ConnTicket, HeadClock};
pub use self::workers::{ConnThreads, ThreadSlot};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::config::Config;
use crate::entry::CachedResponse;
use crate::metrics::Metrics;
use crate::proxy::body::ProxyBody;
use crate::proxy::{Proxy, Shared, Switches};
use cachegate_core::envelope::EnvelopeKeys;
use cachegate_core::home::Home;
use cachegate_core::key::KeyBuilder;
use cachegate_core::store::{MemoryTier, RedisTier, TieredStore};

/// Why cachegate could not start.
#[derive(Debug)]
pub enum StartError {
    /// A listener could not bind its address.
    Bind(SocketAddr, std::io::Error),
    /// The Redis tier could not be set up.
    Redis(String),
    /// The connection threads (`[server] connection_threads`) could not be started.
    Threads(std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            StartError::Redis(e) => write!(f, "{e}"),
            StartError::Threads(e) => write!(f, "cannot start the connection threads: {e}"),
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
    /// Stops accepting connections and waits (up to 10 s) for open ones to finish, and (up
    /// to 10 s more) for admin purges, events and warm lists still running.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Starts cachegate with a finished config (see [`Config::finish`]): binds both listeners
/// and spawns their accept loops on the current Tokio runtime, which must keep running
/// while cachegate does: background work runs there (see [`Home`]). Proxy connections are
/// served on connection threads (`[server] connection_threads`, see [`ConnThreads`]),
/// admin connections on the current runtime.
///
/// Errors: [`StartError`] when a listener cannot bind, the Redis URL is unusable or the
/// connection threads cannot be started.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    // What requests leave to run in the background runs here, not on the connection
    // threads (see `ConnThreads`).
    let home = Home::current();
    let (keys, store) = engine(&config, &metrics, home.clone())?;
    let (shutdown, rx) = watch::channel(false);
    let switches = Arc::new(Switches::new(
        config.cache.enabled,
        config.cache.rollout_percent.0,
    ));
    let proxy = Arc::new(Proxy::new(
        &config,
        Shared {
            keys,
            store: store.clone(),
            coalescer: Default::default(),
            metrics: metrics.clone(),
            switches: switches.clone(),
            shutdown: rx.clone(),
        },
        home,
    ));
    let admin = Admin {
        metrics: metrics.clone(),
        store,
        switches: switches.clone(),
        token: config.admin.token.as_deref().map(Admin::hash_token),
        events: Arc::new(config.events.clone()),
        route_names: Arc::new(
            config
                .routes
                .iter()
                .map(crate::config::RouteConfig::display_name)
                .collect(),
        ),
        proxy: Some(proxy.clone()),
        ack_timeout: Duration::from_millis(config.admin.ack_timeout_ms.max(1)),
        warm_slot: Arc::new(Semaphore::new(1)),
        body_idle_timeout: Duration::from_millis(config.server.client_body_timeout_ms.max(1)),
        running: Arc::new(Semaphore::new(crate::admin::MAX_RUNNING)),
    };

    let listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let listen_addr = listener
        .local_addr()
        .map_err(|e| StartError::Bind(config.listen, e))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| StartError::Bind(config.admin_listen, e))?;
    let max_connections = config
        .server
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS);
    let limits = ConnLimits {
        header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms.max(1)),
        send_timeout: Duration::from_millis(config.server.client_send_timeout_ms.max(1)),
        open: metrics.open_connections.clone(),
        send_timeouts: metrics.client_errors.handle("send-timeout"),
        connections: Arc::new(Semaphore::new(max_connections)),
        max_connections,
    };
    let hot_keys = crate::warm::run_hot_keys(proxy.clone(), rx.clone());
    let refreshes =
        crate::proxy::refresh::run_refreshes(proxy.clone(), metrics.clone(), rx.clone());
    let threads = match config.server.connection_threads() {
        0 => None,
        n => {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            let gauges = metrics.clone();
            let threads = ConnThreads::start(n, move |i| gauges.thread_gauge(i));
            Some(threads.map_err(StartError::Threads)?)
        }
    };
    let proxy_loop = serve(
        listener,
        rx.clone(),
        limits.clone(),
        threads,
        move |req, peer| {
            let proxy = proxy.clone();
            async move {
                // A panic must not take the connection down or print request data (the panic
                // hook prints only a location): answer 500 and count it.
                match AssertUnwindSafe(proxy.handle(req, peer))
                    .catch_unwind()
                    .await
                {
                    Ok(resp) => resp,
                    Err(_) => {
                        proxy.count_panic();
                        crate::proxy::plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
                    }
                }
            }
        },
    );
    let admin_limits = ConnLimits {
        connections: Arc::new(Semaphore::new(64)),
        max_connections: 64,
        open: Gauge::default(),
        send_timeouts: Counter::default(),
        ..limits
    };
    let running = admin.clone();
    let admin_loop = async move {
        serve(admin_listener, rx, admin_limits, None, move |req, peer| {
            let admin = admin.clone();
            async move { admin.handle(req, peer).await }
        })
        .await;
        // Purges and warm lists whose clients left are still running: not cut half done.
        running.finish_running(Duration::from_secs(10)).await;
    };
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
        tasks: vec![
            tokio::spawn(proxy_loop),
            tokio::spawn(admin_loop),
            tokio::spawn(hot_keys),
            tokio::spawn(refreshes),
        ],
    })
}

/// The engine a config asks for: the key builder and the tiers (memory, and Redis when
/// configured, its connections and background work on `home`), counting into `metrics`.
/// Shared by `cachegate serve` and the tower layer.
///
/// Errors: [`StartError::Redis`] when the Redis settings cannot be used.
pub fn engine(
    config: &Config,
    metrics: &Arc<Metrics>,
    home: Home,
) -> Result<(KeyBuilder, TieredStore<CachedResponse>), StartError> {
    let redis = match &config.redis {
        Some(rc) => Some(
            RedisTier::new(
                &rc.options(),
                &config.cache.namespace,
                metrics.store.clone(),
            )
            .map_err(|e| StartError::Redis(e.to_string()))?
            .with_home(home),
        ),
        None => None,
    };
    let secret = match &config.cache.key_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => {
            tracing::info!("no key_secret set: cache keys use a random per-process secret");
            cachegate_core::random_secret().to_vec()
        }
    };
    let seal = config.redis.as_ref().is_none_or(|r| r.encrypt);
    if let Some(redis) = &redis {
        warn_if_unreachable(redis.clone());
    }
    let store = TieredStore::new(
        MemoryTier::new(
            config.cache.memory_max_bytes,
            crate::entry::max_entry_bytes(config.cache.max_response_body_bytes),
        ),
        redis,
        EnvelopeKeys::new(&secret, seal),
        metrics.store.clone(),
    );
    let events = config.events.clone();
    metrics.declare_events(events.iter().map(|e| e.name.as_str()));
    let counted = metrics.clone();
    store.start_invalidation(Some(Arc::new(move |name: &str| {
        let event = crate::config::event_scope(&events, name);
        counted.count_event(name, event.is_some());
        event
    })));
    Ok((KeyBuilder::new(&secret, &config.cache.namespace), store))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Bind(addr, e))
}

/// Installs a panic hook that logs where a panic happened and never its message: a
/// message can hold request data (a path, a header), which must not reach the logs.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(%location, "panic (message withheld: it may hold request data)");
    }));
}

/// Logs a warning at start-up when Redis does not answer a first `GET`; cachegate serves
/// from the memory tier and the upstream meanwhile, and the Redis tier resumes by itself.
fn warn_if_unreachable(redis: RedisTier) {
    tokio::spawn(async move {
        if !redis.ping().await {
            tracing::warn!(
                "redis is unreachable at start-up: serving without the Redis tier until it answers"
            );
        }
    });
}

/// Limits on the connections of one listener.
#[derive(Clone)]
struct ConnLimits {
    header_read_timeout: Duration,
    /// See [`ClientIo`].
    send_timeout: Duration,
    /// Open connections (`cachegate_open_connections` for the proxy listener).
    open: Gauge,
    /// `client_errors{kind="send-timeout"}` for the proxy listener.
    send_timeouts: Counter,
    /// One permit per open connection, `max_connections` in all.
    connections: Arc<Semaphore>,
    max_connections: usize,
}

/// Accepts connections until `shutdown` turns true, serving each with `handler`. Once
/// `max_connections` are open (tunnels included: the permit lives in the socket, see
/// [`ClientIo`]), no more are accepted until one closes: further clients wait in the
/// kernel's listen backlog. With `threads`, each connection is served on one of them
/// (see [`ConnThreads`]), else on the current runtime.
async fn serve<H, F>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    limits: ConnLimits,
    threads: Option<ConnThreads>,
    handler: H,
) where
    H: Fn(Request<RequestBody>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    loop {
        let permit = tokio::select! {
            permit = limits.connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
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
        let ticket = ConnTicket::new(permit, limits.open.clone());
        let (settings, handler, stop) = (limits.clone(), handler.clone(), shutdown.clone());
        match &threads {
            None => drop(tokio::spawn(serve_connection(
                stream, peer, ticket, settings, handler, stop,
            ))),
            Some(threads) => match stream.into_std() {
                Ok(stream) => threads.spawn(stream, move |stream, slot| {
                    let ticket = ticket.on_thread(slot);
                    serve_connection(stream, peer, ticket, settings, handler, stop)
                }),
                Err(e) => tracing::warn!(error = %e, "could not hand a connection over"),
            },
        }
    }
    drop(listener);
    // Every open connection and tunnel holds a permit: having them all back means all have
    // closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        limits.connections.acquire_many(all),
    )
    .await;
    // Connections still open after that are closed with their threads.
    if let Some(threads) = threads {
        threads.stop().await;
    }
}

/// Serves one accepted connection (from `peer`, holding `ticket`): hyper's HTTP/1.1
/// connection with upgrades, the request-head deadline kept by the socket, a graceful end
/// when `stop` turns true.
async fn serve_connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    ticket: ConnTicket,
    limits: ConnLimits,
    handler: H,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<RequestBody>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let head = HeadClock::new(limits.header_read_timeout);
    let clock = head.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let answering = Answering::start(clock.clone());
        let req = req.map(|body| request_body(body, &clock));
        // A combinator, not an `async` block: a block awaiting `fut` would hold it twice
        // (captured, and again while awaited), and the whole is moved into hyper's
        // in-flight slot on every request.
        handler(req, peer).map(answering.finish())
    });
    // The request-head deadline is kept by the socket (`HeadClock`), not by hyper's
    // timer, which costs two timer-wheel operations per request.
    let conn = http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(
            TokioIo::new(ClientIo::new(
                stream,
                limits.send_timeout,
                limits.send_timeouts,
                head,
                ticket,
            )),
            service,
        )
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => {
            // Finish the request in progress, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// A request body as the handlers see it: hyper's, counted by the connection's
/// [`HeadClock`] until dropped (when it has not ended already), so that reading it is
/// never taken for waiting on a head.
pub type RequestBody = Guarded<Incoming, Option<ReadingBody>>;

/// Counts one request body in its connection's [`HeadClock`] while alive.
pub struct ReadingBody(Arc<HeadClock>);

impl Drop for ReadingBody {
    fn drop(&mut self) {
        self.0.request_body_dropped();
    }
}

fn request_body(body: Incoming, clock: &Arc<HeadClock>) -> RequestBody {
    use http_body::Body as _;
    let reading = (!body.is_end_stream()).then(|| {
        clock.request_body_started();
        ReadingBody(clock.clone())
    });
    Guarded {
        body,
        _guard: reading,
    }
}

/// A body that holds `guard` until it is dropped: hyper drops a response body once all of
/// it is buffered for writing (or on an error), a handler drops a request body once read.
pub struct Guarded<B, G> {
    /// Dropped first (fields drop in order): the count is down before the body's drop
    /// wakes the connection.
    _guard: G,
    body: B,
}

impl<B: http_body::Body + Unpin, G: Unpin> http_body::Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// One request being answered on a connection: counted by its [`HeadClock`] from the
/// request's arrival until its response body is dropped (sent, or given up on), so that
/// no request-head deadline runs meanwhile.
struct Answering {
    clock: Arc<HeadClock>,
}

impl Answering {
    fn start(clock: Arc<HeadClock>) -> Self {
        clock.request_started();
        Answering { clock }
    }

    /// What becomes of the handler's response: the request counts until its response body
    /// is dropped; an upgrade ends the connection's head deadlines.
    fn finish(
        self,
    ) -> impl FnOnce(Response<ProxyBody>) -> Result<Response<Guarded<ProxyBody, Answering>>, Infallible>
    {
        move |resp| {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                self.clock.upgraded();
            }
            Ok(resp.map(|body| Guarded { body, _guard: self }))
        }
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.clock.response_ended();
    }
}
