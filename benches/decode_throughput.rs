//! Decode throughput on single-row updates (1,000,000 by default), beside
//! `pg_recvlogical` reading the same WAL through a twin slot in the same run.
//!
//!     cargo bench --bench decode_throughput
//!     W2C_BENCH_ROWS=20000 cargo bench --bench decode_throughput
//!
//! Setup: a table of `W2C_BENCH_TABLE_ROWS` rows (10,000), a FOR ALL TABLES
//! publication and, before any write, one pair of pgoutput slots per round
//! (`W2C_BENCH_ROUNDS`, 1). Then `W2C_BENCH_ROWS` transactions of one UPDATE each
//! (a procedure that COMMITs in its loop), and the end LSN. Each round reads that
//! WAL twice, on its own slots: `pg_recvlogical` (output to /dev/null, so only the
//! server's decoding, the protocol and the client's copy) and our `Source` (every
//! change fully decoded into a typed row, every commit confirmed). Even rounds run
//! `pg_recvlogical` first, odd rounds ours first: the first reader of a round finds
//! the WAL already in the OS cache (it was just written) but is the first to read it
//! back through a walsender.
//!
//! Printed: changes, seconds, changes/s for each side and the ratio ours/pg_recvlogical,
//! with the CPU seconds of the client (our process, or pg_recvlogical) and of the
//! walsender that served it (sampled from /proc every 100 ms, so a little low),
//! then the peak RSS of this process.
//!
//! Env: `W2C_BENCH_RUNTIME=current_thread` runs everything of this process on one
//! thread (default `multi_thread`, one worker per core); `WAL2CACHE_TEST_PG` (server;
//! a database `w2c_bench_decode_<pid>_...` is created and dropped with its slots);
//! `PG_RECVLOGICAL` (the binary; default: PostgreSQL 15's, then the PATH).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    env_usize, mib, proc_status_kb, process_ticks, run_pg_recvlogical, stat_fields, thousands,
    ticks_to_secs, BoxError,
};
use support::db::{active_pid, connect, TestDb};
use wal2cache::source::{PgTarget, Source, SourceEvent, StreamConfig, Value};
use wal2cache::Lsn;

const PUBLICATION: &str = "w2c_bench_pub";
const TABLE: &str = "bench_t";

