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
//! Setup: a database of its own (tests/support's `TestDb`, `w2c_bench_applat_<pid>_...`),
//! `pgbench -i -s SCALE` in it, and a table
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
//! `wal2cache_commit_to_kafka_seconds` histograms and its `wal2cache_batch_seconds`, and
//! a verdict against the targets. The last line per rate, `result: k=v ...`, is for
//! scripts. At the end the database is dropped with its slot, the Redis keys under
//! `w2cb_applat_<pid>` are deleted, and the topic `w2cb-applat-<pid>` is deleted.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{
    all_process_ticks, busy_share, env_usize, load_average, machine_ticks, percentile, pg_binary,
    process_cpu_secs, ticks_to_secs, BoxError,
};
use daemon::{scrape, wait_active, BenchSetup, DaemonRun, Tuning};
use support::db::{active_pid, connect, TestDb};
use support::env::{kafka_brokers, pg_admin_url};
use support::net::free_port;
use support::scrape::{histogram_with, metric_with};
use tokio_postgres::Client;
use wal2cache::l1::{Notice, L1};

const PROBE_ROWS: i32 = 1000;

/// A knob from the environment, as `env_usize`.
fn knob(name: &str, default: u64) -> u64 {
    env_usize(name, default as usize) as u64
}

fn pgbench_bin() -> String {
    pg_binary("PGBENCH", "pgbench")
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

/// CPU seconds per command name between two snapshots (a process born in between
/// counts whole; one that ended in between is lost), busiest first.
fn cpu_by_command(
    before: &HashMap<i32, (String, u64)>,
    after: &HashMap<i32, (String, u64)>,
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
        .map(|(c, t)| (c, ticks_to_secs(t)))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

// ---------------------------------------------------------------- the daemon's figures

/// A histogram as `p50 … p90 … p99 … max <= … mean … (n = …)`, in ms (quantiles
/// interpolated in their buckets, see `daemon::Quantiles::get`).
fn summary(text: &str, name: &str, labels: &[&str]) -> String {
    let q = histogram_with(text, name, labels);
    let at = |x: f64| {
        q.get(x)
            .map_or("?".to_string(), |v| format!("{:.2}", v * 1000.0))
    };
    let n = q.count.unwrap_or(0.0);
    let mean = q
        .sum
        .filter(|_| n > 0.0)
        .map_or("?".to_string(), |s| format!("{:.2}", s / n * 1000.0));
    format!(
        "p50 {} p90 {} p99 {} max <= {} mean {mean} ms (n = {n})",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    )
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
struct ProbeEviction {
    at: Instant,
    keys: Vec<String>,
    evicted: usize,
}

struct ProbeCtx {
    rt: tokio::runtime::Handle,
    pg: Arc<Client>,
    /// `None` with `W2C_BENCH_L1=0`.
    cache: Option<Arc<L1<String>>>,
    evictions: mpsc::Receiver<ProbeEviction>,
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
            Some(at) if record => out.redis_ms.push(millis(at.duration_since(committed))),
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

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    if later >= earlier {
        millis(later - earlier)
    } else {
        -millis(earlier - later)
    }
}

struct Dist {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    n: usize,
}

/// Nearest-rank percentiles of `v` (NaN of none).
fn dist(mut v: Vec<f64>) -> Dist {
    v.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        if v.is_empty() {
            f64::NAN
        } else {
            percentile(&v, q)
        }
    };
    Dist {
        p50: pct(0.5),
        p90: pct(0.9),
        p99: pct(0.99),
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

/// The rules on pgbench's tables and `probe`, under the prefix `p`.
fn pgbench_rules(p: &str) -> String {
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
    db: TestDb,
    setup: BenchSetup,
    metrics_port: u16,
    cache: Option<Arc<L1<String>>>,
    evictions: Option<mpsc::Receiver<ProbeEviction>>,
}

fn run_rate(sh: &mut Shared, rate: u64, secs: u64) -> Result<bool, BoxError> {
    let clients = knob("W2C_BENCH_CLIENTS", 4).max(1);
    let period = Duration::from_millis(knob("W2C_BENCH_PROBE_MS", 20).max(1));
    let poll = Duration::from_micros(knob("W2C_BENCH_POLL_US", 150));
    println!("\n=== {rate} TPC-B transactions/s for {secs} s ({clients} pgbench clients) ===");

    sh.setup.log = sh.setup.dir.path().join(format!("daemon-{rate}.log"));
    let mut daemon = DaemonRun::start_logging(&sh.setup, "warn");
    let slot = sh.setup.slot.clone();
    sh.rt.block_on(wait_active(
        &sh.db,
        &slot,
        &mut daemon,
        Duration::from_secs(60),
    ))?;
    if let Some(cache) = sh.cache.clone() {
        if !sh
            .rt
            .block_on(async move { cache.wait_healthy(Duration::from_secs(60)).await })
        {
            return Err("the L1 is not healthy after 60 s".into());
        }
    }
    let walsender = sh.rt.block_on(active_pid(&sh.db.client, &slot))?;
    println!(
        "daemon streaming {:.2} s after its start (walsender pid {}); L1 {}",
        daemon.started.elapsed().as_secs_f64(),
        walsender.map_or("?".into(), |p| p.to_string()),
        if sh.cache.is_some() {
            "healthy"
        } else {
            "off (W2C_BENCH_L1=0)"
        }
    );

    let pg = Arc::new(sh.rt.block_on(connect(&sh.db.url)));
    let mut ctx = ProbeCtx {
        rt: sh.rt.handle().clone(),
        pg,
        cache: sh.cache.clone(),
        evictions: sh.evictions.take().ok_or("no eviction channel")?,
        redis: redis::Client::open(support::env::redis_url())?.get_connection()?,
        prefix: sh.setup.prefix.clone(),
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
            &sh.db.url,
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
            let mut last = machine_ticks();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let now = machine_ticks();
                worst = worst.max(busy_share(last, now));
                last = now;
            }
            worst
        })
    };
    let cpu0 = machine_ticks();
    let procs0 = all_process_ticks();
    let daemon_cpu0 = daemon.cpu_secs();
    let walsender_cpu = || walsender.and_then(process_cpu_secs).unwrap_or(0.0);
    let walsender_cpu0 = walsender_cpu();
    let t0 = Instant::now();
    let probed = ctx.run_until(window_end, true);
    let window = t0.elapsed();
    let cpu1 = machine_ticks();
    let procs1 = all_process_ticks();
    let daemon_cpu1 = daemon.cpu_secs();
    let walsender_cpu1 = walsender_cpu();
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
    let metrics = sh.rt.block_on(scrape(sh.metrics_port));
    let (status, _) = daemon.stop(Duration::from_secs(60))?;
    if !status.success() {
        eprintln!(
            "the daemon exited with {status}; the end of its log:\n{}",
            daemon.log_tail(30)
        );
    }

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
        knob("W2C_BENCH_SCALE", 10)
    );
    for l in &pgb.lines {
        println!("  pgbench {l}");
    }
    println!(
        "machine CPU busy over the window: {:.1} % of 2 cores (busiest second {:.1} %); load average {}",
        busy * 100.0,
        worst_second * 100.0,
        load_average()
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
    let groups = cpu_by_command(&procs0, &procs1);
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
            let changes = metric_with(m, "wal2cache_commit_to_redis_seconds_count", &[]);
            let batches = metric_with(m, "wal2cache_batch_seconds_count", &["sink=\"redis\""]);
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

fn prepare(sh: &Shared, scale: u64) -> Result<(), BoxError> {
    let t = Instant::now();
    let out = run_tool(
        &pgbench_bin(),
        &["-i", "-q", "-s", &scale.to_string(), &sh.db.url],
    )?;
    println!(
        "pgbench -i -s {scale}: {:.1} s ({})",
        t.elapsed().as_secs_f64(),
        out.lines().last().unwrap_or("").trim()
    );
    sh.rt.block_on(async {
        sh.db
            .client
            .batch_execute(&format!(
                "CREATE TABLE probe (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO probe SELECT i, 0 FROM generate_series(1, {PROBE_ROWS}) i;
             ANALYZE probe;"
            ))
            .await?;
        Ok::<_, BoxError>(())
    })?;
    let config = sh.setup.config.to_string_lossy().to_string();
    let wal2cache = support::daemon::bin();
    let check = run_tool(&wal2cache, &["check", "--config", &config])?;
    println!(
        "wal2cache check: {}",
        check.lines().last().unwrap_or("").trim()
    );
    let out = run_tool(&wal2cache, &["setup", "--config", &config])?;
    println!("wal2cache setup: {}", out.trim().replace('\n', "; "));
    Ok(())
}

/// Drops the bench's database with its slots (`TestDb`'s drop) and says whether it went.
fn drop_db(rt: &tokio::runtime::Runtime, db: TestDb) {
    let name = db.name.clone();
    drop(db);
    let gone = rt.block_on(async {
        let admin: Client = connect(&pg_admin_url()).await;
        admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await
            .is_ok_and(|row| row.is_none())
    });
    if gone {
        eprintln!("dropped database {name} and its slots");
    } else {
        eprintln!("could not drop database {name} or its slots: drop them by hand");
    }
}

fn main() {
    let rates: Vec<u64> = std::env::var("W2C_BENCH_RATE")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "1000,2000".into())
        .split(',')
        .map(|r| {
            r.trim()
                .replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("W2C_BENCH_RATE={r:?}: a list of rates"))
        })
        .collect();
    let secs = knob("W2C_BENCH_SECS", 30).max(2);
    let scale = knob("W2C_BENCH_SCALE", 10).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let db = rt.block_on(TestDb::new("bench_applat"));
    let metrics_port = free_port();
    let tuning = Tuning {
        metrics_port: Some(metrics_port),
        ..Tuning::from_env()
    };
    let setup = BenchSetup::write_rules(&db, "applat", &tuning, pgbench_rules);
    let (tx, evictions) = mpsc::channel::<ProbeEviction>();
    let probe_prefix = format!("{}:probe:", setup.prefix);
    let with_l1 = knob("W2C_BENCH_L1", 1) != 0;
    let cache = with_l1.then(|| {
        let _guard = rt.enter();
        L1::builder(kafka_brokers(), &setup.topic)
            .on_notice(move |n: &Notice<'_>| {
                if let Notice::Invalidated { event, evicted } = n {
                    if event.keys.iter().any(|k| k.starts_with(&probe_prefix)) {
                        let _ = tx.send(ProbeEviction {
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
        db,
        setup,
        metrics_port,
        cache: cache.map(Arc::new),
        evictions: Some(evictions),
    };
    println!(
        "app_latency: rates {rates:?}/s, {secs} s each, pgbench scale {scale}, {} CPUs; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    let mut result = prepare(&sh, scale);
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
    let Shared {
        rt,
        db,
        setup,
        cache,
        ..
    } = sh;
    drop(cache);
    rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        daemon::cleanup(&setup).await;
    });
    drop_db(&rt, db);
    if let Err(e) = result {
        daemon::fail("app_latency", setup, &e);
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
