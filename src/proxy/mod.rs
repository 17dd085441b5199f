//! The caching reverse proxy: the whole request path, top to bottom, in [`Proxy::handle`].
//!
//! 1. Strip hop-by-hop headers (`X-Forwarded-*` is added only when a request is forwarded).
//! 2. Admission: kill switch, route, method, credentials ([`policy::check_request`]).
//! 3. For body-keyed routes, read the body (bounded) and canonicalize it (RFC 8785).
//! 4. Build the cache key; apply `rollout_percent`.
//! 5. Take the client's conditional headers out (answered by the cache, RFC 9110 §13.2).
//!    Look up memory, then Redis.
//! 6. On a miss, coalesce: one leader fetches from the upstream, stores if allowed and
//!    shares the response; followers wait (bounded) or go to the upstream themselves.
//!
//! Any request the cache cannot handle is passed through untouched (BYPASS), and a cache
//! fault never becomes an error response.

pub mod body;
pub mod headers;
mod switches;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

pub use self::switches::Switches;

use self::body::{Limited, ProxyBody, read_limited};
use self::upstream::{Upstream, UpstreamError};
use crate::coalesce::{Coalescer, Leader, Role, WaitOutcome};
use crate::conditional::{self, Conditions};
use crate::config::Config;
use crate::entry::{CachedResponse, now_ms};
use crate::key::{CacheKey, KeyBuilder, KeyParts, canonical_json};
use crate::metrics::Metrics;
use crate::policy::{self, Policy, Route};
use crate::status::{BypassReason, CachePhase, NoStoreReason, Tier};
use crate::store::TieredStore;

/// Size and wait limits applied on the request path.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_request_body_bytes: usize,
    max_response_body_bytes: usize,
    coalesce_wait: Duration,
}

/// The proxy: policy, keys, tiers, coalescing and the upstream client.
pub struct Proxy {
    policy: Policy,
    keys: KeyBuilder,
    store: TieredStore,
    /// Followers get the leader's response, whether or not it was stored.
    coalescer: Coalescer<CacheKey, Arc<CachedResponse>>,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    switches: Arc<Switches>,
    limits: Limits,
}

/// What the cache path needs to know about a request once its key is built.
struct Ctx {
    key: CacheKey,
    client: SocketAddr,
    method: Method,
    /// The client's validators, taken out of the forwarded request.
    conditions: Conditions,
}

/// How a response was produced, for the status headers.
struct Outcome {
    phase: CachePhase,
    ttl_secs: Option<u64>,
    fwd_status: Option<u16>,
}

impl Proxy {
    /// Builds the proxy from a finished config (see [`Config::finish`]).
    pub fn new(
        config: &Config,
        keys: KeyBuilder,
        store: TieredStore,
        metrics: Arc<Metrics>,
        switches: Arc<Switches>,
    ) -> Self {
        Proxy {
            policy: Policy::new(&config.routes),
            keys,
            store,
            coalescer: Coalescer::default(),
            upstream: Upstream::new(&config.upstream),
            metrics,
            switches,
            limits: Limits {
                max_request_body_bytes: config.cache.max_request_body_bytes,
                max_response_body_bytes: config.cache.max_response_body_bytes,
                coalesce_wait: Duration::from_millis(config.cache.coalesce_wait_ms),
            },
        }
    }

    /// Answers one client request. Never fails: upstream faults become 502/504 with a short
    /// plain-text reason, cache faults are misses.
    pub async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        let body = body::boxed(body);

        // Admission: may this request use the cache at all?
        if !self.switches.enabled() {
            return self
                .bypass(parts, body, client, BypassReason::Disabled)
                .await;
        }
        let route = self.policy.route_for(&parts.method, parts.uri.path());
        if let Err(reason) = policy::check_request(route, &parts.method, &parts.headers) {
            return self.bypass(parts, body, client, reason).await;
        }

        // The body, for routes that key on it.
        let (body, canonical_body) = match route.filter(|r| r.config.key_body) {
            None => (body, None),
            Some(_) => match read_limited(body, self.limits.max_request_body_bytes).await {
                Ok(Limited::Complete(bytes)) => match canonical_json(&bytes) {
                    Ok(canonical) => (body::full(bytes), Some(canonical)),
                    Err(_) => {
                        return self
                            .bypass(
                                parts,
                                body::full(bytes),
                                client,
                                BypassReason::MalformedBody,
                            )
                            .await;
                    }
                },
                Ok(Limited::TooLarge(rest)) => {
                    return self
                        .bypass(
                            parts,
                            body::boxed(rest),
                            client,
                            BypassReason::OversizedBody,
                        )
                        .await;
                }
                Err(_) => return plain(StatusCode::BAD_REQUEST, "request body could not be read"),
            },
        };

