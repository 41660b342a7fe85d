//! `wal2cache::l2`: Redis look-aside caching for applications, with leases.
//!
//! [`L2::get_or_load`] returns the cached value of a key, or loads it once across
//! every client of the same Redis and stores it, such that:
//! - **no stale set:** a value is stored only while the load's lease is still valid,
//!   and the daemon removes a key's lease in the same atomic step as it deletes the
//!   key (and a tag purge removes the leases registered under the tag), while a
//!   republish changes the key's version, which the lease recorded at its grant; so a
//!   value read from the database before a change can never be stored after the
//!   daemon applied that change;
//! - **no stampede:** one lease per key at a time; other readers wait (with backoff,
//!   up to `lease_wait`) for the value the holder stores;
//! - **tags registered for you:** the key (and its lease) goes into each tag's set
//!   before the load, so the daemon's tag purges find it;
//! - **negative caching:** a loader's "not found" is cached as a marker for
//!   `negative_ttl`; an INSERT of the row invalidates it through the rules like any
//!   other value;
//! - a value the daemon republished is never overwritten by an application store.
//!
//! The protocol is three Lua scripts (`src/l2/lua/`), documented in the README
//! ("Redis layout" and "Subscribing and caching from another language"), so that
//! applications in any language can take part.

mod metrics;

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use rand::Rng;
use redis::aio::ConnectionManagerConfig;
use redis::{RedisError, Script, Value};
use tokio::time::Instant;

use crate::keys::{lease_key, version_key};
use crate::redis_conn::RedisConn;

pub use metrics::Metrics;
use metrics::{Counter, Counters};

/// The value stored for a loader's "not found" (negative caching). It starts with a
/// NUL byte, which no JSON and no text value does.
pub const NOT_FOUND: &[u8] = b"\0wal2cache:not-found";

/// The Lua scripts of the protocol, as in `src/l2/lua/`.
pub const FETCH_LUA: &str = include_str!("lua/fetch.lua");
pub const STORE_LUA: &str = include_str!("lua/store.lua");
pub const RELEASE_LUA: &str = include_str!("lua/release.lua");

/// No tags, for [`L2::get_or_load`] and [`L2::try_get_or_load`].
pub const NO_TAGS: &[&str] = &[];

/// What a read does when another load held the key's lease for all of `lease_wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterWait {
    /// Run the loader and return its value without storing it (the default).
    Load,
    /// Fail with [`L2Error::LeaseWait`].
    Fail,
}

#[derive(Debug, thiserror::Error)]
pub enum L2Error<E = Infallible> {
    #[error("wal2cache::l2: Redis: {0}")]
    Redis(#[source] RedisError),
    #[error("wal2cache::l2: cannot connect to Redis at {url}: {source}; check the URL and that Redis runs")]
    Connect {
        url: String,
        #[source]
        source: RedisError,
    },
    #[error("wal2cache::l2: the loader of {key} failed: {error}")]
    Loader { key: String, error: E },
    #[error(
        "wal2cache::l2: {key}: another load held its lease for all of lease_wait ({waited:?}); \
         raise lease_wait, or use AfterWait::Load to load without storing"
    )]
    LeaseWait { key: String, waited: Duration },
    #[error("wal2cache::l2: {0}")]
    Setting(String),
}

impl<E> From<RedisError> for L2Error<E> {
    fn from(e: RedisError) -> Self {
        L2Error::Redis(e)
    }
}

impl L2Error<Infallible> {
    /// The same error, for a caller whose loader can fail.
    fn widen<E>(self) -> L2Error<E> {
        match self {
            L2Error::Redis(e) => L2Error::Redis(e),
            L2Error::Connect { url, source } => L2Error::Connect { url, source },
            L2Error::LeaseWait { key, waited } => L2Error::LeaseWait { key, waited },
            L2Error::Setting(s) => L2Error::Setting(s),
            L2Error::Loader { error, .. } => match error {},
        }
    }
}

/// Settings of an [`L2`]; from [`L2::builder`].
#[derive(Debug, Clone)]
pub struct L2Builder {
    url: String,
    cluster_nodes: Option<Vec<String>>,
    /// PEM: the CA to verify the server with (instead of the system's roots), and a
    /// client certificate and key.
    ca_file: Option<std::path::PathBuf>,
    client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    settings: Settings,
}

