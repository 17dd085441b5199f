//! The stored entry and its versioned binary envelope.
//!
//! Layout of envelope version 1 (integers big-endian):
//!
//! ```text
//! version u8 = 1 | magic "CG" | key [32] | stored_at_ms u64 | ttl_secs u32 | status u16
//! | n_headers u16 | { name_len u16 | name | value_len u32 | value }*
//! | n_tags u16 | { tag_len u16 | tag }* | body_len u32 | body | checksum [16]
//! ```
//!
//! The version byte comes first, so that a reader can tell an unknown format before
//! anything else. The checksum is BLAKE3 over everything before it. An entry with another
//! version or magic, a wrong key, a bad length or a bad checksum decodes to `None`: a miss, never a
//! wrong answer. Later versions (validators for revalidation, stale windows) add a new
//! version number rather than changing this one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::key::CacheKey;

const MAGIC: &[u8; 2] = b"CG";
const VERSION: u8 = 1;
const CHECKSUM_LEN: usize = 16;

/// A stored response: what is needed to answer a request without the upstream.
#[derive(Debug, Clone)]
pub struct CachedResponse {
    /// The response status.
    pub status: StatusCode,
    /// End-to-end response headers as the upstream sent them (hop-by-hop removed).
    pub headers: HeaderMap,
    /// The whole response body.
    pub body: Bytes,
    /// When the response was received from the upstream, in milliseconds since the Unix epoch.
    pub stored_at_ms: u64,
    /// Freshness lifetime from `stored_at_ms`, in seconds.
    pub ttl_secs: u32,
    /// Tags (surrogate keys) for later purges.
    pub tags: Vec<String>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl CachedResponse {
    /// How long ago the response was stored, in whole seconds (the `Age` header, RFC 9111 §5.1).
    pub fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms) / 1000
    }

    /// Freshness left at `now_ms`; zero once the entry is stale.
    pub fn remaining_ttl(&self, now_ms: u64) -> Duration {
        let expires = self.stored_at_ms + u64::from(self.ttl_secs) * 1000;
        Duration::from_millis(expires.saturating_sub(now_ms))
    }

    /// Whether the entry is still fresh at `now_ms`.
    pub fn is_fresh(&self, now_ms: u64) -> bool {
        !self.remaining_ttl(now_ms).is_zero()
    }

    /// Approximate memory footprint in bytes: body, header names and values, tags and a
    /// fixed overhead. Used as the memory tier's weight.
    pub fn size_bytes(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 16)
            .sum();
        let tags: usize = self.tags.iter().map(|t| t.len() + 24).sum();
        self.body.len() + headers + tags + 128
    }

    /// Encodes the entry for `key` into an envelope (see the module docs).
    pub fn encode(&self, key: &CacheKey) -> Bytes {
        let mut b = BytesMut::with_capacity(self.size_bytes() + 64);
        b.put_u8(VERSION);
        b.put_slice(MAGIC);
        b.put_slice(&key.0);
        b.put_u64(self.stored_at_ms);
        b.put_u32(self.ttl_secs);
        b.put_u16(self.status.as_u16());
        let headers: Vec<_> = self.headers.iter().take(u16::MAX as usize).collect();
        b.put_u16(headers.len() as u16);
        for (name, value) in headers {
            b.put_u16(name.as_str().len() as u16);
            b.put_slice(name.as_str().as_bytes());
            b.put_u32(value.len() as u32);
            b.put_slice(value.as_bytes());
        }
        let tags: Vec<_> = self.tags.iter().take(u16::MAX as usize).collect();
        b.put_u16(tags.len() as u16);
        for tag in tags {
            let tag = &tag.as_bytes()[..tag.len().min(u16::MAX as usize)];
            b.put_u16(tag.len() as u16);
            b.put_slice(tag);
        }
        b.put_u32(self.body.len() as u32);
        b.put_slice(&self.body);
        let sum = blake3::hash(&b);
        b.put_slice(&sum.as_bytes()[..CHECKSUM_LEN]);
        b.freeze()
    }

    /// Decodes an envelope stored under `key`. Returns `None` for anything that is not a
    /// well-formed version-1 envelope for that same key (another version, a foreign key, a
    /// truncated or altered entry).
    pub fn decode(key: &CacheKey, data: &[u8]) -> Option<CachedResponse> {
        if data.len() < CHECKSUM_LEN {
            return None;
        }
        let (payload, sum) = data.split_at(data.len() - CHECKSUM_LEN);
        if &blake3::hash(payload).as_bytes()[..CHECKSUM_LEN] != sum {
            return None;
        }
        let mut r = payload;
        if get_u8(&mut r)? != VERSION || take(&mut r, 2)? != MAGIC {
            return None;
        }
        if take(&mut r, 32)? != key.0 {
            return None;
        }
        let stored_at_ms = get_u64(&mut r)?;
        let ttl_secs = get_u32(&mut r)?;
        let status = StatusCode::from_u16(get_u16(&mut r)?).ok()?;
        let n_headers = get_u16(&mut r)?;
        let mut headers = HeaderMap::with_capacity(n_headers as usize);
        for _ in 0..n_headers {
            let len = get_u16(&mut r)? as usize;
            let name = HeaderName::from_bytes(take(&mut r, len)?).ok()?;
            let len = get_u32(&mut r)? as usize;
            let value = HeaderValue::from_bytes(take(&mut r, len)?).ok()?;
            headers.append(name, value);
        }
        let n_tags = get_u16(&mut r)?;
        let mut tags = Vec::with_capacity(n_tags as usize);
        for _ in 0..n_tags {
            let len = get_u16(&mut r)? as usize;
            tags.push(String::from_utf8(take(&mut r, len)?.to_vec()).ok()?);
        }
        let len = get_u32(&mut r)? as usize;
        let body = Bytes::copy_from_slice(take(&mut r, len)?);
        if !r.is_empty() {
            return None;
        }
        Some(CachedResponse {
            status,
            headers,
            body,
            stored_at_ms,
            ttl_secs,
            tags,
        })
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

fn get_u8(r: &mut &[u8]) -> Option<u8> {
    (r.remaining() >= 1).then(|| r.get_u8())
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

    fn sample() -> CachedResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        CachedResponse {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"{\"ok\":true}"),
            stored_at_ms: 1_700_000_000_000,
            ttl_secs: 30,
            tags: vec!["natal".into()],
        }
    }

    #[test]
    fn round_trip() {
        let key = CacheKey([7; 32]);
        let e = sample();
        let d = CachedResponse::decode(&key, &e.encode(&key)).unwrap();
        assert_eq!(d.status, e.status);
        assert_eq!(d.headers, e.headers);
        assert_eq!(d.body, e.body);
        assert_eq!(d.tags, e.tags);
        assert_eq!((d.stored_at_ms, d.ttl_secs), (e.stored_at_ms, e.ttl_secs));
    }

    #[test]
    fn corrupt_or_foreign_is_none() {
        let key = CacheKey([7; 32]);
        let bytes = sample().encode(&key);
        assert!(CachedResponse::decode(&CacheKey([8; 32]), &bytes).is_none());
        for i in 0..bytes.len() {
            let mut bad = bytes.to_vec();
            bad[i] ^= 0x41;
            assert!(CachedResponse::decode(&key, &bad).is_none(), "flip at {i}");
        }
        for n in 0..bytes.len() {
            assert!(CachedResponse::decode(&key, &bytes[..n]).is_none());
        }
        assert!(CachedResponse::decode(&key, b"garbage").is_none());
    }

    #[test]
    fn unknown_version_is_none_even_with_a_good_checksum() {
        let key = CacheKey([7; 32]);
        let bytes = sample().encode(&key);
        let mut future = bytes[..bytes.len() - CHECKSUM_LEN].to_vec();
        future[0] = VERSION + 1;
        let sum = blake3::hash(&future);
        future.extend_from_slice(&sum.as_bytes()[..CHECKSUM_LEN]);
        assert!(CachedResponse::decode(&key, &future).is_none());
    }
}
