//! The replication stream: a background task that holds the replication connection,
//! decodes what arrives and hands typed events over a bounded channel. When the
//! consumer is slow, the channel fills, the task stops reading and Postgres keeps the
//! WAL: memory stays flat whatever the size of a transaction or of the backlog.
//!
//! Nothing is confirmed to Postgres unless the consumer calls [`Source::confirm`]:
//! keepalives report the last confirmed position, never a newer one. After a transient
//! error the task reconnects and resumes from the slot's confirmed position, so a
//! transaction that was cut off is sent again from its Begin.

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::health::Health;
use crate::lsn::Lsn;
use crate::source::change::{Relation, SourceEvent};
use crate::source::error::{ErrorKind, SourceError};
use crate::source::identity::{self, Loss, LossReason, Remembered, ServerIdentity};
use crate::source::lineage::Lineage;
use crate::source::pace;
use crate::source::pgoutput::{self, Begin, Commit, Message};
use crate::source::relations::Relations;
use crate::source::table::TableName;
use crate::source::target::PgTarget;

#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub target: PgTarget,
    pub slot: String,
    pub publication: String,
    /// Create the slot as TEMPORARY on the replication connection, for this session
    /// only (`tail`): it never takes the daemon's slot and vanishes on disconnect.
    pub temporary_slot: bool,
    /// Events buffered between the stream and its consumer.
    pub buffer: usize,
    /// How often the confirmed position is reported to Postgres at most.
    pub status_interval: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Shown in `pg_stat_replication.application_name`.
    pub application_name: String,
    /// The server streamed from at start: before each reconnect the slot and the
    /// server are compared with it and with the last confirmed position, and a loss
    /// ends the stream with [`SourceError::SlotLost`].
    pub guard: Option<ServerIdentity>,
    /// While another process holds the slot, how often to try for it: the bound on a
    /// takeover once the slot is free (`postgres.takeover`).
    pub takeover: Duration,
    /// Where the stream reports streaming, standby and why not, for operators.
    pub health: Option<Arc<Health>>,
}

impl StreamConfig {
    pub fn new(target: PgTarget, slot: impl Into<String>, publication: impl Into<String>) -> Self {
        StreamConfig {
            target,
            slot: slot.into(),
            publication: publication.into(),
            temporary_slot: false,
            buffer: 1024,
            status_interval: Duration::from_millis(500),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            application_name: "wal2cache".into(),
            guard: None,
            takeover: Duration::from_secs(1),
            health: None,
        }
    }
}

/// Events travel from the stream's task to its consumer in chunks of up to this many:
/// whatever arrived together, so that a catch-up costs one channel hand-off (and at
/// most one wake-up) per chunk rather than per event.
const CHUNK: usize = 128;

/// What the stream's task sends: a chunk of events, or the fatal error that ends it.
type Chunk = Result<Vec<SourceEvent>, SourceError>;

/// A running replication stream.
pub struct Source {
    events: mpsc::Receiver<Chunk>,
    /// The rest of the chunk being read.
    ready: std::vec::IntoIter<SourceEvent>,
    confirm: watch::Sender<Lsn>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Confirms positions of a [`Source`] from another task.
#[derive(Debug, Clone)]
pub struct Confirmer(watch::Sender<Lsn>);

impl Confirmer {
    /// A confirmer that raises `position` (the stream's own, or a test's).
    pub fn new(position: watch::Sender<Lsn>) -> Confirmer {
        Confirmer(position)
    }

    /// Everything up to `lsn` is applied: Postgres may recycle the WAL before it, and
    /// a restart resumes after it. Positions never go back.
    pub fn confirm(&self, lsn: Lsn) {
        self.0.send_if_modified(|current| {
            let raise = lsn > *current;
            if raise {
                *current = lsn;
            }
            raise
        });
    }
}

impl Source {
    /// Starts streaming from the slot's confirmed position. `confirmed` is the last
    /// position this process confirmed before (`Lsn::ZERO` when none).
    pub fn start(config: StreamConfig, confirmed: Lsn) -> Source {
        let (tx, events) = mpsc::channel(config.buffer.div_ceil(CHUNK).max(2));
        let (confirm, confirm_rx) = watch::channel(confirmed);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(config, tx, confirm_rx, stop_rx));
        Source {
            events,
            ready: Vec::new().into_iter(),
            confirm,
            stop,
            task,
        }
    }

