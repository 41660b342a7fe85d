//! `wal2cache::l2` against the local Redis and PostgreSQL, beside plain GET / SET
//! look-aside in the same run:
//! 1. hit latency (one round trip: the fetch script) against a plain GET;
//! 2. a miss (fetch + lease, loader, store script) against GET + SET, with a loader
//!    that returns at once, so the figure is the protocol's own cost;
//! 3. a hot-key storm: `W2C_BENCH_CLIENTS` (default 200) clients, each reading one of
//!    10 hot keys every 20 ms (10,000 requests/s offered), for `W2C_BENCH_SECS`
//!    (default 5) s while one key is deleted every 20 ms (the daemon's UNLINK of the
//!    key and its lease); every miss queries PostgreSQL (a 5 ms query, 16
//!    connections). Reports database queries per second with and without leases for
//!    the same offered load, the figure Facebook reported.
//!
//! `cargo bench --features l2 --bench l2` (services: `deploy/local/services.sh start`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use support::db::connect;
use support::env::{pg_admin_url, redis_url, unique};
use wal2cache::keys::lease_key;
use wal2cache::l2::{L2, NO_TAGS};

const ROUNDS: usize = 20_000;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p) as usize];
    format!(
        "p50 {:.1} µs, p99 {:.1} µs",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6
    )
}

async fn plain() -> ConnectionManager {
    redis::Client::open(redis_url())
        .unwrap()
        .get_connection_manager()
        .await
        .expect("Redis runs: deploy/local/services.sh start")
}

async fn hits(l2: &L2, r: &mut ConnectionManager, prefix: &str) {
    let key = format!("{prefix}:hit");
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("x".repeat(200))
        .query_async(r)
        .await
        .unwrap();
    let mut l2_times = Vec::with_capacity(ROUNDS);
    let mut get_times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let v = l2
            .get_or_load(&key, NO_TAGS, None, || async { None })
            .await
            .unwrap();
        l2_times.push(t.elapsed());
        assert!(v.is_some());
        let t = Instant::now();
        let v: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(r).await.unwrap();
        get_times.push(t.elapsed());
        assert!(v.is_some());
    }
    println!("hit, l2 get_or_load: {}", percentiles(l2_times));
    println!("hit, plain GET:      {}", percentiles(get_times));
    let () = redis::cmd("UNLINK").arg(&key).query_async(r).await.unwrap();
}

async fn misses(l2: &L2, r: &mut ConnectionManager, prefix: &str) {
    let mut l2_times = Vec::with_capacity(ROUNDS);
    let mut plain_times = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let key = format!("{prefix}:miss:l2:{i}");
        let t = Instant::now();
        l2.get_or_load(&key, NO_TAGS, Some(Duration::from_secs(60)), || async {
            Some(b"value".to_vec())
        })
        .await
        .unwrap();
        l2_times.push(t.elapsed());
        let key = format!("{prefix}:miss:plain:{i}");
        let t = Instant::now();
        let v: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(r).await.unwrap();
        if v.is_none() {
            let () = redis::cmd("SET")
                .arg(&key)
                .arg("value")
                .arg("EX")
                .arg(60)
                .query_async(r)
                .await
                .unwrap();
        }
        plain_times.push(t.elapsed());
    }
    println!("miss + lease + store, l2: {}", percentiles(l2_times));
    println!("miss + SET, plain:        {}", percentiles(plain_times));
    let mut cleanup = support::store::redis().await;
    support::store::unlink_matching(&mut cleanup, &format!("{prefix}:miss:*")).await;
    support::store::unlink_matching(&mut cleanup, &format!("{{{prefix}:miss:*")).await;
}

/// Requests and database queries of a storm on 10 hot keys.
async fn storm(leases: bool, prefix: &str, clients: u64, secs: u64) -> (u64, u64) {
    let l2 = L2::builder(redis_url())
        .lease_wait(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    // A pool of connections, as an application has: the database is not one queue.
    let mut pool = Vec::new();
    for _ in 0..16 {
        pool.push(connect(&pg_admin_url()).await);
    }
    let db = Arc::new(pool);
    let requests = Arc::new(AtomicU64::new(0));
    let queries = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let keys: Arc<Vec<String>> = Arc::new((0..10).map(|i| format!("{prefix}:hot:{i}")).collect());
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (l2, db, requests, queries, stop, keys) = (
            l2.clone(),
            db.clone(),
            requests.clone(),
            queries.clone(),
            stop.clone(),
            keys.clone(),
        );
        let mut r = plain().await;
        tasks.push(tokio::spawn(async move {
            let mut n = c;
            // The same offered load in both runs: one request per client every 20 ms.
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let key = &keys[(n % 10) as usize];
                n += 1;
                let load = || async {
                    queries.fetch_add(1, Ordering::Relaxed);
                    let row = db[(n % 16) as usize]
                        .query_one("SELECT 1::bigint, pg_sleep(0.005)::text", &[])
                        .await
                        .unwrap();
                    Some(row.get::<_, i64>(0).to_string().into_bytes())
                };
                if leases {
                    l2.get_or_load(key, NO_TAGS, Some(Duration::from_secs(60)), load)
                        .await
                        .unwrap();
                } else {
                    let v: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(key)
                        .query_async(&mut r)
                        .await
                        .unwrap();
                    if v.is_none() {
                        let v = load().await.unwrap();
                        let () = redis::cmd("SET")
                            .arg(key)
                            .arg(v)
                            .arg("EX")
                            .arg(60)
                            .query_async(&mut r)
                            .await
                            .unwrap();
                    }
                }
                requests.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // The daemon's side: a hot key deleted (with its lease) every 20 ms.
    let mut r = plain().await;
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        let key = &keys[i % 10];
        let () = redis::cmd("UNLINK")
            .arg(key)
            .arg(lease_key(key))
            .query_async(&mut r)
            .await
            .unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    for k in keys.iter() {
        let () = redis::cmd("UNLINK")
            .arg(k)
            .arg(lease_key(k))
            .query_async(&mut r)
            .await
            .unwrap();
    }
    (
        (requests.load(Ordering::Relaxed) as f64 / took) as u64,
        (queries.load(Ordering::Relaxed) as f64 / took) as u64,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let prefix = unique("l2bench");
    let l2 = L2::builder(redis_url()).build().await.unwrap();
    let mut r = plain().await;
    hits(&l2, &mut r, &prefix).await;
    misses(&l2, &mut r, &prefix).await;
    let clients = env_or("W2C_BENCH_CLIENTS", 200);
    let secs = env_or("W2C_BENCH_SECS", 5);
    let (plain_rps, plain_qps) = storm(false, &prefix, clients, secs).await;
    let (l2_rps, l2_qps) = storm(true, &prefix, clients, secs).await;
    println!(
        "hot-key storm, {clients} clients on 10 keys, one deleted every 20 ms, {secs} s each:"
    );
    println!("  plain GET/SET: {plain_rps} requests/s, {plain_qps} database queries/s");
    println!("  l2 (leases):   {l2_rps} requests/s, {l2_qps} database queries/s");
    println!(
        "  queries per request: plain {:.4}, l2 {:.4}",
        plain_qps as f64 / plain_rps.max(1) as f64,
        l2_qps as f64 / l2_rps.max(1) as f64
    );
}
