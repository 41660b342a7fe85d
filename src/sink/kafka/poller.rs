//! The sink's producer: librdkafka's producer with one thread of ours serving its
//! delivery reports (which count down the acknowledgement groups, see `acks`).
//!
//! rdkafka's own `ThreadedProducer` polls in rounds of exactly 100 ms, and
//! `BaseProducer::poll` waits for what is left of a round rounded *down* to whole
//! milliseconds: each round waited 99 ms, then polled the last fraction of a
//! millisecond with a zero timeout, over and over. On an idle daemon that polling
//! thread used 0.8% of a core (0.19 s of CPU in 23 s, measured). Our rounds are a
//! whole number of milliseconds plus [`ROUND_MARGIN`]: the wait covers the round, and
//! what is left when it returns is the margin at most.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::KafkaResult;
use rdkafka::producer::BaseProducer;
use rdkafka::ClientConfig;

use super::LogContext;

/// How long one poll round waits for a report when none comes: also how long
/// dropping the last handle can wait for the thread to notice.
const ROUND: Duration = Duration::from_millis(100);

/// Added to [`ROUND`] so that librdkafka's wait, in whole milliseconds, covers it.
const ROUND_MARGIN: Duration = Duration::from_micros(50);

/// The producer; clones share it and its polling thread, which the last one stops
/// and joins.
#[derive(Clone)]
pub struct SinkProducer(Arc<Polled>);

struct Polled {
    producer: Arc<BaseProducer<LogContext>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FromClientConfigAndContext<LogContext> for SinkProducer {
    fn from_config_and_context(
        config: &ClientConfig,
        context: LogContext,
    ) -> KafkaResult<SinkProducer> {
        let producer = Arc::new(BaseProducer::from_config_and_context(config, context)?);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (producer, stop) = (Arc::clone(&producer), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("kafka reports".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        producer.poll(ROUND + ROUND_MARGIN);
                    }
                })
                .map_err(|e| {
                    rdkafka::error::KafkaError::ClientCreation(format!(
                        "cannot start the producer's polling thread: {e}"
                    ))
                })?
        };
        Ok(SinkProducer(Arc::new(Polled {
            producer,
            stop,
            thread: Some(thread),
        })))
    }
}

impl std::ops::Deref for SinkProducer {
    type Target = BaseProducer<LogContext>;

    fn deref(&self) -> &BaseProducer<LogContext> {
        &self.0.producer
    }
}

impl Drop for Polled {
    /// Stops the thread (within a round) before the producer itself is dropped (which
    /// purges its queue and waits up to 500 ms), as `ThreadedProducer` does.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clones share the producer; dropping the last one stops its thread within a
    /// round (the idle thread's CPU is checked on the daemon's own process, in
    /// tests/daemon_http.rs, where no other producer shares the thread's name).
    #[test]
    fn the_last_clone_stops_the_thread() {
        let producer: SinkProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("log_level", "0")
            .create_with_context(LogContext::default())
            .expect("a producer");
        let clone = producer.clone();
        drop(producer);
        assert!(!clone.0.stop.load(Ordering::Relaxed), "a clone still runs");
        let polled = Arc::clone(&clone.0);
        drop(clone);
        let stop = Arc::clone(&polled.stop);
        let started = std::time::Instant::now();
        drop(polled);
        assert!(stop.load(Ordering::Relaxed));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "dropping took {:?}",
            started.elapsed()
        );
    }
}