    /// The next event; `Some(Err)` is fatal and the last item; `None` once stopped.
    pub async fn next(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        loop {
            if let Some(event) = self.ready.next() {
                return Some(Ok(event));
            }
            match self.events.recv().await? {
                Ok(chunk) => self.ready = chunk.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next event if one is waiting now; `None` otherwise (and once the stream
    /// ended, which `next` reports).
    pub fn try_next(&mut self) -> Option<Result<SourceEvent, SourceError>> {
        loop {
            if let Some(event) = self.ready.next() {
                return Some(Ok(event));
            }
            match self.events.try_recv().ok()? {
                Ok(chunk) => self.ready = chunk.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// No event is waiting right now.
    pub fn is_idle(&self) -> bool {
        self.ready.len() == 0 && self.events.is_empty()
    }

    pub fn confirm(&self, lsn: Lsn) {
        self.confirmer().confirm(lsn);
    }

    pub fn confirmer(&self) -> Confirmer {
        Confirmer(self.confirm.clone())
    }

    /// The highest position confirmed so far.
    pub fn confirmed(&self) -> Lsn {
        *self.confirm.borrow()
    }

    /// Stops streaming: the last confirmed position is sent to Postgres before the
    /// connection closes.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        drop(self.events);
        let _ = self.task.await;
    }
}

async fn run(
    config: StreamConfig,
    tx: mpsc::Sender<Chunk>,
    mut confirm: watch::Receiver<Lsn>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    let mut relations = Relations::new();
    let mut standby = false;
    let mut sessions = 0u64;
    let mut guard = config.guard.clone();
    let mut lineage = Lineage::default();
    loop {
        let mut session = Session {
            lineage: &mut lineage,
            resumed: sessions > 0,
            guard: &mut guard,
            config: &config,
            relations: &mut relations,
            tx: &tx,
            confirm: &mut confirm,
            stop: &mut stop,
            started: false,
            catalog: None,
        };
        let result = session.run().await;
        if session.started {
            sessions += 1;
            backoff.reset();
            standby = false;
        }
        let error = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        if let Some(h) = &config.health {
            h.not_streaming(&error.to_string(), error.kind() == ErrorKind::Standby);
        }
        let delay = backoff.next_delay();
        match error.kind() {
            ErrorKind::Fatal => {
                let _ = tx.send(Err(error)).await;
                return;
            }
            ErrorKind::Standby if !standby => {
                standby = true;
                tracing::warn!(slot = %config.slot, %error, retry_every = ?config.takeover, "slot in use by another process: this instance is on standby and takes over when it is free");
            }
            // Not the backoff: a standby must take over within `takeover` of the slot
            // being freed, however long it has waited (`wait_for_free_slot`).
            ErrorKind::Standby => {
                tracing::debug!(slot = %config.slot, "still on standby")
            }
            ErrorKind::Transient => tracing::warn!(
                %error,
                attempt = backoff.attempts(),
                retry_in = ?delay,
                "replication connection failed; reconnecting"
            ),
        }
        let wait = async {
            if error.kind() == ErrorKind::Standby {
                wait_for_free_slot(&config).await;
            } else {
                tokio::time::sleep(delay).await;
            }
        };
        tokio::select! {
            _ = wait => {}
            _ = stop.wait_for(|s| *s) => return,
            _ = tx.closed() => return,
        }
    }
}

/// On standby: returns once the slot is not in use (or gone: the next session says
/// what became of it), checking every `takeover` over an ordinary connection, so that
/// the server does not log a refused replication connection at every check.
async fn wait_for_free_slot(config: &StreamConfig) {
    let mut client = None;
    loop {
        tokio::time::sleep(config.takeover).await;
        if client.is_none() {
            client = config.target.connect().await.ok();
        }
        let Some(c) = &client else { continue };
        match c
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&config.slot],
            )
            .await
        {
            Ok(Some(row)) if row.get::<_, bool>(0) => {}
            Ok(_) => return,
            // Try the replication connection: it reports what is wrong.
            Err(_) => return,
        }
    }
}

struct Session<'a> {
    config: &'a StreamConfig,
    relations: &'a mut Relations,
    tx: &'a mpsc::Sender<Chunk>,
    confirm: &'a mut watch::Receiver<Lsn>,
    stop: &'a mut watch::Receiver<bool>,
    started: bool,
    /// An earlier session of this stream had started.
    resumed: bool,
    /// The server as the stream knows it (`StreamConfig::guard`), updated when a
    /// promotion carried the slot over.
    guard: &'a mut Option<ServerIdentity>,
    /// An ordinary connection for what the stream does not say (a table's ancestors),
    /// opened at the session's start to learn the partitions' parents (`Lineage`).
    catalog: Option<tokio_postgres::Client>,
    /// The ancestors tables had, for those detached since (kept across sessions).
    lineage: &'a mut Lineage,
}

/// The tables `oid` is a partition or an inheritance child of, nearest first.
const ANCESTORS: &str = "
WITH RECURSIVE up(relid, depth) AS (
    SELECT inhparent, 1 FROM pg_inherits WHERE inhrelid = $1
  UNION ALL
    SELECT i.inhparent, up.depth + 1 FROM pg_inherits i JOIN up ON i.inhrelid = up.relid
)
SELECT n.nspname::text, c.relname::text
  FROM up JOIN pg_class c ON c.oid = up.relid JOIN pg_namespace n ON n.oid = c.relnamespace
 ORDER BY up.depth, c.relname";

fn wire(lsn: Lsn) -> pgwire_replication::Lsn {
    pgwire_replication::Lsn(lsn.0)
}

fn ours(lsn: pgwire_replication::Lsn) -> Lsn {
    Lsn(lsn.0)
}

impl Session<'_> {
    /// Every partition's and child's ancestors as the catalog has them now.
    async fn learn_lineage(
        config: &StreamConfig,
        catalog: &mut Option<tokio_postgres::Client>,
        lineage: &mut Lineage,
    ) -> Result<(), SourceError> {
        if catalog
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            *catalog = Some(config.target.connect().await?);
        }
        let client = catalog.as_ref().expect("connected above");
        if let Err(source) = lineage.learn_all(client).await {
            *catalog = None;
            return Err(SourceError::Postgres {
                context: "reading the partitions and inheritance children".into(),
                source,
            });
        }
        Ok(())
    }

    /// A table as the stream describes it, with its ancestors from the catalog: a
    /// change to a partition or a child is a change to its parents, whose rules apply.
    async fn describe(&mut self, body: pgoutput::RelationBody) -> Result<(), SourceError> {
        let mut relation = Relation::from(body);
        if self.catalog.is_none() {
            self.catalog = Some(self.config.target.connect().await?);
        }
        let catalog = self.catalog.as_ref().expect("connected above");
        let rows = catalog
            .query(ANCESTORS, &[&relation.oid])
            .await
            .map_err(|source| {
                self.catalog = None;
                SourceError::Postgres {
                    context: format!("reading the parents of table {}", relation.table()),
                    source,
                }
            })?;
        let now = rows
            .iter()
            .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        relation.ancestors = self.lineage.ancestors(relation.oid, &relation.table(), now);
        let catalog = self.catalog.as_ref().expect("connected above");
        let domains = crate::source::catalog::resolve_domains(catalog, &mut relation.columns).await;
        if let Err(source) = domains {
            self.catalog = None;
            return Err(SourceError::Postgres {
                context: format!("reading the column types of table {}", relation.table()),
                source,
            });
        }
        self.relations.insert(relation);
        Ok(())
    }

    fn error(&self, e: pgwire_replication::PgWireError) -> SourceError {
        SourceError::from_replication(e, &self.config.slot, &self.config.target.user)
    }

    async fn connect(c: &StreamConfig, confirmed: Lsn) -> Result<ReplicationClient, SourceError> {
        let (primary, replication) = c.target.replication(&c.slot, &c.publication).await?;
        let err = |e| primary.replication_error(e, &c.slot);
        let replication = replication
            // Zero: resume from the slot's confirmed_flush_lsn.
            .with_start_lsn(pgwire_replication::Lsn(0))
            .with_ack_lsn(wire(confirmed))
            .with_status_interval(c.status_interval)
            .with_wakeup_interval(Duration::from_secs(5))
            .with_buffer_size(c.buffer.clamp(16, 1024))
            .with_application_name(c.application_name.clone());
        let mut client = ReplicationClient::connect_gated(replication)
            .await
            .map_err(err)?;
        if c.temporary_slot {
            let sql = format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                c.slot
            );
            client.simple_query(&sql).await.map_err(err)?;
        }
        client.start().await.map_err(err)?;
        client.wait_started().await.map_err(err)?;
        Ok(client)
    }

