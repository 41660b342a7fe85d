//! Planning: a committed change becomes the keys to delete, the keys to republish
//! with their value, and the tags to purge, deduplicated across rules.
//!
//! Nothing is invented: a key whose placeholder is NULL is skipped, a value Postgres
//! did not send (unchanged TOAST, outside a key-only old row) is taken from the other
//! row when it is there and otherwise makes the key unknowable, and a republish that
//! would need such a value deletes the key instead. Each of these is a [`Note`] on the
//! plan and a counter, never a silent guess.

// Keys and tags come from the rows: seeded hashing (foldhash), fast on short keys.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::sync::Arc;

use crate::plan::{NoteKind, Plan, Republish};
use crate::rules::bind::{note, BoundRule};
use crate::rules::compile::{Action, Rule, RuleSet};
use crate::source::change::ReplicaIdentity;
use crate::source::{Change, Op, Relation, TableName};

/// Turns changes into plans; binds each rule to a table's column positions once per
/// table shape (again after DDL).
#[derive(Debug)]
pub struct Planner {
    rules: Arc<RuleSet>,
    bound: HashMap<u32, Bound>,
}

#[derive(Debug)]
struct Bound {
    relation: Arc<Relation>,
    rules: Vec<BoundRule>,
}

/// A plan being built: entries are pushed as the rules produce them, duplicates are
/// removed once at the end, in time linear in what was pushed (10,000 rules on one
/// table, each rendering a key, make a plan of 10,000 keys).
#[derive(Debug, Default)]
pub(crate) struct PlanBuilder {
    plan: Plan,
}

/// Removes later duplicates, keeping the order of first appearance: by scanning for
/// short lists, through a set for long ones.
fn dedup_first<T>(items: &mut Vec<T>, key: impl Fn(&T) -> &str) {
    const SCAN_UP_TO: usize = 16;
    if items.len() < 2 {
        return;
    }
    let keep: Vec<bool> = if items.len() <= SCAN_UP_TO {
        (0..items.len())
            .map(|i| !items[..i].iter().any(|x| key(x) == key(&items[i])))
            .collect()
    } else {
        let mut seen = HashSet::with_capacity(items.len());
        items.iter().map(|x| seen.insert(key(x))).collect()
    };
    if keep.iter().all(|k| *k) {
        return;
    }
    let mut keep = keep.into_iter();
    items.retain(|_| keep.next().unwrap_or(true));
}

impl PlanBuilder {
    pub(crate) fn delete(&mut self, key: String) {
        self.plan.delete.push(key);
    }

    /// A key a republish rule manages, deleted: it leaves its version behind.
    pub(crate) fn tombstone(&mut self, key: String) {
        self.plan.tombstones.push(key.clone());
        self.plan.delete.push(key);
    }

    pub(crate) fn purge(&mut self, tag: String) {
        self.plan.purge_tags.push(tag);
    }

    pub(crate) fn republish(&mut self, r: Republish) {
        self.plan.republish.push(r);
    }

    pub(crate) fn flush_prefix(&mut self, prefix: String) {
        self.plan.flush_prefixes.push(prefix);
    }

    /// What a TRUNCATE of the rule's table flushes: its `truncate_tags`, or else its
    /// key prefixes and every subscriber.
    fn whole_table(&mut self, rule: &Rule) {
        self.rule(&rule.name);
        match &rule.truncate_tags {
            Some(tags) => tags.iter().for_each(|t| self.purge(t.clone())),
            None => {
                self.plan.flush_all = true;
                for k in &rule.keys {
                    self.flush_prefix(k.literal_prefix().to_string());
                }
            }
        }
    }

    pub(crate) fn rule(&mut self, name: &str) {
        self.plan.rules.push(name.to_string());
    }

    /// The plan, without duplicates (the first of each republish wins). A key both
    /// deleted and republished (two rules disagree) is deleted: the next read fills it
    /// from the database, which is always right.
    pub(crate) fn finish(self) -> Plan {
        let mut plan = self.plan;
        dedup_first(&mut plan.delete, |k| k);
        dedup_first(&mut plan.purge_tags, |k| k);
        dedup_first(&mut plan.flush_prefixes, |k| k);
        dedup_first(&mut plan.rules, |k| k);
        dedup_first(&mut plan.republish, |r| &r.key);
        if !plan.delete.is_empty() && !plan.republish.is_empty() {
            let deleted: HashSet<&str> = plan.delete.iter().map(String::as_str).collect();
            let (gone, kept): (Vec<Republish>, Vec<Republish>) =
                std::mem::take(&mut plan.republish)
                    .into_iter()
                    .partition(|r| deleted.contains(r.key.as_str()));
            plan.republish = kept;
            plan.tombstones.extend(gone.into_iter().map(|r| r.key));
        }
        dedup_first(&mut plan.tombstones, |k| k);
        plan
    }
}

