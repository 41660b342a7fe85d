//! `wal2cache backfill` against the real services: rows written to Redis as their
//! republish would write them, under one snapshot, while the daemon streams and a
//! writer updates and deletes rows; afterwards every key equals its row and no deleted
//! row has a key. With the version guard switched off (a test-only switch) the same
//! check finds stale values: the check can fail.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{json, Value};
use support::config::ConfigBuilder;
use support::daemon::{run_binary, Daemon};
use support::db::{connect, wait_streaming, TestDb};
use support::env::unique;
use support::rng::Lcg;
use support::store::{redis, unlink_matching};
use support::wait::eventually;

const ROWS: i32 = 200_000;

struct Setup {
    db: TestDb,
    prefix: String,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup(label: &str, rows: i32) -> Setup {
    let db = TestDb::new(label).await;
    db.exec(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, name text NOT NULL);
         CREATE TABLE nokey (id int, name text);
         ALTER TABLE nokey REPLICA IDENTITY FULL;
         INSERT INTO items SELECT i, 0, 'item-' || i FROM generate_series(1, {rows}) i;"
    ))
    .await;
    let prefix = unique("bf");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new(&db)
        .rules(&format!(
            r#"[[rule]]
name = "item_json"
table = "public.items"
keys = ["{prefix}:json:{{id}}"]
action = "republish"
columns = ["id", "v", "name"]

[[rule]]
name = "item"
table = "public.items"
keys = ["{prefix}:item:{{id}}"]

[[rule]]
name = "nokey_json"
table = "public.nokey"
keys = ["{prefix}:nokey:{{id}}"]
action = "republish"
"#
        ))
        .write(dir.path());
    Setup {
        db,
        prefix,
        config,
        _dir: dir,
    }
}

