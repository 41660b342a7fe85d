//! The Kafka sink: one schema-1 event per planned change, through librdkafka's
//! idempotent producer; a batch is done when the broker acknowledged every event of it.
//! Heartbeats go to every partition every second, so a subscriber can tell a quiet
//! stream from a dead one and measure its lag. Events are fitted to the broker's size
//! limit by `sink::fit`. librdkafka's own log lines go through `LogContext`, which
//! keeps repeats quiet.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{Producer, ProducerContext};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::KafkaConfig;
use crate::lsn::Lsn;
use crate::sink::cut;
use crate::sink::fit::{events_into, refused, EventLimits, Fitted, Outgoing};
use crate::sink::retry::{Repeats, WARN_EVERY};
use crate::sink::{describe, Batch, Position, RetryLog, Sink, SinkError, SinkErrorKind};

mod acks;
mod poller;
mod topic;

pub use acks::SinkProducer;
use acks::{send_all, Acks, Record};
use topic::{
    announce_topic_lost, ensure_topic, flush_all_event, heartbeats, off_runtime, send_flush_all,
    TopicWatch,
};

/// librdkafka's log lines and errors as tracing events, each distinct message at most
/// once per `WARN_EVERY` with the count of repeats kept quiet (with a broker down it
/// prints the same connection error many times a second, once as a log line and once
/// as an error).
#[derive(Clone)]
pub struct LogContext {
    repeats: Arc<Repeats>,
    /// The last time the brokers refused us (TLS or SASL), with librdkafka's reason.
    refused: Arc<std::sync::Mutex<Option<(std::time::Instant, Refusal)>>>,
    /// The last error librdkafka reported, of any kind, and when.
    last_error: Arc<std::sync::Mutex<Option<(std::time::Instant, String)>>>,
    /// Whether librdkafka said every broker is down, and whom to tell.
    outage: Arc<Outage>,
}

/// All brokers down, as librdkafka reports it (at once, while a batch would wait for
/// its delivery timeout before failing): the sink is reported failing then, and well
/// again at the next delivery.
#[derive(Default)]
struct Outage {
    down: std::sync::atomic::AtomicBool,
    health: std::sync::OnceLock<crate::health::SinkHealth>,
}

impl Default for LogContext {
    fn default() -> Self {
        LogContext {
            repeats: Arc::new(Repeats::new(WARN_EVERY)),
            refused: Arc::default(),
            last_error: Arc::default(),
            outage: Arc::default(),
        }
    }
}

/// What `slot` holds, when it was put there less than a minute ago: older news says
/// nothing about why a request fails now.
fn recent<T: Clone>(slot: &std::sync::Mutex<Option<(std::time::Instant, T)>>) -> Option<T> {
    let (at, value) = slot.lock().ok()?.clone()?;
    (at.elapsed() < Duration::from_secs(60)).then_some(value)
}

/// The brokers answered, but refused the connection: retrying does not help until a
/// setting is changed.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Refusal {
    Tls(String),
    Sasl(String),
}

impl Refusal {
    fn of(code: RDKafkaErrorCode, reason: &str) -> Option<Refusal> {
        match code {
            RDKafkaErrorCode::SSL => Some(Refusal::Tls(reason.to_string())),
            RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => {
                Some(Refusal::Sasl(reason.to_string()))
            }
            _ => None,
        }
    }

    /// What to do about it, for the operator.
    pub(super) fn explain(&self, brokers: &str) -> String {
        match self {
            Refusal::Tls(reason) => format!(
                "the TLS handshake with the Kafka brokers ({brokers}) failed: {reason}: check in [kafka.properties] ssl.ca.location (the CA that signed the brokers' certificate), ssl.endpoint.identification.algorithm (the brokers' names must match their certificate), ssl.certificate.location and ssl.key.location when the brokers want a client certificate, and security.protocol (SSL or SASL_SSL, as the listener expects)"
            ),
            Refusal::Sasl(reason) => format!(
                "the Kafka brokers ({brokers}) refused wal2cache's SASL login: {reason}: check in [kafka.properties] sasl.mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, as the listener expects) and sasl.username, and the password in kafka.sasl_password_file (or sasl.password)"
            ),
        }
    }
}

impl LogContext {
    /// The refusal seen in the last minute, if any.
    pub(super) fn refusal(&self) -> Option<Refusal> {
        recent(&self.refused)
    }

