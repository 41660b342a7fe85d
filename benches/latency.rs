//! Latency: at 2,000 single-row transactions per second, from the commit in Postgres
//! to the change applied in Redis and to its event acknowledged by Kafka. Target: p50
//! under 2 ms, p99 under 10 ms, for both.
//!
//!     cargo bench --bench latency
//!     W2C_BENCH_SECONDS=10 cargo bench --bench latency
//!     W2C_BENCH_KAFKA_PROPS=linger.ms=0 W2C_BENCH_BATCH_DEADLINE=1ms cargo bench --bench latency
//!
//! The daemon is the `wal2cache` binary of this checkout: cargo builds it (bench
//! profile, into target/release/) before running the bench and passes its path in
//! `CARGO_BIN_EXE_wal2cache`; `W2C_BENCH_BIN` runs another one.
//!
//! Setup: the table and rules of benches/common/daemon.rs (a delete rule with two keys
//! and a tag, a republish rule with a projection), `wal2cache setup`, then
//! `wal2cache run` with `[metrics] listen` on a free port. Once it streams, the
//! writers run for `W2C_BENCH_SECONDS` (30): `W2C_BENCH_CONNECTIONS` (2) connections,
//! each on a fixed schedule (`W2C_BENCH_RATE` / connections per second, offset from
//! each other; a late transaction does not move the later ones), one autocommitted
//! UPDATE of one row per transaction. Then a last transaction, a wait until the slot
//! is confirmed up to its commit, and a scrape of /metrics.
//!
//! The figures are the daemon's own: `wal2cache_commit_to_redis_seconds` and
//! `wal2cache_commit_to_kafka_seconds`, recorded per change from the Postgres commit
//! timestamp (wall clock, same machine) to the moment each sink confirmed the batch
//! holding it. They are histograms (`src/serve.rs`, `SECONDS_BUCKETS`) over the whole
//! life of the daemon: the quantiles printed are interpolated inside their bucket as
//! Prometheus' `histogram_quantile` does, so they are as exact as the buckets (0.5 ms
//! apart from 1 to 2 ms, 2.5 ms from 7.5 to 10 ms); the verdicts use the share of
//! samples at most 2 ms and at most 10 ms, which are bucket bounds, and are exact; "max"
//! is the bound of the highest bucket with a sample. Also printed: the achieved write rate,
//! how late the writers were against their schedule, the commit round trip as the
//! client saw it, the daemon's CPU over the run, and `wal2cache_batch_seconds`.
//!
//! Env: `W2C_BENCH_SECONDS` (30), `W2C_BENCH_RATE` (2000), `W2C_BENCH_CONNECTIONS`
//! (2), `W2C_BENCH_TABLE_ROWS` (10,000), `W2C_BENCH_BATCH_DEADLINE`,
//! `W2C_BENCH_BATCH_SIZE`, `W2C_BENCH_KAFKA_PROPS` (`k=v,k=v`), `W2C_BENCH_DAEMON_LOG`,
//! `WAL2CACHE_TEST_PG` / `_REDIS` / `_KAFKA`. The database `w2c_bench_latency_<pid>`
//! is dropped with its slots, the Redis keys under `w2cb_latency_<pid>` deleted, the
//! topic `w2cb-latency-<pid>` deleted (or left where the broker cannot).

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use common::{env_usize, load_average, mib, ms, percentile, thousands, BoxError};
use daemon::{BenchSetup, DaemonRun, Tuning};
use support::db::{connect, TestDb};

fn main() {
    let seconds = env_usize("W2C_BENCH_SECONDS", 30).max(1);
    let rate = env_usize("W2C_BENCH_RATE", 2000).max(1);
    let connections = env_usize("W2C_BENCH_CONNECTIONS", 2).max(1);
    let table_rows = env_usize("W2C_BENCH_TABLE_ROWS", 10_000).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let db = rt.block_on(TestDb::new("bench_latency"));
    let mut tuning = Tuning::from_env();
    tuning.metrics_port = Some(support::net::free_port());
    let setup = BenchSetup::write(&db, "latency", &tuning);
    let params = Params {
        seconds,
        rate,
        connections,
        table_rows,
    };
    // Ctrl-C (and a panic) still cleans up.
    let result = daemon::run_then_clean_up(&rt, &setup, run(&db, &setup, &tuning, &params));
    drop(db);
    if let Err(e) = result {
        daemon::fail("latency", setup, &e);
    }
}

