//! `wal2cache invalidate`: keys, tags, or everything the rules cache, invalidated
//! through the WAL (a transactional logical message) by the running daemon, with the
//! real services: Redis loses what was asked, subscribers get the event, and nothing is
//! written when no daemon streams unless `--force` (then the daemon applies it when it
//! starts).

mod support;

use std::path::Path;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value;
use support::config::ConfigBuilder;
use support::daemon::{run_binary, Daemon};
use support::db::{wait_streaming, TestDb, EXAMPLE_SCHEMA};
use support::env::unique;
use support::kafka::read_topic;
use support::store::{gone, redis, unlink_matching};
use support::wait::eventually;

struct Setup {
    db: TestDb,
    prefix: String,
    topic: String,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup(label: &str) -> Setup {
    let db = TestDb::new(label).await;
    db.exec(EXAMPLE_SCHEMA).await;
    let prefix = unique("inv");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::example(&db, &prefix, &topic).write(dir.path());
    Setup {
        db,
        prefix,
        topic,
        config,
        _dir: dir,
    }
}

fn invalidate(config: &Path, args: &[&str]) -> (i32, String) {
    let mut all = vec!["invalidate", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = run_binary(&all, &[]);
    (code, format!("{out}{err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tags_are_invalidated_through_the_wal() {
    let s = setup("inv_keys").await;
    let daemon = Daemon::start(&s.config, &[]);
    wait_streaming(&s.db, &format!("{}_d", s.db.name)).await;
    let mut r = redis().await;
    let key = format!("{}:anything:1", s.prefix);
    let page = format!("{}:page:1", s.prefix);
    let tag_set = format!("{0}:tag:{0}:list", s.prefix);
    let _: () = r.set(&key, "cached").await.unwrap();
    let _: () = r.set(&page, "cached").await.unwrap();
    let _: () = r.sadd(&tag_set, &page).await.unwrap();

    let tag = format!("{}:list", s.prefix);
    let (code, out) = invalidate(&s.config, &["--key", &key, "--tag", &tag]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("written to the WAL at"), "{out}");
    eventually(
        "the key and the tag's members gone",
        Duration::from_secs(30),
        || async { gone(&r, &[&key, &page, &tag_set]).await },
    )
    .await;
    let events = read_topic(&s.topic, |evs| evs.iter().any(|e| e["op"] == "message")).await;
    let e = events.iter().find(|e| e["op"] == "message").unwrap();
    assert_eq!(e["kind"], "invalidate", "{e}");
    assert_eq!(e["keys"], serde_json::json!([key]), "{e}");
    assert_eq!(e["tags"], serde_json::json!([tag]), "{e}");
    daemon.stop();
    unlink_matching(&mut r, &format!("{}*", s.prefix)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_flushes_what_the_rules_cache_and_tells_subscribers_why() {
    let s = setup("inv_all").await;
    let log = s._dir.path().join("daemon.log");
    let mut daemon = Daemon::start_logging(&s.config, &[("WAL2CACHE_LOG", "info")], &log);
    wait_streaming(&s.db, &format!("{}_d", s.db.name)).await;
    let mut r = redis().await;
    let product = format!("{}:shop:product:v3:42", s.prefix);
    let json = format!("{}:shop:product:json:v3:42", s.prefix);
    let tag_set = format!("{0}:tag:{0}:shop:category:7", s.prefix);
    let page = format!("{}:page:mugs", s.prefix);
    let other = format!("{}-other:keep", s.prefix);
    for k in [&product, &json, &page, &other] {
        let _: () = r.set(k, "cached").await.unwrap();
    }
    let _: () = r.sadd(&tag_set, &page).await.unwrap();

    let (code, out) = invalidate(&s.config, &["--all", "--reason", "deploy 42"]);
    assert_eq!(code, 0, "{out}");
    // SCAN walks the whole shared keyspace once per prefix.
    let flushed = [&product, &json, &page, &tag_set];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !gone(&r, &flushed).await {
        if std::time::Instant::now() > deadline {
            let mut left = Vec::new();
            for k in flushed {
                if r.exists::<_, bool>(k).await.unwrap() {
                    left.push(k.clone());
                }
            }
            let running = daemon.exit_status().is_none();
            panic!(
                "after 60 s still there: {left:?}; daemon running: {running}; daemon log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept: Option<String> = r.get(&other).await.unwrap();
    assert_eq!(
        kept.as_deref(),
        Some("cached"),
        "a key outside the rules' prefixes"
    );
    let events = read_topic(&s.topic, |evs| evs.iter().any(|e| e["kind"] == "flush_all")).await;
    let e: &Value = events.iter().find(|e| e["kind"] == "flush_all").unwrap();
    assert_eq!(e["reason"], "manual", "{e}");
    assert_eq!(e["detail"], "deploy 42", "{e}");
    daemon.stop();
    unlink_matching(&mut r, &format!("{}*", s.prefix)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_daemon_it_is_refused_unless_forced_and_then_applied_at_start() {
    let s = setup("inv_force").await;
    // The slot exists (setup), nobody streams from it.
    let (code, out, err) = run_binary(&["setup", "--config", s.config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let mut r = redis().await;
    let key = format!("{}:anything:2", s.prefix);
    let _: () = r.set(&key, "cached").await.unwrap();

    let (code, out) = invalidate(&s.config, &["--key", &key]);
    assert_eq!(code, 5, "{out}");
    assert!(
        out.contains("no process streams from replication slot"),
        "{out}"
    );
    assert!(out.contains("--force"), "{out}");
    let (code, out) = invalidate(&s.config, &[]);
    assert_eq!(code, 2, "nothing asked: {out}");

    let (code, out) = invalidate(&s.config, &["--key", &key, "--force"]);
    assert_eq!(code, 0, "{out}");
    let exists: bool = r.exists(&key).await.unwrap();
    assert!(exists, "nothing applies it before a daemon streams");
    let daemon = Daemon::start(&s.config, &[]);
    eventually(
        "applied once the daemon streams",
        Duration::from_secs(30),
        || async { gone(&r, &[&key]).await },
    )
    .await;
    daemon.stop();
}
