//! The Lua scripts and the keys they use.
//!
//! Where the version lives: in a sidecar string key, `{KEY}:w2c:v` (or `KEY:w2c:v`
//! when the key has a hash tag of its own), holding 24 hex digits: the commit LSN, then
//! the change's position in its transaction. Either way both keys share a Redis Cluster
//! slot (a key with a `}` but no hash tag gets a short tag of its own slot in front).
//! Readers `GET KEY` and see plain JSON; the sidecar lives at least a day (longer with a
//! longer TTL) so that a replay after a crash finds it. A republished key that is
//! deleted leaves its sidecar behind as a tombstone for the same reason.

use redis::cluster_routing::Slot;
use redis::{Cmd, Script};

use crate::plan::Republish;

/// How long a version sidecar, and so a delete's tombstone, lives at least (a day).
pub const TOMBSTONE_LIFETIME_SECS: u64 = 86_400;
const VERSION_KEEP_SECS: u64 = TOMBSTONE_LIFETIME_SECS;

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
-- KEYS: tag sets. For each: unlink every member, then the set.
local total = 0
for k = 1, #KEYS do
  local members = redis.call('SMEMBERS', KEYS[k])
  for i = 1, #members, 500 do
    redis.call('UNLINK', unpack(members, i, math.min(i + 499, #members)))
  end
  total = total + #members
end
redis.call('UNLINK', unpack(KEYS))
return total
"#;

/// Tag sets per call of the purge script.
pub(super) const SETS_PER_PURGE: usize = 256;

/// The scripts, loaded on every node.
pub(super) struct Scripts {
    pub(super) republish: Script,
    pub(super) tombstone: Script,
    pub(super) purge: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            republish: Script::new(REPUBLISH),
            tombstone: Script::new(TOMBSTONE),
            purge: Script::new(PURGE),
        }
    }

    pub(super) fn all(&self) -> [&Script; 3] {
        [&self.republish, &self.tombstone, &self.purge]
    }

    /// The tombstone script for `key`: routed by `key`, its version key in the same slot.
    pub(super) fn tombstone_cmd(&self, key: &str, version: &str) -> Cmd {
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
    pub(super) fn republish_cmd(&self, r: &Republish, version: &str) -> Cmd {
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

/// `prefix*` for SCAN MATCH, with glob characters escaped.
pub(super) fn scan_pattern(prefix: &str) -> String {
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
    fn scan_patterns_escape_globs() {
        assert_eq!(scan_pattern("shop:p[1]*:"), "shop:p\\[1\\]\\*:*");
    }
}
