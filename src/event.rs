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
    /// was created again: events may have been lost with it), `oversized` (a key or
    /// tag too large for an event) or `schema_changed` (a change whose table lacked a
    /// column of a rule's keys or tags). A subscriber flushes whatever the reason, also one
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

/// A value written as one JSON string by [`EventRef::to_json`].
pub trait JsonString {
    /// Appends the string's contents as UTF-8, escaped as JSON, without the quotes.
    fn write_json(&self, out: &mut Vec<u8>);
}

impl JsonString for &str {
    fn write_json(&self, out: &mut Vec<u8>) {
        escape_into(self, out)
    }
}

impl JsonString for crate::Lsn {
    /// Hexadecimal digits and a slash: nothing to escape.
    fn write_json(&self, out: &mut Vec<u8>) {
        digits_into::<16>(self.0 >> 32, out);
        out.push(b'/');
        digits_into::<16>(self.0 & 0xFFFF_FFFF, out);
    }
}

/// `v` in base `RADIX` (10 or 16, upper-case) without leading zeros, as `{}` and
/// `{:X}` write it.
fn digits_into<const RADIX: u64>(mut v: u64, out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(v % RADIX) as usize];
        v /= RADIX;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Whether any byte of `bytes` is below 0x20, `"` or `\\`: eight bytes at a time, each
