//! `wal2cache run` and what the broker loses: the topic deleted under the running
//! daemon. The daemon keeps running, Redis is invalidated, and the events arrive on
//! the topic created again.

mod common;

use std::time::Duration;

use common::daemon::*;
use common::*;
use redis::AsyncCommands;
use serde_json::Value;

/// A key rule over a free-text column.
fn rules(prefix: &str) -> String {
    format!("[[rule]]\nname = \"lk\"\ntable = \"public.probe\"\nkeys = [\"{prefix}:lk:{{k}}\"]\n")
}

async fn gone(r: &redis::aio::MultiplexedConnection, key: &str) -> bool {
    let mut r = r.clone();
    !r.exists::<_, bool>(key).await.unwrap()
}

/// Events of the topic until `done` says so (60 s at most).
async fn events(topic: &str, done: impl Fn(&[Value]) -> bool + Send + 'static) -> Vec<Value> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || read_topic(&topic, done))
        .await
        .unwrap()
}

/// The topic deleted under the running daemon (as a broker without persistence that
/// restarted): the daemon notices at its next failed delivery, creates the topic again,
/// replaces a producer the broker fenced, and later changes arrive on the new topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topic_deleted_under_the_daemon_is_created_again() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;

    let db = TestDb::new("topicloss").await;
    db.exec("CREATE TABLE probe (id int PRIMARY KEY, k text NOT NULL); ALTER TABLE probe REPLICA IDENTITY FULL")
        .await;
    let prefix = unique("topicloss");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &db,
        "k",
        &rules(&prefix),
        &redis_url(),
        &topic,
        "",
    );
    let log = dir.path().join("daemon.log");
    let mut daemon = Daemon::start_logging(&config, &[("WAL2CACHE_LOG", "info")], &log);
    let slot = format!("{}_k", db.name);
    wait_streaming(&db, &slot).await;

    db.exec("INSERT INTO probe VALUES (1, 'before')").await;
    let before = format!("{prefix}:lk:before");
    let read = before.clone();
    let seen = events(&topic, move |e| keys_of(e).contains(read.as_str())).await;
    assert!(keys_of(&seen).contains(before.as_str()));

    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .unwrap();
    let deleted = admin
        .delete_topics(
            &[&topic],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("the broker answers DeleteTopics");
    assert!(deleted.iter().all(|r| r.is_ok()), "{deleted:?}");
    let t = topic.clone();
    eventually("the topic to be gone", Duration::from_secs(30), || {
        let t = t.clone();
        async move {
            !tokio::task::spawn_blocking(move || topic_exists(&t))
                .await
                .unwrap()
        }
    })
    .await;
    // The broker here (Tansu 0.6.0) goes on acknowledging writes to the deleted topic
    // (into nothing): no delivery fails, the daemon's own check finds the topic gone,
    // creates it again with a new producer, and says so.
    eventually(
        "the daemon to create the topic again",
        Duration::from_secs(60),
        || async {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("was created again")
        },
    )
    .await;
    let t = topic.clone();
    assert!(tokio::task::spawn_blocking(move || topic_exists(&t))
        .await
        .unwrap());

    // Changes after the loss reach Redis and the new topic, after a flush_all telling
    // subscribers that events may have been lost.
    let mut r = redis().await;
    let after: Vec<String> = (2..=5).map(|i| format!("{prefix}:lk:after{i}")).collect();
    for k in &after {
        let _: () = r.set(k, "stale").await.unwrap();
    }
    for i in 2..=5 {
        db.exec(&format!("INSERT INTO probe VALUES ({i}, 'after{i}')"))
            .await;
    }
    let end = db.current_lsn().await;
    eventually(
        "the changes to be confirmed",
        Duration::from_secs(120),
        || async { db.confirmed_lsn(&slot).await.is_some_and(|l| l >= end) },
    )
    .await;
    for k in &after {
        assert!(gone(&r, k).await, "{k} still cached");
    }
    let wanted = after.clone();
    let seen = events(&topic, move |e| {
        let keys = keys_of(e);
        wanted.iter().all(|k| keys.contains(k.as_str()))
            && e.iter().any(|e| e["reason"] == "topic_lost")
    })
    .await;
    let keys = keys_of(&seen);
    for k in &after {
        assert!(
            keys.contains(k.as_str()),
            "{k} missing from the new topic: {seen:#?}"
        );
    }
    let lost = seen
        .iter()
        .find(|e| e["kind"] == "flush_all" && e["reason"] == "topic_lost")
        .unwrap_or_else(|| panic!("no flush_all for the lost topic: {seen:#?}"));
    assert!(lost["detail"].as_str().unwrap().contains(&topic), "{lost}");
    daemon.assert_running("after the topic came back");
    daemon.stop();
}
