//! The stored entry and its versioned, authenticated binary envelope.
//!
//! Layout of envelope version 2 (integers big-endian):
//!
//! ```text
//! version u8 = 2 | mode u8 | nonce [24] (sealed only) | payload | tag
//! payload = stored_at_ms u64 | ttl_secs u32 | status u16
//!         | n_headers u16 | { name_len u16 | name | value_len u32 | value }*
//!         | n_tags u16 | { tag_len u16 | tag }* | body_len u32 | body
//! ```
//!
//! Mode 1, *sealed* (the default): the payload is encrypted with XChaCha20-Poly1305
//! (RFC 8439 with a 24-byte random nonce) under a key derived from `key_secret`; the
//! associated data is the version, the mode and the cache key, and the tag is Poly1305's
//! 16 bytes. Mode 0, *signed*: the payload is readable and the tag is a 32-byte keyed BLAKE3
//! MAC over version, mode, cache key and payload.
//!
//! Either way, an entry not written by a holder of `key_secret` for this very cache key —
//! forged, copied from another key, altered, truncated, of another version — fails
//! authentication and decodes to `None`: a miss, never a wrong answer. The version byte
//! comes first so that a reader can tell an unknown format before anything else.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::key::CacheKey;

const VERSION: u8 = 2;
const MODE_SIGNED: u8 = 0;
const MODE_SEALED: u8 = 1;
const NONCE_LEN: usize = 24;
const MAC_LEN: usize = 32;

/// The keys that authenticate (and by default encrypt) envelopes, derived from the
/// deployment's `key_secret` so that every replica holding it can read what the others
/// wrote, and nobody else can write what they will read.
#[derive(Clone)]
pub struct EnvelopeKeys {
    cipher: XChaCha20Poly1305,
    mac_key: [u8; 32],
    seal: bool,
}

impl EnvelopeKeys {
    /// Keys derived from `secret` (any length) with BLAKE3's key derivation; `seal` chooses
    /// mode 1 (encrypted) over mode 0 (signed) for new envelopes. Both modes are read.
    pub fn new(secret: &[u8], seal: bool) -> Self {
        let aead_key = blake3::derive_key("cachegate 2026-11 envelope seal v2", secret);
        EnvelopeKeys {
            cipher: XChaCha20Poly1305::new(&aead_key.into()),
            mac_key: blake3::derive_key("cachegate 2026-11 envelope mac v2", secret),
            seal,
        }
    }

    fn mac(&self, key: &CacheKey, mode_header: &[u8], payload: &[u8]) -> [u8; MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key);
        h.update(mode_header);
        h.update(&key.0);
        h.update(payload);
        *h.finalize().as_bytes()
    }
}

fn associated_data(mode_header: &[u8], key: &CacheKey) -> [u8; 34] {
    let mut aad = [0u8; 34];
    aad[..2].copy_from_slice(mode_header);
    aad[2..].copy_from_slice(&key.0);
    aad
}

/// A stored response: what is needed to answer a request without the upstream.
///
/// Compact by construction: the whole entry is one exact-size, reference-counted buffer
/// laid out as the envelope's payload (see the module docs: `stored_at_ms | ttl_secs |
/// status | header block | tags | body`), so an entry costs one allocation, cloning it is
/// one atomic increment, and nothing in it keeps a connection's read buffer or spare
/// capacity alive. [`CachedResponse::headers`] and [`CachedResponse::body`] hand out
/// views that share the buffer.
#[derive(Debug, Clone)]
pub struct CachedResponse {
    /// The payload: fields at fixed offsets, then the header block, tags and body.
    data: Arc<[u8]>,
    /// Where the tag list starts in `data`.
    tags_at: u32,
    /// Where the body starts in `data`.
    body_at: u32,
}

