//! Redis Cluster: one pipeline per hash slot (the client refuses a pipeline whose
//! keys span slots), run concurrently; the same coalesced operations as on one server
//! (`ops`), routed by their key. A tag purge cannot be one script here (the members
//! live in other slots): it is SMEMBERS, UNLINK of the members grouped by slot, then
//! SREM of exactly those members, after the batch's other writes. A flush scans every
//! master.

// Keys and tags come from the rows: seeded hashing (foldhash), fast on short keys.
use foldhash::{HashMap, HashSet, HashSetExt};
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{ErrorKind, Pipeline, RedisError, Value};

use crate::config::RedisConfig;
use crate::redact::redact;
use crate::sink::redis::ops::{for_each_command, group_by_slot, Mode, Ops, CHUNK};
use crate::sink::redis::scripts::Scripts;
use crate::sink::{SinkError, SinkErrorKind};

/// Pipelines in flight at once (one per hash slot).
const IN_FLIGHT: usize = 64;

/// One pipeline per hash slot, each holding its slot's commands in the order added.
#[derive(Default)]
pub(super) struct SlotPipes {
    pipes: HashMap<Slot, Pipeline>,
}

impl SlotPipes {
    /// The pipeline of `key`'s slot.
    pub(super) fn pipe(&mut self, key: impl AsRef<[u8]>) -> &mut Pipeline {
        self.pipes.entry(Slot::for_key(key)).or_default()
    }

    pub(super) fn into_pipelines(self) -> Vec<Pipeline> {
        self.pipes.into_values().collect()
    }
}

/// Runs single-slot pipelines at most `IN_FLIGHT` at a time; their replies in order.
pub(super) async fn run_pipelines(
    conn: &ClusterConnection,
    pipes: Vec<Pipeline>,
) -> Result<Vec<Vec<Value>>, RedisError> {
    let mut replies = vec![Vec::new(); pipes.len()];
    let mut pending = pipes.into_iter().enumerate();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < IN_FLIGHT {
            let Some((i, pipe)) = pending.next() else {
                break;
            };
            let mut conn = conn.clone();
            running.spawn(async move { (i, pipe.query_async::<Vec<Value>>(&mut conn).await) });
        }
        match running.join_next().await {
            None => return Ok(replies),
            Some(Ok((i, Ok(reply)))) => replies[i] = reply,
            // Everything is idempotent: the caller retries the whole batch.
            Some(Ok((_, Err(e)))) => return Err(e),
            Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Some(Err(e)) => {
                return Err(RedisError::from((
                    ErrorKind::Client,
                    "a cluster pipeline task was cancelled",
                    e.to_string(),
                )))
            }
        }
    }
}

/// A cluster, from `url` and `nodes` as seeds: the client reads the slot map from the
/// first that answers, follows MOVED/ASK and reconnects by itself.
pub(super) async fn connect_cluster(config: &RedisConfig) -> Result<ClusterConnection, SinkError> {
    let seeds: Vec<&str> = std::iter::once(config.url.as_str())
        .chain(config.nodes.iter().map(String::as_str))
        .collect();
    let shown = seeds
        .iter()
        .map(|s| redact(s))
        .collect::<Vec<_>>()
        .join(", ");
    let client = super::access::cluster_builder(config, &seeds)?
        .connection_timeout(Duration::from_secs(5))
        .response_timeout(Duration::from_secs(30))
        .retries(5)
        .min_retry_wait(50)
        .max_retry_wait(2_000)
        .build()
        .map_err(|e| {
            let message = format!("invalid Redis Cluster seeds ({shown}): {e}");
            SinkError::redis(message, Some(e), SinkErrorKind::Stop)
        })?;
    tokio::time::timeout(Duration::from_secs(15), client.get_async_connection())
        .await
        .map_err(|_| {
            let message = format!(
                "no answer from the Redis Cluster ({shown}) within 15 s: check redis.url, redis.nodes and that the cluster runs"
            );
            SinkError::redis(message, None, SinkErrorKind::Retry)
        })?
        .map_err(|e| {
            let message = format!(
                "cannot connect to the Redis Cluster ({shown}): {e}; {}",
                super::access::hint(
                    &format!("{e:?}"),
                    "check redis.url, redis.nodes and that the cluster runs (redis.cluster = true needs a Redis Cluster)"
                )
            );
            SinkError::redis(message, Some(e), SinkErrorKind::Retry)
        })
}

