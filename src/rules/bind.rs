//! Binding: a rule's templates and columns resolved to positions in one table shape,
//! once per shape, and rendering them for a row.

use std::sync::Arc;

use crate::plan::{Note, NoteKind};
use crate::rules::compile::{Action, Rule};
use crate::rules::template::{Segment, Template};
use crate::source::value::write_json;
use crate::source::{Relation, Row, Value};

#[derive(Debug)]
pub(super) struct BoundRule {
    pub(super) rule: Arc<Rule>,
    pub(super) keys: Vec<BoundTemplate>,
    pub(super) tags: Vec<BoundTemplate>,
    when_changed: Option<Vec<usize>>,
    /// Republish: the projected columns with their JSON-quoted names.
    columns: Vec<(usize, String)>,
    /// The first column of the rule this shape of the table does not have (a change
    /// written before the column was added, or after it was dropped or renamed), with
    /// the field naming it. In `keys` or `tags`: see [`Self::unbound`]; in
    /// `when_changed`: that list is dropped (every update matters).
    pub(super) lacking: Option<(String, &'static str)>,
    /// A projected column this shape lacks: no value, each key is deleted instead.
    value_unknown: Option<String>,
    /// The rule's counters, looked up once per binding, not per change.
    pub(super) counters: RuleCounters,
}

/// `wal2cache_rule_*_total{rule}`.
#[derive(Debug)]
pub(super) struct RuleCounters {
    /// Changes the rule produced something for.
    pub(super) plans: metrics::Counter,
    /// Keys it deleted or republished.
    pub(super) keys: metrics::Counter,
    /// Keys it skipped because a placeholder was NULL.
    pub(super) null_keys: metrics::Counter,
}

impl RuleCounters {
    fn new(rule: &str) -> RuleCounters {
        let rule = rule.to_string();
        RuleCounters {
            plans: metrics::counter!("wal2cache_rule_plans_total", "rule" => rule.clone()),
            keys: metrics::counter!("wal2cache_rule_keys_total", "rule" => rule.clone()),
            null_keys: metrics::counter!("wal2cache_rule_null_keys_total", "rule" => rule),
        }
    }
}

#[derive(Debug)]
pub(super) struct BoundTemplate {
    text: String,
    parts: Vec<Part>,
    /// Length of the literal parts, to size the key.
    literal_len: usize,
}

#[derive(Debug)]
enum Part {
    Literal(String),
    Column(usize),
}

/// A looked-up column: its text, a NULL, or not in the WAL.
enum Lookup<'a> {
    Text(&'a str),
    Null,
    Unknown,
}

fn lookup<'a>(row: &'a Row, fallback: Option<&'a Row>, i: usize) -> Lookup<'a> {
    let value = match row.get(i) {
        Some(Value::UnchangedToast | Value::NotSent) | None => {
            match fallback.and_then(|f| f.get(i)) {
                Some(v) => v,
                None => return Lookup::Unknown,
            }
        }
        Some(v) => v,
    };
    match value {
        Value::Text(b) => std::str::from_utf8(b).map_or(Lookup::Unknown, Lookup::Text),
        Value::Null => Lookup::Null,
        _ => Lookup::Unknown,
    }
}

/// The effective value of a column: from `row`, or from `fallback` when not sent.
fn effective<'a>(row: &'a Row, fallback: Option<&'a Row>, i: usize) -> Option<&'a Value> {
    match row.get(i) {
        Some(Value::UnchangedToast | Value::NotSent) | None => {
            fallback.and_then(|f| f.get(i)).filter(|v| v.is_known())
        }
        Some(v) => Some(v),
    }
}

impl BoundTemplate {
    fn bind(t: &Template, relation: &Relation) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal_len = 0;
        for s in t.segments() {
            parts.push(match s {
                Segment::Literal(l) => {
                    literal_len += l.len();
                    Part::Literal(l.clone())
                }
                Segment::Column(c) => {
                    Part::Column(relation.column_index(c).ok_or_else(|| c.clone())?)
                }
            });
        }
        Ok(BoundTemplate {
            text: t.as_str().to_string(),
            parts,
            literal_len,
        })
    }

