//! The stored HTTP response: one compact buffer that is also its Redis payload.
//!
//! Payload layout (integers big-endian), sealed into the engine's envelope
//! ([`cachegate_core::envelope`]) for Redis:
//!
//! ```text
//! stored_at_ms u64 | ttl_secs u32 | status u16
//! | initial_age_secs u32 | stale_while_revalidate_secs u32 | stale_if_error_secs u32
//! | flags u16 (bit 0: must-revalidate) | revalidate_secs u32
//! | n_headers u16 | { name_len u16 | name | value_len u32 | value }*
//! | n_tags u16 | { tag_len u16 | tag }* | body_len u32 | body
//! ```

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use cachegate_core::store::Storable;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

pub use cachegate_core::now_ms;

/// A stored response: what is needed to answer a request without the upstream.
///
/// Compact by construction: the whole entry is one exact-size, reference-counted buffer
/// laid out as the envelope's payload (see the module docs: `stored_at_ms | ttl_secs |
/// status | header block | tags | body`), so an entry costs one allocation, cloning it is
/// one atomic increment, and nothing in it keeps a connection's read buffer or spare
/// capacity alive. [`CachedResponse::body`] hands out a view that shares the buffer, and
/// so do the values [`CachedResponse::headers`] gives, unless they come from the thread's
/// recently parsed header blocks (copies). (An entry read from Redis is opened in the buffer it was
/// read into, then copied once into its own exact-size one: holding Redis's buffer as
/// `Bytes` saved that copy but cost about 70 bytes more per memory-tier entry.)
#[derive(Debug, Clone)]
pub struct CachedResponse {
    /// The payload: fields at fixed offsets, then the header block, tags and body.
    data: Arc<[u8]>,
    /// Where the tag list starts in `data`.
    tags_at: u32,
    /// Where the body starts in `data`.
    body_at: u32,
}

/// Header blocks this thread turned into maps lately (at most [`PARSED_SLOTS`], each block
/// at most [`PARSED_MAX_BLOCK_BYTES`]): a hit on a hot entry clones a ready map instead of
/// checking and hashing every stored name again (about 2.4 k of a memory-tier hit's 17.6 k
/// instructions, `bench/instructions.sh`). Found by the entry buffer's address and proved
/// by the block's bytes, and holding copies of the values, not views of the entry: nothing
/// here keeps an entry alive, and only a block equal byte for byte is ever answered from
/// it. A block is taken in when its entry misses here a second time within its thread's
/// last [`PARSED_SLOTS`] misses, so that a stream of distinct entries pays for no copies it
/// would never use, while a hot one gets in at its second request.
struct ParsedBlocks {
    /// (the entry buffer's address, the block, its map with values copied), replaced
    /// round-robin.
    slots: Vec<(usize, Box<[u8]>, HeaderMap)>,
    /// The slot replaced next once all are used.
    next: usize,
    /// The entry buffer addresses of the latest misses, a ring.
    missed: [usize; PARSED_SLOTS],
    /// Where in `missed` the next miss goes.
    next_missed: usize,
}

/// Header blocks each thread keeps parsed ([`ParsedBlocks`]).
const PARSED_SLOTS: usize = 8;

/// The largest header block kept parsed, in bytes.
const PARSED_MAX_BLOCK_BYTES: usize = 2048;

thread_local! {
    static PARSED: std::cell::RefCell<ParsedBlocks> = const {
        std::cell::RefCell::new(ParsedBlocks {
            slots: Vec::new(),
            next: 0,
            missed: [0; PARSED_SLOTS],
            next_missed: 0,
        })
    };
}

impl ParsedBlocks {
    /// A copy of the map of `block` (of the entry buffer at `at`), if this thread holds it.
    fn get(&mut self, at: usize, block: &[u8]) -> Option<HeaderMap> {
        self.slots
            .iter()
            .find(|(a, b, _)| *a == at && **b == *block)
            .map(|(_, _, headers)| headers.clone())
    }

