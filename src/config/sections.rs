//! The sections of the configuration file, as serde reads them, with their defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::redact::redact;

/// `wal2cache backfill`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BackfillConfig {
    /// A backfill expected to take longer is warned about before it starts (its
    /// snapshot holds back vacuum meanwhile); one still running after this long
    /// warns again. At most the tombstones' lifetime (a day), which bounds how long a
    /// backfill may run: see `max_run`.
    #[serde(with = "humantime_serde")]
    pub max_duration: std::time::Duration,
    /// The time one page's query should take: the page size adapts to it.
    #[serde(with = "humantime_serde")]
    pub page_time: std::time::Duration,
    /// `statement_timeout` of each query under the snapshot.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: std::time::Duration,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            max_duration: std::time::Duration::from_secs(3600),
            page_time: std::time::Duration::from_millis(500),
            statement_timeout: std::time::Duration::from_secs(60),
        }
    }
}

impl BackfillConfig {
    /// How long a backfill may run at most: a row deleted while it runs stays deleted
    /// only while the delete's tombstone lives (`TOMBSTONE_LIFETIME`), so a backfill
    /// stops (and says how to rerun it in parts) before that, whatever
    /// `max_duration` says.
    pub const MAX_RUN: std::time::Duration =
        std::time::Duration::from_secs(crate::sink::redis::TOMBSTONE_LIFETIME_SECS - 3600);
}

/// How the daemon batches and stops.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PipelineConfig {
    /// A batch closes at this many planned changes...
    pub batch_size: usize,
    /// ...or this long after it opened, whichever comes first. It also closes as soon as
    /// a transaction ends and nothing more is waiting.
    #[serde(with = "humantime_serde")]
    pub batch_deadline: std::time::Duration,
    /// SIGTERM/SIGINT: how long to drain what is in flight before giving up.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: std::time::Duration,
    /// How often to write a heartbeat message into the WAL, so that the slot's
    /// confirmed position advances (and Postgres can recycle WAL) even when the rules'
    /// tables do not change; `0s` turns it off.
    #[serde(with = "humantime_serde")]
    pub idle_heartbeat: std::time::Duration,
    /// A sink (Redis or Kafka) failing for longer than this is logged at ERROR, once
    /// per outage, with what was tried; it keeps retrying.
    #[serde(with = "humantime_serde")]
    pub sink_error_after: std::time::Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            batch_size: 1000,
            batch_deadline: std::time::Duration::from_millis(5),
            shutdown_timeout: std::time::Duration::from_secs(30),
            idle_heartbeat: std::time::Duration::from_secs(10),
            sink_error_after: crate::sink::retry::ERROR_AFTER,
        }
    }
}

/// The HTTP listener for operators: `/metrics`, `/healthz`, `/readyz`, `/status`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MetricsConfig {
    /// `host:port` to serve on; none by default.
    pub listen: Option<std::net::SocketAddr>,
    /// `/readyz` answers 503 when the lag is over this.
    #[serde(with = "humantime_serde")]
    pub ready_max_lag: std::time::Duration,
    /// How often the slot is read from the database (retained WAL, safe WAL size).
    #[serde(with = "humantime_serde")]
    pub slot_poll: std::time::Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            ready_max_lag: std::time::Duration::from_secs(30),
            slot_poll: std::time::Duration::from_secs(10),
        }
    }
}

/// How the daemon logs.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct LogConfig {
    /// `json` (one object per line) or `text`; by default json when standard error is
    /// not a terminal (a service manager, a container), text when it is.
    pub format: Option<LogFormat>,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Clone, Deserialize)]
pub struct PostgresConfig {
    pub url: String,
    #[serde(default = "default_name")]
    pub slot: String,
    #[serde(default = "default_name")]
    pub publication: String,
    /// Create the publication and the slot when missing.
    #[serde(default = "default_true")]
    pub create: bool,
    /// The password, when it is not in the URL: meant for the environment override
    /// `WAL2CACHE__POSTGRES__PASSWORD` rather than for the file.
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the password (a Kubernetes or Docker secret), read at start and
    /// again at every connection, so that a rotated secret is used from the next one;
    /// relative to the config file's directory.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Create the slot as a failover slot (PostgreSQL 17 and later), so that a standby
    /// with `sync_replication_slots = on` carries it across a promotion. Default: true
    /// on 17 and later, false before; `true` on an older server is refused.
    #[serde(default)]
    pub failover_slot: Option<bool>,
    /// What to do when changes may have been missed (the slot is gone, lost WAL, was
    /// recreated, or another server answers): flush the caches, or stop.
    #[serde(default)]
    pub on_slot_loss: OnSlotLoss,
    /// On standby (another process holds the slot), how often to check whether the
    /// slot is free: a takeover starts within this of the slot being released.
    #[serde(default = "default_takeover", with = "humantime_serde")]
    pub takeover: std::time::Duration,
}

