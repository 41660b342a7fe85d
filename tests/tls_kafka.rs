//! Kafka over TLS and SASL/SCRAM, against the TLS variant of the local broker
//! (`deploy/local/services.sh start kafka-tls`): stunnel takes TLS with a certificate
//! for `localhost` from a throwaway CA and hands the bytes to a broker that requires a
//! SASL SCRAM login. The whole daemon (`wal2cache run`) runs over TLS to PostgreSQL,
//! Redis and Kafka at once, with a password file for each; the L1 subscribes over
//! SASL_SSL and evicts; each Kafka misconfiguration exits non-zero with its cause and
//! fix; no failure path of any of the three services prints a secret; and the daemon
//! publishes over TLS without SASL to the TLS-only broker (`start kafka-ssl`).

mod support;

use std::path::Path;
use std::time::Duration;

use redis::AsyncCommands;
use support::config::ConfigBuilder;
use support::daemon::{run_binary, Daemon};
use support::db::{url_on, wait_streaming, TestDb};
use support::env::{
    kafka_sasl_login, kafka_ssl_brokers, kafka_tls_brokers, redis_tls_url, tls_file, unique,
};
use support::kafka::{create_topic_on, read_topic_on, sasl_ssl, ssl};
use support::l1::{Events, Heartbeats, BOUND, HEARTBEAT};
use support::store::{gone, redis_tls};
use support::tls::{item_rules, items_db_on, pg_tls_admin, without_password};
use support::wait::eventually;
use wal2cache::l1::L1;

const PG_PASSWORD: &str = "wal2cache-tls-secret";
const REDIS_PASSWORD: &str = "redis-tls-secret";

fn kafka_password() -> String {
    kafka_sasl_login().1
}

/// The daemon's config for TLS everywhere, in `dir`, every password in a file beside
/// it: PostgreSQL verify-full with SCRAM, Redis over rediss:// as an ACL user, Kafka
/// SASL_SSL with SCRAM-SHA-512 (the tests' own clients use -256).
fn tls_everywhere(db: &TestDb, prefix: &str, topic: &str, dir: &Path) -> ConfigBuilder {
    std::fs::write(
        dir.join("kafka-password"),
        format!("{}\n", kafka_password()),
    )
    .unwrap();
    pg_and_redis_over_tls(db, prefix, dir)
        .kafka(&kafka_tls_brokers(), topic)
        .kafka_key("sasl_password_file", "kafka-password")
        .kafka_property("security.protocol", "SASL_SSL")
        .kafka_property("sasl.mechanism", "SCRAM-SHA-512")
        .kafka_property("sasl.username", &kafka_sasl_login().0)
        .kafka_property("ssl.ca.location", &tls_file("ca.pem"))
}

/// The PostgreSQL and Redis half of [`tls_everywhere`], their passwords in files in
/// `dir`.
fn pg_and_redis_over_tls(db: &TestDb, prefix: &str, dir: &Path) -> ConfigBuilder {
    for (file, secret) in [
        ("pg-password", PG_PASSWORD),
        ("redis-password", REDIS_PASSWORD),
    ] {
        std::fs::write(dir.join(file), format!("{secret}\n")).unwrap();
    }
    let pg = without_password(&url_on(&pg_tls_admin(), &db.name, None));
    ConfigBuilder::on_url(&pg)
        .slot(&format!("{}_d", db.name))
        .raw("postgres", "password_file = \"pg-password\"")
        .rules(&item_rules(prefix))
        .redis(&without_password(&redis_tls_url()))
        .redis_key("ca_file", tls_file("ca.pem"))
        .redis_key("password_file", "redis-password")
        .pipeline("idle_heartbeat", "0s")
}

