//! The daemon's pipeline: source → plans → batches → sinks → confirmation.
//!
//! The reader takes events from the stream, turns them into plans and batches them
//! (`batcher`); each closed batch goes to every sink's queue (`applier`); a position is
//! confirmed to Postgres once every sink has applied everything up to it. When a sink
//! is slow or down, its queue fills, the reader stops reading and Postgres keeps the
//! WAL. On shutdown what was read is drained to the sinks, within a deadline.

mod applier;
mod batcher;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::PipelineConfig;
use crate::error::Error;
use crate::health::Health;
use crate::rules::{Planner, RuleSet};
use crate::sink::{Position, Sink};
use crate::source::visibility::Visibility;
use crate::source::{Confirmer, Source, SourceError, SourceEvent};

use applier::Applier;
use batcher::Batcher;

/// How long the source may take to close after the drain.
const SOURCE_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// New rules for the pipeline (already compiled and checked).
#[derive(Debug)]
pub struct Reload {
    pub rules: Arc<RuleSet>,
    /// In force from the marker message with this content on; `None`: at once.
    pub marker: Option<String>,
}

/// Where the pipeline's events come from: the replication stream, or a script of
/// events in unit tests.
pub trait Events: Send {
    /// The next event; `None` at the end of the stream.
    fn next(&mut self) -> impl Future<Output = Option<Result<SourceEvent, SourceError>>> + Send;
    /// The next event if one is waiting, without waiting; `None` otherwise (and at
    /// the end of the stream, which `next` then reports).
    fn try_next(&mut self) -> Option<Result<SourceEvent, SourceError>>;
    /// No event is waiting right now.
    fn is_idle(&self) -> bool;
    /// Confirms positions from the sinks' side.
    fn confirmer(&self) -> Confirmer;
    /// Reports the last confirmation and closes.
    fn stop(self) -> impl Future<Output = ()> + Send;
}

impl Events for Source {
    async fn next(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        Source::next(self).await
    }

    fn try_next(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        Source::try_next(self)
    }

    fn is_idle(&self) -> bool {
        Source::is_idle(self)
    }

    fn confirmer(&self) -> Confirmer {
        Source::confirmer(self)
    }

    async fn stop(self) {
        Source::stop(self).await
    }
}

/// Everything `run` needs, connected.
pub struct Pipeline<E, R, K> {
    pub config: PipelineConfig,
    pub events: E,
    pub redis: R,
    pub kafka: K,
    /// Where the pipeline stands, updated after every batch (Kafka's heartbeats read it).
    pub position: watch::Sender<Position>,
    /// Set when the pipeline stops: sinks stop retrying, background tasks end.
    pub stop: watch::Sender<bool>,
    /// Where the sinks and the position are reported for operators.
    pub health: Option<Arc<Health>>,
    /// Told the rules in force each time they change (at start, and where a reload
    /// takes effect in the stream): what `rules.backfill = "new"` warms.
    pub in_force: Option<watch::Sender<Arc<RuleSet>>>,
    /// Waits, before a batch goes to the sinks, until its transactions are visible to
    /// other sessions (see `source::visibility`); `None` in unit tests.
    pub visibility: Option<Visibility>,
}

