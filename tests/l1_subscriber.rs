//! `wal2cache::l1` against the real broker, with schema-1 events produced by the test
//! (heartbeats too: no daemon runs here): events evict keys and tags, `flush_all`
//! empties, misses are single-flighted, a load raced by an invalidation never stores
//! its stale value, malformed messages are survived, and silence or a lost topic
//! empties the cache until the stream is healthy again.

mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::env::unique;
use support::kafka::create_topic;
use support::l1::*;
use support::wait::eventually;
use wal2cache::event::{Event, Kind};
use wal2cache::l1::NO_TAGS;

fn value(s: &str) -> impl std::future::Future<Output = String> {
    let s = s.to_string();
    async move { s }
}

#[tokio::test]
async fn an_invalidate_event_evicts_its_keys() {
    let s = Setup::new("keys", 3).await;
    let c = &s.cache;
    assert_eq!(c.get_with("user:1", NO_TAGS, || value("u1")).await, "u1");
    assert_eq!(c.get_with("user:2", NO_TAGS, || value("u2")).await, "u2");
    assert_eq!(
        c.get_with("user:1", NO_TAGS, unreachable_loader).await,
        "u1",
        "a hit"
    );
    let m = c.metrics();
    assert_eq!((m.loads, m.hits, m.misses, m.stored), (2, 1, 2, 2), "{m:?}");
    s.events.invalidate(2, &["user:1", "user:9"], &[]).await;
    eventually("user:1 evicted", Duration::from_secs(10), || async {
        c.get("user:1").await.is_none()
    })
    .await;
    assert_eq!(c.get("user:2").await.as_deref(), Some("u2"), "others stay");
    let m = c.metrics();
    assert_eq!(m.evictions_by_invalidation, 1, "{m:?}");
    assert!(m.healthy && m.unhealthy_reason.is_none(), "{m:?}");
    let lag = m.last_lag.expect("lag measured from commit_time");
    assert!(lag < Duration::from_secs(5), "{lag:?}");
    assert!(m.last_heartbeat_age.unwrap() < BOUND);
    // Loaded again after the eviction.
    assert_eq!(c.get_with("user:1", NO_TAGS, || value("u1'")).await, "u1'");
}

#[tokio::test]
async fn a_tag_event_evicts_every_key_cached_under_the_tag() {
    let s = Setup::new("tags", 3).await;
    let c = &s.cache;
    c.get_with("page:mugs:1", &["category:7"], || value("p1"))
        .await;
    c.get_with("page:mugs:2", &["category:7"], || value("p2"))
        .await;
    c.get_with("page:all", &["category:7", "products"], || value("all"))
        .await;
    c.get_with("page:cups:1", &["category:8"], || value("c1"))
        .await;
    assert!(c.insert("product:42", "mug".into(), &["category:7"]).await);
    s.events.invalidate(0, &[], &["category:7"]).await;
    for k in ["page:mugs:1", "page:mugs:2", "page:all", "product:42"] {
        eventually(k, Duration::from_secs(10), || async {
            c.get(k).await.is_none()
        })
        .await;
    }
    assert_eq!(c.get("page:cups:1").await.as_deref(), Some("c1"));
    assert_eq!(c.metrics().evictions_by_invalidation, 4);
    // The tag is empty now; a key cached again under it is evicted by the next event.
    c.get_with("page:mugs:1", &["category:7"], || value("p1'"))
        .await;
    s.events
        .invalidate(1, &[], &["category:7", "category:8"])
        .await;
    for k in ["page:mugs:1", "page:cups:1"] {
        eventually(k, Duration::from_secs(10), || async {
            c.get(k).await.is_none()
        })
        .await;
    }
    // "page:all" was evicted through category:7; its other tag no longer names it.
    assert_eq!(c.invalidate_tag("products").await, 0);
}

