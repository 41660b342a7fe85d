//! Schemas real databases have, each a case that once broke: partitioned tables,
//! inheritance, tables without a replica identity, generated columns, names with dots,
//! system catalogs, NULLs in a manual invalidation. `check` and `setup` run as the
//! binary does; changes come from the real stream and are planned by the real rules.

mod support;

use std::path::{Path, PathBuf};

use support::config::ConfigBuilder;
use support::daemon::run_binary;
use support::db::TestDb;
use support::rules::{compile_rules, problems, warnings};
use support::stream::{changes, collect_until, commits};
use wal2cache::rules::{plan_message, Planner};
use wal2cache::source::{Source, SourceEvent, TableName};
use wal2cache::Lsn;

/// A config with `rules` in `dir`, on the test's database (slot `<db>_s`, publication
/// `w2c`); Redis and the brokers do not answer (`check` and `setup` do not ask them).
fn write_schemas_config(dir: &Path, db: &TestDb, rules: &str) -> PathBuf {
    ConfigBuilder::on_url(&db.url)
        .name(&format!("schemas-{}", db.name))
        .slot_suffix(db, "s")
        .rules(rules)
        .write(dir)
}

/// Runs `wal2cache <command> --config <config>` (logging at warn): exit code, stdout,
/// stderr.
fn cli(command: &str, config: &Path) -> (i32, String, String) {
    run_binary(
        &[command, "--config", config.to_str().unwrap()],
        &[("WAL2CACHE_LOG", "warn")],
    )
}

const PARTITIONED: &str = "
    CREATE TABLE parent (id int, region text, name text, PRIMARY KEY (id, region))
        PARTITION BY LIST (region);
    CREATE TABLE parent_eu PARTITION OF parent FOR VALUES IN ('eu');
    CREATE TABLE parent_us PARTITION OF parent FOR VALUES IN ('us');";

const PARENT_RULE: &str = r#"
[[rule]]
name = "parent"
table = "public.parent"
keys = ["p:{id}:{region}"]
tags = ["p:region:{region}"]
truncate_tags = ["p:all"]
"#;

#[tokio::test]
async fn partitioned_table_setup_is_idempotent_and_check_sees_it_published() {
    let db = TestDb::new("part_setup").await;
    db.exec(PARTITIONED).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_schemas_config(dir.path(), &db, PARENT_RULE);
    let (code, out, err) = cli("check", &config);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("setup will add"), "{out}");
    for attempt in 0..2 {
        let (code, out, err) = cli("setup", &config);
        assert_eq!(code, 0, "setup #{attempt}: {out}{err}");
    }
    let (code, out, err) = cli("check", &config);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains("setup will add"),
        "the partitioned table is published: {out}"
    );
    let via_root: bool = db
        .client
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = 'w2c'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !via_root,
        "partitions publish under their own names, TRUNCATE of one included"
    );
}

#[tokio::test]
async fn changes_to_partitions_plan_with_the_parents_rules_attached_ones_too() {
    let db = TestDb::new("part_plan").await;
    db.exec(PARTITIONED).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_schemas_config(dir.path(), &db, PARENT_RULE);
    let (code, out, err) = cli("setup", &config);
    assert_eq!(code, 0, "{out}{err}");
    let slot = format!("{}_s", db.name);
    let mut planner = Planner::new(compile_rules(PARENT_RULE));
    let mut source = Source::start(db.stream(&slot, "w2c"), Lsn::ZERO);

    db.exec_each(&[
        "INSERT INTO parent VALUES (1, 'eu', 'a'), (2, 'us', 'b')",
        "DELETE FROM parent_us WHERE id = 2",
        "CREATE TABLE parent_asia (id int NOT NULL, region text NOT NULL, name text);
         ALTER TABLE parent ATTACH PARTITION parent_asia FOR VALUES IN ('asia')",
        "INSERT INTO parent VALUES (3, 'asia', 'c')",
        "TRUNCATE parent_eu",
    ])
    .await;
    // Up to the TRUNCATE (PostgreSQL 14 also sends the DDL's empty transaction).
    let events = collect_until(&mut source, std::time::Duration::from_secs(30), |evs| {
        evs.iter()
            .any(|e| matches!(e, SourceEvent::Truncate { .. }))
    })
    .await;
    let mut deleted = Vec::new();
    let mut tags = Vec::new();
    let mut tables = Vec::new();
    for e in &events {
        let plan = match e {
            SourceEvent::Change(c) => {
                tables.push(c.relation.qualified_name());
                assert_eq!(c.relation.ancestors, [TableName::new("public", "parent")]);
                planner.plan_change(c)
            }
            SourceEvent::Truncate { relations, .. } => {
                tables.extend(relations.iter().map(|r| r.qualified_name()));
                planner.plan_truncate(relations)
            }
            _ => continue,
        };
        deleted.extend(plan.delete);
        tags.extend(plan.purge_tags);
    }
    assert_eq!(
        tables,
        [
            "public.parent_eu",
            "public.parent_us",
            "public.parent_us",
            "public.parent_asia",
            "public.parent_eu"
        ]
    );
    assert_eq!(deleted, ["p:1:eu", "p:2:us", "p:2:us", "p:3:asia"]);
    assert_eq!(
        tags,
        [
            "p:region:eu",
            "p:region:us",
            "p:region:us",
            "p:region:asia",
            "p:all"
        ],
        "TRUNCATE of one partition purges the parent's truncate_tags"
    );
    source.stop().await;
}

