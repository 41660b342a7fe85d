//! Errors of the source, each one either worth retrying or a stop with the fix
//! spelled out for the operator.

use crate::source::catalog::MIN_SERVER_MAJOR;
use crate::source::pgoutput::DecodeError;
use crate::source::relations::UnknownRelation;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Connection refused, reset, timeouts, server restarting: back off and retry.
    Transient,
    /// Another process streams from the slot: wait for it to go away.
    Standby,
    /// Retrying cannot help: stop and tell the operator what to fix.
    Fatal,
}

/// Maps a failed query to `SourceError::Postgres` with what it was doing:
/// `.map_err(pg("reading server_version_num"))`.
pub fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    let context = context.into();
    move |source| SourceError::Postgres { context, source }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid postgres.url: {0}")]
    Url(String),

    #[error("cannot connect to PostgreSQL at {target}: {}{}", pg_error(.source), connect_hint(.source))]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("PostgreSQL refused the login of role {role:?}: {detail}; {}", auth_hint(.detail))]
    Auth { role: String, detail: String },

    /// `retry`: a handshake cut short (reset, end of file: a server restarting), not a
    /// setting to fix.
    #[error("cannot connect to PostgreSQL at {target} over TLS: {problem}")]
    Tls {
        target: String,
        problem: String,
        retry: bool,
    },

    /// `postgres.password_file = PATH: what is wrong and the fix`.
    #[error("{0}")]
    PasswordFile(String),

    #[error("PostgreSQL has wal_level = {found}, logical replication needs wal_level = logical: set it in postgresql.conf (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL")]
    WalLevel { found: String },

    #[error("the server {server} is PostgreSQL {version}; wal2cache needs PostgreSQL {MIN_SERVER_MAJOR} or later (pgoutput's `messages` option, which logical-message invalidation and the WAL heartbeat use, arrived in 14): upgrade the server, or point postgres.url at one that is 14 or later")]
    UnsupportedServer { server: String, version: String },

    #[error("postgres.failover_slot = true needs PostgreSQL 17 or later (failover slots), and the server is {version}: set postgres.failover_slot = false, or leave it out (its default is true on 17 and later only)")]
    FailoverSlotUnsupported { version: String },

    #[error("role {role:?} may not start replication: run `ALTER ROLE \"{role}\" REPLICATION;` as a superuser (and allow it in pg_hba.conf for the \"replication\" database)")]
    NoReplicationPrivilege { role: String },

    #[error("table {table} does not exist in database {database:?} (named by {origin}): create the table, or fix the table name in the rules file")]
    MissingTable {
        table: String,
        database: String,
        origin: String,
    },

    #[error("publication {publication:?} does not exist: run `wal2cache setup --config <file>`, or set postgres.create = true")]
    MissingPublication { publication: String },

    #[error("publication {publication:?} does not include {tables}: run `wal2cache setup --config <file>` to add them, or set postgres.create = true")]
    TablesNotPublished { publication: String, tables: String },

    #[error("replication slot {slot:?} does not exist: run `wal2cache setup --config <file>`, or set postgres.create = true")]
    MissingSlot { slot: String },

    #[error("replication slot {slot:?} exists but {problem}: choose another postgres.slot, or drop it with `SELECT pg_drop_replication_slot('{slot}')` if nothing else uses it")]
    UnusableSlot { slot: String, problem: String },

    #[error("replication slot {slot:?} is in use by another process ({detail}); this instance is on standby and retries")]
    SlotInUse { slot: String, detail: String },

    #[error("{context}: {}", pg_error(.source))]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("replication stream: {0}")]
    Replication(#[source] pgwire_replication::PgWireError),

    #[error("replication stream: {message}{hint}")]
    Server {
        message: String,
        sqlstate: Option<String>,
        hint: &'static str,
    },

    #[error("cannot decode the replication stream at LSN {lsn}: {source}; nothing past the last confirmed LSN was confirmed: report this with the wal2cache and PostgreSQL versions")]
    Decode {
        lsn: crate::lsn::Lsn,
        #[source]
        source: DecodeError,
    },

    #[error(transparent)]
    UnknownRelation(#[from] UnknownRelation),

    #[error("the replication stream ended: PostgreSQL closed it")]
    Ended,

    #[error("the server {server} is a standby (in recovery), and wal2cache streams from the primary: point postgres.url at the primary, or list every host with target_session_attrs=read-write (postgres://user@host1,host2/db?target_session_attrs=read-write)")]
    InRecovery { server: String },

    #[error("no primary among the servers in postgres.url ({hosts}); retrying: a failover may be in progress")]
    NoPrimary { hosts: String },

    #[error("the current WAL file name {0:?} does not start with a timeline: report this with the PostgreSQL version")]
    Timeline(String),

    #[error("the server's answer was not what the replication protocol promises ({0}): report this with the PostgreSQL version")]
    Protocol(String),

    /// Found on a reconnect: the daemon starts again from its checks, which flush (or
    /// stop, under `postgres.on_slot_loss = "fail"`).
    #[error("changes may have been missed: {0}")]
    SlotLost(crate::source::identity::Loss),
}

impl SourceError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Connect { source, .. } | SourceError::Postgres { source, .. } => {
                match source.code() {
                    Some(code) => sqlstate_kind(code.code()),
                    // No SQLSTATE: the connection itself failed (refused, reset, closed).
                    None => ErrorKind::Transient,
                }
            }
            SourceError::Replication(e) if e.is_io() => ErrorKind::Transient,
            SourceError::Replication(pgwire_replication::PgWireError::Task(_)) => {
                ErrorKind::Transient
            }
            // A `recv` dropped while it collected the ended worker's result (the
            // stream's `select!` drops it when a confirmation or a flush comes first):
            // that result is gone, so reconnect; a lasting cause shows again there.
            SourceError::Replication(pgwire_replication::PgWireError::Internal(m))
                if m.contains("already joined") =>
            {
                ErrorKind::Transient
            }
            SourceError::Server { sqlstate, .. } => {
                sqlstate.as_deref().map_or(ErrorKind::Fatal, sqlstate_kind)
            }
            SourceError::SlotInUse { .. } => ErrorKind::Standby,
            SourceError::Tls { retry: true, .. } => ErrorKind::Transient,
            SourceError::Ended => ErrorKind::Transient,
            // A failover in progress: the old primary comes back as a standby, or the
            // new one is not promoted yet.
            SourceError::InRecovery { .. } | SourceError::NoPrimary { .. } => ErrorKind::Transient,
            _ => ErrorKind::Fatal,
        }
    }

    /// Turns an error from the replication connection into one that names its cause.
    pub fn from_replication(e: pgwire_replication::PgWireError, slot: &str, role: &str) -> Self {
        use pgwire_replication::PgWireError as E;
        let message = match &e {
            E::Server(m) => m.clone(),
            E::Auth(m) => {
                return SourceError::Auth {
                    role: role.to_string(),
                    detail: m.clone(),
                }
            }
            _ => return SourceError::Replication(e),
        };
        let sqlstate = sqlstate_of(&message);
        match sqlstate.as_deref() {
            Some("55006") => SourceError::SlotInUse {
                slot: slot.to_string(),
                detail: message,
            },
            Some("28P01" | "28000") => SourceError::Auth {
                role: role.to_string(),
                detail: message,
            },
            Some("42501") => SourceError::NoReplicationPrivilege {
                role: role.to_string(),
            },
            Some("42704") if message.contains("replication slot") => SourceError::MissingSlot {
                slot: slot.to_string(),
            },
            _ => SourceError::Server {
                hint: hint_for(sqlstate.as_deref(), &message),
                message,
                sqlstate,
            },
        }
    }
}

