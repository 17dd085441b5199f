//! cachegate: a caching reverse proxy for slow HTTP APIs, with an in-process memory tier
//! and a shared Redis/Valkey tier.
//!
//! Module map, in request order:
//! - [`config`]: the TOML file, flags and environment.
//! - [`server`]: listeners and accept loops.
//! - [`proxy`]: the request path, top to bottom ([`proxy::Proxy::handle`]).
//! - [`policy`]: routes, admission, storability (RFC 9111).
//! - [`uri`]: one normalized path and parsed query per request.
//! - [`key`]: cache keys (keyed BLAKE3, RFC 8785 JSON bodies over I-JSON).
//! - [`store`]: the memory and Redis tiers; [`entry`]: the stored envelope.
//! - [`coalesce`]: one upstream request per key.
//! - [`conditional`]: client `If-None-Match` / `If-Modified-Since`, answered by the cache.
//! - [`status`]: the decision enums behind headers and metric labels.
//! - [`metrics`]: Prometheus metrics and JSON stats; [`admin`]: the admin listener
//!   serving them (`/metrics`, `/stats`, `/healthz`).

#![warn(missing_docs)]

pub mod admin;
pub mod coalesce;
pub mod conditional;
pub mod config;
pub mod entry;
pub mod key;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod status;
pub mod store;
pub mod uri;

#[cfg(test)]
mod test_support {
    use http::{HeaderMap, HeaderValue};

    /// A header map from static name/value pairs, repeated names appended.
    pub fn header_map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }
}
