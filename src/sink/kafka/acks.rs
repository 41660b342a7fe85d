//! Acknowledgements: librdkafka reports each message's delivery from the producer's
//! polling thread. A group of messages (a batch's events, a round of heartbeats)
//! shares one counter that the reports count down; its sender waits once for the
//! group, not once per message (one channel and one wake-up per message cost about
//! a tenth of the daemon's CPU with a future per message).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, ThreadedProducer};
use tokio::sync::Notify;

/// The producer of the sink and its heartbeats; its context logs and counts down.
pub type SinkProducer = ThreadedProducer<super::LogContext>;

/// A message: key, payload, partition (`None`: by key).
pub type Record<'a> = (&'a [u8], &'a [u8], Option<i32>);

/// What travels with a message to its delivery report.
pub struct Tracked {
    acks: Arc<Acks>,
    index: usize,
}

/// One group of messages in flight.
pub struct Acks {
    /// Messages not reported yet, plus one while the sender still enqueues.
    left: AtomicUsize,
    /// The first failure reported, with the index of its message in the group.
    failed: Mutex<Option<(usize, KafkaError)>>,
    done: Notify,
}

impl Acks {
    fn new() -> Arc<Acks> {
        Arc::new(Acks {
            left: AtomicUsize::new(1),
            failed: Mutex::new(None),
            done: Notify::new(),
        })
    }

    /// One message reported (from librdkafka's thread).
    pub(super) fn report(tracked: Tracked, result: &DeliveryResult<'_>) {
        let Tracked { acks, index } = tracked;
        if let Err((e, _)) = result {
            let mut failed = acks.failed.lock().unwrap_or_else(|p| p.into_inner());
            failed.get_or_insert_with(|| (index, e.clone()));
        }
        acks.count_down();
    }

    fn count_down(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A permit is stored when the sender is not waiting yet.
            self.done.notify_one();
        }
    }
}

/// A message of a group, carrying what its delivery report counts down.
fn tracked<'a>(
    topic: &'a str,
    acks: &Arc<Acks>,
    index: usize,
    (key, payload, partition): Record<'a>,
) -> BaseRecord<'a, [u8], [u8], Box<Tracked>> {
    let record = BaseRecord::with_opaque_to(
        topic,
        Box::new(Tracked {
            acks: acks.clone(),
            index,
        }),
    )
    .key(key)
    .payload(payload);
    match partition {
        Some(p) => record.partition(p),
        None => record,
    }
}

/// Enqueues every message of `records` and
/// waits until librdkafka reported them all: `Err` with the index of the first one
/// refused, or of the one that could not be enqueued. A message that was enqueued is
/// always reported (delivered, failed after `message.timeout.ms`, or purged when its
/// producer is dropped), so the wait ends.
pub async fn send_all(
    producer: &SinkProducer,
    topic: &str,
    records: &[Record<'_>],
) -> Result<(), (usize, KafkaError)> {
    let acks = Acks::new();
    let mut refused = None;
    for (index, &r) in records.iter().enumerate() {
        acks.left.fetch_add(1, Ordering::AcqRel);
        let mut record = tracked(topic, &acks, index, r);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => {
                    // Never enqueued: never reported.
                    acks.count_down();
                    refused = Some((index, e));
                    break;
                }
            }
        }
        if refused.is_some() {
            break;
        }
    }
    // The sender's own count: from here the reports alone can bring it to zero.
    if acks.left.fetch_sub(1, Ordering::AcqRel) != 1 {
        acks.done.notified().await;
    }
    if let Some(r) = refused {
        return Err(r);
    }
    let failed = acks.failed.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failed {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// Enqueues messages whose delivery nobody waits for (heartbeats): the reports only
/// release them.
pub fn send_detached<'a>(
    producer: &SinkProducer,
    topic: &str,
    records: impl IntoIterator<Item = Record<'a>>,
) -> Result<(), KafkaError> {
    let acks = Acks::new();
    for (index, r) in records.into_iter().enumerate() {
        let record = tracked(topic, &acks, index, r);
        producer.send(record).map_err(|(e, _)| e)?;
    }
    Ok(())
}
