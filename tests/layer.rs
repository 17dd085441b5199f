//! The tower layer around a real axum app (the natal-chart example) on a real socket,
//! driven by a real HTTP client.

#[path = "../examples/natal_chart.rs"]
mod natal_chart;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cachegate::layer::CacheLayer;
use prometheus_client::registry::Registry;

const ADA: &str = r#"{"date":"1815-12-10","time":"12:00","lat":51.5074,"lon":-0.1278}"#;
const ADA_REORDERED: &str =
    r#"{ "lon":-0.1278, "lat":51.5074, "time":"12:00", "date":"1815-12-10" }"#;
const ALAN: &str = r#"{"date":"1912-06-23","time":"02:15","lat":51.5246,"lon":-0.1340}"#;

struct Service {
    base: String,
    client: reqwest::Client,
    computed: Arc<AtomicUsize>,
    layer: CacheLayer,
    server: tokio::task::JoinHandle<()>,
}

impl Service {
    async fn start() -> Service {
        let layer = CacheLayer::from_toml(natal_chart::CONFIG).unwrap();
        let computed = Arc::new(AtomicUsize::new(0));
        let app = natal_chart::app(&layer, computed.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Service {
            base,
            client: reqwest::Client::new(),
            computed,
            layer,
            server,
        }
    }

    async fn chart(&self, body: &'static str) -> (String, String, String) {
        let resp = self
            .client
            .post(format!("{}/api/natal/chart", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let (status, cache_status) = (header("x-cache-status"), header("cache-status"));
        (status, cache_status, resp.text().await.unwrap())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_caches_the_chart_by_its_canonical_body() {
    let service = Service::start().await;
    let (first, cache_status, chart) = service.chart(ADA).await;
    assert_eq!(first, "MISS");
    assert!(cache_status.contains("stored"), "{cache_status}");
    // The same birth data, spelled differently: the same key (RFC 8785).
    let (second, _, again) = service.chart(ADA_REORDERED).await;
    assert_eq!((second.as_str(), again), ("HIT", chart));
    let (other, _, _) = service.chart(ALAN).await;
    assert_eq!(other, "MISS");
    assert_eq!(service.computed.load(Ordering::SeqCst), 2);

    // The same metrics as the proxy, in the caller's registry and as a JSON snapshot.
    let mut registry = Registry::with_prefix("natal");
    service.layer.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"natal_requests_total{status="hit",reason="memory"} 1"#),
        "{text}"
    );
    let stats = service.layer.metrics().snapshot();
    assert_eq!(stats.hits_by_tier["memory"], 1);
    assert_eq!(stats.stores_by_tier["memory"], 2);
    assert_eq!(stats.requests.by_status["hit"].by_reason["memory"], 1);
    assert_eq!(service.layer.metrics().stats()["hits_by_tier"]["memory"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_compute_one_chart() {
    let service = Arc::new(Service::start().await);
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move { service.chart(ADA).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for call in calls {
        let (_, _, body) = call.await.unwrap();
        bodies.push(body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(service.computed.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_cache_cannot_handle_reach_the_service_untouched() {
    let service = Service::start().await;
    // Not JSON: passed through, not cached, the service answers (422 from axum's Json).
    let resp = service
        .client
        .post(format!("{}/api/natal/chart", service.base))
        .header("content-type", "text/plain")
        .body("date=1815-12-10")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-cache-status"], "BYPASS");
    assert!(resp.status().is_client_error());
    // Routes outside the layer are not touched at all.
    let metrics = service
        .client
        .get(format!("{}/metrics", service.base))
        .send()
        .await
        .unwrap();
    assert!(metrics.headers().get("x-cache-status").is_none());
    assert!(
        metrics
            .text()
            .await
            .unwrap()
            .contains("cachegate_requests_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_outside_the_routes_are_left_alone() {
    use axum::http::HeaderMap;
    use axum::routing::get;
    let layer = CacheLayer::from_toml(natal_chart::CONFIG).unwrap();
    // A per-user answer that (wrongly) says it may be cached: a shared cache would store
    // it; the layer does not touch routes it was not configured for.
    let me = get(|headers: HeaderMap| async move {
        let user = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("nobody")
            .to_string();
        ([("cache-control", "max-age=60")], format!("data of {user}"))
    });
    let app = axum::Router::new().route("/me", me).layer(layer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    for user in ["alice", "bob"] {
        let resp = client
            .get(format!("{base}/me"))
            .header("x-api-key", user)
            .send()
            .await
            .unwrap();
        assert!(resp.headers().get("x-cache-status").is_none());
        assert_eq!(resp.text().await.unwrap(), format!("data of {user}"));
    }
    assert_eq!(layer.metrics().stats()["requests"]["total"], 0);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_request_through_the_layer_invalidates_its_target() {
    use axum::routing::get;
    let config = "[[routes]]\nmethod = \"GET\"\npath = \"/items/*\"\nttl_secs = 600\n";
    let layer = CacheLayer::from_toml(config).unwrap();
    let counter = Arc::new(AtomicUsize::new(0));
    let reads = counter.clone();
    let item = get(move || {
        let n = reads.fetch_add(1, Ordering::SeqCst);
        async move { format!("version {n}") }
    })
    .post(|| async { axum::http::StatusCode::NO_CONTENT });
    let app = axum::Router::new()
        .route("/items/{id}", item)
        .layer(layer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    let read = || async {
        let resp = client.get(format!("{base}/items/1")).send().await.unwrap();
        let status = resp.headers()["x-cache-status"]
            .to_str()
            .unwrap()
            .to_string();
        (status, resp.text().await.unwrap())
    };
    assert_eq!(read().await, ("MISS".to_string(), "version 0".to_string()));
    assert_eq!(read().await, ("HIT".to_string(), "version 0".to_string()));
    let post = client.post(format!("{base}/items/1")).send().await.unwrap();
    assert_eq!(post.status(), 204);
    assert_eq!(read().await, ("MISS".to_string(), "version 1".to_string()));
    server.abort();
}
