//! Sinks: where plans go. A batch is done when every sink has confirmed it.
//!
//! The contract every sink keeps:
//! - **At least once.** A batch may be applied again after a crash or a retry; every
//!   operation is idempotent (UNLINK, a versioned SET, a purge, an event a subscriber
//!   may see twice).
//! - **Never older.** A republished value is written only when its version (commit LSN,
//!   then position in the transaction) is newer than the one stored.
//! - **Retry what is transient, stop on poison.** `apply` retries transient errors
//!   itself (capped, jittered backoff) until it succeeds or is told to stop; it returns
//!   an error only for what retrying cannot fix, naming the key.
//! - The pipeline confirms an LSN to Postgres only after every sink applied every batch
//!   up to it.

pub mod fit;
pub mod kafka;
pub mod redis;
pub mod retry;

use std::sync::Arc;

pub use retry::RetryLog;

use crate::lsn::Lsn;
use crate::rules::Plan;

/// Orders republished values: the commit LSN of the transaction, then the change's
/// position in it. Replays produce the same version, so they never win over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub commit_lsn: Lsn,
    pub seq: u32,
}

impl Version {
    /// Fixed-width hex: compares as a string the way it compares as a number (Lua
    /// numbers are doubles and would lose LSN bits).
    pub fn encode(&self) -> String {
        format!("{:016x}{:08x}", self.commit_lsn.0, self.seq)
    }
}

/// Where an item came from, for events and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub version: Version,
    pub xid: u32,
    /// Postgres commit time, microseconds since 2000-01-01.
    pub commit_time: i64,
    /// `schema.table`; none for a logical message.
    pub table: Option<String>,
    /// `insert`, `update`, `delete`, `truncate` or `message`.
    pub op: &'static str,
}

/// One change's plan and where it came from.
#[derive(Debug, Clone)]
pub struct Item {
    pub origin: Origin,
    pub plan: Arc<Plan>,
}

/// Work for the sinks: items in WAL order, and what may be confirmed after them.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub items: Vec<Item>,
    /// End LSN of the newest transaction that ends in this batch: every transaction up
    /// to it is complete once this batch and all before it are applied.
    pub confirm: Option<Lsn>,
    /// Commit time of that transaction.
    pub commit_time: Option<i64>,
}

/// An error a sink could not retry away.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("Redis refused {command} on key {key:?} ({origin}): {message}; fix the key's type or the rule, then restart (nothing after LSN {confirmed} was confirmed)")]
    RedisPoison {
        command: String,
        key: String,
        origin: String,
        message: String,
        confirmed: String,
    },
    #[error("Redis: {0}")]
    Redis(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("stopped before the batch was applied")]
    Stopped,
}

/// `rule "product", for public.products update at LSN 0/1A2B3C4 (xid 7781)`.
pub fn describe(item: &Item) -> String {
    let o = &item.origin;
    let rules = if item.plan.rules.is_empty() {
        "a wal2cache message".to_string()
    } else {
        format!(
            "rule {}",
            item.plan
                .rules
                .iter()
                .map(|r| format!("{r:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "{rules}, for {} {} at LSN {} (xid {})",
        o.table.as_deref().unwrap_or("a logical message"),
        o.op,
        o.version.commit_lsn,
        o.xid
    )
}
