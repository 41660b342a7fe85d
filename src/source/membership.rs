//! The publication holds tables, not names. A rule's table renamed away, dropped and
//! created again, replaced by a rename (`ALTER TABLE orders_new RENAME TO orders`),
//! or taken out of the publication by hand leaves a table under the rule's name whose
//! changes the server does not stream; so does an inheritance child created later. The
//! daemon looks for such tables every `metrics.slot_poll`, adds them to the
//! publication (with `postgres.create`), and invalidates what their unstreamed changes
//! may have left stale, in the WAL's order:
//!
//! 1. In the transaction of the `ALTER PUBLICATION … ADD`, a transactional message
//!    (`UNPUBLISHED_PREFIX`) naming the rules' tables. The pipeline plans it as a
//!    TRUNCATE of each (the rules' `truncate_tags`, or their key prefixes and a
//!    `flush_all` with `reason = "unpublished"`). Every change committed before that
//!    transaction comes before the message in the stream.
//! 2. A transaction in progress when the table was added may have written to it
//!    before: those changes are not streamed either, and it commits after the first
//!    message. So once every transaction in progress just after the addition has
//!    ended (those of `pg_current_snapshot()` read after the commit; any that ended
//!    before it committed before now too), the message is written once more.
//!    Changes written after the addition are streamed.
//!
//! A table whose members lack a replica identity is not added (PostgreSQL would then
//! refuse the application's UPDATE and DELETE on it), and without `postgres.create`
//! nothing is added: both are logged as errors with the fix and counted in
//! `wal2cache_tables_not_published`, until the table is published.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres_protocol::escape::escape_identifier;
use tokio::sync::{watch, Mutex, Notify};
use tokio_postgres::Client;

use crate::source::catalog::{self, ToPublish};
use crate::source::error::{pg, SourceError};
use crate::source::messages::UNPUBLISHED_PREFIX;
use crate::source::slot;
use crate::source::table::TableName;
use crate::source::target::PgTarget;

/// How long the transactions in progress at an addition may run before the log says
/// that the second invalidation waits for them.
const WARN_AFTER: Duration = Duration::from_secs(60);

/// What the watch needs to know.
pub struct MembershipWatch {
    pub target: PgTarget,
    pub publication: String,
    /// `postgres.create`: add missing tables (otherwise only report them).
    pub create: bool,
    pub poll: Duration,
    /// Held while the publication is read and changed, so that a reload (SIGHUP) and
    /// the watch do not add the same table at once.
    pub lock: Arc<Mutex<()>>,
    /// Look now (a reload found a table missing).
    pub wake: Arc<Notify>,
}

/// The content of an `UNPUBLISHED_PREFIX` message: the rules' tables whose changes
/// were not all streamed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Unpublished {
    pub tables: Vec<String>,
    pub publication: String,
}

impl Unpublished {
    /// The `detail` of the invalidation it leads to.
    pub fn detail(&self, table: &str) -> String {
        format!(
            "{table} was not in publication {:?} (renamed, dropped and created again, or taken out of it?): wal2cache added it back; its changes before that were not streamed",
            self.publication
        )
    }
}

/// What one look found.
#[derive(Debug, Default)]
struct Found {
    /// To add, with the rule's table each is for.
    add: Vec<ToPublish>,
    /// Not to be added, and why (with the fix).
    refused: Vec<(TableName, String)>,
}

/// An addition whose second invalidation waits for the transactions in progress
/// just after it.
struct Pending {
    /// `pg_current_snapshot()` read after the addition's commit.
    snapshot: String,
    /// The message to write again.
    message: String,
    tables: String,
    since: Instant,
    warned: bool,
}

/// How often a pending second invalidation looks whether it may be written.
const PENDING_POLL: Duration = Duration::from_millis(100);

