//! `wal2cache run` end to end against real PostgreSQL, Redis and the Kafka-compatible
//! broker: keys deleted, values republished equal to the row, tags purged, old and new
//! keys on key changes, and schema-1 events read back by a real consumer.

mod support;

use std::path::Path;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{json, Value};
use support::cluster::Cluster;
use support::config::ConfigBuilder;
use support::daemon::run_binary;
use support::db::{wait_streaming, TestDb, EXAMPLE_SCHEMA as SCHEMA};
use support::env::unique;
use support::inproc::{InProcess, Logs};
use support::kafka::read_topic_until_quiet;
use support::store::redis;
use support::wait::eventually;

#[tokio::test]
async fn the_daemon_keeps_redis_and_the_topic_in_step() {
    let db = TestDb::new("e2e").await;
    db.exec(SCHEMA).await;
    db.exec("INSERT INTO categories VALUES (7, 'mugs'), (8, 'cups')")
        .await;
    let prefix = unique("e2e");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::example(&db, &prefix, &topic)
        .name(&format!("e2e-{}", db.name))
        .write(dir.path());
    let mut r = redis().await;
    let k = |s: &str| format!("{prefix}:{s}");
    // A tag's set: the tag prefix, then the (prefixed) tag.
    let tag = |t: &str| format!("{prefix}:tag:{prefix}:{t}");

    let daemon = InProcess::start(&config);
    let slot = format!("{}_d", db.name);
    wait_streaming(&db, &slot).await;

    // What an application cached: product keys, a list page under the category tag.
    let _: () = r.set(k("shop:product:v3:42"), "stale").await.unwrap();
    let _: () = r
        .set(k("shop:product:slug:v3:blue-mug"), "stale")
        .await
        .unwrap();
    let _: () = r
        .set(k("shop:product:slug:v3:navy-mug"), "stale")
        .await
        .unwrap();
    let _: () = r.set(k("page:mugs:1"), "stale list").await.unwrap();
    let _: () = r
        .sadd(tag("shop:category:7"), k("page:mugs:1"))
        .await
        .unwrap();

    db.exec("INSERT INTO products VALUES (42, 'blue-mug', 7, 'Mug', 9.50, NULL)")
        .await;
    let json_key = k("shop:product:json:v3:42");
    eventually("the republished row", Duration::from_secs(20), || {
        let mut r = r.clone();
        let key = json_key.clone();
        async move { r.get::<_, Option<String>>(&key).await.unwrap().is_some() }
    })
    .await;
    let value: String = r.get(&json_key).await.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&value).unwrap(),
        json!({"id": 42, "name": "Mug", "price": "9.50"})
    );
    let ttl: i64 = r.ttl(&json_key).await.unwrap();
    assert!((3500..=3600).contains(&ttl), "ttl {ttl}");
    for gone in [
        "shop:product:v3:42",
        "shop:product:slug:v3:blue-mug",
        "page:mugs:1",
    ] {
        assert!(
            !r.exists::<_, bool>(k(gone)).await.unwrap(),
            "{gone} still cached"
        );
    }
    assert!(
        !r.exists::<_, bool>(tag("shop:category:7")).await.unwrap(),
        "the tag set is purged too"
    );
    assert!(
        r.exists::<_, bool>(k("shop:product:slug:v3:navy-mug"))
            .await
            .unwrap(),
        "an unrelated key stays"
    );

    // A slug change: old and new slug keys; the republished value follows the row.
    let _: () = r
        .set(k("shop:product:slug:v3:blue-mug"), "stale")
        .await
        .unwrap();
    db.exec("UPDATE products SET slug = 'navy-mug', price = 12.00 WHERE id = 42")
        .await;
    eventually("the new price", Duration::from_secs(20), || {
        let mut r = r.clone();
        let key = json_key.clone();
        async move {
            r.get::<_, Option<String>>(&key)
                .await
                .unwrap()
                .is_some_and(|v| v.contains("12.00"))
        }
    })
    .await;
    for gone in [
        "shop:product:slug:v3:blue-mug",
        "shop:product:slug:v3:navy-mug",
    ] {
        assert!(
            !r.exists::<_, bool>(k(gone)).await.unwrap(),
            "{gone} still cached"
        );
    }

    // Tenant settings republished whole; a delete removes the key.
    db.exec("INSERT INTO tenant_settings VALUES (5, '{\"theme\": \"dark\"}')")
        .await;
    db.exec("DELETE FROM products WHERE id = 42").await;
    let cfg_key = k("cfg:v1:5");
    eventually(
        "the tenant settings and the deleted product",
        Duration::from_secs(20),
        || {
            let mut r = r.clone();
            let (cfg, json) = (cfg_key.clone(), json_key.clone());
            async move {
                r.get::<_, Option<String>>(&cfg).await.unwrap().is_some()
                    && r.get::<_, Option<String>>(&json).await.unwrap().is_none()
            }
        },
    )
    .await;
    let cfg: String = r.get(&cfg_key).await.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&cfg).unwrap(),
        json!({"tenant_id": 5, "settings": {"theme": "dark"}})
    );

    // TRUNCATE purges truncate_tags.
    let _: () = r.set(k("page:all"), "stale").await.unwrap();
    let _: () = r.sadd(tag("shop:products"), k("page:all")).await.unwrap();
    db.exec("TRUNCATE products").await;
    let page = k("page:all");
    eventually("the truncate purge", Duration::from_secs(20), || {
        let mut r = r.clone();
        let page = page.clone();
        async move { !r.exists::<_, bool>(&page).await.unwrap() }
    })
    .await;

    // TRUNCATE of a table whose rule has no truncate_tags: its key prefix is flushed.
    let _: () = r.set(k("cfg:v1:99"), "stale").await.unwrap();
    let last_commit = db.exec_commit_end("TRUNCATE tenant_settings").await;
    let cfg_prefix = (k("cfg:v1:5"), k("cfg:v1:99"));
    eventually("the table-wide flush", Duration::from_secs(20), || {
        let mut r = r.clone();
        let (a, b) = cfg_prefix.clone();
        async move { !r.exists::<_, bool>(&a).await.unwrap() && !r.exists::<_, bool>(&b).await.unwrap() }
    })
    .await;

    // Everything was confirmed: the slot is at the end of the last transaction, or
    // past it by WAL with nothing for this slot (idle, the daemon confirms what the
    // server has read, see `SourceEvent::Idle`), never past the server's end.
    eventually(
        "the slot to confirm the last transaction",
        Duration::from_secs(20),
        || async { db.confirmed_lsn(&slot).await >= Some(last_commit) },
    )
    .await;
    daemon.stop_ok().await;
    let confirmed = db.confirmed_lsn(&slot).await.unwrap();
    let end = db.current_lsn().await;
    assert!(
        confirmed >= last_commit && confirmed <= end,
        "after the stop: confirmed {confirmed}, the last commit record ends at {last_commit}, the server is at {end}"
    );

    // Every change that matched has its event, in schema 1, once: the daemon has
    // stopped, so the topic holds all it will ever publish.
    let events = read_topic_until_quiet(&topic, 6, Duration::from_secs(3)).await;
    // Two partitions: the order across them is not kept, so the ops are compared sorted.
    let mut ops: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["table"].as_str().unwrap(), e["op"].as_str().unwrap()))
        .collect();
    ops.sort_unstable();
    let mut expected = vec![
        ("public.products", "insert"),
        ("public.products", "update"),
        ("public.tenant_settings", "insert"),
        ("public.products", "delete"),
        ("public.products", "truncate"),
        ("public.tenant_settings", "truncate"),
    ];
    expected.sort_unstable();
    assert_eq!(ops, expected, "{events:#?}");
    let flush = events
        .iter()
        .find(|e| e["table"] == "public.tenant_settings" && e["op"] == "truncate")
        .unwrap();
    assert_eq!(
        (flush["kind"].as_str(), flush["reason"].as_str()),
        (Some("flush_all"), Some("truncate"))
    );
    let insert = events
        .iter()
        .find(|e| e["op"] == "insert" && e["table"] == "public.products")
        .unwrap();
    assert_eq!(insert["schema"], 1);
    assert_eq!(insert["kind"], "invalidate");
    assert_eq!(insert["source"], format!("e2e-{}", db.name));
    assert!(insert["lsn"].as_str().unwrap().contains('/'));
    assert!(insert["xid"].as_u64().is_some());
    assert!(insert["commit_time"].as_str().unwrap().ends_with('Z'));
    let keys: Vec<&str> = insert["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        keys.contains(&k("shop:product:v3:42").as_str()) && keys.contains(&json_key.as_str()),
        "{keys:?}"
    );
    assert_eq!(
        insert["tags"],
        json!([k("shop:category:7"), k("shop:products")])
    );
}

