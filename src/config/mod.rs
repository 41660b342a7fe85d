//! The configuration file (`wal2cache.toml`), read with the `config` crate: the file,
//! then `WAL2CACHE__SECTION__KEY` environment variables over it. Unknown keys are
//! errors, and every problem found is reported at once, naming the file and the key.
//!
//! Each section is read on its own, with `serde_ignored` collecting the keys its type
//! does not have (the types do not `deny_unknown_fields`, which would stop at the
//! first): so one section's problem does not hide another's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::redact::redact;
use crate::source::target::PgTarget;

mod sections;
pub use sections::*;

#[derive(Debug, Clone)]
pub struct Config {
    /// Appears in every event as `source`.
    pub name: String,
    pub postgres: PostgresConfig,
    /// `postgres.url`, parsed when the config was loaded.
    pub target: PgTarget,
    pub rules: RulesConfig,
    pub redis: Option<RedisConfig>,
    pub kafka: Option<KafkaConfig>,
    pub pipeline: PipelineConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub backfill: BackfillConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("config file {path} is invalid:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("the config has no {} section: `wal2cache run` needs {} (see the README's Configuration)", sections(.0), if .0.len() == 1 { "it" } else { "them" })]
    MissingSections(Vec<&'static str>),
}

/// `[redis]` or `[redis] and [kafka]`.
fn sections(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("[{n}]"))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The top-level keys: each is read by `Config::from_sections`.
const SECTIONS: [&str; 9] = [
    "name", "postgres", "rules", "redis", "kafka", "pipeline", "metrics", "log", "backfill",
];

impl Config {
    /// Reads the file, applies environment overrides, checks every field.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let load_err = |message: String| ConfigError::Load {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(load_err(
                "no such file: pass the path of a wal2cache.toml with --config".into(),
            ));
        }
        let root = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("WAL2CACHE")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .and_then(config::Config::try_deserialize::<config::Map<String, config::Value>>)
            .map_err(|e| load_err(e.to_string()))?;
        let invalid = |problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        };
        let mut config = Config::from_sections(&root).map_err(invalid)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.rules.path.is_relative() {
            config.rules.path = base.join(&config.rules.path);
        }
        if let Some(redis) = &mut config.redis {
            for file in [
                &mut redis.ca_file,
                &mut redis.cert_file,
                &mut redis.key_file,
                &mut redis.password_file,
            ]
            .into_iter()
            .flatten()
            {
                *file = base.join(&*file);
            }
            let problems = crate::sink::redis::access_problems(redis);
            if !problems.is_empty() {
                return Err(invalid(problems));
            }
        }
        if let Some(kafka) = &mut config.kafka {
            if let Some(file) = &mut kafka.sasl_password_file {
                *file = base.join(&*file);
                let mut problems = Vec::new();
                if kafka.properties.contains_key("sasl.password") {
                    problems.push("kafka: the SASL password is given twice (in kafka.properties \"sasl.password\" and kafka.sasl_password_file): keep one".to_string());
                }
                if let Err(e) = crate::secret::read_secret_file("kafka.sasl_password_file", file) {
                    problems.push(e);
                }
                if !problems.is_empty() {
                    return Err(invalid(problems));
                }
            }
        }
        if let Some(file) = &config.postgres.password_file {
            let file = base.join(file);
            config.target = config.target.with_password_file(file.clone());
            config.postgres.password_file = Some(file);
            // Read once now, so that a missing secret is reported by `check`.
            if let Err(e) = config.target.password() {
                return Err(invalid(vec![e.to_string()]));
            }
        }
        Ok(config)
    }

    /// Every section, or every problem of every section: unknown keys, values of the
    /// wrong type, missing sections, and what `problems` finds in the ones that read.
    fn from_sections(root: &config::Map<String, config::Value>) -> Result<Config, Vec<String>> {
        let mut problems: Vec<String> = root
            .keys()
            .filter(|k| !SECTIONS.contains(&k.as_str()))
            .map(|k| {
                format!(
                    "{k}: unknown key (the top level has {})",
                    SECTIONS.join(", ")
                )
            })
            .collect();
        let p = &mut problems;
        let name: Option<String> = read_section(root, "name", p);
        let postgres: Option<PostgresConfig> = read_section(root, "postgres", p);
        let rules: Option<RulesConfig> = read_section(root, "rules", p);
        let redis: Option<RedisConfig> = read_section(root, "redis", p);
        let kafka: Option<KafkaConfig> = read_section(root, "kafka", p);
        let pipeline: Option<PipelineConfig> = read_section(root, "pipeline", p);
        let metrics: Option<MetricsConfig> = read_section(root, "metrics", p);
        let log: Option<LogConfig> = read_section(root, "log", p);
        let backfill: Option<BackfillConfig> = read_section(root, "backfill", p);
        for (key, present, what) in [
            (
                "name",
                name.is_some(),
                "name = \"...\" (it names this source in every event)",
            ),
            (
                "postgres",
                postgres.is_some(),
                "a [postgres] section with its url",
            ),
            (
                "rules",
                rules.is_some(),
                "a [rules] section with the path of the rules file",
            ),
        ] {
            if !present && !root.contains_key(key) {
                problems.push(format!("{key}: missing: add {what}"));
            }
        }
        let pipeline = pipeline.unwrap_or_default();
        let metrics = metrics.unwrap_or_default();
        let log = log.unwrap_or_default();
        let backfill = backfill.unwrap_or_default();
        if backfill.max_duration > BackfillConfig::MAX_RUN {
            problems.push(format!(
                "backfill.max_duration = {:?}: over {}h, the longest a backfill may run (a row deleted while it runs stays deleted only while the delete's tombstone lives, a day): lower it, and backfill big tables one at a time with --table",
                backfill.max_duration,
                BackfillConfig::MAX_RUN.as_secs() / 3600
            ));
        }
        if backfill.page_time.is_zero() || backfill.statement_timeout.is_zero() {
            problems.push(
                "backfill.page_time and backfill.statement_timeout: must be more than 0s".into(),
            );
        }
        if let (Some(name), Some(postgres)) = (&name, &postgres) {
            problems.extend(Config::problems(
                name,
                postgres,
                &pipeline,
                redis.as_ref(),
                kafka.as_ref(),
            ));
        }
        let target = postgres
            .as_ref()
            .and_then(|pg| match PgTarget::parse(&pg.url) {
                Ok(target) => {
                    let sources = [
                        ("the password in postgres.url", target.url_has_password()),
                        ("postgres.password", pg.password.is_some()),
                        ("postgres.password_file", pg.password_file.is_some()),
                    ]
                    .into_iter()
                    .filter(|(_, given)| *given)
                    .map(|(what, _)| what)
                    .collect::<Vec<_>>();
                    if sources.len() > 1 {
                        problems.push(format!(
                            "postgres: the password is given twice ({}): keep one",
                            sources.join(" and ")
                        ));
                    }
                    Some(match &pg.password {
                        Some(password) => target.with_password(password.clone()),
                        None => target,
                    })
                }
                Err(crate::source::SourceError::Url(why)) => {
                    problems.push(format!("postgres.url = {:?}: {why}", redact(&pg.url)));
                    None
                }
                Err(e) => {
                    problems.push(format!("postgres.url: {e}"));
                    None
                }
            });
        match (name, postgres, rules, target) {
            (Some(name), Some(postgres), Some(rules), Some(target)) if problems.is_empty() => {
                Ok(Config {
                    name,
                    postgres,
                    target,
                    rules,
                    redis,
                    kafka,
                    pipeline,
                    metrics,
                    log,
                    backfill,
                })
            }
            _ => Err(problems),
        }
    }

    /// What is wrong inside the sections that read.
    fn problems(
        name: &str,
        postgres: &PostgresConfig,
        pipeline: &PipelineConfig,
        redis: Option<&RedisConfig>,
        kafka: Option<&KafkaConfig>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        if name.trim().is_empty() {
            problems.push("name: must not be empty (it names this source in every event)".into());
        }
        if pipeline.batch_size == 0 {
            problems.push("pipeline.batch_size: must be at least 1".into());
        }
        if let Some(k) = kafka {
            if k.partitions < 1 {
                problems.push(format!(
                    "kafka.partitions = {}: must be at least 1",
                    k.partitions
                ));
            }
            let min = crate::sink::fit::MIN_EVENT_BYTES;
            if k.max_event_bytes < min {
                problems.push(format!(
                    "kafka.max_event_bytes = {}: must be at least {min} (a flush_all event with its detail must fit)",
                    k.max_event_bytes
                ));
            }
        }
        if let Some(r) = redis {
            if !r.cluster {
                use redis::IntoConnectionInfo;
                if let Err(e) = r.url.as_str().into_connection_info() {
                    problems.push(format!(
                        "redis.url: not a Redis URL ({:?}): {e}; write redis://[user:password@]host[:port][/db]",
                        redact(&r.url)
                    ));
                }
            }
            if !r.cluster && !r.nodes.is_empty() {
                problems.push(
                    "redis.nodes: only used with redis.cluster = true (a single server takes redis.url alone)"
                        .into(),
                );
            }
            if r.cluster {
                let seeds = std::iter::once(("redis.url".to_string(), &r.url)).chain(
                    r.nodes
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (format!("redis.nodes[{i}]"), n)),
                );
                for (field, url) in seeds {
                    use redis::IntoConnectionInfo;
                    match url.as_str().into_connection_info() {
                        Err(e) => problems
                            .push(format!("{field}: not a Redis URL ({:?}): {e}", redact(url))),
                        Ok(info) => {
                            if matches!(info.addr(), redis::ConnectionAddr::Unix(_)) {
                                problems.push(format!(
                                    "{field}: a Redis Cluster is reached over TCP (its nodes announce IP addresses), not a Unix socket"
                                ));
                            }
                            if info.redis_settings().db() != 0 {
                                problems.push(format!(
                                    "{field}: a Redis Cluster has only database 0: remove /{} from the URL",
                                    info.redis_settings().db()
                                ));
                            }
                        }
                    }
                }
            }
        }
        for (field, value) in [
            ("postgres.slot", &postgres.slot),
            ("postgres.publication", &postgres.publication),
        ] {
            if let Err(why) = check_identifier(value) {
                problems.push(format!("{field} = {value:?}: {why}"));
            }
        }
        problems
    }

    pub fn pg_target(&self) -> PgTarget {
        self.target.clone()
    }

    /// The sections `run` needs beside `[postgres]` and `[rules]`: both, or every one
    /// that is missing (so that `check` reports them, not only `run`).
    pub fn sinks(&self) -> Result<(&RedisConfig, &KafkaConfig), ConfigError> {
        match (&self.redis, &self.kafka) {
            (Some(r), Some(k)) => Ok((r, k)),
            (r, k) => Err(ConfigError::MissingSections(
                [("redis", r.is_none()), ("kafka", k.is_none())]
                    .into_iter()
                    .filter(|(_, missing)| *missing)
                    .map(|(s, _)| s)
                    .collect(),
            )),
        }
    }
}