impl MembershipWatch {
    /// Runs until `stop`: at once, then every `poll` and when woken, while `active()`
    /// (this process is not a standby waiting for the slot), the tables `tables()`
    /// names (the rules in force) are compared with the publication. `looked` turns
    /// true after the first look (whatever it found), or the first round skipped. Errors are logged once and
    /// retried at the next poll.
    pub async fn run(
        self,
        tables: impl Fn() -> Vec<TableName> + Send,
        active: impl Fn() -> bool + Send,
        looked: watch::Sender<bool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut client: Option<Client> = None;
        let mut tick = tokio::time::interval(self.poll.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_report = String::new();
        let mut pending: Vec<Pending> = Vec::new();
        loop {
            let mut round = false;
            tokio::select! {
                _ = tick.tick() => round = true,
                _ = self.wake.notified() => round = true,
                _ = tokio::time::sleep(PENDING_POLL), if !pending.is_empty() => {}
                _ = stop.wait_for(|s| *s) => {
                    for p in &pending {
                        tracing::warn!(snapshot = %p.snapshot, "stopping before the second invalidation of {}: a transaction in progress when it was added to the publication may have written to it unstreamed; if one did, flush what its rules cache (wal2cache invalidate --all)", p.tables);
                    }
                    return;
                }
            }
            let attempt = async {
                if round && pending.is_empty() && !active() {
                    // A standby leaves the publication to the active process.
                    return Ok(Some(String::new()));
                }
                if client.as_ref().is_none_or(Client::is_closed) {
                    client = Some(self.target.connect().await?);
                }
                let client = client.as_mut().expect("connected above");
                finish(client, &mut pending).await?;
                if !round {
                    return Ok(None);
                }
                if !active() {
                    // A standby leaves the publication to the active process.
                    return Ok(Some(String::new()));
                }
                let _held = self.lock.lock().await;
                self.round(client, &tables(), &mut pending).await.map(Some)
            };
            let report = tokio::select! {
                r = attempt => match r {
                    Ok(None) => continue,
                    Ok(Some(report)) => report,
                    Err(e) => {
                        client = None;
                        format!("could not compare the rules' tables with publication {:?}: {e}", self.publication)
                    }
                },
                _ = stop.wait_for(|s| *s) => return,
            };
            looked.send_replace(true);
            // Said once, not every poll.
            if report != last_report && !report.is_empty() {
                tracing::error!("{report}");
            }
            last_report = report;
        }
    }

    /// One look, and the additions it calls for. Returns what is still wrong (empty
    /// when nothing is).
    async fn round(
        &self,
        client: &mut Client,
        tables: &[TableName],
        pending: &mut Vec<Pending>,
    ) -> Result<String, SourceError> {
        let found = self.look(client, tables).await?;
        let mut problems: Vec<String> = found
            .refused
            .iter()
            .map(|(t, why)| format!("{t}: {why}"))
            .collect();
        let mut not_published = found.refused.len();
        if !found.add.is_empty() {
            if self.create {
                pending.push(self.add(client, &found.add).await?);
            } else {
                not_published += found.add.len();
                problems.push(format!(
                    "{} {} not in publication {:?} (renamed, dropped and created again, or taken out of it?), and postgres.create is false: {} changes are not streamed and the caches they feed go stale. Fix: ALTER PUBLICATION {} ADD {}; then flush what they cache (wal2cache invalidate --all)",
                    names(&found.add),
                    if found.add.len() == 1 { "is" } else { "are" },
                    self.publication,
                    if found.add.len() == 1 { "its" } else { "their" },
                    escape_identifier(&self.publication),
                    catalog::table_list(&found.add),
                ));
            }
        }
        metrics::gauge!("wal2cache_tables_not_published").set(not_published as f64);
        Ok(problems.join("; "))
    }

    /// The rules' tables (and their inheritance children) missing from the publication.
    async fn look(&self, client: &Client, tables: &[TableName]) -> Result<Found, SourceError> {
        let version = catalog::server_version(client).await?.num;
        let mut found = Found::default();
        // A missing publication stops the stream itself, with its own error.
        let Some(publ) = catalog::publication(client, &self.publication, version).await? else {
            return Ok(found);
        };
        for table in tables {
            // A table that does not exist has no changes to lose.
            let Some(info) = catalog::table_info(client, table).await? else {
                continue;
            };
            let missing = catalog::unpublished(client, Some(&publ), table, &info, version).await?;
            if missing.is_empty() {
                continue;
            }
            let unidentified = info.unidentified();
            if (publ.update || publ.delete) && !unidentified.is_empty() {
                found.refused.push((
                    table.clone(),
                    format!(
                        "not in publication {:?}, and not added: {} {} no primary key or replica identity, so PostgreSQL would refuse the application's UPDATE and DELETE once it is published. Fix: give it a primary key (or ALTER TABLE … REPLICA IDENTITY FULL); wal2cache then adds it",
                        self.publication,
                        unidentified.iter().map(|m| m.table.to_string()).collect::<Vec<_>>().join(", "),
                        if unidentified.len() == 1 { "has" } else { "have" },
                    ),
                ));
                continue;
            }
            found.add.extend(missing);
        }
        Ok(found)
    }

    /// Adds `add` to the publication with the first invalidation message; the second
    /// is pending.
    async fn add(&self, client: &mut Client, add: &[ToPublish]) -> Result<Pending, SourceError> {
        let for_tables: BTreeSet<String> = add.iter().map(|m| m.for_table.to_string()).collect();
        let tables = for_tables.iter().cloned().collect::<Vec<_>>();
        let message = serde_json::to_string(&Unpublished {
            tables: tables.clone(),
            publication: self.publication.clone(),
        })
        .expect("strings serialize");
        let context = format!(
            "adding {} back to publication {:?}",
            names(add),
            self.publication
        );
        let txn = client.transaction().await.map_err(pg(context.clone()))?;
        txn.execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&UNPUBLISHED_PREFIX, &message],
        )
        .await
        .map_err(pg(context.clone()))?;
        slot::add_to_publication(&txn, &self.publication, add).await?;
        txn.commit().await.map_err(pg(context.clone()))?;
        let snapshot: String = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(pg(context))?
            .get(0);
        metrics::counter!("wal2cache_publication_additions_total").increment(add.len() as u64);
        tracing::warn!(
            publication = %self.publication,
            tables = %names(add),
            "{} {} not in the publication (renamed, dropped and created again, or taken out of it?): added back; the changes written before were not streamed, so what the rules of {} cache is invalidated as by a TRUNCATE",
            names(add),
            if add.len() == 1 { "was" } else { "were" },
            tables.join(", "),
        );
        Ok(Pending {
            snapshot,
            message,
            tables: tables.join(", "),
            since: Instant::now(),
            warned: false,
        })
    }
}

