//! The pipeline with in-memory sinks and a scripted stream: batching, merging,
//! confirmation order and the drain. Time is paused where deadlines matter.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::batcher::Batcher;
use super::*;
use crate::lsn::Lsn;
use crate::sink::memory::{Handle, MemorySink};
use crate::sink::{SinkError, SinkErrorKind};
use crate::source::change::{Column, ReplicaIdentity};
use crate::source::pgoutput::{Datum, TupleData};
use crate::source::value::oid;
use crate::source::{Change, CommitInfo, Relation, TxnInfo};

const RULES: &str = r#"
[[rule]]
name = "item"
table = "public.items"
keys = ["item:{id}"]
tags = ["items:list"]
"#;

fn relation() -> Arc<Relation> {
    Arc::new(Relation {
        oid: 16384,
        schema: "public".into(),
        name: "items".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![Column {
            name: "id".into(),
            type_oid: oid::INT4,
            type_modifier: -1,
            is_key: true,
        }],
        ancestors: Vec::new(),
    })
}

/// Batches of 1,000 whose deadline never comes within a test: only the end of a
/// transaction (or a shutdown) closes them.
fn no_deadline() -> PipelineConfig {
    PipelineConfig {
        batch_deadline: Duration::from_secs(3600),
        ..config(1000)
    }
}

/// Waits (5 s at most) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn config(batch_size: usize) -> PipelineConfig {
    PipelineConfig {
        batch_size,
        batch_deadline: Duration::from_millis(5),
        shutdown_timeout: Duration::from_secs(2),
        ..PipelineConfig::default()
    }
}

/// A transaction of `rows` inserts, committed at `lsn`, ending at `lsn + 1`, long ago
/// (as when catching up).
fn txn(lsn: u64, rows: std::ops::Range<u32>) -> Vec<SourceEvent> {
    txn_at(lsn, rows, 0)
}

/// The same, committed at `commit_time` (Postgres microseconds).
fn txn_at(lsn: u64, rows: std::ops::Range<u32>, commit_time: i64) -> Vec<SourceEvent> {
    let rel = relation();
    let mut events = vec![SourceEvent::Begin(TxnInfo {
        xid: lsn as u32,
        commit_lsn: Lsn(lsn),
        commit_time,
    })];
    for id in rows {
        let row = TupleData(vec![Datum::Text(Bytes::from(id.to_string()))]);
        events.push(SourceEvent::Change(Change::insert(rel.clone(), row)));
    }
    events.push(SourceEvent::Commit(CommitInfo {
        xid: lsn as u32,
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 1),
        commit_time,
    }));
    events
}

/// A scripted stream: events sent by the test, a confirmation it can watch.
struct Script {
    events: mpsc::UnboundedReceiver<SourceEvent>,
    confirmed: watch::Sender<Lsn>,
    stopped: watch::Sender<bool>,
}

impl Events for Script {
    async fn next(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        self.events.recv().await.map(Ok)
    }

    fn try_next(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        self.events.try_recv().ok().map(Ok)
    }

    fn is_idle(&self) -> bool {
        self.events.is_empty()
    }

    fn confirmer(&self) -> Confirmer {
        Confirmer::new(self.confirmed.clone())
    }

    async fn stop(self) {
        let _ = self.stopped.send(true);
    }
}

struct Run {
    events: mpsc::UnboundedSender<SourceEvent>,
    confirmed: watch::Receiver<Lsn>,
    stopped: watch::Receiver<bool>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), Error>>,
    redis: Handle,
    kafka: Handle,
    position: watch::Receiver<Position>,
}

impl Run {
    fn send(&self, events: Vec<SourceEvent>) {
        for e in events {
            self.events.send(e).unwrap();
        }
    }

    fn confirmed(&self) -> Lsn {
        *self.confirmed.borrow()
    }

    async fn confirmed_reaches(&mut self, lsn: Lsn) {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.confirmed.wait_for(|c| *c >= lsn),
        )
        .await
        .expect("confirmed in time")
        .unwrap();
    }

    async fn stop(mut self) -> (Result<(), Error>, Handle, Handle, bool) {
        let _ = self.shutdown.take().unwrap().send(());
        let r = self.done.await.unwrap();
        let stopped = *self.stopped.borrow();
        (r, self.redis, self.kafka, stopped)
    }
}