#[derive(Debug, Clone)]
struct Settings {
    tag_prefix: String,
    lease_ttl: Duration,
    lease_wait: Duration,
    poll_max: Duration,
    negative_ttl: Duration,
    after_wait: AfterWait,
}

impl L2Builder {
    /// Settings for a cache in the Redis at `url` (`redis://` or `rediss://`, the
    /// same server the daemon writes to).
    pub fn new(url: impl Into<String>) -> L2Builder {
        L2Builder {
            url: url.into(),
            cluster_nodes: None,
            ca_file: None,
            client_cert: None,
            settings: Settings {
                tag_prefix: "tag:".into(),
                lease_ttl: Duration::from_secs(5),
                lease_wait: Duration::from_secs(2),
                poll_max: Duration::from_millis(20),
                negative_ttl: Duration::from_secs(10),
                after_wait: AfterWait::Load,
            },
        }
    }

    /// A Redis Cluster: `url` and these nodes are the seeds (as the daemon's
    /// `redis.cluster = true` with `redis.nodes`).
    pub fn cluster<S: Into<String>>(mut self, nodes: impl IntoIterator<Item = S>) -> Self {
        self.cluster_nodes = Some(nodes.into_iter().map(Into::into).collect());
        self
    }

    /// For `rediss://`: verify the server against this CA (PEM) instead of the
    /// system's roots (as the daemon's `redis.ca_file`).
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// For `rediss://`: a client certificate and its key (PEM files).
    pub fn client_cert(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// The certificates of `ca_file` and `client_cert`, read now.
    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, L2Error> {
        if self.ca_file.is_none() && self.client_cert.is_none() {
            return Ok(None);
        }
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| L2Error::Setting(format!("cannot read {}: {e}", path.display())))
        };
        let root_cert = self.ca_file.as_deref().map(read).transpose()?;
        let client_tls = match &self.client_cert {
            Some((cert, key)) => Some(redis::ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            }),
            None => None,
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }

    /// The daemon's `redis.tag_prefix` (default `tag:`): a tag's set of keys is at
    /// `tag_prefix + tag`.
    pub fn tag_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.tag_prefix = prefix.into();
        self
    }

    /// How long a lease lives (default 5 s): longer than a load takes, since a
    /// value loaded after its lease expired is not stored; a holder that dies keeps
    /// other readers from storing for this long.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.settings.lease_ttl = ttl;
        self
    }

    /// How long a read waits for another load's value (default 2 s) before
    /// [`AfterWait`] applies.
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.settings.lease_wait = wait;
        self
    }

    /// The longest pause between two looks while waiting (default 20 ms; the
    /// first pause is 1 ms, each next one doubles, with jitter).
    pub fn lease_poll_max(mut self, max: Duration) -> Self {
        self.settings.poll_max = max;
        self
    }

    /// How long a loader's "not found" is cached (default 10 s).
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.settings.negative_ttl = ttl;
        self
    }

    /// What a read does once `lease_wait` ran out (default [`AfterWait::Load`]).
    pub fn after_wait(mut self, after: AfterWait) -> Self {
        self.settings.after_wait = after;
        self
    }

    /// Connects (failing when Redis cannot be reached) and loads the scripts.
    pub async fn build(self) -> Result<L2, L2Error> {
        let url = crate::redact::redact(&self.url);
        self.connect().await.map_err(|e| match e {
            L2Error::Redis(source) => L2Error::Connect { url, source },
            other => other,
        })
    }

    async fn connect(self) -> Result<L2, L2Error> {
        // rustls needs one crypto provider for the process; an application that chose
        // one already keeps it.
        if self.url.starts_with("rediss://") {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let s = &self.settings;
        if s.lease_ttl < Duration::from_millis(1) || s.negative_ttl < Duration::from_millis(1) {
            return Err(L2Error::Setting(
                "lease_ttl and negative_ttl must be at least 1 ms".into(),
            ));
        }
        let conn = match &self.cluster_nodes {
            Some(nodes) => {
                let seeds: Vec<&str> = std::iter::once(self.url.as_str())
                    .chain(nodes.iter().map(String::as_str))
                    .collect();
                let mut builder = redis::cluster::ClusterClient::builder(seeds)
                    .connection_timeout(Duration::from_secs(5))
                    .response_timeout(Duration::from_secs(5));
                if let Some(certs) = self.certificates()? {
                    builder = builder.certs(certs);
                }
                let client = builder.build()?;
                RedisConn::Cluster(client.get_async_connection().await?)
            }
            None => {
                let client = match self.certificates()? {
                    Some(certs) => redis::Client::build_with_tls(self.url.as_str(), certs)?,
                    None => redis::Client::open(self.url.as_str())?,
                };
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(Duration::from_secs(5)))
                    .set_number_of_retries(2);
                RedisConn::Single(client.get_connection_manager_with_config(config).await?)
            }
        };
        let l2 = L2 {
            inner: std::sync::Arc::new(Inner {
                scripts: [FETCH_LUA, STORE_LUA, RELEASE_LUA].map(Script::new),
                settings: self.settings,
                counters: Counters::default(),
            }),
            conn,
        };
        for script in &l2.inner.scripts {
            script
                .prepare_invoke()
                .load_async(&mut l2.conn.clone())
                .await?;
        }
        Ok(l2)
    }
}

