//! Commit-to-eviction latency through the daemon: `wal2cache run` (a separate
//! process) streams single-row UPDATEs from PostgreSQL and publishes their events; an
//! L1 in this process evicts the row's key. For each UPDATE, at a steady pace, the
//! time from the commit (the event's `commit_time`, PostgreSQL's clock on this same
//! machine) to the moment the L1 applied the eviction (its `on_notice` callback), and
//! from the moment the UPDATE's COMMIT returned to the client. Target: p99 under 25 ms.
//!
//! `cargo bench --features l1 --bench l1_eviction`. Environment: `W2C_BENCH_UPDATES`
//! (default 500), `W2C_BENCH_PACE_MS` (default 20: 50 updates/s),
//! `W2C_BENCH_FETCH_WAIT_MS` (the L1's `fetch.wait.max.ms`; its default, 10, when
//! unset), and the
//! services' `WAL2CACHE_TEST_PG`, `WAL2CACHE_TEST_REDIS`, `WAL2CACHE_TEST_KAFKA`.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant, SystemTime};

use common::{env_usize, load_average, percentile_rounded, BoxError};
use support::config::ConfigBuilder;
use support::daemon::Daemon;
use support::db::TestDb;
use support::env::kafka_brokers;
use tokio::sync::mpsc;
use wal2cache::l1::{Notice, L1};

/// An eviction as the L1 applied it.
struct Evicted {
    at: SystemTime,
    keys: Vec<String>,
    commit_time: Option<String>,
    evicted: usize,
}

/// `later - earlier` in milliseconds (negative when `later` is earlier).
fn since(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

fn report(what: &str, mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| percentile_rounded(&v, q);
    println!(
        "{what}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n = {})",
        p(0.5),
        p(0.9),
        p(0.99),
        v[v.len() - 1],
        v.len()
    );
    p(0.99)
}

async fn run() -> Result<(), BoxError> {
    let updates = env_usize("W2C_BENCH_UPDATES", 500);
    let pace = Duration::from_millis(env_usize("W2C_BENCH_PACE_MS", 20) as u64);
    let fetch_wait = std::env::var("W2C_BENCH_FETCH_WAIT_MS").ok();
    println!("load average at start: {}", load_average());

    let db = TestDb::new("bench_l1_evict").await;
    db.client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10, 2) NOT NULL);
             INSERT INTO items SELECT i, 'item ' || i, 10 FROM generate_series(1, 1000) i;",
        )
        .await?;
    let prefix = format!("l1b{}", std::process::id());
    let topic = format!("{prefix}.events");
    let dir = tempfile::Builder::new().prefix("w2c_l1_bench_").tempdir()?;
    let config = ConfigBuilder::new(&db)
        .name(&format!("l1-bench-{}", db.name))
        .rules(&format!(
            "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:item:{{id}}\"]\ntags = [\"{prefix}:items\"]\n"
        ))
        .redis_key("tag_prefix", format!("{prefix}:tag:"))
        .kafka_topic(&topic)
        .kafka_key("partitions", 2)
        .write(dir.path());

    let (tx, mut evictions) = mpsc::unbounded_channel::<Evicted>();
    let mut builder = L1::builder(kafka_brokers(), &topic).staleness_bound(Duration::from_secs(5));
    if let Some(ms) = &fetch_wait {
        builder = builder.kafka_property("fetch.wait.max.ms", ms);
    }
    let cache: L1<String> = builder
        .on_notice(move |n| {
            if let Notice::Invalidated { event, evicted } = n {
                let _ = tx.send(Evicted {
                    at: SystemTime::now(),
                    keys: event.keys.clone(),
                    commit_time: event.commit_time.clone(),
                    evicted: *evicted,
                });
            }
        })
        .build()?;
    let daemon = Daemon::start(&config, &[]);
    if !cache.wait_healthy(Duration::from_secs(60)).await {
        return Err(format!("the L1 never turned healthy: {:?}", cache.metrics()).into());
    }

    let warmup = 20;
    let mut from_commit = Vec::with_capacity(updates);
    let mut from_return = Vec::with_capacity(updates);
    let mut from_send = Vec::with_capacity(updates);
    let mut not_evicted = 0;
    let mut tick = tokio::time::interval(pace);
    let started = Instant::now();
    for i in 0..warmup + updates {
        tick.tick().await;
        let id = (i % 1000) as i32 + 1;
        let key = format!("{prefix}:item:{id}");
        cache
            .insert(&key, "cached".into(), &[format!("{prefix}:items")])
            .await;
        let sent = SystemTime::now();
        db.client
            .execute("UPDATE items SET price = price + 1 WHERE id = $1", &[&id])
            .await?;
        let returned = SystemTime::now();
        let e = loop {
            let e = tokio::time::timeout(Duration::from_secs(10), evictions.recv())
                .await
                .map_err(|_| format!("no eviction of {key} within 10 s"))?
                .ok_or("the L1 stopped")?;
            if e.keys.contains(&key) {
                break e;
            }
        };
        if i < warmup {
            continue;
        }
        if e.evicted == 0 {
            not_evicted += 1;
        }
        let commit = e
            .commit_time
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(SystemTime::from)
            .ok_or("an event without commit_time")?;
        from_commit.push(since(e.at, commit));
        from_return.push(since(e.at, returned));
        from_send.push(since(e.at, sent));
    }
    let elapsed = started.elapsed();
    let m = cache.metrics();
    // SIGTERM; how it exits is not this bench's subject.
    let _ = daemon.terminate(Duration::from_secs(60));
    drop(dir);

    println!(
        "{updates} single-row UPDATEs at one per {} ms ({:.1} s), L1 fetch.wait.max.ms = {}; the daemon with its defaults",
        pace.as_millis(),
        elapsed.as_secs_f64(),
        fetch_wait.as_deref().unwrap_or("10 (default)")
    );
    let p99 = report("commit (event commit_time) -> L1 eviction", from_commit);
    report("COMMIT returned to the client -> L1 eviction", from_return);
    report("UPDATE sent -> L1 eviction", from_send);
    println!(
        "target commit-to-eviction p99 < 25 ms: {}",
        if p99 < 25.0 { "met" } else { "MISSED" }
    );
    println!(
        "L1: healthy {}, resets {}, evictions {}, not evicted {not_evicted}, last lag {:?}",
        m.healthy, m.resets, m.evictions_by_invalidation, m.last_lag
    );
    println!("load average at end: {}", load_average());
    Ok(())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Err(e) = rt.block_on(run()) {
        eprintln!("l1_eviction: {}", common::chain(&*e));
        std::process::exit(1);
    }
}