/// Runs until `shutdown`, a fatal error, or the end of the stream. `reload` delivers
/// new rule sets (already compiled and checked) to plan with from the next change.
pub async fn run<E: Events, R: Sink, K: Sink>(
    pipeline: Pipeline<E, R, K>,
    rules: Arc<RuleSet>,
    shutdown: impl Future<Output = ()>,
    reload: &mut mpsc::UnboundedReceiver<Reload>,
) -> Result<(), Error> {
    let Pipeline {
        config,
        mut events,
        mut redis,
        mut kafka,
        position,
        stop,
        health,
        in_force,
        mut visibility,
    } = pipeline;
    redis.set_error_after(config.sink_error_after);
    kafka.set_error_after(config.sink_error_after);
    if let Some(h) = &health {
        redis.set_health(h.sink("redis"));
        kafka.set_health(h.sink("kafka"));
        h.watch_position(position.subscribe());
    }
    let mut applier = Applier::start(redis, kafka, events.confirmer(), position, health);
    // A transaction that ends with the stream idle is sent at once when the stream is
    // live (its commit is recent) or every sink is free. While catching up (the commit
    // is older than `batcher::CATCHING_UP`) and a sink is still applying, it waits (up
    // to the deadline) and goes with what follows it: the stream is only momentarily
    // idle, and on a small host many tiny batches cost each sink (and the broker, per
    // request) far more per change. Measured with the tag-heavy catch-up: ~4 changes per
    // batch and 3-4 times the CPU per change when sent at once, 60-600 when gathering;
    // live, at 2,000 transactions/s, gathering doubled commit -> Kafka.
    let mut free = applier.free();
    let free_now = free.clone();
    if let Some(tx) = &in_force {
        tx.send_replace(rules.clone());
    }
    let mut b = Batcher::new(config, Planner::new(rules));
    b.in_force = in_force;
    tokio::pin!(shutdown);
    let result: Result<(), Error> = loop {
        let deadline = b.deadline();
        let wait_for_sinks = b.has_end() && events.is_idle() && !*free_now.borrow() && b.behind();
        let flush = tokio::select! {
            biased;
            _ = &mut shutdown => break Ok(()),
            failed = applier.failed() => break failed.map_err(|e| applying(e, &applier)),
            Some(r) = reload.recv() => {
                b.reload(r);
                false
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => true,
            _ = free.wait_for(|f| *f), if wait_for_sinks => true,
            event = events.next() => match event {
                None => break Ok(()),
                Some(Err(e)) => break Err(e.into()),
                Some(Ok(event)) => match add_waiting(&mut b, &mut events, event, &free_now) {
                    Ok(close) => close,
                    Err(e) => break Err(e),
                },
            },
        };
        if flush && !b.is_empty() {
            // Not before the batch's transactions are visible: a reader that missed
            // would read the old rows and cache them again.
            if let Some(v) = visibility.as_mut() {
                let visible = tokio::select! {
                    biased;
                    _ = &mut shutdown => break Ok(()),
                    visible = v.wait(b.xids()) => visible,
                };
                if !visible {
                    break Ok(());
                }
            }
            // The queues are full while a sink is slow or down: wait for room, but keep
            // watching the shutdown and the sinks, or SIGTERM would wait for the sink.
            // The batch stays in `b` until there is room for it.
            tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                permits = applier.reserve() => match permits {
                    Some(permits) => permits.send(b.take()),
                    // A sink task ended; `failed` says why on the next turn.
                    None => continue,
                },
            }
        }
    };
    // Drain: what was read is applied and confirmed, within the deadline, whatever the
    // sinks do: every await below is under it.
    let timeout = b.config.shutdown_timeout;
    let failed = result.is_err();
    if failed {
        // Nothing more will be read: the other sink stops retrying.
        let _ = stop.send(true);
    }
    let drained = tokio::time::timeout(timeout, async {
        if !failed && !b.is_empty() {
            let visible = match visibility.as_mut() {
                Some(v) => v.wait(b.xids()).await,
                None => true,
            };
            if visible {
                if let Some(permits) = applier.reserve().await {
                    permits.send(b.take());
                }
            }
        }
        applier.finish().await.map_err(|e| applying(e, &applier))
    })
    .await;
    let _ = stop.send(true);
    let drained = match drained {
        Ok(r) => r,
        Err(_) => {
            // Nothing more is confirmed: only the sinks' tasks confirm.
            applier.abort();
            Err(Error::ShutdownTimeout(timeout))
        }
    };
    // The source reports the last confirmation and closes; bounded, so that a
    // replication connection that does not answer cannot hold the exit.
    if tokio::time::timeout(SOURCE_STOP_TIMEOUT, events.stop())
        .await
        .is_err()
    {
        tracing::warn!("the replication connection did not close within {SOURCE_STOP_TIMEOUT:?}; exiting anyway (nothing unapplied was confirmed)");
    }
    match result {
        // The first error, not the `Stopped` of the sink that was told to stop.
        Err(e) => Err(e),
        Ok(()) => drained,
    }
}

/// Events between two checks of the batch's deadline while events keep coming.
const DEADLINE_CHECK_EVERY: u32 = 64;

/// Adds `first`, then every event already waiting, until the batch should close: it
/// is full, a transaction ended with nothing more waiting (and the sinks free), or its
/// deadline passed. One event at a time through the reader's `select!` would cost a
/// timer and several wakers per event.
fn add_waiting<E: Events>(
    b: &mut Batcher,
    events: &mut E,
    first: SourceEvent,
    free: &watch::Receiver<bool>,
) -> Result<bool, Error> {
    let mut event = first;
    let mut added = 0u32;
    loop {
        let ended = b.add(event)?;
        if b.full_or_done(ended, false) {
            return Ok(true);
        }
        added += 1;
        if added.is_multiple_of(DEADLINE_CHECK_EVERY)
            && b.deadline()
                .is_some_and(|d| tokio::time::Instant::now() >= d)
        {
            return Ok(true);
        }
        match events.try_next() {
            Some(Ok(next)) => event = next,
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(b.full_or_done(ended, *free.borrow() || !b.behind())),
        }
    }
}

/// A sink's error as the daemon reports it: with the last confirmed position.
fn applying(failed: applier::Failed, applier: &Applier) -> Error {
    Error::Applying {
        sink: failed.sink,
        error: Box::new(failed.error),
        confirmed: applier.confirmed(),
    }
}

#[cfg(test)]
mod tests;
