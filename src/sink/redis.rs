//! The Redis sink: one pipeline per batch. Deletes are `UNLINK`; a republish is a Lua
//! script that writes the value only when its version is newer than the one stored
//! beside the key; a tag purge unlinks every member of the tag's set and the set, in
//! one script; a table-wide flush is `SCAN` + `UNLINK` on the key prefixes.
//!
//! Where the version lives: in a sidecar string key, `{KEY}:w2c:v` (or `KEY:w2c:v`
//! when the key has a hash tag of its own), holding 24 hex digits: the commit LSN, then
//! the change's position in its transaction. Either way both keys share a Redis Cluster
//! slot (a key with a `}` but no hash tag gets a short tag of its own slot in front).
//! Readers `GET KEY` and see plain JSON; the sidecar lives at least a day (longer with a
//! longer TTL) so that a replay after a crash finds it. A republished key that is
//! deleted leaves its sidecar behind as a tombstone for the same reason.
//!
//! With `redis.cluster` the same operations go through the cluster client, one pipeline
//! per hash slot (the client refuses a pipeline whose keys span slots): UNLINK grouped
//! by slot, the two scripts routed by their key (the version key is in the same slot).
//! A tag purge cannot run as one script there (the members live in other slots): it is
//! SMEMBERS, UNLINK of the members grouped by slot, then SREM of exactly those members,
//! after the batch's other writes. A flush scans every master.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Script, Value};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::RedisConfig;
use crate::redact::redact;
use crate::sink::{describe, Batch, Item, RetryLog, SinkError};

/// Version sidecars live at least this long.
const VERSION_KEEP_SECS: u64 = 86_400;

const REPUBLISH: &str = r#"
-- KEYS[1] value key, KEYS[2] version key; ARGV[1] version, ARGV[2] value, ARGV[3] ttl (0: none), ARGV[4] version ttl
local stored = redis.call('GET', KEYS[2])
if stored and stored >= ARGV[1] then return 0 end
if ARGV[3] ~= '0' then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
if ARGV[4] ~= '0' then
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[4])
else
  redis.call('SET', KEYS[2], ARGV[1])
end
return 1
"#;

