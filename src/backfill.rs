//! `wal2cache backfill`: writes every current row of the republish rules' tables to
//! Redis as the republish of an INSERT of that row would (keys, value, TTL), read under
//! one exported snapshot and versioned so that the stream always wins (see
//! [`version`]). Running it while the daemon streams is safe, and so is running it
//! again: the version guard makes it idempotent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::Config;
use crate::error::Error;
use crate::lsn::Lsn;
use crate::plan::Plan;
use crate::rules::{Action, Planner, RuleSet};
use crate::sink::redis::RedisSink;
use crate::sink::{Batch, Item, Origin, Sink, Version};
use crate::source::change::{Column, ReplicaIdentity, Row, Value};
use crate::source::error::pg;
use crate::source::snapshot::Snapshot;
use crate::source::table::TableName;
use crate::source::{Change, Op, Relation};

/// What to backfill, and how fast.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only these rules (all republish rules when empty).
    pub rules: Vec<String>,
    /// Only the rules of these tables (`schema.table`).
    pub tables: Vec<String>,
    /// At most this many rows a second.
    pub rate: Option<u32>,
    /// Read and plan, write nothing.
    pub dry_run: bool,
    /// Rows per query.
    pub chunk: usize,
    /// Each query's `statement_timeout`.
    pub statement_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rules: Vec::new(),
            tables: Vec::new(),
            rate: None,
            dry_run: false,
            chunk: 1000,
            statement_timeout: Duration::from_secs(60),
        }
    }
}

/// What a backfill did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Rows read, per table, in order.
    pub tables: Vec<(String, u64)>,
    pub rows: u64,
    /// Keys written (offered to the version guard: a key the stream wrote since the
    /// snapshot keeps the stream's value).
    pub keys: u64,
    /// The version every value carried.
    pub version: Option<Version>,
    pub elapsed: Duration,
    /// Stopped before the end (Ctrl-C): what was written stays, a rerun completes it.
    pub interrupted: bool,
}

/// Why a backfill cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("no republish rule to backfill{0}: backfill writes the values of `action = \"republish\"` rules (delete rules have nothing to write); name them with --rule or --table")]
    NothingToDo(String),
    #[error("{0}: unknown; the republish rules are {1}")]
    UnknownRule(String, String),
    #[error("table {table} has no primary key and no unique index on NOT NULL columns, so it cannot be read page by page: add a primary key (ALTER TABLE {table} ADD PRIMARY KEY (...)), or leave its rules out with --rule")]
    NoKey { table: String },
}

/// The version of every backfilled value.
///
/// The snapshot was exported by a logical slot at its consistent point: a transaction
/// the snapshot does not see commits at or after that point, so its commit record,
/// whose LSN is the `commit_lsn` of every version the stream writes for it, is at or
/// after it. A version just below the point, with the highest position in its
/// transaction, is therefore older than every change the snapshot missed (the stream
/// overwrites the backfilled value, and a backfilled value never overwrites the
/// stream's, nor a tombstone it left), and not older than any change the snapshot
/// contains (a replay of those is refused: the backfilled value already holds their
/// effect). `pg_current_wal_lsn()` read at some moment would not do: WAL order and
/// visibility order differ (a commit waiting for a synchronous standby is in the WAL
/// before other sessions see it), so a stale row could carry a newer version.
pub fn version(consistent_point: Lsn) -> Version {
    if std::env::var_os(UNGUARDED).is_some() {
        // Tests only: newer than anything, so every backfilled value wins (and the
        // keys it writes refuse the stream from then on).
        return Version {
            commit_lsn: Lsn(u64::MAX),
            seq: u32::MAX,
        };
    }
    Version {
        commit_lsn: Lsn(consistent_point.0.saturating_sub(1)),
        seq: u32::MAX,
    }
}

/// Set in the environment, the backfill's values win over everything: the switch with
/// which a test shows that its check finds the stale values the version prevents.
/// Never for production.
pub const UNGUARDED: &str = "WAL2CACHE_TEST_BACKFILL_UNGUARDED";

/// The table as the stream would describe it: its columns (generated ones aside, as
/// the stream sends none before 18) and the columns to page by.
struct TableShape {
    relation: Arc<Relation>,
    key: Vec<usize>,
    /// `format_type` of each column, for the casts of the page's key values.
    types: Vec<String>,
}

