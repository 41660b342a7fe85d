//! Crash safety: a writer runs while the daemon is killed with SIGKILL at random
//! moments and restarted; at the end an oracle checks every change. Zero misses.
//!
//! Before each write, the writer caches a stale marker under the key that write must
//! invalidate; keys carry a per-write version column, so each marker is removed only by
//! its own write's invalidation: a marker left at the end is a lost invalidation.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{json, Value};
use support::config::ConfigBuilder;
use support::daemon::Daemon;
use support::db::{connect, wait_streaming, TestDb};
use support::env::unique;
use support::kafka::{keys_of, read_topic};
use support::rng::Lcg;
use support::store::{redis, unlink_matching};
use support::wait::eventually;

const KILLS: usize = 10;

/// Two rules on `items`: a key per version (each write's own), and its republished row.
fn crash_config(dir: &Path, db: &TestDb, prefix: &str, topic: &str) -> PathBuf {
    ConfigBuilder::new(db)
        .name(&format!("crash-{}", db.name))
        .slot_suffix(db, "c")
        .rules(&format!(
            r#"[[rule]]
name = "item"
table = "public.items"
keys = ["{prefix}:item:{{id}}:{{v}}"]
tags = ["{prefix}:items"]

[[rule]]
name = "item_json"
table = "public.items"
keys = ["{prefix}:json:{{id}}"]
action = "republish"
"#
        ))
        .redis_key("tag_prefix", format!("{prefix}:tag:"))
        .kafka_topic(topic)
        .kafka_key("partitions", 2)
        .pipeline("batch_size", 50)
        .write(dir)
}

/// One committed write: the row's id, and its version before and after (none for
/// insert's before and delete's after).
#[derive(Debug, Clone)]
struct Write {
    id: i32,
    before: Option<i32>,
    after: Option<i32>,
}

async fn writer(
    db_url: String,
    prefix: String,
    stop: Arc<AtomicBool>,
) -> (Vec<Write>, BTreeMap<i32, (i32, String)>) {
    let client = connect(&db_url).await;
    let mut r = redis().await;
    let mut rng = Lcg(0x5eed);
    let mut rows: BTreeMap<i32, (i32, String)> = BTreeMap::new();
    let mut writes = Vec::new();
    let mut next_v = 1;
    while !stop.load(Ordering::Relaxed) {
        let id = rng.below(40) as i32 + 1;
        let v = next_v;
        next_v += 1;
        let name = format!("name-{v}");
        let write = match rows.get(&id).cloned() {
            Some((old, _)) if rng.below(4) == 0 => {
                // An application re-cached the old row since its last invalidation.
                let _: () = r
                    .set(format!("{prefix}:item:{id}:{old}"), "stale")
                    .await
                    .unwrap();
                client
                    .execute("DELETE FROM items WHERE id = $1", &[&id])
                    .await
                    .unwrap();
                rows.remove(&id);
                Write {
                    id,
                    before: Some(old),
                    after: None,
                }
            }
            Some((old, _)) => {
                let _: () = r
                    .set(format!("{prefix}:item:{id}:{v}"), "stale")
                    .await
                    .unwrap();
                client
                    .execute(
                        "UPDATE items SET v = $2, name = $3 WHERE id = $1",
                        &[&id, &v, &name],
                    )
                    .await
                    .unwrap();
                rows.insert(id, (v, name));
                Write {
                    id,
                    before: Some(old),
                    after: Some(v),
                }
            }
            None => {
                let _: () = r
                    .set(format!("{prefix}:item:{id}:{v}"), "stale")
                    .await
                    .unwrap();
                client
                    .execute("INSERT INTO items VALUES ($1, $2, $3)", &[&id, &v, &name])
                    .await
                    .unwrap();
                rows.insert(id, (v, name));
                Write {
                    id,
                    before: None,
                    after: Some(v),
                }
            }
        };
        writes.push(write);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (writes, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_invalidation() {
    let db = TestDb::new("crash").await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, name text NOT NULL);
         ALTER TABLE items REPLICA IDENTITY FULL;",
    )
    .await;
    let prefix = unique("crash");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = crash_config(dir.path(), &db, &prefix, &topic);
    let slot = format!("{}_c", db.name);

    let mut daemon = Daemon::start(&config, &[]);
    wait_streaming(&db, &slot).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(writer(db.url.clone(), prefix.clone(), stop.clone()));

    let mut rng = Lcg(42);
    for round in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        drop(daemon); // SIGKILL, and reap it
        assert!(
            !writing.is_finished(),
            "the writer failed during round {round}"
        );
        daemon = Daemon::start(&config, &[]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (writes, rows) = writing.await.unwrap();
    assert!(writes.len() > 500, "only {} writes", writes.len());

    // A sentinel written last: once its value is in Redis, everything before it is.
    db.exec("INSERT INTO items VALUES (1000, 0, 'sentinel')")
        .await;
    let mut r = redis().await;
    let sentinel = format!("{prefix}:json:1000");
    eventually(
        "the sentinel to be applied",
        Duration::from_secs(60),
        || {
            let mut r = r.clone();
            let key = sentinel.clone();
            async move { r.exists::<_, bool>(&key).await.unwrap() }
        },
    )
    .await;

    // 1. Every delete-rule key a write had to invalidate is gone.
    let markers: Vec<String> = r.keys(format!("{prefix}:item:*")).await.unwrap();
    assert!(
        markers.is_empty(),
        "{} lost invalidations, e.g. {:?}",
        markers.len(),
        &markers[..markers.len().min(5)]
    );

    // 2. Every republished value equals the final row; deleted rows have none.
    for id in 1..=40 {
        let got: Option<String> = r.get(format!("{prefix}:json:{id}")).await.unwrap();
        match rows.get(&id) {
            Some((v, name)) => {
                let got: Value = serde_json::from_str(
                    &got.unwrap_or_else(|| panic!("row {id} not republished")),
                )
                .unwrap();
                assert_eq!(got, json!({"id": id, "v": v, "name": name}), "row {id}");
            }
            None => assert!(got.is_none(), "deleted row {id} still cached: {got:?}"),
        }
    }

    // 3. Every write has an event naming its key.
    let wanted: Vec<String> = writes
        .iter()
        .map(|w| format!("{prefix}:item:{}:{}", w.id, w.after.or(w.before).unwrap()))
        .collect();
    let wanted_for_read = wanted.clone();
    let events = read_topic(&topic, move |evs| {
        let seen = keys_of(evs);
        wanted_for_read.iter().all(|k| seen.contains(k.as_str()))
    })
    .await;
    let seen = keys_of(&events);
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|k| !seen.contains(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} writes without an event, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    println!(
        "{} writes, {KILLS} SIGKILLs, {} events (duplicates from replays included), zero misses",
        writes.len(),
        events.len()
    );

    drop(daemon);
    unlink_matching(&mut r, &format!("{prefix}:*")).await;
}
