//! The daemon's pipeline: source → plans → batches → sinks → confirmation.
//!
//! The reader turns events into plans and batches them; a batch closes on size, on a
//! deadline, or as soon as a transaction ends and nothing more is waiting. Batches go
//! through a bounded channel to the applier, which applies each one to Redis and Kafka
//! at once and, once both confirmed it, confirms its LSN to Postgres. Batches are applied
//! in order, so the confirmed LSN is always the end of a transaction that every sink has
//! confirmed together with everything before it. When a sink is slow or down, the
//! channel fills, the reader stops reading and Postgres keeps the WAL.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};

use crate::config::PipelineConfig;
use crate::error::Error;
use crate::lsn::Lsn;
use crate::rules::plan::{plan_message, Plan, Planner};
use crate::rules::RuleSet;
use crate::sink::kafka::{KafkaSink, Progress};
use crate::sink::redis::RedisSink;
use crate::sink::{Batch, Item, Origin, SinkError, Version};
use crate::source::{Confirmer, Source, SourceEvent, TxnInfo, PG_EPOCH_UNIX_MICROS};

/// Batches waiting for the applier: small, so that a stalled sink stops the reader.
const QUEUED_BATCHES: usize = 2;

/// How long the source may take to close after the drain.
const SOURCE_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The prefix of the messages `heartbeats` writes into the WAL.
pub const HEARTBEAT_PREFIX: &str = "wal2cache.heartbeat";

/// The prefix of the marker a reload writes in the transaction that adds its tables to
/// the publication: the new rules take effect where the stream reaches it.
pub const RELOAD_PREFIX: &str = "wal2cache.reload";

/// New rules for the pipeline (already compiled and checked).
#[derive(Debug)]
pub struct Reload {
    pub rules: Arc<RuleSet>,
    /// In force from the marker message with this content on; `None`: at once.
    pub marker: Option<String>,
}

/// Writes a non-transactional heartbeat message into the WAL every `every`, until
/// `stop`. Connection errors are retried quietly: the heartbeat is an optimisation.
pub async fn wal_heartbeats(
    target: crate::source::PgTarget,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut client = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if client.is_none() {
            client = target.connect().await.ok();
        }
        let Some(c) = &client else { continue };
        if let Err(e) = c
            .execute(
                "SELECT pg_logical_emit_message(false, $1, '')",
                &[&HEARTBEAT_PREFIX],
            )
            .await
        {
            tracing::debug!(error = %e, "WAL heartbeat failed; reconnecting");
            client = None;
        }
    }
}

/// Microseconds from a Postgres commit time to now.
fn since_commit(commit_time: i64) -> Option<Duration> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_micros() as i64;
    let commit = commit_time.checked_add(PG_EPOCH_UNIX_MICROS)?;
    u64::try_from(now - commit).ok().map(Duration::from_micros)
}

/// Builds batches from source events.
struct Batcher {
    config: PipelineConfig,
    planner: Planner,
    batch: Batch,
    opened: Option<tokio::time::Instant>,
    txn: Option<TxnInfo>,
    seq: u32,
    /// Rules waiting for their marker in the stream.
    pending: Option<(String, Arc<RuleSet>)>,
}

impl Batcher {
    fn reload(&mut self, reload: Reload) {
        match reload.marker {
            None => {
                tracing::info!(rules = reload.rules.rules().len(), "rules reloaded");
                self.planner = Planner::new(reload.rules);
                self.pending = None;
            }
            Some(marker) => self.pending = Some((marker, reload.rules)),
        }
    }

    fn push(&mut self, origin: Origin, plan: Plan) {
        if !plan.is_empty() {
            self.batch.items.push(Item {
                origin,
                plan: Arc::new(plan),
            });
        }
    }

    fn origin(&mut self, table: Option<String>, op: &'static str) -> Origin {
        let txn = self.txn.unwrap_or(TxnInfo {
            xid: 0,
            commit_lsn: Lsn::ZERO,
            commit_time: 0,
        });
        let seq = self.seq;
        self.seq += 1;
        Origin {
            version: Version {
                commit_lsn: txn.commit_lsn,
                seq,
            },
            xid: txn.xid,
            commit_time: txn.commit_time,
            table,
            op,
        }
    }

