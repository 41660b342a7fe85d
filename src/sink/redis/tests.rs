use std::sync::Arc;
use std::time::Duration;

use redis::cluster_routing::Slot;

use super::ops::{
    for_each_command, group_by_slot, Mode, Ops, Write, VALUE_BYTES_PER_CALL, VERSIONED_PER_CALL,
};
use super::scripts::Scripts;
use crate::lsn::Lsn;
use crate::plan::{Plan, Republish};
use crate::sink::{Item, Origin, Version};

fn item(lsn: u64, seq: u32, plan: Plan) -> Item {
    Item {
        origin: Origin {
            version: Version {
                commit_lsn: Lsn(lsn),
                seq,
            },
            xid: 1,
            commit_time: 0,
            table: Some("public.t".into()),
            op: "update",
        },
        plan: Arc::new(plan),
    }
}

fn deletes(keys: &[&str], tags: &[&str]) -> Plan {
    Plan {
        delete: keys.iter().map(|k| k.to_string()).collect(),
        purge_tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Plan::default()
    }
}

fn republish(key: &str, value: &str) -> Plan {
    Plan {
        republish: vec![Republish {
            key: key.into(),
            value: value.into(),
            ttl: Some(Duration::from_secs(60)),
        }],
        ..Plan::default()
    }
}

fn tombstone(key: &str) -> Plan {
    Plan {
        delete: vec![key.into()],
        tombstones: vec![key.into()],
        ..Plan::default()
    }
}

/// A command's arguments as text.
fn args_of(cmd: &redis::Cmd) -> Vec<String> {
    cmd.args_iter()
        .map(|a| match a {
            redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        })
        .collect()
}

/// `(key, "t"|"r", lsn)` of each versioned write.
fn writes(ops: &Ops<'_>) -> Vec<(String, &'static str, u64)> {
    ops.versioned
        .iter()
        .map(|v| {
            let kind = match v.write {
                Write::Tombstone(_) => "t",
                Write::Republish(_) => "r",
            };
            (v.key().to_string(), kind, v.version.commit_lsn.0)
        })
        .collect()
}

#[test]
fn deletes_and_purges_are_sent_once_per_batch() {
    // 1,000 updates of rows that each delete their key and purge the list page.
    let items: Vec<Item> = (0..1000)
        .map(|i| item(100 + i, 0, deletes(&[&format!("p:{}", i % 10)], &["list"])))
        .collect();
    let ops = Ops::build(&items);
    assert_eq!(ops.unlink.len(), 10, "{:?}", ops.unlink);
    assert_eq!(ops.unlink[0], "p:0");
    assert_eq!(ops.tags, ["list"]);
    assert!(ops.versioned.is_empty() && ops.unlink_first.is_empty());
}

#[test]
fn the_newest_versioned_write_of_a_key_stays() {
    let items = vec![
        item(100, 0, republish("r:1", "a")),
        item(200, 0, tombstone("r:1")),
        item(300, 0, republish("r:1", "c")),
        item(300, 1, republish("r:2", "x")),
        item(400, 0, tombstone("r:2")),
    ];
    let ops = Ops::build(&items);
    assert_eq!(
        writes(&ops),
        [("r:1".into(), "r", 300), ("r:2".into(), "t", 400)]
    );
    match ops.versioned[0].write {
        Write::Republish(r) => assert_eq!(&*r.value, "c"),
        other => panic!("{other:?}"),
    }
    // A replayed older write after a newer one (a batch out of order) does not win:
    // the version guard would refuse it one by one too.
    let items = vec![
        item(500, 0, republish("r:1", "new")),
        item(450, 0, republish("r:1", "old")),
    ];
    assert_eq!(writes(&Ops::build(&items)), [("r:1".into(), "r", 500)]);
}

#[test]
fn plain_deletes_keep_their_place_around_a_versioned_write() {
    // Deleted, then republished: the delete goes first.
    let items = vec![
        item(100, 0, deletes(&["k"], &[])),
        item(200, 0, republish("k", "v")),
    ];
    let ops = Ops::build(&items);
    assert_eq!(ops.unlink_first, ["k"]);
    assert!(ops.unlink.is_empty());
    // Republished, then deleted: the delete goes last.
    let items = vec![
        item(100, 0, republish("k", "v")),
        item(200, 0, deletes(&["k"], &[])),
    ];
    let ops = Ops::build(&items);
    assert!(ops.unlink_first.is_empty());
    assert_eq!(ops.unlink, ["k"]);
    assert_eq!(writes(&ops), [("k".into(), "r", 100)]);
}

