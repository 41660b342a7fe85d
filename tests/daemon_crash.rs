//! Crash safety: a writer runs while the daemon is killed with SIGKILL at random
//! moments and restarted; at the end an oracle checks every change. Zero misses.
//!
//! Before each write, the writer caches a stale marker under the key that write must
//! invalidate; keys carry a per-write version column, so each marker is removed only by
//! its own write's invalidation: a marker left at the end is a lost invalidation.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::*;
use common::*;
use redis::AsyncCommands;
use serde_json::{json, Value};

const KILLS: usize = 10;

fn write_config(dir: &Path, db: &TestDb, prefix: &str, topic: &str) -> PathBuf {
    std::fs::write(
        dir.join("rules.toml"),
        format!(
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
        ),
    )
    .unwrap();
    let config = dir.join("wal2cache.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "crash"
[postgres]
url = "{url}"
slot = "{db}_c"
publication = "w2c"
[rules]
path = "rules.toml"
[redis]
url = "{redis}"
tag_prefix = "{prefix}:tag:"
[kafka]
brokers = "{kafka}"
topic = "{topic}"
partitions = 2
[pipeline]
batch_size = 50
"#,
            url = db.url,
            db = db.name,
            redis = redis_url(),
            kafka = kafka_brokers(),
        ),
    )
    .unwrap();
    config
}

/// A small deterministic generator (no dependency needed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
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
    let mut r = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut rng = Lcg(0x5eed);
    let mut rows: BTreeMap<i32, (i32, String)> = BTreeMap::new();
    let mut writes = Vec::new();
    let mut next_v = 1;
    while !stop.load(Ordering::Relaxed) {
        let id = rng.next(40) as i32 + 1;
        let v = next_v;
        next_v += 1;
        let name = format!("name-{v}");
        let write = match rows.get(&id).cloned() {
            Some((old, _)) if rng.next(4) == 0 => {
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
    let config = write_config(dir.path(), &db, &prefix, &topic);
    let slot = format!("{}_c", db.name);

    let mut daemon = Daemon::start(&config, &[]);
    wait_streaming(&db, &slot).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(writer(db.url.clone(), prefix.clone(), stop.clone()));

    let mut rng = Lcg(42);
    for round in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(300 + rng.next(1200))).await;
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
    let mut r = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
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
    let topic_for_read = topic.clone();
    let wanted_for_read = wanted.clone();
    let events = tokio::task::spawn_blocking(move || {
        read_topic(&topic_for_read, |evs| {
            let seen: std::collections::HashSet<&str> = evs
                .iter()
                .flat_map(|e| {
                    e["keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|k| k.as_str())
                })
                .collect();
            wanted_for_read.iter().all(|k| seen.contains(k.as_str()))
        })
    })
    .await
    .unwrap();
    let seen: std::collections::HashSet<&str> = events
        .iter()
        .flat_map(|e| {
            e["keys"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str())
        })
        .collect();
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
    let _: () = redis::cmd("UNLINK")
        .arg(
            r.keys::<_, Vec<String>>(format!("{prefix}:*"))
                .await
                .unwrap(),
        )
        .query_async(&mut r)
        .await
        .unwrap_or(());
}
