//! How the library's values are turned into bytes for Redis: a [`Codec`], chosen by type
//! parameter on [`crate::Cache`] and swappable.
//!
//! Every encoded value starts with two bytes, the codec's [`Codec::ID`] and its
//! [`Codec::VERSION`]; a value written by another codec, or by another version of this one,
//! is a miss (recomputed and overwritten), never a wrong answer or an error.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a value could not be encoded or decoded.
#[derive(Debug)]
pub struct CodecError(pub String);

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "codec: {}", self.0)
    }
}

impl std::error::Error for CodecError {}

/// A binary format for values. Implementations are unit types: the format is chosen at
/// compile time (`Cache<V, C>`), with no per-call dispatch.
pub trait Codec: Send + Sync + 'static {
    /// Identifies the format in stored values (e.g. 1 for [`Postcard`]).
    const ID: u8;
    /// The version of the format's layout; raise it when stored values change meaning.
    const VERSION: u8;

    /// Appends `value`'s encoding to `out`.
    ///
    /// Errors: [`CodecError`] when the value cannot be represented (a map with non-string
    /// keys in a self-describing format, for instance).
    fn encode<V: Serialize>(value: &V, out: &mut Vec<u8>) -> Result<(), CodecError>;

    /// Decodes a value from exactly `bytes`.
    ///
    /// Errors: [`CodecError`] for bytes that are not an encoding of a `V`.
    fn decode<V: DeserializeOwned>(bytes: &[u8]) -> Result<V, CodecError>;
}

/// [postcard](https://docs.rs/postcard) 1.x: a compact, non-self-describing binary format
/// (varint integers, length-prefixed strings and sequences), `ID` 1, `VERSION` 1. The
/// default codec. Values must keep their Rust type's field order to be read back: a changed
/// type should come with a new namespace or a raised version.
#[derive(Debug, Clone, Copy, Default)]
pub struct Postcard;

impl Codec for Postcard {
    const ID: u8 = 1;
    const VERSION: u8 = 1;

    fn encode<V: Serialize>(value: &V, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let encoded = postcard::to_extend(value, std::mem::take(out))
            .map_err(|e| CodecError(e.to_string()))?;
        *out = encoded;
        Ok(())
    }

    fn decode<V: DeserializeOwned>(bytes: &[u8]) -> Result<V, CodecError> {
        match postcard::take_from_bytes(bytes) {
            Ok((value, [])) => Ok(value),
            Ok(_) => Err(CodecError("trailing bytes".into())),
            Err(e) => Err(CodecError(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Chart {
        sun: String,
        degrees: Vec<f64>,
    }

    #[test]
    fn round_trip_and_rejects_trailing_or_foreign_bytes() {
        let chart = Chart {
            sun: "Sagittarius".into(),
            degrees: vec![257.9, 12.25],
        };
        let mut out = vec![0xAA];
        Postcard::encode(&chart, &mut out).unwrap();
        assert_eq!(out[0], 0xAA, "appends");
        assert_eq!(Postcard::decode::<Chart>(&out[1..]).unwrap(), chart);
        let mut longer = out[1..].to_vec();
        longer.push(0);
        assert!(Postcard::decode::<Chart>(&longer).is_err());
        assert!(Postcard::decode::<Chart>(&[0xff; 3]).is_err());
    }
}
