//! For the `wal2cache::l1` tests against the local Kafka-compatible broker
//! (`deploy/local/services.sh start kafka`; `WAL2CACHE_TEST_KAFKA`): a topic of the
//! test's own (the broker does not create topics), a producer of schema-1 events, and
//! heartbeats on every partition, since no daemon sends them here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use wal2cache::event::{Event, Kind};
use wal2cache::l1::{L1Builder, L1};

use super::env::{kafka_brokers, unique};
use super::kafka::{create_topic, plain, Access};

/// Writes schema-1 events (and anything else) to a topic.
#[derive(Clone)]
#[allow(dead_code)]
pub struct Events {
    pub producer: FutureProducer,
    pub topic: String,
    pub partitions: i32,
}

#[allow(dead_code)]
impl Events {
    pub fn new(topic: &str, partitions: i32) -> Events {
        Events::on(&plain(), topic, partitions)
    }

    /// On the brokers of `access`.
    pub fn on(access: &Access, topic: &str, partitions: i32) -> Events {
        let mut config = ClientConfig::new();
        for (k, v) in access {
            config.set(k, v);
        }
        let producer = config
            .set("linger.ms", "0")
            .set("message.timeout.ms", "10000")
            .create()
            .unwrap();
        Events {
            producer,
            topic: topic.into(),
            partitions,
        }
    }

    /// Sends `payload` (None: a message without one) to `partition` and waits for
    /// the broker's acknowledgement.
    pub async fn send_raw(&self, partition: i32, payload: Option<&[u8]>) {
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
            .key("test")
            .partition(partition);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {}: {e}", self.topic));
    }

    pub async fn send(&self, partition: i32, event: &Event) {
        self.send_raw(partition, Some(event.to_json().as_bytes()))
            .await;
    }

    pub async fn invalidate(&self, partition: i32, keys: &[&str], tags: &[&str]) {
        self.send(partition, &invalidate(keys, tags)).await;
    }

    pub async fn flush_all(&self, partition: i32) {
        let mut e = Event::new(Kind::FlushAll, "test");
        e.reason = Some("truncate".into());
        e.commit_time = Some(now_rfc3339());
        self.send(partition, &e).await;
    }

    /// One heartbeat on every partition, queued (not awaited).
    pub fn heartbeat(&self) {
        let mut e = Event::new(Kind::Heartbeat, "test");
        e.commit_time = Some(now_rfc3339());
        let payload = e.to_json();
        for p in 0..self.partitions {
            let record = FutureRecord::to(&self.topic)
                .key("heartbeat")
                .payload(&payload)
                .partition(p);
            let _ = self.producer.send_result(record);
        }
    }

    pub fn flush(&self) {
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}

#[allow(dead_code)]
pub fn now_rfc3339() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

#[allow(dead_code)]
pub fn invalidate(keys: &[&str], tags: &[&str]) -> Event {
    let mut e = Event::new(Kind::Invalidate, "test");
    e.commit_time = Some(now_rfc3339());
    e.lsn = Some("0/1".into());
    e.table = Some("public.t".into());
    e.op = Some("update".into());
    e.keys = keys.iter().map(|k| k.to_string()).collect();
    e.tags = tags.iter().map(|t| t.to_string()).collect();
    e
}

/// Heartbeats on every partition every `every`, as the daemon sends them, until
/// dropped; `pause` stops them for a while.
#[allow(dead_code)]
pub struct Heartbeats {
    paused: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

#[allow(dead_code)]
impl Heartbeats {
    pub fn start(events: &Events, every: Duration) -> Heartbeats {
        let paused = Arc::new(AtomicBool::new(false));
        let (p, events) = (paused.clone(), events.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if !p.load(Ordering::Relaxed) {
                    events.heartbeat();
                }
            }
        });
        Heartbeats { paused, task }
    }

    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Heartbeats every 100 ms; the tests use a bound of 1 s.
#[allow(dead_code)]
pub const HEARTBEAT: Duration = Duration::from_millis(100);
#[allow(dead_code)]
pub const BOUND: Duration = Duration::from_secs(1);

#[allow(dead_code)]
pub fn builder(topic: &str) -> L1Builder {
    L1::builder(kafka_brokers(), topic)
        .capacity(10_000)
        .ttl(Duration::from_secs(300))
        .staleness_bound(BOUND)
}

/// A topic with `partitions`, heartbeats on it, and an L1 subscribed and healthy.
#[allow(dead_code)]
pub struct Setup {
    pub topic: String,
    pub events: Events,
    pub heartbeats: Heartbeats,
    pub cache: L1<String>,
}

#[allow(dead_code)]
impl Setup {
    pub async fn new(label: &str, partitions: i32) -> Setup {
        Setup::with(label, partitions, |b| b).await
    }

    pub async fn with(
        label: &str,
        partitions: i32,
        f: impl FnOnce(L1Builder) -> L1Builder,
    ) -> Setup {
        let topic = unique(&format!("l1_{label}"));
        create_topic(&topic, partitions).await;
        let events = Events::new(&topic, partitions);
        let heartbeats = Heartbeats::start(&events, HEARTBEAT);
        let cache = f(builder(&topic)).build::<String>().unwrap();
        assert!(
            cache.wait_healthy(Duration::from_secs(30)).await,
            "the L1 did not turn healthy: {:?}",
            cache.metrics()
        );
        Setup {
            topic,
            events,
            heartbeats,
            cache,
        }
    }
}

/// A loader that must not run.
#[allow(dead_code)]
pub async fn unreachable_loader() -> String {
    panic!("the loader ran on a hit")
}

/// What the L1 reported through `on_notice`, owned.
#[derive(Debug, Clone, PartialEq)]
#[allow(dead_code)]
pub enum Seen {
    Invalidated {
        keys: Vec<String>,
        tags: Vec<String>,
        evicted: usize,
    },
    Flushed,
    Unhealthy(String),
    Healthy,
}

#[allow(dead_code)]
pub type Notices = tokio::sync::mpsc::UnboundedReceiver<Seen>;

/// An `on_notice` callback and the channel it reports to.
#[allow(dead_code)]
pub fn recorder() -> (
    impl Fn(&wal2cache::l1::Notice<'_>) + Send + Sync + 'static,
    Notices,
) {
    use wal2cache::l1::Notice;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let f = move |n: &Notice<'_>| {
        let seen = match n {
            Notice::Invalidated { event, evicted } => Seen::Invalidated {
                keys: event.keys.clone(),
                tags: event.tags.clone(),
                evicted: *evicted,
            },
            Notice::Flushed { .. } => Seen::Flushed,
            Notice::Unhealthy { reason } => Seen::Unhealthy(reason.to_string()),
            Notice::Healthy => Seen::Healthy,
            _ => return,
        };
        let _ = tx.send(seen);
    };
    (f, rx)
}

/// The next notice that satisfies `want`, within `deadline`.
#[allow(dead_code)]
pub async fn wait_notice(
    rx: &mut Notices,
    deadline: Duration,
    want: impl Fn(&Seen) -> bool,
) -> Seen {
    tokio::time::timeout(deadline, async {
        loop {
            let n = rx.recv().await.expect("the L1 is alive");
            if want(&n) {
                return n;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no such notice within {deadline:?}"))
}
