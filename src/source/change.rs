//! Typed row changes: what the source hands to the rest of the pipeline. A change
//! knows its table, its operation, its rows, which columns are key columns and which
//! were not sent (unchanged TOAST, or outside the replica identity key).

use std::sync::Arc;

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::source::pgoutput::{ColumnBody, Datum, OldKind, RelationBody, TupleData};
use crate::source::table::TableName;

/// A table as Postgres last described it in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
    /// The tables this one is a partition or an inheritance child of, nearest first,
    /// as the catalog said when the stream described the table. Their rules apply to
    /// its changes too.
    pub ancestors: Vec<TableName>,
}

impl Relation {
    /// `schema.name`, as events and logs show it.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The table's name as rules name it.
    pub fn table(&self) -> TableName {
        TableName::new(self.schema.clone(), self.name.clone())
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

impl From<RelationBody> for Relation {
    fn from(body: RelationBody) -> Self {
        Relation {
            oid: body.oid,
            schema: body.namespace,
            name: body.name,
            replica_identity: ReplicaIdentity::from_byte(body.replica_identity),
            columns: body.columns.into_iter().map(Column::from).collect(),
            ancestors: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the replica identity key: its old value is in every Update's and
    /// Delete's old row (when the identity is not NOTHING).
    pub is_key: bool,
}

impl From<ColumnBody> for Column {
    fn from(c: ColumnBody) -> Self {
        Column {
            name: c.name,
            type_oid: c.type_oid,
            type_modifier: c.type_modifier,
            is_key: c.flags & 1 == 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
    /// A byte this version doesn't know; kept so nothing is guessed.
    Other(u8),
}

impl ReplicaIdentity {
    pub fn from_byte(b: u8) -> Self {
        match b {
            b'd' => Self::Default,
            b'n' => Self::Nothing,
            b'f' => Self::Full,
            b'i' => Self::Index,
            other => Self::Other(other),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Nothing => "nothing",
            Self::Full => "full",
            Self::Index => "index",
            Self::Other(_) => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub fn as_str(&self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// One column of a row as the pipeline sees it: the decoder's own type, so a decoded
/// row becomes a change's row as it is (a conversion per column was about 2% of the
/// daemon's instructions in the tag-heavy catch-up). See [`Datum`] for the variants.
pub type Value = Datum;

/// A row in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn from_new(t: TupleData) -> Row {
        Row(t.0)
    }

    /// An old row: for `K` tuples only the key columns were sent; Postgres sends the
    /// other columns as NULL, which would be a lie, so they become `NotSent`.
    fn from_old(kind: OldKind, t: TupleData, relation: &Relation) -> Row {
        let mut values = t.0;
        if kind == OldKind::Key {
            for (i, v) in values.iter_mut().enumerate() {
                if !relation.columns.get(i).is_some_and(|c| c.is_key) {
                    *v = Value::NotSent;
                }
            }
        }
        Row(values)
    }

    pub fn get(&self, index: usize) -> Option<&Value> {
        self.0.get(index)
    }
}

/// One committed row change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub relation: Arc<Relation>,
    pub op: Op,
    /// The new row: Insert and Update.
    pub new: Option<Row>,
    /// The old row: Delete always; Update when the replica identity sends it (a key
    /// column changed, or REPLICA IDENTITY FULL).
    pub old: Option<Row>,
    /// `Key` when `old` carries only the replica identity key columns.
    pub old_kind: Option<OldKind>,
}

impl Change {
    pub(crate) fn insert(relation: Arc<Relation>, new: TupleData) -> Change {
        Change {
            relation,
            op: Op::Insert,
            new: Some(Row::from_new(new)),
            old: None,
            old_kind: None,
        }
    }

    pub(crate) fn update(
        relation: Arc<Relation>,
        old: Option<(OldKind, TupleData)>,
        new: TupleData,
    ) -> Change {
        let old_kind = old.as_ref().map(|(k, _)| *k);
        let old = old.map(|(kind, t)| Row::from_old(kind, t, &relation));
        Change {
            new: Some(Row::from_new(new)),
            op: Op::Update,
            old,
            old_kind,
            relation,
        }
    }

    pub(crate) fn delete(relation: Arc<Relation>, (kind, old): (OldKind, TupleData)) -> Change {
        let old = Row::from_old(kind, old, &relation);
        Change {
            relation,
            op: Op::Delete,
            new: None,
            old: Some(old),
            old_kind: Some(kind),
        }
    }

    /// Columns of the new row that Postgres sent as unchanged TOAST.
    pub fn unchanged_columns(&self) -> impl Iterator<Item = &str> {
        let cols = &self.relation.columns;
        self.new.iter().flat_map(move |row| {
            row.0
                .iter()
                .zip(cols)
                .filter(|(v, _)| matches!(v, Value::UnchangedToast))
                .map(|(_, c)| c.name.as_str())
        })
    }
}

/// What the source yields, in WAL order. Changes come between a `Begin` and its
/// `Commit`; nothing is buffered, so a transaction of any size streams through.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    Begin(TxnInfo),
    Change(Change),
    /// TRUNCATE of one or more tables in one statement.
    Truncate {
        relations: Vec<Arc<Relation>>,
        cascade: bool,
        restart_identity: bool,
    },
    /// `pg_logical_emit_message`. Transactional ones arrive inside their transaction;
    /// others arrive on their own, outside any Begin/Commit.
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    Commit(CommitInfo),
    /// Outside any transaction, the server has sent every transaction that committed
    /// before `lsn` (the end of the WAL it has read for the slot, from a keepalive):
    /// a position to confirm once what came before it is applied. A transaction still
    /// open commits after `lsn` and is sent then.
    ///
    /// Confirming it when idle is what PostgreSQL's own subscriber does, and what a
    /// shutting-down walsender waits for (`pg_ctl stop -m fast`, a switchover): it
    /// exits only once its client has confirmed all it has read, so a client that
    /// confirmed only its last transaction's end held the server's shutdown for as
    /// long as it stayed connected.
    Idle {
        lsn: Lsn,
    },
}

/// Known at Begin: Postgres sends a transaction only once it has committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnInfo {
    pub xid: u32,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC (the Postgres epoch).
    pub commit_time: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitInfo {
    pub xid: u32,
    pub commit_lsn: Lsn,
    /// Just past the commit record: the LSN to confirm once the transaction is applied.
    pub end_lsn: Lsn,
    pub commit_time: i64,
}
