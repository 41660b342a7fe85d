//! `ConfigBuilder`: the `wal2cache.toml` of a test (see the README's Configuration and
//! `src/config/`), and its rules file beside it.
//!
//! ```ignore
//! let config = ConfigBuilder::new(&db)
//!     .slot_suffix("r")
//!     .rules(&rules)
//!     .kafka_topic(&topic)
//!     .pipeline("idle_heartbeat", "0s")
//!     .write(dir.path());
//! ```
//!
//! By default: `name = "test"`, the test database with slot `<db>_d` and publication
//! `w2c`, the shared Redis, and the shared broker with topic `<db>.events` (one
//! partition). A test that wants a config the daemon must refuse writes it with `raw`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::db::TestDb;
use super::env::{kafka_brokers, kafka_properties, redis_url, tls_file};
use super::rules::example_rules;

/// The file name `write` gives the rules, beside the config (`rules.path`).
#[allow(dead_code)]
pub const RULES_FILE: &str = "rules.toml";

/// A value of a TOML key: strings are quoted, numbers and booleans are not, durations
/// are strings in the humantime form the config reads (`"250ms"`).
#[allow(dead_code)]
pub trait TomlValue {
    fn toml(&self) -> String;
}

impl TomlValue for &str {
    fn toml(&self) -> String {
        toml_string(self)
    }
}

impl TomlValue for String {
    fn toml(&self) -> String {
        toml_string(self)
    }
}

impl TomlValue for Duration {
    fn toml(&self) -> String {
        toml_string(&humantime::format_duration(*self).to_string())
    }
}

impl TomlValue for bool {
    fn toml(&self) -> String {
        self.to_string()
    }
}

