//! TLS and authentication to PostgreSQL, against the TLS variant of the local server
//! (`deploy/local/services.sh start pg-tls`): ssl on with a certificate for
//! `localhost` from a throwaway CA, SCRAM over TLS, a role that logs in with a client
//! certificate, and `hostnossl ... reject`. Both connections of the daemon (the
//! control connection and the replication stream) are shown to be encrypted, and each
//! failure gives its cause, its fix and a non-zero exit, never the password.

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use support::config::ConfigBuilder;
use support::daemon::run_binary;
use support::db::{wait_streaming, TestDb};
use support::env::{kafka_brokers, pg_admin_url, pg_tls_url, redis_url, tls_file, unique};
use support::inproc::InProcess;
use support::kafka::read_topic_until_quiet;
use support::store::{gone, redis};
use support::tls::{item_rules, items_db_on, pg_tls_admin};
use support::wait::eventually;

const PASSWORD: &str = "wal2cache-tls-secret";

/// `postgres://USER@HOST:PORT/DB?PARAMS` on the TLS server (no password in it).
fn url(db: &TestDb, user: &str, host: &str, params: &str) -> String {
    let port = pg_tls_url()
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next().map(str::to_string))
        .unwrap();
    format!("postgres://{user}@{host}:{port}/{}?{params}", db.name)
}

/// Runs the daemon on `url` (password from a file when given), makes one change and
/// sees its key deleted and its event published, and that both of the daemon's
/// connections to the server are encrypted.
async fn streams_a_change(db: &TestDb, url: &str, password: Option<&str>) {
    let prefix = unique("tls");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let mut builder = ConfigBuilder::on_url(url)
        .slot(&format!("{}_d", db.name))
        .rules(&item_rules(&prefix))
        .redis(&redis_url())
        .kafka(&kafka_brokers(), &topic)
        .pipeline("idle_heartbeat", "0s");
    if let Some(password) = password {
        std::fs::write(dir.path().join("pg-password"), format!("{password}\n")).unwrap();
        // Relative to the config file's directory.
        builder = builder.raw("postgres", "password_file = \"pg-password\"");
    }
    let config = builder.write(dir.path());
    let mut r = redis().await;
    let key = format!("{prefix}:item:1");
    let _: () = r.set(&key, "stale").await.unwrap();

    let daemon = InProcess::start(&config);
    let slot = format!("{}_d", db.name);
    wait_streaming(db, &slot).await;
    // The walsender of the slot is encrypted.
    let row = db
        .client
        .query_one(
            "SELECT s.ssl FROM pg_replication_slots r JOIN pg_stat_ssl s ON s.pid = r.active_pid
              WHERE r.slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "the replication stream is not over TLS"
    );

    db.exec("INSERT INTO items VALUES (1, 'one')").await;
    eventually("the key deleted over TLS", Duration::from_secs(30), || {
        gone(&r, std::slice::from_ref(&key))
    })
    .await;
    daemon.stop_ok().await;
    let events = read_topic_until_quiet(&topic, 1, Duration::from_secs(2)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["keys"][0], key.as_str());
}

#[tokio::test]
async fn the_daemon_streams_over_verify_full_with_scram_and_a_password_file() {
    let db = items_db_on(&pg_tls_admin(), "tls_scram").await;
    let url = url(
        &db,
        "wal2cache_tls",
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", tls_file("ca.pem")),
    );
    streams_a_change(&db, &url, Some(PASSWORD)).await;
}

#[tokio::test]
async fn the_daemon_logs_in_with_a_client_certificate_under_verify_ca() {
    let db = items_db_on(&pg_tls_admin(), "tls_cert").await;
    // 127.0.0.1 is not a name of the server's certificate: verify-ca checks only the
    // chain, on both connections.
    let url = url(
        &db,
        "wal2cache_cert",
        "127.0.0.1",
        &format!(
            "sslmode=verify-ca&sslrootcert={}&sslcert={}&sslkey={}",
            tls_file("ca.pem"),
            tls_file("client.pem"),
            tls_file("client.key")
        ),
    );
    streams_a_change(&db, &url, None).await;
}

