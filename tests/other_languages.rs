//! The Python client of `examples/python/wal2cache_client.py` (confluent-kafka and
//! redis-py, installed by `deploy/local/test.sh` into `.local/py`) against the running
//! daemon, so that the protocols the README documents for other languages cannot
//! drift from the code: the lease sidecar's name, the Lua scripts of `src/l2/lua/`
//! (look, lease, tags registered, store refused after the daemon's change, negative
//! caching), and the subscriber (every partition, healthy on heartbeats, evicted by
//! the event of a change).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::config::ConfigBuilder;
use support::db::{wait_streaming, TestDb};
use support::env::{kafka_brokers, kafka_properties, redis_url, unique};
use support::inproc::InProcess;
use support::store::{redis, unlink_matching};
use support::wait::eventually;
use wal2cache::keys::lease_key;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/python/wal2cache_client.py"
);

/// The Python of `.local/py` (or `WAL2CACHE_TEST_PYTHON`).
fn python() -> String {
    let python = std::env::var("WAL2CACHE_TEST_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.local/py/bin/python").into());
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} is missing: deploy/local/test.sh creates it (python3 -m venv .local/py; \
         pip install -r examples/python/requirements.txt)"
    );
    python
}

#[test]
fn python_names_lease_sidecars_as_the_library_does() {
    let keys = [
        "shop:product:v3:42",
        "user:{42}:profile",
        "odd}key",
        "{}empty-tag",
        "a{}b}c",
        "x}y{z}",
        "}",
        "ünï}cødé",
    ];
    let out = Command::new(python())
        .arg(SCRIPT)
        .arg("lease-keys")
        .args(keys)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), keys.len());
    for (key, line) in keys.iter().zip(&lines) {
        assert_eq!(line["key"], *key);
        assert_eq!(line["lease"], lease_key(key), "{key}");
    }
}

/// The next line of the Python client, which must be step `name`.
async fn step(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>, name: &str) -> Value {
    let v = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no {name:?} line from the Python client in 60 s"))
        .unwrap_or_else(|| panic!("the Python client ended before {name:?}"));
    assert_eq!(v["step"], name, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_speaks_both_protocols_with_the_daemon() {
    let db = TestDb::new("pyclient").await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT i, 0 FROM generate_series(1, 3) i;",
    )
    .await;
    let prefix = unique("py");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new(&db)
        .rules(&format!(
            r#"[[rule]]
name = "item"
table = "public.items"
keys = ["{prefix}:item:{{id}}"]
tags = ["{prefix}:items"]
"#
        ))
        .redis_key("tag_prefix", format!("{prefix}:tag:"))
        .write(dir.path());
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    let topic = format!("{}.events", db.name);

    let mut cmd = Command::new(python());
    cmd.arg(SCRIPT)
        .arg("check")
        .args(["--redis", &redis_url()])
        .args(["--brokers", &kafka_brokers()])
        .args(["--topic", &topic])
        .args(["--prefix", &prefix])
        .args(["--tag-prefix", &format!("{prefix}:tag:")]);
    for (k, v) in kafka_properties() {
        cmd.args(["--property", &format!("{k}={v}")]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let one = format!("{prefix}:item:1");
    let two = format!("{prefix}:item:2");

    step(&mut rx, "healthy").await;
    let l2 = step(&mut rx, "l2").await;
    assert_eq!(l2["value"], "row 1", "{l2}");
    assert_eq!(l2["again"], "row 1", "a hit loaded again: {l2}");
    assert_eq!(l2["loads"], 1, "{l2}");
    assert_eq!(l2["lease_key"], lease_key(&one), "{l2}");
    let mut members = vec![one.clone(), lease_key(&one)];
    members.sort();
    assert_eq!(l2["members"], serde_json::json!(members), "{l2}");

    let leased = step(&mut rx, "leased").await;
    assert_eq!(leased["kind"], "granted", "{leased}");
    let mut r = redis().await;
    db.exec("UPDATE items SET v = v + 1 WHERE id = 2").await;
    eventually(
        "the daemon to remove item 2's lease",
        Duration::from_secs(30),
        || {
            let mut r = r.clone();
            let lease = lease_key(&two);
            async move {
                !redis::AsyncCommands::exists::<_, bool>(&mut r, &lease)
                    .await
                    .unwrap()
            }
        },
    )
    .await;
    writeln!(stdin, "go").unwrap();
    let stored = step(&mut rx, "store_after_change").await;
    assert_eq!(
        stored["stored"], 0,
        "a value loaded before the change was stored: {stored}"
    );
    assert_eq!(stored["exists"], 0, "{stored}");

    let negative = step(&mut rx, "negative").await;
    assert_eq!(negative["value"], Value::Null, "{negative}");
    assert_eq!(
        negative["again"],
        Value::Null,
        "the marker was not a hit: {negative}"
    );
    assert_eq!(negative["marker"], true, "{negative}");

    let cached = step(&mut rx, "l1_cached").await;
    assert_eq!(cached["cached"], true, "{cached}");
    db.exec("UPDATE items SET v = v + 1 WHERE id = 1").await;
    writeln!(stdin, "go").unwrap();
    let evicted = step(&mut rx, "l1_evicted").await;
    assert_eq!(evicted["evicted"], true, "{evicted}");
    assert_eq!(evicted["event"]["kind"], "invalidate", "{evicted}");
    assert_eq!(
        evicted["event"]["keys"],
        serde_json::json!([one]),
        "{evicted}"
    );
    // The daemon also purged the tag: the key the Python L2 stored is gone.
    eventually("item 1 gone from Redis", Duration::from_secs(30), || {
        let mut r = r.clone();
        let one = one.clone();
        async move {
            !redis::AsyncCommands::exists::<_, bool>(&mut r, &one)
                .await
                .unwrap()
        }
    })
    .await;

    let status = child.wait().unwrap();
    assert!(status.success(), "the Python client failed: {status}");
    daemon.stop_ok().await;
    unlink_matching(&mut r, &format!("{prefix}:*")).await;
    unlink_matching(&mut r, &format!("{{{prefix}:*")).await;
}
