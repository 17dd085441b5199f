//! The canonical form of a JSON request body: RFC 8785 (JCS) over I-JSON (RFC 7493).
//!
//! RFC 8785 is defined for I-JSON only. Two bodies outside it can differ and still get
//! one canonical form: duplicate member names (`{"date":A,"date":B}` and `{"date":B}`
//! both become `{"date":B}`), and numbers that an IEEE 754 double cannot hold
//! (`9007199254740993` becomes `9007199254740992`). Such bodies are refused
//! ([`BodyKeyError::NotIJson`]), so the proxy passes them through uncached instead of
//! answering one with the response to the other.
//!
//! RFC 8785 also spells `1`, `1.0` and `1e0` alike, as ECMAScript (with one number type)
//! reads them. Typed upstreams do not: Python, Java or Go read `1` as an integer and `1.0`
//! as a float, and may answer them differently (`"hour": 1.0` echoed, a strict integer
//! field refusing it). So a number spelled with a fraction or exponent whose value is
//! whole is keyed as a float: the canonical form writes it as the string
//! `"\u0000cachegate:float:1.0"` (the double's shortest spelling, so `-0.0` is not `0.0`),
//! which no client body may hold (such a body is refused). Other numbers need no mark: an
//! integer spelling is an integer to every reader, and a value with a fraction is a float
//! to every reader. Refused as well: `-0` (an integer zero to Python, a negative zero to
//! JavaScript) and integers beyond 64 bits (serde_json reads them as doubles, which would
//! give `18446744073709552000` the key of `1.8446744073709552e19`).

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, header};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Why a request body could not enter a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKeyError {
    /// The body is not JSON.
    MalformedJson,
    /// The body is JSON but not I-JSON (RFC 7493): a duplicate member name, or a number
    /// that does not survive a round trip through an IEEE 754 double; or it holds `-0`, an
    /// integer beyond 64 bits or a string the canonical form reserves for floats (see the
    /// module docs).
    NotIJson,
}

/// Canonicalizes a JSON body by RFC 8785 (JCS): object members sorted, no insignificant
/// whitespace, numbers spelled as ECMAScript does, a whole number spelled as a float
/// (`1.0`, `1e2`) marked as one (see the module docs).
///
/// Errors: [`BodyKeyError::MalformedJson`] when `body` is not JSON,
/// [`BodyKeyError::NotIJson`] when it is not I-JSON (RFC 7493 §2.2, §2.3).
///
/// ```
/// use cachegate::key::{BodyKeyError, canonical_json};
/// let a = canonical_json(br#"{"lat": 51.50, "name": "Ada"}"#).unwrap();
/// let b = canonical_json(br#"{"name":"Ada","lat":5.15e1}"#).unwrap();
/// assert_eq!(a, b);
/// assert_eq!(a, br#"{"lat":51.5,"name":"Ada"}"#);
/// assert_ne!(canonical_json(b"[1]"), canonical_json(b"[1.0]"));
/// assert_eq!(canonical_json(b"[1.0]"), canonical_json(b"[1e0]"));
/// assert_eq!(canonical_json(b"[9007199254740993]"), Err(BodyKeyError::NotIJson));
/// assert_eq!(canonical_json(br#"{"a":1,"a":2}"#), Err(BodyKeyError::NotIJson));
/// ```
pub fn canonical_json(body: &[u8]) -> Result<Vec<u8>, BodyKeyError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = match IJson::deserialize(&mut de).and_then(|v| de.end().map(|()| v)) {
        Ok(IJson(v)) => v,
        Err(e) if e.to_string().starts_with(DUPLICATE) || e.to_string().starts_with(RESERVED) => {
            return Err(BodyKeyError::NotIJson);
        }
        Err(_) => return Err(BodyKeyError::MalformedJson),
    };
    // `-0`: an integer zero to Python or Java, a negative zero to JavaScript. An integer
    // beyond 64 bits: read as a double, like its exponent spelling.
    let integer_beyond_64_bits = |token: &str| {
        !token.contains(['.', 'e', 'E'])
            && token.parse::<i64>().is_err()
            && token.parse::<u64>().is_err()
    };
    if !number_tokens(body)
        .all(|token| token != "-0" && !integer_beyond_64_bits(token) && survives_double(token))
    {
        return Err(BodyKeyError::NotIJson);
    }
    serde_jcs::to_vec(&value).map_err(|_| BodyKeyError::NotIJson)
}

