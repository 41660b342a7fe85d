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
use crate::rules::template::Segment;
use crate::source::catalog::{
    self, ColumnInfo, Member, PublicationInfo, ServerVersion, TableInfo, ToPublish,
};
use crate::source::{SourceError, TableName};

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
    /// What stops `setup` and `run`.
    pub problems: Vec<CheckProblem>,
    /// What works but deserves a look (printed by `check`, logged by `run`).
    pub warnings: Vec<CheckProblem>,
    /// Tables `setup` will add to the publication.
    pub publish: Vec<ToPublish>,
    /// `server_version_num`.
    pub server_version: i32,
}

impl CheckReport {
    /// The tables `setup` will add to the publication, as the rules file writes them.
    pub fn to_publish(&self) -> Vec<String> {
        self.publish.iter().map(|m| m.table.to_string()).collect()
    }
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

/// Checks every rule against the catalog of the database `client` is connected to.
/// `publication` is the configured one; with `create`, missing tables will be added.
/// `server` is what `slot::check_preconditions` read.
pub async fn check(
    client: &Client,
    server: &ServerVersion,
    rules: &RuleSet,
    publication: &str,
    create: bool,
) -> Result<CheckReport, SourceError> {
    let version = server.num;
    let mut report = CheckReport {
        server_version: version,
        ..CheckReport::default()
    };
    let publ = catalog::publication(client, publication, version).await?;
    let mut infos: HashMap<TableName, TableInfo> = HashMap::new();
    for (table, origin) in rules.tables() {
        let Some(info) = catalog::table_info(client, &table).await? else {
            report.problems.push(CheckProblem {
                origin,
                message: format!("table {table} does not exist: create it, or fix the table name"),
                fix: None,
            });
            continue;
        };
        let missing = catalog::unpublished(client, publ.as_ref(), &table, &info, version).await?;
        if !missing.is_empty() {
            if create {
                report.publish.extend(missing);
            } else {
                report.problems.push(CheckProblem {
                    origin: origin.clone(),
                    message: format!(
                        "table {} {} not in publication {publication:?} (and postgres.create is false)",
                        missing.iter().map(|m| m.table.to_string()).collect::<Vec<_>>().join(", "),
                        if missing.len() == 1 { "is" } else { "are" },
                    ),
                    fix: Some(format!(
                        "ALTER PUBLICATION {} ADD {};",
                        escape_identifier(publication),
                        catalog::table_list(&missing)
                    )),
                });
            }
        }
        table_problems(&table, &origin, &info, publ.as_ref(), &mut report);
        infos.insert(table, info);
    }
    if let Some(p) = &publ {
        publication_problems(publication, p, rules, &infos, &mut report);
    }
    for rule in rules.rules() {
        if let Some(info) = infos.get(&rule.table) {
            check_rule(rule, info, version, publication, publ.as_ref(), &mut report);
        }
    }
    report.warnings.extend(shared_republish_keys(rules));
    Ok(report)
}

/// Republish rules whose key templates have the same form (the same text between the
/// same placeholders), so that two rules may write one key: the newest change wins,
/// whichever rule it came from, and a reader gets either rule's value.
fn shared_republish_keys(rules: &RuleSet) -> Vec<CheckProblem> {
    let mut first: HashMap<Vec<Option<&str>>, (&Rule, &str)> = HashMap::new();
    let mut out = Vec::new();
    for rule in rules.rules() {
        if !matches!(rule.action, Action::Republish { .. }) {
            continue;
        }
        for key in &rule.keys {
            let form: Vec<Option<&str>> = key
                .segments()
                .iter()
                .map(|s| match s {
                    Segment::Literal(l) => Some(l.as_str()),
                    Segment::Column(_) => None,
                })
                .collect();
            match first.get(&form) {
                Some((other, other_key)) if other.name != rule.name => out.push(CheckProblem {
                    origin: rule.origin(),
                    message: format!(
                        "republishes {:?}, and rule {:?} republishes {:?}: where both make the same key, the newest change wins whichever rule it came from, so a reader gets one rule's value or the other's",
                        key.as_str(),
                        other.name,
                        other_key
                    ),
                    fix: Some("give each republish rule keys of its own (a different prefix)".into()),
                }),
                Some(_) => {}
                None => {
                    first.insert(form, (rule, key.as_str()));
                }
            }
        }
    }
    out
}

/// What is wrong with a table whatever its rules say.
fn table_problems(
    table: &TableName,
    origin: &str,
    info: &TableInfo,
    publ: Option<&PublicationInfo>,
    report: &mut CheckReport,
) {
    // A published table without a replica identity makes the application's UPDATE and
    // DELETE fail ("cannot update table ... because it does not have a replica identity
    // and publishes updates"): refused whatever the rule listens to.
    let publishes_changes = publ.is_none_or(|p| p.update || p.delete);
    let unidentified = info.unidentified();
    if publishes_changes && !unidentified.is_empty() {
        let names: Vec<String> = unidentified
            .iter()
            .map(|m| {
                let what = if m.identity == 'n' {
                    "REPLICA IDENTITY NOTHING"
                } else {
                    "no primary key and no replica identity index"
                };
                format!("{} ({what})", m.table)
            })
            .collect();
        report.problems.push(CheckProblem {
            origin: origin.to_string(),
            message: format!(
                "{} cannot be published as it is: PostgreSQL would refuse the application's UPDATE and DELETE on it once it is in a publication that publishes them, and the WAL would never say which row changed",
                names.join(", ")
            ),
            fix: Some(format!(
                "{} (or give it a primary key)",
                unidentified
                    .iter()
                    .map(|m| format!("ALTER TABLE {} REPLICA IDENTITY FULL;", m.table.quoted()))
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
        });
    }
    if !info.children.is_empty() {
        report.warnings.push(CheckProblem {
            origin: origin.to_string(),
            message: format!(
                "table {table} has inheritance children ({}): their rows' changes arrive under their own names; wal2cache applies {table}'s rules to them and publishes each child; a child added later (CREATE TABLE ... INHERITS, ALTER TABLE ... INHERIT) is published within metrics.slot_poll, and what it wrote before is invalidated as by a TRUNCATE of {table}",
                info.children.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ),
            fix: None,
        });
    }
}

/// What is wrong with an existing publication for these rules.
fn publication_problems(
    name: &str,
    p: &PublicationInfo,
    rules: &RuleSet,
    infos: &HashMap<TableName, TableInfo>,
    report: &mut CheckReport,
) {
    let mut missing = Vec::new();
    let needs = |f: fn(&Rule) -> bool| rules.rules().iter().any(|r| f(r));
    if !p.insert && needs(|r| r.on_insert) {
        missing.push("insert");
    }
    if !p.update && needs(|r| r.on_update) {
        missing.push("update");
    }
    if !p.delete && needs(|r| r.on_delete) {
        missing.push("delete");
    }
    if !p.truncate && !rules.rules().is_empty() {
        missing.push("truncate");
    }
    if !missing.is_empty() {
        report.problems.push(CheckProblem {
            origin: format!("publication {name:?}"),
            message: format!(
                "does not publish {}: the rules' {} changes would never reach wal2cache",
                missing.join(", "),
                missing.join(" and ")
            ),
            fix: Some(format!(
                "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
                escape_identifier(name)
            )),
        });
    }
    let partitioned: Vec<String> = infos
        .iter()
        .filter(|(_, i)| i.kind == 'p' || i.is_partition)
        .map(|(t, _)| t.to_string())
        .collect();
    if p.via_root && !partitioned.is_empty() {
        report.problems.push(CheckProblem {
            origin: format!("publication {name:?}"),
            message: format!(
                "publishes via the partition root (publish_via_partition_root = true), and the rules follow partitioned tables ({}): PostgreSQL then does not publish a TRUNCATE of a single partition at all, so caches would stay stale",
                partitioned.join(", ")
            ),
            fix: Some(format!(
                "ALTER PUBLICATION {} SET (publish_via_partition_root = false);",
                escape_identifier(name)
            )),
        });
    }
}

fn check_rule(
    rule: &Rule,
    info: &TableInfo,
    server_version: i32,
    publication: &str,
    publ: Option<&PublicationInfo>,
    report: &mut CheckReport,
) {
    let table = rule.table.to_string();
    let origin = rule.origin();
    let problem = |message: String, fix: Option<String>| CheckProblem {
        origin: origin.clone(),
        message,
        fix,
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
    let mut reported = Vec::new();
    for (column, field) in named {
        if reported.contains(&column) {
            continue;
        }
        let Some(col) = info.columns.get(column) else {
            reported.push(column);
            let mut known: Vec<&str> = info.columns.keys().map(String::as_str).collect();
            known.sort();
            report.problems.push(problem(
                format!(
                    "{field} names column {column:?}, which {table} does not have (it has {})",
                    known.join(", ")
                ),
                None,
            ));
            continue;
        };
        if let Some(why) = unpublished_generated(col, server_version, publ) {
            reported.push(column);
            report.problems.push(problem(
                format!("{field} names column {column:?}, a generated column: {why}"),
                (server_version >= 180000 && col.generated == Some('s') && publ.is_some()).then(
                    || {
                        format!(
                            "ALTER PUBLICATION {} SET (publish_generated_columns = stored);",
                            escape_identifier(publication)
                        )
                    },
                ),
            ));
        }
    }
    if let Action::Republish { columns: None, .. } = &rule.action {
        let mut left_out: Vec<&str> = info
            .columns
            .iter()
            .filter(|(_, c)| unpublished_generated(c, server_version, publ).is_some())
            .map(|(n, _)| n.as_str())
            .collect();
        left_out.sort();
        if !left_out.is_empty() {
            report.warnings.push(problem(
                format!(
                    "the republished row leaves out the generated column{} {}: the replication stream does not carry {} on this server",
                    if left_out.len() == 1 { "" } else { "s" },
                    left_out.join(", "),
                    if left_out.len() == 1 { "it" } else { "them" },
                ),
                None,
            ));
        }
    }
    let mut unbounded: Vec<&str> = Vec::new();
    for column in rule.template_columns() {
        if info.columns.get(column).is_some_and(|c| c.unbounded) && !unbounded.contains(&column) {
            unbounded.push(column);
        }
    }
    if !unbounded.is_empty() {
        report.warnings.push(problem(
            format!(
                "a key or tag renders column{} {} of a type without a length limit: a very long value makes a very long key (an event too large for the broker is replaced by a flush of the subscribers' caches); prefer a bounded column such as the primary key",
                if unbounded.len() == 1 { "" } else { "s" },
                unbounded.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", ")
            ),
            None,
        ));
    }
    if !(rule.on_update || rule.on_delete) {
        return;
    }
    // What the WAL carries of an old row depends on each member's own replica
    // identity (a partition's, not its parent's).
    let single = info.members.len() == 1 && info.members[0].table == rule.table;
    let mut old_missing: Vec<(&Member, &str)> = Vec::new();
    let mut toast: Option<(&str, &str)> = None;
    let mut toast_members: Vec<&Member> = Vec::new();
    for m in &info.members {
        if m.identity == 'f' || m.identity == 'n' || m.key_columns.is_empty() {
            // FULL carries everything; the others are refused by table_problems.
            continue;
        }
        if let Some(column) = rule
            .template_columns()
            .find(|c| info.columns.contains_key(*c) && !m.key_columns.iter().any(|k| k == c))
        {
            old_missing.push((m, column));
        }
        if rule.on_update {
            if let Some((column, col)) = rule.template_columns().find_map(|c| {
                info.columns
                    .get(c)
                    .filter(|col| col.toastable && !m.key_columns.iter().any(|k| k == c))
                    .map(|col| (c, col))
            }) {
                toast.get_or_insert((column, col.type_name.as_str()));
                toast_members.push(m);
            }
        }
    }
    let full_fix = |members: &[&Member]| {
        Some(
            members
                .iter()
                .map(|m| format!("ALTER TABLE {} REPLICA IDENTITY FULL;", m.table.quoted()))
                .collect::<Vec<_>>()
                .join(" "),
        )
    };
    if let Some((_, column)) = old_missing.first() {
        let members: Vec<&Member> = old_missing.iter().map(|(m, _)| *m).collect();
        let whose = if single {
            format!(
                "{table}'s replica identity ({})",
                members[0].key_columns.join(", ")
            )
        } else {
            format!(
                "the replica identity of {}",
                members
                    .iter()
                    .map(|m| format!("{} ({})", m.table, m.key_columns.join(", ")))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        report.problems.push(problem(
            format!(
                "a key or tag uses column {column:?}, which is not in {whose}: the WAL does not carry its old value, so an update or delete cannot invalidate the old key{}",
                if single { "" } else { " (each partition or child sends its own replica identity; a partition attached later needs the same fix)" }
            ),
            full_fix(&members),
        ));
    }
    if let Some((column, type_name)) = toast {
        report.problems.push(problem(
            format!("a key or tag uses column {column:?} of type {type_name}, which PostgreSQL may store out of line (TOAST) and then leave out of an update that does not change it"),
            full_fix(&toast_members),
        ));
    }
}

/// Why the stream does not carry a generated column on this server, if it does not.
fn unpublished_generated(
    column: &ColumnInfo,
    server_version: i32,
    publ: Option<&PublicationInfo>,
) -> Option<String> {
    match column.generated? {
        _ if server_version < 180000 => Some(format!(
            "PostgreSQL {} does not send generated columns in logical replication (18 does, with publish_generated_columns = stored): use the columns it is computed from",
            server_version / 10000
        )),
        'v' => Some(
            "PostgreSQL does not send virtual generated columns in logical replication: make it STORED, or use the columns it is computed from"
                .into(),
        ),
        _ if publ.is_some_and(|p| p.generated_columns != Some('s')) => Some(
            "the publication does not publish generated columns (publish_generated_columns = none)"
                .into(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_republish_rules_of_one_key_form_are_warned_about() {
        let rules = crate::rules::testing::rule_set(
            r#"
[[rule]]
name = "product"
table = "public.products"
keys = ["shop:product:{id}"]
action = "republish"

[[rule]]
name = "price"
table = "public.prices"
keys = ["shop:product:{product_id}"]
action = "republish"

[[rule]]
name = "evict"
table = "public.stock"
keys = ["shop:product:{product_id}"]

[[rule]]
name = "category"
table = "public.categories"
keys = ["shop:category:{id}", "shop:category:{slug}"]
action = "republish"
"#,
        );
        let warned = shared_republish_keys(&rules);
        // A delete rule of that form is how other tables evict it; one rule's two keys
        // of one form are its own business.
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].message.starts_with(
            "republishes \"shop:product:{product_id}\", and rule \"product\" republishes \"shop:product:{id}\""
        ));
    }
}
