//! The write-and-check oracle of the crash and takeover tests.
//!
//! Before each write, the writer caches a stale marker under the key that write must
//! invalidate; keys carry a per-write version column, so each marker is removed only by
//! its own write's invalidation: a marker left at the end is a lost invalidation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{json, Value};

use super::config::ConfigBuilder;
use super::db::{connect, TestDb};
use super::kafka::{keys_of, read_topic};
use super::rng::Lcg;
use super::store::redis;
use super::wait::eventually;

/// The `items` table the writer writes, with the replica identity the oracle needs.
#[allow(dead_code)]
pub const ITEMS: &str =
    "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, name text NOT NULL);
     ALTER TABLE items REPLICA IDENTITY FULL;";

/// Two rules on `items`: a key per version (each write's own), and its republished row.
#[allow(dead_code)]
pub fn items_config(db: &TestDb, prefix: &str, topic: &str) -> ConfigBuilder {
    ConfigBuilder::new(db)
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
}

/// One committed write: the row's id, and its version before and after (none for
/// insert's before and delete's after).
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct Write {
    pub id: i32,
    pub before: Option<i32>,
    pub after: Option<i32>,
}

/// Writes to `items` every 2 ms until `stop`, caching before each write a stale marker
/// under the key that write must invalidate: every write committed, and the rows as
/// they end.
#[allow(dead_code)]
pub async fn writer(
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

/// After the writes: a sentinel written last is applied, then every write's marker is
/// gone, every republished value equals its final row (deleted rows have none), and
/// every write has an event naming its key. Returns the number of events read.
#[allow(dead_code)]
pub async fn assert_nothing_lost(
    db: &TestDb,
    prefix: &str,
    topic: &str,
    writes: &[Write],
    rows: &BTreeMap<i32, (i32, String)>,
) -> usize {
    // A sentinel written last: once its value is in Redis, everything before it is.
    // Ids from 1000 on are the sentinels (the writer uses 1 to 40), one per call.
    let id: i32 = db
        .client
        .query_one(
            "INSERT INTO items SELECT 1000 + count(*)::int, 0, 'sentinel' FROM items WHERE id >= 1000 RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut r = redis().await;
    let sentinel = format!("{prefix}:json:{id}");
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
    let events = read_topic(topic, move |evs| {
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
    events.len()
}