fn main() {
    let updates = env_usize("W2C_BENCH_ROWS", 1_000_000);
    let table_rows = env_usize("W2C_BENCH_TABLE_ROWS", 10_000).max(1);
    let rounds = env_usize("W2C_BENCH_ROUNDS", 1).max(1);
    // `current_thread` puts the replication worker, the Source's task and the
    // consumer on one thread: no cross-thread wake-ups (a comparison, not the daemon's
    // setup).
    let flavor = std::env::var("W2C_BENCH_RUNTIME").unwrap_or_else(|_| "multi_thread".into());
    let mut builder = match flavor.as_str() {
        "multi_thread" => tokio::runtime::Builder::new_multi_thread(),
        "current_thread" => tokio::runtime::Builder::new_current_thread(),
        other => panic!("W2C_BENCH_RUNTIME={other:?}: multi_thread or current_thread"),
    };
    let rt = builder.enable_all().build().expect("tokio runtime");
    eprintln!("tokio runtime: {flavor}");
    let db = rt.block_on(TestDb::new("bench_decode"));
    // Ctrl-C still drops the database and its slots.
    let result = rt.block_on(async {
        tokio::select! {
            result = run(&db, updates, table_rows, rounds) => result,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    drop(db);
    if let Err(e) = result {
        eprintln!("decode_throughput failed: {}", common::chain(&*e));
        std::process::exit(1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    PgRecvlogical,
    Ours,
}

impl Reader {
    fn label(self) -> &'static str {
        match self {
            Reader::PgRecvlogical => "pg_recvlogical",
            Reader::Ours => "wal2cache Source",
        }
    }
}

struct Measured {
    reader: Reader,
    round: usize,
    changes: u64,
    elapsed: Duration,
    client_cpu: f64,
    /// User and system time of the client, and for ours its context switches.
    client_detail: String,
    walsender_cpu: f64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.changes as f64 / self.elapsed.as_secs_f64()
    }
}

async fn run(
    db: &TestDb,
    updates: usize,
    table_rows: usize,
    rounds: usize,
) -> Result<(), BoxError> {
    let row = db
        .client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('logical_decoding_work_mem'),
                    current_setting('synchronous_commit'), current_setting('fsync')",
            &[],
        )
        .await?;
    let (version, work_mem, sync_commit, fsync): (String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    println!("decode_throughput: {} single-row UPDATE transactions on a table of {} rows, {rounds} round(s)",
        thousands(updates as u64), thousands(table_rows as u64));
    println!(
        "server: PostgreSQL {version}, logical_decoding_work_mem={work_mem}, synchronous_commit={sync_commit}, fsync={fsync}; database {}",
        db.name
    );

    db.client
        .batch_execute(&format!(
            "CREATE TABLE {TABLE} (id int PRIMARY KEY, v int NOT NULL, note text);
             INSERT INTO {TABLE} SELECT i, 0, 'note ' || i FROM generate_series(1, {table_rows}) i;
             CREATE PROCEDURE bench_updates(n int, nrows int) LANGUAGE plpgsql AS $$
             BEGIN
               FOR i IN 1..n LOOP
                 UPDATE {TABLE} SET v = v + 1 WHERE id = 1 + i % nrows;
                 COMMIT;
               END LOOP;
             END $$;
             CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES;"
        ))
        .await?;
    db.client
        .batch_execute(&format!("VACUUM ANALYZE {TABLE}"))
        .await?;
    let mut slots = Vec::new();
    for r in 0..rounds {
        slots.push((
            db.create_slot(&format!("pg{r}")).await,
            db.create_slot(&format!("ours{r}")).await,
        ));
    }

    // The writes: one transaction per UPDATE, committed inside the procedure's loop.
    let start_lsn = db.current_lsn().await;
    eprintln!("writing {} transactions...", thousands(updates as u64));
    let t = Instant::now();
    db.client
        .batch_execute(&format!("CALL bench_updates({updates}, {table_rows})"))
        .await?;
    let write_time = t.elapsed();
    let end_lsn = db.current_lsn().await;
    let wal = db.wal_bytes_since(start_lsn).await;
    println!(
        "write: {} transactions in {:.2} s = {:.0} txn/s; WAL {start_lsn} .. {end_lsn} = {:.1} MiB",
        thousands(updates as u64),
        write_time.as_secs_f64(),
        updates as f64 / write_time.as_secs_f64(),
        wal as f64 / (1024.0 * 1024.0)
    );

    let mut results = Vec::new();
    for (r, (pg_slot, our_slot)) in slots.iter().enumerate() {
        let order = if r % 2 == 0 {
            [Reader::PgRecvlogical, Reader::Ours]
        } else {
            [Reader::Ours, Reader::PgRecvlogical]
        };
        for reader in order {
            eprintln!("round {r}: reading with {}...", reader.label());
            let m = match reader {
                Reader::PgRecvlogical => {
                    read_pg_recvlogical(db, pg_slot, end_lsn, updates as u64, r).await?
                }
                Reader::Ours => read_ours(db, our_slot, end_lsn, updates as u64, r).await?,
            };
            println!(
                "round {r} {:<16}: {} changes in {:.3} s = {:.0} changes/s; CPU: client {:.2} s ({}), walsender {:.2} s",
                reader.label(),
                thousands(m.changes),
                m.elapsed.as_secs_f64(),
                m.rate(),
                m.client_cpu,
                m.client_detail,
                m.walsender_cpu
            );
            results.push(m);
        }
    }

    println!("---");
    for r in 0..rounds {
        let of = |reader| {
            results
                .iter()
                .find(|m| m.round == r && m.reader == reader)
                .unwrap()
        };
        let (pg, ours) = (of(Reader::PgRecvlogical), of(Reader::Ours));
        println!(
            "round {r} ({} first): ours {:.0} changes/s / pg_recvlogical {:.0} changes/s = ratio {:.3}",
            if r % 2 == 0 { "pg_recvlogical" } else { "ours" },
            ours.rate(),
            pg.rate(),
            ours.rate() / pg.rate()
        );
    }
    if rounds > 1 {
        let total = |reader| {
            let ms: Vec<_> = results.iter().filter(|m| m.reader == reader).collect();
            let changes: u64 = ms.iter().map(|m| m.changes).sum();
            let secs: f64 = ms.iter().map(|m| m.elapsed.as_secs_f64()).sum();
            changes as f64 / secs
        };
        let (pg, ours) = (total(Reader::PgRecvlogical), total(Reader::Ours));
        println!(
            "all rounds: ours {ours:.0} changes/s / pg_recvlogical {pg:.0} changes/s = ratio {:.3}",
            ours / pg
        );
    }
    println!(
        "peak RSS (VmHWM) of the bench process: {}; VmRSS now {}",
        mib(proc_status_kb("VmHWM")),
        mib(proc_status_kb("VmRSS"))
    );
    Ok(())
}

/// Our reader: a `Source` on its own slot, every change decoded into a typed row, every
/// commit confirmed, until the commit of the last update.
async fn read_ours(
    db: &TestDb,
    slot: &str,
    end_lsn: Lsn,
    expected: u64,
    round: usize,
) -> Result<Measured, BoxError> {
    let config = StreamConfig::new(PgTarget::parse(&db.url)?, slot, PUBLICATION);
    let sampler = WalsenderSampler::start(db, slot).await;
    let cpu0 = cpu_ticks();
    let start = Instant::now();
    let mut source = Source::start(config, Lsn::ZERO);
    let mut changes = 0u64;
    let mut commits = 0u64;
    let mut text_bytes = 0usize;
    let result: Result<(), BoxError> = async {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(300), source.next())
                .await
                .map_err(|_| format!("no event for 300 s after {changes} changes"))?;
            match event {
                None => return Err("the source ended".into()),
                Some(Err(e)) => {
                    return Err(format!("the source failed after {changes} changes: {e}").into())
                }
                Some(Ok(SourceEvent::Change(c))) => {
                    changes += 1;
                    // Touch what was decoded, so nothing of it is left unused.
                    if let Some(row) = &c.new {
                        for v in &row.0 {
                            if let Value::Text(b) = v {
                                text_bytes += b.len();
                            }
                        }
                    }
                }
                Some(Ok(SourceEvent::Commit(commit))) => {
                    commits += 1;
                    source.confirm(commit.end_lsn);
                    // The end LSN may lie past the last commit when other databases wrote
                    // meanwhile: the count of changes ends the run then.
                    if changes >= expected || commit.end_lsn >= end_lsn {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
            }
        }
    }
    .await;
    let elapsed = start.elapsed();
    let cpu1 = cpu_ticks();
    let client_cpu = ticks_to_secs(cpu1.self_user + cpu1.self_sys - cpu0.self_user - cpu0.self_sys);
    let client_detail = format!(
        "user {:.2} s, sys {:.2} s, {} voluntary + {} involuntary context switches",
        ticks_to_secs(cpu1.self_user - cpu0.self_user),
        ticks_to_secs(cpu1.self_sys - cpu0.self_sys),
        thousands(cpu1.voluntary - cpu0.voluntary),
        thousands(cpu1.involuntary - cpu0.involuntary),
    );
    let walsender_cpu = sampler.stop().await;
    source.stop().await;
    result?;
    if changes != expected {
        eprintln!("warning: ours read {changes} changes, {expected} expected");
    }
    eprintln!("ours: {commits} commits, {text_bytes} bytes of text values");
    Ok(Measured {
        reader: Reader::Ours,
        round,
        changes,
        elapsed,
        client_cpu,
        client_detail,
        walsender_cpu,
    })
}

/// `pg_recvlogical` on its own slot, with the same pgoutput options as ours, output to
/// /dev/null, until it passes the end LSN. It reports its position as it goes, so the
/// slot moves like ours.
async fn read_pg_recvlogical(
    db: &TestDb,
    slot: &str,
    end_lsn: Lsn,
    expected: u64,
    round: usize,
) -> Result<Measured, BoxError> {
    let sampler = WalsenderSampler::start(db, slot).await;
    let cpu0 = cpu_ticks();
    let (status, elapsed) =
        run_pg_recvlogical(&db.url, slot, PUBLICATION, end_lsn, async || Ok(())).await?;
    let cpu1 = cpu_ticks();
    let client_cpu =
        ticks_to_secs(cpu1.child_user + cpu1.child_sys - cpu0.child_user - cpu0.child_sys);
    let client_detail = format!(
        "user {:.2} s, sys {:.2} s",
        ticks_to_secs(cpu1.child_user - cpu0.child_user),
        ticks_to_secs(cpu1.child_sys - cpu0.child_sys),
    );
    let walsender_cpu = sampler.stop().await;
    if !status.success() {
        return Err(format!("pg_recvlogical failed: {status}").into());
    }
    let left = db.confirmed_lsn(slot).await.map(|l| l.to_string());
    eprintln!("pg_recvlogical: exited {status}; slot confirmed_flush_lsn {left:?}");
    Ok(Measured {
        reader: Reader::PgRecvlogical,
        round,
        // The same WAL through a twin slot: the same changes.
        changes: expected,
        elapsed,
        client_cpu,
        client_detail,
        walsender_cpu,
    })
}

/// CPU time, in clock ticks, of this process (all its threads) and of its waited-for
/// children, and the context switches of this process.
struct CpuTicks {
    self_user: u64,
    self_sys: u64,
    child_user: u64,
    child_sys: u64,
    voluntary: u64,
    involuntary: u64,
}

fn cpu_ticks() -> CpuTicks {
    let f = stat_fields("self").unwrap_or_default();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // utime 14, stime 15, cutime 16, cstime 17.
    // Context switches of every thread: /proc/self/status counts only the main one's.
    let (mut voluntary, mut involuntary) = (0, 0);
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            for line in status.lines() {
                let value = |l: &str| {
                    l.split(':')
                        .nth(1)
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                if line.starts_with("voluntary_ctxt_switches") {
                    voluntary += value(line);
                } else if line.starts_with("nonvoluntary_ctxt_switches") {
                    involuntary += value(line);
                }
            }
        }
    }
    CpuTicks {
        self_user: at(11),
        self_sys: at(12),
        child_user: at(13),
        child_sys: at(14),
        voluntary,
        involuntary,
    }
}

/// Follows the CPU time of the walsender serving a slot (from /proc, every 100 ms),
/// over its own connection.
struct WalsenderSampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    last: Arc<Mutex<HashMap<i32, u64>>>,
}

impl WalsenderSampler {
    async fn start(db: &TestDb, slot: &str) -> WalsenderSampler {
        let client = connect(&db.url).await;
        let slot = slot.to_string();
        let last: Arc<Mutex<HashMap<i32, u64>>> = Arc::default();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let seen = last.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(Some(pid)) = active_pid(&client, &slot).await {
                    if let Some(ticks) = process_ticks(pid) {
                        seen.lock().unwrap().insert(pid, ticks);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.wait_for(|s| *s) => return,
                }
            }
        });
        WalsenderSampler { stop, task, last }
    }

    /// CPU seconds of every walsender seen on the slot, as last sampled.
    async fn stop(self) -> f64 {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let total: u64 = self.last.lock().unwrap().values().sum();
        ticks_to_secs(total)
    }
}
