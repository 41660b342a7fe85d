//! The relation cache: Postgres describes a table (a Relation message) before the
//! first change to it in a session, and again after DDL. Changes refer to tables by
//! OID; this turns decoded messages into typed [`SourceEvent`]s.

use std::collections::HashMap;
use std::sync::Arc;

use crate::source::change::{Change, CommitInfo, Relation, SourceEvent, TxnInfo};
use crate::source::pgoutput::Message;

/// Relations by OID plus the transaction in progress.
#[derive(Debug, Default)]
pub struct Relations {
    by_oid: HashMap<u32, Arc<Relation>>,
    current: Option<TxnInfo>,
}

/// A change named a relation the stream never described.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "pgoutput sent a {message} for relation OID {oid} before describing it in a Relation message; \
     the stream is inconsistent: restart wal2cache, and report it if it happens again"
)]
pub struct UnknownRelation {
    pub oid: u32,
    pub message: &'static str,
}

impl Relations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every relation: a new replication session describes them again.
    pub fn reset(&mut self) {
        self.by_oid.clear();
        self.current = None;
    }

    /// Describes (or describes again) a table.
    pub fn insert(&mut self, relation: Relation) {
        self.by_oid.insert(relation.oid, Arc::new(relation));
    }

    pub fn get(&self, oid: u32) -> Option<&Arc<Relation>> {
        self.by_oid.get(&oid)
    }

    /// The transaction whose changes are arriving, if any.
    pub fn current_transaction(&self) -> Option<TxnInfo> {
        self.current
    }

    fn lookup(&self, oid: u32, message: &'static str) -> Result<Arc<Relation>, UnknownRelation> {
        self.by_oid
            .get(&oid)
            .cloned()
            .ok_or(UnknownRelation { oid, message })
    }

    /// Applies one message. Relation, Type and Origin messages only update state
    /// and yield nothing.
    pub fn apply(&mut self, message: Message) -> Result<Option<SourceEvent>, UnknownRelation> {
        Ok(Some(match message {
            Message::Begin(b) => {
                let txn = TxnInfo {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    commit_time: b.commit_time,
                };
                self.current = Some(txn);
                SourceEvent::Begin(txn)
            }
            Message::Commit(c) => {
                let xid = self.current.take().map(|t| t.xid).unwrap_or(0);
                SourceEvent::Commit(CommitInfo {
                    xid,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_time: c.commit_time,
                })
            }
            Message::Relation(body) => {
                let relation = Relation::from(body);
                self.by_oid.insert(relation.oid, Arc::new(relation));
                return Ok(None);
            }
            Message::Type(_) | Message::Origin(_) => return Ok(None),
            Message::Insert(i) => {
                SourceEvent::Change(Change::insert(self.lookup(i.relation, "Insert")?, i.new))
            }
            Message::Update(u) => SourceEvent::Change(Change::update(
                self.lookup(u.relation, "Update")?,
                u.old,
                u.new,
            )),
            Message::Delete(d) => {
                SourceEvent::Change(Change::delete(self.lookup(d.relation, "Delete")?, d.old))
            }
            Message::Truncate(t) => SourceEvent::Truncate {
                relations: t
                    .relations
                    .iter()
                    .map(|&oid| self.lookup(oid, "Truncate"))
                    .collect::<Result<_, _>>()?,
                cascade: t.options & 1 == 1,
                restart_identity: t.options & 2 == 2,
            },
            Message::Message(m) => SourceEvent::Message {
                transactional: m.transactional,
                lsn: m.lsn,
                prefix: m.prefix,
                content: m.content,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::source::change::{Op, Value};
    use crate::source::pgoutput::*;
    use bytes::Bytes;

    fn relation(oid: u32, cols: &[(&str, bool)]) -> Message {
        Message::Relation(RelationBody {
            oid,
            namespace: "public".into(),
            name: format!("t{oid}"),
            replica_identity: b'd',
            columns: cols
                .iter()
                .map(|(name, key)| ColumnBody {
                    flags: u8::from(*key),
                    name: (*name).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn text(s: &'static str) -> Datum {
        Datum::Text(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn a_change_before_its_relation_is_an_error() {
        let mut r = Relations::new();
        let err = r
            .apply(Message::Insert(Insert {
                relation: 7,
                new: TupleData(vec![]),
            }))
            .unwrap_err();
        assert_eq!(err.oid, 7);
        assert!(err.to_string().contains("OID 7"));
    }

    #[test]
    fn key_only_old_rows_mark_other_columns_not_sent() {
        let mut r = Relations::new();
        r.apply(relation(1, &[("id", true), ("body", false)]))
            .unwrap();
        let ev = r
            .apply(Message::Delete(Delete {
                relation: 1,
                old: (OldKind::Key, TupleData(vec![text("5"), Datum::Null])),
            }))
            .unwrap()
            .unwrap();
        let SourceEvent::Change(c) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(c.op, Op::Delete);
        let old = c.old.unwrap();
        assert_eq!(old.0[0], Value::Text(Bytes::from_static(b"5")));
        assert_eq!(
            old.0[1],
            Value::NotSent,
            "a key-only row's NULL is not a value"
        );
    }

    #[test]
    fn a_resent_relation_replaces_the_old_shape() {
        let mut r = Relations::new();
        r.apply(relation(1, &[("id", true)])).unwrap();
        r.apply(relation(1, &[("id", true), ("added", false)]))
            .unwrap();
        assert_eq!(r.get(1).unwrap().columns.len(), 2);
    }

    #[test]
    fn unchanged_toast_is_reported_by_name() {
        let mut r = Relations::new();
        r.apply(relation(1, &[("id", true), ("big", false)]))
            .unwrap();
        let ev = r
            .apply(Message::Update(Update {
                relation: 1,
                old: None,
                new: TupleData(vec![text("1"), Datum::UnchangedToast]),
            }))
            .unwrap()
            .unwrap();
        let SourceEvent::Change(c) = ev else { panic!() };
        assert_eq!(c.unchanged_columns().collect::<Vec<_>>(), ["big"]);
    }

    #[test]
    fn commit_carries_the_xid_of_its_begin() {
        let mut r = Relations::new();
        r.apply(Message::Begin(Begin {
            final_lsn: Lsn(10),
            commit_time: 1,
            xid: 99,
        }))
        .unwrap();
        let ev = r
            .apply(Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(10),
                end_lsn: Lsn(20),
                commit_time: 1,
            }))
            .unwrap()
            .unwrap();
        assert!(matches!(ev, SourceEvent::Commit(c) if c.xid == 99 && c.end_lsn == Lsn(20)));
        assert!(r.current_transaction().is_none());
    }
}
