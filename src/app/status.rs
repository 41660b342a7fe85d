//! `wal2cache status`: the slot and the stream record, read without a running daemon.

use crate::config::Config;
use crate::error::Error;
use crate::lsn::Lsn;
use crate::sink::redis::StreamState;
use crate::source::identity::Remembered;
use crate::source::monitor;

/// `wal2cache status`: the slot as the database sees it, who streams from it, and the
/// stream record in Redis, without a running daemon.
#[derive(Debug)]
pub struct StatusReport {
    pub server: String,
    pub slot_name: String,
    pub slot: crate::health::SlotReport,
    /// Who streams from the slot (`pg_stat_replication`), when someone does.
    pub holder: Option<String>,
    /// The stream record, or why it could not be read.
    pub record: Result<Option<Remembered>, String>,
}

impl StatusReport {
    /// A process streams from the slot.
    pub fn streaming(&self) -> bool {
        self.slot.active_pid.is_some()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let s = &self.slot;
        serde_json::json!({
            "server": self.server,
            "slot_name": self.slot_name,
            "exists": s.exists,
            "streaming": self.streaming(),
            "active_pid": s.active_pid,
            "holder": self.holder,
            "server_lsn": s.server_lsn.map(|l| l.to_string()),
            "confirmed_flush_lsn": s.confirmed_lsn.map(|l| l.to_string()),
            "restart_lsn": s.restart_lsn.map(|l| l.to_string()),
            "lag_bytes": s.lag_bytes(),
            "retained_wal_bytes": s.retained_bytes(),
            "wal_status": s.wal_status,
            "safe_wal_size": s.safe_wal_bytes,
            "record": match &self.record {
                Ok(Some(r)) => serde_json::json!({
                    "confirmed": r.confirmed.to_string(),
                    "slot": r.slot,
                    "system_identifier": r.server.system_identifier,
                    "timeline": r.server.timeline,
                }),
                Ok(None) => serde_json::Value::Null,
                Err(e) => serde_json::json!({"error": e}),
            },
        })
    }
}

impl std::fmt::Display for StatusReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.slot;
        let lsn = |l: Option<Lsn>| l.map_or("-".to_string(), |l| l.to_string());
        if !s.exists {
            writeln!(
                f,
                "slot {:?} on {}: does not exist",
                self.slot_name, self.server
            )?;
            writeln!(f, "  nothing streams: `wal2cache run` (with postgres.create) or `wal2cache setup` creates it")?;
        } else {
            writeln!(
                f,
                "slot {:?} on {}: wal_status {}",
                self.slot_name,
                self.server,
                s.wal_status.as_deref().unwrap_or("-")
            )?;
            match (s.active_pid, &self.holder) {
                (Some(pid), Some(h)) => writeln!(f, "  streaming: PID {pid}, {h}")?,
                (Some(pid), None) => writeln!(f, "  streaming: PID {pid}")?,
                (None, _) => writeln!(f, "  NOT streaming: no process reads the slot; the server keeps its WAL until one does")?,
            }
            writeln!(
                f,
                "  confirmed_flush_lsn {}, server at {} ({} bytes behind)",
                lsn(s.confirmed_lsn),
                lsn(s.server_lsn),
                s.lag_bytes().map_or("-".into(), |b| b.to_string())
            )?;
            writeln!(
                f,
                "  retained WAL {} bytes (restart_lsn {}); safe_wal_size {}",
                s.retained_bytes().map_or("-".into(), |b| b.to_string()),
                lsn(s.restart_lsn),
                s.safe_wal_bytes
                    .map_or("unlimited (no max_slot_wal_keep_size)".into(), |b| format!(
                        "{b} bytes"
                    ))
            )?;
        }
        match &self.record {
            Ok(Some(r)) => writeln!(
                f,
                "  stream record in Redis: confirmed {} on slot {:?}, timeline {}, system {}",
                r.confirmed, r.slot, r.server.timeline, r.server.system_identifier
            ),
            Ok(None) => writeln!(
                f,
                "  stream record in Redis: none (wal2cache has not streamed with this name)"
            ),
            Err(e) => writeln!(f, "  stream record in Redis: could not be read: {e}"),
        }
    }
}

/// `wal2cache status`: reads the slot from the database and the stream record from
/// Redis; needs no running daemon.
pub async fn status(config: &Config) -> Result<StatusReport, Error> {
    let target = config.pg_target();
    let client = target.connect().await?;
    let slot = monitor::slot_report(&client, &config.postgres.slot).await?;
    let holder = match slot.active_pid {
        Some(pid) => monitor::slot_holder(&client, pid).await?,
        None => None,
    };
    let record = async {
        let (redis_config, _) = config.sinks()?;
        let mut state = StreamState::connect(redis_config, &config.name).await?;
        Ok::<_, Error>(state.read().await?)
    };
    let record = match tokio::time::timeout(std::time::Duration::from_secs(10), record).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("Redis did not answer within 10 s".into()),
    };
    Ok(StatusReport {
        server: target.display(),
        slot_name: config.postgres.slot.clone(),
        slot,
        holder,
        record,
    })
}
