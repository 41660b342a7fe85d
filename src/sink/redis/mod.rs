//! The Redis sink: a batch's operations, coalesced (`ops`), in one pipeline. Deletes
//! are `UNLINK`; a republish is a Lua script that writes the value only when its
//! version is newer than the one stored beside the key (`scripts`); the batch's tag
//! purges are one script call that unlinks every member of each tag's set and the
//! set; a table-wide flush is `SCAN` + `UNLINK` on the key prefixes. With
//! `redis.cluster` the same operations go through the cluster client (`cluster`).
//! Transient errors are retried with backoff; a poison error is traced to its item
//! and key (`errors`).

mod access;
mod cluster;
mod errors;
mod ops;
mod scripts;
mod state;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Client, Cmd, Pipeline, RedisError, Value};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::RedisConfig;
use crate::redact::redact;
use crate::sink::{cut, describe, Batch, Item, RetryLog, Sink, SinkError, SinkErrorKind};

use errors::{classify, next_step, Described, Failure, Next, MESSAGE_SHOWN};
use ops::{for_each_command, Mode, Ops};
use scripts::{scan_pattern, Scripts};

pub use crate::keys::version_key;
pub(crate) use access::problems as access_problems;
pub use ops::group_by_slot;
pub use scripts::TOMBSTONE_LIFETIME_SECS;
pub use state::{backfilled_key, state_key, StreamState};

use crate::redis_conn::RedisConn as Conn;

/// One server, through a connection manager that reconnects by itself.
async fn connect_single(config: &RedisConfig) -> Result<ConnectionManager, SinkError> {
    let client: Client = access::client(config)?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    tokio::time::timeout(
        Duration::from_secs(15),
        ConnectionManager::new_with_config(client, manager_config),
    )
    .await
    .map_err(|_| {
        let message = format!(
            "no answer from {} within 15 s: check redis.url and that Redis runs",
            redact(&config.url)
        );
        SinkError::redis(message, None, SinkErrorKind::Retry)
    })?
    .map_err(|e| {
        let message = format!(
            "cannot connect to {}: {e}; {}",
            redact(&config.url),
            access::hint(&format!("{e:?}"), "check redis.url and that Redis runs")
        );
        SinkError::redis(message, Some(e), SinkErrorKind::Retry)
    })
}

/// A SCAN in progress: the servers still to scan (the last one first; `None`: the one
/// server) and the cursor on the current one.
struct Scan {
    pattern: String,
    sets_only: bool,
    nodes: Vec<Option<(String, u16)>>,
    cursor: u64,
}

pub struct RedisSink {
    conn: Conn,
    url: String,
    tag_prefix: String,
    /// `redis.wait_replicas` and `redis.wait_timeout`.
    wait: Option<(u32, Duration)>,
    scripts: Scripts,
    backoff: Backoff,
    retries: RetryLog,
    stop: watch::Receiver<bool>,
    /// Versioned writes the version guard refused so far (see [`RedisSink::refused`]).
    refused: u64,
}

impl RedisSink {
    /// Connects (failing fast when Redis cannot be reached at start) and loads the
    /// scripts. Later outages are retried by `apply`.
    pub async fn connect(
        config: &RedisConfig,
        stop: watch::Receiver<bool>,
    ) -> Result<RedisSink, SinkError> {
        if config.insecure_skip_verify {
            tracing::warn!(
                url = %redact(&config.url),
                "redis.insecure_skip_verify is on: the Redis server's certificate is not checked, so anyone on the path can read and change what wal2cache writes; use it only for a self-signed test setup"
            );
        }
        let conn = if config.cluster {
            Conn::Cluster(cluster::connect_cluster(config).await?)
        } else {
            Conn::Single(connect_single(config).await?)
        };
        let mut sink = RedisSink {
            conn,
            url: redact(&config.url),
            tag_prefix: config.tag_prefix.clone(),
            wait: (config.wait_replicas > 0).then_some((config.wait_replicas, config.wait_timeout)),
            scripts: Scripts::new(),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            retries: RetryLog::new(
                "Redis",
                "reconnecting and retrying the batch with backoff",
                "check that Redis runs, is reachable at redis.url and accepts writes (memory, ACLs); nothing is confirmed meanwhile and Postgres keeps the WAL",
            ),
            stop,
            refused: 0,
        };
        sink.load_scripts().await.map_err(|e| {
            let message = format!(
                "cannot load the Lua scripts: {e}; {}",
                access::hint(
                    &format!("{e:?}"),
                    "the ACL user needs the scripting commands (see the README)"
                )
            );
            SinkError::redis(message, Some(e), SinkErrorKind::Retry)
        })?;
        Ok(sink)
    }