    fn note_error(&self, reason: &str) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some((std::time::Instant::now(), reason.to_string()));
        }
    }

    /// The error librdkafka reported last, in the last minute.
    pub(super) fn last_error(&self) -> Option<String> {
        recent(&self.last_error)
    }

    /// Every broker is down: the sink is failing, with the error before (why).
    fn brokers_down(&self) {
        if self
            .outage
            .down
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        if let Some(health) = self.outage.health.get() {
            let why = self
                .last_error()
                .unwrap_or_else(|| "no reason given".into());
            health.failing(&cut(
                &format!("all brokers are down (librdkafka retries; last error: {why})"),
                500,
            ));
        }
    }

    /// A message was delivered: a broker is up again.
    fn delivered(&self) {
        // A load first: no read-modify-write on every delivery while all is well.
        if self.outage.down.load(std::sync::atomic::Ordering::Acquire)
            && self
                .outage
                .down
                .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            if let Some(health) = self.outage.health.get() {
                health.ok();
            }
        }
    }
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        // Why a broker connection failed ("Disconnected: connection reset by peer (after
        // 3ms in state APIVERSION_QUERY)"), whatever level it is logged at.
        if fac == "FAIL" {
            self.note_error(log_message);
        }
        let Some(suppressed) = self.repeats.allow(log_message) else {
            return;
        };
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(target: "librdkafka", facility = fac, suppressed, "{log_message}")
            }
            // Broker connections failing are retried: wal2cache says at WARN and then
            // ERROR what it does about them.
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, suppressed, "{log_message}")
            }
            RDKafkaLogLevel::Notice => {
                tracing::info!(target: "librdkafka", facility = fac, suppressed, "{log_message}")
            }
            RDKafkaLogLevel::Info | RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, suppressed, "{log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(refusal) = error
            .rdkafka_error_code()
            .and_then(|code| Refusal::of(code, reason))
        {
            if let Ok(mut last) = self.refused.lock() {
                *last = Some((std::time::Instant::now(), refusal));
            }
        }
        // "1/1 brokers are down" says less than the failure before it.
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.brokers_down();
        } else {
            self.note_error(reason);
        }
        // Most errors are logged as well, with the same text: counted once.
        let Some(suppressed) = self.repeats.allow(reason) else {
            return;
        };
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            tracing::error!(target: "librdkafka", %error, suppressed, "{reason}");
        } else {
            tracing::warn!(target: "librdkafka", %error, suppressed, "{reason}");
        }
    }
}

impl ProducerContext for LogContext {
    type DeliveryOpaque = Arc<Acks>;

    fn delivery(&self, result: &DeliveryResult<'_>, acks: Arc<Acks>) {
        if result.is_ok() {
            self.delivered();
        }
        Acks::report(acks, result);
    }
}

pub struct KafkaSink {
    config: KafkaConfig,
    context: LogContext,
    /// The producer in use, shared with the heartbeats: either may replace it.
    producers: Arc<watch::Sender<SinkProducer>>,
    topic: String,
    source: String,
    limits: EventLimits,
    backoff: Backoff,
    retries: RetryLog,
    /// Keeps the WARN about oversized events to one line per rule and interval.
    oversized: Repeats,
    stop: watch::Receiver<bool>,
    /// The topic's partitions, as last found.
    partitions: i32,
    /// The heartbeat task, stopped and joined on `close` (or stopped with the
    /// pipeline's stop signal).
    heartbeats: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

/// librdkafka's settings: ours, then `kafka.properties`, then the password from
/// `kafka.sasl_password_file` (read again each time, so a rotated secret is used by the
/// next producer).
pub(super) fn client_config(config: &KafkaConfig) -> Result<ClientConfig, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        // Measured at 1,000 TPC-B transactions/s (benches/app_latency.rs, the broker on
        // the same 2-core host): with linger 0 every live transaction was a produce
        // request of its own, the broker took 66% of a core and an application's
        // commit -> Redis p99 was 12 ms (L1 p99 323 ms); with 2 ms the broker took
        // 54%, Redis p99 5.5 ms, L1 p99 67 ms, for commit -> Kafka p50 0.9 -> 4.9 ms
        // (benches/latency.rs, 2,000/s; p99 8 ms). Redis does not wait for the broker.
        .set("linger.ms", "2")
        .set("client.id", "wal2cache");
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    if compress_by_default(config) {
        c.set("compression.type", "lz4");
    }
    if let Some(file) = &config.sasl_password_file {
        let password = crate::secret::read_secret_file("kafka.sasl_password_file", file)
            .map_err(KafkaError::ClientCreation)?;
        c.set("sasl.password", password);
    }
    Ok(c)
}

