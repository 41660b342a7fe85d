//! `wal2cache::l1` while the broker is down: the cache empties itself within the
//! staleness bound, serves through its loaders without storing while the broker is
//! away, and fills again once the broker is back and heartbeats flow on every
//! partition. The broker keeps topics in memory, so they are created again after the
//! restart (as the daemon does).
//!
//! This test stops and starts the local broker with deploy/local/services.sh; it runs
//! alone in its binary so that no other test sees the outage. To run it beside
//! services others use, point it at a broker of its own: `WAL2CACHE_TEST_SERVICES` (the
//! services.sh of another checkout), `WAL2CACHE_KAFKA_PORT` and `WAL2CACHE_TEST_KAFKA`.

mod support;

use std::time::{Duration, Instant};

use support::kafka::create_topic;
use support::l1::*;
use support::services::{services, StartAgain};
use support::wait::eventually;

const OUTAGE: Duration = Duration::from_secs(4);
const STALENESS: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_empties_while_the_broker_is_down_and_fills_again_when_it_is_back() {
    let (rec, mut notices) = recorder();
    let s = Setup::with("outage", 2, |b| b.staleness_bound(STALENESS).on_notice(rec)).await;
    let c = &s.cache;
    for i in 0..20 {
        c.get_with(&format!("k:{i}"), &["t"], || async { "v".to_string() })
            .await;
    }
    assert_eq!(c.metrics().stored, 20);

    let back = StartAgain("kafka");
    services(&["stop", "kafka"]);
    let stopped = Instant::now();
    let n = wait_notice(&mut notices, STALENESS * 3, |n| {
        matches!(n, Seen::Unhealthy(_))
    })
    .await;
    let emptied_after = stopped.elapsed();
    eprintln!("emptied {emptied_after:?} after the broker stopped: {n:?}");
    assert!(
        emptied_after <= STALENESS + Duration::from_millis(600),
        "emptied only after {emptied_after:?} (staleness bound {STALENESS:?})"
    );
    let m = c.metrics();
    assert!(!m.healthy && m.resets == 1, "{m:?}");
    for i in 0..20 {
        assert_eq!(c.get(&format!("k:{i}")).await, None);
    }
    // The broker is away: every lookup is a load, nothing is stored.
    while stopped.elapsed() < OUTAGE {
        let v = c
            .get_with("k:0", &["t"], || async { "from the database".to_string() })
            .await;
        assert_eq!(v, "from the database");
        assert_eq!(c.get("k:0").await, None);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!c.is_healthy());

    services(&["start", "kafka"]);
    std::mem::forget(back);
    let restarted = Instant::now();
    // The broker lost its topics: create ours again; heartbeats resume on it.
    create_topic(&s.topic, 2).await;
    let events = Events::new(&s.topic, 2);
    let _heartbeats = Heartbeats::start(&events, HEARTBEAT);
    assert!(
        c.wait_healthy(Duration::from_secs(30)).await,
        "not healthy again: {:?}",
        c.metrics()
    );
    eprintln!("healthy {:?} after the restart", restarted.elapsed());
    wait_notice(&mut notices, Duration::from_secs(1), |n| {
        *n == Seen::Healthy
    })
    .await;

    c.get_with("k:0", &["t"], || async { "cached again".to_string() })
        .await;
    assert_eq!(c.get("k:0").await.as_deref(), Some("cached again"));
    events.invalidate(1, &[], &["t"]).await;
    eventually(
        "an event after the restart",
        Duration::from_secs(10),
        || async { c.get("k:0").await.is_none() },
    )
    .await;
    let m = c.metrics();
    assert!(m.healthy && m.resets == 1, "{m:?}");
}