#[tokio::test]
async fn the_daemon_runs_over_tls_to_postgres_redis_and_kafka_at_once() {
    let db = items_db_on(&pg_tls_admin(), "ktls").await;
    let prefix = unique("ktls");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = tls_everywhere(&db, &prefix, &topic, dir.path()).write(dir.path());
    let mut r = redis_tls().await;
    let key = format!("{prefix}:item:1");
    let _: () = r.set(&key, "stale").await.unwrap();

    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start_logging(&config, &[("WAL2CACHE_LOG", "info")], &log);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    db.exec("INSERT INTO items VALUES (1, 'one')").await;
    eventually("the key deleted over TLS", Duration::from_secs(30), || {
        gone(&r, std::slice::from_ref(&key))
    })
    .await;
    // The topic (created by the daemon over SASL_SSL) holds the event, read back over
    // SASL_SSL.
    let wanted = key.clone();
    let events = read_topic_on(&sasl_ssl(), &topic, move |events| {
        events.iter().any(|e| e["keys"][0] == wanted.as_str())
    })
    .await;
    assert!(
        events.iter().any(|e| e["keys"][0] == key.as_str()),
        "no event for {key} on {topic}: {events:?}"
    );
    daemon.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    for secret in [
        PG_PASSWORD.to_string(),
        REDIS_PASSWORD.into(),
        kafka_password(),
    ] {
        assert!(!text.contains(&secret), "a password was logged:\n{text}");
    }
}

/// Kafka over TLS without SASL (`security.protocol=SSL`, as MSK's TLS listener),
/// against the TLS-only broker.
#[tokio::test]
async fn the_daemon_publishes_over_ssl_without_sasl() {
    let db = items_db_on(&pg_tls_admin(), "kssl").await;
    let prefix = unique("kssl");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = pg_and_redis_over_tls(&db, &prefix, dir.path())
        .kafka(&kafka_ssl_brokers(), &topic)
        .kafka_property("security.protocol", "SSL")
        .kafka_property("ssl.ca.location", &tls_file("ca.pem"))
        .write(dir.path());
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start_logging(&config, &[("WAL2CACHE_LOG", "info")], &log);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    db.exec("INSERT INTO items VALUES (7, 'seven')").await;
    let key = format!("{prefix}:item:7");
    let wanted = key.clone();
    let events = read_topic_on(&ssl(), &topic, move |events| {
        events.iter().any(|e| e["keys"][0] == wanted.as_str())
    })
    .await;
    daemon.stop();
    assert!(
        events.iter().any(|e| e["keys"][0] == key.as_str()),
        "no event for {key} on {topic} over SSL: {events:?}"
    );
    // Over TLS the events are compressed unless a codec is chosen, and the log says so
    // (the events above were read back through lz4).
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("events are compressed with lz4 over TLS"),
        "no line about lz4 in the daemon's log:\n{text}"
    );
}

#[tokio::test]
async fn the_l1_subscribes_over_sasl_ssl_with_a_password_file_and_evicts() {
    let access = sasl_ssl();
    let topic = unique("l1_ktls");
    create_topic_on(&access, &topic, 2).await;
    let events = Events::on(&access, &topic, 2);
    let _heartbeats = Heartbeats::start(&events, HEARTBEAT);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kafka-password");
    std::fs::write(&file, format!("{}\n", kafka_password())).unwrap();
    let mut builder = L1::builder(kafka_tls_brokers(), &topic)
        .staleness_bound(BOUND)
        .kafka_password_file(&file);
    for (k, v) in &access {
        if k != "bootstrap.servers" && k != "sasl.password" {
            builder = builder.kafka_property(k, v);
        }
    }
    let cache = builder.build::<String>().unwrap();
    assert!(
        cache.wait_healthy(Duration::from_secs(30)).await,
        "the L1 did not subscribe over SASL_SSL: {:?}",
        cache.metrics()
    );
    let loaded = cache
        .get_with("k1", &["t"], || async { "v1".to_string() })
        .await;
    assert_eq!(loaded, "v1");
    assert_eq!(cache.get("k1").await.as_deref(), Some("v1"));
    events.invalidate(0, &["k1"], &[]).await;
    eventually("the key evicted", Duration::from_secs(10), || {
        let cache = cache.clone();
        async move { cache.get("k1").await.is_none() }
    })
    .await;
}

#[tokio::test]
async fn the_l1_refuses_a_missing_password_file() {
    let err = L1::builder(kafka_tls_brokers(), "t")
        .kafka_property("security.protocol", "SASL_SSL")
        .kafka_password_file("/nonexistent/kafka-password")
        .build::<String>()
        .err()
        .expect("built without its password");
    let text = err.to_string();
    assert!(
        text.contains("kafka_password_file = /nonexistent/kafka-password")
            && text.contains("cannot be read"),
        "{text}"
    );
}

