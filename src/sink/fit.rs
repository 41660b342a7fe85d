//! Fitting a change's Kafka event into a message the broker takes: an event larger
//! than `kafka.max_event_bytes` is split into several events of the same change; one
//! whose single key or tag cannot fit becomes a `flush_all` (reason `oversized`), so
//! subscribers empty themselves rather than keep a stale value. No row can stop the
//! stream.

use crate::config::KafkaConfig;
use crate::event::{Event, EventRef, Kind, SCHEMA};
use crate::pgtime::{format_pg_time, PgTime};
use crate::sink::{cut, KEY_SHOWN};
use crate::sink::{describe, Item};

/// A key or tag longer than this is never put in an event: the event's message key is
/// its first key, and no subscriber needs a key this long.
pub const MAX_KEY_BYTES: usize = 64 * 1024;

/// The Kafka message key is cut to this many bytes (it only picks the partition).
pub const MESSAGE_KEY_BYTES: usize = 1024;

/// What a message needs beside its value (key, headers, record overhead), kept free
/// under librdkafka's `message.max.bytes`.
const MESSAGE_OVERHEAD: usize = MESSAGE_KEY_BYTES + 1024;

/// How large an event may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    /// The JSON of one event, at most.
    pub max_event_bytes: usize,
    /// One key or tag, at most.
    pub max_key_bytes: usize,
}

impl EventLimits {
    /// `kafka.max_event_bytes`, lowered to fit `message.max.bytes` when
    /// `kafka.properties` sets it lower.
    pub fn from_config(config: &KafkaConfig) -> EventLimits {
        let mut max = config.max_event_bytes;
        if let Some(Ok(mmb)) = config
            .properties
            .get("message.max.bytes")
            .map(|v| v.trim().parse::<usize>())
        {
            max = max.min(mmb.saturating_sub(MESSAGE_OVERHEAD));
        }
        EventLimits {
            max_event_bytes: max.max(MIN_EVENT_BYTES),
            max_key_bytes: MAX_KEY_BYTES,
        }
    }
}

/// The smallest event bound that still fits a flush_all with its detail.
pub const MIN_EVENT_BYTES: usize = 4096;

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub key: String,
    pub payload: String,
    /// The item it is for, in the batch.
    pub item: usize,
    /// The small flush_all that replaced an event that did not fit.
    pub degraded: bool,
}

/// What `events_for` had to do to fit an item's event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fitted {
    /// One event, as it is.
    Whole,
    /// Split into this many events.
    Split(usize),
    /// A key or tag cannot fit: a flush_all instead.
    FlushAll { largest: usize, preview: String },
}

/// The Kafka message key: the first cache key, else the table, cut to a safe size.
fn message_key(first: Option<&str>, item: &Item) -> String {
    let key = first
        .or(item.origin.table.as_deref())
        .unwrap_or("wal2cache");
    let mut end = key.len().min(MESSAGE_KEY_BYTES);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    key[..end].to_string()
}

/// The event of an item without its keys and tags.
fn base_event(source: &str, item: &Item) -> Event {
    let plan = &item.plan;
    let o = &item.origin;
    let mut e = Event::new(
        if plan.flush_all {
            Kind::FlushAll
        } else {
            Kind::Invalidate
        },
        source,
    );
    e.lsn = Some(o.version.commit_lsn.to_string());
    e.xid = Some(o.xid);
    e.commit_time = Some(format_pg_time(o.commit_time));
    e.table = o.table.as_deref().map(str::to_string);
    e.op = Some(o.op.to_string());
    if plan.flush_all {
        e.reason = Some(flush_reason(o.op).into());
        e.detail.clone_from(&plan.detail);
    }
    e
}

/// The `reason` of a `flush_all` a plan asks for: a TRUNCATE without `truncate_tags`,
/// an operator's `wal2cache invalidate --all` (a logical message), a rules' table
/// added back to the publication (its changes before were not streamed), or a row change a
/// rule could not be bound to (its table lacked a column of the rule's keys or tags
/// when the change was written).
fn flush_reason(op: &str) -> &'static str {
    match op {
        "message" => "manual",
        "truncate" => "truncate",
        "unpublished" => "unpublished",
        _ => "schema_changed",
    }
}