struct Inner {
    /// fetch, store, release
    scripts: [Script; 3],
    settings: Settings,
    counters: Counters,
}

/// A look-aside cache in Redis with leases. Cheap to clone: clones share the
/// connection and the counters.
#[derive(Clone)]
pub struct L2 {
    inner: std::sync::Arc<Inner>,
    conn: RedisConn,
}

/// The keys and token of one read, computed once for all its looks.
struct Names {
    lease: String,
    version: String,
    token: String,
    /// Tag sets, with the tag prefix.
    sets: Vec<String>,
}

/// What the fetch script answered.
enum Fetched {
    Hit(Vec<u8>),
    Granted,
    Held,
}

impl L2 {
    pub fn builder(url: impl Into<String>) -> L2Builder {
        L2Builder::new(url)
    }

    /// The cached value of `key` (`None`: not found, cached), or, on a miss, the
    /// loader's, stored with `ttl` (`None`: no expiry) when this read holds the
    /// key's lease and it is still valid when the loader returns; the key goes into
    /// each of `tags`' sets. A loader returning `None` ("no such row") is cached as
    /// [`NOT_FOUND`] for `negative_ttl`.
    pub async fn get_or_load<T, F, Fut>(
        &self,
        key: &str,
        tags: &[T],
        ttl: Option<Duration>,
        loader: F,
    ) -> Result<Option<Vec<u8>>, L2Error>
    where
        T: AsRef<str>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<Vec<u8>>>,
    {
        self.read(key, tags, ttl, move || {
            let load = loader();
            async move { Ok::<_, Infallible>(load.await) }
        })
        .await
    }

    /// [`get_or_load`](Self::get_or_load) with a loader that can fail: its error is
    /// returned as [`L2Error::Loader`], nothing is stored, and the lease is given
    /// back at once so that a waiting reader loads instead.
    pub async fn try_get_or_load<T, F, Fut, E>(
        &self,
        key: &str,
        tags: &[T],
        ttl: Option<Duration>,
        loader: F,
    ) -> Result<Option<Vec<u8>>, L2Error<E>>
    where
        T: AsRef<str>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
    {
        self.read(key, tags, ttl, loader).await
    }

    /// Counters since this cache was built.
    pub fn metrics(&self) -> Metrics {
        self.inner.counters.snapshot()
    }

    fn bump(&self, counter: Counter) {
        self.inner.counters.bump(counter);
    }

    async fn read<T, F, Fut, E>(
        &self,
        key: &str,
        tags: &[T],
        ttl: Option<Duration>,
        loader: F,
    ) -> Result<Option<Vec<u8>>, L2Error<E>>
    where
        T: AsRef<str>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
    {
        let s = &self.inner.settings;
        let names = Names {
            lease: lease_key(key),
            version: version_key(key),
            token: format!("{:032x}", rand::rng().random::<u128>()),
            sets: tags
                .iter()
                .map(|t| format!("{}{}", s.tag_prefix, t.as_ref()))
                .collect(),
        };
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        let mut first = true;
        loop {
            let fetched = self
                .fetch(key, &names)
                .await
                .map_err(|e| self.redis_error(e).widen())?;
            match fetched {
                Fetched::Hit(value) => {
                    let negative = value == NOT_FOUND;
                    self.bump(match (first, negative) {
                        (_, true) => Counter::negative_hits,
                        (true, false) => Counter::hits,
                        (false, false) => Counter::wait_hits,
                    });
                    return Ok((!negative).then_some(value));
                }
                Fetched::Granted => {
                    if first {
                        self.bump(Counter::misses);
                    }
                    self.bump(Counter::leases_granted);
                    return self.load_and_store(key, &names, ttl, loader).await;
                }
                Fetched::Held => {
                    if first {
                        self.bump(Counter::misses);
                        self.bump(Counter::lease_waits);
                    }
                    let waited = started.elapsed();
                    if waited >= s.lease_wait {
                        return match s.after_wait {
                            AfterWait::Fail => Err(L2Error::LeaseWait {
                                key: key.to_string(),
                                waited,
                            }),
                            AfterWait::Load => {
                                self.bump(Counter::unleased_loads);
                                self.run_loader(key, loader).await
                            }
                        };
                    }
                    let jittered = pause.mul_f64(rand::rng().random_range(0.5..1.0));
                    tokio::time::sleep(jittered.min(s.lease_wait - waited)).await;
                    pause = (pause * 2).min(s.poll_max);
                }
            }
            first = false;
        }
    }

