//! Read pacing while catching up.
//!
//! PostgreSQL's walsender sends every decoded message with its own `send()` (and, over
//! TLS, its own `SSL_write`). A reader that is faster than the walsender empties the
//! socket after every message and goes to sleep, so each of those sends must also wake
//! it: on a small or virtualised host the wake-up (an inter-processor interrupt, a
//! context switch on both sides) costs more than the message. Measured on a 2-core
//! host, tag-heavy catch-up of 200,000 changes, over TLS: the daemon's thread slept
//! 45,000 times, did 214,000 `recv`s (one change each) and used 13.9 µs of CPU per
//! change; the walsender serving it 17.9 µs, against 10 µs for the same walsender work
//! serving a slower reader (`pg_recvlogical`).
//!
//! So while the stream is catching up (the last commit it saw is more than
//! [`BEHIND`] old), and only when the runtime is about to sleep with the stream waiting
//! for the source, the runtime's thread pauses for [`PAUSE`] first: what the walsender
//! sends meanwhile is queued by the kernel without waking anyone, and is then read
//! in a few large reads. Live traffic (lag under [`BEHIND`]) is never paused, and a
//! paused runtime loses nothing: sockets keep queueing, timers fire late by at most
//! [`PAUSE`].
//!
//! Measured on the same benchmark (three runs each, 2026-12-02): with a 2 ms pause,
//! over TLS 53,783-74,830 changes/s and 5.20-7.80 µs of daemon CPU per change
//! (without: 46,745-47,476 and 12.95-13.15 µs); plain 92,371-115,045 changes/s and
//! 3.85-4.50 µs (without: 75,208-75,287 and 8.65-8.85 µs). 0.5 and 1 ms paused less
//! well (more wake-ups, lower rates).
//!
//! The state is per process (the runtime's park hook has no other way to see it): one
//! daemon runs one stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A stream whose last commit is older than this is catching up.
pub const BEHIND: Duration = Duration::from_millis(100);

/// How long the runtime waits before sleeping on the source while catching up.
pub const PAUSE: Duration = Duration::from_millis(2);

static BEHIND_SOURCE: AtomicBool = AtomicBool::new(false);
static WAITING_FOR_SOURCE: AtomicBool = AtomicBool::new(false);

/// Whether a commit made at `commit_time` (a Postgres timestamp) and seen at `now`
/// means the stream is behind.
pub fn is_behind(commit_time: i64, now: i64) -> bool {
    now.saturating_sub(commit_time) > BEHIND.as_micros() as i64
}

/// The stream saw a commit made at `commit_time`.
pub fn saw_commit(commit_time: i64) {
    BEHIND_SOURCE.store(
        is_behind(commit_time, crate::pgtime::pg_now()),
        Ordering::Relaxed,
    );
}

/// The stream waits for the source (`true`) or has something to do (`false`).
pub fn waiting_for_source(waiting: bool) {
    WAITING_FOR_SOURCE.store(waiting, Ordering::Relaxed);
}

/// The stream ended (stopped, or its connection is gone): nothing to pace until it
/// streams again.
pub fn stream_ended() {
    BEHIND_SOURCE.store(false, Ordering::Relaxed);
    WAITING_FOR_SOURCE.store(false, Ordering::Relaxed);
}

/// Whether the runtime should pause before it sleeps.
pub fn should_pause() -> bool {
    WAITING_FOR_SOURCE.load(Ordering::Relaxed) && BEHIND_SOURCE.load(Ordering::Relaxed)
}

/// The runtime's park hook (`tokio::runtime::Builder::on_thread_park`).
pub fn on_park() {
    if should_pause() {
        std::thread::sleep(PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behind_only_past_the_threshold() {
        let now = 800_000_000_000_000;
        assert!(!is_behind(now, now));
        assert!(!is_behind(now - 100_000, now));
        assert!(is_behind(now - 100_001, now));
        // A commit stamped ahead of our clock (skew): not behind.
        assert!(!is_behind(now + 5_000_000, now));
        assert!(is_behind(i64::MIN, now));
    }

    #[test]
    fn pauses_only_when_behind_and_waiting_for_the_source() {
        stream_ended();
        assert!(!should_pause());
        waiting_for_source(true);
        assert!(!should_pause(), "live: never paused");
        saw_commit(crate::pgtime::pg_now() - 10_000_000);
        assert!(should_pause());
        waiting_for_source(false);
        assert!(!should_pause(), "the stream has work: not paused");
        waiting_for_source(true);
        saw_commit(crate::pgtime::pg_now());
        assert!(!should_pause(), "caught up");
        saw_commit(crate::pgtime::pg_now() - 10_000_000);
        stream_ended();
        assert!(!should_pause());
    }
}
