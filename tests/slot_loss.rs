//! Slot loss is loud (invariant 6): when changes may have been missed since the daemon
//! last confirmed a position, `run` flushes the caches (the rules' key prefixes and tag
//! sets in Redis, a `flush_all` with `reason = "slot_lost"` to subscribers) before it
//! streams, or stops with exit code 4 under `on_slot_loss = "fail"`. Each condition on
//! real servers: the slot dropped while the daemon is stopped, the slot invalidated by
//! `max_slot_wal_keep_size`, a slot invalidated for idleness on 18
//! (`idle_replication_slot_timeout`), another cluster answering (a new system
//! identifier).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use serde_json::Value;
use support::cluster::{major_bin, Cluster};
use support::config::ConfigBuilder;
use support::daemon::{run_binary, Daemon};
use support::db::{wait_streaming, TestDb, EXAMPLE_SCHEMA as SCHEMA};
use support::env::unique;
use support::kafka::read_topic;
use support::net::{free_addr, http};
use support::store::redis;
use support::wait::eventually;

/// What an application cached under the example rules' prefixes, and a key of
/// someone else's beside them.
struct Cached {
    prefix: String,
    r: MultiplexedConnection,
}

impl Cached {
    fn key(&self, s: &str) -> String {
        format!("{}:{s}", self.prefix)
    }

    fn tag_set(&self, t: &str) -> String {
        format!("{0}:tag:{0}:{t}", self.prefix)
    }

    fn unrelated(&self) -> String {
        format!("{}-other:keep", self.prefix)
    }

    /// A product key, a republished value and its version sidecar, a list page under
    /// a category tag, and an unrelated key.
    async fn fill(&mut self) {
        let mut r = self.r.clone();
        let _: () = r
            .set(self.key("shop:product:v3:42"), "stale")
            .await
            .unwrap();
        let json = self.key("shop:product:json:v3:42");
        let _: () = r.set(&json, "{\"stale\":true}").await.unwrap();
        let _: () = r
            .set(format!("{{{json}}}:w2c:v"), "ffffffffffffffff00000000")
            .await
            .unwrap();
        let _: () = r.set(self.key("page:mugs:1"), "stale list").await.unwrap();
        let _: () = r
            .sadd(self.tag_set("shop:category:7"), self.key("page:mugs:1"))
            .await
            .unwrap();
        let _: () = r.set(self.unrelated(), "keep").await.unwrap();
    }

    /// The keys `fill` wrote under the rules' prefixes that are still there.
    async fn left(&self) -> Vec<String> {
        let json = self.key("shop:product:json:v3:42");
        let mut left = Vec::new();
        for k in [
            self.key("shop:product:v3:42"),
            json.clone(),
            format!("{{{json}}}:w2c:v"),
            self.key("page:mugs:1"),
            self.tag_set("shop:category:7"),
        ] {
            let exists: bool = self.r.clone().exists(&k).await.unwrap();
            if exists {
                left.push(k);
            }
        }
        left
    }
}

/// The example schema and rules on `db`, a topic of its own, a metrics listener.
struct Setup {
    dir: tempfile::TempDir,
    topic: String,
    metrics: std::net::SocketAddr,
    cached: Cached,
}

async fn setup(db: &TestDb, extra: &[&str]) -> (Setup, PathBuf) {
    db.exec(SCHEMA).await;
    db.exec("INSERT INTO categories VALUES (7, 'mugs')").await;
    db.exec("INSERT INTO products VALUES (42, 'blue-mug', 7, 'Mug', 9.50, NULL)")
        .await;
    let prefix = unique("loss");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_addr();
    let mut builder = ConfigBuilder::example(db, &prefix, &topic).metrics_listen(metrics);
    for line in extra {
        builder = builder.raw("postgres", line);
    }
    let config = builder.write(dir.path());
    let setup = Setup {
        dir,
        topic,
        metrics,
        cached: Cached {
            prefix,
            r: redis().await,
        },
    };
    (setup, config)
}

/// Runs the daemon until it has streamed and confirmed a change, then stops it: the
/// stream record now holds a confirmed position.
async fn run_once(db: &TestDb, config: &Path, log: &Path) {
    let slot = format!("{}_d", db.name);
    let daemon = Daemon::start_logging(config, &[], log);
    wait_streaming(db, &slot).await;
    let before = db.confirmed_lsn(&slot).await.unwrap();
    db.exec("UPDATE products SET price = 10 WHERE id = 42")
        .await;
    eventually("the update confirmed", Duration::from_secs(30), || async {
        db.confirmed_lsn(&slot).await.is_some_and(|l| l > before)
    })
    .await;
    daemon.stop();
}

/// Waits for a `flush_all` with reason `slot_lost` on the topic and returns it.
async fn slot_lost_event(topic: &str) -> Value {
    let events = read_topic(topic, |events| {
        events.iter().any(|e| e["reason"] == "slot_lost")
    })
    .await;
    events
        .into_iter()
        .find(|e| e["reason"] == "slot_lost")
        .unwrap_or_else(|| panic!("no flush_all with reason slot_lost on {topic}"))
}