fn start(batch_size: usize, redis: (MemorySink, Handle), kafka: (MemorySink, Handle)) -> Run {
    start_with(config(batch_size), Vec::new(), redis, kafka)
}

/// Starts the pipeline with `before` already waiting in the stream.
fn start_with(
    config: PipelineConfig,
    before: Vec<SourceEvent>,
    redis: (MemorySink, Handle),
    kafka: (MemorySink, Handle),
) -> Run {
    let (tx, rx) = mpsc::unbounded_channel();
    for e in before {
        tx.send(e).unwrap();
    }
    let (confirmed, confirmed_rx) = watch::channel(Lsn::ZERO);
    let (stopped, stopped_rx) = watch::channel(false);
    let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let (position, position_rx) = watch::channel(Position::default());
    let (stop, _) = watch::channel(false);
    let pipeline = Pipeline {
        config,
        events: Script {
            events: rx,
            confirmed,
            stopped,
        },
        redis: redis.0,
        kafka: kafka.0,
        position,
        stop,
        in_force: None,
        visibility: None,
        health: Some(crate::health::Health::new(
            "test",
            "slot",
            "rules.toml",
            Duration::from_secs(30),
        )),
    };
    let (_reload_tx, mut reload_rx) = mpsc::unbounded_channel();
    let rules = crate::rules::testing::rule_set(RULES);
    let done = tokio::spawn(async move {
        let _keep = _reload_tx;
        run(
            pipeline,
            rules,
            async {
                let _ = shutdown_rx.await;
            },
            &mut reload_rx,
        )
        .await
    });
    Run {
        events: tx,
        confirmed: confirmed_rx,
        stopped: stopped_rx,
        shutdown: Some(shutdown),
        done,
        redis: redis.1,
        kafka: kafka.1,
        position: position_rx,
    }
}

fn batcher(batch_size: usize) -> Batcher {
    Batcher::new(
        config(batch_size),
        Planner::new(crate::rules::testing::rule_set(RULES)),
    )
}

#[tokio::test]
async fn a_batch_closes_when_full() {
    let mut b = batcher(3);
    let mut closed_at = Vec::new();
    for (i, e) in txn(100, 0..7).into_iter().enumerate() {
        // The stream is never idle here: only the size closes batches.
        let ended = b.add(e).unwrap();
        if b.full_or_done(ended, false) {
            closed_at.push(i);
            assert_eq!(b.take().items.len(), 3);
        }
    }
    // Begin is event 0: the 3rd and 6th changes fill a batch.
    assert_eq!(closed_at, [3, 6]);
    let rest = b.take();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(
        rest.confirm,
        Some(Lsn(101)),
        "the commit's end is confirmed with the last batch"
    );
}

