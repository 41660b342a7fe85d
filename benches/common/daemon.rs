//! Shared by the benches that run the daemon itself (`catchup`, `latency`,
//! `txn_memory`) and `sink_latency`: the table and rules they write to, their config
//! (tests/support's `ConfigBuilder`), the `wal2cache` process (tests/support's
//! `Daemon`, observed through /proc), the slot's confirmed position, the Prometheus
//! endpoint, and the cleanup of their Redis keys and topic.
//!
//! Include it beside `common` and `support` with
//!
//! ```ignore
//! #[path = "../tests/support/mod.rs"]
//! mod support;
//! mod common;
//! #[path = "common/daemon.rs"]
//! mod daemon;
//! ```
//!
//! The binary: `support::daemon::bin()`, `env!("CARGO_BIN_EXE_wal2cache")`. Cargo sets
//! it for benchmarks as for integration tests and builds the `wal2cache` binary (with
//! the bench profile, i.e. release settings, into `target/release/`) before it runs a
//! bench, so the daemon measured is always the one of the checkout. `W2C_BENCH_BIN`
//! runs another binary.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use wal2cache::Lsn;

use crate::common::{chain, process_cpu_secs, status_field, BoxError};
use crate::support::config::ConfigBuilder;
use crate::support::daemon::{run_binary, Daemon};
use crate::support::db::TestDb;
use crate::support::env::redis_url;
use crate::support::kafka::try_delete_topic;
use crate::support::net::http_async;
use crate::support::store::{redis, try_unlink_matching};

/// The table every daemon bench writes. `REPLICA IDENTITY FULL`: the keys use the
/// slug and the tag the category, neither of them the primary key, so an update must
/// carry the old row (as `products` in the example schema).
#[allow(dead_code)]
pub const TABLE: &str = "items";

#[allow(dead_code)]
pub const TABLE_SQL: &str = "
CREATE TABLE items (
    id           int PRIMARY KEY,
    slug         text NOT NULL,
    category_id  int NOT NULL,
    name         text NOT NULL,
    price        numeric(10, 2) NOT NULL,
    stock        int NOT NULL,
    description  text
);
ALTER TABLE items REPLICA IDENTITY FULL;
";

/// `n` rows (ids 1..=n) of about 100 bytes each. (Then `VACUUM ANALYZE items`, apart:
/// VACUUM cannot run in the implicit transaction of a multi-statement query.)
#[allow(dead_code)]
pub fn fill_sql(n: usize) -> String {
    format!(
        "INSERT INTO items
           SELECT i, 'item-' || i, i % 50, 'Item ' || i, 10 + (i % 1000) / 10.0, 100,
                  'description of item ' || i || ' ' || md5(i::text)
             FROM generate_series(1, {n}) i"
    )
}

/// The realistic rule set on `items`: a delete rule with two keys and a tag (UNLINK of
/// both keys, a tag purge script), and a republish rule with a projection and a TTL
/// (a versioned SET script); every change matches both.
#[allow(dead_code)]
pub fn item_rules(prefix: &str) -> String {
    r#"
[[rule]]
name = "item"
table = "public.items"
keys = ["PFX:item:v1:{id}", "PFX:item:slug:v1:{slug}"]
tags = ["PFX:category:{category_id}"]

[[rule]]
name = "item_json"
table = "public.items"
keys = ["PFX:item:json:v1:{id}"]
action = "republish"
columns = ["id", "name", "price", "stock"]
ttl = "1h"
"#
    .replace("PFX", prefix)
}

/// The republished key of a row.
#[allow(dead_code)]
pub fn json_key(prefix: &str, id: i32) -> String {
    format!("{prefix}:item:json:v1:{id}")
}

/// Overrides of the daemon's defaults, from the bench or from the environment.
#[derive(Debug, Clone, Default)]
#[allow(dead_code)]
pub struct Tuning {
    pub metrics_port: Option<u16>,
    /// `[pipeline] batch_deadline` (humantime, e.g. `1ms`).
    pub batch_deadline: Option<String>,
    pub batch_size: Option<usize>,
    /// `[kafka.properties]`.
    pub kafka_properties: Vec<(String, String)>,
    /// `[redis] wait_replicas` (the Redis of the bench needs that many replicas).
    pub wait_replicas: Option<u32>,
}

