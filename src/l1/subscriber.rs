//! The subscriber: one Kafka consumer per L1 that assigns itself every partition of
//! the topic (no consumer group, no offset commits, so every instance sees every
//! event), starts at the end, and applies schema-1 events to the cache. It watches
//! the stream: a consumer error, a lost or added partition, a gap, or a partition
//! without a heartbeat for longer than the staleness bound makes the cache empty
//! itself and store nothing until, after a fresh assignment, every partition has
//! delivered a heartbeat again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::metrics::{bump, export};
use super::partitions::{Gaps, Partitions, Seen};
use super::store::Core;
use super::Notice;
use crate::event::{Event, Kind, SCHEMA};

#[derive(Clone)]
pub(crate) struct Settings {
    pub brokers: String,
    pub topic: String,
    pub properties: Vec<(String, String)>,
    pub staleness: Duration,
    pub metadata_refresh: Duration,
    pub gaps: Gaps,
}

/// Client-level errors reach us through librdkafka's error callback, not through
/// `recv`: the ones that mean the stream cannot be trusted are passed on.
pub(crate) struct Context {
    errors: mpsc::Sender<String>,
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::Fatal) => {
                tracing::warn!(%error, reason, "wal2cache L1: Kafka client error");
                let _ = self.errors.try_send(format!("{error} ({reason})"));
            }
            // Nothing arrives until this is fixed, so the cache stays empty (every read
            // misses): say so where the application's logs are read.
            Some(
                RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::SSL,
            ) => tracing::warn!(
                %error,
                reason,
                "wal2cache L1: the broker refused the connection: check security.protocol, the sasl.* and ssl.* properties; the cache stores nothing until it subscribes"
            ),
            // Transport errors and the like: librdkafka reconnects by itself, the
            // position is kept, and the offset and heartbeat checks catch any loss.
            _ => tracing::debug!(%error, reason, "wal2cache L1: Kafka client error"),
        }
    }
}

impl ConsumerContext for Context {}

pub(crate) type L1Consumer = StreamConsumer<Context>;

pub(crate) fn consumer(s: &Settings) -> Result<(L1Consumer, mpsc::Receiver<String>), KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.brokers)
        // Required by librdkafka's consumer API; never joined (partitions are
        // assigned, not subscribed) and nothing is committed under it.
        .set("group.id", "wal2cache-l1")
        .set("client.id", "wal2cache-l1")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A position the broker no longer has is an error (the cache resets), never
        // a silent jump.
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "false")
        // Apache Kafka answers a waiting fetch as soon as a record arrives, so this
        // only sets how often an idle consumer asks again. Brokers that poll instead
        // (Tansu answers after the whole wait) add up to this much to every eviction:
        // 10 ms keeps commit-to-eviction p99 under 25 ms there too.
        .set("fetch.wait.max.ms", "10")
        .set("reconnect.backoff.max.ms", "1000");
    for (k, v) in &s.properties {
        c.set(k, v);
    }
    let (tx, rx) = mpsc::channel(16);
    let consumer = c.create_with_context(Context { errors: tx })?;
    Ok((consumer, rx))
}

/// Why the partitions of the topic could not be listed.
enum Lookup {
    /// The broker answered: the topic is not there (or has no partitions).
    Missing(String),
    /// No answer: says nothing about the topic.
    Failed(String),
}

impl Lookup {
    fn message(self) -> String {
        match self {
            Lookup::Missing(m) | Lookup::Failed(m) => m,
        }
    }
}

