//! Sinks going away: Redis stopped for 10 s during writes, then the broker for 10 s.
//! The daemon keeps running (no crash loop), misses nothing, and its lag recovers.
//!
//! This test stops and starts the local services with deploy/local/services.sh; it runs
//! alone in its binary so that no other test sees the outages.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;
use redis::AsyncCommands;
use serde_json::Value;

const OUTAGE: Duration = Duration::from_secs(10);

fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/services.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "services.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_config(dir: &Path, db: &TestDb, prefix: &str, topic: &str) -> PathBuf {
    std::fs::write(
        dir.join("rules.toml"),
        format!(
            "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:json:{{id}}\"]\naction = \"republish\"\n"
        ),
    )
    .unwrap();
    let config = dir.join("wal2cache.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"outage\"\n[postgres]\nurl = \"{}\"\nslot = \"{}_o\"\npublication = \"w2c\"\n[rules]\npath = \"rules.toml\"\n\
             [redis]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\npartitions = 1\n",
            db.url,
            db.name,
            redis_url(),
            kafka_brokers()
        ),
    )
    .unwrap();
    config
}

/// Writes rows `ids` (v = `v`) one a time for the length of an outage, checking the
/// daemon stays up.
async fn write_through(
    db: &TestDb,
    daemon: &mut Daemon,
    ids: std::ops::RangeInclusive<i32>,
    v: i32,
) {
    let started = Instant::now();
    let per_write = OUTAGE / ids.clone().count() as u32;
    for id in ids {
        db.client
            .execute(
                "INSERT INTO items VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = $2",
                &[&id, &v],
            )
            .await
            .unwrap();
        tokio::time::sleep(per_write).await;
        daemon.assert_running("during the outage");
    }
    assert!(started.elapsed() >= OUTAGE);
}

async fn all_applied(
    r: &redis::aio::MultiplexedConnection,
    prefix: &str,
    ids: std::ops::RangeInclusive<i32>,
    v: i64,
) -> bool {
    let mut r = r.clone();
    for id in ids {
        let got: Option<String> = r.get(format!("{prefix}:json:{id}")).await.unwrap_or(None);
        match got.map(|s| serde_json::from_str::<Value>(&s).unwrap()["v"].as_i64()) {
            Some(Some(x)) if x == v => {}
            _ => return false,
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_then_the_broker_down_for_10_s_lose_nothing() {
    let db = TestDb::new("outage").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)")
        .await;
    let prefix = unique("outage");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, &prefix, &topic);
    let slot = format!("{}_o", db.name);
    let mut daemon = Daemon::start(&config, &[]);
    wait_streaming(&db, &slot).await;

    // Redis away: writes wait in Postgres; then Redis (empty) is back and catches up.
    services(&["stop", "redis"]);
    let stopped = db.confirmed_lsn(&slot).await.unwrap();
    write_through(&db, &mut daemon, 1..=20, 1).await;
    assert_eq!(
        db.confirmed_lsn(&slot).await,
        Some(stopped),
        "nothing is confirmed while Redis is away"
    );
    services(&["start", "redis"]);
    let r = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    eventually(
        "every write to reach Redis",
        Duration::from_secs(60),
        || all_applied(&r, &prefix, 1..=20, 1),
    )
    .await;
    daemon.assert_running("after Redis came back");

    // The broker away (its in-memory topic goes with it): events wait, then flow.
    services(&["stop", "kafka"]);
    write_through(&db, &mut daemon, 1..=20, 2).await;
    services(&["start", "kafka"]);
    eventually(
        "every write to reach Redis again",
        Duration::from_secs(90),
        || all_applied(&r, &prefix, 1..=20, 2),
    )
    .await;
    let topic_read = topic.clone();
    let keys = tokio::task::spawn_blocking(move || {
        keys_of(&read_topic(&topic_read, |e| keys_of(e).len() >= 20)).len()
    })
    .await
    .unwrap();
    assert_eq!(
        keys, 20,
        "every key written during the broker outage has its event"
    );
    daemon.assert_running("after the broker came back");

    // The lag recovers: a last write is applied and confirmed promptly. Applied is not
    // enough (Redis gets it while the broker still refuses, and nothing is confirmed
    // then): the slot must move from where it stood before the write to the end of the
    // write's commit.
    let before = db.confirmed_lsn(&slot).await.unwrap();
    let end = db
        .exec_commit_end("INSERT INTO items VALUES (100, 0)")
        .await;
    assert!(end > before, "the write ends at {end}, after {before}");
    eventually(
        "the last write to be applied and confirmed",
        Duration::from_secs(30),
        || async {
            all_applied(&r, &prefix, 100..=100, 0).await
                && db.confirmed_lsn(&slot).await.is_some_and(|l| l >= end)
        },
    )
    .await;
    daemon.assert_running("at the end");
}
