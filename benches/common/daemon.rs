//! Shared by the benches that run the daemon itself (`catchup`, `latency`,
//! `txn_memory`): the table and rules they write to, the config file, the `wal2cache`
//! process (spawned, observed through /proc, stopped with SIGTERM), the slot's
//! confirmed position, the Prometheus endpoint, and cleanup of Redis keys.
//!
//! Include it beside `common` with
//!
//! ```ignore
//! mod common;
//! #[path = "common/daemon.rs"]
//! mod daemon;
//! ```
//!
//! The binary: `env!("CARGO_BIN_EXE_wal2cache")`. Cargo sets it for benchmarks as for
//! integration tests and builds the `wal2cache` binary (with the bench profile, i.e.
//! release settings, into `target/release/`) before it runs a bench, so the daemon
//! measured is always the one of the checkout. `W2C_BENCH_BIN` runs another binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wal2cache::Lsn;

use crate::common::{BenchDb, BoxError};

pub fn binary() -> String {
    std::env::var("W2C_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_wal2cache").into())
}

pub fn redis_url() -> String {
    std::env::var("WAL2CACHE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:63790".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("WAL2CACHE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The table every daemon bench writes. `REPLICA IDENTITY FULL`: the keys use the
/// slug and the tag the category, neither of them the primary key, so an update must
/// carry the old row (as `products` in the example schema).
pub const TABLE: &str = "items";

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
pub fn rules(prefix: &str) -> String {
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
pub fn json_key(prefix: &str, id: i32) -> String {
    format!("{prefix}:item:json:v1:{id}")
}

/// Overrides of the daemon's defaults, from the bench or from the environment.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    pub metrics_port: Option<u16>,
    /// `[pipeline] batch_deadline` (humantime, e.g. `1ms`).
    pub batch_deadline: Option<String>,
    pub batch_size: Option<usize>,
    /// `[kafka.properties]`.
    pub kafka_properties: Vec<(String, String)>,
}

impl Tuning {
    /// `W2C_BENCH_BATCH_DEADLINE=1ms`, `W2C_BENCH_BATCH_SIZE=1000` and
    /// `W2C_BENCH_KAFKA_PROPS="linger.ms=0,batch.num.messages=1000"`.
    pub fn from_env() -> Tuning {
        let mut t = Tuning {
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
            parts.push("kafka.properties: none (linger.ms=1 built in)".into());
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
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Prefix of every Redis key and tag (and of the tag sets).
    pub prefix: String,
    pub topic: String,
    pub slot: String,
    pub publication: String,
}

impl Setup {
    /// Writes the rules and the config for a daemon on `db`, its slot `<db>_d`.
    pub fn write(db: &BenchDb, label: &str, tuning: &Tuning) -> Result<Setup, BoxError> {
        Setup::write_rules(db, label, tuning, rules)
    }

    /// As `write`, with the rules `rules_for(prefix)` instead of [`rules`].
    pub fn write_rules(
        db: &BenchDb,
        label: &str,
        tuning: &Tuning,
        rules_for: impl FnOnce(&str) -> String,
    ) -> Result<Setup, BoxError> {
        let prefix = format!("w2cb_{label}_{}", std::process::id());
        let topic = format!("w2cb-{label}-{}", std::process::id());
        let slot = format!("{}_d", db.name);
        let publication = "w2c_bench".to_string();
        let dir = tempfile::Builder::new()
            .prefix(&format!("w2c-bench-{label}-"))
            .tempdir()?;
        std::fs::write(dir.path().join("rules.toml"), rules_for(&prefix))?;
        let mut text = format!(
            r#"name = "bench-{label}"
[postgres]
url = "{url}"
slot = "{slot}"
publication = "{publication}"
[rules]
path = "rules.toml"
[redis]
url = "{redis}"
tag_prefix = "{prefix}:tag:"
[kafka]
brokers = "{kafka}"
topic = "{topic}"
partitions = 3
"#,
            url = db.url,
            redis = redis_url(),
            kafka = kafka_brokers(),
        );
        if !tuning.kafka_properties.is_empty() {
            text.push_str("[kafka.properties]\n");
            for (k, v) in &tuning.kafka_properties {
                text.push_str(&format!("{k:?} = {v:?}\n"));
            }
        }
        text.push_str("[pipeline]\nshutdown_timeout = \"60s\"\n");
        if let Some(d) = &tuning.batch_deadline {
            text.push_str(&format!("batch_deadline = {d:?}\n"));
        }
        if let Some(n) = tuning.batch_size {
            text.push_str(&format!("batch_size = {n}\n"));
        }
        if let Some(port) = tuning.metrics_port {
            text.push_str(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
        }
        let config = dir.path().join("wal2cache.toml");
        std::fs::write(&config, text)?;
        let log = dir.path().join("daemon.log");
        Ok(Setup {
            dir,
            config,
            log,
            prefix,
            topic,
            slot,
            publication,
        })
    }

    /// `wal2cache setup`: the publication and the daemon's slot. Returns its output.
    pub fn run_setup(&self) -> Result<String, BoxError> {
        let out = Command::new(binary())
            .args(["setup", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", binary()))?;
        if !out.status.success() {
            return Err(format!(
                "wal2cache setup failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Keeps the config and the daemon's log after the bench (printed path).
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }
}

/// The daemon as a child process (its log in a file), killed if the bench ends
/// without stopping it.
pub struct Daemon {
    child: Option<Child>,
    pub pid: i32,
    pub log: PathBuf,
    pub started: Instant,
}

impl Daemon {
    /// `wal2cache run`, under `W2C_BENCH_DAEMON_WRAPPER` when it is set (a command
    /// line split at whitespace, the daemon's own command line appended: e.g.
    /// `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out`; the wrapper must
    /// become the daemon's process, as valgrind does, for the pid to be the daemon's).
    pub fn start(setup: &Setup) -> Result<Daemon, BoxError> {
        let log = std::fs::File::create(&setup.log)?;
        let started = Instant::now();
        let wrapper: Vec<String> = std::env::var("W2C_BENCH_DAEMON_WRAPPER")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let child = command
            .args(["run", "--config"])
            .arg(&setup.config)
            .env(
                "WAL2CACHE_LOG",
                std::env::var("W2C_BENCH_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary()))?;
        Ok(Daemon {
            pid: child.id() as i32,
            child: Some(child),
            log: setup.log.clone(),
            started,
        })
    }

    /// An error (with the end of its log) when the daemon has exited.
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Err(format!(
                    "the daemon exited unexpectedly ({status}); the end of its log:\n{}",
                    self.log_tail(30)
                )
                .into());
            }
        }
        Ok(())
    }

    /// A field of `/proc/<pid>/status` in kB (`VmHWM`, `VmRSS`).
    pub fn status_kb(&self, field: &str) -> u64 {
        proc_status_kb_of(self.pid, field)
    }

    /// User + system CPU seconds of the daemon (every thread) so far.
    pub fn cpu_secs(&self) -> f64 {
        process_cpu_secs(self.pid).unwrap_or(0.0)
    }

    pub fn threads(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
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
    pub async fn stop(&mut self, timeout: Duration) -> Result<(ExitStatus, Duration), BoxError> {
        let Some(mut child) = self.child.take() else {
            return Err("the daemon is not running".into());
        };
        let t = Instant::now();
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        if !kill.success() {
            return Err("kill -TERM failed".into());
        }
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, t.elapsed()));
            }
            if t.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the daemon did not stop within {timeout:?} of SIGTERM: killed; the end of its log:\n{}",
                    self.log_tail(30)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn proc_status_kb_of(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of a process, from `/proc/<pid>/stat`.
pub fn process_cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces): rest[0] is field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest: Vec<u64> = stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Some((rest.get(11)? + rest.get(12)?) as f64 / clock_ticks_per_second())
}

/// The pid of the process listening on TCP `port` (127.0.0.1, 0.0.0.0 or IPv6), from
/// `/proc/net/tcp{,6}` and the socket inodes of `/proc/*/fd` (readable as root or as
/// the server's owner); `None` when not found.
pub fn pid_listening_on(port: u16) -> Option<i32> {
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address (ip:port, hex), rem_address, st (0A: LISTEN), ..., inode.
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let listening_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && listening_port == Some(port) {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort();
    pids.into_iter().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| inodes.contains(l.to_string_lossy().as_ref()))
            })
    })
}

/// The port of a `host:port` or `scheme://host:port/...` address (the first of a list).
pub fn port_of(address: &str) -> Option<u16> {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let host_port = rest.split([',', '/', '?']).next()?;
    host_port.rsplit_once(':')?.1.parse().ok()
}

/// The command name of a process (`/proc/<pid>/comm`).
pub fn process_name(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A process observed for its CPU: found once, read before and after.
#[derive(Debug, Clone)]
pub struct Observed {
    pub label: &'static str,
    pub pid: Option<i32>,
    pub before: f64,
}

impl Observed {
    /// The process listening on `port`, or the pid in the environment variable `env`.
    pub fn on_port(label: &'static str, port: Option<u16>, env: &str) -> Observed {
        let pid = std::env::var(env)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .or_else(|| pid_listening_on(port?));
        Observed::pid(label, pid)
    }

    pub fn pid(label: &'static str, pid: Option<i32>) -> Observed {
        let before = pid.and_then(process_cpu_secs).unwrap_or(0.0);
        Observed { label, pid, before }
    }

    /// CPU seconds since it was found (`None` when it was not, or is gone).
    pub fn used(&self) -> Option<f64> {
        Some(process_cpu_secs(self.pid?)? - self.before)
    }
}

/// `INFO commandstats` of the bench's Redis: command -> (calls, usec).
pub async fn redis_commandstats() -> Result<std::collections::HashMap<String, (u64, u64)>, BoxError>
{
    let mut conn = redis_conn().await?;
    let text: String = redis::cmd("INFO")
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

/// CPU seconds of this process's waited-for children (`cutime + cstime`).
pub fn children_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some(i) = stat.rfind(')') else {
        return 0.0;
    };
    let rest: Vec<u64> = stat[i + 1..]
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    (rest.get(13).unwrap_or(&0) + rest.get(14).unwrap_or(&0)) as f64 / clock_ticks_per_second()
}

pub fn clock_ticks_per_second() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The slot's `confirmed_flush_lsn`, and whether a process streams from it.
pub async fn slot_state(db: &BenchDb, slot: &str) -> Result<(Option<Lsn>, bool), BoxError> {
    let row = db
        .client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .ok_or_else(|| format!("slot {slot} does not exist"))?;
    let lsn = row
        .get::<_, Option<String>>(0)
        .map(|s| s.parse::<Lsn>())
        .transpose()?;
    Ok((lsn, row.get(1)))
}

/// The end of a bench's last transaction: the daemon is done when its slot is
/// confirmed up to it.
///
/// Why not the end of the WAL: other databases of the server may write after the
/// last transaction, and no consumer of this database ever confirms their records.
/// Why not a position read inside the transaction before its commit: the daemon's
/// WAL heartbeats (non-transactional messages, `pipeline.idle_heartbeat`) let it
/// confirm a position between that read and the commit before it applied the
/// transaction. So the commit record itself is looked up with `pg_walinspect`
/// (contrib, created in the bench's database; the bench role is a superuser): its
/// end is exactly the LSN the daemon confirms for the transaction. Without the
/// extension, `exact` is false and `lsn` is the position read before the commit (a
/// slot confirmed past it has applied the transaction unless a heartbeat landed in
/// between).
#[derive(Debug, Clone, Copy)]
pub struct Marker {
    pub lsn: Lsn,
    pub exact: bool,
}

impl Marker {
    pub fn reached_by(&self, confirmed: Lsn) -> bool {
        if self.exact {
            confirmed >= self.lsn
        } else {
            confirmed > self.lsn
        }
    }
}

impl std::fmt::Display for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.exact {
            write!(f, "{} (end of the last commit record)", self.lsn)
        } else {
            write!(
                f,
                "past {} (read before the last commit; pg_walinspect missing)",
                self.lsn
            )
        }
    }
}

/// Runs `sql` in a transaction of its own and returns the [`Marker`] of its commit.
pub async fn marker_transaction(db: &mut BenchDb, sql: &str) -> Result<Marker, BoxError> {
    let _ = db
        .client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        .await;
    let txn = db.client.transaction().await?;
    txn.batch_execute(sql).await?;
    let row = txn
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, (txid_current() % 4294967296)::text",
            &[],
        )
        .await?;
    let (before, xid): (String, String) = (row.get(0), row.get(1));
    txn.commit().await?;
    let before: Lsn = before.parse()?;
    let end = db
        .client
        .query_opt(
            "SELECT end_lsn::text FROM pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn())
              WHERE resource_manager = 'Transaction' AND record_type LIKE 'COMMIT%' AND xid::text = $2
              LIMIT 1",
            &[&before.to_string(), &xid],
        )
        .await;
    Ok(match end {
        Ok(Some(row)) => Marker {
            lsn: row.get::<_, String>(0).parse()?,
            exact: true,
        },
        _ => Marker {
            lsn: before,
            exact: false,
        },
    })
}

/// One UPDATE of row `id` in a transaction of its own, and its [`Marker`].
pub async fn marker_update(db: &mut BenchDb, id: i32) -> Result<Marker, BoxError> {
    marker_transaction(
        db,
        &format!("UPDATE items SET price = price + 0.01, stock = stock + 1 WHERE id = {id}"),
    )
    .await
}

/// What `wait_confirmed` saw.
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
pub async fn wait_confirmed(
    db: &BenchDb,
    slot: &str,
    marker: Marker,
    daemon: &mut Daemon,
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

/// Waits until the daemon streams from its slot.
pub async fn wait_active(
    db: &BenchDb,
    slot: &str,
    daemon: &mut Daemon,
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

/// A port free right now on 127.0.0.1.
pub fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// GET /metrics.
pub async fn scrape(port: u16) -> Result<String, BoxError> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| "no answer from /metrics within 10 s")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP answer from /metrics")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("/metrics answered {}", head.lines().next().unwrap_or("")).into());
    }
    Ok(dechunk(head, body))
}

fn dechunk(head: &str, body: &str) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of a sample in Prometheus text format: `name` alone or `name{labels}`
/// (labels written as the exporter writes them, e.g. `quantile="0.99"`).
pub fn metric(text: &str, name: &str, labels: Option<&str>) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let matches = match labels {
            None => series == name,
            Some(want) => series
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('{'))
                .and_then(|r| r.strip_suffix('}'))
                .is_some_and(|ls| ls.split(',').any(|l| l == want)),
        };
        if matches {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Quantiles of a summary as the exporter renders it, in seconds.
pub struct Quantiles {
    pub count: Option<f64>,
    pub sum: Option<f64>,
    pub q: Vec<(f64, Option<f64>)>,
}

pub fn quantiles(text: &str, name: &str) -> Quantiles {
    let q = [0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0]
        .iter()
        .map(|&q| (q, metric(text, name, Some(&format!("quantile=\"{q}\"")))))
        .collect();
    Quantiles {
        count: metric(text, &format!("{name}_count"), None),
        sum: metric(text, &format!("{name}_sum"), None),
        q,
    }
}

impl Quantiles {
    pub fn get(&self, q: f64) -> Option<f64> {
        self.q
            .iter()
            .find(|(x, _)| (*x - q).abs() < 1e-9)
            .and_then(|(_, v)| *v)
    }
}

/// Deletes every Redis key of a bench: `<prefix>*`, and the version sidecars
/// `{<prefix>...}:w2c:v`. Returns how many.
pub async fn cleanup_redis(prefix: &str) -> Result<u64, BoxError> {
    let client = redis::Client::open(redis_url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut total = 0;
    for pattern in [format!("{prefix}*"), format!("{{{prefix}*")] {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                total += keys.len() as u64;
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(total)
}

pub async fn redis_conn() -> Result<redis::aio::MultiplexedConnection, BoxError> {
    Ok(redis::Client::open(redis_url())?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot connect to Redis at {}: {e}", redis_url()))?)
}

/// The low and high watermarks of every partition of a topic.
pub async fn topic_watermarks(topic: &str) -> Result<Vec<(i32, i64, i64)>, BoxError> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || -> Result<Vec<(i32, i64, i64)>, BoxError> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("group.id", "w2c-bench-unused")
            .set("enable.auto.commit", "false")
            .create()?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let t = md
            .topics()
            .first()
            .ok_or_else(|| format!("topic {topic} not found"))?;
        let mut out = Vec::new();
        for p in t.partitions() {
            let (lo, hi) = consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
            out.push((p.id(), lo, hi));
        }
        Ok(out)
    })
    .await?
}

/// Deletes a bench's topic (the broker keeps it in memory); failures only warn.
pub async fn delete_topic(topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: Result<AdminClient<DefaultClientContext>, _> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create();
    let result = match admin {
        Ok(admin) => admin
            .delete_topics(
                &[topic],
                &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| {
                r.into_iter()
                    .map(|x| x.map(|_| ()).map_err(|(_, c)| c.to_string()))
                    .collect::<Result<Vec<()>, String>>()
            }),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(_) => eprintln!("deleted topic {topic}"),
        Err(e) => eprintln!("could not delete topic {topic} ({e}); it stays on the broker"),
    }
}

/// The cleanup every daemon bench does at its end, whatever happened.
pub async fn cleanup(setup: &Setup) {
    match cleanup_redis(&setup.prefix).await {
        Ok(n) => eprintln!("deleted {n} Redis keys under {}", setup.prefix),
        Err(e) => eprintln!(
            "could not delete the Redis keys under {} ({e}): SCAN + UNLINK them by hand",
            setup.prefix
        ),
    }
    delete_topic(&setup.topic).await;
}

/// `x` seconds as `1.23 ms`.
pub fn ms(secs: f64) -> String {
    format!("{:.3} ms", secs * 1000.0)
}

/// Percentile (0..=1) of sorted durations, nearest rank.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn path_display(p: &Path) -> String {
    p.display().to_string()
}

/// Per partition: (partition, high watermark as read first, next offset after the last
/// message read).
pub type PartitionEnds = Vec<(i32, i64, i64)>;

/// Reads every partition of a topic from its beginning, handing each message to
/// `each` (partition, offset, payload; heartbeats included), until no message came for
/// `idle` (and at least every partition's high watermark, as read first, was passed),
/// or `timeout`. Reading does not stop at the high watermarks: a broker that reports
/// them short still shows what it stored. Returns how many messages were read and,
/// per partition, (high watermark as read first, next offset after the last message
/// read).
pub async fn consume_topic(
    topic: &str,
    idle: Duration,
    timeout: Duration,
    each: impl FnMut(i32, i64, &[u8]) + Send + 'static,
) -> Result<(u64, PartitionEnds), BoxError> {
    let marks = topic_watermarks(topic).await?;
    let topic = topic.to_string();
    let mut each = each;
    tokio::task::spawn_blocking(move || -> Result<(u64, PartitionEnds), BoxError> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message;
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("group.id", "w2c-bench-unused")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100")
            .create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        let mut next: std::collections::HashMap<i32, (i64, i64)> = Default::default();
        for (p, lo, hi) in &marks {
            tpl.add_partition_offset(&topic, *p, rdkafka::Offset::Offset(*lo))?;
            next.insert(*p, (*hi, *lo));
        }
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + timeout;
        let mut last_message = Instant::now();
        let mut read = 0u64;
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    read += 1;
                    last_message = Instant::now();
                    if let Some(n) = next.get_mut(&m.partition()) {
                        n.1 = n.1.max(m.offset() + 1);
                    }
                    each(m.partition(), m.offset(), m.payload().unwrap_or_default());
                }
                Some(Err(e)) => return Err(format!("consuming {topic}: {e}").into()),
                None => {
                    let passed = next.values().all(|(hi, n)| n >= hi);
                    if passed && last_message.elapsed() >= idle {
                        break;
                    }
                }
            }
        }
        let mut out: PartitionEnds = next.into_iter().map(|(p, (hi, n))| (p, hi, n)).collect();
        out.sort();
        Ok((read, out))
    })
    .await?
}
