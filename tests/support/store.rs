//! Redis, the store the daemon writes: the shared server, private ones for the tests
//! that break theirs, and what a test asks of the keys.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;

use super::env::redis_url;
use super::net::free_port;
use super::wait::eventually;

/// A connection to the shared Redis (over TLS, verified with the throwaway CA, when
/// `WAL2CACHE_TEST_REDIS` is a rediss:// URL).
#[allow(dead_code)]
pub async fn redis() -> MultiplexedConnection {
    connect(&redis_url())
        .await
        .expect("Redis runs: deploy/local/services.sh start")
}

/// A connection to the TLS variant of Redis (`services.sh start redis-tls`), as its
/// ACL user, the server verified against the throwaway CA.
#[allow(dead_code)]
pub async fn redis_tls() -> MultiplexedConnection {
    connect(&super::env::redis_tls_url())
        .await
        .expect("Redis over TLS runs: deploy/local/services.sh start redis-tls")
}

async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    let client = if url.starts_with("rediss://") {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = std::fs::read(super::env::tls_file("ca.pem")).expect("the throwaway CA");
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca),
        };
        redis::Client::build_with_tls(url, certs)?
    } else {
        redis::Client::open(url)?
    };
    client.get_multiplexed_async_connection().await
}

/// A connection to the TLS variant of the Redis Cluster, as its ACL user.
#[allow(dead_code)]
pub async fn redis_cluster_tls() -> redis::cluster_async::ClusterConnection {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = std::fs::read(super::env::tls_file("ca.pem")).expect("the throwaway CA");
    redis::cluster::ClusterClientBuilder::new(vec![super::env::redis_cluster_tls_url()])
        .certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca),
        })
        .build()
        .unwrap()
        .get_async_connection()
        .await
        .expect("the Redis Cluster over TLS runs: deploy/local/services.sh start redis-cluster-tls")
}

/// None of `keys` exists.
#[allow(dead_code)]
pub async fn gone(r: &MultiplexedConnection, keys: &[impl AsRef<str>]) -> bool {
    let mut r = r.clone();
    for k in keys {
        if r.exists::<_, bool>(k.as_ref()).await.unwrap() {
            return false;
        }
    }
    true
}

/// The keys of `keys` that hold a value.
#[allow(dead_code)]
pub async fn present(r: &MultiplexedConnection, keys: &[String]) -> BTreeSet<String> {
    let mut r = r.clone();
    let mut out = BTreeSet::new();
    for k in keys {
        if r.exists::<_, bool>(k).await.unwrap() {
            out.insert(k.clone());
        }
    }
    out
}

/// Unlinks every key that matches `pattern` (a test's own prefix), a thousand at a
/// time (SCAN, not KEYS: a bench leaves millions); errors ignored. How many.
#[allow(dead_code)]
pub async fn unlink_matching(r: &mut MultiplexedConnection, pattern: &str) -> u64 {
    try_unlink_matching(r, pattern).await.unwrap_or(0)
}

/// `unlink_matching`, with its error.
#[allow(dead_code)]
pub async fn try_unlink_matching(
    r: &mut MultiplexedConnection,
    pattern: &str,
) -> redis::RedisResult<u64> {
    let mut total = 0;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys) = scan_page(r, cursor, pattern).await?;
        if !keys.is_empty() {
            total += keys.len() as u64;
            redis::cmd("UNLINK").arg(&keys).query_async::<()>(r).await?;
        }
        if next == 0 {
            return Ok(total);
        }
        cursor = next;
    }
}

/// One page of `SCAN cursor MATCH pattern COUNT 1000` on one server: the next cursor
/// (0 at the end) and the keys.
#[allow(dead_code)]
pub async fn scan_page(
    r: &mut MultiplexedConnection,
    cursor: u64,
    pattern: &str,
) -> redis::RedisResult<(u64, Vec<String>)> {
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1000)
        .query_async(r)
        .await
}

/// A `redis-server` of the test's own, for tests that break it (the shared one on
/// 63790 serves other tests at the same time); killed when dropped.
#[allow(dead_code)]
pub struct PrivateRedis {
    child: Child,
    pub url: String,
}

#[allow(dead_code)]
impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (deploy/local/services.sh installs it)");
        let redis = PrivateRedis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        };
        eventually(
            "the private redis-server to answer",
            Duration::from_secs(20),
            || async { redis.try_connect().await.is_some() },
        )
        .await;
        redis
    }

    async fn try_connect(&self) -> Option<MultiplexedConnection> {
        let mut c = redis::Client::open(self.url.as_str())
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        redis::cmd("PING").query_async::<()>(&mut c).await.ok()?;
        Some(c)
    }

    pub async fn connect(&self) -> MultiplexedConnection {
        self.try_connect()
            .await
            .expect("the private redis-server answers")
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
