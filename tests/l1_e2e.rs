//! End to end: the daemon (`wal2cache run`, a separate process) streams from
//! PostgreSQL and publishes schema-1 events; an L1 in this process subscribes to its
//! topic. An UPDATE evicts the row's keys and the keys cached under its tags, a
//! DELETE its keys, and the daemon's heartbeats keep the L1 healthy.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use wal2cache::l1::{L1, NO_TAGS};

const BIN: &str = env!("CARGO_BIN_EXE_wal2cache");
const SCHEMA: &str = include_str!("../migrations/001_example_schema.sql");

fn redis_url() -> String {
    std::env::var("WAL2CACHE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:63790".into())
}

fn kafka_brokers() -> String {
    std::env::var("WAL2CACHE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The example rules with every key and tag under a prefix of this test's own.
fn rules(prefix: &str) -> String {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/example.toml"))
            .unwrap();
    example
        .replace("\"shop:", &format!("\"{prefix}:shop:"))
        .replace("\"cfg:", &format!("\"{prefix}:cfg:"))
}

fn write_config(dir: &Path, db: &TestDb, prefix: &str, topic: &str) -> PathBuf {
    std::fs::write(dir.join("rules.toml"), rules(prefix)).unwrap();
    let config = dir.join("wal2cache.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "l1-e2e"
[postgres]
url = "{url}"
slot = "{db}_d"
publication = "w2c"
[rules]
path = "rules.toml"
[redis]
url = "{redis}"
tag_prefix = "{prefix}:tag:"
[kafka]
brokers = "{kafka}"
topic = "{topic}"
partitions = 2
[pipeline]
shutdown_timeout = "10s"
"#,
            url = db.url,
            db = db.name,
            redis = redis_url(),
            kafka = kafka_brokers(),
        ),
    )
    .unwrap();
    config
}

/// The daemon as a child process, killed if the test ends without stopping it.
struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start(config: &Path) -> Daemon {
    Daemon(Some(
        Command::new(BIN)
            .args(["run", "--config", config.to_str().unwrap()])
            .env("WAL2CACHE_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    ))
}

fn stop(mut daemon: Daemon) {
    let mut child = daemon.0.take().unwrap();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(
        child.wait().unwrap().code(),
        Some(0),
        "run exits 0 on SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_in_postgres_evicts_the_key_from_an_l1_in_another_process() {
    let db = TestDb::new("l1e2e").await;
    db.exec(SCHEMA).await;
    db.exec("INSERT INTO categories VALUES (7, 'mugs'), (8, 'cups')")
        .await;
    db.exec("INSERT INTO products VALUES (42, 'blue-mug', 7, 'Mug', 9.50, NULL)")
        .await;
    let prefix = unique("l1e2e");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &db, &prefix, &topic);
    let k = |s: &str| format!("{prefix}:{s}");

    // The L1 comes first: it waits, unhealthy, until the daemon created the topic
    // and its heartbeats arrive on every partition.
    let cache: L1<String> = L1::builder(kafka_brokers(), &topic)
        .staleness_bound(Duration::from_secs(3))
        .build()
        .unwrap();
    let daemon = start(&config);
    assert!(
        cache.wait_healthy(Duration::from_secs(60)).await,
        "the L1 never saw the daemon's heartbeats: {:?}",
        cache.metrics()
    );

    // What the application caches: the product, a list page under its category tag,
    // and a page of another category.
    let product = k("shop:product:v3:42");
    let page = k("page:mugs:1");
    let other = k("page:cups:1");
    let category7 = k("shop:category:7");
    let category8 = k("shop:category:8");
    cache
        .get_with(&product, &[&category7], || async { "Mug 9.50".to_string() })
        .await;
    cache
        .get_with(&page, &[&category7], || async { "mugs page".to_string() })
        .await;
    cache
        .get_with(&other, &[&category8], || async { "cups page".to_string() })
        .await;
    assert_eq!(cache.metrics().stored, 3);

    let updated = Instant::now();
    db.exec("UPDATE products SET price = 12.00 WHERE id = 42")
        .await;
    eventually("the product evicted", Duration::from_secs(20), || async {
        cache.get(&product).await.is_none()
    })
    .await;
    eprintln!("evicted {:?} after the UPDATE returned", updated.elapsed());
    eventually("the page under its tag", Duration::from_secs(5), || async {
        cache.get(&page).await.is_none()
    })
    .await;
    assert_eq!(cache.get(&other).await.as_deref(), Some("cups page"));
    let m = cache.metrics();
    assert!(m.healthy && m.evictions_by_invalidation >= 2, "{m:?}");
    assert!(m.last_lag.unwrap() < Duration::from_secs(5), "{m:?}");
    assert!(m.heartbeats > 0 && m.malformed == 0, "{m:?}");

    // Loaded again, then cached by slug too; a DELETE evicts both.
    let slug = k("shop:product:slug:v3:blue-mug");
    cache
        .get_with(&product, NO_TAGS, || async { "Mug 12.00".to_string() })
        .await;
    cache
        .get_with(&slug, NO_TAGS, || async { "Mug 12.00".to_string() })
        .await;
    assert_eq!(cache.get(&product).await.as_deref(), Some("Mug 12.00"));
    db.exec("DELETE FROM products WHERE id = 42").await;
    eventually("the deleted product", Duration::from_secs(20), || async {
        cache.get(&product).await.is_none() && cache.get(&slug).await.is_none()
    })
    .await;
    assert!(cache.is_healthy());

    stop(daemon);
}
