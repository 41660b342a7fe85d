//! Sinks going away: Redis stopped for 10 s during writes, then the broker for 10 s.
//! The daemon keeps running (no crash loop), misses nothing, and its lag recovers.
//!
//! This test stops and starts the local services with deploy/local/services.sh; it runs
//! alone in its binary so that no other test sees the outages.

mod support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::Value;
use support::config::ConfigBuilder;
use support::db::{wait_streaming, TestDb};
use support::env::unique;
use support::inproc::InProcess;
use support::kafka::{keys_of, read_topic};
use support::services::services;
use support::store::redis;
use support::wait::eventually;

const OUTAGE: Duration = Duration::from_secs(10);

/// `services.sh args` off the runtime's workers: the daemon runs on them meanwhile.
fn services_blocking(args: &[&str]) {
    tokio::task::block_in_place(|| services(args));
}

/// Writes rows `ids` (v = `v`) one a time for the length of an outage, checking the
/// daemon stays up.
async fn write_through(
    db: &TestDb,
    daemon: &mut InProcess,
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
        daemon.assert_running("during the outage").await;
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
    let config = ConfigBuilder::new(&db)
        .name(&format!("outage-{}", db.name))
        .slot_suffix(&db, "o")
        .rules(&format!(
            "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:json:{{id}}\"]\naction = \"republish\"\n"
        ))
        .kafka_topic(&topic)
        .write(dir.path());
    let slot = format!("{}_o", db.name);
    let mut daemon = InProcess::start(&config);
    wait_streaming(&db, &slot).await;

    // Redis away: writes wait in Postgres; then Redis (empty) is back and catches up.
    services_blocking(&["stop", "redis"]);
    let stopped = db.confirmed_lsn(&slot).await.unwrap();
    write_through(&db, &mut daemon, 1..=20, 1).await;
    assert_eq!(
        db.confirmed_lsn(&slot).await,
        Some(stopped),
        "nothing is confirmed while Redis is away"
    );
    services_blocking(&["start", "redis"]);
    let r = redis().await;
    eventually(
        "every write to reach Redis",
        Duration::from_secs(60),
        || all_applied(&r, &prefix, 1..=20, 1),
    )
    .await;
    daemon.assert_running("after Redis came back").await;

    // The broker away (its in-memory topic goes with it): events wait, then flow.
    services_blocking(&["stop", "kafka"]);
    write_through(&db, &mut daemon, 1..=20, 2).await;
    services_blocking(&["start", "kafka"]);
    eventually(
        "every write to reach Redis again",
        Duration::from_secs(90),
        || all_applied(&r, &prefix, 1..=20, 2),
    )
    .await;
    let keys = keys_of(&read_topic(&topic, |e| keys_of(e).len() >= 20).await).len();
    assert_eq!(
        keys, 20,
        "every key written during the broker outage has its event"
    );
    daemon.assert_running("after the broker came back").await;

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
    daemon.assert_running("at the end").await;
    daemon.stop_ok().await;
}
