//! SIGHUP in `wal2cache run`: new rules (a new key, and a rule on a table the
//! publication does not hold yet) take effect from the reload's marker in the stream;
//! rules that do not load are refused, the daemon keeps running on the previous ones.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::Value;
use support::config::{ConfigBuilder, RULES_FILE};
use support::db::{wait_streaming, TestDb};
use support::env::unique;
use support::inproc::{InProcess, Logs};
use support::kafka::read_topic_until_quiet;
use support::store::{present, redis};
use support::wait::eventually;

#[tokio::test]
async fn sighup_reloads_the_rules_of_run_and_keeps_them_when_the_new_file_is_broken() {
    let db = TestDb::new("reload").await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE others (id int PRIMARY KEY, v int NOT NULL);",
    )
    .await;
    let prefix = unique("reload");
    let topic = format!("{prefix}.events");
    let k = |s: &str| format!("{prefix}:{s}");
    let rule = |name: &str, table: &str, key: &str| {
        format!(
            "[[rule]]\nname = \"{name}\"\ntable = \"public.{table}\"\nkeys = [\"{prefix}:{key}:{{id}}\"]\naction = \"republish\"\n"
        )
    };
    // A: items under `a:`. B: items under `a:` and `b:`, and others (not in the
    // publication yet: the reload adds it) under `o:`.
    let rules_a = rule("item", "items", "a");
    let rules_b = format!(
        "{rules_a}\n{}\n{}",
        rule("item_b", "items", "b"),
        rule("other", "others", "o")
    );
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new(&db)
        .slot_suffix(&db, "r")
        .rules(&rules_a)
        .kafka_topic(&topic)
        .pipeline("idle_heartbeat", "0s")
        .write(dir.path());
    let rules_file = dir.path().join(RULES_FILE);
    let (log, _guard) = Logs::capture("info");
    let mut daemon = InProcess::start(&config);
    let slot = format!("{}_r", db.name);
    wait_streaming(&db, &slot).await;
    let r = redis().await;
    // Every key any of the rules could write for the rows below.
    let all: Vec<String> = ["a", "b", "o"]
        .iter()
        .flat_map(|p| (1..=3).map(move |id| k(&format!("{p}:{id}"))))
        .collect();
    let set = |keys: &[&str]| keys.iter().map(|s| k(s)).collect::<BTreeSet<_>>();

    // Rules A.
    db.exec("INSERT INTO items VALUES (1, 1)").await;
    eventually("A's key of row 1", Duration::from_secs(20), || async {
        present(&r, &all).await == set(&["a:1"])
    })
    .await;

    // Rules B, in force from the reload on.
    std::fs::write(&rules_file, &rules_b).unwrap();
    daemon.reload();
    log.wait_for("rules reloaded, in force from here in the stream", 1)
        .await;
    db.exec("INSERT INTO items VALUES (2, 1)").await;
    db.exec("INSERT INTO others VALUES (1, 1)").await;
    eventually(
        "B's keys of the changes after the reload",
        Duration::from_secs(20),
        || async { present(&r, &all).await == set(&["a:1", "a:2", "b:2", "o:1"]) },
    )
    .await;

    // A file that does not parse: refused, logged, and B stays in force.
    std::fs::write(&rules_file, "[[rule]\nname = \"broken\n").unwrap();
    daemon.reload();
    log.wait_for("rules not reloaded, the previous rules stay in force", 1)
        .await;
    let text = log.text();
    assert!(
        text.contains(&format!("{}: TOML parse error", rules_file.display())),
        "the error names the file:\n{text}"
    );
    daemon
        .assert_running("after a reload of broken rules")
        .await;
    db.exec("INSERT INTO items VALUES (3, 1)").await;
    db.exec("INSERT INTO others VALUES (2, 1)").await;
    eventually(
        "B's keys after the refused reload",
        Duration::from_secs(20),
        || async {
            present(&r, &all).await == set(&["a:1", "a:2", "b:2", "o:1", "a:3", "b:3", "o:2"])
        },
    )
    .await;
    daemon.assert_running("at the end").await;
    assert_eq!(
        log.lines_with("rules reloaded"),
        1,
        "only the first reload took effect"
    );

    // The events say the same, each change once, in order (one partition).
    daemon.stop_ok().await;
    let events = read_topic_until_quiet(&topic, 5, Duration::from_secs(3)).await;
    let got: Vec<(String, BTreeSet<String>)> = events
        .iter()
        .map(|e: &Value| {
            let keys = e["keys"].as_array().unwrap();
            (
                e["table"].as_str().unwrap().to_string(),
                keys.iter()
                    .map(|k| k.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    let expected: Vec<(String, BTreeSet<String>)> = [
        ("items", &["a:1"][..]),
        ("items", &["a:2", "b:2"]),
        ("others", &["o:1"]),
        ("items", &["a:3", "b:3"]),
        ("others", &["o:2"]),
    ]
    .iter()
    .map(|(t, keys)| (format!("public.{t}"), set(keys)))
    .collect();
    assert_eq!(got, expected, "{events:#?}");
    let _: () = r.clone().del(&all).await.unwrap();
}