/// Over TLS (`security.protocol` ssl or sasl_ssl) the producer compresses with lz4
/// unless `kafka.properties` names a codec. librdkafka writes a produce request over
/// TLS with one `SSL_write`, so one TLS record and one `write()`, per segment of its
/// buffer, and the first few dozen events of every request go in segments of their
/// own (a header, then the payload): measured on the tag-heavy catch-up (200,000
/// changes, Kafka SSL through stunnel), 39,587 writes where plain TCP made 864
/// `sendmsg` calls, and the TLS terminator in front of the broker spent 3.5 µs a change
/// opening those records. A compressed batch is one buffer: 486 writes for 20,000
/// changes, the terminator 0.8 µs a change, the daemon 0.5-1.5 µs a change less
/// (the compression included). Over plain TCP every segment already leaves in one
/// `sendmsg`, and lz4 cost the daemon about 0.5 µs a change more, so it stays off.
fn compress_by_default(config: &KafkaConfig) -> bool {
    // Property names are librdkafka's, exact (as `fit` reads `message.max.bytes`); its
    // enum values are not case-sensitive.
    let props = &config.properties;
    let tls = props
        .get("security.protocol")
        .is_some_and(|p| ["ssl", "sasl_ssl"].contains(&p.trim().to_ascii_lowercase().as_str()));
    tls && !props.contains_key("compression.type") && !props.contains_key("compression.codec")
}

pub(super) fn fatal(config: &KafkaConfig, what: &str, e: KafkaError) -> SinkError {
    let message = format!("{what} ({}, topic {:?}): {e}", config.brokers, config.topic);
    SinkError::kafka(message, Some(e), SinkErrorKind::Stop)
}

pub(super) fn new_producer(
    config: &KafkaConfig,
    context: &LogContext,
) -> Result<SinkProducer, KafkaError> {
    client_config(config)?.create_with_context(context.clone())
}

/// Drops a replaced producer off the async threads: dropping one purges its queue and
/// waits up to 500 ms for it.
pub(super) fn retire(old: SinkProducer) {
    off_runtime(move || drop(old));
}

/// Is retrying this delivery error pointless?
fn is_poison(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
        )
    )
}

/// The broker (or librdkafka) refused a message for its size.
fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}

/// The idempotent producer's state is gone on the broker (topic deleted, broker
/// restarted without persistence, another producer with the same id): it cannot send
/// again and must be replaced.
fn is_fenced(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::Fatal
        )
    )
}

/// The topic is known to be gone.
fn is_unknown_topic(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition)
    )
}

impl KafkaSink {
    /// Connects, checks the brokers are reachable and the topic exists (creating it
    /// when missing), and starts the heartbeats.
    pub async fn connect(
        config: &KafkaConfig,
        source: &str,
        position: watch::Receiver<Position>,
        stop: watch::Receiver<bool>,
    ) -> Result<KafkaSink, SinkError> {
        let context = LogContext::default();
        // Once, at start (not again for each producer that replaces a fenced one).
        if compress_by_default(config) {
            tracing::info!(
                brokers = %config.brokers,
                "events are compressed with lz4 over TLS (compression.type is not set): consumers must read lz4 batches; set \"compression.type\" = \"none\" in [kafka.properties] for those that cannot"
            );
        }
        let producer = new_producer(config, &context).map_err(|e| {
            fatal(
                config,
                "invalid Kafka configuration (check kafka.properties)",
                e,
            )
        })?;
        let (partitions, _) =
            ensure_topic(config, &context, &producer, Duration::from_secs(10)).await?;
        let producers = Arc::new(watch::channel(producer).0);
        let (closing, closed) = watch::channel(false);
        let heartbeats = tokio::spawn(heartbeats(
            TopicWatch {
                config: config.clone(),
                context: context.clone(),
                producers: producers.clone(),
            },
            source.to_string(),
            partitions,
            position,
            [stop.clone(), closed],
        ));
        Ok(KafkaSink {
            config: config.clone(),
            context,
            producers,
            topic: config.topic.clone(),
            source: source.to_string(),
            limits: EventLimits::from_config(config),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            retries: RetryLog::new(
                "Kafka",
                "retrying the batch with backoff, checking the topic (and creating it when missing) from the second failed attempt, replacing the producer when the broker fenced it",
                "check that the brokers in kafka.brokers run and are reachable, and that wal2cache may write to the topic; nothing is confirmed meanwhile and Postgres keeps the WAL",
            ),
            oversized: Repeats::new(WARN_EVERY),
            stop,
            partitions,
            heartbeats: Some((closing, heartbeats)),
        })
    }

