//! Applying batches: one task per sink, each taking batches in order from its own
//! short queue, and a confirmation that moves when every sink has applied a batch.
//!
//! The sinks do not wait for each other: Redis may apply the next batch while the
//! broker still acknowledges the previous one (a reader of Redis sees the change as
//! soon as Redis has it). A position is confirmed to Postgres only when every sink has
//! applied every batch up to it, so the confirmed LSN is always the end of a
//! transaction that is everywhere, with everything before it. A slow or failing sink
//! fills its queue, the reader stops, and Postgres keeps the WAL.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::health::Health;
use crate::lsn::Lsn;
use crate::pgtime::{pg_now, pg_time_between, since_pg_time};
use crate::sink::{Batch, Item, Position, Sink, SinkError};
use crate::source::Confirmer;

/// Batches waiting for each sink: enough for a fast sink (Redis) to run ahead of a
/// slower one (the broker's acknowledgements), whose task then applies what waits as
/// one; few enough that a stalled sink soon stops the reader.
pub(crate) const QUEUED_BATCHES: usize = 8;

/// What a dispatched batch lets the pipeline confirm once every sink applied it.
#[derive(Debug, Clone, Copy)]
struct Mark {
    seq: u64,
    changes: usize,
    confirm: Option<Lsn>,
    commit_time: Option<i64>,
}

/// The state the sink tasks share: what was dispatched, what each sink applied.
struct Ledger {
    marks: VecDeque<Mark>,
    /// Per sink, the sequence number of the last batch it applied.
    applied: Vec<u64>,
    confirmer: Confirmer,
    position: watch::Sender<Position>,
    stats: Stats,
    /// The last batch dispatched.
    dispatched: u64,
    /// Every sink has applied everything dispatched: a new batch would start at once
    /// everywhere.
    free: watch::Sender<bool>,
    health: Option<Arc<Health>>,
}

impl Ledger {
    /// Sink `sink` applied every batch up to `seq`: confirm what every sink has.
    fn applied(&mut self, sink: usize, seq: u64) {
        self.applied[sink] = seq;
        if self.applied.iter().all(|&a| a == self.dispatched) {
            self.free
                .send_if_modified(|free| !std::mem::replace(free, true));
        }
        let everywhere = self.applied.iter().copied().min().unwrap_or(seq);
        let mut confirm = None;
        let mut commit_time = None;
        let mut changes = 0;
        while self.marks.front().is_some_and(|m| m.seq <= everywhere) {
            let m = self.marks.pop_front().expect("checked");
            changes += m.changes;
            confirm = m.confirm.or(confirm);
            commit_time = m.commit_time.or(commit_time);
        }
        if let Some(lsn) = confirm {
            self.confirmer.confirm(lsn);
            metrics::gauge!("wal2cache_confirmed_lsn").set(lsn.0 as f64);
        }
        if changes > 0 {
            metrics::counter!("wal2cache_changes_applied_total").increment(changes as u64);
        }
        if changes > 0 || confirm.is_some() {
            self.stats
                .record(changes, commit_time.and_then(since_pg_time));
        }
        let busy = !self.marks.is_empty();
        self.position.send_if_modified(|p| {
            let before = *p;
            if let Some(lsn) = confirm {
                p.confirmed = lsn;
            }
            if commit_time.is_some() {
                p.applied_commit_time = commit_time;
            }
            p.pending_commit_time = self.marks.iter().find_map(|m| m.commit_time);
            p.busy = busy;
            *p != before
        });
    }
}

/// A sink's error, with the sink's description (`Redis at redis://host:6379`).
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) sink: String,
    pub(crate) error: SinkError,
}

/// A batch for the sinks, numbered in dispatch order.
type Numbered = (u64, Arc<Batch>);