async fn table_shape(client: &Client, table: &TableName) -> Result<TableShape, Error> {
    let quoted = table.quoted();
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, format_type(a.atttypid, a.atttypmod),
                    c.oid::int8
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = ''
             ORDER BY a.attnum",
            &[&quoted],
        )
        .await
        .map_err(pg(format!("reading the columns of {table}")))?;
    let oid = rows.first().map_or(0, |r| r.get::<_, i64>(4) as u32);
    let mut columns: Vec<Column> = rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_oid: r.get::<_, i64>(1) as u32,
            type_modifier: r.get(2),
            is_key: false,
        })
        .collect();
    let types = rows.iter().map(|r| r.get::<_, String>(3)).collect();
    // The primary key, else the first unique index on NOT NULL columns only (no
    // expressions, no predicate).
    let key_rows = client
        .query(
            "SELECT array_agg(a.attname::text ORDER BY k.ord)
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indpred IS NULL
               AND i.indexprs IS NULL AND i.indisvalid
             GROUP BY i.indexrelid, i.indisprimary
             HAVING bool_and(a.attnotnull)
             ORDER BY i.indisprimary DESC, i.indexrelid
             LIMIT 1",
            &[&quoted],
        )
        .await
        .map_err(pg(format!("reading the keys of {table}")))?;
    let key_names: Vec<String> = key_rows.first().map(|r| r.get(0)).unwrap_or_default();
    let key: Vec<usize> = key_names
        .iter()
        .filter_map(|n| columns.iter().position(|c| &c.name == n))
        .collect();
    if key.is_empty() || key.len() != key_names.len() {
        return Err(Error::Backfill(BackfillError::NoKey {
            table: table.quoted(),
        }));
    }
    for &i in &key {
        columns[i].is_key = true;
    }
    Ok(TableShape {
        relation: Arc::new(Relation {
            oid,
            schema: table.schema.clone(),
            name: table.name.clone(),
            replica_identity: ReplicaIdentity::Default,
            columns,
            ancestors: Vec::new(),
        }),
        key,
        types,
    })
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The republish rules to backfill, as a rule set of their own.
fn select(rules: &RuleSet, options: &Options) -> Result<RuleSet, Error> {
    let republish: Vec<_> = rules
        .rules()
        .iter()
        .filter(|r| matches!(r.action, Action::Republish { .. }))
        .collect();
    let names = || {
        republish
            .iter()
            .map(|r| format!("{:?}", r.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for wanted in &options.rules {
        if !republish.iter().any(|r| &r.name == wanted) {
            return Err(Error::Backfill(BackfillError::UnknownRule(
                format!("--rule {wanted:?}"),
                names(),
            )));
        }
    }
    let tables: Vec<TableName> = options
        .tables
        .iter()
        .map(|t| {
            TableName::parse(t).map_err(|why| {
                Error::Backfill(BackfillError::UnknownRule(
                    format!("--table {t:?} ({why})"),
                    names(),
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let chosen = rules.subset(|r| {
        matches!(r.action, Action::Republish { .. })
            && (options.rules.is_empty() || options.rules.contains(&r.name))
            && (tables.is_empty() || tables.contains(&r.table))
    });
    if chosen.rules().is_empty() {
        let which = if options.rules.is_empty() && options.tables.is_empty() {
            String::new()
        } else {
            " among the rules and tables named".into()
        };
        return Err(Error::Backfill(BackfillError::NothingToDo(which)));
    }
    Ok(chosen)
}

/// Runs the backfill until done or `stop` (Ctrl-C).
pub async fn run(
    config: &Config,
    rules: &RuleSet,
    options: &Options,
    mut stop: watch::Receiver<bool>,
) -> Result<Report, Error> {
    let started = Instant::now();
    let chosen = select(rules, options)?;
    let slot = format!("wal2cache_backfill_{}", std::process::id());
    let snapshot = Snapshot::export(&config.pg_target(), &slot).await?;
    let version = version(snapshot.consistent_point);
    tracing::info!(consistent_point = %snapshot.consistent_point, snapshot = %snapshot.name, rules = chosen.rules().len(), dry_run = options.dry_run, "backfill: reading under an exported snapshot");
    let result = copy(config, &chosen, options, &snapshot, version, &mut stop).await;
    snapshot.release();
    let mut report = result?;
    report.version = Some(version);
    report.elapsed = started.elapsed();
    Ok(report)
}

async fn copy(
    config: &Config,
    rules: &RuleSet,
    options: &Options,
    snapshot: &Snapshot,
    version: Version,
    stop: &mut watch::Receiver<bool>,
) -> Result<Report, Error> {
    let reader = snapshot.reader(options.statement_timeout).await?;
    let (redis_config, _) = config.sinks()?;
    let (_stop_redis, stop_rx) = watch::channel(false);
    let mut redis = if options.dry_run {
        None
    } else {
        Some(RedisSink::connect(redis_config, stop_rx).await?)
    };
    let mut planner = Planner::new(Arc::new(rules.subset(|_| true)));
    let mut report = Report::default();
    // Every table's shape first: a table that cannot be paged stops the backfill
    // before anything is written.
    let mut shapes = Vec::new();
    for (table, _) in rules.tables() {
        let shape = table_shape(&reader, &table).await?;
        shapes.push((table, shape));
    }
    let pace_started = Instant::now();
    for (table, shape) in shapes {
        let columns: Vec<String> = shape
            .relation
            .columns
            .iter()
            .map(|c| format!("t.{}::text", ident(&c.name)))
            .collect();
        // Qualified: an ORDER BY "id" would sort by the output column "id", the text.
        let key_list = shape
            .key
            .iter()
            .map(|&i| format!("t.{}", ident(&shape.relation.columns[i].name)))
            .collect::<Vec<_>>()
            .join(", ");
        let after = shape
            .key
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("${}::text::{}", n + 1, shape.types[i]))
            .collect::<Vec<_>>()
            .join(", ");
        let first = format!(
            "SELECT {} FROM {} AS t ORDER BY {key_list} LIMIT {}",
            columns.join(", "),
            table.quoted(),
            options.chunk
        );
        let next = format!(
            "SELECT {} FROM {} AS t WHERE ({key_list}) > ({after}) ORDER BY {key_list} LIMIT {}",
            columns.join(", "),
            table.quoted(),
            options.chunk
        );
        let mut last: Option<Vec<String>> = None;
        let mut rows_of_table = 0u64;
        loop {
            if *stop.borrow() {
                report.interrupted = true;
                report.tables.push((table.to_string(), rows_of_table));
                return Ok(report);
            }
            let rows = match &last {
                None => reader.query(first.as_str(), &[]).await,
                Some(key) => {
                    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = key
                        .iter()
                        .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync))
                        .collect();
                    reader.query(next.as_str(), &params).await
                }
            }
            .map_err(pg(format!("reading {table} under the backfill's snapshot")))?;
            if rows.is_empty() {
                break;
            }
            let mut items = Vec::with_capacity(rows.len());
            for row in &rows {
                let values: Vec<Option<String>> = (0..shape.relation.columns.len())
                    .map(|i| row.get(i))
                    .collect();
                let change = Change {
                    relation: shape.relation.clone(),
                    op: Op::Insert,
                    new: Some(Row(values
                        .iter()
                        .map(|v| match v {
                            Some(text) => Value::Text(Bytes::from(text.clone())),
                            None => Value::Null,
                        })
                        .collect())),
                    old: None,
                    old_kind: None,
                };
                let planned = planner
                    .plan_change(&change)
                    .map_err(|e| Error::Plan(Box::new(e)))?;
                // The values only: no tag purge, no delete, nothing for subscribers.
                let plan = Plan {
                    republish: planned.republish,
                    rules: planned.rules,
                    ..Plan::default()
                };
                report.keys += plan.republish.len() as u64;
                items.push(Item {
                    origin: Origin {
                        version,
                        xid: 0,
                        commit_time: crate::pgtime::pg_now(),
                        table: Some(Arc::from(table.to_string())),
                        op: "backfill",
                    },
                    plan: Arc::new(plan),
                });
                last = Some(
                    shape
                        .key
                        .iter()
                        .map(|&i| values[i].clone().unwrap_or_default())
                        .collect(),
                );
            }
            rows_of_table += rows.len() as u64;
            report.rows += rows.len() as u64;
            if let Some(redis) = redis.as_mut() {
                redis
                    .apply(&Batch {
                        items,
                        ..Batch::default()
                    })
                    .await?;
            }
            if let Some(rate) = options.rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(report.rows as f64 / f64::from(rate));
                let wait = due.saturating_sub(pace_started.elapsed());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
            if rows.len() < options.chunk {
                break;
            }
        }
        tracing::info!(table = %table, rows = rows_of_table, "backfill: table done");
        report.tables.push((table.to_string(), rows_of_table));
    }
    if let Some(redis) = redis {
        redis.close().await;
    }
    let _ = reader.batch_execute("COMMIT").await;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_below_every_change_after_the_point_and_not_below_those_before() {
        let cp = Lsn(0x1_0000_0100);
        let v = version(cp);
        for after in [cp, Lsn(cp.0 + 1)] {
            for seq in [0, 1, u32::MAX] {
                let stream = Version {
                    commit_lsn: after,
                    seq,
                };
                assert!(v < stream && v.encode() < stream.encode(), "{stream:?}");
            }
        }
        let before = Version {
            commit_lsn: Lsn(cp.0 - 8),
            seq: u32::MAX,
        };
        assert!(v > before && v.encode() > before.encode());
    }
}