    /// The producer in use.
    fn producer(&self) -> SinkProducer {
        self.producers.borrow().clone()
    }

    /// One attempt: enqueue every event, then wait for every acknowledgement. An error
    /// comes with the index of the event it is about.
    async fn try_apply(&self, events: &[Outgoing]) -> Result<(), (usize, KafkaError)> {
        let producer = self.producer();
        let records: Vec<Record> = events
            .iter()
            .map(|e| (e.key.as_bytes(), e.payload.as_bytes(), None))
            .collect();
        send_all(&producer, &self.topic, &records).await
    }

    /// A batch's events, each fitted to the limits; what did not fit is counted and
    /// logged.
    fn build(&self, batch: &Batch) -> Vec<Outgoing> {
        let mut events = Vec::with_capacity(batch.items.len());
        for (index, item) in batch.items.iter().enumerate() {
            let fitted = events_into(&self.source, item, index, &self.limits, &mut events);
            let outcome = match &fitted {
                Fitted::Whole => continue,
                Fitted::Split(_) => "split",
                Fitted::FlushAll { .. } => "flush_all",
            };
            metrics::counter!("wal2cache_oversized_events_total", "outcome" => outcome)
                .increment(1);
            let o = &item.origin;
            let table = o.table.as_deref().unwrap_or("(a wal2cache message)");
            let rules = item.plan.rules.join(", ");
            let Some(suppressed) = self.oversized.allow(&format!("{outcome} {table} {rules}"))
            else {
                continue;
            };
            match fitted {
                Fitted::Split(n) => tracing::info!(
                    table, rules = %rules, lsn = %o.version.commit_lsn, events = n, suppressed,
                    "an event over kafka.max_event_bytes ({} bytes) was split into {n} events of the same change",
                    self.limits.max_event_bytes
                ),
                Fitted::FlushAll { largest, preview } => tracing::warn!(
                    table, rules = %rules, lsn = %o.version.commit_lsn, key_bytes = largest, key = %preview, suppressed,
                    "a key or tag too large for a Kafka event (over {} bytes): published a flush_all (reason \"oversized\") instead, so subscribers empty themselves; Redis was invalidated as usual. Shorten the rule's key template (a free-text column makes unbounded keys)",
                    self.limits.max_key_bytes
                ),
                Fitted::Whole => {}
            }
        }
        events
    }

    /// Replaces a producer the broker fenced (or that hit a fatal error) with a new
    /// one, for the batches and the heartbeats.
    fn replace_producer(&mut self, why: &str) {
        match new_producer(&self.config, &self.context) {
            Ok(p) => {
                tracing::warn!(why, "replaced the Kafka producer with a new one (the broker no longer accepts the old one's writes); the failed events are sent again");
                retire(self.producers.send_replace(p));
            }
            Err(e) => tracing::warn!(error = %e, "cannot create a new Kafka producer yet"),
        }
    }

