//! Crash safety: a writer runs while the daemon is killed with SIGKILL at random
//! moments and restarted; at the end an oracle (`support::oracle`) checks every change.
//! Zero misses.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::daemon::Daemon;
use support::db::{wait_streaming, TestDb};
use support::env::unique;
use support::oracle::{assert_nothing_lost, items_config, writer, ITEMS};
use support::rng::Lcg;
use support::store::{redis, unlink_matching};

const KILLS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_invalidation() {
    let db = TestDb::new("crash").await;
    db.exec(ITEMS).await;
    let prefix = unique("crash");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = items_config(&db, &prefix, &topic)
        .name(&format!("crash-{}", db.name))
        .write(dir.path());
    let slot = format!("{}_c", db.name);

    let mut daemon = Daemon::start(&config, &[]);
    wait_streaming(&db, &slot).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(writer(db.url.clone(), prefix.clone(), stop.clone()));

    let mut rng = Lcg(42);
    for round in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        drop(daemon); // SIGKILL, and reap it
        assert!(
            !writing.is_finished(),
            "the writer failed during round {round}"
        );
        daemon = Daemon::start(&config, &[]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (writes, rows) = writing.await.unwrap();
    assert!(writes.len() > 500, "only {} writes", writes.len());

    let events = assert_nothing_lost(&db, &prefix, &topic, &writes, &rows).await;
    println!(
        "{} writes, {KILLS} SIGKILLs, {} events (duplicates from replays included), zero misses",
        writes.len(),
        events
    );

    drop(daemon);
    unlink_matching(&mut redis().await, &format!("{prefix}:*")).await;
}
