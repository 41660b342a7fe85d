//! `wal2cache check`: the rules against the live catalog. Each table must exist and
//! be published (or be added by `setup`), every column a rule names must exist, and
//! the replica identity must put in the WAL what the rule needs to compute the old
//! keys of an update or a delete: otherwise the fix, `ALTER TABLE … REPLICA IDENTITY
//! FULL`, is printed.

use std::collections::HashMap;
use std::fmt;

use postgres_protocol::escape::escape_identifier;
use tokio_postgres::Client;

use crate::rules::compile::{Action, Rule, RuleSet};
use crate::source::SourceError;

/// One table as the catalog describes it.
#[derive(Debug, Clone)]
struct TableInfo {
    /// `d` default, `n` nothing, `f` full, `i` index.
    identity: char,
    /// Column name → (type name, may be stored out of line as TOAST).
    columns: HashMap<String, (String, bool)>,
    /// Columns of the replica identity key (primary key, or the identity index).
    key_columns: Vec<String>,
}

/// One problem `check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckProblem {
    pub origin: String,
    pub message: String,
    /// SQL that fixes it, when there is one.
    pub fix: Option<String>,
}

impl fmt::Display for CheckProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      fix: {fix}")?;
        }
        Ok(())
    }
}

/// What `check` found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub problems: Vec<CheckProblem>,
    /// Tables `setup` will add to the publication.
    pub to_publish: Vec<String>,
}

/// The rules failed `check`.
#[derive(Debug, Clone, thiserror::Error)]
pub struct CheckError {
    pub problems: Vec<CheckProblem>,
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "the rules do not fit the database ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

fn pg(context: &str) -> impl FnOnce(tokio_postgres::Error) -> SourceError + '_ {
    move |source| SourceError::Postgres {
        context: context.to_string(),
        source,
    }
}

async fn table_info(client: &Client, table: &str) -> Result<Option<TableInfo>, SourceError> {
    let Some(row) = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text FROM pg_class c
              WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
            &[&quote_table(table)],
        )
        .await
        .map_err(pg("reading pg_class"))?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let identity: String = row.get(1);
    let columns = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typstorage <> 'p'
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid],
        )
        .await
        .map_err(pg("reading pg_attribute"))?
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get::<_, String>(1), r.get::<_, bool>(2)),
            )
        })
        .collect();
    let key_columns = client
        .query(
            "SELECT a.attname::text FROM pg_index i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = $1
                AND CASE (SELECT relreplident FROM pg_class WHERE oid = $1)
                      WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END",
            &[&oid],
        )
        .await
        .map_err(pg("reading pg_index"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Some(TableInfo {
        identity: identity.chars().next().unwrap_or('d'),
        columns,
        key_columns,
    }))
}

fn quote_table(qualified: &str) -> String {
    match qualified.split_once('.') {
        Some((s, t)) => format!("{}.{}", escape_identifier(s), escape_identifier(t)),
        None => escape_identifier(qualified),
    }
}

/// Checks every rule against the catalog of the database `client` is connected to.
/// `publication` is the configured one; with `create`, missing tables will be added.
pub async fn check(
    client: &Client,
    rules: &RuleSet,
    publication: &str,
    create: bool,
) -> Result<CheckReport, SourceError> {
    let mut report = CheckReport::default();
    let pub_row = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(pg("reading pg_publication"))?;
    let published: Option<Vec<String>> = match pub_row {
        Some(r) if r.get::<_, bool>(0) => None,
        Some(_) => Some(
            client
                .query(
                    "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
                    &[&publication],
                )
                .await
                .map_err(pg("reading pg_publication_tables"))?
                .iter()
                .map(|r| r.get(0))
                .collect(),
        ),
        None => Some(Vec::new()),
    };
    let mut infos: HashMap<String, Option<TableInfo>> = HashMap::new();
    for (table, origin) in rules.tables() {
        let info = table_info(client, &table).await?;
        match &info {
            None => report.problems.push(CheckProblem {
                origin,
                message: format!("table {table} does not exist: create it, or fix the table name"),
                fix: None,
            }),
            Some(_) if published.as_ref().is_some_and(|p| !p.contains(&table)) => {
                if create {
                    report.to_publish.push(table.clone());
                } else {
                    report.problems.push(CheckProblem {
                        origin,
                        message: format!("table {table} is not in publication {publication:?} (and postgres.create is false)"),
                        fix: Some(format!("ALTER PUBLICATION {} ADD TABLE {};", escape_identifier(publication), quote_table(&table))),
                    });
                }
            }
            Some(_) => {}
        }
        infos.insert(table, info);
    }
    for rule in rules.rules() {
        if let Some(Some(info)) = infos.get(&rule.table.to_string()) {
            check_rule(rule, info, &mut report.problems);
        }
    }
    Ok(report)
}

fn check_rule(rule: &Rule, info: &TableInfo, problems: &mut Vec<CheckProblem>) {
    let table = rule.table.to_string();
    let mut add = |message: String, fix: Option<String>| {
        problems.push(CheckProblem {
            origin: rule.origin(),
            message,
            fix,
        })
    };
    let full_fix = || {
        Some(format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL;",
            quote_table(&table)
        ))
    };
    let mut named: Vec<(&str, &str)> = rule
        .template_columns()
        .map(|c| (c, "a placeholder"))
        .collect();
    if let Some(w) = &rule.when_changed {
        named.extend(w.iter().map(|c| (c.as_str(), "when_changed")));
    }
    if let Action::Republish {
        columns: Some(cols),
        ..
    } = &rule.action
    {
        named.extend(cols.iter().map(|c| (c.as_str(), "columns")));
    }
    let mut unknown = Vec::new();
    for (column, field) in named {
        if !info.columns.contains_key(column) && !unknown.contains(&column) {
            unknown.push(column);
            let mut known: Vec<&String> = info.columns.keys().collect();
            known.sort();
            add(
                format!(
                    "{field} names column {column:?}, which {table} does not have (it has {})",
                    known
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None,
            );
        }
    }
    if info.identity == 'n' && (rule.on_update || rule.on_delete) {
        add(
            format!("{table} has REPLICA IDENTITY NOTHING: PostgreSQL refuses its updates and deletes once published, and the WAL never says which row changed"),
            full_fix(),
        );
        return;
    }
    if info.identity == 'f' {
        return;
    }
    let mut reported_old = false;
    let mut reported_toast = false;
    for column in rule.template_columns() {
        let Some((type_name, toastable)) = info.columns.get(column) else {
            continue;
        };
        let is_key = info.key_columns.iter().any(|k| k == column);
        if (rule.on_update || rule.on_delete) && !is_key && !reported_old {
            reported_old = true;
            add(
                format!(
                    "a key or tag uses column {column:?}, which is not in {table}'s replica identity ({}): the WAL does not carry its old value, so an update or delete cannot invalidate the old key",
                    if info.key_columns.is_empty() { "no key".to_string() } else { info.key_columns.join(", ") }
                ),
                full_fix(),
            );
        }
        if rule.on_update && *toastable && !reported_toast {
            reported_toast = true;
            add(
                format!("a key or tag uses column {column:?} of type {type_name}, which PostgreSQL may store out of line (TOAST) and then leave out of an update that does not change it"),
                full_fix(),
            );
        }
    }
}