/// word tested with the classic "has a byte less than n / equal to c" bit tricks
/// (exact as a yes/no answer), the last bytes one by one.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * n as u64) & !w & HIGH != 0;
    let has = |w: u64, c: u8| below(w ^ (ONES * c as u64), 1);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let w = u64::from_ne_bytes(word.try_into().expect("eight bytes"));
        if below(w, 0x20) || has(w, b'"') || has(w, b'\\') {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// `s` escaped as serde_json escapes it: `"` and `\` with a backslash, the control
/// characters below 0x20 as `\b \t \n \f \r` or `\u00XX`; everything else as is.
/// Every byte escaped is ASCII, never part of a longer UTF-8 sequence, so the
/// output is UTF-8 when `s` is.
fn escape_into(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    // Most strings need nothing escaped: checked eight bytes at a time, then copied
    // whole.
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xF) as usize],
            ]);
        } else {
            out.extend_from_slice(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// An event borrowed from what it describes, for the daemon's hot path: written
/// straight into its message buffer by hand (no owned copy of every key, no
/// intermediate strings for the LSN and the time, no formatting machinery: serde's
/// cost a tenth of the daemon's CPU in the tag-heavy catch-up). Writes exactly what
/// [`Event::to_json`] writes for the same content (tested below against it).
pub struct EventRef<'a, K: AsRef<str> = &'a str, T: AsRef<str> = &'a str> {
    pub schema: u32,
    pub kind: &'a Kind,
    pub source: &'a str,
    pub lsn: Option<&'a dyn JsonString>,
    pub xid: Option<u32>,
    pub commit_time: Option<&'a dyn JsonString>,
    pub table: Option<&'a str>,
    pub op: Option<&'a str>,
    /// A plan's own list (`&[String]`) or one gathered for the event (`&[&str]`):
    /// either is written without a copy.
    pub keys: &'a [K],
    pub tags: &'a [T],
    pub reason: Option<&'a str>,
    pub detail: Option<&'a str>,
}

impl<K: AsRef<str>, T: AsRef<str>> EventRef<'_, K, T> {
    /// The length of the JSON when no string needs escaping, or more: the buffer
    /// `to_json` starts with, so that it never grows (a reallocation and a copy per
    /// event otherwise).
    fn capacity(&self) -> usize {
        // Every field name, quote and separator with the longest value of each
        // fixed-format field (schema and xid 10 digits, lsn 17, commit_time 27, kind 10,
        // op 8): 212 bytes.
        const FIXED: usize = 256;
        fn strings<S: AsRef<str>>(v: &[S]) -> usize {
            v.iter().map(|s| s.as_ref().len() + 3).sum()
        }
        FIXED
            + self.source.len()
            + self.table.map_or(0, str::len)
            + self.op.map_or(0, str::len)
            + strings(self.keys)
            + strings(self.tags)
            + self.reason.map_or(0, str::len)
            + self.detail.map_or(0, str::len)
    }

    /// The event's JSON. Written as bytes (a copy of each piece, no per-character
    /// pushes), checked as UTF-8 once at the end.
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(self.capacity());
        out.extend_from_slice(b"{\"schema\":");
        digits_into::<10>(self.schema.into(), &mut out);
        out.extend_from_slice(match self.kind {
            Kind::Invalidate => b",\"kind\":\"invalidate\"",
            Kind::FlushAll => b",\"kind\":\"flush_all\"",
            Kind::Heartbeat => b",\"kind\":\"heartbeat\"",
            Kind::Unknown => b",\"kind\":\"unknown\"",
        });
        // `prefix` is `,"name":"`.
        let field = |out: &mut Vec<u8>, prefix: &[u8], value: &dyn JsonString| {
            out.extend_from_slice(prefix);
            value.write_json(out);
            out.push(b'"');
        };
        field(&mut out, b",\"source\":\"", &self.source);
        if let Some(lsn) = self.lsn {
            field(&mut out, b",\"lsn\":\"", lsn);
        }
        if let Some(xid) = self.xid {
            out.extend_from_slice(b",\"xid\":");
            digits_into::<10>(xid.into(), &mut out);
        }
        if let Some(t) = self.commit_time {
            field(&mut out, b",\"commit_time\":\"", t);
        }
        if let Some(table) = self.table {
            field(&mut out, b",\"table\":\"", &table);
        }
        if let Some(op) = self.op {
            field(&mut out, b",\"op\":\"", &op);
        }
        // `prefix` is `,"name":[`.
        fn list<S: AsRef<str>>(out: &mut Vec<u8>, prefix: &[u8], values: &[S]) {
            if values.is_empty() {
                return;
            }
            out.extend_from_slice(prefix);
            for (i, v) in values.iter().enumerate() {
                out.extend_from_slice(if i > 0 { b",\"" } else { b"\"" });
                escape_into(v.as_ref(), out);
                out.push(b'"');
            }
            out.push(b']');
        }
        list(&mut out, b",\"keys\":[", self.keys);
        list(&mut out, b",\"tags\":[", self.tags);
        if let Some(reason) = self.reason {
            field(&mut out, b",\"reason\":\"", &reason);
        }
        if let Some(detail) = self.detail {
            field(&mut out, b",\"detail\":\"", &detail);
        }
        out.push(b'}');
        String::from_utf8(out).expect("every piece of an event is UTF-8")
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
    fn the_longest_event_without_escapes_fits_the_buffer_it_starts_with() {
        let lsn = crate::Lsn(u64::MAX);
        // 9999-12-31T23:59:59.999999Z, the last time of four-digit years.
        let time = crate::pgtime::PgTime(252_455_615_999_999_999);
        for (kind, op, reason) in [
            (&Kind::Invalidate, "truncate", None),
            (&Kind::FlushAll, "message", Some("topic_lost")),
            (&Kind::Heartbeat, "update", None),
        ] {
            let e = EventRef {
                schema: u32::MAX,
                kind,
                source: "s",
                lsn: Some(&lsn),
                xid: Some(u32::MAX),
                commit_time: Some(&time),
                table: Some("t"),
                op: Some(op),
                keys: &["k", ""],
                tags: &["t"],
                reason,
                detail: Some("d"),
            };
            let json = e.to_json();
            assert!(
                json.len() <= e.capacity(),
                "{} bytes over a capacity of {}: {json}",
                json.len(),
                e.capacity()
            );
        }
    }

    #[test]
    fn a_character_to_escape_is_found_at_every_position() {
        let special = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        for len in 0..20 {
            for at in 0..len {
                for b in 0u8..=0xff {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    assert_eq!(
                        needs_escape(&bytes),
                        special(b),
                        "byte {b:#x} at {at} of {len}"
                    );
                }
            }
            assert!(!needs_escape(&vec![0x7f; len]));
            // Mixed bytes (a fixed pseudo-random sequence), against the byte-wise test.
            let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ len as u64;
            for _ in 0..2000 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Mostly bytes that need nothing, some that do.
                        [
                            b'a',
                            0x80,
                            0xff,
                            0x20,
                            0x5c,
                            0x22,
                            0x1f,
                            0x00,
                            (x >> 24) as u8,
                        ][(x % 9) as usize]
                    })
                    .collect();
                assert_eq!(
                    needs_escape(&bytes),
                    bytes.iter().any(|&b| special(b)),
                    "{bytes:x?}"
                );
            }
            // Bytes just above each boundary, and UTF-8 continuation bytes.
            for b in [0x20, 0x21, 0x23, 0x5b, 0x5d, 0x80, 0xa2, 0xdc, 0xff] {
                assert!(!needs_escape(&vec![b; len]), "{b:#x} x {len}");
            }
        }
    }

    #[test]
    fn every_character_that_needs_escaping_is_escaped_as_serde_json_does() {
        let mut text: String = (0u8..0x20).map(char::from).collect();
        text.push_str("\"\\\u{7f}/é\u{2028}x");
        let mut e = Event::new(Kind::Invalidate, text.clone());
        e.keys = vec![text.clone(), "plain".into()];
        let keys = [text.as_str(), "plain"];
        let borrowed: EventRef = EventRef {
            schema: SCHEMA,
            kind: &Kind::Invalidate,
            source: &text,
            lsn: None,
            xid: None,
            commit_time: None,
            table: None,
            op: None,
            keys: &keys,
            tags: &[],
            reason: None,
            detail: None,
        };
        assert_eq!(borrowed.to_json(), e.to_json());
    }

    proptest::proptest! {
        /// Any text in any field is written as serde_json writes it.
        #[test]
        fn the_hand_written_json_is_serde_json_s(
            source in "\\PC*",
            table in proptest::option::of("(\\PC|[\\x00-\\x1f\"\\\\\u{7f}])*"),
            keys in proptest::collection::vec("(\\PC|[\\x00-\\x1f\"\\\\])*", 0..4),
            tags in proptest::collection::vec("\\PC*", 0..3),
            lsn in proptest::num::u64::ANY,
            xid in proptest::option::of(proptest::num::u32::ANY),
        ) {
            let mut e = Event::new(Kind::FlushAll, source.clone());
            e.lsn = Some(crate::Lsn(lsn).to_string());
            e.xid = xid;
            e.table = table.clone();
            e.keys = keys.clone();
            e.tags = tags.clone();
            let lsn = crate::Lsn(lsn);
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            let borrowed = EventRef {
                schema: SCHEMA,
                kind: &Kind::FlushAll,
                source: &source,
                lsn: Some(&lsn),
                xid,
                commit_time: None,
                table: table.as_deref(),
                op: None,
                keys: &keys,
                tags: &tags,
                reason: None,
                detail: None,
            };
            proptest::prop_assert_eq!(borrowed.to_json(), e.to_json());
        }
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
