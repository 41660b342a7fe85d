//! Catch-up: 1,000,000 single-row UPDATE transactions written while the daemon is
//! stopped; then `wal2cache run` starts and is timed until its slot's confirmed
//! position passes the last of them, end to end into Redis and Kafka. Beside it, in
//! the same run, `pg_recvlogical` reads the same WAL through a twin pgoutput slot (the
//! decoding limit of Postgres itself). Target: the daemon at least 0.8 of its rate.
//!
//!     cargo bench --bench catchup
//!     W2C_BENCH_ROWS=20000 cargo bench --bench catchup
//!     W2C_BENCH_SHAPE=tags cargo bench --bench catchup
//!     W2C_BENCH_SHAPE=tags W2C_BENCH_KEYS=10 W2C_BENCH_ROWS=400000 cargo bench --bench catchup
//!     W2C_BENCH_SHAPE=tags W2C_BENCH_PERF=1 cargo bench --bench catchup
//!
//! The daemon is the `wal2cache` binary of this checkout: cargo builds it (bench
//! profile, into target/release/) before running the bench and passes its path in
//! `CARGO_BIN_EXE_wal2cache`; `W2C_BENCH_BIN` runs another one.
//!
//! Setup (the default shape, `W2C_BENCH_SHAPE` unset or `default`): a table `items` of
//! `W2C_BENCH_TABLE_ROWS` rows (10,000, REPLICA IDENTITY FULL) and two rules on it
//! (benches/common/daemon.rs): a delete rule with two keys and a tag, and a republish
//! rule with a projection and a TTL. `wal2cache setup` creates the publication and the
//! daemon's slot, then a twin pgoutput slot is made, before any write. A few rows get
//! stale keys and a tagged page in Redis.
//! Writes: `W2C_BENCH_ROWS - 1` transactions of one UPDATE each (a procedure that
//! COMMITs in its loop), then one more, the marker: the end of its commit record
//! (found with `pg_walinspect`, see `Marker` in benches/common/daemon.rs) is the
//! position the daemon confirms once it applied everything.
//!
//! The tag-heavy shape (`W2C_BENCH_SHAPE=tags`, benches/common/tags.rs; `W2C_BENCH_ROWS`
//! defaults to 200,000 there): `items` as above, and a second table `offers`
//! (`W2C_BENCH_OTHER_ROWS` rows, 1,000, default replica identity). Rules: ONE delete
//! rule on `items` with `W2C_BENCH_KEYS` key templates (1; `PFX:item:v1:{id}`, then
//! `PFX:item:k<j>:v1:{id}`) and one tag without placeholder, `PFX:list`, that every row
//! shares (a list page; `W2C_BENCH_TAGS` of them, 1: 0 drops the tag, more adds
//! `PFX:list:t<j>`); `W2C_BENCH_RULES - 1` more delete rules on `items` (0 by
//! default), one key each (`PFX:item:r<j>:v1:{id}`); a republish rule on `offers`
//! (a 4-column projection, TTL 1h). Writes: `W2C_BENCH_ROWS - 1` transactions from
//! `W2C_BENCH_WRITERS` (4) concurrent connections, each calling its own procedure that
//! commits per row; every `W2C_BENCH_OTHER_EVERY`-th (10th) transaction of each writer
//! updates an `offers` row instead of an `items` row (so 10% of the changes are
//! republishes; 0: none). After all writers finished, the marker (one more UPDATE of
//! `items`), whose commit is therefore the last. Before the writes the tag's set gets
//! `W2C_BENCH_TAG_MEMBERS` (1,000) cached pages, and a few rows all their keys: the
//! first purge has real work; the later ones find the set empty (the application
//! is not re-caching pages meanwhile).
//!
//! Measured: `pg_recvlogical` (pgoutput proto 1, output to /dev/null) on the twin
//! slot until the end of the WAL; then `wal2cache run`, from its spawn until
//! `pg_replication_slots.confirmed_flush_lsn` of its slot reaches the marker (polled
//! every 100 ms; the daemon reports its position every 500 ms at most, so the time
//! is up to ~0.6 s long); then SIGTERM. `W2C_BENCH_DAEMON_FIRST=1` runs the daemon
//! first. Printed: both rates and the ratio, the daemon's startup time, its CPU, its
//! peak RSS (VmHWM just before SIGTERM); CPU seconds used during each read, from
//! `/proc/PID/stat` (utime + stime, before and after) and in µs per change, of:
//! pg_recvlogical and the walsender serving it, and for the daemon's catch-up the
//! daemon, redis-server, the broker (the processes listening on the ports of
//! `WAL2CACHE_TEST_REDIS` and `WAL2CACHE_TEST_KAFKA`, or `W2C_BENCH_REDIS_PID` /
//! `W2C_BENCH_BROKER_PID`) and the walsender serving the daemon's slot
//! (`pg_replication_slots.active_pid`, a process the daemon's connection started, so
//! all its CPU is the catch-up's); Redis and the broker serve whoever else uses them
//! meanwhile. Also the Redis `INFO commandstats` differences over the catch-up (time
//! inside commands; a script's time includes the commands it calls). Then checks: the
//! republished keys of a sample of rows hold their final row, the stale keys (and in
//! the tags shape the tag's set and its pages) are gone, and the topic, read back
//! whole, holds one event per transaction and per row as many as it had updates
//! (`W2C_BENCH_CONSUME=0` skips reading it back). The daemon's batches (count, size,
//! time applying them) come from its /metrics at the end. The last line, `result: k=v ...`,
//! is for scripts (deploy/local/bench-scaling.sh).
//!
//! Profiling: `W2C_BENCH_PERF=1` attaches `perf record` (`W2C_BENCH_PERF_ARGS`,
//! default `-e cpu-clock -F 999 -g --call-graph dwarf`; output
//! `W2C_BENCH_PERF_OUT`, /tmp/w2c-catchup.perf.data) to the daemon once its slot is
//! active, until the marker is confirmed (perf's own CPU competes with the daemon's).
//! `W2C_BENCH_DAEMON_WRAPPER` runs the daemon under a wrapper, e.g.
//! `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out`.
//!
//! Env: `W2C_BENCH_SHAPE` (`default` or `tags`), `W2C_BENCH_ROWS` (1,000,000; tags:
//! 200,000), `W2C_BENCH_TABLE_ROWS` (10,000), tags only: `W2C_BENCH_KEYS` (1),
//! `W2C_BENCH_RULES` (1), `W2C_BENCH_TAGS` (1), `W2C_BENCH_WRITERS` (4), `W2C_BENCH_OTHER_EVERY` (10),
//! `W2C_BENCH_OTHER_ROWS` (1,000), `W2C_BENCH_TAG_MEMBERS` (1,000); both:
//! `W2C_BENCH_BATCH_DEADLINE`, `W2C_BENCH_BATCH_SIZE`, `W2C_BENCH_KAFKA_PROPS`
//! (`k=v,k=v`), `W2C_BENCH_DAEMON_LOG` (the daemon's `WAL2CACHE_LOG`, `info`),
//! `W2C_BENCH_DAEMON_FIRST`, `W2C_BENCH_CONSUME`, `W2C_BENCH_BIN`,
//! `W2C_BENCH_DAEMON_WRAPPER`, `W2C_BENCH_PERF`, `W2C_BENCH_PERF_ARGS`,
//! `W2C_BENCH_PERF_OUT`, `W2C_BENCH_REDIS_PID`, `W2C_BENCH_BROKER_PID`,
//! `WAL2CACHE_TEST_PG` / `_REDIS` / `_KAFKA`, `PG_RECVLOGICAL`. The database
//! `w2c_bench_catchup_<pid>_...` is dropped with its slots, the Redis keys under
//! `w2cb_catchup_<pid>` are deleted, the topic `w2cb-catchup-<pid>` is deleted (or
//! stays where the broker cannot delete topics).

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "common/tags.rs"]
mod tags;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    children_cpu_secs, env_usize, load_average, mib, port_of, process_cpu_secs, process_name,
    run_pg_recvlogical, status_field, thousands, BoxError, Observed,
};
use daemon::{BenchSetup, DaemonRun, Tuning};
use redis::AsyncCommands;
use serde_json::Value;
use support::db::{active_pid, connect, TestDb};
use support::env::{kafka_brokers, redis_url};
use tags::TagShape;
use wal2cache::Lsn;