    /// How many versioned writes (republish, tombstone) Redis refused so far because
    /// it held that version or a newer one: the stream got there first, or a replay.
    /// A batch applied again after a failed attempt counts its own earlier writes.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The backoff between failed attempts (capped exponential, jittered).
    pub fn set_backoff(&mut self, initial: Duration, max: Duration) {
        self.backoff = Backoff::new(initial, max);
    }

    /// Loads the scripts (on every node of a cluster: SCRIPT LOAD goes to all of them).
    async fn load_scripts(&mut self) -> Result<(), RedisError> {
        for script in self.scripts.all() {
            script.load_async(&mut self.conn).await?;
        }
        Ok(())
    }

    fn mode(&self) -> Mode {
        match self.conn {
            Conn::Single(_) => Mode::Single,
            Conn::Cluster(_) => Mode::Cluster,
        }
    }

    /// What each command of `ops` is, in pipeline order.
    fn describe_commands(&self, ops: &Ops<'_>) -> Vec<Described> {
        let mut out = Vec::new();
        for_each_command(
            ops,
            &self.scripts,
            &self.tag_prefix,
            self.mode(),
            |_, _, _, d| out.push(d()),
        );
        out
    }

    /// Starts a SCAN of the keys under `prefix` (only sets, with `sets_only`), on the
    /// one server or on every master of a cluster.
    async fn scan(&mut self, prefix: &str, sets_only: bool) -> Result<Scan, RedisError> {
        self.scan_matching(scan_pattern(prefix), sets_only).await
    }

    /// Starts a SCAN of the keys matching `pattern` (a Redis glob).
    async fn scan_matching(
        &mut self,
        pattern: String,
        sets_only: bool,
    ) -> Result<Scan, RedisError> {
        let nodes = match &self.conn {
            Conn::Cluster(conn) => cluster::masters(&mut conn.clone())
                .await?
                .into_iter()
                .map(Some)
                .collect(),
            Conn::Single(_) => vec![None],
        };
        Ok(Scan {
            pattern,
            sets_only,
            nodes,
            cursor: 0,
        })
    }

    /// The next page of `scan`, `None` once every server has been scanned.
    async fn scan_next(&mut self, scan: &mut Scan) -> Result<Option<Vec<Vec<u8>>>, RedisError> {
        let Some(node) = scan.nodes.last() else {
            return Ok(None);
        };
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(scan.cursor)
            .arg("MATCH")
            .arg(&scan.pattern)
            .arg("COUNT")
            .arg(1000);
        if scan.sets_only {
            cmd.arg("TYPE").arg("set");
        }
        let (next, keys): (u64, Vec<Vec<u8>>) = match (node, &self.conn) {
            (Some((host, port)), Conn::Cluster(conn)) => {
                let node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                redis::from_redis_value(
                    conn.clone()
                        .route_command(cmd, node)
                        .await?
                        .extract_error()?,
                )?
            }
            _ => cmd.query_async(&mut self.conn).await?,
        };
        if next == 0 {
            scan.nodes.pop();
            scan.cursor = 0;
        } else {
            scan.cursor = next;
        }
        Ok(Some(keys))
    }

    /// Every key under `prefix`, on one server or every master, unlinked as SCAN finds
    /// them; then the lease sidecars of keys under `prefix` that are not under it
    /// themselves (`{KEY}:w2c:l`), so that no load that began before the flush stores.
    async fn flush(&mut self, prefix: &str) -> Result<(), RedisError> {
        let total = self.unlink_matching(scan_pattern(prefix)).await?;
        let leases = self
            .unlink_matching(crate::keys::lease_scan_pattern(prefix))
            .await?;
        tracing::info!(prefix = %prefix, keys = total, leases, "flushed key prefix");
        Ok(())
    }

    /// Every key matching `pattern`, unlinked as SCAN finds them; how many.
    async fn unlink_matching(&mut self, pattern: String) -> Result<usize, RedisError> {
        let mut scan = self.scan_matching(pattern, false).await?;
        let mut total = 0;
        while let Some(keys) = self.scan_next(&mut scan).await? {
            if keys.is_empty() {
                continue;
            }
            total += keys.len();
            match &self.conn {
                Conn::Cluster(conn) => cluster::unlink_cluster(conn, keys).await?,
                Conn::Single(_) => {
                    redis::cmd("UNLINK")
                        .arg(&keys)
                        .query_async::<()>(&mut self.conn)
                        .await?
                }
            }
        }
        Ok(total)
    }