#[tokio::test]
async fn an_idle_slot_advances_while_other_tables_write() {
    let db = TestDb::new("e2e_idle").await;
    db.exec(SCHEMA).await;
    db.exec("CREATE TABLE unrelated (id serial PRIMARY KEY, body text)")
        .await;
    let prefix = unique("idle");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::example(&db, &prefix, &format!("{prefix}.t"))
        .name(&format!("e2e-{}", db.name))
        .pipeline("idle_heartbeat", "1s")
        .write(dir.path());
    let slot = format!("{}_d", db.name);
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &slot).await;
    // Lots of WAL, none of it for the rules' tables.
    db.exec("INSERT INTO unrelated (body) SELECT repeat('x', 200) FROM generate_series(1, 20000)")
        .await;
    let written = db.current_lsn().await;
    eventually(
        "the slot to move past the unrelated writes",
        Duration::from_secs(30),
        || async { db.confirmed_lsn(&slot).await.is_some_and(|l| l >= written) },
    )
    .await;
    daemon.stop_ok().await;
}

#[tokio::test]
async fn a_poison_command_stops_the_daemon_naming_the_key_and_the_rule() {
    let db = TestDb::new("e2e_poison").await;
    db.exec(SCHEMA).await;
    db.exec("INSERT INTO categories VALUES (7, 'mugs')").await;
    let prefix = unique("poison");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::example(&db, &prefix, &format!("{prefix}.t"))
        .name(&format!("e2e-{}", db.name))
        .write(dir.path());
    let slot = format!("{}_d", db.name);
    // The tag's set is a string: SMEMBERS answers WRONGTYPE, whatever the retries.
    let tag_key = format!("{prefix}:tag:{prefix}:shop:category:7");
    let mut r = redis().await;
    let _: () = r.set(&tag_key, "not a set").await.unwrap();

    let daemon = InProcess::start(&config);
    wait_streaming(&db, &slot).await;
    let before = db.confirmed_lsn(&slot).await.unwrap();
    db.exec("INSERT INTO products VALUES (1, 'a', 7, 'A', 1.00, NULL)")
        .await;
    // The binary prints this error as its last line and exits with its code.
    let e = daemon
        .exited(Duration::from_secs(60))
        .await
        .expect_err("a poison command stops the daemon");
    let err = e.to_string();
    assert_eq!(e.exit_code(), 1, "{err}");
    assert!(err.contains(&tag_key) && err.contains("WRONGTYPE"), "{err}");
    assert!(
        err.contains("rule \"product\"") && err.contains("public.products insert"),
        "{err}"
    );
    // Nothing at or past the poison transaction's commit is confirmed (a heartbeat
    // before it may be).
    let commit: wal2cache::Lsn = err
        .split("at LSN ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no commit LSN in {err}"));
    let confirmed = db.confirmed_lsn(&slot).await.unwrap();
    assert!(
        before <= confirmed && confirmed <= commit,
        "confirmed {confirmed} past the poison at {commit}"
    );
    let _: () = r.del(&tag_key).await.unwrap();
}

