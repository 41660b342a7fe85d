//! From raw rules to a rule set that is valid by construction: templates parsed,
//! actions and operations checked, an index by table. Every problem is reported, each
//! naming the file, the rule and the field, and what is expected.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::rules::raw::{self, RawRule, SourcedRule};
use crate::rules::template::Template;
pub use crate::source::TableName;
use crate::source::{Op, Relation};

/// A compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub file: PathBuf,
    pub table: TableName,
    pub on_insert: bool,
    pub on_update: bool,
    pub on_delete: bool,
    pub keys: Vec<Template>,
    pub tags: Vec<Template>,
    pub action: Action,
    /// An update that changes none of these columns is ignored.
    pub when_changed: Option<Vec<String>>,
    /// What a TRUNCATE purges; without them, a table-wide flush.
    pub truncate_tags: Option<Vec<String>>,
}

impl Rule {
    pub fn listens_to(&self, op: Op) -> bool {
        match op {
            Op::Insert => self.on_insert,
            Op::Update => self.on_update,
            Op::Delete => self.on_delete,
        }
    }

    /// Every column a key or tag template reads.
    pub fn template_columns(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().chain(&self.tags).flat_map(|t| t.columns())
    }

    /// `rule "name" in file`, for messages.
    pub fn origin(&self) -> String {
        format!("rule {:?} in {}", self.name, self.file.display())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// UNLINK the keys.
    Delete,
    /// SET the keys to the new row as JSON (projected to `columns`), with `ttl`;
    /// a DELETE removes them.
    Republish {
        columns: Option<Vec<String>>,
        ttl: Option<Duration>,
    },
}

/// Every rule, indexed by table so a change finds its rules without a scan.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Arc<Rule>>,
    by_table: HashMap<TableName, Vec<Arc<Rule>>>,
}

impl RuleSet {
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    /// The rules `keep` keeps, in order: a rule set of their own.
    pub fn subset(&self, keep: impl Fn(&Rule) -> bool) -> RuleSet {
        let rules: Vec<Arc<Rule>> = self.rules.iter().filter(|r| keep(r)).cloned().collect();
        let mut by_table: HashMap<TableName, Vec<Arc<Rule>>> = HashMap::new();
        for r in &rules {
            by_table.entry(r.table.clone()).or_default().push(r.clone());
        }
        RuleSet { rules, by_table }
    }

    /// The rules of a table.
    pub fn for_table(&self, table: &TableName) -> &[Arc<Rule>] {
        self.by_table.get(table).map_or(&[], Vec::as_slice)
    }

    /// The rules that apply to a relation's changes: its own table's, then those of
    /// the tables it is a partition or inheritance child of, each rule once.
    pub fn for_relation(&self, relation: &Relation) -> Vec<&Arc<Rule>> {
        let mut out: Vec<&Arc<Rule>> = self.for_table(&relation.table()).iter().collect();
        for ancestor in &relation.ancestors {
            for rule in self.for_table(ancestor) {
                if !out.iter().any(|r| Arc::ptr_eq(r, rule)) {
                    out.push(rule);
                }
            }
        }
        out
    }

    /// The tables, each with the first rule naming it, in rule order.
    /// Linear in the rules (the membership watch calls it every `slot_poll`).
    pub fn tables(&self) -> Vec<(TableName, String)> {
        let mut seen: HashSet<&TableName> = HashSet::new();
        let mut out: Vec<(TableName, String)> = Vec::new();
        for r in &self.rules {
            if seen.insert(&r.table) {
                out.push((r.table.clone(), r.origin()));
            }
        }
        out
    }

    /// The tables the rules name, each once, in rule order.
    pub fn table_names(&self) -> Vec<TableName> {
        self.tables().into_iter().map(|(t, _)| t).collect()
    }
}

/// One thing wrong with the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub rule: Option<String>,
    pub field: Option<&'static str>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(rule) = &self.rule {
            write!(f, ": rule {rule:?}")?;
        }
        if let Some(field) = self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Everything wrong with a rules path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RulesError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{n} problem{} in the rules:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl From<raw::LoadError> for RulesError {
    fn from(e: raw::LoadError) -> Self {
        let file = match &e {
            raw::LoadError::Missing(p) | raw::LoadError::Empty(p) => p.clone(),
            raw::LoadError::Dir { path, .. } | raw::LoadError::Parse { path, .. } => path.clone(),
        };
        let message = match &e {
            raw::LoadError::Parse { message, .. } => message.clone(),
            other => other.to_string(),
        };
        RulesError {
            problems: vec![Problem {
                file,
                rule: None,
                field: None,
                message,
            }],
        }
    }
}

