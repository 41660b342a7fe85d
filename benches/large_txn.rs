//! A single transaction of 500,000 inserted rows (about 100 bytes of text each)
//! streams through the `Source` with bounded memory: prints the RSS of this process
//! before streaming, its peak (VmHWM) after, samples of VmRSS along the way, and the
//! time taken.
//!
//!     cargo bench --bench large_txn
//!     W2C_BENCH_TXN_ROWS=1000000 cargo bench --bench large_txn
//!
//! The rows are inserted by the server (INSERT ... SELECT generate_series), so the
//! bench process stays small until it streams: VmHWM, the process-lifetime peak, is
//! the streaming's peak. Postgres decodes the whole transaction before sending any of
//! it (pgoutput protocol 1 does not stream transactions in progress): it spills to disk
//! past `logical_decoding_work_mem`, and the first change arrives only then.
//!
//! Env: `W2C_BENCH_TXN_ROWS` (500,000), `WAL2CACHE_TEST_PG` (server; a database
//! `w2c_bench_txn_<pid>_...` is created and dropped with its slot).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{env_usize, mib, proc_status_kb, thousands, BoxError};
use support::db::TestDb;
use wal2cache::source::{Op, PgTarget, Source, SourceEvent, StreamConfig, Value};
use wal2cache::Lsn;

const PUBLICATION: &str = "w2c_bench_pub";

fn main() {
    let rows = env_usize("W2C_BENCH_TXN_ROWS", 500_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let db = rt.block_on(TestDb::new("bench_txn"));
    // Ctrl-C still drops the database and its slots.
    let result = rt.block_on(async {
        tokio::select! {
            result = run(&db, rows as u64) => result,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    drop(db);
    if let Err(e) = result {
        eprintln!("large_txn failed: {}", common::chain(&*e));
        std::process::exit(1);
    }
}

async fn run(db: &TestDb, rows: u64) -> Result<(), BoxError> {
    let work_mem: String = db
        .client
        .query_one("SELECT current_setting('logical_decoding_work_mem')", &[])
        .await?
        .get(0);
    println!(
        "large_txn: {} rows inserted in one transaction; logical_decoding_work_mem={work_mem}; database {}",
        thousands(rows),
        db.name
    );
    db.client
        .batch_execute(&format!(
            "CREATE TABLE bench_big (id bigint PRIMARY KEY, n int NOT NULL, payload text NOT NULL);
             CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES;"
        ))
        .await?;
    let slot = db.create_slot("big").await;

    let start_lsn = db.current_lsn().await;
    eprintln!("inserting {} rows in one transaction...", thousands(rows));
    let t = Instant::now();
    // 3 x md5 = 96 characters, plus a separator and the number: about 100 bytes a row.
    db.client
        .batch_execute(&format!(
            "INSERT INTO bench_big
             SELECT i, i % 1000, md5(i::text) || md5((i + 1)::text) || md5((i + 2)::text) || ':' || i
               FROM generate_series(1, {rows}) i"
        ))
        .await?;
    let insert_time = t.elapsed();
    let wal = db.wal_bytes_since(start_lsn).await;
    println!(
        "insert: {:.2} s; WAL {:.1} MiB",
        insert_time.as_secs_f64(),
        wal as f64 / (1024.0 * 1024.0)
    );

    let config = StreamConfig::new(PgTarget::parse(&db.url)?, &slot, PUBLICATION);
    let buffer = config.buffer;
    let rss_before = proc_status_kb("VmRSS");
    let hwm_before = proc_status_kb("VmHWM");
    println!(
        "before streaming: VmRSS {}, VmHWM {} (Source buffer {buffer} events)",
        mib(rss_before),
        mib(hwm_before)
    );

    let start = Instant::now();
    let mut source = Source::start(config, Lsn::ZERO);
    let mut changes = 0u64;
    let mut payload_bytes = 0u64;
    let mut first_change: Option<Duration> = None;
    let mut samples = Vec::new();
    let sample_every = (rows / 10).max(1);
    let result: Result<(), BoxError> = async {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(600), source.next())
                .await
                .map_err(|_| format!("no event for 600 s after {changes} changes"))?;
            match event {
                None => return Err("the source ended".into()),
                Some(Err(e)) => {
                    return Err(format!("the source failed after {changes} changes: {e}").into())
                }
                Some(Ok(SourceEvent::Change(c))) => {
                    if c.op != Op::Insert {
                        return Err(format!("unexpected {:?} change", c.op).into());
                    }
                    first_change.get_or_insert_with(|| start.elapsed());
                    changes += 1;
                    if let Some(row) = &c.new {
                        for v in &row.0 {
                            if let Value::Text(b) = v {
                                payload_bytes += b.len() as u64;
                            }
                        }
                    }
                    if changes.is_multiple_of(sample_every) {
                        samples.push((changes, proc_status_kb("VmRSS")));
                    }
                }
                Some(Ok(SourceEvent::Commit(commit))) => {
                    source.confirm(commit.end_lsn);
                    return Ok(());
                }
                Some(Ok(_)) => {}
            }
        }
    }
    .await;
    let elapsed = start.elapsed();
    let hwm_after = proc_status_kb("VmHWM");
    source.stop().await;
    result?;

    let first = first_change.unwrap_or_default();
    println!(
        "streamed: {} changes ({:.1} MiB of text values) in {:.3} s = {:.0} changes/s; first change after {:.3} s (server decoding), then {:.0} changes/s",
        thousands(changes),
        payload_bytes as f64 / (1024.0 * 1024.0),
        elapsed.as_secs_f64(),
        changes as f64 / elapsed.as_secs_f64(),
        first.as_secs_f64(),
        changes as f64 / (elapsed - first).as_secs_f64().max(1e-9),
    );
    let samples: Vec<String> = samples
        .iter()
        .map(|(n, kb)| format!("{}: {}", thousands(*n), mib(*kb)))
        .collect();
    println!(
        "VmRSS while streaming, by changes read: {}",
        samples.join(", ")
    );
    println!(
        "memory: VmRSS before streaming {}; peak (VmHWM) after streaming {}; growth of the peak over RSS before: {}",
        mib(rss_before),
        mib(hwm_after),
        mib(hwm_after.saturating_sub(rss_before))
    );
    if changes != rows {
        return Err(format!("read {changes} changes, {rows} inserted").into());
    }
    println!(
        "ok: {} changes = {} rows inserted",
        thousands(changes),
        thousands(rows)
    );
    Ok(())
}