/// Canonical forms of recently seen JSON bodies ([`canonical_json`]), by the BLAKE3 hash
/// of their bytes: a client that sends the same bytes again (the hits of a body-keyed
/// route) skips the parse and the re-serialization. Only bodies that canonicalize are
/// remembered, bodies of up to [`CanonicalBodies::MAX_BODY_BYTES`] (whose canonical form
/// can be longer: numbers are spelled out) and about `max_bytes` in all, counting each
/// canonical form with its slot (quick_cache's eviction policy); a failure is computed
/// again.
///
/// ```
/// use cachegate::key::{CanonicalBodies, canonical_json};
/// let memo = CanonicalBodies::new(1 << 20);
/// let body = br#"{"name": "Ada", "lat": 51.50}"#;
/// assert_eq!(&*memo.canonical(body).unwrap(), canonical_json(body).unwrap().as_slice());
/// assert_eq!(&*memo.canonical(body).unwrap(), br#"{"lat":51.5,"name":"Ada"}"#);
/// ```
pub struct CanonicalBodies {
    memo: quick_cache::sync::Cache<[u8; 32], Arc<[u8]>, CanonicalWeighter>,
}

#[derive(Clone)]
struct CanonicalWeighter;

impl quick_cache::Weighter<[u8; 32], Arc<[u8]>> for CanonicalWeighter {
    fn weight(&self, _: &[u8; 32], canonical: &Arc<[u8]>) -> u64 {
        // Besides the bytes: the 32-byte hash, the pointer, the shared buffer's counts, the
        // table slot and the allocator's rounding.
        canonical.len() as u64 + 112
    }
}

impl CanonicalBodies {
    /// Bodies longer than this are canonicalized every time: large bodies are rarely
    /// sent twice byte for byte, and would crowd out the small ones.
    pub const MAX_BODY_BYTES: usize = 8 * 1024;

    /// A memo holding at most about `max_bytes` of canonical bodies.
    pub fn new(max_bytes: u64) -> Self {
        let max_bytes = max_bytes.max(1024);
        CanonicalBodies {
            memo: quick_cache::sync::Cache::with_weighter(
                (max_bytes / 256).max(16) as usize,
                max_bytes,
                CanonicalWeighter,
            ),
        }
    }

    /// `body`'s canonical form: [`canonical_json`]'s, remembered for the next time.
    ///
    /// Errors: as [`canonical_json`].
    pub fn canonical(&self, body: &[u8]) -> Result<Arc<[u8]>, BodyKeyError> {
        if body.len() > Self::MAX_BODY_BYTES {
            return canonical_json(body).map(Arc::from);
        }
        let digest = *blake3::hash(body).as_bytes();
        if let Some(canonical) = self.memo.get(&digest) {
            return Ok(canonical);
        }
        let canonical: Arc<[u8]> = canonical_json(body)?.into();
        self.memo.insert(digest, canonical.clone());
        Ok(canonical)
    }
}

/// Whether a `Content-Type` names JSON: `application/json` or any `+json` type
/// (RFC 6839 §3.1), parameters ignored. A missing or unreadable header is not JSON.
pub fn is_json_media_type(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.to_ascii_lowercase();
    kind.eq_ignore_ascii_case("application") && (subtype == "json" || subtype.ends_with("+json"))
}

const DUPLICATE: &str = "duplicate member name";
const RESERVED: &str = "reserved string";

/// Strings starting so are the canonical form's own: no body may hold one.
const RESERVED_PREFIX: &str = "\u{0}cachegate:";

/// How the canonical form writes a whole number spelled as a float: this, then the
/// double's shortest spelling.
const FLOAT_MARK: &str = "\u{0}cachegate:float:";