/// What is written and what the rules do with it.
enum Shape {
    /// Two rules on `items` (benches/common/daemon.rs), one writer.
    Default,
    Tags(TagShape),
}

impl Shape {
    fn from_env() -> Shape {
        match std::env::var("W2C_BENCH_SHAPE").as_deref() {
            Err(_) | Ok("") | Ok("default") => Shape::Default,
            Ok("tags") => Shape::Tags(TagShape::from_env()),
            Ok(other) => panic!("W2C_BENCH_SHAPE={other:?}: default or tags"),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Shape::Default => "default",
            Shape::Tags(_) => "tags",
        }
    }
}

fn main() {
    let shape = Shape::from_env();
    let default_rows = match shape {
        Shape::Default => 1_000_000,
        Shape::Tags(_) => 200_000,
    };
    let rows = env_usize("W2C_BENCH_ROWS", default_rows).max(2);
    let table_rows = env_usize("W2C_BENCH_TABLE_ROWS", 10_000).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let db = rt.block_on(TestDb::new("bench_catchup"));
    let mut tuning = Tuning::from_env();
    // /metrics, for the batches the daemon applied.
    tuning.metrics_port = Some(support::net::free_port());
    let setup = BenchSetup::write_rules(&db, "catchup", &tuning, |p| match &shape {
        Shape::Default => daemon::item_rules(p),
        Shape::Tags(t) => t.rules(p),
    });
    // Ctrl-C (and a panic) still cleans up.
    let result = daemon::run_then_clean_up(
        &rt,
        &setup,
        run(&db, &setup, &tuning, &shape, rows, table_rows),
    );
    drop(db);
    if let Err(e) = result {
        daemon::fail("catchup", setup, &e);
    }
}