/// After a loss: the daemon flushes what the rules cover (keys, the version sidecar,
/// the tag set and its member), leaves the rest, tells subscribers, counts it, and
/// then streams again.
async fn assert_flushed_then_streams(db: &TestDb, s: &Setup, daemon: &mut Daemon, reason: &str) {
    eventually(
        "the flush after the slot loss",
        Duration::from_secs(30),
        || async { s.cached.left().await.is_empty() },
    )
    .await;
    let kept: Option<String> = s.cached.r.clone().get(s.cached.unrelated()).await.unwrap();
    assert_eq!(
        kept.as_deref(),
        Some("keep"),
        "a key outside the rules' prefixes was flushed"
    );
    let event = slot_lost_event(&s.topic).await;
    assert_eq!(event["kind"], "flush_all");
    let detail = event["detail"].as_str().unwrap();
    assert!(detail.starts_with(reason), "{detail}");
    let metrics = http(s.metrics, "GET", "/metrics").map(|(_, body)| body);
    let line = format!("wal2cache_slot_losses_total{{reason=\"{reason}\"}} 1");
    assert!(
        metrics.as_deref().is_some_and(|m| m.contains(&line)),
        "{line} missing from {metrics:?}"
    );
    // Streaming again: a new change is applied.
    daemon.assert_running("after the flush");
    db.exec("INSERT INTO products VALUES (43, 'red-mug', 7, 'Red', 8, NULL)")
        .await;
    let json = s.cached.key("shop:product:json:v3:43");
    eventually(
        "a change after the flush applied",
        Duration::from_secs(30),
        || {
            let mut r = s.cached.r.clone();
            let json = json.clone();
            async move { r.exists::<_, bool>(&json).await.unwrap() }
        },
    )
    .await;
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

#[tokio::test]
async fn a_slot_dropped_while_stopped_flushes_the_caches_and_tells_subscribers() {
    let db = TestDb::new("loss_drop").await;
    let (mut s, config) = setup(&db, &[]).await;
    let log = s.dir.path().join("daemon.log");
    run_once(&db, &config, &log).await;
    let slot = format!("{}_d", db.name);
    // What `check` says while nothing is wrong: no word of a loss.
    let (code, out, err) = run_binary(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!format!("{out}{err}").contains("missed"), "{out}{err}");

    db.drop_slot(&slot).await;
    // Missed: nothing reads this change.
    db.exec("UPDATE products SET name = 'Renamed' WHERE id = 42")
        .await;
    s.cached.fill().await;
    let (code, out, err) = run_binary(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let said = format!("{out}{err}");
    assert!(
        said.contains("changes may have been missed: slot_missing")
            && said.contains("flushes the caches"),
        "{said}"
    );

    // What `rules.backfill = "new"` backfilled is forgotten with the flush.
    let name = wal2cache::config::Config::load(&config).unwrap().name;
    let backfilled = wal2cache::sink::redis::backfilled_key(&name);
    let mut r = s.cached.r.clone();
    let () = r.hset(&backfilled, "product_json", "0123").await.unwrap();
    let mut daemon = Daemon::start_logging(&config, &[], &log);
    assert_flushed_then_streams(&db, &s, &mut daemon, "slot_missing").await;
    assert!(
        !r.exists::<_, bool>(&backfilled).await.unwrap(),
        "{backfilled} outlived the flush"
    );
    let logged = read(&log);
    assert!(
        logged.contains("ERROR") && logged.contains("changes may have been missed"),
        "{logged}"
    );
    daemon.stop();
    // The record now matches the new slot: the next start flushes nothing.
    s.cached.fill().await;
    let daemon = Daemon::start_logging(&config, &[], &log);
    // A flush would come before streaming.
    wait_streaming(&db, &slot).await;
    let left = s.cached.left().await;
    let product = s.cached.key("shop:product:v3:42");
    assert!(
        left.contains(&product),
        "a start without a loss flushed {product}"
    );
    daemon.stop();
}

#[tokio::test]
async fn under_fail_a_lost_slot_stops_with_exit_code_4_and_changes_nothing() {
    let db = TestDb::new("loss_fail").await;
    let (mut s, config) = setup(&db, &["on_slot_loss = \"fail\""]).await;
    let log = s.dir.path().join("daemon.log");
    run_once(&db, &config, &log).await;
    let slot = format!("{}_d", db.name);
    db.drop_slot(&slot).await;
    s.cached.fill().await;
    let (code, out, err) = run_binary(&["run", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        err.contains("slot_missing")
            && err.contains("on_slot_loss = \"fail\"")
            && err.contains("on_slot_loss = \"flush\""),
        "{err}"
    );
    assert_eq!(s.cached.left().await.len(), 5, "fail must not flush");
    assert_eq!(
        db.confirmed_lsn(&slot).await,
        None,
        "fail must not create the slot"
    );
    let (code, out, err) = run_binary(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("stops with exit code 4"),
        "{out}{err}"
    );
}

/// A cluster of its own with `settings`, the Debian PostgreSQL 15 binaries.
fn cluster(name: &str, settings: &[&str]) -> Cluster {
    cluster_of(Path::new("/usr/lib/postgresql/15/bin"), name, settings)
}

/// A cluster of its own with `settings`, the server binaries in `bin`.
fn cluster_of(bin: &Path, name: &str, settings: &[&str]) -> Cluster {
    let mut all = vec![
        "wal_level=logical",
        "max_wal_senders=10",
        "max_replication_slots=10",
    ];
    all.extend_from_slice(settings);
    Cluster::start(bin, name, &all)
}

#[tokio::test]
async fn a_slot_that_lost_its_wal_is_created_again_and_the_caches_flushed() {
    let server = cluster("wal_lost", &["max_slot_wal_keep_size=1MB"]);
    let db = TestDb::on(&server.url(), "loss_wal").await;
    let (mut s, config) = setup(&db, &[]).await;
    let log = s.dir.path().join("daemon.log");
    run_once(&db, &config, &log).await;
    let slot = format!("{}_d", db.name);
    // More WAL than the slot may hold back, while the daemon is stopped.
    db.exec("CREATE TABLE filler (x text)").await;
    eventually("the slot invalidated", Duration::from_secs(60), || async {
        db.exec("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
            .await;
        db.exec("SELECT pg_switch_wal()").await;
        db.exec("CHECKPOINT").await;
        let row = db
            .client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        row.get::<_, Option<String>>(0).as_deref() == Some("lost")
    })
    .await;
    s.cached.fill().await;
    let mut daemon = Daemon::start_logging(&config, &[], &log);
    assert_flushed_then_streams(&db, &s, &mut daemon, "wal_lost").await;
    assert!(
        read(&log).contains("dropped the slot that had lost WAL"),
        "{}",
        read(&log)
    );
    daemon.stop();
}

/// PostgreSQL 18 invalidates a slot nobody reads for longer than
/// `idle_replication_slot_timeout` (at a checkpoint): the daemon, stopped meanwhile,
/// finds it invalidated, says why, creates it again and flushes.
#[tokio::test]
async fn a_slot_invalidated_for_idleness_on_18_is_created_again_and_the_caches_flushed() {
    let server = cluster_of(
        &major_bin(18),
        "idle18",
        &["idle_replication_slot_timeout=1s"],
    );
    let db = TestDb::on(&server.url(), "loss_idle").await;
    let (mut s, config) = setup(&db, &[]).await;
    let log = s.dir.path().join("daemon.log");
    run_once(&db, &config, &log).await;
    let slot = format!("{}_d", db.name);
    eventually("the idle slot invalidated", Duration::from_secs(60), || async {
        db.exec("CHECKPOINT").await;
        let row = db
            .client
            .query_one(
                "SELECT wal_status, invalidation_reason FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        row.get::<_, Option<String>>(1).as_deref() == Some("idle_timeout")
    })
    .await;
    s.cached.fill().await;
    let (code, out, err) = run_binary(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("idle_replication_slot_timeout"),
        "check names the reason: {out}{err}"
    );
    let mut daemon = Daemon::start_logging(&config, &[], &log);
    assert_flushed_then_streams(&db, &s, &mut daemon, "wal_lost").await;
    let detail = slot_lost_event(&s.topic).await["detail"].to_string();
    assert!(detail.contains("idle_timeout"), "{detail}");
    daemon.stop();
}

#[tokio::test]
async fn another_cluster_at_the_url_flushes_or_fails() {
    let first = cluster("system_a", &[]);
    let db = TestDb::on(&first.url(), "loss_sys").await;
    let (mut s, config) = setup(&db, &[]).await;
    let log = s.dir.path().join("daemon.log");
    run_once(&db, &config, &log).await;
    // The same database restored into a new cluster, written to the same config name.
    let second = cluster("system_b", &[]);
    let restored = TestDb::on(&second.url(), "loss_sys2").await;
    restored.exec(SCHEMA).await;
    restored
        .exec("INSERT INTO categories VALUES (7, 'mugs'); INSERT INTO products VALUES (42, 'blue-mug', 7, 'Mug', 9.50, NULL)")
        .await;
    let text = std::fs::read_to_string(&config).unwrap();
    let moved = text
        .replace(&db.url, &restored.url)
        .replace(&format!("{}_d", db.name), &format!("{}_d", restored.name));
    assert_ne!(moved, text);
    let fail = s.dir.path().join("fail.toml");
    std::fs::write(
        &fail,
        moved.replace("[postgres]\n", "[postgres]\non_slot_loss = \"fail\"\n"),
    )
    .unwrap();
    std::fs::write(&config, &moved).unwrap();
    s.cached.fill().await;

    let (code, _, err) = run_binary(&["run", "--config", fail.to_str().unwrap()], &[]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("system_identifier"), "{err}");
    assert_eq!(s.cached.left().await.len(), 5, "fail must not flush");

    let mut daemon = Daemon::start_logging(&config, &[], &log);
    assert_flushed_then_streams(&restored, &s, &mut daemon, "system_identifier").await;
    daemon.stop();
}