macro_rules! toml_integer {
    ($($t:ty),*) => {$(
        impl TomlValue for $t {
            fn toml(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
toml_integer!(i32, i64, u16, u32, u64, usize);

/// A TOML basic string: a JSON string is one (the same escapes).
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[allow(dead_code)]
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    name: String,
    url: String,
    slot: String,
    publication: String,
    create: Option<bool>,
    rules: String,
    redis: Option<Vec<(String, String)>>,
    kafka: Option<Vec<(String, String)>>,
    /// `[kafka.properties]`: (quoted key, value).
    kafka_properties: Vec<(String, String)>,
    pipeline: Vec<(String, String)>,
    metrics_listen: Option<std::net::SocketAddr>,
    /// (section, line), written as they are.
    raw: Vec<(String, String)>,
}

#[allow(dead_code)]
impl ConfigBuilder {
    /// On the test's database: slot `<db>_d`, publication `w2c`, the shared Redis and
    /// broker (topic `<db>.events`, one partition), no rules.
    pub fn new(db: &TestDb) -> ConfigBuilder {
        let mut b = ConfigBuilder::on_url(&db.url)
            .slot(&format!("{}_d", db.name))
            .name(&db.name);
        b.kafka = Some(vec![
            ("brokers".into(), kafka_brokers().toml()),
            ("topic".into(), format!("{}.events", db.name).toml()),
            ("partitions".into(), 1.toml()),
        ]);
        b.redis = Some(vec![("url".into(), redis_url().toml())]);
        if redis_url().starts_with("rediss://") {
            b = b.redis_key("ca_file", tls_file("ca.pem"));
        }
        for (k, v) in kafka_properties() {
            b = b.kafka_property(&k, &v);
        }
        b
    }

    /// `new`, with the example rules (`rules/example.toml`, for the example schema)
    /// under `prefix`: their tags under `<prefix>:tag:`, the topic `topic` with two
    /// partitions, a 10 s shutdown timeout.
    pub fn example(db: &TestDb, prefix: &str, topic: &str) -> ConfigBuilder {
        ConfigBuilder::new(db)
            .rules(&example_rules(prefix))
            .redis_key("tag_prefix", format!("{prefix}:tag:"))
            .kafka_topic(topic)
            .kafka_key("partitions", 2)
            .pipeline("shutdown_timeout", "10s")
    }

    /// On `url` (a database that may not exist or answer): slot `wal2cache`,
    /// publication `w2c`, no rules, and Redis and brokers where nothing answers
    /// (`redis://127.0.0.1:1`, `127.0.0.1:1`): for the commands that stop before, or
    /// at, connecting to them.
    pub fn on_url(url: &str) -> ConfigBuilder {
        // Unique: the stream record in Redis is per name.
        static BUILT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ConfigBuilder {
            name: format!("test-{}-{n}", std::process::id()),
            url: url.into(),
            slot: "wal2cache".into(),
            publication: "w2c".into(),
            create: None,
            rules: String::new(),
            redis: Some(vec![("url".into(), "redis://127.0.0.1:1".toml())]),
            kafka: Some(vec![("brokers".into(), "127.0.0.1:1".toml())]),
            kafka_properties: Vec::new(),
            pipeline: Vec::new(),
            metrics_listen: None,
            raw: Vec::new(),
        }
    }

    /// `postgres.url`, whole.
    pub fn url(mut self, url: &str) -> Self {
        self.url = url.into();
        self
    }

    /// `name`, the source of every event.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// `postgres.slot`, whole.
    pub fn slot(mut self, slot: &str) -> Self {
        self.slot = slot.into();
        self
    }

    /// `postgres.slot = "<db>_<suffix>"`.
    pub fn slot_suffix(self, db: &TestDb, suffix: &str) -> Self {
        self.slot(&format!("{}_{suffix}", db.name))
    }

    pub fn publication(mut self, publication: &str) -> Self {
        self.publication = publication.into();
        self
    }

    /// `postgres.create`.
    pub fn create(mut self, create: bool) -> Self {
        self.create = Some(create);
        self
    }

    /// The rules (TOML), written to `rules.toml` beside the config.
    pub fn rules(mut self, text: &str) -> Self {
        self.rules = text.into();
        self
    }

    /// `[redis]` with `url` alone (the default tag prefix).
    pub fn redis(mut self, url: &str) -> Self {
        self.redis = Some(vec![("url".into(), url.toml())]);
        self
    }

    /// A key of `[redis]` (`tag_prefix`, `cluster`, `nodes`...).
    pub fn redis_key(mut self, key: &str, value: impl TomlValue) -> Self {
        set(self.redis.get_or_insert_with(Vec::new), key, value.toml());
        self
    }

    /// No `[redis]` section.
    pub fn without_redis(mut self) -> Self {
        self.redis = None;
        self
    }

    /// `[kafka]` with `brokers` and `topic` (one partition).
    pub fn kafka(mut self, brokers: &str, topic: &str) -> Self {
        self.kafka = Some(vec![
            ("brokers".into(), brokers.toml()),
            ("topic".into(), topic.toml()),
            ("partitions".into(), 1.toml()),
        ]);
        self
    }

    /// `kafka.topic`, on the brokers already set.
    pub fn kafka_topic(self, topic: &str) -> Self {
        self.kafka_key("topic", topic)
    }

    /// A key of `[kafka]` (`partitions`, `max_event_bytes`...).
    pub fn kafka_key(mut self, key: &str, value: impl TomlValue) -> Self {
        set(self.kafka.get_or_insert_with(Vec::new), key, value.toml());
        self
    }

    /// A librdkafka property of the producer (`[kafka.properties]`):
    /// `.kafka_property("linger.ms", "0")`.
    pub fn kafka_property(mut self, key: &str, value: &str) -> Self {
        set(&mut self.kafka_properties, &key.toml(), value.toml());
        self
    }

    /// No `[kafka]` section.
    pub fn without_kafka(mut self) -> Self {
        self.kafka = None;
        self
    }

    /// A key of `[pipeline]`: `.pipeline("batch_deadline", "1ms")`,
    /// `.pipeline("batch_size", 50)`.
    pub fn pipeline(mut self, key: &str, value: impl TomlValue) -> Self {
        set(&mut self.pipeline, key, value.toml());
        self
    }

    /// `metrics.listen`.
    pub fn metrics_listen(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics_listen = Some(addr);
        self
    }

    /// A line written as it is into `section` (`""`: the top level), after the keys
    /// the builder writes there: for configs the daemon must refuse (an unknown key, a
    /// value of the wrong type).
    pub fn raw(mut self, section: &str, line: &str) -> Self {
        self.raw.push((section.into(), line.into()));
        self
    }

    /// The `postgres.slot` it writes.
    pub fn slot_name(&self) -> &str {
        &self.slot
    }

    /// The config's text (`rules.path = "rules.toml"`).
    pub fn toml(&self) -> String {
        let mut out = String::new();
        let raw = |out: &mut String, section: &str| {
            for (s, line) in &self.raw {
                if s == section {
                    writeln!(out, "{line}").unwrap();
                }
            }
        };
        writeln!(out, "name = {}", self.name.toml()).unwrap();
        raw(&mut out, "");
        let mut postgres = vec![
            ("url".to_string(), self.url.toml()),
            ("slot".to_string(), self.slot.toml()),
            ("publication".to_string(), self.publication.toml()),
        ];
        if let Some(create) = self.create {
            postgres.push(("create".into(), create.toml()));
        }
        let sections = [
            ("postgres", Some(postgres)),
            ("rules", Some(vec![("path".into(), RULES_FILE.toml())])),
            ("redis", self.redis.clone()),
            ("kafka", self.kafka.clone()),
            (
                "kafka.properties",
                (!self.kafka_properties.is_empty()).then(|| self.kafka_properties.clone()),
            ),
            (
                "pipeline",
                (!self.pipeline.is_empty()).then(|| self.pipeline.clone()),
            ),
            (
                "metrics",
                self.metrics_listen
                    .map(|a| vec![("listen".into(), a.to_string().toml())]),
            ),
        ];
        for (section, keys) in sections {
            let has_raw = self.raw.iter().any(|(s, _)| s == section);
            let Some(keys) = keys.or_else(|| has_raw.then(Vec::new)) else {
                continue;
            };
            writeln!(out, "[{section}]").unwrap();
            for (k, v) in keys {
                writeln!(out, "{k} = {v}").unwrap();
            }
            raw(&mut out, section);
        }
        out
    }

    /// Writes the rules (`rules.toml`) and the config (`wal2cache.toml`) into `dir`;
    /// the config's path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        std::fs::write(dir.join(RULES_FILE), &self.rules).unwrap();
        let config = dir.join("wal2cache.toml");
        std::fs::write(&config, self.toml()).unwrap();
        config
    }
}

fn set(keys: &mut Vec<(String, String)>, key: &str, value: String) {
    match keys.iter_mut().find(|(k, _)| k == key) {
        Some((_, v)) => *v = value,
        None => keys.push((key.into(), value)),
    }
}
