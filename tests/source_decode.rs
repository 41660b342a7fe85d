//! The source against a real PostgreSQL: every operation, replica identity and type
//! that the issue lists, decoded into typed changes.

mod support;

use serde_json::json;
use support::db::TestDb;
use support::stream::{changes, commits, text};
use wal2cache::source::pgoutput::OldKind;
use wal2cache::source::value::RowJson;
use wal2cache::source::{Op, Source, SourceEvent, Value};
use wal2cache::Lsn;

#[tokio::test]
async fn insert_update_delete_truncate_across_schemas_and_identities() {
    let db = TestDb::new("ops").await;
    db.exec(
        "CREATE SCHEMA shop;
         CREATE TABLE shop.products (id int PRIMARY KEY, slug text NOT NULL, price numeric(10,2));
         CREATE TABLE public.lines (order_id int, line int, qty int, PRIMARY KEY (order_id, line));
         CREATE TABLE public.full_t (id int PRIMARY KEY, a text, b text);
         ALTER TABLE public.full_t REPLICA IDENTITY FULL;
         CREATE TABLE public.idx_t (id int NOT NULL, code text NOT NULL, v text);
         CREATE UNIQUE INDEX idx_t_code ON public.idx_t (code);
         ALTER TABLE public.idx_t REPLICA IDENTITY USING INDEX idx_t_code;
         CREATE TABLE public.nothing_t (id int, v text);
         ALTER TABLE public.nothing_t REPLICA IDENTITY NOTHING;",
    )
    .await;
    let (slot, publication) = db.slot("ops").await;
    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);

    db.exec_each(&[
        "INSERT INTO shop.products VALUES (1, 'blue-mug', 9.50), (2, 'red-mug', NULL)",
        "UPDATE shop.products SET price = 10 WHERE id = 1",
        "UPDATE shop.products SET slug = 'navy-mug' WHERE id = 1",
        "DELETE FROM shop.products WHERE id = 2",
        "INSERT INTO public.lines VALUES (7, 1, 3), (7, 2, 4)",
        "UPDATE public.lines SET qty = 5 WHERE order_id = 7 AND line = 2",
        "DELETE FROM public.lines WHERE order_id = 7 AND line = 1",
        "INSERT INTO public.full_t VALUES (1, 'a', 'b')",
        "UPDATE public.full_t SET b = 'c'",
        "DELETE FROM public.full_t",
        "INSERT INTO public.idx_t VALUES (1, 'k1', 'x')",
        "UPDATE public.idx_t SET code = 'k2'",
        "DELETE FROM public.idx_t",
        "INSERT INTO public.nothing_t VALUES (1, 'x')",
        "TRUNCATE public.lines, public.full_t",
    ])
    .await;
    // Postgres itself refuses to update a published table without replica identity.
    let refused = db
        .client
        .batch_execute("UPDATE public.nothing_t SET v = 'y'")
        .await;
    assert!(
        refused.is_err(),
        "UPDATE on REPLICA IDENTITY NOTHING was accepted"
    );
    let events = commits(&mut source, 15).await;
    let cs = changes(&events);
    let summary: Vec<(String, Op)> = cs
        .iter()
        .map(|c| (c.relation.qualified_name(), c.op))
        .collect();
    use Op::*;
    let expected: Vec<(&str, Op)> = vec![
        ("shop.products", Insert),
        ("shop.products", Insert),
        ("shop.products", Update),
        ("shop.products", Update),
        ("shop.products", Delete),
        ("public.lines", Insert),
        ("public.lines", Insert),
        ("public.lines", Update),
        ("public.lines", Delete),
        ("public.full_t", Insert),
        ("public.full_t", Update),
        ("public.full_t", Delete),
        ("public.idx_t", Insert),
        ("public.idx_t", Update),
        ("public.idx_t", Delete),
        ("public.nothing_t", Insert),
    ];
    let expected: Vec<(String, Op)> = expected
        .into_iter()
        .map(|(t, o)| (t.to_string(), o))
        .collect();
    assert_eq!(summary, expected);

    // Default identity: an update that keeps the key sends no old row; one that
    // changes the slug (not a key column) still sends none.
    assert_eq!(text(cs[1], true, "price"), None, "NULL is a real NULL");
    assert!(cs[2].old.is_none());
    assert_eq!(text(cs[2], true, "price").as_deref(), Some("10.00"));
    assert_eq!(text(cs[3], true, "slug").as_deref(), Some("navy-mug"));
    // Delete with default identity: the key only, other columns not sent.
    assert_eq!(cs[4].old_kind, Some(OldKind::Key));
    assert_eq!(text(cs[4], false, "id").as_deref(), Some("2"));
    let slug = cs[4].relation.column_index("slug").unwrap();
    assert_eq!(cs[4].old.as_ref().unwrap().0[slug], Value::NotSent);

    // Composite key: both key columns flagged and sent on delete.
    let keys: Vec<_> = cs[5]
        .relation
        .columns
        .iter()
        .filter(|c| c.is_key)
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(keys, ["order_id", "line"]);
    assert_eq!(text(cs[8], false, "order_id").as_deref(), Some("7"));
    assert_eq!(text(cs[8], false, "line").as_deref(), Some("1"));

    // FULL: the whole old row on update and delete.
    assert_eq!(cs[10].old_kind, Some(OldKind::Full));
    assert_eq!(text(cs[10], false, "b").as_deref(), Some("b"));
    assert_eq!(text(cs[10], true, "b").as_deref(), Some("c"));
    assert_eq!(text(cs[11], false, "a").as_deref(), Some("a"));

    // USING INDEX: changing the indexed column sends the old key.
    assert_eq!(cs[13].old_kind, Some(OldKind::Key));
    assert_eq!(text(cs[13], false, "code").as_deref(), Some("k1"));
    assert_eq!(text(cs[13], true, "code").as_deref(), Some("k2"));
    let id = cs[13].relation.column_index("id").unwrap();
    assert_eq!(cs[13].old.as_ref().unwrap().0[id], Value::NotSent);

    // NOTHING: no key columns at all.
    assert!(cs[15].relation.columns.iter().all(|c| !c.is_key));

    // One TRUNCATE statement, both tables.
    let truncate = events
        .iter()
        .find_map(|e| match e {
            SourceEvent::Truncate { relations, .. } => Some(relations),
            _ => None,
        })
        .expect("a truncate event");
    let mut names: Vec<_> = truncate.iter().map(|r| r.qualified_name()).collect();
    names.sort();
    assert_eq!(names, ["public.full_t", "public.lines"]);

    // Commit boundaries: LSNs increase, xids match their Begin.
    let mut last_end = Lsn::ZERO;
    let mut begin_xid = None;
    for e in &events {
        match e {
            SourceEvent::Begin(b) => begin_xid = Some(b.xid),
            SourceEvent::Commit(c) => {
                assert_eq!(Some(c.xid), begin_xid);
                assert!(c.end_lsn > c.commit_lsn && c.commit_lsn > last_end);
                last_end = c.end_lsn;
            }
            _ => {}
        }
    }
    source.stop().await;
}

