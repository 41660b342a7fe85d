//! Plans: what one committed change does to the caches. The contract between the
//! rules, which make plans from changes, and the sinks, which carry them out; neither
//! side's types appear here.

use std::sync::Arc;
use std::time::Duration;

/// What one change does to the caches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Keys to UNLINK.
    pub delete: Vec<String>,
    /// The keys of `delete` that a republish rule manages: deleted only if their stored
    /// version is older, leaving the version behind, so a replayed older value cannot
    /// come back.
    pub tombstones: Vec<String>,
    /// Keys to SET to a new value, if newer than what is stored.
    pub republish: Vec<Republish>,
    /// Tags whose member keys (and the tag set itself) are unlinked.
    pub purge_tags: Vec<String>,
    /// Table-wide flush (TRUNCATE without truncate_tags): every key under these prefixes.
    pub flush_prefixes: Vec<String>,
    /// Every tag set whose tag starts with one of these, purged (after a slot loss).
    pub purge_tag_prefixes: Vec<String>,
    /// Subscribers empty their whole cache.
    pub flush_all: bool,
    /// Why, for the `flush_all` event, when an operator asked for it
    /// (`wal2cache invalidate --all --reason`): the event's `detail`.
    pub detail: Option<String>,
    /// What was skipped or replaced, and why.
    pub notes: Vec<Note>,
    /// The rules that contributed, for messages about the plan.
    pub rules: Vec<String>,
}

impl Plan {
    /// Nothing to do (notes aside).
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty()
            && self.republish.is_empty()
            && self.purge_tags.is_empty()
            && self.flush_prefixes.is_empty()
            && self.purge_tag_prefixes.is_empty()
            && !self.flush_all
    }

    /// The first cache key the plan touches (the event's message key).
    pub fn first_key(&self) -> Option<&str> {
        self.delete
            .first()
            .map(String::as_str)
            .or_else(|| self.republish.first().map(|r| r.key.as_str()))
    }
}

/// A key to write with its new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Republish {
    pub key: String,
    /// The row as a JSON object (shared by every key of the rule).
    pub value: Arc<str>,
    pub ttl: Option<Duration>,
}

/// Something the plan could not do as the rule says, and what it did instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub rule: String,
    pub kind: NoteKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoteKind {
    /// A placeholder was NULL: the key or tag does not exist, nothing to invalidate.
    NullPlaceholder { template: String, column: String },
    /// A placeholder's value is not in the WAL (unchanged TOAST, or outside a key-only
    /// old row): that key or tag could not be computed. `check` prevents this.
    NotInWal { template: String, column: String },
    /// A republished value needed a column not in the WAL: the key was deleted instead.
    RepublishFellBack { key: String, column: String },
    /// The rule's keys or tags use a column the table did not have when this change
    /// was written (before it was added, or after it was dropped or renamed): the
    /// change flushed what a TRUNCATE of the table would instead.
    ColumnMissing { column: String, field: &'static str },
}

impl NoteKind {
    pub fn reason(&self) -> &'static str {
        match self {
            NoteKind::NullPlaceholder { .. } => "null_placeholder",
            NoteKind::NotInWal { .. } => "not_in_wal",
            NoteKind::RepublishFellBack { .. } => "republish_fell_back",
            NoteKind::ColumnMissing { .. } => "column_missing",
        }
    }
}
