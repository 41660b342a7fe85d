//! Waiting until committed transactions are visible to other sessions.
//!
//! PostgreSQL writes a transaction's commit record, and a walsender may decode and send
//! it, before the transaction leaves the proc array: until then other sessions still
//! see the rows as they were. The window is usually microseconds (longer when the
//! committing backend is descheduled); under synchronous replication it lasts until a
//! synchronous standby confirms, indefinitely while none answers. An invalidation
//! applied in that window lets a reader that misses read the old row and cache it
//! again, for a whole TTL. So before a batch goes to the sinks the pipeline waits here
//! until every transaction in it is visible.
//!
//! Visibility comes from `pg_current_snapshot()` on an ordinary connection: a
//! transaction is visible once it precedes the snapshot's `xmax` and is not among its
//! in-progress `xip`. Once visible it stays visible, so the last snapshot answers for
//! every transaction older than it without a query: catching up costs one query, a
//! live batch one round trip.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::source::target::PgTarget;

/// How long a transaction may stay invisible before the log says so.
const WARN_AFTER: Duration = Duration::from_secs(5);

/// The longest pause between two looks while a transaction is not yet visible.
const MAX_POLL: Duration = Duration::from_millis(100);

/// A snapshot's bounds, as 32-bit transaction ids (the stream's xids are 32-bit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    xmax: u32,
    /// In progress at the snapshot, sorted.
    xip: Vec<u32>,
}

impl Snapshot {
    /// Parses `pg_current_snapshot()`'s text form, `xmin:xmax:xip,xip,...` (64-bit
    /// ids; their low 32 bits are the stream's xids).
    pub fn parse(text: &str) -> Result<Snapshot, String> {
        let bad = || format!("unexpected pg_current_snapshot() value {text:?}");
        let mut parts = text.trim().splitn(3, ':');
        let _xmin = parts.next().ok_or_else(bad)?;
        let xmax: u64 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let xip_text = parts.next().ok_or_else(bad)?;
        let mut xip = xip_text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u64>().map(|x| x as u32).map_err(|_| bad()))
            .collect::<Result<Vec<u32>, String>>()?;
        xip.sort_unstable();
        Ok(Snapshot {
            xmax: xmax as u32,
            xip,
        })
    }

    /// Whether the committed transaction `xid` is visible in this snapshot: it
    /// precedes `xmax` (modulo 2^32, as PostgreSQL compares xids) and was not in
    /// progress.
    pub fn visible(&self, xid: u32) -> bool {
        precedes(xid, self.xmax) && self.xip.binary_search(&xid).is_err()
    }
}

/// `a` is older than `b` in PostgreSQL's circular xid order.
fn precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The pipeline's check that a batch's transactions are visible.
pub struct Visibility {
    target: PgTarget,
    client: Option<Client>,
    last: Option<Snapshot>,
    stop: watch::Receiver<bool>,
}

impl Visibility {
    pub fn new(target: PgTarget, stop: watch::Receiver<bool>) -> Visibility {
        Visibility {
            target,
            client: None,
            last: None,
            stop,
        }
    }

    /// Returns true once every transaction in `xids` (committed ones, from the stream;
    /// 0 is none) is visible to other sessions; false when the pipeline stops first (the
    /// batch must not be applied). Connection failures are retried: nothing is applied
    /// before the answer.
    pub async fn wait(&mut self, xids: impl Iterator<Item = u32> + Clone) -> bool {
        let xids = xids.filter(|&x| x != 0);
        if let Some(last) = &self.last {
            if xids.clone().all(|x| last.visible(x)) {
                return true;
            }
        }
        let started = Instant::now();
        let mut warned = false;
        let mut pause = Duration::from_millis(1);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.snapshot().await {
                Ok(snapshot) => {
                    backoff.reset();
                    let waiting = xids.clone().find(|&x| !snapshot.visible(x));
                    self.last = Some(snapshot);
                    let Some(xid) = waiting else {
                        if warned {
                            tracing::info!(
                                waited_ms = started.elapsed().as_millis() as u64,
                                "the transactions are visible now; invalidating"
                            );
                        }
                        return true;
                    };
                    if pause == Duration::from_millis(1) {
                        // The first look found one not yet visible: counted once.
                        metrics::counter!("wal2cache_visibility_waits_total").increment(1);
                    }
                    if !warned && started.elapsed() >= WARN_AFTER {
                        warned = true;
                        tracing::warn!(xid, waited_s = started.elapsed().as_secs(), "transaction {xid} is committed in the WAL but not yet visible to other sessions (is a synchronous standby not answering? see pg_stat_replication); its invalidations wait, so that no reader caches the old row again");
                    }
                    let next = pause;
                    pause = (pause * 2).min(MAX_POLL);
                    if self.pause(next).await {
                        return false;
                    }
                }
                Err(e) => {
                    self.client = None;
                    let delay = backoff.next_delay();
                    if backoff.attempts() == 1 {
                        tracing::warn!(server = %self.target.display(), "cannot check that committed transactions are visible before invalidating them: {e}; retrying, nothing is applied meanwhile");
                    } else {
                        tracing::debug!(error = %e, "visibility check failed again");
                    }
                    if self.pause(delay).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Sleeps `d`; true when the pipeline stopped meanwhile.
    async fn pause(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.stop.wait_for(|s| *s) => true,
        }
    }

    async fn snapshot(&mut self) -> Result<Snapshot, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let client = tokio::select! {
                c = self.target.connect() => c.map_err(|e| e.to_string())?,
                _ = self.stop.wait_for(|s| *s) => return Err("stopping".into()),
            };
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected above");
        // The simple protocol: one round trip (an unnamed prepared statement takes two).
        let messages = client
            .simple_query("SELECT pg_current_snapshot()")
            .await
            .map_err(|e| crate::source::error::pg_error(&e))?;
        let text = messages
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
                _ => None,
            })
            .ok_or("pg_current_snapshot() returned no row")?;
        Snapshot::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_text_form() {
        let s = Snapshot::parse("740:760:742,755").unwrap();
        assert_eq!(
            s,
            Snapshot {
                xmax: 760,
                xip: vec![742, 755]
            }
        );
        assert_eq!(Snapshot::parse("10:10:").unwrap().xip, Vec::<u32>::new());
        assert!(Snapshot::parse("10:10").is_err());
        assert!(Snapshot::parse("a:b:").is_err());
        assert!(Snapshot::parse("1:2:3,x").is_err());
    }

    #[test]
    fn visible_before_xmax_and_not_in_progress() {
        let s = Snapshot::parse("740:760:742,755").unwrap();
        assert!(s.visible(741));
        assert!(!s.visible(742), "in progress");
        assert!(s.visible(759));
        assert!(!s.visible(760), "xmax itself is not yet complete");
        assert!(!s.visible(900));
    }

    #[test]
    fn compares_across_the_32_bit_wraparound() {
        // Epoch 1: xmax's low 32 bits are 5; 2^32 - 3 (epoch 0) precedes it.
        let s = Snapshot::parse(&format!("{}:{}:", (1u64 << 32) - 10, (1u64 << 32) + 5)).unwrap();
        assert!(s.visible(u32::MAX - 2));
        assert!(s.visible(4));
        assert!(!s.visible(5));
        assert!(!s.visible(6));
        let s = Snapshot::parse(&format!("1:{}:{}", (1u64 << 32) + 5, (1u64 << 32) + 2)).unwrap();
        assert!(!s.visible(2), "in progress, given as a 64-bit id");
    }
}