/// `wal2cache check` on `url`: its exit code and what it printed, which never holds the
/// password.
fn check(url: &str, password: Option<&str>) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("tlsf");
    let mut builder = ConfigBuilder::on_url(url).rules(&item_rules(&prefix));
    if let Some(password) = password {
        std::fs::write(dir.path().join("pw"), password).unwrap();
        builder = builder.raw("postgres", "password_file = \"pw\"");
    }
    let config = builder.write(dir.path());
    let (code, out, err) = run_binary(&["check", "--config", config.to_str().unwrap()], &[]);
    let text = format!("{out}{err}");
    assert!(!text.contains(PASSWORD), "the password was printed: {text}");
    (code, text)
}

#[tokio::test]
async fn each_tls_failure_names_its_cause_and_fix_and_never_the_password() {
    let db = items_db_on(&pg_tls_admin(), "tls_fail").await;
    let ca = tls_file("ca.pem");
    let pw = Some(PASSWORD);
    let cases: Vec<(&str, String, Option<&str>, Vec<&str>)> = vec![
        (
            "verify-full to a name the certificate does not carry",
            url(
                &db,
                "wal2cache_tls",
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            pw,
            vec![
                "does not name the host \"127.0.0.1\"",
                "localhost",
                "verify-ca",
            ],
        ),
        (
            "a CA that did not sign the server's certificate",
            url(
                &db,
                "wal2cache_tls",
                "localhost",
                &format!(
                    "sslmode=verify-full&sslrootcert={}",
                    tls_file("other-ca.pem")
                ),
            ),
            pw,
            vec!["not trusted", "other-ca.pem", "set sslrootcert"],
        ),
        (
            "no TLS to a server whose pg_hba.conf rejects it",
            url(&db, "wal2cache_tls", "localhost", "sslmode=disable"),
            pw,
            vec!["no encryption", "only over TLS", "sslmode=require"],
        ),
        (
            "the certificate role without a client certificate",
            url(
                &db,
                "wal2cache_cert",
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            None,
            vec!["client certificate", "add sslcert and sslkey"],
        ),
        (
            "a wrong password",
            url(
                &db,
                "wal2cache_tls",
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Some("not-the-password"),
            vec!["password authentication failed", "postgres.password_file"],
        ),
        (
            "a client certificate the server's CA did not sign",
            url(
                &db,
                "wal2cache_cert",
                "localhost",
                &format!(
                    "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
                    tls_file("other-ca.pem"),
                    tls_file("other-ca.key")
                ),
            ),
            None,
            vec!["refused", "sslcert="],
        ),
    ];
    for (what, url, password, expected) in cases {
        let (code, text) = check(&url, password);
        assert_ne!(code, 0, "{what}: check succeeded: {text}");
        for e in expected {
            assert!(text.contains(e), "{what}: {e:?} missing from: {text}");
        }
    }
}

#[tokio::test]
async fn require_against_a_server_without_tls_is_refused_at_once() {
    // The shared server runs with ssl off.
    let plain = pg_admin_url();
    let sep = if plain.contains('?') { '&' } else { '?' };
    let started = std::time::Instant::now();
    let (code, text) = check(&format!("{plain}{sep}sslmode=require"), None);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("does not accept TLS") && text.contains("sslmode=require"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a TLS refusal is not retried"
    );
}

#[tokio::test]
async fn the_password_is_given_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "x").unwrap();
    let config = ConfigBuilder::on_url(&format!(
        "postgres://u:{PASSWORD}@localhost:1/db?sslmode=require"
    ))
    .raw("postgres", "password_file = \"pw\"")
    .write(dir.path());
    let (code, out, err) = run_binary(&["check", "--config", config.to_str().unwrap()], &[]);
    let text = format!("{out}{err}");
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains("the password is given twice") && text.contains("postgres.password_file"),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
    // A missing password file is reported when the config loads.
    std::fs::remove_file(dir.path().join("pw")).unwrap();
    let config = ConfigBuilder::on_url("postgres://u@localhost:1/db")
        .raw("postgres", "password_file = \"pw\"")
        .write(dir.path());
    let (code, out, err) = run_binary(&["check", "--config", config.to_str().unwrap()], &[]);
    let text = format!("{out}{err}");
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains("postgres.password_file") && text.contains("cannot be read"),
        "{text}"
    );
}
