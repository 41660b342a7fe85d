//! `wal2cache tail`: every decoded change as one JSON object per line, so a user can
//! see exactly what the daemon sees. Row values and republished values are embedded
//! as the exact JSON text the daemon writes (never re-parsed: no depth limit, no
//! number through f64); a value that is not valid JSON is shown as a string, marked.

use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::{json, Value as Json};

use crate::pgtime::format_pg_time;
use crate::plan::{NoteKind, Plan};
use crate::rules::{plan_message, Planner};
use crate::source::change::{Change, SourceEvent, TxnInfo};
use crate::source::pgoutput::OldKind;
use crate::source::value::{JsonCell, RowJson};

/// A field of a line: plain JSON, or text embedded as it is.
#[derive(Debug)]
enum Field {
    Json(Json),
    Row(RowJson),
    Republish(Vec<RepublishJson>),
    Object(Object),
}

impl Serialize for Field {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Field::Json(v) => v.serialize(s),
            Field::Row(r) => r.serialize(s),
            Field::Republish(r) => r.serialize(s),
            Field::Object(o) => o.serialize(s),
        }
    }
}

impl From<Json> for Field {
    fn from(v: Json) -> Self {
        Field::Json(v)
    }
}

/// A JSON object whose fields keep their order.
#[derive(Debug, Default)]
struct Object(Vec<(&'static str, Field)>);

impl Object {
    fn insert(&mut self, key: &'static str, value: impl Into<Field>) {
        self.0.push((key, value.into()));
    }
}

impl Serialize for Object {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

#[derive(Debug, Serialize)]
struct RepublishJson {
    key: String,
    ttl_s: Option<u64>,
    value: JsonCell,
    /// Present (true) when `value` is not valid JSON and is shown as a string.
    #[serde(skip_serializing_if = "Option::is_none")]
    value_as_text: Option<bool>,
}

/// One line of `tail`'s output: a JSON object; `Display` writes it on one line.
#[derive(Debug)]
pub struct TailLine(Object);

impl fmt::Display for TailLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Serializing strings, validated JSON text and string-keyed maps cannot fail.
        f.write_str(&serde_json::to_string(&self.0).map_err(|_| fmt::Error)?)
    }
}

/// Turns source events into JSON lines, each with its plan; remembers the transaction
/// in progress so every line carries its xid, commit LSN and commit time.
#[derive(Debug)]
pub struct TailFormatter {
    txn: Option<TxnInfo>,
    planner: Planner,
    values_as_text: u64,
}

impl TailFormatter {
    pub fn new(planner: Planner) -> Self {
        TailFormatter {
            txn: None,
            planner,
            values_as_text: 0,
        }
    }

    /// Plans with other rules from now on (SIGHUP).
    pub fn set_planner(&mut self, planner: Planner) {
        self.planner = planner;
    }

    /// How many values were shown as text because they were not valid JSON.
    pub fn values_as_text(&self) -> u64 {
        self.values_as_text
    }

    /// The line for an event, if it gets one (Begin and Commit don't). Never fails:
    /// a value that is not valid JSON is shown as a string and named in `as_text`.
    pub fn line(&mut self, event: &SourceEvent) -> Option<TailLine> {
        let line = match event {
            SourceEvent::Begin(txn) => {
                self.txn = Some(*txn);
                return None;
            }
            SourceEvent::Commit(_) => {
                self.txn = None;
                return None;
            }
            SourceEvent::Idle { .. } => return None,
            SourceEvent::Change(change) => {
                let mut m = self.change_json(change);
                let plan = self.planner.plan_change(change);
                self.add_plan(&mut m, Some(Ok(plan)), &change.relation.qualified_name());
                m
            }
            SourceEvent::Truncate {
                relations,
                cascade,
                restart_identity,
            } => {
                let mut m = Object::default();
                m.insert("op", json!("truncate"));
                let tables: Vec<String> = relations.iter().map(|r| r.qualified_name()).collect();
                m.insert("tables", json!(tables));
                m.insert("cascade", json!(cascade));
                m.insert("restart_identity", json!(restart_identity));
                let plan = self.planner.plan_truncate(relations);
                self.add_plan(&mut m, Some(Ok(plan)), "a truncate");
                m
            }
            SourceEvent::Message { prefix, .. }
                if prefix == crate::source::messages::HEARTBEAT_PREFIX
                    || prefix == crate::source::messages::RELOAD_PREFIX =>
            {
                return None;
            }
            SourceEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                let mut m = Object::default();
                m.insert("op", json!("message"));
                m.insert("message_lsn", json!(lsn.to_string()));
                m.insert("transactional", json!(transactional));
                m.insert("prefix", json!(prefix));
                match std::str::from_utf8(content) {
                    Ok(text) => m.insert("content", json!(text)),
                    Err(_) => m.insert("content_hex", json!(hex(content))),
                };
                let plan = plan_message(prefix, content).map(|p| p.map_err(|e| e.to_string()));
                self.add_plan(&mut m, plan, "a message");
                m
            }
        };
        let mut out = Object::default();
        if let Some(txn) = self.txn.filter(|_| !is_bare_message(event)) {
            out.insert("lsn", json!(txn.commit_lsn.to_string()));
            out.insert("xid", json!(txn.xid));
            out.insert("commit_time", json!(format_pg_time(txn.commit_time)));
        }
        out.0.extend(line.0);
        Some(TailLine(out))
    }

    fn change_json(&mut self, change: &Change) -> Object {
        let r = &change.relation;
        let mut m = Object::default();
        m.insert("table", json!(r.qualified_name()));
        m.insert("op", json!(change.op.as_str()));
        m.insert("replica_identity", json!(r.replica_identity.as_str()));
        let keys: Vec<&str> = r
            .columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| c.name.as_str())
            .collect();
        m.insert("key_columns", json!(keys));
        let mut as_text = Vec::new();
        let old = change.old.as_ref().map(|row| RowJson::new(r, row));
        let new = change.new.as_ref().map(|row| RowJson::new(r, row));
        for (which, row) in [("old", &old), ("new", &new)] {
            for (column, problem) in row.iter().flat_map(RowJson::as_text) {
                self.values_as_text += 1;
                tracing::warn!(
                    table = %r.qualified_name(),
                    column,
                    row = which,
                    lsn = %self.txn.map(|t| t.commit_lsn.to_string()).unwrap_or_default(),
                    shown_as_text = self.values_as_text,
                    "a value is not valid JSON in its type's form ({problem}): shown as a string of its text, named in the line's \"as_text\""
                );
                as_text.push(json!({"row": which, "column": column, "problem": problem}));
            }
        }
        if let Some(old) = old {
            m.insert("old", Field::Row(old));
            let kind = match change.old_kind {
                Some(OldKind::Full) => "full",
                _ => "key",
            };
            m.insert("old_kind", json!(kind));
        }
        if let Some(new) = new {
            m.insert("new", Field::Row(new));
        }
        let unchanged: Vec<&str> = change.unchanged_columns().collect();
        if !unchanged.is_empty() {
            m.insert("unchanged", json!(unchanged));
        }
        if !as_text.is_empty() {
            m.insert("as_text", Json::Array(as_text));
        }
        m
    }

    /// `"plan": {...}` or `"plan_error": "..."`; nothing for events no rule concerns.
    fn add_plan(&mut self, m: &mut Object, plan: Option<Result<Plan, String>>, what: &str) {
        match plan {
            None => {}
            Some(Ok(plan)) => {
                let plan = plan_json(&plan);
                for (key, problem) in &plan.values_as_text {
                    self.values_as_text += 1;
                    tracing::warn!(
                        %key,
                        shown_as_text = self.values_as_text,
                        "the value republished for {what} is not valid JSON ({problem}): shown as a string, marked \"value_as_text\""
                    );
                }
                m.insert("plan", Field::Object(plan.object));
            }
            Some(Err(e)) => {
                m.insert("plan_error", json!(e));
            }
        }
    }
}