#[test]
fn tombstones_are_not_unlinked_plainly() {
    let mut plan = tombstone("r:1");
    plan.delete.push("d:1".into());
    let items = [item(100, 0, plan)];
    let ops = Ops::build(&items);
    assert_eq!(ops.unlink, ["d:1"]);
    assert_eq!(writes(&ops), [("r:1".into(), "t", 100)]);
    // With many tombstones (looked up through a set).
    let keys: Vec<String> = (0..50).map(|i| format!("r:{i}")).collect();
    let plan = Plan {
        delete: keys.iter().cloned().chain(["d:2".to_string()]).collect(),
        tombstones: keys.clone(),
        ..Plan::default()
    };
    let items = [item(100, 0, plan)];
    let ops = Ops::build(&items);
    assert_eq!(ops.unlink, ["d:2"]);
    assert_eq!(ops.versioned.len(), 50);
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

/// The versioned script calls `ops` makes: `(script sha, keys, every key of the call)`.
fn versioned_calls(ops: &Ops<'_>, mode: Mode) -> Vec<(String, usize, Vec<String>)> {
    let scripts = Scripts::new();
    let mut calls = Vec::new();
    for_each_command(
        ops,
        &scripts,
        "tag:",
        mode,
        |cmd, route, versioned, describe| {
            if !versioned {
                return;
            }
            let args = args_of(&cmd);
            assert_eq!(args[0], "EVALSHA");
            let numkeys: usize = args[2].parse().unwrap();
            let keys = args[3..3 + numkeys].to_vec();
            assert_eq!(route, keys[0], "routed by its first key");
            // A WRONGTYPE names the sidecar only when the call has one key: in a call of
            // several it may be any key's.
            let (_, named) = describe().naming(Some("WRONGTYPE"));
            if numkeys <= 3 {
                assert_eq!(named, format!("{{{}}}:w2c:v", keys[0]));
            } else {
                assert!(
                    named.starts_with(&keys[0]) && named.contains(" more keys in the same call"),
                    "{named}"
                );
            }
            calls.push((args[1].clone(), numkeys, keys));
        },
    );
    calls
}

#[test]
fn versioned_writes_share_script_calls_on_one_server_and_per_slot_in_a_cluster() {
    let scripts = Scripts::new();
    let republish_sha = scripts.republish.get_hash().to_string();
    let tombstone_sha = scripts.tombstone.get_hash().to_string();
    // 300 republishes and 5 tombstones of distinct keys.
    let mut items: Vec<Item> = (0..300)
        .map(|i| item(100 + i, 0, republish(&format!("r:{i}"), "v")))
        .collect();
    items.extend((0..5).map(|i| item(500, i, tombstone(&format!("t:{i}")))));
    let ops = Ops::build(&items);
    let calls = versioned_calls(&ops, Mode::Single);
    let shape: Vec<(bool, usize)> = calls
        .iter()
        .map(|(sha, n, _)| (*sha == republish_sha, *n))
        .collect();
    // Keys and their sidecars (and leases, for tombstones) as the scripts' KEYS: the
    // tombstones in one call, the republishes in full calls and the rest.
    let mut expected = vec![(false, 5 * 3)];
    expected.extend(std::iter::repeat_n(
        (true, VERSIONED_PER_CALL * 2),
        300 / VERSIONED_PER_CALL,
    ));
    if 300 % VERSIONED_PER_CALL > 0 {
        expected.push((true, 300 % VERSIONED_PER_CALL * 2));
    }
    assert!(expected.len() > 2, "{expected:?}");
    assert_eq!(shape, expected);
    assert_eq!(calls[0].0, tombstone_sha);
    assert_eq!(calls[0].2[..3], ["t:0", "{t:0}:w2c:v", "{t:0}:w2c:l"]);
    assert_eq!(calls[1].2[..2], ["r:0", "{r:0}:w2c:v"]);
    // Every key written once.
    let written: usize = calls
        .iter()
        .map(|(sha, n, _)| if *sha == republish_sha { n / 2 } else { n / 3 })
        .sum();
    assert_eq!(written, 305);

    // In a cluster a call's keys share a slot.
    let calls = versioned_calls(&ops, Mode::Cluster);
    for (_, _, keys) in &calls {
        assert!(
            keys.iter()
                .all(|k| Slot::for_key(k) == Slot::for_key(&keys[0])),
            "{keys:?}"
        );
    }
    let tagged: Vec<Item> = (0..10)
        .map(|i| item(100 + i, 0, republish(&format!("{{user:7}}:r:{i}"), "v")))
        .collect();
    let ops = Ops::build(&tagged);
    let calls = versioned_calls(&ops, Mode::Cluster);
    assert_eq!(calls.len(), 1, "one slot, one call");
    assert_eq!(calls[0].1, 20);
}

#[test]
fn big_values_split_republish_calls() {
    let big = "x".repeat(VALUE_BYTES_PER_CALL / 3 + 1);
    let items: Vec<Item> = (0..7)
        .map(|i| item(100 + i, 0, republish(&format!("r:{i}"), &big)))
        .collect();
    let ops = Ops::build(&items);
    let sizes: Vec<usize> = versioned_calls(&ops, Mode::Single)
        .iter()
        .map(|(_, n, _)| n / 2)
        .collect();
    assert_eq!(sizes, [2, 2, 2, 1]);
    // A value over the bound goes alone.
    let huge = "x".repeat(VALUE_BYTES_PER_CALL + 1);
    let items = vec![
        item(100, 0, republish("a", "v")),
        item(101, 0, republish("b", &huge)),
        item(102, 0, republish("c", "v")),
    ];
    let ops = Ops::build(&items);
    let sizes: Vec<usize> = versioned_calls(&ops, Mode::Single)
        .iter()
        .map(|(_, n, _)| n / 2)
        .collect();
    assert_eq!(sizes, [1, 1, 1]);
}

#[test]
fn a_settled_batch_fills_in_calls_of_one_version_and_ttl() {
    let scripts = Scripts::new();
    let fill_sha = scripts.fill.get_hash().to_string();
    // One page of a backfill: one version, two rules' TTLs interleaved, 100 keys.
    let republish: Vec<Republish> = (0..100)
        .map(|i| Republish {
            key: format!("r:{i}"),
            value: format!("v{i}").into(),
            ttl: Some(Duration::from_secs(if i % 2 == 0 { 60 } else { 3600 })),
        })
        .collect();
    let page = item(
        7,
        u32::MAX,
        Plan {
            republish,
            ..Plan::default()
        },
    );
    let ops = Ops {
        settled: true,
        ..Ops::build(std::slice::from_ref(&page))
    };
    let mut calls = Vec::new();
    for_each_command(
        &ops,
        &scripts,
        "tag:",
        Mode::Single,
        |cmd, _, versioned, _| {
            assert!(versioned);
            let args = args_of(&cmd);
            calls.push(args);
        },
    );
    // 50 keys of each TTL: one call each (under VERSIONED_PER_CALL).
    assert_eq!(calls.len(), 2, "{calls:?}");
    let version = Version {
        commit_lsn: Lsn(7),
        seq: u32::MAX,
    }
    .encode();
    for (args, ttl, first) in [(&calls[0], "60", 0), (&calls[1], "3600", 1)] {
        assert_eq!(args[1], fill_sha);
        assert_eq!(args[2], "100", "50 keys and their sidecars");
        assert_eq!(
            args[3..5],
            [format!("r:{first}"), format!("{{r:{first}}}:w2c:v")]
        );
        // KEYS, then the version and TTL once, then each value.
        assert_eq!(args[103..105], [version.clone(), ttl.to_string()]);
        assert_eq!(args[105], format!("v{first}"));
        assert_eq!(args.len(), 105 + 50);
    }
    // Not settled: the republish script, with a version per key.
    let ops = Ops::build(std::slice::from_ref(&page));
    let mut shas = Vec::new();
    for_each_command(&ops, &scripts, "tag:", Mode::Single, |cmd, _, _, _| {
        shas.push(args_of(&cmd).swap_remove(1))
    });
    assert!(
        shas.iter().all(|s| *s == scripts.republish.get_hash()),
        "{shas:?}"
    );
}
