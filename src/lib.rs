//! wal2cache: cache invalidation from the PostgreSQL WAL.
//!
//! `source` reads the logical replication stream into typed, committed row changes;
//! `rules` maps them to cache keys and tags. The daemon's binary wires them together.

#[cfg(any(feature = "daemon", feature = "l2"))]
pub mod keys;
pub mod lsn;
#[cfg(feature = "daemon")]
pub mod pgtime;
#[cfg(feature = "daemon")]
pub mod plan;
#[cfg(any(feature = "daemon", feature = "l2"))]
pub mod redis_conn;

#[cfg(feature = "daemon")]
pub mod app;
#[cfg(feature = "daemon")]
pub mod pipeline;
#[cfg(feature = "daemon")]
pub mod sink;

#[cfg(feature = "daemon")]
pub mod backfill;
#[cfg(feature = "daemon")]
pub mod backoff;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod error;
pub mod event;
#[cfg(feature = "daemon")]
pub mod health;
#[cfg(feature = "l1")]
pub mod l1;
#[cfg(feature = "l2")]
pub mod l2;
#[cfg(any(feature = "daemon", feature = "l2"))]
pub mod redact;
#[cfg(feature = "daemon")]
pub mod remember;
#[cfg(feature = "daemon")]
pub mod rules;
pub mod secret;
#[cfg(feature = "daemon")]
pub mod serve;
#[cfg(feature = "daemon")]
pub mod source;
#[cfg(feature = "daemon")]
pub mod tail;

pub use lsn::Lsn;
