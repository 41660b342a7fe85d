//! What depends on the server's major, against real servers of each
//! (`deploy/local/services.sh start pg13`, `pg16`, `pg17`): servers older than 14 are
//! refused up front by every command that talks to the database, naming the version
//! found (pgoutput's `messages` option, which logical-message invalidation and the WAL
//! heartbeat use, arrived in 14); on 17 and later slots are failover slots by default,
//! and `check` says when they are not or when the primary does not wait for its
//! standbys; on 16 a failover slot is refused with a message.

mod support;

use support::config::ConfigBuilder;
use support::daemon::run_binary;
use support::db::{url_on, TestDb};
use support::env::{kafka_brokers, pg_major_admin_url, redis_url, unique};
use support::tls::{item_rules, items_db_on};

#[tokio::test]
async fn every_command_refuses_postgresql_13_naming_the_version_it_found() {
    let admin = pg_major_admin_url(13);
    let db = items_db_on(&admin, "pg13").await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_on(&admin, &db, dir.path(), &[]);
    let config = config.as_str();
    for command in ["check", "setup", "tail", "run"] {
        let (code, stdout, stderr) = run_binary(&[command, "--config", config], &[]);
        assert_ne!(
            code, 0,
            "{command} succeeded against 13:\n{stdout}\n{stderr}"
        );
        assert!(
            stderr.contains(" is PostgreSQL 13.")
                && stderr.contains("needs PostgreSQL 14 or later")
                && stderr.contains("upgrade the server"),
            "{command}: {stderr}"
        );
    }
    // Refused before anything was made: no slot, no publication.
    let slots = count(
        &db,
        "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
    )
    .await;
    let publications = count(&db, "SELECT count(*) FROM pg_publication").await;
    assert_eq!((slots, publications), (0, 0));
}

/// The config of a daemon on `db` (a server of another major), its slot `<db>_d`, in
/// `dir`; `extra` lines go to `[postgres]`.
fn config_on(admin: &str, db: &TestDb, dir: &std::path::Path, extra: &[&str]) -> String {
    let prefix = unique("major");
    let mut builder = ConfigBuilder::on_url(&url_on(admin, &db.name, None))
        .slot(&format!("{}_d", db.name))
        .rules(&item_rules(&prefix))
        .redis(&redis_url())
        .kafka(&kafka_brokers(), &format!("{prefix}.events"));
    for line in extra {
        builder = builder.raw("postgres", line);
    }
    builder.write(dir).to_str().unwrap().to_string()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn slot_failover(db: &TestDb) -> Option<bool> {
    db.client
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&format!("{}_d", db.name)],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}

#[tokio::test]
async fn on_17_the_slot_is_a_failover_slot_and_check_says_what_a_promotion_needs() {
    let admin = pg_major_admin_url(17);
    let db = items_db_on(&admin, "pg17").await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_on(&admin, &db, dir.path(), &[]);
    let (code, stdout, stderr) = run_binary(&["setup", "--config", &config], &[]);
    assert_eq!(code, 0, "setup on 17:\n{stdout}\n{stderr}");
    assert_eq!(slot_failover(&db).await, Some(true), "the default on 17");
    let (code, stdout, stderr) = run_binary(&["check", "--config", &config], &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let said = format!("{stdout}{stderr}");
    assert!(
        said.contains("synchronized_standby_slots is empty on the primary"),
        "{said}"
    );
    assert!(!said.contains("is not a failover slot"), "{said}");

    // A slot made before (not a failover slot): check says so, with the fix.
    db.drop_slot(&format!("{}_d", db.name)).await;
    db.exec(&format!(
        "SELECT pg_create_logical_replication_slot('{}_d', 'pgoutput')",
        db.name
    ))
    .await;
    let (code, stdout, stderr) = run_binary(&["check", "--config", &config], &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let said = format!("{stdout}{stderr}");
    assert!(
        said.contains("is not a failover slot") && said.contains("(FAILOVER true)"),
        "{said}"
    );
    // Asked not to be one: created as asked, and nothing to warn about.
    db.drop_slot(&format!("{}_d", db.name)).await;
    let config = config_on(&admin, &db, dir.path(), &["failover_slot = false"]);
    let (code, stdout, stderr) = run_binary(&["setup", "--config", &config], &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(slot_failover(&db).await, Some(false));
    let (_, stdout, stderr) = run_binary(&["check", "--config", &config], &[]);
    assert!(
        !format!("{stdout}{stderr}").contains("failover"),
        "{stdout}{stderr}"
    );
}

#[tokio::test]
async fn on_16_a_failover_slot_is_refused_and_the_default_is_an_ordinary_slot() {
    let admin = pg_major_admin_url(16);
    let db = items_db_on(&admin, "pg16").await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_on(&admin, &db, dir.path(), &["failover_slot = true"]);
    for command in ["check", "setup"] {
        let (code, stdout, stderr) = run_binary(&[command, "--config", &config], &[]);
        assert_ne!(code, 0, "{command} accepted failover_slot on 16:\n{stdout}");
        assert!(
            stderr.contains("postgres.failover_slot = true needs PostgreSQL 17 or later")
                && stderr.contains("the server is 16."),
            "{command}: {stderr}"
        );
    }
    let slots = count(
        &db,
        "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
    )
    .await;
    assert_eq!(slots, 0, "a refused setup created a slot");
    let config = config_on(&admin, &db, dir.path(), &[]);
    let (code, stdout, stderr) = run_binary(&["setup", "--config", &config], &[]);
    assert_eq!(code, 0, "setup on 16:\n{stdout}\n{stderr}");
    let (code, stdout, stderr) = run_binary(&["check", "--config", &config], &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        !format!("{stdout}{stderr}").contains("failover"),
        "{stdout}{stderr}"
    );
}
