//! `wal2cache run` on schemas that once broke it: a partitioned table invalidates
//! through its partitions, and a rule added by SIGHUP for a new table follows every
//! change the new publication membership sends, even while the reload is in progress.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::AsyncCommands;
use support::config::{ConfigBuilder, RULES_FILE};
use support::db::{connect, wait_streaming, TestDb};
use support::env::unique;
use support::inproc::InProcess;
use support::kafka::read_topic;
use support::store::{gone, redis};
use support::wait::eventually;

/// The config of these tests: slot `<db>_d`, the shared Redis and broker.
fn schemas_config(dir: &Path, db: &TestDb, rules: &str, topic: &str) -> PathBuf {
    ConfigBuilder::new(db)
        .rules(rules)
        .kafka_topic(topic)
        .pipeline("shutdown_timeout", "10s")
        .write(dir)
}

#[tokio::test]
async fn a_partitioned_table_invalidates_through_its_partitions() {
    let db = TestDb::new("d_part").await;
    db.exec(
        "CREATE TABLE orders (id int, region text, total int, PRIMARY KEY (id, region))
             PARTITION BY LIST (region);
         CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
         CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us');",
    )
    .await;
    let prefix = unique("part");
    let topic = format!("{prefix}.events");
    let rules = format!(
        "[[rule]]\nname = \"order\"\ntable = \"public.orders\"\nkeys = [\"{prefix}:o:{{id}}:{{region}}\"]\n\
         truncate_tags = [\"{prefix}:orders\"]\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = schemas_config(dir.path(), &db, &rules, &topic);
    let mut r = redis().await;
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;

    let keys: Vec<String> = ["1:eu", "2:us"]
        .iter()
        .map(|k| format!("{prefix}:o:{k}"))
        .collect();
    for k in &keys {
        let _: () = r.set(k, "stale").await.unwrap();
    }
    db.exec("INSERT INTO orders VALUES (1, 'eu', 10), (2, 'us', 20)")
        .await;
    eventually(
        "the partitions' inserts to invalidate",
        Duration::from_secs(30),
        || gone(&r, &keys),
    )
    .await;
    let member = format!("{prefix}:page");
    let _: () = r.set(&member, "stale").await.unwrap();
    let tag_set = format!("tag:{prefix}:orders");
    let _: () = r.sadd(&tag_set, &member).await.unwrap();
    let _: () = r.set(&keys[1], "stale").await.unwrap();
    db.exec_each(&[
        "UPDATE orders SET total = 21 WHERE id = 2",
        "TRUNCATE orders_eu",
    ])
    .await;
    let purged = [keys[1].clone(), member.clone(), tag_set.clone()];
    eventually(
        "an update and a TRUNCATE of one partition to invalidate",
        Duration::from_secs(30),
        || gone(&r, &purged),
    )
    .await;
    let events = read_topic(&topic, |evs| evs.iter().any(|e| e["op"] == "truncate")).await;
    let tables: Vec<&str> = events.iter().filter_map(|e| e["table"].as_str()).collect();
    assert!(
        tables.contains(&"public.orders_eu") && tables.contains(&"public.orders_us"),
        "events name the partition: {tables:?}"
    );
    daemon.stop_ok().await;
}

#[tokio::test]
async fn a_rule_added_by_sighup_for_a_new_table_follows_its_changes() {
    let db = TestDb::new("d_hup").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v int)")
        .await;
    let prefix = unique("hup");
    let topic = format!("{prefix}.events");
    let first = format!(
        "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:i:{{id}}\"]\naction = \"republish\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = schemas_config(dir.path(), &db, &first, &topic);
    let mut daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;

    db.exec("CREATE TABLE bulk2 (id int PRIMARY KEY, v int)")
        .await;
    std::fs::write(
        dir.path().join(RULES_FILE),
        format!(
            "{first}[[rule]]\nname = \"bulk\"\ntable = \"public.bulk2\"\nkeys = [\"{prefix}:b:{{id}}\"]\naction = \"republish\"\n"
        ),
    )
    .unwrap();

    // A writer that inserts throughout the reload and notes, before each insert, whether
    // bulk2 is in the publication yet: every row inserted once it is must be cached.
    let writer_url = db.url.clone();
    let writer = tokio::spawn(async move {
        let client = connect(&writer_url).await;
        let mut after = Vec::new();
        let mut published_at = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        for id in 0.. {
            if std::time::Instant::now() > deadline {
                break;
            }
            let published = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_publication_tables
                                     WHERE pubname = 'w2c' AND tablename = 'bulk2')",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, bool>(0);
            client
                .execute("INSERT INTO bulk2 VALUES ($1, $1)", &[&id])
                .await
                .unwrap();
            if published {
                published_at.get_or_insert(id);
                after.push(id);
                if after.len() >= 500 {
                    break;
                }
            }
        }
        (published_at, after)
    });
    daemon.reload();
    let (published_at, after) = writer.await.unwrap();
    assert!(
        published_at.is_some(),
        "the reload added bulk2 to the publication while rows were written"
    );
    daemon.assert_running("after the reload").await;
    let r = redis().await;
    let keys: Vec<String> = after.iter().map(|id| format!("{prefix}:b:{id}")).collect();
    eventually(
        "every row inserted after the table was published to be republished",
        Duration::from_secs(60),
        || {
            let mut r = r.clone();
            let keys = keys.clone();
            async move {
                let found: Vec<Option<String>> = r.mget(&keys).await.unwrap();
                found.iter().all(Option::is_some)
            }
        },
    )
    .await;
    daemon.stop_ok().await;
}