#[tokio::test]
async fn unreachable_sinks_and_failing_rules_stop_with_a_clear_error() {
    let db = TestDb::new("e2e_bad").await;
    db.exec(SCHEMA).await;
    let prefix = unique("bad");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::example(&db, &prefix, &format!("{prefix}.t"))
        .name(&format!("e2e-{}", db.name))
        .write(dir.path());
    let slot = format!("{}_d", db.name);
    // The binary, for its exit codes and what it prints.
    let run = |envs: &[(&str, &str)]| {
        let (code, _, err) = run_binary(&["run", "--config", config.to_str().unwrap()], envs);
        (Some(code), err)
    };
    let (code, err) = run(&[("WAL2CACHE__KAFKA__BROKERS", "127.0.0.1:1")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot reach the Kafka brokers"), "{err}");
    // The slot exists now; writes after it must stay unconfirmed.
    let created = db.confirmed_lsn(&slot).await.expect("run created the slot");
    db.exec("INSERT INTO categories VALUES (1, 'x')").await;
    let (code, err) = run(&[("WAL2CACHE__REDIS__URL", "redis://127.0.0.1:1")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot connect to redis://127.0.0.1:1"),
        "{err}"
    );
    // A URL that does not parse is a config error, found before connecting anywhere.
    let (code, err) = run(&[("WAL2CACHE__REDIS__URL", "not a url")]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("redis.url: not a Redis URL"), "{err}");
    db.exec("ALTER TABLE products REPLICA IDENTITY DEFAULT")
        .await;
    let (code, err) = run(&[]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("REPLICA IDENTITY FULL"), "{err}");
    // Nothing was confirmed by any of them.
    assert_eq!(db.confirmed_lsn(&slot).await, Some(created));
}

/// A commit that waits for a synchronous standby is in the WAL, and decoded, while it
/// is still invisible to other sessions. Invalidating then would let a reader that
/// misses read the old row and cache it again: the daemon waits until the transaction
/// is visible, however long that takes, and then invalidates.
#[tokio::test]
async fn an_invalidation_waits_until_its_transaction_is_visible() {
    // Sessions commit locally by default; one that asks for synchronous replication
    // waits for a standby that does not exist.
    let server = Cluster::start(
        Path::new("/usr/lib/postgresql/15/bin"),
        "visible",
        &[
            "wal_level=logical",
            "max_wal_senders=10",
            "max_replication_slots=10",
            "synchronous_standby_names=absent_standby",
            "synchronous_commit=local",
        ],
    );
    let db = TestDb::on(&server.url(), "visible").await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL); INSERT INTO items VALUES (1, 0)",
    )
    .await;
    let prefix = unique("visible");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new(&db)
        .rules(&format!(
            "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:item:{{id}}\"]\n"
        ))
        .write(dir.path());
    let (log, _guard) = Logs::capture("info");
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    let mut r = redis().await;
    let key = format!("{prefix}:item:1");
    let _: () = r.set(&key, "v=0").await.unwrap();

    let writer = support::db::connect(&db.url).await;
    let writer_pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let commit = tokio::spawn(async move {
        writer
            .batch_execute("SET synchronous_commit = on; UPDATE items SET v = 1 WHERE id = 1")
            .await
    });
    eventually(
        "the commit waiting for the standby",
        Duration::from_secs(10),
        || async {
            db.client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'SyncRep'",
                    &[&writer_pid],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 1
        },
    )
    .await;
    // Until the daemon says it is waiting for the transaction (after 5 s), the cached
    // value stays, and the row still reads as it was.
    let waiting = "not yet visible to other sessions";
    let started = std::time::Instant::now();
    while log.lines_with(waiting) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the daemon never said it waits for the transaction; its log:\n{}",
            log.text()
        );
        let cached: Option<String> = r.get(&key).await.unwrap();
        let v: i32 = db
            .client
            .query_one("SELECT v FROM items WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            (cached.as_deref(), v),
            (Some("v=0"), 0),
            "invalidated while the transaction was invisible: a reader would cache v=0 again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        log.text().contains("pg_stat_replication"),
        "the warning says where to look: {}",
        log.text()
    );
    // The wait for the standby cancelled: the transaction is visible, the key goes.
    db.exec(&format!("SELECT pg_cancel_backend({writer_pid})"))
        .await;
    commit.await.unwrap().unwrap();
    eventually("the key invalidated", Duration::from_secs(10), || async {
        !r.clone().exists::<_, bool>(&key).await.unwrap()
    })
    .await;
    daemon.stop_ok().await;
}