fn is_bare_message(event: &SourceEvent) -> bool {
    matches!(
        event,
        SourceEvent::Message {
            transactional: false,
            ..
        }
    )
}

/// A plan as `tail` shows it, and the republished values that had to be shown as text.
#[derive(Debug)]
struct PlanJson {
    object: Object,
    /// (key, why) of each republished value that is not valid JSON.
    values_as_text: Vec<(String, String)>,
}

/// A plan as JSON; empty parts are left out. Republished values are embedded as the
/// exact text written to Redis.
fn plan_json(plan: &Plan) -> PlanJson {
    let mut m = Object::default();
    let mut values_as_text = Vec::new();
    if !plan.delete.is_empty() {
        m.insert("delete", json!(plan.delete));
    }
    if !plan.republish.is_empty() {
        let items = plan
            .republish
            .iter()
            .map(|r| {
                let value =
                    JsonCell::from_json_text(r.value.to_string()).unwrap_or_else(|problem| {
                        values_as_text.push((r.key.clone(), problem.clone()));
                        JsonCell::Text {
                            text: r.value.to_string(),
                            problem,
                        }
                    });
                let value_as_text = matches!(value, JsonCell::Text { .. }).then_some(true);
                RepublishJson {
                    key: r.key.clone(),
                    ttl_s: r.ttl.map(|t| t.as_secs()),
                    value,
                    value_as_text,
                }
            })
            .collect();
        m.insert("republish", Field::Republish(items));
    }
    if !plan.purge_tags.is_empty() {
        m.insert("purge_tags", json!(plan.purge_tags));
    }
    if !plan.flush_prefixes.is_empty() {
        m.insert("flush_prefixes", json!(plan.flush_prefixes));
    }
    if plan.flush_all {
        m.insert("flush_all", json!(true));
    }
    if !plan.notes.is_empty() {
        let notes: Vec<Json> = plan
            .notes
            .iter()
            .map(|n| {
                let mut note = json!({"rule": n.rule, "reason": n.kind.reason()});
                match &n.kind {
                    NoteKind::NullPlaceholder { template, column }
                    | NoteKind::NotInWal { template, column } => {
                        note["template"] = json!(template);
                        note["column"] = json!(column);
                    }
                    NoteKind::RepublishFellBack { key, column } => {
                        note["key"] = json!(key);
                        note["column"] = json!(column);
                    }
                    NoteKind::ColumnMissing { column, field } => {
                        note["column"] = json!(column);
                        note["field"] = json!(field);
                    }
                }
                note
            })
            .collect();
        m.insert("notes", Json::Array(notes));
    }
    PlanJson {
        object: m,
        values_as_text,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::source::change::{Column, Op, Relation, ReplicaIdentity, Row, Value};
    use crate::source::value::oid;

    #[test]
    fn a_value_that_is_not_valid_json_is_shown_as_text_and_marked() {
        let relation = Arc::new(Relation {
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: ["id", "n"]
                .into_iter()
                .map(|name| Column {
                    name: name.into(),
                    type_oid: oid::INT4,
                    type_modifier: -1,
                    is_key: name == "id",
                })
                .collect(),
            ancestors: Vec::new(),
        });
        let text = |s: &'static str| Value::Text(Bytes::from_static(s.as_bytes()));
        let change = Change {
            relation,
            op: Op::Insert,
            new: Some(Row(vec![text("1"), text("4x")])),
            old: None,
            old_kind: None,
        };
        let rules = crate::rules::compile::compile(Vec::new()).unwrap();
        let mut formatter = TailFormatter::new(Planner::new(Arc::new(rules)));
        let line = formatter
            .line(&SourceEvent::Change(change))
            .unwrap()
            .to_string();
        let line: Json = serde_json::from_str(&line).unwrap();
        assert_eq!(line["new"], json!({"id": 1, "n": "4x"}));
        assert_eq!(line["as_text"][0]["row"], "new");
        assert_eq!(line["as_text"][0]["column"], "n");
        assert_eq!(formatter.values_as_text(), 1);
    }
}
