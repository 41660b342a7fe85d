//! `wal2cache run` and what the broker cannot take or loses: events too large for a
//! Kafka message (a key rendered from a free-text column, a manual invalidation of a
//! huge key or of many keys), and the topic deleted under the running daemon. The
//! daemon keeps running, Redis is invalidated, and the topic carries events that fit.

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value;
use support::config::ConfigBuilder;
use support::daemon::run_binary;
use support::db::{wait_streaming, TestDb};
use support::env::unique;
use support::inproc::{InProcess, Logs};
use support::kafka::{delete_topic, keys_of, read_topic, topic_exists};
use support::store::{gone, redis};
use support::wait::eventually;

const INVALIDATE: &str = include_str!("../migrations/002_invalidate_function.sql");

/// A key rule over a free-text column.
fn rules(prefix: &str) -> String {
    format!("[[rule]]\nname = \"lk\"\ntable = \"public.probe\"\nkeys = [\"{prefix}:lk:{{k}}\"]\n")
}

/// The config of these tests: slot `<db>_k`, the key rule, the topic `topic`.
fn kafka_config(
    dir: &std::path::Path,
    db: &TestDb,
    prefix: &str,
    topic: &str,
) -> std::path::PathBuf {
    ConfigBuilder::new(db)
        .slot_suffix(db, "k")
        .rules(&rules(prefix))
        .kafka_topic(topic)
        .write(dir)
}

fn oversized(e: &Value) -> bool {
    e["kind"] == "flush_all" && e["reason"] == "oversized"
}