    /// Before a reconnect: is the slot still the one the stream read, on the same
    /// server, not ahead of what was confirmed? (See `source::identity`.)
    async fn check_guard(
        config: &StreamConfig,
        guard: &mut Option<ServerIdentity>,
        confirmed: Lsn,
    ) -> Result<(), SourceError> {
        let Some(server) = guard.as_mut() else {
            return Ok(());
        };
        let slot_name = &config.slot;
        let client = config.target.connect().await?;
        let (now, slot) = identity::observe(&client, &config.target, slot_name).await?;
        let expected = Remembered {
            slot: slot_name.clone(),
            server: server.clone(),
            confirmed,
        };
        if let Some(loss) = identity::detect(Some(&expected), &now, slot_name, slot.as_ref()) {
            return Err(SourceError::SlotLost(loss));
        }
        if now.timeline != server.timeline {
            tracing::warn!(slot = %slot_name, from = server.timeline, to = now.timeline, "the server was promoted and carries the slot (a synchronized failover slot): streaming on from it");
            *server = now;
        }
        Ok(())
    }

    async fn run(&mut self) -> Result<(), SourceError> {
        if self.resumed {
            let confirmed = *self.confirm.borrow();
            tokio::select! {
                checked = Self::check_guard(self.config, self.guard, confirmed) => checked?,
                _ = self.stop.wait_for(|s| *s) => return Ok(()),
            }
        }
        // Before the first change is read: a partition detached after that still
        // counts as its parent's.
        let learned = tokio::select! {
            learned = Self::learn_lineage(self.config, &mut self.catalog, self.lineage) => learned,
            _ = self.stop.wait_for(|s| *s) => return Ok(()),
        };
        learned?;
        let confirmed = *self.confirm.borrow_and_update();
        let connected = tokio::select! {
            client = Self::connect(self.config, confirmed) => client,
            _ = self.stop.wait_for(|s| *s) => return Ok(()),
        };
        let mut client = match connected {
            // Dropped between the check and the connection.
            Err(SourceError::MissingSlot { slot }) if self.resumed && self.guard.is_some() => {
                return Err(SourceError::SlotLost(Loss {
                    reason: LossReason::SlotMissing,
                    detail: format!(
                        "replication slot {slot:?} disappeared while the stream was reconnecting"
                    ),
                }))
            }
            other => other?,
        };
        self.started = true;
        if let Some(h) = &self.config.health {
            h.streaming();
        }
        if self.resumed && self.config.temporary_slot {
            tracing::warn!(slot = %self.config.slot, "reconnected on a new temporary slot: changes committed while disconnected are not shown");
        }
        // A new session describes every relation again before using it.
        self.relations.reset();
        tracing::info!(slot = %self.config.slot, server = %self.config.target.display(), "streaming");
        let result = self.stream(&mut client).await;
        pace::stream_ended();
        if result.is_ok() {
            self.report_last_confirmation(&client).await;
            let _ = client.shutdown().await;
        } else {
            client.abort();
        }
        result
    }