#[tokio::test]
async fn replica_identity_of_a_partitioned_table_is_each_partitions() {
    let db = TestDb::new("part_ident").await;
    db.exec(PARTITIONED).await;
    db.exec("ALTER TABLE parent REPLICA IDENTITY FULL").await;
    let by_name = r#"
[[rule]]
name = "by_name"
table = "public.parent"
keys = ["p:name:{name}"]
truncate_tags = ["p:all"]
"#;
    let got = problems(&db, by_name, true).await;
    let found = got
        .iter()
        .find(|p| p.contains("not in the replica identity of"))
        .unwrap_or_else(|| panic!("{got:#?}"));
    for needed in [
        "public.parent_eu (id, region)",
        "public.parent_us (id, region)",
        "fix: ALTER TABLE \"public\".\"parent_eu\" REPLICA IDENTITY FULL; ALTER TABLE \"public\".\"parent_us\" REPLICA IDENTITY FULL;",
    ] {
        assert!(found.contains(needed), "{needed:?} missing in {found}");
    }
    db.exec(
        "ALTER TABLE parent_eu REPLICA IDENTITY FULL; ALTER TABLE parent_us REPLICA IDENTITY FULL",
    )
    .await;
    let got = problems(&db, by_name, true).await;
    assert!(got.is_empty(), "{got:#?}");
}

#[tokio::test]
async fn a_publication_via_the_partition_root_is_refused_with_the_fix() {
    let db = TestDb::new("part_root").await;
    db.exec(PARTITIONED).await;
    db.exec("CREATE PUBLICATION w2c FOR TABLE parent WITH (publish_via_partition_root = true)")
        .await;
    let got = problems(&db, PARENT_RULE, true).await;
    assert!(
        got.iter()
            .any(|p| p.contains("TRUNCATE of a single partition")
                && p.contains("SET (publish_via_partition_root = false)")),
        "{got:#?}"
    );
}

#[tokio::test]
async fn inheritance_children_are_warned_about_published_and_planned() {
    let db = TestDb::new("inherit").await;
    db.exec(
        "CREATE TABLE base (id int PRIMARY KEY, v text);
         CREATE TABLE kid (extra int) INHERITS (base);
         ALTER TABLE kid ADD PRIMARY KEY (id);",
    )
    .await;
    let rules = "[[rule]]\nname = \"base\"\ntable = \"public.base\"\nkeys = [\"b:{id}\"]\n";
    let got = warnings(&db, rules).await;
    assert!(
        got.iter()
            .any(|w| w.contains("has inheritance children (public.kid)")),
        "{got:#?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_schemas_config(dir.path(), &db, rules);
    let (code, out, err) = cli("setup", &config);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli("check", &config);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("warning: ") && !out.contains("setup will add"),
        "{out}"
    );

    let mut planner = Planner::new(compile_rules(rules));
    let mut source = Source::start(db.stream(&format!("{}_s", db.name), "w2c"), Lsn::ZERO);
    db.exec("INSERT INTO kid VALUES (7, 'x', 1)").await;
    let events = commits(&mut source, 1).await;
    let change = changes(&events)[0];
    assert_eq!(change.relation.qualified_name(), "public.kid");
    assert_eq!(planner.plan_change(change).delete, ["b:7"]);
    source.stop().await;
}

