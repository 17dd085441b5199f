//! Micro-benchmarks of the CPU work cachegate adds on the hit path: building a cache key
//! (with and without an RFC 8785 canonical JSON body, including query parsing) and
//! opening a stored envelope, sealed (encrypted, the default) and signed, with bodies of 64
//! bytes, 2 KB and 256 KB.
//!
//! Run: `cargo bench --bench hot_path`. Figures are for comparing the parts with each other
//! and across changes on the same machine, not absolute claims.

use std::hint::black_box;

use cachegate::engine::envelope::EnvelopeKeys;
use cachegate::engine::store::Storable;
use cachegate::entry::CachedResponse;
use cachegate::key::{CacheKey, KeyBuilder, KeyParts, canonical_json, request_key};
use cachegate::uri::{QueryParam, parse_query};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

const CHART: &[u8] = br#"{"name":"Ada Lovelace","date":"1815-12-10","time":"12:00","lat":51.5074,"lon":-0.1278,"tz":"Europe/London","house_system":"placidus"}"#;

fn keys(c: &mut Criterion) {
    let builder = KeyBuilder::new(b"bench-secret", "bench");
    let mut headers = HeaderMap::new();
    headers.insert("accept-language", HeaderValue::from_static("en-GB"));
    let names = vec!["accept-language".to_string()];
    fn parts<'a>(
        headers: &'a HeaderMap,
        names: &'a [String],
        query: &'a [QueryParam<'a>],
        canonical_body: Option<&'a [u8]>,
    ) -> KeyParts<'a> {
        KeyParts {
            method: &Method::GET,
            path: "/kpi/revenue/daily",
            host: None,
            forwarded: None,
            query,
            query_filter: None,
            headers,
            header_names: names,
            canonical_body,
            content_type: canonical_body.map(|_| &b"application/json"[..]),
        }
    }

    const QUERY: &str = "to=2026-11-30&from=2026-11-01&granularity=day";
    c.bench_function("key/get_with_query_and_header", |b| {
        b.iter(|| {
            let query = parse_query(black_box(QUERY));
            request_key(&builder, &parts(&headers, &names, &query, None))
        })
    });
    c.bench_function("key/post_raw_body", |b| {
        b.iter(|| {
            request_key(
                &builder,
                black_box(&parts(&headers, &names, &[], Some(CHART))),
            )
        })
    });
    c.bench_function("key/post_canonical_json_body", |b| {
        b.iter(|| {
            let canonical = canonical_json(black_box(CHART)).unwrap();
            request_key(&builder, &parts(&headers, &names, &[], Some(&canonical)))
        })
    });
    // The same body sent again: its canonical form comes from the memo the proxy keeps.
    let memo = cachegate::key::CanonicalBodies::new(4 << 20);
    c.bench_function("key/post_canonical_json_body_seen_before", |b| {
        b.iter(|| {
            let canonical = memo.canonical(black_box(CHART)).unwrap();
            request_key(&builder, &parts(&headers, &names, &[], Some(&canonical)))
        })
    });
}

fn envelope(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert(
        "date",
        HeaderValue::from_static("Sat, 21 Nov 2026 20:00:00 GMT"),
    );
    let tags: Vec<String> = vec!["natal".into()];
    let entry_of = |body_bytes: usize| {
        CachedResponse::new(
            StatusCode::OK,
            &headers,
            &vec![b'x'; body_bytes],
            1_790_000_000_000,
            cachegate::entry::Freshness::ttl(60),
            &tags,
        )
    };
    let entry = entry_of(2048);
    c.bench_function("entry/parts_for_a_hit", |b| {
        b.iter(|| black_box(&entry).parts())
    });
    let key = CacheKey([3; 32]);
    // 2 KB and 64 bytes of body (hit_path.sh's response).
    for (size, entry) in [
        ("2k", &entry),
        ("64b", &entry_of(64)),
        ("256k", &entry_of(262144)),
    ] {
        for (mode, seal) in [("sealed", true), ("signed", false)] {
            let keys = EnvelopeKeys::new(b"bench-secret", seal);
            let encoded = keys.seal(&key, &entry.to_payload());
            c.bench_function(&format!("envelope/encode_{size}_{mode}"), |b| {
                b.iter(|| keys.seal(&key, &black_box(entry).to_payload()))
            });
            c.bench_function(&format!("envelope/decode_{size}_{mode}"), |b| {
                b.iter(|| {
                    // As a Redis-tier read: the reply's own buffer (one copy, made by the
                    // client), opened in place.
                    let mut reply = black_box(&encoded).to_vec();
                    CachedResponse::from_payload(keys.open_in_place(&key, &mut reply).unwrap())
                        .unwrap()
                })
            });
        }
    }
}

criterion_group!(benches, keys, envelope);
criterion_main!(benches);
