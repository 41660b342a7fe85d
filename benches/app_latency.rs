//! Latency as an application sees it: an external client commits an UPDATE and then
//! polls Redis until the key is gone (and an in-process `wal2cache::l1` until it evicted
//! the key), while `pgbench` drives TPC-B transactions through the same daemon at a
//! fixed rate, everything on this machine. The machine's CPU busy share is printed
//! beside the figures. Targets: at 1,000 transactions/s, commit → Redis gone p50 under
//! 2 ms and p99 under 10 ms; at 2,000/s the figures are reported (aim: p99 under 20 ms).
//!
//! Running it (the `l1` feature is not a default one: without it cargo refuses the
//! bench, and a plain `cargo bench` skips it):
//!
//!     cargo bench --features l1 --bench app_latency
//!     W2C_BENCH_RATE=1000 W2C_BENCH_SECS=10 cargo bench --features l1 --bench app_latency
//!     W2C_BENCH_RATE=1000,2000,3000 W2C_BENCH_SCALE=1 cargo bench --features l1 --bench app_latency
//!
//! Env knobs: `W2C_BENCH_RATE` (pgbench's `-R`, a comma-separated list; default
//! `1000,2000`), `W2C_BENCH_SECS` (pgbench's `-T` per rate, 30), `W2C_BENCH_SCALE`
//! (`pgbench -i -s`, 10: 10 branches, 100 tellers, 1,000,000 accounts),
//! `W2C_BENCH_CLIENTS` (pgbench `-c`, 4; `-j` is 2), `W2C_BENCH_PROBE_MS` (probe period,
//! 20), `W2C_BENCH_POLL_US` (pause between two Redis `EXISTS` of the polling loop,
//! 150), `W2C_BENCH_DAEMON_LOG` (the daemon's `WAL2CACHE_LOG`, `warn`),
//! `W2C_BENCH_L1` (0: no L1, so the broker serves no consumer: commit → Redis only),
//! `W2C_BENCH_BATCH_DEADLINE` / `W2C_BENCH_BATCH_SIZE` (the daemon's `[pipeline]`),
//! `W2C_BENCH_KAFKA_PROPS` (`k=v,k=v`, the daemon's `[kafka.properties]`),
//! `W2C_BENCH_BIN` (another `wal2cache` binary), `PGBENCH` (the pgbench binary;
//! default /usr/lib/postgresql/15/bin/pgbench, else `pgbench` on the PATH), and the
//! services' `WAL2CACHE_TEST_PG` / `_REDIS` / `_KAFKA`.
//!
//! The daemon is the `wal2cache` binary of this checkout (cargo builds it into
//! target/release/ and passes its path in `CARGO_BIN_EXE_wal2cache`), run with the
//! default configuration a new user starts from (batch deadline 5 ms, `linger.ms` 0,
//! 3 partitions) plus `[metrics] listen`; the L1 has its defaults too
//! (`fetch.wait.max.ms` 10).
//!
//! Setup: a database `w2c_bench_applat_<pid>`, `pgbench -i -s SCALE` in it, and a table
//! `probe(id int primary key, v int)` of 1,000 rows. Rules (all keys on primary keys, so
//! the default replica identity is what `wal2cache check` asks for): a delete rule on
//! `pgbench_accounts` (key `P:acct:{aid}`, tag `P:accounts:list` that every row shares),
//! a republish rule on `pgbench_tellers` (`P:teller:{tid}`, columns tid, bid, tbalance,
//! TTL 1h), and a delete rule on `probe` (`P:probe:{id}`). pgbench's branches and
//! history tables are left out of the publication. `wal2cache check`, then `wal2cache
//! setup`. The daemon is started afresh for each rate (its /metrics then cover that
//! rate only) and stopped with SIGTERM after it.
//!
//! Per rate: `pgbench -n -R RATE -T SECS -c CLIENTS -j 2` (the default TPC-B script:
//! five statements, of which the accounts and tellers UPDATEs match rules). From 1 s
//! after its start to 0.5 s before its end, a probe every `W2C_BENCH_PROBE_MS`, on a
//! thread of its own with its own PostgreSQL and Redis connections: insert the probe
//! key into the L1, `SET` it in Redis, re-cache a list page under the shared tag
//! (`SET` + `SADD`, so the tag purges have work), then an autocommitted `UPDATE probe
//! SET v = v + 1 WHERE id = $1`; the clock starts when the UPDATE returns (the commit
//! as the client knows it), then `EXISTS` in a tight loop (pausing `W2C_BENCH_POLL_US`
//! between tries) until the key is gone: commit → Redis gone. The L1's `on_notice`
//! callback stamps the eviction of the key: commit → L1 evicted (it can be negative
//! when the eviction beats the client's own COMMIT reply). Both include what a client
//! pays to look (a poll interval plus a round trip for Redis).
//!
//! Printed per rate: the probes, p50/p90/p99/max of both latencies, pgbench's achieved
//! TPS and latency lines, the machine's CPU busy share over the probe window from
//! /proc/stat (1 - (idle + iowait) / total over both cores; also the busiest second),
//! the CPU seconds of the walsender serving the daemon's slot, of the busiest process groups (by command name, from /proc/*/stat,
//! over the same window: the daemon, postgres, pgbench, Redis, the broker, this bench,
//! and whatever else runs, e.g. another engineer's compile), the daemon's CPU seconds,
//! the daemon's own `wal2cache_commit_to_redis_seconds` and
//! `wal2cache_commit_to_kafka_seconds` summaries and its `wal2cache_batch_seconds`, and
//! a verdict against the targets. The last line per rate, `result: k=v ...`, is for
//! scripts. At the end the database is dropped with its slot, the Redis keys under
//! `w2cb_applat_<pid>` are deleted, and the topic `w2cb-applat-<pid>` is deleted.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};
use wal2cache::l1::{Notice, L1};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const PROBE_ROWS: i32 = 1000;

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.into())
}