    /// After a miss: takes in `block` (of the entry buffer at `at`), parsed as `headers`,
    /// if that entry missed here lately too; else remembers the miss.
    fn offer(&mut self, at: usize, block: &[u8], headers: &HeaderMap) {
        if !self.missed.contains(&at) {
            self.missed[self.next_missed] = at;
            self.next_missed = (self.next_missed + 1) % PARSED_SLOTS;
            return;
        }
        // No spare room: a clone keeps none of it (a hit's additions grow the clone).
        let mut detached = HeaderMap::with_capacity(headers.len());
        for (name, value) in headers {
            let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) else {
                return;
            };
            detached.append(name.clone(), value);
        }
        let slot = (at, Box::from(block), detached);
        if self.slots.len() < PARSED_SLOTS {
            self.slots.push(slot);
        } else {
            self.slots[self.next] = slot;
            self.next = (self.next + 1) % PARSED_SLOTS;
        }
    }
}

/// Offsets of the fixed fields in the payload.
const STORED_AT: usize = 0;
const TTL: usize = 8;
const STATUS: usize = 12;
const INITIAL_AGE: usize = 14;
const SWR: usize = 18;
const SIE: usize = 22;
const FLAGS: usize = 26;
const REVALIDATE: usize = 28;
const BLOCK: usize = 32;

/// `flags` bit: the response said `must-revalidate`, `proxy-revalidate` or `s-maxage`.
const MUST_REVALIDATE: u16 = 1;

/// `flags` bit: not a response but a `Vary` marker ([`CachedResponse::vary_marker`]).
const VARY_MARKER: u16 = 2;

/// How long a `Vary` marker is kept at least, in seconds (longer when its variants live
/// longer); it is stored again, same generation, once half of that has passed.
pub const VARY_MARKER_TTL_SECS: u32 = 86_400;

/// The header of a `Vary` marker that holds its generation.
const GENERATION: &str = "x-cachegate-vary-generation";

/// How a stored response ages: its freshness lifetime, the age it already had, and how
/// long it may be served stale (RFC 9111 §4.2, RFC 5861).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Freshness {
    /// Seconds the response stays fresh from its stamp (`stored_at_ms`: when its request
    /// was sent).
    pub ttl_secs: u32,
    /// Its age when its request was sent (RFC 9111 §4.2.3 `corrected_initial_age` less the
    /// response delay), in
    /// seconds: the `Age` sent with it is this plus the time it has been stored.
    pub initial_age_secs: u32,
    /// Seconds past its freshness during which it is served stale while one background
    /// request refreshes it (RFC 5861 §3).
    pub stale_while_revalidate_secs: u32,
    /// Seconds past its freshness during which it is served instead of an upstream error
    /// (RFC 5861 §4).
    pub stale_if_error_secs: u32,
    /// Never served stale: `must-revalidate`, `proxy-revalidate` or `s-maxage`
    /// (RFC 9111 §4.2.4, §5.2.2.2, §5.2.2.8, §5.2.2.10).
    pub must_revalidate: bool,
    /// Seconds past its freshness during which it is kept to be revalidated with its
    /// validators (`ETag`, `Last-Modified`; RFC 9111 §4.3); 0 without validators.
    pub revalidate_secs: u32,
}

impl Freshness {
    /// Fresh for `ttl_secs`, never served stale, no initial age.
    pub fn ttl(ttl_secs: u32) -> Self {
        Freshness {
            ttl_secs,
            ..Freshness::default()
        }
    }
}

/// Where a stored response stands at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// Fresh: `left` of its freshness remains.
    Fresh {
        /// Freshness left.
        left: std::time::Duration,
    },
    /// Stale for `secs` seconds (at least 1).
    Stale {
        /// Whole seconds past its freshness, rounded up.
        secs: u64,
    },
}

impl Staleness {
    /// Whole seconds past its freshness: 0 while fresh.
    pub fn stale_secs(self) -> u64 {
        match self {
            Staleness::Stale { secs } => secs,
            Staleness::Fresh { .. } => 0,
        }
    }
}

/// Bytes the memory tier really spends on one entry besides its buffer: the cache's slot
/// (the 32-byte key, the buffer's pointer and length, the eviction policy's state), its
/// hash-table slot, the buffer's reference counts and the allocator's rounding, with the
/// slack of tables that grow by doubling. Measured through the proxy with
/// `bench/memory.sh` (real bytes per entry minus the buffer: 130 B at 1 M entries, 158 B
/// at 100 k), so that `memory_max_bytes` bounds the process's real memory.
pub const ENTRY_OVERHEAD_BYTES: usize = 160;

