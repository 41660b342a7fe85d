//! A database of its own for every test on the local PostgreSQL
//! (`deploy/local/services.sh start`), with its slots and publication, dropped at the
//! end; and the positions a test asserts on.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use wal2cache::source::{PgTarget, StreamConfig};
use wal2cache::Lsn;

use super::env::{pg_admin_url, unique};
use super::wait::eventually;

/// The example schema of the README (`migrations/001_example_schema.sql`), the tables
/// of `rules/example.toml`.
#[allow(dead_code)]
pub const EXAMPLE_SCHEMA: &str = include_str!("../../migrations/001_example_schema.sql");

/// `pg_admin_url` with another database (and optionally another user and password);
/// its query string (`?sslmode=...`) kept.
#[allow(dead_code)]
pub fn url_for(database: &str, user: Option<(&str, &str)>) -> String {
    url_on(&pg_admin_url(), database, user)
}

/// `base` (a superuser's URL) with another database, and optionally another user and
/// password; its query string kept.
#[allow(dead_code)]
pub fn url_on(base: &str, database: &str, user: Option<(&str, &str)>) -> String {
    let (scheme_user, rest) = base.split_once('@').expect("WAL2CACHE_TEST_PG has a user@");
    let host = rest.split(['/', '?']).next().unwrap();
    let query = rest
        .split_once('?')
        .map_or(String::new(), |(_, q)| format!("?{q}"));
    let userinfo = match user {
        Some((u, p)) => format!("postgres://{u}:{p}"),
        None => scheme_user.to_string(),
    };
    format!("{userinfo}@{host}/{database}{query}")
}

/// A connection; over TLS (wal2cache's own connector) when the URL sets `sslmode`.
#[allow(dead_code)]
pub async fn connect(url: &str) -> Client {
    if url.contains("sslmode=") {
        return PgTarget::parse(url)
            .unwrap_or_else(|e| panic!("{}: {e}", wal2cache::redact::redact(url)))
            .connect()
            .await
            .unwrap_or_else(|e| {
                panic!("{e}; start the TLS server with deploy/local/services.sh start pg-tls")
            });
    }
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| {
        panic!("cannot connect to {url}: {e}; start the local services with deploy/local/services.sh start")
    });
    tokio::spawn(conn);
    client
}

/// A database of its own, dropped with its slots when the test ends.
#[allow(dead_code)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
    /// The superuser URL it was made with (the server's `postgres` database).
    admin: String,
}

#[allow(dead_code)]
impl TestDb {
    pub async fn new(label: &str) -> TestDb {
        TestDb::on(&pg_admin_url(), label).await
    }

    /// On the server of `admin` (a superuser's URL), e.g. the TLS variant.
    pub async fn on(admin: &str, label: &str) -> TestDb {
        let name = unique(&format!("w2c_{label}"));
        let client = connect(admin).await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = url_on(admin, &name, None);
        let client = connect(&url).await;
        TestDb {
            name,
            url,
            client,
            admin: admin.to_string(),
        }
    }

    pub fn target(&self) -> PgTarget {
        PgTarget::parse(&self.url).unwrap()
    }

    /// A publication for all tables and a pgoutput slot, both named after `label`.
    pub async fn slot(&self, label: &str) -> (String, String) {
        let publication = format!("pub_{label}");
        self.client
            .batch_execute(&format!("CREATE PUBLICATION {publication} FOR ALL TABLES"))
            .await
            .unwrap();
        (self.create_slot(label).await, publication)
    }

    /// A pgoutput slot `<db>_<label>` (no publication).
    pub async fn create_slot(&self, label: &str) -> String {
        let slot = format!("{}_{label}", self.name);
        self.client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .unwrap_or_else(|e| panic!("create slot {slot}: {e}"));
        slot
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
            .unwrap_or_else(|e| panic!("{sql}: {}", db_message(&e)));
    }