/// The sink tasks and the queues to them.
pub(crate) struct Applier {
    queues: Vec<mpsc::Sender<Numbered>>,
    tasks: JoinSet<Result<(), Failed>>,
    names: Vec<(tokio::task::Id, &'static str)>,
    ledger: Arc<Mutex<Ledger>>,
    next: u64,
}

/// Room in every sink's queue for one batch.
pub(crate) struct Permits<'a> {
    permits: Vec<mpsc::Permit<'a, Numbered>>,
    applier: &'a mut u64,
    ledger: &'a Mutex<Ledger>,
}

impl Permits<'_> {
    /// Hands the batch to every sink.
    pub(crate) fn send(self, batch: Batch) {
        *self.applier += 1;
        let seq = *self.applier;
        {
            let mut ledger = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
            ledger.dispatched = seq;
            if let Some(h) = &ledger.health {
                h.dispatched();
            }
            ledger
                .free
                .send_if_modified(|free| std::mem::replace(free, false));
            ledger.marks.push_back(Mark {
                seq,
                changes: batch.items.len(),
                confirm: batch.confirm,
                commit_time: batch.commit_time,
            });
            ledger.position.send_if_modified(|p| {
                let before = *p;
                p.busy = true;
                if p.pending_commit_time.is_none() {
                    p.pending_commit_time = batch.commit_time;
                }
                *p != before
            });
        }
        let batch = Arc::new(batch);
        for permit in self.permits {
            permit.send((seq, batch.clone()));
        }
    }
}

impl Applier {
    /// Starts one task per sink.
    pub(crate) fn start<A: Sink, B: Sink>(
        a: A,
        b: B,
        confirmer: Confirmer,
        position: watch::Sender<Position>,
        health: Option<Arc<Health>>,
    ) -> Applier {
        let ledger = Arc::new(Mutex::new(Ledger {
            marks: VecDeque::new(),
            applied: vec![0; 2],
            confirmer,
            position,
            stats: Stats::new(),
            dispatched: 0,
            free: watch::channel(true).0,
            health,
        }));
        let (qa, ra) = mpsc::channel(QUEUED_BATCHES);
        let (qb, rb) = mpsc::channel(QUEUED_BATCHES);
        let mut tasks = JoinSet::new();
        let names = vec![
            (
                a.name(),
                tasks.spawn(sink_task(a, 0, ra, ledger.clone())).id(),
            ),
            (
                b.name(),
                tasks.spawn(sink_task(b, 1, rb, ledger.clone())).id(),
            ),
        ]
        .into_iter()
        .map(|(n, id)| (id, n))
        .collect();
        Applier {
            queues: vec![qa, qb],
            tasks,
            names,
            ledger,
            next: 0,
        }
    }

