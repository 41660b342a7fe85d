//! Binding: a rule's templates and columns resolved to positions in one table shape,
//! once per shape, and rendering them for a row.

use std::sync::Arc;

use crate::plan::{Note, NoteKind};
use crate::rules::compile::{Action, Rule};
use crate::rules::plan::PlanError;
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
    pub(super) fn bind(rule: &Arc<Rule>, relation: &Relation) -> Result<BoundRule, PlanError> {
        let missing = |column: String, field: &'static str| PlanError {
            origin: rule.origin(),
            table: relation.qualified_name(),
            column,
            field,
        };
        let templates = |ts: &[Template], field| {
            ts.iter()
                .map(|t| BoundTemplate::bind(t, relation).map_err(|c| missing(c, field)))
                .collect::<Result<Vec<_>, _>>()
        };
        let keys = templates(&rule.keys, "keys")?;
        let tags = templates(&rule.tags, "tags")?;
        let index = |c: &String, field| {
            relation
                .column_index(c)
                .ok_or_else(|| missing(c.clone(), field))
        };
        let when_changed = match &rule.when_changed {
            Some(cols) => Some(
                cols.iter()
                    .map(|c| index(c, "when_changed"))
                    .collect::<Result<_, _>>()?,
            ),
            None => None,
        };
        let columns = match &rule.action {
            Action::Delete => Vec::new(),
            Action::Republish {
                columns: Some(cols),
                ..
            } => cols
                .iter()
                .map(|c| Ok((index(c, "columns")?, quoted(c))))
                .collect::<Result<_, PlanError>>()?,
            Action::Republish { columns: None, .. } => relation
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| (i, quoted(&c.name)))
                .collect(),
        };
        Ok(BoundRule {
            rule: rule.clone(),
            keys,
            tags,
            when_changed,
            columns,
            counters: RuleCounters::new(&rule.name),
        })
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

    /// The row as a JSON object, or the first projected column not in the WAL.
    pub(super) fn value(
        &self,
        row: &Row,
        fallback: Option<&Row>,
        relation: &Relation,
    ) -> Result<Arc<str>, usize> {
        let mut out = String::with_capacity(16 * self.columns.len() + 2);
        out.push('{');
        for (n, (i, name)) in self.columns.iter().enumerate() {
            let value = effective(row, fallback, *i).ok_or(*i)?;
            if n > 0 {
                out.push(',');
            }
            out.push_str(name);
            out.push(':');
            if !matches!(write_json(&mut out, &relation.columns[*i], value), Ok(true)) {
                return Err(*i);
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