fn env_u64(name: &str, default: u64) -> u64 {
    let v = env_or(name, &default.to_string());
    v.replace('_', "")
        .parse()
        .unwrap_or_else(|_| panic!("{name}={v:?} is not a positive integer"))
}

fn admin_url() -> String {
    env_or(
        "WAL2CACHE_TEST_PG",
        "postgres://postgres@127.0.0.1:54320/postgres",
    )
}

fn redis_url() -> String {
    env_or("WAL2CACHE_TEST_REDIS", "redis://127.0.0.1:63790")
}

fn kafka_brokers() -> String {
    env_or("WAL2CACHE_TEST_KAFKA", "127.0.0.1:19092")
}

fn binary() -> String {
    std::env::var("W2C_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_wal2cache").into())
}

fn pgbench_bin() -> String {
    std::env::var("PGBENCH").unwrap_or_else(|_| {
        let p = "/usr/lib/postgresql/15/bin/pgbench";
        if Path::new(p).exists() {
            p.into()
        } else {
            "pgbench".into()
        }
    })
}

/// `admin_url` with another database.
fn url_for(database: &str) -> String {
    let url = admin_url();
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b.to_string(), format!("?{q}")),
        None => (url.clone(), String::new()),
    };
    match base.rfind('/') {
        Some(i) if i > "postgres://".len() => format!("{}/{database}{query}", &base[..i]),
        _ => format!("{base}/{database}{query}"),
    }
}

async fn connect(url: &str) -> Result<Client, BoxError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn run_tool(program: &str, args: &[&str]) -> Result<String, BoxError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {text}",
            args.join(" "),
            out.status
        )
        .into());
    }
    Ok(text)
}

// ---------------------------------------------------------------- /proc figures

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// (busy, total) jiffies of all CPUs, from the `cpu` line of /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let total: u64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn busy_share(a: (u64, u64), b: (u64, u64)) -> f64 {
    let total = b.1.saturating_sub(a.1);
    if total == 0 {
        return 0.0;
    }
    b.0.saturating_sub(a.0) as f64 / total as f64
}

/// (command name, utime + stime in jiffies) of a process.
fn proc_stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let rest: Vec<u64> = stat[close + 1..]
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Some((comm, rest.get(11)? + rest.get(12)?))
}

/// Every process's CPU jiffies, by pid.
fn all_procs() -> HashMap<u32, (String, u64)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, proc_stat(pid)?)))
        .collect()
}

