//! A read that goes L1 → L2 → database: the in-process `wal2cache::l1` in front of the
//! Redis look-aside `wal2cache::l2`, so that across the whole fleet one load per key
//! reaches the database (the L2's lease), and within this process one lookup per key
//! reaches Redis (the L1's single flight). Run the demo (`deploy/local/demo.sh`),
//! then
//!
//! ```sh
//! cargo run --features l1,l2 --example l1_l2 -- 127.0.0.1:19092 wal2cache.invalidations redis://127.0.0.1:63790
//! ```
//!
//! The demo's writer changes products every two seconds: the daemon deletes the
//! product's Redis key and its lease and tells the L1, and the next read loads again.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use wal2cache::l1::L1;
use wal2cache::l2::L2;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let brokers = args.next().unwrap_or_else(|| "127.0.0.1:19092".into());
    let topic = args
        .next()
        .unwrap_or_else(|| "wal2cache.invalidations".into());
    let redis = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:63790".into());

    let l1: L1<Option<String>> = L1::builder(brokers, topic)
        .capacity(100_000)
        .ttl(Duration::from_secs(600))
        .staleness_bound(Duration::from_secs(5))
        .build()?;
    let l2 = L2::builder(redis)
        .tag_prefix("tag:") // the daemon's redis.tag_prefix
        .build()
        .await?;

    let db_loads = AtomicU32::new(0);
    let key = "shop:product:v3:1";
    let tags = ["shop:category:1"];
    for _ in 0..60 {
        let product = l1
            .try_get_with(key, &tags, || async {
                // L1 miss: one lookup per key in this process, through the L2.
                let bytes = l2
                    .try_get_or_load(key, &tags, Some(Duration::from_secs(3600)), || async {
                        // L2 miss holding the lease: your database query here.
                        let n = db_loads.fetch_add(1, Ordering::Relaxed) + 1;
                        Ok::<_, std::io::Error>(Some(format!("product 1, load #{n}").into_bytes()))
                    })
                    .await?;
                Ok::<_, wal2cache::l2::L2Error<std::io::Error>>(
                    bytes.map(|b| String::from_utf8_lossy(&b).into_owned()),
                )
            })
            .await
            .map_err(|e| e.to_string())?;
        let (m1, m2) = (l1.metrics(), l2.metrics());
        println!(
            "{:<24} l1 hits={} l2 hits={} db loads={} l2 leases lost={}",
            product.unwrap_or_else(|| "(no such product)".into()),
            m1.hits,
            m2.hits,
            db_loads.load(Ordering::Relaxed),
            m2.leases_lost
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}
