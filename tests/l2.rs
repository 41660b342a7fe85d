//! `wal2cache::l2` with the real services: the daemon (in this process) streams a
//! database while applications read through `L2::get_or_load`, on one Redis server and
//! on the local Redis Cluster.
//!
//! - The daemon's side: after every way it changes a key (a delete, a tombstone, a
//!   republish, a tag purge, a prefix flush) a load that took its lease before cannot
//!   store.
//! - The stale-set race: readers whose loader pauses after reading the row, writers
//!   updating the same rows; once quiet, every cached key equals its row. The same
//!   harness with plain GET / SET finds stale keys, which shows the check can fail.
//! - The stampede: 1,000 concurrent reads of one cold key run the loader once.
//! - Tags: keys cached under a tag, purged by the daemon while readers keep loading
//!   them; once quiet, every one equals the database.
//! - The library's own contract: negative caching, a republished value never
//!   overwritten, a failed loader giving its lease back, `lease_wait`.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::config::ConfigBuilder;
use support::db::{connect, wait_streaming, TestDb};
use support::env::{redis_cluster_url, redis_url, unique};
use support::inproc::InProcess;
use support::rng::Lcg;
use support::wait::eventually;
use tokio::sync::watch;
use wal2cache::config::RedisConfig;
use wal2cache::keys::lease_key;
use wal2cache::l2::{AfterWait, L2Error, L2, NOT_FOUND, NO_TAGS};
use wal2cache::plan::{Plan, Republish};
use wal2cache::redis_conn::RedisConn;
use wal2cache::sink::redis::RedisSink;
use wal2cache::sink::{Batch, Item, Origin, Sink as _, Version};
use wal2cache::Lsn;

const ROWS: i32 = 80;
const READERS: u64 = 12;

/// Where the test's Redis is: one server or the cluster.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Single,
    Cluster,
}

impl Mode {
    fn url(self) -> String {
        match self {
            Mode::Single => redis_url(),
            Mode::Cluster => redis_cluster_url(),
        }
    }

    async fn l2(self, prefix: &str) -> wal2cache::l2::L2Builder {
        let b = L2::builder(self.url()).tag_prefix(format!("{prefix}:tag:"));
        match self {
            Mode::Single => b,
            Mode::Cluster => b.cluster(Vec::<String>::new()),
        }
    }

    async fn conn(self) -> RedisConn {
        match self {
            Mode::Single => RedisConn::Single(
                redis::Client::open(self.url())
                    .unwrap()
                    .get_connection_manager()
                    .await
                    .expect("Redis runs: deploy/local/services.sh start"),
            ),
            Mode::Cluster => RedisConn::Cluster(
                redis::cluster::ClusterClient::new(vec![self.url()])
                    .unwrap()
                    .get_async_connection()
                    .await
                    .expect("the Redis Cluster runs: deploy/local/services.sh start"),
            ),
        }
    }
}

