//! The daemon in the test's process: `wal2cache::app::run` spawned on the test's
//! runtime, as `main` runs it, with a shutdown future (SIGTERM) and a reload channel
//! (SIGHUP) the test holds; and the daemon's log lines, captured.
//!
//! On `#[tokio::test]`'s current-thread runtime the daemon shares the test's thread:
//! a test must not block it (blocking calls go through `spawn_blocking`).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use wal2cache::config::Config;
use wal2cache::error::Error;

use super::wait::eventually;

/// `app::run` on the test's runtime. Dropped without `stop`, the task is aborted.
#[allow(dead_code)]
pub struct InProcess {
    pub config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    reload: mpsc::UnboundedSender<()>,
    task: Option<JoinHandle<Result<(), Error>>>,
}

#[allow(dead_code)]
impl InProcess {
    /// Loads `config` (as `wal2cache run --config` does, environment overrides
    /// included) and starts the daemon on it.
    pub fn start(config: &Path) -> InProcess {
        let config = Config::load(config).unwrap_or_else(|e| panic!("{e}"));
        InProcess::start_with(config)
    }

    /// Starts the daemon on a loaded (perhaps then changed) config.
    pub fn start_with(config: Config) -> InProcess {
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let (reload, reload_rx) = mpsc::unbounded_channel();
        let run_config = config.clone();
        let task = tokio::spawn(async move {
            // A dropped sender stops it too.
            let shutdown = async move {
                let _ = shutdown_rx.await;
            };
            wal2cache::app::run(&run_config, shutdown, reload_rx).await
        });
        InProcess {
            config,
            shutdown: Some(shutdown),
            reload,
            task: Some(task),
        }
    }

    /// What SIGHUP does: reload the rules.
    pub fn reload(&self) {
        self.reload
            .send(())
            .expect("the daemon reads its reload channel");
    }

    /// What SIGTERM does: the daemon drains and stops; what `run` returned.
    pub async fn stop(mut self) -> Result<(), Error> {
        let _ = self.shutdown.take().unwrap().send(());
        self.join().await
    }

    /// `stop`, and `run` must have returned `Ok` (as the binary exits 0 on SIGTERM).
    pub async fn stop_ok(self) {
        if let Err(e) = self.stop().await {
            panic!("run returns Ok on shutdown, not: {e}");
        }
    }

    /// SIGTERM, then waits up to `within` for `run` to return: what it returned and how
    /// long it took, or `None` (and it is aborted) if it was still running.
    pub async fn stop_within(mut self, within: Duration) -> Option<(Result<(), Error>, Duration)> {
        let sent = Instant::now();
        let _ = self.shutdown.take().unwrap().send(());
        let task = self.task.as_mut().unwrap();
        match tokio::time::timeout(within, task).await {
            Ok(joined) => {
                self.task = None;
                Some((joined.expect("run panicked"), sent.elapsed()))
            }
            Err(_) => None,
        }
    }

    /// Waits up to `within` for `run` to return by itself (a fatal error).
    pub async fn exited(mut self, within: Duration) -> Result<(), Error> {
        let task = self.task.as_mut().unwrap();
        let joined = tokio::time::timeout(within, task)
            .await
            .unwrap_or_else(|_| panic!("the daemon still runs after {within:?}"));
        self.task = None;
        joined.expect("run panicked")
    }

    /// Fails the test, with what `run` returned, if it has returned.
    pub async fn assert_running(&mut self, when: &str) {
        if self.task.as_ref().unwrap().is_finished() {
            let result = self.join().await;
            panic!("the daemon exited {when}: {result:?}");
        }
    }

    async fn join(&mut self) -> Result<(), Error> {
        self.task.take().unwrap().await.expect("run panicked")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Log lines captured from this thread's tracing events, formatted as the binary
/// writes them to standard error (without colours).
#[allow(dead_code)]
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

#[allow(dead_code)]
impl Logs {
    /// Captures this thread's tracing events at `filter` (`WAL2CACHE_LOG`'s syntax;
    /// the replication crate is quiet, as in the binary) until the guard is dropped.
    /// On `#[tokio::test]`'s current-thread runtime that is the test's events and every
    /// task's on it, an in-process daemon's; not those of other threads (librdkafka's
    /// own, `spawn_blocking`, a multi-thread runtime's workers).
    pub fn capture(filter: &str) -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
                "{filter},pgwire_replication=off"
            )))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, guard)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// How many lines contain `what`.
    pub fn lines_with(&self, what: &str) -> usize {
        self.text().lines().filter(|l| l.contains(what)).count()
    }

    /// Waits (30 s at most) until `count` lines contain `what`.
    pub async fn wait_for(&self, what: &str, count: usize) {
        eventually(
            &format!("{count} line(s) of the daemon's log with {what:?}"),
            Duration::from_secs(30),
            || async { self.lines_with(what) >= count },
        )
        .await;
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