#[tokio::test]
async fn a_batch_closes_at_the_end_of_a_transaction_when_nothing_waits() {
    let mut b = batcher(1000);
    let events = txn(100, 0..2);
    let last = events.len() - 1;
    for (i, e) in events.into_iter().enumerate() {
        let ended = b.add(e).unwrap();
        assert_eq!(ended, i == last, "only the commit ends a transaction");
        // More is waiting: the batch stays open across the commit.
        assert!(!b.full_or_done(ended, false));
        if i == last {
            assert!(b.full_or_done(ended, true), "idle after a commit: close");
        } else {
            assert!(
                !b.full_or_done(ended, true),
                "idle inside a transaction: keep"
            );
        }
    }
    let batch = b.take();
    assert_eq!(batch.items.len(), 2);
    assert_eq!(batch.confirm, Some(Lsn(101)));
    assert!(b.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_batch_closes_at_its_deadline() {
    let mut run = start(1000, MemorySink::new("redis"), MemorySink::new("kafka"));
    // A transaction that has not committed yet: nothing ends it.
    let mut events = txn(100, 0..1);
    let commit = events.pop().unwrap();
    run.send(events);
    tokio::time::sleep(Duration::from_millis(4)).await;
    assert_eq!(
        run.redis.sizes(),
        Vec::<usize>::new(),
        "before the deadline (5 ms)"
    );
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(run.redis.sizes(), [1], "at the deadline");
    assert_eq!(run.kafka.sizes(), [1]);
    assert_eq!(run.confirmed(), Lsn::ZERO, "nothing committed yet");
    run.send(vec![commit]);
    run.confirmed_reaches(Lsn(101)).await;
    let (r, ..) = run.stop().await;
    r.unwrap();
}

#[tokio::test]
async fn waiting_batches_are_merged_into_one_application() {
    let redis = MemorySink::held("redis");
    let mut run = start(1000, redis, MemorySink::new("kafka"));
    // Three transactions, each its own batch (each commit finds the stream idle).
    // Redis is held, so the second and third wait in its queue while the first is
    // being applied.
    for t in [txn(100, 0..1), txn(200, 1..2), txn(300, 2..3)] {
        run.send(t);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(run.kafka.sizes(), [1, 1, 1], "three batches");
    run.redis.release(2);
    run.confirmed_reaches(Lsn(301)).await;
    assert_eq!(
        run.redis.sizes(),
        [1, 2],
        "the two waiting batches in one application"
    );
    let merged = &run.redis.applied()[1];
    assert_eq!(
        merged.confirm,
        Some(Lsn(301)),
        "the merge confirms the newest"
    );
    let lsns: Vec<Lsn> = merged
        .items
        .iter()
        .map(|i| i.origin.version.commit_lsn)
        .collect();
    assert_eq!(lsns, [Lsn(200), Lsn(300)], "in order");
    let (r, ..) = run.stop().await;
    r.unwrap();
}

#[tokio::test]
async fn nothing_is_confirmed_until_every_sink_has_it() {
    let kafka = MemorySink::held("kafka");
    let mut run = start(1000, MemorySink::new("redis"), kafka);
    run.send(txn(100, 0..1));
    run.send(txn(200, 1..2));
    // Redis goes ahead of the held broker: the change is in Redis at once...
    until("Redis to apply both", || {
        run.redis.sizes().iter().sum::<usize>() >= 2
    })
    .await;
    // ...but nothing is confirmed while Kafka has neither.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(run.confirmed(), Lsn::ZERO);
    run.kafka.release(1);
    run.confirmed_reaches(Lsn(101)).await;
    run.kafka.release(1);
    run.confirmed_reaches(Lsn(201)).await;
    let (r, ..) = run.stop().await;
    r.unwrap();
}

/// The lag `/readyz` and the metrics show comes from the oldest batch in flight, not
/// from the newest one applied: a sink that stopped applying makes it grow.
#[tokio::test]
async fn the_position_names_the_oldest_commit_not_yet_applied() {
    let kafka = MemorySink::held("kafka");
    let mut run = start(1000, MemorySink::new("redis"), kafka);
    run.send(txn_at(100, 0..1, 1_000));
    until("the first batch in flight", || run.position.borrow().busy).await;
    run.send(txn_at(200, 1..2, 2_000));
    until("Redis to apply both", || {
        run.redis.sizes().iter().sum::<usize>() >= 2
    })
    .await;
    let p = *run.position.borrow();
    assert_eq!(
        (p.pending_commit_time, p.applied_commit_time),
        (Some(1_000), None)
    );
    run.kafka.release(1);
    run.confirmed_reaches(Lsn(101)).await;
    until("the second batch to be the oldest", || {
        run.position.borrow().pending_commit_time == Some(2_000)
    })
    .await;
    assert_eq!(run.position.borrow().applied_commit_time, Some(1_000));
    run.kafka.release(1);
    run.confirmed_reaches(Lsn(201)).await;
    until("nothing in flight", || !run.position.borrow().busy).await;
    let p = *run.position.borrow();
    assert_eq!(
        (p.pending_commit_time, p.applied_commit_time),
        (None, Some(2_000))
    );
    let (r, ..) = run.stop().await;
    r.unwrap();
}

#[tokio::test]
async fn a_failing_sink_stops_the_pipeline_without_confirming() {
    let mut run = start(1000, MemorySink::new("redis"), MemorySink::new("kafka"));
    run.send(txn(100, 0..1));
    run.confirmed_reaches(Lsn(101)).await;
    run.kafka.fail_next(SinkError::kafka(
        "the broker refused events",
        None,
        SinkErrorKind::Stop,
    ));
    run.send(txn(200, 1..2));
    let r = tokio::time::timeout(Duration::from_secs(10), &mut run.done)
        .await
        .expect("the pipeline stops by itself")
        .unwrap();
    match r {
        Err(Error::Applying {
            sink,
            error,
            confirmed,
        }) => {
            assert_eq!(sink, "the memory sink \"kafka\"");
            assert!(matches!(*error, SinkError::Kafka { .. }), "{error}");
            assert_eq!(confirmed, Lsn(101));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        run.confirmed(),
        Lsn(101),
        "the failed batch is not confirmed"
    );
    assert!(*run.stopped.borrow(), "the stream was stopped");
}

#[tokio::test]
async fn shutdown_drains_what_was_read() {
    let redis = MemorySink::held("redis");
    let mut run = start(1000, redis, MemorySink::new("kafka"));
    run.send(txn(100, 0..3));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(run.confirmed(), Lsn::ZERO);
    let shutdown = run.shutdown.take().unwrap();
    let _ = shutdown.send(());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!run.done.is_finished(), "the drain waits for the held sink");
    run.redis.release(1);
    let r = tokio::time::timeout(Duration::from_secs(5), &mut run.done)
        .await
        .expect("drained")
        .unwrap();
    r.unwrap();
    assert_eq!(run.confirmed(), Lsn(101), "drained and confirmed");
    assert_eq!(run.redis.sizes(), [3]);
    assert!(
        run.redis.closed() && run.kafka.closed(),
        "both sinks closed"
    );
    assert!(*run.stopped.borrow());
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_cannot_finish_gives_up_at_the_deadline_unconfirmed() {
    let redis = MemorySink::held("redis");
    let run = start_with(
        config(1000),
        txn(100, 0..1),
        redis,
        MemorySink::new("kafka"),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (r, redis, _, stopped) = run.stop().await;
    assert!(matches!(r, Err(Error::ShutdownTimeout(_))), "{r:?}");
    assert!(redis.sizes().is_empty());
    assert!(stopped);
}

#[tokio::test]
async fn shutdown_drains_the_batch_still_open() {
    let config = no_deadline();
    // A committed transaction, then the start of another: the commit does not find
    // the stream idle, so its batch stays open (its deadline is an hour away).
    let mut events = txn(100, 0..2);
    events.extend(txn(200, 2..3).into_iter().take(2));
    let mut run = start_with(
        config,
        events,
        MemorySink::new("redis"),
        MemorySink::new("kafka"),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(run.redis.applied().is_empty(), "still open");
    let _ = run.shutdown.take().unwrap().send(());
    tokio::time::timeout(Duration::from_secs(5), &mut run.done)
        .await
        .expect("drained")
        .unwrap()
        .unwrap();
    assert_eq!(run.redis.sizes(), [3], "the open batch was applied");
    assert_eq!(run.kafka.sizes(), [3]);
    assert_eq!(run.confirmed(), Lsn(101), "up to the last commit in it");
}

#[tokio::test]
async fn while_one_sink_is_busy_finished_transactions_gather_for_both() {
    let config = no_deadline();
    let mut run = start_with(
        config,
        Vec::new(),
        MemorySink::new("redis"),
        MemorySink::held("kafka"),
    );
    run.send(txn(100, 0..1));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(run.redis.sizes(), [1], "every sink free: sent at once");
    for t in [txn(200, 1..2), txn(300, 2..3)] {
        run.send(t);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(run.redis.sizes(), [1], "held back while the broker is busy");
    run.kafka.release(2);
    run.confirmed_reaches(Lsn(301)).await;
    assert_eq!(run.redis.sizes(), [1, 2], "then the two as one batch");
    assert_eq!(run.kafka.sizes(), [1, 2]);
    let (r, ..) = run.stop().await;
    r.unwrap();
}

#[tokio::test]
async fn an_ended_transaction_closes_its_batch_only_if_a_sink_is_free() {
    for (free, closes) in [(true, true), (false, false)] {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut events = Script {
            events: rx,
            confirmed: watch::channel(Lsn::ZERO).0,
            stopped: watch::channel(false).0,
        };
        let mut b = batcher(1000);
        let mut script = txn(100, 0..2).into_iter();
        let first = script.next().unwrap();
        for e in script {
            tx.send(e).unwrap();
        }
        let (_free_tx, free_rx) = watch::channel(free);
        let close = super::add_waiting(&mut b, &mut events, first, &free_rx).unwrap();
        assert_eq!(close, closes, "a sink free: {free}");
        // Every waiting event was taken either way.
        assert!(events.is_idle());
        assert_eq!(b.take().items.len(), 2);
    }
}

#[tokio::test]
async fn a_live_transaction_goes_at_once_even_while_a_sink_is_busy() {
    let config = no_deadline();
    let mut run = start_with(
        config,
        Vec::new(),
        MemorySink::new("redis"),
        MemorySink::held("kafka"),
    );
    for (i, lsn) in [100, 200, 300].into_iter().enumerate() {
        run.send(txn_at(lsn, i as u32..i as u32 + 1, crate::pgtime::pg_now()));
        until(
            "Redis to get the live transaction without the broker",
            || run.redis.sizes().len() > i,
        )
        .await;
    }
    assert_eq!(run.redis.sizes(), [1, 1, 1]);
    assert_eq!(run.confirmed(), Lsn::ZERO, "the broker has none of them");
    run.kafka.release(2);
    run.confirmed_reaches(Lsn(301)).await;
    assert_eq!(
        run.kafka.sizes(),
        [1, 2],
        "the broker applies what waited as one"
    );
    let (r, ..) = run.stop().await;
    r.unwrap();
}

#[tokio::test]
async fn an_invalidate_all_message_becomes_a_flush_of_what_the_rules_cache() {
    let mut b = batcher(100);
    let mut events = txn(200, 0..0);
    events.insert(
        1,
        SourceEvent::Message {
            transactional: true,
            lsn: Lsn(199),
            prefix: crate::source::messages::MESSAGE_PREFIX.into(),
            content: Bytes::from_static(br#"{"all":true,"reason":"deploy 42"}"#),
        },
    );
    for e in events {
        b.add(e).unwrap();
    }
    let batch = b.take();
    assert_eq!(batch.items.len(), 1);
    let plan = &batch.items[0].plan;
    assert!(plan.flush_all);
    assert_eq!(plan.flush_prefixes, ["item:"]);
    assert_eq!(plan.purge_tag_prefixes, ["items:list"]);
    assert_eq!(plan.detail.as_deref(), Some("deploy 42"));
}

/// The latency is recorded once per transaction, and transactions are told apart by
/// their commit LSN, not their commit time: two committed in the same microsecond are
/// two samples; the changes of one transaction are one.
#[test]
fn each_transaction_is_one_latency_sample() {
    use crate::sink::{Item, Origin, Version};
    let item = |lsn: u64, seq: u32, time: i64| Item {
        origin: Origin {
            version: Version {
                commit_lsn: Lsn(lsn),
                seq,
            },
            xid: lsn as u32,
            commit_time: time,
            table: None,
            op: "update",
        },
        plan: Arc::new(crate::plan::Plan::default()),
    };
    let items = [
        item(100, 0, 5),
        item(100, 1, 5),
        item(200, 0, 5), // same microsecond, another transaction
        item(300, 0, 7),
        item(300, 1, 7),
        item(300, 2, 7),
        item(400, 0, 9),
    ];
    let times: Vec<i64> = applier::commit_times(&items).collect();
    assert_eq!(times, [5, 5, 7, 9]);
    assert_eq!(applier::commit_times(&[]).count(), 0);
}

#[tokio::test]
async fn a_table_added_back_to_the_publication_is_invalidated_as_by_a_truncate() {
    let mut b = batcher(100);
    let mut events = txn(200, 0..0);
    let message = |tables: &str| SourceEvent::Message {
        transactional: true,
        lsn: Lsn(199),
        prefix: crate::source::messages::UNPUBLISHED_PREFIX.into(),
        content: Bytes::from(format!(r#"{{"tables":[{tables}],"publication":"w2c"}}"#)),
    };
    events.insert(1, message(r#""public.items""#));
    // A table no rule names (any more) invalidates nothing.
    events.insert(2, message(r#""public.other""#));
    for e in events {
        b.add(e).unwrap();
    }
    let batch = b.take();
    assert_eq!(batch.items.len(), 1);
    let item = &batch.items[0];
    assert_eq!(item.origin.op, "unpublished");
    assert_eq!(item.origin.table.as_deref(), Some("public.items"));
    let plan = &item.plan;
    assert!(plan.flush_all);
    assert_eq!(plan.flush_prefixes, ["item:"]);
    assert!(plan
        .detail
        .as_deref()
        .is_some_and(|d| d.starts_with("public.items was not in publication \"w2c\"")));
}
