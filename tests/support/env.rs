//! Where the services are (`deploy/local/services.sh env` prints these variables), and
//! names no other test (or run) uses.

use std::sync::atomic::{AtomicU32, Ordering};

/// PostgreSQL, as a superuser: `WAL2CACHE_TEST_PG`.
#[allow(dead_code)]
pub fn pg_admin_url() -> String {
    std::env::var("WAL2CACHE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:54320/postgres".into())
}

/// The superuser URL of the server of another PostgreSQL major (`services.sh start
/// pgN`, port 54300 + N): `WAL2CACHE_TEST_PG<N>`.
#[allow(dead_code)]
pub fn pg_major_admin_url(major: u32) -> String {
    std::env::var(format!("WAL2CACHE_TEST_PG{major}"))
        .unwrap_or_else(|_| format!("postgres://postgres@127.0.0.1:{}/postgres", 54300 + major))
}

/// The TLS variant of PostgreSQL (`services.sh start pg-tls`), as a superuser that
/// logs in with SCRAM: `WAL2CACHE_TEST_PG_TLS`; no TLS options in it.
#[allow(dead_code)]
pub fn pg_tls_url() -> String {
    std::env::var("WAL2CACHE_TEST_PG_TLS").unwrap_or_else(|_| {
        "postgres://wal2cache_tls:wal2cache-tls-secret@localhost:54330/postgres".into()
    })
}

/// A file of the throwaway CA's directory (`ca.pem`, `client.pem`, `other-ca.pem`...):
/// `WAL2CACHE_TEST_TLS_DIR`.
#[allow(dead_code)]
pub fn tls_file(name: &str) -> String {
    let dir = std::env::var("WAL2CACHE_TEST_TLS_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.local/tls").into());
    format!("{dir}/{name}")
}

/// The TLS variant of Redis, its ACL user and password in the URL:
/// `WAL2CACHE_TEST_REDIS_TLS`.
#[allow(dead_code)]
pub fn redis_tls_url() -> String {
    std::env::var("WAL2CACHE_TEST_REDIS_TLS")
        .unwrap_or_else(|_| "rediss://wal2cache_tls:redis-tls-secret@localhost:63800".into())
}

/// A node of the TLS variant of the Redis Cluster: `WAL2CACHE_TEST_REDIS_CLUSTER_TLS`.
#[allow(dead_code)]
pub fn redis_cluster_tls_url() -> String {
    std::env::var("WAL2CACHE_TEST_REDIS_CLUSTER_TLS")
        .unwrap_or_else(|_| "rediss://wal2cache_tls:redis-tls-secret@localhost:63801".into())
}

/// The shared Redis: `WAL2CACHE_TEST_REDIS`.
#[allow(dead_code)]
pub fn redis_url() -> String {
    std::env::var("WAL2CACHE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:63790".into())
}

/// A node of the shared Redis Cluster: `WAL2CACHE_TEST_REDIS_CLUSTER`.
#[allow(dead_code)]
pub fn redis_cluster_url() -> String {
    std::env::var("WAL2CACHE_TEST_REDIS_CLUSTER")
        .unwrap_or_else(|_| "redis://127.0.0.1:63791".into())
}

/// The shared Kafka-compatible broker: `WAL2CACHE_TEST_KAFKA`.
#[allow(dead_code)]
pub fn kafka_brokers() -> String {
    std::env::var("WAL2CACHE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The TLS variant of the broker (`services.sh start kafka-tls`): SASL_SSL, TLS by
/// stunnel with a certificate for `localhost`: `WAL2CACHE_TEST_KAFKA_TLS`.
#[allow(dead_code)]
pub fn kafka_tls_brokers() -> String {
    std::env::var("WAL2CACHE_TEST_KAFKA_TLS").unwrap_or_else(|_| "localhost:19093".into())
}

/// The TLS-only variant of the broker (`services.sh start kafka-ssl`): SSL without
/// SASL, TLS by stunnel with a certificate for `localhost`: `WAL2CACHE_TEST_KAFKA_SSL`.
#[allow(dead_code)]
pub fn kafka_ssl_brokers() -> String {
    std::env::var("WAL2CACHE_TEST_KAFKA_SSL").unwrap_or_else(|_| "localhost:19095".into())
}

/// The SCRAM user of the TLS broker and its password:
/// `WAL2CACHE_TEST_KAFKA_SASL_USER`, `WAL2CACHE_TEST_KAFKA_SASL_PASSWORD`.
#[allow(dead_code)]
pub fn kafka_sasl_login() -> (String, String) {
    (
        std::env::var("WAL2CACHE_TEST_KAFKA_SASL_USER").unwrap_or_else(|_| "wal2cache_sasl".into()),
        std::env::var("WAL2CACHE_TEST_KAFKA_SASL_PASSWORD")
            .unwrap_or_else(|_| "kafka-sasl-secret".into()),
    )
}

/// librdkafka properties for the shared broker, `k=v,k=v`, for every client of the
/// tests and the daemons they start: `WAL2CACHE_TEST_KAFKA_PROPERTIES` (none by
/// default; `services.sh env tls` sets SASL_SSL ones, to run a bench over TLS).
#[allow(dead_code)]
pub fn kafka_properties() -> Vec<(String, String)> {
    std::env::var("WAL2CACHE_TEST_KAFKA_PROPERTIES")
        .unwrap_or_default()
        .split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("WAL2CACHE_TEST_KAFKA_PROPERTIES: {kv:?} is not k=v"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `prefix` made unique to this call: the process, a counter and the clock. A valid SQL
/// identifier, Kafka topic name and Redis key part when `prefix` is one.
#[allow(dead_code)]
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}_{}_{n}_{nanos:x}", std::process::id())
}