#[allow(dead_code)]
impl Tuning {
    /// `W2C_BENCH_BATCH_DEADLINE=1ms`, `W2C_BENCH_BATCH_SIZE=1000`,
    /// `W2C_BENCH_KAFKA_PROPS="linger.ms=0,batch.num.messages=1000"` and
    /// `W2C_BENCH_WAIT_REPLICAS=1`.
    pub fn from_env() -> Tuning {
        let mut t = Tuning {
            wait_replicas: std::env::var("W2C_BENCH_WAIT_REPLICAS")
                .ok()
                .map(|v| v.parse().expect("W2C_BENCH_WAIT_REPLICAS: a number")),
            batch_deadline: std::env::var("W2C_BENCH_BATCH_DEADLINE").ok(),
            batch_size: std::env::var("W2C_BENCH_BATCH_SIZE")
                .ok()
                .map(|v| v.parse().expect("W2C_BENCH_BATCH_SIZE: a number")),
            ..Tuning::default()
        };
        if let Ok(props) = std::env::var("W2C_BENCH_KAFKA_PROPS") {
            for p in props.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, v) = p
                    .split_once('=')
                    .expect("W2C_BENCH_KAFKA_PROPS: key=value,key=value");
                t.kafka_properties
                    .push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        t
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        let mut parts = vec![
            format!(
                "batch_deadline={}",
                self.batch_deadline.as_deref().unwrap_or("default (5ms)")
            ),
            format!(
                "batch_size={}",
                self.batch_size
                    .map_or("default (1000)".to_string(), |n| n.to_string())
            ),
        ];
        if self.kafka_properties.is_empty() {
            parts.push("kafka.properties: none (linger.ms=2 built in)".into());
        } else {
            let props: Vec<String> = self
                .kafka_properties
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            parts.push(format!("kafka.properties: {}", props.join(", ")));
        }
        parts.join("; ")
    }
}

/// Everything one daemon run is named by, and its files.
#[allow(dead_code)]
pub struct BenchSetup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Prefix of every Redis key and tag (and of the tag sets).
    pub prefix: String,
    pub topic: String,
    pub slot: String,
    pub publication: String,
}

#[allow(dead_code)]
impl BenchSetup {
    /// Writes the rules and the config for a daemon on `db`, its slot `<db>_d`.
    pub fn write(db: &TestDb, label: &str, tuning: &Tuning) -> BenchSetup {
        BenchSetup::write_rules(db, label, tuning, item_rules)
    }

    /// As `write`, with the rules `rules_for(prefix)` instead of [`item_rules`].
    pub fn write_rules(
        db: &TestDb,
        label: &str,
        tuning: &Tuning,
        rules_for: impl FnOnce(&str) -> String,
    ) -> BenchSetup {
        let prefix = format!("w2cb_{label}_{}", std::process::id());
        let topic = format!("w2cb-{label}-{}", std::process::id());
        let publication = "w2c_bench".to_string();
        let dir = tempfile::Builder::new()
            .prefix(&format!("w2c-bench-{label}-"))
            .tempdir()
            .unwrap();
        let mut config = ConfigBuilder::new(db)
            // Each run its own stream record: another run's would be a slot loss.
            .name(&format!("bench-{label}-{}", std::process::id()))
            .publication(&publication)
            .rules(&rules_for(&prefix))
            .redis_key("tag_prefix", format!("{prefix}:tag:"))
            .kafka_topic(&topic)
            .kafka_key("partitions", 3)
            .pipeline("shutdown_timeout", "60s");
        for (k, v) in &tuning.kafka_properties {
            config = config.kafka_property(k, v);
        }
        if let Some(d) = &tuning.batch_deadline {
            config = config.pipeline("batch_deadline", d.as_str());
        }
        if let Some(n) = tuning.batch_size {
            config = config.pipeline("batch_size", n);
        }
        if let Some(n) = tuning.wait_replicas {
            config = config.redis_key("wait_replicas", n);
        }
        if let Some(port) = tuning.metrics_port {
            config = config.metrics_listen(([127, 0, 0, 1], port).into());
        }
        let slot = config.slot_name().to_string();
        let path = config.write(dir.path());
        let log = dir.path().join("daemon.log");
        BenchSetup {
            dir,
            config: path,
            log,
            prefix,
            topic,
            slot,
            publication,
        }
    }

