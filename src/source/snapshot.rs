//! A snapshot of the database whose position in the WAL is known: a temporary logical
//! slot created over the replication protocol with an exported snapshot. Sessions read
//! under it with `SET TRANSACTION SNAPSHOT`; every transaction they cannot see commits
//! at or after the slot's consistent point. The snapshot lives as long as the
//! replication connection stays open and idle (the slot goes with it).

use std::time::Duration;

use pgwire_replication::ReplicationClient;
use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::source::error::{pg, SourceError};
use crate::source::target::PgTarget;

/// An exported snapshot and the connection that holds it.
pub struct Snapshot {
    /// Kept open, and idle, until the readers are done.
    holder: ReplicationClient,
    /// Where the slot became consistent: see `backfill::version`.
    pub consistent_point: Lsn,
    /// For `SET TRANSACTION SNAPSHOT`.
    pub name: String,
    /// The server the snapshot is on (the primary, when `postgres.url` lists several).
    pub target: PgTarget,
}

impl Snapshot {
    /// Creates the temporary slot `slot` (`wal2cache_backfill_<pid>`) with an exported
    /// snapshot on the primary.
    pub async fn export(target: &PgTarget, slot: &str) -> Result<Snapshot, SourceError> {
        let (t, config) = target.replication(slot, "unused").await?;
        let err = |e| t.replication_error(e, slot);
        let config = config
            .with_status_interval(Duration::from_secs(10))
            .with_application_name("wal2cache backfill".to_string());
        let mut holder = ReplicationClient::connect_gated(config)
            .await
            .map_err(err)?;
        // The pre-15 spelling, which 15 to 18 still take.
        let rows = holder
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"
            ))
            .await
            .map_err(err)?;
        let field = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i).cloned().flatten())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        let (Some(point), Some(name)) = (field(1), field(2)) else {
            return Err(SourceError::Protocol(format!(
                "CREATE_REPLICATION_SLOT answered without a consistent point and a snapshot name: {rows:?}"
            )));
        };
        let consistent_point = point.parse().map_err(|_| {
            SourceError::Protocol(format!(
                "CREATE_REPLICATION_SLOT: consistent point {point:?}"
            ))
        })?;
        Ok(Snapshot {
            holder,
            consistent_point,
            name,
            target: t,
        })
    }

    /// A connection reading under the snapshot: a REPEATABLE READ, READ ONLY
    /// transaction that imported it, with `statement_timeout` set.
    pub async fn reader(&self, statement_timeout: Duration) -> Result<Client, SourceError> {
        let client = self.target.connect().await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
                 SET TRANSACTION SNAPSHOT '{}';
                 SET LOCAL statement_timeout = {};",
                self.name.replace('\'', "''"),
                statement_timeout.as_millis()
            ))
            .await
            .map_err(pg("importing the backfill's snapshot"))?;
        Ok(client)
    }

    /// Closes the connection that held the snapshot; the temporary slot goes with it.
    /// A hard close: the session never started streaming, so a graceful stop would
    /// wait on a worker that is still gated.
    pub fn release(mut self) {
        self.holder.abort();
    }
}