/// Room for a stored response's fields and headers besides its body: hyper reads at most
/// 100 headers in a head of at most ~400 KiB.
const MAX_HEAD_BYTES: usize = 512 << 10;

/// The heaviest entry ([`Storable::size_bytes`]) a response with a body of at most
/// `max_body_bytes` makes: what the memory tier must be able to hold.
pub fn max_entry_bytes(max_body_bytes: usize) -> u64 {
    (max_body_bytes + MAX_HEAD_BYTES + ENTRY_OVERHEAD_BYTES) as u64
}

/// Appends a header block for `headers` to `b` (at most `u16::MAX` headers).
fn put_header_block(b: &mut BytesMut, headers: &HeaderMap) {
    let n = headers.len().min(u16::MAX as usize);
    b.put_u16(n as u16);
    for (name, value) in headers.iter().take(n) {
        b.put_u16(name.as_str().len() as u16);
        b.put_slice(name.as_str().as_bytes());
        b.put_u32(value.len() as u32);
        b.put_slice(value.as_bytes());
    }
}

/// Reads a header block from the front of `r`, checking every name and value; returns the
/// block's length. `None` for a malformed block.
fn check_header_block(r: &mut &[u8]) -> Option<usize> {
    let start = r.len();
    let n = get_u16(r)?;
    for _ in 0..n {
        let len = get_u16(r)? as usize;
        HeaderName::from_bytes(take(r, len)?).ok()?;
        let len = get_u32(r)? as usize;
        HeaderValue::from_bytes(take(r, len)?).ok()?;
    }
    Some(start - r.len())
}