/// Says, once per table shape, when the stream will not carry the old values a rule's
/// keys need: a table whose replica identity changed, or a partition attached after
/// `check` ran, without REPLICA IDENTITY FULL. The plans then note `not_in_wal`.
fn warn_if_old_values_missing(rule: &Rule, relation: &Relation) {
    if relation.replica_identity == ReplicaIdentity::Full || !(rule.on_update || rule.on_delete) {
        return;
    }
    let missing: Vec<&str> = rule
        .template_columns()
        .filter(|c| {
            relation
                .columns
                .iter()
                .any(|col| col.name == *c && !col.is_key)
        })
        .collect();
    if let Some(column) = missing.first() {
        metrics::counter!("wal2cache_identity_warnings_total").increment(1);
        tracing::warn!(
            rule = %rule.name,
            table = %relation.table(),
            replica_identity = relation.replica_identity.as_str(),
            "{} uses column {column:?}, which is not in the replica identity of {}: an update or delete cannot invalidate its old keys; fix: ALTER TABLE {} REPLICA IDENTITY FULL;",
            rule.origin(),
            relation.table(),
            relation.table().quoted(),
        );
    }
}

/// Logs, once per table shape, a rule column the shape lacks and what the rule does
/// for its changes instead.
fn warn_if_columns_missing(b: &BoundRule, relation: &Relation) {
    let Some((column, field)) = &b.lacking else {
        return;
    };
    let instead = if b.unbound() {
        match b.rule.truncate_tags {
            Some(_) => "each of its changes purges the rule's truncate_tags, as a TRUNCATE would",
            None => "each of its changes flushes the rule's key prefixes and every subscriber, as a TRUNCATE would",
        }
    } else if *field == "when_changed" {
        "every update of it counts as changed"
    } else {
        "each of its changes deletes the rule's keys instead of republishing them"
    };
    tracing::warn!(
        rule = %b.rule.name,
        table = %relation.table(),
        column = %column,
        "{} uses column {column:?} ({field}), which {} does not have in this part of the stream (changes written before the column was added, or after it was dropped or renamed): {instead}; nothing is lost. If the column is gone for good, fix the rule (`wal2cache check` lists what does not fit) and reload",
        b.rule.origin(),
        relation.table(),
    );
}

impl Planner {
    pub fn new(rules: Arc<RuleSet>) -> Planner {
        Planner {
            rules,
            bound: HashMap::new(),
        }
    }

    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    /// The rules bound to this relation's current shape.
    fn bound(&mut self, relation: &Arc<Relation>) -> &Bound {
        let fresh = self
            .bound
            .get(&relation.oid)
            .is_some_and(|b| Arc::ptr_eq(&b.relation, relation) || *b.relation == **relation);
        if !fresh {
            let rules = self
                .rules
                .for_relation(relation)
                .into_iter()
                .map(|r| BoundRule::bind(r, relation))
                .collect::<Vec<_>>();
            for b in &rules {
                warn_if_old_values_missing(&b.rule, relation);
                warn_if_columns_missing(b, relation);
            }
            self.bound.insert(
                relation.oid,
                Bound {
                    relation: relation.clone(),
                    rules,
                },
            );
        }
        &self.bound[&relation.oid]
    }

