//! `wal2cache::l1`: the in-process cache application servers embed. It holds values
//! in process memory (moka: bounded, with a TTL as a backstop) and subscribes to the
//! daemon's invalidation topic, evicting what changed within milliseconds of the
//! commit. Build with `default-features = false, features = ["l1"]`: no Postgres.
//!
//! ```no_run
//! # async fn demo() -> Result<(), wal2cache::l1::L1Error> {
//! use std::time::Duration;
//! use wal2cache::l1::L1;
//!
//! let cache: L1<String> = L1::builder("127.0.0.1:9092", "wal2cache.invalidations")
//!     .capacity(100_000)
//!     .ttl(Duration::from_secs(600))
//!     .staleness_bound(Duration::from_secs(5))
//!     .build()?;
//! let name = cache
//!     .get_with("shop:product:v3:42", &["shop:category:7"], || async {
//!         "a row read from the database".to_string()
//!     })
//!     .await;
//! # let _ = name; Ok(()) }
//! ```
//!
//! Semantics (schema-1 events, see README "Kafka events"):
//! - `invalidate` evicts its keys and every key cached under its tags; `flush_all`
//!   empties the cache; `heartbeat` proves the stream is alive and measures the lag.
//! - A load that began before an invalidation of its key or of one of its tags, or
//!   before a flush, returns its value to its callers but does not store it.
//! - On a consumer error, a lost partition, a gap in the offsets, or a partition
//!   without a heartbeat for longer than the staleness bound, the cache empties
//!   itself and stores nothing (every lookup goes to its loader) until the stream is
//!   healthy again. [`L1::is_healthy`] and [`Metrics`] say which. Healthy means:
//!   every partition assigned (at its end), a heartbeat received on each since then
//!   and within the bound, no error since. A new cache starts unhealthy until the
//!   first heartbeats (within a second with the daemon). A load that began while the
//!   cache was unhealthy never stores, even if the stream recovers meanwhile.
//! - What counts as a gap: see [`Gaps`].

mod flight;
mod metrics;
mod partitions;
mod store;
mod subscriber;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use tokio::sync::watch;

use crate::event::Event;
pub use metrics::Metrics;
pub use partitions::Gaps;
use store::{Core, NoticeFn};

/// For `get_with` calls that cache a value under no tag.
pub const NO_TAGS: &[&str] = &[];