impl CachedResponse {
    /// An entry for a response with `status`, `headers` and `body`, stamped
    /// `stored_at_ms` (milliseconds since the Unix epoch; the proxy gives the time its
    /// request was sent), aging as `freshness` says, tagged with `tags` for later purges. At most `u16::MAX` headers and tags are kept; a
    /// body or header value over 4 GiB is cut (the proxy never stores one: routes cap
    /// bodies).
    pub fn new<T: AsRef<str>>(
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        stored_at_ms: u64,
        freshness: Freshness,
        tags: &[T],
    ) -> Self {
        let block: usize = 2 + headers
            .iter()
            .map(|(n, v)| 6 + n.as_str().len() + v.len())
            .sum::<usize>();
        let tag_bytes: usize = 2 + tags.iter().map(|t| 2 + t.as_ref().len()).sum::<usize>();
        let mut b = BytesMut::with_capacity(BLOCK + block + tag_bytes + 4 + body.len());
        b.put_u64(stored_at_ms);
        b.put_u32(freshness.ttl_secs);
        b.put_u16(status.as_u16());
        b.put_u32(freshness.initial_age_secs);
        b.put_u32(freshness.stale_while_revalidate_secs);
        b.put_u32(freshness.stale_if_error_secs);
        b.put_u16(if freshness.must_revalidate {
            MUST_REVALIDATE
        } else {
            0
        });
        b.put_u32(freshness.revalidate_secs);
        put_header_block(&mut b, headers);
        let tags_at = b.len();
        let n = tags.len().min(u16::MAX as usize);
        b.put_u16(n as u16);
        for tag in &tags[..n] {
            let tag = tag.as_ref().as_bytes();
            let tag = &tag[..tag.len().min(u16::MAX as usize)];
            b.put_u16(tag.len() as u16);
            b.put_slice(tag);
        }
        let body = &body[..body.len().min(u32::MAX as usize)];
        b.put_u32(body.len() as u32);
        let body_at = b.len();
        b.put_slice(body);
        CachedResponse {
            data: Arc::from(&b[..]),
            tags_at: tags_at as u32,
            body_at: body_at as u32,
        }
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        // Checked when the entry was made or decoded.
        StatusCode::from_u16(self.u16_at(STATUS)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The entry's stamp: when its upstream request was sent (RFC 9111 §4.2.3
    /// `request_time`), in milliseconds since the Unix epoch. It ages, and purges cover
    /// it, from then.
    pub fn stored_at_ms(&self) -> u64 {
        let mut r = &self.data[STORED_AT..TTL];
        r.get_u64()
    }

    /// Freshness lifetime from [`CachedResponse::stored_at_ms`], in seconds.
    pub fn ttl_secs(&self) -> u32 {
        let mut r = &self.data[TTL..STATUS];
        r.get_u32()
    }

    fn u16_at(&self, at: usize) -> u16 {
        let mut r = &self.data[at..at + 2];
        r.get_u16()
    }

    /// A `Vary` marker (see [`crate::vary`]): stored under a primary key at `stored_at_ms`,
    /// kept `ttl_secs`, naming the request headers its variants differ by, of generation
    /// `generation_ms` (which stays the same when the marker is stored again to keep it).
    /// Never served.
    pub fn vary_marker(
        names: &[String],
        generation_ms: u64,
        stored_at_ms: u64,
        ttl_secs: u32,
    ) -> Self {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(&names.join(", ")) {
            headers.insert(http::header::VARY, value);
        }
        headers.insert(GENERATION, HeaderValue::from(generation_ms));
        let mut marker = CachedResponse::new(
            StatusCode::OK,
            &headers,
            b"",
            stored_at_ms,
            Freshness::ttl(ttl_secs.max(VARY_MARKER_TTL_SECS)),
            &[] as &[&str],
        );
        let mut data = marker.data.to_vec();
        data[FLAGS..FLAGS + 2].copy_from_slice(&VARY_MARKER.to_be_bytes());
        marker.data = Arc::from(data);
        marker
    }

    /// Whether the stored response has a validator (`ETag`, `Last-Modified`) to be
    /// revalidated with (RFC 9111 §4.3.1).
    pub fn has_validator(&self) -> bool {
        let headers = self.headers();
        headers.contains_key(http::header::ETAG)
            || headers.contains_key(http::header::LAST_MODIFIED)
    }

    /// A `Vary` marker's generation (see [`CachedResponse::vary_marker`]).
    pub fn vary_generation(&self) -> u64 {
        self.headers()
            .get(GENERATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| self.stored_at_ms())
    }

    /// Whether this is a `Vary` marker rather than a response.
    pub fn is_vary_marker(&self) -> bool {
        self.u16_at(FLAGS) & VARY_MARKER != 0
    }

    /// The header names a `Vary` marker lists (lower-cased, sorted).
    pub fn vary_names(&self) -> Vec<String> {
        crate::vary::variant_names(&self.headers(), &[])
    }

    fn u32_at(&self, at: usize) -> u32 {
        let mut r = &self.data[at..at + 4];
        r.get_u32()
    }

    /// How the entry ages: TTL, initial age, stale windows.
    pub fn freshness(&self) -> Freshness {
        Freshness {
            ttl_secs: self.ttl_secs(),
            initial_age_secs: self.u32_at(INITIAL_AGE),
            stale_while_revalidate_secs: self.u32_at(SWR),
            stale_if_error_secs: self.u32_at(SIE),
            must_revalidate: self.u16_at(FLAGS) & MUST_REVALIDATE != 0,
            revalidate_secs: self.u32_at(REVALIDATE),
        }
    }

    /// Whether the entry is fresh at `now_ms`, or for how long it has been stale.
    pub fn staleness(&self, now_ms: u64) -> Staleness {
        let expires = self
            .stored_at_ms()
            .saturating_add(u64::from(self.ttl_secs()) * 1000);
        if now_ms < expires {
            Staleness::Fresh {
                left: std::time::Duration::from_millis(expires - now_ms),
            }
        } else {
            Staleness::Stale {
                secs: (now_ms - expires).div_ceil(1000).max(1),
            }
        }
    }

    /// The entry's current age at `now_ms` (RFC 9111 §4.2.3 `current_age`), in whole
    /// seconds: its age when its request was sent plus the time since. What `Age` says.
    pub fn current_age_secs(&self, now_ms: u64) -> u64 {
        u64::from(self.u32_at(INITIAL_AGE)) + now_ms.saturating_sub(self.stored_at_ms()) / 1000
    }

    /// The entry's tags (surrogate keys), in the order they were given.
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        let mut r = &self.data[self.tags_at as usize..self.body_at as usize];
        let n = get_u16(&mut r).unwrap_or(0);
        (0..n).map_while(move |_| {
            let len = get_u16(&mut r)?;
            // Checked to be UTF-8 when the entry was made or decoded.
            std::str::from_utf8(take(&mut r, len as usize)?).ok()
        })
    }

    /// The buffer as `Bytes`, for views that outlive `&self` (one small allocation).
    fn shared(&self) -> Bytes {
        Bytes::from_owner(self.data.clone())
    }

    /// The stored headers and the body, sharing the entry's buffer: what a hit sends.
    pub fn parts(&self) -> (HeaderMap, Bytes) {
        let shared = self.shared();
        let body = shared.slice(self.body_at as usize..);
        (self.headers_in(&shared), body)
    }

    /// The stored headers, as the upstream sent them (hop-by-hop and framing removed). The
    /// values share the entry's buffer, or copy it when this thread parsed the same block
    /// lately.
    pub fn headers(&self) -> HeaderMap {
        self.headers_in(&self.shared())
    }

    fn headers_in(&self, shared: &Bytes) -> HeaderMap {
        let block = &self.data[BLOCK..self.tags_at as usize];
        let memo = block.len() <= PARSED_MAX_BLOCK_BYTES;
        // The buffer's address: a quick first test, never the proof (an address is reused
        // once an entry is freed).
        let at = self.data.as_ptr() as usize;
        if memo && let Some(headers) = PARSED.with_borrow_mut(|parsed| parsed.get(at, block)) {
            return headers;
        }
        let headers = self.parse_headers(shared);
        if memo {
            PARSED.with_borrow_mut(|parsed| parsed.offer(at, block, &headers));
        }
        headers
    }

    /// The stored header block checked and turned into a map, its values sharing `shared`.
    fn parse_headers(&self, shared: &Bytes) -> HeaderMap {
        let mut r = &self.data[BLOCK..self.tags_at as usize];
        let n = get_u16(&mut r).unwrap_or(0);
        // Room for what a hit adds (`Age`, `Cache-Status`, `X-Cache-Status`) without
        // growing the table.
        let mut headers = HeaderMap::with_capacity(usize::from(n).min(64) + 3);
        let mut at = BLOCK + 2;
        for _ in 0..n {
            // The block was written or checked when the entry was made.
            let Some(name_len) = get_u16(&mut r) else {
                break;
            };
            let Some(name) = take(&mut r, name_len as usize) else {
                break;
            };
            let Some(value_len) = get_u32(&mut r) else {
                break;
            };
            let value_at = at + 2 + name_len as usize + 4;
            let value_end = value_at + value_len as usize;
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(shared.slice(value_at..value_end)),
            ) else {
                break;
            };
            let _ = take(&mut r, value_len as usize);
            at = value_end;
            if headers.try_append(name, value).is_err() {
                break;
            }
        }
        headers
    }

