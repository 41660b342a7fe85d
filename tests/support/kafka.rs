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

use super::env::{
    kafka_brokers, kafka_properties, kafka_sasl_login, kafka_ssl_brokers, kafka_tls_brokers,
    tls_file,
};
use super::net::free_port;
use super::wait::eventually;

/// librdkafka settings of a client: where the brokers are, and how to log in.
pub type Access = Vec<(String, String)>;

/// The shared broker (in plain text unless `WAL2CACHE_TEST_KAFKA_PROPERTIES` says).
#[allow(dead_code)]
pub fn plain() -> Access {
    let mut access = vec![("bootstrap.servers".into(), kafka_brokers())];
    access.extend(kafka_properties());
    access
}

/// The TLS variant of the broker over SASL_SSL, as its SCRAM user, verifying the
/// brokers' certificate with the throwaway CA.
#[allow(dead_code)]
pub fn sasl_ssl() -> Access {
    let (user, password) = kafka_sasl_login();
    [
        ("bootstrap.servers", kafka_tls_brokers()),
        ("security.protocol", "SASL_SSL".into()),
        ("sasl.mechanism", "SCRAM-SHA-256".into()),
        ("sasl.username", user),
        ("sasl.password", password),
        ("ssl.ca.location", tls_file("ca.pem")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The TLS-only variant of the broker over SSL (no SASL), verifying the brokers'
/// certificate with the throwaway CA.
#[allow(dead_code)]
pub fn ssl() -> Access {
    [
        ("bootstrap.servers", kafka_ssl_brokers()),
        ("security.protocol", "SSL".into()),
        ("ssl.ca.location", tls_file("ca.pem")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn client_config(access: &Access) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in access {
        c.set(k, v);
    }
    c
}

fn admin(access: &Access) -> AdminClient<DefaultClientContext> {
    client_config(access).create().unwrap()
}

/// Creates `topic` with `partitions`, retrying while the broker is not up yet.
#[allow(dead_code)]
pub async fn create_topic(topic: &str, partitions: i32) {
    create_topic_on(&plain(), topic, partitions).await
}

/// `create_topic` on the brokers of `access`.
#[allow(dead_code)]
pub async fn create_topic_on(access: &Access, topic: &str, partitions: i32) {
    let admin = admin(access);
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
    if let Err(e) = try_delete_topic(topic).await {
        panic!("delete {topic}: {e}");
    }
}

/// Deletes `topic`: what the broker said when it did not.
#[allow(dead_code)]
pub async fn try_delete_topic(topic: &str) -> Result<(), String> {
    let r = admin(&plain())
        .delete_topics(
            &[topic],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| format!("the broker does not answer DeleteTopics: {e}"))?;
    match r.iter().find_map(|r| r.as_ref().err()) {
        Some((_, code)) => Err(code.to_string()),
        None => Ok(()),
    }
}

/// The topic exists with at least one partition.
#[allow(dead_code)]
pub async fn topic_exists(topic: &str) -> bool {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client_config(&plain()).create().unwrap();
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
    read_topic_on(&plain(), topic, done).await
}

/// `read_topic` on the brokers of `access`.
#[allow(dead_code)]
pub async fn read_topic_on(
    access: &Access,
    topic: &str,
    done: impl FnMut(&[Value]) -> bool + Send + 'static,
) -> Vec<Value> {
    let topic = topic.to_string();
    let access = access.clone();
    tokio::task::spawn_blocking(move || read_topic_blocking(&access, &topic, done))
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

/// A consumer (no group, no commits) with `settings`; the partitions of `topic`.
fn consumer(topic: &str, settings: &[(&str, &str)]) -> (BaseConsumer, Vec<i32>) {
    consumer_on(&plain(), topic, settings)
}

fn consumer_on(
    access: &Access,
    topic: &str,
    settings: &[(&str, &str)],
) -> (BaseConsumer, Vec<i32>) {
    let mut config = client_config(access);
    config
        .set("group.id", "unused")
        .set("enable.auto.commit", "false");
    for (k, v) in settings {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config.create().unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the metadata of {topic}: {e}"));
    let partitions = md
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    (consumer, partitions)
}

/// Assigns every partition at its offset in `from`.
fn assign(consumer: &BaseConsumer, topic: &str, from: &[(i32, rdkafka::Offset)]) {
    let mut tpl = TopicPartitionList::new();
    for (p, offset) in from {
        tpl.add_partition_offset(topic, *p, *offset).unwrap();
    }
    consumer.assign(&tpl).unwrap();
}

fn read_topic_blocking(
    access: &Access,
    topic: &str,
    mut done: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let (consumer, partitions) = consumer_on(access, topic, &[]);
    let from: Vec<_> = partitions
        .iter()
        .map(|p| (*p, rdkafka::Offset::Beginning))
        .collect();
    assign(&consumer, topic, &from);
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

/// The low and high watermarks of every partition of a topic: (partition, low, high).
#[allow(dead_code)]
pub async fn topic_watermarks(topic: &str) -> Vec<(i32, i64, i64)> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let (consumer, partitions) = consumer(&topic, &[]);
        watermarks(&consumer, &topic, &partitions)
    })
    .await
    .unwrap()
}

fn watermarks(consumer: &BaseConsumer, topic: &str, partitions: &[i32]) -> Vec<(i32, i64, i64)> {
    partitions
        .iter()
        .map(|&p| {
            let (lo, hi) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("the watermarks of {topic} [{p}]: {e}"));
            (p, lo, hi)
        })
        .collect()
}

/// Per partition: (partition, high watermark as read first, next offset after the last
/// message read).
#[allow(dead_code)]
pub type PartitionEnds = Vec<(i32, i64, i64)>;

/// Every message of every partition of a topic from its beginning, raw (heartbeats
/// included), handed to `each` (partition, offset, payload), until none came for
/// `idle` and every partition's high watermark, as read first, was passed; or
/// `timeout`. Reading does not stop at the high watermarks: a broker that reports them
/// short still shows what it stored. How many messages were read, and per partition
/// where reading ended.
#[allow(dead_code)]
pub async fn consume_topic(
    topic: &str,
    idle: Duration,
    timeout: Duration,
    mut each: impl FnMut(i32, i64, &[u8]) + Send + 'static,
) -> (u64, PartitionEnds) {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let (consumer, partitions) = consumer(
            &topic,
            &[
                ("enable.partition.eof", "false"),
                ("fetch.wait.max.ms", "100"),
            ],
        );
        let marks = watermarks(&consumer, &topic, &partitions);
        let from: Vec<_> = marks
            .iter()
            .map(|(p, lo, _)| (*p, rdkafka::Offset::Offset(*lo)))
            .collect();
        assign(&consumer, &topic, &from);
        // partition -> (high watermark as read first, next offset to read)
        let mut next: std::collections::HashMap<i32, (i64, i64)> =
            marks.iter().map(|(p, lo, hi)| (*p, (*hi, *lo))).collect();
        let deadline = Instant::now() + timeout;
        let mut last_message = Instant::now();
        let mut read = 0u64;
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    read += 1;
                    last_message = Instant::now();
                    if let Some(n) = next.get_mut(&m.partition()) {
                        n.1 = n.1.max(m.offset() + 1);
                    }
                    each(m.partition(), m.offset(), m.payload().unwrap_or_default());
                }
                Some(Err(e)) => panic!("consuming {topic}: {e}"),
                None => {
                    let passed = next.values().all(|(hi, n)| n >= hi);
                    if passed && last_message.elapsed() >= idle {
                        break;
                    }
                }
            }
        }
        let mut ends: PartitionEnds = next.into_iter().map(|(p, (hi, n))| (p, hi, n)).collect();
        ends.sort();
        (read, ends)
    })
    .await
    .unwrap()
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
        PrivateBroker::start_on(free_port()).await
    }

    /// A new broker on `port` (another's, stopped: a restart, with nothing kept).
    pub async fn start_on(port: u16) -> PrivateBroker {
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
