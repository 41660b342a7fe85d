//! Where PostgreSQL is and how to log in: `postgres.url` parsed once (libpq's URL or
//! keyword form, its TLS options included), and the password from the URL,
//! `postgres.password` (for the environment override) or `postgres.password_file`.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::{Host, TargetSessionAttrs};
use tokio_postgres::Client;

use crate::source::conninfo;
use crate::source::error::SourceError;
use crate::source::tls::PgTls;

/// Where the password comes from.
#[derive(Clone)]
enum Password {
    None,
    Given(String),
    /// Read on every connection, so that a rotated secret is used from the next one.
    File(PathBuf),
}

/// Where Postgres is, parsed once from `postgres.url`.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    pub host: String,
    pub port: u16,
    pub user: String,
    password: Password,
    pub database: String,
    pub tls: PgTls,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgTarget({})", self.display())
    }
}

impl PgTarget {
    pub fn parse(url: &str) -> Result<Self, SourceError> {
        let extracted =
            conninfo::extract(url, crate::source::tls::OPTIONS).map_err(SourceError::Url)?;
        let tls = PgTls::from_options(&extracted.options).map_err(SourceError::Url)?;
        let mut config = tokio_postgres::Config::from_str(&extracted.rest).map_err(|e| {
            SourceError::Url(format!(
                "{}: expected postgres://user:password@host:port/database",
                crate::source::error::pg_error(&e)
            ))
        })?;
        config.ssl_mode(tls.tokio_mode());
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "127.0.0.1".to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        if config.get_hosts().len() > 1 {
            // Several servers (libpq's failover syntax): wal2cache always wants the
            // primary, as `target_session_attrs=read-write` asks.
            if config.get_target_session_attrs() == TargetSessionAttrs::ReadOnly {
                return Err(SourceError::Url(
                    "target_session_attrs=read-only: wal2cache streams from the primary; list the hosts with target_session_attrs=read-write".into(),
                ));
            }
            config.target_session_attrs(TargetSessionAttrs::ReadWrite);
        }
        let user = config
            .get_user()
            .ok_or_else(|| {
                SourceError::Url("no user given: write postgres://USER@host/database".into())
            })?
            .to_string();
        let password = match config.get_password() {
            Some(p) => Password::Given(String::from_utf8_lossy(p).into_owned()),
            None => Password::None,
        };
        let database = config.get_dbname().unwrap_or(&user).to_string();
        Ok(PgTarget {
            config,
            host,
            port,
            user,
            password,
            database,
            tls,
        })
    }

    /// The password given apart from the URL (`postgres.password`).
    pub fn with_password(mut self, password: String) -> Self {
        self.password = Password::Given(password);
        self
    }

    /// The password read from a file at every connection (`postgres.password_file`).
    pub fn with_password_file(mut self, path: PathBuf) -> Self {
        self.password = Password::File(path);
        self
    }

    /// Whether the URL itself carries a password.
    pub fn url_has_password(&self) -> bool {
        self.config.get_password().is_some()
    }

    /// The address without the password, for logs and errors (every host, when there
    /// are several).
    pub fn display(&self) -> String {
        let hosts = self
            .hosts()
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        format!("postgres://{}@{hosts}/{}", self.user, self.database)
    }

