//! Postgres values as JSON: numbers as JSON numbers where exact, `numeric` as a
//! string (a JSON number would lose digits in most readers), json/jsonb embedded,
//! booleans as booleans, everything else as its Postgres text form.

use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

use crate::source::change::{Column, Relation, Row, Value};

pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const VARCHAR: u32 = 1043;
    pub const NUMERIC: u32 = 1700;
    pub const JSONB: u32 = 3802;
}

/// Appends the JSON form of one value to `out`. Returns `Ok(false)`, writing nothing,
/// for values that were not sent (unchanged TOAST, outside a key-only old row): there
/// is no value to write.
pub fn write_json(out: &mut String, column: &Column, value: &Value) -> Result<bool, String> {
    let text = match value {
        Value::Null => {
            out.push_str("null");
            return Ok(true);
        }
        Value::UnchangedToast | Value::NotSent => return Ok(false),
        Value::Binary(b) => {
            write_string(out, &hex(b));
            return Ok(true);
        }
        Value::Text(b) => {
            std::str::from_utf8(b).map_err(|_| "text form is not valid UTF-8".to_string())?
        }
    };
    match column.type_oid {
        oid::BOOL => match text {
            "t" => out.push_str("true"),
            "f" => out.push_str("false"),
            other => return Err(format!("boolean sent as {other:?}")),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => {
            if text.parse::<i64>().is_err() {
                return Err(format!("integer sent as {text:?}"));
            }
            out.push_str(text);
        }
        // Postgres prints floats in their shortest exact form, which is a JSON number
        // when finite; NaN and ±Infinity have no JSON number, so they stay text.
        oid::FLOAT4 | oid::FLOAT8 if is_json_number(text) => out.push_str(text),
        // Validated by Postgres on input: embedded as they are.
        oid::JSON | oid::JSONB => out.push_str(text),
        _ => write_string(out, text),
    }
    Ok(true)
}

/// One value for display: its exact JSON text, or, when that is not valid JSON (a
/// value Postgres sent that is not what its type promises), its text as a JSON string.
#[derive(Debug, Clone)]
pub enum JsonCell {
    /// The JSON text `write_json` produced, validated, on one line.
    Exact(Box<RawValue>),
    /// The value's text, shown as a string, and why it could not be shown as JSON.
    Text { text: String, problem: String },
}

impl Serialize for JsonCell {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            JsonCell::Exact(raw) => raw.serialize(s),
            JsonCell::Text { text, .. } => s.serialize_str(text),
        }
    }
}

impl JsonCell {
    /// Validates JSON text without building a tree: no depth limit, and numbers are
    /// never converted, so they stay exactly as Postgres printed them. Line breaks
    /// (whitespace between tokens in valid JSON) become spaces, so a line stays a line.
    pub fn from_json_text(text: String) -> Result<JsonCell, String> {
        let text = if text.contains(['\n', '\r']) {
            text.replace(['\n', '\r'], " ")
        } else {
            text
        };
        match RawValue::from_string(text) {
            Ok(raw) => Ok(JsonCell::Exact(raw)),
            Err(e) => Err(format!("not valid JSON: {e}")),
        }
    }
}

