//! The Lua scripts and the keys they use.
//!
//! Where the version lives: in a sidecar string key, `{KEY}:w2c:v` (or `KEY:w2c:v`
//! when the key has a hash tag of its own), holding 24 hex digits: the commit LSN, then
//! the change's position in its transaction. Either way both keys share a Redis Cluster
//! slot (a key with a `}` but no hash tag gets a short tag of its own slot in front).
//! Readers `GET KEY` and see plain JSON; the sidecar lives at least a day (longer with a
//! longer TTL) so that a replay after a crash finds it. A republished key that is
//! deleted leaves its sidecar behind as a tombstone for the same reason. A delete
//! (plain or tombstone) also unlinks the key's lease sidecar (`wal2cache::l2`) in the
//! same command; a republish changes the version, which the lease recorded: either way
//! an application's load that began before the change cannot store.
//! The scripts are the files in `lua/`.

use redis::{Cmd, Script};

use crate::keys::{escape_glob, sidecar_key, sidecar_key_into, LEASE, VERSION};
use crate::plan::Republish;
use crate::sink::Version;

/// How long a version sidecar, and so a delete's tombstone, lives at least (a day).
pub const TOMBSTONE_LIFETIME_SECS: u64 = 86_400;
const VERSION_KEEP_SECS: u64 = TOMBSTONE_LIFETIME_SECS;

const REPUBLISH: &str = include_str!("lua/republish.lua");
const TOMBSTONE: &str = include_str!("lua/tombstone.lua");
const PURGE: &str = include_str!("lua/purge.lua");
const PURGE_BEGIN: &str = include_str!("lua/purge_begin.lua");
const FILL: &str = include_str!("lua/fill.lua");

/// The suffix of a tag set's purge sidecar (`lua/purge_begin.lua`).
const PURGING: &str = "p";

/// Tag sets per call of the purge script.
pub(super) const SETS_PER_PURGE: usize = 256;

/// The scripts, loaded on every node.
pub(super) struct Scripts {
    pub(super) republish: Script,
    pub(super) tombstone: Script,
    pub(super) purge: Script,
    pub(super) purge_begin: Script,
    pub(super) fill: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            republish: Script::new(REPUBLISH),
            tombstone: Script::new(TOMBSTONE),
            purge: Script::new(PURGE),
            purge_begin: Script::new(PURGE_BEGIN),
            fill: Script::new(FILL),
        }
    }

    pub(super) fn all(&self) -> [&Script; 5] {
        [
            &self.republish,
            &self.tombstone,
            &self.purge,
            &self.purge_begin,
            &self.fill,
        ]
    }

    /// The first step of a cluster tag purge (`lua/purge_begin.lua`): routed by the set.
    pub(super) fn purge_begin_cmd(&self, set: &str) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.purge_begin.get_hash())
            .arg(2)
            .arg(set)
            .arg(sidecar_key(set, PURGING));
        cmd
    }

    /// The tombstone script for `items` (keys with their versions), all on one node
    /// (one server, or one slot): each key's version key and lease share its slot.
    /// Its reply is how many of them Redis refused.
    pub(super) fn tombstone_cmd(&self, items: &[(&str, Version)]) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.tombstone.get_hash()).arg(items.len() * 3);
        let mut sidecar = String::new();
        for (key, _) in items {
            cmd.arg(*key);
            sidecar_key_into(key, VERSION, &mut sidecar);
            cmd.arg(&sidecar);
            sidecar_key_into(key, LEASE, &mut sidecar);
            cmd.arg(&sidecar);
        }
        let mut version = String::with_capacity(24);
        for (_, v) in items {
            version.clear();
            v.encode_into(&mut version);
            cmd.arg(&version).arg(VERSION_KEEP_SECS);
        }
        cmd
    }

    /// The republish script for `items` (values with their versions), all on one
    /// node, like the tombstone. Its reply is how many of them Redis refused.
    pub(super) fn republish_cmd(&self, items: &[(&Republish, Version)]) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.republish.get_hash()).arg(items.len() * 2);
        value_keys(&mut cmd, items);
        let mut version = String::with_capacity(24);
        for (r, v) in items {
            let ttl = r.ttl.map_or(0, |t| t.as_secs());
            let keep = if ttl == 0 {
                0
            } else {
                ttl.max(VERSION_KEEP_SECS)
            };
            version.clear();
            v.encode_into(&mut version);
            cmd.arg(&version).arg(&*r.value).arg(ttl).arg(keep);
        }
        cmd
    }

    /// The fill script for `items` (a settled batch's values, see
    /// [`crate::sink::Batch::settled`]), all on one node like the republish, and all
    /// of one version and TTL: each value is written unless a version as new is
    /// stored, and leaves no version. Its reply is how many of them Redis refused.
    pub(super) fn fill_cmd(&self, items: &[(&Republish, Version)]) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.fill.get_hash()).arg(items.len() * 2);
        value_keys(&mut cmd, items);
        if let Some((r, v)) = items.first() {
            debug_assert!(items.iter().all(|(o, w)| w == v && o.ttl == r.ttl));
            let mut version = String::with_capacity(24);
            v.encode_into(&mut version);
            cmd.arg(&version).arg(r.ttl.map_or(0, |t| t.as_secs()));
        }
        for (r, _) in items {
            cmd.arg(&*r.value);
        }
        cmd
    }

    /// Where `purge_begin_cmd` moves a tag set's members.
    pub(super) fn purging_key(&self, set: &str) -> String {
        sidecar_key(set, PURGING)
    }

    /// The purge script over tag sets that share a node (one server, or one slot).
    pub(super) fn purge_cmd<S: AsRef<str>>(&self, sets: &[S]) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.purge.get_hash()).arg(sets.len());
        for s in sets {
            cmd.arg(s.as_ref());
        }
        cmd
    }
}

/// The KEYS of the republish and fill scripts: each value key, then its version
/// sidecar.
fn value_keys(cmd: &mut Cmd, items: &[(&Republish, Version)]) {
    let mut sidecar = String::new();
    for (r, _) in items {
        sidecar_key_into(&r.key, VERSION, &mut sidecar);
        cmd.arg(&r.key).arg(&sidecar);
    }
}

/// `prefix*` for SCAN MATCH, with glob characters escaped.
pub(super) fn scan_pattern(prefix: &str) -> String {
    format!("{}*", escape_glob(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_patterns_escape_globs() {
        assert_eq!(scan_pattern("shop:p[1]*:"), "shop:p\\[1\\]\\*:*");
    }
}
