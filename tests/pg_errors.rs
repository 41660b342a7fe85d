//! PostgreSQL's errors, as wal2cache shows them: the server's message, detail, hint
//! and SQLSTATE, never a bare "db error".

mod support;

use support::db::TestDb;
use wal2cache::source::SourceError;

async fn shown(db: &TestDb, sql: &str) -> String {
    let source = db.client.batch_execute(sql).await.unwrap_err();
    SourceError::Postgres {
        context: "doing it".into(),
        source,
    }
    .to_string()
}

#[tokio::test]
async fn server_errors_show_message_detail_hint_and_sqlstate() {
    let db = TestDb::new("pg_errors").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1); CREATE PUBLICATION p FOR TABLE t")
        .await;
    assert_eq!(
        shown(&db, "ALTER PUBLICATION p ADD TABLE t").await,
        "doing it: relation \"t\" is already member of publication \"p\" (SQLSTATE 42710)"
    );
    assert_eq!(
        shown(&db, "INSERT INTO t VALUES (1)").await,
        "doing it: duplicate key value violates unique constraint \"t_pkey\" (SQLSTATE 23505); detail: Key (id)=(1) already exists."
    );
    let e = shown(&db, "SELECT no_such_function(1)").await;
    assert!(
        e.contains("function no_such_function(integer) does not exist (SQLSTATE 42883); hint: No function matches"),
        "{e}"
    );
}
