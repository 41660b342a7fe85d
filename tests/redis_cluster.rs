//! The Redis sink in cluster mode, against the local 3-master Redis Cluster
//! (`deploy/local/services.sh start redis-cluster`, `WAL2CACHE_TEST_REDIS_CLUSTER`):
//! deletes, republishes, tombstones, tag purges and prefix flushes whose keys spread
//! over every slot and master, through `RedisSink::apply` directly. Every test works
//! under a key prefix of its own. Also the sink's errors and retries on a single
//! server (the shared one, or a private `redis-server` for tests that break it).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::AsyncCommands;
use support::env::{redis_cluster_url, redis_url, unique};
use support::inproc::Logs;
use support::store::{scan_page, PrivateRedis};
use support::wait::eventually;
use tokio::sync::watch;
use wal2cache::config::{Config, RedisConfig};
use wal2cache::plan::{Plan, Republish};
use wal2cache::sink::redis::{version_key, RedisSink};
use wal2cache::sink::{Batch, Item, Origin, Sink as _, SinkError, Version};
use wal2cache::Lsn;

/// The sink, and the stop sender that must outlive it.
struct Sink {
    sink: RedisSink,
    _stop: watch::Sender<bool>,
}

fn cluster_config(prefix: &str) -> RedisConfig {
    RedisConfig {
        url: redis_cluster_url(),
        tag_prefix: format!("{prefix}:tag:"),
        cluster: true,
        nodes: vec![],
        ..RedisConfig::without_tls()
    }
}

async fn connect_sink(config: RedisConfig) -> Sink {
    let (stop, stop_rx) = watch::channel(false);
    let sink = RedisSink::connect(&config, stop_rx)
        .await
        .unwrap_or_else(|e| {
            panic!("{e}: start the cluster with deploy/local/services.sh start redis-cluster")
        });
    Sink { sink, _stop: stop }
}

impl Sink {
    async fn apply(&mut self, items: Vec<Item>) -> Result<(), SinkError> {
        self.apply_batch(Batch {
            items,
            ..Batch::default()
        })
        .await
    }

    async fn apply_batch(&mut self, batch: Batch) -> Result<(), SinkError> {
        tokio::time::timeout(Duration::from_secs(30), self.sink.apply(&batch))
            .await
            .expect("apply returned within 30 s")
    }
}

fn item(lsn: u64, seq: u32, plan: Plan) -> Item {
    Item {
        origin: Origin {
            version: version(lsn, seq),
            xid: 7,
            commit_time: 0,
            table: Some("public.t".into()),
            op: "update",
        },
        plan: Arc::new(plan),
    }
}

fn version(lsn: u64, seq: u32) -> Version {
    Version {
        commit_lsn: Lsn(lsn),
        seq,
    }
}

fn republish(key: &str, value: &str) -> Republish {
    Republish {
        key: key.into(),
        value: Arc::from(value),
        ttl: Some(Duration::from_secs(600)),
    }
}

/// A plain cluster connection for the test's own reads and writes.
async fn checker() -> ClusterConnection {
    ClusterClient::new(vec![redis_cluster_url()])
        .unwrap()
        .get_async_connection()
        .await
        .expect("Redis Cluster runs: deploy/local/services.sh start redis-cluster")
}

