//! A settled batch's values on one server (a backfill's pages once the stream has
//! confirmed past their snapshot, see [`crate::sink::Batch::settled`]) without Lua,
//! with the meaning of `lua/fill.lua`: each value is written unless a version as new
//! as its own is stored beside its key, and leaves no version of its own.
//!
//! Per chunk of keys, on a connection of its own: `WATCH` the version-writes counter
//! and `MGET` the version sidecars; then, in `MULTI`/`EXEC`, a `SET` of each value
//! whose sidecar is absent or older. Every call of the republish and tombstone scripts
//! on a server that writes a version increments the counter in the same script, so
//! `EXEC` runs only when no version was written since the `MGET`: what it writes is
//! what the fill script would write at that moment. When `EXEC` is refused (the
//! stream wrote a version meanwhile, or Redis was flushed), the chunk goes through the
//! fill script instead. A script call costs Redis about as much again as the commands
//! it runs for a key (Lua's argument and reply conversions), so this halves Redis's
//! instructions per backfilled key (19,300 with the fill script, 10,400 here,
//! 9,000 for a plain `SET … EX`; 50,000 keys under callgrind).
//!
//! The connection is its own, and never reconnected behind the sink's back: a `WATCH`
//! lives on one connection, and a `MULTI`/`EXEC` sent on a new one would run
//! unwatched. After any error it is dropped; the next chunk opens a new one and starts
//! over with its `WATCH`.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Pipeline, RedisError, Value};

use crate::keys::{sidecar_key_into, VERSION};
use crate::plan::Republish;
use crate::sink::Version;

use super::ops::{chunk_by_size, group_by, VALUE_BYTES_PER_CALL, VERSIONED_PER_CALL};
use super::scripts::{Scripts, VERSION_WRITES};

/// Keys per transaction, and about how many bytes of values at most. A transaction
/// runs alone, like a script call: 256 small values take Redis about half a
/// millisecond.
const KEYS_PER_TRANSACTION: usize = 256;
const BYTES_PER_TRANSACTION: usize = 1 << 20;

pub(super) struct WatchedFill {
    client: Client,
    conn: Option<MultiplexedConnection>,
    /// Transactions `EXEC` refused, whose keys went through the fill script.
    aborted: u64,
}

impl WatchedFill {
    pub(super) fn new(client: Client) -> WatchedFill {
        WatchedFill {
            client,
            conn: None,
            aborted: 0,
        }
    }

    /// Transactions refused so far because a version was written during them.
    pub(super) fn aborted(&self) -> u64 {
        self.aborted
    }

    /// Writes `items` (any versions and TTLs); how many the version guard refused.
    pub(super) async fn apply(
        &mut self,
        scripts: &Scripts,
        items: &[(&Republish, Version)],
    ) -> Result<u64, RedisError> {
        let result = self.try_apply(scripts, items).await;
        if result.is_err() {
            // Whatever the connection watched or queued is unknown now.
            self.conn = None;
        }
        result
    }

    async fn connection(&mut self) -> Result<&mut MultiplexedConnection, RedisError> {
        if self.conn.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(30)));
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// One round trip a chunk: each chunk's transaction goes with the next chunk's
    /// `WATCH` and `MGET`.
    async fn try_apply(
        &mut self,
        scripts: &Scripts,
        items: &[(&Republish, Version)],
    ) -> Result<u64, RedisError> {
        let chunks = chunk_by_size(items, KEYS_PER_TRANSACTION, BYTES_PER_TRANSACTION);
        let Some(first) = chunks.first() else {
            return Ok(0);
        };
        let conn = self.connection().await?;
        let mut pipe = redis::pipe();
        read(&mut pipe, first);
        let mut replies: Vec<Value> = pipe.query_async(&mut *conn).await?;
        let (mut refused, mut aborted) = (0, 0);
        for (i, chunk) in chunks.iter().enumerate() {
            let stored: Vec<Option<Vec<u8>>> =
                redis::from_redis_value(replies.pop().expect("the MGET's reply"))?;
            let mut pipe = redis::pipe();
            let skipped = write(&mut pipe, chunk, &stored);
            if let Some(next) = chunks.get(i + 1) {
                read(&mut pipe, next);
            }
            replies = pipe.query_async(&mut *conn).await?;
            if skipped < chunk.len() && replies.remove(0) == Value::Nil {
                // A version was written since the MGET: the fill script decides,
                // atomically. (The next chunk's WATCH stays: the script writes no
                // version.)
                refused += fill_scripted(&mut *conn, scripts, chunk).await?;
                aborted += 1;
            } else {
                refused += skipped as u64;
            }
        }
        self.aborted += aborted;
        Ok(refused)
    }
}

/// `WATCH` of the version-writes counter, then `MGET` of `chunk`'s version sidecars
/// (the one reply kept).
fn read(pipe: &mut Pipeline, chunk: &[(&Republish, Version)]) {
    pipe.cmd("WATCH").arg(VERSION_WRITES).ignore();
    let mut mget = redis::cmd("MGET");
    let mut sidecar = String::new();
    for (r, _) in chunk {
        sidecar_key_into(&r.key, VERSION, &mut sidecar);
        mget.arg(&sidecar);
    }
    pipe.add_command(mget);
}

/// The transaction of `chunk`'s values whose stored version (`stored`, as `read`
/// returned) is absent or older: `MULTI`, a `SET` each, `EXEC` (its reply kept: `nil`
/// when Redis refused it). `UNWATCH` instead when there is none. How many were left
/// out.
fn write(
    pipe: &mut Pipeline,
    chunk: &[(&Republish, Version)],
    stored: &[Option<Vec<u8>>],
) -> usize {
    let mut skipped = 0;
    let mut version = String::with_capacity(24);
    pipe.cmd("MULTI").ignore();
    for ((r, v), stored) in chunk.iter().zip(stored) {
        version.clear();
        v.encode_into(&mut version);
        if stored.as_deref().is_some_and(|s| s >= version.as_bytes()) {
            skipped += 1;
            continue;
        }
        let set = pipe.cmd("SET").arg(&r.key).arg(&*r.value);
        // As the scripts: a TTL under a second is none.
        match r.ttl.map_or(0, |t| t.as_secs()) {
            0 => set.ignore(),
            ttl => set.arg("EX").arg(ttl).ignore(),
        };
    }
    if skipped == chunk.len() {
        pipe.clear();
        pipe.cmd("UNWATCH").ignore();
    } else {
        pipe.cmd("EXEC");
    }
    skipped
}

/// `chunk` through the fill script (one version and TTL a call); how many it refused.
async fn fill_scripted(
    conn: &mut impl ConnectionLike,
    scripts: &Scripts,
    chunk: &[(&Republish, Version)],
) -> Result<u64, RedisError> {
    let mut refused = 0;
    for run in group_by(chunk.iter().copied(), |(r, v)| (*v, r.ttl)) {
        for call in chunk_by_size(&run, VERSIONED_PER_CALL, VALUE_BYTES_PER_CALL) {
            let n: i64 = scripts.fill_cmd(call).query_async(conn).await?;
            refused += n as u64;
        }
    }
    Ok(refused)
}