/// The small event that stands for an item whose event cannot be published: every
/// subscriber empties itself. `why` goes into its `detail`.
pub fn flush_all_for(source: &str, item: &Item, index: usize, why: &str) -> Outgoing {
    let mut e = base_event(source, item);
    e.kind = Kind::FlushAll;
    e.reason = Some("oversized".into());
    e.detail = Some(format!("{}: {why}", describe(item)));
    Outgoing {
        key: message_key(None, item),
        payload: e.to_json(),
        item: index,
        degraded: true,
    }
}

/// The broker refused `event` (of `item`) as too large, its limit being below ours:
/// the small flush_all that stands for it, or `None` when `event` already is one
/// (then nothing smaller can be sent).
pub fn refused(
    source: &str,
    event: &Outgoing,
    item: &Item,
    limits: &EventLimits,
    error: &str,
) -> Option<Outgoing> {
    if event.degraded {
        return None;
    }
    let why = format!(
        "the broker refused its event of {} bytes as too large ({error}): its limit is below kafka.max_event_bytes ({}); subscribers flush everything instead",
        event.payload.len(),
        limits.max_event_bytes
    );
    Some(flush_all_for(source, item, event.item, &why))
}

/// The events of an item (`index` in its batch), each within `limits`.
pub fn events_for(
    source: &str,
    item: &Item,
    index: usize,
    limits: &EventLimits,
) -> (Vec<Outgoing>, Fitted) {
    let mut out = Vec::with_capacity(1);
    let fitted = events_into(source, item, index, limits, &mut out);
    (out, fitted)
}

/// The JSON of an item's whole event with `keys` (a plan's own list, or one gathered).
fn whole_json<K: AsRef<str>>(source: &str, item: &Item, keys: &[K]) -> String {
    let plan = &item.plan;
    let tags = plan.purge_tags.as_slice();
    let o = &item.origin;
    let (lsn, time) = (o.version.commit_lsn, PgTime(o.commit_time));
    let flush_all = plan.flush_all;
    EventRef {
        schema: SCHEMA,
        kind: if flush_all {
            &Kind::FlushAll
        } else {
            &Kind::Invalidate
        },
        source,
        lsn: Some(&lsn),
        xid: Some(o.xid),
        commit_time: Some(&time),
        table: o.table.as_deref(),
        op: Some(o.op),
        keys,
        tags,
        reason: flush_all.then(|| flush_reason(o.op)),
        detail: if flush_all {
            plan.detail.as_deref()
        } else {
            None
        },
    }
    .to_json()
}