/// Loads and compiles the rules at `path` (a file or a directory of `*.toml`).
pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
    compile(raw::load(path)?)
}

/// Compiles raw rules, reporting every problem.
pub fn compile(raw: Vec<SourcedRule>) -> Result<RuleSet, RulesError> {
    let mut problems = Vec::new();
    let mut rules = Vec::new();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for SourcedRule { file, rule } in raw {
        let name = rule.name.clone();
        let mut p = Problems {
            file: &file,
            rule: &name,
            out: &mut problems,
        };
        if rule.name.trim().is_empty() {
            p.add("name", "must not be empty".into());
        } else if let Some(first) = seen.get(&rule.name) {
            p.add(
                "name",
                format!(
                    "duplicate rule name (first defined in {}): rule names must be unique",
                    first.display()
                ),
            );
        } else {
            seen.insert(rule.name.clone(), file.clone());
        }
        if let Some(rule) = compile_rule(&file, rule, &mut p) {
            rules.push(Arc::new(rule));
        }
    }
    if !problems.is_empty() {
        return Err(RulesError { problems });
    }
    let mut by_table: HashMap<TableName, Vec<Arc<Rule>>> = HashMap::new();
    for r in &rules {
        by_table.entry(r.table.clone()).or_default().push(r.clone());
    }
    Ok(RuleSet { rules, by_table })
}

struct Problems<'a> {
    file: &'a Path,
    rule: &'a str,
    out: &'a mut Vec<Problem>,
}

impl Problems<'_> {
    fn add(&mut self, field: &'static str, message: String) {
        self.out.push(Problem {
            file: self.file.to_path_buf(),
            rule: Some(self.rule.to_string()),
            field: Some(field),
            message,
        });
    }
}

fn compile_rule(file: &Path, raw: RawRule, p: &mut Problems<'_>) -> Option<Rule> {
    let before = p.out.len();
    let table = match TableName::parse(&raw.table) {
        Ok(t) if t.is_system() => {
            p.add(
                "table",
                format!("{:?} is in {:?}, one of PostgreSQL's own schemas: its tables are not published to logical replication, so no rule can follow them", raw.table, t.schema),
            );
            None
        }
        Ok(t) => Some(t),
        Err(why) => {
            p.add("table", format!("{:?} {why}", raw.table));
            None
        }
    };

    let (mut on_insert, mut on_update, mut on_delete) = (true, true, true);
    if let Some(on) = &raw.on {
        (on_insert, on_update, on_delete) = (false, false, false);
        if on.is_empty() {
            p.add("on", "is empty: list some of \"insert\", \"update\", \"delete\", or leave it out for all three".into());
        }
        for op in on {
            let flag = match op.as_str() {
                "insert" => &mut on_insert,
                "update" => &mut on_update,
                "delete" => &mut on_delete,
                other => {
                    p.add("on", format!("unknown operation {other:?}: expected \"insert\", \"update\" or \"delete\" (TRUNCATE is handled by truncate_tags)"));
                    continue;
                }
            };
            if *flag {
                p.add("on", format!("{op:?} is listed twice"));
            }
            *flag = true;
        }
    }

    let keys = templates(&raw.keys, "keys", p);
    let tags = templates(&raw.tags, "tags", p);
    if raw.keys.is_empty() && raw.tags.is_empty() {
        p.add(
            "keys",
            "the rule has neither keys nor tags: give it at least one key template".into(),
        );
    }

    let republish = match raw.action.as_deref() {
        None | Some("delete") => false,
        Some("republish") => true,
        Some(other) => {
            p.add(
                "action",
                format!("unknown action {other:?}: expected \"delete\" or \"republish\""),
            );
            false
        }
    };
    if republish && raw.keys.is_empty() {
        p.add(
            "keys",
            "a republish rule needs at least one key to write the row to".into(),
        );
    }
    let ttl = match &raw.ttl {
        None => None,
        Some(_) if !republish => {
            p.add("ttl", "only a republish rule has a TTL (a delete rule writes nothing): remove it, or set action = \"republish\"".into());
            None
        }
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if d >= Duration::from_secs(1) => Some(d),
            Ok(_) => {
                p.add("ttl", format!("{text:?} is shorter than one second (Redis TTLs are whole seconds or more here)"));
                None
            }
            Err(e) => {
                p.add("ttl", format!("{text:?} is not a duration ({e}): write e.g. \"90s\", \"15m\", \"1h\", \"7d\""));
                None
            }
        },
    };
    if raw.columns.is_some() && !republish {
        p.add(
            "columns",
            "only a republish rule writes columns: remove it, or set action = \"republish\"".into(),
        );
    }
    if let Some(columns) = &raw.columns {
        column_list(columns, "columns", p);
    }
    if let Some(when) = &raw.when_changed {
        column_list(when, "when_changed", p);
        if !on_update {
            p.add("when_changed", "the rule does not listen to updates, so when_changed would never apply: add \"update\" to on, or remove it".into());
        }
    }
    if let Some(tags) = &raw.truncate_tags {
        for t in tags {
            match Template::parse(t) {
                Ok(tpl) if tpl.has_placeholders() => p.add(
                    "truncate_tags",
                    format!("{t:?} has a placeholder, but a TRUNCATE has no row to fill it: use a literal tag"),
                ),
                Ok(_) => {}
                Err(e) => p.add("truncate_tags", format!("{t:?}: {e}")),
            }
        }
    }
    if raw.truncate_tags.is_none() {
        if let Some(k) = keys.iter().find(|k| k.literal_prefix().is_empty()) {
            p.add(
                "keys",
                format!("{:?} starts with a placeholder, so a TRUNCATE would have to flush every key in Redis: start it with a literal prefix, or give the rule truncate_tags", k.as_str()),
            );
        }
    }

    if p.out.len() > before {
        return None;
    }
    Some(Rule {
        name: raw.name,
        file: file.to_path_buf(),
        table: table?,
        on_insert,
        on_update,
        on_delete,
        keys,
        tags,
        action: if republish {
            Action::Republish {
                columns: raw.columns,
                ttl,
            }
        } else {
            Action::Delete
        },
        when_changed: raw.when_changed,
        truncate_tags: raw.truncate_tags.map(|tags| {
            tags.into_iter()
                .map(|t| {
                    Template::parse(&t)
                        .ok()
                        .and_then(|t| t.literal().map(str::to_string))
                        .unwrap_or(t)
                })
                .collect()
        }),
    })
}

