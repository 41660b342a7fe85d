//! `deploy/systemd/wal2cache.service`: systemd accepts every line of it, and it runs
//! the daemon the way the daemon expects to be run (readiness and watchdog
//! notifications, SIGHUP to reload, the exit codes not to restart on, time to drain).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const UNIT_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/systemd/wal2cache.service"
);
const BIN: &str = env!("CARGO_BIN_EXE_wal2cache");

fn unit_text() -> String {
    std::fs::read_to_string(UNIT_PATH).unwrap_or_else(|e| panic!("{UNIT_PATH}: {e}"))
}

/// Section -> key -> every value assigned, in order (systemd's unit syntax: `#` and `;`
/// comments, a trailing `\` continues the line).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    let mut logical = String::new();
    for line in text.lines() {
        let line = line.trim();
        if logical.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(rest) = line.strip_suffix('\\') {
            logical.push_str(rest);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let full = std::mem::take(&mut logical);
        if let Some(name) = full.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = full
            .split_once('=')
            .unwrap_or_else(|| panic!("not a key=value line in [{section}]: {full:?}"));
        assert!(!section.is_empty(), "{key} outside of any section");
        unit.entry(section.clone())
            .or_default()
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    unit
}

/// The one value of `key` in `[section]`.
fn one<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    let values = unit
        .get(section)
        .and_then(|s| s.get(key))
        .unwrap_or_else(|| panic!("[{section}] has no {key}="));
    assert_eq!(values.len(), 1, "[{section}] {key}= is set {values:?}");
    &values[0]
}