/// Offsets of the fixed fields in the payload.
const STORED_AT: usize = 0;
const TTL: usize = 8;
const STATUS: usize = 12;
const BLOCK: usize = 14;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Bytes the memory tier really spends on one entry besides its buffer: the cache's slot
/// (the 32-byte key, the buffer's pointer and length, the eviction policy's state), its
/// hash-table slot, the buffer's reference counts and the allocator's rounding, with the
/// slack of tables that grow by doubling. Measured through the proxy with
/// `bench/memory.sh` (real bytes per entry minus the buffer: 130 B at 1 M entries, 158 B
/// at 100 k), so that `memory_max_bytes` bounds the process's real memory.
pub const ENTRY_OVERHEAD_BYTES: usize = 160;

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
    /// An entry for a response with `status`, `headers` and `body`, received at
    /// `stored_at_ms` (milliseconds since the Unix epoch) and fresh for `ttl_secs`, tagged
    /// with `tags` for later purges. At most `u16::MAX` headers and tags are kept; a body
    /// or header value over 4 GiB is cut (the proxy never stores one: routes cap bodies).
    pub fn new<T: AsRef<str>>(
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        stored_at_ms: u64,
        ttl_secs: u32,
        tags: &[T],
    ) -> Self {
        let block: usize = 2 + headers
            .iter()
            .map(|(n, v)| 6 + n.as_str().len() + v.len())
            .sum::<usize>();
        let tag_bytes: usize = 2 + tags.iter().map(|t| 2 + t.as_ref().len()).sum::<usize>();
        let mut b = BytesMut::with_capacity(BLOCK + block + tag_bytes + 4 + body.len());
        b.put_u64(stored_at_ms);
        b.put_u32(ttl_secs);
        b.put_u16(status.as_u16());
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

    /// When the response was received from the upstream, in milliseconds since the Unix
    /// epoch.
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

    /// Whether `self` and `other` are the same stored entry (not merely equal ones).
    pub fn is_same(&self, other: &CachedResponse) -> bool {
        Arc::ptr_eq(&self.data, &other.data)
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
    /// values share the entry's buffer.
    pub fn headers(&self) -> HeaderMap {
        self.headers_in(&self.shared())
    }

    fn headers_in(&self, shared: &Bytes) -> HeaderMap {
        let mut r = &self.data[BLOCK..self.tags_at as usize];
        let n = get_u16(&mut r).unwrap_or(0);
        let mut headers = HeaderMap::with_capacity(usize::from(n).min(64));
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

    /// How long ago the response was stored, in whole seconds (the `Age` header, RFC 9111 §5.1).
    pub fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms()) / 1000
    }

    /// Freshness left at `now_ms`; zero once the entry is stale.
    pub fn remaining_ttl(&self, now_ms: u64) -> Duration {
        let expires = self.stored_at_ms() + u64::from(self.ttl_secs()) * 1000;
        Duration::from_millis(expires.saturating_sub(now_ms))
    }

    /// Whether the entry is still fresh at `now_ms`.
    pub fn is_fresh(&self, now_ms: u64) -> bool {
        !self.remaining_ttl(now_ms).is_zero()
    }

    /// The memory this entry costs in the memory tier, in bytes: its buffer (fields,
    /// headers, tags and body) and the fixed per-entry overhead ([`ENTRY_OVERHEAD_BYTES`]).
    /// Used as the memory tier's weight, so that `memory_max_bytes` bounds real memory.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + ENTRY_OVERHEAD_BYTES
    }

    /// Encodes the entry for `key` into an authenticated envelope (see the module docs),
    /// sealed or signed as `keys` say.
    pub fn encode(&self, key: &CacheKey, keys: &EnvelopeKeys) -> Bytes {
        let payload = &self.data[..];
        let mode = if keys.seal { MODE_SEALED } else { MODE_SIGNED };
        let header = [VERSION, mode];
        let mut out = BytesMut::with_capacity(payload.len() + 2 + NONCE_LEN + MAC_LEN);
        out.put_slice(&header);
        if keys.seal {
            let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
            let aad = associated_data(&header, key);
            let sealed = keys
                .cipher
                .encrypt(
                    &nonce,
                    Payload {
                        msg: payload,
                        aad: &aad,
                    },
                )
                .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
            out.put_slice(&nonce);
            out.put_slice(&sealed);
        } else {
            let mac = keys.mac(key, &header, payload);
            out.put_slice(payload);
            out.put_slice(&mac);
        }
        out.freeze()
    }

    /// Decodes an envelope stored under `key`. Returns `None` for anything that is not a
    /// well-formed version-2 envelope written with these keys for that same key (another
    /// version, a foreign or copied entry, a forged, truncated or altered one).
    pub fn decode(key: &CacheKey, data: &[u8], keys: &EnvelopeKeys) -> Option<CachedResponse> {
        let (header, rest) = (data.get(..2)?, data.get(2..)?);
        if header[0] != VERSION {
            return None;
        }
        match header[1] {
            MODE_SEALED => {
                let (nonce, sealed) = (rest.get(..NONCE_LEN)?, rest.get(NONCE_LEN..)?);
                let aad = associated_data(header, key);
                let payload = keys
                    .cipher
                    .decrypt(
                        XNonce::from_slice(nonce),
                        Payload {
                            msg: sealed,
                            aad: &aad,
                        },
                    )
                    .ok()?;
                Self::decode_payload(&payload)
            }
            MODE_SIGNED => {
                let split = rest.len().checked_sub(MAC_LEN)?;
                let (payload, mac) = rest.split_at(split);
                let expected = blake3::Hash::from_bytes(keys.mac(key, header, payload));
                let mac: [u8; MAC_LEN] = mac.try_into().ok()?;
                // Constant-time comparison: blake3::Hash's PartialEq is.
                if expected != blake3::Hash::from_bytes(mac) {
                    return None;
                }
                Self::decode_payload(payload)
            }
            _ => None,
        }
    }

    /// Checks a payload's structure (every header, tag and length) and makes the entry.
    fn decode_payload(payload: &[u8]) -> Option<CachedResponse> {
        let r = &mut &payload[..];
        let _stored_at_ms = get_u64(r)?;
        let _ttl_secs = get_u32(r)?;
        StatusCode::from_u16(get_u16(r)?).ok()?;
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
            30,
            &tags,
        )
    }

    fn keys(seal: bool) -> EnvelopeKeys {
        EnvelopeKeys::new(b"secret", seal)
    }

    #[test]
    fn round_trip_in_both_modes() {
        let key = CacheKey([7; 32]);
        let e = sample();
        for seal in [true, false] {
            let bytes = e.encode(&key, &keys(seal));
            // Either mode is read, whichever the writer chose.
            let d = CachedResponse::decode(&key, &bytes, &keys(!seal)).unwrap();
            assert_eq!(d.status(), e.status());
            assert_eq!(d.headers(), e.headers());
            assert_eq!(d.headers()["content-type"], "application/json");
            assert_eq!(d.headers().get_all("x-multi").iter().count(), 2);
            assert_eq!(d.body(), e.body());
            assert!(d.tags().eq(e.tags()));
            assert_eq!(d.tags().collect::<Vec<_>>(), ["natal"]);
            assert_eq!(
                (d.stored_at_ms(), d.ttl_secs()),
                (e.stored_at_ms(), e.ttl_secs())
            );
            assert_eq!((d.stored_at_ms(), d.ttl_secs()), (1_700_000_000_000, 30));
        }
    }

    #[test]
    fn sealed_envelopes_do_not_show_the_body() {
        let bytes = sample().encode(&CacheKey([7; 32]), &keys(true));
        assert!(!bytes.windows(4).any(|w| w == b"true"));
        let signed = sample().encode(&CacheKey([7; 32]), &keys(false));
        assert!(signed.windows(4).any(|w| w == b"true"));
    }

    #[test]
    fn forged_copied_altered_or_truncated_is_none() {
        let key = CacheKey([7; 32]);
        for seal in [true, false] {
            let k = keys(seal);
            let bytes = sample().encode(&key, &k);
            assert!(
                CachedResponse::decode(&CacheKey([8; 32]), &bytes, &k).is_none(),
                "copied"
            );
            let other_secret = EnvelopeKeys::new(b"other", seal);
            assert!(
                CachedResponse::decode(&key, &bytes, &other_secret).is_none(),
                "forged"
            );
            for i in 0..bytes.len() {
                let mut bad = bytes.to_vec();
                bad[i] ^= 0x41;
                assert!(
                    CachedResponse::decode(&key, &bad, &k).is_none(),
                    "flip at {i}"
                );
            }
            for n in 0..bytes.len() {
                assert!(CachedResponse::decode(&key, &bytes[..n], &k).is_none());
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_to_a_miss_never_a_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), mode in 0u8..3) {
            let mut data = data;
            if data.len() >= 2 {
                data[0] = VERSION;
                data[1] = mode;
            }
            for seal in [true, false] {
                proptest::prop_assert!(CachedResponse::decode(&CacheKey([1; 32]), &data, &keys(seal)).is_none());
            }
        }

        #[test]
        fn any_payload_after_a_valid_mac_never_panics(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            // Authenticated but malformed payloads (a writer with the secret and a bug).
            let k = keys(false);
            let key = CacheKey([1; 32]);
            let header = [VERSION, MODE_SIGNED];
            let mut data = header.to_vec();
            data.extend_from_slice(&payload);
            data.extend_from_slice(&k.mac(&key, &header, &payload));
            let _ = CachedResponse::decode(&key, &data, &k);
        }
    }
}