#[tokio::test]
async fn flush_all_empties_the_cache() {
    let s = Setup::new("flush", 2).await;
    let c = &s.cache;
    for i in 0..50 {
        let k = format!("k:{i}");
        c.get_with(&k, &["t"], || value("v")).await;
    }
    c.run_pending_tasks().await;
    assert_eq!(c.metrics().entries, 50);
    s.events.flush_all(1).await;
    eventually("the flush", Duration::from_secs(10), || async {
        c.metrics().flushes == 1
    })
    .await;
    for i in 0..50 {
        assert_eq!(c.get(&format!("k:{i}")).await, None);
    }
    c.run_pending_tasks().await;
    let m = c.metrics();
    assert_eq!(m.entries, 0, "{m:?}");
    assert!(m.healthy, "a flush is not trouble: {m:?}");
    c.get_with("k:0", &["t"], || value("again")).await;
    assert_eq!(
        c.get("k:0").await.as_deref(),
        Some("again"),
        "it fills again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_100_misses_on_one_key_runs_the_loader_once() {
    let s = Setup::new("burst", 1).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Barrier::new(100));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (c, runs, gate) = (s.cache.clone(), runs.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            c.get_with("hot", &["t"], || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                "loaded once".to_string()
            })
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), "loaded once");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let m = s.cache.metrics();
    assert_eq!((m.loads, m.misses, m.stored), (1, 100, 1), "{m:?}");

    // The fallible variant: one run, every caller gets the same error, nothing stored.
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (c, runs, gate) = (s.cache.clone(), runs.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            c.try_get_with("cold", NO_TAGS, || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err::<String, _>(std::io::Error::other("database down"))
            })
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap_err().to_string(), "database down");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(s.cache.get("cold").await, None);
    let ok = s
        .cache
        .try_get_with("cold", NO_TAGS, || async {
            Ok::<_, std::io::Error>("up".to_string())
        })
        .await;
    assert_eq!(ok.unwrap(), "up");
    assert_eq!(s.cache.metrics().load_errors, 1);
}

#[derive(Debug, Clone, Copy)]
enum Trigger {
    Key,
    Tag,
    Flush,
}

/// A load begins, the row changes and its event is applied while the load is still
/// reading, then the load returns the old value: its caller gets it, the cache must
/// not keep it. A caller that arrives after the event does not join the old load.
async fn a_load_raced_by(trigger: Trigger) {
    let (rec, mut notices) = recorder();
    let s = Setup::with("race", 2, |b| b.on_notice(rec)).await;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let c = s.cache.clone();
    let old_load = tokio::spawn(async move {
        c.get_with("user:1", &["team:7"], || async move {
            started_tx.send(()).unwrap();
            release_rx.await.unwrap();
            "old".to_string()
        })
        .await
    });
    started_rx.await.unwrap();

    match trigger {
        Trigger::Key => s.events.invalidate(1, &["user:1"], &[]).await,
        Trigger::Tag => s.events.invalidate(0, &[], &["team:7"]).await,
        Trigger::Flush => s.events.flush_all(1).await,
    }
    wait_notice(&mut notices, Duration::from_secs(10), |n| {
        matches!(n, Seen::Invalidated { .. } | Seen::Flushed)
    })
    .await;

    let fresh = s
        .cache
        .get_with("user:1", &["team:7"], || value("new"))
        .await;
    assert_eq!(
        fresh, "new",
        "{trigger:?}: a caller after the event loads afresh"
    );

    release_tx.send(()).unwrap();
    assert_eq!(
        old_load.await.unwrap(),
        "old",
        "{trigger:?}: the raced load still returns its value"
    );
    assert_eq!(
        s.cache.get("user:1").await.as_deref(),
        Some("new"),
        "{trigger:?}: the raced load did not store its stale value"
    );
    let m = s.cache.metrics();
    assert_eq!(
        (m.loads, m.stored, m.not_stored),
        (2, 1, 1),
        "{trigger:?}: {m:?}"
    );
}

#[tokio::test]
async fn a_load_that_began_before_an_invalidation_of_its_key_does_not_store() {
    a_load_raced_by(Trigger::Key).await;
}

#[tokio::test]
async fn a_load_that_began_before_an_invalidation_of_its_tag_does_not_store() {
    a_load_raced_by(Trigger::Tag).await;
}

#[tokio::test]
async fn a_load_that_began_before_a_flush_does_not_store() {
    a_load_raced_by(Trigger::Flush).await;
}

