//! Wiring: what each command does with a loaded configuration.

mod invalidate;
mod status;
mod tail;

pub use invalidate::{invalidate, InvalidateError, Invalidation};
pub use status::{status, StatusReport};
pub use tail::tail;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::config::{OnSlotLoss, RulesBackfill};
use crate::error::Error;
use crate::health::Health;
use crate::lsn::Lsn;
use crate::pipeline::{self, Pipeline, Reload};
use crate::remember::Remembering;
use crate::rules::check::{self, CheckError, CheckProblem, CheckReport};
use crate::rules::{self, RuleSet};
use crate::sink::kafka::KafkaSink;
use crate::sink::redis::{state_key, RedisSink, StreamState};
use crate::sink::{Batch, Item, Origin, Position, Sink, Version};
use crate::source::identity::{self, Loss, LossReason, Remembered};
use crate::source::membership::MembershipWatch;
use crate::source::messages::{wal_heartbeats, RELOAD_PREFIX};
use crate::source::monitor;
use crate::source::slot::{self, SetupPlan, SetupReport};
use crate::source::visibility::Visibility;
use crate::source::{Source, SourceError, StreamConfig};

/// Loads and compiles the rules the configuration names.
pub fn load_rules(config: &Config) -> Result<Arc<RuleSet>, Error> {
    Ok(Arc::new(rules::load(&config.rules.path)?))
}

/// The publication must hold every table the rules name.
fn setup_plan(config: &Config, rules: &RuleSet, with_slot: bool) -> SetupPlan {
    SetupPlan {
        publication: config.postgres.publication.clone(),
        slot: config.postgres.slot.clone(),
        tables: rules.tables(),
        create: config.postgres.create,
        extend: true,
        with_slot,
        failover: config.postgres.failover_slot,
    }
}

/// `wal2cache setup`: checks the rules against the database (refusing what `check`
/// refuses), then creates the publication and the slot. Unlike `run`, it creates them
/// even when `postgres.create` is false: that is its job.
pub async fn setup(config: &Config) -> Result<SetupReport, Error> {
    let rules = load_rules(config)?;
    let report = check_rules(config, &rules, true).await?;
    log_warnings(&report);
    let mut plan = setup_plan(config, &rules, true);
    plan.create = true;
    Ok(slot::ensure(&config.pg_target(), &plan).await?)
}

/// Logs what `check` warns about.
fn log_warnings(report: &CheckReport) {
    for w in &report.warnings {
        tracing::warn!("{w}");
    }
}

/// `wal2cache check`: the config, the rules, and the rules against the live catalog.
/// Every problem is in the error.
pub async fn check(config: &Config) -> Result<(Arc<RuleSet>, CheckReport), Error> {
    // What `run` would refuse is reported here, before the database is asked.
    config.sinks()?;
    let rules = load_rules(config)?;
    let mut report = check_rules(config, &rules, config.postgres.create).await?;
    report.warnings.extend(check_slot_loss(config).await);
    Ok((rules, report))
}

/// What `run` would find comparing the stream record in Redis with the server and the
/// slot: a warning saying what it would do about a loss, or that it could not tell.
async fn check_slot_loss(config: &Config) -> Option<CheckProblem> {
    let warning = |message: String, fix: Option<String>| {
        Some(CheckProblem {
            origin: "postgres.slot".into(),
            message,
            fix,
        })
    };
    let found = async {
        let (redis_config, _) = config.sinks()?;
        let mut state = StreamState::connect(redis_config, &config.name).await?;
        let remembered = state.read().await?;
        let target = config.pg_target();
        let client = target.connect().await?;
        let (server, slot) = identity::observe(&client, &target, &config.postgres.slot).await?;
        Ok::<_, Error>(identity::detect(
            remembered.as_ref(),
            &server,
            &config.postgres.slot,
            slot.as_ref(),
        ))
    };
    match tokio::time::timeout(std::time::Duration::from_secs(20), found).await {
        Err(_) => warning(
            "could not compare the slot with the stream record in Redis (no answer within 20 s), so a slot loss would only be found by `run`".into(),
            Some("check that Redis at redis.url runs".into()),
        ),
        Ok(Err(e)) => warning(
            format!("could not compare the slot with the stream record in Redis, so a slot loss would only be found by `run`: {e}"),
            None,
        ),
        Ok(Ok(None)) => None,
        Ok(Ok(Some(loss))) => match config.postgres.on_slot_loss {
            OnSlotLoss::Flush => warning(
                format!("changes may have been missed: {loss}"),
                Some("`run` flushes the caches (the rules' key prefixes and tag sets in Redis, and every subscriber through a flush_all with reason \"slot_lost\") before it streams (postgres.on_slot_loss = \"flush\")".into()),
            ),
            OnSlotLoss::Fail => warning(
                format!("changes may have been missed: {loss}; `run` stops with exit code 4 (postgres.on_slot_loss = \"fail\")"),
                Some("run once with postgres.on_slot_loss = \"flush\" to flush the caches and stream from the slot as it is".into()),
            ),
        },
    }
}

