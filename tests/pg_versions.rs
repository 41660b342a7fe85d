//! Servers older than PostgreSQL 14 are refused up front, by every command that talks
//! to the database, naming the version found: pgoutput's `messages` option, which
//! logical-message invalidation and the WAL heartbeat use, arrived in 14. Against a
//! real PostgreSQL 13 (`deploy/local/services.sh start pg13`).

mod support;

use support::config::ConfigBuilder;
use support::daemon::run_binary;
use support::db::url_on;
use support::env::{kafka_brokers, pg_major_admin_url, redis_url, unique};
use support::tls::{item_rules, items_db_on};

#[tokio::test]
async fn every_command_refuses_postgresql_13_naming_the_version_it_found() {
    let admin = pg_major_admin_url(13);
    let db = items_db_on(&admin, "pg13").await;
    let prefix = unique("pg13");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::on_url(&url_on(&admin, &db.name, None))
        .slot(&format!("{}_d", db.name))
        .rules(&item_rules(&prefix))
        .redis(&redis_url())
        .kafka(&kafka_brokers(), &format!("{prefix}.events"))
        .write(dir.path());
    let config = config.to_str().unwrap();
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
    let slots: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let publications: i64 = db
        .client
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((slots, publications), (0, 0));
}
