//! How the sinks report failures without flooding the log: the first failed attempt
//! at WARN, then at most one WARN per `WARN_EVERY` with the attempt count, one ERROR
//! once a sink has failed for longer than its bound, and one INFO when it recovers.
//! `Repeats` does the same for the lines librdkafka logs by itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// At most one retry WARN per sink this often.
pub const WARN_EVERY: Duration = Duration::from_secs(30);

/// A sink failing this long says so at ERROR (`pipeline.sink_error_after`).
pub const ERROR_AFTER: Duration = Duration::from_secs(300);

/// What a call to `RetryLog::failed` logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logged {
    Warn,
    Error,
    Quiet,
}

/// The retry log of one sink.
#[derive(Debug)]
pub struct RetryLog {
    sink: &'static str,
    /// What the sink does while it fails, for the ERROR line.
    tried: &'static str,
    /// What the operator can do, for the ERROR line.
    fix: &'static str,
    /// Failing this long is logged at ERROR, once per outage.
    pub error_after: Duration,
    since: Option<Instant>,
    attempts: u64,
    last_warn: Option<Instant>,
    quiet: u64,
    errored: bool,
    /// Where failures and recoveries are reported for `/readyz` and `/status`.
    pub health: Option<crate::health::SinkHealth>,
}

/// A duration rounded to whole seconds (milliseconds under one), for log lines.
fn round(d: Duration) -> humantime::FormattedDuration {
    let d = if d >= Duration::from_secs(1) {
        Duration::from_secs(d.as_secs())
    } else {
        Duration::from_millis(d.as_millis() as u64)
    };
    humantime::format_duration(d)
}

impl RetryLog {
    pub fn new(sink: &'static str, tried: &'static str, fix: &'static str) -> RetryLog {
        RetryLog {
            sink,
            tried,
            fix,
            error_after: ERROR_AFTER,
            since: None,
            attempts: 0,
            last_warn: None,
            quiet: 0,
            errored: false,
            health: None,
        }
    }

    /// The label of the sink's metrics: `redis`, `kafka` (the first word of its name:
    /// the stream record's writer counts as Redis).
    fn label(&self) -> String {
        self.sink
            .split_whitespace()
            .next()
            .unwrap_or(self.sink)
            .to_ascii_lowercase()
    }

    /// An attempt failed with `error` (one line, already cut short); the next is in
    /// `retry_in`.
    pub fn failed(&mut self, error: &str, retry_in: Duration) -> Logged {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        self.attempts += 1;
        metrics::counter!("wal2cache_sink_errors_total", "sink" => self.label(), "kind" => "retry")
            .increment(1);
        if let Some(h) = &self.health {
            h.failing(error);
        }
        let failing = now - since;
        let sink = self.sink;
        if !self.errored && failing >= self.error_after {
            self.errored = true;
            self.last_warn = Some(now);
            self.quiet = 0;
            tracing::error!(
                attempts = self.attempts,
                failing_for = %round(failing),
                "{sink} has been failing for {} ({} attempts; {}); last error: {error}. {}",
                round(failing),
                self.attempts,
                self.tried,
                self.fix
            );
            return Logged::Error;
        }
        if self.last_warn.is_none_or(|t| now - t >= WARN_EVERY) {
            let suppressed = std::mem::take(&mut self.quiet);
            self.last_warn = Some(now);
            tracing::warn!(
                error,
                attempt = self.attempts,
                failing_for = %round(failing),
                retry_in = %round(retry_in),
                suppressed,
                "{sink} failed; retrying the batch (one line per {}s while it lasts)",
                WARN_EVERY.as_secs()
            );
            return Logged::Warn;
        }
        self.quiet += 1;
        Logged::Quiet
    }

    /// An attempt succeeded: after failures, one INFO line; the attempts and how long
    /// the sink failed.
    pub fn succeeded(&mut self) -> Option<(u64, Duration)> {
        let since = self.since.take()?;
        if let Some(h) = &self.health {
            h.ok();
        }
        let attempts = std::mem::take(&mut self.attempts);
        self.last_warn = None;
        self.quiet = 0;
        self.errored = false;
        let failed_for = since.elapsed();
        tracing::info!(
            attempts,
            failed_for = %round(failed_for),
            "{} works again: the batch was applied",
            self.sink
        );
        Some((attempts, failed_for))
    }
}

/// Lets a message through once per interval; counts the repeats it kept quiet.
/// Messages that differ only in their numbers (ports, milliseconds, counts) are the
/// same message.
#[derive(Debug)]
pub struct Repeats {
    every: Duration,
    seen: Mutex<HashMap<String, Seen>>,
}

#[derive(Debug)]
struct Seen {
    last: Instant,
    quiet: u64,
}

/// Distinct messages remembered at most; older ones are forgotten first.
const REMEMBERED: usize = 1024;