/// What went wrong, in full: the server's message with its detail, hint and SQLSTATE
/// for an error the server sent; otherwise the error and its causes ("error connecting
/// to server: Connection refused (os error 111)"). `tokio_postgres::Error`'s own
/// `Display` shows only "db error" or "error connecting to server".
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut out = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            out.push_str(&format!("; detail: {detail}"));
        }
        if let Some(hint) = db.hint() {
            out.push_str(&format!("; hint: {hint}"));
        }
        return out;
    }
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// What to change when the server refuses a login (SQLSTATE 28000 or 28P01), from the
/// server's message: pg_hba.conf's TLS and certificate rules, or the password.
fn auth_hint(detail: &str) -> &'static str {
    if detail.contains("no encryption") {
        "pg_hba.conf accepts this role only over TLS (a hostssl line, and hostnossl ... reject): set sslmode=require, or verify-full with sslrootcert, in postgres.url"
    } else if detail.contains("SSL encryption") || detail.contains("GSS encryption") {
        "pg_hba.conf has no line for this role over an encrypted connection: add a hostssl line for it, or use sslmode=disable where the network is trusted"
    } else if detail.contains("requires a valid client certificate") {
        "pg_hba.conf asks this role for a client certificate (method cert, or clientcert=verify-full): add sslcert and sslkey to postgres.url"
    } else if detail.contains("certificate authentication failed")
        || detail.contains("certificate does not match")
    {
        "the client certificate does not match the role: its CN must be the role's name (or be mapped to it in pg_ident.conf)"
    } else if detail.contains("no pg_hba.conf entry") {
        "pg_hba.conf has no line for this host, role and database: add one (hostssl ... scram-sha-256, say) and reload PostgreSQL"
    } else {
        "check the user and password (in postgres.url, postgres.password_file or WAL2CACHE__POSTGRES__PASSWORD) and pg_hba.conf"
    }
}