    /// `wal2cache setup`: the publication and the daemon's slot. Returns its output.
    pub fn run_setup(&self) -> Result<String, BoxError> {
        let (code, stdout, stderr) =
            run_binary(&["setup", "--config", self.config.to_str().unwrap()], &[]);
        if code != 0 {
            return Err(format!("wal2cache setup failed (exit {code}): {stdout}{stderr}").into());
        }
        Ok(stdout.trim().to_string())
    }

    /// Keeps the config and the daemon's log after the bench (printed path).
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }
}

/// Runs a daemon bench's `run` on `rt` (Ctrl-C interrupts it), then cleans up its Redis
/// keys and topic whatever happened, a panic included (which then goes on).
#[allow(dead_code)]
pub fn run_then_clean_up(
    rt: &tokio::runtime::Runtime,
    setup: &BenchSetup,
    run: impl Future<Output = Result<(), BoxError>>,
) -> Result<(), BoxError> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            tokio::select! {
                result = run => result,
                _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
            }
        })
    }));
    rt.block_on(cleanup(setup));
    result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A failed run: keeps its config and the daemon's log, says so, and exits 1.
#[allow(dead_code)]
pub fn fail(bench: &str, setup: BenchSetup, e: &BoxError) -> ! {
    eprintln!(
        "the config and the daemon's log are kept in {}",
        setup.keep().display()
    );
    eprintln!("{bench} failed: {}", chain(&**e));
    std::process::exit(1);
}

/// The daemon of a run (tests/support's `Daemon`, its log in a file), observed.
#[allow(dead_code)]
pub struct DaemonRun {
    daemon: Option<Daemon>,
    pub pid: i32,
    pub log: PathBuf,
    pub started: Instant,
}

#[allow(dead_code)]
impl DaemonRun {
    /// `wal2cache run`, logging at `W2C_BENCH_DAEMON_LOG` (`info`), under
    /// `W2C_BENCH_DAEMON_WRAPPER` when it is set (a command line split at whitespace,
    /// the daemon's own command line appended: e.g.
    /// `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out`).
    pub fn start(setup: &BenchSetup) -> DaemonRun {
        DaemonRun::start_logging(setup, "info")
    }

    /// `start`, logging at `level` when `W2C_BENCH_DAEMON_LOG` is not set.
    pub fn start_logging(setup: &BenchSetup, level: &str) -> DaemonRun {
        let started = Instant::now();
        let wrapper: Vec<String> = std::env::var("W2C_BENCH_DAEMON_WRAPPER")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let level = std::env::var("W2C_BENCH_DAEMON_LOG").unwrap_or_else(|_| level.into());
        let daemon = Daemon::start_wrapped(
            &setup.config,
            &[("WAL2CACHE_LOG", &level)],
            &wrapper,
            &setup.log,
        );
        DaemonRun {
            pid: daemon.pid(),
            daemon: Some(daemon),
            log: setup.log.clone(),
            started,
        }
    }

    /// An error (with the end of its log) when the daemon has exited.
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        match self.daemon.as_mut().and_then(Daemon::exit_status) {
            Some(status) => Err(format!(
                "the daemon exited unexpectedly ({status}); the end of its log:\n{}",
                self.log_tail(30)
            )
            .into()),
            None => Ok(()),
        }
    }

    /// A field of `/proc/<pid>/status` in kB (`VmHWM`, `VmRSS`).
    pub fn status_kb(&self, field: &str) -> u64 {
        status_field(self.pid, field)
    }

    /// User + system CPU seconds of the daemon (every thread) so far.
    pub fn cpu_secs(&self) -> f64 {
        process_cpu_secs(self.pid).unwrap_or(0.0)
    }

    pub fn threads(&self) -> u64 {
        status_field(self.pid, "Threads")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Log lines at WARN or ERROR.
    pub fn log_problems(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("error"))
            .map(str::to_string)
            .collect()
    }

    /// SIGTERM, then waits for the exit (killing it after `timeout`). Returns the exit
    /// status and how long the stop took.
    pub fn stop(&mut self, timeout: Duration) -> Result<(ExitStatus, Duration), BoxError> {
        let daemon = self.daemon.take().ok_or("the daemon is not running")?;
        match daemon.terminate_status(timeout) {
            Some(stopped) => Ok(stopped),
            None => Err(format!(
                "the daemon did not stop within {timeout:?} of SIGTERM: killed; the end of its log:\n{}",
                log_tail(&self.log, 30)
            )
            .into()),
        }
    }
}

