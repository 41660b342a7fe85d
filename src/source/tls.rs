//! TLS to PostgreSQL, as libpq does it, for both connections: the control connection
//! (tokio-postgres over rustls) and the replication stream (pgwire-replication's
//! rustls). One reading of `sslmode`, `sslrootcert`, `sslcert` and `sslkey` gives both,
//! and the same files are read for both on every connection.
//!
//! Modes follow libpq: `disable`; `prefer` (the default: TLS when the server offers
//! it, nothing verified); `require` (TLS, nothing verified, unless `sslrootcert` is
//! given, when it acts as `verify-ca`, as libpq does); `verify-ca` (the chain must
//! lead to a root of `sslrootcert`); `verify-full` (and the certificate must name the
//! host). `sslrootcert=system` takes the platform's trusted roots and, as in libpq,
//! needs `verify-full`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// The connection options read here, taken out of `postgres.url`.
pub const OPTIONS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow is not supported: use prefer (TLS when offered) or require"
                        .into(),
                )
            }
            other => {
                return Err(format!(
                "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    /// `sslrootcert=FILE`.
    File(PathBuf),
    /// `sslrootcert=system`: the platform's bundle, found where OpenSSL would look.
    System(PathBuf),
}

impl Roots {
    fn path(&self) -> &Path {
        match self {
            Roots::File(p) | Roots::System(p) => p,
        }
    }
}

/// The TLS settings of `postgres.url`.
#[derive(Debug, Clone)]
pub struct PgTls {
    /// The mode in effect (`require` with a root file is `verify-ca`).
    pub mode: SslMode,
    /// As written, for messages.
    asked: SslMode,
    roots: Option<Roots>,
    client: Option<(PathBuf, PathBuf)>,
    /// Under `verify-ca`: the names the server's certificate gave when they did not
    /// match the host, so that the replication connection (whose own `verify-ca`
    /// checks the name) can be pointed at one of them.
    names: Arc<Mutex<Vec<String>>>,
}

impl PgTls {
    /// Reads the options, and the files they name, so that a missing or unreadable file
    /// is reported when the config loads.
    pub fn from_options(options: &[(String, String)]) -> Result<PgTls, String> {
        let get = |key: &str| {
            options
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .filter(|v| !v.is_empty())
        };
        let asked = get("sslmode").map(SslMode::parse).transpose()?;
        let roots = match get("sslrootcert") {
            None => None,
            Some("system") => Some(Roots::System(system_bundle()?)),
            Some(file) => Some(Roots::File(PathBuf::from(file))),
        };
        let asked = match (&roots, asked) {
            (Some(Roots::System(_)), None) => SslMode::VerifyFull,
            (Some(Roots::System(_)), Some(mode)) if mode != SslMode::VerifyFull => {
                return Err(format!(
                    "sslrootcert=system needs sslmode=verify-full (as in libpq), not {}: the system's roots trust any public name, so the name must be checked too",
                    mode.as_str()
                ));
            }
            (_, mode) => mode.unwrap_or(SslMode::Prefer),
        };
        let mode = match (asked, &roots) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (mode, _) => mode,
        };
        if mode.verifies() && roots.is_none() {
            return Err(format!(
                "sslmode={} verifies the server's certificate but no sslrootcert is given: add sslrootcert=/path/to/ca.pem (the CA that signed the server's certificate) or sslrootcert=system (the platform's roots, with verify-full), or use sslmode=require to encrypt without verifying",
                asked.as_str()
            ));
        }
        let client = match (get("sslcert"), get("sslkey")) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            (Some(_), None) => {
                return Err(
                    "sslcert is given without sslkey: add sslkey=/path/to/client.key".into(),
                )
            }
            (None, Some(_)) => {
                return Err(
                    "sslkey is given without sslcert: add sslcert=/path/to/client.pem".into(),
                )
            }
        };
        if mode == SslMode::Disable && (roots.is_some() || client.is_some()) {
            return Err(
                "sslmode=disable with sslrootcert, sslcert or sslkey: remove them, or choose a mode that uses TLS"
                    .into(),
            );
        }
        let tls = PgTls {
            mode,
            asked,
            roots,
            client,
            names: Arc::default(),
        };
        if tls.mode != SslMode::Disable {
            tls.client_config()?;
        }
        Ok(tls)
    }

    /// What tokio-postgres is told; the verification is in the connector.
    pub fn tokio_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as T;
        match self.mode {
            SslMode::Disable => T::Disable,
            SslMode::Prefer => T::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => T::Require,
        }
    }

    /// The connector of the control connection (files read again each time).
    pub fn connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
            self.client_config()?,
        ))
    }

    /// The same settings for the replication connection to `host`.
    pub fn replication(&self, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::SslMode as P;
        let mode = match self.mode {
            SslMode::Disable => P::Disable,
            SslMode::Prefer => P::Prefer,
            SslMode::Require => P::Require,
            SslMode::VerifyCa => P::VerifyCa,
            SslMode::VerifyFull => P::VerifyFull,
        };
        let (client_cert_pem_path, client_key_pem_path) = match &self.client {
            Some((c, k)) => (Some(c.clone()), Some(k.clone())),
            None => (None, None),
        };
        // pgwire-replication refuses verify-full to an IP address unless the name is
        // given as the SNI override; rustls checks an IP against the certificate's IP
        // names, as libpq does. Its verify-ca still checks the name (its chain-only
        // verifier misses rustls' newer error variant), so it is pointed at a name the
        // certificate carries, learnt by the control connection's chain check.
        let sni = match self.mode {
            SslMode::VerifyCa => self.names.lock().expect("names").first().cloned(),
            _ => None,
        }
        .or_else(|| Some(host.to_string()));
        pgwire_replication::TlsConfig {
            mode,
            ca_pem_path: self.roots.as_ref().map(|r| r.path().to_path_buf()),
            sni_hostname: sni,
            client_cert_pem_path,
            client_key_pem_path,
        }
    }

    /// Which roots were trusted, for the message when the server's certificate is not.
    pub fn roots_described(&self) -> String {
        match &self.roots {
            Some(Roots::File(p)) => format!("the CA file sslrootcert={}", p.display()),
            Some(Roots::System(p)) => {
                format!("the system's trusted roots ({})", p.display())
            }
            None => "no CA (nothing is verified)".into(),
        }
    }

    pub fn client_cert(&self) -> Option<&Path> {
        self.client.as_ref().map(|(c, _)| c.as_path())
    }

    pub fn asked(&self) -> SslMode {
        self.asked
    }

    fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = match &self.roots {
            Some(roots) if self.mode.verifies() => {
                let store = Arc::new(load_roots(roots)?);
                let webpki =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(store, provider)
                        .build()
                        .map_err(|e| format!("TLS: {e}"))?;
                if self.mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly {
                        inner: webpki,
                        names: self.names.clone(),
                    })
                }
            }
            _ => Arc::new(AnyCertificate { provider }),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match &self.client {
            Some((cert, key)) => {
                let chain = load_certs(cert, "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    format!(
                        "sslkey={}: cannot read a private key (PEM, PKCS#8, PKCS#1 or SEC1): {e}",
                        key.display()
                    )
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!(
                        "sslcert={} and sslkey do not make a client certificate: {e}",
                        cert.display()
                    )
                })
            }
            None => Ok(builder.with_no_client_auth()),
        }
    }
}

