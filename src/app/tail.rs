//! `wal2cache tail`: the plans of each change, as JSON lines, on a temporary slot.

use std::future::Future;
use std::io::Write;

use tokio::sync::mpsc;

use super::{check_rules, load_rules, reload_rules, setup_plan};
use crate::config::Config;
use crate::error::Error;
use crate::lsn::Lsn;
use crate::rules::Planner;
use crate::source::slot;
use crate::source::{Source, SourceEvent, StreamConfig};
use crate::tail::TailFormatter;

/// `wal2cache tail`: streams on a temporary slot of its own until `shutdown`, writing
/// one JSON line per change, with its plan, to `out`. A message on `reload` (SIGHUP)
/// loads the rules again; if they fail to compile or check, the old ones stay.
pub async fn tail(
    config: &Config,
    mut out: impl Write,
    shutdown: impl Future<Output = ()>,
    mut reload: mpsc::UnboundedReceiver<()>,
) -> Result<(), Error> {
    let rules = load_rules(config)?;
    if let Err(e) = check_rules(config, &rules, config.postgres.create).await {
        match e {
            Error::Check(problems) => tracing::warn!("{problems}"),
            other => return Err(other),
        }
    }
    let target = config.pg_target();
    slot::ensure(&target, &setup_plan(config, &rules, false)).await?;
    let mut stream = StreamConfig::new(
        target,
        format!("wal2cache_tail_{}", std::process::id()),
        config.postgres.publication.clone(),
    );
    stream.temporary_slot = true;
    stream.application_name = "wal2cache tail".into();
    let mut source = Source::start(stream, Lsn::ZERO);
    let mut formatter = TailFormatter::new(Planner::new(rules));
    tokio::pin!(shutdown);
    let io_err = |source| Error::Io {
        context: "writing to standard output".into(),
        source,
    };
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = reload.recv() => {
                match reload_rules(config).await {
                    Ok((rules, report)) => {
                        if !report.publish.is_empty() {
                            tracing::warn!(tables = ?report.to_publish(), "tail does not add tables to the publication on a reload: their changes are not shown until `wal2cache setup` (or `run`) adds them");
                        }
                        tracing::info!(rules = rules.rules().len(), "rules reloaded");
                        formatter.set_planner(Planner::new(rules));
                    }
                    Err(e) => tracing::error!("rules not reloaded, the previous rules stay in force: {e}"),
                }
                continue;
            }
            event = source.next() => event,
        };
        let event = match event {
            None => break,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(event)) => event,
        };
        let mut written = Ok(());
        if let Some(line) = formatter.line(&event) {
            written = writeln!(out, "{line}");
        }
        let commit = match &event {
            SourceEvent::Commit(commit) => {
                written = written.and_then(|()| out.flush());
                Some(commit.end_lsn)
            }
            _ => None,
        };
        match written {
            Ok(()) => {
                if let Some(lsn) = commit {
                    source.confirm(lsn);
                }
            }
            // The reader went away (`tail | head`): a normal end, not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                source.stop().await;
                return Ok(());
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(io_err(e)),
        _ => {}
    }
    source.stop().await;
    Ok(())
}
