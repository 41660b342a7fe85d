//! TLS and ACL authentication to Redis, against the TLS variants of the local services
//! (`deploy/local/services.sh start redis-tls redis-cluster-tls`): TLS only, a
//! certificate for `localhost` from a throwaway CA, the default user off and one ACL
//! user. The daemon deletes keys there, on one server and on every node of a cluster;
//! each misconfiguration gives its cause and fix, and never the password.

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use support::config::ConfigBuilder;
use support::daemon::run_binary;
use support::db::wait_streaming;
use support::env::{pg_admin_url, redis_cluster_tls_url, redis_tls_url, tls_file, unique};
use support::inproc::{InProcess, Logs};
use support::store::{gone, redis_cluster_tls, redis_tls};
use support::tls::{item_rules, items_db_on, without_password};
use support::wait::eventually;

const PASSWORD: &str = "redis-tls-secret";

#[tokio::test]
async fn the_daemon_deletes_keys_over_tls_as_an_acl_user_with_a_password_file() {
    let db = items_db_on(&pg_admin_url(), "rtls").await;
    let prefix = unique("rtls");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("redis-password"), format!("{PASSWORD}\n")).unwrap();
    let config = ConfigBuilder::new(&db)
        .rules(&item_rules(&prefix))
        .redis(&without_password(&redis_tls_url()))
        .redis_key("ca_file", tls_file("ca.pem"))
        .redis_key("password_file", "redis-password")
        .pipeline("idle_heartbeat", "0s")
        .write(dir.path());
    let mut r = redis_tls().await;
    let key = format!("{prefix}:item:1");
    let _: () = r.set(&key, "stale").await.unwrap();
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    db.exec("INSERT INTO items VALUES (1, 'one')").await;
    eventually("the key deleted over TLS", Duration::from_secs(30), || {
        gone(&r, std::slice::from_ref(&key))
    })
    .await;
    daemon.stop_ok().await;
}

#[tokio::test]
async fn the_daemon_deletes_keys_on_every_node_of_a_tls_cluster() {
    let db = items_db_on(&pg_admin_url(), "rctls").await;
    let prefix = unique("rctls");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new(&db)
        .rules(&item_rules(&prefix))
        .redis(&redis_cluster_tls_url())
        .redis_key("cluster", true)
        .redis_key("ca_file", tls_file("ca.pem"))
        .pipeline("idle_heartbeat", "0s")
        .write(dir.path());
    let mut r = redis_cluster_tls().await;
    // Enough keys that every one of the three masters holds some.
    let keys: Vec<String> = (1..=30).map(|i| format!("{prefix}:item:{i}")).collect();
    let mut slots = std::collections::BTreeSet::new();
    for k in &keys {
        let _: () = r.set(k, "stale").await.unwrap();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(k)
            .query_async(&mut r)
            .await
            .unwrap();
        slots.insert(slot / 5462);
    }
    assert_eq!(slots.len(), 3, "the keys cover the three masters");
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    db.exec("INSERT INTO items SELECT i, 'x' FROM generate_series(1, 30) i")
        .await;
    eventually(
        "every key deleted over TLS, on every node",
        Duration::from_secs(30),
        || {
            let mut r = r.clone();
            let keys = keys.clone();
            async move {
                for k in &keys {
                    if r.exists::<_, bool>(k).await.unwrap() {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    daemon.stop_ok().await;
}

#[tokio::test]
async fn insecure_skip_verify_connects_to_an_untrusted_server_and_says_so() {
    let db = items_db_on(&pg_admin_url(), "rtlsi").await;
    let prefix = unique("rtlsi");
    let dir = tempfile::tempdir().unwrap();
    // A CA that did not sign the server's certificate: only skipping the check connects.
    let config = ConfigBuilder::new(&db)
        .rules(&item_rules(&prefix))
        .redis(&redis_tls_url())
        .redis_key("ca_file", tls_file("other-ca.pem"))
        .redis_key("insecure_skip_verify", true)
        .pipeline("idle_heartbeat", "0s")
        .write(dir.path());
    let (logs, _guard) = Logs::capture("warn");
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    daemon.stop_ok().await;
    assert_eq!(
        logs.lines_with("redis.insecure_skip_verify is on"),
        1,
        "{}",
        logs.text()
    );
    assert!(!logs.text().contains(PASSWORD), "{}", logs.text());
}

/// `wal2cache run` with `[redis]` set up by `redis`, to its exit: the code and what it
/// printed, which never holds the password.
async fn run_fails(label: &str, redis: impl FnOnce(ConfigBuilder) -> ConfigBuilder) -> String {
    let db = items_db_on(&pg_admin_url(), label).await;
    let dir = tempfile::tempdir().unwrap();
    let config = redis(ConfigBuilder::new(&db).rules(&item_rules(&unique(label))))
        .pipeline("idle_heartbeat", "0s")
        .write(dir.path());
    let (code, out, err) = run_binary(
        &["run", "--config", config.to_str().unwrap()],
        &[("WAL2CACHE_LOG", "warn")],
    );
    let text = format!("{out}{err}");
    eprintln!("{label}: {text}");
    assert_ne!(code, 0, "{label}: run did not fail: {text}");
    assert!(
        !text.contains(PASSWORD),
        "{label}: the password was printed: {text}"
    );
    text
}

#[tokio::test]
async fn each_redis_tls_failure_names_its_cause_and_fix() {
    let untrusted = run_fails("rtf_ca", |b| {
        b.redis(&redis_tls_url())
            .redis_key("ca_file", tls_file("other-ca.pem"))
    })
    .await;
    assert!(
        untrusted.contains("not signed by a CA this host trusts")
            && untrusted.contains("redis.ca_file"),
        "{untrusted}"
    );
    let wrong = run_fails("rtf_pw", |b| {
        let url = redis_tls_url().replace(PASSWORD, "not-the-password");
        b.redis(&url).redis_key("ca_file", tls_file("ca.pem"))
    })
    .await;
    assert!(
        wrong.contains("user or password is wrong") && !wrong.contains("not-the-password"),
        "{wrong}"
    );
    let anonymous = run_fails("rtf_noauth", |b| {
        let url = redis_tls_url();
        let host = url.split_once('@').unwrap().1;
        b.redis(&format!("rediss://{host}"))
            .redis_key("ca_file", tls_file("ca.pem"))
    })
    .await;
    assert!(anonymous.contains("requires a login"), "{anonymous}");
    let by_ip = run_fails("rtf_name", |b| {
        b.redis(&redis_tls_url().replace("localhost", "127.0.0.1"))
            .redis_key("ca_file", tls_file("ca.pem"))
    })
    .await;
    assert!(by_ip.contains("does not name the host"), "{by_ip}");
}

#[tokio::test]
async fn tls_settings_without_a_tls_url_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::on_url("postgres://u@127.0.0.1:1/db")
        .redis("redis://127.0.0.1:1")
        .redis_key("ca_file", tls_file("ca.pem"))
        .redis_key("cert_file", tls_file("client.pem"))
        .write(dir.path());
    let (code, out, err) = run_binary(&["check", "--config", config.to_str().unwrap()], &[]);
    let text = format!("{out}{err}");
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains("redis.ca_file: set, but redis.url is not a rediss:// URL")
            && text.contains("a client certificate needs both"),
        "{text}"
    );
}
