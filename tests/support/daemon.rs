//! The `wal2cache` binary as a process: for the tests whose subject is the process
//! itself (SIGKILL, SIGTERM, exit codes, what it prints), and for the benches that
//! measure it. Everything else runs the daemon in the test's process (`inproc`).

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary of this build.
#[allow(dead_code)]
pub const BIN: &str = env!("CARGO_BIN_EXE_wal2cache");

/// The binary the tests run: `BIN`, or `WAL2CACHE_TEST_BIN` (to run a test against
/// another build, e.g. to see it fail before a fix), or `W2C_BENCH_BIN` (the benches'
/// name for it).
#[allow(dead_code)]
pub fn bin() -> String {
    std::env::var("WAL2CACHE_TEST_BIN")
        .or_else(|_| std::env::var("W2C_BENCH_BIN"))
        .unwrap_or_else(|_| BIN.to_string())
}

/// The environment the tests give the binary before their own: text logs, which the
/// tests read as text (a daemon whose stderr is not a terminal logs JSON by default).
/// Not for another build (`bin()` is not `BIN`), which may predate `log.format`.
#[allow(dead_code)]
pub fn base_env() -> Vec<(&'static str, &'static str)> {
    if bin() == BIN {
        vec![("WAL2CACHE__LOG__FORMAT", "text")]
    } else {
        Vec::new()
    }
}

/// Runs `wal2cache args` to its end with `envs` (and the test's environment): the exit
/// code (-1 when a signal ended it), standard output, standard error.
#[allow(dead_code)]
pub fn run_binary(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .envs(base_env())
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `wal2cache run` as a child process, killed (SIGKILL) when dropped, also when a test
/// panics.
#[allow(dead_code)]
pub struct Daemon(Option<Child>);

#[allow(dead_code)]
impl Daemon {
    /// Starts it with `envs` (logging at warn unless `WAL2CACHE_LOG` is among them).
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(config, envs, &[], Stdio::inherit(), Stdio::inherit())
    }

    /// Starts it with its standard error written to `log`.
    pub fn start_logging(config: &Path, envs: &[(&str, &str)], log: &Path) -> Daemon {
        let log = std::fs::File::create(log).unwrap();
        Daemon::spawn(config, envs, &[], Stdio::inherit(), log.into())
    }

    /// Starts it under `wrapper` (a command line the daemon's own is appended to, e.g.
    /// `valgrind --tool=callgrind`; empty: none; the wrapper must become the daemon's
    /// process, as valgrind does, for `pid` to be the daemon's), its standard output
    /// and error both written to `log`.
    pub fn start_wrapped(
        config: &Path,
        envs: &[(&str, &str)],
        wrapper: &[String],
        log: &Path,
    ) -> Daemon {
        let log = std::fs::File::create(log).unwrap();
        let stdout = log.try_clone().unwrap();
        Daemon::spawn(config, envs, wrapper, stdout.into(), log.into())
    }

    fn spawn(
        config: &Path,
        envs: &[(&str, &str)],
        wrapper: &[String],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Daemon {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let child = command
            .args(["run", "--config", config.to_str().unwrap()])
            .env("WAL2CACHE_LOG", "warn")
            .envs(base_env())
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin()));
        Daemon(Some(child))
    }

    /// The process id (the wrapper's, under a wrapper).
    pub fn pid(&self) -> i32 {
        self.0.as_ref().unwrap().id() as i32
    }

    /// How it exited, if it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.0.as_mut().unwrap().try_wait().unwrap()
    }

    /// SIGTERM: it must drain and exit 0.
    pub fn stop(mut self) {
        let mut child = self.0.take().unwrap();
        signal(&child, "TERM");
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "run exits 0 on SIGTERM");
    }

    /// SIGTERM, then waits up to `within` for it to exit: its exit code and how long
    /// it took, or `None` (and it is killed) if it was still running.
    pub fn terminate(self, within: Duration) -> Option<(Option<i32>, Duration)> {
        self.terminate_status(within)
            .map(|(status, took)| (status.code(), took))
    }

    /// `terminate`, with the whole exit status (a signal that ended it, too).
    pub fn terminate_status(mut self, within: Duration) -> Option<(ExitStatus, Duration)> {
        let mut child = self.0.take().unwrap();
        let sent = Instant::now();
        signal(&child, "TERM");
        while sent.elapsed() < within {
            if let Some(status) = child.try_wait().unwrap() {
                return Some((status, sent.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn assert_running(&mut self, when: &str) {
        assert!(self.exit_status().is_none(), "the daemon exited {when}");
    }
}

/// Sends `signal` (`"TERM"`, `"HUP"`...) to the child.
#[allow(dead_code)]
pub fn signal(child: &Child, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal}");
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
