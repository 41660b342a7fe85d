//! The names of the keys wal2cache keeps beside a cached key, shared by the daemon's
//! Redis sink and the `l2` library (so both name them the same way).
//!
//! A sidecar lives in the same Redis Cluster slot as its key, so that one Lua script
//! can touch both: `{KEY}:w2c:SUFFIX`, or `KEY:w2c:SUFFIX` when the key has a hash tag
//! of its own; a key with a `}` but no hash tag gets a short tag of its own slot in
//! front (`{TAG}KEY:w2c:SUFFIX`). Two sidecars exist:
//! - `v`, the version (commit LSN and position) of a republished key or of its
//!   tombstone, written by the daemon;
//! - `l`, the lease of an application's load (`wal2cache::l2`): `TOKEN VERSION`,
//!   unlinked by the daemon whenever it deletes the key; a republish changes the
//!   version sidecar instead, which the lease recorded at its grant.

use redis::cluster_routing::Slot;

/// The suffix of the version sidecar.
pub const VERSION: &str = "v";
/// The suffix of the lease sidecar.
pub const LEASE: &str = "l";

/// The key holding a republished key's version, in the same cluster slot.
pub fn version_key(key: &str) -> String {
    sidecar_key(key, VERSION)
}

/// The key holding the lease of a load of `key`, in the same cluster slot.
pub fn lease_key(key: &str) -> String {
    sidecar_key(key, LEASE)
}

/// `key`'s sidecar named `suffix`, in the same cluster slot (see the module docs).
pub fn sidecar_key(key: &str, suffix: &str) -> String {
    let mut out = String::new();
    sidecar_key_into(key, suffix, &mut out);
    out
}

/// [`sidecar_key`] written into `out` (cleared first), for loops that name many
/// sidecars with one buffer.
pub fn sidecar_key_into(key: &str, suffix: &str, out: &mut String) {
    const SEP: &str = ":w2c:";
    out.clear();
    let (has_tag, has_close) = braces(key);
    out.reserve(key.len() + SEP.len() + suffix.len() + 6);
    if has_tag {
        out.push_str(key);
    } else if !key.is_empty() && !has_close {
        out.push('{');
        out.push_str(key);
        out.push('}');
    } else {
        // The whole key is hashed, and braces around it would end at its own `}` (or,
        // around nothing, make an empty tag, which does not count).
        out.push('{');
        out.push_str(&same_slot_tag(key));
        out.push('}');
        out.push_str(key);
    }
    out.push_str(SEP);
    out.push_str(suffix);
}

/// In one pass over `key`: has it a hash tag (a `{` followed, after at least one
/// byte, by a `}`: Redis Cluster hashes only what is between them), and has it a
/// `}` at all?
fn braces(key: &str) -> (bool, bool) {
    let (mut open, mut tag, mut close) = (None, None, false);
    for (i, &b) in key.as_bytes().iter().enumerate() {
        if b == b'}' {
            close = true;
            if let (Some(o), None) = (open, tag) {
                tag = Some(i > o + 1);
            }
        } else if b == b'{' && open.is_none() {
            open = Some(i);
        }
    }
    (tag == Some(true), close)
}

/// A SCAN MATCH pattern that finds the lease sidecars of every key starting with
/// `prefix` that are not themselves under `prefix` (those the prefix's own scan finds):
/// `{PREFIX*:w2c:l` and `{TAG}PREFIX*:w2c:l`, as `{*PREFIX*:w2c:l`.
pub fn lease_scan_pattern(prefix: &str) -> String {
    format!("{{*{}*:w2c:{LEASE}", escape_glob(prefix))
}

/// `s` with Redis glob characters escaped.
pub fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 1);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecars_share_the_slot_of_their_key() {
        assert_eq!(
            version_key("shop:product:v3:42"),
            "{shop:product:v3:42}:w2c:v"
        );
        assert_eq!(
            lease_key("shop:product:v3:42"),
            "{shop:product:v3:42}:w2c:l"
        );
        assert_eq!(version_key("user:{42}:profile"), "user:{42}:profile:w2c:v");
        assert_eq!(lease_key("user:{42}:profile"), "user:{42}:profile:w2c:l");
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
            for sidecar in [version_key(key), lease_key(key)] {
                assert_eq!(
                    Slot::for_key(&sidecar),
                    Slot::for_key(key),
                    "{key} -> {sidecar}"
                );
            }
        }
        // Deterministic: a replay must find the same sidecar.
        assert_eq!(version_key("odd}key"), odd);
        // The buffer form writes the same names over whatever the buffer held.
        let mut buf = String::from("left over from another key");
        for key in ["shop:product:v3:42", "user:{42}:profile", "odd}key", ""] {
            sidecar_key_into(key, LEASE, &mut buf);
            assert_eq!(buf, lease_key(key));
        }
    }

    proptest::proptest! {
        /// The one-pass scan answers as the string searches it replaced.
        #[test]
        fn braces_are_found_in_one_pass(key in "[{}a:é]{0,12}") {
            let tag = key
                .find('{')
                .and_then(|s| key[s + 1..].find('}'))
                .is_some_and(|len| len > 0);
            proptest::prop_assert_eq!(braces(&key), (tag, key.contains('}')));
        }
    }

    /// Redis's glob, for the patterns this module makes: `*`, `\x` and literals.
    fn glob(pattern: &[u8], s: &[u8]) -> bool {
        match pattern.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
            Some((b'\\', rest)) => {
                rest.first().is_some_and(|c| s.first() == Some(c)) && glob(&rest[1..], &s[1..])
            }
            Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
        }
    }

    #[test]
    fn the_lease_scan_finds_the_leases_its_prefix_scan_misses() {
        let pattern = lease_scan_pattern("shop:p*:");
        assert_eq!(pattern, "{*shop:p\\*:*:w2c:l");
        for key in ["shop:p*:1", "shop:p*:odd}key", "shop:p*:}"] {
            let lease = lease_key(key);
            assert!(glob(pattern.as_bytes(), lease.as_bytes()), "{lease}");
        }
        // A key with its own hash tag: its lease starts with the prefix.
        assert!(lease_key("shop:p*:{7}").starts_with("shop:p*:"));
        assert!(!glob(pattern.as_bytes(), lease_key("shop:q:1").as_bytes()));
    }
}
