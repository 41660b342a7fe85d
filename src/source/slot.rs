//! The publication and the replication slot, ensured over an ordinary connection
//! before streaming, with the preconditions checked first so a misconfigured server
//! is an error that says what to change, not a cryptic failure later.

use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::source::catalog::{self, ServerVersion, ToPublish};
use crate::source::error::{pg, SourceError};
use crate::source::table::TableName;
use crate::source::target::PgTarget;

/// What `setup` is asked to ensure.
#[derive(Debug, Clone)]
pub struct SetupPlan {
    pub publication: String,
    pub slot: String,
    /// Tables the publication must follow (with their partitions and children), each
    /// with where it was asked for (a rule), for error messages.
    pub tables: Vec<(TableName, String)>,
    /// Create what is missing; otherwise only check.
    pub create: bool,
    /// With `create`, add missing tables to an existing publication. `run` leaves that
    /// to the membership watch (`source::membership`), which also invalidates what
    /// their changes before may have left stale.
    pub extend: bool,
    /// Ensure the slot too (`tail` uses a temporary slot of its own).
    pub with_slot: bool,
    /// Create the slot as a failover slot: `None` for the server's default (17 and
    /// later: yes).
    pub failover: Option<bool>,
}

/// The first major with failover slots.
pub const FAILOVER_SLOTS_SINCE: i32 = 17;

/// Whether a new slot is to be a failover slot on `server`, as `wanted`
/// (`postgres.failover_slot`) asks.
pub fn failover_slot(wanted: Option<bool>, server: &ServerVersion) -> Result<bool, SourceError> {
    let supported = server.major() >= FAILOVER_SLOTS_SINCE;
    match wanted {
        None => Ok(supported),
        Some(true) if !supported => Err(SourceError::FailoverSlotUnsupported {
            version: server.text.clone(),
        }),
        Some(wanted) => Ok(wanted),
    }
}

/// What `ensure` found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetupReport {
    pub created_publication: bool,
    pub added_tables: Vec<String>,
    pub created_slot: bool,
    /// The slot's confirmed position (where streaming resumes).
    pub confirmed_lsn: Option<Lsn>,
}

/// Checks the server's preconditions, then ensures the publication and the slot.
/// Idempotent: a second call changes nothing.
pub async fn ensure(target: &PgTarget, plan: &SetupPlan) -> Result<SetupReport, SourceError> {
    let client = target.connect().await?;
    let version = check_preconditions(&client, target).await?;
    let mut report = SetupReport::default();
    ensure_publication(&client, target, plan, version.num, &mut report).await?;
    if plan.with_slot {
        ensure_slot(&client, target, plan, &version, &mut report).await?;
    }
    Ok(report)
}

/// A supported server (14 or later), `wal_level = logical` and a role that may
/// replicate; the server's version, for what depends on it.
pub async fn check_preconditions(
    client: &Client,
    target: &PgTarget,
) -> Result<ServerVersion, SourceError> {
    let server = target.display();
    let version = catalog::server_version(client).await?;
    tracing::info!(server, "PostgreSQL {}", version.text);
    version.require_supported(&server)?;
    let row = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(pg("reading wal_level"))?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(SourceError::WalLevel { found: wal_level });
    }
    let row = client
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(pg("reading the role's privileges"))?;
    if !row.get::<_, bool>(0) {
        return Err(SourceError::NoReplicationPrivilege {
            role: target.user.clone(),
        });
    }
    Ok(version)
}

