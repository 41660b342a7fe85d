//! Catch-up: 1,000,000 single-row UPDATE transactions written while the daemon is
//! stopped; then `wal2cache run` starts and is timed until its slot's confirmed
//! position passes the last of them, end to end into Redis and Kafka. Beside it, in
//! the same run, `pg_recvlogical` reads the same WAL through a twin pgoutput slot (the
//! decoding limit of Postgres itself). Target: the daemon at least 0.8 of its rate.
//!
//!     cargo bench --bench catchup
//!     W2C_BENCH_ROWS=20000 cargo bench --bench catchup
//!
//! The daemon is the `wal2cache` binary of this checkout: cargo builds it (bench
//! profile, into target/release/) before running the bench and passes its path in
//! `CARGO_BIN_EXE_wal2cache`; `W2C_BENCH_BIN` runs another one.
//!
//! Setup: a table `items` of `W2C_BENCH_TABLE_ROWS` rows (10,000, REPLICA IDENTITY
//! FULL) and two rules on it (benches/common/daemon.rs): a delete rule with two keys
//! and a tag, and a republish rule with a projection and a TTL. `wal2cache setup`
//! creates the publication and the daemon's slot, then a twin pgoutput slot is made,
//! before any write. A few rows get stale keys and a tagged page in Redis.
//! Writes: `W2C_BENCH_ROWS - 1` transactions of one UPDATE each (a procedure that
//! COMMITs in its loop), then one more, the marker: the end of its commit record
//! (found with `pg_walinspect`, see `Marker` in benches/common/daemon.rs) is the
//! position the daemon confirms once it applied everything.
//!
//! Measured: `pg_recvlogical` (pgoutput proto 1, output to /dev/null) on the twin
//! slot until the end of the WAL; then `wal2cache run`, from its spawn until
//! `pg_replication_slots.confirmed_flush_lsn` of its slot reaches the marker (polled
//! every 100 ms; the daemon reports its position every 500 ms at most, so the time
//! is up to ~0.6 s long); then SIGTERM. `W2C_BENCH_DAEMON_FIRST=1` runs the daemon
//! first. Printed: both rates and the ratio, the daemon's startup time, its CPU, its
//! peak RSS (VmHWM just before SIGTERM); then checks: the republished keys of a
//! sample of rows hold their final row, the stale keys and the tagged page are gone,
//! and the topic, read back whole, holds one event per transaction and per row as many
//! as it had updates (`W2C_BENCH_CONSUME=0` skips reading it back).
//!
//! Env: `W2C_BENCH_ROWS` (1,000,000), `W2C_BENCH_TABLE_ROWS` (10,000),
//! `W2C_BENCH_BATCH_DEADLINE`, `W2C_BENCH_BATCH_SIZE`, `W2C_BENCH_KAFKA_PROPS`
//! (`k=v,k=v`), `W2C_BENCH_DAEMON_LOG` (the daemon's `WAL2CACHE_LOG`, `info`),
//! `WAL2CACHE_TEST_PG` / `_REDIS` / `_KAFKA`, `PG_RECVLOGICAL`. The database
//! `w2c_bench_catchup_<pid>` is dropped with its slots, the Redis keys under
//! `w2cb_catchup_<pid>` are deleted, the topic `w2cb-catchup-<pid>` is deleted (or
//! stays where the broker cannot delete topics).

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{env_usize, mib, thousands, BenchDb, BoxError};
use daemon::{Daemon, Setup, Tuning};
use redis::AsyncCommands;
use serde_json::{json, Value};
use wal2cache::Lsn;