#[tokio::test]
async fn setup_never_makes_the_applications_updates_fail() {
    let db = TestDb::new("nopk").await;
    db.exec(
        "CREATE TABLE nopk (id int, v text);
         CREATE TABLE nothing (id int PRIMARY KEY, v text);
         ALTER TABLE nothing REPLICA IDENTITY NOTHING;
         INSERT INTO nopk VALUES (1, 'a'); INSERT INTO nothing VALUES (1, 'a');",
    )
    .await;
    for table in ["nopk", "nothing"] {
        let rules = format!(
            "[[rule]]\nname = \"{table}\"\ntable = \"public.{table}\"\non = [\"insert\"]\nkeys = [\"n:{{id}}\"]\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let config = write_schemas_config(dir.path(), &db, &rules);
        let (code, out, err) = cli("setup", &config);
        assert_eq!(code, 3, "setup refuses {table}: {out}{err}");
        assert!(
            err.contains("would refuse the application's UPDATE and DELETE")
                && err.contains(&format!(
                    "fix: ALTER TABLE \"public\".\"{table}\" REPLICA IDENTITY FULL;"
                )),
            "{err}"
        );
        db.exec(&format!(
            "UPDATE {table} SET v = 'b'; DELETE FROM {table} WHERE id = 2"
        ))
        .await;
    }
    let published: i64 = db
        .client
        .query_one("SELECT count(*) FROM pg_publication_tables", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 0);
}

#[tokio::test]
async fn generated_columns_are_refused_on_servers_that_do_not_send_them() {
    let db = TestDb::new("gencol").await;
    db.exec(
        "CREATE TABLE g (id int PRIMARY KEY, v int, gen int GENERATED ALWAYS AS (v * 2) STORED)",
    )
    .await;
    let version: i32 = db
        .client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    for rule in [
        "on = [\"insert\"]\nkeys = [\"g:{gen}\"]",
        "keys = [\"g:{id}\"]\naction = \"republish\"\ncolumns = [\"id\", \"gen\"]",
    ] {
        let rules = format!("[[rule]]\nname = \"g\"\ntable = \"public.g\"\n{rule}\n");
        let got = problems(&db, &rules, true).await;
        if version < 180000 {
            assert!(
                got.iter().any(|p| p.contains("\"gen\", a generated column")
                    && p.contains("does not send generated columns")),
                "{rule}: {got:#?}"
            );
        } else {
            assert!(
                got.is_empty(),
                "setup creates the publication with them: {got:#?}"
            );
        }
    }
    if version >= 180000 {
        // An existing publication without publish_generated_columns.
        db.exec("CREATE PUBLICATION w2c FOR TABLE g").await;
        let rules = "[[rule]]\nname = \"g\"\ntable = \"public.g\"\non = [\"insert\"]\nkeys = [\"g:{gen}\"]\n";
        let got = problems(&db, rules, true).await;
        assert!(
            got.iter()
                .any(|p| p.contains("SET (publish_generated_columns = stored)")),
            "{got:#?}"
        );
        db.exec("ALTER PUBLICATION w2c SET (publish_generated_columns = stored)")
            .await;
        assert!(problems(&db, rules, true).await.is_empty());
        db.exec("DROP PUBLICATION w2c").await;
    }
    let all = "[[rule]]\nname = \"g\"\ntable = \"public.g\"\nkeys = [\"g:{id}\"]\naction = \"republish\"\n";
    assert!(problems(&db, all, true).await.is_empty());
    if version < 180000 {
        let got = warnings(&db, all).await;
        assert!(
            got.iter()
                .any(|w| w.contains("leaves out the generated column gen")),
            "{got:#?}"
        );
    }
}

#[tokio::test]
async fn quoted_names_work_and_system_catalogs_are_refused() {
    let db = TestDb::new("quoted").await;
    db.exec("CREATE TABLE \"dot.ted\" (id int PRIMARY KEY, v text)")
        .await;
    let rules = "[[rule]]\nname = \"d\"\ntable = 'public.\"dot.ted\"'\nkeys = [\"d:{id}\"]\n";
    assert!(problems(&db, rules, true).await.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let config = write_schemas_config(dir.path(), &db, rules);
    let (code, out, err) = cli("setup", &config);
    assert_eq!(code, 0, "{out}{err}");

    let mut planner = Planner::new(compile_rules(rules));
    let mut source = Source::start(db.stream(&format!("{}_s", db.name), "w2c"), Lsn::ZERO);
    db.exec("INSERT INTO \"dot.ted\" VALUES (5, 'x')").await;
    let events = commits(&mut source, 1).await;
    assert_eq!(planner.plan_change(changes(&events)[0]).delete, ["d:5"]);
    source.stop().await;

    let unquoted = write_schemas_config(
        dir.path(),
        &db,
        "[[rule]]\nname = \"d\"\ntable = \"public.dot.ted\"\nkeys = [\"d:{id}\"]\n",
    );
    let (code, _, err) = cli("check", &unquoted);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("public.\"dot.ted\"") && !err.contains("public.public"),
        "{err}"
    );

    let system = write_schemas_config(
        dir.path(),
        &db,
        "[[rule]]\nname = \"s\"\ntable = \"pg_catalog.pg_class\"\nkeys = [\"s:{oid}\"]\n",
    );
    let (code, _, err) = cli("check", &system);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("one of PostgreSQL's own schemas") && !err.contains("ALTER TABLE"),
        "{err}"
    );
}

#[tokio::test]
async fn a_null_in_a_manual_invalidation_drops_only_itself() {
    let db = TestDb::new("null_msg").await;
    db.exec(include_str!("../migrations/002_invalidate_function.sql"))
        .await;
    let (slot, publication) = db.slot("m").await;
    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);
    db.exec("SELECT wal2cache.invalidate(ARRAY['k:3', NULL, ''], ARRAY[NULL, 't:1'])")
        .await;
    let events = commits(&mut source, 1).await;
    let plan = events
        .iter()
        .find_map(|e| match e {
            SourceEvent::Message {
                prefix, content, ..
            } => plan_message(prefix, content),
            _ => None,
        })
        .expect("the message arrived")
        .unwrap();
    assert_eq!(plan.delete, ["k:3"]);
    assert_eq!(plan.purge_tags, ["t:1"]);
    source.stop().await;
}