async fn ensure_publication(
    client: &Client,
    target: &PgTarget,
    plan: &SetupPlan,
    version: i32,
    report: &mut SetupReport,
) -> Result<(), SourceError> {
    let publication = catalog::publication(client, &plan.publication, version).await?;
    let mut missing: Vec<ToPublish> = Vec::new();
    for (table, origin) in &plan.tables {
        let Some(info) = catalog::table_info(client, table).await? else {
            return Err(SourceError::MissingTable {
                table: table.to_string(),
                database: target.database.clone(),
                origin: origin.clone(),
            });
        };
        for m in catalog::unpublished(client, publication.as_ref(), table, &info, version).await? {
            if !missing.iter().any(|x| x.table == m.table) {
                missing.push(m);
            }
        }
    }
    if publication.is_none() {
        if !plan.create {
            return Err(SourceError::MissingPublication {
                publication: plan.publication.clone(),
            });
        }
        let mut sql = format!(
            "CREATE PUBLICATION {}",
            escape_identifier(&plan.publication)
        );
        if !missing.is_empty() {
            sql.push_str(&format!(" FOR {}", catalog::table_list(&missing)));
        }
        // Changes to a partition arrive under the partition's own name (and a TRUNCATE
        // of one partition is published at all); from 18, stored generated columns
        // are in the stream too.
        sql.push_str(" WITH (publish_via_partition_root = false");
        if version >= 180000 {
            sql.push_str(", publish_generated_columns = stored");
        }
        sql.push(')');
        client.batch_execute(&sql).await.map_err(pg(format!(
            "creating publication {:?} (the role must own the tables, or be superuser)",
            plan.publication
        )))?;
        tracing::info!(publication = %plan.publication, tables = missing.len(), "created publication");
        report.created_publication = true;
        return Ok(());
    }
    if missing.is_empty() || plan.create && !plan.extend {
        return Ok(());
    }
    if !plan.create {
        return Err(SourceError::TablesNotPublished {
            publication: plan.publication.clone(),
            tables: missing
                .iter()
                .map(|m| m.table.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    add_to_publication(client, &plan.publication, &missing).await?;
    report.added_tables = missing.into_iter().map(|m| m.table.to_string()).collect();
    tracing::info!(publication = %plan.publication, tables = ?report.added_tables, "added tables to publication");
    Ok(())
}

/// `ALTER PUBLICATION … ADD` the given relations, in one statement (on a client, or
/// inside a transaction).
pub async fn add_to_publication(
    client: &impl tokio_postgres::GenericClient,
    publication: &str,
    missing: &[ToPublish],
) -> Result<(), SourceError> {
    client
        .batch_execute(&format!(
            "ALTER PUBLICATION {} ADD {}",
            escape_identifier(publication),
            catalog::table_list(missing)
        ))
        .await
        .map_err(pg(format!("adding tables to publication {publication:?}")))?;
    Ok(())
}

async fn ensure_slot(
    client: &Client,
    target: &PgTarget,
    plan: &SetupPlan,
    version: &ServerVersion,
    report: &mut SetupReport,
) -> Result<(), SourceError> {
    let slot = client
        .query_opt(
            "SELECT plugin, slot_type, database, temporary, confirmed_flush_lsn::text, wal_status
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&plan.slot],
        )
        .await
        .map_err(pg("reading pg_replication_slots"))?;
    let unusable = |problem: String| SourceError::UnusableSlot {
        slot: plan.slot.clone(),
        problem,
    };
    match slot {
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let slot_type: String = row.get(1);
            let database: Option<String> = row.get(2);
            let wal_status: Option<String> = row.get(5);
            if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
                return Err(unusable(format!(
                    "is a {slot_type} slot with plugin {}, not a logical pgoutput slot",
                    plugin.as_deref().unwrap_or("none")
                )));
            }
            if database.as_deref() != Some(target.database.as_str()) {
                return Err(unusable(format!(
                    "belongs to database {:?}, not {:?}",
                    database.unwrap_or_default(),
                    target.database
                )));
            }
            if wal_status.as_deref() == Some("lost") {
                return Err(unusable(
                    "has lost WAL it needed (wal_status = lost, max_slot_wal_keep_size exceeded)"
                        .into(),
                ));
            }
            let confirmed: Option<String> = row.get(4);
            report.confirmed_lsn = confirmed.and_then(|s| s.parse().ok());
        }
        None if plan.create => {
            let failover = failover_slot(plan.failover, version)?;
            // The fifth argument (failover) exists from 17 on.
            let sql = if failover {
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
            } else {
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
            };
            let row = client
                .query_one(sql, &[&plan.slot])
                .await
                .map_err(pg(format!("creating replication slot {:?}", plan.slot)))?;
            let lsn: String = row.get(0);
            tracing::info!(slot = %plan.slot, lsn = %lsn, failover, "created replication slot");
            report.created_slot = true;
            report.confirmed_lsn = lsn.parse().ok();
        }
        None => {
            return Err(SourceError::MissingSlot {
                slot: plan.slot.clone(),
            })
        }
    }
    Ok(())
}

/// What `check` says about failover slots, as (message, fix) pairs: on 17 and later,
/// a slot wanted as a failover slot (`wanted`: `postgres.failover_slot`) that is not
/// one, and a primary whose `synchronized_standby_slots` is empty. An error when
/// `wanted` is `Some(true)` and the server is older than 17.
pub async fn failover_warnings(
    client: &Client,
    version: &ServerVersion,
    slot: &str,
    wanted: Option<bool>,
) -> Result<Vec<(String, Option<String>)>, SourceError> {
    if !failover_slot(wanted, version)? {
        return Ok(Vec::new());
    }
    let mut warnings = Vec::new();
    let row = client
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg("reading pg_replication_slots"))?;
    if let Some(row) = row {
        if !row.get::<_, bool>(0) {
            warnings.push((
                format!("slot {slot:?} is not a failover slot: a standby does not carry it across a promotion, so the new primary would have no slot for wal2cache, and the changes made before one is created again would reach no cache"),
                Some(format!(
                    "with wal2cache stopped: psql \"dbname=<database> replication=database\" -c 'ALTER_REPLICATION_SLOT {} (FAILOVER true)'; or set postgres.failover_slot = false to keep it as it is",
                    escape_identifier(slot)
                )),
            ));
        }
    }
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('synchronized_standby_slots')",
            &[],
        )
        .await
        .map_err(pg("reading synchronized_standby_slots"))?;
    let (in_recovery, standby_slots): (bool, String) = (row.get(0), row.get(1));
    if !in_recovery && standby_slots.trim().is_empty() {
        warnings.push((
            "synchronized_standby_slots is empty on the primary: the logical slot may run ahead of the standbys, so after a promotion the caches may hold what transactions the new primary never received wrote".into(),
            Some("ALTER SYSTEM SET synchronized_standby_slots = '<the standbys\' physical slots>'; SELECT pg_reload_conf();".into()),
        ));
    }
    Ok(warnings)
}

/// Drops a slot if it exists (tests and tooling; the daemon never drops its slot).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
    client
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {}",
            escape_literal(slot)
        ))
        .await
        .map_err(pg(format!("dropping replication slot {slot:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_slots_by_default_from_17_and_refused_before() {
        let v = |num: i32, text: &str| ServerVersion {
            num,
            text: text.into(),
        };
        assert!(failover_slot(None, &v(170_002, "17.2")).unwrap());
        assert!(!failover_slot(None, &v(160_006, "16.6")).unwrap());
        assert!(!failover_slot(Some(false), &v(180_000, "18.0")).unwrap());
        assert!(failover_slot(Some(true), &v(180_000, "18.0")).unwrap());
        let e = failover_slot(Some(true), &v(160_006, "16.6")).unwrap_err();
        assert!(e.to_string().contains("the server is 16.6"), "{e}");
    }
}