/// What the subscriber just did, for [`L1Builder::on_notice`]. Called on the
/// subscriber's task right after the cache changed: keep it short.
#[derive(Debug)]
#[non_exhaustive]
pub enum Notice<'a> {
    /// An `invalidate` event was applied; `evicted` entries were removed (its keys
    /// and the keys cached under its tags that were present).
    Invalidated { event: &'a Event, evicted: usize },
    /// A `flush_all` event emptied the cache (`evicted` entries, approximately).
    Flushed { event: &'a Event, evicted: u64 },
    /// The stream became unsafe: the cache emptied itself and stores nothing.
    Unhealthy { reason: &'a str },
    /// The stream is healthy again: the cache fills from now on.
    Healthy,
}

#[derive(Debug, thiserror::Error)]
pub enum L1Error {
    #[error("wal2cache::l1: build() must be called inside a Tokio runtime")]
    NoRuntime,
    #[error("wal2cache::l1: invalid Kafka configuration: {0}")]
    Kafka(#[source] KafkaError),
    #[error("wal2cache::l1: {0}")]
    Setting(String),
}

/// Settings of an [`L1`]; from [`L1::builder`].
pub struct L1Builder {
    settings: subscriber::Settings,
    capacity: u64,
    ttl: Duration,
    notice: Option<NoticeFn>,
    password_file: Option<std::path::PathBuf>,
}

impl L1Builder {
    /// Settings for a cache that subscribes to `topic` on `brokers` (librdkafka's
    /// `bootstrap.servers`). The type of the values is chosen by [`build`](Self::build).
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> L1Builder {
        L1Builder {
            settings: subscriber::Settings {
                brokers: brokers.into(),
                topic: topic.into(),
                properties: Vec::new(),
                staleness: Duration::from_secs(5),
                metadata_refresh: Duration::from_secs(10),
                gaps: Gaps::Strict,
            },
            capacity: 10_000,
            ttl: Duration::from_secs(600),
            notice: None,
            password_file: None,
        }
    }

    /// The most entries kept (least valuable evicted first). Default 10,000.
    pub fn capacity(mut self, entries: u64) -> Self {
        self.capacity = entries;
        self
    }

    /// How long an entry lives at most, whatever the stream says: a backstop.
    /// Default 10 minutes.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a partition may go without a heartbeat before the cache empties
    /// itself. The daemon sends one per partition every second: keep this a few
    /// seconds. Default 5 s.
    pub fn staleness_bound(mut self, bound: Duration) -> Self {
        self.settings.staleness = bound;
        self
    }

    /// Any librdkafka consumer property (`security.protocol`, `sasl.*`...), applied
    /// after the L1's own. Among those: `fetch.wait.max.ms` is 10 (a broker that
    /// does not answer a waiting fetch when a record arrives, like Tansu, adds up to
    /// that much to each eviction; with Apache Kafka it only sets how often an idle
    /// consumer polls), `auto.offset.reset` is `error` (keep it: see [`Gaps`]).
    pub fn kafka_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.properties.push((key.into(), value.into()));
        self
    }

    /// The SASL password (librdkafka's `sasl.password`) from a file, such as a mounted
    /// Kubernetes secret, read by [`build`](Self::build): it stays out of the code and of
    /// the application's config.
    pub fn kafka_password_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.password_file = Some(path.into());
        self
    }

    /// How forward jumps in offsets are treated. Default [`Gaps::Strict`].
    pub fn gaps(mut self, gaps: Gaps) -> Self {
        self.settings.gaps = gaps;
        self
    }

    /// How often the topic's partitions are listed again, to notice one lost or
    /// added. Default 10 s.
    pub fn metadata_refresh(mut self, every: Duration) -> Self {
        self.settings.metadata_refresh = every;
        self
    }

    /// A callback for every change the subscriber makes (evictions, flushes, health),
    /// for instrumentation and tests.
    pub fn on_notice(mut self, f: impl Fn(&Notice<'_>) + Send + Sync + 'static) -> Self {
        self.notice = Some(Arc::new(f));
        self
    }

    /// Creates the cache and starts its subscriber on the current Tokio runtime. It
    /// does not wait for the broker: the cache starts unhealthy (every lookup goes to
    /// its loader) and turns healthy once every partition delivered a heartbeat; see
    /// [`L1::wait_healthy`]. Fails only on invalid settings.
    pub fn build<V: Clone + Send + Sync + 'static>(mut self) -> Result<L1<V>, L1Error> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| L1Error::NoRuntime)?;
        let s = &self.settings;
        if s.brokers.trim().is_empty() || s.topic.trim().is_empty() {
            return Err(L1Error::Setting(
                "brokers and topic must not be empty".into(),
            ));
        }
        if s.staleness.is_zero() || self.ttl.is_zero() || self.capacity == 0 {
            return Err(L1Error::Setting(
                "capacity, ttl and staleness_bound must be above zero".into(),
            ));
        }
        if let Some(file) = &self.password_file {
            let password = crate::secret::read_secret_file("kafka_password_file", file)
                .map_err(L1Error::Setting)?;
            self.settings
                .properties
                .push(("sasl.password".into(), password));
        }
        let s = &self.settings;
        let (consumer, errors) = subscriber::consumer(s).map_err(L1Error::Kafka)?;
        let core = Arc::new(Core::new(self.capacity, self.ttl, self.notice));
        let (stop, stopped) = watch::channel(());
        rt.spawn(subscriber::run(
            core.clone(),
            consumer,
            errors,
            self.settings,
            stopped,
        ));
        Ok(L1 {
            core,
            _running: Arc::new(stop),
        })
    }
}

/// The in-process cache. Cheap to clone (clones share the cache); the subscriber
/// stops when the last clone is dropped.
pub struct L1<V> {
    core: Arc<Core<V>>,
    _running: Arc<watch::Sender<()>>,
}

impl<V> Clone for L1<V> {
    fn clone(&self) -> Self {
        L1 {
            core: self.core.clone(),
            _running: self._running.clone(),
        }
    }
}

impl L1<()> {
    /// [`L1Builder::new`]: `L1::builder(brokers, topic)....build::<V>()`.
    pub fn builder(brokers: impl Into<String>, topic: impl Into<String>) -> L1Builder {
        L1Builder::new(brokers, topic)
    }
}

impl<V: Clone + Send + Sync + 'static> L1<V> {
    /// The cached value of `key`, if any.
    pub async fn get(&self, key: &str) -> Option<V> {
        self.core.get(key).await
    }

    /// The cached value of `key`, or `loader`'s, stored under `tags` (unless an
    /// invalidation of the key or of a tag, a flush, or trouble with the stream came
    /// while it loaded: then it is returned but not stored). Concurrent misses of
    /// one key run one loader; the others wait for its value.
    pub async fn get_with<T, F, Fut>(&self, key: &str, tags: &[T], loader: F) -> V
    where
        T: AsRef<str>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        if let Some(v) = self.core.get(key).await {
            return v;
        }
        let loaded = self
            .core
            .load(key, tags, move || {
                let fut = loader();
                async move { Ok::<V, Infallible>(fut.await) }
            })
            .await;
        match loaded {
            Ok(v) => v,
            Err(never) => match *never {},
        }
    }

    /// `get_with` with a fallible loader: an error is returned (shared by the callers
    /// that waited for this load) and nothing is stored.
    pub async fn try_get_with<T, F, Fut, E>(
        &self,
        key: &str,
        tags: &[T],
        loader: F,
    ) -> Result<V, Arc<E>>
    where
        T: AsRef<str>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        E: Send + Sync + 'static,
    {
        if let Some(v) = self.core.get(key).await {
            return Ok(v);
        }
        self.core.load(key, tags, loader).await
    }

    /// Stores `value` under `tags`, unless the cache is unhealthy or an invalidation
    /// of the key came meanwhile; whether it was stored. A load of the key in flight
    /// will not overwrite it.
    pub async fn insert<T: AsRef<str>>(&self, key: &str, value: V, tags: &[T]) -> bool {
        self.core.insert(key, value, tags).await
    }

    /// Evicts `key` (and keeps a load of it in flight from storing); whether it was
    /// cached.
    pub async fn invalidate(&self, key: &str) -> bool {
        self.core.invalidate_keys(&[key]).await > 0
    }

    /// Evicts every key cached under `tag`; how many were.
    pub async fn invalidate_tag(&self, tag: &str) -> usize {
        self.core.invalidate_tags(&[tag]).await
    }

    /// Empties the cache.
    pub async fn invalidate_all(&self) {
        self.core.flush().await;
        metrics::bump(&self.core.counters.flushes);
    }

    /// Whether the cache stores values (the stream is healthy).
    pub fn is_healthy(&self) -> bool {
        self.core.is_healthy()
    }

    /// Waits until the cache is healthy, at most `timeout`; whether it is.
    pub async fn wait_healthy(&self, timeout: Duration) -> bool {
        let mut health = self.core.health();
        tokio::time::timeout(timeout, health.wait_for(|h| *h))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Counters and state.
    pub fn metrics(&self) -> Metrics {
        self.core.metrics()
    }

    /// Runs moka's pending maintenance (so that `metrics().entries` is exact); for
    /// tests.
    pub async fn run_pending_tasks(&self) {
        self.core.run_pending_tasks().await;
    }
}