async fn get(conn: &mut RedisConn, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

async fn exists(conn: &mut RedisConn, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

async fn unlink(conn: &mut RedisConn, keys: &[String]) {
    for k in keys {
        let () = redis::cmd("UNLINK").arg(k).query_async(conn).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------
// The daemon's side, through the sink itself

fn item(lsn: u64, plan: Plan) -> Item {
    Item {
        origin: Origin {
            version: Version {
                commit_lsn: Lsn(lsn),
                seq: 0,
            },
            xid: 7,
            commit_time: 0,
            table: Some("public.t".into()),
            op: "update",
        },
        plan: Arc::new(plan),
    }
}

async fn every_removal_by_the_daemon_ends_the_lease(mode: Mode) {
    let prefix = unique("l2sink");
    let config = RedisConfig {
        url: mode.url(),
        tag_prefix: format!("{prefix}:tag:"),
        cluster: mode == Mode::Cluster,
        ..RedisConfig::without_tls()
    };
    let (_stop, stop_rx) = watch::channel(false);
    let mut sink = RedisSink::connect(&config, stop_rx).await.unwrap();
    let mut r = mode.conn().await;
    let key = |what: &str| format!("{prefix}:{what}");
    let flushed = format!("{prefix}:flush:");
    // One lease per way of removing, plus one the daemon never touches; `odd}` has
    // no hash tag of its own, `{7}` has one.
    let names = [
        key("deleted"),
        key("tomb"),
        key("repub"),
        key("tagged"),
        format!("{flushed}1"),
        format!("{flushed}odd}}x"),
        format!("{flushed}{{7}}"),
        key("untouched"),
    ];
    // Leases as fetch.lua grants them: the token, then the version at the grant.
    for k in &names {
        let () = redis::cmd("SET")
            .arg(lease_key(k))
            .arg("token -")
            .arg("PX")
            .arg(60_000)
            .query_async(&mut r)
            .await
            .unwrap();
    }
    // The tag set as the l2 registers it: the key and its lease.
    let set = format!("{prefix}:tag:list");
    let () = redis::cmd("SADD")
        .arg(&set)
        .arg(key("tagged"))
        .arg(lease_key(&key("tagged")))
        .query_async(&mut r)
        .await
        .unwrap();
    let plans = vec![
        item(
            100,
            Plan {
                delete: vec![key("deleted")],
                ..Plan::default()
            },
        ),
        item(
            101,
            Plan {
                delete: vec![key("tomb")],
                tombstones: vec![key("tomb")],
                ..Plan::default()
            },
        ),
        item(
            102,
            Plan {
                republish: vec![Republish {
                    key: key("repub"),
                    value: Arc::from("{\"id\":1}"),
                    ttl: Some(Duration::from_secs(60)),
                }],
                ..Plan::default()
            },
        ),
        item(
            103,
            Plan {
                purge_tags: vec![format!("list")],
                ..Plan::default()
            },
        ),
        item(
            104,
            Plan {
                flush_prefixes: vec![flushed.clone()],
                ..Plan::default()
            },
        ),
    ];
    let batch = Batch {
        items: plans,
        ..Batch::default()
    };
    tokio::time::timeout(Duration::from_secs(60), sink.apply(&batch))
        .await
        .expect("applied within 60 s")
        .unwrap();
    // A load that took its lease before the batch cannot store after it (store.lua):
    // the lease is gone, or (a republish) the key's version changed.
    let store = redis::Script::new(wal2cache::l2::STORE_LUA);
    for (i, k) in names.iter().enumerate() {
        let stored: i64 = store
            .key(k)
            .key(lease_key(k))
            .key(wal2cache::keys::version_key(k))
            .arg("token")
            .arg("loaded before the change")
            .arg(60_000)
            .invoke_async(&mut r)
            .await
            .unwrap();
        let untouched = i == names.len() - 1;
        assert_eq!(
            stored,
            i64::from(untouched),
            "{mode:?}: {k}: store.lua answered {stored}"
        );
        if !untouched && k != &key("repub") {
            assert!(
                !exists(&mut r, &lease_key(k)).await,
                "{mode:?}: the lease of {k} is still there"
            );
        }
    }
    let mut all: Vec<String> = names.iter().map(|k| lease_key(k)).collect();
    all.extend(names.iter().cloned());
    all.extend(names.iter().map(|k| wal2cache::keys::version_key(k)));
    unlink(&mut r, &all).await;
}

#[tokio::test]
async fn every_removal_by_the_daemon_ends_the_lease_on_one_server() {
    every_removal_by_the_daemon_ends_the_lease(Mode::Single).await;
}

#[tokio::test]
async fn every_removal_by_the_daemon_ends_the_lease_in_a_cluster() {
    every_removal_by_the_daemon_ends_the_lease(Mode::Cluster).await;
}

// ---------------------------------------------------------------------------------
// The library's contract

#[tokio::test]
async fn misses_load_once_and_hits_do_not_load() {
    for mode in [Mode::Single, Mode::Cluster] {
        let prefix = unique("l2lib");
        let l2 = mode.l2(&prefix).await.build().await.unwrap();
        let mut r = mode.conn().await;
        let key = format!("{prefix}:k");
        let loads = AtomicU32::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::Relaxed);
            Some(b"value".to_vec())
        };
        let first = l2
            .get_or_load(&key, &["t"], Some(Duration::from_secs(60)), load)
            .await;
        assert_eq!(first.unwrap().as_deref(), Some(&b"value"[..]), "{mode:?}");
        let second = l2
            .get_or_load(&key, &["t"], Some(Duration::from_secs(60)), load)
            .await;
        assert_eq!(second.unwrap().as_deref(), Some(&b"value"[..]), "{mode:?}");
        assert_eq!(loads.load(Ordering::Relaxed), 1, "{mode:?}");
        assert_eq!(get(&mut r, &key).await.as_deref(), Some(&b"value"[..]));
        // The TTL was set, the lease is gone, the key and its lease are in the tag set.
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut r)
            .await
            .unwrap();
        assert!((50_000..=60_000).contains(&ttl), "{mode:?}: PTTL {ttl}");
        assert!(!exists(&mut r, &lease_key(&key)).await, "{mode:?}");
        let set = format!("{prefix}:tag:t");
        let mut members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&set)
            .query_async(&mut r)
            .await
            .unwrap();
        members.sort();
        let mut expected = vec![key.clone(), lease_key(&key)];
        expected.sort();
        assert_eq!(members, expected, "{mode:?}");
        let m = l2.metrics();
        assert_eq!(
            (m.misses, m.leases_granted, m.stored, m.hits),
            (1, 1, 1, 1),
            "{mode:?}: {m:?}"
        );
        unlink(&mut r, &[key, set]).await;
    }
}