/// CPU seconds per command name between two snapshots (a process born in between
/// counts whole; one that ended in between is lost), busiest first.
fn cpu_by_command(
    before: &HashMap<u32, (String, u64)>,
    after: &HashMap<u32, (String, u64)>,
    tck: f64,
) -> Vec<(String, f64)> {
    let mut by: HashMap<String, u64> = HashMap::new();
    for (pid, (comm, t)) in after {
        let t0 = match before.get(pid) {
            Some((c, t0)) if c == comm => *t0,
            _ => 0,
        };
        let group = if comm.starts_with("app_latency") {
            "this bench".to_string()
        } else {
            comm.clone()
        };
        *by.entry(group).or_default() += t.saturating_sub(t0);
    }
    let mut v: Vec<(String, f64)> = by
        .into_iter()
        .filter(|(_, t)| *t > 0)
        .map(|(c, t)| (c, t as f64 / tck))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

// ---------------------------------------------------------------- the daemon

struct Daemon {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, log: &Path) -> Result<Daemon, BoxError> {
        let file = std::fs::File::create(log)?;
        let child = Command::new(binary())
            .args(["run", "--config"])
            .arg(config)
            .env("WAL2CACHE_LOG", env_or("W2C_BENCH_DAEMON_LOG", "warn"))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary()))?;
        Ok(Daemon {
            pid: child.id(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn check_alive(&mut self) -> Result<(), BoxError> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Err(format!(
                    "the daemon exited ({status}); the end of its log:\n{}",
                    self.log_tail()
                )
                .into());
            }
        }
        Ok(())
    }

    fn cpu_secs(&self, tck: f64) -> f64 {
        proc_stat(self.pid).map_or(0.0, |(_, t)| t as f64 / tck)
    }

    /// SIGTERM, then waits (killed after 60 s).
    fn stop(&mut self) -> Result<(), BoxError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    eprintln!(
                        "the daemon exited with {status}; the end of its log:\n{}",
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the daemon did not stop within 60 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(20));
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

async fn scrape(port: u16) -> Result<String, BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| "no answer from /metrics within 10 s")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP answer from /metrics")?;
    if !head.contains(" 200") {
        return Err(format!("/metrics answered {}", head.lines().next().unwrap_or("")).into());
    }
    Ok(body.to_string())
}

