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

/// Bytes the memory tier spends on one entry besides its headers, body and tags: the
/// moka node with its key and timer, the `Arc`, the entry struct and the header map's own
/// tables. Measured with `bench/memory.sh`.
pub const ENTRY_OVERHEAD_BYTES: usize = 360;

/// Bytes one header costs in a header map besides its name and value.
const HEADER_OVERHEAD_BYTES: usize = 48;

impl CachedResponse {
    /// An entry that owns compact copies of `headers` and `body`: nothing in it keeps a
    /// connection's read buffer or spare capacity alive.
    pub fn compact(
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        stored_at_ms: u64,
        ttl_secs: u32,
        tags: Vec<String>,
    ) -> Self {
        let mut owned = HeaderMap::with_capacity(headers.len());
        for (name, value) in headers {
            let name =
                HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone());
            let value = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            owned.append(name, value);
        }
        let body = if body.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&body)
        };
        CachedResponse {
            status,
            headers: owned,
            body,
            stored_at_ms,
            ttl_secs,
            tags,
        }
    }

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

    /// The memory this entry costs in the memory tier, in bytes: body, header names and
    /// values, tags, and the fixed per-entry overhead ([`ENTRY_OVERHEAD_BYTES`]). Used as
    /// the memory tier's weight, so that `memory_max_bytes` bounds real memory.
    pub fn size_bytes(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + HEADER_OVERHEAD_BYTES)
            .sum();
        let tags: usize = self.tags.iter().map(|t| t.len() + 24).sum();
        self.body.len() + headers + tags + ENTRY_OVERHEAD_BYTES
    }

    fn encode_payload(&self, b: &mut BytesMut) {
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
    }

    /// Encodes the entry for `key` into an authenticated envelope (see the module docs),
    /// sealed or signed as `keys` say.
    pub fn encode(&self, key: &CacheKey, keys: &EnvelopeKeys) -> Bytes {
        let mut payload = BytesMut::with_capacity(self.size_bytes() + 64);
        self.encode_payload(&mut payload);
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
                        msg: &payload,
                        aad: &aad,
                    },
                )
                .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
            out.put_slice(&nonce);
            out.put_slice(&sealed);
        } else {
            let mac = keys.mac(key, &header, &payload);
            out.put_slice(&payload);
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

    fn decode_payload(mut r: &[u8]) -> Option<CachedResponse> {
        let r = &mut r;
        let stored_at_ms = get_u64(r)?;
        let ttl_secs = get_u32(r)?;
        let status = StatusCode::from_u16(get_u16(r)?).ok()?;
        let n_headers = get_u16(r)?;
        // Capacities are capped: the counts are input, and HeaderMap panics past its size.
        let mut headers = HeaderMap::with_capacity(usize::from(n_headers).min(64));
        for _ in 0..n_headers {
            let len = get_u16(r)? as usize;
            let name = HeaderName::from_bytes(take(r, len)?).ok()?;
            let len = get_u32(r)? as usize;
            let value = HeaderValue::from_bytes(take(r, len)?).ok()?;
            headers.try_append(name, value).ok()?;
        }
        let n_tags = get_u16(r)?;
        let mut tags = Vec::with_capacity(usize::from(n_tags).min(64));
        for _ in 0..n_tags {
            let len = get_u16(r)? as usize;
            tags.push(String::from_utf8(take(r, len)?.to_vec()).ok()?);
        }
        let len = get_u32(r)? as usize;
        let body = Bytes::copy_from_slice(take(r, len)?);
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
            assert_eq!(d.status, e.status);
            assert_eq!(d.headers, e.headers);
            assert_eq!(d.body, e.body);
            assert_eq!(d.tags, e.tags);
            assert_eq!((d.stored_at_ms, d.ttl_secs), (e.stored_at_ms, e.ttl_secs));
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
