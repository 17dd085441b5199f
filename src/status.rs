//! What the cache decided for a request, as explicit enums.
//!
//! The same values name the response headers (`X-Cache-Status`, RFC 9211 `Cache-Status`)
//! and the labels of the Prometheus metrics, in the way Cloudflare's pingora-cache models
//! its phases and no-cache reasons.

pub use cachegate_core::store::Tier;

/// Why a request was neither looked up in nor stored into the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BypassReason {
    /// The kill switch is off (`enabled = false`).
    Disabled,
    /// The key falls outside `rollout_percent`.
    Rollout,
    /// The matching route has `enabled = false`.
    RouteDisabled,
    /// The method is not cacheable here (no route, and not GET/HEAD).
    Method,
    /// The request carries `Authorization` and the route does not key on it.
    Authorization,
    /// The request carries `Cookie` and the route does not key on it.
    Cookie,
    /// A body-keyed route got a body that is not JSON.
    MalformedBody,
    /// A body-keyed route got JSON that is not I-JSON (RFC 7493): duplicate member names
    /// or numbers beyond an IEEE 754 double, which RFC 8785 cannot canonicalize faithfully.
    NotIJson,
    /// A body-keyed route got a body whose `Content-Type` is not `application/json` or
    /// `*+json`.
    ContentType,
    /// The request has a body the key does not cover (e.g. a GET or HEAD with a body).
    RequestBody,
    /// The path holds an encoded `/`, `\` or NUL, a `;` parameter or an invalid escape,
    /// which upstreams read differently.
    AmbiguousPath,
    /// The query holds an invalid percent-escape (`%zz`), which upstreams read differently.
    AmbiguousQuery,
    /// A body-keyed route got a body over `max_request_body_bytes`.
    OversizedBody,
    /// The request asks for a byte range (`Range`), which is passed through.
    Range,
    /// The request asks for a protocol upgrade (e.g. WebSocket); it is tunnelled.
    Upgrade,
}

impl BypassReason {
    /// Every reason, for metric and stats listings.
    pub const ALL: [BypassReason; 15] = [
        BypassReason::Disabled,
        BypassReason::Rollout,
        BypassReason::RouteDisabled,
        BypassReason::Method,
        BypassReason::Authorization,
        BypassReason::Cookie,
        BypassReason::MalformedBody,
        BypassReason::NotIJson,
        BypassReason::ContentType,
        BypassReason::RequestBody,
        BypassReason::AmbiguousPath,
        BypassReason::AmbiguousQuery,
        BypassReason::OversizedBody,
        BypassReason::Range,
        BypassReason::Upgrade,
    ];

    /// The label and `detail=` value.
    pub fn as_str(self) -> &'static str {
        match self {
            BypassReason::Disabled => "disabled",
            BypassReason::Rollout => "rollout",
            BypassReason::RouteDisabled => "route-disabled",
            BypassReason::Method => "method",
            BypassReason::Authorization => "authorization",
            BypassReason::Cookie => "cookie",
            BypassReason::MalformedBody => "malformed-body",
            BypassReason::NotIJson => "not-i-json",
            BypassReason::ContentType => "content-type",
            BypassReason::RequestBody => "request-body",
            BypassReason::AmbiguousPath => "ambiguous-path",
            BypassReason::AmbiguousQuery => "ambiguous-query",
            BypassReason::OversizedBody => "oversized-body",
            BypassReason::Range => "range",
            BypassReason::Upgrade => "upgrade",
        }
    }
}

/// Why an upstream response to a cacheable request was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoStoreReason {
    /// The status is not one the route stores (by default, not 2xx).
    Status,
    /// `Cache-Control: no-store` (RFC 9111 §5.2.2.5).
    NoStore,
    /// `Cache-Control: private` (RFC 9111 §5.2.2.7).
    Private,
    /// The response sets a cookie.
    SetCookie,
    /// No route matched and the response gives no explicit freshness (RFC 9111 §4.2.1).
    NoFreshness,
    /// The body is larger than `max_response_body_bytes`.
    TooLarge,
    /// The response carries `Vary: *` or varies on headers outside the key.
    Vary,
    /// The upstream could not be reached or timed out.
    UpstreamError,
    /// `Cache-Control` or `Vary` could not be parsed: fail closed.
    Unparsable,
    /// Not fetched: the request said `only-if-cached` (answered `504`).
    OnlyIfCached,
}

impl NoStoreReason {
    /// Every reason, for metric and stats listings.
    pub const ALL: [NoStoreReason; 10] = [
        NoStoreReason::Status,
        NoStoreReason::NoStore,
        NoStoreReason::Private,
        NoStoreReason::SetCookie,
        NoStoreReason::NoFreshness,
        NoStoreReason::TooLarge,
        NoStoreReason::Vary,
        NoStoreReason::UpstreamError,
        NoStoreReason::Unparsable,
        NoStoreReason::OnlyIfCached,
    ];

