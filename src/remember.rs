//! The stream record (`source::identity::Remembered`), written to Redis before each
//! confirmation: the pipeline confirms to this wrapper, which writes the position to
//! the record and only then confirms it to Postgres. So the slot is never ahead of
//! the record unless something other than wal2cache moved it, and a restart can tell
//! a replay (slot behind) from a loss (slot gone, or ahead).

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::lsn::Lsn;
use crate::pipeline::Events;
use crate::sink::redis::StreamState;
use crate::sink::RetryLog;
use crate::source::identity::Remembered;
use crate::source::{Confirmer, Source, SourceError, SourceEvent};

/// At most one write of the record this often: confirmations wait up to this long.
pub const REMEMBER_EVERY: Duration = Duration::from_millis(100);

/// How long the last write may take when the stream stops.
const LAST_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A source whose confirmations are written to the stream record first.
pub struct Remembering {
    source: Source,
    applied: watch::Sender<Lsn>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Remembering {
    /// `record` is what was written last (its `confirmed`: where the source starts).
    pub fn new(source: Source, state: StreamState, record: Remembered) -> Remembering {
        let (applied, applied_rx) = watch::channel(record.confirmed);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(remember(
            state,
            record,
            applied_rx,
            source.confirmer(),
            stop_rx,
        ));
        Remembering {
            source,
            applied,
            stop,
            task,
        }
    }
}

/// Writes each new applied position to the record, then confirms it to the source.
async fn remember(
    mut state: StreamState,
    mut record: Remembered,
    mut applied: watch::Receiver<Lsn>,
    source: Confirmer,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut retries = RetryLog::new(
        "Redis (the stream record)",
        "retrying the write of the stream record; nothing is confirmed to Postgres meanwhile",
        "check that Redis runs and accepts writes; Postgres keeps the WAL until the record is written",
    );
    loop {
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { break },
            _ = stop.wait_for(|s| *s) => break,
        }
        record.confirmed = *applied.borrow_and_update();
        loop {
            match state.write(&record).await {
                Ok(()) => {
                    backoff.reset();
                    retries.succeeded();
                    break;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    retries.failed(&e.to_string(), delay);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
        }
        source.confirm(record.confirmed);
        tokio::select! {
            _ = tokio::time::sleep(REMEMBER_EVERY) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // The last position applied before the stop, if not written yet.
    let last = *applied.borrow();
    if last > record.confirmed {
        record.confirmed = last;
        match tokio::time::timeout(LAST_WRITE_TIMEOUT, state.write(&record)).await {
            Ok(Ok(())) => source.confirm(last),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, confirmed = %last, "could not write the stream record before stopping; the next start replays from an earlier position")
            }
            Err(_) => {
                tracing::warn!(confirmed = %last, "no answer from Redis writing the stream record before stopping; the next start replays from an earlier position")
            }
        }
    }
}

impl Events for Remembering {
    async fn next(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        self.source.next().await
    }

    fn try_next(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        self.source.try_next()
    }

    fn is_idle(&self) -> bool {
        self.source.is_idle()
    }

    fn confirmer(&self) -> Confirmer {
        Confirmer::new(self.applied.clone())
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.source.stop().await;
    }
}