/// Checks a compiled rule set against the database: the server's preconditions, then
/// every rule. With `create`, tables missing from the publication are to be added
/// (`report.publish`) rather than problems.
pub async fn check_rules(
    config: &Config,
    rules: &RuleSet,
    create: bool,
) -> Result<CheckReport, Error> {
    let target = config.pg_target();
    let client = target.connect().await?;
    let version = slot::check_preconditions(&client, &target).await?;
    let mut report = check::check(
        &client,
        &version,
        rules,
        &config.postgres.publication,
        create,
    )
    .await?;
    for (message, fix) in slot::failover_warnings(
        &client,
        &version,
        &config.postgres.slot,
        config.postgres.failover_slot,
    )
    .await?
    {
        report.warnings.push(CheckProblem {
            origin: "postgres.slot".into(),
            message,
            fix,
        });
    }
    if report.problems.is_empty() {
        Ok(report)
    } else {
        Err(CheckError {
            problems: report.problems,
        }
        .into())
    }
}

/// Compiles and checks the rules again; on failure the caller keeps the old set.
pub async fn reload_rules(config: &Config) -> Result<(Arc<RuleSet>, CheckReport), Error> {
    let (rules, report) = check(config).await?;
    log_warnings(&report);
    Ok((rules, report))
}

/// What the reloader shares with the membership watch.
#[derive(Clone)]
struct Membership {
    /// Held while the publication is read and changed.
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Asks the watch to look now.
    wake: Arc<tokio::sync::Notify>,
    /// The rules in force.
    in_force: tokio::sync::watch::Receiver<Arc<RuleSet>>,
}

/// SIGHUP in `run`: the new rules, checked, and the tables they add to the publication.
///
/// A table added to the publication is published from the commit of the `ALTER
/// PUBLICATION` on; the stream may reach that point before or after this task hands the
/// new rules over. So the rules do not take effect when handed over but where the WAL
/// says: a transactional marker message is written in the same transaction as the
/// `ALTER PUBLICATION`, and the pipeline switches to the new rules when it reads the
/// marker, before the first change that the new membership publishes. If the
/// transaction fails, the marker never appears and the previous rules stay in force.
async fn reload(
    config: &Config,
    rules_tx: &mpsc::UnboundedSender<Reload>,
    membership: &Membership,
) -> Result<usize, Error> {
    // The membership watch adds tables too: one of them at a time reads and changes
    // the publication.
    let _held = membership.lock.lock().await;
    let (rules, mut report) = reload_rules(config).await?;
    let count = rules.rules().len();
    // A table the rules in force already name went missing from the publication (it
    // was replaced or taken out): the watch adds it back, with the invalidation that
    // calls for.
    let in_force: Vec<crate::source::TableName> = membership.in_force.borrow().table_names();
    let before = report.publish.len();
    report.publish.retain(|m| !in_force.contains(&m.for_table));
    if report.publish.len() < before {
        membership.wake.notify_one();
    }

    if report.publish.is_empty() {
        let _ = rules_tx.send(Reload {
            rules,
            marker: None,
        });
        return Ok(count);
    }
    let marker = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let _ = rules_tx.send(Reload {
        rules,
        marker: Some(marker.clone()),
    });
    let mut client = config.pg_target().connect().await?;
    let publication = &config.postgres.publication;
    let failed = |context: &str| {
        let context = format!(
            "{context} to add {} to publication {publication:?} for the new rules",
            report.to_publish().join(", ")
        );
        move |source| crate::source::SourceError::Postgres { context, source }
    };
    let txn = client
        .transaction()
        .await
        .map_err(failed("opening the transaction"))?;
    txn.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&RELOAD_PREFIX, &marker],
    )
    .await
    .map_err(failed("writing the reload marker"))?;
    slot::add_to_publication(&txn, publication, &report.publish).await?;
    txn.commit()
        .await
        .map_err(failed("committing the transaction"))?;
    tracing::info!(publication = %publication, tables = ?report.to_publish(), "added tables to the publication; the new rules take effect from there in the stream");
    Ok(count)
}

