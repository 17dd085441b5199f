//! The natal-chart service with cachegate in-process: a CPU-heavy handler behind
//! `POST /api/natal/chart`, cached by its canonical JSON body with [`CacheLayer`].
//!
//! Run: `cargo run --release --example natal_chart`, then
//! `curl -si -X POST -H 'content-type: application/json' -d '{"date":"1815-12-10","time":"12:00","lat":51.5074,"lon":-0.1278}' http://127.0.0.1:3000/api/natal/chart`
//! twice: the first answer is computed (`X-Cache-Status: MISS`), the second comes from the
//! cache (`HIT`). `GET /metrics` serves the Prometheus metrics of the layer.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::routing::{get, post};
use axum::{Json, Router};
use cachegate::layer::CacheLayer;
use serde::{Deserialize, Serialize};

/// The layer's configuration: the same TOML as `cachegate serve`.
pub const CONFIG: &str = r#"
[cache]
key_secret = "example secret: use a long random one"
memory_max_bytes = 67108864

[[routes]]
method = "POST"
path = "/api/natal/chart"
ttl_secs = 86400
key_body = true
"#;

/// Birth data.
#[derive(Debug, Deserialize)]
pub struct BirthData {
    date: String,
    time: String,
    lat: f64,
    lon: f64,
}

/// The computed chart.
#[derive(Debug, Serialize)]
pub struct Chart {
    date: String,
    time: String,
    houses: Vec<f64>,
}

/// The slow part: a stand-in for the ephemeris computation (tens of milliseconds of CPU).
fn compute_chart(birth: &BirthData) -> Chart {
    let seed =
        birth.lat * 31.0 + birth.lon * 17.0 + birth.date.len() as f64 + birth.time.len() as f64;
    let mut houses = vec![0.0; 12];
    for step in 0..3_000_000u32 {
        let h = (step % 12) as usize;
        houses[h] = (houses[h] + (seed + f64::from(step)).sin()).rem_euclid(360.0);
    }
    Chart {
        date: birth.date.clone(),
        time: birth.time.clone(),
        houses,
    }
}

/// The app: the chart endpoint behind the cache layer, and the layer's metrics. `computed`
/// counts the charts actually computed.
pub fn app(layer: &CacheLayer, computed: Arc<AtomicUsize>) -> Router {
    let chart = post(move |Json(birth): Json<BirthData>| {
        let computed = computed.clone();
        async move {
            computed.fetch_add(1, Ordering::SeqCst);
            let chart = tokio::task::spawn_blocking(move || compute_chart(&birth))
                .await
                .expect("the computation does not panic");
            Json(chart)
        }
    });
    let metrics = layer.metrics().clone();
    Router::new()
        .route("/api/natal/chart", chart)
        .layer(layer.clone())
        .route("/metrics", get(move || async move { metrics.encode() }))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() {
    let layer = CacheLayer::from_toml(CONFIG).expect("the example config is valid");
    let app = app(&layer, Arc::new(AtomicUsize::new(0)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000")
        .await
        .expect("127.0.0.1:3000 is free");
    println!("natal-chart service on http://127.0.0.1:3000");
    axum::serve(listener, app).await.expect("the server runs");
}