/// `host:port` of every master, as the cluster client knows them. Refuses a partial
/// list (a master it has no connection to), so that a flush never skips one.
pub(super) async fn masters(
    conn: &mut ClusterConnection,
) -> Result<Vec<(String, u16)>, RedisError> {
    let reply = conn
        .route_command(
            redis::cmd("PING"),
            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
        )
        .await?;
    let Value::Map(replies) = reply else {
        return Err(RedisError::from((
            ErrorKind::Client,
            "unexpected reply to PING on every master",
            format!("{reply:?}"),
        )));
    };
    let mut masters = Vec::with_capacity(replies.len());
    for (address, reply) in replies {
        if let Value::ServerError(e) = reply {
            return Err(e.into());
        }
        let address: String = redis::from_redis_value(address)?;
        let parsed = address
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.to_string(), port.parse().ok()?)));
        match parsed {
            Some(master) => masters.push(master),
            None => {
                return Err(RedisError::from((
                    ErrorKind::Client,
                    "unexpected node address",
                    address,
                )))
            }
        }
    }
    let mut info = redis::cmd("CLUSTER");
    info.arg("INFO");
    let info: String = redis::from_redis_value(
        conn.route_command(info, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await?
            .extract_error()?,
    )?;
    let size = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("cluster_size:"))
        .and_then(|n| n.parse::<usize>().ok());
    if size != Some(masters.len()) {
        return Err(RedisError::from((
            ErrorKind::ClusterConnectionNotFound,
            "not connected to every master",
            format!(
                "{} connected, cluster_size {}",
                masters.len(),
                size.map_or("unknown".into(), |n| n.to_string())
            ),
        )));
    }
    Ok(masters)
}

/// UNLINKs keys of any slots: one command per slot and chunk, run concurrently.
pub(super) async fn unlink_cluster<K: AsRef<[u8]> + redis::ToRedisArgs>(
    conn: &ClusterConnection,
    keys: Vec<K>,
) -> Result<(), RedisError> {
    let mut pipes = SlotPipes::default();
    for group in group_by_slot(keys) {
        for chunk in group.chunks(CHUNK) {
            pipes.pipe(&chunk[0]).cmd("UNLINK").arg(chunk).ignore();
        }
    }
    run_pipelines(conn, pipes.into_pipelines()).await?;
    Ok(())
}

/// Coalesced operations without flushes: every key command in its slot's pipeline (so
/// each key sees its commands in order), the pipelines run concurrently; then the tag
/// purges.
pub(super) async fn apply_ops(
    conn: &ClusterConnection,
    scripts: &Scripts,
    tag_prefix: &str,
    ops: &Ops<'_>,
) -> Result<u64, RedisError> {
    let mut pipes = SlotPipes::default();
    for_each_command(
        ops,
        scripts,
        tag_prefix,
        Mode::Cluster,
        |cmd, key, versioned, _| {
            // Only the versioned writes' replies come back, to count refusals.
            let added = pipes.pipe(key).add_command(cmd);
            if !versioned {
                added.ignore();
            }
        },
    );
    let refused = run_pipelines(conn, pipes.into_pipelines())
        .await?
        .iter()
        .flatten()
        .map(|reply| match reply {
            // The count of keys the version guard refused.
            Value::Int(n) => *n as u64,
            _ => 0,
        })
        .sum();
    if !ops.tags.is_empty() {
        let sets: Vec<String> = ops
            .tags
            .iter()
            .map(|t| format!("{tag_prefix}{t}"))
            .collect();
        purge_tags_cluster(conn, scripts, &sets).await?;
    }
    Ok(refused)
}

/// A tag purge where the members may live in any slot: each set's members moved into
/// its purge sidecar and the set deleted, atomically (`lua/purge_begin.lua`); UNLINK
/// of the members (keys and their leases, grouped by slot); then UNLINK of the
/// sidecars. A key an application registers meanwhile goes into a new set and stays
/// there for the next purge; its lease was granted after this purge's commit.
/// Not atomic as a whole, but a replay after a crash finds the sidecars' members.
pub(super) async fn purge_tags_cluster(
    conn: &ClusterConnection,
    scripts: &Scripts,
    sets: &[String],
) -> Result<(), RedisError> {
    let by_slot = group_by_slot(sets.iter().map(String::as_str));
    let mut begins = Vec::with_capacity(by_slot.len());
    for group in &by_slot {
        let mut pipe = redis::pipe();
        for set in group {
            pipe.add_command(scripts.purge_begin_cmd(set));
        }
        begins.push(pipe);
    }
    let replies = run_pipelines(conn, begins).await?;
    let mut seen = HashSet::new();
    let mut unlink: Vec<Vec<u8>> = Vec::new();
    for reply in replies.into_iter().flatten() {
        let members: Vec<Vec<u8>> = redis::from_redis_value(reply)?;
        unlink.extend(members.into_iter().filter(|m| seen.insert(m.clone())));
    }
    if !unlink.is_empty() {
        unlink_cluster(conn, unlink).await?;
    }
    let sidecars: Vec<String> = sets.iter().map(|s| scripts.purging_key(s)).collect();
    unlink_cluster(conn, sidecars).await
}