#[tokio::test]
async fn every_listed_type_decodes_to_its_json_form() {
    let db = TestDb::new("types").await;
    db.exec(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE t (
            id int8 PRIMARY KEY, i2 int2, i4 int4, n numeric, f4 float4, f8 float8, b bool,
            t text, by bytea, u uuid, ts timestamptz, d date, j json, jb jsonb,
            arr int[], tarr text[], m mood, nul text);",
    )
    .await;
    let (slot, publication) = db.slot("types").await;
    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);
    db.exec(
        "SET TIME ZONE 'UTC';
         INSERT INTO t VALUES (
            9223372036854775807, -32768, 2147483647, 123456789012345678901234567890.123456789,
            1.5, -2.25e-10, true, 'héllo wörld ✓ 日本語 🎉', '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '2026-11-23 09:30:00.123456+00', '2026-11-23', '{\"a\": [1, 2.5, null]}', '{\"k\": {\"n\": true}}',
            '{1,2,3}', '{\"a b\",c}', 'happy', NULL);",
    )
    .await;
    let events = commits(&mut source, 1).await;
    let c = changes(&events)[0];
    let json = serde_json::to_value(RowJson::new(&c.relation, c.new.as_ref().unwrap())).unwrap();
    let expected = json!({
        "id": 9223372036854775807i64, "i2": -32768, "i4": 2147483647,
        "n": "123456789012345678901234567890.123456789",
        "f4": 1.5, "f8": -2.25e-10, "b": true,
        "t": "héllo wörld ✓ 日本語 🎉", "by": "\\x00ff10",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "ts": "2026-11-23 09:30:00.123456+00", "d": "2026-11-23",
        "j": {"a": [1, 2.5, null]}, "jb": {"k": {"n": true}},
        "arr": "{1,2,3}", "tarr": "{\"a b\",c}", "m": "happy", "nul": null,
    });
    assert_eq!(json, expected);
    source.stop().await;
}

