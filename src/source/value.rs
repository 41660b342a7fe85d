//! Postgres values as JSON: numbers as JSON numbers where exact, `numeric` as a
//! string (a JSON number would lose digits in most readers), json/jsonb embedded,
//! booleans as booleans, everything else as its Postgres text form.

use serde_json::{Map, Value as Json};

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

/// A column value Postgres sent that is not what its type promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column:?} of {table}: {problem}")]
pub struct ValueError {
    pub table: String,
    pub column: String,
    pub problem: String,
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

/// The JSON form of one value as a tree (for display); `None` when not sent.
pub fn to_json(column: &Column, value: &Value) -> Result<Option<Json>, String> {
    let mut out = String::new();
    if !write_json(&mut out, column, value)? {
        return Ok(None);
    }
    serde_json::from_str(&out)
        .map(Some)
        .map_err(|e| format!("value is not valid JSON: {e}"))
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

/// The known columns of a row as a JSON object, by column name.
pub fn row_to_json(relation: &Relation, row: &Row) -> Result<Map<String, Json>, ValueError> {
    let mut out = Map::with_capacity(row.0.len());
    for (column, value) in relation.columns.iter().zip(&row.0) {
        let json = to_json(column, value).map_err(|problem| ValueError {
            table: relation.qualified_name(),
            column: column.name.clone(),
            problem,
        })?;
        if let Some(json) = json {
            out.insert(column.name.clone(), json);
        }
    }
    Ok(out)
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
    use serde_json::json;

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
            assert_eq!(
                to_json(&col(type_oid), &text(input)),
                Ok(Some(expected)),
                "{input}"
            );
        }
    }

    #[test]
    fn values_not_sent_have_no_json() {
        assert_eq!(to_json(&col(oid::TEXT), &Value::UnchangedToast), Ok(None));
        assert_eq!(to_json(&col(oid::TEXT), &Value::NotSent), Ok(None));
        assert_eq!(to_json(&col(oid::TEXT), &Value::Null), Ok(Some(Json::Null)));
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
    fn malformed_values_are_errors() {
        assert!(to_json(&col(oid::INT4), &text("4x")).is_err());
        assert!(to_json(&col(oid::BOOL), &text("yes")).is_err());
        let bad = Value::Text(Bytes::from_static(&[0xff, 0xfe]));
        assert!(to_json(&col(oid::TEXT), &bad).is_err());
    }
}