#[tokio::test]
async fn not_found_is_cached_for_negative_ttl() {
    for mode in [Mode::Single, Mode::Cluster] {
        let prefix = unique("l2neg");
        let l2 = mode
            .l2(&prefix)
            .await
            .negative_ttl(Duration::from_millis(700))
            .build()
            .await
            .unwrap();
        let mut r = mode.conn().await;
        let key = format!("{prefix}:missing");
        let loads = AtomicU32::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::Relaxed);
            None
        };
        for _ in 0..3 {
            assert_eq!(
                l2.get_or_load(&key, NO_TAGS, None, load).await.unwrap(),
                None
            );
        }
        assert_eq!(loads.load(Ordering::Relaxed), 1, "{mode:?}");
        assert_eq!(get(&mut r, &key).await.as_deref(), Some(NOT_FOUND));
        assert_eq!(l2.metrics().negative_hits, 2, "{mode:?}");
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut r)
            .await
            .unwrap();
        assert!((1..=700).contains(&pttl), "{mode:?}: PTTL {pttl}");
        eventually("the marker to expire", Duration::from_secs(5), || {
            let mut r = r.clone();
            let key = key.clone();
            async move { !exists(&mut r, &key).await }
        })
        .await;
        assert_eq!(
            l2.get_or_load(&key, NO_TAGS, None, load).await.unwrap(),
            None
        );
        assert_eq!(loads.load(Ordering::Relaxed), 2, "{mode:?}");
        unlink(&mut r, &[key]).await;
    }
}

#[tokio::test]
async fn a_store_never_overwrites_a_value_and_a_lost_lease_stores_nothing() {
    for mode in [Mode::Single, Mode::Cluster] {
        let prefix = unique("l2keep");
        let l2 = mode.l2(&prefix).await.build().await.unwrap();
        let mut r = mode.conn().await;
        // The daemon republishes the key while the load runs: the republish ends the
        // lease, and the store leaves the republished value.
        let key = format!("{prefix}:repub");
        let got = l2
            .get_or_load(&key, NO_TAGS, None, || async {
                let mut r = r.clone();
                let () = redis::cmd("SET")
                    .arg(&key)
                    .arg("{\"republished\":true}")
                    .query_async(&mut r)
                    .await
                    .unwrap();
                Some(b"loaded before the change".to_vec())
            })
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some(&b"loaded before the change"[..]));
        assert_eq!(
            get(&mut r, &key).await.as_deref(),
            Some(&b"{\"republished\":true}"[..]),
            "{mode:?}"
        );
        assert_eq!(l2.metrics().store_skipped, 1, "{mode:?}");
        // The lease removed during the load (what the daemon's delete does).
        let deleted = format!("{prefix}:deleted");
        let _ = l2
            .get_or_load(&deleted, NO_TAGS, None, || async {
                unlink(&mut r.clone(), &[lease_key(&deleted)]).await;
                Some(b"stale".to_vec())
            })
            .await
            .unwrap();
        assert!(
            !exists(&mut r, &deleted).await,
            "{mode:?}: a lost lease stored"
        );
        assert_eq!(l2.metrics().leases_lost, 1, "{mode:?}");
        unlink(&mut r, &[key]).await;
    }
}

