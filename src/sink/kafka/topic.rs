//! The topic: making sure it exists (creating it when missing), and the heartbeat
//! task, which writes a heartbeat on every partition every second and notices a topic
//! that disappeared, creating it again and telling subscribers to flush.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use tokio::sync::watch;

use crate::config::KafkaConfig;
use crate::event::{Event, Kind};
use crate::lsn::Lsn;
use crate::pgtime::format_pg_time;
use crate::sink::kafka::acks::{send_all, send_detached};
use crate::sink::kafka::{client_config, fatal, new_producer, retire, LogContext, SinkProducer};
use crate::sink::{Position, SinkError, SinkErrorKind};

/// How often the heartbeat task checks that the topic exists. Some brokers (Tansu
/// 0.6.0) acknowledge writes to a topic that was deleted, so a lost topic does not
/// always show as a delivery error.
const TOPIC_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Tells subscribers that events may have been lost with the topic: a `flush_all`
/// (reason `topic_lost`) on every partition of the topic created again, sent until the
/// broker acknowledged it (a new topic may refuse writes for a moment). Runs as a task
/// of its own.
pub(super) async fn announce_topic_lost(
    producers: Arc<watch::Sender<SinkProducer>>,
    topic: String,
    source: String,
    partitions: i32,
    confirmed: Lsn,
) {
    const ATTEMPTS: u32 = 20;
    let detail = format!(
        "the topic {topic:?} had disappeared (deleted, or the broker lost its state) and was created again: events published before may not have reached subscribers"
    );
    let payload = flush_all_event(&source, confirmed, "topic_lost", &detail);
    for partition in 0..partitions {
        for attempt in 1..=ATTEMPTS {
            let producer = producers.borrow().clone();
            match send_flush_all(&producer, &topic, &payload, partition).await {
                Ok(()) => break,
                Err(e) if attempt < ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "the flush_all for the lost topic is not delivered yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, partition, "the flush_all for the lost topic was not delivered; subscribers notice the loss by themselves (no heartbeats, lost partitions)")
                }
            }
        }
    }
}

/// A `flush_all` event's JSON.
pub(super) fn flush_all_event(source: &str, lsn: Lsn, reason: &str, detail: &str) -> String {
    let mut e = Event::new(Kind::FlushAll, source);
    e.lsn = Some(lsn.to_string());
    e.commit_time = Some(now());
    e.reason = Some(reason.into());
    e.detail = Some(detail.into());
    e.to_json()
}

/// Sends one `flush_all` to one partition and waits for the broker's acknowledgement.
pub(super) async fn send_flush_all(
    producer: &SinkProducer,
    topic: &str,
    payload: &str,
    partition: i32,
) -> Result<(), rdkafka::error::KafkaError> {
    let record = (&b"wal2cache"[..], payload.as_bytes(), Some(partition));
    send_all(producer, topic, &[record])
        .await
        .map_err(|(_, e)| e)
}

/// Runs a blocking librdkafka call on a thread of its own, not on the runtime's
/// blocking pool: the runtime waits for its blocking tasks when it shuts down, and a
/// metadata request to an unreachable broker must not hold the exit after SIGTERM.
pub(super) fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::sync::oneshot::Receiver<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// Now, as an event's `commit_time`.
fn now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// The topic's partition count, and whether it had to be created.
pub(super) async fn ensure_topic(
    config: &KafkaConfig,
    context: &LogContext,
    producer: &SinkProducer,
    wait: Duration,
) -> Result<(i32, bool), SinkError> {
    let topic_name = config.topic.clone();
    let partitions = move |producer: &SinkProducer| -> Result<Option<i32>, KafkaError> {
        let md = producer.client().fetch_metadata(Some(&topic_name), wait)?;
        Ok(md.topics().first().and_then(|t| match t.error() {
            None if !t.partitions().is_empty() => Some(t.partitions().len() as i32),
            _ => None,
        }))
    };
    let p = producer.clone();
    let found = off_runtime(move || partitions(&p))
        .await
        .map_err(|_| fatal(config, "metadata thread", KafkaError::Canceled))?
        // A refusal is retried too (a rotated secret or certificate may be fixed while
        // Postgres keeps the WAL), but its message says which setting to look at.
        .map_err(|e| match context.refusal() {
            Some(refusal) => {
                SinkError::kafka(refusal.explain(&config.brokers), Some(e), SinkErrorKind::Retry)
            }
            None => {
                let last = context
                    .last_error()
                    .map_or(String::new(), |reason| format!(" (last connection error: {reason})"));
                let message = format!(
                    "cannot reach the Kafka brokers: check kafka.brokers ({}, topic {:?}), and security.protocol in [kafka.properties] when the listener wants TLS or SASL: {e}{last}",
                    config.brokers, config.topic
                );
                SinkError::kafka(message, Some(e), SinkErrorKind::Retry)
            }
        })?;
    if let Some(n) = found {
        return Ok((n, false));
    }
    let admin: AdminClient<LogContext> = client_config(config)
        .and_then(|c| c.create_with_context(context.clone()))
        .map_err(|e| fatal(config, "cannot create the admin client", e))?;
    let topic = NewTopic::new(
        &config.topic,
        config.partitions,
        TopicReplication::Fixed(config.replication_factor),
    );
    let results = admin
        .create_topics([&topic], &AdminOptions::new().request_timeout(Some(wait)))
        .await
        .map_err(|e| fatal(config, "cannot create the topic", e))?;
    let mut created = false;
    for r in results {
        match r {
            Ok(_) => {
                created = true;
                tracing::info!(topic = %config.topic, partitions = config.partitions, "created topic")
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(fatal(
                    config,
                    "cannot create the topic: create it yourself, or grant CREATE on it to wal2cache's principal",
                    KafkaError::AdminOp(code),
                ))
            }
        }
    }
    Ok((config.partitions, created))
}