/// The last `lines` lines of a log file.
fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The slot's `confirmed_flush_lsn`, and whether a process streams from it.
async fn slot_state(db: &TestDb, slot: &str) -> Result<(Option<Lsn>, bool), BoxError> {
    Ok(db
        .slot_state(slot)
        .await
        .ok_or_else(|| format!("slot {slot} does not exist"))?)
}

/// The end of a bench's last transaction: the daemon is done when its slot is
/// confirmed up to it.
///
/// Why not the end of the WAL: other databases of the server may write after the
/// last transaction, and no consumer of this database ever confirms their records.
/// Why not a position read inside the transaction before its commit: the daemon's
/// WAL heartbeats (non-transactional messages, `pipeline.idle_heartbeat`) let it
/// confirm a position between that read and the commit before it applied the
/// transaction. So it is the end of the commit record itself, exactly the LSN the
/// daemon confirms for the transaction: `TestDb::exec_commit_end` (`pg_walinspect`).
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)]
pub struct Marker {
    pub lsn: Lsn,
}

#[allow(dead_code)]
impl Marker {
    pub fn reached_by(&self, confirmed: Lsn) -> bool {
        confirmed >= self.lsn
    }
}

impl std::fmt::Display for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (end of the last commit record)", self.lsn)
    }
}

/// Runs `sql` in a transaction of its own and returns the [`Marker`] of its commit.
#[allow(dead_code)]
pub async fn marker_transaction(db: &TestDb, sql: &str) -> Marker {
    Marker {
        lsn: db.exec_commit_end(sql).await,
    }
}

/// One UPDATE of row `id` in a transaction of its own, and its [`Marker`].
#[allow(dead_code)]
pub async fn marker_update(db: &TestDb, id: i32) -> Marker {
    marker_transaction(
        db,
        &format!("UPDATE items SET price = price + 0.01, stock = stock + 1 WHERE id = {id}"),
    )
    .await
}

/// What `wait_confirmed` saw.
#[allow(dead_code)]
pub struct Progress {
    pub elapsed: Duration,
    /// When the slot became active (the daemon streams), from the daemon's start.
    pub active_after: Option<Duration>,
    /// When the confirmed position first moved, from the daemon's start.
    pub first_move_after: Option<Duration>,
    /// (time since the daemon's start, VmRSS kB) every poll.
    pub rss: Vec<(Duration, u64)>,
    /// (time since the daemon's start, confirmed) whenever it moved.
    pub confirmed: Vec<(Duration, Lsn)>,
}

