//! Test harness: every test gets a database of its own on the local PostgreSQL
//! (`deploy/local/services.sh start`), its own slots and publication, dropped at the end.
#![allow(dead_code)]

pub mod daemon;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};
use wal2cache::source::{Change, PgTarget, Source, SourceEvent, StreamConfig};
use wal2cache::Lsn;

pub fn admin_url() -> String {
    std::env::var("WAL2CACHE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:54320/postgres".into())
}

/// `admin_url` with another database (and optionally another user and password).
pub fn url_for(database: &str, user: Option<(&str, &str)>) -> String {
    let base = admin_url();
    let (scheme_user, rest) = base.split_once('@').expect("WAL2CACHE_TEST_PG has a user@");
    let host = rest.split('/').next().unwrap();
    let userinfo = match user {
        Some((u, p)) => format!("postgres://{u}:{p}"),
        None => scheme_user.to_string(),
    };
    format!("{userinfo}@{host}/{database}")
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| {
        panic!("cannot connect to {url}: {e}; start the local services with deploy/local/services.sh start")
    });
    tokio::spawn(conn);
    client
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}_{}_{n}_{nanos:x}", std::process::id())
}

/// A database of its own, dropped with its slots when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

impl TestDb {
    pub async fn new(label: &str) -> TestDb {
        let name = unique(&format!("w2c_{label}"));
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = url_for(&name, None);
        let client = connect(&url).await;
        TestDb { name, url, client }
    }

    pub fn target(&self) -> PgTarget {
        PgTarget::parse(&self.url).unwrap()
    }

    /// A publication for all tables and a pgoutput slot, both named after `label`.
    pub async fn slot(&self, label: &str) -> (String, String) {
        let slot = format!("{}_{label}", self.name);
        let publication = format!("pub_{label}");
        self.client
            .batch_execute(&format!("CREATE PUBLICATION {publication} FOR ALL TABLES"))
            .await
            .unwrap();
        self.client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .unwrap();
        (slot, publication)
    }

    pub fn stream(&self, slot: &str, publication: &str) -> StreamConfig {
        let mut c = StreamConfig::new(self.target(), slot, publication);
        c.backoff_initial = Duration::from_millis(50);
        c.backoff_max = Duration::from_millis(500);
        c.status_interval = Duration::from_millis(100);
        c
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Each statement in a transaction of its own.
    pub async fn exec_each(&self, statements: &[&str]) {
        for sql in statements {
            self.exec(sql).await;
        }
    }

    pub async fn current_lsn(&self) -> Lsn {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap();
        row.get::<_, String>(0).parse().unwrap()
    }

    /// Runs `sql` in a transaction of its own and returns the end of its commit record:
    /// exactly the position a consumer confirms once it has applied the transaction.
    ///
    /// Not `pg_current_wal_lsn()` read after the commit: other databases of the server
    /// (other tests, a daemon's WAL heartbeats) may write WAL in between. Not a position
    /// read before the commit either. The commit record itself is looked up with
    /// `pg_walinspect` (contrib, created here; the test role is a superuser), from the
    /// insert position read inside the transaction, by the transaction's xid.
    pub async fn exec_commit_end(&self, sql: &str) -> Lsn {
        self.exec("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            .await;
        self.exec("BEGIN").await;
        self.exec(sql).await;
        let row = self
            .client
            .query_one(
                "SELECT pg_current_wal_insert_lsn()::text, (txid_current() % 4294967296)::text",
                &[],
            )
            .await
            .unwrap();
        let (before, xid): (String, String) = (row.get(0), row.get(1));
        self.exec("COMMIT").await;
        let row = self
            .client
            .query_one(
                "SELECT end_lsn::text FROM pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn())
                  WHERE resource_manager = 'Transaction' AND record_type LIKE 'COMMIT%' AND xid::text = $2",
                &[&before, &xid],
            )
            .await
            .unwrap_or_else(|e| panic!("the commit record of xid {xid} after {before}: {e}"));
        row.get::<_, String>(0).parse().unwrap()
    }

    pub async fn confirmed_lsn(&self, slot: &str) -> Option<Lsn> {
        let row = self
            .client
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()?;
        row.get::<_, Option<String>>(0).map(|s| s.parse().unwrap())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async: clean up on a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok((admin, conn)) = tokio_postgres::connect(&admin_url(), NoTls).await else {
                    return;
                };
                tokio::spawn(conn);
                let _ = admin
                    .batch_execute(&format!(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                           WHERE database = '{name}' AND active_pid IS NOT NULL;"
                    ))
                    .await;
                // Two statements: DROP DATABASE cannot run inside the implicit
                // transaction of a multi-statement query.
                for _ in 0..50 {
                    let _ = admin
                        .batch_execute(&format!(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                               WHERE database = '{name}'"
                        ))
                        .await;
                    let dropped = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                    if dropped.is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        })
        .join();
    }
}

/// Rules from TOML text, compiled as `rules.path` would load them.
pub fn compile_rules(text: &str) -> std::sync::Arc<wal2cache::rules::RuleSet> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.toml");
    std::fs::write(&file, text).unwrap();
    std::sync::Arc::new(wal2cache::rules::load(&file).unwrap_or_else(|e| panic!("{e}")))
}

/// Waits for a condition with a deadline; never a bare sleep.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads events until `done` says so, failing after `deadline`.
pub async fn collect_until(
    source: &mut Source,
    deadline: Duration,
    mut done: impl FnMut(&[SourceEvent]) -> bool,
) -> Vec<SourceEvent> {
    let mut events = Vec::new();
    let result = tokio::time::timeout(deadline, async {
        while !done(&events) {
            match source.next().await {
                Some(Ok(e)) => events.push(e),
                Some(Err(e)) => panic!("source failed: {e}"),
                None => panic!("source ended"),
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "timed out after {deadline:?}; got {} events: {:#?}",
        events.len(),
        events.iter().rev().take(5).collect::<Vec<_>>()
    );
    events
}

/// The fatal error a source ends with, which must come within `within` (not retries).
pub async fn fatal_error(source: &mut Source, within: Duration) -> wal2cache::source::SourceError {
    match tokio::time::timeout(within, source.next()).await {
        Ok(Some(Err(e))) => e,
        Ok(other) => panic!("expected a fatal error, got {other:?}"),
        Err(_) => panic!("no fatal error within {within:?}: the source kept retrying"),
    }
}

/// Events up to and including the `n`th commit.
pub async fn commits(source: &mut Source, n: usize) -> Vec<SourceEvent> {
    collect_until(source, Duration::from_secs(30), |evs| {
        evs.iter()
            .filter(|e| matches!(e, SourceEvent::Commit(_)))
            .count()
            >= n
    })
    .await
}

pub fn changes(events: &[SourceEvent]) -> Vec<&Change> {
    events
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Change(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// A column of a row in text form; `None` for NULL, panics when not sent.
pub fn text(change: &Change, new: bool, column: &str) -> Option<String> {
    use wal2cache::source::Value;
    let row = if new {
        change.new.as_ref()
    } else {
        change.old.as_ref()
    }
    .expect("row present");
    let i = change.relation.column_index(column).expect("column exists");
    match &row.0[i] {
        Value::Null => None,
        Value::Text(b) => Some(String::from_utf8(b.to_vec()).unwrap()),
        other => panic!("column {column} is {other:?}"),
    }
}
