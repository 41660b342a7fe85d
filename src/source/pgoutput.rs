//! Decoder for the pgoutput logical replication protocol, version 1: every message
//! Postgres sends inside an XLogData frame. `pgwire-replication` only splits the
//! frames; the meaning of the bytes is ours.
//!
//! Decoding never panics and never reads past the message: a truncated or malformed
//! message is a [`DecodeError`] that says which message and which field.

use bytes::Bytes;

use crate::lsn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(RelationBody),
    Type(TypeBody),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: what a subscriber confirms.
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationBody {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<ColumnBody>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnBody {
    /// Bit 1: the column is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeBody {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    pub relation: u32,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub relation: u32,
    /// The old row: key columns only (`K`) or every column (`O`), when sent.
    pub old: Option<(OldKind, TupleData)>,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    pub relation: u32,
    pub old: (OldKind, TupleData),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
    pub options: u8,
    pub relations: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// Which old row an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: the replica identity key columns; the other columns are sent as NULL.
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// The columns of one row, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData(pub Vec<Datum>);

/// One column of a row as sent on the wire, and as the pipeline sees it
/// ([`crate::source::change::Value`] is this type: a decoded row becomes a change's
/// row without a conversion per column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// `n`
    Null,
    /// `u`: an unchanged TOASTed value that Postgres did not send. It is never a
    /// value: look in the old row, or treat the column as unknown.
    UnchangedToast,
    /// `t`: the value in Postgres text form.
    Text(Bytes),
    /// `b`: the value in binary form (only with the `binary` option).
    Binary(Bytes),
    /// Never on the wire, never decoded: a non-key column of an old row that carries
    /// only the replica identity key (Postgres sends those columns as NULL, which
    /// would be a lie; `Row` marks them so).
    NotSent,
}

impl Datum {
    /// The value is present on the wire (NULL counts: it is a real NULL).
    pub fn is_known(&self) -> bool {
        !matches!(self, Datum::UnchangedToast | Datum::NotSent)
    }
}

/// What was wrong with a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message type {tag:?} (0x{byte:02x}); the stream must be started with proto_version '1'", tag = char::from(*.0), byte = .0)]
    UnknownMessage(u8),
    #[error("pgoutput {message} message truncated while reading {field}")]
    Truncated {
        message: &'static str,
        field: &'static str,
    },
    #[error("pgoutput {message} message: {field} is not valid UTF-8")]
    InvalidUtf8 {
        message: &'static str,
        field: &'static str,
    },
    #[error("pgoutput {message} message: unexpected byte {found:?} where {expected} was expected")]
    Unexpected {
        message: &'static str,
        expected: &'static str,
        found: char,
    },
    #[error("pgoutput {message} message: negative {field} {value}")]
    Negative {
        message: &'static str,
        field: &'static str,
        value: i64,
    },
    #[error("pgoutput {message} message has {extra} unexpected bytes at its end")]
    TrailingBytes { message: &'static str, extra: usize },
}

/// Decodes one pgoutput message. `data` is the payload of one XLogData frame.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let (&tag, _) = data.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader {
        data,
        pos: 1,
        message: message_name(tag),
    };
    let message = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: Lsn(r.u64("final LSN")?),
            commit_time: r.i64("commit time")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: Lsn(r.u64("commit LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            commit_time: r.i64("commit time")?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: Lsn(r.u64("commit LSN")?),
            name: r.cstr("origin name")?,
        }),
        b'R' => {
            let oid = r.u32("relation OID")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let count = r.count16("column count")?;
            let mut columns = Vec::with_capacity(count.min(r.remaining()));
            for _ in 0..count {
                columns.push(ColumnBody {
                    flags: r.u8("column flags")?,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type OID")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            Message::Relation(RelationBody {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type(TypeBody {
            oid: r.u32("type OID")?,
            namespace: r.cstr("namespace")?,
            name: r.cstr("type name")?,
        }),
        b'I' => {
            let relation = r.u32("relation OID")?;
            r.expect(b'N', "'N' (new tuple)")?;
            Message::Insert(Insert {
                relation,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let relation = r.u32("relation OID")?;
            let old = match r.u8("tuple kind")? {
                b'N' => None,
                b'K' => Some((OldKind::Key, r.tuple_then_new()?)),
                b'O' => Some((OldKind::Full, r.tuple_then_new()?)),
                other => return Err(r.unexpected("'K', 'O' or 'N'", other)),
            };
            Message::Update(Update {
                relation,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let relation = r.u32("relation OID")?;
            let kind = match r.u8("tuple kind")? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Full,
                other => return Err(r.unexpected("'K' or 'O'", other)),
            };
            Message::Delete(Delete {
                relation,
                old: (kind, r.tuple()?),
            })
        }
        b'T' => {
            let count = r.count32("relation count")?;
            let options = r.u8("options")?;
            let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relations.push(r.u32("relation OID")?);
            }
            Message::Truncate(Truncate { options, relations })
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = Lsn(r.u64("message LSN")?);
            let prefix = r.cstr("prefix")?;
            let len = r.count32("content length")?;
            Message::Message(LogicalMessage {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.bytes(len, "content")?,
            })
        }
        other => return Err(DecodeError::UnknownMessage(other)),
    };
    r.finish()?;
    Ok(message)
}

fn message_name(tag: u8) -> &'static str {
    match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        _ => "unknown",
    }
}

