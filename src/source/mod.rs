//! The source: the replication connection, our pgoutput decoder, the relation cache
//! and typed row changes with their commit boundaries. The publication and the slot
//! are ensured over an ordinary connection; the stream confirms a position only when
//! the pipeline says so.

pub mod catalog;
pub mod change;
pub mod error;
pub mod pgoutput;
pub mod relations;
pub mod slot;
pub mod stream;
pub mod table;
pub mod value;

pub use change::{Change, CommitInfo, Op, Relation, Row, SourceEvent, TxnInfo, Value};
pub use error::{ErrorKind, SourceError};
pub use slot::{PgTarget, SetupPlan, SetupReport};
pub use stream::{Confirmer, Source, StreamConfig};
pub use table::TableName;

/// Postgres timestamps count microseconds from 2000-01-01 UTC.
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A Postgres timestamp as RFC 3339 with microseconds: `2026-11-23T09:30:00.123456Z`.
pub fn format_pg_time(micros_since_2000: i64) -> String {
    let unix = micros_since_2000.saturating_add(PG_EPOCH_UNIX_MICROS);
    match chrono::DateTime::from_timestamp_micros(unix) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        None => format!("invalid timestamp {micros_since_2000}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_commit_times() {
        assert_eq!(super::format_pg_time(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(
            super::format_pg_time(1_500_001),
            "2000-01-01T00:00:01.500001Z"
        );
    }
}