/// `wal2cache run`: the daemon. Refuses to start on rules that fail `check`; creates
/// the publication and the slot when missing (with `postgres.create`); connects to
/// Redis and Kafka (failing fast when they cannot be reached at start); then keeps the
/// caches in step with the database until `shutdown`. A message on `reload` (SIGHUP)
/// loads the rules again; if they fail, the old ones stay. When changes may have been
/// missed (see [`stream`]), it flushes the caches or stops, as
/// `postgres.on_slot_loss` says; a loss found on a reconnect starts the stream again
/// from those checks.
pub async fn run(
    config: &Config,
    shutdown: impl Future<Output = ()>,
    mut reload_signals: mpsc::UnboundedReceiver<()>,
) -> Result<(), Error> {
    config.sinks()?;
    let mut rules = load_rules(config)?;
    if rules.rules().is_empty() {
        tracing::warn!(rules = %config.rules.path.display(), "the rules have no [[rule]]: no change will invalidate anything; add rules (see rules/README.md) and send SIGHUP, or restart wal2cache");
    }
    let checked = check_rules(config, &rules, config.postgres.create).await?;
    log_warnings(&checked);
    let health = Health::new(
        &config.name,
        &config.postgres.slot,
        &config.rules.path.display().to_string(),
        config.metrics.ready_max_lag,
    );
    health.rules_loaded(rules.rules().len());
    crate::serve::start(&config.metrics, health.clone()).await?;
    tokio::pin!(shutdown);
    let (stop_monitor, monitor_stop) = tokio::sync::watch::channel(false);
    let monitor_stop_for_warm = monitor_stop.clone();
    let monitor = tokio::spawn(monitor::monitor(
        config.pg_target(),
        config.postgres.slot.clone(),
        health.clone(),
        config.metrics.slot_poll,
        monitor_stop,
    ));

    // The reloader lives as long as `run`: reloads reach whichever stream runs.
    let (in_force, in_force_rx) = tokio::sync::watch::channel(rules.clone());
    let reload_membership = Membership {
        lock: Arc::new(tokio::sync::Mutex::new(())),
        wake: Arc::new(tokio::sync::Notify::new()),
        in_force: in_force.subscribe(),
    };
    let membership_watch = reload_membership.clone();
    let (stop_reloads, mut reload_stop) = tokio::sync::watch::channel(false);
    let (rules_tx, mut rules_rx) = mpsc::unbounded_channel();
    let reload_config = config.clone();
    let reload_health = health.clone();
    let reloader = tokio::spawn(async move {
        loop {
            tokio::select! {
                signal = reload_signals.recv() => if signal.is_none() { return },
                _ = reload_stop.wait_for(|s| *s) => return,
            }
            // A reload in progress when the pipeline stops is cut short: its marker
            // is never read, so its rules never take effect.
            let reloaded = tokio::select! {
                r = reload(&reload_config, &rules_tx, &reload_membership) => r,
                _ = reload_stop.wait_for(|s| *s) => return,
            };
            match reloaded {
                Ok(count) => reload_health.reloaded(Ok(count)),
                Err(e) => {
                    metrics::counter!("wal2cache_reload_failures_total").increment(1);
                    tracing::error!("rules not reloaded, the previous rules stay in force: {e}");
                    reload_health.reloaded(Err(e.to_string()));
                }
            }
            crate::health::systemd::notify(&[crate::health::systemd::NotifyState::Ready]);
        }
    });
    // `rules.backfill = "new"`: warms the rules in force that were never backfilled.
    // The rules' tables stay in the publication whatever migrations do to them.
    let (looked, mut publication_looked) = tokio::sync::watch::channel(false);
    let membership = {
        let in_force = membership_watch.in_force;
        let active = health.clone();
        tokio::spawn(
            MembershipWatch {
                target: config.pg_target(),
                publication: config.postgres.publication.clone(),
                create: config.postgres.create,
                poll: config.metrics.slot_poll,
                lock: membership_watch.lock,
                wake: membership_watch.wake,
            }
            .run(
                move || in_force.borrow().table_names(),
                move || active.role() != crate::health::Role::Standby,
                looked,
                monitor_stop_for_warm.clone(),
            ),
        )
    };
    let warmer = (config.rules.backfill == RulesBackfill::New).then(|| {
        tokio::spawn(crate::backfill::warm::warm(
            config.clone(),
            in_force_rx,
            health.clone(),
            monitor_stop_for_warm.clone(),
        ))
    });
    let result = loop {
        match stream(
            config,
            rules.clone(),
            shutdown.as_mut(),
            &mut rules_rx,
            &health,
            &in_force,
            &mut publication_looked,
        )
        .await
        {
            Err(Error::Source(SourceError::SlotLost(loss))) => {
                tracing::error!(reason = loss.reason.label(), "changes may have been missed (found on reconnecting): {loss}; starting the stream again from its checks");
                // The rules as the file holds them now (a reload may have changed them).
                match load_rules(config) {
                    Ok(r) => rules = r,
                    Err(e) => tracing::warn!(
                        "the rules file no longer loads, keeping the rules in force: {e}"
                    ),
                }
            }
            other => break other,
        }
    };
    let _ = stop_reloads.send(true);
    let _ = reloader.await;
    let _ = stop_monitor.send(true);
    let _ = monitor.await;
    let _ = membership.await;
    if let Some(mut warmer) = warmer {
        // A backfill stops between pages; one stuck on an unreachable Redis is cut.
        if tokio::time::timeout(std::time::Duration::from_secs(5), &mut warmer)
            .await
            .is_err()
        {
            warmer.abort();
        }
    }
    result
}

