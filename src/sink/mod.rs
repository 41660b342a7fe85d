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
#[cfg(test)]
pub mod memory;
pub mod redis;
pub mod retry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use retry::RetryLog;

use crate::lsn::Lsn;
use crate::plan::Plan;

/// A place plans are carried out: Redis, Kafka (and, in unit tests, memory).
///
/// The contract, which the pipeline relies on:
/// - **Idempotent, at least once.** A batch may be applied again (after a crash, a
///   retry, or merged with its neighbours); applying it twice leaves the same state
///   as once.
/// - **In order.** Batches arrive in WAL order and are applied in that order; a sink
///   may coalesce within a batch only where the state it leaves is the one applying
///   the items one by one would leave.
/// - **Done means durable.** `apply` returns `Ok` only when the destination has
///   accepted every item (Redis replied, the broker acknowledged); the pipeline
///   confirms a position to Postgres only after every sink returned `Ok` for every
///   batch up to it.
/// - **Retries are the sink's own.** Transient failures (connection lost, server
///   loading, broker unavailable) are retried inside `apply` with backoff, and logged,
///   until they succeed or the sink is stopped ([`SinkError::Stopped`]). An error
///   returned is one retrying cannot fix ([`SinkErrorKind::Stop`]): it names the item,
///   the key and the fix, and the daemon stops without confirming the batch.
pub trait Sink: Send + 'static {
    /// `redis`, `kafka`: the label of its metrics.
    fn name(&self) -> &'static str;

    /// Where it writes, for messages: `Redis at redis://host:6379`.
    fn describe(&self) -> String;

    /// Applies one batch (see the contract above).
    fn apply(&mut self, batch: &Batch) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// How long failing may go on before the sink says so at ERROR.
    fn set_error_after(&mut self, bound: Duration);

    /// Where to report failing and recovering, for `/readyz` and `/status`.
    fn set_health(&mut self, _health: crate::health::SinkHealth) {}

    /// Stops the sink's background tasks and waits for them, after its last batch.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Where the pipeline stands, as sinks with background work (Kafka's heartbeats) see
/// it: kept by the pipeline, which updates it after every batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// Last LSN confirmed to Postgres.
    pub confirmed: Lsn,
    /// Commit time (Postgres micros) of the newest transaction applied everywhere.
    pub applied_commit_time: Option<i64>,
    /// Commit time of the oldest batch dispatched and not yet applied everywhere (its
    /// newest transaction's): how far behind the caches are while work is in flight.
    pub pending_commit_time: Option<i64>,
    /// Work is in flight: the stream is behind.
    pub busy: bool,
}

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
        let mut out = String::with_capacity(24);
        self.encode_into(&mut out);
        out
    }

    /// `encode`, appended to `out`.
    pub fn encode_into(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(out, "{:016x}{:08x}", self.commit_lsn.0, self.seq);
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
    pub table: Option<Arc<str>>,
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
    /// The stream has applied every change older than these items' versions and will
    /// never apply one again (a backfill's page once the slots have confirmed past its
    /// snapshot, see `backfill::settled`): a republish still yields to a newer version
    /// stored beside its key, but leaves no version of its own. Never set by the
    /// stream.
    pub settled: bool,
}

/// What to do about a sink's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkErrorKind {
    /// Transient (unreachable, timed out): worth trying again later.
    Retry,
    /// Retrying cannot fix it: stop and tell the operator.
    Stop,
}

/// An error a sink could not retry away, or met connecting. The message is whole
/// (cause and fix); the underlying client error, when there is one, is its source.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("Redis refused {command} on key {key:?} ({origin}): {message}; fix the key's type or the rule, then restart")]
    RedisPoison {
        command: String,
        key: String,
        origin: String,
        message: String,
    },
    #[error("Redis: {message}")]
    Redis {
        message: String,
        #[source]
        source: Option<::redis::RedisError>,
        kind: SinkErrorKind,
    },
    #[error("Kafka: {message}")]
    Kafka {
        message: String,
        #[source]
        source: Option<rdkafka::error::KafkaError>,
        kind: SinkErrorKind,
    },
    #[error("stopped before the batch was applied")]
    Stopped,
    /// The task applying a sink's batches panicked or was cancelled: a bug, never a
    /// sink's answer.
    #[error("the task applying batches to {sink} {what}: {detail}; this is a bug in wal2cache: report it with the log above")]
    Task {
        sink: &'static str,
        what: &'static str,
        detail: String,
    },
}

impl SinkError {
    pub fn redis(
        message: impl Into<String>,
        source: Option<::redis::RedisError>,
        kind: SinkErrorKind,
    ) -> SinkError {
        SinkError::Redis {
            message: message.into(),
            source,
            kind,
        }
    }

    pub fn kafka(
        message: impl Into<String>,
        source: Option<rdkafka::error::KafkaError>,
        kind: SinkErrorKind,
    ) -> SinkError {
        SinkError::Kafka {
            message: message.into(),
            source,
            kind,
        }
    }

    pub fn kind(&self) -> SinkErrorKind {
        match self {
            SinkError::Redis { kind, .. } | SinkError::Kafka { kind, .. } => *kind,
            SinkError::Stopped => SinkErrorKind::Retry,
            SinkError::RedisPoison { .. } | SinkError::Task { .. } => SinkErrorKind::Stop,
        }
    }

    /// A task that ended without an answer.
    pub fn task(sink: &'static str, e: tokio::task::JoinError) -> SinkError {
        let what = if e.is_panic() {
            "panicked"
        } else {
            "was cancelled"
        };
        let detail = match e.try_into_panic() {
            Ok(panic) => panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into()),
            Err(e) => e.to_string(),
        };
        SinkError::Task { sink, what, detail }
    }
}

/// Characters of a key shown in a log line.
pub const KEY_SHOWN: usize = 100;

/// `s` cut to `max` characters, marked when cut.
pub fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((end, _)) => format!("{}… ({} bytes)", &s[..end], s.len()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_say_retry_or_stop() {
        let poison = SinkError::RedisPoison {
            command: "UNLINK".into(),
            key: "k".into(),
            origin: "rule \"r\"".into(),
            message: "WRONGTYPE".into(),
        };
        assert_eq!(poison.kind(), SinkErrorKind::Stop);
        let unreachable = SinkError::redis("no answer", None, SinkErrorKind::Retry);
        assert_eq!(unreachable.kind(), SinkErrorKind::Retry);
        let refused = SinkError::kafka("refused", None, SinkErrorKind::Stop);
        assert_eq!(refused.kind(), SinkErrorKind::Stop);
        assert_eq!(SinkError::Stopped.kind(), SinkErrorKind::Retry);
        let task = SinkError::Task {
            sink: "redis",
            what: "panicked",
            detail: "boom".into(),
        };
        assert_eq!(task.kind(), SinkErrorKind::Stop);
        assert!(task.to_string().contains("a bug in wal2cache"), "{task}");
    }

    #[tokio::test]
    async fn a_panicked_task_is_named_with_its_message() {
        let e = tokio::spawn(async { panic!("the sink fell over") })
            .await
            .unwrap_err();
        match SinkError::task("kafka", e) {
            SinkError::Task { sink, what, detail } => {
                assert_eq!((sink, what), ("kafka", "panicked"));
                assert_eq!(detail, "the sink fell over");
            }
            other => panic!("{other:?}"),
        }
    }
}
