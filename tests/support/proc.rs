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

#[allow(dead_code)]
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

#[allow(dead_code)]
pub fn ticks_to_secs(ticks: u64) -> f64 {
    ticks as f64 / clock_ticks_per_second()
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
            let f = stat_fields(format!("{pid}/task/{tid}"))?;
            Some(ticks_to_secs(f.get(11)? + f.get(12)?))
        })
}
