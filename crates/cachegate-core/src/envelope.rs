//! The envelope an entry travels in through Redis: versioned, authenticated, and sealed
//! by default.
//!
//! Layout of envelope version 2:
//!
//! ```text
//! version u8 = 2 | mode u8 | nonce [24] (sealed only) | payload | tag
//! ```
//!
//! Mode 1, *sealed* (the default): the payload is encrypted with XChaCha20-Poly1305
//! (RFC 8439 with a 24-byte random nonce) under a key derived from the secret; the
//! associated data is the version, the mode and the cache key, and the tag is Poly1305's
//! 16 bytes. Mode 0, *signed*: the payload is readable and the tag is a 32-byte keyed
//! BLAKE3 MAC over version, mode, cache key and payload.
//!
//! Either way, an envelope not written by a holder of the secret for this very cache key
//! — forged, copied from another key, altered, truncated, of another version — fails to
//! open: a miss, never a wrong answer. The version byte comes first so that a reader can
//! tell an unknown format before anything else. What the payload holds is up to the
//! stored type ([`crate::store::Storable`]).
//!
//! Speed: most envelopes are a few hundred bytes to a few KB, where Poly1305's AVX2
//! backend costs more to set up than it saves; this workspace builds with the portable one
//! (`--cfg poly1305_force_soft` in `.cargo/config.toml`; docs/benchmarks.md, "Sealing").

use bytes::{BufMut, Bytes, BytesMut};
use chacha20poly1305::aead::{Aead, AeadCore, AeadInPlace, KeyInit, OsRng, Payload};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

use crate::key::CacheKey;

const VERSION: u8 = 2;
const MODE_SIGNED: u8 = 0;
const MODE_SEALED: u8 = 1;
const NONCE_LEN: usize = 24;
const MAC_LEN: usize = 32;
/// The Poly1305 tag at the end of a sealed envelope.
const TAG_LEN: usize = 16;

/// The keys that authenticate (and by default encrypt) envelopes, derived from the
/// deployment's secret so that every replica holding it can read what the others wrote,
/// and nobody else can write what they will read.
#[derive(Clone)]
pub struct EnvelopeKeys {
    cipher: XChaCha20Poly1305,
    mac_key: [u8; 32],
    seal: bool,
}

impl EnvelopeKeys {
    /// Keys derived from `secret` (any length) with BLAKE3's key derivation; `seal` chooses
    /// mode 1 (encrypted) over mode 0 (signed) for new envelopes. Both modes are opened.
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

    /// Wraps `payload` for `key` into an envelope, sealed or signed as these keys say.
    pub fn seal(&self, key: &CacheKey, payload: &[u8]) -> Bytes {
        let mode = if self.seal { MODE_SEALED } else { MODE_SIGNED };
        let header = [VERSION, mode];
        let mut out = BytesMut::with_capacity(payload.len() + 2 + NONCE_LEN + MAC_LEN);
        out.put_slice(&header);
        if self.seal {
            let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
            let aad = associated_data(&header, key);
            let sealed = self
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
            let mac = self.mac(key, &header, payload);
            out.put_slice(payload);
            out.put_slice(&mac);
        }
        out.freeze()
    }

    /// The payload of an envelope stored under `key`. `None` for anything that is not a
    /// well-formed version-2 envelope written with these keys for that same key (another
    /// version, a foreign or copied envelope, a forged, truncated or altered one).
    pub fn open(&self, key: &CacheKey, data: &[u8]) -> Option<Vec<u8>> {
        let mut data = data.to_vec();
        self.open_in_place(key, &mut data).map(<[u8]>::to_vec)
    }