fn backfill(config: &Path, args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let mut all = vec!["backfill", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = run_binary(&all, envs);
    (code, format!("{out}{err}"))
}

/// Updates and deletes random rows (single-row and five-row transactions) until
/// stopped.
async fn writer(url: String, stop: Arc<AtomicBool>) -> u64 {
    let mut client = connect(&url).await;
    let mut rng = Lcg(0xbf);
    let mut writes = 0;
    while !stop.load(Ordering::Relaxed) {
        let txn = client.transaction().await.unwrap();
        let n = if rng.below(4) == 0 { 5 } else { 1 };
        for _ in 0..n {
            let id = 1 + rng.below(ROWS as u64) as i32;
            if rng.below(10) == 0 {
                txn.execute("DELETE FROM items WHERE id = $1", &[&id])
                    .await
                    .unwrap();
            } else {
                txn.execute(
                    "UPDATE items SET v = v + 1, name = 'w' || (v + 1) WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            }
        }
        txn.commit().await.unwrap();
        writes += n;
    }
    writes
}

/// Once a sentinel written last is applied: the keys that differ from their rows
/// (value, or a key left for a deleted row, or a row without its key).
async fn stale_keys(s: &Setup) -> Vec<String> {
    s.db.exec("INSERT INTO items VALUES (0, 0, 'sentinel') ON CONFLICT (id) DO UPDATE SET v = items.v + 1")
        .await;
    let sentinel_v: i32 =
        s.db.client
            .query_one("SELECT v FROM items WHERE id = 0", &[])
            .await
            .unwrap()
            .get(0);
    let mut r = redis().await;
    let key0 = format!("{}:json:0", s.prefix);
    eventually("the sentinel applied", Duration::from_secs(60), || {
        let mut r = r.clone();
        let key0 = key0.clone();
        async move {
            let got: Option<String> = r.get(&key0).await.unwrap();
            got.and_then(|g| serde_json::from_str::<Value>(&g).ok())
                .is_some_and(|v| v["v"] == sentinel_v)
        }
    })
    .await;
    let rows: BTreeMap<i32, (i32, String)> =
        s.db.client
            .query("SELECT id, v, name FROM items", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
    let mut stale = Vec::new();
    let keys: Vec<String> = (1..=ROWS)
        .map(|id| format!("{}:json:{id}", s.prefix))
        .collect();
    for (chunk_ids, chunk) in (1..=ROWS)
        .collect::<Vec<_>>()
        .chunks(1000)
        .zip(keys.chunks(1000))
    {
        let got: Vec<Option<String>> = r.mget(chunk).await.unwrap();
        for (id, got) in chunk_ids.iter().zip(got) {
            let want = rows
                .get(id)
                .map(|(v, name)| json!({"id": id, "v": v, "name": name}));
            let got = got.map(|g| serde_json::from_str::<Value>(&g).unwrap());
            if got != want {
                stale.push(format!("{id}: {got:?} vs row {want:?}"));
            }
        }
    }
    stale
}

async fn race(s: &Setup, envs: &[(&str, &str)]) -> (Vec<String>, u64, String) {
    let daemon = Daemon::start(&s.config, &[]);
    wait_streaming(&s.db, &format!("{}_d", s.db.name)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(writer(s.db.url.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let config = s.config.clone();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (code, out) = tokio::task::spawn_blocking(move || {
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        backfill(&config, &["--rule", "item_json", "--chunk", "500"], &envs)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writing.await.unwrap();
    let stale = stale_keys(s).await;
    daemon.stop();
    (stale, writes, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_during_writes_leaves_every_key_equal_to_its_row() {
    let s = setup("bf_race", ROWS).await;
    let (stale, writes, out) = race(&s, &[]).await;
    println!("{writes} writes during the backfill; {out}");
    assert!(writes > 100, "only {writes} writes during the backfill");
    assert!(out.contains("backfill done"), "{out}");
    // Rows the writer changed ahead of the backfill's cursor were written by the
    // stream first: the guard refused the backfill's older values.
    let refused = refused(&out);
    assert!(refused > 0, "nothing refused by the guard: {out}");
    // The daemon's slot confirmed past the snapshot soon after the start: from then on
    // the values went without versions of their own, and the check above covers them.
    let settled = settled(&out);
    assert!(settled > 0, "every key was written with its version: {out}");
    assert!(
        stale.is_empty(),
        "{} keys differ from their rows, e.g. {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    unlink_matching(&mut redis().await, &format!("{}*", s.prefix)).await;
    // The version sidecars, `{KEY}:w2c:v`.
    unlink_matching(&mut redis().await, &format!("{{{}*", s.prefix)).await;
}

/// The summary's count of keys the version guard refused.
fn refused(out: &str) -> u64 {
    let (before, _) = out
        .split_once(" refused by the version guard")
        .unwrap_or_else(|| panic!("no refused count in {out}"));
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no refused count in {out}"))
}

/// The summary's count of keys written without a version of their own.
fn settled(out: &str) -> u64 {
    let (before, _) = out
        .split_once(" of those keys offered without a version of their own")
        .unwrap_or_else(|| panic!("no count of keys without a version in {out}"));
    before
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of keys without a version in {out}"))
}

/// A pgoutput slot of the database that has not confirmed past the snapshot (a daemon
/// that is stopped, or behind) would apply older changes later: every value keeps its
/// version. With no such slot (slots of other plugins do not count), none does.
#[tokio::test]
async fn values_keep_their_version_while_a_slot_is_behind_the_snapshot() {
    let s = setup("bf_behind", 300).await;
    let behind = s.db.create_slot("behind").await;
    let other = format!("{}_other", s.db.name);
    s.db.client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&other],
        )
        .await
        .unwrap();
    let mut r = redis().await;
    let sidecars = |r: redis::aio::MultiplexedConnection| {
        let keys: Vec<String> = (1..=300)
            .map(|id| wal2cache::sink::redis::version_key(&format!("{}:json:{id}", s.prefix)))
            .collect();
        async move {
            let mut r = r;
            let got: Vec<Option<String>> = r.mget(&keys).await.unwrap();
            got.iter().filter(|g| g.is_some()).count()
        }
    };
    let (code, out) = backfill(&s.config, &["--rule", "item_json", "--chunk", "100"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("300 rows, 300 keys written, 0 refused"),
        "{out}"
    );
    assert_eq!(settled(&out), 0, "{out}");
    assert_eq!(keys_present(&mut r, &s.prefix, 300).await, 300);
    assert_eq!(
        sidecars(r.clone()).await,
        300,
        "every value with its version"
    );

    unlink_matching(&mut r, &format!("{}*", s.prefix)).await;
    unlink_matching(&mut r, &format!("{{{}*", s.prefix)).await;
    s.db.drop_slot(&behind).await;
    let (code, out) = backfill(&s.config, &["--rule", "item_json", "--chunk", "100"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("300 rows, 300 keys written, 0 refused"),
        "{out}"
    );
    assert_eq!(settled(&out), 300, "{out}");
    assert_eq!(keys_present(&mut r, &s.prefix, 300).await, 300);
    assert_eq!(sidecars(r.clone()).await, 0, "no value with a version");
    s.db.drop_slot(&other).await;
    unlink_matching(&mut r, &format!("{}*", s.prefix)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_version_guard_the_same_check_finds_stale_values() {
    let s = setup("bf_unguarded", ROWS).await;
    let (stale, writes, _) = race(&s, &[(wal2cache::backfill::UNGUARDED, "1")]).await;
    println!(
        "without the guard: {} stale keys after {writes} writes",
        stale.len()
    );
    assert!(!stale.is_empty(), "the check found nothing to catch");
    unlink_matching(&mut redis().await, &format!("{}*", s.prefix)).await;
    // The version sidecars, `{KEY}:w2c:v`.
    unlink_matching(&mut redis().await, &format!("{{{}*", s.prefix)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_tables_dry_run_and_tables_without_a_key() {
    let s = setup("bf_opts", 50).await;
    let mut r = redis().await;
    let json1 = format!("{}:json:1", s.prefix);
    // A table without a key is refused, naming it and the fix.
    let (code, out) = backfill(&s.config, &["--rule", "nokey_json"], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("\"public\".\"nokey\" has no primary key"),
        "{out}"
    );
    // A delete rule, or an unknown one, is not something to backfill.
    let (code, out) = backfill(&s.config, &["--rule", "item"], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("item_json"),
        "names the republish rules: {out}"
    );
    // Dry run: every row planned, nothing written. Before it starts, the plan: the
    // table's estimated rows and size (never analyzed: no estimate), the duration.
    let (code, out) = backfill(&s.config, &["--table", "public.items", "--dry-run"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("50 rows, 50 keys planned"), "{out}");
    assert!(
        out.contains("public.items: ? rows (never analyzed: ANALYZE it for an estimate)"),
        "{out}"
    );
    assert!(out.contains("expected duration: about"), "{out}");
    // Analyzed, the estimate is the row count; an expected duration over
    // backfill.max_duration is said before starting.
    s.db.exec("ANALYZE items").await;
    let (code, out) = backfill(
        &s.config,
        &["--table", "public.items", "--dry-run", "--rate", "25"],
        &[("WAL2CACHE__BACKFILL__MAX_DURATION", "1s")],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("public.items: ~50 rows"), "{out}");
    assert!(
        out.contains("expected duration: about 2 seconds, over backfill.max_duration (1 second)"),
        "{out}"
    );
    assert!(!r.exists::<_, bool>(&json1).await.unwrap());
    // --rule, at a rate: 50 rows at 100 a second take about half a second.
    let started = std::time::Instant::now();
    let (code, out) = backfill(
        &s.config,
        &["--rule", "item_json", "--rate", "100", "--chunk", "10"],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "--rate 100 for 50 rows took {:?}",
        started.elapsed()
    );
    assert!(out.contains("50 rows, 50 keys written, 0 refused"), "{out}");
    // Not in a terminal: progress as log lines, not a bar.
    assert!(out.contains("backfill: table done"), "{out}");
    // Every row, paged ten at a time in key order (1, 2, ..., 10, 11: not as text).
    for id in 1..=50 {
        let key = format!("{}:json:{id}", s.prefix);
        assert!(r.exists::<_, bool>(&key).await.unwrap(), "{key} missing");
    }
    let got: String = r.get(&json1).await.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&got).unwrap(),
        json!({"id": 1, "v": 0, "name": "item-1"})
    );
    // Again: idempotent (a newer snapshot's version wins, the value is the same).
    let (code, out) = backfill(&s.config, &["--rule", "item_json"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("50 keys written, 0 refused"), "{out}");
    let again: String = r.get(&json1).await.unwrap();
    assert_eq!(again, got);
    unlink_matching(&mut r, &format!("{}*", s.prefix)).await;
    unlink_matching(&mut r, &format!("{{{}*", s.prefix)).await;
}

/// How many of the keys of rows 1..=n exist.
async fn keys_present(r: &mut redis::aio::MultiplexedConnection, prefix: &str, n: i32) -> usize {
    let keys: Vec<String> = (1..=n).map(|id| format!("{prefix}:json:{id}")).collect();
    let got: Vec<Option<String>> = r.mget(&keys).await.unwrap();
    got.iter().filter(|g| g.is_some()).count()
}

/// Ctrl-C mid-way: exit 1, "stopped", part of the rows written, the temporary slot
/// gone; a rerun writes the rest and every key equals its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_then_run_again_it_converges() {
    const N: i32 = 3000;
    let s = setup("bf_int", N).await;
    let mut r = redis().await;
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let child = std::process::Command::new(support::daemon::bin())
        .args(["backfill", "--config", s.config.to_str().unwrap()])
        .args(["--rule", "item_json", "--rate", "600", "--chunk", "50"])
        .envs(support::daemon::base_env())
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = format!("{}:json:1", s.prefix);
    eventually("the first page written", Duration::from_secs(30), || {
        let mut r = r.clone();
        let first = first.clone();
        async move { r.exists::<_, bool>(&first).await.unwrap() }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    support::daemon::signal(&child, "INT");
    let status = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap().status)
        .await
        .unwrap();
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("stopped (run it again to complete it)"),
        "{out}"
    );
    let written = keys_present(&mut r, &s.prefix, N).await;
    assert!(
        written > 0 && written < N as usize,
        "{written} of {N} keys written before Ctrl-C"
    );
    let slots: i64 = s
        .db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'wal2cache_backfill_%' AND database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the temporary slot outlived the backfill");
    let (code, out) = backfill(&s.config, &["--rule", "item_json"], &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        keys_present(&mut r, &s.prefix, N).await,
        N as usize,
        "after the rerun"
    );
    let last: String = r.get(format!("{}:json:{N}", s.prefix)).await.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&last).unwrap(),
        json!({"id": N, "v": 0, "name": format!("item-{N}")})
    );
    unlink_matching(&mut r, &format!("{}*", s.prefix)).await;
    unlink_matching(&mut r, &format!("{{{}*", s.prefix)).await;
}

/// Waits until the log holds `what` at least `times` times.
async fn logged(log: &Path, what: &str, times: usize) {
    eventually(
        &format!("{times} x {what:?} in the daemon's log"),
        Duration::from_secs(60),
        || async {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .matches(what)
                .count()
                >= times
        },
    )
    .await;
}

/// How many of rows 1..=n have a JSON key equal to `want(row)`.
async fn keys_equal(s: &Setup, n: i32, want: impl Fn(i32, i32, &str) -> Value) -> usize {
    let mut r = redis().await;
    let rows =
        s.db.client
            .query(
                "SELECT id, v, name FROM items WHERE id <= $1 ORDER BY id",
                &[&n],
            )
            .await
            .unwrap();
    let keys: Vec<String> = rows
        .iter()
        .map(|row| format!("{}:json:{}", s.prefix, row.get::<_, i32>(0)))
        .collect();
    let got: Vec<Option<String>> = r.mget(&keys).await.unwrap();
    rows.iter()
        .zip(got)
        .filter(|(row, got)| {
            got.as_deref()
                .and_then(|g| serde_json::from_str::<Value>(g).ok())
                .is_some_and(|g| g == want(row.get(0), row.get(1), row.get(2)))
        })
        .count()
}

/// `rules.backfill = "new"`: a republish rule added by SIGHUP is warmed in the
/// background while the daemon streams; a restart does not backfill it again; a
/// change of its columns backfills it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_backfill_new_warms_a_rule_added_by_sighup() {
    const N: i32 = 2000;
    let s = setup("bf_new", N).await;
    let log = s._dir.path().join("daemon.log");
    let rules_file = s.config.parent().unwrap().join("rules.toml");
    let delete_only = format!(
        "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{}:item:{{id}}\"]\n",
        s.prefix
    );
    let republish = |columns: &str| {
        format!(
            "{delete_only}\n[[rule]]\nname = \"item_json\"\ntable = \"public.items\"\nkeys = [\"{}:json:{{id}}\"]\naction = \"republish\"\ncolumns = [{columns}]\n",
            s.prefix
        )
    };
    std::fs::write(&rules_file, &delete_only).unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace("[rules]\n", "[rules]\nbackfill = \"new\"\n"),
    )
    .unwrap();
    let envs = [("WAL2CACHE_LOG", "info")];
    let daemon = Daemon::start_logging(&s.config, &envs, &log);
    wait_streaming(&s.db, &format!("{}_d", s.db.name)).await;

    std::fs::write(&rules_file, republish("\"id\", \"v\", \"name\"")).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    logged(&log, "rules.backfill: done", 1).await;
    let full = |id: i32, v: i32, name: &str| json!({"id": id, "v": v, "name": name});
    assert_eq!(
        keys_equal(&s, N, full).await,
        N as usize,
        "every row warmed"
    );
    // The stream goes on writing the rule's keys.
    s.db.exec("UPDATE items SET v = 7 WHERE id = 5").await;
    eventually(
        "the update republished",
        Duration::from_secs(30),
        || async { keys_equal(&s, 5, full).await == 5 },
    )
    .await;
    daemon.stop();

    // A restart: the rule was backfilled with this shape, nothing to do.
    let log2 = s._dir.path().join("daemon2.log");
    let daemon = Daemon::start_logging(&s.config, &envs, &log2);
    wait_streaming(&s.db, &format!("{}_d", s.db.name)).await;
    // The warm task starts as soon as this instance streams: give it time to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !std::fs::read_to_string(&log2)
            .unwrap()
            .contains("rules.backfill: backfilling"),
        "backfilled again at the restart"
    );
    // Its columns change: backfilled again, in the new shape.
    std::fs::write(&rules_file, republish("\"id\", \"v\"")).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    logged(&log2, "rules.backfill: done", 1).await;
    let started = std::fs::read_to_string(&log2)
        .unwrap()
        .matches("rules.backfill: backfilling")
        .count();
    assert_eq!(
        started, 1,
        "backfilled once: after the change, not at the restart"
    );
    let short = |id: i32, v: i32, _: &str| json!({"id": id, "v": v});
    assert_eq!(
        keys_equal(&s, N, short).await,
        N as usize,
        "rewarmed in the new shape"
    );
    daemon.stop();
    let mut r = redis().await;
    unlink_matching(&mut r, &format!("{}*", s.prefix)).await;
    unlink_matching(&mut r, &format!("{{{}*", s.prefix)).await;
}
