//! Topics on the broker: created, deleted, and read back from the beginning; a broker
//! of the test's own for tests that stop it.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, TopicPartitionList};
use serde_json::Value;

use super::env::kafka_brokers;
use super::net::free_port;
use super::wait::eventually;

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .unwrap()
}

/// Creates `topic` with `partitions`, retrying while the broker is not up yet.
#[allow(dead_code)]
pub async fn create_topic(topic: &str, partitions: i32) {
    let admin = admin();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let r = admin
            .create_topics(
                [&t],
                &AdminOptions::new().request_timeout(Some(Duration::from_secs(5))),
            )
            .await;
        match r.as_deref() {
            Ok([Ok(_)]) => return,
            Ok([Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists))]) => return,
            other => assert!(
                Instant::now() < deadline,
                "cannot create topic {topic}: {other:?}; start the broker with deploy/local/services.sh start kafka"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes `topic`; the broker must answer and accept.
#[allow(dead_code)]
pub async fn delete_topic(topic: &str) {
    let r = admin()
        .delete_topics(
            &[topic],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("the broker answers DeleteTopics");
    assert!(r.iter().all(|r| r.is_ok()), "delete {topic}: {r:?}");
}

/// The topic exists with at least one partition.
#[allow(dead_code)]
pub async fn topic_exists(topic: &str) -> bool {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .create()
            .unwrap();
        consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .is_ok_and(|md| {
                md.topics()
                    .first()
                    .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty())
            })
    })
    .await
    .unwrap()
}

/// Every event but heartbeats, from the topic's beginning, until `done` says so or
/// 60 s have passed (on a thread of the blocking pool).
#[allow(dead_code)]
pub async fn read_topic(
    topic: &str,
    done: impl FnMut(&[Value]) -> bool + Send + 'static,
) -> Vec<Value> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || read_topic_blocking(&topic, done))
        .await
        .unwrap()
}

/// Every event but heartbeats, from the topic's beginning, until at least `expected`
/// came and then none for `quiet` (or 60 s have passed): so that a test asserting the
/// exact count also sees duplicates and extra events.
#[allow(dead_code)]
pub async fn read_topic_until_quiet(topic: &str, expected: usize, quiet: Duration) -> Vec<Value> {
    // (events seen, when that count was first seen)
    let mut last = (0, Instant::now());
    read_topic(topic, move |events| {
        let (seen, since) = last;
        if events.len() != seen {
            last = (events.len(), Instant::now());
            return false;
        }
        seen >= expected && since.elapsed() >= quiet
    })
    .await
}

fn read_topic_blocking(topic: &str, mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
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

/// The cache keys the events name.
#[allow(dead_code)]
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

/// A Tansu broker of the test's own (memory storage), for tests that stop it; killed
/// when dropped.
#[allow(dead_code)]
pub struct PrivateBroker {
    child: Child,
    _dir: tempfile::TempDir,
    pub brokers: String,
}

#[allow(dead_code)]
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