/// What the checks need after the run.
struct Prepared {
    /// Keys that must be gone.
    stale: Vec<String>,
    /// Republished keys and the row they must hold: (key, SQL giving the JSON text of
    /// the projection of the final row).
    republished: Vec<(String, String)>,
    /// Keys an event is attributed to a row by (the first key of the event with one of
    /// these prefixes and an integer after it), and how many events each must have.
    ident_prefixes: Vec<String>,
    expected: HashMap<String, u64>,
}

async fn run(
    db: &TestDb,
    setup: &BenchSetup,
    tuning: &Tuning,
    shape: &Shape,
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
    match shape {
        Shape::Default => println!(
            "catchup: {} single-row UPDATE transactions on a table of {} rows (REPLICA IDENTITY FULL), 2 rules: delete 2 keys + 1 tag, republish a 4-column projection",
            thousands(rows as u64),
            thousands(table_rows as u64)
        ),
        Shape::Tags(t) => println!(
            "catchup (tags shape): {} single-row UPDATE transactions, items of {} rows (REPLICA IDENTITY FULL); {}",
            thousands(rows as u64),
            thousands(table_rows as u64),
            t.describe()
        ),
    }
    println!(
        "server: PostgreSQL {version}, synchronous_commit={sync_commit}, fsync={fsync}; database {}; daemon {}",
        db.name,
        support::daemon::bin()
    );
    println!("daemon tuning: {}", tuning.describe());
    println!("load average at start: {}", load_average());

    db.client.batch_execute(daemon::TABLE_SQL).await?;
    db.client
        .batch_execute(&daemon::fill_sql(table_rows))
        .await?;
    db.client.batch_execute("VACUUM ANALYZE items").await?;
    match shape {
        Shape::Default => {
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
        }
        Shape::Tags(t) => {
            db.client.batch_execute(&t.sql()).await?;
            db.client.batch_execute("VACUUM ANALYZE offers").await?;
        }
    }
    let out = setup.run_setup()?;
    eprintln!("wal2cache setup: {out}");
    let twin = db.create_slot("pg").await;

    let mut r = support::store::redis().await;
    let prepared = match shape {
        Shape::Default => prepare_default(db, setup, &mut r, rows, table_rows).await?,
        Shape::Tags(t) => prepare_tags(setup, &mut r, t, rows, table_rows).await?,
    };

    // The writes.
    let start_lsn = db.current_lsn().await;
    eprintln!("writing {} transactions...", thousands(rows as u64));
    let t = Instant::now();
    match shape {
        Shape::Default => {
            db.client
                .batch_execute(&format!("CALL bench_updates({}, {table_rows})", rows - 1))
                .await?;
        }
        Shape::Tags(shape) => write_tags(db, shape, rows - 1, table_rows).await?,
    }
    // After every writer: its commit is the last.
    let marker = daemon::marker_update(db, 1).await;
    let write_time = t.elapsed();
    let end_lsn = db.current_lsn().await;
    let wal = db.wal_bytes_since(start_lsn).await;
    println!(
        "write: {} transactions in {:.2} s = {:.0} txn/s; WAL {start_lsn} .. {end_lsn} = {:.1} MiB; marker {marker}",
        thousands(rows as u64),
        write_time.as_secs_f64(),
        rows as f64 / write_time.as_secs_f64(),
        wal as f64 / (1024.0 * 1024.0)
    );

    let daemon_first = std::env::var("W2C_BENCH_DAEMON_FIRST").is_ok_and(|v| v == "1");
    let (pg, ours) = if daemon_first {
        let ours = read_daemon(db, setup, tuning, marker, rows).await?;
        let pg = read_twin_slot(db, &twin, end_lsn, rows).await?;
        (pg, ours)
    } else {
        let pg = read_twin_slot(db, &twin, end_lsn, rows).await?;
        let ours = read_daemon(db, setup, tuning, marker, rows).await?;
        (pg, ours)
    };

    // Checks.
    let mut problems = Vec::new();
    for (key, sql) in &prepared.republished {
        let want: Value =
            serde_json::from_str(&db.client.query_one(sql, &[]).await?.get::<_, String>(0))?;
        let got: Option<String> = r.get(key).await?;
        match got.as_deref().map(serde_json::from_str::<Value>) {
            Some(Ok(v)) if v == want => {}
            other => problems.push(format!("{key}: {other:?}, the row is {want}")),
        }
    }
    for chunk in prepared.stale.chunks(1000) {
        let n: usize = redis::cmd("EXISTS").arg(chunk).query_async(&mut r).await?;
        if n > 0 {
            let mut still = Vec::new();
            for key in chunk {
                if r.exists::<_, bool>(key).await? {
                    still.push(key.clone());
                }
            }
            problems.push(format!(
                "{n} stale key(s) still cached, e.g. {}",
                still[..still.len().min(5)].join(", ")
            ));
        }
    }
    // Tansu 0.6 reports a partition's high watermark as the base offset of its last
    // batch (the records of that batch are not counted), so the watermarks are only
    // a lower bound: the topic is read back whole to count the events.
    let marks = support::kafka::topic_watermarks(&setup.topic).await;
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
        let (events, found) = read_back(&setup.topic, &prepared, rows).await?;
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
        "wal2cache run (Redis + Kafka): {} changes in {:.3} s = {:.0} changes/s (streaming after {:.3} s; {:.0} changes/s from then); CPU {:.2} s ({:.0}% of one core), {} threads; peak RSS (VmHWM) {}; the main thread waited {} times ({:.1} per 1,000 changes)",
        thousands(rows as u64),
        ours.elapsed.as_secs_f64(),
        ours.rate(),
        ours.startup.as_secs_f64(),
        rows as f64 / (ours.elapsed - ours.startup).as_secs_f64(),
        ours.cpu,
        100.0 * ours.cpu / ours.elapsed.as_secs_f64(),
        ours.threads,
        mib(ours.vm_hwm_kb),
        thousands(ours.waits),
        1000.0 * ours.waits as f64 / rows as f64
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
    let per_change = |secs: Option<f64>| secs.map(|s| s * 1e6 / rows as f64);
    let us = |x: Option<f64>| x.map_or("?".to_string(), |v| format!("{v:.2}"));
    println!(
        "CPU per change, pg_recvlogical read: pg_recvlogical {} µs, its walsender {} µs{}",
        us(per_change(Some(pg.cpu))),
        us(per_change(pg.walsender.used)),
        pg.walsender
            .pid
            .map_or(" (walsender not seen)".to_string(), |p| format!(
                " (pid {p})"
            ))
    );
    println!(
        "CPU per change, daemon catch-up (CPU seconds used from the daemon's spawn to the marker):"
    );
    println!(
        "  {:<44} {:>9.3} s {:>9} µs/change",
        format!("wal2cache (pid {})", ours.pid),
        ours.cpu,
        us(per_change(Some(ours.cpu)))
    );
    for (label, pid, used) in &ours.others {
        println!(
            "  {:<44} {:>9} s {:>9} µs/change",
            format!(
                "{label} ({})",
                pid.as_ref()
                    .map_or("not found".to_string(), |(p, name)| format!("{name} {p}"))
            ),
            used.map_or("?".to_string(), |v| format!("{v:.3}")),
            us(per_change(*used))
        );
    }
    if !ours.commandstats.is_empty() {
        println!("Redis INFO commandstats over the catch-up (all clients; a script's time includes the commands it calls):");
        for (cmd, calls, usec) in &ours.commandstats {
            println!(
                "  {cmd:<10} {:>12} calls {:>10.3} s {:>8.2} µs/call {:>8.2} µs/change",
                thousands(*calls),
                *usec as f64 / 1e6,
                *usec as f64 / (*calls).max(1) as f64,
                *usec as f64 / rows as f64
            );
        }
    }
    if let Some(b) = &ours.batches {
        println!(
            "daemon batches (as the Redis sink applied them): {} applied ({} changes, {:.1} per batch), {:.3} s applying them ({:.2} ms per batch, {:.1}% of the catch-up); {} sink retries",
            thousands(b.count as u64),
            thousands(b.applied as u64),
            b.applied / b.count.max(1.0),
            b.secs,
            1000.0 * b.secs / b.count.max(1.0),
            100.0 * b.secs / ours.elapsed.as_secs_f64(),
            b.retries as u64
        );
    }
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
    let other = |label: &str| {
        ours.others
            .iter()
            .find(|(l, _, _)| *l == label)
            .and_then(|(_, _, used)| per_change(*used))
    };
    let (keys, rules) = match shape {
        Shape::Default => (2, 2),
        Shape::Tags(t) => (t.keys, t.rules),
    };
    let tag_count = match shape {
        Shape::Default => 1,
        Shape::Tags(t) => t.tags,
    };
    let result = format!(
        "result: shape={} changes={rows} keys={keys} rules={rules} tags={tag_count} pg_rate={:.0} daemon_rate={:.0} ratio={ratio:.3} daemon_us={} redis_us={} broker_us={} walsender_us={} pg_walsender_us={} per_batch={}",
        shape.name(),
        pg.rate(),
        ours.rate(),
        us(per_change(Some(ours.cpu))),
        us(other("redis-server")),
        us(other("broker")),
        us(other("walsender (daemon's slot)")),
        us(per_change(pg.walsender.used)),
        ours.batches
            .as_ref()
            .map_or("?".to_string(), |b| format!("{:.1}", b.applied / b.count.max(1.0))),
    );
    if problems.is_empty() {
        println!(
            "checks: ok ({} republished keys hold the final row, {} stale keys gone, {} events)",
            prepared.republished.len(),
            prepared.stale.len(),
            thousands(events)
        );
        println!("{result} checks=ok");
        Ok(())
    } else {
        for p in &problems {
            println!("check FAILED: {p}");
        }
        println!("{result} checks=FAILED");
        Err(format!("{} check(s) failed", problems.len()).into())
    }
}

