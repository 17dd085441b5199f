//! The admin listener: `/metrics` (Prometheus text format), `/healthz` and `/stats` (JSON).

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};

use crate::proxy::body::ProxyBody;
use crate::proxy::{Switches, generated, plain};
use cachegate_core::store::TieredStore;

use crate::entry::CachedResponse;

use crate::metrics::Metrics;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The tiers, for the memory-tier gauges.
    pub store: TieredStore<CachedResponse>,
    /// The run-time switches, shown in `/stats`.
    pub switches: Arc<Switches>,
}

impl Admin {
    /// Answers one admin request. Unknown paths get 404, methods other than GET/HEAD 405.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ProxyBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is allowed");
        }
        match req.uri().path() {
            "/healthz" => plain(StatusCode::OK, "ok\n"),
            "/metrics" => {
                self.store.refresh_gauges();
                let text = self.metrics.encode();
                generated(
                    StatusCode::OK,
                    text,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            }
            "/stats" => {
                self.store.refresh_gauges();
                let mut stats = self.metrics.stats();
                stats["enabled"] = self.switches.enabled().into();
                stats["rollout_percent"] = self.switches.rollout_percent().into();
                stats["redis"]["configured"] = self.store.has_redis().into();
                let json = serde_json::to_string_pretty(&stats).unwrap_or_default();
                generated(StatusCode::OK, json, "application/json")
            }
            _ => plain(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /stats or /healthz",
            ),
        }
    }
}
