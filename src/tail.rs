//! `wal2cache tail`: every decoded change as one JSON object per line, so a user can
//! see exactly what the daemon sees.

use serde_json::{json, Map, Value as Json};

use crate::rules::plan::{plan_message, NoteKind, Plan, Planner};
use crate::source::change::{Change, SourceEvent, TxnInfo};
use crate::source::format_pg_time;
use crate::source::pgoutput::OldKind;
use crate::source::value::{row_to_json, ValueError};

/// Turns source events into JSON lines, each with its plan; remembers the transaction
/// in progress so every line carries its xid, commit LSN and commit time.
#[derive(Debug)]
pub struct TailFormatter {
    txn: Option<TxnInfo>,
    planner: Planner,
}

impl TailFormatter {
    pub fn new(planner: Planner) -> Self {
        TailFormatter { txn: None, planner }
    }

    /// Plans with other rules from now on (SIGHUP).
    pub fn set_planner(&mut self, planner: Planner) {
        self.planner = planner;
    }

    /// The line for an event, if it gets one (Begin and Commit don't).
    pub fn line(&mut self, event: &SourceEvent) -> Result<Option<Json>, ValueError> {
        let mut line = match event {
            SourceEvent::Begin(txn) => {
                self.txn = Some(*txn);
                return Ok(None);
            }
            SourceEvent::Commit(_) => {
                self.txn = None;
                return Ok(None);
            }
            SourceEvent::Change(change) => {
                let mut m = change_json(change)?;
                let plan = self.planner.plan_change(change).map_err(|e| e.to_string());
                add_plan(&mut m, Some(plan));
                m
            }
            SourceEvent::Truncate {
                relations,
                cascade,
                restart_identity,
            } => {
                let mut m = Map::new();
                m.insert("op".into(), json!("truncate"));
                let tables: Vec<String> = relations.iter().map(|r| r.qualified_name()).collect();
                m.insert("tables".into(), json!(tables));
                m.insert("cascade".into(), json!(cascade));
                m.insert("restart_identity".into(), json!(restart_identity));
                add_plan(&mut m, Some(Ok(self.planner.plan_truncate(relations))));
                m
            }
            SourceEvent::Message { prefix, .. }
                if prefix == crate::pipeline::HEARTBEAT_PREFIX
                    || prefix == crate::pipeline::RELOAD_PREFIX =>
            {
                return Ok(None);
            }
            SourceEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                let mut m = Map::new();
                m.insert("op".into(), json!("message"));
                m.insert("message_lsn".into(), json!(lsn.to_string()));
                m.insert("transactional".into(), json!(transactional));
                m.insert("prefix".into(), json!(prefix));
                match std::str::from_utf8(content) {
                    Ok(text) => m.insert("content".into(), json!(text)),
                    Err(_) => m.insert("content_hex".into(), json!(hex(content))),
                };
                add_plan(
                    &mut m,
                    plan_message(prefix, content).map(|p| p.map_err(|e| e.to_string())),
                );
                m
            }
        };
        let mut out = Map::new();
        if let Some(txn) = self.txn.filter(|_| !is_bare_message(event)) {
            out.insert("lsn".into(), json!(txn.commit_lsn.to_string()));
            out.insert("xid".into(), json!(txn.xid));
            out.insert("commit_time".into(), json!(format_pg_time(txn.commit_time)));
        }
        out.append(&mut line);
        Ok(Some(Json::Object(out)))
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

fn change_json(change: &Change) -> Result<Map<String, Json>, ValueError> {
    let r = &change.relation;
    let mut m = Map::new();
    m.insert("table".into(), json!(r.qualified_name()));
    m.insert("op".into(), json!(change.op.as_str()));
    m.insert(
        "replica_identity".into(),
        json!(r.replica_identity.as_str()),
    );
    let keys: Vec<&str> = r
        .columns
        .iter()
        .filter(|c| c.is_key)
        .map(|c| c.name.as_str())
        .collect();
    m.insert("key_columns".into(), json!(keys));
    if let Some(old) = &change.old {
        m.insert("old".into(), Json::Object(row_to_json(r, old)?));
        let kind = match change.old_kind {
            Some(OldKind::Full) => "full",
            _ => "key",
        };
        m.insert("old_kind".into(), json!(kind));
    }
    if let Some(new) = &change.new {
        m.insert("new".into(), Json::Object(row_to_json(r, new)?));
    }
    let unchanged: Vec<&str> = change.unchanged_columns().collect();
    if !unchanged.is_empty() {
        m.insert("unchanged".into(), json!(unchanged));
    }
    Ok(m)
}

/// `"plan": {...}` or `"plan_error": "..."`; nothing for events no rule concerns.
fn add_plan(m: &mut Map<String, Json>, plan: Option<Result<Plan, String>>) {
    match plan {
        None => {}
        Some(Ok(plan)) => {
            m.insert("plan".into(), plan_json(&plan));
        }
        Some(Err(e)) => {
            m.insert("plan_error".into(), json!(e));
        }
    }
}

/// A plan as JSON; empty parts are left out.
pub fn plan_json(plan: &Plan) -> Json {
    let mut m = Map::new();
    if !plan.delete.is_empty() {
        m.insert("delete".into(), json!(plan.delete));
    }
    if !plan.republish.is_empty() {
        let items: Vec<Json> = plan
            .republish
            .iter()
            .map(|r| {
                let value: Json =
                    serde_json::from_str(&r.value).unwrap_or_else(|_| json!(&*r.value));
                json!({"key": r.key, "ttl_s": r.ttl.map(|t| t.as_secs()), "value": value})
            })
            .collect();
        m.insert("republish".into(), Json::Array(items));
    }
    if !plan.purge_tags.is_empty() {
        m.insert("purge_tags".into(), json!(plan.purge_tags));
    }
    if !plan.flush_prefixes.is_empty() {
        m.insert("flush_prefixes".into(), json!(plan.flush_prefixes));
    }
    if plan.flush_all {
        m.insert("flush_all".into(), json!(true));
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
                }
                note
            })
            .collect();
        m.insert("notes".into(), Json::Array(notes));
    }
    Json::Object(m)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
