//! The logical messages wal2cache writes into the WAL or acts on, and the task that
//! writes its heartbeats.

use std::time::Duration;

use tokio::sync::watch;

use crate::source::PgTarget;

/// The prefix of logical messages that invalidate keys and tags
/// (`wal2cache.invalidate(...)` in migrations/).
pub const MESSAGE_PREFIX: &str = "wal2cache";

/// The prefix of the messages `wal_heartbeats` writes into the WAL.
pub const HEARTBEAT_PREFIX: &str = "wal2cache.heartbeat";

/// The prefix of the marker a reload writes in the transaction that adds its tables to
/// the publication: the new rules take effect where the stream reaches it.
pub const RELOAD_PREFIX: &str = "wal2cache.reload";

/// The prefix of the messages that say a rules' table was missing from the
/// publication and has been added back (see `source::membership`): what its rules
/// cache is invalidated as by a TRUNCATE.
pub const UNPUBLISHED_PREFIX: &str = "wal2cache.unpublished";

/// Writes a non-transactional heartbeat message into the WAL every `every`, until
/// `stop`, so that an idle slot's position can move on with the server's WAL.
/// Connection errors are retried quietly: the heartbeat is an optimisation.
pub async fn wal_heartbeats(target: PgTarget, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut client = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if client.is_none() {
            client = tokio::select! {
                c = target.connect() => c.ok(),
                _ = stop.wait_for(|s| *s) => return,
            };
        }
        let Some(c) = &client else { continue };
        let written = tokio::select! {
            r = c.execute("SELECT pg_logical_emit_message(false, $1, '')", &[&HEARTBEAT_PREFIX]) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        if let Err(e) = written {
            tracing::debug!(error = %e, "WAL heartbeat failed; reconnecting");
            client = None;
        }
    }
}