/// A cursor over one message that turns every short read into an error naming the field.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                message: self.message,
                field,
            });
        }
        let slice = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn count16(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let n = self.i16(field)?;
        usize::try_from(n).map_err(|_| self.negative(field, n.into()))
    }

    fn count32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let n = self.i32(field)?;
        usize::try_from(n).map_err(|_| self.negative(field, n.into()))
    }

    fn negative(&self, field: &'static str, value: i64) -> DecodeError {
        DecodeError::Negative {
            message: self.message,
            field,
            value,
        }
    }

    fn cstr(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated {
                message: self.message,
                field,
            })?;
        let text = std::str::from_utf8(&rest[..end]).map_err(|_| DecodeError::InvalidUtf8 {
            message: self.message,
            field,
        })?;
        self.pos += end + 1;
        Ok(text.to_string())
    }

    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                message: self.message,
                field,
            });
        }
        let out = self.data.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    fn unexpected(&self, expected: &'static str, found: u8) -> DecodeError {
        DecodeError::Unexpected {
            message: self.message,
            expected,
            found: char::from(found),
        }
    }

    fn expect(&mut self, byte: u8, expected: &'static str) -> Result<(), DecodeError> {
        match self.u8("tuple kind")? {
            b if b == byte => Ok(()),
            other => Err(self.unexpected(expected, other)),
        }
    }

    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = self.count16("tuple column count")?;
        // Every column takes at least one byte: never reserve more than the message holds.
        let mut datums = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            datums.push(match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => {
                    let len = self.count32("column length")?;
                    Datum::Text(self.bytes(len, "column value")?)
                }
                b'b' => {
                    let len = self.count32("column length")?;
                    Datum::Binary(self.bytes(len, "column value")?)
                }
                other => return Err(self.unexpected("'n', 'u', 't' or 'b'", other)),
            });
        }
        Ok(TupleData(datums))
    }

    /// An old tuple inside an Update, followed by the 'N' that starts the new one.
    fn tuple_then_new(&mut self) -> Result<TupleData, DecodeError> {
        let old = self.tuple()?;
        self.expect(b'N', "'N' (new tuple)")?;
        Ok(old)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes {
                message: self.message,
                extra,
            }),
        }
    }
}

/// Encoders for tests: build the bytes Postgres would send.
#[cfg(test)]
pub(crate) mod encode {
    use super::*;

