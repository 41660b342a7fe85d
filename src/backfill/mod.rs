//! `wal2cache backfill`: writes every current row of the republish rules' tables to
//! Redis as the republish of an INSERT of that row would (keys, value, TTL), read under
//! one exported snapshot and versioned so that the stream always wins (see
//! [`version`]). Running it while the daemon streams is safe, and so is running it
//! again: the version guard makes it idempotent.

mod table;
pub mod warm;
mod writer;

use table::{estimate, table_shape, Pages};
use writer::Writer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::{BackfillConfig, Config};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::rules::{Action, Planner, RuleSet};
use crate::sink::redis::RedisSink;
use crate::sink::{Batch, Origin, Version};
use crate::source::error::pg;
use crate::source::snapshot::Snapshot;
use crate::source::table::TableName;

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
    /// Rows of the first page of each table; later pages adapt to
    /// `backfill.page_time`.
    pub chunk: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rules: Vec::new(),
            tables: Vec::new(),
            rate: None,
            dry_run: false,
            chunk: 1000,
        }
    }
}

/// Pages never hold fewer rows than this, nor more than `MAX_PAGE`, whatever the
/// time a page takes. Small pages keep what the backfill touches in the CPU's caches,
/// which it shares with Redis on a small host: 1,000 rows a page against 5,000 took
/// a quarter less of the backfill's CPU per row and about a tenth less of Redis's
/// (1,000,000 rows, three interleaved runs); 500 a little less again, but each page
/// waits for the last one's key, so a database a few milliseconds away would cap
/// the rate at a page per round trip.
const MIN_PAGE: usize = 100;
const MAX_PAGE: usize = 1_000;

/// Pages written at once, each on its own connection.
const WRITERS: usize = 2;

/// Rows a second a backfill was measured to write on a 2-core machine (the
/// `backfill` benchmark, `deploy/local/bench-backfill.sh`): the expected duration
/// printed before starting assumes it, or `--rate` when lower.
pub const NOMINAL_ROWS_PER_S: u64 = 50_000;

/// The next page's size: one that took `took` for `rows` rows aims at `page_time`,
/// changing by at most a factor of 2 a page, within `MIN_PAGE..=MAX_PAGE`.
fn next_page(rows: usize, took: Duration, page_time: Duration) -> usize {
    let ratio = page_time.as_secs_f64() / took.as_secs_f64().max(1e-6);
    let wanted = (rows as f64 * ratio.clamp(0.5, 2.0)) as usize;
    wanted.clamp(MIN_PAGE, MAX_PAGE)
}

/// A table to backfill, as the catalog sees it before starting.
#[derive(Debug, Clone)]
pub struct TableEstimate {
    pub table: String,
    /// `pg_class.reltuples`; `None` for a table never analyzed.
    pub rows: Option<u64>,
    /// `pg_total_relation_size`.
    pub bytes: u64,
}

/// The expected duration of backfilling `rows` rows, at `rate` rows a second or the
/// measured nominal rate, whichever is lower.
pub fn expected_duration(rows: u64, rate: Option<u32>) -> Duration {
    let per_s = rate
        .map(u64::from)
        .filter(|r| *r > 0)
        .map_or(NOMINAL_ROWS_PER_S, |r| r.min(NOMINAL_ROWS_PER_S));
    Duration::from_secs_f64(rows as f64 / per_s as f64)
}

/// What a backfill says while it runs: the command line shows a progress bar in a
/// terminal and log lines otherwise ([`LogObserver`]).
pub trait Observer: Send {
    /// Before the first row: each table's estimate and the expected duration.
    fn planned(&mut self, tables: &[TableEstimate], expected: Duration);
    /// After each page: the table, rows read so far (all tables), rows expected in
    /// all (`0`: unknown).
    fn progress(&mut self, table: &str, rows: u64, expected_rows: u64);
    /// A table read to its end.
    fn table_done(&mut self, table: &str, rows: u64);
}

/// Structured log lines: the plan, then progress every `every` (rows, rows/s, ETA).
pub struct LogObserver {
    started: Instant,
    last: Instant,
    every: Duration,
}

impl LogObserver {
    pub fn new(every: Duration) -> LogObserver {
        LogObserver {
            started: Instant::now(),
            last: Instant::now(),
            every,
        }
    }
}