/// [`events_for`], appended to `out`: a batch's events in one vector, and in the
/// common case (a plan that deletes or republishes, each key and tag within its
/// bound) no list of the keys or tags gathered for the event.
pub fn events_into(
    source: &str,
    item: &Item,
    index: usize,
    limits: &EventLimits,
    out: &mut Vec<Outgoing>,
) -> Fitted {
    let plan = &item.plan;
    // The common case, serialized once: every key within its bound and the whole event
    // within the limit (then every key also fits the room an event leaves it).
    let within = |s: &String| s.len() <= limits.max_key_bytes;
    if plan.delete.iter().all(within)
        && plan.republish.iter().all(|r| within(&r.key))
        && plan.purge_tags.iter().all(within)
    {
        let (payload, first) = if plan.republish.is_empty() {
            let first = plan.delete.first().map(String::as_str);
            (whole_json(source, item, &plan.delete), first)
        } else {
            let keys = event_keys(plan);
            (whole_json(source, item, &keys), keys.first().copied())
        };
        if payload.len() <= limits.max_event_bytes {
            out.push(Outgoing {
                key: message_key(first, item),
                payload,
                item: index,
                degraded: false,
            });
            return Fitted::Whole;
        }
    }
    let keys = event_keys(plan);
    let tags: Vec<&str> = plan.purge_tags.iter().map(String::as_str).collect();
    let base = base_event(source, item);
    let base_len = base.to_json().len();
    // `,"keys":[` and `]`; the same for tags.
    const FIELD: usize = 10;
    let json_len = |s: &str| serde_json::to_string(s).map_or(usize::MAX, |j| j.len());
    let key_lens: Vec<usize> = keys.iter().map(|k| json_len(k)).collect();
    let tag_lens: Vec<usize> = tags.iter().map(|t| json_len(t)).collect();

    // A key or tag that cannot fit in any event, or over the bound for one key.
    let room = limits.max_event_bytes.saturating_sub(base_len + FIELD);
    let largest = keys
        .iter()
        .zip(&key_lens)
        .chain(tags.iter().zip(&tag_lens))
        .filter(|(s, len)| s.len() > limits.max_key_bytes || **len > room)
        .max_by_key(|(s, _)| s.len());
    if let Some((s, _)) = largest {
        let why = format!(
            "a key or tag of {} bytes (starting {:?}) cannot be published (at most {} bytes a key, {} an event); subscribers flush everything instead",
            s.len(),
            cut(s, KEY_SHOWN),
            limits.max_key_bytes,
            limits.max_event_bytes
        );
        let fitted = Fitted::FlushAll {
            largest: s.len(),
            preview: cut(s, KEY_SHOWN),
        };
        out.push(flush_all_for(source, item, index, &why));
        return fitted;
    }

    // Greedy: keys then tags, in order, each event as full as it may be.
    let total = |k: &[usize], t: &[usize]| {
        let field = |lens: &[usize]| {
            if lens.is_empty() {
                0
            } else {
                FIELD + lens.iter().sum::<usize>() + lens.len() - 1
            }
        };
        base_len + field(k) + field(t)
    };
    if total(&key_lens, &tag_lens) <= limits.max_event_bytes {
        let mut e = base;
        e.keys = keys.iter().map(|k| k.to_string()).collect();
        e.tags = tags.iter().map(|t| t.to_string()).collect();
        out.push(Outgoing {
            key: message_key(keys.first().copied(), item),
            payload: e.to_json(),
            item: index,
            degraded: false,
        });
        return Fitted::Whole;
    }
    let mut chunks: Vec<(Vec<&str>, Vec<&str>)> = vec![(Vec::new(), Vec::new())];
    let mut size = base_len;
    let entries = keys
        .iter()
        .zip(&key_lens)
        .map(|(s, l)| (true, *s, *l))
        .chain(tags.iter().zip(&tag_lens).map(|(s, l)| (false, *s, *l)));
    for (is_key, entry, len) in entries {
        let added = |chunk: &(Vec<&str>, Vec<&str>)| {
            let field = if is_key { &chunk.0 } else { &chunk.1 };
            len + if field.is_empty() { FIELD } else { 1 }
        };
        let chunk = chunks.last().expect("never empty");
        if size + added(chunk) > limits.max_event_bytes {
            chunks.push((Vec::new(), Vec::new()));
            size = base_len;
        }
        let chunk = chunks.last_mut().expect("never empty");
        size += added(chunk);
        if is_key {
            chunk.0.push(entry);
        } else {
            chunk.1.push(entry);
        }
    }
    let n = chunks.len();
    out.extend(chunks.into_iter().map(|(k, t)| {
        let mut e = base.clone();
        e.keys = k.iter().map(|s| s.to_string()).collect();
        e.tags = t.iter().map(|s| s.to_string()).collect();
        Outgoing {
            key: message_key(k.first().copied().or(keys.first().copied()), item),
            payload: e.to_json(),
            item: index,
            degraded: false,
        }
    }));
    Fitted::Split(n)
}

