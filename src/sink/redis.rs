//! The Redis sink: one pipeline per batch. Deletes are `UNLINK`; a republish is a Lua
//! script that writes the value only when its version is newer than the one stored
//! beside the key; a tag purge unlinks every member of the tag's set and the set, in
//! one script; a table-wide flush is `SCAN` + `UNLINK` on the key prefixes.
//!
//! Where the version lives: in a sidecar string key, `{KEY}:w2c:v` (or `KEY:w2c:v`
//! when the key has a hash tag of its own, so both always share a Redis Cluster slot),
//! holding 24 hex digits: the commit LSN, then the change's position in its transaction.
//! Readers `GET KEY` and see plain JSON; the sidecar lives at least a day (longer with a
//! longer TTL) so that a replay after a crash finds it. A republished key that is
//! deleted leaves its sidecar behind as a tombstone for the same reason.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Pipeline, RedisError, Script};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::RedisConfig;
use crate::sink::{Batch, Item, SinkError};

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

/// The key holding a republished key's version, in the same cluster slot.
pub fn version_key(key: &str) -> String {
    let has_tag = key
        .find('{')
        .and_then(|s| key[s + 1..].find('}'))
        .is_some_and(|len| len > 0);
    if has_tag || key.contains('}') {
        format!("{key}:w2c:v")
    } else {
        format!("{{{key}}}:w2c:v")
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
    conn: ConnectionManager,
    tag_prefix: String,
    republish: Script,
    tombstone: Script,
    purge: Script,
    backoff: Backoff,
    stop: watch::Receiver<bool>,
    /// Shown in errors: the last LSN confirmed to Postgres.
    pub confirmed: String,
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
    match e.code() {
        Some("NOSCRIPT") => Class::NoScript,
        Some(
            "LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY" | "OOM",
        ) => Class::Retry,
        Some(_) => Class::Poison,
        None if e.is_unrecoverable_error() => Class::Poison,
        None => Class::Retry,
    }
}

impl RedisSink {
    /// Connects (failing fast when Redis cannot be reached at start) and loads the
    /// scripts. Later outages are retried by `apply`.
    pub async fn connect(
        config: &RedisConfig,
        stop: watch::Receiver<bool>,
    ) -> Result<RedisSink, SinkError> {
        let client = Client::open(config.url.as_str()).map_err(|e| {
            SinkError::Redis(format!("invalid redis.url {:?}: {e}", redact(&config.url)))
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = tokio::time::timeout(
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
        })?;
        let mut sink = RedisSink {
            conn,
            tag_prefix: config.tag_prefix.clone(),
            republish: Script::new(REPUBLISH),
            tombstone: Script::new(TOMBSTONE),
            purge: Script::new(PURGE),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            stop,
            confirmed: "0/0".into(),
        };
        sink.load_scripts()
            .await
            .map_err(|e| SinkError::Redis(format!("cannot load the Lua scripts: {e}")))?;
        Ok(sink)
    }

    async fn load_scripts(&mut self) -> Result<(), RedisError> {
        for script in [&self.republish, &self.tombstone, &self.purge] {
            script.load_async(&mut self.conn).await?;
        }
        Ok(())
    }

    fn add_item(&self, pipe: &mut Pipeline, item: &Item) {
        let plan = &item.plan;
        let version = item.origin.version.encode();
        let unlink: Vec<&String> = plan
            .delete
            .iter()
            .filter(|k| !plan.tombstones.contains(k))
            .collect();
        if !unlink.is_empty() {
            pipe.cmd("UNLINK").arg(unlink).ignore();
        }
        for key in &plan.tombstones {
            pipe.cmd("EVALSHA")
                .arg(self.tombstone.get_hash())
                .arg(2)
                .arg(key)
                .arg(version_key(key))
                .arg(&version)
                .arg(VERSION_KEEP_SECS)
                .ignore();
        }
        for r in &plan.republish {
            let ttl = r.ttl.map_or(0, |t| t.as_secs());
            let keep = if ttl == 0 {
                0
            } else {
                ttl.max(VERSION_KEEP_SECS)
            };
            pipe.cmd("EVALSHA")
                .arg(self.republish.get_hash())
                .arg(2)
                .arg(&r.key)
                .arg(version_key(&r.key))
                .arg(&version)
                .arg(&*r.value)
                .arg(ttl)
                .arg(keep)
                .ignore();
        }
        for tag in &plan.purge_tags {
            pipe.cmd("EVALSHA")
                .arg(self.purge.get_hash())
                .arg(1)
                .arg(format!("{}{tag}", self.tag_prefix))
                .ignore();
        }
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

    /// One attempt at the whole batch, in order; a flush ends the pipeline before it.
    async fn try_apply(&mut self, items: &[Item]) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        let mut queued = false;
        for item in items {
            if !item.plan.flush_prefixes.is_empty() {
                if queued {
                    pipe.query_async::<()>(&mut self.conn).await?;
                    pipe = redis::pipe();
                }
                for prefix in &item.plan.flush_prefixes {
                    let n = self.flush_prefix(prefix).await?;
                    tracing::info!(prefix = %prefix, keys = n, "flushed key prefix");
                }
            }
            self.add_item(&mut pipe, item);
            queued = true;
        }
        if queued {
            pipe.query_async::<()>(&mut self.conn).await?;
        }
        Ok(())
    }

    /// Finds which item a poison error came from, trying them one by one (everything
    /// here is idempotent).
    async fn locate_poison(&mut self, items: &[Item], first: RedisError) -> SinkError {
        for item in items {
            let mut pipe = redis::pipe();
            self.add_item(&mut pipe, item);
            if let Err(e) = pipe.query_async::<()>(&mut self.conn).await {
                let plan = &item.plan;
                let (command, key) = if e.code() == Some("WRONGTYPE") && !plan.purge_tags.is_empty()
                {
                    (
                        "a tag purge (SMEMBERS)",
                        format!("{}{}", self.tag_prefix, plan.purge_tags.join(", ")),
                    )
                } else {
                    (
                        "a write",
                        plan.delete
                            .iter()
                            .chain(plan.republish.iter().map(|r| &r.key))
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                    )
                };
                return SinkError::RedisPoison {
                    command,
                    key,
                    origin: describe(item),
                    message: e.to_string(),
                    confirmed: self.confirmed.clone(),
                };
            }
        }
        SinkError::RedisPoison {
            command: "a command",
            key: "(not found when retried one by one)".into(),
            origin: "the batch".into(),
            message: first.to_string(),
            confirmed: self.confirmed.clone(),
        }
    }

    /// Applies a batch, retrying transient errors until it succeeds or the sink is
    /// stopped.
    pub async fn apply(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.items.is_empty() {
            return Ok(());
        }
        loop {
            let error = match self.try_apply(&batch.items).await {
                Ok(()) => {
                    self.backoff.reset();
                    return Ok(());
                }
                Err(e) => e,
            };
            match classify(&error) {
                Class::Poison => return Err(self.locate_poison(&batch.items, error).await),
                Class::NoScript => {
                    tracing::info!("Redis lost the scripts (restarted?): loading them again");
                    if let Err(e) = self.load_scripts().await {
                        tracing::warn!(error = %e, "cannot load the scripts yet");
                    }
                }
                Class::Retry => {}
            }
            let delay = self.backoff.next_delay();
            metrics::counter!("wal2cache_sink_retries_total", "sink" => "redis").increment(1);
            tracing::warn!(error = %error, attempt = self.backoff.attempts(), retry_in = ?delay, "Redis failed; retrying the batch");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.wait_for(|s| *s) => return Err(SinkError::Stopped),
            }
        }
    }
}

/// `public.products update at 0/1A2B3C4 (xid 7781)`.
pub fn describe(item: &Item) -> String {
    let o = &item.origin;
    format!(
        "{} {} at LSN {} (xid {})",
        o.table.as_deref().unwrap_or("message"),
        o.op,
        o.version.commit_lsn,
        o.xid
    )
}

/// A URL without its password.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
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
        assert_eq!(version_key("odd}key"), "odd}key:w2c:v");
    }

    #[test]
    fn scan_patterns_escape_globs() {
        assert_eq!(scan_pattern("shop:p[1]*:"), "shop:p\\[1\\]\\*:*");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("redis://:pw@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(redact("redis://user:pw@host"), "redis://user:***@host");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }
}
