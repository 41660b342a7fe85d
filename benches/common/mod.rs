//! Shared by the benches: a database of their own on the server from
//! `WAL2CACHE_TEST_PG`, dropped with its slots at the end (also when the bench
//! panics), and the process's memory figures from `/proc/self/status`.
#![allow(dead_code)]

use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use wal2cache::Lsn;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error with its chain of causes (tokio-postgres says only "db error" otherwise).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

pub fn admin_url() -> String {
    std::env::var("WAL2CACHE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:54320/postgres".into())
}

/// `admin_url` with another database.
pub fn url_for(database: &str) -> String {
    let url = admin_url();
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b.to_string(), format!("?{q}")),
        None => (url.clone(), String::new()),
    };
    match base.rfind('/') {
        Some(i) if i > "postgres://".len() => format!("{}/{database}{query}", &base[..i]),
        _ => format!("{base}/{database}{query}"),
    }
}

pub async fn connect(url: &str) -> Result<Client, BoxError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.map_err(|e| {
        format!("cannot connect to {url}: {e}; start the local services with deploy/local/services.sh start pg")
    })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A positive integer from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a positive integer")),
        Err(_) => default,
    }
}

/// The database of one bench run.
pub struct BenchDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

impl BenchDb {
    pub async fn create(label: &str) -> Result<BenchDb, BoxError> {
        let name = format!("w2c_bench_{label}_{}", std::process::id());
        let admin = connect(&admin_url()).await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let url = url_for(&name);
        let client = connect(&url).await?;
        Ok(BenchDb { name, url, client })
    }

    /// A pgoutput slot named `<db>_<label>`.
    pub async fn create_slot(&self, label: &str) -> Result<String, BoxError> {
        let slot = format!("{}_{label}", self.name);
        self.client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await?;
        Ok(slot)
    }

    pub async fn current_lsn(&self) -> Result<Lsn, BoxError> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?;
        Ok(row.get::<_, String>(0).parse()?)
    }

    pub async fn wal_bytes_since(&self, from: Lsn) -> Result<i64, BoxError> {
        let row = self
            .client
            .query_one(
                "SELECT (pg_current_wal_lsn() - $1::text::pg_lsn)::bigint",
                &[&from.to_string()],
            )
            .await?;
        Ok(row.get(0))
    }
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run inside a runtime or while unwinding: clean up on a thread with
        // a runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(admin) = connect(&admin_url()).await else {
                    eprintln!("could not connect to drop database {name}: drop it by hand");
                    return;
                };
                for _ in 0..50 {
                    let _ = admin
                        .batch_execute(&format!(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                               WHERE database = '{name}' AND active_pid IS NOT NULL"
                        ))
                        .await;
                    // Slots first (DROP DATABASE refuses while the database has some),
                    // and apart: DROP DATABASE cannot run in the implicit transaction
                    // of a multi-statement query.
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
                        eprintln!("dropped database {name} and its slots");
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                eprintln!("could not drop database {name} or its slots: drop them by hand");
            });
        })
        .join();
    }
}

/// A field of `/proc/self/status` in kB (`VmRSS`, `VmHWM`), or 0 where there is none.
pub fn proc_status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .unwrap_or(0)
}

pub fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// `12345678` as `12,345,678`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