/// The default shape: what an application cached for a few rows (the delete rule's
/// keys, and a page under the category tag); the republished keys they must end with.
async fn prepare_default(
    db: &TestDb,
    setup: &BenchSetup,
    r: &mut redis::aio::MultiplexedConnection,
    rows: usize,
    table_rows: usize,
) -> Result<Prepared, BoxError> {
    let sample: Vec<i32> = {
        let mut s = vec![1, (table_rows as i32 / 2).max(1), table_rows as i32];
        s.dedup();
        s
    };
    let p = &setup.prefix;
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
    // The procedure updates row 1 + i % table_rows for i in 1..rows, the marker row 1.
    let mut expected: HashMap<String, u64> = HashMap::new();
    for i in 1..rows {
        *expected
            .entry(format!("{p}:item:v1:{}", 1 + i % table_rows))
            .or_default() += 1;
    }
    *expected.entry(format!("{p}:item:v1:1")).or_default() += 1;
    Ok(Prepared {
        stale,
        republished: sample
            .iter()
            .map(|&id| {
                (
                    daemon::json_key(p, id),
                    format!(
                        "SELECT json_build_object('id', id, 'name', name, 'price', price::text, 'stock', stock)::text
                           FROM items WHERE id = {id}"
                    ),
                )
            })
            .collect(),
        ident_prefixes: vec![format!("{p}:item:v1:")],
        expected,
    })
}