    /// The label and `detail=` value.
    pub fn as_str(self) -> &'static str {
        match self {
            NoStoreReason::Status => "status",
            NoStoreReason::NoStore => "no-store",
            NoStoreReason::Private => "private",
            NoStoreReason::SetCookie => "set-cookie",
            NoStoreReason::NoFreshness => "no-freshness",
            NoStoreReason::TooLarge => "too-large",
            NoStoreReason::Vary => "vary",
            NoStoreReason::UpstreamError => "upstream-error",
            NoStoreReason::Unparsable => "unparsable",
            NoStoreReason::OnlyIfCached => "only-if-cached",
        }
    }

    /// Whether a response not stored for this reason may still be handed to other requests
    /// coalesced on the same key. Only `status` and `no-freshness` may:
    /// [`crate::policy::storable`] reports every private marker before these two, so
    /// such a response carries none. (The request's own credentials are checked
    /// separately, [`crate::policy::credentialed`].)
    pub fn shareable(self) -> bool {
        matches!(self, NoStoreReason::Status | NoStoreReason::NoFreshness)
    }
}

/// Why a stale entry was served (RFC 5861).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StaleReason {
    /// Within its stale-while-revalidate window: one background request refreshes it.
    Revalidating,
    /// Within its stale-if-error window, in place of an upstream error.
    IfError,
    /// Marked stale by a soft purge: one background request refreshes it.
    SoftPurge,
    /// Allowed by the request's `max-stale` (a route that honours it).
    MaxStale,
}

impl StaleReason {
    /// Every reason, for metric and stats listings.
    pub const ALL: [StaleReason; 4] = [
        StaleReason::Revalidating,
        StaleReason::IfError,
        StaleReason::SoftPurge,
        StaleReason::MaxStale,
    ];

    /// The label and `detail=` value: `stale-while-revalidate`, `stale-if-error` or
    /// `soft-purge`.
    pub fn as_str(self) -> &'static str {
        match self {
            StaleReason::Revalidating => "stale-while-revalidate",
            StaleReason::IfError => "stale-if-error",
            StaleReason::SoftPurge => "soft-purge",
            StaleReason::MaxStale => "max-stale",
        }
    }
}

/// The cache's decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePhase {
    /// Served from a tier without contacting the upstream.
    Hit(Tier),
    /// A stale entry served from a tier, and why.
    Stale(StaleReason, Tier),
    /// A stale entry revalidated by the upstream (`304`) and served; `true` if stored again.
    Revalidated(bool),
    /// Forwarded to the upstream as the one request for its key; `Ok` if the response was
    /// stored, else why not.
    Miss(Result<(), NoStoreReason>),
    /// Answered with the response of a concurrent request for the same key.
    Collapsed,
    /// Not looked up, not stored.
    Bypass(BypassReason),
}

impl CachePhase {
    /// Every phase with every reason, for metric and stats listings.
    pub fn all() -> impl Iterator<Item = CachePhase> {
        Tier::ALL
            .into_iter()
            .map(CachePhase::Hit)
            .chain(
                StaleReason::ALL
                    .into_iter()
                    .flat_map(|r| Tier::ALL.into_iter().map(move |t| CachePhase::Stale(r, t))),
            )
            .chain([
                CachePhase::Revalidated(true),
                CachePhase::Revalidated(false),
            ])
            .chain([CachePhase::Miss(Ok(())), CachePhase::Collapsed])
            .chain(
                NoStoreReason::ALL
                    .into_iter()
                    .map(|r| CachePhase::Miss(Err(r))),
            )
            .chain(BypassReason::ALL.into_iter().map(CachePhase::Bypass))
    }

    /// The position of this phase in [`CachePhase::all`]: metrics keep one pre-resolved
    /// counter per phase, so that counting a request is an index, not a label lookup.
    /// (The fieldless reason enums list their variants in declaration order in `ALL`,
    /// which a test checks.)
    pub fn index(self) -> usize {
        let tiers = Tier::ALL.len();
        let stale = StaleReason::ALL.len() * tiers;
        let after_stale = tiers + stale;
        let tier = |t: Tier| if t == Tier::Memory { 0 } else { 1 };
        match self {
            CachePhase::Hit(t) => tier(t),
            CachePhase::Stale(r, t) => tiers + r as usize * tiers + tier(t),
            CachePhase::Revalidated(true) => after_stale,
            CachePhase::Revalidated(false) => after_stale + 1,
            CachePhase::Miss(Ok(())) => after_stale + 2,
            CachePhase::Collapsed => after_stale + 3,
            CachePhase::Miss(Err(r)) => after_stale + 4 + r as usize,
            CachePhase::Bypass(r) => after_stale + 4 + NoStoreReason::ALL.len() + r as usize,
        }
    }

