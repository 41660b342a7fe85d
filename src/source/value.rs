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

/// The JSON form of one known value; `None` for values that were not sent
/// (unchanged TOAST, not in a key-only old row): there is no value to show.
pub fn to_json(column: &Column, value: &Value) -> Result<Option<Json>, String> {
    let text = match value {
        Value::Null => return Ok(Some(Json::Null)),
        Value::UnchangedToast | Value::NotSent => return Ok(None),
        Value::Binary(b) => return Ok(Some(Json::String(hex(b)))),
        Value::Text(b) => {
            std::str::from_utf8(b).map_err(|_| "text form is not valid UTF-8".to_string())?
        }
    };
    let json = match column.type_oid {
        oid::BOOL => match text {
            "t" => Json::Bool(true),
            "f" => Json::Bool(false),
            other => return Err(format!("boolean sent as {other:?}")),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => match text.parse::<i64>() {
            Ok(n) => Json::from(n),
            Err(_) => return Err(format!("integer sent as {text:?}")),
        },
        // Finite floats are exact as JSON numbers (shortest round-trip form);
        // NaN and ±Infinity have no JSON number, so they stay text.
        oid::FLOAT4 | oid::FLOAT8 => match text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
        {
            Some(n) => Json::Number(n),
            None => Json::String(text.to_string()),
        },
        oid::JSON | oid::JSONB => match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return Err(format!("json value does not parse: {e}")),
        },
        _ => Json::String(text.to_string()),
    };
    Ok(Some(json))
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
    fn malformed_values_are_errors() {
        assert!(to_json(&col(oid::INT4), &text("4x")).is_err());
        assert!(to_json(&col(oid::BOOL), &text("yes")).is_err());
        assert!(to_json(&col(oid::JSON), &text("{")).is_err());
        let bad = Value::Text(Bytes::from_static(&[0xff, 0xfe]));
        assert!(to_json(&col(oid::TEXT), &bad).is_err());
    }
}