    /// Every server the URL lists, with its port (libpq's rule: one port for all, or
    /// one each).
    pub fn hosts(&self) -> Vec<(String, u16)> {
        let ports = self.config.get_ports();
        self.config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    Host::Tcp(h) => h.clone(),
                    #[cfg(unix)]
                    Host::Unix(p) => p.display().to_string(),
                };
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                (host, port)
            })
            .collect()
    }

    /// The same login and options, on one of the servers only.
    fn on_host(&self, host: &str, port: u16) -> PgTarget {
        let c = &self.config;
        let mut config = tokio_postgres::Config::new();
        if let Some(user) = c.get_user() {
            config.user(user);
        }
        if let Some(password) = c.get_password() {
            config.password(password);
        }
        if let Some(dbname) = c.get_dbname() {
            config.dbname(dbname);
        }
        if let Some(options) = c.get_options() {
            config.options(options);
        }
        if let Some(timeout) = c.get_connect_timeout() {
            config.connect_timeout(*timeout);
        }
        config
            .ssl_mode(c.get_ssl_mode())
            .channel_binding(c.get_channel_binding())
            .keepalives(c.get_keepalives())
            .keepalives_idle(c.get_keepalives_idle())
            .host(host)
            .port(port);
        if let Some(interval) = c.get_keepalives_interval() {
            config.keepalives_interval(interval);
        }
        if let Some(retries) = c.get_keepalives_retries() {
            config.keepalives_retries(retries);
        }
        PgTarget {
            config,
            host: host.to_string(),
            port,
            ..self.clone()
        }
    }

    /// The primary among the servers the URL lists (itself when it lists one): the
    /// first, in order, that answers and is not in recovery. The replication
    /// connection goes to one server; after a failover this finds the new primary.
    pub async fn primary(&self) -> Result<PgTarget, SourceError> {
        let hosts = self.hosts();
        if hosts.len() <= 1 {
            return Ok(self.clone());
        }
        let mut found = Vec::with_capacity(hosts.len());
        for (host, port) in hosts {
            let one = self.on_host(&host, port);
            let answer = match one.connect().await {
                Ok(client) => client
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .map(|row| row.get::<_, bool>(0))
                    .map_err(|e| crate::source::error::pg_error(&e)),
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok(false) => return Ok(one),
                Ok(true) => found.push(format!("{host}:{port} is a standby")),
                Err(e) => found.push(format!("{host}:{port}: {e}")),
            }
        }
        Err(SourceError::NoPrimary {
            hosts: found.join("; "),
        })
    }

    /// The primary, and what every replication connection to it shares: host, user,
    /// password, database, `slot`, `publication`, port and TLS. Under `verify-ca` an
    /// ordinary connection first learns the names the server's certificate carries
    /// (see `PgTls::replication`).
    pub(crate) async fn replication(
        &self,
        slot: &str,
        publication: &str,
    ) -> Result<(PgTarget, pgwire_replication::ReplicationConfig), SourceError> {
        let t = self.primary().await?;
        if t.tls.mode == crate::source::tls::SslMode::VerifyCa {
            drop(t.connect().await?);
        }
        let config = pgwire_replication::ReplicationConfig::new(
            t.host.clone(),
            t.user.clone(),
            t.password()?,
            t.database.clone(),
            slot.to_string(),
            publication,
        )
        .with_port(t.port)
        .with_tls(t.tls.replication(&t.host));
        Ok((t, config))
    }

    /// An error of a replication connection to this server on `slot`, explained.
    pub(crate) fn replication_error(
        &self,
        e: pgwire_replication::PgWireError,
        slot: &str,
    ) -> SourceError {
        match e {
            pgwire_replication::PgWireError::Tls(m) => self.tls_error(m),
            e => SourceError::from_replication(e, slot, &self.user),
        }
    }

    /// The password to log in with now: a password file is read each time, its
    /// trailing newline dropped.
    pub(crate) fn password(&self) -> Result<String, SourceError> {
        match &self.password {
            Password::None => Ok(String::new()),
            Password::Given(p) => Ok(p.clone()),
            Password::File(path) => read_password_file(path),
        }
    }

    /// An ordinary (non-replication) connection; its driver task runs in the background.
    pub async fn connect(&self) -> Result<Client, SourceError> {
        let mut config = self.config.clone();
        config.connect_timeout(Duration::from_secs(10));
        config.application_name("wal2cache");
        if !matches!(self.password, Password::None) {
            config.password(self.password()?);
        }
        let tls = self
            .tls
            .connector()
            .map_err(|problem| self.tls_error(problem))?;
        let (client, connection) =
            config
                .connect(tls)
                .await
                .map_err(|source| match source.code().map(|c| c.code()) {
                    Some("28P01" | "28000") => SourceError::Auth {
                        role: self.user.clone(),
                        detail: source
                            .as_db_error()
                            .map(|d| d.message().to_string())
                            .unwrap_or_default(),
                    },
                    Some(_) => SourceError::Connect {
                        target: self.display(),
                        source,
                    },
                    None => {
                        let text = crate::source::error::pg_error(&source);
                        self.explained_tls(&text).unwrap_or(SourceError::Connect {
                            target: self.display(),
                            source,
                        })
                    }
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection closed");
            }
        });
        Ok(client)
    }

    /// A TLS failure of either connection, explained; one that names no setting (a
    /// handshake cut short by a restarting server) is retried.
    pub(crate) fn tls_error(&self, text: String) -> SourceError {
        self.explained_tls(&text).unwrap_or(SourceError::Tls {
            target: self.display(),
            problem: text,
            retry: true,
        })
    }

    /// A failure whose text names a TLS setting to fix (not retried), if it is one.
    fn explained_tls(&self, text: &str) -> Option<SourceError> {
        crate::source::tls::explain(text, &self.tls, &self.host).map(|problem| SourceError::Tls {
            target: self.display(),
            problem,
            retry: false,
        })
    }
}

