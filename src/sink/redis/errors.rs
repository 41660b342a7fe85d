//! Redis errors: which are worth retrying, and how a failure is named in a message.

use redis::{ErrorKind, RedisError};

use crate::sink::{cut, KEY_SHOWN};

/// Characters of a server's error message shown in a log line.
pub(super) const MESSAGE_SHOWN: usize = 300;

/// A command of a batch as the messages name it: what it does and the key it is for.
#[derive(Debug, Clone)]
pub(super) struct Described {
    pub(super) command: &'static str,
    pub(super) key: String,
    /// For the scripts that read a version first: the version sidecar, which is the
    /// key a WRONGTYPE is about (SET never refuses a type; GET does).
    pub(super) sidecar: Option<String>,
}

impl Described {
    pub(super) fn new(command: &'static str, key: impl Into<String>) -> Described {
        Described {
            command,
            key: key.into(),
            sidecar: None,
        }
    }

    /// `(command, key)` for an error with `code`.
    pub(super) fn naming(&self, code: Option<&str>) -> (String, String) {
        match (&self.sidecar, code) {
            (Some(sidecar), Some("WRONGTYPE")) => (
                format!(
                    "{} (its GET of the version sidecar of {:?})",
                    self.command,
                    cut(&self.key, KEY_SHOWN)
                ),
                sidecar.clone(),
            ),
            _ => (self.command.to_string(), self.key.clone()),
        }
    }
}

/// A failed attempt: the error, and the commands of the pipeline it came from (when
/// it came from one pipeline), index for index.
pub(super) struct Failure {
    pub(super) error: RedisError,
    pub(super) commands: Vec<Described>,
}

impl From<RedisError> for Failure {
    fn from(error: RedisError) -> Failure {
        Failure {
            error,
            commands: Vec::new(),
        }
    }
}

impl Failure {
    /// One line: the error code, how many commands failed, the first failing command
    /// and key (cut short), the first server message (cut short). Never the list of
    /// every command.
    pub(super) fn summary(&self) -> String {
        let Some(errors) = self.error.clone().into_server_errors() else {
            return cut(&self.error.to_string(), MESSAGE_SHOWN);
        };
        let Some((index, first)) = errors.first() else {
            return cut(&self.error.to_string(), MESSAGE_SHOWN);
        };
        let of = if self.commands.is_empty() {
            String::new()
        } else {
            format!(" of {}", self.commands.len())
        };
        let what = match self.commands.get(*index) {
            Some(d) => {
                let (command, key) = d.naming(Some(first.code()));
                format!(", first {command} on {:?}", cut(&key, KEY_SHOWN))
            }
            None => String::new(),
        };
        format!(
            "{} on {} command(s){of}{what}: {}",
            first.code(),
            errors.len(),
            cut(&first.to_string(), MESSAGE_SHOWN)
        )
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// The scripts are gone (Redis restarted): load them and retry at once, without
    /// waiting a backoff step.
    ReloadAndRetry,
    /// Wait the next backoff step, then retry.
    Backoff,
    /// Retrying cannot help: find the item and stop.
    Stop,
}

/// `reloaded`: the scripts were loaded right before this attempt. A NOSCRIPT just
/// after loading them (a node that lost them again) waits a backoff step instead of
/// spinning.
pub(super) fn next_step(class: &Class, reloaded: bool) -> Next {
    match class {
        Class::Poison => Next::Stop,
        Class::NoScript if !reloaded => Next::ReloadAndRetry,
        Class::NoScript | Class::Retry => Next::Backoff,
    }
}

/// What to do about a Redis error.
pub(super) enum Class {
    Retry,
    /// The scripts are gone (Redis restarted): load them again, then retry.
    NoScript,
    Poison,
}

pub(super) fn classify(e: &RedisError) -> Class {
    if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() || e.is_connection_dropped() {
        return Class::Retry;
    }
    // A cluster node without a connection (down, or failing over): the client
    // reconnects from the seeds.
    if e.kind() == ErrorKind::ClusterConnectionNotFound {
        return Class::Retry;
    }
    // A pipeline's error carries the server's errors; its own `code()` is only set when
    // the first one is a kind the client knows (WRONGTYPE is not).
    if let Some(errors) = e.clone().into_server_errors() {
        let classes: Vec<Class> = errors
            .iter()
            .map(|(_, e)| classify_code(e.code()))
            .collect();
        return if classes.iter().any(|c| matches!(c, Class::NoScript)) {
            // Load the scripts first: a poison error shows again on the next attempt.
            Class::NoScript
        } else if classes.iter().any(|c| matches!(c, Class::Poison)) {
            Class::Poison
        } else {
            Class::Retry
        };
    }
    match e.code() {
        Some(code) => classify_code(code),
        None if e.is_unrecoverable_error() => Class::Poison,
        None => Class::Retry,
    }
}

fn classify_code(code: &str) -> Class {
    match code {
        "NOSCRIPT" => Class::NoScript,
        // MOVED and ASK are followed by the cluster client; they reach us only when
        // its retries ran out during a resharding.
        "LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY" | "OOM"
        | "MOVED" | "ASK" => Class::Retry,
        _ => Class::Poison,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noscript_is_answered_at_once_then_with_backoff() {
        // Redis restarted and lost the scripts: load them and retry without waiting.
        assert_eq!(next_step(&Class::NoScript, false), Next::ReloadAndRetry);
        // Still NOSCRIPT right after loading them: wait a step rather than spin.
        assert_eq!(next_step(&Class::NoScript, true), Next::Backoff);
        assert_eq!(next_step(&Class::Retry, false), Next::Backoff);
        assert_eq!(next_step(&Class::Poison, false), Next::Stop);
        assert_eq!(next_step(&Class::Poison, true), Next::Stop);
    }

    #[test]
    fn long_keys_are_cut_in_log_lines() {
        let long = "k".repeat(600_000);
        let shown = cut(&long, 100);
        assert!(shown.len() < 130, "{shown}");
        assert!(shown.ends_with("… (600000 bytes)"), "{shown}");
        assert_eq!(cut("short", 100), "short");
        // Never inside a character.
        assert_eq!(cut("ééé", 2), "éé… (6 bytes)");
    }
}
