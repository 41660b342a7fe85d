//! Confirmation drives where a restart resumes: after stopping with a given LSN
//! confirmed, a new stream delivers every change after it and none before it.

mod support;

use std::time::Duration;

use support::db::TestDb;
use support::stream::{changes, commits, text};
use support::wait::eventually;
use wal2cache::source::{Source, SourceEvent};
use wal2cache::Lsn;

fn commit_ends(events: &[SourceEvent]) -> Vec<Lsn> {
    events
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Commit(c) => Some(c.end_lsn),
            _ => None,
        })
        .collect()
}

fn ids(events: &[SourceEvent]) -> Vec<i32> {
    changes(events)
        .iter()
        .map(|c| text(c, true, "id").unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn a_restart_resumes_right_after_the_confirmed_lsn() {
    let db = TestDb::new("restart").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (slot, publication) = db.slot("restart").await;

    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);
    for id in 1..=5 {
        db.exec(&format!("INSERT INTO t VALUES ({id})")).await;
    }
    let events = commits(&mut source, 5).await;
    assert_eq!(ids(&events), [1, 2, 3, 4, 5]);
    let ends = commit_ends(&events);
    // Confirm the third transaction only.
    source.confirm(ends[2]);
    source.stop().await;
    assert_eq!(
        db.confirmed_lsn(&slot).await,
        Some(ends[2]),
        "stop reports the last confirmation"
    );

    for id in 6..=8 {
        db.exec(&format!("INSERT INTO t VALUES ({id})")).await;
    }
    let mut source = Source::start(db.stream(&slot, &publication), ends[2]);
    let events = commits(&mut source, 5).await;
    assert_eq!(
        ids(&events),
        [4, 5, 6, 7, 8],
        "everything after the confirmed LSN, nothing before"
    );
    source.stop().await;
}

#[tokio::test]
async fn keepalives_never_confirm_anything() {
    let db = TestDb::new("noconfirm").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (slot, publication) = db.slot("noconfirm").await;
    let created = db.confirmed_lsn(&slot).await.unwrap();

    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);
    db.exec("INSERT INTO t VALUES (1)").await;
    commits(&mut source, 1).await;
    // Let several status intervals (100 ms in tests) and keepalives pass.
    db.exec("SELECT pg_sleep(1)").await;
    source.stop().await;
    assert_eq!(
        db.confirmed_lsn(&slot).await,
        Some(created),
        "nothing was confirmed, so nothing moves"
    );

    // The same change arrives again.
    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);
    let events = commits(&mut source, 1).await;
    assert_eq!(ids(&events), [1]);
    source.stop().await;
}

#[tokio::test]
async fn a_dropped_connection_reconnects_and_replays_from_the_slot() {
    let db = TestDb::new("reconnect").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (slot, publication) = db.slot("reconnect").await;
    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);
    db.exec("INSERT INTO t VALUES (1)").await;
    db.exec("INSERT INTO t VALUES (2)").await;
    let events = commits(&mut source, 2).await;
    source.confirm(commit_ends(&events)[0]);
    let confirmed = commit_ends(&events)[0];
    eventually(
        "the confirmation to reach the slot",
        Duration::from_secs(10),
        || async { db.confirmed_lsn(&slot).await == Some(confirmed) },
    )
    .await;

    // Kill the walsender: the stream must reconnect by itself and resume at 2.
    db.exec(&format!(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{slot}'"
    ))
    .await;
    db.exec("INSERT INTO t VALUES (3)").await;
    let events = commits(&mut source, 2).await;
    assert_eq!(ids(&events), [2, 3]);
    source.stop().await;
}