    /// The whole response body (shares the entry's buffer).
    pub fn body(&self) -> Bytes {
        self.shared().slice(self.body_at as usize..)
    }

    /// Checks a payload's structure (every header, tag and length) and makes the entry.
    fn decode_payload(payload: &[u8]) -> Option<CachedResponse> {
        let r = &mut &payload[..];
        let _stored_at_ms = get_u64(r)?;
        let _ttl_secs = get_u32(r)?;
        StatusCode::from_u16(get_u16(r)?).ok()?;
        let _initial_age_secs = get_u32(r)?;
        let _swr = get_u32(r)?;
        let _sie = get_u32(r)?;
        if get_u16(r)? & !(MUST_REVALIDATE | VARY_MARKER) != 0 {
            return None;
        }
        let _revalidate_secs = get_u32(r)?;
        check_header_block(r)?;
        let tags_at = payload.len() - r.len();
        let n_tags = get_u16(r)?;
        for _ in 0..n_tags {
            let len = get_u16(r)? as usize;
            std::str::from_utf8(take(r, len)?).ok()?;
        }
        let len = get_u32(r)? as usize;
        let body_at = payload.len() - r.len();
        take(r, len)?;
        if !r.is_empty() {
            return None;
        }
        Some(CachedResponse {
            data: Arc::from(payload),
            tags_at: u32::try_from(tags_at).ok()?,
            body_at: u32::try_from(body_at).ok()?,
        })
    }
}

impl Storable for CachedResponse {
    fn stored_at_ms(&self) -> u64 {
        CachedResponse::stored_at_ms(self)
    }

