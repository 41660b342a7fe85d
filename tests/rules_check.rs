//! The rules against a real database: `check` passes the example rules on the example
//! schema and fails each bad case with the message that says the fix; real changes
//! become the plans the rules say.

mod support;

use support::db::{TestDb, EXAMPLE_SCHEMA};
use support::rules::{checked, compile_rules, problems};
use support::stream::{changes, commits};
use wal2cache::rules::{plan_message, Planner};
use wal2cache::source::{Source, SourceEvent};
use wal2cache::Lsn;

const INVALIDATE_FN: &str = include_str!("../migrations/002_invalidate_function.sql");

fn rule(table: &str, body: &str) -> String {
    format!("[[rule]]\nname = \"r\"\ntable = \"{table}\"\n{body}\n")
}

#[tokio::test]
async fn the_example_rules_pass_on_the_example_schema() {
    let db = TestDb::new("check_ok").await;
    db.exec(EXAMPLE_SCHEMA).await;
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/example.toml"))
            .unwrap();
    let report = checked(&db, &example, true).await;
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(
        report.to_publish(),
        [
            "public.products",
            "public.categories",
            "public.tenant_settings"
        ],
        "no publication yet: setup will add every table"
    );
}

#[tokio::test]
async fn each_bad_case_fails_with_the_fix() {
    let db = TestDb::new("check_bad").await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, slug text, qty int, body text);
         CREATE TABLE full_items (id int PRIMARY KEY, slug text);
         ALTER TABLE full_items REPLICA IDENTITY FULL;
         CREATE TABLE codes (id int NOT NULL, code int NOT NULL, v text);
         CREATE UNIQUE INDEX codes_code ON codes (code);
         ALTER TABLE codes REPLICA IDENTITY USING INDEX codes_code;
         CREATE TABLE bare (id int, v text);
         ALTER TABLE bare REPLICA IDENTITY NOTHING;
         CREATE PUBLICATION w2c FOR TABLE items;",
    )
    .await;
    let cases: Vec<(String, bool, &str)> = vec![
        (rule("public.nope", "keys = [\"n:{id}\"]"), true, "table public.nope does not exist"),
        (rule("public.items", "keys = [\"i:{idd}\"]"), true, "a placeholder names column \"idd\", which public.items does not have (it has body, id, qty, slug)"),
        (rule("public.items", "keys = [\"i:{id}\"]\nwhen_changed = [\"qtty\"]"), true, "when_changed names column \"qtty\""),
        (
            rule("public.items", "keys = [\"i:{id}\"]\naction = \"republish\"\ncolumns = [\"id\", \"nope\"]"),
            true,
            "columns names column \"nope\"",
        ),
        (
            rule("public.items", "keys = [\"i:{qty}\"]"),
            true,
            "uses column \"qty\", which is not in public.items's replica identity (id)",
        ),
        (
            rule("public.items", "keys = [\"i:{id}\"]\ntags = [\"t:{slug}\"]"),
            true,
            "fix: ALTER TABLE \"public\".\"items\" REPLICA IDENTITY FULL;",
        ),
        (
            rule("public.items", "keys = [\"i:{id}\"]\ntags = [\"t:{slug}\"]"),
            true,
            "column \"slug\" of type text, which PostgreSQL may store out of line (TOAST)",
        ),
        (rule("public.codes", "keys = [\"c:{id}\"]"), true, "not in public.codes's replica identity (code)"),
        (rule("public.bare", "keys = [\"b:{id}\"]"), true, "REPLICA IDENTITY NOTHING"),
        (
            rule("public.full_items", "keys = [\"f:{id}\"]"),
            false,
            "table public.full_items is not in publication \"w2c\" (and postgres.create is false)\n      fix: ALTER PUBLICATION \"w2c\" ADD TABLE ONLY \"public\".\"full_items\";",
        ),
    ];
    for (text, create, expected) in cases {
        let got = problems(&db, &text, create).await;
        assert!(
            got.iter().any(|p| p.contains(expected)),
            "rules:\n{text}\nexpected a problem containing {expected:?}, got {got:#?}"
        );
    }

    // What the identity provides passes: FULL for any column, the identity index
    // column, a non-identity column in an insert-only rule, a TOAST-able column
    // in a rule that ignores updates.
    for (text, create) in [
        (rule("public.full_items", "keys = [\"f:{slug}\"]"), true),
        (rule("public.codes", "keys = [\"c:{code}\"]"), true),
        (
            rule(
                "public.items",
                "on = [\"insert\"]\nkeys = [\"i:{qty}:{slug}\"]",
            ),
            true,
        ),
        (rule("public.items", "keys = [\"i:{id}\"]"), false),
    ] {
        let got = problems(&db, &text, create).await;
        assert!(
            got.is_empty(),
            "rules:\n{text}\nunexpected problems {got:#?}"
        );
    }
}

#[tokio::test]
async fn a_real_slug_change_yields_both_keys_and_functions_emit_plans() {
    let db = TestDb::new("plan_real").await;
    db.exec(EXAMPLE_SCHEMA).await;
    db.exec(INVALIDATE_FN).await;
    db.exec("INSERT INTO categories VALUES (7, 'mugs'); INSERT INTO products VALUES (42, 'blue-mug', 7, 'Mug', 9.50, NULL);")
        .await;
    let (slot, publication) = db.slot("plan").await;
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/example.toml"))
            .unwrap();
    let mut planner = Planner::new(compile_rules(&example));
    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);

    db.exec_each(&[
        "UPDATE products SET slug = 'navy-mug' WHERE id = 42",
        "BEGIN; SELECT wal2cache.invalidate(ARRAY['home:v1'], ARRAY['shop:featured']); COMMIT;",
        "SELECT wal2cache.invalidate(NULL, ARRAY['only-tag'])",
    ])
    .await;
    let events = commits(&mut source, 3).await;
    let update = changes(&events)[0];
    let plan = planner.plan_change(update);
    assert_eq!(
        plan.delete,
        [
            "shop:product:v3:42",
            "shop:product:slug:v3:blue-mug",
            "shop:product:slug:v3:navy-mug",
        ]
    );
    assert_eq!(plan.republish.len(), 1);
    assert_eq!(plan.republish[0].key, "shop:product:json:v3:42");
    assert_eq!(
        &*plan.republish[0].value,
        r#"{"id":42,"name":"Mug","price":"9.50"}"#
    );
    assert_eq!(plan.purge_tags, ["shop:category:7", "shop:products"]);

    let messages: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Message {
                prefix, content, ..
            } => Some(plan_message(prefix, content).unwrap().unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(messages.len(), 2);
    assert_eq!(
        (
            messages[0].delete.as_slice(),
            messages[0].purge_tags.as_slice()
        ),
        (
            &["home:v1".to_string()][..],
            &["shop:featured".to_string()][..]
        )
    );
    assert!(messages[1].delete.is_empty());
    assert_eq!(messages[1].purge_tags, ["only-tag"]);
    source.stop().await;
}