/// Writes the second invalidation of each pending addition whose transactions in
/// progress have all ended.
async fn finish(client: &Client, pending: &mut Vec<Pending>) -> Result<(), SourceError> {
    let in_progress = "SELECT EXISTS (SELECT 1 FROM pg_snapshot_xip($1::text::pg_snapshot) x
                                       WHERE pg_xact_status(x) = 'in progress')";
    while let Some(p) = pending.first_mut() {
        let context = || format!("the second invalidation of {}", p.tables);
        let running: bool = client
            .query_one(in_progress, &[&p.snapshot])
            .await
            .map_err(pg(context()))?
            .get(0);
        if running {
            if !p.warned && p.since.elapsed() > WARN_AFTER {
                p.warned = true;
                tracing::warn!(snapshot = %p.snapshot, "transactions in progress when {} was added to the publication still run after {}s: its second invalidation waits for them to end (pg_stat_activity shows them)", p.tables, WARN_AFTER.as_secs());
            }
            return Ok(());
        }
        client
            .execute(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&UNPUBLISHED_PREFIX, &p.message],
            )
            .await
            .map_err(pg(context()))?;
        pending.remove(0);
    }
    Ok(())
}

fn names(tables: &[ToPublish]) -> String {
    tables
        .iter()
        .map(|m| m.table.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_round_trips_and_names_the_table() {
        let u = Unpublished {
            tables: vec!["public.orders".into()],
            publication: "w2c".into(),
        };
        let text = serde_json::to_string(&u).unwrap();
        assert_eq!(text, r#"{"tables":["public.orders"],"publication":"w2c"}"#);
        assert_eq!(serde_json::from_str::<Unpublished>(&text).unwrap(), u);
        assert!(u
            .detail("public.orders")
            .starts_with("public.orders was not in publication \"w2c\""));
    }
}
