//! The Kafka event, schema 1: the contract between the daemon and every L1 cache.
//! One message per row change that matched a rule, plus `flush_all` and `heartbeat`.
//! A subscriber ignores fields it does not know, so new fields never need a new schema.

use serde::{Deserialize, Serialize};

pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Invalidate,
    FlushAll,
    Heartbeat,
    /// A kind this version does not know (a subscriber skips it).
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub schema: u32,
    pub kind: Kind,
    /// The `name` of the daemon's config.
    pub source: String,
    /// Commit LSN of the transaction (`16/B374D848`); for a heartbeat, the last
    /// confirmed position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid: Option<u32>,
    /// RFC 3339, UTC, microseconds. For a heartbeat: now when nothing is in flight,
    /// else the commit time of the newest applied transaction, so that
    /// `now - commit_time` is the subscriber's lag either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// `insert`, `update`, `delete`, `truncate` or `message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// `flush_all` only: `truncate`, `slot_lost`, `manual`, `topic_lost` (the topic
    /// was created again: events may have been lost with it) or `oversized` (a key or
    /// tag too large for an event). A subscriber flushes whatever the reason, also one
    /// it does not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `flush_all` only, optional: what fired it (rule, table, LSN), for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Event {
    pub fn new(kind: Kind, source: impl Into<String>) -> Event {
        Event {
            schema: SCHEMA,
            kind,
            source: source.into(),
            lsn: None,
            xid: None,
            commit_time: None,
            table: None,
            op: None,
            keys: Vec::new(),
            tags: Vec::new(),
            reason: None,
            detail: None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an event always serializes")
    }
}

/// An event borrowed from what it describes, for the daemon's hot path: serialized
/// straight into its message buffer (no owned copy of every key, no intermediate
/// strings for the LSN and the time, which are written through `Display`). Writes
/// exactly what [`Event::to_json`] writes for the same content.
#[derive(Serialize)]
pub struct EventRef<'a> {
    pub schema: u32,
    pub kind: &'a Kind,
    pub source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "display")]
    pub lsn: Option<&'a dyn std::fmt::Display>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "display")]
    pub commit_time: Option<&'a dyn std::fmt::Display>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub keys: &'a [&'a str],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub tags: &'a [&'a str],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
}

fn display<S: serde::Serializer>(
    value: &Option<&dyn std::fmt::Display>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

impl EventRef<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an event always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_event_writes_what_an_owned_one_does() {
        let mut e = Event::new(Kind::Invalidate, "main-db");
        let borrowed = EventRef {
            schema: SCHEMA,
            kind: &Kind::Invalidate,
            source: "main-db",
            lsn: None,
            xid: None,
            commit_time: None,
            table: None,
            op: None,
            keys: &[],
            tags: &[],
            reason: None,
            detail: None,
        };
        assert_eq!(borrowed.to_json(), e.to_json());
        e.lsn = Some("0/1A2B3C4".into());
        e.xid = Some(7781);
        e.commit_time = Some("2026-11-23T09:30:00.123456Z".into());
        e.table = Some("public.products".into());
        e.op = Some("update".into());
        e.keys = vec!["shop:product:v3:42".into(), "k\"2".into()];
        e.tags = vec!["shop:category:7".into()];
        e.reason = Some("oversized".into());
        e.detail = Some("why".into());
        let lsn = "0/1A2B3C4";
        let time = "2026-11-23T09:30:00.123456Z";
        let borrowed = EventRef {
            lsn: Some(&lsn),
            xid: Some(7781),
            commit_time: Some(&time),
            table: Some("public.products"),
            op: Some("update"),
            keys: &["shop:product:v3:42", "k\"2"],
            tags: &["shop:category:7"],
            reason: Some("oversized"),
            detail: Some("why"),
            ..borrowed
        };
        assert_eq!(borrowed.to_json(), e.to_json());
    }

    #[test]
    fn matches_the_documented_example() {
        let mut e = Event::new(Kind::Invalidate, "main-db");
        e.lsn = Some("0/1A2B3C4".into());
        e.xid = Some(7781);
        e.commit_time = Some("2026-11-23T09:30:00.123456Z".into());
        e.table = Some("public.products".into());
        e.op = Some("update".into());
        e.keys = vec!["shop:product:v3:42".into()];
        e.tags = vec!["shop:category:7".into()];
        assert_eq!(
            e.to_json(),
            r#"{"schema":1,"kind":"invalidate","source":"main-db","lsn":"0/1A2B3C4","xid":7781,"commit_time":"2026-11-23T09:30:00.123456Z","table":"public.products","op":"update","keys":["shop:product:v3:42"],"tags":["shop:category:7"]}"#
        );
    }

    #[test]
    fn unknown_kinds_and_fields_are_tolerated() {
        let e: Event = serde_json::from_str(
            r#"{"schema":1,"kind":"rebalance","source":"x","future":{"a":1}}"#,
        )
        .unwrap();
        assert_eq!(e.kind, Kind::Unknown);
        let e: Event = serde_json::from_str(
            r#"{"schema":1,"kind":"flush_all","source":"x","reason":"truncate"}"#,
        )
        .unwrap();
        assert_eq!(
            (e.kind, e.reason.as_deref()),
            (Kind::FlushAll, Some("truncate"))
        );
    }
}