/// Readers load a "row" while a writer changes it and publishes an invalidation after
/// each change, as the daemon does after each commit. Once the event of change `n` is
/// applied, the cache may only hold version `n` or newer: readers check every hit.
/// Loads take up to 60 ms, longer than an event takes to arrive, so that some read
/// the row before a change whose event lands while they still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_racing_invalidations_never_leave_a_stale_value() {
    let applied = Arc::new(AtomicU64::new(0));
    let counter = applied.clone();
    let s = Setup::with("race_stress", 1, move |b| {
        b.on_notice(move |n| {
            if matches!(n, wal2cache::l1::Notice::Invalidated { .. }) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        })
    })
    .await;
    let row = Arc::new(AtomicU64::new(0));
    let stale = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..8u64 {
        let (c, row, stop) = (s.cache.clone(), row.clone(), stop.clone());
        let (applied, stale) = (applied.clone(), stale.clone());
        readers.push(tokio::spawn(async move {
            let mut n = r;
            while !stop.load(Ordering::Relaxed) {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let delay = Duration::from_micros((n >> 33) % 60_000);
                let row = row.clone();
                c.get_with("row:1", &["rows"], || async move {
                    let v = row.load(Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    v.to_string()
                })
                .await;
                let floor = applied.load(Ordering::SeqCst);
                if let Some(v) = c.get("row:1").await {
                    if v.parse::<u64>().unwrap() < floor {
                        stale.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    const WRITES: u64 = 150;
    for i in 0..WRITES {
        row.fetch_add(1, Ordering::SeqCst);
        if i % 2 == 0 {
            s.events.invalidate(0, &["row:1"], &[]).await;
        } else {
            s.events.invalidate(0, &[], &["rows"]).await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eventually("every event applied", Duration::from_secs(20), || async {
        applied.load(Ordering::SeqCst) == WRITES
    })
    .await;
    // Let the readers run on after the last event, then stop them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let m = s.cache.metrics();
    assert_eq!(
        stale.load(Ordering::SeqCst),
        0,
        "hits older than the last applied invalidation: {m:?}"
    );
    let cached = s.cache.get("row:1").await;
    assert!(
        cached.is_none() || cached == Some(WRITES.to_string()),
        "stale value cached: {cached:?}, the row is at {WRITES}"
    );
    assert!(m.loads > 10 && m.not_stored > 0, "loads were raced: {m:?}");
}

#[tokio::test]
async fn malformed_messages_are_counted_and_skipped() {
    let s = Setup::new("malformed", 1).await;
    let c = &s.cache;
    for k in ["a", "b", "c"] {
        c.get_with(k, NO_TAGS, || value(k)).await;
    }
    let bad: [Option<&[u8]>; 7] = [
        Some(b"not json"),
        Some(b""),
        None,
        Some(br#"{"schema":2,"kind":"invalidate","source":"x","keys":["a"]}"#),
        Some(br#"{"schema":1,"kind":"invalidate","keys":["a"]}"#),
        Some(br#"{"schema":1,"kind":"invalidate","source":"x","keys":"a"}"#),
        Some(&[0xff, 0xfe, 0x00, 0x7b]),
    ];
    for payload in bad {
        s.events.send_raw(0, payload).await;
    }
    // Tolerated: an unknown kind, unknown fields.
    s.events
        .send_raw(
            0,
            Some(br#"{"schema":1,"kind":"rebalance","source":"x","keys":["a"],"extra":{"y":1}}"#),
        )
        .await;
    s.events
        .send_raw(
            0,
            Some(br#"{"schema":1,"kind":"invalidate","source":"x","keys":["b"],"future":[1,2]}"#),
        )
        .await;
    eventually("b evicted", Duration::from_secs(10), || async {
        c.get("b").await.is_none()
    })
    .await;
    let m = c.metrics();
    assert_eq!((m.malformed, m.unknown_kinds), (7, 1), "{m:?}");
    assert!(m.healthy, "{m:?}");
    assert_eq!(
        c.get("a").await.as_deref(),
        Some("a"),
        "nothing bad applied"
    );
    s.events.invalidate(0, &["c"], &[]).await;
    eventually("c evicted", Duration::from_secs(10), || async {
        c.get("c").await.is_none()
    })
    .await;
}

#[tokio::test]
async fn without_heartbeats_the_cache_empties_and_serves_through_loaders_until_they_return() {
    let (rec, mut notices) = recorder();
    let s = Setup::with("silence", 2, |b| b.on_notice(rec)).await;
    let c = &s.cache;
    for i in 0..10 {
        c.get_with(&format!("k:{i}"), &["t"], || value("v")).await;
    }
    s.heartbeats.pause(true);
    let paused = Instant::now();
    let n = wait_notice(&mut notices, BOUND * 5, |n| matches!(n, Seen::Unhealthy(_))).await;
    let after = paused.elapsed();
    assert!(
        after >= BOUND - HEARTBEAT && after < BOUND * 3,
        "emptied {after:?} after the last heartbeat (bound {BOUND:?})"
    );
    assert!(
        format!("{n:?}").contains("no heartbeat on partition"),
        "{n:?}"
    );
    let m = c.metrics();
    assert!(!m.healthy && m.resets == 1, "{m:?}");
    assert!(m.unhealthy_reason.unwrap().contains("no heartbeat"));
    for i in 0..10 {
        assert_eq!(c.get(&format!("k:{i}")).await, None);
    }
    // Unhealthy: every lookup runs its loader, nothing is stored.
    let loads = c.metrics().loads;
    for _ in 0..3 {
        assert_eq!(
            c.get_with("k:0", &["t"], || value("direct")).await,
            "direct"
        );
    }
    assert!(!c.insert("k:1", "x".into(), NO_TAGS).await);
    assert_eq!(c.metrics().loads, loads + 3);
    assert_eq!(c.get("k:0").await, None);

    s.heartbeats.pause(false);
    assert!(
        c.wait_healthy(Duration::from_secs(10)).await,
        "{:?}",
        c.metrics()
    );
    c.get_with("k:0", &["t"], || value("cached again")).await;
    assert_eq!(c.get("k:0").await.as_deref(), Some("cached again"));
    s.events.invalidate(1, &[], &["t"]).await;
    eventually(
        "the event after the recovery",
        Duration::from_secs(10),
        || async { c.get("k:0").await.is_none() },
    )
    .await;
}

#[tokio::test]
async fn a_partition_without_heartbeats_keeps_the_cache_unhealthy() {
    // Heartbeats reach partition 0 only: the cache never trusts partition 1.
    let topic = unique("l1_half");
    create_topic(&topic, 2).await;
    let half = Events::new(&topic, 1);
    let _hb = Heartbeats::start(&half, HEARTBEAT);
    let c = builder(&topic).build::<String>().unwrap();
    assert!(!c.wait_healthy(BOUND * 2).await);
    let m = c.metrics();
    assert!(m.heartbeats > 0 && !m.healthy, "{m:?}");
    c.get_with("k", NO_TAGS, || value("v")).await;
    assert_eq!(c.get("k").await, None, "nothing stored while unhealthy");
    // Once both partitions beat, it is healthy.
    let _all = Heartbeats::start(&Events::new(&topic, 2), HEARTBEAT);
    assert!(
        c.wait_healthy(Duration::from_secs(10)).await,
        "{:?}",
        c.metrics()
    );
}

#[tokio::test]
async fn local_invalidation_and_heartbeat_lag() {
    let s = Setup::new("local", 1).await;
    let c = &s.cache;
    assert!(c.insert("a", "1".into(), &["t"]).await);
    assert!(c.insert("b", "2".into(), &["t"]).await);
    assert!(c.invalidate("a").await);
    assert!(!c.invalidate("a").await);
    assert_eq!(c.invalidate_tag("t").await, 1);
    assert_eq!(c.get("b").await, None);
    // A heartbeat whose commit_time is 3 s old: the daemon is 3 s behind.
    let mut e = Event::new(Kind::Heartbeat, "test");
    e.commit_time = Some(
        (chrono::Utc::now() - chrono::Duration::seconds(3))
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string(),
    );
    s.heartbeats.pause(true);
    s.events.send(0, &e).await;
    eventually("the lag", Duration::from_secs(10), || async {
        c.metrics()
            .last_lag
            .is_some_and(|l| l >= Duration::from_secs(3))
    })
    .await;
}

/// `flush_all` empties the cache whatever its reason: `oversized` (a key too large for
/// an event, with a `detail`) and a reason this version does not know.
#[tokio::test]
async fn flush_all_empties_the_cache_whatever_its_reason() {
    let s = Setup::new("flush_reason", 1).await;
    let c = &s.cache;
    for (n, reason) in ["oversized", "a_reason_from_the_future"]
        .into_iter()
        .enumerate()
    {
        c.get_with("k", &["t"], || value("v")).await;
        c.run_pending_tasks().await;
        assert_eq!(c.get("k").await.as_deref(), Some("v"));
        let mut e = Event::new(Kind::FlushAll, "test");
        e.reason = Some(reason.into());
        e.detail = Some("rule \"lk\", for public.probe insert at LSN 0/1 (xid 1)".into());
        e.commit_time = Some(now_rfc3339());
        s.events.send(0, &e).await;
        eventually("the flush", Duration::from_secs(10), || async {
            c.metrics().flushes == n as u64 + 1
        })
        .await;
        assert_eq!(c.get("k").await, None, "reason {reason}");
    }
}