/// A sample of Prometheus text: `name` alone (`labels` empty), or `name{...}` holding
/// every one of `labels` (written as the exporter writes them: `quantile="0.99"`).
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let ok = if labels.is_empty() {
            series == name
        } else {
            series
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('{'))
                .and_then(|r| r.strip_suffix('}'))
                .is_some_and(|ls| labels.iter().all(|w| ls.split(',').any(|l| l == *w)))
        };
        if ok {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

/// A summary as `p50 … p90 … p99 … max … mean … (n = …)`, in ms.
fn summary(text: &str, name: &str, labels: &[&str]) -> String {
    let q = |q: &str| {
        let ql = format!("quantile=\"{q}\"");
        let mut all = labels.to_vec();
        all.push(&ql);
        metric(text, name, &all).map_or("?".to_string(), |v| format!("{:.2}", v * 1000.0))
    };
    let n = metric(text, &format!("{name}_count"), labels).unwrap_or(0.0);
    let mean = metric(text, &format!("{name}_sum"), labels)
        .filter(|_| n > 0.0)
        .map_or("?".to_string(), |s| format!("{:.2}", s / n * 1000.0));
    format!(
        "p50 {} p90 {} p99 {} max {} mean {mean} ms (n = {n})",
        q("0.5"),
        q("0.9"),
        q("0.99"),
        q("1")
    )
}

async fn slot_active(client: &Client, slot: &str) -> Result<bool, BoxError> {
    let row = client
        .query_opt(
            "SELECT active_pid IS NOT NULL FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

// ---------------------------------------------------------------- the probe

struct Probes {
    redis_ms: Vec<f64>,
    l1_ms: Vec<f64>,
    redis_timeouts: usize,
    l1_missing: usize,
    l1_not_evicted: usize,
    late_starts: usize,
}

/// An eviction as the L1's `on_notice` saw it.
struct Evicted {
    at: Instant,
    keys: Vec<String>,
    evicted: usize,
}

struct ProbeCtx {
    rt: tokio::runtime::Handle,
    pg: Arc<Client>,
    /// `None` with `W2C_BENCH_L1=0`.
    cache: Option<Arc<L1<String>>>,
    evictions: mpsc::Receiver<Evicted>,
    redis: redis::Connection,
    prefix: String,
    period: Duration,
    poll: Duration,
    next_id: i32,
    page: u64,
    /// Probe keys whose L1 eviction has not been seen yet: the time their COMMIT
    /// returned, and whether the probe is measured (not a warm-up one).
    pending: HashMap<String, (Instant, bool)>,
}

impl ProbeCtx {
    fn new_probes() -> Probes {
        Probes {
            redis_ms: Vec::new(),
            l1_ms: Vec::new(),
            redis_timeouts: 0,
            l1_missing: 0,
            l1_not_evicted: 0,
            late_starts: 0,
        }
    }

    /// Matches the L1 evictions seen so far (waiting up to `wait` for each pending
    /// one) to the probes.
    fn collect_l1(&mut self, out: &mut Probes, wait: Duration) {
        let deadline = Instant::now() + wait;
        while !self.pending.is_empty() || wait.is_zero() {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = if left.is_zero() {
                match self.evictions.try_recv() {
                    Ok(e) => e,
                    Err(_) => break,
                }
            } else {
                match self.evictions.recv_timeout(left) {
                    Ok(e) => e,
                    Err(_) => break,
                }
            };
            for k in &e.keys {
                if let Some((committed, record)) = self.pending.remove(k) {
                    if record {
                        if e.evicted == 0 {
                            out.l1_not_evicted += 1;
                        }
                        out.l1_ms.push(signed_ms(e.at, committed));
                    }
                }
            }
        }
    }

    /// One probe: commit → Redis gone is measured here; commit → L1 evicted when its
    /// notice arrives (`collect_l1`).
    fn probe(&mut self, out: &mut Probes, record: bool) -> Result<(), BoxError> {
        self.next_id = self.next_id % PROBE_ROWS + 1;
        let id = self.next_id;
        let key = format!("{}:probe:{id}", self.prefix);
        if self.pending.contains_key(&key) {
            // Its eviction from 1,000 probes ago never came.
            if self.pending.remove(&key).is_some_and(|(_, r)| r) {
                out.l1_missing += 1;
            }
        }
        if let Some(cache) = self.cache.clone() {
            let k = key.clone();
            self.rt.block_on(async move {
                cache.insert(&k, "cached".to_string(), &[] as &[&str]).await;
            });
        }
        self.page += 1;
        let page = format!("{}:page:{}", self.prefix, self.page % 100);
        redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg("cached")
            .ignore()
            .cmd("SET")
            .arg(&page)
            .arg("a page of accounts")
            .ignore()
            .cmd("SADD")
            .arg(format!("{p}:tag:{p}:accounts:list", p = self.prefix))
            .arg(&page)
            .ignore()
            .exec(&mut self.redis)?;
        let pg = self.pg.clone();
        self.rt.block_on(async move {
            pg.execute("UPDATE probe SET v = v + 1 WHERE id = $1", &[&id])
                .await
        })?;
        let committed = Instant::now();
        if self.cache.is_some() {
            self.pending.insert(key.clone(), (committed, record));
        }
        let deadline = committed + Duration::from_secs(5);
        let gone = loop {
            let exists: bool = redis::cmd("EXISTS").arg(&key).query(&mut self.redis)?;
            let now = Instant::now();
            if !exists {
                break Some(now);
            }
            if now > deadline {
                break None;
            }
            if !self.poll.is_zero() {
                std::thread::sleep(self.poll);
            }
        };
        match gone {
            Some(at) if record => out.redis_ms.push(ms(at.duration_since(committed))),
            Some(_) => {}
            None if record => out.redis_timeouts += 1,
            None => return Err(format!("{key} still in Redis 5 s after the commit").into()),
        }
        self.collect_l1(out, Duration::ZERO);
        Ok(())
    }

    /// Probes on a fixed schedule until `end` (a warm-up run, `record` false, also
    /// waits for its L1 evictions; a measured one leaves that to `finish`).
    fn run_until(&mut self, end: Instant, record: bool) -> Result<Probes, BoxError> {
        let mut out = Self::new_probes();
        let mut next = Instant::now();
        while Instant::now() < end {
            self.probe(&mut out, record)?;
            next += self.period;
            let now = Instant::now();
            if next < now {
                out.late_starts += 1;
                next = now;
            } else {
                self.collect_l1(&mut out, next - now);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        }
        if !record {
            self.finish(&mut out);
            if out.l1_missing + out.redis_timeouts > 0 {
                return Err("the L1 missed evictions during the warm-up".into());
            }
        }
        Ok(out)
    }

    /// Waits (up to 5 s) for the L1 evictions still pending.
    fn finish(&mut self, out: &mut Probes) {
        self.collect_l1(out, Duration::from_secs(5));
        out.l1_missing += self.pending.drain().filter(|(_, (_, r))| *r).count();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    if later >= earlier {
        ms(later - earlier)
    } else {
        -ms(earlier - later)
    }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Dist {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    n: usize,
}

fn dist(mut v: Vec<f64>) -> Dist {
    v.sort_by(f64::total_cmp);
    Dist {
        p50: pct(&v, 0.5),
        p90: pct(&v, 0.9),
        p99: pct(&v, 0.99),
        max: v.last().copied().unwrap_or(f64::NAN),
        n: v.len(),
    }
}

impl std::fmt::Display for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n = {})",
            self.p50, self.p90, self.p99, self.max, self.n
        )
    }
}

// ---------------------------------------------------------------- the run

struct Bench {
    db: String,
    db_url: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    prefix: String,
    topic: String,
    slot: String,
    metrics_port: u16,
}

fn rules(p: &str) -> String {
    format!(
        r#"[[rule]]
name = "account"
table = "public.pgbench_accounts"
keys = ["{p}:acct:{{aid}}"]
tags = ["{p}:accounts:list"]

[[rule]]
name = "teller_json"
table = "public.pgbench_tellers"
keys = ["{p}:teller:{{tid}}"]
action = "republish"
columns = ["tid", "bid", "tbalance"]
ttl = "1h"

[[rule]]
name = "probe"
table = "public.probe"
keys = ["{p}:probe:{{id}}"]
"#
    )
}

impl Bench {
    fn new(db: &str) -> Result<Bench, BoxError> {
        let pid = std::process::id();
        let prefix = format!("w2cb_applat_{pid}");
        let topic = format!("w2cb-applat-{pid}");
        let slot = format!("{db}_d");
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::Builder::new()
            .prefix("w2c-bench-applat-")
            .tempdir()?;
        std::fs::write(dir.path().join("rules.toml"), rules(&prefix))?;
        let db_url = url_for(db);
        let config = dir.path().join("wal2cache.toml");
        std::fs::write(
            &config,
            format!(
                r#"name = "bench-applat"
[postgres]
url = "{db_url}"
slot = "{slot}"
publication = "w2c_applat"
[rules]
path = "rules.toml"
[redis]
url = "{redis}"
tag_prefix = "{prefix}:tag:"
[kafka]
brokers = "{kafka}"
topic = "{topic}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
{extra}"#,
                redis = redis_url(),
                kafka = kafka_brokers(),
                extra = extra_config(),
            ),
        )?;
        Ok(Bench {
            db: db.into(),
            db_url,
            dir,
            config,
            prefix,
            topic,
            slot,
            metrics_port,
        })
    }
}

/// The tuning knobs, as TOML after the config (defaults: none).
fn extra_config() -> String {
    let mut out = String::new();
    let deadline = std::env::var("W2C_BENCH_BATCH_DEADLINE").ok();
    let size = std::env::var("W2C_BENCH_BATCH_SIZE").ok();
    if deadline.is_some() || size.is_some() {
        out.push_str("[pipeline]\n");
        if let Some(d) = deadline {
            out.push_str(&format!("batch_deadline = {d:?}\n"));
        }
        if let Some(n) = size {
            out.push_str(&format!("batch_size = {n}\n"));
        }
    }
    if let Ok(props) = std::env::var("W2C_BENCH_KAFKA_PROPS") {
        out.push_str("[kafka.properties]\n");
        for kv in props.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').expect("W2C_BENCH_KAFKA_PROPS: k=v,k=v");
            out.push_str(&format!("{k:?} = {v:?}\n"));
        }
    }
    out
}

struct PgbenchResult {
    tps: Option<f64>,
    lines: Vec<String>,
}

fn parse_pgbench(out: &str) -> PgbenchResult {
    let tps = out.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("tps = ")?;
        rest.split_whitespace().next()?.parse().ok()
    });
    let lines = out
        .lines()
        .filter(|l| {
            l.starts_with("number of transactions actually processed")
                || l.starts_with("number of failed")
                || l.starts_with("latency average")
                || l.starts_with("latency stddev")
                || l.starts_with("rate limit schedule lag")
        })
        .map(str::to_string)
        .collect();
    PgbenchResult { tps, lines }
}

