//! What only the benches need, beside the helpers they share with the tests
//! (tests/support, which every bench includes as `support`: databases, services,
//! config, the daemon as a process, topics): errors, knobs from the environment,
//! figures as they are printed, what `/proc` says of a process, and `pg_recvlogical`
//! reading a slot, the reference the decoding benches compare with.
//!
//! Dead code: each bench binary uses a part of it; the items carry
//! `#[allow(dead_code)]` each, as in tests/support.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use wal2cache::Lsn;

#[allow(dead_code)]
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error with its chain of causes (tokio-postgres says only "db error" otherwise).
#[allow(dead_code)]
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// A positive integer from the environment, or `default`.
#[allow(dead_code)]
pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a positive integer")),
        Err(_) => default,
    }
}

/// kB as `12.3 MiB`.
#[allow(dead_code)]
pub fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// `12345678` as `12,345,678`.
#[allow(dead_code)]
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `x` seconds as `1.23 ms`.
#[allow(dead_code)]
pub fn ms(secs: f64) -> String {
    format!("{:.3} ms", secs * 1000.0)
}

/// Percentile (0..=1) of sorted values (durations, milliseconds...), nearest rank;
/// `T::default()` (`Duration::ZERO`, 0.0) of none.
#[allow(dead_code)]
pub fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Percentile (0..=1) of sorted values, at the rounded index `q * (n - 1)` (the L1
/// benches' figure).
#[allow(dead_code)]
pub fn percentile_rounded(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The 1, 5 and 15 minute load averages.
#[allow(dead_code)]
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// A field of `/proc/<pid>/status` (`pid`: a number or `self`) as a number, its `kB`
/// dropped (`VmRSS`, `VmHWM`, `Threads`), or 0 where there is none.
#[allow(dead_code)]
pub fn status_field(pid: impl std::fmt::Display, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .unwrap_or(0)
}

/// A field of this process's `/proc/self/status` in kB (`VmRSS`, `VmHWM`).
#[allow(dead_code)]
pub fn proc_status_kb(field: &str) -> u64 {
    status_field("self", field)
}

#[allow(unused_imports)]
pub use crate::support::proc::{process_cpu_secs, process_ticks, stat_fields, ticks_to_secs};

/// CPU seconds of this process's waited-for children (`cutime + cstime`).
#[allow(dead_code)]
pub fn children_cpu_secs() -> f64 {
    let f = stat_fields("self").unwrap_or_default();
    ticks_to_secs(f.get(13).unwrap_or(&0) + f.get(14).unwrap_or(&0))
}

/// The command name of a process (`/proc/<pid>/comm`).
#[allow(dead_code)]
pub fn process_name(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// (busy, total) clock ticks of all CPUs so far, from the `cpu` line of /proc/stat
/// (busy: all but idle and iowait).
#[allow(dead_code)]
pub fn machine_ticks() -> (u64, u64) {
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

/// The share (0..=1) of the machine's CPU time that was busy between two
/// [`machine_ticks`].
#[allow(dead_code)]
pub fn busy_share(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1);
    if total == 0 {
        return 0.0;
    }
    after.0.saturating_sub(before.0) as f64 / total as f64
}

/// Every process's command name and CPU clock ticks so far ([`process_name`],
/// [`process_ticks`]), by pid.
#[allow(dead_code)]
pub fn all_process_ticks() -> std::collections::HashMap<i32, (String, u64)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, (process_name(pid), process_ticks(pid)?))))
        .collect()
}

/// The pid of the process listening on TCP `port` (127.0.0.1, 0.0.0.0 or IPv6), from
/// `/proc/net/tcp{,6}` and the socket inodes of `/proc/*/fd` (readable as root or as
/// the server's owner); `None` when not found.
#[allow(dead_code)]
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
#[allow(dead_code)]
pub fn port_of(address: &str) -> Option<u16> {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let host_port = rest.split([',', '/', '?']).next()?;
    host_port.rsplit_once(':')?.1.parse().ok()
}

/// A process observed for its CPU: found once, read before and after.
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct Observed {
    pub label: &'static str,
    pub pid: Option<i32>,
    pub before: f64,
}

#[allow(dead_code)]
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

/// A PostgreSQL client program (`pgbench`, `pg_recvlogical`): the environment
/// variable `env` when set, else PostgreSQL 15's, else the PATH's.
#[allow(dead_code)]
pub fn pg_binary(env: &str, name: &str) -> String {
    if let Ok(b) = std::env::var(env) {
        return b;
    }
    let pg15 = format!("/usr/lib/postgresql/15/bin/{name}");
    if Path::new(&pg15).exists() {
        pg15
    } else {
        name.into()
    }
}

/// The `pg_recvlogical` binary: `PG_RECVLOGICAL`, else PostgreSQL 15's, else the PATH's.
#[allow(dead_code)]
pub fn pg_recvlogical_binary() -> String {
    pg_binary("PG_RECVLOGICAL", "pg_recvlogical")
}

/// `pg_recvlogical` on `slot` of the database at `url`, with the pgoutput options the
/// daemon uses (proto 1, `publication`, messages), its output to /dev/null, until it
/// passes `end_lsn` (an hour at most). It reports its position as it goes, so the slot
/// moves like the daemon's. `each_poll` runs every 2 ms while it runs (and its error
/// ends the run). How it exited, and how long it ran from its spawn.
#[allow(dead_code)]
pub async fn run_pg_recvlogical(
    url: &str,
    slot: &str,
    publication: &str,
    end_lsn: Lsn,
    mut each_poll: impl AsyncFnMut() -> Result<(), BoxError>,
) -> Result<(ExitStatus, Duration), BoxError> {
    let start = Instant::now();
    let mut child = Command::new(pg_recvlogical_binary())
        .args(["-d", url, "--slot", slot, "--start", "--no-loop"])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={publication}"))
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
        each_poll().await?;
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("pg_recvlogical still running after an hour: killed".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    Ok((status, start.elapsed()))
}
