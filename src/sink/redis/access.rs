//! How the sink reaches Redis: TLS (`rediss://`, the server verified against the
//! system's roots or `redis.ca_file`, an optional client certificate, or, for test
//! setups only, `redis.insecure_skip_verify`) and authentication (an ACL user and
//! password in the URL, or the password from `redis.password_file`). The same for
//! every node of a cluster.

use std::path::Path;

use redis::cluster::ClusterClientBuilder;
use redis::{Client, ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, TlsCertificates};

use crate::config::RedisConfig;
use crate::redact::redact;
use crate::sink::{SinkError, SinkErrorKind};

/// What is wrong with the TLS and password settings of `[redis]`, for `check` (files
/// are read here, so that a missing one is reported when the config loads).
pub fn problems(config: &RedisConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let tls = config.url.trim_start().starts_with("rediss://");
    for (key, file) in [
        ("redis.ca_file", &config.ca_file),
        ("redis.cert_file", &config.cert_file),
        ("redis.key_file", &config.key_file),
    ] {
        if let Some(file) = file {
            if !tls {
                problems.push(format!(
                    "{key}: set, but redis.url is not a rediss:// URL: write rediss://host:port for TLS"
                ));
            }
            if let Err(e) = std::fs::read(file) {
                problems.push(format!("{key} = {}: cannot be read: {e}", file.display()));
            }
        }
    }
    if config.cert_file.is_some() != config.key_file.is_some() {
        problems.push("redis.cert_file and redis.key_file: a client certificate needs both".into());
    }
    if config.insecure_skip_verify && !tls {
        problems
            .push("redis.insecure_skip_verify: set, but redis.url is not a rediss:// URL".into());
    }
    if let Some(file) = &config.password_file {
        if has_password(&config.url) {
            problems.push(
                "redis: the password is given twice (in redis.url and redis.password_file): keep one"
                    .into(),
            );
        }
        if let Err(e) = read_password(file) {
            problems.push(e);
        }
    }
    problems
}

fn has_password(url: &str) -> bool {
    url.into_connection_info()
        .is_ok_and(|info| info.redis_settings().password().is_some())
}

fn read_password(file: &Path) -> Result<String, String> {
    crate::secret::read_secret_file("redis.password_file", file)
}

fn stop(message: String) -> SinkError {
    SinkError::redis(message, None, SinkErrorKind::Stop)
}

/// The certificates to trust and to present, when any is configured.
fn certificates(config: &RedisConfig) -> Result<Option<TlsCertificates>, SinkError> {
    let read = |key: &str, file: &Path| {
        std::fs::read(file)
            .map_err(|e| stop(format!("{key} = {}: cannot be read: {e}", file.display())))
    };
    let root_cert = config
        .ca_file
        .as_deref()
        .map(|f| read("redis.ca_file", f))
        .transpose()?;
    let client_tls = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read("redis.cert_file", cert)?,
            client_key: read("redis.key_file", key)?,
        }),
        _ => None,
    };
    Ok(
        (root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates {
            client_tls,
            root_cert,
        }),
    )
}

/// rustls' process-wide provider, which the redis crate's TLS uses: two are built in
/// (ring, and aws-lc-rs which the replication crate brings), so none is chosen by
/// itself. ring, as for PostgreSQL. Idempotent.
fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The client of one server.
pub(super) fn client(config: &RedisConfig) -> Result<Client, SinkError> {
    ensure_crypto_provider();
    let invalid = |e: redis::RedisError| {
        let message = format!("invalid redis.url {:?}: {e}", redact(&config.url));
        SinkError::redis(message, Some(e), SinkErrorKind::Stop)
    };
    let mut info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(invalid)?;
    if let Some(file) = &config.password_file {
        let password = read_password(file).map_err(stop)?;
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    if config.insecure_skip_verify {
        if let ConnectionAddr::TcpTls { host, port, .. } = info.addr().clone() {
            info = info.set_addr(ConnectionAddr::TcpTls {
                host,
                port,
                insecure: true,
                tls_params: None,
            });
        }
    }
    match certificates(config)? {
        Some(certs) if !config.insecure_skip_verify => {
            Client::build_with_tls(info, certs).map_err(invalid)
        }
        _ => Client::open(info).map_err(invalid),
    }
}

/// The cluster client's builder: the same TLS and password for every node the
/// cluster reports.
pub(super) fn cluster_builder(
    config: &RedisConfig,
    seeds: &[&str],
) -> Result<ClusterClientBuilder, SinkError> {
    ensure_crypto_provider();
    let mut builder = ClusterClientBuilder::new(seeds.iter().copied());
    if let Some(file) = &config.password_file {
        builder = builder.password(read_password(file).map_err(stop)?);
    }
    if config.insecure_skip_verify {
        builder = builder.tls(redis::TlsMode::Insecure);
    } else if let Some(certs) = certificates(config)? {
        builder = builder.certs(certs);
    }
    Ok(builder)
}

/// What to change when a connection failed on TLS or authentication; `default`
/// otherwise.
pub(super) fn hint(error: &str, default: &'static str) -> &'static str {
    if error.contains("UnknownIssuer") || error.contains("unknown issuer") {
        "the server's certificate is not signed by a CA this host trusts: set redis.ca_file to the CA that signed it (the system's roots are used when it is not set)"
    } else if error.contains("NotValidForName") || error.contains("not valid for name") {
        "the server's certificate does not name the host in redis.url: connect by a name the certificate carries (redis.insecure_skip_verify turns all checks off, for test setups only)"
    } else if error.contains("CertificateRequired") || error.contains("certificate required") {
        "the server asks for a client certificate: set redis.cert_file and redis.key_file"
    } else if error.contains("BadCertificate")
        || error.contains("UnknownCA")
        || error.contains("unknown ca")
    {
        "the server refused the client certificate (redis.cert_file): it must be signed by the CA of the server's tls-ca-cert-file"
    } else if error.contains("WRONGPASS")
        || error.contains("invalid username-password")
        || error.contains("AuthenticationFailed")
    {
        "the user or password is wrong: check the user:password in redis.url or redis.password_file, and the server's ACL"
    } else if error.contains("NOAUTH") {
        "the server requires a login: put user:password in redis.url (rediss://user:password@host), or the password in redis.password_file"
    } else if error.contains("NOPERM") {
        "the ACL user lacks a permission wal2cache needs (see the README's Connecting to managed services)"
    } else if error.contains("Connection reset") || error.contains("unexpected end of file") {
        "if the server speaks TLS, use a rediss:// URL"
    } else {
        default
    }
}
