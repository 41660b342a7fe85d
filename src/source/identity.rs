//! Which server and which slot the stream reads, and whether changes may have been
//! missed since wal2cache last confirmed a position (invariant 6, "slot loss is loud").
//!
//! wal2cache remembers, outside Postgres (in Redis, beside the caches it keeps), the
//! slot, the server's `system_identifier`, its timeline and the last position it
//! confirmed. It writes that record before it confirms the position to Postgres, so
//! the slot's `confirmed_flush_lsn` is never ahead of it unless something else moved
//! the slot. At start, and on every reconnect, [`detect`] compares the record with
//! what the server says now.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::source::error::{pg, SourceError};
use crate::source::target::PgTarget;

/// The server as it identifies itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerIdentity {
    /// `pg_control_system().system_identifier`, as text (a u64): a different value is
    /// a different cluster (another database, or a backup restored into a new one).
    pub system_identifier: String,
    /// The timeline the server writes WAL on: a promotion moves it.
    pub timeline: u32,
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub confirmed: Option<Lsn>,
    /// `wal_status`: `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// A failover slot (17 and later).
    pub failover: bool,
    /// Synchronized from a primary (17 and later): true on a promoted standby's slot.
    pub synced: bool,
    /// Why the server invalidated the slot (`invalidation_reason`, 17 and later):
    /// `wal_removed`, `rows_removed`, `wal_level_insufficient`, `idle_timeout` (18).
    pub invalidation_reason: Option<String>,
}

impl SlotState {
    /// The slot can no longer stream: the server invalidated it. Every invalidation
    /// shows as `wal_status = lost` (on 14 and 15 only the WAL removal exists).
    pub fn invalidated(&self) -> bool {
        self.wal_status.as_deref() == Some("lost") || self.invalidation_reason.is_some()
    }

    /// What invalidated the slot, and the setting behind it, for people.
    fn invalidation(&self) -> String {
        match self.invalidation_reason.as_deref() {
            Some("idle_timeout") => "invalidation_reason = idle_timeout: the slot was unused for longer than idle_replication_slot_timeout".into(),
            Some("wal_removed") => "invalidation_reason = wal_removed: the server removed WAL the slot still needed (max_slot_wal_keep_size)".into(),
            Some("rows_removed") => "invalidation_reason = rows_removed: catalog rows the slot needed were removed (a slot on a standby without hot_standby_feedback)".into(),
            Some("wal_level_insufficient") => "invalidation_reason = wal_level_insufficient: wal_level was lowered below logical".into(),
            Some(other) => format!("invalidation_reason = {other}"),
            None => "wal_status = lost: the server removed WAL the slot still needed (max_slot_wal_keep_size, or idle_replication_slot_timeout on 18)".into(),
        }
    }
}

/// What wal2cache remembers about the stream it last confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub slot: String,
    #[serde(flatten)]
    pub server: ServerIdentity,
    /// The last position confirmed (or about to be) to Postgres.
    pub confirmed: Lsn,
}

/// Why changes may have been missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReason {
    /// The slot does not exist.
    SlotMissing,
    /// The slot exists but the server invalidated it (`wal_status = lost`): it removed
    /// WAL the slot needed, or (17 and later) another `invalidation_reason`, such as
    /// `idle_timeout` on 18.
    WalLost,
    /// The slot is ahead of what wal2cache confirmed: recreated, or advanced by hand.
    SlotAhead,
    /// A different cluster answers (`system_identifier` changed).
    NewSystem,
    /// The server is on another timeline (promoted) and the slot was not carried over
    /// by failover-slot synchronization.
    Timeline,
}

impl LossReason {
    pub const ALL: [LossReason; 5] = [
        LossReason::SlotMissing,
        LossReason::WalLost,
        LossReason::SlotAhead,
        LossReason::NewSystem,
        LossReason::Timeline,
    ];

    /// The label of `wal2cache_slot_losses_total` and the start of an event's detail.
    pub fn label(self) -> &'static str {
        match self {
            LossReason::SlotMissing => "slot_missing",
            LossReason::WalLost => "wal_lost",
            LossReason::SlotAhead => "slot_ahead",
            LossReason::NewSystem => "system_identifier",
            LossReason::Timeline => "timeline",
        }
    }
}

/// Changes may have been missed: why, and the facts, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    pub reason: LossReason,
    pub detail: String,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.label(), self.detail)
    }
}