/// What to check when a connection fails.
fn connect_hint(e: &tokio_postgres::Error) -> &'static str {
    match e.code().map(|c| c.code()) {
        Some("3D000") => ": check the database name in postgres.url",
        Some(_) => "",
        None => ": check the host and port in postgres.url and that PostgreSQL runs and accepts TCP connections there",
    }
}

/// The SQLSTATE at the end of a server error as `pgwire-replication` prints it:
/// `message (SQLSTATE 55006)`.
fn sqlstate_of(message: &str) -> Option<String> {
    let start = message.rfind("(SQLSTATE ")? + "(SQLSTATE ".len();
    let code = message[start..].strip_suffix(')')?;
    (code.len() == 5).then(|| code.to_string())
}

fn sqlstate_kind(code: &str) -> ErrorKind {
    match code {
        // The slot is active for another PID.
        "55006" => ErrorKind::Standby,
        // Too many connections, server starting up or shutting down, crash recovery,
        // connection failures, out of resources.
        "53300" | "57P01" | "57P02" | "57P03" | "08000" | "08001" | "08003" | "08004" | "08006"
        | "53000" | "53100" | "53200" | "40001" | "40P01" => ErrorKind::Transient,
        _ => ErrorKind::Fatal,
    }
}

fn hint_for(sqlstate: Option<&str>, message: &str) -> &'static str {
    match sqlstate {
        Some("42704") if message.contains("publication") => {
            "; create it with `wal2cache setup --config <file>` or set postgres.create = true. If it exists (again), it was dropped while the slot was behind: a slot reads each change with the publications of its time and cannot stream past the drop, so drop the slot (`SELECT pg_drop_replication_slot('<postgres.slot>')` while no daemon runs) and start again: a new slot is created and postgres.on_slot_loss says what happens to the caches"
        }
        Some("55000") if message.contains("wal_level") => {
            "; set wal_level = logical in postgresql.conf and restart PostgreSQL"
        }
        Some("3D000") => "; check the database name in postgres.url",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwire_replication::PgWireError;

    fn server(m: &str) -> SourceError {
        SourceError::from_replication(PgWireError::Server(m.into()), "s", "r")
    }

    #[test]
    fn a_worker_end_lost_to_a_dropped_recv_is_a_reconnect_and_other_internal_errors_stop() {
        let lost = PgWireError::Internal("replication worker already joined".into());
        let e = SourceError::from_replication(lost, "s", "r");
        assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
        let misuse =
            PgWireError::Internal("start needs a gated session that has not started".into());
        let e = SourceError::from_replication(misuse, "s", "r");
        assert_eq!(e.kind(), ErrorKind::Fatal, "{e}");
    }

    #[test]
    fn slot_in_use_means_standby() {
        let e = server("replication slot \"s\" is active for PID 42 (SQLSTATE 55006)");
        assert_eq!(e.kind(), ErrorKind::Standby);
        assert!(e.to_string().contains("standby"), "{e}");
    }

    #[test]
    fn classified_server_errors() {
        let e = server("password authentication failed for user \"r\" (SQLSTATE 28P01)");
        assert!(matches!(e, SourceError::Auth { .. }));
        assert_eq!(e.kind(), ErrorKind::Fatal);
        let e = server("permission denied to start WAL sender (SQLSTATE 42501)");
        assert!(
            e.to_string().contains("ALTER ROLE \"r\" REPLICATION"),
            "{e}"
        );
        let e = server("publication \"p\" does not exist (SQLSTATE 42704)");
        assert!(e.to_string().contains("wal2cache setup"), "{e}");
        // Created again, it does not help the slot past the drop: the way out.
        assert!(e.to_string().contains("pg_drop_replication_slot"), "{e}");
        assert_eq!(e.kind(), ErrorKind::Fatal);
        let e = server("the database system is starting up (SQLSTATE 57P03)");
        assert_eq!(e.kind(), ErrorKind::Transient);
        let e = server("no code here");
        assert_eq!(e.kind(), ErrorKind::Fatal);
    }

    #[test]
    fn io_errors_are_transient() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = SourceError::from_replication(PgWireError::from(io), "s", "r");
        assert_eq!(e.kind(), ErrorKind::Transient);
    }
}
