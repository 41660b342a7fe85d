//! The L2's counters: atomics read as one [`Metrics`] snapshot, and the same counts
//! sent to the `metrics` facade (for an application that installed a recorder) as
//! `wal2cache_l2_*_total`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of an [`L2`](super::L2)'s counters (totals since it was built).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Reads answered with a value by their first look in Redis.
    pub hits: u64,
    /// Reads answered "not found" by a cached not-found marker (negative caching).
    pub negative_hits: u64,
    /// Reads that found nothing at their first look.
    pub misses: u64,
    /// Leases granted to this client: loader runs whose value may be stored.
    pub leases_granted: u64,
    /// Reads that found another load's lease and waited.
    pub lease_waits: u64,
    /// Waiting reads answered from Redis (the holder stored in time).
    pub wait_hits: u64,
    /// Loaded values not stored because the lease was gone when they came back:
    /// the daemon changed the key (or purged a tag of it) during the load, or the
    /// lease expired.
    pub leases_lost: u64,
    /// Loaded values not stored because the key held a value by then (a republish).
    pub store_skipped: u64,
    /// Values (and not-found markers) stored.
    pub stored: u64,
    /// Loader runs without a lease, after `lease_wait` ran out: not stored.
    pub unleased_loads: u64,
    /// Loader runs that returned an error (`try_get_or_load`).
    pub loader_errors: u64,
    /// Redis commands that failed.
    pub redis_errors: u64,
}

macro_rules! counters {
    ($($field:ident => $name:literal),* $(,)?) => {
        #[derive(Default)]
        pub(super) struct Counters {
            $(pub(super) $field: AtomicU64,)*
        }

        /// What a counter counts, for [`Counters::bump`].
        #[derive(Debug, Clone, Copy)]
        #[allow(non_camel_case_types)]
        pub(super) enum Counter {
            $($field,)*
        }

        impl Counters {
            pub(super) fn bump(&self, counter: Counter) {
                match counter {
                    $(Counter::$field => {
                        self.$field.fetch_add(1, Relaxed);
                        metrics::counter!($name).increment(1);
                    })*
                }
            }

            pub(super) fn snapshot(&self) -> Metrics {
                Metrics {
                    $($field: self.$field.load(Relaxed),)*
                }
            }
        }
    };
}

counters! {
    hits => "wal2cache_l2_hits_total",
    negative_hits => "wal2cache_l2_negative_hits_total",
    misses => "wal2cache_l2_misses_total",
    leases_granted => "wal2cache_l2_leases_granted_total",
    lease_waits => "wal2cache_l2_lease_waits_total",
    wait_hits => "wal2cache_l2_wait_hits_total",
    leases_lost => "wal2cache_l2_leases_lost_total",
    store_skipped => "wal2cache_l2_store_skipped_total",
    stored => "wal2cache_l2_stored_total",
    unleased_loads => "wal2cache_l2_unleased_loads_total",
    loader_errors => "wal2cache_l2_loader_errors_total",
    redis_errors => "wal2cache_l2_redis_errors_total",
}