/// What the heartbeat task needs to check the topic and replace the producer.
pub(super) struct TopicWatch {
    pub(super) config: KafkaConfig,
    pub(super) context: LogContext,
    pub(super) producers: Arc<watch::Sender<SinkProducer>>,
}

/// Heartbeats every second on every partition; every `TOPIC_CHECK_EVERY`, a check that
/// the topic exists, creating it again (with a new producer and a `flush_all` for the
/// subscribers) when it is gone.
pub(super) async fn heartbeats(
    watch: TopicWatch,
    source: String,
    mut partitions: i32,
    position: watch::Receiver<Position>,
    [mut stop, mut closed]: [watch::Receiver<bool>; 2],
) {
    let topic = watch.config.topic.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_check = tokio::time::Instant::now();
    let mut check: Option<tokio::task::JoinHandle<Result<(i32, bool), SinkError>>> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
            _ = closed.wait_for(|s| *s) => return,
        }
        let p = *position.borrow();
        if check.as_ref().is_some_and(|c| c.is_finished()) {
            let done = check.take().expect("checked").await;
            if let Ok(Ok((n, true))) = done {
                // A new topic: the old producer's id and sequence numbers mean nothing
                // to it (the broker fences it).
                match new_producer(&watch.config, &watch.context) {
                    Ok(producer) => {
                        retire(watch.producers.send_replace(producer));
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot create a new Kafka producer yet"),
                }
                partitions = n;
                tokio::spawn(announce_topic_lost(
                    watch.producers.clone(),
                    topic.clone(),
                    source.clone(),
                    partitions,
                    p.confirmed,
                ));
                tracing::warn!(topic = %topic, "the topic had disappeared (deleted, or the broker lost its state) and was created again, with a new producer; subscribers are told to flush (reason \"topic_lost\")");
            }
        }
        if check.is_none() && last_check.elapsed() >= TOPIC_CHECK_EVERY {
            last_check = tokio::time::Instant::now();
            let (config, context) = (watch.config.clone(), watch.context.clone());
            let producer = watch.producers.borrow().clone();
            // Unreachable brokers show in the sink's retries; only a topic that is
            // known to be missing is created here.
            check = Some(tokio::spawn(async move {
                ensure_topic(&config, &context, &producer, Duration::from_secs(5)).await
            }));
        }
        let mut e = Event::new(Kind::Heartbeat, source.clone());
        e.lsn = Some(p.confirmed.to_string());
        e.commit_time = Some(match (p.busy, p.applied_commit_time) {
            (true, Some(t)) => format_pg_time(t),
            _ => now(),
        });
        let payload = e.to_json();
        let producer = watch.producers.borrow().clone();
        let records = (0..partitions).map(|p| (&b"heartbeat"[..], payload.as_bytes(), Some(p)));
        if let Err(e) = send_detached(&producer, &topic, records) {
            tracing::debug!(error = %e, "heartbeat not queued");
        }
    }
}