/// A JSON value read with duplicate member names refused.
struct IJson(Value);

impl<'de> Deserialize<'de> for IJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(IJsonVisitor).map(IJson)
    }
}

struct IJsonVisitor;

impl<'de> Visitor<'de> for IJsonVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    /// serde_json reads a number spelled with a fraction or an exponent (or an integer
    /// beyond 64 bits, refused later) as an `f64`: a whole one is marked as a float, in
    /// one small string (no map per number: a body of many is not blown up).
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        if !v.is_finite() {
            return Err(E::custom("non-finite number"));
        }
        if v.fract() != 0.0 {
            return Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number));
        }
        Ok(Value::String(format!("{FLOAT_MARK}{v:?}")))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        if v.starts_with(RESERVED_PREFIX) {
            return Err(E::custom(RESERVED));
        }
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        if v.starts_with(RESERVED_PREFIX) {
            return Err(E::custom(RESERVED));
        }
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(IJson(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut seen = HashSet::new();
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if !seen.insert(name.clone()) {
                return Err(de::Error::custom(DUPLICATE));
            }
            let IJson(v) = map.next_value()?;
            members.insert(name, v);
        }
        Ok(Value::Object(members))
    }
}

/// The number tokens of a JSON text that has already parsed, skipping strings.
fn number_tokens(json: &[u8]) -> impl Iterator<Item = &str> {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < json.len() {
            match json[i] {
                b'"' => {
                    i += 1;
                    while i < json.len() && json[i] != b'"' {
                        i += if json[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
                b'-' | b'0'..=b'9' => {
                    let start = i;
                    while i < json.len()
                        && matches!(json[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                    {
                        i += 1;
                    }
                    return std::str::from_utf8(&json[start..i]).ok();
                }
                _ => i += 1,
            }
        }
        None
    })
}

/// Whether a JSON number token means exactly the number that its nearest IEEE 754 double
/// spells in shortest form (RFC 7493 §2.2): `0.1` does, `9007199254740993` and
/// `0.10000000000000000000001` do not.
fn survives_double(token: &str) -> bool {
    let Ok(double) = token.parse::<f64>() else {
        return false;
    };
    double.is_finite() && decimal(token) == decimal(&format!("{double:e}"))
}

/// A decimal number as (significant digits without leading or trailing zeros, power of
/// ten of the last digit); zero is `("", 0)`; `None` when the exponent overflows.
fn decimal(number: &str) -> Option<(String, i64)> {
    let number = number.trim_start_matches('-');
    let (mantissa, exp) = match number.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.trim_start_matches('+').parse::<i64>().ok()?),
        None => (number, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let significant = digits.trim_end_matches('0');
    if significant.is_empty() {
        return Some((String::new(), 0));
    }
    let trailing = (digits.len() - significant.len()) as i64;
    let power = exp.checked_sub(frac.len() as i64)?.checked_add(trailing)?;
    Some((significant.to_string(), power))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::header_map;
    use proptest::prelude::*;

    #[test]
    fn json_order_and_spelling_do_not_matter() {
        let a = canonical_json(br#"{"b": 1.0, "a": [1, 2e0, 0.50], "c": "x"}"#).unwrap();
        let b = canonical_json(br#"{"a":[1,20E-1,5e-1],"c":"x","b":10e-1}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(canonical_json(b"{bad"), Err(BodyKeyError::MalformedJson));
        assert_eq!(canonical_json(b"{} x"), Err(BodyKeyError::MalformedJson));
    }

    #[test]
    fn a_whole_number_spelled_as_a_float_is_not_keyed_as_an_integer() {
        let c = |body: &str| canonical_json(body.as_bytes()).unwrap();
        for (int, float) in [
            ("1", "1.0"),
            ("100", "1e2"),
            ("0", "-0.0"),
            ("0", "0E0"),
            (r#"{"h":[1]}"#, r#"{"h":[1.00]}"#),
        ] {
            assert_ne!(c(int), c(float), "{int} {float}");
        }
        assert_eq!(c("1.0"), c("1e0"));
        assert_eq!(c("[1, 2.5]"), c("[1,25e-1]"));
        assert_ne!(c("[-0.0]"), c("[0.0]"));
        assert_eq!(c("[-0.0]"), c("[-0e5]"));
        // The mark cannot come from a client: no body keys like a float.
        for body in [
            "[\"\\u0000cachegate:float:1.0\"]",
            "{\"a\":[\"\\u0000cachegate:\"]}",
            "\"\\u0000cachegate:float:1.0\"",
        ] {
            assert_eq!(
                canonical_json(body.as_bytes()),
                Err(BodyKeyError::NotIJson),
                "{body}"
            );
        }
    }

    #[test]
    fn bodies_outside_i_json_are_refused() {
        for body in [
            "9007199254740993",
            "[-9007199254740993]",
            "18446744073709551615",
            "0.10000000000000000000001",
            "1e-400",
            r#"{"date":"a","date":"b"}"#,
            r#"{"x":{"k":1,"k":1}}"#,
            r#"[{"a":1},{"b":1,"b":2}]"#,
            "-0",
            r#"{"a":[-0]}"#,
            "18446744073709552000",
            "-9223372036854775809",
        ] {
            assert_eq!(
                canonical_json(body.as_bytes()),
                Err(BodyKeyError::NotIJson),
                "{body}"
            );
        }
        // serde_json refuses it while parsing: not keyed either way.
        assert!(canonical_json(b"1e400").is_err());
        for body in [
            "9007199254740992",
            "0.1",
            "-0.0",
            "-0e0",
            r#"["-0"]"#,
            "1e308",
            "5e-324",
            r#"{"a":"1e999"}"#,
            r#"["\"9007199254740993"]"#,
        ] {
            assert!(canonical_json(body.as_bytes()).is_ok(), "{body}");
        }
    }

    #[test]
    fn media_types() {
        let json = |ct| is_json_media_type(&header_map(&[("content-type", ct)]));
        assert!(json("application/json"));
        assert!(json("Application/JSON; charset=utf-8"));
        assert!(json("application/vnd.api+json"));
        assert!(json("application/ld+JSON"));
        assert!(!json("application/jsonx"));
        assert!(!json("application/vnd.json5"));
        assert!(!json("application/x+jso"));
        assert!(!json("application/x-www-form-urlencoded"));
        assert!(!json("text/json"));
        assert!(!is_json_media_type(&header_map(&[])));
    }

    proptest! {
        #[test]
        fn any_bytes_give_an_answer(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = canonical_json(&body);
        }

        #[test]
        fn the_memo_answers_as_canonical_json(
            bodies in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..64),
                    "\\{\"[a-c]\": ?(1|1\\.0|\"x\"|\\[\\]|1e400)(, ?\"[a-c]\": ?2)?\\}"
                        .prop_map(String::into_bytes),
                ],
                1..8,
            )
        ) {
            // A tiny memo, so that entries are also evicted and computed again.
            let memo = CanonicalBodies::new(0);
            for body in bodies.iter().chain(&bodies) {
                prop_assert_eq!(
                    memo.canonical(body).map(|c| c.to_vec()),
                    canonical_json(body)
                );
            }
        }

        #[test]
        fn whitespace_and_member_order_do_not_matter(
            n in any::<f64>(),
            s in ".*",
            i in any::<i64>(),
        ) {
            let n = if n.is_finite() { n } else { 0.0 };
            let v = serde_json::json!({"n": n, "s": s, "i": i, "a": [n, i]});
            let compact = v.to_string();
            let reordered = format!(
                "{{ \"i\" : {i} ,\n\"a\":[ {n:?} , {i} ], \"s\": {}, \"n\":\t{n:e} }}",
                serde_json::Value::String(s.clone())
            );
            prop_assert_eq!(
                canonical_json(compact.as_bytes()),
                canonical_json(reordered.as_bytes())
            );
        }
    }
}