/// One top-level key read as `T`; `None`, with its problems added, when it is absent
/// or does not read. A key `T` does not have is a problem named by its path
/// (`postgres.slott`), whether or not the rest of the section reads.
fn read_section<T: serde::de::DeserializeOwned>(
    root: &config::Map<String, config::Value>,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    let value = root.get(key)?;
    let mut unknown = std::collections::BTreeSet::new();
    let fields = field_names::<T>();
    if let (Some(fields), Ok(table)) = (fields, value.clone().into_table()) {
        unknown.extend(
            table
                .keys()
                .filter(|k| !fields.contains(&k.as_str()))
                .map(|k| format!("{key}.{k}")),
        );
    }
    // Read as the one entry of a table, so errors name the key (`pipeline.batch_size`).
    let table = config::Value::new(None, config::Map::from([(key.to_string(), value.clone())]));
    let read: Result<BTreeMap<String, T>, _> = serde_ignored::deserialize(table, |path| {
        unknown.insert(path.to_string());
    });
    problems.extend(unknown.into_iter().map(|path| match fields {
        Some(fields) => format!("{path}: unknown key ([{key}] has {})", fields.join(", ")),
        None => format!("{path}: unknown key (see the README's Configuration)"),
    }));
    match read {
        Ok(mut map) => map.remove(key),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    }
}

