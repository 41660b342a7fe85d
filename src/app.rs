//! Wiring: what each command does with a loaded configuration.

use std::future::Future;
use std::io::Write;

use crate::config::Config;
use crate::error::Error;
use crate::lsn::Lsn;
use crate::rules::raw;
use crate::source::slot::{self, SetupPlan, SetupReport};
use crate::source::{Source, SourceEvent, StreamConfig};
use crate::tail::TailFormatter;

/// The publication must hold every table the rules name.
fn setup_plan(config: &Config, with_slot: bool) -> Result<SetupPlan, Error> {
    let rules = raw::load(&config.rules.path)?;
    Ok(SetupPlan {
        publication: config.postgres.publication.clone(),
        slot: config.postgres.slot.clone(),
        tables: raw::tables(&rules),
        create: config.postgres.create,
        with_slot,
    })
}

/// `wal2cache setup`: checks the server, creates the publication and the slot.
/// Unlike `run`, it creates them even when `postgres.create` is false: that is its job.
pub async fn setup(config: &Config) -> Result<SetupReport, Error> {
    let mut plan = setup_plan(config, true)?;
    plan.create = true;
    Ok(slot::ensure(&config.pg_target(), &plan).await?)
}

/// `wal2cache tail`: streams on a temporary slot of its own until `shutdown`,
/// writing one JSON line per change to `out`.
pub async fn tail(
    config: &Config,
    mut out: impl Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let target = config.pg_target();
    slot::ensure(&target, &setup_plan(config, false)?).await?;
    let mut stream = StreamConfig::new(
        target,
        format!("wal2cache_tail_{}", std::process::id()),
        config.postgres.publication.clone(),
    );
    stream.temporary_slot = true;
    stream.application_name = "wal2cache tail".into();
    let mut source = Source::start(stream, Lsn::ZERO);
    let mut formatter = TailFormatter::default();
    tokio::pin!(shutdown);
    let io_err = |source| Error::Io {
        context: "writing to standard output".into(),
        source,
    };
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => break,
            event = source.next() => event,
        };
        let event = match event {
            None => break,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(event)) => event,
        };
        if let Some(line) = formatter
            .line(&event)
            .map_err(crate::source::SourceError::from)?
        {
            writeln!(out, "{line}").map_err(io_err)?;
        }
        if let SourceEvent::Commit(commit) = event {
            out.flush().map_err(io_err)?;
            source.confirm(commit.end_lsn);
        }
    }
    out.flush().map_err(io_err)?;
    source.stop().await;
    Ok(())
}
