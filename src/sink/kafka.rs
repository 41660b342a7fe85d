//! The Kafka sink: one schema-1 event per planned change, through librdkafka's
//! idempotent producer; a batch is done when the broker acknowledged every event of it.
//! Heartbeats go to every partition every second, so a subscriber can tell a quiet
//! stream from a dead one and measure its lag.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::KafkaConfig;
use crate::event::{Event, Kind};
use crate::lsn::Lsn;
use crate::sink::{Batch, Item, SinkError};
use crate::source::format_pg_time;

pub struct KafkaSink {
    config: KafkaConfig,
    producer: FutureProducer,
    /// Hands a replaced producer to the heartbeats.
    producers: watch::Sender<FutureProducer>,
    topic: String,
    source: String,
    backoff: Backoff,
    stop: watch::Receiver<bool>,
}

/// Where the pipeline is, for heartbeats.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Last LSN confirmed to Postgres.
    pub confirmed: Lsn,
    /// Commit time (Postgres micros) of the newest applied transaction.
    pub applied_commit_time: Option<i64>,
    /// Work is in flight: the stream is behind.
    pub busy: bool,
}

fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        // Measured (benches/latency.rs at 2,000 txn/s): linger 1 ms made batches wait
        // for each other, p50 7.5 ms; 0 gives p50 0.5-0.9 ms at the same catch-up rate.
        .set("linger.ms", "0")
        .set("client.id", "wal2cache");
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

fn fatal(config: &KafkaConfig, what: &str, e: impl std::fmt::Display) -> SinkError {
    SinkError::Kafka(format!(
        "{what} ({}, topic {:?}): {e}",
        config.brokers, config.topic
    ))
}

/// Is retrying this delivery error pointless?
fn is_poison(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
        )
    )
}

/// The topic's partition count, creating the topic when missing.
async fn ensure_topic(config: &KafkaConfig, producer: &FutureProducer) -> Result<i32, SinkError> {
    let topic_name = config.topic.clone();
    let partitions = move |producer: &FutureProducer| -> Result<Option<i32>, KafkaError> {
        let md = producer
            .client()
            .fetch_metadata(Some(&topic_name), Duration::from_secs(10))?;
        Ok(md.topics().first().and_then(|t| match t.error() {
            None if !t.partitions().is_empty() => Some(t.partitions().len() as i32),
            _ => None,
        }))
    };
    let p = producer.clone();
    let found = tokio::task::spawn_blocking(move || partitions(&p))
        .await
        .map_err(|e| fatal(config, "metadata task", e))?
        .map_err(|e| {
            fatal(
                config,
                "cannot reach the Kafka brokers: check kafka.brokers",
                e,
            )
        })?;
    if let Some(n) = found {
        return Ok(n);
    }
    let admin: AdminClient<DefaultClientContext> = client_config(config)
        .create()
        .map_err(|e| fatal(config, "cannot create the admin client", e))?;
    let topic = NewTopic::new(
        &config.topic,
        config.partitions,
        TopicReplication::Fixed(config.replication_factor),
    );
    let results = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| fatal(config, "cannot create the topic", e))?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(topic = %config.topic, partitions = config.partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(fatal(
                    config,
                    "cannot create the topic: create it yourself, or grant CREATE on it to wal2cache's principal",
                    code,
                ))
            }
        }
    }
    Ok(config.partitions)
}

impl KafkaSink {
    /// Connects, checks the brokers are reachable and the topic exists (creating it
    /// when missing), and starts the heartbeats.
    pub async fn connect(
        config: &KafkaConfig,
        source: &str,
        progress: watch::Receiver<Progress>,
        stop: watch::Receiver<bool>,
    ) -> Result<KafkaSink, SinkError> {
        let producer: FutureProducer = client_config(config).create().map_err(|e| {
            fatal(
                config,
                "invalid Kafka configuration (check kafka.properties)",
                e,
            )
        })?;
        let partitions = ensure_topic(config, &producer).await?;
        let (producers, producer_rx) = watch::channel(producer.clone());
        tokio::spawn(heartbeats(
            producer_rx,
            config.topic.clone(),
            source.to_string(),
            partitions,
            progress,
            stop.clone(),
        ));
        Ok(KafkaSink {
            config: config.clone(),
            producer,
            producers,
            topic: config.topic.clone(),
            source: source.to_string(),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            stop,
        })
    }

