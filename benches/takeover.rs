//! Takeover: two daemons on one config, a steady write load, and the active one killed
//! with SIGKILL, again and again; how long until the standby streams. Target: under
//! 5 s with the default `postgres.takeover` (1 s).
//!
//!     cargo bench --bench takeover
//!     W2C_BENCH_TAKEOVERS=20 W2C_BENCH_TAKEOVER="250ms" cargo bench --bench takeover
//!
//! Each round: the standby reports `role = standby` in `/status`; after a random
//! 0.2-2.2 s, SIGKILL the active process; the time from the kill to the standby's `/status` saying `active` and
//! `streaming` (polled every 5 ms) is the takeover; a new standby is started on the
//! killed one's port. The writer of `tests/support/oracle.rs` writes throughout (a
//! write every 2 ms); at the end its oracle checks that every write was invalidated,
//! republished and announced. Printed: each takeover, min / median / max, and the
//! oracle's counts.
//!
//! Env: `W2C_BENCH_TAKEOVERS` (10), `W2C_BENCH_TAKEOVER` (`postgres.takeover`, 1s),
//! `WAL2CACHE_TEST_PG` / `_REDIS` / `_KAFKA`.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_usize, load_average};
use serde_json::Value;
use support::daemon::Daemon;
use support::db::{wait_streaming, TestDb};
use support::env::unique;
use support::net::{free_addr, http_async};
use support::oracle::{assert_nothing_lost, items_config, writer, ITEMS};
use support::rng::Lcg;
use support::store::{redis, unlink_matching};
use support::wait::eventually;

async fn role(addr: SocketAddr) -> Option<(String, bool)> {
    let (_, body) = http_async(addr, "GET", "/status").await?;
    let s: Value = serde_json::from_str(&body).ok()?;
    Some((s["role"].as_str()?.to_string(), s["streaming"] == true))
}

fn main() {
    let rounds = env_usize("W2C_BENCH_TAKEOVERS", 10).max(1);
    let takeover = std::env::var("W2C_BENCH_TAKEOVER").unwrap_or_else(|_| "1s".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let db = TestDb::new("bench_takeover").await;
        db.exec(ITEMS).await;
        let prefix = unique("takeover");
        let topic = format!("{prefix}.events");
        let dir = tempfile::tempdir().unwrap();
        let addrs = [free_addr(), free_addr()];
        let config = items_config(&db, &prefix, &topic)
            .name(&format!("takeover-{}", db.name))
            .metrics_listen(addrs[0])
            .raw("postgres", &format!("takeover = \"{takeover}\""))
            .write(dir.path());
        let start = |addr: SocketAddr| {
            Daemon::start(
                &config,
                &[("WAL2CACHE__METRICS__LISTEN", addr.to_string().as_str())],
            )
        };
        let mut daemons = [Some(start(addrs[0])), None];
        wait_streaming(&db, &format!("{}_c", db.name)).await;
        let mut active = 0;
        daemons[1] = Some(start(addrs[1]));
        let stop = Arc::new(AtomicBool::new(false));
        let writing = tokio::spawn(writer(db.url.clone(), prefix.clone(), stop.clone()));
        let mut times = Vec::new();
        let mut rng = Lcg(7);
        for round in 0..rounds {
            let standby = 1 - active;
            eventually("the standby", Duration::from_secs(60), || async {
                role(addrs[standby]).await.is_some_and(|(r, _)| r == "standby")
            })
            .await;
            // Killed at a random moment of the standby's checking cycle.
            tokio::time::sleep(Duration::from_millis(200 + rng.below(2000))).await;
            drop(daemons[active].take()); // SIGKILL
            let killed = Instant::now();
            loop {
                if role(addrs[standby]).await == Some(("active".into(), true)) {
                    break;
                }
                assert!(
                    killed.elapsed() < Duration::from_secs(120),
                    "no takeover within 120 s"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let took = killed.elapsed();
            println!("round {round}: takeover in {:.0} ms", took.as_secs_f64() * 1e3);
            times.push(took);
            daemons[active] = Some(start(addrs[active]));
            active = standby;
        }
        stop.store(true, Ordering::Relaxed);
        let (writes, rows) = writing.await.unwrap();
        let events = assert_nothing_lost(&db, &prefix, &topic, &writes, &rows).await;
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "takeover after SIGKILL, {rounds} rounds, postgres.takeover = {takeover}: min {:.0} ms, median {:.0} ms, max {:.0} ms (target < 5000 ms); load {}",
            ms(times[0]),
            ms(times[times.len() / 2]),
            ms(times[times.len() - 1]),
            load_average()
        );
        println!(
            "oracle: {} writes, {events} events, every write invalidated, republished and announced",
            writes.len()
        );
        drop(daemons);
        unlink_matching(&mut redis().await, &format!("{prefix}:*")).await;
    });
}
