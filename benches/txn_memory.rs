//! Memory: the daemon catches up a single transaction of 1,000,000 inserted rows, end
//! to end into Redis and Kafka. Target: peak RSS under 100 MB.
//!
//!     cargo bench --bench txn_memory
//!     W2C_BENCH_TXN_ROWS=50000 cargo bench --bench txn_memory
//!
//! The daemon is the `wal2cache` binary of this checkout: cargo builds it (bench
//! profile, into target/release/) before running the bench and passes its path in
//! `CARGO_BIN_EXE_wal2cache`; `W2C_BENCH_BIN` runs another one.
//!
//! Setup: the table and rules of benches/common/daemon.rs (a delete rule with two keys
//! and a tag, a republish rule with a projection: every insert makes an UNLINK, a
//! tag purge, a versioned SET and an event), `wal2cache setup` (publication and
//! slot), all with the daemon stopped. Then one transaction inserts
//! `W2C_BENCH_TXN_ROWS` rows (about 100 bytes each, INSERT ... SELECT
//! generate_series); the end of its commit record (found with `pg_walinspect`, see
//! `Marker` in benches/common/daemon.rs) is the position the daemon confirms once it
//! applied it. Then `wal2cache run` (with `[metrics] listen`) is timed from its spawn
//! until its slot's confirmed position reaches it (polled every 100 ms, with VmRSS;
//! `wal2cache_changes_applied_total` scraped every second). Postgres decodes the
//! whole transaction (spilling past `logical_decoding_work_mem`) before it sends the
//! first change, so the daemon waits idle at first. Printed: the time, when the
//! first change was applied, the apply rate, the peak RSS (VmHWM, read just before
//! SIGTERM) and VmRSS along the way. Checks: a sample of republished keys holds its
//! row, and the topic, read back whole, holds one event per row.
//!
//! Env: `W2C_BENCH_TXN_ROWS` (1,000,000), `W2C_BENCH_BATCH_DEADLINE`,
//! `W2C_BENCH_BATCH_SIZE`, `W2C_BENCH_KAFKA_PROPS` (`k=v,k=v`), `W2C_BENCH_CONSUME=0`
//! (do not read the topic back), `W2C_BENCH_DAEMON_LOG`, `WAL2CACHE_TEST_PG` /
//! `_REDIS` / `_KAFKA`. The database `w2c_bench_txnmem_<pid>_...` is dropped with its
//! slot, the Redis keys under `w2cb_txnmem_<pid>` deleted, the topic
//! `w2cb-txnmem-<pid>` deleted (or left where the broker cannot).

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{env_usize, load_average, mib, thousands, BoxError};
use daemon::{BenchSetup, DaemonRun, Tuning};
use redis::AsyncCommands;
use serde_json::{json, Value};
use support::db::TestDb;

const TARGET_MB: f64 = 100.0;

fn main() {
    let rows = env_usize("W2C_BENCH_TXN_ROWS", 1_000_000).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let db = rt.block_on(TestDb::new("bench_txnmem"));
    let mut tuning = Tuning::from_env();
    tuning.metrics_port = Some(support::net::free_port());
    let setup = BenchSetup::write(&db, "txnmem", &tuning);
    // Ctrl-C (and a panic) still cleans up.
    let result = daemon::run_then_clean_up(&rt, &setup, run(&db, &setup, &tuning, rows));
    drop(db);
    if let Err(e) = result {
        daemon::fail("txn_memory", setup, &e);
    }
}

