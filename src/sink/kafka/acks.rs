//! Acknowledgements: librdkafka reports each message's delivery from the producer's
//! polling thread. A group of messages (a batch's events, a round of heartbeats)
//! shares one counter that the reports count down; its sender waits once for the
//! group, not once per message (one channel and one wake-up per message cost about
//! a tenth of the daemon's CPU with a future per message). The group itself travels
//! with each message (an `Arc`, no allocation per message); a failure carries the
//! refused payload, by which the sender finds the message's index.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::BaseRecord;
use tokio::sync::Notify;

pub use super::poller::SinkProducer;

/// A message: key, payload, partition (`None`: by key).
pub type Record<'a> = (&'a [u8], &'a [u8], Option<i32>);

/// One group of messages in flight; each message carries a reference to it to its
/// delivery report.
pub struct Acks {
    /// Messages not reported yet, plus one while the sender still enqueues.
    left: AtomicUsize,
    /// The first failure reported, with the payload of its message.
    failed: Mutex<Option<(Vec<u8>, KafkaError)>>,
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
    pub(super) fn report(acks: Arc<Acks>, result: &DeliveryResult<'_>) {
        if let Err((e, message)) = result {
            let mut failed = acks.failed.lock().unwrap_or_else(|p| p.into_inner());
            failed
                .get_or_insert_with(|| (message.payload().unwrap_or_default().to_vec(), e.clone()));
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

/// A message of a group, carrying the group its delivery report counts down.
fn tracked<'a>(
    topic: &'a str,
    acks: &Arc<Acks>,
    (key, payload, partition): Record<'a>,
) -> BaseRecord<'a, [u8], [u8], Arc<Acks>> {
    let record = BaseRecord::with_opaque_to(topic, acks.clone())
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
        let mut record = tracked(topic, &acks, r);
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
        // The first message with that payload (two with the same payload are the
        // same event, refused alike). A report without its payload (not seen from
        // librdkafka) names the last.
        Some((payload, e)) => Err((
            index_of(records, &payload).unwrap_or(records.len().saturating_sub(1)),
            e,
        )),
        None => Ok(()),
    }
}

/// The index of the first record with `payload`.
fn index_of(records: &[Record<'_>], payload: &[u8]) -> Option<usize> {
    records.iter().position(|(_, p, _)| *p == payload)
}

/// Enqueues messages whose delivery nobody waits for (heartbeats): the reports only
/// release them.
pub fn send_detached<'a>(
    producer: &SinkProducer,
    topic: &str,
    records: impl IntoIterator<Item = Record<'a>>,
) -> Result<(), KafkaError> {
    let acks = Acks::new();
    for r in records {
        let record = tracked(topic, &acks, r);
        producer.send(record).map_err(|(e, _)| e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;

    #[test]
    fn a_failure_is_found_by_its_payload() {
        let records: [Record<'_>; 4] = [
            (b"k", b"a", None),
            (b"k", b"b", None),
            (b"k", b"c", Some(1)),
            (b"k", b"b", None),
        ];
        assert_eq!(index_of(&records, b"a"), Some(0));
        assert_eq!(index_of(&records, b"c"), Some(2));
        assert_eq!(
            index_of(&records, b"b"),
            Some(1),
            "the first of equal payloads"
        );
        assert_eq!(index_of(&records, b"x"), None);
    }

    /// A delivery report of a failed message carries its payload: the group learns
    /// which message failed (here the first: nothing can be delivered, and they
    /// expire in the order they were sent; without the payload the last is named).
    #[tokio::test]
    async fn a_failed_delivery_names_its_message() {
        let producer: SinkProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("message.timeout.ms", "200")
            .set("log_level", "0")
            .create_with_context(super::super::LogContext::default())
            .expect("a producer");
        let records: [Record<'_>; 3] = [
            (b"k1", b"first", None),
            (b"k2", b"second", None),
            (b"k3", b"third", None),
        ];
        let (index, e) = send_all(&producer, "w2c_unreachable", &records)
            .await
            .expect_err("nothing can be delivered");
        assert_eq!(index, 0);
        assert_eq!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::MessageTimedOut),
            "{e}"
        );
    }
}