        // The key, and whether it is in the rollout.
        let key = self.key_for(&parts, route, canonical_body.as_deref());
        if !self.switches.rolled_out(&key) {
            return self
                .bypass(parts, body, client, BypassReason::Rollout)
                .await;
        }

        // From here on the cache answers: the client's own conditions are evaluated by
        // cachegate, and the upstream gets an unconditional request whose full response
        // can be stored and shared.
        let ctx = Ctx {
            key,
            client,
            method: parts.method.clone(),
            conditions: Conditions::take(&mut parts.headers),
        };

        // Lookup: memory, then Redis.
        if let Some((entry, tier)) = self.store.lookup(&key).await {
            return self.serve_entry(&entry, &ctx, hit(&entry, tier));
        }

        // Miss: one request per key goes to the upstream.
        match self.coalescer.join(&key) {
            Role::Leader(leader) => self.fetch(parts, body, route, &ctx, Some(leader)).await,
            Role::Follower(follower) => match follower.wait(self.limits.coalesce_wait).await {
                WaitOutcome::Shared(entry) => {
                    self.metrics.coalesced_waits.inc("served");
                    let outcome = miss(CachePhase::Collapsed, Some(entry.status.as_u16()));
                    self.serve_entry(&entry, &ctx, outcome)
                }
                WaitOutcome::TimedOut => {
                    self.metrics.coalesced_waits.inc("timeout");
                    self.fetch(parts, body, route, &ctx, None).await
                }
                WaitOutcome::Abandoned => {
                    self.metrics.coalesced_waits.inc("retried");
                    self.fetch(parts, body, route, &ctx, None).await
                }
            },
        }
    }

    fn key_for(
        &self,
        parts: &Parts,
        route: Option<&Route>,
        canonical_body: Option<&[u8]>,
    ) -> CacheKey {
        self.keys.build(&KeyParts {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            query_filter: route.and_then(|r| r.config.key_query.as_deref()),
            headers: &parts.headers,
            header_names: route.map_or(&[], |r| &r.config.key_headers),
            canonical_body,
        })
    }

    /// Forwards a cacheable request to the upstream, stores the response when policy allows,
    /// and (as leader) shares it with followers when it is safe to share.
    async fn fetch(
        &self,
        parts: Parts,
        body: ProxyBody,
        route: Option<&Route>,
        ctx: &Ctx,
        leader: Option<Leader<CacheKey, Arc<CachedResponse>>>,
    ) -> Response<ProxyBody> {
        let key = &ctx.key;
        // A flight that ended between our lookup and our join has just stored its entry.
        if let Some(entry) = self.store.lookup_memory(key).await {
            if let Some(leader) = leader {
                leader.publish(Some(entry.clone()));
            }
            return self.serve_entry(&entry, ctx, hit(&entry, Tier::Memory));
        }
        let (head, resp_body) = match self.send(parts, body, ctx.client).await {
            Ok(sent) => sent,
            Err(error_response) => {
                let phase = CachePhase::Miss(Err(NoStoreReason::UpstreamError));
                return self.finish(error_response, miss(phase, None), Some(key));
            }
        };
        let fwd_status = Some(head.status.as_u16());
        let decision = policy::storable_ttl(route, head.status, &head.headers);
        if let Err(reason) = decision
            && !reason.shareable()
        {
            // Private to this requester, or not worth holding: stream it, followers retry.
            let resp = Response::from_parts(head, body::boxed(resp_body));
            return self.finish(
                resp,
                miss(CachePhase::Miss(Err(reason)), fwd_status),
                Some(key),
            );
        }
        let bytes = match read_limited(resp_body, self.limits.max_response_body_bytes).await {
            Ok(Limited::Complete(bytes)) => bytes,
            Ok(Limited::TooLarge(rest)) => {
                let resp = Response::from_parts(head, body::boxed(rest));
                let phase = CachePhase::Miss(Err(NoStoreReason::TooLarge));
                return self.finish(resp, miss(phase, fwd_status), Some(key));
            }
            Err(e) => {
                self.metrics.upstream_errors.inc("body");
                tracing::warn!(error = %e, "upstream response body failed");
                let resp = plain(StatusCode::BAD_GATEWAY, "upstream response body failed");
                let phase = CachePhase::Miss(Err(NoStoreReason::UpstreamError));
                return self.finish(resp, miss(phase, fwd_status), Some(key));
            }
        };
        let entry = Arc::new(CachedResponse {
            status: head.status,
            headers: head.headers,
            body: bytes,
            stored_at_ms: now_ms(),
            ttl_secs: *decision.as_ref().unwrap_or(&0),
            tags: route.map(|r| r.config.tags.clone()).unwrap_or_default(),
        });
        if decision.is_ok() {
            self.store.store(*key, entry.clone()).await;
        }
        if let Some(leader) = leader {
            leader.publish(Some(entry.clone()));
        }
        let outcome = miss(CachePhase::Miss(decision.map(|_| ())), fwd_status);
        self.serve_entry(&entry, ctx, outcome)
    }

    /// Passes a request through to the upstream, streaming both ways, without the cache.
    async fn bypass(
        &self,
        parts: Parts,
        body: ProxyBody,
        client: SocketAddr,
        reason: BypassReason,
    ) -> Response<ProxyBody> {
        let phase = CachePhase::Bypass(reason);
        match self.send(parts, body, client).await {
            Ok((head, resp_body)) => {
                let outcome = miss(phase, Some(head.status.as_u16()));
                let resp = Response::from_parts(head, body::boxed(resp_body));
                self.finish(resp, outcome, None)
            }
            Err(error_response) => self.finish(error_response, miss(phase, None), None),
        }
    }

    /// Adds `X-Forwarded-*`, sends to the upstream and records its latency. Returns the
    /// response head without hop-by-hop headers, and the streaming body. Errors are turned
    /// into the 502/504 response that the client gets.
    async fn send(
        &self,
        mut parts: Parts,
        body: ProxyBody,
        client: SocketAddr,
    ) -> Result<(http::response::Parts, Incoming), Response<ProxyBody>> {
        headers::add_forwarded(&mut parts.headers, client);
        match self.upstream.send(Request::from_parts(parts, body)).await {
            Ok((resp, elapsed)) => {
                self.metrics
                    .upstream_duration
                    .observe(elapsed.as_secs_f64());
                let (mut head, body) = resp.into_parts();
                headers::remove_hop_by_hop(&mut head.headers);
                Ok((head, body))
            }
            Err(UpstreamError::Unreachable(reason)) => {
                self.metrics.upstream_errors.inc("unreachable");
                tracing::warn!(%reason, "upstream unreachable");
                Err(plain(StatusCode::BAD_GATEWAY, "upstream unreachable"))
            }
            Err(UpstreamError::Timeout) => {
                self.metrics.upstream_errors.inc("timeout");
                tracing::warn!("upstream timed out");
                Err(plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out"))
            }
        }
    }

    /// Builds the response for a stored or shared entry: the entry itself, or `304 Not
    /// Modified` when the client's conditions say it has it already.
    fn serve_entry(
        &self,
        entry: &CachedResponse,
        ctx: &Ctx,
        outcome: Outcome,
    ) -> Response<ProxyBody> {
        let is_get = ctx.method == Method::GET || ctx.method == Method::HEAD;
        let mut resp = if is_get
            && entry.status == StatusCode::OK
            && ctx.conditions.not_modified(&entry.headers)
        {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            *resp.headers_mut() = conditional::not_modified_headers(&entry.headers);
            resp
        } else {
            let body = if ctx.method == Method::HEAD {
                body::empty()
            } else {
                body::full(entry.body.clone())
            };
            let mut resp = Response::new(body);
            *resp.status_mut() = entry.status;
            *resp.headers_mut() = entry.headers.clone();
            resp
        };
        if let CachePhase::Hit(_) = outcome.phase {
            resp.headers_mut()
                .insert(header::AGE, HeaderValue::from(entry.age_secs(now_ms())));
        }
        self.finish(resp, outcome, Some(&ctx.key))
    }

    /// Adds `X-Cache-Status` and `Cache-Status` (RFC 9211: our member goes last), counts the
    /// request and logs it (key hash only, never raw request data).
    fn finish(
        &self,
        mut resp: Response<ProxyBody>,
        outcome: Outcome,
        key: Option<&CacheKey>,
    ) -> Response<ProxyBody> {
        let phase = outcome.phase;
        let ours = phase.cache_status_header(outcome.ttl_secs, outcome.fwd_status);
        let headers = resp.headers_mut();
        let value = match headers.get("cache-status").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ours}"),
            None => ours,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert("cache-status", v);
        }
        headers.insert(
            "x-cache-status",
            HeaderValue::from_static(phase.x_cache_status()),
        );
        self.metrics.record(phase);
        tracing::debug!(
            status = resp.status().as_u16(),
            cache = phase.status_label(),
            reason = phase.reason_label(),
            key = key.map(CacheKey::short).unwrap_or_default(),
            "request"
        );
        resp
    }
}

fn hit(entry: &CachedResponse, tier: Tier) -> Outcome {
    Outcome {
        phase: CachePhase::Hit(tier),
        ttl_secs: Some(entry.remaining_ttl(now_ms()).as_secs()),
        fwd_status: None,
    }
}

fn miss(phase: CachePhase, fwd_status: Option<u16>) -> Outcome {
    Outcome {
        phase,
        ttl_secs: None,
        fwd_status,
    }
}

/// A short plain-text response generated by cachegate itself.
pub fn plain(status: StatusCode, reason: &'static str) -> Response<ProxyBody> {
    generated(status, reason, "text/plain; charset=utf-8")
}

/// A response generated by cachegate itself: `status`, `body`, and its `Content-Type`.
pub fn generated(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