    /// Drops a replication slot once no process streams from it. A client that
    /// just stopped leaves its walsender running for a moment after the
    /// disconnect (longer on a loaded machine), and dropping an active slot
    /// fails; wait for `active` to turn false first.
    pub async fn drop_slot(&self, slot: &str) {
        eventually(
            &format!("slot {slot} to be released"),
            Duration::from_secs(60),
            || async { !matches!(self.slot_state(slot).await, Some((_, true))) },
        )
        .await;
        self.exec(&format!("SELECT pg_drop_replication_slot('{slot}')"))
            .await;
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

    /// Bytes of WAL written since `from` (by the whole server).
    pub async fn wal_bytes_since(&self, from: Lsn) -> i64 {
        self.client
            .query_one(
                "SELECT (pg_current_wal_lsn() - $1::text::pg_lsn)::bigint",
                &[&from.to_string()],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Runs `sql` in a transaction of its own and returns the end of its commit record:
    /// exactly the position a consumer confirms once it has applied the transaction.
    ///
    /// Not `pg_current_wal_lsn()` read after the commit: other databases of the server
    /// (other tests, a daemon's WAL heartbeats) may write WAL in between. Not a position
    /// read before the commit either. The commit record itself is looked up with
    /// `pg_walinspect` (contrib, created here; the test role is a superuser), from the
    /// insert position read inside the transaction, by the transaction's xid.
    ///
    /// `pg_walinspect` came with 15: on 14, the commit is read back through a
    /// test_decoding slot of the database's own, whose COMMIT rows carry the end of
    /// their commit record.
    pub async fn exec_commit_end(&self, sql: &str) -> Lsn {
        let version: i32 = self
            .client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .unwrap()
            .get(0);
        if version < 150000 {
            return self.exec_commit_end_decoded(sql).await;
        }
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

    /// [`TestDb::exec_commit_end`] without `pg_walinspect`.
    async fn exec_commit_end_decoded(&self, sql: &str) -> Lsn {
        let slot = format!("{}_commit_end", self.name);
        self.client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding')
                  WHERE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = $1)",
                &[&slot],
            )
            .await
            .unwrap_or_else(|e| panic!("create slot {slot}: {e}"));
        self.exec("BEGIN").await;
        self.exec(sql).await;
        let xid: String = self
            .client
            .query_one("SELECT (txid_current() % 4294967296)::text", &[])
            .await
            .unwrap()
            .get(0);
        self.exec("COMMIT").await;
        let row = self
            .client
            .query_one(
                "SELECT lsn::text FROM pg_logical_slot_get_changes($1, NULL, NULL)
                  WHERE data = 'COMMIT ' || $2",
                &[&slot, &xid],
            )
            .await
            .unwrap_or_else(|e| panic!("the commit of xid {xid} through {slot}: {e}"));
        row.get::<_, String>(0).parse().unwrap()
    }

    pub async fn confirmed_lsn(&self, slot: &str) -> Option<Lsn> {
        self.slot_state(slot).await?.0
    }

    /// The slot's `confirmed_flush_lsn`, and whether a process streams from it
    /// (`active`); `None` when there is no such slot.
    pub async fn slot_state(&self, slot: &str) -> Option<(Option<Lsn>, bool)> {
        let row = self
            .client
            .query_opt(
                "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()?;
        let lsn = row.get::<_, Option<String>>(0).map(|s| s.parse().unwrap());
        Some((lsn, row.get(1)))
    }
}

/// The pid of the walsender streaming from `slot` (`active_pid`), over any connection
/// to its database.
#[allow(dead_code)]
pub async fn active_pid(client: &Client, slot: &str) -> Result<Option<i32>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .and_then(|row| row.get::<_, Option<i32>>(0)))
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = self.admin.clone();
        // Drop runs outside async: clean up on a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let admin = connect(&admin_url).await;
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

/// A walsender streams from `slot`. `active` alone is not enough: while the backend
/// that creates a slot waits for running transactions, the slot is already active
/// (held by that backend) and has no confirmed position yet.
#[allow(dead_code)]
pub async fn slot_active(db: &TestDb, slot: &str) -> bool {
    db.client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots s
               JOIN pg_stat_replication r ON r.pid = s.active_pid
              WHERE s.slot_name = $1 AND s.confirmed_flush_lsn IS NOT NULL",
            &[&slot],
        )
        .await
        .unwrap()
        .is_some()
}

/// Waits until a daemon streams from `slot`.
#[allow(dead_code)]
pub async fn wait_streaming(db: &TestDb, slot: &str) {
    eventually("the daemon to stream", Duration::from_secs(60), || {
        slot_active(db, slot)
    })
    .await;
}

/// The server's own words for a failed statement (`db error` alone says nothing).
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}