fn templates(texts: &[String], field: &'static str, p: &mut Problems<'_>) -> Vec<Template> {
    let mut out = Vec::new();
    for text in texts {
        match Template::parse(text) {
            Ok(t) if out.contains(&t) => p.add(field, format!("{text:?} is listed twice")),
            Ok(t) => out.push(t),
            Err(e) => p.add(field, format!("{text:?}: {e}")),
        }
    }
    out
}

fn column_list(columns: &[String], field: &'static str, p: &mut Problems<'_>) {
    if columns.is_empty() {
        p.add(
            field,
            "is empty: name at least one column, or leave it out".into(),
        );
    }
    for (i, c) in columns.iter().enumerate() {
        if c.trim().is_empty() {
            p.add(field, "has an empty column name".into());
        } else if columns[..i].contains(c) {
            p.add(field, format!("names column {c:?} twice"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Result<RuleSet, RulesError> {
        let file: raw::RawRulesFile = toml_from(text);
        compile(
            file.rules
                .into_iter()
                .map(|rule| SourcedRule {
                    file: PathBuf::from("rules.toml"),
                    rule,
                })
                .collect(),
        )
    }

    fn toml_from(text: &str) -> raw::RawRulesFile {
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    fn problems(text: &str) -> Vec<String> {
        rules(text)
            .unwrap_err()
            .problems
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const DOC_EXAMPLE: &str = r#"
[[rule]]
name = "product"
table = "public.products"
on = ["insert", "update", "delete"]
keys = ["shop:product:v3:{id}", "shop:product:slug:v3:{slug}"]
tags = ["shop:category:{category_id}", "shop:products"]
action = "delete"
when_changed = ["price", "name", "slug"]
truncate_tags = ["shop:products"]

[[rule]]
name = "product_json"
table = "public.products"
keys = ["shop:product:json:v3:{id}"]
action = "republish"
columns = ["id", "name", "price"]
ttl = "1h"
"#;

    #[test]
    fn tables_are_named_once_in_rule_order_with_their_first_rule() {
        let text: String = (0..3000)
            .map(|i| {
                format!(
                    "[[rule]]\nname = \"r{i}\"\ntable = \"public.t{}\"\naction = \"delete\"\nkeys = [\"k{i}:{{id}}\"]\n",
                    i % 1000
                )
            })
            .collect();
        let set = rules(&text).unwrap();
        let tables = set.tables();
        assert_eq!(tables.len(), 1000);
        assert_eq!(
            tables[0],
            (
                TableName::new("public", "t0"),
                "rule \"r0\" in rules.toml".into()
            )
        );
        assert_eq!(tables[999].0, TableName::new("public", "t999"));
        assert_eq!(tables[999].1, "rule \"r999\" in rules.toml");
        assert_eq!(set.table_names().len(), 1000);
    }

    #[test]
    fn compiles_the_documented_example() {
        let set = rules(DOC_EXAMPLE).unwrap();
        let products = TableName::new("public", "products");
        assert_eq!(set.for_table(&products).len(), 2);
        assert!(set.for_table(&TableName::new("public", "other")).is_empty());
        let json = &set.for_table(&products)[1];
        assert_eq!(
            json.action,
            Action::Republish {
                columns: Some(vec!["id".into(), "name".into(), "price".into()]),
                ttl: Some(Duration::from_secs(3600))
            }
        );
        assert!(json.on_insert && json.on_update && json.on_delete);
        let product = &set.for_table(&products)[0];
        let cols: Vec<_> = product.template_columns().collect();
        assert_eq!(cols, ["id", "slug", "category_id"]);
    }

    #[test]
    fn every_problem_is_reported_with_file_rule_and_field() {
        let text = r#"
[[rule]]
name = "a"
table = "products"
on = ["insert", "upsert", "insert"]
keys = ["a:{id", "b:{}", "c:{id}", "c:{id}"]
action = "delete"
ttl = "1h"
columns = ["id"]

[[rule]]
name = "a"
table = "public.t"
keys = ["{id}"]
action = "upsert"
when_changed = ["x", "x"]

[[rule]]
name = "c"
table = "public.t"
action = "republish"
tags = ["t:{id}"]
ttl = "soon"
columns = []
truncate_tags = ["t:{id}"]

[[rule]]
name = "d"
table = "public.t"
on = ["insert"]
keys = ["d:{id}"]
when_changed = ["id"]
"#;
        let got = problems(text);
        let expect = [
            "rules.toml: rule \"a\": table: \"products\" is not schema-qualified",
            "rules.toml: rule \"a\": on: unknown operation \"upsert\"",
            "rules.toml: rule \"a\": on: \"insert\" is listed twice",
            "rules.toml: rule \"a\": keys: \"a:{id\": '{' without a closing '}'",
            "rules.toml: rule \"a\": keys: \"b:{}\": empty placeholder",
            "rules.toml: rule \"a\": keys: \"c:{id}\" is listed twice",
            "rules.toml: rule \"a\": ttl: only a republish rule has a TTL",
            "rules.toml: rule \"a\": columns: only a republish rule writes columns",
            "rules.toml: rule \"a\": name: duplicate rule name",
            "rules.toml: rule \"a\": action: unknown action \"upsert\"",
            "rules.toml: rule \"a\": when_changed: names column \"x\" twice",
            "rules.toml: rule \"a\": keys: \"{id}\" starts with a placeholder",
            "rules.toml: rule \"c\": keys: a republish rule needs at least one key",
            "rules.toml: rule \"c\": ttl: \"soon\" is not a duration",
            "rules.toml: rule \"c\": columns: is empty",
            "rules.toml: rule \"c\": truncate_tags: \"t:{id}\" has a placeholder",
            "rules.toml: rule \"d\": when_changed: the rule does not listen to updates",
        ];
        for e in expect {
            assert!(
                got.iter().any(|g| g.starts_with(e)),
                "missing {e:?} in\n{}",
                got.join("\n")
            );
        }
        assert_eq!(got.len(), expect.len(), "{}", got.join("\n"));
    }

    #[test]
    fn every_example_in_the_rules_reference_compiles() {
        let doc = include_str!("../../rules/README.md");
        let blocks: Vec<&str> = doc
            .split("```toml")
            .skip(1)
            .map(|b| b.split("```").next().unwrap())
            .collect();
        assert!(blocks.len() >= 3, "the reference has its examples");
        for block in blocks {
            if let Err(e) = rules(block) {
                panic!("{block}\n{e}");
            }
        }
    }

    #[test]
    fn a_rule_with_nothing_to_invalidate_is_an_error() {
        let got = problems("[[rule]]\nname = \"x\"\ntable = \"public.t\"\n");
        assert_eq!(got.len(), 1);
        assert!(got[0].contains("neither keys nor tags"), "{got:?}");
    }

    #[test]
    fn the_error_lists_every_problem() {
        let err =
            rules("[[rule]]\nname = \"x\"\ntable = \"t\"\naction = \"nope\"\nkeys = [\"k\"]\n")
                .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("2 problems in the rules:"), "{text}");
    }
}