    /// Every tag set whose tag starts with `prefix` purged (its members and the set),
    /// as SCAN finds them.
    async fn purge_tag_prefix(&mut self, prefix: &str) -> Result<(), Failure> {
        let mut scan = self
            .scan(&format!("{}{prefix}", self.tag_prefix), true)
            .await?;
        let mut total = 0;
        while let Some(sets) = self.scan_next(&mut scan).await? {
            let tags: Vec<String> = sets
                .into_iter()
                .filter_map(|set| {
                    let set = String::from_utf8(set).ok()?;
                    set.strip_prefix(self.tag_prefix.as_str())
                        .map(str::to_string)
                })
                .collect();
            total += tags.len();
            let ops = Ops {
                tags: tags.iter().map(String::as_str).collect(),
                ..Ops::default()
            };
            self.apply_ops(&ops).await?;
        }
        tracing::info!(prefix = %format!("{}{prefix}", self.tag_prefix), sets = total, "purged tag sets");
        Ok(())
    }

    /// Applies coalesced operations on one server: one pipeline; a failure carries
    /// what each of its commands is. Returns how many versioned writes the version
    /// guard refused (Redis held that version or a newer one).
    async fn apply_ops(&mut self, ops: &Ops<'_>) -> Result<u64, Failure> {
        if let Conn::Cluster(conn) = &self.conn {
            return Ok(cluster::apply_ops(conn, &self.scripts, &self.tag_prefix, ops).await?);
        }
        // An empty pipeline is never sent: Redis answers it with an error.
        if ops.is_empty() {
            return Ok(0);
        }
        let mut pipe = Pipeline::with_capacity(
            ops.versioned.len() + ops.tags.len() / scripts::SETS_PER_PURGE + 3,
        );
        for_each_command(
            ops,
            &self.scripts,
            &self.tag_prefix,
            Mode::Single,
            |cmd, _, versioned, _| {
                // Only the versioned writes' replies come back, to count refusals.
                let added = pipe.add_command(cmd);
                if !versioned {
                    added.ignore();
                }
            },
        );
        match pipe.query_async::<Vec<i64>>(&mut self.conn).await {
            // Each reply is a count of refused keys.
            Ok(refused) => Ok(refused.iter().map(|n| *n as u64).sum()),
            Err(error) => Err(Failure {
                error,
                commands: self.describe_commands(ops),
            }),
        }
    }

    /// One attempt at the whole batch, in order: the items between flushes coalesced,
    /// each flush after what came before it.
    async fn try_apply(&mut self, items: &[Item], settled: bool) -> Result<u64, Failure> {
        let build = |items| Ops {
            settled,
            ..Ops::build(items)
        };
        let mut refused = 0;
        let mut start = 0;
        for (i, item) in items.iter().enumerate() {
            let plan = &item.plan;
            if plan.flush_prefixes.is_empty() && plan.purge_tag_prefixes.is_empty() {
                continue;
            }
            refused += self.apply_ops(&build(&items[start..i])).await?;
            for prefix in &plan.flush_prefixes {
                self.flush(prefix).await?;
            }
            for prefix in &plan.purge_tag_prefixes {
                self.purge_tag_prefix(prefix).await?;
            }
            start = i;
        }
        refused += self.apply_ops(&build(&items[start..])).await?;
        self.wait_for_replicas().await?;
        Ok(refused)
    }

