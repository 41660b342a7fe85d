//! Fatal conditions stop with a message that says the fix; transient ones retry;
//! a slot held by another process puts this one on standby.

mod support;

use std::path::Path;
use std::time::Duration;

use support::cluster::Cluster;
use support::db::{connect, url_for, TestDb};
use support::env::pg_admin_url;
use support::stream::{changes, commits, fatal_error, text};
use wal2cache::source::slot::{ensure, SetupPlan};
use wal2cache::source::{ErrorKind, PgTarget, Source, SourceError, SourceEvent, TableName};
use wal2cache::Lsn;

fn plan(publication: &str, slot: &str, tables: &[&str]) -> SetupPlan {
    SetupPlan {
        publication: publication.into(),
        slot: slot.into(),
        tables: tables
            .iter()
            .map(|t| {
                (
                    TableName::parse(t).unwrap(),
                    "rule \"r\" in rules.toml".to_string(),
                )
            })
            .collect(),
        create: true,
        extend: true,
        with_slot: true,
        failover: None,
    }
}

async fn role(db: &TestDb, name: &str, attrs: &str) -> String {
    let role = format!("{}_{name}", db.name);
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN {attrs} PASSWORD 'right'"
    ))
    .await;
    db.exec(&format!("GRANT ALL ON DATABASE {} TO {role}", db.name))
        .await;
    role
}

async fn drop_role(role: &str) {
    let admin = connect(&pg_admin_url()).await;
    let _ = admin
        .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
        .await;
}