    /// Adds an event; `Ok(true)` when it ended a transaction.
    fn add(&mut self, event: SourceEvent) -> Result<bool, Error> {
        match event {
            SourceEvent::Begin(txn) => {
                self.txn = Some(txn);
                self.seq = 0;
            }
            SourceEvent::Change(change) => {
                let plan = self
                    .planner
                    .plan_change(&change)
                    .map_err(|e| Error::Plan(Box::new(e)))?;
                let origin =
                    self.origin(Some(change.relation.qualified_name()), change.op.as_str());
                self.push(origin, plan);
            }
            SourceEvent::Truncate { relations, .. } => {
                for r in relations {
                    let plan = self.planner.plan_truncate(std::slice::from_ref(&r));
                    let origin = self.origin(Some(r.qualified_name()), "truncate");
                    self.push(origin, plan);
                }
            }
            // Our own heartbeat, outside any transaction: every commit before it has been
            // sent, so its position can be confirmed once what came before is applied.
            SourceEvent::Message {
                transactional: false,
                lsn,
                prefix,
                ..
            } if prefix == HEARTBEAT_PREFIX => {
                if self.txn.is_none() {
                    self.batch.confirm = Some(self.batch.confirm.map_or(lsn, |c| c.max(lsn)));
                    return Ok(true);
                }
            }
            SourceEvent::Message {
                lsn,
                prefix,
                content,
                ..
            } if prefix == RELOAD_PREFIX => {
                let ours = self
                    .pending
                    .as_ref()
                    .is_some_and(|(marker, _)| marker.as_bytes() == &content[..]);
                if ours {
                    let (_, rules) = self.pending.take().expect("checked above");
                    tracing::info!(rules = rules.rules().len(), lsn = %lsn, "rules reloaded, in force from here in the stream");
                    self.planner = Planner::new(rules);
                }
            }
            SourceEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => match plan_message(&prefix, &content) {
                None => {}
                Some(Ok(plan)) => {
                    let mut origin = self.origin(None, "message");
                    if !transactional {
                        origin.version = Version {
                            commit_lsn: lsn,
                            seq: 0,
                        };
                    }
                    self.push(origin, plan);
                }
                Some(Err(e)) => {
                    metrics::counter!("wal2cache_bad_messages_total").increment(1);
                    tracing::warn!(lsn = %lsn, "{e}");
                }
            },
            SourceEvent::Commit(commit) => {
                self.txn = None;
                self.batch.confirm = Some(commit.end_lsn);
                self.batch.commit_time = Some(commit.commit_time);
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn take(&mut self) -> Batch {
        self.opened = None;
        std::mem::take(&mut self.batch)
    }

    fn is_empty(&self) -> bool {
        self.batch.items.is_empty() && self.batch.confirm.is_none()
    }
}

/// Applies batches in order to both sinks, then confirms.
async fn applier(
    mut batches: mpsc::Receiver<Batch>,
    mut redis: RedisSink,
    mut kafka: KafkaSink,
    confirmer: Confirmer,
    progress: watch::Sender<Progress>,
) -> Result<(), SinkError> {
    let mut stats = Stats::new();
    while let Some(mut batch) = batches.recv().await {
        // Apply everything already waiting at once: one round trip to each sink instead
        // of one per batch while the sinks are the bottleneck. Order is kept, and the
        // last batch's confirmation covers all of them.
        while let Ok(next) = batches.try_recv() {
            batch.items.extend(next.items);
            if next.confirm.is_some() {
                batch.confirm = next.confirm;
                batch.commit_time = next.commit_time;
            }
        }
        progress.send_modify(|p| p.busy = true);
        let started = Instant::now();
        let (r, k) = tokio::join!(
            async {
                let r = redis.apply(&batch).await;
                (r, Instant::now())
            },
            async {
                let k = kafka.apply(&batch).await;
                (k, Instant::now())
            }
        );
        r.0?;
        k.0?;
        for item in &batch.items {
            let t = item.origin.commit_time;
            // Both sinks confirmed: the latency of each, from the commit.
            if let Some(lag) = since_commit(t) {
                let now = Instant::now();
                let redis_lag = lag.saturating_sub(now - r.1);
                let kafka_lag = lag.saturating_sub(now - k.1);
                metrics::histogram!("wal2cache_commit_to_redis_seconds")
                    .record(redis_lag.as_secs_f64());
                metrics::histogram!("wal2cache_commit_to_kafka_seconds")
                    .record(kafka_lag.as_secs_f64());
            }
        }
        metrics::histogram!("wal2cache_batch_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("wal2cache_changes_applied_total").increment(batch.items.len() as u64);
        if let Some(lsn) = batch.confirm {
            confirmer.confirm(lsn);
            redis.confirmed = lsn.to_string();
            metrics::gauge!("wal2cache_confirmed_lsn").set(lsn.0 as f64);
        }
        let lag = batch.commit_time.and_then(since_commit);
        stats.record(batch.items.len(), lag);
        progress.send_modify(|p| {
            if let Some(lsn) = batch.confirm {
                p.confirmed = lsn;
            }
            if batch.commit_time.is_some() {
                p.applied_commit_time = batch.commit_time;
            }
            p.busy = !batches.is_empty();
        });
    }
    Ok(())
}

/// One log line a minute while busy.
struct Stats {
    since: Instant,
    changes: usize,
    lag: Option<Duration>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            since: Instant::now(),
            changes: 0,
            lag: None,
        }
    }

    fn record(&mut self, changes: usize, lag: Option<Duration>) {
        self.changes += changes;
        if lag.is_some() {
            self.lag = lag;
        }
        let elapsed = self.since.elapsed();
        if elapsed >= Duration::from_secs(60) {
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

/// Everything `run` needs, connected.
pub struct Pipeline {
    pub config: PipelineConfig,
    pub source: Source,
    pub redis: RedisSink,
    pub kafka: KafkaSink,
    pub progress: watch::Sender<Progress>,
    pub stop: watch::Sender<bool>,
}

/// Runs until `shutdown`, a fatal error, or the end of the stream. `reload` delivers
/// new rule sets (already compiled and checked) to plan with from the next change.
pub async fn run(
    pipeline: Pipeline,
    rules: Arc<RuleSet>,
    shutdown: impl Future<Output = ()>,
    mut reload: mpsc::UnboundedReceiver<Reload>,
) -> Result<(), Error> {
    let Pipeline {
        config,
        mut source,
        mut redis,
        mut kafka,
        progress,
        stop,
    } = pipeline;
    redis.set_error_after(config.sink_error_after);
    kafka.set_error_after(config.sink_error_after);
    let (tx, rx) = mpsc::channel::<Batch>(QUEUED_BATCHES);
    let mut applier = tokio::spawn(applier(rx, redis, kafka, source.confirmer(), progress));
    let mut b = Batcher {
        planner: Planner::new(rules),
        batch: Batch::default(),
        opened: None,
        txn: None,
        seq: 0,
        pending: None,
        config,
    };
    tokio::pin!(shutdown);
    let result: Result<(), Error> = loop {
        let deadline = b.opened.map(|t| t + b.config.batch_deadline);
        let flush = tokio::select! {
            biased;
            _ = &mut shutdown => break Ok(()),
            done = &mut applier => break match done {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Error::Sink(e)),
                Err(e) => Err(Error::Sink(SinkError::Redis(format!("applier task failed: {e}")))),
            },
            Some(r) = reload.recv() => {
                b.reload(r);
                false
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => true,
            event = source.next() => match event {
                None => break Ok(()),
                Some(Err(e)) => break Err(e.into()),
                Some(Ok(event)) => {
                    let ended = match b.add(event) {
                        Ok(ended) => ended,
                        Err(e) => break Err(e),
                    };
                    if b.opened.is_none() && !b.is_empty() {
                        b.opened = Some(tokio::time::Instant::now());
                    }
                    b.batch.items.len() >= b.config.batch_size || (ended && source.is_idle())
                }
            },
        };
        if flush && !b.is_empty() {
            // The channel is full while a sink is slow or down: wait for room, but
            // keep watching the shutdown and the applier, or SIGTERM would wait for
            // the sink. The batch stays in `b` until there is room for it.
            tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                permit = tx.reserve() => match permit {
                    Ok(permit) => permit.send(b.take()),
                    // The applier stopped; its result says why.
                    Err(_) => continue,
                },
            }
        }
    };
    // Drain: what was read is applied and confirmed, within the deadline, whatever the
    // sinks do: every await below is under it.
    let timeout = b.config.shutdown_timeout;
    let drained = tokio::time::timeout(timeout, async {
        if !b.is_empty() {
            if let Ok(permit) = tx.reserve().await {
                permit.send(b.take());
            }
        }
        drop(tx);
        if applier.is_finished() {
            return Ok(());
        }
        match (&mut applier).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Sink(e)),
            Err(e) => Err(Error::Sink(SinkError::Redis(format!(
                "applier task failed: {e}"
            )))),
        }
    })
    .await;
    let _ = stop.send(true);
    let drained = match drained {
        Ok(r) => r,
        Err(_) => {
            // Nothing more is confirmed: only the applier confirms, after both sinks.
            applier.abort();
            Err(Error::ShutdownTimeout(timeout))
        }
    };
    // The source reports the last confirmation and closes; bounded, so that a
    // replication connection that does not answer cannot hold the exit.
    if tokio::time::timeout(SOURCE_STOP_TIMEOUT, source.stop())
        .await
        .is_err()
    {
        tracing::warn!("the replication connection did not close within {SOURCE_STOP_TIMEOUT:?}; exiting anyway (nothing unapplied was confirmed)");
    }
    result.and(drained)
}