#[tokio::test]
async fn a_failed_loader_gives_its_lease_back_and_lease_wait_bounds_a_wait() {
    let prefix = unique("l2fail");
    let l2 = Mode::Single
        .l2(&prefix)
        .await
        .lease_wait(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut r = Mode::Single.conn().await;
    let key = format!("{prefix}:k");
    let failed = l2
        .try_get_or_load(&key, NO_TAGS, None, || async {
            Err::<Option<Vec<u8>>, _>("db down")
        })
        .await;
    assert!(
        matches!(
            &failed,
            Err(L2Error::Loader {
                error: "db down",
                ..
            })
        ),
        "{failed:?}"
    );
    assert!(
        !exists(&mut r, &lease_key(&key)).await,
        "the lease was not given back"
    );
    assert_eq!(l2.metrics().loader_errors, 1);
    // A lease held by someone else: the default loads without storing after lease_wait.
    let () = redis::cmd("SET")
        .arg(lease_key(&key))
        .arg("another")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut r)
        .await
        .unwrap();
    let started = Instant::now();
    let got = l2
        .get_or_load(&key, NO_TAGS, None, || async { Some(b"v".to_vec()) })
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"v"[..]));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(!exists(&mut r, &key).await, "an unleased load stored");
    assert_eq!(l2.metrics().unleased_loads, 1);
    let strict = Mode::Single
        .l2(&prefix)
        .await
        .lease_wait(Duration::from_millis(100))
        .after_wait(AfterWait::Fail)
        .build()
        .await
        .unwrap();
    let err = strict
        .get_or_load(&key, NO_TAGS, None, || async { Some(b"v".to_vec()) })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lease_wait"), "{err}");
    unlink(&mut r, &[lease_key(&key)]).await;
}

// ---------------------------------------------------------------------------------
// With the daemon

struct Setup {
    db: TestDb,
    prefix: String,
    slot: String,
    daemon: InProcess,
    _dir: tempfile::TempDir,
    _config: PathBuf,
}

async fn setup(label: &str, mode: Mode) -> Setup {
    let db = TestDb::new(label).await;
    db.exec(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, v bigint NOT NULL);
         CREATE TABLE lists (id int PRIMARY KEY, v bigint NOT NULL);
         INSERT INTO items SELECT i, 0 FROM generate_series(1, {ROWS}) i;
         INSERT INTO lists SELECT i, 0 FROM generate_series(1, {ROWS}) i;"
    ))
    .await;
    let prefix = unique("l2");
    let dir = tempfile::tempdir().unwrap();
    let mut builder = ConfigBuilder::new(&db);
    if mode == Mode::Cluster {
        // Before the other [redis] keys: `redis` sets the section anew.
        builder = builder
            .redis(&redis_cluster_url())
            .redis_key("cluster", true);
    }
    builder = builder
        .rules(&format!(
            r#"[[rule]]
name = "item"
table = "public.items"
keys = ["{prefix}:item:{{id}}"]

[[rule]]
name = "list"
table = "public.lists"
keys = ["{prefix}:lrow:{{id}}"]
tags = ["list"]
"#
        ))
        .redis_key("tag_prefix", format!("{prefix}:tag:"));
    let config = builder.write(dir.path());
    let daemon = InProcess::start(&config);
    let slot = format!("{}_d", db.name);
    wait_streaming(&db, &slot).await;
    Setup {
        db,
        prefix,
        slot,
        daemon,
        _dir: dir,
        _config: config,
    }
}

