//! The logical messages that invalidate: `wal2cache.invalidate(keys, tags)` (see
//! migrations/) writes `{"keys":[...],"tags":[...]}` under the prefix `wal2cache`;
//! `wal2cache invalidate --all` writes `{"all":true,"reason":"..."}`: everything the
//! rules cache is flushed and every subscriber empties itself.

use crate::plan::Plan;
use crate::rules::plan::PlanBuilder;
use crate::source::messages::MESSAGE_PREFIX;

/// A `wal2cache` logical message that is not `{"keys":[...],"tags":[...]}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed wal2cache message {content:?}: {problem}; expected {{\"keys\":[\"...\"],\"tags\":[\"...\"]}} or {{\"all\":true,\"reason\":\"...\"}}")]
pub struct MessageError {
    pub content: String,
    pub problem: String,
}

/// The plan for a logical message: `None` when the message is not for wal2cache.
///
/// A message that is not an object of `keys` and `tags` arrays is an error. Inside the
/// arrays, every string is taken; an entry that is not a non-empty string (a NULL from
/// `wal2cache.invalidate(ARRAY['k', NULL])`) is skipped, counted and logged, and never
/// drops the valid entries beside it.
pub fn plan_message(prefix: &str, content: &[u8]) -> Option<Result<Plan, MessageError>> {
    if prefix != MESSAGE_PREFIX {
        return None;
    }
    let err = |problem: String| MessageError {
        content: String::from_utf8_lossy(content).chars().take(200).collect(),
        problem,
    };
    let parsed = match serde_json::from_slice::<serde_json::Value>(content) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(_) => return Some(Err(err("not a JSON object".into()))),
        Err(e) => return Some(Err(err(e.to_string()))),
    };
    if let Some(unknown) = parsed
        .keys()
        .find(|k| !["keys", "tags", "all", "reason"].contains(&k.as_str()))
    {
        return Some(Err(err(format!("unknown field {unknown:?}"))));
    }
    match parsed.get("all") {
        None | Some(serde_json::Value::Bool(false)) => {}
        Some(serde_json::Value::Bool(true)) => {
            // Filled in with the rules' prefixes by the pipeline (`rules::plan_flush`).
            return Some(Ok(Plan {
                flush_all: true,
                detail: parsed
                    .get("reason")
                    .and_then(|r| r.as_str())
                    .map(|r| r.chars().take(500).collect()),
                ..Plan::default()
            }));
        }
        Some(other) => return Some(Err(err(format!("\"all\" is {other}, not true or false")))),
    }
    let mut plan = PlanBuilder::default();
    let mut skipped = Vec::new();
    for field in ["keys", "tags"] {
        let entries = match parsed.get(field) {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::Array(a)) => a,
            Some(other) => {
                return Some(Err(err(format!(
                    "{field:?} is {other}, not an array of strings"
                ))))
            }
        };
        for entry in entries {
            match entry.as_str() {
                Some(s) if !s.is_empty() && field == "keys" => plan.delete(s.to_string()),
                Some(s) if !s.is_empty() => plan.purge(s.to_string()),
                _ => skipped.push(format!(
                    "{}: {}",
                    &field[..3],
                    entry.to_string().chars().take(40).collect::<String>()
                )),
            }
        }
    }
    if !skipped.is_empty() {
        metrics::counter!("wal2cache_message_entries_skipped_total")
            .increment(skipped.len() as u64);
        tracing::warn!(
            skipped = ?skipped,
            "a wal2cache message holds entries that are not non-empty strings (NULL or empty in wal2cache.invalidate?): they were skipped, the other keys and tags are invalidated"
        );
    }
    Some(Ok(plan.finish()))
}