/// Every master's address, from CLUSTER NODES.
async fn masters(conn: &mut ClusterConnection) -> Vec<String> {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("NODES");
    let nodes: String = redis::from_redis_value(
        conn.route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await
            .unwrap(),
    )
    .unwrap();
    let masters: Vec<String> = nodes
        .lines()
        .filter(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("master")))
        .map(|l| {
            l.split(' ')
                .nth(1)
                .unwrap()
                .split('@')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(masters.len(), 3, "a 3-master cluster: {nodes}");
    masters
}

/// How many keys match `pattern` on each master.
async fn count_per_master(conn: &mut ClusterConnection, pattern: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for addr in masters(conn).await {
        let mut node = redis::Client::open(format!("redis://{addr}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut cursor: u64 = 0;
        let mut n = 0;
        loop {
            let (next, keys) = scan_page(&mut node, cursor, pattern).await.unwrap();
            n += keys.len();
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.insert(addr, n);
    }
    out
}

async fn exists(conn: &mut ClusterConnection, key: &str) -> bool {
    conn.exists(key).await.unwrap()
}

async fn get(conn: &mut ClusterConnection, key: &str) -> Option<String> {
    conn.get(key).await.unwrap()
}

async fn set_all(conn: &mut ClusterConnection, keys: &[String]) {
    for k in keys {
        let () = conn.set(k, "cached").await.unwrap();
    }
}

fn distinct_slots(keys: &[String]) -> usize {
    keys.iter().map(Slot::for_key).collect::<HashSet<_>>().len()
}

/// A unique prefix whose keys `{prefix}:{part}:0..n` fall in more than `min` slots.
/// CRC16 is linear, so a few prefixes map sequential suffixes onto few slots; those
/// are skipped rather than left to make a test fail by chance.
fn spread_prefix(name: &str, part: &str, n: usize, min: usize) -> String {
    loop {
        let prefix = unique(name);
        let keys: Vec<String> = (0..n).map(|i| format!("{prefix}:{part}:{i}")).collect();
        if distinct_slots(&keys) > min {
            return prefix;
        }
    }
}

#[tokio::test]
async fn deletes_many_keys_across_slots() {
    let prefix = spread_prefix("del", "k", 400, 350);
    let mut conn = checker().await;
    let keys: Vec<String> = (0..400).map(|i| format!("{prefix}:k:{i}")).collect();
    assert!(distinct_slots(&keys) > 350, "the keys spread over slots");
    set_all(&mut conn, &keys).await;
    let kept = format!("{prefix}:kept");
    let () = conn.set(&kept, "stays").await.unwrap();
    let per_master = count_per_master(&mut conn, &format!("{prefix}:k:*")).await;
    assert!(per_master.values().all(|&n| n > 50), "{per_master:?}");

    let mut sink = connect_sink(cluster_config(&prefix)).await;
    // One item with 300 keys over ~290 slots, then one item per remaining key.
    let mut items = vec![item(
        100,
        0,
        Plan {
            delete: keys[..300].to_vec(),
            ..Plan::default()
        },
    )];
    for (i, k) in keys[300..].iter().enumerate() {
        items.push(item(
            100,
            1 + i as u32,
            Plan {
                delete: vec![k.clone()],
                ..Plan::default()
            },
        ));
    }
    sink.apply(items.clone()).await.unwrap();
    for k in &keys {
        assert!(!exists(&mut conn, k).await, "{k} was deleted");
    }
    assert_eq!(get(&mut conn, &kept).await.as_deref(), Some("stays"));
    // Idempotent: the same batch again.
    sink.apply(items).await.unwrap();
    assert_eq!(
        count_per_master(&mut conn, &format!("{prefix}:k:*"))
            .await
            .values()
            .sum::<usize>(),
        0
    );
    let () = conn.del(&kept).await.unwrap();
}

#[tokio::test]
async fn republish_writes_value_and_version_and_refuses_older() {
    let prefix = spread_prefix("rep", "p", 60, 50);
    let mut conn = checker().await;
    let mut sink = connect_sink(cluster_config(&prefix)).await;
    let keys: Vec<String> = (0..60).map(|i| format!("{prefix}:p:{i}")).collect();
    assert!(distinct_slots(&keys) > 50);
    let plan = |value: &str| Plan {
        republish: keys.iter().map(|k| republish(k, value)).collect(),
        ..Plan::default()
    };

    sink.apply(vec![item(0x200, 3, plan(r#"{"v":2}"#))])
        .await
        .unwrap();
    for k in &keys {
        assert_eq!(
            get(&mut conn, k).await.as_deref(),
            Some(r#"{"v":2}"#),
            "{k}"
        );
        assert_eq!(
            get(&mut conn, &version_key(k)).await,
            Some(version(0x200, 3).encode()),
            "version of {k}"
        );
        let ttl: i64 = conn.ttl(k).await.unwrap();
        assert!(ttl > 500 && ttl <= 600, "ttl {ttl}");
        let keep: i64 = conn.ttl(version_key(k)).await.unwrap();
        assert!(keep > 86_000, "version ttl {keep}");
    }

    assert_eq!(sink.sink.refused(), 0, "nothing refused yet");
    // Older (by LSN, then by position) and equal versions are refused.
    sink.apply(vec![
        item(0x100, 9, plan(r#"{"v":1}"#)),
        item(0x200, 2, plan(r#"{"v":1}"#)),
        item(0x200, 3, plan(r#"{"v":"replay"}"#)),
    ])
    .await
    .unwrap();
    // Coalesced to one write per key (the newest), refused on every master.
    assert_eq!(sink.sink.refused(), 60, "one refusal per key");
    for k in &keys {
        assert_eq!(
            get(&mut conn, k).await.as_deref(),
            Some(r#"{"v":2}"#),
            "{k}"
        );
        assert_eq!(
            get(&mut conn, &version_key(k)).await,
            Some(version(0x200, 3).encode())
        );
    }

    // Newer wins; within one batch the last of a key's commands wins.
    sink.apply(vec![
        item(0x300, 0, plan(r#"{"v":3}"#)),
        item(0x300, 1, plan(r#"{"v":4}"#)),
    ])
    .await
    .unwrap();
    for k in &keys {
        assert_eq!(
            get(&mut conn, k).await.as_deref(),
            Some(r#"{"v":4}"#),
            "{k}"
        );
    }

    // The scripts flushed from every master (a restart): loaded again, then applied.
    for addr in masters(&mut conn).await {
        let mut node = redis::Client::open(format!("redis://{addr}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut node)
            .await
            .unwrap();
    }
    sink.apply(vec![item(0x400, 0, plan(r#"{"v":5}"#))])
        .await
        .unwrap();
    for k in &keys {
        assert_eq!(
            get(&mut conn, k).await.as_deref(),
            Some(r#"{"v":5}"#),
            "{k}"
        );
        let () = conn.del(&[k.clone(), version_key(k)]).await.unwrap();
    }
}

/// A settled batch (a backfill's page once the stream has confirmed past it): each
/// value yields to a newer version stored beside its key (a change or a tombstone the
/// stream wrote since), overwrites an older one, and leaves no version of its own
/// (the sidecar, when there is one, stays as it was); TTLs as the rules say, several
/// in one batch.
async fn settled_batch<C: redis::aio::ConnectionLike + Clone + Send + Sync>(
    sink: &mut Sink,
    conn: &mut C,
    prefix: &str,
) {
    let keys: Vec<String> = (0..80).map(|i| format!("{prefix}:s:{i}")).collect();
    let backfill = version(0x500, u32::MAX);
    let newer = version(0x600, 0).encode();
    let older = version(0x400, 7).encode();
    for (i, k) in keys.iter().enumerate() {
        match i / 20 {
            // The stream republished it since the snapshot.
            0 => {
                let () = conn.set(k, "stream").await.unwrap();
                let () = conn.set(version_key(k), &newer).await.unwrap();
            }
            // The stream deleted it since: a tombstone.
            1 => {
                let () = conn.set(version_key(k), &newer).await.unwrap();
            }
            // Written before the snapshot.
            2 => {
                let () = conn.set(k, "before").await.unwrap();
                let () = conn.set(version_key(k), &older).await.unwrap();
            }
            // Never written.
            _ => {}
        }
    }
    let plan = Plan {
        republish: keys
            .iter()
            .enumerate()
            .map(|(i, k)| Republish {
                key: k.clone(),
                value: Arc::from(r#"{"v":"backfill"}"#),
                ttl: (i % 2 == 0).then_some(Duration::from_secs(600)),
            })
            .collect(),
        ..Plan::default()
    };
    let batch = Batch {
        items: vec![Item {
            origin: Origin {
                version: backfill,
                xid: 0,
                commit_time: 0,
                table: Some("public.t".into()),
                op: "backfill",
            },
            plan: Arc::new(plan),
        }],
        settled: true,
        ..Batch::default()
    };
    sink.apply_batch(batch).await.unwrap();
    assert_eq!(
        sink.sink.refused(),
        40,
        "the 40 keys with a newer version refused"
    );
    for (i, k) in keys.iter().enumerate() {
        let value: Option<String> = conn.get(k).await.unwrap();
        let sidecar: Option<String> = conn.get(version_key(k)).await.unwrap();
        let ttl: i64 = conn.ttl(k).await.unwrap();
        match i / 20 {
            0 => assert_eq!(
                (value.as_deref(), sidecar.as_deref()),
                (Some("stream"), Some(newer.as_str())),
                "{k}"
            ),
            1 => assert_eq!(
                (value.as_deref(), sidecar.as_deref()),
                (None, Some(newer.as_str())),
                "{k}"
            ),
            2 => assert_eq!(
                (value.as_deref(), sidecar.as_deref()),
                (Some(r#"{"v":"backfill"}"#), Some(older.as_str())),
                "{k}"
            ),
            _ => assert_eq!(
                (value.as_deref(), sidecar.as_deref()),
                (Some(r#"{"v":"backfill"}"#), None),
                "{k}"
            ),
        }
        if i >= 40 {
            match i % 2 {
                0 => assert!(ttl > 500 && ttl <= 600, "{k}: ttl {ttl}"),
                _ => assert_eq!(ttl, -1, "{k}: no ttl"),
            }
        }
        let () = conn.del(&[k.clone(), version_key(k)]).await.unwrap();
    }
}

#[tokio::test]
async fn a_settled_batch_yields_to_newer_versions_and_writes_none_in_every_slot() {
    let prefix = spread_prefix("settled", "s", 80, 60);
    let mut sink = connect_sink(cluster_config(&prefix)).await;
    let mut conn = checker().await;
    settled_batch(&mut sink, &mut conn, &prefix).await;
}

#[tokio::test]
async fn a_settled_batch_yields_to_newer_versions_and_writes_none_on_a_single_server() {
    let prefix = unique("settled1");
    let (stop, stop_rx) = watch::channel(false);
    let config = RedisConfig {
        url: redis_url(),
        tag_prefix: format!("{prefix}:tag:"),
        ..RedisConfig::without_tls()
    };
    let mut sink = Sink {
        sink: RedisSink::connect(&config, stop_rx).await.unwrap(),
        _stop: stop,
    };
    let mut conn = support::store::redis().await;
    settled_batch(&mut sink, &mut conn, &prefix).await;
}

#[tokio::test]
async fn a_key_with_a_brace_but_no_hash_tag_keeps_its_version_in_its_slot() {
    let prefix = unique("brace");
    let mut conn = checker().await;
    let mut sink = connect_sink(cluster_config(&prefix)).await;
    let key = format!("{prefix}:odd}}key");
    assert_eq!(Slot::for_key(version_key(&key)), Slot::for_key(&key));
    sink.apply(vec![item(
        0x10,
        0,
        Plan {
            republish: vec![republish(&key, "1")],
            ..Plan::default()
        },
    )])
    .await
    .unwrap();
    assert_eq!(get(&mut conn, &key).await.as_deref(), Some("1"));
    assert_eq!(
        get(&mut conn, &version_key(&key)).await,
        Some(version(0x10, 0).encode())
    );
    let () = conn.del(&[key.clone(), version_key(&key)]).await.unwrap();
}

#[tokio::test]
async fn tombstone_deletes_and_keeps_the_version() {
    let prefix = unique("tomb");
    let mut conn = checker().await;
    let mut sink = connect_sink(cluster_config(&prefix)).await;
    let keys: Vec<String> = (0..40).map(|i| format!("{prefix}:t:{i}")).collect();
    let rep = |value: &str| Plan {
        republish: keys.iter().map(|k| republish(k, value)).collect(),
        ..Plan::default()
    };
    let tomb = Plan {
        delete: keys.clone(),
        tombstones: keys.clone(),
        ..Plan::default()
    };

    sink.apply(vec![item(100, 0, rep("alive"))]).await.unwrap();
    sink.apply(vec![item(150, 0, tomb.clone())]).await.unwrap();
    for k in &keys {
        assert!(!exists(&mut conn, k).await, "{k} deleted");
        assert_eq!(
            get(&mut conn, &version_key(k)).await,
            Some(version(150, 0).encode()),
            "tombstone of {k}"
        );
        let keep: i64 = conn.ttl(version_key(k)).await.unwrap();
        assert!(keep > 86_000, "tombstone ttl {keep}");
    }
    // A replay of the older republish cannot bring the value back; nor can an older
    // tombstone move the version back.
    sink.apply(vec![item(120, 0, rep("stale")), item(110, 0, tomb.clone())])
        .await
        .unwrap();
    for k in &keys {
        assert!(!exists(&mut conn, k).await, "{k} stays deleted");
        assert_eq!(
            get(&mut conn, &version_key(k)).await,
            Some(version(150, 0).encode())
        );
    }
    // A newer tombstone of a value written meanwhile by someone else: deleted.
    set_all(&mut conn, &keys).await;
    sink.apply(vec![item(160, 0, tomb.clone())]).await.unwrap();
    for k in &keys {
        assert!(!exists(&mut conn, k).await, "{k} deleted again");
    }
    // A newer republish is written.
    sink.apply(vec![item(200, 0, rep("back"))]).await.unwrap();
    for k in &keys {
        assert_eq!(get(&mut conn, k).await.as_deref(), Some("back"));
        let () = conn.del(&[k.clone(), version_key(k)]).await.unwrap();
    }
}

#[tokio::test]
async fn tag_purge_unlinks_members_in_every_slot() {
    let prefix = spread_prefix("tag", "red", 150, 120);
    let mut conn = checker().await;
    let mut sink = connect_sink(cluster_config(&prefix)).await;
    let red: Vec<String> = (0..150).map(|i| format!("{prefix}:red:{i}")).collect();
    let blue: Vec<String> = (0..50).map(|i| format!("{prefix}:blue:{i}")).collect();
    let shared = format!("{prefix}:both");
    let untagged = format!("{prefix}:untagged");
    let red_set = format!("{prefix}:tag:red");
    let blue_set = format!("{prefix}:tag:blue");
    let other_set = format!("{prefix}:tag:other");
    assert!(distinct_slots(&red) > 120);
    set_all(&mut conn, &red).await;
    set_all(&mut conn, &blue).await;
    set_all(&mut conn, &[shared.clone(), untagged.clone()]).await;
    let () = conn.sadd(&red_set, &red).await.unwrap();
    let () = conn.sadd(&red_set, &shared).await.unwrap();
    let () = conn
        .sadd(&red_set, format!("{prefix}:never-cached"))
        .await
        .unwrap();
    let () = conn.sadd(&blue_set, &blue).await.unwrap();
    let () = conn.sadd(&blue_set, &shared).await.unwrap();
    let () = conn.sadd(&other_set, &untagged).await.unwrap();

    // The purge comes after a republish of one of its members in the same batch: the
    // member is purged (the purges of a batch run after its key writes).
    let member = red[7].clone();
    sink.apply(vec![
        item(
            100,
            0,
            Plan {
                republish: vec![republish(&member, "fresh")],
                ..Plan::default()
            },
        ),
        item(
            100,
            1,
            Plan {
                purge_tags: vec!["red".into(), "blue".into()],
                ..Plan::default()
            },
        ),
        item(
            100,
            2,
            Plan {
                purge_tags: vec!["red".into(), "empty".into()],
                ..Plan::default()
            },
        ),
    ])
    .await
    .unwrap();
    for k in red.iter().chain(&blue).chain([&shared]) {
        assert!(!exists(&mut conn, k).await, "{k} purged");
    }
    assert!(!exists(&mut conn, &red_set).await, "the red set is gone");
    assert!(!exists(&mut conn, &blue_set).await, "the blue set is gone");
    assert_eq!(get(&mut conn, &untagged).await.as_deref(), Some("cached"));
    assert!(
        exists(&mut conn, &other_set).await,
        "another tag's set stays"
    );

    // Idempotent: purging again (sets gone) is fine.
    sink.apply(vec![item(
        101,
        0,
        Plan {
            purge_tags: vec!["red".into()],
            ..Plan::default()
        },
    )])
    .await
    .unwrap();
    let () = conn
        .del(&[untagged, other_set, version_key(&member)])
        .await
        .unwrap();
}

#[tokio::test]
async fn prefix_flush_scans_every_master() {
    let prefix = unique("flush");
    let mut conn = checker().await;
    let mut sink = connect_sink(cluster_config(&prefix)).await;
    let doomed: Vec<String> = (0..300).map(|i| format!("{prefix}:f:{i}")).collect();
    let kept: Vec<String> = (0..30).map(|i| format!("{prefix}:g:{i}")).collect();
    set_all(&mut conn, &doomed).await;
    set_all(&mut conn, &kept).await;
    // A key whose prefix has glob characters of its own, matched literally.
    let glob_prefix = format!("{prefix}:h[1]*:");
    let glob_key = format!("{glob_prefix}x");
    let glob_lookalike = format!("{prefix}:h1zz:x");
    set_all(&mut conn, &[glob_key.clone(), glob_lookalike.clone()]).await;
    let before = count_per_master(&mut conn, &format!("{prefix}:f:*")).await;
    assert!(
        before.values().all(|&n| n > 50),
        "on every master: {before:?}"
    );

    let before_flush = format!("{prefix}:f:written-before");
    let after_flush = format!("{prefix}:f:written-after");
    sink.apply(vec![
        // Before the flush in WAL order: flushed with the rest.
        item(
            100,
            0,
            Plan {
                republish: vec![republish(&before_flush, "1")],
                ..Plan::default()
            },
        ),
        // The flush; its own writes come after it, as in the standalone pipeline.
        item(
            100,
            1,
            Plan {
                flush_prefixes: vec![format!("{prefix}:f:"), glob_prefix.clone()],
                flush_all: true,
                republish: vec![republish(&after_flush, "2")],
                ..Plan::default()
            },
        ),
    ])
    .await
    .unwrap();
    let after = count_per_master(&mut conn, &format!("{prefix}:f:*")).await;
    assert_eq!(after.values().sum::<usize>(), 1, "{after:?}");
    assert!(!exists(&mut conn, &before_flush).await);
    assert_eq!(get(&mut conn, &after_flush).await.as_deref(), Some("2"));
    assert!(!exists(&mut conn, &glob_key).await);
    assert!(
        exists(&mut conn, &glob_lookalike).await,
        "globs are literal"
    );
    for k in &kept {
        assert!(exists(&mut conn, k).await, "{k} is under another prefix");
    }
    let mut cleanup = kept.clone();
    cleanup.extend([
        glob_lookalike,
        after_flush.clone(),
        version_key(&after_flush),
        version_key(&before_flush),
    ]);
    for k in cleanup {
        let () = conn.del(&k).await.unwrap();
    }
}

#[tokio::test]
async fn a_tag_key_of_the_wrong_type_is_poison_naming_it() {
    let prefix = unique("poison");
    let mut conn = checker().await;
    let tag_key = format!("{prefix}:tag:broken");
    let () = conn.set(&tag_key, "not a set").await.unwrap();
    let mut sink = connect_sink(cluster_config(&prefix)).await;
    let err = sink
        .apply(vec![
            item(
                100,
                0,
                Plan {
                    delete: vec![format!("{prefix}:fine")],
                    ..Plan::default()
                },
            ),
            item(
                100,
                1,
                Plan {
                    purge_tags: vec!["broken".into()],
                    ..Plan::default()
                },
            ),
        ])
        .await
        .unwrap_err();
    match &err {
        SinkError::RedisPoison {
            command,
            key,
            origin,
            message,
            ..
        } => {
            assert_eq!(*command, "a tag purge (SMEMBERS)", "{err}");
            assert_eq!(key, &tag_key);
            assert!(origin.contains("public.t update"), "{origin}");
            assert!(message.contains("WRONGTYPE"), "{message}");
        }
        other => panic!("expected poison, got {other}"),
    }
    let () = conn.del(&tag_key).await.unwrap();
}

/// The same error on a single server, where the purge is a Lua script: poison too, not
/// retried forever.
#[tokio::test]
async fn a_tag_key_of_the_wrong_type_is_poison_on_a_single_server_too() {
    let prefix = unique("poison1");
    let mut plain = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis runs: deploy/local/services.sh start redis");
    let tag_key = format!("{prefix}:tag:broken");
    let () = plain.set(&tag_key, "not a set").await.unwrap();
    let mut sink = connect_sink(RedisConfig {
        url: redis_url(),
        tag_prefix: format!("{prefix}:tag:"),
        cluster: false,
        nodes: vec![],
        ..RedisConfig::without_tls()
    })
    .await;
    let err = sink
        .apply(vec![item(
            100,
            0,
            Plan {
                purge_tags: vec!["broken".into()],
                ..Plan::default()
            },
        )])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SinkError::RedisPoison { key, .. } if key == &tag_key),
        "{err}"
    );
    let () = plain.del(&tag_key).await.unwrap();
}

#[tokio::test]
async fn extra_seed_nodes_are_tried_when_the_url_does_not_answer() {
    let prefix = unique("seeds");
    let mut config = cluster_config(&prefix);
    config.nodes = vec![config.url.clone()];
    // Nothing listens on port 1.
    config.url = "redis://127.0.0.1:1".into();
    let mut sink = connect_sink(config).await;
    let key = format!("{prefix}:k");
    sink.apply(vec![item(
        1,
        0,
        Plan {
            delete: vec![key],
            ..Plan::default()
        },
    )])
    .await
    .unwrap();
}

#[tokio::test]
async fn cluster_mode_against_a_single_server_fails_at_start() {
    let (_stop, stop_rx) = watch::channel(false);
    let config = RedisConfig {
        url: redis_url(),
        tag_prefix: "tag:".into(),
        cluster: true,
        nodes: vec![],
        ..RedisConfig::without_tls()
    };
    let err = match tokio::time::timeout(
        Duration::from_secs(30),
        RedisSink::connect(&config, stop_rx),
    )
    .await
    .expect("connect gives up within 30 s")
    {
        Ok(_) => panic!("connected to a single server in cluster mode"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("Redis Cluster"), "{err}");
}

fn load_config(redis_section: &str) -> Result<Config, String> {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        f,
        "name = \"t\"\n[postgres]\nurl = \"postgres://u@127.0.0.1:5432/db\"\n[rules]\npath = \"rules.toml\"\n[redis]\n{redis_section}\n"
    )
    .unwrap();
    Config::load(f.path()).map_err(|e| e.to_string())
}

#[test]
fn cluster_config_is_checked() {
    let c = load_config(
        "url = \"redis://127.0.0.1:63791\"\ncluster = true\nnodes = [\"redis://127.0.0.1:63792\"]",
    )
    .unwrap();
    let r = c.redis.unwrap();
    assert!(r.cluster);
    assert_eq!(r.nodes, ["redis://127.0.0.1:63792"]);

    let c = load_config("url = \"redis://127.0.0.1:6379/0\"").unwrap();
    let r = c.redis.unwrap();
    assert!(!r.cluster, "standalone by default");
    assert!(r.nodes.is_empty());

    let err = load_config(
        "url = \"redis://127.0.0.1:63791/2\"\ncluster = true\nnodes = [\"redis+unix:///tmp/r.sock\", \"nope\"]",
    )
    .unwrap_err();
    for needle in [
        "redis.url: a Redis Cluster has only database 0: remove /2",
        "redis.nodes[0]: a Redis Cluster is reached over TCP",
        "redis.nodes[1]: not a Redis URL",
    ] {
        assert!(err.contains(needle), "{needle} missing from {err}");
    }

    let err =
        load_config("url = \"redis://127.0.0.1:6379\"\nnodes = [\"redis://h:1\"]").unwrap_err();
    assert!(
        err.contains("redis.nodes: only used with redis.cluster = true"),
        "{err}"
    );
}

/// On one server too, the sink counts the versioned writes the guard refused: older
/// republishes and tombstones, an equal replay; newer ones are written.
#[tokio::test]
async fn a_single_server_counts_the_writes_the_version_guard_refused() {
    let prefix = unique("refused");
    let mut sink = connect_sink(single_config(&redis_url(), &prefix)).await;
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = (0..10).map(|i| format!("{prefix}:k:{i}")).collect();
    let rep = |from: usize, value: &str| Plan {
        republish: keys[from..].iter().map(|k| republish(k, value)).collect(),
        ..Plan::default()
    };
    sink.apply(vec![item(200, 0, rep(0, "new"))]).await.unwrap();
    assert_eq!(sink.sink.refused(), 0);
    // Keys 0..4: an older tombstone; keys 4..10: an older republish, then a replay.
    let tomb = Plan {
        delete: keys[..4].to_vec(),
        tombstones: keys[..4].to_vec(),
        ..Plan::default()
    };
    sink.apply(vec![item(100, 0, tomb)]).await.unwrap();
    sink.apply(vec![item(150, 0, rep(4, "old"))]).await.unwrap();
    sink.apply(vec![item(200, 0, rep(4, "replay"))])
        .await
        .unwrap();
    assert_eq!(sink.sink.refused(), 4 + 6 + 6);
    sink.apply(vec![item(300, 0, rep(0, "newer"))])
        .await
        .unwrap();
    assert_eq!(sink.sink.refused(), 16, "newer writes are not refused");
    for k in &keys {
        let v: Option<String> = conn.get(k).await.unwrap();
        assert_eq!(v.as_deref(), Some("newer"), "{k}");
        let () = conn.del(&[k.clone(), version_key(k)]).await.unwrap();
    }
}

fn single_config(url: &str, prefix: &str) -> RedisConfig {
    RedisConfig {
        url: url.into(),
        tag_prefix: format!("{prefix}:tag:"),
        cluster: false,
        nodes: vec![],
        ..RedisConfig::without_tls()
    }
}

/// A republish whose version sidecar is not a string: the error names the republish
/// script and the sidecar, not a tag purge of the same change.
#[tokio::test]
async fn a_version_sidecar_of_the_wrong_type_is_named_as_such() {
    for cluster in [false, true] {
        let prefix = unique("sidecar");
        let config = if cluster {
            cluster_config(&prefix)
        } else {
            single_config(&redis_url(), &prefix)
        };
        let key = format!("{prefix}:json:1");
        let sidecar = version_key(&key);
        let check = redis::Client::open(if cluster {
            redis_cluster_url()
        } else {
            redis_url()
        })
        .unwrap();
        let () = if cluster {
            let mut c = checker().await;
            c.sadd(&sidecar, "not a version").await.unwrap()
        } else {
            let mut c = check.get_multiplexed_async_connection().await.unwrap();
            c.sadd(&sidecar, "not a version").await.unwrap()
        };
        let mut sink = connect_sink(config).await;
        let err = sink
            .apply(vec![item(
                100,
                0,
                Plan {
                    delete: vec![format!("{prefix}:plain:1")],
                    republish: vec![republish(&key, r#"{"id":1}"#)],
                    purge_tags: vec!["fine".into()],
                    rules: vec!["item_json".into()],
                    ..Plan::default()
                },
            )])
            .await
            .unwrap_err();
        match &err {
            SinkError::RedisPoison {
                command,
                key: named,
                origin,
                message,
                ..
            } => {
                assert!(
                    command.contains("republish script") && command.contains("version sidecar"),
                    "cluster {cluster}: {err}"
                );
                assert_eq!(named, &sidecar, "cluster {cluster}: {err}");
                assert!(origin.contains("rule \"item_json\""), "{origin}");
                assert!(message.contains("WRONGTYPE"), "{message}");
            }
            other => panic!("expected poison, got {other}"),
        }
        let () = if cluster {
            checker().await.del(&sidecar).await.unwrap()
        } else {
            check
                .get_multiplexed_async_connection()
                .await
                .unwrap()
                .del(&sidecar)
                .await
                .unwrap()
        };
    }
}

/// After a Redis restart the scripts are gone: the batch is applied at once after
/// loading them, not after a backoff step (30 s here, so that a wait shows).
#[tokio::test]
async fn noscript_is_answered_without_a_backoff_step() {
    let redis = PrivateRedis::start().await;
    let prefix = unique("noscript");
    let mut sink = connect_sink(single_config(&redis.url, &prefix)).await;
    sink.sink
        .set_backoff(Duration::from_secs(30), Duration::from_secs(60));
    let key = format!("{prefix}:json:1");
    let mut r = redis.connect().await;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut r)
        .await
        .unwrap();
    let batch = Batch {
        items: vec![item(
            100,
            0,
            Plan {
                republish: vec![republish(&key, r#"{"id":1}"#)],
                ..Plan::default()
            },
        )],
        ..Batch::default()
    };
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), sink.sink.apply(&batch))
        .await
        .expect("applied well before a 30 s backoff step")
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        r.get::<_, Option<String>>(&key).await.unwrap().as_deref(),
        Some(r#"{"id":1}"#)
    );
    println!("applied {took:?} after SCRIPT FLUSH");
}

/// A pipeline of 1,000 republishes refused by Redis (OOM): one short WARN line, not
/// one listing every command or key.
#[tokio::test]
async fn a_failing_pipeline_logs_one_short_line() {
    let redis = PrivateRedis::start().await;
    let mut r = redis.connect().await;
    let prefix = unique("oom");
    let mut sink = connect_sink(single_config(&redis.url, &prefix)).await;
    for (k, v) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut r)
            .await
            .unwrap();
    }
    let (logs, _guard) = Logs::capture("warn");
    let items: Vec<Item> = (0..1000)
        .map(|i| {
            item(
                100,
                i,
                Plan {
                    republish: vec![republish(&format!("{prefix}:json:{i}"), r#"{"v":1}"#)],
                    ..Plan::default()
                },
            )
        })
        .collect();
    let batch = Batch {
        items,
        ..Batch::default()
    };
    tokio::select! {
        r = sink.sink.apply(&batch) => panic!("applied under OOM: {r:?}"),
        _ = eventually("a retry WARN", Duration::from_secs(30), || {
            let logs = logs.clone();
            async move { logs.text().contains("Redis failed") }
        }) => {}
    }
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("Redis failed"))
        .unwrap()
        .to_string();
    assert!(line.len() < 1_500, "{} bytes: {line}", line.len());
    assert!(
        // The 1,000 republishes go as 16 calls of the script (64 keys each).
        line.contains("OOM") && line.contains("16 command(s) of 16"),
        "{line}"
    );
    assert!(
        line.contains(&format!("{prefix}:json:0")),
        "names the first failing key: {line}"
    );
    assert_eq!(
        line.matches(&format!("{prefix}:json:")).count(),
        1,
        "names one command only: {line}"
    );
    println!("WARN line, {} bytes: {line}", line.len());
}

/// `redis.wait_replicas`: on the cluster (one replica per master) a batch is applied
/// once every master's replica has it; on a server without replicas it is never done,
/// and the sink keeps retrying until stopped.
#[tokio::test]
async fn wait_replicas_waits_for_the_replicas_and_retries_without_them() {
    let prefix = unique("wait");
    let mut config = cluster_config(&prefix);
    config.wait_replicas = 1;
    let mut sink = connect_sink(config).await;
    let key = format!("{prefix}:k");
    sink.apply(vec![item(
        5,
        0,
        Plan {
            republish: vec![republish(&key, "{\"v\":1}")],
            ..Plan::default()
        },
    )])
    .await
    .expect("every master has a replica");
    let got: Option<String> = checker().await.get(&key).await.unwrap();
    assert_eq!(got.as_deref(), Some("{\"v\":1}"));

    let (stop, stop_rx) = watch::channel(false);
    let single = RedisConfig {
        url: redis_url(),
        tag_prefix: format!("{prefix}:tag:"),
        wait_replicas: 1,
        wait_timeout: Duration::from_millis(50),
        ..RedisConfig::without_tls()
    };
    let mut sink = RedisSink::connect(&single, stop_rx).await.unwrap();
    let batch = Batch {
        items: vec![item(
            5,
            0,
            Plan {
                delete: vec![format!("{prefix}:single")],
                ..Plan::default()
            },
        )],
        ..Batch::default()
    };
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = stop.send(true);
    });
    let err = tokio::time::timeout(Duration::from_secs(20), sink.apply(&batch))
        .await
        .expect("the stop ends the retries")
        .unwrap_err();
    assert!(matches!(err, SinkError::Stopped), "{err}");
    stopper.await.unwrap();
}

/// A slot loss purges every tag set under a prefix (SCAN of sets on every master),
/// members included, and leaves other keys alone.
#[tokio::test]
async fn tag_sets_under_a_prefix_are_purged_on_every_master() {
    let prefix = unique("tagpfx");
    let mut sink = connect_sink(cluster_config(&prefix)).await;
    let mut c = checker().await;
    let mut members = Vec::new();
    for i in 0..50 {
        let set = format!("{prefix}:tag:cat:{i}");
        let member = format!("{prefix}:page:{i}");
        let () = c.set(&member, "cached").await.unwrap();
        let () = c.sadd(&set, &member).await.unwrap();
        members.push((set, member));
    }
    let other = format!("{prefix}:tag:other");
    let () = c.sadd(&other, format!("{prefix}:keep")).await.unwrap();
    let () = c.set(format!("{prefix}:keep"), "x").await.unwrap();
    sink.apply(vec![item(
        9,
        0,
        Plan {
            purge_tag_prefixes: vec!["cat:".into()],
            ..Plan::default()
        },
    )])
    .await
    .unwrap();
    for (set, member) in &members {
        let left: bool = c.exists(set).await.unwrap();
        let cached: bool = c.exists(member).await.unwrap();
        assert!(!left && !cached, "{set} or {member} survived");
    }
    let kept: bool = c.exists(format!("{prefix}:keep")).await.unwrap();
    assert!(kept && c.exists::<_, bool>(&other).await.unwrap());
}
