//! Hit latency of `wal2cache::l1`: `get` and `get_with` on cached keys, while the
//! subscriber runs on the broker (`WAL2CACHE_TEST_KAFKA`) with heartbeats flowing, as
//! in an application. Criterion reports the mean; the percentiles are printed after
//! it, measured over batches of lookups (a clock read costs about as much as a hit).
//! Target: hit p50 under 1 µs.
//!
//! `cargo bench --features l1 --bench l1_hit`; `W2C_BENCH_KEYS` (default 10,000)
//! sets how many keys are cached and read in turn.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use common::percentile_rounded as percentile;
use criterion::Criterion;
use support::env::kafka_brokers;
use support::kafka::create_topic;
use support::l1::{Events, Heartbeats};
use wal2cache::l1::{L1, NO_TAGS};

/// Awaits `fut` as an application's `.await` would on a hit: polled once, ready at
/// once (a miss would wait on the runtime instead).
fn ready<F: Future>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => rt.block_on(fut),
    }
}

/// The broker side: a topic of its own (two partitions) and the daemon's heartbeats
/// on it, every second, until dropped.
async fn stream(topic: &str) -> Heartbeats {
    create_topic(topic, 2).await;
    Heartbeats::start(&Events::new(topic, 2), Duration::from_secs(1))
}

fn main() {
    let keys: usize = std::env::var("W2C_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let topic = format!("l1_bench_hit_{}", std::process::id());
    let _heartbeats = rt.block_on(stream(&topic));
    let cache: L1<String> = rt.block_on(async {
        let cache = L1::builder(kafka_brokers(), &topic)
            .capacity(keys as u64 * 2)
            .build()
            .unwrap();
        assert!(
            cache.wait_healthy(Duration::from_secs(30)).await,
            "not healthy"
        );
        cache
    });
    let names: Vec<String> = (0..keys).map(|i| format!("shop:product:v3:{i}")).collect();
    rt.block_on(async {
        for (i, k) in names.iter().enumerate() {
            assert!(
                cache
                    .insert(
                        k,
                        format!("{{\"id\":{i},\"name\":\"Mug\"}}"),
                        &["shop:products"]
                    )
                    .await
            );
        }
        cache.run_pending_tasks().await;
    });

    let mut c = Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut i = 0usize;
    c.bench_function("l1_hit/get", |b| {
        b.iter(|| {
            i = (i + 1) % keys;
            black_box(ready(&rt, cache.get(&names[i])))
        })
    });
    c.bench_function("l1_hit/get_with", |b| {
        b.iter(|| {
            i = (i + 1) % keys;
            black_box(ready(
                &rt,
                cache.get_with(&names[i], NO_TAGS, || async { unreachable!("a hit") }),
            ))
        })
    });
    c.final_summary();

    // Percentiles: per-lookup time over batches of 32 lookups, and single lookups
    // timed one by one (the clock read included).
    const BATCH: usize = 32;
    let mut batches = Vec::with_capacity(20_000);
    let mut singles = Vec::with_capacity(200_000);
    let mut i = 0usize;
    for _ in 0..20_000 {
        let t = Instant::now();
        for _ in 0..BATCH {
            i = (i + 1) % keys;
            black_box(ready(
                &rt,
                cache.get_with(&names[i], NO_TAGS, || async { unreachable!("a hit") }),
            ));
        }
        batches.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
    }
    for _ in 0..200_000 {
        i = (i + 1) % keys;
        let t = Instant::now();
        black_box(ready(&rt, cache.get(&names[i])));
        singles.push(t.elapsed().as_nanos() as f64);
    }
    batches.sort_by(f64::total_cmp);
    singles.sort_by(f64::total_cmp);
    let m = cache.metrics();
    assert_eq!(m.loads, 0, "every lookup was a hit");
    println!(
        "l1 hit ({keys} keys, get_with, batches of {BATCH}): p50 {:.0} ns, p90 {:.0} ns, p99 {:.0} ns",
        percentile(&batches, 0.5),
        percentile(&batches, 0.9),
        percentile(&batches, 0.99)
    );
    println!(
        "l1 hit (get, one at a time, clock read included): p50 {:.0} ns, p99 {:.0} ns, p99.9 {:.0} ns",
        percentile(&singles, 0.5),
        percentile(&singles, 0.99),
        percentile(&singles, 0.999)
    );
    println!(
        "target hit p50 < 1 µs: {}",
        if percentile(&batches, 0.5) < 1000.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "hits {}, healthy {}, load average {}",
        m.hits,
        m.healthy,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