    /// One attempt: enqueue every event, then wait for every acknowledgement.
    async fn try_apply(&self, events: &[(String, String)]) -> Result<(), KafkaError> {
        let mut deliveries: Vec<DeliveryFuture> = Vec::with_capacity(events.len());
        for (key, payload) in events {
            loop {
                match self
                    .producer
                    .send_result(FutureRecord::to(&self.topic).key(key).payload(payload))
                {
                    Ok(d) => {
                        deliveries.push(d);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e),
                Err(_) => return Err(KafkaError::Canceled),
            }
        }
        Ok(())
    }

    /// Publishes a batch's events, retrying transient errors until the broker has
    /// acknowledged them all or the sink is stopped. Events of a failed attempt may be
    /// published twice: subscribers handle every event idempotently.
    pub async fn apply(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.items.is_empty() {
            return Ok(());
        }
        let events: Vec<(String, String)> = batch
            .items
            .iter()
            .map(|i| event_for(&self.source, i))
            .collect();
        loop {
            let error = match self.try_apply(&events).await {
                Ok(()) => {
                    self.backoff.reset();
                    return Ok(());
                }
                Err(e) => e,
            };
            if is_poison(&error) {
                return Err(SinkError::Kafka(format!(
                    "the broker refused events for topic {:?}: {error}; fix the topic or its permissions, then restart",
                    self.topic
                )));
            }
            if let Some(fatal) = self.producer.client().fatal_error() {
                // An idempotent producer that hit a fatal error (e.g. the broker lost its
                // state and no longer knows the producer id) is unusable: replace it.
                // Events of the failed attempt are sent again; subscribers are idempotent.
                match client_config(&self.config).create::<FutureProducer>() {
                    Ok(p) => {
                        tracing::warn!(error = ?fatal, "the Kafka producer hit a fatal error; replaced it with a new one");
                        self.producer = p.clone();
                        let _ = self.producers.send(p);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot create a new Kafka producer yet"),
                }
            }
            if matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition)
            ) {
                // The topic is gone (deleted, or a broker without persistence restarted):
                // create it again, as at start.
                match ensure_topic(&self.config, &self.producer).await {
                    Ok(_) => {
                        tracing::warn!(topic = %self.topic, "the topic had disappeared and was created again")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the topic is missing and cannot be created yet")
                    }
                }
            }
            let delay = self.backoff.next_delay();
            metrics::counter!("wal2cache_sink_retries_total", "sink" => "kafka").increment(1);
            tracing::warn!(error = %error, attempt = self.backoff.attempts(), retry_in = ?delay, "Kafka failed; retrying the batch");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.wait_for(|s| *s) => return Err(SinkError::Stopped),
            }
        }
    }
}

/// The message key and the JSON event for an item.
pub fn event_for(source: &str, item: &Item) -> (String, String) {
    let plan = &item.plan;
    let o = &item.origin;
    let mut e = Event::new(
        if plan.flush_all {
            Kind::FlushAll
        } else {
            Kind::Invalidate
        },
        source,
    );
    e.lsn = Some(o.version.commit_lsn.to_string());
    e.xid = Some(o.xid);
    e.commit_time = Some(format_pg_time(o.commit_time));
    e.table = o.table.clone();
    e.op = Some(o.op.to_string());
    if plan.flush_all {
        e.reason = Some("truncate".into());
    }
    e.keys = plan.delete.clone();
    for r in &plan.republish {
        if !e.keys.contains(&r.key) {
            e.keys.push(r.key.clone());
        }
    }
    e.tags = plan.purge_tags.clone();
    let key = e
        .keys
        .first()
        .cloned()
        .or_else(|| o.table.clone())
        .unwrap_or_else(|| "wal2cache".into());
    (key, e.to_json())
}

async fn heartbeats(
    producers: watch::Receiver<FutureProducer>,
    topic: String,
    source: String,
    partitions: i32,
    progress: watch::Receiver<Progress>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let p = *progress.borrow();
        let mut e = Event::new(Kind::Heartbeat, source.clone());
        e.lsn = Some(p.confirmed.to_string());
        e.commit_time = Some(match (p.busy, p.applied_commit_time) {
            (true, Some(t)) => format_pg_time(t),
            _ => chrono::Utc::now()
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string(),
        });
        let payload = e.to_json();
        let producer = producers.borrow().clone();
        for partition in 0..partitions {
            let record = FutureRecord::to(&topic)
                .key("heartbeat")
                .payload(&payload)
                .partition(partition);
            if let Err((e, _)) = producer.send_result(record) {
                tracing::debug!(error = %e, "heartbeat not queued");
            }
        }
    }
}