impl Repeats {
    pub fn new(every: Duration) -> Repeats {
        Repeats {
            every,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` when `message` may be logged now, `n` being the repeats kept quiet
    /// since it was last logged; `None` to keep this one quiet.
    pub fn allow(&self, message: &str) -> Option<u64> {
        let key = shape(message);
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= REMEMBERED && !seen.contains_key(&key) {
            let every = self.every;
            seen.retain(|_, s| now - s.last < every);
            if seen.len() >= REMEMBERED {
                seen.clear();
            }
        }
        match seen.get_mut(&key) {
            Some(s) if now - s.last < self.every => {
                s.quiet += 1;
                None
            }
            Some(s) => {
                s.last = now;
                Some(std::mem::take(&mut s.quiet))
            }
            None => {
                seen.insert(
                    key,
                    Seen {
                        last: now,
                        quiet: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

/// `message` without what changes between repeats: librdkafka's `[thrd:…]: ` prefix
/// (its error callback has none), a trailing `(after …)` note, every run of digits
/// (as `#`).
fn shape(message: &str) -> String {
    let mut message = message;
    if message.starts_with("[thrd:") {
        if let Some(end) = message.find("]: ") {
            message = &message[end + 3..];
        }
    }
    if let Some(at) = message.rfind(" (after ") {
        message = &message[..at];
    }
    let mut out = String::with_capacity(message.len());
    let mut in_digits = false;
    for c in message.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_warn_first_then_every_30_s_then_error_once() {
        let mut log = RetryLog::new("Redis", "retrying", "fix it");
        log.error_after = Duration::from_secs(300);
        let step = Duration::from_secs(1);
        assert_eq!(log.failed("refused", step), Logged::Warn);
        let mut warns = 0;
        let mut errors = 0;
        // Ten minutes of attempts every second.
        for _ in 0..600 {
            tokio::time::advance(step).await;
            match log.failed("refused", step) {
                Logged::Warn => warns += 1,
                Logged::Error => errors += 1,
                Logged::Quiet => {}
            }
        }
        assert_eq!(errors, 1, "one ERROR per outage");
        // One WARN per 30 s (the ERROR takes the place of one).
        assert!(
            (18..=20).contains(&warns),
            "{warns} WARN lines in 10 minutes"
        );
        assert_eq!(log.succeeded().map(|(n, _)| n), Some(601));
        assert_eq!(log.succeeded(), None, "a success after a success is quiet");
        // A new outage starts over: WARN at once, ERROR again after the bound.
        assert_eq!(log.failed("refused", step), Logged::Warn);
        tokio::time::advance(Duration::from_secs(301)).await;
        assert_eq!(log.failed("refused", step), Logged::Error);
    }

    #[tokio::test(start_paused = true)]
    async fn the_error_bound_is_configurable() {
        let mut log = RetryLog::new("Kafka", "retrying", "fix it");
        log.error_after = Duration::from_secs(2);
        assert_eq!(log.failed("timed out", Duration::ZERO), Logged::Warn);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(log.failed("timed out", Duration::ZERO), Logged::Quiet);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(log.failed("timed out", Duration::ZERO), Logged::Error);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(log.failed("timed out", Duration::ZERO), Logged::Quiet);
    }

    #[tokio::test(start_paused = true)]
    async fn repeats_pass_once_per_interval_with_the_count_kept_quiet() {
        let r = Repeats::new(Duration::from_secs(30));
        let msg = |ms: u32| {
            format!("127.0.0.1:19092/bootstrap: Connect to ipv4#127.0.0.1:19092 failed: Connection refused (after {ms}ms in state CONNECT)")
        };
        assert_eq!(r.allow(&msg(0)), Some(0));
        // 400 repeats in 10 s (what librdkafka printed): all kept quiet, whatever
        // their numbers.
        for i in 0..400 {
            tokio::time::advance(Duration::from_millis(25)).await;
            assert_eq!(r.allow(&msg(i)), None);
        }
        // Another message is not held back by the first.
        assert_eq!(r.allow("Metadata request failed: timed out"), Some(0));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(r.allow(&msg(1)), Some(400));
        assert_eq!(r.allow(&msg(2)), None);
    }

    #[test]
    fn shapes_ignore_numbers_and_librdkafka_decorations() {
        assert_eq!(shape("took 10ms, 2 errors"), "took #ms, # errors");
        // The log line and the error callback of one failure are the same message.
        let log = "[thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 0ms in state CONNECT, 1 identical error(s) suppressed)";
        let error = "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 3ms in state CONNECT)";
        assert_eq!(shape(log), shape(error));
        assert_eq!(
            shape(error),
            "#.#.#.#:#/bootstrap: Connect to ipv###.#.#.#:# failed: Connection refused"
        );
    }
}