    /// [`EnvelopeKeys::open`] without a copy: the payload is decrypted (or checked) where
    /// it lies in `data`, and the part of `data` that holds it is returned. `None` as for
    /// `open`; what `data` holds then is unspecified.
    pub fn open_in_place<'a>(&self, key: &CacheKey, data: &'a mut [u8]) -> Option<&'a [u8]> {
        let header: [u8; 2] = data.get(..2)?.try_into().ok()?;
        if header[0] != VERSION {
            return None;
        }
        match header[1] {
            MODE_SEALED => {
                let tag_at = data.len().checked_sub(TAG_LEN)?;
                if tag_at < 2 + NONCE_LEN {
                    return None;
                }
                let (head, tag) = data.split_at_mut(tag_at);
                let (nonce, sealed) = head[2..].split_at_mut(NONCE_LEN);
                let aad = associated_data(&header, key);
                self.cipher
                    .decrypt_in_place_detached(
                        XNonce::from_slice(nonce),
                        &aad,
                        sealed,
                        Tag::from_slice(tag),
                    )
                    .ok()?;
                Some(&data[2 + NONCE_LEN..tag_at])
            }
            MODE_SIGNED => {
                let split = data.len().checked_sub(MAC_LEN).filter(|&at| at >= 2)?;
                let (payload, mac) = data[2..].split_at(split - 2);
                let expected = blake3::Hash::from_bytes(self.mac(key, &header, payload));
                let mac: [u8; MAC_LEN] = mac.try_into().ok()?;
                // Constant-time comparison: blake3::Hash's PartialEq is.
                if expected != blake3::Hash::from_bytes(mac) {
                    return None;
                }
                Some(&data[2..split])
            }
            _ => None,
        }
    }
}

fn associated_data(mode_header: &[u8], key: &CacheKey) -> [u8; 34] {
    let mut aad = [0u8; 34];
    aad[..2].copy_from_slice(mode_header);
    aad[2..].copy_from_slice(&key.0);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAYLOAD: &[u8] = b"{\"chart\":\"natal\",\"ok\":true}";

    fn keys(seal: bool) -> EnvelopeKeys {
        EnvelopeKeys::new(b"secret", seal)
    }

    #[test]
    fn round_trip_in_both_modes() {
        let key = CacheKey([7; 32]);
        for seal in [true, false] {
            let bytes = keys(seal).seal(&key, PAYLOAD);
            // Either mode is opened, whichever the writer chose.
            assert_eq!(keys(!seal).open(&key, &bytes).unwrap(), PAYLOAD);
        }
    }

    #[test]
    fn sealed_envelopes_do_not_show_the_payload() {
        let key = CacheKey([7; 32]);
        let sealed = keys(true).seal(&key, PAYLOAD);
        assert!(!sealed.windows(4).any(|w| w == b"true"));
        let signed = keys(false).seal(&key, PAYLOAD);
        assert!(signed.windows(4).any(|w| w == b"true"));
    }

    #[test]
    fn forged_copied_altered_or_truncated_is_none() {
        let key = CacheKey([7; 32]);
        for seal in [true, false] {
            let k = keys(seal);
            let bytes = k.seal(&key, PAYLOAD);
            assert!(k.open(&CacheKey([8; 32]), &bytes).is_none(), "copied");
            let other_secret = EnvelopeKeys::new(b"other", seal);
            assert!(other_secret.open(&key, &bytes).is_none(), "forged");
            for i in 0..bytes.len() {
                let mut bad = bytes.to_vec();
                bad[i] ^= 0x41;
                assert!(k.open(&key, &bad).is_none(), "flip at {i}");
            }
            for n in 0..bytes.len() {
                assert!(k.open(&key, &bytes[..n]).is_none());
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_payload_opens_in_place_to_itself_and_only_for_its_key(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            key in proptest::prelude::any::<[u8; 32]>(),
            seal in proptest::prelude::any::<bool>(),
        ) {
            let k = keys(seal);
            let envelope = k.seal(&CacheKey(key), &payload);
            let mut buf = envelope.to_vec();
            proptest::prop_assert_eq!(k.open_in_place(&CacheKey(key), &mut buf), Some(&payload[..]));
            let mut other = key;
            other[0] ^= 1;
            let mut buf = envelope.to_vec();
            proptest::prop_assert_eq!(k.open_in_place(&CacheKey(other), &mut buf), None);
        }

        #[test]
        fn any_bytes_open_to_none_never_a_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), mode in 0u8..3) {
            let mut data = data;
            if data.len() >= 2 {
                data[0] = VERSION;
                data[1] = mode;
            }
            for seal in [true, false] {
                proptest::prop_assert!(keys(seal).open(&CacheKey([1; 32]), &data).is_none());
            }
        }
    }
}