#[tokio::test]
async fn a_reload_that_cannot_publish_its_table_keeps_the_old_rules() {
    let db = TestDb::new("d_hup_no").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v int)")
        .await;
    let prefix = unique("hupno");
    let topic = format!("{prefix}.events");
    let first = format!(
        "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:i:{{id}}\"]\naction = \"republish\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = schemas_config(dir.path(), &db, &first, &topic);
    let mut daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    // A table without a replica identity: check refuses it, the reload must not publish it.
    db.exec("CREATE TABLE nokey (id int, v int)").await;
    std::fs::write(
        dir.path().join(RULES_FILE),
        format!(
            "{first}[[rule]]\nname = \"nokey\"\ntable = \"public.nokey\"\non = [\"insert\"]\nkeys = [\"{prefix}:n:{{id}}\"]\n"
        ),
    )
    .unwrap();
    daemon.reload();
    db.exec("INSERT INTO items VALUES (1, 1)").await;
    let r = redis().await;
    let key = format!("{prefix}:i:1");
    eventually(
        "the old rules to go on working",
        Duration::from_secs(30),
        || {
            let mut r = r.clone();
            let key = key.clone();
            async move { r.exists::<_, bool>(&key).await.unwrap() }
        },
    )
    .await;
    let published: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE tablename = 'nokey'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 0, "a refused reload publishes nothing");
    db.exec("UPDATE nokey SET v = 2").await;
    daemon.assert_running("after a refused reload").await;
    daemon.stop_ok().await;
}