impl Setup {
    /// Waits until the daemon applied everything committed so far.
    async fn quiet(&self) {
        let end = self
            .db
            .exec_commit_end("UPDATE items SET v = v WHERE id = 1")
            .await;
        eventually(
            "the daemon to confirm the last write",
            Duration::from_secs(60),
            || async {
                self.db
                    .confirmed_lsn(&self.slot)
                    .await
                    .is_some_and(|c| c >= end)
            },
        )
        .await;
    }
}

/// How a reader caches: through the L2, or plain GET / SET look-aside.
#[derive(Clone)]
enum Cache {
    L2(L2),
    Plain(RedisConn),
}

/// Reads random keys until stopped; a miss reads `query` (one bigint) for the key's
/// id, pauses 0-40 ms (a slow request), then caches the value.
async fn reader(
    cache: Cache,
    db_url: String,
    key_of: Arc<dyn Fn(i32) -> (String, Vec<String>) + Send + Sync>,
    query: &'static str,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let client = connect(&db_url).await;
    let mut rng = Lcg(seed);
    while !stop.load(Ordering::Relaxed) {
        let id = 1 + rng.below(ROWS as u64) as i32;
        let pause = Duration::from_millis(rng.below(41));
        let (key, tags) = key_of(id);
        let load = || async {
            let v: i64 = client.query_one(query, &[&id]).await.unwrap().get(0);
            tokio::time::sleep(pause).await;
            Some(v.to_string().into_bytes())
        };
        match &cache {
            Cache::L2(l2) => {
                l2.get_or_load(&key, &tags, Some(Duration::from_secs(300)), load)
                    .await
                    .unwrap();
            }
            Cache::Plain(conn) => {
                let mut conn = conn.clone();
                if get(&mut conn, &key).await.is_none() {
                    let v = load().await.unwrap();
                    let () = redis::cmd("SET")
                        .arg(&key)
                        .arg(v)
                        .arg("EX")
                        .arg(300)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    for tag in &tags {
                        let () = redis::cmd("SADD")
                            .arg(tag)
                            .arg(&key)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                    }
                }
            }
        }
    }
}