    /// The key for a row, or the column that stopped it (and whether it was NULL).
    fn render(&self, row: &Row, fallback: Option<&Row>) -> Result<String, (usize, bool)> {
        let mut out = String::with_capacity(self.literal_len + 16);
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Column(i) => match lookup(row, fallback, *i) {
                    Lookup::Text(t) => out.push_str(t),
                    Lookup::Null => return Err((*i, true)),
                    Lookup::Unknown => return Err((*i, false)),
                },
            }
        }
        Ok(out)
    }

    /// Whether the key for `a` (values not sent taken from `b`) and the key for `b`
    /// (from `a`) are the same key: every column it reads holds the same text in both.
    fn same_key(&self, a: &Row, b: &Row) -> bool {
        self.parts.iter().all(|p| match p {
            Part::Literal(_) => true,
            Part::Column(i) => matches!(
                (lookup(a, Some(b), *i), lookup(b, Some(a), *i)),
                (Lookup::Text(x), Lookup::Text(y)) if x == y
            ),
        })
    }
}

impl BoundRule {
    /// Binds `rule` to `relation`'s columns. A column the shape lacks does not fail:
    /// the rule invalidates more widely for changes of that shape (see the fields).
    pub(super) fn bind(rule: &Arc<Rule>, relation: &Relation) -> BoundRule {
        let mut lacking = None;
        let mut templates = |ts: &[Template], field| {
            let mut bound = Vec::with_capacity(ts.len());
            for t in ts {
                match BoundTemplate::bind(t, relation) {
                    Ok(b) => bound.push(b),
                    Err(column) => {
                        lacking.get_or_insert((column, field));
                    }
                }
            }
            bound
        };
        let mut keys = templates(&rule.keys, "keys");
        let mut tags = templates(&rule.tags, "tags");
        if lacking.is_some() {
            // Some of a rule's keys would be a silent partial invalidation.
            keys.clear();
            tags.clear();
        }
        let lacks = |cols: &[String]| {
            cols.iter()
                .find(|c| relation.column_index(c).is_none())
                .cloned()
        };
        let when_changed = match &rule.when_changed {
            Some(cols) => match lacks(cols) {
                Some(c) => {
                    lacking.get_or_insert((c, "when_changed"));
                    None
                }
                None => Some(
                    cols.iter()
                        .filter_map(|c| relation.column_index(c))
                        .collect(),
                ),
            },
            None => None,
        };
        let (columns, value_unknown) = match &rule.action {
            Action::Delete => (Vec::new(), None),
            Action::Republish {
                columns: Some(cols),
                ..
            } => (
                cols.iter()
                    .filter_map(|c| Some((relation.column_index(c)?, quoted(c))))
                    .collect(),
                lacks(cols).inspect(|c| {
                    lacking.get_or_insert((c.clone(), "columns"));
                }),
            ),
            Action::Republish { columns: None, .. } => (
                relation
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (i, quoted(&c.name)))
                    .collect(),
                None,
            ),
        };
        BoundRule {
            rule: rule.clone(),
            keys,
            tags,
            when_changed,
            columns,
            lacking,
            value_unknown,
            counters: RuleCounters::new(&rule.name),
        }
    }

    /// Whether a column of the rule's keys or tags is missing from this shape: none of
    /// them can be computed, so each change flushes what a TRUNCATE would (see
    /// `Planner::plan_change`).
    pub(super) fn unbound(&self) -> bool {
        matches!(self.lacking, Some((_, "keys" | "tags")))
    }

    /// Whether an update changed any `when_changed` column. Without the old value
    /// the column is assumed changed, except an unchanged TOAST column, which Postgres
    /// says is unchanged.
    pub(super) fn update_matters(&self, new: &Row, old: Option<&Row>) -> bool {
        let Some(cols) = &self.when_changed else {
            return true;
        };
        cols.iter().any(|&i| match new.get(i) {
            Some(Value::UnchangedToast) => false,
            n => match old.and_then(|o| o.get(i)) {
                Some(o) if o.is_known() => Some(o) != n,
                _ => true,
            },
        })
    }

    /// Keys of this rule's key templates skipped for a NULL placeholder among `notes`.
    pub(super) fn null_keys(&self, notes: &[Note]) -> u64 {
        notes
            .iter()
            .filter(|n| match &n.kind {
                NoteKind::NullPlaceholder { template, .. } => {
                    self.keys.iter().any(|k| &k.text == template)
                }
                _ => false,
            })
            .count() as u64
    }

    /// Renders templates for a row into `out`, noting what could not be rendered.
    pub(super) fn render_all(
        &self,
        templates: &[BoundTemplate],
        row: &Row,
        fallback: Option<&Row>,
        relation: &Relation,
        notes: &mut Vec<Note>,
        mut out: impl FnMut(String),
    ) {
        for t in templates {
            self.render_one(t, row, fallback, relation, notes, &mut out);
        }
    }

    /// The keys of `templates` for the old row, then for the new row (an update's, or
    /// either alone), as [`Self::render_all`] for each. A template whose columns hold
    /// the same text in both rows is rendered once: the new row's key is the old one.
    pub(super) fn render_rows(
        &self,
        templates: &[BoundTemplate],
        old: Option<&Row>,
        new: Option<&Row>,
        relation: &Relation,
        notes: &mut Vec<Note>,
        mut out: impl FnMut(String),
    ) {
        if let Some(o) = old {
            self.render_all(templates, o, new, relation, notes, &mut out);
        }
        if let Some(n) = new {
            for t in templates {
                if !old.is_some_and(|o| t.same_key(n, o)) {
                    self.render_one(t, n, old, relation, notes, &mut out);
                }
            }
        }
    }

    /// One template's key for `row`, or its note.
    fn render_one(
        &self,
        t: &BoundTemplate,
        row: &Row,
        fallback: Option<&Row>,
        relation: &Relation,
        notes: &mut Vec<Note>,
        out: &mut impl FnMut(String),
    ) {
        match t.render(row, fallback) {
            Ok(key) => out(key),
            Err((i, null)) => {
                let template = t.text.clone();
                let column = relation.columns[i].name.clone();
                let kind = if null {
                    NoteKind::NullPlaceholder { template, column }
                } else {
                    NoteKind::NotInWal { template, column }
                };
                note(&self.rule, kind, notes);
            }
        }
    }

    /// The row as a JSON object, or the first projected column not in the WAL (or not
    /// in this shape of the table).
    pub(super) fn value(
        &self,
        row: &Row,
        fallback: Option<&Row>,
        relation: &Relation,
    ) -> Result<Arc<str>, String> {
        if let Some(column) = &self.value_unknown {
            return Err(column.clone());
        }
        let column_name = |i: usize| relation.columns[i].name.clone();
        let mut out = String::with_capacity(16 * self.columns.len() + 2);
        out.push('{');
        for (n, (i, name)) in self.columns.iter().enumerate() {
            let value = effective(row, fallback, *i).ok_or_else(|| column_name(*i))?;
            if n > 0 {
                out.push(',');
            }
            out.push_str(name);
            out.push(':');
            if !matches!(write_json(&mut out, &relation.columns[*i], value), Ok(true)) {
                return Err(column_name(*i));
            }
        }
        out.push('}');
        Ok(out.into())
    }
}

fn quoted(name: &str) -> String {
    serde_json::to_string(name).unwrap_or_default()
}

pub(super) fn note(rule: &Rule, kind: NoteKind, notes: &mut Vec<Note>) {
    metrics::counter!("wal2cache_plan_notes_total", "reason" => kind.reason()).increment(1);
    tracing::debug!(rule = %rule.name, ?kind, "plan note");
    notes.push(Note {
        rule: rule.name.clone(),
        kind,
    });
}