    /// On a clean stop, waits (a bounded time) until the last confirmed position has
    /// been reported to Postgres, so a restart resumes right after it.
    async fn report_last_confirmation(&self, client: &ReplicationClient) {
        let confirmed = wire(*self.confirm.borrow());
        client.update_applied_lsn(confirmed);
        let metrics = client.metrics();
        let deadline =
            tokio::time::Instant::now() + self.config.status_interval * 2 + Duration::from_secs(1);
        while metrics.last_applied_lsn() < confirmed && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if metrics.last_applied_lsn() < confirmed {
            tracing::warn!(confirmed = %ours(confirmed), "could not report the last confirmed position before stopping; the next start may replay from an earlier one");
        }
    }

    async fn stream(&mut self, client: &mut ReplicationClient) -> Result<(), SourceError> {
        let mut pending: Vec<SourceEvent> = Vec::with_capacity(CHUNK);
        // For `SourceEvent::Idle`: whether a transaction is being received, and the
        // furthest position handed over (a commit's end, a message, an idle position).
        let mut in_transaction = false;
        let mut received = *self.confirm.borrow();
        loop {
            let event = if pending.is_empty() {
                pace::waiting_for_source(true);
                let event = tokio::select! {
                    biased;
                    _ = self.stop.wait_for(|s| *s) => return Ok(()),
                    changed = self.confirm.changed() => {
                        if changed.is_ok() {
                            client.update_applied_lsn(wire(*self.confirm.borrow_and_update()));
                        }
                        continue;
                    }
                    event = client.recv() => event,
                };
                pace::waiting_for_source(false);
                event
            } else {
                // While events keep arriving only the stream is polled; the stop and
                // the confirmations are checked between events, without registering
                // a waker on them for each event.
                if self.stop.has_changed().unwrap_or(true) && *self.stop.borrow_and_update() {
                    return Ok(());
                }
                if self.confirm.has_changed().unwrap_or(false) {
                    client.update_applied_lsn(wire(*self.confirm.borrow_and_update()));
                }
                tokio::select! {
                    biased;
                    event = client.recv() => event,
                    // Nothing more has arrived: hand over what has.
                    () = std::future::ready(()) => {
                        if !self.hand_over(&mut pending, client).await {
                            return Ok(());
                        }
                        continue;
                    }
                }
            };
            let message = match event.map_err(|e| self.error(e))? {
                None => return Err(SourceError::Ended),
                Some(ReplicationEvent::KeepAlive { wal_end, .. }) => {
                    // Everything the server has read for this slot has been sent: a
                    // position to confirm once what came before it is applied.
                    let lsn = ours(wal_end);
                    if !in_transaction && lsn > received {
                        received = lsn;
                        pending.push(SourceEvent::Idle { lsn });
                    }
                    continue;
                }
                Some(ReplicationEvent::StoppedAt { .. }) => return Ok(()),
                Some(ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                }) => {
                    in_transaction = true;
                    Message::Begin(Begin {
                        final_lsn: ours(final_lsn),
                        commit_time: commit_time_micros,
                        xid,
                    })
                }
                Some(ReplicationEvent::Commit {
                    lsn,
                    end_lsn,
                    commit_time_micros,
                }) => {
                    in_transaction = false;
                    received = received.max(ours(end_lsn));
                    pace::saw_commit(commit_time_micros);
                    Message::Commit(Commit {
                        flags: 0,
                        commit_lsn: ours(lsn),
                        end_lsn: ours(end_lsn),
                        commit_time: commit_time_micros,
                    })
                }
                Some(ReplicationEvent::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                }) => {
                    if !transactional {
                        received = received.max(ours(lsn));
                    }
                    Message::Message(pgoutput::LogicalMessage {
                        transactional,
                        lsn: ours(lsn),
                        prefix,
                        content,
                    })
                }
                Some(ReplicationEvent::XLogData {
                    wal_start, data, ..
                }) => pgoutput::decode(&data).map_err(|source| SourceError::Decode {
                    lsn: ours(wal_start),
                    source,
                })?,
            };
            let message = match message {
                Message::Relation(body) => {
                    self.describe(body).await?;
                    continue;
                }
                other => other,
            };
            let Some(event) = self.relations.apply(message)? else {
                continue;
            };
            pending.push(event);
            if pending.len() >= CHUNK && !self.hand_over(&mut pending, client).await {
                return Ok(());
            }
        }
    }

    /// Hands the pending events to the consumer as one chunk (leaving `pending`
    /// empty), waiting for room without losing them and still forwarding
    /// confirmations; `false` when the stream is stopped or the consumer is gone.
    async fn hand_over(
        &mut self,
        pending: &mut Vec<SourceEvent>,
        client: &ReplicationClient,
    ) -> bool {
        let chunk = std::mem::replace(pending, Vec::with_capacity(CHUNK));
        let chunk = match self.tx.try_reserve() {
            Ok(permit) => {
                permit.send(Ok(chunk));
                return true;
            }
            Err(mpsc::error::TrySendError::Closed(())) => return false,
            Err(mpsc::error::TrySendError::Full(())) => chunk,
        };
        loop {
            tokio::select! {
                biased;
                _ = self.stop.wait_for(|s| *s) => return false,
                changed = self.confirm.changed() => {
                    if changed.is_ok() {
                        client.update_applied_lsn(wire(*self.confirm.borrow_and_update()));
                    }
                }
                permit = self.tx.reserve() => match permit {
                    Ok(permit) => {
                        permit.send(Ok(chunk));
                        return true;
                    }
                    Err(_) => return false,
                },
            }
        }
    }
}