/// One life of the stream: compares the stream record in Redis with the server and
/// the slot (see `source::identity`); on a loss flushes the caches (or stops, under
/// `postgres.on_slot_loss = "fail"`) after the slot is created again; writes the
/// record; then runs the pipeline until `shutdown`, a fatal error, or a loss found on a
/// reconnect (`SourceError::SlotLost`).
async fn stream(
    config: &Config,
    rules: Arc<RuleSet>,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    rules_rx: &mut mpsc::UnboundedReceiver<Reload>,
    health: &Arc<Health>,
    in_force: &tokio::sync::watch::Sender<Arc<RuleSet>>,
    publication_looked: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), Error> {
    let (redis_config, kafka_config) = config.sinks()?;
    let target = config.pg_target();
    let slot_name = &config.postgres.slot;
    let mut state = StreamState::connect(redis_config, &config.name).await?;
    let remembered = state.read().await?;
    let (server, loss) = {
        let client = target.connect().await?;
        let (server, slot_now) = identity::observe(&client, &target, slot_name).await?;
        let loss = identity::detect(remembered.as_ref(), &server, slot_name, slot_now.as_ref());
        if let Some(loss) = &loss {
            metrics::counter!("wal2cache_slot_losses_total", "reason" => loss.reason.label())
                .increment(1);
            if config.postgres.on_slot_loss == OnSlotLoss::Fail {
                return Err(Error::SlotLost {
                    loss: loss.clone(),
                    record: state_key(&config.name),
                });
            }
            tracing::error!(reason = loss.reason.label(), "changes may have been missed: {loss}; the slot is created again (when missing) and the caches are flushed before streaming (postgres.on_slot_loss = \"flush\")");
            if loss.reason == LossReason::WalLost && config.postgres.create {
                // A slot that lost WAL cannot stream again.
                slot::drop_slot(&client, slot_name).await?;
                tracing::warn!(slot = %slot_name, "dropped the slot that had lost WAL, to create it again");
            }
        }
        (server, loss)
    };
    // Tables missing from an existing publication are added by the membership watch,
    // with the invalidation their unstreamed changes call for.
    let mut plan = setup_plan(config, &rules, true);
    plan.extend = false;
    let report = slot::ensure(&target, &plan).await?;
    // So that a table missing at start is published before the stream starts (what
    // it missed is invalidated either way).
    if tokio::time::timeout(
        std::time::Duration::from_secs(10),
        publication_looked.wait_for(|l| *l),
    )
    .await
    .is_err()
    {
        tracing::warn!(publication = %config.postgres.publication, "the rules' tables were not compared with the publication within 10 s: streaming meanwhile; a table missing from it is added (and what it missed invalidated) once the database answers");
    }
    let confirmed = report.confirmed_lsn.unwrap_or(Lsn::ZERO);
    // One stop signal for every task: the sinks' retries, Kafka's heartbeats and the
    // WAL heartbeats end when the pipeline stops, and are joined.
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (position, position_rx) = tokio::sync::watch::channel(Position {
        confirmed,
        ..Position::default()
    });
    let mut redis = RedisSink::connect(redis_config, stop_rx.clone()).await?;
    let mut kafka =
        KafkaSink::connect(kafka_config, &config.name, position_rx, stop_rx.clone()).await?;
    if let Some(loss) = &loss {
        tokio::select! {
            flushed = flush_after_loss(&mut redis, &mut kafka, &rules, loss, confirmed) => flushed?,
            _ = &mut shutdown => {
                tracing::warn!("stopped before the caches were flushed: the next start flushes them");
                let _ = stop.send(true);
                kafka.close().await;
                return Ok(());
            }
        }
        tracing::error!(reason = loss.reason.label(), slot = %slot_name, confirmed = %confirmed, "flushed the caches after the slot loss; streaming from the slot's position");
        // Cold again: `rules.backfill = "new"` warms every republish rule.
        state.forget_backfilled().await?;
    }
    let record = Remembered {
        slot: slot_name.clone(),
        server,
        confirmed,
    };
    // Written now only after a flush (so that the next start does not flush again)
    // or when there is none yet; otherwise before each confirmation (`Remembering`).
    // Not unconditionally: a standby that starts while another process streams would
    // write back an older position than the active one wrote, and a slot ahead of the
    // record reads as a loss at the next start.
    if loss.is_some() || remembered.is_none() {
        state.write(&record).await?;
    }
    let mut stream = StreamConfig::new(
        target,
        slot_name.clone(),
        config.postgres.publication.clone(),
    );
    stream.application_name = format!("wal2cache {}", config.name);
    stream.guard = Some(record.server.clone());
    stream.takeover = config.postgres.takeover;
    stream.health = Some(health.clone());
    let heartbeats = (!config.pipeline.idle_heartbeat.is_zero()).then(|| {
        tokio::spawn(wal_heartbeats(
            config.pg_target(),
            config.pipeline.idle_heartbeat,
            stop_rx.clone(),
        ))
    });
    let source = Remembering::new(Source::start(stream, confirmed), state, record);
    tracing::info!(slot = %slot_name, confirmed = %confirmed, rules = rules.rules().len(), "running");
    let pipeline = Pipeline {
        config: config.pipeline.clone(),
        events: source,
        redis,
        kafka,
        position,
        stop: stop.clone(),
        health: Some(health.clone()),
        in_force: Some(in_force.clone()),
        visibility: Some(Visibility::new(config.pg_target(), stop_rx.clone())),
    };
    let result = pipeline::run(pipeline, rules, shutdown, rules_rx).await;
    // The pipeline has set the stop signal; every task ends on it.
    let _ = stop.send(true);
    if let Some(h) = heartbeats {
        let _ = h.await;
    }
    result
}

/// After a loss: every key under the rules' prefixes and every tag set of theirs
/// unlinked in Redis, then a `flush_all` with `reason = "slot_lost"` on every
/// partition, before anything from the new slot is confirmed.
async fn flush_after_loss(
    redis: &mut RedisSink,
    kafka: &mut KafkaSink,
    rules: &RuleSet,
    loss: &Loss,
    at: Lsn,
) -> Result<(), Error> {
    let (plan, unflushable) = rules::plan_slot_loss(rules);
    for rule in unflushable {
        tracing::warn!(rule = %rule, "the keys of rule {rule:?} start with a placeholder, so they cannot be found by prefix after a slot loss: only its tags were purged; give its keys a literal prefix");
    }
    let item = Item {
        origin: Origin {
            version: Version {
                commit_lsn: at,
                seq: 0,
            },
            xid: 0,
            commit_time: crate::pgtime::pg_now(),
            table: None,
            op: "slot_lost",
        },
        plan: Arc::new(plan),
    };
    let batch = Batch {
        items: vec![item],
        ..Batch::default()
    };
    redis.apply(&batch).await?;
    kafka
        .announce_flush_all("slot_lost", &loss.to_string(), at)
        .await?;
    Ok(())
}