/// Compares what wal2cache remembers with the server and the slot now. `None` when
/// nothing can have been missed: the record and the server agree, or there is no
/// record (a first start, or a Redis that lost its data, and with it everything it
/// cached) and the slot, if any, can stream. An invalidated slot is a loss even without
/// a record: it can never stream again, and what it held back is gone. Order matters:
/// a different cluster makes every other comparison meaningless.
pub fn detect(
    remembered: Option<&Remembered>,
    server: &ServerIdentity,
    slot_name: &str,
    slot: Option<&SlotState>,
) -> Option<Loss> {
    let loss = |reason, detail: String| Some(Loss { reason, detail });
    let Some(r) = remembered else {
        return match slot {
            Some(s) if s.invalidated() => loss(
                LossReason::WalLost,
                format!(
                    "replication slot {slot_name:?} is invalidated ({}), and Redis holds no record of what wal2cache confirmed on it",
                    s.invalidation()
                ),
            ),
            _ => None,
        };
    };
    if r.server.system_identifier != server.system_identifier {
        return loss(
            LossReason::NewSystem,
            format!(
                "the server's system_identifier is {}, but wal2cache last confirmed {} on system {}: another cluster (a restored backup, or another database) answers at postgres.url",
                server.system_identifier, r.confirmed, r.server.system_identifier
            ),
        );
    }
    let Some(s) = slot else {
        return loss(
            LossReason::SlotMissing,
            format!(
                "replication slot {slot_name:?} does not exist (wal2cache last confirmed {} on slot {:?}, timeline {}): it was dropped, or the server was promoted without it",
                r.confirmed, r.slot, r.server.timeline
            ),
        );
    };
    if s.invalidated() {
        return loss(
            LossReason::WalLost,
            format!(
                "replication slot {slot_name:?} is invalidated ({}), after wal2cache confirmed {}",
                s.invalidation(),
                r.confirmed
            ),
        );
    }
    if r.server.timeline != server.timeline && !(s.failover && s.synced) {
        return loss(
            LossReason::Timeline,
            format!(
                "the server moved from timeline {} to {} (a promotion) and slot {slot_name:?} was not synchronized from the old primary (failover = {}, synced = {})",
                r.server.timeline, server.timeline, s.failover, s.synced
            ),
        );
    }
    // Behind is a replay (the record is written before each confirmation); ahead, the
    // slot moved without wal2cache: recreated, advanced, or a different slot.
    if let Some(confirmed) = s.confirmed {
        if confirmed > r.confirmed {
            let what = if r.slot == slot_name {
                "recreated or advanced without wal2cache".to_string()
            } else {
                format!("postgres.slot was {:?} before", r.slot)
            };
            return loss(
                LossReason::SlotAhead,
                format!(
                    "replication slot {slot_name:?} is at {confirmed}, ahead of the {} wal2cache last confirmed ({what}): the changes in between were never read",
                    r.confirmed
                ),
            );
        }
    }
    None
}

/// The server as it identifies itself and the slot as it stands: what [`detect`]
/// compares with the record.
pub async fn observe(
    client: &Client,
    target: &PgTarget,
    slot: &str,
) -> Result<(ServerIdentity, Option<SlotState>), SourceError> {
    let version = crate::source::catalog::server_version(client).await?;
    let server = server_identity(client, target).await?;
    let slot = slot_state(client, slot, version.num).await?;
    Ok((server, slot))
}

/// The server's `system_identifier` and the timeline it writes on. The timeline comes
/// from the name of the current WAL file (its first 8 hex digits): on a primary that
/// is the insert timeline, right after a promotion too (`pg_control_checkpoint` only
/// shows it after the next checkpoint).
pub async fn server_identity(
    client: &Client,
    target: &PgTarget,
) -> Result<ServerIdentity, SourceError> {
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()),
                    CASE WHEN pg_is_in_recovery() THEN NULL
                         ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END",
            &[],
        )
        .await
        .map_err(pg("reading the server's system_identifier and timeline"))?;
    let system_identifier: String = row.get(0);
    let timeline: Option<String> = row.get(1);
    let Some(timeline) = timeline else {
        return Err(SourceError::InRecovery {
            server: target.display(),
        });
    };
    let timeline =
        u32::from_str_radix(&timeline, 16).map_err(|_| SourceError::Timeline(timeline.clone()))?;
    Ok(ServerIdentity {
        system_identifier,
        timeline,
    })
}