/// The tags shape: all the keys of a few rows and the shared tag's pages cached; the
/// final rows of a few offers to be republished; per row, the writers' updates.
async fn prepare_tags(
    setup: &BenchSetup,
    r: &mut redis::aio::MultiplexedConnection,
    t: &TagShape,
    rows: usize,
    table_rows: usize,
) -> Result<Prepared, BoxError> {
    let p = &setup.prefix;
    let mut updates = t.updates(rows - 1, table_rows);
    // The marker.
    *updates.entry(("items", 1)).or_default() += 1;
    let sample = |table: &str| {
        let mut ids: Vec<i32> = updates
            .keys()
            .filter(|(t, _)| *t == table)
            .map(|(_, id)| *id)
            .collect();
        ids.sort();
        let mut s: Vec<i32> = [0, ids.len() / 2, ids.len().saturating_sub(1)]
            .iter()
            .filter_map(|&i| ids.get(i).copied())
            .collect();
        s.dedup();
        s
    };
    let mut stale = Vec::new();
    let mut pipe = redis::pipe();
    for id in sample("items") {
        for key in t.item_keys(p, id) {
            pipe.set(&key, "stale").ignore();
            stale.push(key);
        }
    }
    let set = format!("{p}:tag:{p}:list");
    let members = if t.tags > 0 { t.tag_members } else { 0 };
    for m in 0..members {
        let page = format!("{p}:page:list:{m}");
        pipe.set(&page, "stale").ignore();
        pipe.sadd(&set, &page).ignore();
        stale.push(page);
    }
    if members > 0 {
        stale.push(set);
    }
    pipe.query_async::<()>(r).await?;
    let expected = updates
        .iter()
        .map(|(&(table, id), &n)| {
            let key = if table == "items" {
                format!("{p}:item:v1:{id}")
            } else {
                TagShape::offer_key(p, id)
            };
            (key, n)
        })
        .collect();
    Ok(Prepared {
        stale,
        republished: sample("offers")
            .into_iter()
            .map(|id| {
                (
                    TagShape::offer_key(p, id),
                    format!(
                        "SELECT json_build_object('id', id, 'item_id', item_id, 'price', price::text, 'seller', seller)::text
                           FROM offers WHERE id = {id}"
                    ),
                )
            })
            .collect(),
        ident_prefixes: vec![format!("{p}:item:v1:"), format!("{p}:offer:json:v1:")],
        expected,
    })
}

