//! 1,000 concurrent `get_or_set` calls for one cold key whose computation takes 200 ms:
//! one computation, every caller served.
//!
//! Run: `cargo run --release --example get_or_set`. Prints one line:
//! `computations=<n> callers=1000 elapsed_ms=<t>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachegate::engine::{Cache, Options};

const CALLERS: usize = 1000;

#[tokio::main]
async fn main() {
    let cache: Cache<String> = Cache::builder()
        .key_secret(b"example secret")
        .build()
        .expect("a memory-only cache always builds");
    let computations = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let calls: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (cache, computations) = (cache.clone(), computations.clone());
            tokio::spawn(async move {
                cache
                    .get_or_set(
                        "natal:1815-12-10T12:00:51.5074:-0.1278",
                        &Options::default(),
                        move || async move {
                            computations.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            Ok::<_, std::io::Error>("Sun in Sagittarius".to_string())
                        },
                    )
                    .await
            })
        })
        .collect();
    for call in calls {
        let value = call
            .await
            .expect("no task panics")
            .expect("the computation succeeds");
        assert_eq!(value.value, "Sun in Sagittarius");
    }
    println!(
        "computations={} callers={CALLERS} elapsed_ms={}",
        computations.load(Ordering::SeqCst),
        started.elapsed().as_millis()
    );
}
