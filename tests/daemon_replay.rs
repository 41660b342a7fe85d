//! Never older: a replay from an older position (a second slot that confirmed nothing)
//! applies every change again, and republished values never go back, nor do deleted
//! ones come back.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::*;
use common::*;
use redis::AsyncCommands;
use serde_json::Value;

fn write_config(dir: &Path, db: &TestDb, prefix: &str) -> PathBuf {
    std::fs::write(
        dir.join("rules.toml"),
        format!(
            "[[rule]]\nname = \"item_json\"\ntable = \"public.items\"\nkeys = [\"{prefix}:json:{{id}}\"]\naction = \"republish\"\n"
        ),
    )
    .unwrap();
    let kafka = std::env::var("WAL2CACHE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let config = dir.join("wal2cache.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"replay\"\n[postgres]\nurl = \"{}\"\nslot = \"{}_a\"\npublication = \"w2c\"\n[rules]\npath = \"rules.toml\"\n\
             [redis]\nurl = \"{}\"\n[kafka]\nbrokers = \"{kafka}\"\ntopic = \"{prefix}.events\"\npartitions = 1\n[pipeline]\nbatch_size = 1\n",
            db.url,
            db.name,
            redis_url()
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_an_older_position_never_makes_values_older() {
    let db = TestDb::new("replay").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)")
        .await;
    let prefix = unique("replay");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, &prefix);
    let (slot_a, slot_b) = (format!("{}_a", db.name), format!("{}_b", db.name));

    // The daemon creates the publication and its slot; the second slot starts here too.
    let daemon = Daemon::start(&config, &[]);
    wait_streaming(&db, &slot_a).await;
    db.client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot_b],
        )
        .await
        .unwrap();

    const UPDATES: i32 = 1500;
    db.exec("INSERT INTO items VALUES (1, 0), (2, 0)").await;
    let client = connect(&db.url).await;
    for v in 1..=UPDATES {
        client
            .execute("UPDATE items SET v = $1 WHERE id = 1", &[&v])
            .await
            .unwrap();
    }
    db.exec("DELETE FROM items WHERE id = 2").await;

    let mut r = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (one, two) = (format!("{prefix}:json:1"), format!("{prefix}:json:2"));
    let value = |r: &mut redis::aio::MultiplexedConnection, key: String| {
        let mut r = r.clone();
        async move { r.get::<_, Option<String>>(key).await.unwrap() }
    };
    let v_of = |s: &Option<String>| {
        s.as_deref().map(|s| {
            serde_json::from_str::<Value>(s).unwrap()["v"]
                .as_i64()
                .unwrap()
        })
    };
    eventually("the final value", Duration::from_secs(60), || {
        let fut = value(&mut r, one.clone());
        async move { v_of(&fut.await) == Some(i64::from(UPDATES)) }
    })
    .await;
    eventually(
        "the deleted row's key to go",
        Duration::from_secs(30),
        || {
            let fut = value(&mut r, two.clone());
            async move { fut.await.is_none() }
        },
    )
    .await;
    drop(daemon);

    // Replay everything from the second slot, one change per batch, watching the values.
    let replay = Daemon::start(&config, &[("WAL2CACHE__POSTGRES__SLOT", slot_b.as_str())]);
    wait_streaming(&db, &slot_b).await;
    let end = db.confirmed_lsn(&slot_a).await.unwrap();
    let mut observations = 0;
    loop {
        let v = v_of(&value(&mut r, one.clone()).await);
        assert_eq!(
            v,
            Some(i64::from(UPDATES)),
            "a replayed older value was written over a newer one"
        );
        assert_eq!(
            value(&mut r, two.clone()).await,
            None,
            "a replay brought a deleted row back"
        );
        observations += 1;
        if db.confirmed_lsn(&slot_b).await.is_some_and(|l| l >= end) {
            break;
        }
        assert!(observations < 20_000, "the replay did not reach the end");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        observations > 10,
        "the replay was too quick to watch ({observations} looks)"
    );
    drop(replay);
    let keys: Vec<String> = r.keys(format!("*{prefix}*")).await.unwrap();
    let _: () = redis::cmd("UNLINK")
        .arg(keys)
        .query_async(&mut r)
        .await
        .unwrap_or(());
}