    async fn run_loader<F, Fut, E>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<Option<Vec<u8>>, L2Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
    {
        loader().await.map_err(|error| {
            self.bump(Counter::loader_errors);
            L2Error::Loader {
                key: key.to_string(),
                error,
            }
        })
    }

    /// Holding the lease: registers the key under its tags (in a cluster, where the
    /// fetch script could not), loads, stores if the lease is still ours.
    async fn load_and_store<F, Fut, E>(
        &self,
        key: &str,
        names: &Names,
        ttl: Option<Duration>,
        loader: F,
    ) -> Result<Option<Vec<u8>>, L2Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Vec<u8>>, E>>,
    {
        let Names {
            lease,
            version,
            token,
            sets,
        } = names;
        let mut conn = self.conn.clone();
        if conn.is_cluster() {
            // Before the load: a purge that starts after this finds the key and its
            // lease in the set (see fetch.lua).
            for set in sets {
                redis::cmd("SADD")
                    .arg(set)
                    .arg(key)
                    .arg(lease)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| self.redis_error(e).widen())?;
            }
        }
        let loaded = match self.run_loader(key, loader).await {
            Ok(loaded) => loaded,
            Err(e) => {
                // Give the lease back so that a waiting reader loads now; a failure
                // here only means it expires by itself.
                let _ = self.inner.scripts[2]
                    .key(lease)
                    .arg(token)
                    .invoke_async::<i64>(&mut conn)
                    .await;
                return Err(e);
            }
        };
        let s = &self.inner.settings;
        let (value, expiry) = match &loaded {
            Some(v) => (v.as_slice(), ttl),
            None => (NOT_FOUND, Some(s.negative_ttl)),
        };
        let expiry_ms = expiry.map_or(0, |t| t.as_millis().max(1) as u64);
        let stored: i64 = self.inner.scripts[1]
            .key(key)
            .key(lease)
            .key(version)
            .arg(token)
            .arg(value)
            .arg(expiry_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e).widen())?;
        self.bump(match stored {
            1 => Counter::stored,
            2 => Counter::store_skipped,
            _ => Counter::leases_lost,
        });
        Ok(loaded)
    }

    async fn fetch(&self, key: &str, names: &Names) -> Result<Fetched, RedisError> {
        let Names {
            lease,
            version,
            token,
            sets,
        } = names;
        let mut invocation = self.inner.scripts[0].key(key);
        invocation.key(lease).key(version);
        if !self.conn.is_cluster() {
            for set in sets {
                invocation.key(set);
            }
        }
        let reply: Value = invocation
            .arg(token)
            .arg(self.inner.settings.lease_ttl.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let unexpected = || {
            RedisError::from((
                redis::ErrorKind::Client,
                "unexpected reply of the l2 fetch script",
                format!("{reply:?}"),
            ))
        };
        let Value::Array(parts) = &reply else {
            return Err(unexpected());
        };
        match parts.as_slice() {
            [Value::Int(1), Value::BulkString(v)] => Ok(Fetched::Hit(v.clone())),
            [Value::Int(2)] => Ok(Fetched::Granted),
            [Value::Int(3), _] => Ok(Fetched::Held),
            _ => Err(unexpected()),
        }
    }

    fn redis_error(&self, e: RedisError) -> L2Error {
        self.bump(Counter::redis_errors);
        L2Error::Redis(e)
    }
}