    /// The plan for one row change.
    pub fn plan_change(&mut self, change: &Change) -> Plan {
        let bound = self.bound(&change.relation);
        let relation = &*bound.relation;
        let mut builder = PlanBuilder::default();
        let (new, old) = (change.new.as_ref(), change.old.as_ref());
        for b in &bound.rules {
            let rule = &*b.rule;
            if !rule.listens_to(change.op) {
                continue;
            }
            if change.op == Op::Update && !new.is_some_and(|n| b.update_matters(n, old)) {
                continue;
            }
            if let Some((column, field)) = b.lacking.as_ref().filter(|_| b.unbound()) {
                let kind = NoteKind::ColumnMissing {
                    column: column.clone(),
                    field,
                };
                note(rule, kind, &mut builder.plan.notes);
                builder.plan.detail.get_or_insert_with(|| {
                    format!(
                        "rule {:?}: column {column:?} ({field}) is not in {} as this change was written",
                        rule.name,
                        relation.table()
                    )
                });
                builder.whole_table(rule);
                b.counters.plans.increment(1);
                continue;
            }
            let plan = &mut builder.plan;
            let before = plan.delete.len() + plan.purge_tags.len() + plan.republish.len();
            let keys_before = plan.delete.len() + plan.republish.len();
            let notes_before = plan.notes.len();
            // Keys and tags of the old row (a delete, or an update that changed a key
            // column) and of the new row; a value not sent in one is taken from the other.
            b.render_rows(&b.tags, old, new, relation, &mut plan.notes, |t| {
                plan.purge_tags.push(t)
            });
            match &rule.action {
                Action::Delete => {
                    b.render_rows(&b.keys, old, new, relation, &mut plan.notes, |k| {
                        plan.delete.push(k)
                    });
                }
                Action::Republish { ttl, .. } => {
                    let (mut old_keys, mut new_keys) = (Vec::new(), Vec::new());
                    if let Some(o) = old {
                        b.render_all(&b.keys, o, new, relation, &mut plan.notes, |k| {
                            old_keys.push(k)
                        });
                    }
                    if let Some(n) = new {
                        b.render_all(&b.keys, n, old, relation, &mut plan.notes, |k| {
                            new_keys.push(k)
                        });
                    }
                    for k in old_keys {
                        if !new_keys.contains(&k) {
                            builder.tombstone(k);
                        }
                    }
                    if let Some(n) = new {
                        match b.value(n, old, relation) {
                            Ok(value) => {
                                for key in new_keys {
                                    builder.republish(Republish {
                                        key,
                                        value: value.clone(),
                                        ttl: *ttl,
                                    });
                                }
                            }
                            Err(column) => {
                                for key in new_keys {
                                    let column = column.clone();
                                    note(
                                        rule,
                                        NoteKind::RepublishFellBack {
                                            key: key.clone(),
                                            column,
                                        },
                                        &mut builder.plan.notes,
                                    );
                                    builder.tombstone(key);
                                }
                            }
                        }
                    }
                }
            }
            let plan = &builder.plan;
            if plan.notes.len() > notes_before {
                b.counters
                    .null_keys
                    .increment(b.null_keys(&plan.notes[notes_before..]));
            }
            if plan.delete.len() + plan.purge_tags.len() + plan.republish.len() > before {
                b.counters.plans.increment(1);
                b.counters
                    .keys
                    .increment((plan.delete.len() + plan.republish.len() - keys_before) as u64);
                builder.rule(&rule.name);
            }
        }
        builder.finish()
    }

    /// The plan for a TRUNCATE: each rule's `truncate_tags`, or else a flush of its key
    /// prefixes and of every subscriber.
    pub fn plan_truncate(&self, relations: &[Arc<Relation>]) -> Plan {
        let mut builder = PlanBuilder::default();
        for relation in relations {
            for rule in self.rules.for_relation(relation) {
                builder.whole_table(rule);
            }
        }
        builder.finish()
    }

    /// The plan for a rules' table whose changes were not all streamed (it was missing
    /// from the publication, see `source::membership`): as for a TRUNCATE of it.
    pub fn plan_unstreamed(&self, table: &TableName) -> Plan {
        let mut builder = PlanBuilder::default();
        for rule in self.rules.for_table(table) {
            builder.whole_table(rule);
        }
        builder.finish()
    }
}

/// What a slot loss flushes: every key under the literal prefix of each rule's key
/// templates (with the version sidecars of republished keys), every tag set under the
/// literal prefix of each tag template and each `truncate_tags` tag, and every
/// subscriber. Prefixes covered by a shorter one are left out. Also the rules whose
/// keys start with a placeholder: their keys cannot be found by prefix, only their
/// tags are purged.
pub fn plan_slot_loss(rules: &RuleSet) -> (Plan, Vec<String>) {
    let mut keys: Vec<String> = Vec::new();
    let mut tags: Vec<String> = Vec::new();
    let mut unflushable = Vec::new();
    for rule in rules.rules() {
        for k in &rule.keys {
            let prefix = k.literal_prefix();
            if prefix.is_empty() {
                if !unflushable.contains(&rule.name) {
                    unflushable.push(rule.name.clone());
                }
                continue;
            }
            keys.push(prefix.to_string());
            if matches!(rule.action, Action::Republish { .. }) && !prefix.contains('{') {
                // The sidecar of a key without a hash tag is `{KEY}:w2c:v`.
                keys.push(format!("{{{prefix}"));
            }
        }
        tags.extend(rule.tags.iter().map(|t| t.literal_prefix().to_string()));
        tags.extend(rule.truncate_tags.iter().flatten().cloned());
    }
    let plan = Plan {
        flush_prefixes: shortest_prefixes(keys),
        purge_tag_prefixes: shortest_prefixes(tags),
        flush_all: true,
        rules: rules.rules().iter().map(|r| r.name.clone()).collect(),
        ..Plan::default()
    };
    (plan, unflushable)
}

