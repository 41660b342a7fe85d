//! The L1's counters: plain atomics bumped on the hot paths, read as one `Metrics`
//! snapshot through the API, and copied to the `metrics` facade (for an application
//! that installed a recorder) by the subscriber a few times a second.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A snapshot of an [`L1`](super::L1)'s counters (totals since it was built) and state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Lookups (`get`, `get_with`, `try_get_with`) answered from the cache.
    pub hits: u64,
    /// Lookups that found nothing (a `get_with` that joined another caller's load
    /// counts here, not in `loads`).
    pub misses: u64,
    /// Loader runs.
    pub loads: u64,
    /// Loader runs that returned an error (`try_get_with`).
    pub load_errors: u64,
    /// Values stored (loads and `insert`s).
    pub stored: u64,
    /// Values not stored: an invalidation of their key or tags, a flush or a safety
    /// reset came while they loaded, or the cache was unhealthy.
    pub not_stored: u64,
    /// Entries removed by `invalidate` events (keys and tag members) and by
    /// `invalidate`/`invalidate_tag` calls.
    pub evictions_by_invalidation: u64,
    /// `flush_all` events handled (and `invalidate_all` calls).
    pub flushes: u64,
    /// Times the cache emptied itself because the stream became unsafe (healthy to
    /// unhealthy transitions).
    pub resets: u64,
    /// Schema-1 events applied (every kind, heartbeats included).
    pub events: u64,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Messages that are not a schema-1 event (not JSON, a missing field, another
    /// schema number, no payload): counted, logged, skipped.
    pub malformed: u64,
    /// Events of a kind this version does not know: skipped.
    pub unknown_kinds: u64,
    /// Offsets within a partition that were not contiguous.
    pub offset_gaps: u64,
    /// Consumer, client and assignment errors (each makes or keeps the cache
    /// unhealthy).
    pub consumer_errors: u64,
    /// Whether the cache stores values: every partition assigned, a heartbeat on
    /// each within the staleness bound, no error since.
    pub healthy: bool,
    /// Why it is not healthy (None when healthy).
    pub unhealthy_reason: Option<String>,
    /// `now - commit_time` of the last heartbeat or invalidation received (0 when
    /// the clocks disagree the other way).
    pub last_lag: Option<Duration>,
    /// Time since the last heartbeat (any partition).
    pub last_heartbeat_age: Option<Duration>,
    /// Entries in the cache (approximate, as moka counts them).
    pub entries: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub loads: AtomicU64,
    pub load_errors: AtomicU64,
    pub stored: AtomicU64,
    pub not_stored: AtomicU64,
    pub evictions_by_invalidation: AtomicU64,
    pub flushes: AtomicU64,
    pub resets: AtomicU64,
    pub events: AtomicU64,
    pub heartbeats: AtomicU64,
    pub malformed: AtomicU64,
    pub unknown_kinds: AtomicU64,
    pub offset_gaps: AtomicU64,
    pub consumer_errors: AtomicU64,
    /// Microseconds; `i64::MIN` until measured.
    last_lag_us: AtomicI64,
    last_heartbeat: Mutex<Option<Instant>>,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    if n > 0 {
        c.fetch_add(n, Relaxed);
    }
}

impl Counters {
    pub fn new() -> Counters {
        Counters {
            last_lag_us: AtomicI64::new(i64::MIN),
            ..Counters::default()
        }
    }

    pub fn set_lag(&self, lag: Duration) {
        self.last_lag_us
            .store(lag.as_micros().min(i64::MAX as u128) as i64, Relaxed);
    }

    pub fn heartbeat_at(&self, at: Instant) {
        *self.last_heartbeat.lock().unwrap() = Some(at);
    }

    pub fn snapshot(&self) -> Metrics {
        let lag = self.last_lag_us.load(Relaxed);
        Metrics {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            loads: self.loads.load(Relaxed),
            load_errors: self.load_errors.load(Relaxed),
            stored: self.stored.load(Relaxed),
            not_stored: self.not_stored.load(Relaxed),
            evictions_by_invalidation: self.evictions_by_invalidation.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            resets: self.resets.load(Relaxed),
            events: self.events.load(Relaxed),
            heartbeats: self.heartbeats.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            unknown_kinds: self.unknown_kinds.load(Relaxed),
            offset_gaps: self.offset_gaps.load(Relaxed),
            consumer_errors: self.consumer_errors.load(Relaxed),
            healthy: false,
            unhealthy_reason: None,
            last_lag: (lag != i64::MIN).then(|| Duration::from_micros(lag.max(0) as u64)),
            last_heartbeat_age: self.last_heartbeat.lock().unwrap().map(|t| t.elapsed()),
            entries: 0,
        }
    }
}

/// Copies a snapshot to the `metrics` facade; a no-op without a recorder.
pub(crate) fn export(m: &Metrics) {
    let counters = [
        ("wal2cache_l1_hits_total", m.hits),
        ("wal2cache_l1_misses_total", m.misses),
        ("wal2cache_l1_loads_total", m.loads),
        ("wal2cache_l1_load_errors_total", m.load_errors),
        ("wal2cache_l1_not_stored_total", m.not_stored),
        ("wal2cache_l1_evictions_total", m.evictions_by_invalidation),
        ("wal2cache_l1_flushes_total", m.flushes),
        ("wal2cache_l1_resets_total", m.resets),
        ("wal2cache_l1_events_total", m.events),
        ("wal2cache_l1_malformed_total", m.malformed),
        ("wal2cache_l1_offset_gaps_total", m.offset_gaps),
        ("wal2cache_l1_consumer_errors_total", m.consumer_errors),
    ];
    for (name, value) in counters {
        metrics::counter!(name).absolute(value);
    }
    metrics::gauge!("wal2cache_l1_healthy").set(if m.healthy { 1.0 } else { 0.0 });
    metrics::gauge!("wal2cache_l1_entries").set(m.entries as f64);
    if let Some(lag) = m.last_lag {
        metrics::gauge!("wal2cache_l1_lag_seconds").set(lag.as_secs_f64());
    }
}
