//! cachegate: a caching reverse proxy for slow HTTP APIs, with an in-process memory tier
//! and a shared Redis/Valkey tier.
//!
//! The engine (cache keys, tiers, envelopes, coalescing) is the `cachegate-core` crate,
//! re-exported here as [`engine`]; this crate is the HTTP side and the proxy.
//!
//! Module map, in request order:
//! - [`config`]: the TOML file, flags and environment.
//! - [`server`]: listeners and accept loops.
//! - [`proxy`]: the request path, top to bottom ([`proxy::Proxy::handle`]).
//! - [`policy`]: routes, admission, storability (RFC 9111).
//! - [`uri`]: one normalized path and parsed query per request.
//! - [`key`]: cache keys (keyed BLAKE3, RFC 8785 JSON bodies over I-JSON).
//! - [`entry`]: the stored response, as the engine's tiers hold it.
//! - [`conditional`]: client `If-None-Match` / `If-Modified-Since`, answered by the cache.
//! - [`status`]: the decision enums behind headers and metric labels.
//! - [`layer`]: the same request path as a tower layer around a Rust service.
//! - [`metrics`]: Prometheus metrics and JSON stats; [`admin`]: the admin listener
//!   serving them (`/metrics`, `/stats`, `/healthz`).

#![warn(missing_docs)]

pub use cachegate_core as engine;

pub mod admin;
pub mod conditional;
pub mod config;
pub mod entry;
pub mod key;
pub mod layer;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod status;
pub mod tags;
pub mod uri;
pub mod vary;
pub mod warm;

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