    /// Waits for room for one batch in every sink's queue; `None` when a sink task
    /// has ended (its result says why).
    pub(crate) async fn reserve(&mut self) -> Option<Permits<'_>> {
        let mut permits = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            permits.push(q.reserve().await.ok()?);
        }
        Some(Permits {
            permits,
            applier: &mut self.next,
            ledger: &self.ledger,
        })
    }

    /// The first sink task that ended, with its result: before `finish`, only a
    /// failure (or a bug) ends one. Pending forever when none is left. Cancel-safe.
    pub(crate) async fn failed(&mut self) -> Result<(), Failed> {
        match self.tasks.join_next_with_id().await {
            None => std::future::pending().await,
            Some(Ok((_, r))) => r,
            Some(Err(e)) => Err(self.task_failed(e)),
        }
    }

    fn task_failed(&self, e: tokio::task::JoinError) -> Failed {
        let name = self.name_of(e.id());
        Failed {
            sink: format!("the {name} sink"),
            error: SinkError::task(name, e),
        }
    }

    fn name_of(&self, id: tokio::task::Id) -> &'static str {
        self.names
            .iter()
            .find(|(i, _)| *i == id)
            .map_or("a sink", |(_, n)| n)
    }

    /// No more batches: every sink applies what it has, then closes. The first error.
    pub(crate) async fn finish(&mut self) -> Result<(), Failed> {
        self.queues.clear();
        let mut first = Ok(());
        while let Some(done) = self.tasks.join_next_with_id().await {
            let r = match done {
                Ok((_, r)) => r,
                Err(e) => Err(self.task_failed(e)),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Stops the sink tasks where they are (the shutdown deadline passed).
    pub(crate) fn abort(&mut self) {
        self.tasks.abort_all();
    }

    /// Whether every sink has applied every batch dispatched, as it changes.
    pub(crate) fn free(&self) -> watch::Receiver<bool> {
        self.ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free
            .subscribe()
    }

    /// The last position confirmed.
    pub(crate) fn confirmed(&self) -> Lsn {
        self.ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .position
            .borrow()
            .confirmed
    }
}

/// Applies the batches of one sink in order, merging those already waiting into one
/// application (one round trip instead of several while the sink is the bottleneck);
/// then closes the sink.
async fn sink_task<S: Sink>(
    mut sink: S,
    index: usize,
    mut queue: mpsc::Receiver<Numbered>,
    ledger: Arc<Mutex<Ledger>>,
) -> Result<(), Failed> {
    let name = sink.name();
    let latency = metrics::histogram!(format!("wal2cache_commit_to_{name}_seconds"));
    let seconds = metrics::histogram!("wal2cache_batch_seconds", "sink" => name);
    let batches = metrics::counter!("wal2cache_sink_batches_total", "sink" => name);
    let items = metrics::counter!("wal2cache_sink_items_total", "sink" => name);
    while let Some((mut seq, first)) = queue.recv().await {
        let mut merged: Option<Batch> = None;
        while let Ok((next_seq, next)) = queue.try_recv() {
            let m = merged.get_or_insert_with(|| (*first).clone());
            m.items.extend(next.items.iter().cloned());
            if next.confirm.is_some() {
                m.confirm = next.confirm;
                m.commit_time = next.commit_time;
            }
            seq = next_seq;
        }
        let batch = merged.as_ref().unwrap_or(&first);
        let started = Instant::now();
        if let Err(error) = sink.apply(batch).await {
            if !matches!(error, SinkError::Stopped) {
                metrics::counter!("wal2cache_sink_errors_total", "sink" => name, "kind" => "stop")
                    .increment(1);
            }
            return Err(Failed {
                sink: sink.describe(),
                error,
            });
        }
        seconds.record(started.elapsed().as_secs_f64());
        batches.increment(1);
        items.increment(batch.items.len() as u64);
        // Commit to applied, once per transaction (all of them applied now).
        let now = pg_now();
        for t in commit_times(&batch.items) {
            if let Some(lag) = pg_time_between(t, now) {
                latency.record(lag.as_secs_f64());
            }
        }
        ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .applied(index, seq);
    }
    sink.close().await;
    Ok(())
}

/// The commit time of each transaction of `items`, once: a transaction is told by its
/// commit LSN (two transactions committed in the same microsecond are two; telling
/// them by their commit time counted about 0.4% too few at 2,000 transactions/s from
/// two connections).
pub(super) fn commit_times(items: &[Item]) -> impl Iterator<Item = i64> + '_ {
    let mut last = None;
    items.iter().filter_map(move |item| {
        let o = &item.origin;
        let lsn = o.version.commit_lsn;
        (last != Some(lsn)).then(|| {
            last = Some(lsn);
            o.commit_time
        })
    })
}

/// One log line a minute while busy.
struct Stats {
    since: Instant,
    changes: usize,
    lag: Option<std::time::Duration>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            since: Instant::now(),
            changes: 0,
            lag: None,
        }
    }

    fn record(&mut self, changes: usize, lag: Option<std::time::Duration>) {
        self.changes += changes;
        if lag.is_some() {
            self.lag = lag;
        }
        let elapsed = self.since.elapsed();
        if elapsed >= std::time::Duration::from_secs(60) {
            if self.changes > 0 {
                tracing::info!(
                    changes = self.changes,
                    per_second = (self.changes as f64 / elapsed.as_secs_f64()).round(),
                    lag_ms = self.lag.map(|l| l.as_millis() as u64),
                    "applied"
                );
            }
            *self = Stats::new();
        }
    }
}