    pub fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    pub fn tuple(out: &mut Vec<u8>, t: &TupleData) {
        out.extend_from_slice(&(t.0.len() as i16).to_be_bytes());
        for d in &t.0 {
            match d {
                Datum::Null => out.push(b'n'),
                Datum::UnchangedToast => out.push(b'u'),
                Datum::NotSent => panic!("NotSent is never on the wire"),
                Datum::Text(b) | Datum::Binary(b) => {
                    out.push(if matches!(d, Datum::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    });
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }

    fn old(out: &mut Vec<u8>, kind: OldKind, t: &TupleData) {
        out.push(match kind {
            OldKind::Key => b'K',
            OldKind::Full => b'O',
        });
        tuple(out, t);
    }

    pub fn message(m: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        match m {
            Message::Begin(b) => {
                out.push(b'B');
                out.extend_from_slice(&b.final_lsn.0.to_be_bytes());
                out.extend_from_slice(&b.commit_time.to_be_bytes());
                out.extend_from_slice(&b.xid.to_be_bytes());
            }
            Message::Commit(c) => {
                out.push(b'C');
                out.push(c.flags);
                out.extend_from_slice(&c.commit_lsn.0.to_be_bytes());
                out.extend_from_slice(&c.end_lsn.0.to_be_bytes());
                out.extend_from_slice(&c.commit_time.to_be_bytes());
            }
            Message::Origin(o) => {
                out.push(b'O');
                out.extend_from_slice(&o.commit_lsn.0.to_be_bytes());
                cstr(&mut out, &o.name);
            }
            Message::Relation(r) => {
                out.push(b'R');
                out.extend_from_slice(&r.oid.to_be_bytes());
                cstr(&mut out, &r.namespace);
                cstr(&mut out, &r.name);
                out.push(r.replica_identity);
                out.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
                for c in &r.columns {
                    out.push(c.flags);
                    cstr(&mut out, &c.name);
                    out.extend_from_slice(&c.type_oid.to_be_bytes());
                    out.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type(t) => {
                out.push(b'Y');
                out.extend_from_slice(&t.oid.to_be_bytes());
                cstr(&mut out, &t.namespace);
                cstr(&mut out, &t.name);
            }
            Message::Insert(i) => {
                out.push(b'I');
                out.extend_from_slice(&i.relation.to_be_bytes());
                out.push(b'N');
                tuple(&mut out, &i.new);
            }
            Message::Update(u) => {
                out.push(b'U');
                out.extend_from_slice(&u.relation.to_be_bytes());
                if let Some((kind, t)) = &u.old {
                    old(&mut out, *kind, t);
                }
                out.push(b'N');
                tuple(&mut out, &u.new);
            }
            Message::Delete(d) => {
                out.push(b'D');
                out.extend_from_slice(&d.relation.to_be_bytes());
                old(&mut out, d.old.0, &d.old.1);
            }
            Message::Truncate(t) => {
                out.push(b'T');
                out.extend_from_slice(&(t.relations.len() as i32).to_be_bytes());
                out.push(t.options);
                for oid in &t.relations {
                    out.extend_from_slice(&oid.to_be_bytes());
                }
            }
            Message::Message(m) => {
                out.push(b'M');
                out.push(u8::from(m.transactional));
                out.extend_from_slice(&m.lsn.0.to_be_bytes());
                cstr(&mut out, &m.prefix);
                out.extend_from_slice(&(m.content.len() as i32).to_be_bytes());
                out.extend_from_slice(&m.content);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn samples() -> Vec<Message> {
        let row = TupleData(vec![
            text("42"),
            Datum::Null,
            Datum::UnchangedToast,
            text("héllo wörld ✓"),
            Datum::Binary(Bytes::from_static(&[0, 1, 2, 255])),
        ]);
        let key = TupleData(vec![text("42"), Datum::Null, Datum::Null]);
        vec![
            Message::Begin(Begin {
                final_lsn: Lsn(0x1_0000_0010),
                commit_time: 785_000_000_123_456,
                xid: 7781,
            }),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(0x1_0000_0010),
                end_lsn: Lsn(0x1_0000_0040),
                commit_time: 785_000_000_123_456,
            }),
            Message::Origin(Origin {
                commit_lsn: Lsn(99),
                name: "upstream".into(),
            }),
            Message::Relation(RelationBody {
                oid: 16384,
                namespace: "shop".into(),
                name: "products".into(),
                replica_identity: b'd',
                columns: vec![
                    ColumnBody {
                        flags: 1,
                        name: "id".into(),
                        type_oid: 23,
                        type_modifier: -1,
                    },
                    ColumnBody {
                        flags: 0,
                        name: "price".into(),
                        type_oid: 1700,
                        type_modifier: 655_366,
                    },
                ],
            }),
            Message::Type(TypeBody {
                oid: 70000,
                namespace: "public".into(),
                name: "mood".into(),
            }),
            Message::Insert(Insert {
                relation: 16384,
                new: row.clone(),
            }),
            Message::Update(Update {
                relation: 16384,
                old: None,
                new: row.clone(),
            }),
            Message::Update(Update {
                relation: 16384,
                old: Some((OldKind::Key, key.clone())),
                new: row.clone(),
            }),
            Message::Update(Update {
                relation: 16384,
                old: Some((OldKind::Full, row.clone())),
                new: row.clone(),
            }),
            Message::Delete(Delete {
                relation: 16384,
                old: (OldKind::Key, key),
            }),
            Message::Delete(Delete {
                relation: 16384,
                old: (OldKind::Full, row),
            }),
            Message::Truncate(Truncate {
                options: 3,
                relations: vec![16384, 16390],
            }),
            Message::Message(LogicalMessage {
                transactional: true,
                lsn: Lsn(1234),
                prefix: "wal2cache".into(),
                content: Bytes::from_static(br#"{"keys":["a"]}"#),
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = Bytes::from(encode::message(&m));
            assert_eq!(decode(&bytes).as_ref(), Ok(&m), "{m:?}");
        }
    }

    #[test]
    fn every_truncation_of_every_message_is_an_error() {
        for m in samples() {
            let bytes = encode::message(&m);
            for len in 0..bytes.len() {
                let cut = Bytes::copy_from_slice(&bytes[..len]);
                assert!(decode(&cut).is_err(), "{m:?} cut at {len} decoded");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = encode::message(&samples()[0]);
        bytes.push(0);
        assert_eq!(
            decode(&Bytes::from(bytes)),
            Err(DecodeError::TrailingBytes {
                message: "Begin",
                extra: 1
            })
        );
    }

    #[test]
    fn errors_name_the_message_and_the_field() {
        let mut bytes = vec![b'I', 0, 0, 0x40, 0, b'N', 0, 1, b't', 0, 0, 0, 9, b'x'];
        let err = decode(&Bytes::from(bytes.clone())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pgoutput Insert message truncated while reading column value"
        );
        bytes[8] = b'z';
        let err = decode(&Bytes::from(bytes)).unwrap_err();
        assert!(err.to_string().contains("unexpected byte 'z'"), "{err}");
        let err = decode(&Bytes::from_static(b"S\0\0\0\x01")).unwrap_err();
        assert!(err.to_string().contains("proto_version '1'"), "{err}");
    }

    #[test]
    fn negative_lengths_are_errors() {
        let bytes = Bytes::from_static(&[b'I', 0, 0, 0x40, 0, b'N', 0xff, 0xff]);
        assert!(matches!(decode(&bytes), Err(DecodeError::Negative { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&Bytes::from(data));
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_tag_never_panic(
            tag in proptest::sample::select(b"BCORYIUDTM".to_vec()),
            data in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut bytes = vec![tag];
            bytes.extend(data);
            let _ = decode(&Bytes::from(bytes));
        }

        #[test]
        fn mutated_valid_messages_never_panic(
            which in 0usize..13,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = encode::message(&samples()[which]);
            for (at, byte) in flips {
                let at = at % bytes.len();
                bytes[at] = byte;
            }
            let _ = decode(&Bytes::from(bytes));
        }
    }
}