/// `total` transactions from the shape's writers at once, each on a connection of its
/// own; returns when all of them finished.
async fn write_tags(
    db: &TestDb,
    t: &TagShape,
    total: usize,
    table_rows: usize,
) -> Result<(), BoxError> {
    let mut clients = Vec::new();
    for _ in 0..t.writers {
        clients.push(connect(&db.url).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (w, (n, client)) in t.per_writer(total).into_iter().zip(clients).enumerate() {
        let sql = format!(
            "CALL bench_tag_writer({w}, {}, {n}, {table_rows}, {}, {})",
            t.writers, t.other_rows, t.other_every
        );
        tasks.spawn(async move { client.batch_execute(&sql).await });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

struct Pg {
    rows: usize,
    elapsed: Duration,
    cpu: f64,
    walsender: Walsender,
}

/// The walsender serving a slot: its pid, and its CPU seconds when last read.
#[derive(Default)]
struct Walsender {
    pid: Option<i32>,
    used: Option<f64>,
}

impl Walsender {
    /// Finds the slot's walsender (`active_pid`) when not yet known, and reads its CPU.
    async fn observe(&mut self, db: &TestDb, slot: &str) -> Result<(), BoxError> {
        if self.pid.is_none() {
            self.pid = active_pid(&db.client, slot).await?;
        }
        if let Some(cpu) = self.pid.and_then(process_cpu_secs) {
            self.used = Some(cpu);
        }
        Ok(())
    }
}

impl Pg {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
}

struct Ours {
    rows: usize,
    pid: i32,
    elapsed: Duration,
    startup: Duration,
    cpu: f64,
    threads: u64,
    /// Voluntary context switches of the daemon's main thread (the runtime's one
    /// thread) over the catch-up: how often it waited.
    waits: u64,
    vm_hwm_kb: u64,
    exit: String,
    stop_secs: f64,
    log_problems: Vec<String>,
    /// (label, pid and process name, CPU seconds during the catch-up): Redis, the
    /// broker, the walsender.
    others: Vec<(&'static str, Option<Named>, Option<f64>)>,
    /// Redis commands over the catch-up: (command, calls, usec), most time first.
    commandstats: Vec<(String, u64, u64)>,
    batches: Option<Batches>,
}

impl Ours {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
}

async fn read_daemon(
    db: &TestDb,
    setup: &BenchSetup,
    tuning: &Tuning,
    marker: daemon::Marker,
    rows: usize,
) -> Result<Ours, BoxError> {
    eprintln!(
        "starting wal2cache run (load average {})...",
        load_average()
    );
    let redis = Observed::on_port("redis-server", port_of(&redis_url()), "W2C_BENCH_REDIS_PID");
    let broker = Observed::on_port("broker", port_of(&kafka_brokers()), "W2C_BENCH_BROKER_PID");
    let stats0 = daemon::redis_commandstats().await.unwrap_or_default();
    let mut d = DaemonRun::start(setup);
    let perf = if std::env::var("W2C_BENCH_PERF").is_ok_and(|v| v == "1") {
        daemon::wait_active(db, &setup.slot, &mut d, Duration::from_secs(120)).await?;
        Some(Perf::attach(d.pid)?)
    } else {
        None
    };
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
    let waits = status_field(d.pid, "voluntary_ctxt_switches");
    let mut walsender = Walsender::default();
    walsender.observe(db, &setup.slot).await?;
    let named = |pid: Option<i32>| pid.map(|p| (p, process_name(p)));
    let others = vec![
        ("redis-server", named(redis.pid), redis.used()),
        ("broker", named(broker.pid), broker.used()),
        (
            "walsender (daemon's slot)",
            named(walsender.pid),
            walsender.used,
        ),
    ];
    let stats1 = daemon::redis_commandstats().await.unwrap_or_default();
    let mut commandstats: Vec<(String, u64, u64)> = stats1
        .iter()
        .filter_map(|(cmd, &(calls, usec))| {
            let (c0, u0) = stats0.get(cmd).copied().unwrap_or((0, 0));
            (calls > c0).then(|| (cmd.clone(), calls - c0, usec.saturating_sub(u0)))
        })
        .collect();
    commandstats.sort_by_key(|c| std::cmp::Reverse(c.2));
    if let Some(perf) = perf {
        perf.stop()?;
    }
    let batches = match tuning.metrics_port {
        Some(port) => daemon::scrape(port).await.ok().map(|text| {
            let get = |name: &str| support::scrape::metric(&text, name, None).unwrap_or(0.0);
            // The Redis sink's applications (each sink applies, and times, its own).
            let redis = |name: &str| {
                support::scrape::metric(&text, name, Some("sink=\"redis\"")).unwrap_or(0.0)
            };
            Batches {
                count: redis("wal2cache_batch_seconds_count"),
                secs: redis("wal2cache_batch_seconds_sum"),
                applied: get("wal2cache_changes_applied_total"),
                retries: text
                    .lines()
                    .filter(|l| l.starts_with("wal2cache_sink_retries_total"))
                    .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
                    .sum(),
            }
        }),
        None => None,
    };
    let threads = d.threads();
    let vm_hwm_kb = d.status_kb("VmHWM");
    let (status, stop) = d.stop(Duration::from_secs(90))?;
    let startup = progress
        .active_after
        .unwrap_or(Duration::ZERO)
        .min(progress.elapsed);
    eprintln!(
        "wal2cache: confirmed up to {marker} after {:.3} s (slot active after {:.3} s, first confirmation after {:.3} s); VmRSS samples (MiB): {}",
        progress.elapsed.as_secs_f64(),
        startup.as_secs_f64(),
        progress.first_move_after.unwrap_or_default().as_secs_f64(),
        daemon::rss_samples(&progress.rss, 10)
    );
    Ok(Ours {
        rows,
        pid: d.pid,
        elapsed: progress.elapsed,
        startup,
        cpu,
        threads,
        waits,
        vm_hwm_kb,
        exit: status
            .code()
            .map_or_else(|| status.to_string(), |c| c.to_string()),
        stop_secs: stop.as_secs_f64(),
        log_problems: d.log_problems(),
        others,
        commandstats,
        batches,
    })
}

/// A process's pid and name.
type Named = (i32, String);

/// The daemon's batches, from its /metrics at the end of the catch-up.
struct Batches {
    count: f64,
    /// Time applying them (both sinks, in parallel), summed.
    secs: f64,
    applied: f64,
    retries: f64,
}

/// `perf record` attached to the daemon (`W2C_BENCH_PERF=1`).
struct Perf {
    child: std::process::Child,
    out: String,
}

impl Perf {
    fn attach(pid: i32) -> Result<Perf, BoxError> {
        let args = std::env::var("W2C_BENCH_PERF_ARGS")
            .unwrap_or_else(|_| "-e cpu-clock -F 999 -g --call-graph dwarf".into());
        let out = std::env::var("W2C_BENCH_PERF_OUT")
            .unwrap_or_else(|_| "/tmp/w2c-catchup.perf.data".into());
        eprintln!("perf record {args} -p {pid} -o {out}");
        let child = Command::new("perf")
            .arg("record")
            .args(args.split_whitespace())
            .args(["-p", &pid.to_string(), "-o", &out])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run perf: {e}"))?;
        Ok(Perf { child, out })
    }

    /// SIGINT, then waits for perf to write its data.
    fn stop(mut self) -> Result<(), BoxError> {
        support::daemon::signal(&self.child, "INT");
        let status = self.child.wait()?;
        eprintln!(
            "perf record ended ({status}); report: perf report -i {} --no-children --sort symbol",
            self.out
        );
        Ok(())
    }
}

/// `pg_recvlogical` on the twin slot, with the pgoutput options the daemon uses, output
/// to /dev/null, until it passes the end LSN.
async fn read_twin_slot(
    db: &TestDb,
    slot: &str,
    end_lsn: Lsn,
    rows: usize,
) -> Result<Pg, BoxError> {
    eprintln!(
        "reading with pg_recvlogical (load average {})...",
        load_average()
    );
    let cpu0 = children_cpu_secs();
    let mut walsender = Walsender::default();
    // Its CPU until it exits, with pg_recvlogical: the last reading counts.
    let (status, elapsed) = run_pg_recvlogical(&db.url, slot, "w2c_bench", end_lsn, async || {
        walsender.observe(db, slot).await
    })
    .await?;
    let cpu = children_cpu_secs() - cpu0;
    if !status.success() {
        return Err(format!("pg_recvlogical failed: {status}").into());
    }
    Ok(Pg {
        rows,
        elapsed,
        cpu,
        walsender,
    })
}

/// Reads the whole topic back: one invalidate event per transaction (distinct commit
/// LSNs), and per row as many events as updates it had.
async fn read_back(
    topic: &str,
    prepared: &Prepared,
    rows: usize,
) -> Result<(u64, Vec<String>), BoxError> {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    #[derive(Default)]
    struct Tally {
        heartbeats: u64,
        invalidate: u64,
        lsns: HashSet<String>,
        per_row: HashMap<String, u64>,
        other: Vec<String>,
    }
    let seen: Arc<Mutex<Tally>> = Arc::default();
    let s2 = seen.clone();
    let prefixes = prepared.ident_prefixes.clone();
    let t = Instant::now();
    let (read, ends) = support::kafka::consume_topic(
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
                    let row = v["keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .find(|k| {
                            prefixes.iter().any(|p| {
                                k.strip_prefix(p.as_str())
                                    .is_some_and(|id| id.parse::<i64>().is_ok())
                            })
                        });
                    if let Some(row) = row {
                        *s.per_row.entry(row.to_string()).or_default() += 1;
                    }
                }
                _ => s.other.push(v.to_string()),
            }
        },
    )
    .await;
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
    let mut short_ids: Vec<(String, u64, u64)> = prepared
        .expected
        .iter()
        .filter_map(|(row, want)| {
            let got = s.per_row.get(row).copied().unwrap_or(0);
            (got < *want).then(|| (row.clone(), got, *want))
        })
        .collect();
    short_ids.sort();
    if !short_ids.is_empty() {
        problems.push(format!(
            "{} rows have fewer events than updates, e.g. (key, events, updates): {:?}",
            short_ids.len(),
            &short_ids[..short_ids.len().min(10)]
        ));
    }
    if !s.other.is_empty() {
        problems.push(format!("unexpected messages, e.g. {}", s.other[0]));
    }
    Ok((s.invalidate, problems))
}
