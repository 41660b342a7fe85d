//! What /proc says about a process or one of its threads: CPU used so far.

use std::process::Command;

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces):
/// `[0]` is field 3 (state), utime and stime (14, 15) are `[11]` and `[12]`, cutime
/// and cstime `[13]` and `[14]`.
#[allow(dead_code)]
pub fn stat_fields(pid: impl std::fmt::Display) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

fn clock_ticks_per_second() -> f64 {
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

#[allow(dead_code)]
pub fn ticks_to_secs(ticks: u64) -> f64 {
    ticks as f64 / clock_ticks_per_second()
}

/// User + system CPU clock ticks so far of a process (every thread), or of one thread
/// when `pid` is `<pid>/task/<tid>`.
#[allow(dead_code)]
pub fn process_ticks(pid: impl std::fmt::Display) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)? + f.get(12)?)
}

/// User + system CPU seconds of a process, from `/proc/<pid>/stat`.
#[allow(dead_code)]
pub fn process_cpu_secs(pid: impl std::fmt::Display) -> Option<f64> {
    process_ticks(pid).map(ticks_to_secs)
}

/// User + system CPU seconds so far of the thread of process `pid` named `name`
/// (`/proc/<pid>/task/*/comm`), or `None` when it has none by that name.
#[allow(dead_code)]
pub fn thread_cpu_secs(pid: i32, name: &str) -> Option<f64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|t| t.ok())
        .find_map(|t| {
            let tid = t.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            if comm.trim() != name {
                return None;
            }
            process_cpu_secs(format!("{pid}/task/{tid}"))
        })
}