/// Polls the slot every 100 ms until its confirmed position reaches `marker`. Fails
/// when the daemon exits, when nothing moved for `stall` (with the end of its log), or
/// after `timeout`.
#[allow(dead_code)]
pub async fn wait_confirmed(
    db: &TestDb,
    slot: &str,
    marker: Marker,
    daemon: &mut DaemonRun,
    stall: Duration,
    timeout: Duration,
) -> Result<Progress, BoxError> {
    let start = daemon.started;
    let mut p = Progress {
        elapsed: Duration::ZERO,
        active_after: None,
        first_move_after: None,
        rss: Vec::new(),
        confirmed: Vec::new(),
    };
    let (initial, _) = slot_state(db, slot).await?;
    let mut last = initial;
    let mut last_change = Instant::now();
    let mut last_cpu = daemon.cpu_secs();
    loop {
        daemon.check_alive()?;
        let (lsn, active) = slot_state(db, slot).await?;
        let now = start.elapsed();
        p.rss.push((now, daemon.status_kb("VmRSS")));
        if active && p.active_after.is_none() {
            p.active_after = Some(now);
        }
        if lsn != last {
            if p.first_move_after.is_none() {
                p.first_move_after = Some(now);
            }
            if let Some(l) = lsn {
                p.confirmed.push((now, l));
            }
            last = lsn;
            last_change = Instant::now();
        }
        if lsn.is_some_and(|l| marker.reached_by(l)) {
            p.elapsed = now;
            return Ok(p);
        }
        // Busy (CPU moving) is not stalled: one large transaction confirms nothing
        // until its commit.
        let cpu = daemon.cpu_secs();
        if cpu > last_cpu + 0.05 {
            last_cpu = cpu;
            last_change = Instant::now();
        }
        if last_change.elapsed() > stall {
            return Err(format!(
                "stalled: confirmed_flush_lsn of {slot} stayed at {last:?} and the daemon used no CPU for {stall:?} (target: {marker}); the end of its log:\n{}",
                daemon.log_tail(30)
            )
            .into());
        }
        if now > timeout {
            return Err(format!(
                "timeout: confirmed_flush_lsn of {slot} at {last:?} after {timeout:?} (target: {marker})"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// About `n` of the VmRSS samples of [`Progress::rss`], spread over the run, and the
/// last: `12s:45.6` (seconds, MiB).
#[allow(dead_code)]
pub fn rss_samples(rss: &[(Duration, u64)], n: usize) -> String {
    let step = (rss.len() / n).max(1);
    rss.iter()
        .step_by(step)
        .chain(rss.last())
        .map(|(t, kb)| format!("{:.0}s:{:.1}", t.as_secs_f64(), *kb as f64 / 1024.0))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits until the daemon streams from its slot.
#[allow(dead_code)]
pub async fn wait_active(
    db: &TestDb,
    slot: &str,
    daemon: &mut DaemonRun,
    timeout: Duration,
) -> Result<Duration, BoxError> {
    loop {
        daemon.check_alive()?;
        if slot_state(db, slot).await?.1 {
            return Ok(daemon.started.elapsed());
        }
        if daemon.started.elapsed() > timeout {
            return Err(format!(
                "the daemon does not stream from {slot} after {timeout:?}; the end of its log:\n{}",
                daemon.log_tail(30)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET /metrics.
#[allow(dead_code)]
pub async fn scrape(port: u16) -> Result<String, BoxError> {
    match http_async(([127, 0, 0, 1], port).into(), "GET", "/metrics").await {
        Some((200, body)) => Ok(body),
        Some((status, _)) => Err(format!("/metrics answered {status}").into()),
        None => Err("no answer from /metrics".into()),
    }
}

/// `INFO commandstats` of the bench's Redis: command -> (calls, usec).
#[allow(dead_code)]
pub async fn redis_commandstats() -> Result<std::collections::HashMap<String, (u64, u64)>, BoxError>
{
    let mut conn = redis().await;
    let text: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |f: &str| {
            fields
                .split(',')
                .find_map(|kv| kv.strip_prefix(f)?.strip_prefix('=')?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.insert(name.to_string(), (field("calls"), field("usec")));
    }
    Ok(out)
}

/// Deletes every Redis key of a bench: `<prefix>*`, and the version sidecars
/// `{<prefix>...}:w2c:v`. Returns how many.
#[allow(dead_code)]
pub async fn cleanup_redis(prefix: &str) -> Result<u64, BoxError> {
    let mut conn = redis().await;
    let mut total = 0;
    for pattern in [format!("{prefix}*"), format!("{{{prefix}*")] {
        total += try_unlink_matching(&mut conn, &pattern).await?;
    }
    Ok(total)
}

/// Deletes a bench's topic (the broker keeps it in memory); failures only warn.
#[allow(dead_code)]
pub async fn delete_topic_or_warn(topic: &str) {
    match try_delete_topic(topic).await {
        Ok(()) => eprintln!("deleted topic {topic}"),
        Err(e) => eprintln!("could not delete topic {topic} ({e}); it stays on the broker"),
    }
}

/// The cleanup every daemon bench does at its end, whatever happened.
#[allow(dead_code)]
pub async fn cleanup(setup: &BenchSetup) {
    match cleanup_redis(&setup.prefix).await {
        Ok(n) => eprintln!("deleted {n} Redis keys under {}", setup.prefix),
        Err(e) => eprintln!(
            "could not delete the Redis keys under {} ({e}): SCAN + UNLINK them by hand; Redis at {}",
            setup.prefix,
            redis_url()
        ),
    }
    delete_topic_or_warn(&setup.topic).await;
}