/// Updates random rows of `table` until stopped, then its half of the rows twice more
/// while the readers still run.
async fn writer(db_url: String, table: &'static str, seed: u64, stop: Arc<AtomicBool>) -> u64 {
    let client = connect(&db_url).await;
    let mut rng = Lcg(seed);
    let update = format!("UPDATE {table} SET v = v + 1 WHERE id = $1");
    let mut writes = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = 1 + rng.below(ROWS as u64) as i32;
        client.execute(&update, &[&id]).await.unwrap();
        writes += 1;
        tokio::time::sleep(Duration::from_millis(rng.below(4))).await;
    }
    // The last round, where a stale set cannot be overwritten by a later change: each
    // row of this writer's half twice, 10 ms apart, so that readers that missed after
    // the first change read the row before the second.
    for id in (1..=ROWS).filter(|id| (*id as u64) % 2 == seed % 2) {
        for _ in 0..2 {
            client.execute(&update, &[&id]).await.unwrap();
            writes += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    writes
}

/// Readers and two writers for `run`, then quiet; the keys whose cached value
/// differs from the database, and how many keys were cached.
async fn race(
    s: &Setup,
    mode: Mode,
    cache: Cache,
    key_of: Arc<dyn Fn(i32) -> (String, Vec<String>) + Send + Sync>,
    query: &'static str,
    table: &'static str,
    run: Duration,
) -> (Vec<String>, usize, u64) {
    let stop_writers = Arc::new(AtomicBool::new(false));
    let stop_readers = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for n in 0..READERS {
        readers.push(tokio::spawn(reader(
            cache.clone(),
            s.db.url.clone(),
            key_of.clone(),
            query,
            0x12 + n,
            stop_readers.clone(),
        )));
    }
    let writers: Vec<_> = (0..2u64)
        .map(|n| {
            tokio::spawn(writer(
                s.db.url.clone(),
                table,
                0x77 + n,
                stop_writers.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(run).await;
    stop_writers.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    // Readers still loading now may have read before the last writes.
    tokio::time::sleep(Duration::from_millis(30)).await;
    stop_readers.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    s.quiet().await;
    let client = connect(&s.db.url).await;
    let mut conn = mode.conn().await;
    let mut stale = Vec::new();
    let mut cached = 0;
    for id in 1..=ROWS {
        let (key, _) = key_of(id);
        let Some(value) = get(&mut conn, &key).await else {
            continue;
        };
        cached += 1;
        let v: i64 = client.query_one(query, &[&id]).await.unwrap().get(0);
        if value != v.to_string().into_bytes() {
            stale.push(format!(
                "{key}={} (row: {v})",
                String::from_utf8_lossy(&value)
            ));
        }
    }
    (stale, cached, writes)
}

async fn clean(conn: &mut RedisConn, prefix: &str, keys: impl IntoIterator<Item = String>) {
    let mut all: Vec<String> = Vec::new();
    for k in keys {
        all.push(lease_key(&k));
        all.push(k);
    }
    all.push(format!("{prefix}:tag:list"));
    unlink(conn, &all).await;
}

async fn no_stale_set(mode: Mode) {
    let s = setup(
        if mode == Mode::Single {
            "l2_race"
        } else {
            "l2_race_c"
        },
        mode,
    )
    .await;
    let prefix = s.prefix.clone();
    let item_key: Arc<dyn Fn(i32) -> (String, Vec<String>) + Send + Sync> =
        Arc::new(move |id| (format!("{prefix}:item:{id}"), vec![]));
    let run = Duration::from_secs(6);
    let query = "SELECT v FROM items WHERE id = $1";

    let mut conn = mode.conn().await;
    let (plain_stale, plain_cached, plain_writes) = race(
        &s,
        mode,
        Cache::Plain(conn.clone()),
        item_key.clone(),
        query,
        "items",
        run,
    )
    .await;
    println!(
        "{mode:?}, plain GET/SET: {} stale of {plain_cached} cached keys after {plain_writes} writes: {:?}",
        plain_stale.len(),
        plain_stale
    );
    clean(&mut conn, &s.prefix, (1..=ROWS).map(|id| item_key(id).0)).await;

    let l2 = mode.l2(&s.prefix).await.build().await.unwrap();
    let (stale, cached, writes) = race(
        &s,
        mode,
        Cache::L2(l2.clone()),
        item_key.clone(),
        query,
        "items",
        run,
    )
    .await;
    let m = l2.metrics();
    println!(
        "{mode:?}, l2: {} stale of {cached} cached keys after {writes} writes; {m:?}",
        stale.len()
    );
    clean(&mut conn, &s.prefix, (1..=ROWS).map(|id| item_key(id).0)).await;
    s.daemon.stop_ok().await;

    assert!(
        !plain_stale.is_empty(),
        "{mode:?}: plain look-aside found no stale key, so the harness cannot tell; make the race harder"
    );
    assert!(
        stale.is_empty(),
        "{mode:?}: stale keys through the l2: {stale:?}"
    );
    assert!(
        cached >= ROWS as usize / 2,
        "{mode:?}: only {cached} keys cached"
    );
    assert!(
        m.leases_lost > 0,
        "{mode:?}: no load ever lost its lease: {m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_set_on_one_server() {
    no_stale_set(Mode::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_set_in_a_cluster() {
    no_stale_set(Mode::Cluster).await;
}

async fn tag_purges_reach_what_applications_cache(mode: Mode) {
    let s = setup(
        if mode == Mode::Single {
            "l2_tags"
        } else {
            "l2_tags_c"
        },
        mode,
    )
    .await;
    let prefix = s.prefix.clone();
    // Pages of the list: each caches a sum over the table, under the tag the rule
    // purges on every change of a row.
    let page_key: Arc<dyn Fn(i32) -> (String, Vec<String>) + Send + Sync> =
        Arc::new(move |id| (format!("{prefix}:page:{id}"), vec!["list".to_string()]));
    let query = "SELECT sum(v)::bigint + $1 * 0 FROM lists";
    let l2 = mode.l2(&s.prefix).await.build().await.unwrap();
    let (stale, cached, writes) = race(
        &s,
        mode,
        Cache::L2(l2.clone()),
        page_key.clone(),
        query,
        "lists",
        Duration::from_secs(5),
    )
    .await;
    let m = l2.metrics();
    println!(
        "{mode:?}, tags: {} stale of {cached} cached pages after {writes} writes (each a purge); {m:?}",
        stale.len()
    );
    // Every cached page is registered under the tag, so the next purge reaches it.
    let mut conn = mode.conn().await;
    let set = format!("{}:tag:list", s.prefix);
    for id in 1..=ROWS {
        let (key, _) = page_key(id);
        if exists(&mut conn, &key).await {
            let member: bool = redis::cmd("SISMEMBER")
                .arg(&set)
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(member, "{mode:?}: {key} cached but not in {set}");
        }
    }
    s.db.exec("UPDATE lists SET v = v + 1 WHERE id = 1").await;
    s.quiet().await;
    for id in 1..=ROWS {
        let (key, _) = page_key(id);
        assert!(
            !exists(&mut conn, &key).await,
            "{mode:?}: {key} survived a purge"
        );
    }
    clean(&mut conn, &s.prefix, (1..=ROWS).map(|id| page_key(id).0)).await;
    s.daemon.stop_ok().await;
    assert!(stale.is_empty(), "{mode:?}: stale pages: {stale:?}");
    assert!(cached > 0, "{mode:?}: no page cached");
    assert!(
        m.leases_lost > 0,
        "{mode:?}: no purge ever ended a load: {m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_purges_reach_what_applications_cache_on_one_server() {
    tag_purges_reach_what_applications_cache(Mode::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_purges_reach_what_applications_cache_in_a_cluster() {
    tag_purges_reach_what_applications_cache(Mode::Cluster).await;
}

// ---------------------------------------------------------------------------------
// The stampede

async fn stampede(mode: Mode) {
    let db = TestDb::new(if mode == Mode::Single {
        "l2_storm"
    } else {
        "l2_storm_c"
    })
    .await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v bigint NOT NULL); INSERT INTO items VALUES (1, 42);")
        .await;
    let prefix = unique("l2storm");
    // lease_wait far above the load: this counts loads per lease, not waits cut short
    // by a slow machine.
    let l2 = mode
        .l2(&prefix)
        .await
        .lease_wait(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let client = Arc::new(connect(&db.url).await);
    let loads = Arc::new(AtomicU32::new(0));
    let key = format!("{prefix}:hot");
    let start = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (l2, client, loads, key, start) = (
            l2.clone(),
            client.clone(),
            loads.clone(),
            key.clone(),
            start.clone(),
        );
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let t = Instant::now();
            let mut loaded = false;
            let v = l2
                .get_or_load(&key, NO_TAGS, Some(Duration::from_secs(60)), || async {
                    loads.fetch_add(1, Ordering::Relaxed);
                    loaded = true;
                    let row = client
                        .query_one(
                            "SELECT v, pg_sleep(0.05)::text FROM items WHERE id = 1",
                            &[],
                        )
                        .await
                        .unwrap();
                    Some(row.get::<_, i64>(0).to_string().into_bytes())
                })
                .await
                .unwrap();
            (v, t.elapsed(), loaded)
        }));
    }
    let mut waiters = Vec::new();
    for t in tasks {
        let (v, took, loaded) = t.await.unwrap();
        assert_eq!(v.as_deref(), Some(&b"42"[..]), "{mode:?}");
        if !loaded {
            waiters.push(took);
        }
    }
    waiters.sort();
    let m = l2.metrics();
    println!(
        "{mode:?}: 1,000 concurrent reads of a cold key: {} load(s); waiters p50 {:?}, p99 {:?}, max {:?}; {m:?}",
        loads.load(Ordering::Relaxed),
        waiters[waiters.len() / 2],
        waiters[waiters.len() * 99 / 100],
        waiters.last().unwrap()
    );
    assert_eq!(loads.load(Ordering::Relaxed), 1, "{mode:?}: {m:?}");
    assert_eq!(m.leases_granted, 1, "{mode:?}: {m:?}");
    assert_eq!(m.hits + m.wait_hits, 999, "{mode:?}: {m:?}");
    unlink(&mut mode.conn().await, &[key]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_loads_once_on_one_server() {
    stampede(Mode::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_loads_once_in_a_cluster() {
    stampede(Mode::Cluster).await;
}

#[tokio::test]
async fn an_unreachable_redis_is_named_without_its_password() {
    let err = L2::builder("redis://app:hunter2@127.0.0.1:1")
        .build()
        .await
        .err()
        .expect("nothing listens on port 1");
    let shown = err.to_string();
    assert!(
        shown.contains("cannot connect to Redis at redis://app:***@127.0.0.1:1"),
        "{shown}"
    );
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[tokio::test]
async fn over_tls_with_an_acl_user_on_one_server_and_a_cluster() {
    let ca = support::env::tls_file("ca.pem");
    for (url, cluster) in [
        (support::env::redis_tls_url(), false),
        (support::env::redis_cluster_tls_url(), true),
    ] {
        let mut builder = L2::builder(&url).ca_file(&ca);
        if cluster {
            builder = builder.cluster(Vec::<String>::new());
        }
        let l2 = builder.build().await.unwrap_or_else(|e| {
            panic!("{e}: start the TLS services with deploy/local/services.sh start tls")
        });
        let key = unique("l2tls");
        let v = l2
            .get_or_load(&key, NO_TAGS, Some(Duration::from_secs(60)), || async {
                Some(b"over tls".to_vec())
            })
            .await
            .unwrap();
        assert_eq!(v.as_deref(), Some(&b"over tls"[..]));
        let again = l2
            .get_or_load(&key, NO_TAGS, None, || async {
                Some(b"loaded twice".to_vec())
            })
            .await
            .unwrap();
        assert_eq!(
            again.as_deref(),
            Some(&b"over tls"[..]),
            "cluster: {cluster}"
        );
        assert_eq!(l2.metrics().hits, 1);
    }
    // Without the CA, the throwaway certificate is refused, and the error says so.
    let err = L2::builder(support::env::redis_tls_url())
        .build()
        .await
        .err()
        .expect("an untrusted certificate");
    assert!(!err.to_string().contains("redis-tls-secret"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_invalidates_a_cached_not_found() {
    for mode in [Mode::Single, Mode::Cluster] {
        let s = setup(
            if mode == Mode::Single {
                "l2_neg"
            } else {
                "l2_neg_c"
            },
            mode,
        )
        .await;
        let l2 = mode
            .l2(&s.prefix)
            .await
            .negative_ttl(Duration::from_secs(300))
            .build()
            .await
            .unwrap();
        let client = connect(&s.db.url).await;
        let key = format!("{}:item:1000", s.prefix);
        let load = || async {
            client
                .query_opt("SELECT v FROM items WHERE id = 1000", &[])
                .await
                .unwrap()
                .map(|row| row.get::<_, i64>(0).to_string().into_bytes())
        };
        assert_eq!(
            l2.get_or_load(&key, NO_TAGS, None, load).await.unwrap(),
            None
        );
        assert_eq!(
            l2.get_or_load(&key, NO_TAGS, None, load).await.unwrap(),
            None
        );
        assert_eq!(l2.metrics().negative_hits, 1, "{mode:?}");
        // The row appears: the rule's key, rendered from the new row, is deleted.
        s.db.exec("INSERT INTO items VALUES (1000, 7)").await;
        s.quiet().await;
        let v = l2.get_or_load(&key, NO_TAGS, None, load).await.unwrap();
        assert_eq!(
            v.as_deref(),
            Some(&b"7"[..]),
            "{mode:?}: the not-found answer outlived the INSERT"
        );
        unlink(&mut mode.conn().await, &[key]).await;
        s.daemon.stop_ok().await;
    }
}
