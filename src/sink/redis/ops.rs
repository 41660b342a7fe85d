//! A batch's Redis operations, coalesced, and the one builder of the commands that
//! carry them out (on one server and in a cluster alike).
//!
//! Coalescing keeps the state a reader sees once the batch is applied exactly as if
//! every item had been applied one by one, in order:
//! - Per key, of the versioned writes (republish, tombstone) only the one with the
//!   highest version is sent: each runs only when newer than the stored version, so
//!   applied one by one the highest is the one that stays, with its version.
//! - Per key, plain deletes (UNLINK) are sent once, before the versioned write when
//!   the last delete came before it in the batch, after it otherwise.
//! - Tag purges are sent once per tag, after the batch's key writes: wal2cache never
//!   adds to a tag set, so purging a tag twice is purging it once, at the end. The one
//!   difference: a republished key that an application also added to a purged tag's
//!   set may be absent rather than present once the batch is applied; absent is never
//!   stale.
//! - Flushes split the batch: what comes before a flush is applied before it.

// Keys and tags come from the rows: seeded hashing (foldhash), fast on short keys.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use redis::cluster_routing::Slot;
use redis::Cmd;

use crate::keys::{sidecar_key_into, version_key, LEASE};
use crate::plan::{Plan, Republish};
use crate::sink::redis::errors::Described;
use crate::sink::redis::scripts::{Scripts, SETS_PER_PURGE};
use crate::sink::{cut, Item, Version, KEY_SHOWN};

/// Keys per UNLINK or SREM command when the count is unbounded (tag members, SCAN
/// pages, a batch's deletes).
pub(super) const CHUNK: usize = 500;

/// Versioned writes (republishes, tombstones) per call of their script. One call per
/// key cost Redis about a quarter more CPU per key (200,000 republishes piped into
/// one server: 10-14 µs of its CPU per key one by one, 7.5-11 µs fifty at a time).
/// Not more: a script runs alone, so other clients wait for a whole call (64 keys:
/// under a millisecond with small values).
pub(super) const VERSIONED_PER_CALL: usize = 64;

/// About how many bytes of values one call of the republish script carries at most.
pub(super) const VALUE_BYTES_PER_CALL: usize = 1 << 20;

/// A write that carries a version.
#[derive(Debug, Clone, Copy)]
pub(super) enum Write<'a> {
    Tombstone(&'a str),
    Republish(&'a Republish),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Versioned<'a> {
    pub(super) write: Write<'a>,
    pub(super) version: Version,
}

impl<'a> Versioned<'a> {
    pub(super) fn key(&self) -> &'a str {
        match self.write {
            Write::Tombstone(k) => k,
            Write::Republish(r) => &r.key,
        }
    }
}

/// The coalesced operations of a run of items without flushes.
#[derive(Debug, Default)]
pub(super) struct Ops<'a> {
    /// Plain deletes of keys that also get a versioned write after them.
    pub(super) unlink_first: Vec<&'a str>,
    pub(super) versioned: Vec<Versioned<'a>>,
    /// Every other plain delete.
    pub(super) unlink: Vec<&'a str>,
    /// Tags to purge (without the tag prefix), once each.
    pub(super) tags: Vec<&'a str>,
    /// The republishes are of a settled batch ([`crate::sink::Batch::settled`]):
    /// written by the fill script, which leaves no version.
    pub(super) settled: bool,
}

#[derive(Default)]
struct KeyState<'a> {
    /// Position (in the batch's order of operations) of the last plain delete.
    unlink_at: Option<usize>,
    /// The versioned write that stays, and its position.
    versioned: Option<(Versioned<'a>, usize)>,
}

/// The keys of `plan.delete` that are plain deletes (not tombstones).
fn plain_deletes(plan: &Plan) -> impl Iterator<Item = &String> {
    let set: Option<HashSet<&str>> =
        (plan.tombstones.len() > 8).then(|| plan.tombstones.iter().map(String::as_str).collect());
    plan.delete.iter().filter(move |k| match &set {
        Some(set) => !set.contains(k.as_str()),
        None => !plan.tombstones.contains(k),
    })
}

