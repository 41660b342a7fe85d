//! What wal2cache remembers about its stream, kept in Redis beside the caches (one
//! small key per source `name`): read at start, written before each confirmation.

use std::time::Duration;

use redis::AsyncCommands;

use crate::config::RedisConfig;
use crate::redact::redact;
use crate::sink::{SinkError, SinkErrorKind};
use crate::source::identity::Remembered;

use super::{access, cluster, connect_single, Conn};

/// The key of a source's record: `wal2cache:{NAME}:stream` (the braces keep it in one
/// cluster slot whatever the name).
pub fn state_key(name: &str) -> String {
    format!("wal2cache:{{{name}}}:stream")
}

/// The record of one source, on its own connection.
/// The hash of the republish rules `rules.backfill = "new"` has backfilled: rule name
/// → fingerprint of its shape. Same hash tag as the stream record.
pub fn backfilled_key(name: &str) -> String {
    format!("wal2cache:{{{name}}}:backfilled")
}

pub struct StreamState {
    conn: Conn,
    key: String,
    backfilled: String,
    url: String,
}

impl StreamState {
    pub async fn connect(config: &RedisConfig, name: &str) -> Result<StreamState, SinkError> {
        let conn = if config.cluster {
            Conn::Cluster(cluster::connect_cluster(config).await?)
        } else {
            Conn::Single(connect_single(config).await?)
        };
        Ok(StreamState {
            conn,
            key: state_key(name),
            backfilled: backfilled_key(name),
            url: redact(&config.url),
        })
    }

    fn error(&self, what: &str, e: redis::RedisError) -> SinkError {
        SinkError::redis(
            format!(
                "{what} the stream record {} at {}: {e}; {}",
                self.key,
                self.url,
                access::hint(
                    &format!("{e:?}"),
                    "check that Redis runs and accepts reads and writes"
                )
            ),
            Some(e),
            SinkErrorKind::Retry,
        )
    }

    /// The record, or `None` when there is none. A record that cannot be read as one
    /// (written by something else) counts as none, with a warning.
    pub async fn read(&mut self) -> Result<Option<Remembered>, SinkError> {
        let raw: Option<String> = self
            .conn
            .get(&self.key)
            .await
            .map_err(|e| self.error("reading", e))?;
        let Some(raw) = raw else { return Ok(None) };
        match serde_json::from_str(&raw) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "the stream record in Redis is not one wal2cache wrote; treating it as absent");
                Ok(None)
            }
        }
    }

    /// Writes the record (no expiry: it must outlive any outage).
    pub async fn write(&mut self, record: &Remembered) -> Result<(), SinkError> {
        let json = serde_json::to_string(record).expect("a record serializes");
        let written: Result<(), _> = tokio::time::timeout(
            Duration::from_secs(30),
            self.conn.set::<_, _, ()>(&self.key, json),
        )
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "no answer within 30 s",
            )))
        });
        written.map_err(|e| self.error("writing", e))
    }

    /// The backfilled rules: name → fingerprint.
    pub async fn backfilled(
        &mut self,
    ) -> Result<std::collections::HashMap<String, String>, SinkError> {
        let key = self.backfilled.clone();
        self.conn
            .hgetall(&key)
            .await
            .map_err(|e| self.error(&format!("reading {key} beside"), e))
    }

    /// Records that `rule` was backfilled with this shape.
    pub async fn mark_backfilled(
        &mut self,
        rule: &str,
        fingerprint: &str,
    ) -> Result<(), SinkError> {
        let key = self.backfilled.clone();
        self.conn
            .hset::<_, _, _, ()>(&key, rule, fingerprint)
            .await
            .map_err(|e| self.error(&format!("writing {key} beside"), e))
    }

    /// Forgets every backfill (after a flush: the caches are cold again).
    pub async fn forget_backfilled(&mut self) -> Result<(), SinkError> {
        let key = self.backfilled.clone();
        self.conn
            .del::<_, ()>(&key)
            .await
            .map_err(|e| self.error(&format!("deleting {key} beside"), e))
    }
}