/// The platform's CA bundle: `SSL_CERT_FILE`, else the first bundle found where
/// OpenSSL looks for one on this system.
fn system_bundle() -> Result<PathBuf, String> {
    let probe = openssl_probe::probe();
    probe.cert_file.ok_or_else(|| {
        "sslrootcert=system: no CA bundle found on this system (install ca-certificates, or set SSL_CERT_FILE, or give sslrootcert=/path/to/ca.pem)".to_string()
    })
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what}={}: cannot read: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what}={}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn load_roots(roots: &Roots) -> Result<rustls::RootCertStore, String> {
    let path = roots.path();
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(load_certs(path, "sslrootcert")?);
    if added == 0 {
        return Err(format!(
            "sslrootcert={}: no usable CA certificate in the file",
            path.display()
        ));
    }
    Ok(store)
}

/// `prefer` and `require`: encryption without verification, as libpq does; the
/// handshake signatures are still checked.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca`: the chain is verified, the name is not; the names the certificate
/// gives instead are kept for the replication connection.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    names: Arc<Mutex<Vec<String>>>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                presented,
                ..
            })) => {
                *self.names.lock().expect("names") =
                    presented.iter().filter_map(|n| usable_name(n)).collect();
                Ok(ServerCertVerified::assertion())
            }
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)) => {
                Ok(ServerCertVerified::assertion())
            }
            other => {
                if other.is_ok() {
                    self.names.lock().expect("names").clear();
                }
                other
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `DnsName("db.internal")` → `db.internal`; `IpAddress(10.0.0.5)` → `10.0.0.5`;
/// a wildcard name gets a label in place of its `*`.
fn usable_name(presented: &str) -> Option<String> {
    if let Some(dns) = presented
        .strip_prefix("DnsName(\"")
        .and_then(|s| s.strip_suffix("\")"))
    {
        return Some(match dns.strip_prefix("*.") {
            Some(rest) => format!("wal2cache.{rest}"),
            None => dns.to_string(),
        });
    }
    presented
        .strip_prefix("IpAddress(")
        .and_then(|s| s.strip_suffix(')'))
        .map(str::to_string)
}

/// A TLS failure's text (from either connection) turned into what went wrong and
/// what to change; `None` when the text is not about TLS.
pub fn explain(text: &str, tls: &PgTls, host: &str) -> Option<String> {
    let mode = tls.asked.as_str();
    if text.contains("server does not support TLS") {
        return Some(format!(
            "the server does not accept TLS connections (ssl = off in its postgresql.conf), but sslmode={mode} requires TLS: turn ssl on in the server, or use sslmode=prefer on a network you trust"
        ));
    }
    if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        return Some(format!(
            "the server's certificate is not trusted: it is not signed by {}; set sslrootcert to the CA file that signed the server's certificate",
            tls.roots_described()
        ));
    }
    if let Some(at) = text.find("certificate not valid for name") {
        let detail = &text[at..];
        return Some(format!(
            "the server's certificate does not name the host {host:?} (sslmode=verify-full): {detail}; connect with a host name the certificate carries, or use sslmode=verify-ca to check only the CA"
        ));
    }
    if text.contains("NotValidForName") {
        return Some(format!(
            "the server's certificate does not name the host {host:?} (sslmode=verify-full): connect with a host name the certificate carries, or use sslmode=verify-ca to check only the CA"
        ));
    }
    if text.contains("certificate expired") || text.contains("Expired") {
        return Some(format!(
            "the server's certificate has expired or is not valid yet ({text}): renew it on the server, and check this machine's clock"
        ));
    }
    let alert = [
        "CertificateRequired",
        "BadCertificate",
        "UnknownCA",
        "CertificateUnknown",
        "AccessDenied",
    ]
    .into_iter()
    .find(|a| text.contains(&format!("received fatal alert: {a}")));
    if let Some(alert) = alert {
        let cert = tls.client_cert().map_or_else(
            || "no client certificate was given (add sslcert and sslkey)".to_string(),
            |c| format!("the client certificate sslcert={}", c.display()),
        );
        return Some(format!(
            "the server refused the TLS handshake ({alert}): it did not accept {cert}; the client certificate must be signed by a CA in the server's ssl_ca_file"
        ));
    }
    // Another certificate problem or alert names a setting too; a reset or an end of
    // file in the middle of the handshake does not (a server restarting): None, retried.
    if text.contains("certificate") || text.contains("alert") {
        return Some(format!("TLS handshake failed under sslmode={mode}: {text}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn modes_follow_libpq() {
        let tls = PgTls::from_options(&[]).unwrap();
        assert_eq!(tls.mode, SslMode::Prefer, "libpq's default");
        let tls = PgTls::from_options(&opts(&[("sslmode", "require")])).unwrap();
        assert_eq!(tls.mode, SslMode::Require);
        assert_eq!(tls.tokio_mode(), tokio_postgres::config::SslMode::Require);
        let err = PgTls::from_options(&opts(&[("sslmode", "verify-full")])).unwrap_err();
        assert!(err.contains("no sslrootcert"), "{err}");
        let err = PgTls::from_options(&opts(&[("sslmode", "allow")])).unwrap_err();
        assert!(err.contains("not supported"), "{err}");
        let err = PgTls::from_options(&opts(&[("sslmode", "verify_full")])).unwrap_err();
        assert!(err.contains("not one of"), "{err}");
        let err = PgTls::from_options(&opts(&[("sslcert", "c.pem")])).unwrap_err();
        assert!(err.contains("without sslkey"), "{err}");
    }

    #[test]
    fn a_root_file_is_read_when_the_config_loads() {
        let err = PgTls::from_options(&opts(&[
            ("sslmode", "verify-full"),
            ("sslrootcert", "/nonexistent/ca.pem"),
        ]))
        .unwrap_err();
        assert!(err.contains("sslrootcert=/nonexistent/ca.pem"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = PgTls::from_options(&opts(&[
            ("sslmode", "require"),
            ("sslrootcert", empty.to_str().unwrap()),
        ]))
        .unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn system_roots_need_verify_full() {
        if openssl_probe::probe().cert_file.is_none() {
            // No bundle on this machine: the error says so.
            let err = PgTls::from_options(&opts(&[("sslrootcert", "system")])).unwrap_err();
            assert!(err.contains("no CA bundle"), "{err}");
            return;
        }
        let tls = PgTls::from_options(&opts(&[("sslrootcert", "system")])).unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert!(tls.roots_described().contains("system"));
        let err = PgTls::from_options(&opts(&[
            ("sslrootcert", "system"),
            ("sslmode", "verify-ca"),
        ]))
        .unwrap_err();
        assert!(err.contains("needs sslmode=verify-full"), "{err}");
    }

    #[test]
    fn names_from_the_certificate() {
        assert_eq!(
            usable_name("DnsName(\"db.internal\")").as_deref(),
            Some("db.internal")
        );
        assert_eq!(
            usable_name("DnsName(\"*.db.internal\")").as_deref(),
            Some("wal2cache.db.internal")
        );
        assert_eq!(
            usable_name("IpAddress(10.0.0.5)").as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(usable_name("DirectoryName"), None);
    }
}