impl<'a> Ops<'a> {
    /// The operations of `items`, coalesced. `flush_prefixes` are not looked at: the
    /// caller splits the batch at each flush.
    pub(super) fn build(items: &'a [Item]) -> Ops<'a> {
        let keys_hint: usize = items
            .iter()
            .map(|i| i.plan.delete.len() + i.plan.republish.len())
            .sum();
        let mut index: HashMap<&'a str, usize> = HashMap::with_capacity(keys_hint);
        let mut states: Vec<(&'a str, KeyState<'a>)> = Vec::with_capacity(keys_hint);
        let mut tags: Vec<&'a str> = Vec::new();
        let mut tag_seen: HashSet<&'a str> = HashSet::new();
        let mut at = 0usize;
        fn state<'s, 'a>(
            index: &mut HashMap<&'a str, usize>,
            states: &'s mut Vec<(&'a str, KeyState<'a>)>,
            key: &'a str,
        ) -> &'s mut KeyState<'a> {
            let i = *index.entry(key).or_insert_with(|| {
                states.push((key, KeyState::default()));
                states.len() - 1
            });
            &mut states[i].1
        }
        for item in items {
            let plan = &*item.plan;
            let version = item.origin.version;
            for key in plain_deletes(plan) {
                state(&mut index, &mut states, key).unlink_at = Some(at);
                at += 1;
            }
            let writes = plan
                .tombstones
                .iter()
                .map(|k| Write::Tombstone(k))
                .chain(plan.republish.iter().map(Write::Republish));
            for write in writes {
                let v = Versioned { write, version };
                let s = state(&mut index, &mut states, v.key());
                if s.versioned.is_none_or(|(old, _)| version >= old.version) {
                    s.versioned = Some((v, at));
                }
                at += 1;
            }
            for tag in &plan.purge_tags {
                if tag_seen.insert(tag) {
                    tags.push(tag);
                }
            }
        }
        let mut ops = Ops {
            tags,
            ..Ops::default()
        };
        for (key, s) in states {
            match (s.unlink_at, s.versioned) {
                (Some(_), None) => ops.unlink.push(key),
                (None, Some((v, _))) => ops.versioned.push(v),
                (Some(u), Some((v, at))) if u < at => {
                    ops.unlink_first.push(key);
                    ops.versioned.push(v);
                }
                (Some(_), Some((v, _))) => {
                    ops.versioned.push(v);
                    ops.unlink.push(key);
                }
                (None, None) => {}
            }
        }
        ops
    }

    pub(super) fn is_empty(&self) -> bool {
        self.unlink_first.is_empty()
            && self.versioned.is_empty()
            && self.unlink.is_empty()
            && self.tags.is_empty()
    }
}

/// How commands are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// One server: any keys in one command; tag purges as the purge script.
    Single,
    /// A cluster: a command's keys share a slot; tag purges are left to the caller
    /// (their members live in other slots).
    Cluster,
}

/// A command, the key that routes it, whether it is a call of a versioned write
/// script (its reply: how many of its keys the version guard refused), and what it is
/// (built only when asked).
type EachCommand<'e> = dyn FnMut(Cmd, &str, bool, &dyn Fn() -> Described) + 'e;