/// What `systemd-analyze verify` says about the unit file at `path` (whose ExecStart
/// must exist): the lines that name the file or the unit. It checks what systemd checks
/// when it loads the unit: every directive is known and every value parses (an unknown
/// or misspelt one is only a warning, "ignoring", and the exit code stays 0, hence the
/// lines are returned), the ExecStart program exists and is executable, the unit's
/// dependencies load. `--man=no` skips the man pages of Documentation= and
/// `--generators=no` the generators: neither works without a running systemd.
fn verify(path: &Path) -> Vec<String> {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--generators=no"])
        .arg(path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze ({e}): install systemd (apt-get install systemd)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let name = path.file_name().unwrap().to_str().unwrap();
    let mut problems: Vec<String> = text
        .lines()
        .filter(|l| l.contains(name))
        .map(str::to_string)
        .collect();
    if !out.status.success() {
        problems.push(format!(
            "systemd-analyze verify exited {}: {text}",
            out.status
        ));
    }
    problems
}

/// The unit with ExecStart's program replaced by this build's binary (verify wants an
/// executable there), written as `wal2cache.service` into `dir`; `extra` is inserted
/// at the end of `[Service]`.
fn write_verifiable(dir: &Path, extra: &str) -> std::path::PathBuf {
    let text = unit_text();
    let mut replaced = 0;
    let mut out = String::new();
    for line in text.lines() {
        if let Some(command) = line.strip_prefix("ExecStart=") {
            let (_, args) = command.split_once(' ').unwrap_or((command, ""));
            out.push_str(&format!("ExecStart={BIN} {args}\n"));
            replaced += 1;
        } else if line == "[Install]" {
            out.push_str(&format!("{extra}\n{line}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_eq!(replaced, 1, "one ExecStart= line");
    let path = dir.join("wal2cache.service");
    std::fs::write(&path, out).unwrap();
    path
}

#[test]
fn systemd_analyze_verify_accepts_every_line() {
    let dir = tempfile::tempdir().unwrap();
    let problems = verify(&write_verifiable(dir.path(), ""));
    assert!(
        problems.is_empty(),
        "systemd-analyze verify on the unit:\n{}",
        problems.join("\n")
    );
    // The same check must see a directive systemd does not know (it exits 0 on one):
    // otherwise the assertion above proves nothing on this systemd.
    let dir = tempfile::tempdir().unwrap();
    let problems = verify(&write_verifiable(dir.path(), "ProtectEverything=yes"));
    assert!(
        problems.iter().any(|l| l.contains("ProtectEverything")),
        "systemd-analyze verify said nothing of an unknown directive: {problems:?}"
    );
}

#[test]
fn the_unit_runs_the_daemon_as_it_expects() {
    let unit = parse_unit(&unit_text());

    // READY=1, WATCHDOG=1, RELOADING=1 and STOPPING=1 come from the daemon's own process.
    assert_eq!(one(&unit, "Service", "Type"), "notify");
    assert_eq!(one(&unit, "Service", "NotifyAccess"), "main");
    let watchdog = humantime::parse_duration(one(&unit, "Service", "WatchdogSec")).unwrap();
    assert!(
        watchdog >= Duration::from_secs(10),
        "WatchdogSec={watchdog:?}"
    );

    // `run --config FILE`, with the config under a path the sandbox leaves readable.
    let exec: Vec<&str> = one(&unit, "Service", "ExecStart")
        .split_whitespace()
        .collect();
    assert!(exec[0].ends_with("/wal2cache"), "ExecStart={exec:?}");
    assert_eq!(exec.get(1), Some(&"run"), "the subcommand: {exec:?}");
    let config_at = exec
        .iter()
        .position(|a| *a == "--config")
        .unwrap_or_else(|| panic!("ExecStart without --config: {exec:?}"));
    let config = exec
        .get(config_at + 1)
        .unwrap_or_else(|| panic!("--config without a path: {exec:?}"));
    assert!(config.starts_with('/'), "--config {config}: absolute");
    let readable = one(&unit, "Service", "ReadOnlyPaths");
    assert!(
        readable
            .split_whitespace()
            .any(|p| Path::new(config).starts_with(p.trim_start_matches('-'))),
        "--config {config} is not under ReadOnlyPaths={readable}"
    );
    // The binary takes that command line: `run --help` names --config.
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    assert!(help.status.success(), "wal2cache run --help: {help:?}");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--config"),
        "wal2cache run --help does not mention --config"
    );

    // SIGHUP reloads the rules.
    let reload: Vec<&str> = one(&unit, "Service", "ExecReload")
        .split_whitespace()
        .collect();
    assert!(reload[0].ends_with("/kill"), "ExecReload={reload:?}");
    assert!(
        reload.windows(2).any(|w| w == ["-s", "HUP"])
            || reload.contains(&"-HUP")
            || reload.contains(&"-SIGHUP"),
        "ExecReload does not send SIGHUP: {reload:?}"
    );
    assert_eq!(reload.last(), Some(&"$MAINPID"), "ExecReload={reload:?}");

    // Restarted after a failure (exit 1, a signal, the watchdog), never after 3 (bad
    // config or rules) or 4 (slot loss under on_slot_loss = "fail").
    assert_eq!(one(&unit, "Service", "Restart"), "on-failure");
    let prevent: Vec<&str> = one(&unit, "Service", "RestartPreventExitStatus")
        .split_whitespace()
        .collect();
    for code in ["3", "4"] {
        assert!(
            prevent.contains(&code),
            "RestartPreventExitStatus={prevent:?} lacks {code}"
        );
    }
    assert!(
        !prevent.contains(&"1"),
        "exit 1 is retryable: RestartPreventExitStatus={prevent:?}"
    );
    // And a config that cannot be loaded does exit 3.
    let missing = Command::new(BIN)
        .args(["run", "--config", "/nonexistent/wal2cache.toml"])
        .output()
        .unwrap();
    assert_eq!(
        missing.status.code(),
        Some(3),
        "run with a missing config: {}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // SIGKILL only after the daemon's own drain deadline has passed.
    let stop = humantime::parse_duration(one(&unit, "Service", "TimeoutStopSec")).unwrap();
    let drain = wal2cache::config::PipelineConfig::default().shutdown_timeout;
    assert!(
        stop > drain,
        "TimeoutStopSec={stop:?} must exceed pipeline.shutdown_timeout ({drain:?})"
    );

    // Not root, and the sandbox the comments promise.
    let service = &unit["Service"];
    let dynamic = service
        .get("DynamicUser")
        .is_some_and(|v| v.last().unwrap() == "yes");
    if !dynamic {
        let user = one(&unit, "Service", "User");
        assert!(!["root", "0"].contains(&user), "User={user}");
    }
    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(&unit, "Service", key), value, "{key}=");
    }
    // AF_UNIX carries sd_notify: without it Type=notify never becomes ready.
    let families = one(&unit, "Service", "RestrictAddressFamilies");
    for family in ["AF_INET", "AF_INET6", "AF_UNIX"] {
        assert!(
            families.split_whitespace().any(|f| f == family),
            "RestrictAddressFamilies={families} lacks {family}"
        );
    }
    assert!(
        service["Environment"]
            .iter()
            .any(|e| e.starts_with("WAL2CACHE_LOG=")),
        "Environment= sets no WAL2CACHE_LOG"
    );
}
