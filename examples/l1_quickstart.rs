//! An application's view of `wal2cache::l1`: product 1 of the demo schema, cached
//! under its category tag, read once a second. Run the demo (`deploy/local/demo.sh`,
//! whose writer changes products every two seconds), then
//!
//! ```sh
//! cargo run --no-default-features --features l1 --example l1_quickstart -- 127.0.0.1:19092 wal2cache.invalidations
//! ```
//!
//! and watch the key being evicted by the daemon's events and loaded again.

use std::time::Duration;

use wal2cache::l1::L1;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let brokers = args.next().unwrap_or_else(|| "127.0.0.1:19092".into());
    let topic = args
        .next()
        .unwrap_or_else(|| "wal2cache.invalidations".into());

    let cache: L1<String> = L1::builder(brokers, topic)
        .capacity(100_000) // entries
        .ttl(Duration::from_secs(600)) // a backstop: the events do the work
        .staleness_bound(Duration::from_secs(5)) // no heartbeat for 5 s: empty, pass through
        .build()?;

    let mut loads = 0;
    for _ in 0..60 {
        let product = cache
            .get_with("shop:product:v3:1", &["shop:category:1"], || async {
                loads += 1;
                format!("product 1, load #{loads}") // your database query here
            })
            .await;
        let m = cache.metrics();
        println!(
            "{product:<24} healthy={} hits={} loads={} evictions={} lag={:?}",
            m.healthy, m.hits, m.loads, m.evictions_by_invalidation, m.last_lag
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}
