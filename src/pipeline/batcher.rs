//! Batches: plans in WAL order, with the position they let the pipeline confirm.
//!
//! A batch closes when it holds `batch_size` plans, `batch_deadline` after it opened,
//! or as soon as a transaction ends and nothing more is waiting in the stream (so an
//! idle database sees its change applied at once, and a busy one gets full batches).

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::PipelineConfig;
use crate::error::Error;
use crate::lsn::Lsn;
use crate::pipeline::Reload;
use crate::plan::Plan;
use crate::rules::{plan_message, Planner};
use crate::sink::{Batch, Item, Origin, Version};
use crate::source::membership::Unpublished;
use crate::source::messages::{HEARTBEAT_PREFIX, RELOAD_PREFIX, UNPUBLISHED_PREFIX};
use crate::source::{Relation, SourceEvent, TableName, TxnInfo};

/// How far behind its commit a transaction must be for the stream to count as catching
/// up (see `Batcher::behind`).
pub(crate) const CATCHING_UP: std::time::Duration = std::time::Duration::from_millis(50);

/// Builds batches from source events.
pub(crate) struct Batcher {
    pub(crate) config: PipelineConfig,
    planner: Planner,
    batch: Batch,
    opened: Option<tokio::time::Instant>,
    txn: Option<TxnInfo>,
    seq: u32,
    /// Rules waiting for their marker in the stream.
    pending: Option<(String, Arc<crate::rules::RuleSet>)>,
    /// `schema.table` of each relation, made once per relation shape.
    names: HashMap<u32, (Arc<Relation>, Arc<str>)>,
    /// Told the rules each time they take effect.
    pub(crate) in_force: Option<tokio::sync::watch::Sender<Arc<crate::rules::RuleSet>>>,
}

impl Batcher {
    pub(crate) fn new(config: PipelineConfig, planner: Planner) -> Batcher {
        Batcher {
            config,
            planner,
            batch: Batch::default(),
            opened: None,
            txn: None,
            seq: 0,
            pending: None,
            names: HashMap::new(),
            in_force: None,
        }
    }

    /// New rules take effect from here in the stream.
    fn switch(&mut self, rules: Arc<crate::rules::RuleSet>) {
        if let Some(tx) = &self.in_force {
            tx.send_replace(rules.clone());
        }
        self.planner = Planner::new(rules);
    }