const TOMBSTONE: &str = r#"
-- KEYS[1] value key, KEYS[2] version key; ARGV[1] version, ARGV[2] version ttl
local stored = redis.call('GET', KEYS[2])
if stored and stored >= ARGV[1] then return 0 end
redis.call('UNLINK', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return 1
"#;

const PURGE: &str = r#"
-- KEYS[1] the tag's set: unlink every member, then the set
local members = redis.call('SMEMBERS', KEYS[1])
for i = 1, #members, 500 do
  redis.call('UNLINK', unpack(members, i, math.min(i + 499, #members)))
end
redis.call('UNLINK', KEYS[1])
return #members
"#;

/// Keys per UNLINK or SREM command when the count is unbounded (tag members, SCAN pages).
const CHUNK: usize = 500;

/// Pipelines in flight at once in cluster mode (one per hash slot).
const IN_FLIGHT: usize = 64;

/// The key holding a republished key's version, in the same cluster slot.
pub fn version_key(key: &str) -> String {
    let has_tag = key
        .find('{')
        .and_then(|s| key[s + 1..].find('}'))
        .is_some_and(|len| len > 0);
    if has_tag {
        format!("{key}:w2c:v")
    } else if !key.is_empty() && !key.contains('}') {
        format!("{{{key}}}:w2c:v")
    } else {
        // The whole key is hashed, and braces around it would end at its own `}` (or,
        // around nothing, make an empty tag, which does not count).
        format!("{{{}}}{key}:w2c:v", same_slot_tag(key))
    }
}

/// The first of `0`..`9`, `a`..`z`, `00`, `01`... (at most four characters, which
/// cover all 16384 slots) that hashes to `key`'s slot.
fn same_slot_tag(key: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let slot = Slot::for_key(key);
    let mut tag = Vec::with_capacity(4);
    for len in 1..=4u32 {
        for mut n in 0..ALPHABET.len().pow(len) {
            tag.clear();
            for _ in 0..len {
                tag.push(ALPHABET[n % ALPHABET.len()]);
                n /= ALPHABET.len();
            }
            if Slot::for_key(&tag) == slot {
                return String::from_utf8(tag).expect("ASCII");
            }
        }
    }
    unreachable!("36^4 tags cover every slot")
}

/// Keys grouped by cluster hash slot: groups in the order their slot first appears,
/// keys in their order within each group.
pub fn group_by_slot<K: AsRef<[u8]>>(keys: impl IntoIterator<Item = K>) -> Vec<Vec<K>> {
    let mut index: HashMap<Slot, usize> = HashMap::new();
    let mut groups: Vec<Vec<K>> = Vec::new();
    for key in keys {
        let i = *index.entry(Slot::for_key(&key)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[i].push(key);
    }
    groups
}

/// One pipeline per hash slot, each holding its slot's commands in the order added.
#[derive(Default)]
struct SlotPipes {
    pipes: HashMap<Slot, Pipeline>,
}

impl SlotPipes {
    /// The pipeline of `key`'s slot.
    fn pipe(&mut self, key: impl AsRef<[u8]>) -> &mut Pipeline {
        self.pipes.entry(Slot::for_key(key)).or_default()
    }

    fn into_pipelines(self) -> Vec<Pipeline> {
        self.pipes.into_values().collect()
    }
}

/// Runs single-slot pipelines at most `IN_FLIGHT` at a time; their replies in order.
async fn run_pipelines(
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

/// The connection: one server, or a cluster.
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// `prefix*` for SCAN MATCH, with glob characters escaped.
fn scan_pattern(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('*');
    out
}

pub struct RedisSink {
    conn: Conn,
    tag_prefix: String,
    republish: Script,
    tombstone: Script,
    purge: Script,
    backoff: Backoff,
    retries: RetryLog,
    stop: watch::Receiver<bool>,
    /// Shown in errors: the last LSN confirmed to Postgres.
    pub confirmed: String,
}

/// A command of a batch as the messages name it: what it does and the key it is for.
#[derive(Debug, Clone)]
struct Described {
    command: &'static str,
    key: String,
    /// For the scripts that read a version first: the version sidecar, which is the
    /// key a WRONGTYPE is about (SET never refuses a type; GET does).
    sidecar: Option<String>,
}

impl Described {
    fn new(command: &'static str, key: impl Into<String>) -> Described {
        Described {
            command,
            key: key.into(),
            sidecar: None,
        }
    }

    /// `(command, key)` for an error with `code`.
    fn naming(&self, code: Option<&str>) -> (String, String) {
        match (&self.sidecar, code) {
            (Some(sidecar), Some("WRONGTYPE")) => (
                format!(
                    "{} (its GET of the version sidecar of {:?})",
                    self.command,
                    cut(&self.key, KEY_SHOWN)
                ),
                sidecar.clone(),
            ),
            _ => (self.command.to_string(), self.key.clone()),
        }
    }
}

/// Characters of a key shown in a log line.
const KEY_SHOWN: usize = 100;

/// Characters of a server's error message shown in a log line.
const MESSAGE_SHOWN: usize = 300;

/// `s` cut to `max` characters, marked when cut.
pub fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((end, _)) => format!("{}… ({} bytes)", &s[..end], s.len()),
    }
}

/// A failed attempt: the error, and the commands of the pipeline it came from (when
/// it came from one pipeline), index for index.
struct Failure {
    error: RedisError,
    commands: Vec<Described>,
}

impl From<RedisError> for Failure {
    fn from(error: RedisError) -> Failure {
        Failure {
            error,
            commands: Vec::new(),
        }
    }
}

impl Failure {
    /// One line: the error code, how many commands failed, the first failing command
    /// and key (cut short), the first server message (cut short). Never the list of
    /// every command.
    fn summary(&self) -> String {
        let Some(errors) = self.error.clone().into_server_errors() else {
            return cut(&self.error.to_string(), MESSAGE_SHOWN);
        };
        let Some((index, first)) = errors.first() else {
            return cut(&self.error.to_string(), MESSAGE_SHOWN);
        };
        let of = if self.commands.is_empty() {
            String::new()
        } else {
            format!(" of {}", self.commands.len())
        };
        let what = match self.commands.get(*index) {
            Some(d) => {
                let (command, key) = d.naming(Some(first.code()));
                format!(", first {command} on {:?}", cut(&key, KEY_SHOWN))
            }
            None => String::new(),
        };
        format!(
            "{} on {} command(s){of}{what}: {}",
            first.code(),
            errors.len(),
            cut(&first.to_string(), MESSAGE_SHOWN)
        )
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The scripts are gone (Redis restarted): load them and retry at once, without
    /// waiting a backoff step.
    ReloadAndRetry,
    /// Wait the next backoff step, then retry.
    Backoff,
    /// Retrying cannot help: find the item and stop.
    Stop,
}

/// `reloaded`: the scripts were loaded right before this attempt. A NOSCRIPT just
/// after loading them (a node that lost them again) waits a backoff step instead of
/// spinning.
fn next_step(class: &Class, reloaded: bool) -> Next {
    match class {
        Class::Poison => Next::Stop,
        Class::NoScript if !reloaded => Next::ReloadAndRetry,
        Class::NoScript | Class::Retry => Next::Backoff,
    }
}

/// What to do about a Redis error.
enum Class {
    Retry,
    /// The scripts are gone (Redis restarted): load them again, then retry.
    NoScript,
    Poison,
}

fn classify(e: &RedisError) -> Class {
    if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() || e.is_connection_dropped() {
        return Class::Retry;
    }
    // A cluster node without a connection (down, or failing over): the client
    // reconnects from the seeds.
    if e.kind() == ErrorKind::ClusterConnectionNotFound {
        return Class::Retry;
    }
    // A pipeline's error carries the server's errors; its own `code()` is only set when
    // the first one is a kind the client knows (WRONGTYPE is not).
    if let Some(errors) = e.clone().into_server_errors() {
        let classes: Vec<Class> = errors
            .iter()
            .map(|(_, e)| classify_code(e.code()))
            .collect();
        return if classes.iter().any(|c| matches!(c, Class::NoScript)) {
            // Load the scripts first: a poison error shows again on the next attempt.
            Class::NoScript
        } else if classes.iter().any(|c| matches!(c, Class::Poison)) {
            Class::Poison
        } else {
            Class::Retry
        };
    }
    match e.code() {
        Some(code) => classify_code(code),
        None if e.is_unrecoverable_error() => Class::Poison,
        None => Class::Retry,
    }
}

fn classify_code(code: &str) -> Class {
    match code {
        "NOSCRIPT" => Class::NoScript,
        // MOVED and ASK are followed by the cluster client; they reach us only when
        // its retries ran out during a resharding.
        "LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY" | "OOM"
        | "MOVED" | "ASK" => Class::Retry,
        _ => Class::Poison,
    }
}

/// One server, through a connection manager that reconnects by itself.
async fn connect_single(config: &RedisConfig) -> Result<ConnectionManager, SinkError> {
    let client = Client::open(config.url.as_str()).map_err(|e| {
        SinkError::Redis(format!("invalid redis.url {:?}: {e}", redact(&config.url)))
    })?;
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
        SinkError::Redis(format!(
            "no answer from {} within 15 s: check redis.url and that Redis runs",
            redact(&config.url)
        ))
    })?
    .map_err(|e| {
        SinkError::Redis(format!(
            "cannot connect to {}: {e}; check redis.url and that Redis runs",
            redact(&config.url)
        ))
    })
}

/// A cluster, from `url` and `nodes` as seeds: the client reads the slot map from the
/// first that answers, follows MOVED/ASK and reconnects by itself.
async fn connect_cluster(config: &RedisConfig) -> Result<ClusterConnection, SinkError> {
    let seeds: Vec<&str> = std::iter::once(config.url.as_str())
        .chain(config.nodes.iter().map(String::as_str))
        .collect();
    let shown = seeds
        .iter()
        .map(|s| redact(s))
        .collect::<Vec<_>>()
        .join(", ");
    let client = ClusterClient::builder(seeds.iter().copied())
        .connection_timeout(Duration::from_secs(5))
        .response_timeout(Duration::from_secs(30))
        .retries(5)
        .min_retry_wait(50)
        .max_retry_wait(2_000)
        .build()
        .map_err(|e| SinkError::Redis(format!("invalid Redis Cluster seeds ({shown}): {e}")))?;
    tokio::time::timeout(Duration::from_secs(15), client.get_async_connection())
        .await
        .map_err(|_| {
            SinkError::Redis(format!(
                "no answer from the Redis Cluster ({shown}) within 15 s: check redis.url, redis.nodes and that the cluster runs"
            ))
        })?
        .map_err(|e| {
            SinkError::Redis(format!(
                "cannot connect to the Redis Cluster ({shown}): {e}; check redis.url, redis.nodes and that the cluster runs (redis.cluster = true needs a Redis Cluster)"
            ))
        })
}

/// `host:port` of every master, as the cluster client knows them. Refuses a partial
/// list (a master it has no connection to), so that a flush never skips one.
async fn cluster_masters(conn: &mut ClusterConnection) -> Result<Vec<(String, u16)>, RedisError> {
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
async fn unlink_cluster<K: AsRef<[u8]> + redis::ToRedisArgs>(
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

impl RedisSink {
    /// Connects (failing fast when Redis cannot be reached at start) and loads the
    /// scripts. Later outages are retried by `apply`.
    pub async fn connect(
        config: &RedisConfig,
        stop: watch::Receiver<bool>,
    ) -> Result<RedisSink, SinkError> {
        let conn = if config.cluster {
            Conn::Cluster(connect_cluster(config).await?)
        } else {
            Conn::Single(connect_single(config).await?)
        };
        let mut sink = RedisSink {
            conn,
            tag_prefix: config.tag_prefix.clone(),
            republish: Script::new(REPUBLISH),
            tombstone: Script::new(TOMBSTONE),
            purge: Script::new(PURGE),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            retries: RetryLog::new(
                "Redis",
                "reconnecting and retrying the batch with backoff",
                "check that Redis runs, is reachable at redis.url and accepts writes (memory, ACLs); nothing is confirmed meanwhile and Postgres keeps the WAL",
            ),
            stop,
            confirmed: "0/0".into(),
        };
        sink.load_scripts()
            .await
            .map_err(|e| SinkError::Redis(format!("cannot load the Lua scripts: {e}")))?;
        Ok(sink)
    }

    /// The backoff between failed attempts (capped exponential, jittered).
    pub fn set_backoff(&mut self, initial: Duration, max: Duration) {
        self.backoff = Backoff::new(initial, max);
    }

    /// How long the sink may fail before it says so at ERROR.
    pub fn set_error_after(&mut self, bound: Duration) {
        self.retries.error_after = bound;
    }

    /// Loads the scripts (on every node of a cluster: SCRIPT LOAD goes to all of them).
    async fn load_scripts(&mut self) -> Result<(), RedisError> {
        for script in [&self.republish, &self.tombstone, &self.purge] {
            script.load_async(&mut self.conn).await?;
        }
        Ok(())
    }

    /// The tombstone script for `key`: routed by `key`, its version key in the same slot.
    fn tombstone_cmd(&self, key: &str, version: &str) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.tombstone.get_hash())
            .arg(2)
            .arg(key)
            .arg(version_key(key))
            .arg(version)
            .arg(VERSION_KEEP_SECS);
        cmd
    }

    /// The republish script for `r.key`: routed by the key, like the tombstone.
    fn republish_cmd(&self, r: &crate::rules::Republish, version: &str) -> Cmd {
        let ttl = r.ttl.map_or(0, |t| t.as_secs());
        let keep = if ttl == 0 {
            0
        } else {
            ttl.max(VERSION_KEEP_SECS)
        };
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.republish.get_hash())
            .arg(2)
            .arg(&r.key)
            .arg(version_key(&r.key))
            .arg(version)
            .arg(&*r.value)
            .arg(ttl)
            .arg(keep);
        cmd
    }

    /// An item's commands on a single server, in order, each handed to `each` with a
    /// way to say what it is (only called for messages, so the hot path builds no
    /// descriptions). In `cluster` mode a tag purge is SMEMBERS of its set (the rest
    /// of a cluster purge runs after the batch's writes, see `purge_tags_cluster`).
    fn for_each_command(
        &self,
        item: &Item,
        cluster: bool,
        mut each: impl FnMut(Cmd, &dyn Fn() -> Described),
    ) {
        let plan = &item.plan;
        let version = item.origin.version.encode();
        let unlink: Vec<&String> = plan
            .delete
            .iter()
            .filter(|k| !plan.tombstones.contains(k))
            .collect();
        if !unlink.is_empty() {
            let mut cmd = redis::cmd("UNLINK");
            cmd.arg(&unlink);
            each(cmd, &|| {
                let keys = unlink
                    .iter()
                    .map(|k| cut(k, KEY_SHOWN))
                    .collect::<Vec<_>>()
                    .join(", ");
                Described::new("UNLINK", keys)
            });
        }
        for key in &plan.tombstones {
            each(self.tombstone_cmd(key, &version), &|| Described {
                command: "the tombstone script (EVALSHA)",
                key: key.clone(),
                sidecar: Some(version_key(key)),
            });
        }
        for r in &plan.republish {
            each(self.republish_cmd(r, &version), &|| Described {
                command: "the republish script (EVALSHA)",
                key: r.key.clone(),
                sidecar: Some(version_key(&r.key)),
            });
        }
        for tag in &plan.purge_tags {
            let set = format!("{}{tag}", self.tag_prefix);
            let mut cmd;
            let command = if cluster {
                cmd = redis::cmd("SMEMBERS");
                cmd.arg(&set);
                "a tag purge (SMEMBERS)"
            } else {
                cmd = redis::cmd("EVALSHA");
                cmd.arg(self.purge.get_hash()).arg(1).arg(&set);
                "a tag purge (the purge script: SMEMBERS, UNLINK)"
            };
            each(cmd, &|| Described::new(command, set.clone()));
        }
    }

    /// An item's commands, each with what it is (for error messages).
    fn item_commands(&self, item: &Item, cluster: bool) -> Vec<(Cmd, Described)> {
        let mut out = Vec::new();
        self.for_each_command(item, cluster, |cmd, describe| out.push((cmd, describe())));
        out
    }

    /// What each command of `items` is, in pipeline order.
    fn describe_commands(&self, items: &[Item]) -> Vec<Described> {
        let mut out = Vec::new();
        for item in items {
            self.for_each_command(item, false, |_, describe| out.push(describe()));
        }
        out
    }

    /// Adds an item's commands to `pipe`.
    fn add_item(&self, pipe: &mut Pipeline, item: &Item) {
        self.for_each_command(item, false, |cmd, _| {
            pipe.add_command(cmd).ignore();
        });
    }

    /// Every key under `prefix`, unlinked as SCAN finds them.
    async fn flush_prefix(&mut self, prefix: &str) -> Result<u64, RedisError> {
        let pattern = scan_pattern(prefix);
        let mut cursor: u64 = 0;
        let mut total = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.conn)
                .await?;
            if !keys.is_empty() {
                total += keys.len() as u64;
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(&mut self.conn)
                    .await?;
            }
            if next == 0 {
                return Ok(total);
            }
            cursor = next;
        }
    }

    /// Sends the pipeline of `items`; a failure carries what each of its commands is.
    async fn send(&mut self, pipe: &Pipeline, items: &[Item]) -> Result<(), Failure> {
        match pipe.query_async::<()>(&mut self.conn).await {
            Ok(()) => Ok(()),
            Err(error) => Err(Failure {
                error,
                commands: self.describe_commands(items),
            }),
        }
    }

    /// One attempt at the whole batch, in order; a flush ends the pipeline before it.
    async fn try_apply(&mut self, items: &[Item]) -> Result<(), Failure> {
        if let Conn::Cluster(conn) = &self.conn {
            let conn = conn.clone();
            return Ok(self.try_apply_cluster(&conn, items).await?);
        }
        // An empty pipeline is never sent: Redis answers it with an error (a plan can be
        // a flush alone).
        let mut pipe = redis::pipe();
        // The items whose commands are in `pipe`.
        let mut start = 0;
        for (i, item) in items.iter().enumerate() {
            if !item.plan.flush_prefixes.is_empty() {
                if !pipe.is_empty() {
                    self.send(&pipe, &items[start..i]).await?;
                    pipe = redis::pipe();
                }
                start = i;
                for prefix in &item.plan.flush_prefixes {
                    let n = self.flush_prefix(prefix).await?;
                    tracing::info!(prefix = %prefix, keys = n, "flushed key prefix");
                }
            }
            self.add_item(&mut pipe, item);
        }
        if !pipe.is_empty() {
            self.send(&pipe, &items[start..]).await?;
        }
        Ok(())
    }

    /// Cluster mode: the batch in segments that end before each flush, like the
    /// standalone pipeline.
    async fn try_apply_cluster(
        &mut self,
        conn: &ClusterConnection,
        items: &[Item],
    ) -> Result<(), RedisError> {
        let mut start = 0;
        for (i, item) in items.iter().enumerate() {
            if item.plan.flush_prefixes.is_empty() {
                continue;
            }
            self.apply_cluster_segment(conn, &items[start..i]).await?;
            for prefix in &item.plan.flush_prefixes {
                let n = self.flush_prefix_cluster(conn, prefix).await?;
                tracing::info!(prefix = %prefix, keys = n, "flushed key prefix on every master");
            }
            start = i;
        }
        self.apply_cluster_segment(conn, &items[start..]).await
    }

    /// Items without their flushes: every key command in its slot's pipeline (so each
    /// key sees its commands in batch order), the pipelines run concurrently; then the
    /// tag purges.
    async fn apply_cluster_segment(
        &self,
        conn: &ClusterConnection,
        items: &[Item],
    ) -> Result<(), RedisError> {
        let mut pipes = SlotPipes::default();
        let mut tags: Vec<String> = Vec::new();
        for item in items {
            let plan = &item.plan;
            let version = item.origin.version.encode();
            let unlink = plan.delete.iter().filter(|k| !plan.tombstones.contains(k));
            for group in group_by_slot(unlink) {
                pipes.pipe(group[0]).cmd("UNLINK").arg(group).ignore();
            }
            for key in &plan.tombstones {
                pipes
                    .pipe(key)
                    .add_command(self.tombstone_cmd(key, &version))
                    .ignore();
            }
            for r in &plan.republish {
                pipes
                    .pipe(&r.key)
                    .add_command(self.republish_cmd(r, &version))
                    .ignore();
            }
            for tag in &plan.purge_tags {
                let set = format!("{}{tag}", self.tag_prefix);
                if !tags.contains(&set) {
                    tags.push(set);
                }
            }
        }
        run_pipelines(conn, pipes.into_pipelines()).await?;
        if !tags.is_empty() {
            self.purge_tags_cluster(conn, &tags).await?;
        }
        Ok(())
    }

    /// A tag purge where the members may live in any slot: SMEMBERS of every set, UNLINK
    /// of the members (grouped by slot), then SREM of exactly the members read, so a
    /// member added meanwhile stays in its set for the next purge. Not atomic.
    async fn purge_tags_cluster(
        &self,
        conn: &ClusterConnection,
        sets: &[String],
    ) -> Result<(), RedisError> {
        let by_slot = group_by_slot(sets.iter().map(String::as_str));
        let mut reads = Vec::with_capacity(by_slot.len());
        for group in &by_slot {
            let mut pipe = redis::pipe();
            for set in group {
                pipe.cmd("SMEMBERS").arg(*set);
            }
            reads.push(pipe);
        }
        let replies = run_pipelines(conn, reads).await?;
        let mut members: Vec<(&str, Vec<Vec<u8>>)> = Vec::with_capacity(sets.len());
        for (group, replies) in by_slot.iter().zip(replies) {
            for (set, reply) in group.iter().zip(replies) {
                members.push((set, redis::from_redis_value(reply)?));
            }
        }
        let mut seen = HashSet::new();
        let unlink: Vec<&[u8]> = members
            .iter()
            .flat_map(|(_, m)| m.iter().map(Vec::as_slice))
            .filter(|m| seen.insert(*m))
            .collect();
        if unlink.is_empty() {
            return Ok(());
        }
        unlink_cluster(conn, unlink).await?;
        let mut srem = SlotPipes::default();
        for (set, members) in &members {
            for chunk in members.chunks(CHUNK) {
                srem.pipe(set).cmd("SREM").arg(*set).arg(chunk).ignore();
            }
        }
        run_pipelines(conn, srem.into_pipelines()).await?;
        Ok(())
    }

    /// Every key under `prefix` on every master, unlinked as SCAN finds them.
    async fn flush_prefix_cluster(
        &self,
        conn: &ClusterConnection,
        prefix: &str,
    ) -> Result<u64, RedisError> {
        let mut conn = conn.clone();
        let pattern = scan_pattern(prefix);
        let mut total = 0;
        for (host, port) in cluster_masters(&mut conn).await? {
            let node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::from_redis_value(
                    conn.route_command(scan, node.clone())
                        .await?
                        .extract_error()?,
                )?;
                if !keys.is_empty() {
                    total += keys.len() as u64;
                    unlink_cluster(&conn, keys).await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(total)
    }

    /// Finds which item a poison error came from, trying them one by one (everything
    /// here is idempotent), then which of its commands: on a single server the item's
    /// pipeline says which command failed by its index; in a cluster each command runs
    /// alone (routed by its key), in order.
    async fn locate_poison(&mut self, items: &[Item], first: Failure) -> SinkError {
        let cluster = matches!(self.conn, Conn::Cluster(_));
        for item in items {
            let commands = self.item_commands(item, cluster);
            let failed: Option<(Option<&Described>, RedisError)> = if cluster {
                let mut failed = None;
                for (cmd, d) in &commands {
                    if let Err(e) = cmd
                        .query_async::<Value>(&mut self.conn)
                        .await
                        .and_then(|v| v.extract_error())
                    {
                        failed = Some((Some(d), e));
                        break;
                    }
                }
                failed
            } else if commands.is_empty() {
                None
            } else {
                let mut pipe = redis::pipe();
                for (cmd, _) in &commands {
                    pipe.add_command(cmd.clone()).ignore();
                }
                match pipe.query_async::<()>(&mut self.conn).await {
                    Ok(()) => None,
                    Err(e) => {
                        let index = e
                            .clone()
                            .into_server_errors()
                            .and_then(|errors| errors.first().map(|(i, _)| *i));
                        Some((index.and_then(|i| commands.get(i)).map(|(_, d)| d), e))
                    }
                }
            };
            let Some((described, e)) = failed else {
                continue;
            };
            let server = e
                .clone()
                .into_server_errors()
                .and_then(|errors| errors.first().map(|(_, se)| se.clone()));
            let code = server.as_ref().map(|se| se.code().to_string());
            let (command, key) = match described {
                Some(d) => d.naming(code.as_deref()),
                None => ("a write".to_string(), "(unknown)".to_string()),
            };
            return SinkError::RedisPoison {
                command,
                key,
                origin: describe(item),
                message: match server {
                    Some(se) => cut(&se.to_string(), MESSAGE_SHOWN),
                    None => cut(&e.to_string(), MESSAGE_SHOWN),
                },
                confirmed: self.confirmed.clone(),
            };
        }
        SinkError::RedisPoison {
            command: "a command".into(),
            key: "(not found when retried one by one)".into(),
            origin: "the batch".into(),
            message: first.summary(),
            confirmed: self.confirmed.clone(),
        }
    }

    /// Applies a batch, retrying transient errors until it succeeds or the sink is
    /// stopped.
    pub async fn apply(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.items.is_empty() {
            return Ok(());
        }
        let mut reloaded = false;
        loop {
            let failure = match self.try_apply(&batch.items).await {
                Ok(()) => {
                    self.backoff.reset();
                    self.retries.succeeded();
                    return Ok(());
                }
                Err(e) => e,
            };
            match next_step(&classify(&failure.error), reloaded) {
                Next::Stop => return Err(self.locate_poison(&batch.items, failure).await),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_keys_share_the_slot_of_their_key() {
        assert_eq!(
            version_key("shop:product:v3:42"),
            "{shop:product:v3:42}:w2c:v"
        );
        assert_eq!(version_key("user:{42}:profile"), "user:{42}:profile:w2c:v");
        // `}` without a hash tag: the whole key is hashed, braces cannot wrap it.
        let odd = version_key("odd}key");
        assert!(odd.ends_with("}odd}key:w2c:v"), "{odd}");
        for key in [
            "shop:product:v3:42",
            "user:{42}:profile",
            "odd}key",
            "{}empty-tag",
            "a{}b}c",
            "open{only",
            "x}y{z}",
            "{",
            "}",
            "",
            "ünï}cødé",
        ] {
            assert_eq!(
                Slot::for_key(version_key(key)),
                Slot::for_key(key),
                "{key} -> {}",
                version_key(key)
            );
        }
        // Deterministic: a replay must find the same sidecar.
        assert_eq!(version_key("odd}key"), odd);
    }

    #[test]
    fn keys_group_by_slot_in_order() {
        // `foo` is slot 12182 and `bar` 5061; a hash tag decides for the key.
        let keys = ["foo", "bar", "{foo}:a", "x{bar}", "foo", "{}foo"];
        let groups = group_by_slot(keys);
        assert_eq!(
            groups,
            vec![
                vec!["foo", "{foo}:a", "foo"],
                vec!["bar", "x{bar}"],
                vec!["{}foo"]
            ]
        );
        assert_eq!(Slot::for_key("foo"), Slot::new(12182).unwrap());
        for group in &groups {
            assert!(group
                .iter()
                .all(|k| Slot::for_key(k) == Slot::for_key(group[0])));
        }
        let spread: Vec<String> = (0..1000).map(|i| format!("k:{i}")).collect();
        let groups = group_by_slot(spread.iter());
        assert!(groups.len() > 900, "{} groups", groups.len());
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 1000);
        assert!(group_by_slot(Vec::<&str>::new()).is_empty());
    }

    #[test]
    fn noscript_is_answered_at_once_then_with_backoff() {
        // Redis restarted and lost the scripts: load them and retry without waiting.
        assert_eq!(next_step(&Class::NoScript, false), Next::ReloadAndRetry);
        // Still NOSCRIPT right after loading them: wait a step rather than spin.
        assert_eq!(next_step(&Class::NoScript, true), Next::Backoff);
        assert_eq!(next_step(&Class::Retry, false), Next::Backoff);
        assert_eq!(next_step(&Class::Poison, false), Next::Stop);
        assert_eq!(next_step(&Class::Poison, true), Next::Stop);
    }

    #[test]
    fn long_keys_are_cut_in_log_lines() {
        let long = "k".repeat(600_000);
        let shown = cut(&long, 100);
        assert!(shown.len() < 130, "{shown}");
        assert!(shown.ends_with("… (600000 bytes)"), "{shown}");
        assert_eq!(cut("short", 100), "short");
        // Never inside a character.
        assert_eq!(cut("ééé", 2), "éé… (6 bytes)");
    }

    #[test]
    fn scan_patterns_escape_globs() {
        assert_eq!(scan_pattern("shop:p[1]*:"), "shop:p\\[1\\]\\*:*");
    }
}