    fn ttl_secs(&self) -> u32 {
        CachedResponse::ttl_secs(self)
    }

    /// Kept past its freshness as long as it may be served stale (the longer of the two
    /// stale windows; none when it must be revalidated) or revalidated.
    fn grace_secs(&self) -> u32 {
        let f = self.freshness();
        let stale = if f.must_revalidate {
            0
        } else {
            f.stale_while_revalidate_secs.max(f.stale_if_error_secs)
        };
        stale.max(f.revalidate_secs)
    }

    /// The buffer and the fixed per-entry overhead ([`ENTRY_OVERHEAD_BYTES`]).
    fn size_bytes(&self) -> usize {
        self.data.len() + ENTRY_OVERHEAD_BYTES
    }

    fn any_tag(&self, pred: &mut dyn FnMut(&str) -> bool) -> bool {
        self.tags().any(pred)
    }

    fn to_payload(&self) -> Vec<u8> {
        self.data.to_vec()
    }

    fn from_payload(payload: &[u8]) -> Option<Self> {
        Self::decode_payload(payload)
    }
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if r.len() < n {
        return None;
    }
    let (head, tail) = r.split_at(n);
    *r = tail;
    Some(head)
}

fn get_u16(r: &mut &[u8]) -> Option<u16> {
    (r.remaining() >= 2).then(|| r.get_u16())
}
fn get_u32(r: &mut &[u8]) -> Option<u32> {
    (r.remaining() >= 4).then(|| r.get_u32())
}
fn get_u64(r: &mut &[u8]) -> Option<u64> {
    (r.remaining() >= 8).then(|| r.get_u64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cachegate_core::envelope::EnvelopeKeys;
    use cachegate_core::key::CacheKey;

    fn sample() -> CachedResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let tags: Vec<String> = vec!["natal".into()];
        CachedResponse::new(
            StatusCode::OK,
            &headers,
            b"{\"ok\":true}",
            1_700_000_000_000,
            Freshness {
                ttl_secs: 30,
                initial_age_secs: 7,
                stale_while_revalidate_secs: 60,
                stale_if_error_secs: 600,
                must_revalidate: false,
                revalidate_secs: 0,
            },
            &tags,
        )
    }

    /// The headers an entry serves: in stored order, names and values as stored.
    fn listed(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn kept_parsed_blocks_serve_the_same_headers_and_only_for_the_same_bytes() {
        let entry = sample();
        let parsed = listed(&entry.parse_headers(&entry.shared()));
        // Served often enough to be taken in, then from it: the same every time.
        for _ in 0..20 {
            assert_eq!(listed(&entry.headers()), parsed);
            assert_eq!(listed(&entry.parts().0), parsed);
        }
        let block = &entry.data[BLOCK..entry.tags_at as usize];
        let at = entry.data.as_ptr() as usize;
        assert!(PARSED.with_borrow_mut(|p| p.get(at, block)).is_some());
        // Another entry's block at the same address (a freed buffer reused): not answered.
        let mut other = HeaderMap::new();
        other.insert("content-type", HeaderValue::from_static("text/plain"));
        let mut other_block = BytesMut::new();
        put_header_block(&mut other_block, &other);
        assert!(
            PARSED
                .with_borrow_mut(|p| p.get(at, &other_block))
                .is_none()
        );
        // The same block at another address: not answered either (parsed, then kept).
        assert!(PARSED.with_borrow_mut(|p| p.get(at + 1, block)).is_none());
        // The kept map holds copies: the entry's buffer is not kept alive by it.
        let data = Arc::downgrade(&entry.data);
        drop(entry);
        assert!(data.upgrade().is_none());
    }

    #[test]
    fn changing_a_served_map_leaves_the_next_hit_as_stored() {
        let entry = sample();
        let parsed = listed(&entry.parse_headers(&entry.shared()));
        for _ in 0..3 {
            let mut served = entry.parts().0;
            served.insert("age", HeaderValue::from_static("5"));
            served.remove("x-multi");
            served.append("x-multi", HeaderValue::from_static("c"));
            assert_eq!(listed(&entry.headers()), parsed);
        }
    }

    #[test]
    fn many_distinct_entries_each_serve_their_own_headers() {
        for i in 0..100u32 {
            let mut headers = HeaderMap::new();
            headers.insert("etag", HeaderValue::from(i));
            headers.insert("x-n", HeaderValue::from(i % 3));
            let entry = CachedResponse::new(
                StatusCode::OK,
                &headers,
                b"x",
                1,
                Freshness::ttl(60),
                &[] as &[&str],
            );
            for _ in 0..3 {
                assert_eq!(listed(&entry.headers()), listed(&headers), "{i}");
            }
        }
    }

    #[test]
    fn round_trip_through_a_sealed_envelope() {
        let key = CacheKey([7; 32]);
        let e = sample();
        for seal in [true, false] {
            let keys = EnvelopeKeys::new(b"secret", seal);
            let bytes = keys.seal(&key, &e.to_payload());
            let d = CachedResponse::from_payload(&keys.open(&key, &bytes).unwrap()).unwrap();
            assert_eq!(d.status(), e.status());
            assert_eq!(d.headers(), e.headers());
            assert_eq!(d.headers()["content-type"], "application/json");
            assert_eq!(d.headers().get_all("x-multi").iter().count(), 2);
            assert_eq!(d.body(), e.body());
            assert!(d.tags().eq(e.tags()));
            assert_eq!(d.tags().collect::<Vec<_>>(), ["natal"]);
            assert_eq!((d.stored_at_ms(), d.ttl_secs()), (1_700_000_000_000, 30));
            assert_eq!(d.freshness(), e.freshness());
            assert_eq!(d.freshness().stale_if_error_secs, 600);
            let (headers, body) = d.parts();
            assert_eq!((headers, body), (e.headers(), e.body()));
        }
    }

    #[test]
    fn freshness_never_overflows() {
        let mut payload = sample().to_payload();
        payload[..8].copy_from_slice(&u64::MAX.to_be_bytes());
        let entry = CachedResponse::from_payload(&payload).unwrap();
        assert!(entry.is_fresh(0) && entry.is_kept(u64::MAX - 1));
        assert_eq!(entry.age_secs(0), 0);
        assert_eq!(entry.current_age_secs(0), 7);
        assert!(matches!(entry.staleness(0), Staleness::Fresh { .. }));
    }

    #[test]
    fn ages_from_its_initial_age_and_goes_stale_after_its_ttl() {
        let e = sample();
        let at = e.stored_at_ms();
        assert_eq!(e.current_age_secs(at), 7);
        assert_eq!(e.current_age_secs(at + 12_500), 19);
        assert!(matches!(e.staleness(at + 29_999), Staleness::Fresh { .. }));
        assert_eq!(e.staleness(at + 30_000), Staleness::Stale { secs: 1 });
        assert_eq!(e.staleness(at + 31_001), Staleness::Stale { secs: 2 });
        // Kept for the longer stale window, then dropped.
        assert_eq!(e.grace_secs(), 600);
        assert!(e.is_kept(at + 629_999) && !e.is_kept(at + 630_000));
        let strict = CachedResponse::new(
            StatusCode::OK,
            &HeaderMap::new(),
            b"",
            at,
            Freshness {
                must_revalidate: true,
                ..e.freshness()
            },
            &[] as &[&str],
        );
        assert_eq!(strict.grace_secs(), 0);
    }

    #[test]
    fn truncated_or_padded_payloads_are_rejected() {
        let payload = sample().to_payload();
        for n in 0..payload.len() {
            assert!(CachedResponse::from_payload(&payload[..n]).is_none(), "{n}");
        }
        let mut longer = payload.clone();
        longer.push(0);
        assert!(CachedResponse::from_payload(&longer).is_none());
    }

    proptest::proptest! {
        #[test]
        fn any_payload_decodes_or_is_rejected_never_panics(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            // Authenticated but malformed payloads (a writer with the secret and a bug).
            if let Some(entry) = CachedResponse::from_payload(&payload) {
                let _ = (entry.status(), entry.parts(), entry.tags().count());
                // Freshness arithmetic on any stored time (u64::MAX included).
                let _ = (entry.is_fresh(u64::MAX), entry.is_kept(0), entry.age_secs(0));
                let _ = (entry.staleness(u64::MAX), entry.staleness(0), entry.current_age_secs(u64::MAX));
            }
        }
    }
}