/// `pg_ctl stop -m fast` (a restart, a minor upgrade, a switchover) while the daemon is
/// connected and idle: a shutting-down walsender waits until its client has confirmed
/// all the WAL it has read. The last transaction the daemon applied ends before WAL
/// written since (here a table no rule names), so confirming only that held the
/// server's shutdown until `wal_sender_timeout` cut the daemon off (60 s).
#[tokio::test]
async fn a_fast_server_shutdown_does_not_wait_for_an_idle_daemon() {
    let server = Cluster::start(
        Path::new("/usr/lib/postgresql/15/bin"),
        "faststop",
        &[
            "wal_level=logical",
            "max_wal_senders=10",
            "max_replication_slots=10",
        ],
    );
    let db = TestDb::on(&server.url(), "faststop").await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE unrelated (id int PRIMARY KEY)",
    )
    .await;
    let prefix = unique("faststop");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new(&db)
        .rules(&format!(
            "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:item:{{id}}\"]\n"
        ))
        .pipeline("idle_heartbeat", "0s")
        .write(dir.path());
    let daemon = InProcess::start(&config);
    let slot = format!("{}_d", db.name);
    wait_streaming(&db, &slot).await;
    let last = db.exec_commit_end("INSERT INTO items VALUES (1, 1)").await;
    eventually("the insert confirmed", Duration::from_secs(20), || async {
        db.confirmed_lsn(&slot).await >= Some(last)
    })
    .await;
    db.exec("INSERT INTO unrelated SELECT generate_series(1, 1000)")
        .await;
    let lsn = |sql: &'static str| {
        let db = &db;
        let slot = slot.clone();
        async move {
            let row = db.client.query_opt(sql, &[&slot]).await.unwrap();
            row.and_then(|r| r.get::<_, Option<String>>(0))
                .map(|s| s.parse::<wal2cache::Lsn>().unwrap())
        }
    };
    let written = lsn("SELECT pg_current_wal_lsn()::text WHERE $1::text IS NOT NULL")
        .await
        .unwrap();
    assert!(
        written > last,
        "WAL was written after the daemon's last transaction"
    );
    // Until the walsender has read it, so that it has something to wait for at the stop.
    eventually(
        "the walsender to read past the last transaction",
        Duration::from_secs(20),
        || async {
            lsn("SELECT r.sent_lsn::text FROM pg_stat_replication r
                   JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1")
            .await
                >= Some(written)
        },
    )
    .await;
    // Idle, the daemon confirms what the server has read.
    eventually(
        "the slot to confirm past the daemon's last transaction",
        Duration::from_secs(20),
        || async { db.confirmed_lsn(&slot).await >= Some(written) },
    )
    .await;
    let started = std::time::Instant::now();
    // pg_ctl's own wait is 60 s: a shutdown held by the daemon fails it.
    server.stop();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the server took {took:?} to stop; its log:\n{}",
        server.log()
    );
    // The daemon is reconnecting to a server that is gone; its stop ends that.
    let _ = daemon.stop().await;
    // The database went with its server (removed when `server` drops).
    std::mem::forget(db);
}