impl Observer for LogObserver {
    fn planned(&mut self, tables: &[TableEstimate], expected: Duration) {
        for t in tables {
            tracing::info!(table = %t.table, rows_estimate = t.rows, bytes = t.bytes, "backfill: table to read");
        }
        tracing::info!(
            expected_s = expected.as_secs(),
            "backfill: expected duration"
        );
        self.started = Instant::now();
        self.last = self.started;
    }

    fn progress(&mut self, table: &str, rows: u64, expected_rows: u64) {
        if self.last.elapsed() < self.every {
            return;
        }
        self.last = Instant::now();
        let (per_s, eta) = rate_and_eta(self.started.elapsed(), rows, expected_rows);
        tracing::info!(
            table,
            rows,
            rows_per_s = per_s as u64,
            eta_s = eta.map(|e| e.as_secs()),
            "backfill: progress"
        );
    }

    fn table_done(&mut self, table: &str, rows: u64) {
        tracing::info!(table, rows, "backfill: table done");
    }
}

/// Rows a second so far, and the time left for `expected` rows at that rate (`None`
/// when unknown or already past the estimate).
pub fn rate_and_eta(elapsed: Duration, rows: u64, expected: u64) -> (f64, Option<Duration>) {
    let per_s = rows as f64 / elapsed.as_secs_f64().max(1e-3);
    let eta = (expected > rows && per_s > 0.0)
        .then(|| Duration::from_secs_f64((expected - rows) as f64 / per_s));
    (per_s, eta)
}

/// What a backfill did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Rows read, per table, in order.
    pub tables: Vec<(String, u64)>,
    pub rows: u64,
    /// Keys offered to Redis.
    pub keys: u64,
    /// Of those, the keys the version guard refused: the stream wrote (or deleted)
    /// them since the snapshot, or an earlier backfill from the same snapshot did.
    pub refused: u64,
    /// Of the keys offered, those of settled pages (see [`settled`]): written without
    /// a version of their own.
    pub settled: u64,
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
    #[error("stopped after {}h in {table}, the longest a backfill may run: a row deleted while it runs stays deleted only while the delete's tombstone lives (a day). What was written stays and is correct; backfill the tables one at a time with --table, or fewer rules with --rule", .limit.as_secs() / 3600)]
    TooLong { table: String, limit: Duration },
    #[error("the backfill of {0} failed (the errors above say why)")]
    Failed(String),
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

/// Whether the streams have moved past the snapshot: every logical slot of this
/// database that decodes with pgoutput (a wal2cache daemon's, whatever its name, but
/// also any other subscriber's: the check cannot tell them apart) has confirmed a
/// position at or after `point`, or there is none. Temporary slots are left out:
/// they are backfills' own (or a subscription's initial copy), which write nothing
/// from the stream.
///
/// Once true it stays true: a slot's confirmed position only moves forward, and a
/// slot created later starts at or after its own consistent point, which is after
/// this one. From then on the stream will never apply a change older than `point`
/// again (a transaction the snapshot sees ended at or before `point`, so it is never
/// sent again from a slot that confirmed `point`), so a backfilled value needs no
/// version of its own to hold against one: it only has to yield to a version stored
/// since (a change or a delete after the snapshot, always written with its version).
/// The page is then a settled batch ([`Batch::settled`]): one write a key instead of
/// two. Before, and whenever the check cannot be made, every value carries its
/// version as the stream's do.
pub async fn settled(client: &Client, point: Lsn) -> Result<bool, Error> {
    let row = client
        .query_one(
            "SELECT coalesce(bool_and(confirmed_flush_lsn IS NOT NULL
                                      AND confirmed_flush_lsn >= $1::text::pg_lsn), true)
             FROM pg_replication_slots
             WHERE slot_type = 'logical' AND plugin = 'pgoutput' AND NOT temporary
               AND database = current_database()",
            &[&point.to_string()],
        )
        .await
        .map_err(pg("reading the replication slots' confirmed positions"))?;
    Ok(row.get(0))
}