fn main() {
    let rows = env_usize("W2C_BENCH_ROWS", 1_000_000).max(2);
    let table_rows = env_usize("W2C_BENCH_TABLE_ROWS", 10_000).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut db = match rt.block_on(BenchDb::create("catchup")) {
        Ok(db) => db,
        Err(e) => {
            eprintln!("catchup: {}", common::chain(&*e));
            std::process::exit(1);
        }
    };
    let tuning = Tuning::from_env();
    let setup = match Setup::write(&db, "catchup", &tuning) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("catchup: {}", common::chain(&*e));
            std::process::exit(1);
        }
    };
    // Ctrl-C still cleans up.
    let result = rt.block_on(async {
        tokio::select! {
            result = run(&mut db, &setup, &tuning, rows, table_rows) => result,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    rt.block_on(daemon::cleanup(&setup));
    drop(db);
    if let Err(e) = result {
        eprintln!(
            "the config and the daemon's log are kept in {}",
            setup.keep().display()
        );
        eprintln!("catchup failed: {}", common::chain(&*e));
        std::process::exit(1);
    }
}

async fn run(
    db: &mut BenchDb,
    setup: &Setup,
    tuning: &Tuning,
    rows: usize,
    table_rows: usize,
) -> Result<(), BoxError> {
    let row = db
        .client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'),
                    current_setting('fsync')",
            &[],
        )
        .await?;
    let (version, sync_commit, fsync): (String, String, String) =
        (row.get(0), row.get(1), row.get(2));
    println!(
        "catchup: {} single-row UPDATE transactions on a table of {} rows (REPLICA IDENTITY FULL), 2 rules: delete 2 keys + 1 tag, republish a 4-column projection",
        thousands(rows as u64),
        thousands(table_rows as u64)
    );
    println!(
        "server: PostgreSQL {version}, synchronous_commit={sync_commit}, fsync={fsync}; database {}; daemon {}",
        db.name,
        daemon::binary()
    );
    println!("daemon tuning: {}", tuning.describe());
    println!("load average at start: {}", daemon::load_average());

    db.client.batch_execute(daemon::TABLE_SQL).await?;
    db.client
        .batch_execute(&daemon::fill_sql(table_rows))
        .await?;
    db.client.batch_execute("VACUUM ANALYZE items").await?;
    db.client
        .batch_execute(
            "CREATE PROCEDURE bench_updates(n int, nrows int) LANGUAGE plpgsql AS $$
             BEGIN
               FOR i IN 1..n LOOP
                 UPDATE items SET price = price + 0.01, stock = stock + 1 WHERE id = 1 + i % nrows;
                 COMMIT;
               END LOOP;
             END $$;",
        )
        .await?;
    let out = setup.run_setup()?;
    eprintln!("wal2cache setup: {out}");
    let twin = db.create_slot("pg").await?;

    // What an application cached for a few rows: the delete rule's keys, and a page
    // under the category tag.
    let sample: Vec<i32> = {
        let mut s = vec![1, (table_rows as i32 / 2).max(1), table_rows as i32];
        s.dedup();
        s
    };
    let p = &setup.prefix;
    let mut r = daemon::redis_conn().await?;
    let mut stale = Vec::new();
    for &id in &sample {
        let (slug, category): (String, i32) = {
            let row = db
                .client
                .query_one("SELECT slug, category_id FROM items WHERE id = $1", &[&id])
                .await?;
            (row.get(0), row.get(1))
        };
        for key in [
            format!("{p}:item:v1:{id}"),
            format!("{p}:item:slug:v1:{slug}"),
            format!("{p}:page:category:{category}"),
        ] {
            let _: () = r.set(&key, "stale").await?;
            stale.push(key);
        }
        let _: () = r
            .sadd(
                format!("{p}:tag:{p}:category:{category}"),
                format!("{p}:page:category:{category}"),
            )
            .await?;
    }

    // The writes.
    let start_lsn = db.current_lsn().await?;
    eprintln!("writing {} transactions...", thousands(rows as u64));
    let t = Instant::now();
    db.client
        .batch_execute(&format!("CALL bench_updates({}, {table_rows})", rows - 1))
        .await?;
    let marker = daemon::marker_update(db, 1).await?;
    let write_time = t.elapsed();
    let end_lsn = db.current_lsn().await?;
    let wal = db.wal_bytes_since(start_lsn).await?;
    println!(
        "write: {} transactions in {:.2} s = {:.0} txn/s; WAL {start_lsn} .. {end_lsn} = {:.1} MiB; marker {marker}",
        thousands(rows as u64),
        write_time.as_secs_f64(),
        rows as f64 / write_time.as_secs_f64(),
        wal as f64 / (1024.0 * 1024.0)
    );

    let daemon_first = std::env::var("W2C_BENCH_DAEMON_FIRST").is_ok_and(|v| v == "1");
    let (pg, ours) = if daemon_first {
        let ours = read_daemon(db, setup, marker, rows).await?;
        let pg = read_pg_recvlogical(db, &twin, end_lsn, rows).await?;
        (pg, ours)
    } else {
        let pg = read_pg_recvlogical(db, &twin, end_lsn, rows).await?;
        let ours = read_daemon(db, setup, marker, rows).await?;
        (pg, ours)
    };

    // Checks.
    let mut problems = Vec::new();
    for &id in sample.iter() {
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
    for key in &stale {
        if r.exists::<_, bool>(key).await? {
            problems.push(format!("{key} is still cached"));
        }
    }
    // Tansu 0.6 reports a partition's high watermark as the base offset of its last
    // batch (the records of that batch are not counted), so the watermarks are only
    // a lower bound: the topic is read back whole to count the events.
    let marks = daemon::topic_watermarks(&setup.topic).await?;
    let watermark_sum: i64 = marks.iter().map(|(_, lo, hi)| hi - lo).sum();
    println!(
        "topic {}: {} partitions, high - low watermarks {} ({}); {} changes written",
        setup.topic,
        marks.len(),
        thousands(watermark_sum as u64),
        marks
            .iter()
            .map(|(p, lo, hi)| format!("p{p} {lo}..{hi}"))
            .collect::<Vec<_>>()
            .join(", "),
        thousands(rows as u64),
    );
    let events = if std::env::var("W2C_BENCH_CONSUME").is_ok_and(|v| v == "0") {
        if watermark_sum < rows as i64 {
            println!("note: fewer than one event per change by the watermarks (not read back: W2C_BENCH_CONSUME=0)");
        }
        watermark_sum as u64
    } else {
        let (events, found) = read_back(&setup.topic, p, rows, table_rows).await?;
        problems.extend(found);
        events
    };

    println!("---");
    println!(
        "pg_recvlogical (twin slot):    {} changes in {:.3} s = {:.0} changes/s; CPU {:.2} s",
        thousands(rows as u64),
        pg.elapsed.as_secs_f64(),
        pg.rate(),
        pg.cpu
    );
    println!(
        "wal2cache run (Redis + Kafka): {} changes in {:.3} s = {:.0} changes/s (streaming after {:.3} s; {:.0} changes/s from then); CPU {:.2} s ({:.0}% of one core), {} threads; peak RSS (VmHWM) {}",
        thousands(rows as u64),
        ours.elapsed.as_secs_f64(),
        ours.rate(),
        ours.startup.as_secs_f64(),
        rows as f64 / (ours.elapsed - ours.startup).as_secs_f64(),
        ours.cpu,
        100.0 * ours.cpu / ours.elapsed.as_secs_f64(),
        ours.threads,
        mib(ours.vm_hwm_kb)
    );
    let ratio = ours.rate() / pg.rate();
    println!(
        "ratio wal2cache / pg_recvlogical = {ratio:.3} ({} first): target >= 0.8: {}",
        if daemon_first {
            "daemon"
        } else {
            "pg_recvlogical"
        },
        if ratio >= 0.8 { "MET" } else { "NOT MET" }
    );
    println!(
        "daemon stop: exit {} after {:.2} s",
        ours.exit, ours.stop_secs
    );
    if !ours.log_problems.is_empty() {
        println!(
            "daemon log: {} warning/error lines, the first: {}",
            ours.log_problems.len(),
            ours.log_problems[0]
        );
    }
    if problems.is_empty() {
        println!(
            "checks: ok ({} republished keys hold the final row, {} stale keys gone, {} events)",
            sample.len(),
            stale.len(),
            thousands(events)
        );
        Ok(())
    } else {
        for p in &problems {
            println!("check FAILED: {p}");
        }
        Err(format!("{} check(s) failed", problems.len()).into())
    }
}

struct Pg {
    rows: usize,
    elapsed: Duration,
    cpu: f64,
}

impl Pg {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
}

struct Ours {
    rows: usize,
    elapsed: Duration,
    startup: Duration,
    cpu: f64,
    threads: u64,
    vm_hwm_kb: u64,
    exit: String,
    stop_secs: f64,
    log_problems: Vec<String>,
}

impl Ours {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
}

async fn read_daemon(
    db: &BenchDb,
    setup: &Setup,
    marker: daemon::Marker,
    rows: usize,
) -> Result<Ours, BoxError> {
    eprintln!(
        "starting wal2cache run (load average {})...",
        daemon::load_average()
    );
    let mut d = Daemon::start(setup)?;
    let progress = daemon::wait_confirmed(
        db,
        &setup.slot,
        marker,
        &mut d,
        Duration::from_secs(120),
        Duration::from_secs(3600),
    )
    .await
    .inspect_err(|_| {
        eprintln!("the daemon's log: {}", setup.log.display());
    })?;
    let cpu = d.cpu_secs();
    let threads = d.threads();
    let vm_hwm_kb = d.status_kb("VmHWM");
    let (status, stop) = d.stop(Duration::from_secs(90)).await?;
    let startup = progress
        .active_after
        .unwrap_or(Duration::ZERO)
        .min(progress.elapsed);
    eprintln!(
        "wal2cache: confirmed up to {marker} after {:.3} s (slot active after {:.3} s, first confirmation after {:.3} s); VmRSS samples (MiB): {}",
        progress.elapsed.as_secs_f64(),
        startup.as_secs_f64(),
        progress.first_move_after.unwrap_or_default().as_secs_f64(),
        rss_samples(&progress.rss)
    );
    Ok(Ours {
        rows,
        elapsed: progress.elapsed,
        startup,
        cpu,
        threads,
        vm_hwm_kb,
        exit: status
            .code()
            .map_or_else(|| status.to_string(), |c| c.to_string()),
        stop_secs: stop.as_secs_f64(),
        log_problems: d.log_problems(),
    })
}

/// About ten VmRSS samples spread over the run.
fn rss_samples(rss: &[(Duration, u64)]) -> String {
    let step = (rss.len() / 10).max(1);
    rss.iter()
        .step_by(step)
        .chain(rss.last())
        .map(|(t, kb)| format!("{:.0}s:{:.1}", t.as_secs_f64(), *kb as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(" ")
}

fn pg_recvlogical_binary() -> String {
    if let Ok(b) = std::env::var("PG_RECVLOGICAL") {
        return b;
    }
    let pg15 = "/usr/lib/postgresql/15/bin/pg_recvlogical";
    if Path::new(pg15).exists() {
        pg15.into()
    } else {
        "pg_recvlogical".into()
    }
}

/// `pg_recvlogical` on the twin slot, with the pgoutput options the daemon uses, output
/// to /dev/null, until it passes the end LSN.
async fn read_pg_recvlogical(
    db: &BenchDb,
    slot: &str,
    end_lsn: Lsn,
    rows: usize,
) -> Result<Pg, BoxError> {
    eprintln!(
        "reading with pg_recvlogical (load average {})...",
        daemon::load_average()
    );
    let cpu0 = daemon::children_cpu_secs();
    let start = Instant::now();
    let mut child = Command::new(pg_recvlogical_binary())
        .args(["-d", &db.url, "--slot", slot, "--start", "--no-loop"])
        .args(["-o", "proto_version=1", "-o", "publication_names=w2c_bench"])
        .args(["-o", "messages=true", "--endpos"])
        .arg(end_lsn.to_string())
        .args(["-F", "0", "-f", "/dev/null"])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", pg_recvlogical_binary()))?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("pg_recvlogical still running after an hour: killed".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let elapsed = start.elapsed();
    let cpu = daemon::children_cpu_secs() - cpu0;
    if !status.success() {
        return Err(format!("pg_recvlogical failed: {status}").into());
    }
    Ok(Pg { rows, elapsed, cpu })
}

/// Reads the whole topic back: one invalidate event per transaction (distinct commit
/// LSNs), and per row as many events as updates it had.
async fn read_back(
    topic: &str,
    prefix: &str,
    rows: usize,
    table_rows: usize,
) -> Result<(u64, Vec<String>), BoxError> {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    #[derive(Default)]
    struct Seen {
        heartbeats: u64,
        invalidate: u64,
        lsns: HashSet<String>,
        per_id: HashMap<i64, u64>,
        other: Vec<String>,
    }
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let s2 = seen.clone();
    let key_prefix = format!("{prefix}:item:v1:");
    let t = Instant::now();
    let (read, ends) = daemon::consume_topic(
        topic,
        Duration::from_secs(2),
        Duration::from_secs(600),
        move |_, _, payload| {
            let mut s = s2.lock().unwrap();
            let Ok(v) = serde_json::from_slice::<Value>(payload) else {
                s.other.push(String::from_utf8_lossy(payload).into_owned());
                return;
            };
            match v["kind"].as_str() {
                Some("heartbeat") => s.heartbeats += 1,
                Some("invalidate") => {
                    s.invalidate += 1;
                    if let Some(lsn) = v["lsn"].as_str() {
                        s.lsns.insert(lsn.to_string());
                    }
                    let id = v["keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .find_map(|k| k.strip_prefix(&key_prefix)?.parse::<i64>().ok());
                    if let Some(id) = id {
                        *s.per_id.entry(id).or_default() += 1;
                    }
                }
                _ => s.other.push(v.to_string()),
            }
        },
    )
    .await?;
    let s = seen.lock().unwrap();
    println!(
        "read back {} messages in {:.1} s: {} invalidate events ({} distinct commit LSNs), {} heartbeats, {} other{}",
        thousands(read),
        t.elapsed().as_secs_f64(),
        thousands(s.invalidate),
        thousands(s.lsns.len() as u64),
        s.heartbeats,
        s.other.len(),
        ends.iter()
            .map(|(p, hi, n)| format!("; p{p}: high watermark {hi}, read to {n}"))
            .collect::<String>()
    );
    let mut problems = Vec::new();
    if s.lsns.len() != rows {
        problems.push(format!(
            "{} distinct transactions on the topic, {rows} written",
            s.lsns.len()
        ));
    }
    // The procedure updated row 1 + i % table_rows for i in 1..rows, the marker row 1.
    let mut expected: HashMap<i64, u64> = HashMap::new();
    for i in 1..rows {
        *expected.entry(1 + (i % table_rows) as i64).or_default() += 1;
    }
    *expected.entry(1).or_default() += 1;
    let mut short_ids: Vec<(i64, u64, u64)> = expected
        .iter()
        .filter_map(|(id, want)| {
            let got = s.per_id.get(id).copied().unwrap_or(0);
            (got < *want).then_some((*id, got, *want))
        })
        .collect();
    short_ids.sort();
    if !short_ids.is_empty() {
        problems.push(format!(
            "{} rows have fewer events than updates, e.g. (id, events, updates): {:?}",
            short_ids.len(),
            &short_ids[..short_ids.len().min(10)]
        ));
    }
    if !s.other.is_empty() {
        problems.push(format!("unexpected messages, e.g. {}", s.other[0]));
    }
    Ok((s.invalidate, problems))
}
