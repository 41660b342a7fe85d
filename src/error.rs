//! The daemon's top-level error, and the exit code each kind of failure maps to.

use crate::config::ConfigError;
use crate::rules::check::CheckError;
use crate::rules::RulesError;
use crate::sink::SinkError;
use crate::source::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Rules(#[from] RulesError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("applying changes to {sink}: {error} (nothing after LSN {confirmed} was confirmed: it is applied again at the next start)")]
    Applying {
        sink: String,
        #[source]
        error: Box<SinkError>,
        confirmed: crate::lsn::Lsn,
    },
    #[error(transparent)]
    Invalidate(#[from] crate::app::InvalidateError),
    #[error(transparent)]
    Backfill(#[from] crate::backfill::BackfillError),
    #[error("the shutdown deadline ({0:?}) passed before what was in flight was applied; it was not confirmed and will be applied again at the next start")]
    ShutdownTimeout(std::time::Duration),
    #[error("changes may have been missed since wal2cache last confirmed a position ({loss}). postgres.on_slot_loss = \"fail\", so nothing was changed: to flush the caches (the rules' key prefixes and tag sets in Redis, and every subscriber) and stream from the slot as it is, run once with postgres.on_slot_loss = \"flush\"; or flush them yourself and delete the stream record {record} in Redis")]
    SlotLost {
        loss: crate::source::identity::Loss,
        /// The Redis key of the stream record.
        record: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Exit codes, as documented in the README.
pub mod exit {
    /// A fatal condition at run time (PostgreSQL refused, decode error, ...).
    pub const FATAL: i32 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: i32 = 2;
    /// The config or rules file is invalid, or the rules do not fit the database.
    pub const CONFIG: i32 = 3;
    /// Changes may have been missed and `postgres.on_slot_loss = "fail"`.
    pub const SLOT_LOST: i32 = 4;
    /// `wal2cache status`: nothing streams from the slot (or it does not exist);
    /// `wal2cache invalidate` without `--force`: nobody would apply it now.
    pub const NOT_STREAMING: i32 = 5;
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Rules(_) | Error::Check(_) => exit::CONFIG,
            Error::Source(SourceError::Url(_)) => exit::CONFIG,
            Error::SlotLost { .. } => exit::SLOT_LOST,
            Error::Invalidate(crate::app::InvalidateError::Nothing) => exit::USAGE,
            Error::Backfill(crate::backfill::BackfillError::NoKey { .. }) => exit::FATAL,
            Error::Backfill(_) => exit::USAGE,
            Error::Invalidate(crate::app::InvalidateError::NotStreaming { .. }) => {
                exit::NOT_STREAMING
            }
            Error::Source(_)
            | Error::Io { .. }
            | Error::Sink(_)
            | Error::Applying { .. }
            | Error::ShutdownTimeout(_) => exit::FATAL,
        }
    }
}