async fn run(
    db: &TestDb,
    setup: &BenchSetup,
    tuning: &Tuning,
    rows: usize,
) -> Result<(), BoxError> {
    let port = tuning.metrics_port.expect("a metrics port");
    let row = db
        .client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('logical_decoding_work_mem')",
            &[],
        )
        .await?;
    let (version, work_mem): (String, String) = (row.get(0), row.get(1));
    println!(
        "txn_memory: {} rows inserted in one transaction into a table with 2 rules (delete 2 keys + 1 tag, republish a 4-column projection)",
        thousands(rows as u64)
    );
    println!(
        "server: PostgreSQL {version}, logical_decoding_work_mem={work_mem}; database {}; daemon {}",
        db.name,
        support::daemon::bin()
    );
    println!("daemon tuning: {}", tuning.describe());
    println!("load average at start: {}", load_average());

    db.client.batch_execute(daemon::TABLE_SQL).await?;
    eprintln!("wal2cache setup: {}", setup.run_setup()?);

    let start_lsn = db.current_lsn().await;
    eprintln!(
        "inserting {} rows in one transaction...",
        thousands(rows as u64)
    );
    let t = Instant::now();
    let marker = daemon::marker_transaction(db, &daemon::fill_sql(rows)).await;
    let insert_time = t.elapsed();
    let wal = db.wal_bytes_since(start_lsn).await;
    println!(
        "insert: {} rows in {:.2} s; WAL {:.1} MiB; the daemon is done at {marker}",
        thousands(rows as u64),
        insert_time.as_secs_f64(),
        wal as f64 / (1024.0 * 1024.0)
    );

    eprintln!(
        "starting wal2cache run (load average {})...",
        load_average()
    );
    let mut d = DaemonRun::start(setup);
    // The applied counter, every second, beside the 100 ms polling of the slot.
    let applied: Arc<Mutex<Vec<(Duration, f64)>>> = Arc::default();
    let sampler = {
        let applied = applied.clone();
        let started = d.started;
        tokio::spawn(async move {
            loop {
                if let Ok(text) = daemon::scrape(port).await {
                    if let Some(n) =
                        support::scrape::metric(&text, "wal2cache_changes_applied_total", None)
                    {
                        applied.lock().unwrap().push((started.elapsed(), n));
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    // Postgres decodes the whole transaction before the first change: the daemon may
    // sit idle for a while, hence the long stall limit.
    let progress = daemon::wait_confirmed(
        db,
        &setup.slot,
        marker,
        &mut d,
        Duration::from_secs(600),
        Duration::from_secs(3600),
    )
    .await;
    sampler.abort();
    let progress = progress.inspect_err(|_| {
        eprintln!("VmHWM of the daemon: {}", mib(d.status_kb("VmHWM")));
    })?;
    let cpu = d.cpu_secs();
    let vm_hwm = d.status_kb("VmHWM");
    let vm_rss = d.status_kb("VmRSS");
    let threads = d.threads();
    let (status, stop) = d.stop(Duration::from_secs(90))?;
    let applied = applied.lock().unwrap().clone();

    // When the applied counter first moved, and the rate from then.
    let first_applied = applied.iter().find(|(_, n)| *n > 0.0).map(|(t, _)| *t);
    let apply_secs = first_applied.map(|f| progress.elapsed.saturating_sub(f).as_secs_f64());
    let applied_line: Vec<String> = applied
        .iter()
        .step_by((applied.len() / 12).max(1))
        .map(|(t, n)| format!("{:.0}s:{}", t.as_secs_f64(), thousands(*n as u64)))
        .collect();

    // Checks.
    let mut problems = Vec::new();
    let mut r = support::store::redis().await;
    let p = &setup.prefix;
    let mut sample = vec![1, (rows as i32 / 2).max(1), rows as i32];
    sample.dedup();
    for &id in &sample {
        let row = db
            .client
            .query_one(
                "SELECT id, name, price::text, stock FROM items WHERE id = $1",
                &[&id],
            )
            .await?;
        let want = json!({
            "id": row.get::<_, i32>(0),
            "name": row.get::<_, String>(1),
            "price": row.get::<_, String>(2),
            "stock": row.get::<_, i32>(3),
        });
        let key = daemon::json_key(p, id);
        let got: Option<String> = r.get(&key).await?;
        match got.as_deref().map(serde_json::from_str::<Value>) {
            Some(Ok(v)) if v == want => {}
            other => problems.push(format!("{key}: {other:?}, the row is {want}")),
        }
    }
    if !std::env::var("W2C_BENCH_CONSUME").is_ok_and(|v| v == "0") {
        problems.extend(read_back_rows(&setup.topic, p, rows).await);
    }

    println!("---");
    println!(
        "wal2cache run: one transaction of {} rows confirmed after {:.3} s (streaming after {:.3} s; first change applied by {}; applying at {})",
        thousands(rows as u64),
        progress.elapsed.as_secs_f64(),
        progress.active_after.unwrap_or_default().as_secs_f64(),
        first_applied.map_or("-".into(), |t| format!("{:.0} s", t.as_secs_f64())),
        apply_secs.map_or("-".into(), |s| format!("~{:.0} changes/s", rows as f64 / s.max(0.001)))
    );
    println!(
        "daemon: peak RSS (VmHWM) {} ({:.1} MB), VmRSS at the end {}; CPU {:.2} s; {} threads; exit {} after {:.2} s",
        mib(vm_hwm),
        vm_hwm as f64 * 1024.0 / 1e6,
        mib(vm_rss),
        cpu,
        threads,
        status.code().map_or_else(|| status.to_string(), |c| c.to_string()),
        stop.as_secs_f64()
    );
    println!(
        "VmRSS (MiB) along the way: {}",
        daemon::rss_samples(&progress.rss, 12)
    );
    println!("applied along the way: {}", applied_line.join(" "));
    let mb = vm_hwm as f64 * 1024.0 / 1e6;
    println!(
        "peak RSS < {TARGET_MB} MB: {}",
        if mb < TARGET_MB { "MET" } else { "NOT MET" }
    );
    println!("load average at the end: {}", load_average());
    if problems.is_empty() {
        println!(
            "checks: ok ({} republished keys hold their row)",
            sample.len()
        );
        Ok(())
    } else {
        for p in &problems {
            println!("check FAILED: {p}");
        }
        Err(format!("{} check(s) failed", problems.len()).into())
    }
}

/// Reads the topic back whole: one invalidate event per row.
async fn read_back_rows(topic: &str, prefix: &str, rows: usize) -> Vec<String> {
    #[derive(Default)]
    struct RowTally {
        invalidate: u64,
        heartbeats: u64,
        ids: Vec<bool>,
        distinct: u64,
        other: u64,
    }
    let seen = Arc::new(Mutex::new(RowTally {
        ids: vec![false; rows + 1],
        ..RowTally::default()
    }));
    let s2 = seen.clone();
    let key_prefix = format!("{prefix}:item:v1:");
    let t = Instant::now();
    let (read, _) = support::kafka::consume_topic(
        topic,
        Duration::from_secs(2),
        Duration::from_secs(1200),
        move |_, _, payload| {
            let mut s = s2.lock().unwrap();
            let Ok(v) = serde_json::from_slice::<Value>(payload) else {
                s.other += 1;
                return;
            };
            match v["kind"].as_str() {
                Some("heartbeat") => s.heartbeats += 1,
                Some("invalidate") => {
                    s.invalidate += 1;
                    let id = v["keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .find_map(|k| k.strip_prefix(&key_prefix)?.parse::<usize>().ok());
                    if let Some(id) = id.filter(|&id| id < s.ids.len()) {
                        if !s.ids[id] {
                            s.ids[id] = true;
                            s.distinct += 1;
                        }
                    }
                }
                _ => s.other += 1,
            }
        },
    )
    .await;
    let s = seen.lock().unwrap();
    println!(
        "read back {} messages in {:.1} s: {} invalidate events for {} distinct rows, {} heartbeats, {} other",
        thousands(read),
        t.elapsed().as_secs_f64(),
        thousands(s.invalidate),
        thousands(s.distinct),
        s.heartbeats,
        s.other
    );
    let mut problems = Vec::new();
    if s.distinct != rows as u64 {
        problems.push(format!(
            "events for {} distinct rows on the topic, {rows} inserted",
            s.distinct
        ));
    }
    problems
}
