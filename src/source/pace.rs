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

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// A stream whose last commit is older than this is catching up.
pub const BEHIND: Duration = Duration::from_millis(100);

/// How long the runtime waits before sleeping on the source while catching up.
pub const PAUSE: Duration = Duration::from_millis(2);

static BEHIND_SOURCE: AtomicBool = AtomicBool::new(false);
static WAITING_FOR_SOURCE: AtomicBool = AtomicBool::new(false);
/// A commit made before this time is behind without asking the clock again:
/// the time of the last clock read minus [`BEHIND`] (the clock only moves on).
static SURELY_BEHIND_UP_TO: AtomicI64 = AtomicI64::new(i64::MIN);

/// Whether a commit made at `commit_time` (a Postgres timestamp) and seen at `now`
/// means the stream is behind.
pub fn is_behind(commit_time: i64, now: i64) -> bool {
    now.saturating_sub(commit_time) > BEHIND.as_micros() as i64
}

/// The stream saw a commit made at `commit_time`.
pub fn saw_commit(commit_time: i64) {
    saw_commit_at(commit_time, crate::pgtime::pg_now);
}

/// [`saw_commit`] with the clock given. While catching up, the commits read are older
/// than the last clock read by more than [`BEHIND`], and the clock is not read again
/// (it was read once per transaction, about 1% of the daemon's CPU in a catch-up of
/// single-row transactions).
fn saw_commit_at(commit_time: i64, now: impl FnOnce() -> i64) {
    if commit_time < SURELY_BEHIND_UP_TO.load(Ordering::Relaxed) {
        BEHIND_SOURCE.store(true, Ordering::Relaxed);
        return;
    }
    let now = now();
    SURELY_BEHIND_UP_TO.store(
        now.saturating_sub(BEHIND.as_micros() as i64),
        Ordering::Relaxed,
    );
    BEHIND_SOURCE.store(is_behind(commit_time, now), Ordering::Relaxed);
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
    SURELY_BEHIND_UP_TO.store(i64::MIN, Ordering::Relaxed);
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

    /// One test for the process-wide state (tests run in parallel).
    #[test]
    fn pauses_only_when_behind_and_waiting_for_the_source() {
        clock_is_read_only_for_commits_that_may_be_live();
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

    fn clock_is_read_only_for_commits_that_may_be_live() {
        stream_ended();
        waiting_for_source(true);
        let reads = std::cell::Cell::new(0);
        let clock = |now: i64| {
            let reads = &reads;
            move || {
                reads.set(reads.get() + 1);
                now
            }
        };
        let now = 800_000_000_000_000;
        // Catching up: the first commit reads the clock, older ones do not.
        saw_commit_at(now - 60_000_000, clock(now));
        assert!(should_pause());
        for age in [50_000_000, 1_000_000, 100_001] {
            saw_commit_at(now - age, clock(now));
        }
        assert!(should_pause());
        assert_eq!(
            reads.get(),
            1,
            "commits older than the last read minus BEHIND"
        );
        // A commit that may be live reads the clock again.
        saw_commit_at(now - 99_999, clock(now));
        assert_eq!(reads.get(), 2);
        assert!(!should_pause(), "caught up");
        // The clock moved on: a commit older than the new read minus BEHIND.
        saw_commit_at(now + 1, clock(now + 500_000));
        assert_eq!(reads.get(), 3);
        assert!(should_pause(), "seen 499,999 µs after it was made");
        saw_commit_at(now + 399_999, clock(now + 500_000));
        assert_eq!(reads.get(), 3);
        assert!(should_pause());
        // Exactly BEHIND old at the last read is not behind (`is_behind`): read again.
        saw_commit_at(now + 400_000, clock(now + 500_000));
        assert_eq!(reads.get(), 4);
        assert!(!should_pause());
        stream_ended();
        // After the stream ended nothing is known: the clock is read.
        saw_commit_at(now - 60_000_000, clock(now));
        assert_eq!(reads.get(), 5);
        stream_ended();
    }
}