    /// With `redis.wait_replicas`: `WAIT` on the server (on every master of a
    /// cluster, the fewest acknowledgements counting) until that many replicas have
    /// the batch's writes. Too few is a transient failure: the batch is applied again
    /// (a master that failed over may have lost it) and waited for again.
    async fn wait_for_replicas(&mut self) -> Result<(), Failure> {
        let Some((wanted, timeout)) = self.wait else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let acked: i64 = redis::cmd("WAIT")
            .arg(wanted)
            .arg(timeout.as_millis().max(1) as u64)
            .query_async(&mut self.conn)
            .await?;
        metrics::histogram!("wal2cache_redis_wait_seconds").record(started.elapsed().as_secs_f64());
        if acked >= i64::from(wanted) {
            return Ok(());
        }
        Err(Failure::from(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "WAIT {wanted}: only {acked} replica(s) acknowledged the batch's writes within {timeout:?} (redis.wait_replicas = {wanted}); check the replicas, or lower redis.wait_replicas"
            ),
        ))))
    }

    /// Finds which item a poison error came from, trying them one by one (everything
    /// here is idempotent), then which of its commands: each command runs alone, in
    /// order (routed by its key in a cluster).
    async fn locate_poison(&mut self, batch: &Batch, first: Failure) -> SinkError {
        let mode = self.mode();
        for item in &batch.items {
            let one = std::slice::from_ref(item);
            let ops = Ops {
                settled: batch.settled,
                ..Ops::build(one)
            };
            let mut commands: Vec<(Cmd, Described)> = Vec::new();
            for_each_command(
                &ops,
                &self.scripts,
                &self.tag_prefix,
                mode,
                |cmd, _, _, d| commands.push((cmd, d())),
            );
            if mode == Mode::Cluster {
                // The cluster purge is several steps; SMEMBERS is the one that can be
                // refused.
                for tag in &ops.tags {
                    let set = format!("{}{tag}", self.tag_prefix);
                    let mut cmd = redis::cmd("SMEMBERS");
                    cmd.arg(&set);
                    commands.push((cmd, Described::new("a tag purge (SMEMBERS)", set)));
                }
            }
            let mut failed = None;
            for (cmd, d) in &commands {
                if let Err(e) = cmd
                    .query_async::<Value>(&mut self.conn)
                    .await
                    .and_then(|v| v.extract_error())
                {
                    failed = Some((d, e));
                    break;
                }
            }
            let Some((described, e)) = failed else {
                continue;
            };
            let server = e
                .clone()
                .into_server_errors()
                .and_then(|errors| errors.first().map(|(_, se)| se.clone()));
            let code = server
                .as_ref()
                .map(|se| se.code().to_string())
                .or_else(|| e.code().map(str::to_string));
            let (command, key) = described.naming(code.as_deref());
            return SinkError::RedisPoison {
                command,
                key,
                origin: describe(item),
                message: match server {
                    Some(se) => cut(&se.to_string(), MESSAGE_SHOWN),
                    None => cut(&e.to_string(), MESSAGE_SHOWN),
                },
            };
        }
        SinkError::RedisPoison {
            command: "a command".into(),
            key: "(not found when retried one by one)".into(),
            origin: "the batch".into(),
            message: first.summary(),
        }
    }

    /// Applies a batch, retrying transient errors until it succeeds or the sink is
    /// stopped.
    async fn apply_batch(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.items.is_empty() {
            return Ok(());
        }
        let mut reloaded = false;
        loop {
            let failure = match self.try_apply(&batch.items, batch.settled).await {
                Ok(refused) => {
                    if refused > 0 {
                        self.refused += refused;
                        metrics::counter!("wal2cache_redis_refused_total").increment(refused);
                    }
                    self.backoff.reset();
                    self.retries.succeeded();
                    return Ok(());
                }
                Err(e) => e,
            };
            match next_step(&classify(&failure.error), reloaded) {
                Next::Stop => return Err(self.locate_poison(batch, failure).await),
                Next::ReloadAndRetry => {
                    reloaded = true;
                    match self.load_scripts().await {
                        Ok(()) => {
                            tracing::info!("Redis had lost the scripts (restarted?): loaded them again, retrying the batch at once");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %cut(&e.to_string(), MESSAGE_SHOWN), "Redis lost the scripts and they cannot be loaded yet")
                        }
                    }
                }
                Next::Backoff => {}
            }
            reloaded = false;
            let delay = self.backoff.next_delay();
            metrics::counter!("wal2cache_sink_retries_total", "sink" => "redis").increment(1);
            self.retries.failed(&failure.summary(), delay);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.wait_for(|s| *s) => return Err(SinkError::Stopped),
            }
        }
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn describe(&self) -> String {
        match self.conn {
            Conn::Single(_) => format!("Redis at {}", self.url),
            Conn::Cluster(_) => format!("the Redis Cluster at {}", self.url),
        }
    }

    async fn apply(&mut self, batch: &Batch) -> Result<(), SinkError> {
        self.apply_batch(batch).await
    }

    fn set_error_after(&mut self, bound: Duration) {
        self.retries.error_after = bound;
    }

    fn set_health(&mut self, health: crate::health::SinkHealth) {
        self.retries.health = Some(health);
    }

    async fn close(self) {}
}

#[cfg(test)]
mod tests;
