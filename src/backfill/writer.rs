//! The writer tasks of a backfill: pages written to Redis while the next are read.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::BackfillError;
use crate::error::Error;
use crate::sink::redis::RedisSink;
use crate::sink::{Batch, Sink};

/// A writer task: the keys the version guard refused since the last drain.
type WriterTask = JoinHandle<Result<u64, Error>>;

/// What the writer task is asked to do.
enum Job {
    /// The permit is held until the page is written.
    Write(Batch, OwnedSemaphorePermit),
    /// Answer once everything sent before is written, with the keys the version guard
    /// refused since the last answer.
    Drain(oneshot::Sender<u64>),
}

/// The writer tasks: write the pages they are sent while the next ones are read and
/// planned (nothing in a dry run). Two of them, each with its own connection, take
/// the pages in turn, so that Redis has the next page while it answers one (pages
/// are written in any order: a backfill's values all carry one version). One page
/// waits per task at most, so memory stays bounded whatever the table's size.
pub(super) struct Writer {
    tasks: Vec<(mpsc::Sender<Job>, WriterTask)>,
    next: usize,
    /// Pages handed over and not yet written: one more than the tasks.
    pending: Arc<Semaphore>,
}

impl Writer {
    pub(super) fn start(redis: Vec<Option<RedisSink>>) -> Writer {
        let tasks: Vec<_> = redis
            .into_iter()
            .map(|mut redis| {
                let (jobs, mut rx) = mpsc::channel::<Job>(1);
                let task = tokio::spawn(async move {
                    let mut refused = 0;
                    while let Some(job) = rx.recv().await {
                        match (job, redis.as_mut()) {
                            (Job::Write(batch, _permit), Some(redis)) => {
                                let before = redis.refused();
                                redis.apply(&batch).await?;
                                refused += redis.refused() - before;
                            }
                            (Job::Write(..), None) => {}
                            (Job::Drain(answer), _) => {
                                let _ = answer.send(std::mem::take(&mut refused));
                            }
                        }
                    }
                    if let Some(redis) = redis {
                        redis.close().await;
                    }
                    Ok(refused)
                });
                (jobs, task)
            })
            .collect();
        let pending = Arc::new(Semaphore::new(tasks.len() + 1));
        Writer {
            tasks,
            next: 0,
            pending,
        }
    }

    /// Hands a page over, waiting while the task's page before it is still queued.
    pub(super) async fn send(&mut self, batch: Batch) -> Result<(), Error> {
        let permit = self
            .pending
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let i = self.next;
        self.next = (i + 1) % self.tasks.len();
        if self.tasks[i]
            .0
            .send(Job::Write(batch, permit))
            .await
            .is_err()
        {
            return Err(self.failure(i).await);
        }
        Ok(())
    }

    /// Waits until every page sent is written; the keys refused meanwhile.
    pub(super) async fn drain(&mut self) -> Result<u64, Error> {
        let mut refused = 0;
        for i in 0..self.tasks.len() {
            let (answer, answered) = oneshot::channel();
            if self.tasks[i].0.send(Job::Drain(answer)).await.is_err() {
                return Err(self.failure(i).await);
            }
            match answered.await {
                Ok(n) => refused += n,
                Err(_) => return Err(self.failure(i).await),
            }
        }
        Ok(refused)
    }

    /// Writes what is left and stops; the keys refused since the last drain.
    pub(super) async fn close(self) -> Result<u64, Error> {
        let mut refused = 0;
        for (jobs, task) in self.tasks {
            drop(jobs);
            refused += joined(task.await)?;
        }
        Ok(refused)
    }

    /// Why task `i` stopped taking pages.
    async fn failure(&mut self, i: usize) -> Error {
        match joined((&mut self.tasks[i].1).await) {
            Err(e) => e,
            Ok(_) => Error::Backfill(BackfillError::Failed("the writer".into())),
        }
    }
}

fn joined(result: Result<Result<u64, Error>, tokio::task::JoinError>) -> Result<u64, Error> {
    result.map_err(|e| Error::Backfill(BackfillError::Failed(format!("the writer ({e})"))))?
}