    /// The `X-Cache-Status` value: `HIT`, `STALE`, `MISS` or `BYPASS`.
    pub fn x_cache_status(self) -> &'static str {
        match self {
            CachePhase::Hit(_) => "HIT",
            CachePhase::Stale(..) => "STALE",
            CachePhase::Revalidated(_) => "HIT",
            CachePhase::Miss(_) | CachePhase::Collapsed => "MISS",
            CachePhase::Bypass(_) => "BYPASS",
        }
    }

    /// The `status` metric label: `hit`, `stale`, `miss`, `collapsed` or `bypass`.
    pub fn status_label(self) -> &'static str {
        match self {
            CachePhase::Hit(_) => "hit",
            CachePhase::Stale(..) => "stale",
            CachePhase::Revalidated(_) => "revalidated",
            CachePhase::Miss(_) => "miss",
            CachePhase::Collapsed => "collapsed",
            CachePhase::Bypass(_) => "bypass",
        }
    }

    /// The `reason` metric label: the tier for hits, the stale reason for stale answers,
    /// `stored` or the no-store reason for misses, the bypass reason for bypasses.
    pub fn reason_label(self) -> &'static str {
        match self {
            CachePhase::Hit(tier) => tier.as_str(),
            CachePhase::Stale(reason, _) => reason.as_str(),
            CachePhase::Revalidated(true) => "stored",
            CachePhase::Revalidated(false) => "not-stored",
            CachePhase::Miss(Ok(())) => "stored",
            CachePhase::Miss(Err(r)) => r.as_str(),
            CachePhase::Collapsed => "coalesced",
            CachePhase::Bypass(r) => r.as_str(),
        }
    }

    /// The RFC 9211 `Cache-Status` value for this phase, e.g. `cachegate; hit; ttl=29;
    /// detail=memory`, `cachegate; fwd=miss; fwd-status=200; stored`, or for a stale
    /// answer `cachegate; hit; stale=5; ttl=-5; fwd=stale; detail=stale-while-revalidate`.
    /// `ttl_secs` is the freshness left (hits; negative when stale); `fwd_status` the
    /// upstream's status (misses, and the error a stale answer replaced).
    pub fn cache_status_header(self, ttl_secs: Option<i64>, fwd_status: Option<u16>) -> String {
        let mut s = String::with_capacity(64);
        self.write_cache_status(&mut s, ttl_secs, fwd_status);
        s
    }

    /// Appends [`CachePhase::cache_status_header`]'s value to `s` (no allocation when `s`
    /// has room): the form the request path uses.
    pub fn write_cache_status(
        self,
        s: &mut String,
        ttl_secs: Option<i64>,
        fwd_status: Option<u16>,
    ) {
        let mut int = itoa::Buffer::new();
        let mut fwd_status_param = |s: &mut String| {
            if let Some(code) = fwd_status {
                s.push_str("; fwd-status=");
                s.push_str(int.format(code));
            }
        };
        s.push_str("cachegate");
        match self {
            CachePhase::Revalidated(stored) => {
                s.push_str("; hit; fwd=stale");
                fwd_status_param(s);
                if stored {
                    s.push_str("; stored");
                }
                s.push_str("; detail=revalidated");
            }
            CachePhase::Stale(reason, tier) => {
                let ttl = ttl_secs.unwrap_or(0);
                let mut int = itoa::Buffer::new();
                s.push_str("; hit; stale=");
                s.push_str(int.format(ttl.unsigned_abs()));
                s.push_str("; ttl=");
                s.push_str(int.format(ttl));
                s.push_str("; fwd=stale");
                fwd_status_param(s);
                s.push_str("; detail=");
                s.push_str(reason.as_str());
                s.push_str("; tier=");
                s.push_str(tier.as_str());
            }
            CachePhase::Hit(tier) => {
                s.push_str("; hit");
                if let Some(ttl) = ttl_secs {
                    s.push_str("; ttl=");
                    s.push_str(itoa::Buffer::new().format(ttl));
                }
                s.push_str("; detail=");
                s.push_str(tier.as_str());
            }
            CachePhase::Miss(stored) => {
                s.push_str("; fwd=miss");
                fwd_status_param(s);
                match stored {
                    Ok(()) => s.push_str("; stored"),
                    Err(r) => {
                        s.push_str("; detail=");
                        s.push_str(r.as_str());
                    }
                }
            }
            CachePhase::Collapsed => {
                s.push_str("; fwd=miss");
                fwd_status_param(s);
                s.push_str("; collapsed");
            }
            CachePhase::Bypass(r) => {
                s.push_str(if r == BypassReason::Method {
                    "; fwd=method; detail="
                } else {
                    "; fwd=bypass; detail="
                });
                s.push_str(r.as_str());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_indexes_follow_all() {
        for (i, phase) in CachePhase::all().enumerate() {
            assert_eq!(phase.index(), i, "{phase:?}");
        }
    }

    #[test]
    fn headers() {
        assert_eq!(
            CachePhase::Hit(Tier::Redis).cache_status_header(Some(5), None),
            "cachegate; hit; ttl=5; detail=redis"
        );
        assert_eq!(
            CachePhase::Miss(Ok(())).cache_status_header(None, Some(200)),
            "cachegate; fwd=miss; fwd-status=200; stored"
        );
        assert_eq!(
            CachePhase::Bypass(BypassReason::Authorization).cache_status_header(None, None),
            "cachegate; fwd=bypass; detail=authorization"
        );
        assert_eq!(CachePhase::Collapsed.x_cache_status(), "MISS");
    }
}
