//! `wal2cache invalidate`: a cache operation written to the WAL.

use crate::config::Config;
use crate::error::Error;
use crate::lsn::Lsn;
use crate::source::monitor;

/// What `wal2cache invalidate` asks for.
#[derive(Debug, Clone, Default)]
pub struct Invalidation {
    pub keys: Vec<String>,
    pub tags: Vec<String>,
    /// Everything the rules cache, and every subscriber (`flush_all`, reason `manual`).
    pub all: bool,
    pub reason: Option<String>,
    /// Write the message even when no process streams from the slot.
    pub force: bool,
}

/// Why `wal2cache invalidate` wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum InvalidateError {
    #[error("nothing to invalidate: give --key, --tag or --all")]
    Nothing,
    #[error("no process streams from replication slot {slot:?} on {server}{}, so nothing would apply the invalidation now (the slot keeps it: it is applied when wal2cache streams again): start `wal2cache run`, or pass --force to write it anyway", if *.exists { "" } else { " (the slot does not exist)" })]
    NotStreaming {
        slot: String,
        server: String,
        exists: bool,
    },
}

/// `wal2cache invalidate`: writes a transactional logical message (prefix `wal2cache`)
/// that the daemon applies like any change: ordered with the data, to Redis and every
/// subscriber, at least once. Refuses (exit 5) when no process streams from the slot,
/// unless `force`. Returns the message's LSN.
pub async fn invalidate(config: &Config, what: &Invalidation) -> Result<Lsn, Error> {
    if what.keys.is_empty() && what.tags.is_empty() && !what.all {
        return Err(Error::Invalidate(InvalidateError::Nothing));
    }
    let target = config.pg_target();
    let client = target.connect().await?;
    if !what.force {
        let slot = monitor::slot_report(&client, &config.postgres.slot).await?;
        if slot.active_pid.is_none() {
            return Err(Error::Invalidate(InvalidateError::NotStreaming {
                slot: config.postgres.slot.clone(),
                server: target.display(),
                exists: slot.exists,
            }));
        }
    }
    let content = if what.all {
        serde_json::json!({"all": true, "reason": what.reason})
    } else {
        serde_json::json!({"keys": what.keys, "tags": what.tags})
    };
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1, $2)::text",
            &[
                &crate::source::messages::MESSAGE_PREFIX,
                &content.to_string(),
            ],
        )
        .await
        .map_err(crate::source::error::pg("writing the invalidation message"))?;
    let lsn: String = row.get(0);
    tracing::info!(lsn = %lsn, keys = what.keys.len(), tags = what.tags.len(), all = what.all, "invalidation written to the WAL");
    Ok(lsn.parse().unwrap_or(Lsn::ZERO))
}