/// The keys of a config struct, as its derived `Deserialize` names them (`None` for
/// what is not a struct): asked of `T` through a deserializer that only records them.
fn field_names<T: serde::de::DeserializeOwned>() -> Option<&'static [&'static str]> {
    use serde::de::{Error, Visitor};
    type Err = serde::de::value::Error;
    struct Probe<'a>(&'a mut Option<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = Err;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Err> {
            Err(Err::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Err> {
            *self.0 = Some(fields);
            Err(Err::custom("fields recorded"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }
    let mut fields = None;
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// Slot names may only hold lower-case letters, digits and underscores (Postgres's
/// rule); publications follow the same rule here so they need no quoting anywhere.
pub fn check_identifier(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err("may only contain lower-case letters, digits and underscores");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    const GOOD: &str = r#"
name = "main-db"
[postgres]
url = "postgres://wal2cache@127.0.0.1:5432/app"
[rules]
path = "rules/example.toml"
[redis]
url = "redis://127.0.0.1:6379/0"
[kafka]
brokers = "127.0.0.1:9092"
[kafka.properties]
"linger.ms" = "0"
"#;

    #[test]
    fn loads_the_documented_example_with_defaults() {
        let f = write(GOOD);
        let c = Config::load(f.path()).unwrap();
        assert_eq!(c.postgres.slot, "wal2cache");
        assert_eq!(c.postgres.publication, "wal2cache");
        assert!(c.postgres.create);
        assert_eq!(c.redis.unwrap().tag_prefix, "tag:");
        let kafka = c.kafka.unwrap();
        assert_eq!(kafka.topic, "wal2cache.invalidations");
        assert_eq!(kafka.properties["linger.ms"], "0");
        assert_eq!(
            c.rules.path,
            f.path().parent().unwrap().join("rules/example.toml")
        );
    }

    #[test]
    fn backfill_keys_have_defaults_and_no_backfill_outlives_the_tombstones() {
        let c = Config::load(write(GOOD).path()).unwrap();
        assert_eq!(
            c.backfill.max_duration,
            std::time::Duration::from_secs(3600)
        );
        assert_eq!(c.backfill.page_time, std::time::Duration::from_millis(500));
        let text = GOOD.to_string() + "[backfill]\nmax_duration = \"2h\"\npage_time = \"1s\"\n";
        let c = Config::load(write(&text).path()).unwrap();
        assert_eq!(
            c.backfill.max_duration,
            std::time::Duration::from_secs(7200)
        );
        assert_eq!(c.backfill.page_time, std::time::Duration::from_secs(1));
        let text = GOOD.to_string() + "[backfill]\nmax_duration = \"30h\"\n";
        let err = Config::load(write(&text).path()).unwrap_err().to_string();
        assert!(
            err.contains("backfill.max_duration") && err.contains("tombstone"),
            "{err}"
        );
    }

    #[test]
    fn the_operator_keys_have_defaults_and_read_durations_and_formats() {
        let c = Config::load(write(GOOD).path()).unwrap();
        assert_eq!(c.postgres.takeover, std::time::Duration::from_secs(1));
        assert_eq!(c.metrics.ready_max_lag, std::time::Duration::from_secs(30));
        assert_eq!(c.metrics.slot_poll, std::time::Duration::from_secs(10));
        assert_eq!(c.log.format, None);
        let text = GOOD.replace("[postgres]", "[postgres]\ntakeover = \"250ms\"")
            + "[metrics]\nready_max_lag = \"5s\"\nslot_poll = \"2s\"\n[log]\nformat = \"json\"\n";
        let c = Config::load(write(&text).path()).unwrap();
        assert_eq!(c.postgres.takeover, std::time::Duration::from_millis(250));
        assert_eq!(c.metrics.ready_max_lag, std::time::Duration::from_secs(5));
        assert_eq!(c.metrics.slot_poll, std::time::Duration::from_secs(2));
        assert_eq!(c.log.format, Some(LogFormat::Json));
        let err = Config::load(write(&(GOOD.to_string() + "[log]\nformat = \"xml\"\n")).path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.format"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_them() {
        let f = write(&GOOD.replace("[postgres]", "[postgres]\nslott = \"x\""));
        let err = Config::load(f.path()).unwrap_err().to_string();
        assert!(err.contains("slott"), "{err}");
        assert!(err.contains(&f.path().display().to_string()), "{err}");
    }

    #[test]
    fn every_problem_is_listed() {
        let text = GOOD.replace("name = \"main-db\"", "name = \"\"").replace(
            "[postgres]",
            "[postgres]\nslot = \"Bad-Slot\"\npublication = \"p p\"",
        );
        let f = write(&text);
        let err = Config::load(f.path()).unwrap_err().to_string();
        for needle in ["name:", "postgres.slot", "postgres.publication"] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
    }

    #[test]
    fn every_unknown_key_of_every_section_is_listed_with_its_path() {
        let text = GOOD
            .replace("name = \"main-db\"", "name = \"main-db\"\nnmae = \"x\"")
            .replace(
                "[postgres]",
                "[postgres]\nslott = \"x\"\npublication = \"P\"",
            )
            .replace("[redis]", "[redis]\nurll = \"x\"")
            .replace("[kafka]", "[kafka]\ntopicc = \"x\"\nbrokerz = \"y\"")
            + "[pipeline]\nbatch_size = \"lots\"\n[metrics]\nlisten = \"nowhere\"\nport = 1\n";
        let f = write(&text);
        let err = Config::load(f.path()).unwrap_err().to_string();
        for needle in [
            "nmae: unknown key",
            "postgres.slott: unknown key ([postgres] has url, slot, publication, create, password, password_file, failover_slot, on_slot_loss, takeover)",
            "redis.urll: unknown key",
            "kafka.topicc: unknown key",
            "kafka.brokerz: unknown key",
            "metrics.port: unknown key",
            "pipeline.batch_size",
            "metrics.listen",
            "postgres.publication = \"P\"",
        ] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
        assert_eq!(
            err.lines().filter(|l| l.starts_with("  - ")).count(),
            9,
            "{err}"
        );
    }

    #[test]
    fn missing_sections_are_listed_together() {
        let f = write("[redis]\nurl = \"redis://127.0.0.1\"\n");
        let err = Config::load(f.path()).unwrap_err().to_string();
        for needle in ["name: missing", "postgres: missing", "rules: missing"] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
    }

    #[test]
    fn malformed_urls_are_problems_shown_without_their_password() {
        let text = GOOD
            .replace("redis://127.0.0.1:6379/0", "redis//:secret@host/0")
            .replace(
                "postgres://wal2cache@127.0.0.1:5432/app",
                "postgres//u:secret@h:x/app",
            );
        let f = write(&text);
        let err = Config::load(f.path()).unwrap_err().to_string();
        assert!(
            err.contains("redis.url: not a Redis URL (\"redis//:***@host/0\")"),
            "{err}"
        );
        assert!(
            err.contains("postgres.url = \"postgres//u:***@h:x/app\""),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
        let cluster = GOOD
            .replace("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379")
            .replace(
                "[redis]",
                "[redis]\ncluster = true\nnodes = [\"redis//:secret@h\"]",
            );
        let f = write(&cluster);
        let err = Config::load(f.path()).unwrap_err().to_string();
        assert!(
            err.contains("redis.nodes[0]: not a Redis URL (\"redis//:***@h\")"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn event_size_and_sink_error_bound_are_read_and_checked() {
        let f = write(&GOOD.replace(
            "[kafka]\n",
            "[pipeline]\nsink_error_after = \"90s\"\n[kafka]\nmax_event_bytes = 500000\n",
        ));
        let c = Config::load(f.path()).unwrap();
        assert_eq!(c.kafka.unwrap().max_event_bytes, 500_000);
        assert_eq!(
            c.pipeline.sink_error_after,
            std::time::Duration::from_secs(90)
        );
        let defaults = Config::load(write(GOOD).path()).unwrap();
        assert_eq!(defaults.kafka.unwrap().max_event_bytes, 900_000);
        assert_eq!(
            defaults.pipeline.sink_error_after,
            std::time::Duration::from_secs(300)
        );
        let f = write(&GOOD.replace("[kafka]\n", "[kafka]\nmax_event_bytes = 100\n"));
        let err = Config::load(f.path()).unwrap_err().to_string();
        assert!(err.contains("kafka.max_event_bytes = 100"), "{err}");
    }

    #[test]
    fn a_missing_file_says_so() {
        let err = Config::load(Path::new("/nonexistent/w2c.toml")).unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
    }
}