/// Hands each command for `ops` to `each`, in order, with the key that routes it
/// (every key of a command shares its slot), whether it is a versioned write script,
/// and a way to say what it is (called only for messages, so the hot path builds none).
pub(super) fn for_each_command(
    ops: &Ops<'_>,
    scripts: &Scripts,
    tag_prefix: &str,
    mode: Mode,
    mut each: impl FnMut(Cmd, &str, bool, &dyn Fn() -> Described),
) {
    let unlinks = |keys: &[&str], each: &mut EachCommand<'_>| {
        let groups: Vec<Vec<&str>> = match mode {
            Mode::Single => vec![keys.to_vec()],
            Mode::Cluster => group_by_slot(keys.iter().copied()),
        };
        for group in &groups {
            for chunk in group.chunks(CHUNK) {
                // Each key with its lease sidecar (same slot): a load of the key
                // that began before this delete cannot store.
                let mut cmd = redis::cmd("UNLINK");
                let mut lease = String::new();
                for key in chunk {
                    sidecar_key_into(key, LEASE, &mut lease);
                    cmd.arg(*key).arg(&lease);
                }
                each(cmd, chunk[0], false, &|| {
                    let keys = chunk
                        .iter()
                        .map(|k| cut(k, KEY_SHOWN))
                        .collect::<Vec<_>>()
                        .join(", ");
                    Described::new("UNLINK (keys and their lease sidecars)", keys)
                });
            }
        }
    };
    unlinks(&ops.unlink_first, &mut each);
    // Versioned writes are of distinct keys, so their order among themselves does not
    // matter: tombstones and republishes go in calls of their own, several keys each.
    let groups: Vec<Vec<Versioned<'_>>> = match mode {
        Mode::Single => vec![ops.versioned.clone()],
        Mode::Cluster => group_by(ops.versioned.iter().copied(), |v| Slot::for_key(v.key())),
    };
    for group in &groups {
        let mut tombstones: Vec<(&str, Version)> = Vec::new();
        let mut republishes: Vec<(&Republish, Version)> = Vec::new();
        for v in group {
            match v.write {
                Write::Tombstone(key) => tombstones.push((key, v.version)),
                Write::Republish(r) => republishes.push((r, v.version)),
            }
        }
        for chunk in tombstones.chunks(VERSIONED_PER_CALL) {
            let first = chunk[0].0;
            each(scripts.tombstone_cmd(chunk), first, true, &|| {
                described("the tombstone script (EVALSHA)", first, chunk.len())
            });
        }
        if ops.settled {
            // The fill script takes one version and TTL a call.
            for run in group_by(republishes, |(r, v)| (*v, r.ttl)) {
                for chunk in chunk_by_size(&run) {
                    let first = &chunk[0].0.key;
                    each(scripts.fill_cmd(chunk), first, true, &|| {
                        described("the fill script (EVALSHA)", first, chunk.len())
                    });
                }
            }
        } else {
            for chunk in chunk_by_size(&republishes) {
                let first = &chunk[0].0.key;
                each(scripts.republish_cmd(chunk), first, true, &|| {
                    described("the republish script (EVALSHA)", first, chunk.len())
                });
            }
        }
    }
    unlinks(&ops.unlink, &mut each);
    if mode == Mode::Single && !ops.tags.is_empty() {
        let sets: Vec<String> = ops
            .tags
            .iter()
            .map(|t| format!("{tag_prefix}{t}"))
            .collect();
        for chunk in sets.chunks(SETS_PER_PURGE) {
            each(scripts.purge_cmd(chunk), &chunk[0], false, &|| {
                Described::new(
                    "a tag purge (the purge script: SMEMBERS, UNLINK)",
                    chunk.join(", "),
                )
            });
        }
    }
}

/// Keys grouped by cluster hash slot: groups in the order their slot first appears,
/// keys in their order within each group.
pub fn group_by_slot<K: AsRef<[u8]>>(keys: impl IntoIterator<Item = K>) -> Vec<Vec<K>> {
    group_by(keys, |k| Slot::for_key(k))
}

/// Items grouped by `group` (a cluster slot; a version and TTL): groups in the order
/// their key first appears, items in their order within each group.
fn group_by<T, K: std::hash::Hash + Eq>(
    items: impl IntoIterator<Item = T>,
    group: impl Fn(&T) -> K,
) -> Vec<Vec<T>> {
    let mut index: HashMap<K, usize> = HashMap::new();
    let mut groups: Vec<Vec<T>> = Vec::new();
    for item in items {
        let i = *index.entry(group(&item)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[i].push(item);
    }
    groups
}

/// What a versioned script call of `keys` keys, `first` the first, is in messages.
/// The version sidecar (what a WRONGTYPE is about) is named only for a call of one
/// key: in a call of several it may be any key's.
fn described(command: &'static str, first: &str, keys: usize) -> Described {
    match keys {
        1 => Described {
            command,
            key: first.to_string(),
            sidecar: Some(version_key(first)),
        },
        n => Described::new(
            command,
            format!(
                "{} (and {} more keys in the same call)",
                cut(first, KEY_SHOWN),
                n - 1
            ),
        ),
    }
}

/// Republishes in calls of at most [`VERSIONED_PER_CALL`] keys and about
/// [`VALUE_BYTES_PER_CALL`] bytes of values (a bigger value goes alone).
fn chunk_by_size<'r, 'a>(
    items: &'r [(&'a Republish, Version)],
) -> Vec<&'r [(&'a Republish, Version)]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (r, _)) in items.iter().enumerate() {
        let full = i - start == VERSIONED_PER_CALL || bytes + r.value.len() > VALUE_BYTES_PER_CALL;
        if i > start && full {
            chunks.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += r.value.len();
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}