fn default_takeover() -> std::time::Duration {
    std::time::Duration::from_secs(1)
}

/// `postgres.on_slot_loss`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSlotLoss {
    /// Recreate the slot (with `postgres.create`), flush Redis and every subscriber,
    /// then stream.
    #[default]
    Flush,
    /// Stop with exit code 4, touching nothing.
    Fail,
}

/// Without the secrets: the URL's password and `password` show as `***`.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact(&self.url))
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("create", &self.create)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("password_file", &self.password_file)
            .field("failover_slot", &self.failover_slot)
            .field("on_slot_loss", &self.on_slot_loss)
            .field("takeover", &self.takeover)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RulesConfig {
    /// One file, or a directory of `*.toml`; relative to the config file's directory.
    pub path: PathBuf,
    /// `new`: at start and after each reload, backfill in the background every
    /// republish rule not backfilled before (by name and shape); `off` (default).
    #[serde(default)]
    pub backfill: RulesBackfill,
    /// Rows a second such a backfill reads at most.
    #[serde(default = "default_backfill_rate")]
    pub backfill_rate: u32,
}

/// `rules.backfill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RulesBackfill {
    #[default]
    Off,
    New,
}

fn default_backfill_rate() -> u32 {
    10_000
}

#[derive(Clone, Deserialize)]
pub struct RedisConfig {
    /// The server; with `cluster`, a node of the cluster (the client finds the others).
    pub url: String,
    #[serde(default = "default_tag_prefix")]
    pub tag_prefix: String,
    /// A Redis Cluster rather than a single server.
    #[serde(default)]
    pub cluster: bool,
    /// With `cluster`: more nodes to try at start when `url` does not answer.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// After each batch, `WAIT` until this many replicas of every master that took it
    /// acknowledged its writes, before the batch counts as applied (0: off). A master
    /// that dies before replicating then loses nothing that was confirmed.
    #[serde(default)]
    pub wait_replicas: u32,
    /// How long one `WAIT` may take; a batch not replicated within it is applied and
    /// waited for again, with backoff.
    #[serde(default = "default_wait_timeout", with = "humantime_serde")]
    pub wait_timeout: std::time::Duration,
    /// `rediss://`: a PEM file of the CA(s) to trust instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) and its key, for servers that ask for one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Do not verify the server's certificate at all (self-signed test setups only;
    /// logged as a warning at start).
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// A file holding the password (of the URL's user, or of `default`), read at start.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl RedisConfig {
    /// The TLS and password fields unset, for building one in code:
    /// `RedisConfig { url, tag_prefix, cluster, nodes, ..RedisConfig::without_tls() }`.
    pub fn without_tls() -> RedisConfig {
        RedisConfig {
            url: String::new(),
            tag_prefix: default_tag_prefix(),
            cluster: false,
            nodes: Vec::new(),
            wait_replicas: 0,
            wait_timeout: default_wait_timeout(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            insecure_skip_verify: false,
            password_file: None,
        }
    }
}

/// Without the secrets: passwords in the URLs show as `***`.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("tag_prefix", &self.tag_prefix)
            .field("cluster", &self.cluster)
            .field(
                "nodes",
                &self.nodes.iter().map(|n| redact(n)).collect::<Vec<_>>(),
            )
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("password_file", &self.password_file)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
pub struct KafkaConfig {
    pub brokers: String,
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Partitions of the topic when wal2cache creates it.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of the topic when wal2cache creates it.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// The largest event (its JSON) published; a larger one is split, and one whose
    /// single key or tag cannot fit becomes a `flush_all`. Lowered to fit
    /// `message.max.bytes` when `properties` sets it.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Passed to librdkafka as they are.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// A file that holds the SASL password (librdkafka's `sasl.password`), read at
    /// start and whenever a producer is made; relative to the config file.
    #[serde(default)]
    pub sasl_password_file: Option<PathBuf>,
}

/// Without the secrets: `sasl.password` and the like show as `***`.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("max_event_bytes", &self.max_event_bytes)
            .field(
                "properties",
                &crate::secret::printable_properties(&self.properties),
            )
            .field("sasl_password_file", &self.sasl_password_file)
            .finish()
    }
}

fn default_wait_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(1)
}

fn default_name() -> String {
    "wal2cache".into()
}
fn default_true() -> bool {
    true
}
fn default_tag_prefix() -> String {
    "tag:".into()
}
fn default_partitions() -> i32 {
    3
}
fn default_replication() -> i32 {
    1
}
fn default_max_event_bytes() -> usize {
    900_000
}
fn default_topic() -> String {
    "wal2cache.invalidations".into()
}