struct Shared {
    rt: tokio::runtime::Runtime,
    admin: Client,
    bench: Bench,
    cache: Option<Arc<L1<String>>>,
    evictions: Option<mpsc::Receiver<Evicted>>,
    tck: f64,
}

fn run_rate(sh: &mut Shared, rate: u64, secs: u64) -> Result<bool, BoxError> {
    let b = &sh.bench;
    let clients = env_u64("W2C_BENCH_CLIENTS", 4).max(1);
    let period = Duration::from_millis(env_u64("W2C_BENCH_PROBE_MS", 20).max(1));
    let poll = Duration::from_micros(env_u64("W2C_BENCH_POLL_US", 150));
    println!("\n=== {rate} TPC-B transactions/s for {secs} s ({clients} pgbench clients) ===");

    let mut daemon = Daemon::start(&b.config, &b.dir.path().join(format!("daemon-{rate}.log")))?;
    let started = Instant::now();
    loop {
        daemon.check_alive()?;
        if sh.rt.block_on(slot_active(&sh.admin, &b.slot))? {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "the daemon does not stream after 60 s; its log:\n{}",
                daemon.log_tail()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(cache) = sh.cache.clone() {
        if !sh
            .rt
            .block_on(async move { cache.wait_healthy(Duration::from_secs(60)).await })
        {
            return Err("the L1 is not healthy after 60 s".into());
        }
    }
    let walsender: Option<i32> = sh
        .rt
        .block_on(sh.admin.query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&b.slot],
        ))?
        .get(0);
    let walsender = walsender.map(|p| p as u32);
    println!(
        "daemon streaming {:.2} s after its start (walsender pid {}); L1 {}",
        started.elapsed().as_secs_f64(),
        walsender.map_or("?".into(), |p| p.to_string()),
        if sh.cache.is_some() {
            "healthy"
        } else {
            "off (W2C_BENCH_L1=0)"
        }
    );

    let pg = Arc::new(sh.rt.block_on(connect(&b.db_url))?);
    let mut ctx = ProbeCtx {
        rt: sh.rt.handle().clone(),
        pg,
        cache: sh.cache.clone(),
        evictions: sh.evictions.take().ok_or("no eviction channel")?,
        redis: redis::Client::open(redis_url())?.get_connection()?,
        prefix: b.prefix.clone(),
        period,
        poll,
        next_id: 0,
        page: 0,
        pending: HashMap::new(),
    };
    // Warm-up: the whole path works before pgbench starts (10 probes, not
    // measured); then an idle baseline (2 s).
    ctx.run_until(Instant::now() + period * 10, false)?;
    let mut idle = ctx.run_until(Instant::now() + Duration::from_secs(2), true)?;
    ctx.finish(&mut idle);
    let idle_redis = dist(idle.redis_ms);
    let idle_l1 = dist(idle.l1_ms);
    println!("idle (no pgbench), commit -> Redis gone: {idle_redis}");
    println!("idle (no pgbench), commit -> L1 evicted: {idle_l1}");

    // pgbench, then the probes during its run.
    let spawned = Instant::now();
    let mut pgbench = Command::new(pgbench_bin())
        .args([
            "-n",
            "-R",
            &rate.to_string(),
            "-T",
            &secs.to_string(),
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            &b.db_url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", pgbench_bin()))?;
    let window_start = spawned + Duration::from_secs(1);
    let window_end = spawned + Duration::from_millis((secs * 1000).saturating_sub(500).max(1500));
    std::thread::sleep(window_start.saturating_duration_since(Instant::now()));
    if let Some(status) = pgbench.try_wait()? {
        let mut err = String::new();
        if let Some(mut e) = pgbench.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        return Err(format!("pgbench exited early ({status}): {err}").into());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut worst: f64 = 0.0;
            let mut last = cpu_jiffies();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let now = cpu_jiffies();
                worst = worst.max(busy_share(last, now));
                last = now;
            }
            worst
        })
    };
    let cpu0 = cpu_jiffies();
    let procs0 = all_procs();
    let daemon_cpu0 = daemon.cpu_secs(sh.tck);
    let walsender_cpu = |tck: f64| {
        walsender
            .and_then(proc_stat)
            .map_or(0.0, |(_, t)| t as f64 / tck)
    };
    let walsender_cpu0 = walsender_cpu(sh.tck);
    let t0 = Instant::now();
    let probed = ctx.run_until(window_end, true);
    let window = t0.elapsed();
    let cpu1 = cpu_jiffies();
    let procs1 = all_procs();
    let daemon_cpu1 = daemon.cpu_secs(sh.tck);
    let walsender_cpu1 = walsender_cpu(sh.tck);
    // The evictions still pending, after the snapshots (pgbench ends meanwhile).
    let probed = probed.map(|mut p| {
        ctx.finish(&mut p);
        p
    });
    stop.store(true, Ordering::Relaxed);
    let worst_second = sampler.join().unwrap_or(f64::NAN);
    sh.evictions = Some(ctx.evictions);

    let out = pgbench.wait_with_output()?;
    let pgbench_text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("pgbench failed ({}): {pgbench_text}", out.status).into());
    }
    let probes = probed?;
    let pgb = parse_pgbench(&pgbench_text);
    daemon.check_alive()?;
    let metrics = sh.rt.block_on(scrape(b.metrics_port));
    daemon.stop()?;

    // Report.
    let busy = busy_share(cpu0, cpu1);
    let redis_d = dist(probes.redis_ms);
    let l1_d = dist(probes.l1_ms);
    let tps = pgb.tps.unwrap_or(f64::NAN);
    println!(
        "probe window {:.1} s, a probe every {} ms ({} started late), Redis polled every {} µs + a round trip",
        window.as_secs_f64(),
        period.as_millis(),
        probes.late_starts,
        poll.as_micros()
    );
    println!(
        "commit -> Redis gone:  {redis_d}; timeouts (> 5 s): {}",
        probes.redis_timeouts
    );
    println!(
        "commit -> L1 evicted:  {l1_d}; missing (> 5 s): {}, notices that found nothing to evict: {}",
        probes.l1_missing, probes.l1_not_evicted
    );
    println!(
        "pgbench: tps = {tps:.1} achieved of {rate} asked (scale {})",
        env_u64("W2C_BENCH_SCALE", 10)
    );
    for l in &pgb.lines {
        println!("  pgbench {l}");
    }
    println!(
        "machine CPU busy over the window: {:.1} % of 2 cores (busiest second {:.1} %); load average {}",
        busy * 100.0,
        worst_second * 100.0,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let daemon_cpu = daemon_cpu1 - daemon_cpu0;
    let w = window.as_secs_f64();
    println!(
        "daemon CPU over the window: {daemon_cpu:.2} s ({:.1} % of one core; {:.1} µs per pgbench transaction)",
        daemon_cpu / w * 100.0,
        daemon_cpu / (tps * w) * 1e6
    );
    let ws = walsender_cpu1 - walsender_cpu0;
    println!(
        "walsender CPU over the window: {ws:.2} s ({:.1} % of one core; inside the postgres figure below)",
        ws / w * 100.0
    );
    let groups = cpu_by_command(&procs0, &procs1, sh.tck);
    let shown: Vec<String> = groups
        .iter()
        .take(10)
        .map(|(c, s)| format!("{c} {s:.2} s ({:.0} %)", s / w * 100.0))
        .collect();
    println!(
        "CPU by command over the window (% of one core): {}",
        shown.join(", ")
    );
    match &metrics {
        Ok(m) => {
            println!(
                "daemon commit -> Redis applied:   {}",
                summary(m, "wal2cache_commit_to_redis_seconds", &[])
            );
            println!(
                "daemon commit -> Kafka acked:     {}",
                summary(m, "wal2cache_commit_to_kafka_seconds", &[])
            );
            for sink in ["redis", "kafka"] {
                let label = format!("sink=\"{sink}\"");
                println!(
                    "daemon {sink} batches applying:   {}",
                    summary(m, "wal2cache_batch_seconds", &[&label])
                );
            }
            let changes = metric(m, "wal2cache_commit_to_redis_seconds_count", &[]);
            let batches = metric(m, "wal2cache_batch_seconds_count", &["sink=\"redis\""]);
            if let (Some(c), Some(n)) = (changes, batches.filter(|n| *n > 0.0)) {
                println!(
                    "daemon: {c} changes in {n} Redis batches ({:.2} changes per batch) since its start",
                    c / n
                );
            }
        }
        Err(e) => println!("/metrics: {e}"),
    }
    let load_ok = tps >= rate as f64 * 0.95;
    let l1_on = sh.cache.is_some();
    let redis_ok;
    let l1_ok;
    if rate <= 1000 {
        redis_ok = redis_d.p50 < 2.0 && redis_d.p99 < 10.0 && probes.redis_timeouts == 0;
        l1_ok = !l1_on || (l1_d.p50 < 2.0 && l1_d.p99 < 10.0 && probes.l1_missing == 0);
        println!(
            "verdict at {rate}/s (target p50 < 2 ms, p99 < 10 ms): Redis {}, L1 {}{}",
            if redis_ok { "MET" } else { "MISSED" },
            if !l1_on {
                "off"
            } else if l1_ok {
                "MET"
            } else {
                "MISSED"
            },
            if load_ok {
                ""
            } else {
                "; pgbench did not reach 95 % of the rate"
            }
        );
    } else {
        redis_ok = redis_d.p99 < 20.0 && probes.redis_timeouts == 0;
        l1_ok = !l1_on || (l1_d.p99 < 20.0 && probes.l1_missing == 0);
        println!(
            "verdict at {rate}/s (aim p99 < 20 ms): Redis {}, L1 {}{}",
            if redis_ok { "met" } else { "missed" },
            if !l1_on {
                "off"
            } else if l1_ok {
                "met"
            } else {
                "missed"
            },
            if load_ok {
                ""
            } else {
                "; pgbench did not reach 95 % of the rate"
            }
        );
    }
    println!(
        "result: rate={rate} tps={tps:.1} probes={} redis_p50={:.3} redis_p90={:.3} redis_p99={:.3} redis_max={:.3} \
         l1_p50={:.3} l1_p90={:.3} l1_p99={:.3} l1_max={:.3} cpu_busy={:.3} daemon_cpu_s={daemon_cpu:.2} redis_ok={redis_ok} l1_ok={l1_ok}",
        redis_d.n, redis_d.p50, redis_d.p90, redis_d.p99, redis_d.max, l1_d.p50, l1_d.p90, l1_d.p99, l1_d.max, busy
    );
    Ok(redis_ok && l1_ok && load_ok)
}