#[tokio::test]
async fn setup_is_idempotent_and_adds_tables_named_later() {
    let db = TestDb::new("setup").await;
    db.exec("CREATE TABLE a (id int PRIMARY KEY); CREATE SCHEMA s; CREATE TABLE s.b (id int PRIMARY KEY);")
        .await;
    let slot = format!("{}_s", db.name);
    let first = ensure(&db.target(), &plan("p", &slot, &["public.a"]))
        .await
        .unwrap();
    assert!(first.created_publication && first.created_slot);
    let again = ensure(&db.target(), &plan("p", &slot, &["public.a"]))
        .await
        .unwrap();
    assert!(!again.created_publication && !again.created_slot && again.added_tables.is_empty());
    assert_eq!(again.confirmed_lsn, first.confirmed_lsn);
    let more = ensure(&db.target(), &plan("p", &slot, &["public.a", "s.b"]))
        .await
        .unwrap();
    assert_eq!(more.added_tables, ["s.b"]);

    let mut check_only = plan("p", &slot, &["public.a", "s.b"]);
    check_only.create = false;
    ensure(&db.target(), &check_only).await.unwrap();
    check_only.publication = "other".into();
    let err = ensure(&db.target(), &check_only).await.unwrap_err();
    assert!(
        matches!(err, SourceError::MissingPublication { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("wal2cache setup"), "{err}");
}

#[tokio::test]
async fn a_rule_naming_a_missing_table_is_fatal_and_names_the_rule() {
    let db = TestDb::new("notable").await;
    let err = ensure(
        &db.target(),
        &plan("p", &format!("{}_s", db.name), &["public.nope"]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fatal);
    let msg = err.to_string();
    assert!(
        msg.contains("public.nope") && msg.contains("rule \"r\""),
        "{msg}"
    );
    // Nothing was created.
    let rows = db
        .client
        .query("SELECT 1 FROM pg_publication", &[])
        .await
        .unwrap();
    assert!(rows.is_empty());
}

#[tokio::test]
async fn a_bad_password_is_fatal_on_both_connections() {
    let db = TestDb::new("badpw").await;
    let role = role(&db, "r", "REPLICATION").await;
    let url = url_for(&db.name, Some((&role, "wrong")));
    let target = PgTarget::parse(&url).unwrap();
    let err = ensure(&target, &plan("p", "s", &[])).await.unwrap_err();
    assert!(matches!(err, SourceError::Auth { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Fatal);
    assert!(err.to_string().contains("password"), "{err}");

    let mut config = db.stream("s", "p");
    config.target = target;
    let mut source = Source::start(config, Lsn::ZERO);
    let err = fatal_error(&mut source, Duration::from_secs(10)).await;
    assert!(matches!(err, SourceError::Auth { .. }), "{err:?}");
    drop(source);
    drop_role(&role).await;
}

#[tokio::test]
async fn a_role_without_replication_is_told_the_alter_role() {
    let db = TestDb::new("norepl").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (slot, publication) = db.slot("norepl").await;
    let role = role(&db, "r", "NOREPLICATION").await;
    let target = PgTarget::parse(&url_for(&db.name, Some((&role, "right")))).unwrap();
    let err = ensure(&target, &plan(&publication, &slot, &[]))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("ALTER ROLE \"{role}\" REPLICATION")),
        "{err}"
    );

    let mut config = db.stream(&slot, &publication);
    config.target = target;
    let mut source = Source::start(config, Lsn::ZERO);
    let err = fatal_error(&mut source, Duration::from_secs(10)).await;
    assert_eq!(err.kind(), ErrorKind::Fatal, "{err}");
    assert!(err.to_string().contains("REPLICATION"), "{err}");
    drop(source);
    drop_role(&role).await;
}

#[tokio::test]
async fn streaming_a_missing_publication_is_fatal_with_the_fix() {
    let db = TestDb::new("nopub").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (slot, _) = db.slot("nopub").await;
    let mut source = Source::start(db.stream(&slot, "no_such_pub"), Lsn::ZERO);
    // Postgres complains when it decodes the first change.
    db.exec("INSERT INTO t VALUES (1)").await;
    let err = fatal_error(&mut source, Duration::from_secs(20)).await;
    assert_eq!(err.kind(), ErrorKind::Fatal, "{err}");
    assert!(
        err.to_string().contains("no_such_pub") && err.to_string().contains("setup"),
        "{err}"
    );
}

#[tokio::test]
async fn a_second_stream_on_a_busy_slot_waits_on_standby_then_takes_over() {
    let db = TestDb::new("standby").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (slot, publication) = db.slot("standby").await;
    let mut active = Source::start(db.stream(&slot, &publication), Lsn::ZERO);
    db.exec("INSERT INTO t VALUES (1)").await;
    let events = commits(&mut active, 1).await;

    let mut standby = Source::start(db.stream(&slot, &publication), Lsn::ZERO);
    // While the slot is held, the standby yields neither events nor errors.
    let quiet = tokio::time::timeout(Duration::from_secs(2), standby.next()).await;
    assert!(quiet.is_err(), "standby produced {quiet:?}");

    let SourceEvent::Commit(commit) = events.last().unwrap() else {
        unreachable!()
    };
    active.confirm(commit.end_lsn);
    active.stop().await;
    db.exec("INSERT INTO t VALUES (2)").await;
    let events = commits(&mut standby, 1).await;
    let ids: Vec<_> = changes(&events)
        .iter()
        .map(|c| text(c, true, "id").unwrap())
        .collect();
    assert_eq!(
        ids,
        ["2"],
        "the standby resumes after the active one's confirmation"
    );
    standby.stop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_retried_not_fatal() {
    let target = PgTarget::parse("postgres://u:p@127.0.0.1:1/db").unwrap();
    let err = ensure(&target, &plan("p", "s", &[])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");

    let config = wal2cache::source::StreamConfig::new(target, "s", "p");
    let mut source = Source::start(config, Lsn::ZERO);
    let waited = tokio::time::timeout(Duration::from_secs(2), source.next()).await;
    assert!(
        waited.is_err(),
        "a refused connection must be retried, got {waited:?}"
    );
    source.stop().await;
}

#[tokio::test]
async fn wal_level_below_logical_is_fatal_with_the_fix() {
    let cluster = Cluster::start(
        Path::new("/usr/lib/postgresql/15/bin"),
        "replica",
        &["wal_level=replica"],
    );
    let target = PgTarget::parse(&cluster.url()).unwrap();
    let err = ensure(&target, &plan("p", "s", &[])).await.unwrap_err();
    assert!(matches!(err, SourceError::WalLevel { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Fatal);
    assert!(
        err.to_string().contains("wal_level = logical") && err.to_string().contains("restart"),
        "{err}"
    );
}