/// Set in the environment, the backfill's values win over everything: the switch with
/// which a test shows that its check finds the stale values the version prevents.
/// Never for production.
pub const UNGUARDED: &str = "WAL2CACHE_TEST_BACKFILL_UNGUARDED";

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
    observer: &mut dyn Observer,
    mut stop: watch::Receiver<bool>,
) -> Result<Report, Error> {
    let started = Instant::now();
    let chosen = select(rules, options)?;
    let slot = format!("wal2cache_backfill_{}", std::process::id());
    let snapshot = Snapshot::export(&config.pg_target(), &slot).await?;
    let version = version(snapshot.consistent_point);
    tracing::info!(consistent_point = %snapshot.consistent_point, snapshot = %snapshot.name, rules = chosen.rules().len(), dry_run = options.dry_run, "backfill: reading under an exported snapshot");
    let result = copy(
        config, &chosen, options, &snapshot, version, observer, &mut stop,
    )
    .await;
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
    observer: &mut dyn Observer,
    stop: &mut watch::Receiver<bool>,
) -> Result<Report, Error> {
    let settings = &config.backfill;
    let reader = snapshot.reader(settings.statement_timeout).await?;
    let (redis_config, _) = config.sinks()?;
    let (_stop_redis, stop_rx) = watch::channel(false);
    let mut redis = Vec::new();
    for _ in 0..WRITERS {
        redis.push(match options.dry_run {
            true => None,
            false => Some(RedisSink::connect(redis_config, stop_rx.clone()).await?),
        });
    }
    // On a blocking thread while a page is planned.
    let mut planner = Some(Planner::new(Arc::new(rules.clone())));
    let mut report = Report::default();
    let mut settled = false;
    // Every table's shape first: a table that cannot be paged stops the backfill
    // before anything is written.
    let mut tables = Vec::new();
    let mut estimates = Vec::new();
    for (table, _) in rules.tables() {
        let shape = table_shape(&reader, &table).await?;
        estimates.push(estimate(&reader, &table).await?);
        tables.push((table, shape));
    }
    let expected_rows: u64 = estimates.iter().filter_map(|e| e.rows).sum();
    let expected = expected_duration(expected_rows, options.rate);
    if expected > settings.max_duration {
        tracing::warn!(
            expected_s = expected.as_secs(),
            max_duration_s = settings.max_duration.as_secs(),
            "backfill: expected to take longer than backfill.max_duration; its snapshot holds back vacuum on the database (and its slot holds WAL) all that time: backfill the tables one at a time with --table, or raise backfill.max_duration"
        );
    }
    observer.planned(&estimates, expected);
    let mut writer = Writer::start(redis);
    let started = Instant::now();
    let mut warned_long = false;
    for (table, shape) in tables {
        let table_name = table.to_string();
        let pages = Arc::new(Pages::new(&table, shape));
        let origin = Origin {
            version,
            xid: 0,
            commit_time: crate::pgtime::pg_now(),
            table: Some(Arc::from(table_name.as_str())),
            op: "backfill",
        };
        let mut last: Option<Vec<String>> = None;
        let mut rows_of_table = 0u64;
        let mut page = options.chunk.clamp(1, MAX_PAGE);
        // Three stages at once: the page read while the one before it is planned (on
        // a blocking thread, so that this runtime keeps both connections moving) and
        // the one before that written (by the writer task).
        let mut planning: Option<Vec<tokio_postgres::Row>> = None;
        let mut more = true;
        loop {
            if *stop.borrow() {
                report.interrupted = true;
            }
            if started.elapsed() > BackfillConfig::MAX_RUN {
                return Err(Error::Backfill(BackfillError::TooLong {
                    table: table_name,
                    limit: BackfillConfig::MAX_RUN,
                }));
            }
            if !warned_long && started.elapsed() > settings.max_duration {
                warned_long = true;
                tracing::warn!(elapsed_s = started.elapsed().as_secs(), rows = report.rows, "backfill: still running after backfill.max_duration; its snapshot holds back vacuum on the database meanwhile (Ctrl-C stops it, what was written stays)");
            }
            let reading = more && !report.interrupted;
            let plan = planning.take().map(|rows| {
                let pages = pages.clone();
                let origin = origin.clone();
                let mut planner = planner.take().expect("one page is planned at a time");
                tokio::task::spawn_blocking(move || {
                    let planned = pages.plan(&mut planner, &rows, &origin);
                    (planner, planned)
                })
            });
            if plan.is_none() && !reading {
                break;
            }
            let (rows, planned) = tokio::join!(
                async {
                    let asked = Instant::now();
                    match reading {
                        true => Some((
                            pages.read(&reader, last.as_deref(), page).await,
                            asked.elapsed(),
                        )),
                        false => None,
                    }
                },
                async {
                    match plan {
                        Some(handle) => Some(handle.await),
                        None => None,
                    }
                }
            );
            if let Some(planned) = planned {
                let (back, items) = planned.map_err(|e| {
                    Error::Backfill(BackfillError::Failed(format!(
                        "{table_name} (planning a page: {e})"
                    )))
                })?;
                planner = Some(back);
                let item = items?;
                let keys = item.plan.republish.len() as u64;
                report.keys += keys;
                if !settled && !options.dry_run {
                    settled = self::settled(&reader, snapshot.consistent_point).await?;
                    if settled {
                        tracing::info!(rows = report.rows, "backfill: every slot has confirmed past the snapshot; the values from here on are written without a version of their own (one write a key)");
                    }
                }
                if settled {
                    report.settled += keys;
                }
                writer
                    .send(Batch {
                        items: vec![item],
                        settled,
                        ..Batch::default()
                    })
                    .await?;
            }
            let Some((rows, took)) = rows else {
                continue;
            };
            let rows = rows.map_err(pg(format!(
                "reading {table} under the backfill's snapshot (backfill.statement_timeout = {:?})",
                settings.statement_timeout
            )))?;
            rows_of_table += rows.len() as u64;
            report.rows += rows.len() as u64;
            metrics::counter!("wal2cache_backfill_rows_total", "table" => table_name.clone())
                .increment(rows.len() as u64);
            observer.progress(&table_name, report.rows, expected_rows);
            more = rows.len() >= page;
            last = rows.last().map(|row| pages.key_of(row));
            page = next_page(rows.len(), took, settings.page_time);
            if !rows.is_empty() {
                planning = Some(rows);
            }
            if let Some(rate) = options.rate.filter(|r| *r > 0) {
                // No faster than the rate, in pages no bigger than a second's worth.
                page = page.min(rate as usize).max(1);
                let due = Duration::from_secs_f64(report.rows as f64 / f64::from(rate));
                let wait = due.saturating_sub(started.elapsed());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
        }
        // Written, not only read: the log line says the table is done.
        report.refused += writer.drain().await?;
        report.tables.push((table_name.clone(), rows_of_table));
        if report.interrupted {
            report.refused += writer.close().await?;
            return Ok(report);
        }
        observer.table_done(&table_name, rows_of_table);
    }
    report.refused += writer.close().await?;
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

#[cfg(test)]
mod paging {
    use super::*;

    #[test]
    fn pages_grow_when_fast_and_shrink_when_slow_within_bounds() {
        let budget = Duration::from_millis(500);
        assert_eq!(next_page(400, Duration::from_millis(10), budget), 800);
        assert_eq!(next_page(1000, Duration::from_millis(1000), budget), 500);
        assert_eq!(next_page(1000, Duration::from_millis(600), budget), 833);
        assert_eq!(
            next_page(30_000, Duration::from_millis(1), budget),
            MAX_PAGE
        );
        assert_eq!(next_page(150, Duration::from_secs(30), budget), MIN_PAGE);
    }

    #[test]
    fn the_expected_duration_takes_the_lower_of_rate_and_nominal() {
        assert_eq!(
            expected_duration(NOMINAL_ROWS_PER_S * 10, None),
            Duration::from_secs(10)
        );
        assert_eq!(expected_duration(1000, Some(100)), Duration::from_secs(10));
        assert_eq!(
            expected_duration(NOMINAL_ROWS_PER_S, Some(u32::MAX)),
            Duration::from_secs(1)
        );
        let (per_s, eta) = rate_and_eta(Duration::from_secs(2), 1000, 3000);
        assert_eq!(per_s, 500.0);
        assert_eq!(eta, Some(Duration::from_secs(4)));
        assert_eq!(rate_and_eta(Duration::from_secs(2), 3000, 1000).1, None);
    }
}