fn setup(sh: &Shared, scale: u64) -> Result<(), BoxError> {
    let b = &sh.bench;
    let t = Instant::now();
    let out = run_tool(
        &pgbench_bin(),
        &["-i", "-q", "-s", &scale.to_string(), &b.db_url],
    )?;
    println!(
        "pgbench -i -s {scale}: {:.1} s ({})",
        t.elapsed().as_secs_f64(),
        out.lines().last().unwrap_or("").trim()
    );
    sh.rt.block_on(async {
        let c = connect(&b.db_url).await?;
        c.batch_execute(&format!(
            "CREATE TABLE probe (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO probe SELECT i, 0 FROM generate_series(1, {PROBE_ROWS}) i;
             ANALYZE probe;"
        ))
        .await?;
        Ok::<_, BoxError>(())
    })?;
    let config = b.config.to_string_lossy().to_string();
    let check = run_tool(&binary(), &["check", "--config", &config])?;
    println!(
        "wal2cache check: {}",
        check.lines().last().unwrap_or("").trim()
    );
    let out = run_tool(&binary(), &["setup", "--config", &config])?;
    println!("wal2cache setup: {}", out.trim().replace('\n', "; "));
    Ok(())
}

async fn cleanup_redis(prefix: &str) -> Result<u64, BoxError> {
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

async fn delete_topic(topic: &str) {
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

async fn drop_db(admin: &Client, name: &str) {
    for _ in 0..50 {
        let _ = admin
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                   WHERE database = '{name}' AND active_pid IS NOT NULL"
            ))
            .await;
        let _ = admin
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                   WHERE database = '{name}'"
            ))
            .await;
        if admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .is_ok()
        {
            eprintln!("dropped database {name} and its slots");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("could not drop database {name} or its slots: drop them by hand");
}

