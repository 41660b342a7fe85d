//! Primary failover with real servers: a primary and a physical standby of their own,
//! the daemon given both hosts (`target_session_attrs=read-write`), writes going on
//! while the primary stops (or crashes) and the standby is promoted.
//! - PostgreSQL 17, failover slots synchronized to the standby, the primary crashing:
//!   the daemon continues on the new primary from the synced slot; nothing lost, no
//!   flush.
//! - PostgreSQL 16 (no failover slots): the new primary has no slot; the daemon
//!   flushes (`flush_all`, `slot_lost`), creates the slot, and nothing stale remains.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value;
use support::cluster::{major_bin as bin, Cluster};
use support::config::ConfigBuilder;
use support::daemon::Daemon;
use support::db::{wait_streaming, TestDb, EXAMPLE_SCHEMA as SCHEMA};
use support::env::unique;
use support::kafka::read_topic;
use support::store::redis;
use support::wait::eventually;

const PRODUCTS: i32 = 20;

const SERVER: [&str; 4] = [
    "wal_level=logical",
    "max_wal_senders=10",
    "max_replication_slots=10",
    "hot_standby=on",
];

/// Updates products round-robin through the multi-host URL until stopped, again and
/// again through a failover (reconnecting on every error); counts the updates that
/// committed, per id.
async fn writer(url: String, stop: Arc<AtomicBool>, committed: Arc<Mutex<HashMap<i32, u32>>>) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut n: i32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_ref() else {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    client = Some(c);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            continue;
        };
        let id = 1 + n % PRODUCTS;
        let updated = c
            .execute(
                "UPDATE products SET price = price + 1, name = $2 WHERE id = $1",
                &[&id, &format!("v{n}")],
            )
            .await;
        match updated {
            Ok(_) => {
                *committed.lock().unwrap().entry(id).or_default() += 1;
                n += 1;
            }
            // Not counted: it may or may not have committed.
            Err(_) => {
                client = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Failover {
    primary: Cluster,
    standby: Cluster,
    db: TestDb,
    prefix: String,
    topic: String,
    dir: tempfile::TempDir,
    log: PathBuf,
    daemon: Daemon,
    stop_writes: Arc<AtomicBool>,
    committed: Arc<Mutex<HashMap<i32, u32>>>,
    writes: tokio::task::JoinHandle<()>,
}

/// Primary and standby of `major`, the example schema with `PRODUCTS` rows, the daemon
/// on both hosts, writes going on.
async fn start(major: u32, standby_settings: &[&str]) -> Failover {
    let primary = Cluster::start(&bin(major), &format!("fo{major}_p"), &SERVER);
    let db = TestDb::on(&primary.url(), &format!("fo{major}")).await;
    db.exec(SCHEMA).await;
    db.exec("INSERT INTO categories VALUES (7, 'mugs')").await;
    db.exec(&format!(
        "INSERT INTO products SELECT i, 'mug-' || i, 7, 'Mug', 1, NULL FROM generate_series(1, {PRODUCTS}) i"
    ))
    .await;
    let mut settings = SERVER.to_vec();
    settings.extend_from_slice(standby_settings);
    let standby = Cluster::standby_of(&primary, &format!("fo{major}_s"), &settings).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
        primary.port, standby.port, db.name
    );
    let prefix = unique(&format!("fo{major}"));
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::example(&db, &prefix, &topic)
        .url(&url)
        .write(dir.path());
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start_logging(&config, &[("WAL2CACHE_LOG", "info")], &log);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    let stop_writes = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(Mutex::new(HashMap::new()));
    let writes = tokio::spawn(writer(url, stop_writes.clone(), committed.clone()));
    Failover {
        primary,
        standby,
        db,
        prefix,
        topic,
        dir,
        log,
        daemon,
        stop_writes,
        committed,
        writes,
    }
}

/// How the old primary goes away.
enum Down {
    /// A fast shutdown: the standby receives all the WAL first.
    Clean,
    /// `pg_ctl stop -m immediate`, as when its host dies: what was not yet sent to the
    /// standby is gone.
    Crash,
}

impl Failover {
    /// Writes for a while, then the primary goes `down` and the standby is promoted;
    /// writes go on on the new primary for a while, then stop.
    async fn fail_over(&mut self, down: Down) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        match down {
            Down::Clean => self.primary.stop(),
            Down::Crash => self.primary.crash(),
        }
        self.standby.promote();
        let before = self.committed_total();
        eventually(
            "writes on the new primary",
            Duration::from_secs(30),
            || async { self.committed_total() > before + 3 * PRODUCTS as u32 },
        )
        .await;
        self.stop_writes.store(true, Ordering::Relaxed);
        (&mut self.writes).await.unwrap();
    }

    fn committed_total(&self) -> u32 {
        self.committed.lock().unwrap().values().sum()
    }

    /// No republished key differs from its row on the new primary; with `present`,
    /// every one is there (absent is never stale).
    async fn assert_redis_not_stale(&self, present: bool) {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "postgres://postgres@127.0.0.1:{}/{}",
                self.standby.port, self.db.name
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT id, name, price::text FROM products ORDER BY id",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), PRODUCTS as usize);
        let mut r = redis().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut differ = Vec::new();
            for row in &rows {
                let id: i32 = row.get(0);
                let want = serde_json::json!({"id": id, "name": row.get::<_, String>(1), "price": row.get::<_, String>(2)});
                let key = format!("{}:shop:product:json:v3:{id}", self.prefix);
                let got: Option<String> = r.get(&key).await.unwrap();
                let got: Option<Value> = got.map(|g| serde_json::from_str(&g).unwrap());
                match got {
                    None if !present => {}
                    Some(got) if got == want => {}
                    got => differ.push(format!("{key}: {got:?}, row {want}")),
                }
            }
            if differ.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Redis differs from the table after 60 s:\n{}\ndaemon log:\n{}",
                differ.join("\n"),
                self.daemon_log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Update events on the topic per product id, once the topic holds at least
/// `committed` of them for every id (or 60 s have passed).
async fn update_events(
    topic: &str,
    prefix: &str,
    committed: &HashMap<i32, u32>,
) -> (HashMap<i32, u32>, Vec<Value>) {
    let count = |events: &[Value], prefix: &str| {
        let mut per_id: HashMap<i32, u32> = HashMap::new();
        for e in events.iter().filter(|e| e["op"] == "update") {
            for k in e["keys"].as_array().into_iter().flatten() {
                if let Some(id) = k
                    .as_str()
                    .and_then(|k| k.strip_prefix(&format!("{prefix}:shop:product:v3:")))
                    .and_then(|id| id.parse().ok())
                {
                    *per_id.entry(id).or_default() += 1;
                }
            }
        }
        per_id
    };
    let wanted = committed.clone();
    let p = prefix.to_string();
    let events = read_topic(topic, move |events| {
        let seen = count(events, &p);
        wanted
            .iter()
            .all(|(id, n)| seen.get(id).copied().unwrap_or(0) >= *n)
    })
    .await;
    (count(&events, prefix), events)
}

/// The primary crashes (no shutdown: nothing more reaches the standby). Commits are
/// synchronous to the standby, so every update the writer saw commit survives the
/// promotion and must have its event; the logical walsender sends nothing the standby
/// lacks (`synchronized_standby_slots`), so Redis cannot hold a value the new primary
/// never had.
#[tokio::test]
async fn on_17_the_daemon_continues_on_the_promoted_standby_from_the_synced_slot() {
    let mut f = start(
        17,
        &["hot_standby_feedback=on", "sync_replication_slots=on"],
    )
    .await;
    // The logical walsender waits for the standby's physical slot; commits wait for
    // the standby (its application_name is the cluster's name).
    f.db.exec("ALTER SYSTEM SET synchronized_standby_slots = 'fo17_s_phys'")
        .await;
    f.db.exec("ALTER SYSTEM SET synchronous_standby_names = 'fo17_s'")
        .await;
    f.db.exec("SELECT pg_reload_conf()").await;
    let slot = format!("{}_d", f.db.name);
    let (standby, conn) = tokio_postgres::connect(
        &format!("postgres://postgres@127.0.0.1:{}/postgres", f.standby.port),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    eventually("the slot synchronized to the standby", Duration::from_secs(90), || async {
        standby
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND synced AND NOT temporary",
                &[&slot],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    f.fail_over(Down::Crash).await;
    f.assert_redis_not_stale(true).await;
    let committed = f.committed.lock().unwrap().clone();
    let (seen, events) = update_events(&f.topic, &f.prefix, &committed).await;
    for (id, n) in &committed {
        let got = seen.get(id).copied().unwrap_or(0);
        assert!(
            got >= *n,
            "product {id}: {n} updates committed, {got} events"
        );
    }
    assert!(
        !events.iter().any(|e| e["kind"] == "flush_all"),
        "a failover with a synced slot must not flush"
    );
    let log = f.daemon_log();
    assert!(log.contains("carries the slot"), "{log}");
    f.daemon.assert_running("after the failover");
    let _ = &f.dir;
}

#[tokio::test]
async fn on_16_the_daemon_flushes_when_the_promoted_standby_has_no_slot() {
    let mut f = start(16, &["hot_standby_feedback=on"]).await;
    f.fail_over(Down::Clean).await;
    let events = read_topic(&f.topic, |events| {
        events.iter().any(|e| e["reason"] == "slot_lost")
    })
    .await;
    let lost = events
        .iter()
        .find(|e| e["reason"] == "slot_lost")
        .unwrap_or_else(|| panic!("no slot_lost flush_all; daemon log:\n{}", f.daemon_log()));
    assert_eq!(lost["kind"], "flush_all");
    assert!(
        lost["detail"].as_str().unwrap().starts_with("slot_missing"),
        "{lost}"
    );
    f.assert_redis_not_stale(false).await;
    f.daemon.assert_running("after the failover");
    let _ = &f.dir;
}