struct Params {
    seconds: usize,
    rate: usize,
    connections: usize,
    table_rows: usize,
}

/// What one writer saw, per transaction.
#[derive(Default)]
struct Writer {
    /// How late each transaction started against its schedule.
    late: Vec<Duration>,
    /// The commit round trip (execute of the autocommitted UPDATE).
    rtt: Vec<Duration>,
    last_done: Option<Instant>,
}

async fn run(
    db: &TestDb,
    setup: &BenchSetup,
    tuning: &Tuning,
    params: &Params,
) -> Result<(), BoxError> {
    let Params {
        seconds,
        rate,
        connections,
        table_rows,
    } = *params;
    let port = tuning.metrics_port.expect("a metrics port");
    let total = seconds * rate;
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
        "latency: {rate} single-row UPDATE transactions/s for {seconds} s ({} in all) over {connections} connection(s), a table of {} rows (REPLICA IDENTITY FULL), 2 rules: delete 2 keys + 1 tag, republish a 4-column projection",
        thousands(total as u64),
        thousands(table_rows as u64)
    );
    println!(
        "server: PostgreSQL {version}, synchronous_commit={sync_commit}, fsync={fsync}; database {}; daemon {}; metrics on 127.0.0.1:{port}",
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
    eprintln!("wal2cache setup: {}", setup.run_setup()?);

    let mut d = DaemonRun::start(setup);
    let active = daemon::wait_active(db, &setup.slot, &mut d, Duration::from_secs(60)).await?;
    support::wait::eventually(
        &format!("/metrics on 127.0.0.1:{port}"),
        Duration::from_secs(10),
        || async { daemon::scrape(port).await.is_ok() },
    )
    .await;
    eprintln!(
        "daemon streaming after {:.3} s; writing for {seconds} s (load average {})...",
        active.as_secs_f64(),
        load_average()
    );
    // The writers' connections first, so that connecting is not in the schedule.
    let mut clients = Vec::new();
    for _ in 0..connections {
        let client = connect(&db.url).await;
        let stmt = client
            .prepare("UPDATE items SET price = price + 0.01, stock = stock + 1 WHERE id = $1")
            .await?;
        clients.push((client, stmt));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cpu0 = d.cpu_secs();
    let t0 = Instant::now() + Duration::from_millis(50);
    let period = Duration::from_secs_f64(connections as f64 / rate as f64);
    let per_conn = total / connections;
    let mut tasks = Vec::new();
    for (c, (client, stmt)) in clients.into_iter().enumerate() {
        // Connection c starts c/connections of a period after the first.
        let offset = period.mul_f64(c as f64 / connections as f64);
        tasks.push(tokio::spawn(async move {
            let mut w = Writer {
                late: Vec::with_capacity(per_conn),
                rtt: Vec::with_capacity(per_conn),
                last_done: None,
            };
            for k in 0..per_conn {
                let at = t0 + offset + period.mul_f64(k as f64);
                tokio::time::sleep_until(at.into()).await;
                let started = Instant::now();
                let id = 1 + ((c + k * connections) % table_rows) as i32;
                client.execute(&stmt, &[&id]).await?;
                let done = Instant::now();
                w.late.push(started.saturating_duration_since(at));
                w.rtt.push(done - started);
                w.last_done = Some(done);
            }
            Ok::<Writer, tokio_postgres::Error>(w)
        }));
    }
    let mut writers = Vec::new();
    for t in tasks {
        writers.push(t.await??);
    }
    let cpu1 = d.cpu_secs();
    let end = writers
        .iter()
        .filter_map(|w| w.last_done)
        .max()
        .unwrap_or(t0);
    let wrote = writers.iter().map(|w| w.rtt.len()).sum::<usize>();
    let write_secs = (end - t0).as_secs_f64();

    // Everything applied: a last transaction, confirmed.
    let marker = daemon::marker_update(db, 1).await;
    let progress = daemon::wait_confirmed(
        db,
        &setup.slot,
        marker,
        &mut d,
        Duration::from_secs(60),
        Duration::from_secs(600),
    )
    .await?;
    let drained_after = progress.elapsed.saturating_sub(end - d.started);
    let text = daemon::scrape(port).await?;
    let vm_hwm = d.status_kb("VmHWM");
    let (status, _) = d.stop(Duration::from_secs(60))?;

    let mut late: Vec<Duration> = writers.iter().flat_map(|w| w.late.clone()).collect();
    let mut rtt: Vec<Duration> = writers.iter().flat_map(|w| w.rtt.clone()).collect();
    late.sort();
    rtt.sort();
    println!("---");
    println!(
        "writes: {} transactions in {write_secs:.3} s = {:.0} txn/s (target {rate}); start late against the schedule: p50 {} p99 {} max {}; {} started more than 5 ms late",
        thousands(wrote as u64),
        wrote as f64 / write_secs,
        ms(percentile(&late, 0.5).as_secs_f64()),
        ms(percentile(&late, 0.99).as_secs_f64()),
        ms(late.last().copied().unwrap_or_default().as_secs_f64()),
        late.iter().filter(|l| **l > Duration::from_millis(5)).count()
    );
    println!(
        "client commit round trip: p50 {} p90 {} p99 {} max {}",
        ms(percentile(&rtt, 0.5).as_secs_f64()),
        ms(percentile(&rtt, 0.9).as_secs_f64()),
        ms(percentile(&rtt, 0.99).as_secs_f64()),
        ms(rtt.last().copied().unwrap_or_default().as_secs_f64()),
    );
    println!(
        "daemon: CPU {:.2} s over the {write_secs:.1} s of writes = {:.0}% of one core; peak RSS {}; last change confirmed {:.3} s after the last write (status interval 500 ms); exit {}",
        cpu1 - cpu0,
        100.0 * (cpu1 - cpu0) / write_secs,
        mib(vm_hwm),
        drained_after.as_secs_f64(),
        status.code().map_or_else(|| status.to_string(), |c| c.to_string()),
    );
    let applied =
        support::scrape::metric(&text, "wal2cache_changes_applied_total", None).unwrap_or(0.0);
    println!(
        "wal2cache_changes_applied_total {} ({} written + the last one)",
        applied, wrote
    );
    let mut verdicts = Vec::new();
    for (label, name, labels) in [
        (
            "commit -> Redis applied",
            "wal2cache_commit_to_redis_seconds",
            &[][..],
        ),
        (
            "commit -> Kafka acked",
            "wal2cache_commit_to_kafka_seconds",
            &[],
        ),
        (
            "batch apply (Redis)",
            "wal2cache_batch_seconds",
            &["sink=\"redis\""],
        ),
        (
            "batch apply (Kafka)",
            "wal2cache_batch_seconds",
            &["sink=\"kafka\""],
        ),
    ] {
        let q = support::scrape::histogram_with(&text, name, labels);
        let f = |x: f64| q.get(x).map_or("-".to_string(), ms);
        println!(
            "{label:<25} p50 {} p90 {} p99 {} p99.9 {} max <= {}  (count {}, mean {}; quantiles interpolated in their buckets)",
            f(0.5),
            f(0.9),
            f(0.99),
            f(0.999),
            f(1.0),
            q.count.map_or("-".into(), |c| c.to_string()),
            match (q.sum, q.count) {
                (Some(s), Some(c)) if c > 0.0 => ms(s / c),
                _ => "-".into(),
            }
        );
        if name != "wal2cache_batch_seconds" {
            let (under_2ms, under_10ms) = (q.share_at_most(0.002), q.share_at_most(0.010));
            let met = under_2ms.is_some_and(|s| s >= 0.5) && under_10ms.is_some_and(|s| s >= 0.99);
            let pct = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{:.2}%", s * 100.0));
            verdicts.push(format!(
                "{label}: p50 < 2 ms and p99 < 10 ms: {} ({} at most 2 ms, {} at most 10 ms)",
                if met { "MET" } else { "NOT MET" },
                pct(under_2ms),
                pct(under_10ms),
            ));
        }
    }
    for v in verdicts {
        println!("{v}");
    }
    if (applied as usize) < wrote {
        return Err(format!("the daemon applied {applied} changes, {wrote} were written").into());
    }
    Ok(())
}