    /// Publishes a batch's events, retrying transient errors until the broker has
    /// acknowledged them all or the sink is stopped. Events of a failed attempt may be
    /// published twice: subscribers handle every event idempotently.
    async fn publish(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.items.is_empty() {
            return Ok(());
        }
        let mut events = self.build(batch);
        let mut failures = 0u32;
        loop {
            let (index, error) = match self.try_apply(&events).await {
                Ok(()) => {
                    self.backoff.reset();
                    self.retries.succeeded();
                    return Ok(());
                }
                Err(e) => e,
            };
            if is_too_large(&error) {
                // The broker's limit is lower than ours: publish that event's small
                // flush_all instead, at once. Only if even that is refused is it fatal.
                let event = &events[index];
                let item = &batch.items[event.item];
                let Some(replacement) =
                    refused(&self.source, event, item, &self.limits, &error.to_string())
                else {
                    let message = format!(
                        "the broker refused even a {} byte flush_all event for topic {:?} ({}): {error}; raise the topic's max.message.bytes (or the broker's message.max.bytes)",
                        event.payload.len(),
                        self.topic,
                        describe(item)
                    );
                    return Err(SinkError::kafka(message, Some(error), SinkErrorKind::Stop));
                };
                metrics::counter!("wal2cache_oversized_events_total", "outcome" => "refused")
                    .increment(1);
                tracing::warn!(
                    table = item.origin.table.as_deref().unwrap_or("(a wal2cache message)"),
                    rules = %item.plan.rules.join(", "),
                    lsn = %item.origin.version.commit_lsn,
                    event_bytes = event.payload.len(),
                    "the broker refused an event as too large: published a flush_all (reason \"oversized\") instead; lower kafka.max_event_bytes below the topic's max.message.bytes"
                );
                events[index] = replacement;
                continue;
            }
            if is_poison(&error) {
                let message = format!(
                    "the broker refused events for topic {:?}: {error}; fix the topic or its permissions, then restart",
                    self.topic
                );
                return Err(SinkError::kafka(message, Some(error), SinkErrorKind::Stop));
            }
            failures += 1;
            let mut summary = error.to_string();
            if let Some(fatal) = self.producer().client().fatal_error() {
                self.replace_producer(&format!("fatal error {fatal:?}"));
            } else if is_fenced(&error) {
                self.replace_producer(&error.to_string());
            }
            // From the second failed attempt, whatever librdkafka said (under load a
            // missing topic shows as timeouts): is the topic there?
            if failures >= 2 || is_unknown_topic(&error) {
                let producer = self.producer();
                match ensure_topic(
                    &self.config,
                    &self.context,
                    &producer,
                    Duration::from_secs(5),
                )
                .await
                {
                    Ok((partitions, true)) => {
                        self.partitions = partitions;
                        tracing::warn!(topic = %self.topic, "the topic had disappeared and was created again; subscribers are told to flush (reason \"topic_lost\")");
                        // A new topic: the old producer's sequence numbers mean nothing
                        // to it.
                        self.replace_producer("the topic was created again");
                        let confirmed = batch
                            .items
                            .first()
                            .map_or(Lsn::ZERO, |i| i.origin.version.commit_lsn);
                        tokio::spawn(announce_topic_lost(
                            self.producers.clone(),
                            self.topic.clone(),
                            self.source.clone(),
                            partitions,
                            confirmed,
                        ));
                    }
                    Ok((_, false)) => {}
                    Err(e) => summary = format!("{summary}; checking the topic: {e}"),
                }
            }
            let delay = self.backoff.next_delay();
            metrics::counter!("wal2cache_sink_retries_total", "sink" => "kafka").increment(1);
            self.retries.failed(&cut(&summary, 500), delay);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.wait_for(|s| *s) => return Err(SinkError::Stopped),
            }
        }
    }
}