/// The slot's state, or `None` when it does not exist. `version` decides which
/// columns exist (`failover` and `synced` from 17 on).
pub async fn slot_state(
    client: &Client,
    slot: &str,
    version: i32,
) -> Result<Option<SlotState>, SourceError> {
    let sql = if version >= 170_000 {
        "SELECT confirmed_flush_lsn::text, wal_status, failover, synced, invalidation_reason FROM pg_replication_slots WHERE slot_name = $1"
    } else {
        "SELECT confirmed_flush_lsn::text, wal_status, false, false, NULL::text FROM pg_replication_slots WHERE slot_name = $1"
    };
    let row = client
        .query_opt(sql, &[&slot])
        .await
        .map_err(pg("reading pg_replication_slots"))?;
    Ok(row.map(|row| SlotState {
        confirmed: row.get::<_, Option<String>>(0).and_then(|s| s.parse().ok()),
        wal_status: row.get(1),
        failover: row.get(2),
        synced: row.get(3),
        invalidation_reason: row.get(4),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str, timeline: u32) -> ServerIdentity {
        ServerIdentity {
            system_identifier: id.into(),
            timeline,
        }
    }

    fn remembered(confirmed: u64) -> Remembered {
        Remembered {
            slot: "w2c".into(),
            server: server("7000", 1),
            confirmed: Lsn(confirmed),
        }
    }

    fn slot(confirmed: u64) -> SlotState {
        SlotState {
            confirmed: Some(Lsn(confirmed)),
            wal_status: Some("reserved".into()),
            failover: false,
            synced: false,
            invalidation_reason: None,
        }
    }

    fn reason(loss: Option<Loss>) -> Option<&'static str> {
        loss.map(|l| l.reason.label())
    }

    #[test]
    fn nothing_remembered_is_a_first_start() {
        assert_eq!(detect(None, &server("7000", 1), "w2c", None), None);
        assert_eq!(
            detect(None, &server("7000", 1), "w2c", Some(&slot(900))),
            None
        );
    }

    #[test]
    fn an_invalidated_slot_is_a_loss_even_without_a_record() {
        let mut idle = slot(400);
        idle.wal_status = Some("lost".into());
        idle.invalidation_reason = Some("idle_timeout".into());
        let loss = detect(None, &server("7000", 1), "w2c", Some(&idle)).unwrap();
        assert_eq!(loss.reason, LossReason::WalLost);
        assert!(
            loss.detail.contains("idle_replication_slot_timeout"),
            "{}",
            loss.detail
        );
        let with_record = detect(
            Some(&remembered(500)),
            &server("7000", 1),
            "w2c",
            Some(&idle),
        );
        assert!(
            with_record.unwrap().detail.contains("idle_timeout"),
            "the detail names the server's reason"
        );
    }

    #[test]
    fn a_slot_at_or_behind_the_record_is_a_replay() {
        let r = remembered(500);
        for at in [100, 500] {
            assert_eq!(
                detect(Some(&r), &server("7000", 1), "w2c", Some(&slot(at))),
                None
            );
        }
    }

    #[test]
    fn each_condition_names_its_reason() {
        let r = remembered(500);
        let s = server("7000", 1);
        assert_eq!(
            reason(detect(Some(&r), &s, "w2c", None)),
            Some("slot_missing")
        );
        let mut lost = slot(400);
        lost.wal_status = Some("lost".into());
        assert_eq!(
            reason(detect(Some(&r), &s, "w2c", Some(&lost))),
            Some("wal_lost")
        );
        let ahead = detect(Some(&r), &s, "w2c", Some(&slot(900))).unwrap();
        assert_eq!(ahead.reason, LossReason::SlotAhead);
        assert!(ahead.detail.contains("0/384"), "{}", ahead.detail);
        assert!(ahead.detail.contains("0/1F4"), "{}", ahead.detail);
        assert_eq!(
            reason(detect(
                Some(&r),
                &server("7001", 1),
                "w2c",
                Some(&slot(100))
            )),
            Some("system_identifier")
        );
        assert_eq!(
            reason(detect(
                Some(&r),
                &server("7000", 2),
                "w2c",
                Some(&slot(100))
            )),
            Some("timeline")
        );
    }

    #[test]
    fn a_new_system_outranks_everything_else() {
        let r = remembered(500);
        assert_eq!(
            reason(detect(Some(&r), &server("8000", 3), "w2c", None)),
            Some("system_identifier")
        );
    }

    #[test]
    fn a_synced_failover_slot_survives_a_promotion() {
        let r = remembered(500);
        let mut synced = slot(450);
        synced.failover = true;
        synced.synced = true;
        assert_eq!(
            detect(Some(&r), &server("7000", 2), "w2c", Some(&synced)),
            None
        );
        // Synced but ahead of what we confirmed: still a loss.
        synced.confirmed = Some(Lsn(600));
        assert_eq!(
            reason(detect(Some(&r), &server("7000", 2), "w2c", Some(&synced))),
            Some("slot_ahead")
        );
    }

    #[test]
    fn a_renamed_slot_that_starts_later_is_a_loss() {
        let r = remembered(500);
        let loss = detect(Some(&r), &server("7000", 1), "other", Some(&slot(700))).unwrap();
        assert_eq!(loss.reason, LossReason::SlotAhead);
        assert!(
            loss.detail.contains("was \"w2c\" before"),
            "{}",
            loss.detail
        );
    }

    #[test]
    fn the_record_round_trips_as_json() {
        let r = remembered(0x1_0000_0042);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"system_identifier\":\"7000\""), "{json}");
        assert_eq!(serde_json::from_str::<Remembered>(&json).unwrap(), r);
    }
}
