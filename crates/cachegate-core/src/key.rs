//! Cache keys: 32-byte keyed BLAKE3 hashes under a deployment secret.
//!
//! A key is built from length-prefixed fields ([`KeyFields`]), the first of which is
//! always the namespace, and hashed once under a key derived from the secret. Inputs such
//! as birth dates have little entropy, so an unkeyed hash could be reversed by guessing;
//! a keyed one cannot without the secret. No caller data is kept in a key.

use std::fmt;

/// A cache key: 32 bytes of keyed BLAKE3.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Lower-case hex of the whole key (64 characters).
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        self.push_hex(&mut s);
        s
    }

    /// Appends [`CacheKey::to_hex`] to `s` (no allocation when `s` has room).
    pub fn push_hex(&self, s: &mut String) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for b in self.0 {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
        }
    }

    /// The first 12 hex characters, enough to tell keys apart in logs.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }

    /// A bucket from 0 to 99 derived from the key, for percentage rollouts.
    pub fn rollout_bucket(&self) -> u8 {
        (u16::from_be_bytes([self.0[0], self.0[1]]) % 100) as u8
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.short())
    }
}

/// Builds [`CacheKey`]s under one secret and namespace. Cloning is cheap.
#[derive(Clone)]
pub struct KeyBuilder {
    secret: [u8; 32],
    namespace: String,
}

/// The fields of one key, each written with a 4-byte length prefix so that no two
/// different field lists serialize alike. Start with [`KeyBuilder::fields`] (which writes
/// the namespace), end with [`KeyBuilder::finish`].
#[derive(Debug, Clone, Default)]
pub struct KeyFields {
    buf: Vec<u8>,
}

impl KeyFields {
    /// Appends one field.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(bytes);
    }
}

/// The second field of a key built from a caller's string ([`KeyBuilder::key_for`]): NUL is
/// not a token character, so it never equals an HTTP method, the second field of the
/// proxy's keys.
const STRING_KEY_DOMAIN: &[u8] = b"\0string";

impl KeyBuilder {
    /// A builder whose hash key is derived from `secret` (any length) with BLAKE3's key
    /// derivation, so that the same secret gives the same keys on every replica; every key
    /// starts with `namespace`.
    pub fn new(secret: &[u8], namespace: &str) -> Self {
        KeyBuilder {
            secret: blake3::derive_key("cachegate 2026-11 cache key v1", secret),
            namespace: namespace.to_string(),
        }
    }

    /// The namespace every key starts with.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// New key fields holding the namespace, with room for `capacity` more bytes.
    pub fn fields(&self, capacity: usize) -> KeyFields {
        let mut fields = KeyFields {
            buf: Vec::with_capacity(capacity + self.namespace.len() + 4),
        };
        fields.push(self.namespace.as_bytes());
        fields
    }

    /// Hashes `fields` into a key (one keyed BLAKE3 pass over the serialized fields).
    pub fn finish(&self, fields: &KeyFields) -> CacheKey {
        CacheKey(*blake3::keyed_hash(&self.secret, &fields.buf).as_bytes())
    }

    /// The key for a caller's string key (the library API): namespace, a domain marker and
    /// the string. Different strings give different keys; no key equals one of the
    /// proxy's request keys.
    pub fn key_for(&self, key: &str) -> CacheKey {
        let mut fields = self.fields(key.len() + 16);
        fields.push(STRING_KEY_DOMAIN);
        fields.push(key.as_bytes());
        self.finish(&fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_secret_namespace_and_every_field() {
        let a = KeyBuilder::new(b"secret", "ns");
        assert_eq!(
            a.key_for("x"),
            KeyBuilder::new(b"secret", "ns").key_for("x")
        );
        assert_ne!(a.key_for("x"), KeyBuilder::new(b"other", "ns").key_for("x"));
        assert_ne!(
            a.key_for("x"),
            KeyBuilder::new(b"secret", "ns2").key_for("x")
        );
        assert_ne!(a.key_for("x"), a.key_for("y"));
        // Field boundaries are part of the key.
        let mut ab_c = a.fields(0);
        ab_c.push(b"ab");
        ab_c.push(b"c");
        let mut a_bc = a.fields(0);
        a_bc.push(b"a");
        a_bc.push(b"bc");
        assert_ne!(a.finish(&ab_c), a.finish(&a_bc));
    }

    #[test]
    fn hex_and_short_forms() {
        let k = CacheKey([0xab; 32]);
        assert_eq!(k.to_hex().len(), 64);
        assert_eq!(k.short(), "abababababab");
        assert!(k.rollout_bucket() < 100);
        let mut counting = [0u8; 32];
        for (i, b) in counting.iter_mut().enumerate() {
            *b = (i as u8) * 8 + 7;
        }
        let expected: String = counting.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(CacheKey(counting).to_hex(), expected);
    }
}