// Current-thread: the daemon's log lines are captured from the test's thread.
#[tokio::test]
async fn an_oversized_key_does_not_stop_invalidation() {
    let db = TestDb::new("oversized").await;
    db.exec("CREATE TABLE probe (id int PRIMARY KEY, k text NOT NULL); ALTER TABLE probe REPLICA IDENTITY FULL")
        .await;
    db.exec(INVALIDATE).await;
    let prefix = unique("oversized");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(dir.path(), &db, &prefix, &topic);
    let (log, _guard) = Logs::capture("warn");
    let mut daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_k", db.name)).await;
    let mut r = redis().await;

    // A 600 kB value in the key's column: far more than a Kafka message takes.
    let big = "k".repeat(600_000);
    let big_key = format!("{prefix}:lk:{big}");
    let _: () = r.set(&big_key, "stale").await.unwrap();
    db.client
        .execute("INSERT INTO probe VALUES (1, $1)", &[&big])
        .await
        .unwrap();
    eventually(
        "the 600 kB key to be deleted",
        Duration::from_secs(30),
        || gone(&r, std::slice::from_ref(&big_key)),
    )
    .await;

    // The same through wal2cache.invalidate(): a manual invalidation of a huge key.
    let manual_key = format!("{prefix}:m:{}", "k".repeat(600_000));
    let _: () = r.set(&manual_key, "stale").await.unwrap();
    db.client
        .execute(
            "SELECT wal2cache.invalidate(array[$1 || ':m:' || repeat('k', 600000)])",
            &[&prefix],
        )
        .await
        .unwrap();
    eventually(
        "the manual 600 kB key to be deleted",
        Duration::from_secs(30),
        || gone(&r, std::slice::from_ref(&manual_key)),
    )
    .await;

    // Later small changes are still invalidated and published.
    let small = format!("{prefix}:lk:small");
    let _: () = r.set(&small, "stale").await.unwrap();
    db.exec("INSERT INTO probe VALUES (2, 'small')").await;
    eventually(
        "the small key to be deleted",
        Duration::from_secs(30),
        || gone(&r, std::slice::from_ref(&small)),
    )
    .await;
    daemon.assert_running("after the oversized keys").await;

    let small_read = small.clone();
    let events = read_topic(&topic, move |e| {
        e.iter().filter(|e| oversized(e)).count() >= 2 && keys_of(e).contains(small_read.as_str())
    })
    .await;
    let flushes: Vec<&Value> = events.iter().filter(|e| oversized(e)).collect();
    assert_eq!(flushes.len(), 2, "{events:#?}");
    let row = flushes
        .iter()
        .find(|e| e["table"] == "public.probe")
        .expect("a flush_all for the row");
    assert_eq!(row["op"], "insert");
    let detail = row["detail"].as_str().unwrap();
    assert!(
        detail.contains("rule \"lk\"")
            && detail.contains("public.probe")
            && detail.contains(row["lsn"].as_str().unwrap()),
        "{detail}"
    );
    let manual = flushes
        .iter()
        .find(|e| e["op"] == "message")
        .expect("a flush_all for the message");
    assert!(
        manual["detail"]
            .as_str()
            .unwrap()
            .contains("a wal2cache message"),
        "{manual}"
    );
    for e in &events {
        assert!(
            e.to_string().len() < 10_000,
            "no event carries the huge key"
        );
    }
    let stderr = log.text();
    let warn = stderr
        .lines()
        .find(|l| l.contains("too large for a Kafka event") && l.contains("public.probe"))
        .unwrap_or_else(|| panic!("no WARN naming the table:\n{stderr}"));
    assert!(warn.contains("lk") && warn.contains("lsn="), "{warn}");
    assert!(
        stderr.len() < 20_000,
        "the huge key is never logged whole: {} bytes",
        stderr.len()
    );
    daemon.stop_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_invalidation_of_many_keys_is_split_into_events_that_fit() {
    let db = TestDb::new("split").await;
    db.exec("CREATE TABLE probe (id int PRIMARY KEY, k text NOT NULL); ALTER TABLE probe REPLICA IDENTITY FULL")
        .await;
    db.exec(INVALIDATE).await;
    let prefix = unique("split");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(dir.path(), &db, &prefix, &topic);
    let mut daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_k", db.name)).await;
    let mut r = redis().await;

    // 12,000 keys of about 120 bytes: 1.5 MB of keys in one change.
    let n = 12_000;
    let key = |i: i32| format!("{prefix}:many:{i}:{}", "x".repeat(80));
    for i in [1, n / 2, n] {
        let _: () = r.set(key(i), "stale").await.unwrap();
    }
    db.client
        .execute(
            "SELECT wal2cache.invalidate(array(SELECT $1 || ':many:' || g || ':' || repeat('x', 80) FROM generate_series(1, $2) g))",
            &[&prefix, &n],
        )
        .await
        .unwrap();
    for i in [1, n / 2, n] {
        let k = key(i);
        eventually("the keys to be deleted", Duration::from_secs(30), || {
            gone(&r, std::slice::from_ref(&k))
        })
        .await;
    }
    daemon.assert_running("after the large invalidation").await;
    let events = read_topic(&topic, move |e| keys_of(e).len() >= n as usize).await;
    assert!(
        events.len() >= 2,
        "split into several events: {}",
        events.len()
    );
    let lsn = &events[0]["lsn"];
    for e in &events {
        assert_eq!(
            (&e["kind"], &e["op"], &e["lsn"]),
            (&Value::from("invalidate"), &Value::from("message"), lsn)
        );
        assert!(
            e.to_string().len() <= 900_000,
            "{} bytes",
            e.to_string().len()
        );
    }
    assert_eq!(keys_of(&events).len(), n as usize, "every key, once");
    daemon.stop_ok().await;
}

/// The topic deleted under the running daemon (as a broker without persistence that
/// restarted): the daemon notices at its next failed delivery, creates the topic again,
/// replaces a producer the broker fenced, and later changes arrive on the new topic.
// Current-thread: the daemon's log lines are captured from the test's thread.
#[tokio::test]
async fn the_topic_deleted_under_the_daemon_is_created_again() {
    let db = TestDb::new("topicloss").await;
    db.exec("CREATE TABLE probe (id int PRIMARY KEY, k text NOT NULL); ALTER TABLE probe REPLICA IDENTITY FULL")
        .await;
    let prefix = unique("topicloss");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(dir.path(), &db, &prefix, &topic);
    let (log, _guard) = Logs::capture("info");
    let mut daemon = InProcess::start(&config);
    let slot = format!("{}_k", db.name);
    wait_streaming(&db, &slot).await;

    db.exec("INSERT INTO probe VALUES (1, 'before')").await;
    let before = format!("{prefix}:lk:before");
    let read = before.clone();
    let seen = read_topic(&topic, move |e| keys_of(e).contains(read.as_str())).await;
    assert!(keys_of(&seen).contains(before.as_str()));

    delete_topic(&topic).await;
    eventually("the topic to be gone", Duration::from_secs(30), || async {
        !topic_exists(&topic).await
    })
    .await;
    // The broker here (Tansu 0.6.0) goes on acknowledging writes to the deleted topic
    // (into nothing): no delivery fails, the daemon's own check finds the topic gone,
    // creates it again with a new producer, and says so.
    eventually(
        "the daemon to create the topic again",
        Duration::from_secs(60),
        || async { log.text().contains("was created again") },
    )
    .await;
    assert!(topic_exists(&topic).await);

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
        assert!(gone(&r, std::slice::from_ref(k)).await, "{k} still cached");
    }
    let wanted = after.clone();
    let seen = read_topic(&topic, move |e| {
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
    daemon.assert_running("after the topic came back").await;
    daemon.stop_ok().await;
}

/// With the brokers unreachable, librdkafka repeats the same connection error many
/// times a second, through its log and its error callback: each distinct message is
/// logged at most once per 30 s.
#[tokio::test]
async fn an_unreachable_broker_is_not_a_flood_of_log_lines() {
    let db = TestDb::new("kafka_noise").await;
    db.exec("CREATE TABLE probe (id int PRIMARY KEY, k text NOT NULL); ALTER TABLE probe REPLICA IDENTITY FULL")
        .await;
    let prefix = unique("noise");
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(dir.path(), &db, &prefix, &format!("{prefix}.events"));
    // Nothing listens on port 1: `run` tries for 10 s, then stops with a clear error.
    // The binary: librdkafka logs from threads of its own, all to its stderr.
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        run_binary(
            &["run", "--config", config.to_str().unwrap()],
            &[
                ("WAL2CACHE_LOG", "info"),
                ("WAL2CACHE__KAFKA__BROKERS", "127.0.0.1:1"),
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the Kafka brokers"), "{err}");
    let librdkafka: Vec<&str> = err.lines().filter(|l| l.contains("librdkafka")).collect();
    assert!(
        !librdkafka.is_empty() && librdkafka.len() <= 5,
        "{} librdkafka lines in 10 s:\n{}",
        librdkafka.len(),
        librdkafka.join("\n")
    );
    assert!(
        librdkafka.iter().all(|l| !l.contains("ERROR")),
        "a broker that does not answer is retried, not an error of its own: {librdkafka:#?}"
    );
}