/// One value for display; `None` when it was not sent (unchanged TOAST, outside a
/// key-only old row). Never fails: what is not valid JSON is shown as text.
pub fn display_json(column: &Column, value: &Value) -> Option<JsonCell> {
    let mut out = String::new();
    let problem = match write_json(&mut out, column, value) {
        Ok(false) => return None,
        Ok(true) => match JsonCell::from_json_text(out) {
            Ok(cell) => return Some(cell),
            Err(problem) => problem,
        },
        Err(problem) => problem,
    };
    let text = match value {
        Value::Text(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Binary(b) => hex(b),
        Value::Null | Value::UnchangedToast | Value::NotSent => String::new(),
    };
    Some(JsonCell::Text { text, problem })
}

/// The values of a row that were sent, by column name, for display; serializes as a
/// JSON object. Built from the same text as republished values (`write_json`), never
/// re-parsed into a tree.
#[derive(Debug, Clone, Default)]
pub struct RowJson(pub Vec<(String, JsonCell)>);

impl RowJson {
    pub fn new(relation: &Relation, row: &Row) -> RowJson {
        RowJson(
            relation
                .columns
                .iter()
                .zip(&row.0)
                .filter_map(|(column, value)| {
                    display_json(column, value).map(|cell| (column.name.clone(), cell))
                })
                .collect(),
        )
    }

    /// Columns shown as text instead of JSON, with why.
    pub fn as_text(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().filter_map(|(name, cell)| match cell {
            JsonCell::Text { problem, .. } => Some((name.as_str(), problem.as_str())),
            JsonCell::Exact(_) => None,
        })
    }
}

impl Serialize for RowJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

fn write_string(out: &mut String, s: &str) {
    // Serializing a &str into a String cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// JSON's number grammar: `-? (0 | [1-9][0-9]*) (\.[0-9]+)? ([eE][+-]?[0-9]+)?`.
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("\\x");
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::{json, Value as Json};

    fn col(type_oid: u32) -> Column {
        Column {
            name: "c".into(),
            type_oid,
            type_modifier: -1,
            is_key: false,
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// The JSON text a value is shown as.
    fn shown(type_oid: u32, value: &Value) -> Option<String> {
        display_json(&col(type_oid), value).map(|cell| serde_json::to_string(&cell).unwrap())
    }

    #[test]
    fn typed_values() {
        let cases = [
            (oid::INT4, "42", json!(42)),
            (oid::INT8, "-9223372036854775808", json!(i64::MIN)),
            (oid::BOOL, "t", json!(true)),
            (oid::FLOAT8, "1.5", json!(1.5)),
            (oid::FLOAT8, "NaN", json!("NaN")),
            (oid::FLOAT4, "-Infinity", json!("-Infinity")),
            (
                oid::NUMERIC,
                "12345678901234567890.0001",
                json!("12345678901234567890.0001"),
            ),
            (oid::JSONB, r#"{"a": [1, 2]}"#, json!({"a": [1, 2]})),
            (oid::TEXT, "héllo ✓", json!("héllo ✓")),
            (oid::BYTEA, "\\x00ff", json!("\\x00ff")),
        ];
        for (type_oid, input, expected) in cases {
            let shown = shown(type_oid, &text(input)).unwrap();
            assert_eq!(
                serde_json::from_str::<Json>(&shown).unwrap(),
                expected,
                "{input}"
            );
        }
    }

    #[test]
    fn numbers_and_nesting_are_shown_exactly_as_postgres_printed_them() {
        let deep = format!("{}1{}", "[".repeat(500), "]".repeat(500));
        for (type_oid, input) in [
            (oid::FLOAT8, "1.2345678901234567e-300"),
            (oid::FLOAT8, "1e+20"),
            (oid::FLOAT4, "-0"),
            (oid::JSON, "1e400"),
            (oid::JSONB, "10000000000000000000000001"),
            (oid::JSONB, deep.as_str()),
        ] {
            assert_eq!(shown(type_oid, &text(input)).as_deref(), Some(input));
        }
        assert_eq!(
            shown(oid::JSON, &text("{\"a\":\r\n [1, \"x\\ny\"]}")).as_deref(),
            Some("{\"a\":   [1, \"x\\ny\"]}"),
            "a line break between tokens becomes a space, one inside a string stays escaped"
        );
    }

    #[test]
    fn values_not_sent_are_not_shown() {
        assert_eq!(shown(oid::TEXT, &Value::UnchangedToast), None);
        assert_eq!(shown(oid::TEXT, &Value::NotSent), None);
        assert_eq!(shown(oid::TEXT, &Value::Null).as_deref(), Some("null"));
    }

    #[test]
    fn json_numbers() {
        for ok in ["0", "-0", "1.5", "1e+20", "-2.25e-10", "123", "0.001"] {
            assert!(is_json_number(ok), "{ok}");
        }
        for bad in [
            "",
            "-",
            "01",
            "1.",
            ".5",
            "1e",
            "NaN",
            "Infinity",
            "-Infinity",
            "1x",
        ] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }

    #[test]
    fn malformed_values_are_shown_as_text_with_the_problem() {
        for (type_oid, value, shown_as) in [
            (oid::INT4, text("4x"), "4x"),
            (oid::BOOL, text("yes"), "yes"),
            (oid::JSONB, text("{nope"), "{nope"),
            (
                oid::TEXT,
                Value::Text(Bytes::from_static(&[b'a', 0xff])),
                "a\u{fffd}",
            ),
        ] {
            match display_json(&col(type_oid), &value) {
                Some(JsonCell::Text { text, problem }) => {
                    assert_eq!(text, shown_as);
                    assert!(!problem.is_empty());
                }
                other => panic!("{value:?}: {other:?}"),
            }
        }
        let relation = Relation {
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: crate::source::change::ReplicaIdentity::Default,
            columns: vec![col(oid::INT4)],
            ancestors: Vec::new(),
        };
        let row = RowJson::new(&relation, &Row(vec![text("4x")]));
        assert_eq!(serde_json::to_string(&row).unwrap(), r#"{"c":"4x"}"#);
        assert_eq!(row.as_text().count(), 1);
    }
}