#[tokio::test]
async fn an_unchanged_toast_column_is_marked_never_a_value() {
    let db = TestDb::new("toast").await;
    db.exec(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE docs_full (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs_full ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE docs_full REPLICA IDENTITY FULL;",
    )
    .await;
    let (slot, publication) = db.slot("toast").await;
    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);
    db.exec_each(&[
        "INSERT INTO docs VALUES (1, 'a', repeat('x', 5000))",
        "UPDATE docs SET title = 'b' WHERE id = 1",
        "INSERT INTO docs_full VALUES (1, 'a', repeat('y', 5000))",
        "UPDATE docs_full SET title = 'b' WHERE id = 1",
    ])
    .await;
    let events = commits(&mut source, 4).await;
    let cs = changes(&events);
    assert_eq!(text(cs[0], true, "body").map(|s| s.len()), Some(5000));

    let update = cs[1];
    let body = update.relation.column_index("body").unwrap();
    assert_eq!(update.new.as_ref().unwrap().0[body], Value::UnchangedToast);
    assert_eq!(update.unchanged_columns().collect::<Vec<_>>(), ["body"]);
    let json =
        serde_json::to_value(RowJson::new(&update.relation, update.new.as_ref().unwrap())).unwrap();
    assert!(
        json.get("body").is_none(),
        "an unchanged column has no value: {json:?}"
    );
    assert_eq!(json["title"], "b");

    // With FULL identity the old row carries the real value to take it from.
    let full = cs[3];
    let body = full.relation.column_index("body").unwrap();
    assert_eq!(full.new.as_ref().unwrap().0[body], Value::UnchangedToast);
    assert_eq!(text(full, false, "body").map(|s| s.len()), Some(5000));
    source.stop().await;
}

#[tokio::test]
async fn logical_messages_arrive_in_their_transaction() {
    let db = TestDb::new("msg").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY);").await;
    let (slot, publication) = db.slot("msg").await;
    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);
    db.exec(
        "BEGIN;
         INSERT INTO t VALUES (1);
         SELECT pg_logical_emit_message(true, 'wal2cache', '{\"keys\":[\"a\"]}');
         COMMIT;",
    )
    .await;
    let events = commits(&mut source, 1).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            SourceEvent::Begin(_) => "begin",
            SourceEvent::Change(_) => "change",
            SourceEvent::Message { .. } => "message",
            SourceEvent::Commit(_) => "commit",
            SourceEvent::Truncate { .. } => "truncate",
            SourceEvent::Idle { .. } => "idle",
        })
        .collect();
    assert_eq!(kinds, ["begin", "change", "message", "commit"]);
    let SourceEvent::Message {
        prefix,
        content,
        transactional,
        ..
    } = &events[2]
    else {
        unreachable!()
    };
    assert_eq!((prefix.as_str(), *transactional), ("wal2cache", true));
    assert_eq!(&content[..], br#"{"keys":["a"]}"#);
    source.stop().await;
}