/// An event's keys: the plan's deletes, then its republished keys not deleted too.
fn event_keys(plan: &crate::plan::Plan) -> Vec<&str> {
    let mut keys: Vec<&str> = plan.delete.iter().map(String::as_str).collect();
    for r in &plan.republish {
        if !keys.contains(&r.key.as_str()) {
            keys.push(&r.key);
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::plan::Plan;
    use crate::sink::{Origin, Version};
    use serde_json::Value;
    use std::sync::Arc;

    fn item(table: Option<&str>, plan: Plan) -> Item {
        Item {
            origin: Origin {
                version: Version {
                    commit_lsn: Lsn(0x1A2B3C4),
                    seq: 0,
                },
                xid: 7781,
                commit_time: 0,
                table: table.map(Into::into),
                op: if table.is_some() { "update" } else { "message" },
            },
            plan: Arc::new(plan),
        }
    }

    fn limits(max_event_bytes: usize) -> EventLimits {
        EventLimits {
            max_event_bytes,
            max_key_bytes: MAX_KEY_BYTES,
        }
    }

    fn parse(o: &Outgoing) -> Value {
        serde_json::from_str(&o.payload).unwrap()
    }

    fn strings(v: &Value, field: &str) -> Vec<String> {
        v[field]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_flush_asked_for_by_a_message_is_manual_with_its_detail() {
        let plan = Plan {
            flush_all: true,
            flush_prefixes: vec!["shop:".into()],
            detail: Some("deploy 42".into()),
            ..Plan::default()
        };
        let (out, _) = events_for("main-db", &item(None, plan.clone()), 0, &limits(900_000));
        let v = parse(&out[0]);
        assert_eq!(
            (v["kind"].as_str(), v["reason"].as_str()),
            (Some("flush_all"), Some("manual"))
        );
        assert_eq!(v["detail"], "deploy 42");
        // A TRUNCATE's flush stays "truncate"; a row change's (a rule that could not
        // be bound to the table's shape then) is "schema_changed".
        let mut truncate = item(Some("public.products"), plan.clone());
        truncate.origin.op = "truncate";
        let (out, _) = events_for("main-db", &truncate, 0, &limits(900_000));
        assert_eq!(parse(&out[0])["reason"], "truncate");
        let update = item(Some("public.products"), plan);
        let (out, _) = events_for("main-db", &update, 0, &limits(900_000));
        assert_eq!(parse(&out[0])["reason"], "schema_changed");
    }

    #[test]
    fn a_small_event_is_one_event() {
        let plan = Plan {
            delete: vec!["shop:product:v3:42".into()],
            purge_tags: vec!["shop:category:7".into()],
            rules: vec!["product".into()],
            ..Plan::default()
        };
        let (out, fitted) = events_for(
            "main-db",
            &item(Some("public.products"), plan),
            0,
            &limits(900_000),
        );
        assert_eq!(fitted, Fitted::Whole);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key, "shop:product:v3:42");
        assert_eq!(
            out[0].payload,
            r#"{"schema":1,"kind":"invalidate","source":"main-db","lsn":"0/1A2B3C4","xid":7781,"commit_time":"2000-01-01T00:00:00.000000Z","table":"public.products","op":"update","keys":["shop:product:v3:42"],"tags":["shop:category:7"]}"#
        );
    }

    /// The event names every key the plan touches once, deletes first, whichever
    /// path wrote it; `events_into` appends to what a batch already has.
    #[test]
    fn an_event_lists_deleted_then_republished_keys_once() {
        let republish = |k: &str| crate::plan::Republish {
            key: k.into(),
            value: Arc::from("{}"),
            ttl: None,
        };
        let cases: [(Vec<&str>, Vec<&str>, Vec<&str>); 4] = [
            (vec!["d1", "d2"], vec![], vec!["d1", "d2"]),
            (vec![], vec!["r1", "r2"], vec!["r1", "r2"]),
            (vec!["d1", "x"], vec!["x", "r1"], vec!["d1", "x", "r1"]),
            (vec![], vec![], vec![]),
        ];
        for (delete, repub, want) in cases {
            let plan = Plan {
                delete: delete.iter().map(|k| k.to_string()).collect(),
                republish: repub.iter().map(|k| republish(k)).collect(),
                purge_tags: vec!["t".into()],
                ..Plan::default()
            };
            let it = item(Some("public.t"), plan);
            let mut out = vec![flush_all_for("db", &it, 9, "already there")];
            // Once on the common path, once forced onto the fitting path by a limit
            // just under the event's size (it splits, keeping every key).
            let fitted = events_into("db", &it, 2, &limits(900_000), &mut out);
            assert_eq!(fitted, Fitted::Whole);
            assert_eq!(out.len(), 2, "appended");
            assert_eq!(out[0].item, 9);
            assert_eq!((out[1].item, out[1].degraded), (2, false));
            let v = parse(&out[1]);
            assert_eq!(strings(&v, "keys"), want);
            assert_eq!(strings(&v, "tags"), ["t"]);
            assert_eq!(out[1].key, want.first().copied().unwrap_or("public.t"));
            let mut owned = base_event("db", &it);
            owned.keys = want.iter().map(|k| k.to_string()).collect();
            owned.tags = vec!["t".into()];
            assert_eq!(
                out[1].payload,
                owned.to_json(),
                "as the owned event writes it"
            );
            let size = out[1].payload.len();
            let (split, _) = events_for("db", &it, 2, &limits(size - 1));
            let mut all: Vec<String> = split
                .iter()
                .flat_map(|o| strings(&parse(o), "keys"))
                .collect();
            all.dedup();
            assert_eq!(all, want, "the fitting path keeps the same keys");
        }
    }

    #[test]
    fn a_large_event_is_split_into_events_that_fit_and_keep_everything() {
        let keys: Vec<String> = (0..3000)
            .map(|i| format!("k:{i}:{}", "x".repeat(90)))
            .collect();
        let tags: Vec<String> = (0..500).map(|i| format!("t:\"{i}\"")).collect();
        let plan = Plan {
            delete: keys.clone(),
            purge_tags: tags.clone(),
            rules: vec!["r".into()],
            ..Plan::default()
        };
        let max = 20_000;
        let (out, fitted) = events_for("db", &item(Some("public.t"), plan), 3, &limits(max));
        let Fitted::Split(n) = fitted else {
            panic!("{fitted:?}")
        };
        assert_eq!(n, out.len());
        // ~300 kB of keys in 20 kB events: as few events as fit.
        assert!((15..=17).contains(&n), "{n} events");
        let mut all_keys = Vec::new();
        let mut all_tags = Vec::new();
        for o in &out {
            assert!(o.payload.len() <= max, "{} bytes", o.payload.len());
            assert_eq!(o.item, 3);
            assert!(!o.degraded);
            let v = parse(o);
            assert_eq!(
                (&v["kind"], &v["lsn"], &v["xid"], &v["table"], &v["op"]),
                (
                    &Value::from("invalidate"),
                    &Value::from("0/1A2B3C4"),
                    &Value::from(7781),
                    &Value::from("public.t"),
                    &Value::from("update")
                )
            );
            let k = strings(&v, "keys");
            assert_eq!(o.key, k.first().cloned().unwrap_or_else(|| keys[0].clone()));
            all_keys.extend(k);
            all_tags.extend(strings(&v, "tags"));
        }
        assert_eq!(all_keys, keys, "every key, in order, once");
        assert_eq!(all_tags, tags, "every tag, in order, once");
    }

    #[test]
    fn events_fill_up_to_the_byte() {
        // Whatever the bound, every event fits and the split is tight: no event could
        // have taken the next entry.
        let keys: Vec<String> = (0..200).map(|i| format!("key:{i}")).collect();
        for max in [400, 401, 450, 777, 1000, 2048] {
            let plan = Plan {
                delete: keys.clone(),
                ..Plan::default()
            };
            let (out, _) = events_for("db", &item(None, plan), 0, &limits(max));
            let mut seen = Vec::new();
            for (i, o) in out.iter().enumerate() {
                assert!(
                    o.payload.len() <= max,
                    "max {max}: {} bytes",
                    o.payload.len()
                );
                let k = strings(&parse(o), "keys");
                if i + 1 < out.len() {
                    let next = &keys[seen.len() + k.len()];
                    assert!(
                        o.payload.len() + serde_json::to_string(next).unwrap().len() + 1 > max,
                        "max {max}: event {i} had room for {next}"
                    );
                }
                seen.extend(k);
            }
            assert_eq!(seen, keys);
        }
    }

    #[test]
    fn a_key_too_large_for_any_event_becomes_a_flush_all_naming_the_rule() {
        let huge = format!("probe:lk:{}", "k".repeat(600_000));
        let plan = Plan {
            delete: vec![huge.clone(), "probe:small:1".into()],
            rules: vec!["lk".into()],
            ..Plan::default()
        };
        let (out, fitted) =
            events_for("db", &item(Some("public.probe"), plan), 0, &limits(900_000));
        assert!(
            matches!(fitted, Fitted::FlushAll { largest, .. } if largest == huge.len()),
            "{fitted:?}"
        );
        assert_eq!(out.len(), 1);
        assert!(out[0].degraded);
        assert!(
            out[0].payload.len() < 2_000,
            "{} bytes",
            out[0].payload.len()
        );
        assert_eq!(out[0].key, "public.probe");
        let v = parse(&out[0]);
        assert_eq!(v["kind"], "flush_all");
        assert_eq!(v["reason"], "oversized");
        assert_eq!(
            (v["lsn"].as_str(), v["table"].as_str()),
            (Some("0/1A2B3C4"), Some("public.probe"))
        );
        let detail = v["detail"].as_str().unwrap();
        for needle in [
            "rule \"lk\"",
            "public.probe",
            "0/1A2B3C4",
            "600009 bytes",
            "probe:lk:kkk",
        ] {
            assert!(detail.contains(needle), "{needle} missing from {detail}");
        }
        assert!(
            v.get("keys").is_none(),
            "no key of the change: subscribers flush"
        );
    }

    #[test]
    fn a_key_over_the_per_key_bound_becomes_a_flush_all_even_if_the_event_fits() {
        let plan = Plan {
            purge_tags: vec!["t".repeat(MAX_KEY_BYTES + 1)],
            ..Plan::default()
        };
        let (out, fitted) = events_for("db", &item(None, plan), 0, &limits(900_000));
        assert!(matches!(fitted, Fitted::FlushAll { .. }), "{fitted:?}");
        let v = parse(&out[0]);
        assert_eq!(
            (v["kind"].as_str(), v["op"].as_str()),
            (Some("flush_all"), Some("message"))
        );
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains("a wal2cache message"),
            "{v}"
        );
        assert_eq!(out[0].key, "wal2cache");
    }

    #[test]
    fn an_event_the_broker_refuses_becomes_its_flush_all_once() {
        let plan = Plan {
            delete: (0..100).map(|i| format!("k:{i}")).collect(),
            rules: vec!["r".into()],
            ..Plan::default()
        };
        let item = item(Some("public.t"), plan);
        let (out, _) = events_for("db", &item, 4, &limits(900_000));
        let flush = refused(
            "db",
            &out[0],
            &item,
            &limits(900_000),
            "MessageSizeTooLarge",
        )
        .expect("a flush_all stands for the refused event");
        assert!(flush.degraded);
        assert_eq!(flush.item, 4);
        let v = parse(&flush);
        assert_eq!(
            (v["kind"].as_str(), v["reason"].as_str()),
            (Some("flush_all"), Some("oversized"))
        );
        let detail = v["detail"].as_str().unwrap();
        assert!(
            detail.contains("refused") && detail.contains("rule \"r\""),
            "{detail}"
        );
        assert_eq!(
            refused("db", &flush, &item, &limits(900_000), "MessageSizeTooLarge"),
            None,
            "nothing smaller than the flush_all: the caller stops with an error"
        );
    }

    #[test]
    fn message_keys_are_cut_to_a_safe_size() {
        let long = "é".repeat(MESSAGE_KEY_BYTES); // 2 bytes each
        let plan = Plan {
            delete: vec![long.clone()],
            ..Plan::default()
        };
        let (out, _) = events_for("db", &item(None, plan), 0, &limits(900_000));
        assert!(out[0].key.len() <= MESSAGE_KEY_BYTES);
        assert!(long.starts_with(&out[0].key));
        assert_eq!(
            strings(&parse(&out[0]), "keys"),
            vec![long],
            "the event keeps the whole key"
        );
    }

    #[test]
    fn message_max_bytes_lowers_the_bound() {
        let mut config: KafkaConfig = serde_json::from_value(serde_json::json!({
            "brokers": "b:9092",
        }))
        .unwrap();
        assert_eq!(EventLimits::from_config(&config).max_event_bytes, 900_000);
        config
            .properties
            .insert("message.max.bytes".into(), "100000".into());
        let limits = EventLimits::from_config(&config);
        assert!(
            limits.max_event_bytes <= 100_000 - MESSAGE_KEY_BYTES,
            "{limits:?}"
        );
        config
            .properties
            .insert("message.max.bytes".into(), "2000000".into());
        assert_eq!(EventLimits::from_config(&config).max_event_bytes, 900_000);
    }
}
