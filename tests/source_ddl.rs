//! DDL while streaming: Postgres describes the table again and the next changes
//! decode with the new shape.

mod support;

use support::db::TestDb;
use support::stream::{changes, commits, text};
use wal2cache::source::Source;
use wal2cache::Lsn;

#[tokio::test]
async fn add_drop_and_rename_columns_while_streaming() {
    let db = TestDb::new("ddl").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, a text, b text)")
        .await;
    let (slot, publication) = db.slot("ddl").await;
    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);

    db.exec_each(&[
        "INSERT INTO t VALUES (1, 'a1', 'b1')",
        "ALTER TABLE t ADD COLUMN c int DEFAULT 7",
        "INSERT INTO t VALUES (2, 'a2', 'b2', 8)",
        "ALTER TABLE t DROP COLUMN a",
        "UPDATE t SET b = 'b2x' WHERE id = 2",
        "ALTER TABLE t RENAME COLUMN b TO bee",
        "INSERT INTO t VALUES (3, 'b3', 9)",
        "ALTER TABLE t RENAME TO t2",
        "INSERT INTO t2 VALUES (4, 'b4', 10)",
    ])
    .await;
    // DDL-only transactions are empty to pgoutput (Postgres 15 skips them).
    let events = commits(&mut source, 5).await;
    let cs = changes(&events);
    assert_eq!(cs.len(), 5);
    let names = |i: usize| -> Vec<String> {
        cs[i]
            .relation
            .columns
            .iter()
            .map(|c| c.name.clone())
            .collect()
    };
    assert_eq!(names(0), ["id", "a", "b"]);
    assert_eq!(names(1), ["id", "a", "b", "c"]);
    assert_eq!(text(cs[1], true, "c").as_deref(), Some("8"));
    assert_eq!(names(2), ["id", "b", "c"]);
    assert_eq!(text(cs[2], true, "b").as_deref(), Some("b2x"));
    assert_eq!(names(3), ["id", "bee", "c"]);
    assert_eq!(text(cs[3], true, "bee").as_deref(), Some("b3"));
    assert_eq!(cs[4].relation.qualified_name(), "public.t2");
    assert_eq!(text(cs[4], true, "c").as_deref(), Some("10"));
    // Every relation is the same table throughout.
    assert!(cs.iter().all(|c| c.relation.oid == cs[0].relation.oid));
    source.stop().await;
}
