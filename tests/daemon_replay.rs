//! Never older: a replay from an older position (a second slot that confirmed nothing)
//! applies every change again, and republished values never go back, nor do deleted
//! ones come back.

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value;
use support::config::ConfigBuilder;
use support::db::{connect, wait_streaming, TestDb};
use support::env::unique;
use support::inproc::InProcess;
use support::store::{redis, unlink_matching};
use support::wait::eventually;
use wal2cache::config::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_an_older_position_never_makes_values_older() {
    let db = TestDb::new("replay").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)")
        .await;
    let prefix = unique("replay");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new(&db)
        .name(&format!("replay-{}", db.name))
        .slot_suffix(&db, "a")
        .rules(&format!(
            "[[rule]]\nname = \"item_json\"\ntable = \"public.items\"\nkeys = [\"{prefix}:json:{{id}}\"]\naction = \"republish\"\n"
        ))
        .kafka_topic(&format!("{prefix}.events"))
        .pipeline("batch_size", 1)
        .write(dir.path());
    let (slot_a, slot_b) = (format!("{}_a", db.name), format!("{}_b", db.name));

    // The daemon creates the publication and its slot; the second slot starts here too.
    let daemon = InProcess::start(&config);
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

    let mut r = redis().await;
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
    daemon.stop_ok().await;

    // Replay everything from the second slot, one change per batch, watching the values.
    let mut on_b = Config::load(&config).unwrap();
    on_b.postgres.slot = slot_b.clone();
    let replay = InProcess::start_with(on_b);
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
    replay.stop_ok().await;
    unlink_matching(&mut r, &format!("*{prefix}*")).await;
}