/// A deploy: the daemon stops, a migration adds a column, the rules gain rules that use
/// it, the daemon starts. The changes written before the column existed come first in
/// the stream; each rule that cannot be bound to them invalidates more widely (its
/// keys by prefix and every subscriber; a republish whose value lacks the column
/// deletes its key) instead of stopping the daemon at every start.
#[tokio::test]
async fn rules_using_a_column_added_while_stopped_invalidate_the_older_changes_widely() {
    let db = TestDb::new("d_addcol").await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, a text);
         ALTER TABLE items REPLICA IDENTITY FULL;",
    )
    .await;
    let prefix = unique("addcol");
    let topic = format!("{prefix}.events");
    let first = format!(
        "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:i:{{id}}\"]\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = schemas_config(dir.path(), &db, &first, &topic);
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    daemon.stop_ok().await;

    db.exec_each(&[
        "INSERT INTO items VALUES (1, 'before')",
        "ALTER TABLE items ADD COLUMN e int",
        "INSERT INTO items VALUES (2, 'after', 5)",
    ])
    .await;
    std::fs::write(
        dir.path().join(RULES_FILE),
        format!(
            "{first}[[rule]]\nname = \"by_e\"\ntable = \"public.items\"\nkeys = [\"{prefix}:by_e:{{e}}\"]\n\
             [[rule]]\nname = \"with_e\"\ntable = \"public.items\"\nkeys = [\"{prefix}:e:{{id}}\"]\n\
             action = \"republish\"\ncolumns = [\"id\", \"e\"]\n"
        ),
    )
    .unwrap();
    let mut r = redis().await;
    let flushed = format!("{prefix}:by_e:9");
    let fell_back = format!("{prefix}:e:1");
    for k in [&flushed, &fell_back] {
        let _: () = r.set(k, "stale").await.unwrap();
    }

    let mut daemon = InProcess::start(&config);
    let republished = format!("{prefix}:e:2");
    eventually(
        "the change written after the column was added to be republished",
        Duration::from_secs(30),
        || {
            let mut r = r.clone();
            let key = republished.clone();
            async move {
                let v: Option<String> = r.get(&key).await.unwrap();
                v.as_deref() == Some(r#"{"id":2,"e":5}"#)
            }
        },
    )
    .await;
    daemon
        .assert_running("after the changes from before the column")
        .await;
    assert!(
        gone(&r, &[flushed.clone(), fell_back.clone()]).await,
        "the older change flushed the by_e prefix and deleted the with_e key"
    );
    let events = read_topic(&topic, |evs| evs.iter().any(|e| e["kind"] == "flush_all")).await;
    let flush = events
        .iter()
        .find(|e| e["kind"] == "flush_all")
        .expect("a flush_all for the change from before the column");
    assert_eq!(flush["reason"], "schema_changed", "{flush}");
    assert_eq!(flush["op"], "insert", "{flush}");
    assert!(
        flush["detail"].as_str().is_some_and(|d| d.contains("by_e")),
        "{flush}"
    );
    daemon.stop_ok().await;
}

/// Postgres names a domain column by the domain's type: its values are written as the
/// base type's, by the stream and by `wal2cache backfill` alike (a domain over jsonb
/// embedded, over bigint or over another domain over int a number).
#[tokio::test]
async fn a_domain_column_is_written_as_its_base_type() {
    let db = TestDb::new("d_domain").await;
    db.exec(
        "CREATE DOMAIN doc AS jsonb;
         CREATE DOMAIN big AS bigint CHECK (VALUE > 0);
         CREATE DOMAIN small AS int;
         CREATE DOMAIN smaller AS small;
         CREATE DOMAIN label AS text;
         CREATE TABLE items (id int PRIMARY KEY, d doc, b big, s smaller, l label)",
    )
    .await;
    let prefix = unique("domain");
    let topic = format!("{prefix}.events");
    let rules = format!(
        "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:i:{{id}}\"]\naction = \"republish\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = schemas_config(dir.path(), &db, &rules, &topic);
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    db.exec(r#"INSERT INTO items VALUES (1, '{"a": 1}', 9007199254740993, 5, 'x')"#)
        .await;
    let key = format!("{prefix}:i:1");
    let expected = r#"{"id":1,"d":{"a": 1},"b":9007199254740993,"s":5,"l":"x"}"#;
    let r = redis().await;
    let value = || {
        let mut r = r.clone();
        let key = key.clone();
        async move { r.get::<_, Option<String>>(&key).await.unwrap() }
    };
    eventually("the row republished", Duration::from_secs(30), || async {
        value().await.is_some()
    })
    .await;
    assert_eq!(value().await.as_deref(), Some(expected), "from the stream");
    daemon.stop_ok().await;

    let _: () = r.clone().del(&key).await.unwrap();
    let (code, out, err) =
        support::daemon::run_binary(&["backfill", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        value().await.as_deref(),
        Some(expected),
        "from the backfill"
    );
}

/// A database `d_<name>` with `items (id PRIMARY KEY, v)`, a unique key prefix, and the
/// config of a delete rule on it (`<prefix>:i:{id}`, topic `<prefix>.events`) that
/// compares the rules' tables with the publication every second.
async fn items_watched(name: &str) -> (TestDb, String, ConfigBuilder) {
    let db = TestDb::new(&format!("d_{name}")).await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v int)")
        .await;
    let prefix = unique(name);
    let builder = ConfigBuilder::new(&db)
        .rules(&format!(
            "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:i:{{id}}\"]\n"
        ))
        .kafka_topic(&format!("{prefix}.events"))
        .pipeline("shutdown_timeout", "10s")
        .raw("metrics", "slot_poll = \"1s\"");
    (db, prefix, builder)
}

/// Whether `table` (by its current OID) is a member of publication `w2c`.
async fn in_publication(db: &TestDb, table: &str) -> bool {
    let client = connect(&db.url).await;
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                             WHERE p.pubname = 'w2c' AND pr.prrelid = to_regclass($1))",
            &[&table],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_table_replaced_while_running_is_published_again_and_what_it_missed_is_invalidated() {
    let (db, prefix, builder) = items_watched("swap").await;
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = builder.write(dir.path());
    let mut r = redis().await;
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;

    // A migration swaps in a new table under the rule's name and writes to it: the
    // publication still holds the old table, so the server streams none of this.
    let missed = format!("{prefix}:i:1");
    let _: () = r.set(&missed, "stale").await.unwrap();
    db.exec(
        "BEGIN;
         CREATE TABLE items_new (id int PRIMARY KEY, v int);
         ALTER TABLE items RENAME TO items_old;
         ALTER TABLE items_new RENAME TO items;
         INSERT INTO items VALUES (1, 10);
         COMMIT;",
    )
    .await;
    eventually(
        "the new table in the publication",
        Duration::from_secs(30),
        || in_publication(&db, "public.items"),
    )
    .await;
    eventually(
        "the key of the unstreamed insert to be invalidated",
        Duration::from_secs(30),
        || gone(&r, std::slice::from_ref(&missed)),
    )
    .await;
    let events = read_topic(&topic, |evs| {
        evs.iter().filter(|e| e["reason"] == "unpublished").count() >= 2
    })
    .await;
    let flushes: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["reason"] == "unpublished")
        .collect();
    assert_eq!(flushes[0]["kind"], "flush_all", "{flushes:?}");
    assert_eq!(flushes[0]["table"], "public.items", "{flushes:?}");
    assert!(
        flushes[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("public.items was not in publication \"w2c\"")),
        "{flushes:?}"
    );

    // From then on the new table's changes stream as the old one's did.
    let later = format!("{prefix}:i:2");
    let _: () = r.set(&later, "stale").await.unwrap();
    db.exec("INSERT INTO items VALUES (2, 20)").await;
    eventually(
        "a change to the new table to invalidate",
        Duration::from_secs(30),
        || gone(&r, std::slice::from_ref(&later)),
    )
    .await;
    daemon.stop_ok().await;

    // The same migration while the daemon is stopped: found at the next start.
    let stopped = format!("{prefix}:i:3");
    let _: () = r.set(&stopped, "stale").await.unwrap();
    db.exec(
        "BEGIN;
         DROP TABLE items_old;
         ALTER TABLE items RENAME TO items_old;
         CREATE TABLE items (id int PRIMARY KEY, v int);
         INSERT INTO items VALUES (3, 30);
         COMMIT;",
    )
    .await;
    let daemon = InProcess::start(&config);
    eventually(
        "the key of the insert written while stopped to be invalidated",
        Duration::from_secs(30),
        || gone(&r, std::slice::from_ref(&stopped)),
    )
    .await;
    assert!(in_publication(&db, "public.items").await);
    let last = format!("{prefix}:i:4");
    let _: () = r.set(&last, "stale").await.unwrap();
    db.exec("INSERT INTO items VALUES (4, 40)").await;
    eventually(
        "a change to the newest table to invalidate",
        Duration::from_secs(30),
        || gone(&r, std::slice::from_ref(&last)),
    )
    .await;
    daemon.stop_ok().await;
}

#[tokio::test]
async fn a_table_taken_out_of_the_publication_is_reported_without_postgres_create() {
    let (db, _, builder) = items_watched("out").await;
    let dir = tempfile::tempdir().unwrap();
    // `setup` makes the publication; the daemon then runs without `postgres.create`.
    let setup_config = builder.clone().write(dir.path());
    let (code, out, err) =
        support::daemon::run_binary(&["setup", "--config", setup_config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "setup: {out}{err}");
    let config = builder.create(false).write(dir.path());
    let (log, _guard) = support::inproc::Logs::capture("warn");
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    db.exec("ALTER PUBLICATION w2c DROP TABLE items").await;
    log.wait_for("public.items is not in publication \"w2c\"", 1)
        .await;
    let text = log.text();
    assert!(
        text.contains("postgres.create is false")
            && text.contains("Fix: ALTER PUBLICATION \"w2c\" ADD TABLE ONLY \"public\".\"items\""),
        "{text}"
    );
    assert!(!in_publication(&db, "public.items").await);
    // Said once, not every poll.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(log.lines_with("is not in publication"), 1, "{}", log.text());
    daemon.stop_ok().await;
}

#[tokio::test]
async fn a_partition_detached_and_dropped_right_after_a_write_still_invalidates() {
    let db = TestDb::new("d_detach").await;
    db.exec(
        "CREATE TABLE orders (id int, region text, total int, PRIMARY KEY (id, region))
             PARTITION BY LIST (region);
         CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
         CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us');
         INSERT INTO orders VALUES (1, 'eu', 10), (2, 'us', 20);",
    )
    .await;
    let prefix = unique("detach");
    let rules = format!(
        "[[rule]]\nname = \"order\"\ntable = \"public.orders\"\nkeys = [\"{prefix}:o:{{id}}:{{region}}\"]\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = schemas_config(dir.path(), &db, &rules, &format!("{prefix}.events"));
    let mut r = redis().await;
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;

    // By the time the stream describes orders_eu (its first change in this session),
    // the catalog no longer has it at all: the write is planned with the rules of the
    // table it belonged to when it was written.
    let key = format!("{prefix}:o:1:eu");
    let _: () = r.set(&key, "stale").await.unwrap();
    db.exec(
        "BEGIN;
         UPDATE orders SET total = 11 WHERE id = 1 AND region = 'eu';
         ALTER TABLE orders DETACH PARTITION orders_eu;
         DROP TABLE orders_eu;
         COMMIT;",
    )
    .await;
    eventually(
        "the write to the partition dropped since to invalidate",
        Duration::from_secs(30),
        || gone(&r, std::slice::from_ref(&key)),
    )
    .await;
    // The partition that stays is unaffected.
    let other = format!("{prefix}:o:2:us");
    let _: () = r.set(&other, "stale").await.unwrap();
    db.exec("UPDATE orders SET total = 21 WHERE id = 2").await;
    eventually(
        "an update of the remaining partition to invalidate",
        Duration::from_secs(30),
        || gone(&r, std::slice::from_ref(&other)),
    )
    .await;
    daemon.stop_ok().await;
}

#[tokio::test]
async fn a_replacing_table_without_a_primary_key_is_not_published_and_says_why() {
    let (db, _, builder) = items_watched("nopk").await;
    let dir = tempfile::tempdir().unwrap();
    let config = builder.write(dir.path());
    let (log, _guard) = support::inproc::Logs::capture("warn");
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    db.exec(
        "ALTER TABLE items RENAME TO items_old;
         CREATE TABLE items (id int, v int);",
    )
    .await;
    log.wait_for("public.items: not in publication \"w2c\", and not added", 1)
        .await;
    assert!(
        log.text().contains("Fix: give it a primary key"),
        "{}",
        log.text()
    );
    // The application's writes keep working: the table was left out.
    db.exec("INSERT INTO items VALUES (1, 1); UPDATE items SET v = 2; DELETE FROM items")
        .await;
    assert!(!in_publication(&db, "public.items").await);
    // Given a primary key, it is added.
    db.exec("ALTER TABLE items ADD PRIMARY KEY (id)").await;
    eventually(
        "the table, now with a primary key, in the publication",
        Duration::from_secs(30),
        || in_publication(&db, "public.items"),
    )
    .await;
    daemon.stop_ok().await;
}