fn read_password_file(path: &std::path::Path) -> Result<String, SourceError> {
    crate::secret::read_secret_file("postgres.password_file", path)
        .map_err(SourceError::PasswordFile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_hides_the_password() {
        let t = PgTarget::parse("postgres://app:s3cret@db.example:6432/shop").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.user.as_str()),
            ("db.example", 6432, "app")
        );
        assert_eq!(t.database, "shop");
        assert_eq!(t.password().unwrap(), "s3cret");
        assert!(t.url_has_password());
        assert!(!t.display().contains("s3cret"));
        assert!(format!("{t:?}").contains("db.example") && !format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn takes_the_tls_options_libpq_takes() {
        let t =
            PgTarget::parse("postgres://app@db/shop?sslmode=require&connect_timeout=5").unwrap();
        assert_eq!(t.tls.mode, crate::source::tls::SslMode::Require);
        let t = PgTarget::parse("host=db user=app dbname=shop sslmode=disable").unwrap();
        assert_eq!(t.tls.mode, crate::source::tls::SslMode::Disable);
        assert_eq!(t.database, "shop");
        let err = PgTarget::parse("postgres://app@db/shop?sslmode=verify-full")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no sslrootcert"), "{err}");
    }

    #[test]
    fn a_password_file_is_read_at_each_connection() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        let t = PgTarget::parse("postgres://app@db/shop")
            .unwrap()
            .with_password_file(file.clone());
        assert!(!t.url_has_password());
        let err = t.password().unwrap_err().to_string();
        assert!(
            err.contains("cannot be read") && err.contains("pw"),
            "{err}"
        );
        std::fs::write(&file, "first\n").unwrap();
        assert_eq!(t.password().unwrap(), "first");
        std::fs::write(&file, "second\r\n").unwrap();
        assert_eq!(t.password().unwrap(), "second", "rotated");
        std::fs::write(&file, "\n").unwrap();
        assert!(t.password().unwrap_err().to_string().contains("is empty"));
    }

    #[test]
    fn a_handshake_cut_short_is_retried_and_a_setting_is_not() {
        use crate::source::ErrorKind;
        let t = PgTarget::parse("postgres://app@db/shop?sslmode=require").unwrap();
        for cut in [
            "error performing TLS handshake: Connection reset by peer (os error 104)",
            "TLS handshake failed: unexpected end of file",
        ] {
            assert_eq!(
                t.tls_error(cut.into()).kind(),
                ErrorKind::Transient,
                "{cut}"
            );
        }
        for setting in [
            "TLS handshake failed: invalid peer certificate: UnknownIssuer",
            "server does not support TLS (SSLRequest rejected)",
            "TLS handshake failed: received fatal alert: CertificateRequired",
        ] {
            assert_eq!(
                t.tls_error(setting.into()).kind(),
                ErrorKind::Fatal,
                "{setting}"
            );
        }
    }

    #[test]
    fn says_why_a_url_does_not_parse() {
        let err = PgTarget::parse("postgres://u@h:notaport/db")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid value for option `port`"), "{err}");
    }

    #[test]
    fn rejects_what_it_cannot_serve() {
        assert!(PgTarget::parse("not a url at all ::").is_err());
        assert!(PgTarget::parse("postgres://db/shop").is_err(), "no user");
        assert!(
            PgTarget::parse("postgres://u@a,b/shop?target_session_attrs=read-only").is_err(),
            "two hosts, read-only"
        );
    }

    #[test]
    fn several_hosts_are_tried_for_a_read_write_server() {
        let t = PgTarget::parse("postgres://u@db1:5433,db2/shop").unwrap();
        assert_eq!(
            t.hosts(),
            [("db1".to_string(), 5433), ("db2".to_string(), 5432)]
        );
        assert_eq!(t.display(), "postgres://u@db1:5433,db2:5432/shop");
        assert_eq!(
            t.config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        let one = t.on_host("db2", 5432);
        assert_eq!(one.display(), "postgres://u@db2:5432/shop");
        assert_eq!(one.config.get_dbname(), Some("shop"));
        let same_port = PgTarget::parse("postgres://u@a,b:6000/shop").unwrap();
        assert_eq!(same_port.hosts().len(), 2);
    }
}