impl KafkaSink {
    /// Publishes a `flush_all` with `reason` and `detail` on every partition and waits
    /// until the broker acknowledged each, retrying (with the sink's backoff and log)
    /// until it did or the sink is stopped.
    pub async fn announce_flush_all(
        &mut self,
        reason: &str,
        detail: &str,
        lsn: Lsn,
    ) -> Result<(), SinkError> {
        let payload = flush_all_event(&self.source, lsn, reason, detail);
        for partition in 0..self.partitions {
            loop {
                let producer = self.producers.borrow().clone();
                let e = match send_flush_all(&producer, &self.topic, &payload, partition).await {
                    Ok(()) => break,
                    Err(e) => e,
                };
                if is_poison(&e) {
                    return Err(fatal(&self.config, "the broker refused the flush_all", e));
                }
                let delay = self.backoff.next_delay();
                self.retries.failed(
                    &format!("the flush_all ({reason}) on partition {partition}: {e}"),
                    delay,
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.stop.wait_for(|s| *s) => return Err(SinkError::Stopped),
                }
            }
        }
        self.backoff.reset();
        self.retries.succeeded();
        Ok(())
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn describe(&self) -> String {
        format!("Kafka topic {:?} at {}", self.topic, self.config.brokers)
    }

    async fn apply(&mut self, batch: &Batch) -> Result<(), SinkError> {
        self.publish(batch).await
    }

    fn set_error_after(&mut self, bound: Duration) {
        self.retries.error_after = bound;
    }

    fn set_health(&mut self, health: crate::health::SinkHealth) {
        let _ = self.context.outage.health.set(health.clone());
        self.retries.health = Some(health);
    }

    /// Stops the heartbeat task and waits for it. Every event was acknowledged by the
    /// time `apply` returned.
    async fn close(mut self) {
        if let Some((closing, task)) = self.heartbeats.take() {
            let _ = closing.send(true);
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_properties(properties: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic: "t".into(),
            partitions: 3,
            replication_factor: 1,
            max_event_bytes: 900_000,
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            sasl_password_file: None,
        }
    }

    fn compression(properties: &[(&str, &str)]) -> Option<String> {
        let c = client_config(&with_properties(properties)).unwrap();
        c.get("compression.type").map(str::to_string)
    }

    #[test]
    fn over_tls_events_are_compressed_unless_a_codec_is_chosen() {
        assert_eq!(compression(&[]), None, "plain TCP: no compression");
        assert_eq!(compression(&[("security.protocol", "plaintext")]), None);
        assert_eq!(
            compression(&[("security.protocol", "sasl_plaintext")]),
            None
        );
        assert_eq!(
            compression(&[("security.protocol", "SSL")]).as_deref(),
            Some("lz4")
        );
        assert_eq!(
            compression(&[("security.protocol", "sasl_ssl")]).as_deref(),
            Some("lz4")
        );
        let chosen = [("security.protocol", "ssl"), ("compression.type", "none")];
        assert_eq!(compression(&chosen).as_deref(), Some("none"));
        let chosen = [("security.protocol", "ssl"), ("compression.codec", "zstd")];
        assert_eq!(
            compression(&chosen),
            None,
            "the codec's alias is left as chosen"
        );
    }

    #[test]
    fn tls_and_sasl_refusals_are_kept_with_their_fix_and_other_errors_are_not() {
        let context = LogContext::default();
        context.error(
            KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "b:9093/bootstrap: Connection refused",
        );
        assert_eq!(context.refusal(), None);
        context.error(
            KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert_eq!(
            context.last_error().as_deref(),
            Some("b:9093/bootstrap: Connection refused")
        );
        context.log(
            RDKafkaLogLevel::Debug,
            "FAIL",
            "b:9093/bootstrap: Disconnected (after 3ms in state APIVERSION_QUERY)",
        );
        assert_eq!(
            context.last_error().as_deref(),
            Some("b:9093/bootstrap: Disconnected (after 3ms in state APIVERSION_QUERY)")
        );
        context.error(
            KafkaError::Global(RDKafkaErrorCode::SSL),
            "b:9093/bootstrap: SSL handshake failed: certificate verify failed",
        );
        let tls = context.refusal().unwrap();
        assert!(matches!(tls, Refusal::Tls(_)));
        let text = tls.explain("b:9093");
        assert!(
            text.contains("TLS handshake")
                && text.contains("ssl.ca.location")
                && text.contains("certificate verify failed"),
            "{text}"
        );
        context.error(
            KafkaError::Global(RDKafkaErrorCode::Authentication),
            "b:9093/bootstrap: SASL authentication error: invalid credentials",
        );
        let sasl = context.refusal().unwrap();
        assert!(matches!(sasl, Refusal::Sasl(_)));
        let text = sasl.explain("b:9093");
        assert!(
            text.contains("SASL login") && text.contains("kafka.sasl_password_file"),
            "{text}"
        );
    }

    #[test]
    fn the_sasl_password_file_is_read_into_the_client_config_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kafka-password");
        let mut config: KafkaConfig =
            serde_json::from_value(serde_json::json!({"brokers": "b:9093"})).unwrap();
        config.sasl_password_file = Some(file.clone());
        assert!(client_config(&config)
            .unwrap_err()
            .to_string()
            .contains("kafka.sasl_password_file"));
        std::fs::write(&file, "first\n").unwrap();
        assert_eq!(
            client_config(&config).unwrap().get("sasl.password"),
            Some("first")
        );
        std::fs::write(&file, "rotated\n").unwrap();
        assert_eq!(
            client_config(&config).unwrap().get("sasl.password"),
            Some("rotated")
        );
        let printed = format!("{:?}", {
            let mut c = config.clone();
            c.properties
                .insert("sasl.password".into(), "inline-secret".into());
            c
        });
        assert!(
            !printed.contains("inline-secret") && printed.contains("***"),
            "{printed}"
        );
    }
}
