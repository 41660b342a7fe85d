//! Helpers for tests that run `wal2cache run` against the local Redis and broker.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, TopicPartitionList};
use serde_json::Value;

use super::{eventually, TestDb};

pub const BIN: &str = env!("CARGO_BIN_EXE_wal2cache");

/// The binary the daemon tests run: `BIN`, or `WAL2CACHE_TEST_BIN` (to run a test
/// against another build, e.g. to see it fail before a fix).
pub fn bin() -> String {
    std::env::var("WAL2CACHE_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

pub fn redis_url() -> String {
    std::env::var("WAL2CACHE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:63790".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("WAL2CACHE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

pub async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis runs: deploy/local/services.sh start")
}

/// `wal2cache run` as a child process, killed when dropped (also when a test panics).
pub struct Daemon(Option<Child>);

impl Daemon {
    /// Starts it with `envs` (logging at warn unless `WAL2CACHE_LOG` is among them).
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> Daemon {
        let child = Command::new(bin())
            .args(["run", "--config", config.to_str().unwrap()])
            .env("WAL2CACHE_LOG", "warn")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Daemon(Some(child))
    }

    /// SIGTERM: it must drain and exit 0.
    pub fn stop(mut self) {
        let mut child = self.0.take().unwrap();
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "run exits 0 on SIGTERM");
    }

    /// Sends a signal (`"HUP"`, `"TERM"`, ...) to the daemon.
    pub fn signal(&self, signal: &str) {
        let child = self.0.as_ref().unwrap();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
    }

    /// Starts it with its standard error written to `log`.
    pub fn start_logging(config: &Path, envs: &[(&str, &str)], log: &Path) -> Daemon {
        let child = Command::new(bin())
            .args(["run", "--config", config.to_str().unwrap()])
            .env("WAL2CACHE_LOG", "warn")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Daemon(Some(child))
    }

    /// SIGTERM, then waits up to `within` for it to exit: its exit code and how long
    /// it took, or `None` (and it is killed) if it was still running.
    pub fn terminate(mut self, within: Duration) -> Option<(Option<i32>, Duration)> {
        let mut child = self.0.take().unwrap();
        let sent = Instant::now();
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        while sent.elapsed() < within {
            if let Some(status) = child.try_wait().unwrap() {
                return Some((status.code(), sent.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn assert_running(&mut self, when: &str) {
        let child = self.0.as_mut().unwrap();
        assert!(
            child.try_wait().unwrap().is_none(),
            "the daemon exited {when}"
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A walsender streams from `slot`. `active` alone is not enough: while the backend
/// that creates a slot waits for running transactions, the slot is already active
/// (held by that backend) and has no confirmed position yet.
pub async fn slot_active(db: &TestDb, slot: &str) -> bool {
    db.client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots s
               JOIN pg_stat_replication r ON r.pid = s.active_pid
              WHERE s.slot_name = $1 AND s.confirmed_flush_lsn IS NOT NULL",
            &[&slot],
        )
        .await
        .unwrap()
        .is_some()
}

/// Waits until a daemon streams from `slot`.
pub async fn wait_streaming(db: &TestDb, slot: &str) {
    eventually("the daemon to stream", Duration::from_secs(60), || {
        slot_active(db, slot)
    })
    .await;
}

/// Every event but heartbeats, from the topic's beginning, until `done` says so or
/// 60 s have passed. Blocking: call it from `spawn_blocking`.
pub fn read_topic(topic: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", "unused")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(&out) && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            if v["kind"] != "heartbeat" {
                out.push(v);
            }
        }
    }
    out
}

/// Every event but heartbeats, from the topic's beginning, until at least `expected`
/// came and then none for `quiet` (or 60 s have passed): so that a test asserting the
/// exact count also sees duplicates and extra events. Blocking: call it from
/// `spawn_blocking`.
pub fn read_topic_until_quiet(topic: &str, expected: usize, quiet: Duration) -> Vec<Value> {
    // (events seen, when that count was first seen)
    let last = std::cell::Cell::new((0, Instant::now()));
    read_topic(topic, |events| {
        let (seen, since) = last.get();
        if events.len() != seen {
            last.set((events.len(), Instant::now()));
            return false;
        }
        seen >= expected && since.elapsed() >= quiet
    })
}

/// The cache keys the events name.
pub fn keys_of(events: &[Value]) -> HashSet<&str> {
    events
        .iter()
        .flat_map(|e| {
            e["keys"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str())
        })
        .collect()
}

/// The example rules with every key and tag under a prefix of the test's own.
pub fn example_rules(prefix: &str) -> String {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/example.toml"))
            .unwrap();
    example
        .replace("\"shop:", &format!("\"{prefix}:shop:"))
        .replace("\"cfg:", &format!("\"{prefix}:cfg:"))
}

/// A config (daemon `name`, slot `<db>_d`, publication `w2c`) and the prefixed example
/// rules, in `dir`.
pub fn write_example_config(
    dir: &Path,
    name: &str,
    db: &TestDb,
    prefix: &str,
    topic: &str,
) -> std::path::PathBuf {
    std::fs::write(dir.join("rules.toml"), example_rules(prefix)).unwrap();
    let config = dir.join("wal2cache.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "{name}"
[postgres]
url = "{url}"
slot = "{db}_d"
publication = "w2c"
[rules]
path = "rules.toml"
[redis]
url = "{redis}"
tag_prefix = "{prefix}:tag:"
[kafka]
brokers = "{kafka}"
topic = "{topic}"
partitions = 2
[pipeline]
shutdown_timeout = "10s"
"#,
            url = db.url,
            db = db.name,
            redis = redis_url(),
            kafka = kafka_brokers(),
        ),
    )
    .unwrap();
    config
}

/// A local address nothing listens on (bound, then released).
pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A port nothing listens on (yet).
pub fn free_port() -> u16 {
    free_addr().port()
}

/// One HTTP/1.1 request: the status code and the body, or `None` when nothing
/// answers at `addr`.
pub fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

/// A `redis-server` of the test's own, for tests that break it (the shared one on
/// 63790 serves other tests at the same time); killed when dropped.
pub struct PrivateRedis {
    child: Child,
    pub url: String,
}

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

    async fn try_connect(&self) -> Option<redis::aio::MultiplexedConnection> {
        let mut c = redis::Client::open(self.url.as_str())
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        redis::cmd("PING").query_async::<()>(&mut c).await.ok()?;
        Some(c)
    }

    pub async fn connect(&self) -> redis::aio::MultiplexedConnection {
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

/// A config for `wal2cache run` with the rules in `rules` (TOML), in `dir`: slot
/// `<db>_<slot>`, publication `w2c`, Redis at `redis`, the topic `topic` (one
/// partition); `extra` is appended (e.g. a `[pipeline]` section).
pub fn write_config(
    dir: &Path,
    db: &TestDb,
    slot: &str,
    rules: &str,
    redis: &str,
    topic: &str,
    extra: &str,
) -> std::path::PathBuf {
    std::fs::write(dir.join("rules.toml"), rules).unwrap();
    let config = dir.join("wal2cache.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"test\"\n[postgres]\nurl = \"{url}\"\nslot = \"{db}_{slot}\"\npublication = \"w2c\"\n\
             [rules]\npath = \"rules.toml\"\n[redis]\nurl = \"{redis}\"\n\
             [kafka]\nbrokers = \"{kafka}\"\ntopic = \"{topic}\"\npartitions = 1\n{extra}",
            url = db.url,
            db = db.name,
            kafka = kafka_brokers(),
        ),
    )
    .unwrap();
    config
}

/// The topic exists with at least one partition. Blocking.
pub fn topic_exists(topic: &str) -> bool {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .unwrap();
    consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .is_ok_and(|md| {
            md.topics()
                .first()
                .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty())
        })
}

/// A Tansu broker of the test's own (memory storage), for tests that stop it; killed
/// when dropped.
pub struct PrivateBroker {
    child: Child,
    _dir: tempfile::TempDir,
    pub brokers: String,
}

impl PrivateBroker {
    pub async fn start() -> PrivateBroker {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        // tansu reads a .env from its working directory or any parent: an empty one
        // keeps a project-level one out.
        std::fs::write(dir.path().join(".env"), "").unwrap();
        let bin = std::env::var("HOME")
            .map(|h| format!("{h}/.cargo/bin/tansu"))
            .ok()
            .filter(|p| Path::new(p).exists())
            .unwrap_or_else(|| "tansu".into());
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .args(["broker", "--cluster-id", "wal2cache-test"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu is installed (deploy/local/services.sh installs it)");
        let broker = PrivateBroker {
            child,
            _dir: dir,
            brokers: format!("127.0.0.1:{port}"),
        };
        eventually(
            "the private broker to listen",
            Duration::from_secs(30),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        broker
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