/// `wal2cache run` on the TLS-everywhere config changed by `change`, to its exit: what
/// it printed, which never holds any of the three passwords.
async fn run_fails(
    label: &str,
    change: impl FnOnce(ConfigBuilder, &Path) -> ConfigBuilder,
) -> String {
    let db = items_db_on(&pg_tls_admin(), label).await;
    let prefix = unique(label);
    let dir = tempfile::tempdir().unwrap();
    let builder = tls_everywhere(&db, &prefix, &format!("{prefix}.events"), dir.path());
    let config = change(builder, dir.path()).write(dir.path());
    let (code, out, err) = run_binary(
        &["run", "--config", config.to_str().unwrap()],
        &[("WAL2CACHE_LOG", "info")],
    );
    let text = format!("{out}{err}");
    eprintln!("{label}: exit {code}: {text}");
    assert_ne!(code, 0, "{label}: run did not fail: {text}");
    for secret in [
        PG_PASSWORD.to_string(),
        REDIS_PASSWORD.into(),
        kafka_password(),
    ] {
        assert!(
            !text.contains(&secret),
            "{label}: a password was printed: {text}"
        );
    }
    text
}

#[tokio::test]
async fn each_kafka_tls_failure_names_its_cause_and_fix() {
    let untrusted = run_fails("ktf_ca", |b, _| {
        b.kafka_property("ssl.ca.location", &tls_file("other-ca.pem"))
    })
    .await;
    assert!(
        untrusted.contains("TLS handshake with the Kafka brokers")
            && untrusted.contains("ssl.ca.location"),
        "{untrusted}"
    );
    let wrong = run_fails("ktf_pw", |b, dir| {
        std::fs::write(dir.join("kafka-password"), "not-the-password\n").unwrap();
        b
    })
    .await;
    assert!(
        wrong.contains("refused wal2cache's SASL login")
            && wrong.contains("kafka.sasl_password_file")
            && !wrong.contains("not-the-password"),
        "{wrong}"
    );
    let plain = run_fails("ktf_plain", |b, _| {
        b.kafka_property("security.protocol", "SASL_PLAINTEXT")
    })
    .await;
    assert!(
        plain.contains("cannot reach the Kafka brokers")
            && plain.contains("security.protocol")
            && plain.contains("in state APIVERSION_QUERY"),
        "{plain}"
    );
}

#[tokio::test]
async fn no_failure_of_any_service_prints_a_secret() {
    // Each of these fails at start; run_fails checks the output for every password.
    let pg_password = run_fails("ks_pgpw", |b, dir| {
        std::fs::write(dir.join("pg-password"), "wrong-pg-password\n").unwrap();
        b
    })
    .await;
    assert!(
        pg_password.contains("password") && !pg_password.contains("wrong-pg-password"),
        "{pg_password}"
    );
    let pg_unreachable = run_fails("ks_pghost", |b, _| {
        b.url("postgres://wal2cache_tls@127.0.0.1:1/postgres?sslmode=require")
    })
    .await;
    assert!(pg_unreachable.contains("127.0.0.1:1"), "{pg_unreachable}");
    let redis_ca = run_fails("ks_redisca", |b, _| {
        b.redis_key("ca_file", tls_file("other-ca.pem"))
    })
    .await;
    assert!(redis_ca.contains("redis.ca_file"), "{redis_ca}");
    let kafka_ca = run_fails("ks_kafkaca", |b, _| {
        b.kafka_property("ssl.ca.location", &tls_file("other-ca.pem"))
    })
    .await;
    assert!(kafka_ca.contains("ssl.ca.location"), "{kafka_ca}");
    // The secrets given inline instead of in files: still never printed.
    let inline = run_fails("ks_inline", |b, _| {
        b.redis(&redis_tls_url())
            .redis_key("ca_file", tls_file("ca.pem"))
            .kafka_key("sasl_password_file", "missing-file")
    })
    .await;
    assert!(
        inline.contains("kafka.sasl_password_file") && inline.contains("cannot be read"),
        "{inline}"
    );
}
