//! End to end: the daemon (`app::run`, in this process; the L1 hears of it through
//! the broker alone) streams from PostgreSQL and publishes schema-1 events; an L1
//! subscribes to its topic. An UPDATE evicts the row's keys and the keys cached under its tags, a
//! DELETE its keys, and the daemon's heartbeats keep the L1 healthy.

mod support;

use std::time::{Duration, Instant};

use support::config::ConfigBuilder;
use support::db::{TestDb, EXAMPLE_SCHEMA as SCHEMA};
use support::env::{kafka_brokers, unique};
use support::inproc::InProcess;
use support::wait::eventually;
use wal2cache::l1::{L1, NO_TAGS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_in_postgres_evicts_the_key_from_an_l1_subscribed_to_the_daemon() {
    let db = TestDb::new("l1e2e").await;
    db.exec(SCHEMA).await;
    db.exec("INSERT INTO categories VALUES (7, 'mugs'), (8, 'cups')")
        .await;
    db.exec("INSERT INTO products VALUES (42, 'blue-mug', 7, 'Mug', 9.50, NULL)")
        .await;
    let prefix = unique("l1e2e");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::example(&db, &prefix, &topic)
        .name(&format!("l1-e2e-{}", db.name))
        .write(dir.path());
    let k = |s: &str| format!("{prefix}:{s}");

    // The L1 comes first: it waits, unhealthy, until the daemon created the topic
    // and its heartbeats arrive on every partition.
    let cache: L1<String> = L1::builder(kafka_brokers(), &topic)
        .staleness_bound(Duration::from_secs(3))
        .build()
        .unwrap();
    let daemon = InProcess::start(&config);
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

    daemon.stop_ok().await;
}