/// The partitions of `topic`.
async fn partitions(consumer: &Arc<L1Consumer>, topic: &str) -> Result<Vec<i32>, Lookup> {
    let c = consumer.clone();
    let t = topic.to_string();
    let md =
        tokio::task::spawn_blocking(move || c.fetch_metadata(Some(&t), Duration::from_secs(5)))
            .await
            .map_err(|e| Lookup::Failed(format!("metadata task: {e}")))?
            .map_err(|e| {
                Lookup::Failed(format!("cannot fetch the metadata of topic {topic:?}: {e}"))
            })?;
    let Some(t) = md.topics().first() else {
        return Err(Lookup::Missing(format!(
            "topic {topic:?} is not in the metadata"
        )));
    };
    if let Some(e) = t.error() {
        return Err(Lookup::Missing(format!(
            "topic {topic:?}: {}",
            RDKafkaErrorCode::from(e)
        )));
    }
    if t.partitions().is_empty() {
        return Err(Lookup::Missing(format!(
            "topic {topic:?} has no partitions"
        )));
    }
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// Assigns every partition of the topic, each at its end.
async fn assign(consumer: &Arc<L1Consumer>, topic: &str) -> Result<Vec<i32>, String> {
    let ids = partitions(consumer, topic).await.map_err(Lookup::message)?;
    let mut tpl = TopicPartitionList::new();
    for p in &ids {
        tpl.add_partition_offset(topic, *p, Offset::End)
            .map_err(|e| format!("partition {p}: {e}"))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| format!("cannot assign the partitions of {topic:?}: {e}"))?;
    tracing::debug!(topic, partitions = ids.len(), "wal2cache L1: assigned");
    Ok(ids)
}

fn parse(payload: Option<&[u8]>) -> Result<Event, String> {
    let bytes = payload.ok_or("no payload")?;
    let e: Event = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if e.schema != SCHEMA {
        return Err(format!(
            "schema {} (this version reads schema {SCHEMA})",
            e.schema
        ));
    }
    Ok(e)
}

/// `now - commit_time`, zero when the clocks disagree the other way.
fn lag(e: &Event) -> Option<Duration> {
    let t = chrono::DateTime::parse_from_rfc3339(e.commit_time.as_deref()?).ok()?;
    let lag = chrono::Utc::now().signed_duration_since(t);
    Some(lag.to_std().unwrap_or(Duration::ZERO))
}

pub(crate) async fn run<V: Clone + Send + Sync + 'static>(
    core: Arc<Core<V>>,
    consumer: L1Consumer,
    mut errors: mpsc::Receiver<String>,
    s: Settings,
    mut stop: watch::Receiver<()>,
) {
    let consumer = Arc::new(consumer);
    let bound = s.staleness;
    let tick_every = (bound / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut backoff = Duration::from_millis(100);
    loop {
        let assigned = tokio::select! {
            r = assign(&consumer, &s.topic) => r,
            _ = stop.changed() => return,
        };
        let mut parts = match assigned {
            Ok(ids) => Partitions::new(ids, Instant::now()),
            Err(e) => {
                bump(&core.counters.consumer_errors);
                core.set_unhealthy(&e).await;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Errors reported before this assignment were about the previous one.
        while errors.try_recv().is_ok() {}
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_metadata = Instant::now() + s.metadata_refresh;
        let mut metadata: Option<JoinHandle<Result<Vec<i32>, Lookup>>> = None;

        let trouble: String = loop {
            tokio::select! {
                _ = stop.changed() => return,
                Some(e) = errors.recv() => {
                    bump(&core.counters.consumer_errors);
                    break format!("Kafka client error: {e}");
                }
                m = consumer.recv() => {
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            bump(&core.counters.consumer_errors);
                            break format!("consumer error: {e}");
                        }
                    };
                    let (partition, offset) = (m.partition(), m.offset());
                    let event = parse(m.payload());
                    drop(m);
                    match parts.observe(partition, offset) {
                        Seen::InOrder => {}
                        Seen::Skipped { expected, got } => {
                            bump(&core.counters.offset_gaps);
                            if s.gaps == Gaps::Strict {
                                break format!("gap in partition {partition}: offset {got} after {}", expected - 1);
                            }
                            tracing::debug!(partition, expected, got, "wal2cache L1: offsets skipped (tolerated)");
                        }
                        Seen::Backwards { expected, got } => {
                            bump(&core.counters.offset_gaps);
                            break format!("partition {partition} went back from offset {} to {got}: the log was replaced", expected - 1);
                        }
                        Seen::Unassigned => {
                            tracing::debug!(partition, offset, "wal2cache L1: message from a partition not assigned");
                            continue;
                        }
                    }
                    match event {
                        Ok(e) => apply(&core, &e, partition, &mut parts, bound).await,
                        Err(why) => {
                            bump(&core.counters.malformed);
                            let n = core.counters.malformed.load(std::sync::atomic::Ordering::Relaxed);
                            if n <= 100 || n.is_multiple_of(1000) {
                                tracing::warn!(topic = %s.topic, partition, offset, malformed = n, "wal2cache L1: skipped a message that is not a schema-1 event: {why}");
                            }
                        }
                    }
                }
                r = async { metadata.as_mut().expect("guarded").await }, if metadata.is_some() => {
                    metadata = None;
                    match r {
                        Ok(Ok(ids)) if ids.len() != parts.len() => {
                            break format!("topic {:?} has {} partitions now, {} assigned", s.topic, ids.len(), parts.len());
                        }
                        Ok(Err(Lookup::Missing(e))) => break format!("partitions lost: {e}"),
                        // A metadata request that failed says nothing about the stream.
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    if let Some((p, quiet)) = parts.silent(now, bound) {
                        break format!("no heartbeat on partition {p} for {} ms (staleness bound {} ms)", quiet.as_millis(), bound.as_millis());
                    }
                    if metadata.is_none() && now >= next_metadata {
                        next_metadata = now + s.metadata_refresh;
                        let (c, t) = (consumer.clone(), s.topic.clone());
                        metadata = Some(tokio::spawn(async move { partitions(&c, &t).await }));
                    }
                    export(&core.metrics());
                }
            }
        };
        // Stop fetching at once: the partitions are assigned again only once the
        // metadata shows the topic. (Fetching a topic the broker no longer knows is
        // worse than useless: Tansu answers it with a zero topic id and a leader
        // tag, on which librdkafka 2.12 crashes.)
        if let Err(e) = consumer.unassign() {
            tracing::debug!(error = %e, "wal2cache L1: unassign");
        }
        core.set_unhealthy(&trouble).await;
        export(&core.metrics());
    }
}

async fn apply<V: Clone + Send + Sync + 'static>(
    core: &Core<V>,
    e: &Event,
    partition: i32,
    parts: &mut Partitions,
    bound: Duration,
) {
    bump(&core.counters.events);
    if let Some(lag) = lag(e) {
        core.counters.set_lag(lag);
    }
    match e.kind {
        Kind::Invalidate => {
            let evicted = core.invalidate_keys(&e.keys).await + core.invalidate_tags(&e.tags).await;
            core.notify(&Notice::Invalidated { event: e, evicted });
        }
        Kind::FlushAll => {
            let evicted = core.flush().await;
            bump(&core.counters.flushes);
            tracing::info!(
                reason = e.reason.as_deref().unwrap_or(""),
                "wal2cache L1: flush_all"
            );
            core.notify(&Notice::Flushed { event: e, evicted });
        }
        Kind::Heartbeat => {
            let now = Instant::now();
            bump(&core.counters.heartbeats);
            core.counters.heartbeat_at(now);
            parts.heartbeat(partition, now);
            if !core.is_healthy() && parts.all_heard(now, bound) {
                core.set_healthy();
            }
        }
        Kind::Unknown => bump(&core.counters.unknown_kinds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_malformed() {
        assert!(parse(None).is_err());
        assert!(parse(Some(b"not json")).is_err());
        assert!(
            parse(Some(br#"{"kind":"invalidate"}"#)).is_err(),
            "no schema"
        );
        assert!(parse(Some(br#"{"schema":2,"kind":"invalidate","source":"x"}"#)).is_err());
        assert!(parse(Some(
            br#"{"schema":1,"kind":"invalidate","source":"x","keys":"k"}"#
        ))
        .is_err());
        let e = parse(Some(
            br#"{"schema":1,"kind":"later","source":"x","new_field":[1,2]}"#,
        ))
        .unwrap();
        assert_eq!(e.kind, Kind::Unknown);
    }

    #[test]
    fn lag_from_commit_time() {
        let mut e = Event::new(Kind::Heartbeat, "x");
        assert_eq!(lag(&e), None);
        let t = chrono::Utc::now() - chrono::Duration::milliseconds(1500);
        e.commit_time = Some(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string());
        let l = lag(&e).unwrap();
        assert!(
            l >= Duration::from_millis(1500) && l < Duration::from_secs(5),
            "{l:?}"
        );
        e.commit_time = Some("2999-01-01T00:00:00Z".into());
        assert_eq!(lag(&e), Some(Duration::ZERO));
    }
}
