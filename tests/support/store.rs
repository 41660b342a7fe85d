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
        PrivateRedis::start_on(free_port()).await
    }

    /// On `port`: to bring one back where a client expects it.
    pub async fn start_on(port: u16) -> PrivateRedis {
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

/// One node of a `PrivateCluster`.
struct Node {
    port: u16,
    bus: u16,
    child: Option<Child>,
}

/// A Redis Cluster of the test's own (three masters, one replica each, no
/// persistence, a 2 s node timeout), for the tests that kill, fail over or reshard
/// it; every node is killed when dropped.
#[allow(dead_code)]
pub struct PrivateCluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

/// A node as CLUSTER NODES shows it.
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// A replica's master.
    pub of: Option<String>,
    pub failed: bool,
}

#[allow(dead_code)]
impl PrivateCluster {
    pub async fn start() -> PrivateCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = PrivateCluster {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..6 {
            let node = Node {
                port: free_port(),
                bus: free_port(),
                child: None,
            };
            cluster.nodes.push(node);
        }
        for i in 0..6 {
            cluster.spawn(i);
        }
        for node in &cluster.nodes {
            let port = node.port;
            eventually(
                "a cluster node to answer",
                Duration::from_secs(20),
                || async move { cli(port, &["PING"]).is_some_and(|o| o.trim() == "PONG") },
            )
            .await;
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_healthy().await;
        cluster
    }

    /// Starts node `i` (again, after `kill`: it keeps its nodes.conf and rejoins).
    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let dir = self.dir.path().join(node.port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &node.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-port", &node.bus.to_string()])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--dir", dir.to_str().unwrap()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (deploy/local/services.sh installs it)");
        self.nodes[i].child = Some(child);
    }

    /// A node's URL, for `redis.url` and the test's own client.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].port)
    }

    /// Every node's URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// CLUSTER NODES, from the first node that answers.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let text = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .find_map(|n| cli(n.port, &["CLUSTER", "NODES"]))
            .expect("a cluster node answers");
        text.lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f
                    .get(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()?;
                let flags = f.get(2)?;
                Some(NodeInfo {
                    id: f[0].to_string(),
                    port,
                    master: flags.contains("master"),
                    of: (f.get(3)? != &"-").then(|| f[3].to_string()),
                    failed: flags.contains("fail"),
                })
            })
            .collect()
    }

    /// Every live node says `cluster_state:ok`, each master has a replica that is
    /// up, and no node is marked failed.
    pub async fn wait_healthy(&self) {
        eventually(
            "the private cluster healthy",
            Duration::from_secs(60),
            || async {
                let live = self.nodes.iter().filter(|n| n.child.is_some());
                let ok = live.clone().all(|n| {
                    cli(n.port, &["CLUSTER", "INFO"])
                        .is_some_and(|i| i.contains("cluster_state:ok"))
                });
                let nodes = self.nodes();
                let masters: Vec<&NodeInfo> =
                    nodes.iter().filter(|n| n.master && !n.failed).collect();
                ok && masters.len() == 3
                    && masters.iter().all(|m| {
                        nodes
                            .iter()
                            .any(|r| !r.failed && r.of.as_deref() == Some(m.id.as_str()))
                    })
            },
        )
        .await;
    }

    /// SIGKILL of the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        let mut child = node.child.take().expect("the node runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts the node on `port` again: it rejoins (as a replica, if it was failed
    /// over meanwhile).
    pub fn restart(&mut self, port: u16) {
        let i = self.nodes.iter().position(|n| n.port == port).unwrap();
        self.spawn(i);
    }
}

/// `redis-cli -p PORT ARGS…`: its output, `None` when the node does not answer.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("timeout")
        .args(["5", "redis-cli", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        .filter(|o| !o.starts_with("Could not connect"))
}

/// `redis-cli` with `args` against the cluster at `port` (`--cluster reshard`…).
#[allow(dead_code)]
pub fn cluster_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["--cluster"])
        .args(
            args.iter()
                .map(|a| a.replace("{node}", &format!("127.0.0.1:{port}"))),
        )
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "redis-cli --cluster {args:?}: {text}");
    text
}

/// `redis-cli -p PORT ARGS…` on one node: its output.
#[allow(dead_code)]
pub fn node_cli(port: u16, args: &[&str]) -> String {
    cli(port, args).unwrap_or_else(|| panic!("node {port} does not answer {args:?}"))
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