/// The prefixes no other of them starts with, sorted.
fn shortest_prefixes(mut prefixes: Vec<String>) -> Vec<String> {
    prefixes.sort();
    prefixes.dedup();
    let mut out: Vec<String> = Vec::with_capacity(prefixes.len());
    for p in prefixes {
        // Sorted: a prefix of `p` sorts before it, and is the last one kept if any.
        if !out.last().is_some_and(|kept| p.starts_with(kept.as_str())) {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Note;
    use crate::rules::compile;
    use crate::rules::plan_message;
    use crate::rules::testing::rule_set;
    use crate::source::change::{Column, ReplicaIdentity};
    use crate::source::pgoutput::{Datum, OldKind, TupleData};
    use crate::source::value::oid;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::time::Duration;

    /// public.products (id int key, slug text, category_id int, name text, price numeric, body text)
    fn products(identity: ReplicaIdentity) -> Arc<Relation> {
        let col = |name: &str, type_oid, is_key| Column {
            name: name.into(),
            type_oid,
            type_modifier: -1,
            is_key,
        };
        let full = identity == ReplicaIdentity::Full;
        Arc::new(Relation {
            oid: 1000,
            schema: "public".into(),
            name: "products".into(),
            replica_identity: identity,
            columns: vec![
                col("id", oid::INT4, true),
                col("slug", oid::TEXT, full),
                col("category_id", oid::INT4, full),
                col("name", oid::TEXT, full),
                col("price", oid::NUMERIC, full),
                col("body", oid::TEXT, full),
            ],
            ancestors: Vec::new(),
        })
    }

    fn t(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn row(id: &str, slug: &str, cat: Datum, name: &str, price: &str, body: Datum) -> TupleData {
        TupleData(vec![t(id), t(slug), cat, t(name), t(price), body])
    }

    fn mug() -> TupleData {
        row("42", "blue-mug", t("7"), "Mug", "9.50", t("long text"))
    }

    const PRODUCT: &str = r#"
[[rule]]
name = "product"
table = "public.products"
keys = ["shop:product:v3:{id}", "shop:product:slug:v3:{slug}"]
tags = ["shop:category:{category_id}", "shop:products"]
when_changed = ["price", "name", "slug"]
truncate_tags = ["shop:products"]
"#;

    const PRODUCT_JSON: &str = r#"
[[rule]]
name = "product_json"
table = "public.products"
keys = ["shop:product:json:v3:{id}"]
action = "republish"
columns = ["id", "name", "price"]
ttl = "1h"
"#;

    fn plan(rules: &str, change: &Change) -> Plan {
        Planner::new(rule_set(rules)).plan_change(change)
    }

    #[test]
    fn insert_deletes_keys_and_purges_tags_of_the_new_row() {
        let p = plan(
            PRODUCT,
            &Change::insert(products(ReplicaIdentity::Default), mug()),
        );
        assert_eq!(
            p.delete,
            ["shop:product:v3:42", "shop:product:slug:v3:blue-mug"]
        );
        assert_eq!(p.purge_tags, ["shop:category:7", "shop:products"]);
        assert!(p.republish.is_empty() && p.notes.is_empty());
        assert_eq!(p.first_key(), Some("shop:product:v3:42"));
        assert!(p.tombstones.is_empty(), "delete rules unlink plainly");
        assert_eq!(p.rules, ["product"]);
    }

    #[test]
    fn an_update_that_changes_a_key_column_invalidates_old_and_new_keys() {
        let rel = products(ReplicaIdentity::Full);
        let new = row("42", "navy-mug", t("8"), "Mug", "9.50", t("long text"));
        let c = Change::update(rel, Some((OldKind::Full, mug())), new);
        let p = plan(PRODUCT, &c);
        assert_eq!(
            p.delete,
            [
                "shop:product:v3:42",
                "shop:product:slug:v3:blue-mug",
                "shop:product:slug:v3:navy-mug"
            ]
        );
        assert_eq!(
            p.purge_tags,
            ["shop:category:7", "shop:products", "shop:category:8"]
        );
    }

    #[test]
    fn a_key_the_old_and_new_rows_share_is_rendered_once() {
        let rel = products(ReplicaIdentity::Full);
        let new = row(
            "42",
            "navy-mug",
            t("7"),
            "Mug",
            "9.50",
            Datum::UnchangedToast,
        );
        let c = Change::update(rel.clone(), Some((OldKind::Full, mug())), new);
        let mut planner = Planner::new(rule_set(PRODUCT));
        let b = &planner.bound(&rel).rules[0];
        let (mut keys, mut tags, mut notes) = (Vec::new(), Vec::new(), Vec::new());
        let (old, new) = (c.old.as_ref(), c.new.as_ref());
        b.render_rows(&b.keys, old, new, &rel, &mut notes, |k| keys.push(k));
        b.render_rows(&b.tags, old, new, &rel, &mut notes, |t| tags.push(t));
        // Before any de-duplication: the id and the category are the same text in both
        // rows, so their keys come once; the slug changed, so both slugs come.
        assert_eq!(
            keys,
            [
                "shop:product:v3:42",
                "shop:product:slug:v3:blue-mug",
                "shop:product:slug:v3:navy-mug"
            ]
        );
        assert_eq!(tags, ["shop:category:7", "shop:products"]);
        assert!(notes.is_empty());
        // A key column not sent in the new row (unchanged TOAST) is the old row's.
        let rules = PRODUCT.replace("shop:product:v3:{id}", "shop:product:body:{body}");
        let mut planner = Planner::new(rule_set(&rules));
        let b = &planner.bound(&rel).rules[0];
        let mut keys = Vec::new();
        b.render_rows(&b.keys, old, new, &rel, &mut notes, |k| keys.push(k));
        assert_eq!(
            keys.iter().filter(|k| k.contains(":body:")).count(),
            1,
            "{keys:?}"
        );
    }

    #[test]
    fn when_changed_ignores_updates_that_change_none_of_its_columns() {
        let rel = products(ReplicaIdentity::Full);
        let only_body = row("42", "blue-mug", t("7"), "Mug", "9.50", t("other text"));
        let c = Change::update(rel.clone(), Some((OldKind::Full, mug())), only_body);
        assert!(plan(PRODUCT, &c).is_empty());
        let price = row("42", "blue-mug", t("7"), "Mug", "10.00", t("long text"));
        let c = Change::update(rel, Some((OldKind::Full, mug())), price);
        assert_eq!(plan(PRODUCT, &c).delete.len(), 2);
    }

    #[test]
    fn without_the_old_row_an_update_is_assumed_changed() {
        let c = Change::update(products(ReplicaIdentity::Default), None, mug());
        assert_eq!(
            plan(PRODUCT, &c).delete,
            ["shop:product:v3:42", "shop:product:slug:v3:blue-mug"]
        );
    }

    #[test]
    fn an_unchanged_toast_column_counts_as_unchanged() {
        let rules = PRODUCT.replace(r#"["price", "name", "slug"]"#, r#"["body"]"#);
        let new = row(
            "42",
            "blue-mug",
            t("7"),
            "Mug",
            "9.50",
            Datum::UnchangedToast,
        );
        let c = Change::update(products(ReplicaIdentity::Default), None, new);
        assert!(plan(&rules, &c).is_empty());
    }

    #[test]
    fn a_null_placeholder_skips_that_key_and_says_so() {
        let new = row("42", "blue-mug", Datum::Null, "Mug", "9.50", t("x"));
        let p = plan(
            PRODUCT,
            &Change::insert(products(ReplicaIdentity::Default), new),
        );
        assert_eq!(
            p.purge_tags,
            ["shop:products"],
            "no tag for a NULL category"
        );
        assert_eq!(
            p.notes,
            [Note {
                rule: "product".into(),
                kind: NoteKind::NullPlaceholder {
                    template: "shop:category:{category_id}".into(),
                    column: "category_id".into()
                }
            }]
        );
    }

    #[test]
    fn unchanged_toast_placeholders_come_from_the_old_row_or_are_noted() {
        let rules = r#"
[[rule]]
name = "by_body"
table = "public.products"
keys = ["p:body:{body}"]
"#;
        let new = row(
            "42",
            "blue-mug",
            t("7"),
            "Mug",
            "9.50",
            Datum::UnchangedToast,
        );
        let full = Change::update(
            products(ReplicaIdentity::Full),
            Some((OldKind::Full, mug())),
            new.clone(),
        );
        assert_eq!(plan(rules, &full).delete, ["p:body:long text"]);

        let keyonly = Change::update(products(ReplicaIdentity::Default), None, new);
        let p = plan(rules, &keyonly);
        assert!(
            p.delete.is_empty(),
            "never a key made of a placeholder value: {p:?}"
        );
        assert!(matches!(&p.notes[0].kind, NoteKind::NotInWal { column, .. } if column == "body"));
    }

    #[test]
    fn a_delete_with_a_key_only_old_row_uses_what_was_sent() {
        let rel = products(ReplicaIdentity::Default);
        let key = TupleData(vec![
            t("42"),
            Datum::Null,
            Datum::Null,
            Datum::Null,
            Datum::Null,
            Datum::Null,
        ]);
        let p = plan(PRODUCT, &Change::delete(rel, (OldKind::Key, key)));
        assert_eq!(p.delete, ["shop:product:v3:42"]);
        assert_eq!(p.purge_tags, ["shop:products"]);
        // The slug and category are not in the WAL: noted, never NULL-skipped or guessed.
        let kinds: Vec<_> = p.notes.iter().map(|n| n.kind.reason()).collect();
        assert_eq!(kinds, ["not_in_wal", "not_in_wal"]);
    }

    #[test]
    fn republish_writes_the_projected_row_with_its_ttl() {
        let p = plan(
            PRODUCT_JSON,
            &Change::insert(products(ReplicaIdentity::Default), mug()),
        );
        assert_eq!(
            p.republish,
            [Republish {
                key: "shop:product:json:v3:42".into(),
                value: r#"{"id":42,"name":"Mug","price":"9.50"}"#.into(),
                ttl: Some(Duration::from_secs(3600)),
            }]
        );
        assert!(p.delete.is_empty());
    }

    #[test]
    fn republish_without_a_projection_writes_every_column() {
        let rules = PRODUCT_JSON.replace("columns = [\"id\", \"name\", \"price\"]\n", "");
        let p = plan(
            &rules,
            &Change::insert(products(ReplicaIdentity::Default), mug()),
        );
        assert_eq!(
            &*p.republish[0].value,
            r#"{"id":42,"slug":"blue-mug","category_id":7,"name":"Mug","price":"9.50","body":"long text"}"#
        );
    }

    #[test]
    fn republish_takes_unchanged_toast_from_the_old_row_or_falls_back_to_delete() {
        let rules = PRODUCT_JSON.replace(r#"["id", "name", "price"]"#, r#"["id", "body"]"#);
        let new = row(
            "42",
            "blue-mug",
            t("7"),
            "Mug",
            "9.50",
            Datum::UnchangedToast,
        );
        let full = Change::update(
            products(ReplicaIdentity::Full),
            Some((OldKind::Full, mug())),
            new.clone(),
        );
        let p = plan(&rules, &full);
        assert_eq!(&*p.republish[0].value, r#"{"id":42,"body":"long text"}"#);

        let p = plan(
            &rules,
            &Change::update(products(ReplicaIdentity::Default), None, new),
        );
        assert!(p.republish.is_empty());
        assert_eq!(p.delete, ["shop:product:json:v3:42"]);
        assert!(
            matches!(&p.notes[0].kind, NoteKind::RepublishFellBack { column, .. } if column == "body")
        );
    }

    #[test]
    fn republish_deletes_on_delete_and_drops_the_old_key_on_a_key_change() {
        let rel = products(ReplicaIdentity::Full);
        let p = plan(
            PRODUCT_JSON,
            &Change::delete(rel.clone(), (OldKind::Full, mug())),
        );
        assert_eq!(p.delete, ["shop:product:json:v3:42"]);
        assert!(p.republish.is_empty());
        assert_eq!(
            p.tombstones,
            ["shop:product:json:v3:42"],
            "a republished key leaves its version"
        );

        let moved = row("43", "blue-mug", t("7"), "Mug", "9.50", t("long text"));
        let p = plan(
            PRODUCT_JSON,
            &Change::update(rel, Some((OldKind::Full, mug())), moved),
        );
        assert_eq!(p.delete, ["shop:product:json:v3:42"]);
        assert_eq!(p.republish[0].key, "shop:product:json:v3:43");
    }

    #[test]
    fn plans_are_deduplicated_across_rules_and_deletes_win() {
        let rules = format!(
            "{PRODUCT}{PRODUCT_JSON}
[[rule]]
name = \"again\"
table = \"public.products\"
keys = [\"shop:product:v3:{{id}}\", \"shop:product:json:v3:{{id}}\"]
tags = [\"shop:products\"]
truncate_tags = [\"shop:products\"]
"
        );
        let p = plan(
            &rules,
            &Change::insert(products(ReplicaIdentity::Default), mug()),
        );
        assert_eq!(
            p.delete,
            [
                "shop:product:v3:42",
                "shop:product:slug:v3:blue-mug",
                "shop:product:json:v3:42"
            ]
        );
        assert!(
            p.republish.is_empty(),
            "a key both deleted and republished is deleted"
        );
        assert_eq!(p.tombstones, ["shop:product:json:v3:42"]);
        assert_eq!(p.purge_tags, ["shop:category:7", "shop:products"]);
    }

    #[test]
    fn operations_a_rule_does_not_list_produce_nothing() {
        let rules = PRODUCT
            .replace("keys =", "on = [\"delete\"]\nkeys =")
            .replace("when_changed = [\"price\", \"name\", \"slug\"]\n", "");
        let rel = products(ReplicaIdentity::Full);
        assert!(plan(&rules, &Change::insert(rel.clone(), mug())).is_empty());
        assert!(plan(&rules, &Change::update(rel.clone(), None, mug())).is_empty());
        assert!(!plan(&rules, &Change::delete(rel, (OldKind::Full, mug()))).is_empty());
    }

    #[test]
    fn truncate_purges_truncate_tags_or_flushes_the_key_prefixes() {
        let rel = products(ReplicaIdentity::Default);
        let tagged = Planner::new(rule_set(PRODUCT)).plan_truncate(std::slice::from_ref(&rel));
        assert_eq!(tagged.purge_tags, ["shop:products"]);
        assert!(!tagged.flush_all && tagged.flush_prefixes.is_empty());

        let flushed = Planner::new(rule_set(PRODUCT_JSON)).plan_truncate(&[rel]);
        assert!(flushed.flush_all);
        assert_eq!(flushed.flush_prefixes, ["shop:product:json:v3:"]);
    }

    #[test]
    fn a_slot_loss_flushes_every_rules_prefixes_and_tag_sets() {
        let rules = format!(
            "{PRODUCT}{PRODUCT_JSON}
[[rule]]
name = \"by_slug_only\"
table = \"public.products\"
keys = [\"{{slug}}\"]
truncate_tags = [\"shop:all\"]
"
        );
        let (p, unflushable) = plan_slot_loss(&rule_set(&rules));
        assert!(p.flush_all);
        // Each rule's prefix, and the version sidecars of the republished keys.
        assert_eq!(
            p.flush_prefixes,
            [
                "shop:product:json:v3:",
                "shop:product:slug:v3:",
                "shop:product:v3:",
                "{shop:product:json:v3:"
            ]
        );
        // Tag templates' prefixes and truncate tags, once each.
        assert_eq!(
            p.purge_tag_prefixes,
            ["shop:all", "shop:category:", "shop:products"]
        );
        assert_eq!(unflushable, ["by_slug_only"]);
        assert_eq!(
            shortest_prefixes(vec!["ab".into(), "a".into(), "b".into(), "a".into()]),
            ["a", "b"]
        );
    }

    #[test]
    fn wal2cache_messages_become_plans() {
        let p = plan_message("wal2cache", br#"{"keys":["a","b","a"],"tags":["t"]}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.delete, p.purge_tags),
            (vec!["a".to_string(), "b".into()], vec!["t".to_string()])
        );
        assert!(plan_message("other-app", b"anything").is_none());
        let p = plan_message(
            "wal2cache",
            br#"{"keys":["k:3",null,"",7],"tags":[null,"t"]}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (p.delete, p.purge_tags),
            (vec!["k:3".to_string()], vec!["t".to_string()]),
            "invalid entries drop only themselves"
        );
        for bad in [
            &b"not json"[..],
            br#"{"keys":"a"}"#,
            br#"{"key":["a"]}"#,
            br#"["a"]"#,
        ] {
            let err = plan_message("wal2cache", bad).unwrap().unwrap_err();
            assert!(err.to_string().contains("expected {\"keys\""), "{err}");
        }
    }

    #[test]
    fn an_all_message_is_a_flush_with_its_reason() {
        let p = plan_message("wal2cache", br#"{"all":true,"reason":"deploy 42"}"#)
            .unwrap()
            .unwrap();
        assert!(p.flush_all && p.delete.is_empty());
        assert_eq!(p.detail.as_deref(), Some("deploy 42"));
        let p = plan_message("wal2cache", br#"{"all":false,"keys":["k"]}"#)
            .unwrap()
            .unwrap();
        assert!(!p.flush_all);
        assert_eq!(p.delete, ["k"]);
        let err = plan_message("wal2cache", br#"{"all":"yes"}"#)
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("not true or false"), "{err}");
    }

    /// `products` without the column `name`, as a change written before it was added
    /// (or after it was dropped) describes the table.
    fn without(rel: &Relation, column: &str) -> Arc<Relation> {
        let mut shape = rel.clone();
        shape.columns.retain(|c| c.name != column);
        Arc::new(shape)
    }

    #[test]
    fn a_change_from_before_a_key_column_existed_flushes_what_a_truncate_would() {
        let mut planner = Planner::new(rule_set(&format!("{PRODUCT}{PRODUCT_JSON}")));
        let rel = products(ReplicaIdentity::Default);
        let current = planner.plan_change(&Change::insert(rel.clone(), mug()));
        assert!(current
            .delete
            .contains(&"shop:product:slug:v3:blue-mug".to_string()));
        // No slug: `product`'s keys cannot be computed. It purges its truncate_tags,
        // as a TRUNCATE would; `product_json` does not use slug and republishes.
        let old = Change::insert(
            without(&rel, "slug"),
            TupleData(vec![t("42"), t("7"), t("Mug"), t("9.50"), t("x")]),
        );
        let p = planner.plan_change(&old);
        assert_eq!(p.purge_tags, ["shop:products"]);
        assert!(p.delete.is_empty() && !p.flush_all, "{p:?}");
        assert_eq!(p.republish.len(), 1);
        assert_eq!(p.republish[0].key, "shop:product:json:v3:42");
        assert!(matches!(
            &p.notes[..],
            [Note { rule, kind: NoteKind::ColumnMissing { column, field: "keys" } }]
                if rule == "product" && column == "slug"
        ));
        assert!(
            p.detail.as_deref().is_some_and(|d| d.contains("\"slug\"")),
            "{p:?}"
        );
        // Without truncate_tags: the key prefixes and every subscriber.
        let plain = PRODUCT.replace("truncate_tags = [\"shop:products\"]\n", "");
        let p = Planner::new(rule_set(&plain)).plan_change(&old);
        assert!(p.flush_all, "{p:?}");
        assert_eq!(
            p.flush_prefixes,
            ["shop:product:v3:", "shop:product:slug:v3:"]
        );
        // The current shape binds again.
        assert_eq!(planner.plan_change(&Change::insert(rel, mug())), current);
    }

    #[test]
    fn a_change_from_before_a_projected_column_existed_deletes_the_key_instead() {
        let rel = products(ReplicaIdentity::Default);
        let change = Change::insert(
            without(&rel, "price"),
            TupleData(vec![t("42"), t("blue-mug"), t("7"), t("Mug"), t("x")]),
        );
        let p = plan(PRODUCT_JSON, &change);
        assert!(p.republish.is_empty() && !p.flush_all, "{p:?}");
        assert_eq!(p.delete, ["shop:product:json:v3:42"]);
        assert_eq!(p.tombstones, ["shop:product:json:v3:42"]);
        assert!(matches!(
            &p.notes[..],
            [Note { kind: NoteKind::RepublishFellBack { column, .. }, .. }] if column == "price"
        ));
    }

    #[test]
    fn an_update_from_before_a_when_changed_column_existed_counts_as_changed() {
        let rel = without(&products(ReplicaIdentity::Full), "price");
        let old = TupleData(vec![t("42"), t("blue-mug"), t("7"), t("Mug"), t("x")]);
        let new = TupleData(vec![t("42"), t("blue-mug"), t("7"), t("Mug"), t("y")]);
        let change = Change::update(rel, Some((OldKind::Full, old)), new);
        let p = plan(PRODUCT, &change);
        assert!(
            p.delete.contains(&"shop:product:v3:42".to_string()),
            "{p:?}"
        );
    }

    fn arb_datum() -> impl Strategy<Value = Datum> {
        prop_oneof![
            Just(Datum::Null),
            Just(Datum::UnchangedToast),
            "[a-z0-9{}:]{0,6}".prop_map(|s| t(&s)),
            proptest::collection::vec(any::<u8>(), 0..4).prop_map(|b| Datum::Text(Bytes::from(b))),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_changes_never_panic_and_plan_the_same_twice(
            op in 0u8..3,
            identity in prop_oneof![Just(ReplicaIdentity::Default), Just(ReplicaIdentity::Full)],
            new in proptest::collection::vec(arb_datum(), 0..8),
            old in proptest::option::of(proptest::collection::vec(arb_datum(), 0..8)),
        ) {
            let rel = products(identity);
            let kind = if identity == ReplicaIdentity::Full { OldKind::Full } else { OldKind::Key };
            let change = match op {
                0 => Change::insert(rel, TupleData(new)),
                1 => Change::update(rel, old.map(|o| (kind, TupleData(o))), TupleData(new)),
                _ => Change::delete(rel, (kind, TupleData(old.unwrap_or_default()))),
            };
            let rules = rule_set(&format!("{PRODUCT}{PRODUCT_JSON}"));
            let first = Planner::new(rules.clone()).plan_change(&change);
            let second = Planner::new(rules).plan_change(&change);
            prop_assert_eq!(first, second);
        }

        #[test]
        fn arbitrary_rules_text_never_panics_the_loader(text in "(\\[\\[rule\\]\\]\n|name = \"[a-z]{0,3}\"\n|table = \"[a-z.]{0,8}\"\n|keys = \\[\"[a-z{}:]{0,8}\"\\]\n|tags = \\[\"[{}a-z]{0,5}\"\\]\n|action = \"[a-z]{0,9}\"\n|ttl = \"[0-9a-z]{0,4}\"\n|on = \\[\"[a-z]{0,6}\"\\]\n|[ -~]{0,10}\n){0,12}") {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("r.toml");
            std::fs::write(&file, &text).unwrap();
            let _ = compile::load(&file);
        }
    }
}
