//! The helpers of the integration tests, and of the benches: one module tree, included
//! by each test file with `mod support;` and by a bench with
//! `#[path = "../tests/support/mod.rs"] mod support;`.
//!
//! - `env`: the services' addresses (`WAL2CACHE_TEST_*`) and names no other test uses
//! - `wait`: `eventually`, never a bare sleep
//! - `net`: free ports, one HTTP request
//! - `scrape`: samples and histograms of a `/metrics` scrape
//! - `services`: `deploy/local/services.sh` (for the tests that stop a service)
//! - `rng`: a small deterministic generator
//! - `db`: a database per test, its slot, its positions (daemon)
//! - `stream`: reading a `Source` (daemon)
//! - `cluster`: a throwaway PostgreSQL cluster of its own (daemon)
//! - `rules`: rules from text, checked against a database (daemon)
//! - `config`: `ConfigBuilder`, the typed `wal2cache.toml` of a test (daemon)
//! - `store`: Redis, the shared server and private ones (daemon)
//! - `daemon`: the `wal2cache` binary as a process (daemon)
//! - `inproc`: `app::run` in this process, and its log lines (daemon)
//! - `oracle`: a writer that leaves a stale marker per write, and the check that none is left (daemon)
//! - `kafka`: topics, read back from the beginning; a private broker (daemon or l1)
//! - `l1`: a topic, events and heartbeats for `wal2cache::l1` (l1)
//!
//! Modules that need a feature of the crate are compiled with it only, so that the
//! `l1` tests build without `daemon`.
//!
//! Dead code: every test (or bench) compiles the whole tree and uses a part of it. The
//! public items carry `#[allow(dead_code)]` each (an `impl` block's for its methods),
//! not the module as a whole: a private helper of this tree that nothing uses is still
//! reported, and so is everything in the test files themselves.

pub mod env;
pub mod net;
pub mod proc;
pub mod rng;
pub mod scrape;
pub mod services;
pub mod wait;

#[cfg(feature = "daemon")]
pub mod cluster;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod db;
#[cfg(feature = "daemon")]
pub mod inproc;
#[cfg(any(feature = "daemon", feature = "l1"))]
pub mod kafka;
#[cfg(feature = "l1")]
pub mod l1;
#[cfg(feature = "daemon")]
pub mod oracle;
#[cfg(feature = "daemon")]
pub mod rules;
#[cfg(feature = "daemon")]
pub mod store;
#[cfg(feature = "daemon")]
pub mod stream;
#[cfg(feature = "daemon")]
pub mod tls;