    pub(crate) fn reload(&mut self, reload: Reload) {
        match reload.marker {
            None => {
                tracing::info!(rules = reload.rules.rules().len(), "rules reloaded");
                self.switch(reload.rules);
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

    fn name(&mut self, relation: &Arc<Relation>) -> Arc<str> {
        match self.names.get(&relation.oid) {
            Some((r, name)) if Arc::ptr_eq(r, relation) => name.clone(),
            _ => {
                let name: Arc<str> = relation.qualified_name().into();
                self.names
                    .insert(relation.oid, (relation.clone(), name.clone()));
                name
            }
        }
    }

    fn origin(&mut self, table: Option<Arc<str>>, op: &'static str) -> Origin {
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

    /// Adds an event; `Ok(true)` when it ended a transaction (or is a heartbeat that
    /// may be confirmed).
    pub(crate) fn add(&mut self, event: SourceEvent) -> Result<bool, Error> {
        let ended = self.add_event(event)?;
        if self.opened.is_none() && !self.is_empty() {
            self.opened = Some(tokio::time::Instant::now());
        }
        Ok(ended)
    }

    /// A position outside any transaction (a heartbeat's, an idle one) joins the batch's
    /// confirmation; `true`: the batch may close. Inside a transaction it is ignored.
    fn confirm_between_transactions(&mut self, lsn: Lsn) -> bool {
        if self.txn.is_some() {
            return false;
        }
        self.batch.confirm = Some(self.batch.confirm.map_or(lsn, |c| c.max(lsn)));
        true
    }

    fn add_event(&mut self, event: SourceEvent) -> Result<bool, Error> {
        match event {
            SourceEvent::Begin(txn) => {
                self.txn = Some(txn);
                self.seq = 0;
            }
            SourceEvent::Change(change) => {
                let plan = self.planner.plan_change(&change);
                if !plan.is_empty() {
                    let table = self.name(&change.relation);
                    let origin = self.origin(Some(table), change.op.as_str());
                    self.push(origin, plan);
                } else {
                    self.seq += 1;
                }
            }
            SourceEvent::Truncate { relations, .. } => {
                for r in relations {
                    let plan = self.planner.plan_truncate(std::slice::from_ref(&r));
                    let table = self.name(&r);
                    let origin = self.origin(Some(table), "truncate");
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
            } if prefix == HEARTBEAT_PREFIX => return Ok(self.confirm_between_transactions(lsn)),
            // The server's idle position (a keepalive's): as for a heartbeat.
            SourceEvent::Idle { lsn } => return Ok(self.confirm_between_transactions(lsn)),
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
                    self.switch(rules);
                }
            }
            SourceEvent::Message {
                lsn,
                prefix,
                content,
                ..
            } if prefix == UNPUBLISHED_PREFIX => self.unpublished(lsn, &content),
            SourceEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => match plan_message(&prefix, &content) {
                None => {}
                Some(Ok(mut plan)) => {
                    if plan.flush_all {
                        // `{"all":true}`: everything the rules in force cache.
                        let detail = plan.detail.take();
                        plan = crate::rules::plan_slot_loss(self.planner.rules()).0;
                        plan.detail = detail;
                        tracing::warn!(lsn = %lsn, reason = plan.detail.as_deref().unwrap_or(""), "a manual flush (wal2cache invalidate --all): every key under the rules' prefixes and every subscriber's cache");
                    }
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

    /// A rules' table was added back to the publication (`source::membership`): what
    /// its rules cache is invalidated as by a TRUNCATE, by the rules in force here.
    fn unpublished(&mut self, lsn: Lsn, content: &[u8]) {
        let message: Unpublished = match serde_json::from_slice(content) {
            Ok(m) => m,
            Err(e) => {
                metrics::counter!("wal2cache_bad_messages_total").increment(1);
                tracing::warn!(lsn = %lsn, "malformed {UNPUBLISHED_PREFIX} message: {e}");
                return;
            }
        };
        for table in &message.tables {
            let Ok(name) = TableName::parse(table) else {
                tracing::warn!(lsn = %lsn, table = %table, "a {UNPUBLISHED_PREFIX} message names no table");
                continue;
            };
            let mut plan = self.planner.plan_unstreamed(&name);
            if plan.is_empty() {
                continue;
            }
            plan.detail = Some(message.detail(table));
            tracing::warn!(lsn = %lsn, table = %table, rules = ?plan.rules, "invalidating what the rules of {table} cache: it was added back to the publication, and its changes before that were not streamed");
            let origin = self.origin(Some(table.as_str().into()), "unpublished");
            self.push(origin, plan);
        }
    }

    /// Whether the batch should close now: it is full, or a transaction just ended and
    /// nothing more is waiting (`idle`: in the stream, and in the sinks).
    pub(crate) fn full_or_done(&self, ended: bool, idle: bool) -> bool {
        self.batch.items.len() >= self.config.batch_size || (ended && idle)
    }

    /// The batch holds a complete transaction (or a heartbeat): it may close as soon as
    /// the sinks are free.
    pub(crate) fn has_end(&self) -> bool {
        self.batch.confirm.is_some()
    }

    /// The stream is catching up: the newest transaction in the batch committed more
    /// than `CATCHING_UP` ago (by the database's clock; a clock ahead of ours reads as
    /// live).
    pub(crate) fn behind(&self) -> bool {
        self.batch
            .commit_time
            .and_then(crate::pgtime::since_pg_time)
            .is_some_and(|lag| lag > CATCHING_UP)
    }

    /// When the open batch must close at the latest.
    pub(crate) fn deadline(&self) -> Option<tokio::time::Instant> {
        self.opened.map(|t| t + self.config.batch_deadline)
    }

    /// The transactions of the changes in the open batch (0 for none), in order.
    pub(crate) fn xids(&self) -> impl Iterator<Item = u32> + Clone + '_ {
        self.batch.items.iter().map(|i| i.origin.xid)
    }

    pub(crate) fn take(&mut self) -> Batch {
        self.opened = None;
        std::mem::take(&mut self.batch)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.batch.items.is_empty() && self.batch.confirm.is_none()
    }
}