fn main() {
    let rates: Vec<u64> = env_or("W2C_BENCH_RATE", "1000,2000")
        .split(',')
        .map(|r| {
            r.trim()
                .replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("W2C_BENCH_RATE={r:?}: a list of rates"))
        })
        .collect();
    let secs = env_u64("W2C_BENCH_SECS", 30).max(2);
    let scale = env_u64("W2C_BENCH_SCALE", 10).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let db = format!("w2c_bench_applat_{}", std::process::id());
    let admin = match rt.block_on(async {
        let admin = connect(&admin_url()).await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
        Ok::<_, BoxError>(admin)
    }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("app_latency: {}", chain(&*e));
            std::process::exit(1);
        }
    };
    let bench = Bench::new(&db).expect("the bench's config");
    let (tx, evictions) = mpsc::channel::<Evicted>();
    let probe_prefix = format!("{}:probe:", bench.prefix);
    let with_l1 = env_u64("W2C_BENCH_L1", 1) != 0;
    let cache = with_l1.then(|| {
        let _guard = rt.enter();
        L1::builder(kafka_brokers(), &bench.topic)
            .on_notice(move |n: &Notice<'_>| {
                if let Notice::Invalidated { event, evicted } = n {
                    if event.keys.iter().any(|k| k.starts_with(&probe_prefix)) {
                        let _ = tx.send(Evicted {
                            at: Instant::now(),
                            keys: event.keys.clone(),
                            evicted: *evicted,
                        });
                    }
                }
            })
            .build::<String>()
            .expect("the L1")
    });
    let mut sh = Shared {
        rt,
        admin,
        bench,
        cache: cache.map(Arc::new),
        evictions: Some(evictions),
        tck: clock_ticks(),
    };
    println!(
        "app_latency: rates {rates:?}/s, {secs} s each, pgbench scale {scale}, {} CPUs; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    let mut result = setup(&sh, scale);
    let mut all_ok = true;
    if result.is_ok() {
        for &rate in &rates {
            match run_rate(&mut sh, rate, secs) {
                Ok(ok) => all_ok &= ok,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
    }
    // The L1 stops before its topic goes.
    drop(sh.cache.take());
    sh.rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match cleanup_redis(&sh.bench.prefix).await {
            Ok(n) => eprintln!("deleted {n} Redis keys under {}", sh.bench.prefix),
            Err(e) => eprintln!(
                "could not delete the Redis keys under {}: {e}",
                sh.bench.prefix
            ),
        }
        delete_topic(&sh.bench.topic).await;
        drop_db(&sh.admin, &sh.bench.db).await;
    });
    if let Err(e) = result {
        let dir = std::mem::replace(&mut sh.bench.dir, tempfile::tempdir().expect("tempdir"));
        eprintln!(
            "the config and the daemon's logs are kept in {}",
            dir.keep().display()
        );
        eprintln!("app_latency failed: {}", chain(&*e));
        std::process::exit(1);
    }
    println!(
        "\napp_latency: {}",
        if all_ok {
            "every target met"
        } else {
            "some target missed (see the verdicts)"
        }
    );
}
