//! Oracle test: the same mixed workload read through a second slot with Postgres's
//! own `test_decoding` plugin gives the same table, operation and column values, row
//! by row, as our pgoutput decoder.
//!
//! test_decoding prints one text line per event; a small parser below turns those
//! lines and our `SourceEvent`s into the same normalized records, which are compared
//! in order, transaction boundaries included.
//!
//! Normalization rules (what test_decoding does differently on purpose):
//! - booleans are printed `true`/`false`; pgoutput sends the text form `t`/`f`;
//! - old tuples (`old-key:` and DELETE) skip NULL columns, and with a key-only
//!   identity the non-key columns are NULL in the WAL: so on our side an old row is
//!   compared on its columns that are neither `Null` nor `NotSent`;
//! - identifiers are quoted with `quote_identifier`; the parser unquotes them.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Instant;

use support::db::TestDb;
use support::rng::Lcg;
use support::stream::commits;
use wal2cache::source::{Change, Op, Source, SourceEvent, Value};
use wal2cache::Lsn;

// ---------------------------------------------------------------------------------
// Normalized records, the common form of both sides.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Val {
    Null,
    Text(String),
    UnchangedToast,
    /// Only on our side, where it must never appear in a new row.
    NotSent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Col {
    name: String,
    ty: String,
    val: Val,
}

/// `None`: test_decoding's `(no-tuple-data)`.
type Tuple = Option<Vec<Col>>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rec {
    Begin,
    Commit,
    Insert {
        table: String,
        new: Tuple,
    },
    Update {
        table: String,
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        table: String,
        old: Tuple,
    },
    Truncate {
        tables: Vec<String>,
        restart_seqs: bool,
        cascade: bool,
    },
    Message {
        transactional: bool,
        prefix: String,
        content: String,
    },
}

impl Rec {
    fn is_change(&self) -> bool {
        matches!(
            self,
            Rec::Insert { .. } | Rec::Update { .. } | Rec::Delete { .. }
        )
    }
}

fn short(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}…({} bytes)", s.len())
    }
}

struct ShowTuple<'a>(&'a Tuple);

impl fmt::Display for ShowTuple<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(cols) = self.0 else {
            return write!(f, "(no-tuple-data)");
        };
        write!(f, "{{")?;
        for (i, c) in cols.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{}[{}]=", c.name, c.ty)?;
            match &c.val {
                Val::Null => write!(f, "NULL")?,
                Val::Text(s) => write!(f, "{}", short(s))?,
                Val::UnchangedToast => write!(f, "<unchanged toast>")?,
                Val::NotSent => write!(f, "<not sent>")?,
            }
        }
        write!(f, "}}")
    }
}

impl fmt::Display for Rec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rec::Begin => write!(f, "BEGIN"),
            Rec::Commit => write!(f, "COMMIT"),
            Rec::Insert { table, new } => write!(f, "{table} INSERT new={}", ShowTuple(new)),
            Rec::Update { table, old, new } => {
                write!(f, "{table} UPDATE")?;
                if let Some(old) = old {
                    write!(f, " old={}", ShowTuple(old))?;
                }
                write!(f, " new={}", ShowTuple(new))
            }
            Rec::Delete { table, old } => write!(f, "{table} DELETE old={}", ShowTuple(old)),
            Rec::Truncate {
                tables,
                restart_seqs,
                cascade,
            } => write!(
                f,
                "TRUNCATE {tables:?} restart_seqs={restart_seqs} cascade={cascade}"
            ),
            Rec::Message {
                transactional,
                prefix,
                content,
            } => write!(
                f,
                "MESSAGE transactional={transactional} prefix={prefix:?} content={}",
                short(content)
            ),
        }
    }
}

// ---------------------------------------------------------------------------------
// The test_decoding line parser.

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn eat(&mut self, prefix: &str) -> bool {
        if self.rest().starts_with(prefix) {
            self.pos += prefix.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, prefix: &str) -> Result<(), String> {
        if self.eat(prefix) {
            Ok(())
        } else {
            Err(format!(
                "expected {prefix:?} at byte {} of {:?}, found {:?}",
                self.pos,
                self.s,
                self.rest()
            ))
        }
    }

    fn at_end(&self) -> bool {
        self.pos == self.s.len()
    }

    /// An identifier as `quote_identifier` prints it: `"..."` with `""` for a quote,
    /// or bare (lower case letters, digits, `_`, `$`).
    fn ident(&mut self) -> Result<String, String> {
        if self.eat("\"") {
            let mut out = String::new();
            loop {
                let rest = self.rest();
                let Some(i) = rest.find('"') else {
                    return Err(format!("unterminated quoted identifier in {:?}", self.s));
                };
                out.push_str(&rest[..i]);
                self.pos += i + 1;
                if self.eat("\"") {
                    out.push('"');
                } else {
                    return Ok(out);
                }
            }
        }
        let rest = self.rest();
        let len = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$'))
            .unwrap_or(rest.len());
        if len == 0 {
            return Err(format!(
                "expected an identifier at byte {} of {:?}",
                self.pos, self.s
            ));
        }
        self.pos += len;
        Ok(rest[..len].to_string())
    }

    /// `schema.name` as `quote_qualified_identifier` prints it, unquoted and joined.
    fn qualified(&mut self) -> Result<String, String> {
        let schema = self.ident()?;
        self.expect(".")?;
        let name = self.ident()?;
        Ok(format!("{schema}.{name}"))
    }

    /// A value after `name[type]:`.
    fn value(&mut self) -> Result<Val, String> {
        if self.eat("'") {
            let mut out = String::new();
            loop {
                let rest = self.rest();
                let Some(i) = rest.find('\'') else {
                    return Err(format!("unterminated quoted value in {:?}", self.s));
                };
                out.push_str(&rest[..i]);
                self.pos += i + 1;
                if self.eat("'") {
                    out.push('\'');
                } else {
                    return Ok(Val::Text(out));
                }
            }
        }
        let rest = self.rest();
        let len = rest.find(' ').unwrap_or(rest.len());
        let token = &rest[..len];
        self.pos += len;
        Ok(match token {
            "null" => Val::Null,
            "unchanged-toast-datum" => Val::UnchangedToast,
            "" => return Err(format!("empty value at byte {} of {:?}", self.pos, self.s)),
            // Unquoted: integer, numeric, float and oid output, and bit strings.
            other => Val::Text(other.to_string()),
        })
    }

    /// ` name[type]:value` repeated, up to the end or to ` new-tuple:`.
    fn tuple(&mut self) -> Result<Tuple, String> {
        if self.eat(" (no-tuple-data)") {
            return Ok(None);
        }
        let mut cols = Vec::new();
        while !self.at_end() && !self.rest().starts_with(" new-tuple:") {
            self.expect(" ")?;
            let name = self.ident()?;
            self.expect("[")?;
            // Type names hold spaces and brackets (`integer[]`, `timestamp with time
            // zone`); the type ends at the first `]:`.
            let rest = self.rest();
            let Some(end) = rest.find("]:") else {
                return Err(format!("no end of type for column {name} in {:?}", self.s));
            };
            let ty = rest[..end].to_string();
            self.pos += end + 2;
            let val = self.value()?;
            cols.push(Col { name, ty, val });
        }
        Ok(Some(cols))
    }
}

/// One line of `pg_logical_slot_get_changes(..., 'include-xids', '0')`.
fn parse_line(line: &str) -> Result<Rec, String> {
    if line == "BEGIN" {
        return Ok(Rec::Begin);
    }
    if line == "COMMIT" {
        return Ok(Rec::Commit);
    }
    let mut c = Cursor { s: line, pos: 0 };
    if c.eat("message: transactional: ") {
        let transactional = if c.eat("1") {
            true
        } else {
            c.expect("0")?;
            false
        };
        c.expect(" prefix: ")?;
        let rest = c.rest();
        let Some(i) = rest.find(", sz: ") else {
            return Err(format!("no size in message {line:?}"));
        };
        let prefix = rest[..i].to_string();
        c.pos += i + ", sz: ".len();
        let rest = c.rest();
        let Some(i) = rest.find(" content:") else {
            return Err(format!("no content in message {line:?}"));
        };
        let size: usize = rest[..i]
            .parse()
            .map_err(|e| format!("bad size in {line:?}: {e}"))?;
        c.pos += i + " content:".len();
        let content = c.rest().to_string();
        if content.len() != size {
            return Err(format!(
                "message size {size} but {} bytes of content",
                content.len()
            ));
        }
        return Ok(Rec::Message {
            transactional,
            prefix,
            content,
        });
    }
    c.expect("table ")?;
    let mut tables = vec![c.qualified()?];
    while c.eat(", ") {
        tables.push(c.qualified()?);
    }
    c.expect(":")?;
    let one_table = |tables: Vec<String>| -> Result<String, String> {
        match <[String; 1]>::try_from(tables) {
            Ok([t]) => Ok(t),
            Err(ts) => Err(format!("{} tables for a row change in {line:?}", ts.len())),
        }
    };
    let rec = if c.eat(" INSERT:") {
        Rec::Insert {
            table: one_table(tables)?,
            new: c.tuple()?,
        }
    } else if c.eat(" UPDATE:") {
        let old = if c.eat(" old-key:") {
            let old = c.tuple()?;
            c.expect(" new-tuple:")?;
            Some(old)
        } else {
            None
        };
        Rec::Update {
            table: one_table(tables)?,
            old,
            new: c.tuple()?,
        }
    } else if c.eat(" DELETE:") {
        Rec::Delete {
            table: one_table(tables)?,
            old: c.tuple()?,
        }
    } else if c.eat(" TRUNCATE:") {
        let (mut restart_seqs, mut cascade) = (false, false);
        if !c.eat(" (no-flags)") {
            restart_seqs = c.eat(" restart_seqs");
            cascade = c.eat(" cascade");
            if !(restart_seqs || cascade) {
                return Err(format!("unknown TRUNCATE flags in {line:?}"));
            }
        }
        Rec::Truncate {
            tables,
            restart_seqs,
            cascade,
        }
    } else {
        return Err(format!("unknown action in {line:?}"));
    };
    if !c.at_end() {
        return Err(format!("trailing {:?} in {line:?}", c.rest()));
    }
    Ok(rec)
}

/// What test_decoding prints differently from the pgoutput text form on purpose.
fn normalize_oracle(mut rec: Rec) -> Rec {
    let fix = |t: &mut Tuple| {
        for col in t.iter_mut().flatten() {
            if col.ty == "boolean" {
                if let Val::Text(s) = &mut col.val {
                    match s.as_str() {
                        "true" => *s = "t".into(),
                        "false" => *s = "f".into(),
                        _ => {}
                    }
                }
            }
        }
    };
    match &mut rec {
        Rec::Insert { new, .. } => fix(new),
        Rec::Update { old, new, .. } => {
            if let Some(old) = old {
                fix(old);
            }
            fix(new);
        }
        Rec::Delete { old, .. } => fix(old),
        _ => {}
    }
    rec
}

// ---------------------------------------------------------------------------------
// Our side in the same form.

fn our_tuple(change: &Change, old: bool, types: &HashMap<u32, String>) -> Tuple {
    let row = if old { &change.old } else { &change.new };
    let row = row.as_ref()?;
    let mut cols = Vec::new();
    for (i, value) in row.0.iter().enumerate() {
        let column = change.relation.columns.get(i);
        let name = column.map_or_else(|| format!("<column {i}>"), |c| c.name.clone());
        let ty = column
            .and_then(|c| types.get(&c.type_oid).cloned())
            .unwrap_or_else(|| "<unknown type>".into());
        let val = match value {
            Value::Null => Val::Null,
            Value::Text(b) => Val::Text(match std::str::from_utf8(b) {
                Ok(s) => s.to_string(),
                Err(_) => format!("<invalid utf-8 {b:?}>"),
            }),
            Value::Binary(b) => Val::Text(format!("<binary {b:?}>")),
            Value::UnchangedToast => Val::UnchangedToast,
            Value::NotSent => Val::NotSent,
        };
        // test_decoding skips NULL columns of old tuples, and key-only old rows have
        // their other columns NotSent: compare the columns that are present.
        if old && matches!(val, Val::Null | Val::NotSent) {
            continue;
        }
        cols.push(Col { name, ty, val });
    }
    Some(cols)
}

fn our_records(events: &[SourceEvent], types: &HashMap<u32, String>) -> Vec<Rec> {
    events
        .iter()
        .filter(|e| !matches!(e, SourceEvent::Idle { .. }))
        .map(|e| match e {
            SourceEvent::Begin(_) => Rec::Begin,
            SourceEvent::Commit(_) => Rec::Commit,
            SourceEvent::Change(c) => {
                let table = c.relation.qualified_name();
                match c.op {
                    Op::Insert => Rec::Insert {
                        table,
                        new: our_tuple(c, false, types),
                    },
                    Op::Update => Rec::Update {
                        table,
                        old: c.old.as_ref().map(|_| our_tuple(c, true, types)),
                        new: our_tuple(c, false, types),
                    },
                    Op::Delete => Rec::Delete {
                        table,
                        old: our_tuple(c, true, types),
                    },
                }
            }
            SourceEvent::Truncate {
                relations,
                cascade,
                restart_identity,
            } => Rec::Truncate {
                tables: relations.iter().map(|r| r.qualified_name()).collect(),
                restart_seqs: *restart_identity,
                cascade: *cascade,
            },
            SourceEvent::Message {
                transactional,
                prefix,
                content,
                ..
            } => Rec::Message {
                transactional: *transactional,
                prefix: prefix.clone(),
                content: String::from_utf8_lossy(content).into_owned(),
            },
            SourceEvent::Idle { .. } => unreachable!("left out above"),
        })
        .collect()
}

/// Panics with the first mismatching record, its neighbours and, for rows, the
/// columns that differ.
fn assert_same(ours: &[Rec], oracle: &[Rec]) {
    let Some(i) = (0..ours.len().max(oracle.len())).find(|&i| ours.get(i) != oracle.get(i)) else {
        return;
    };
    let show = |side: &[Rec]| {
        let mut s = String::new();
        let from = i.saturating_sub(3);
        for (j, rec) in side.iter().enumerate().skip(from).take(i + 3 - from) {
            let mark = if j == i { ">>" } else { "  " };
            s.push_str(&format!("{mark} [{j}] {rec}\n"));
        }
        s
    };
    let mut detail = String::new();
    if let (Some(a), Some(b)) = (ours.get(i), oracle.get(i)) {
        let tuples = |r: &Rec| -> Vec<(&'static str, Tuple)> {
            match r {
                Rec::Insert { new, .. } => vec![("new", new.clone())],
                Rec::Update { old, new, .. } => {
                    vec![("old", old.clone().flatten()), ("new", new.clone())]
                }
                Rec::Delete { old, .. } => vec![("old", old.clone())],
                _ => vec![],
            }
        };
        for ((which, ta), (_, tb)) in tuples(a).into_iter().zip(tuples(b)) {
            let map = |t: &Tuple| -> BTreeMap<String, (String, Val)> {
                t.iter()
                    .flatten()
                    .map(|c| (c.name.clone(), (c.ty.clone(), c.val.clone())))
                    .collect()
            };
            let (ma, mb) = (map(&ta), map(&tb));
            for name in ma
                .keys()
                .chain(mb.keys())
                .collect::<std::collections::BTreeSet<_>>()
            {
                if ma.get(name) != mb.get(name) {
                    detail.push_str(&format!(
                        "  {which}.{name}: ours {:?}\n  {which}.{name}: test_decoding {:?}\n",
                        ma.get(name),
                        mb.get(name)
                    ));
                }
            }
        }
    }
    panic!(
        "decoders disagree at record {i} (ours has {}, test_decoding has {})\n\
         ours:\n{}test_decoding:\n{}{}",
        ours.len(),
        oracle.len(),
        show(ours),
        show(oracle),
        if detail.is_empty() {
            String::new()
        } else {
            format!("differing columns:\n{detail}")
        }
    );
}

// ---------------------------------------------------------------------------------
// The workload: deterministic pseudo-random statements over a model of live keys.

/// Text that stresses the parser and the decoders: quotes, spaces, multibyte,
/// backslashes, newlines, and test_decoding's own keywords.
const FRAGMENTS: &[&str] = &[
    "plain",
    "it's",
    "''",
    "'",
    "\"dq\"",
    " ",
    "  two  spaces ",
    "日本語",
    "🎉",
    "héllo wörld",
    "]:",
    "[x]:y",
    "null",
    "\\",
    "\\x41",
    "\n",
    "\t",
    "unchanged-toast-datum",
    " new-tuple: a[text]:'b'",
    " old-key:",
    "(no-tuple-data)",
    "O'Reilly",
    ",",
    "{}",
    "a, b: TRUNCATE:",
];

fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn rand_text(r: &mut Lcg, parts: u64) -> String {
    let n = 1 + r.below(parts);
    (0..n).map(|_| *r.pick(FRAGMENTS)).collect()
}

#[derive(Clone, Copy)]
enum Gen {
    Text,
    ShortText,
    Int,
    Small,
    Big,
    Num3,
    Num,
    Bool,
    IntArr,
    Jsonb,
    Tstz,
    Date,
    Uuid,
    Bytea,
    Real,
    Float8,
    Char3,
    /// Over 2 kB, stored out of line (the column is STORAGE EXTERNAL).
    Body,
}

fn literal(r: &mut Lcg, g: Gen) -> String {
    use Gen::*;
    // Int never NULL: it feeds NOT NULL columns too.
    if !matches!(g, Int) && r.chance(8) {
        return "NULL".into();
    }
    match g {
        Text => {
            if r.chance(5) {
                "''".into()
            } else {
                sql_str(&rand_text(r, 4))
            }
        }
        ShortText => {
            let s: String = rand_text(r, 2).chars().take(30).collect();
            format!("{}::varchar(40)", sql_str(&s))
        }
        Int => (r.below(2_000_001) as i64 - 1_000_000).to_string(),
        Small => r.pick(&["-32768", "32767", "0", "7"]).to_string(),
        Big => r
            .pick(&["9223372036854775807", "-9223372036854775808", "0", "42"])
            .to_string(),
        Num3 => {
            let v = r.below(2_000_000_000) as i64 - 1_000_000_000;
            format!("{}.{:03}", v / 1000, (v % 1000).abs())
        }
        Num => r
            .pick(&[
                "0",
                "-0.5",
                "1e-20",
                "123456789012345678901234567890.123456789",
                "'NaN'",
                "'Infinity'",
                "3.14159",
                "-1000000",
            ])
            .to_string(),
        Bool => r.pick(&["true", "false"]).to_string(),
        IntArr => r
            .pick(&[
                "'{1,2,NULL}'",
                "'{}'",
                "'{{1,2},{3,4}}'",
                "ARRAY[-2147483648, 0, 2147483647]",
            ])
            .to_string(),
        Jsonb => {
            let j = serde_json::json!({
                "k": rand_text(r, 3),
                "n": r.below(1000),
                "a": [true, null, 2.5],
            });
            sql_str(&j.to_string())
        }
        Tstz => format!(
            "'2024-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+0{}'",
            1 + r.below(12),
            1 + r.below(28),
            r.below(24),
            r.below(60),
            r.below(60),
            r.below(1_000_000),
            r.below(10)
        ),
        Date => format!(
            "'20{:02}-{:02}-{:02}'",
            r.below(100),
            1 + r.below(12),
            1 + r.below(28)
        ),
        Uuid => format!(
            "'{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}'",
            r.next(),
            r.below(0x10000),
            r.below(0x1000),
            r.below(0x1000),
            (r.next() << 17) ^ r.next()
        ),
        Bytea => {
            let n = r.below(6);
            let hex: String = (0..n).map(|_| format!("{:02x}", r.below(256))).collect();
            format!("'\\x{hex}'::bytea")
        }
        Real => r
            .pick(&["0.1", "'NaN'", "'-Infinity'", "3.4028235e38", "1e-45", "-0"])
            .to_string(),
        Float8 => {
            if r.chance(50) {
                r.pick(&[
                    "0.1",
                    "'NaN'",
                    "'Infinity'",
                    "-0",
                    "1e300",
                    "2.2250738585072014e-308",
                ])
                .to_string()
            } else {
                format!(
                    "{}.{}e{}",
                    r.below(1000),
                    r.below(1000),
                    r.below(40) as i64 - 20
                )
            }
        }
        Char3 => r.pick(&["'a'", "'abc'", "''", "'日'"]).to_string(),
        Body => {
            let mut s = String::new();
            let target = 2500 + r.below(1500) as usize;
            while s.len() < target {
                let fragment = *r.pick(FRAGMENTS);
                s.push_str(fragment);
                s.push_str(&r.below(1_000_000).to_string());
            }
            sql_str(&s)
        }
    }
}

struct Table {
    sql: &'static str,
    keys: &'static [&'static str],
    key: fn(u64) -> Vec<String>,
    cols: &'static [(&'static str, Gen)],
}

fn tables() -> Vec<Table> {
    use Gen::*;
    vec![
        Table {
            sql: "shop.items",
            keys: &["id"],
            key: |n| vec![n.to_string()],
            cols: &[
                ("name", Text),
                ("price", Num3),
                ("ok", Bool),
                ("tags", IntArr),
                ("meta", Jsonb),
                ("note", ShortText),
            ],
        },
        Table {
            sql: "public.lines",
            keys: &["order_id", "line"],
            key: |n| vec![(n / 3).to_string(), (n % 3).to_string()],
            cols: &[("qty", Int), ("\"Qty Note\"", Text)],
        },
        Table {
            sql: "public.audit",
            keys: &["id"],
            key: |n| vec![n.to_string()],
            cols: &[
                ("who", Text),
                ("payload", Text),
                ("f", Float8),
                ("n", Num),
                ("flag", Bool),
            ],
        },
        Table {
            sql: "shop.docs",
            keys: &["id"],
            key: |n| vec![n.to_string()],
            cols: &[("title", Text), ("body", Body)],
        },
        Table {
            sql: "public.docs_full",
            keys: &["id"],
            key: |n| vec![n.to_string()],
            cols: &[("title", Text), ("body", Body)],
        },
        Table {
            sql: "shop.\"Odd Name\"",
            keys: &["k"],
            key: |n| vec![sql_str(&format!("k{n} it's 日本 {n}"))],
            cols: &[
                ("\"Mixed Col\"", Int),
                ("ts", Tstz),
                ("d", Date),
                ("u", Uuid),
                ("b", Bytea),
                ("r", Real),
                ("s", Small),
                ("big", Big),
                ("c", Char3),
            ],
        },
        Table {
            sql: "public.by_idx",
            keys: &["code"],
            key: |n| vec![sql_str(&format!("c-{n}"))],
            cols: &[("id", Int), ("v", Text)],
        },
        Table {
            sql: "public.dropped",
            keys: &["id"],
            key: |n| vec![n.to_string()],
            cols: &[("v", Int), ("w", Text)],
        },
    ]
}

const SCHEMA: &str = r#"
    CREATE SCHEMA shop;
    CREATE TABLE shop.items (id int PRIMARY KEY, name text, price numeric(12,3), ok bool,
        tags int[], meta jsonb, note varchar(40));
    CREATE TABLE public.lines (order_id int, line int, qty int NOT NULL, "Qty Note" text,
        PRIMARY KEY (order_id, line));
    CREATE TABLE public.audit (id bigint, who text, payload text, f float8, n numeric, flag bool);
    ALTER TABLE public.audit REPLICA IDENTITY FULL;
    CREATE TABLE shop.docs (id int PRIMARY KEY, title text, body text);
    ALTER TABLE shop.docs ALTER COLUMN body SET STORAGE EXTERNAL;
    CREATE TABLE public.docs_full (id int PRIMARY KEY, title text, body text);
    ALTER TABLE public.docs_full ALTER COLUMN body SET STORAGE EXTERNAL;
    ALTER TABLE public.docs_full REPLICA IDENTITY FULL;
    CREATE TABLE shop."Odd Name" (k text PRIMARY KEY, "Mixed Col" int, ts timestamptz, d date,
        u uuid, b bytea, r real, s smallint, big bigint, c char(3));
    CREATE TABLE public.by_idx (id int NOT NULL, code text NOT NULL, v text);
    CREATE UNIQUE INDEX by_idx_code ON public.by_idx (code);
    ALTER TABLE public.by_idx REPLICA IDENTITY USING INDEX by_idx_code;
    CREATE TABLE public.dropped (id int PRIMARY KEY, gone text, v int, w text);
    ALTER TABLE public.dropped DROP COLUMN gone;
"#;

fn where_keys(t: &Table, keys: &[u64]) -> String {
    if t.keys.len() == 1 {
        let list: Vec<String> = keys.iter().map(|&k| (t.key)(k).remove(0)).collect();
        format!("{} IN ({})", t.keys[0], list.join(", "))
    } else {
        let list: Vec<String> = keys
            .iter()
            .map(|&k| format!("({})", (t.key)(k).join(", ")))
            .collect();
        format!("({}) IN ({})", t.keys.join(", "), list.join(", "))
    }
}

/// Removes and returns 1..=max distinct live keys.
fn take_live(r: &mut Lcg, live: &mut Vec<u64>, max: u64) -> Vec<u64> {
    let n = (1 + r.below(max)).min(live.len() as u64);
    (0..n)
        .map(|_| live.swap_remove(r.below(live.len() as u64) as usize))
        .collect()
}

struct Workload {
    /// One entry per SQL batch; each one is a single committed, non-empty transaction
    /// unless `transactions` says otherwise.
    batches: Vec<String>,
    transactions: usize,
    changes: usize,
    truncates: usize,
}

fn workload(seed: u64, count: usize) -> Workload {
    let mut r = Lcg(seed);
    let tables = tables();
    let mut live: Vec<Vec<u64>> = vec![Vec::new(); tables.len()];
    let mut next_key = 1u64;
    let (mut changes, mut truncates) = (0, 0);
    let mut batches = Vec::new();
    for txn in 0..count {
        if txn % 40 == 20 {
            // A non-transactional message, between transactions.
            batches.push(format!(
                "SELECT pg_logical_emit_message(false, 'oracle-nt', {})",
                sql_str(&format!("nt {txn} {}", rand_text(&mut r, 3)))
            ));
        }
        let mut stmts = Vec::new();
        if txn % 23 == 11 {
            let a = r.below(tables.len() as u64) as usize;
            let b = r.below(tables.len() as u64) as usize;
            let mut names = vec![tables[a].sql];
            live[a].clear();
            if b != a && r.chance(50) {
                names.push(tables[b].sql);
                live[b].clear();
            }
            let flags = *r.pick(&[
                "",
                " RESTART IDENTITY",
                " CASCADE",
                " RESTART IDENTITY CASCADE",
            ]);
            stmts.push(format!("TRUNCATE {}{flags}", names.join(", ")));
            truncates += 1;
        }
        let n = if stmts.is_empty() {
            1 + r.below(4)
        } else {
            r.below(2)
        };
        for _ in 0..n {
            let ti = r.below(tables.len() as u64) as usize;
            let t = &tables[ti];
            let roll = r.below(100);
            let stmt = if live[ti].is_empty() || roll < 40 {
                let rows = 1 + r.below(3);
                let mut values = Vec::new();
                for _ in 0..rows {
                    let mut row = (t.key)(next_key);
                    live[ti].push(next_key);
                    next_key += 1;
                    row.extend(t.cols.iter().map(|&(_, g)| literal(&mut r, g)));
                    values.push(format!("({})", row.join(", ")));
                }
                changes += rows as usize;
                let names: Vec<&str> = t
                    .keys
                    .iter()
                    .copied()
                    .chain(t.cols.iter().map(|c| c.0))
                    .collect();
                format!(
                    "INSERT INTO {} ({}) VALUES {}",
                    t.sql,
                    names.join(", "),
                    values.join(", ")
                )
            } else if roll < 70 {
                // Update some non-key columns of 1..=3 rows.
                let keys = take_live(&mut r, &mut live[ti], 3);
                live[ti].extend(&keys);
                let mut sets = Vec::new();
                for &(name, g) in t.cols {
                    if r.chance(50) {
                        sets.push(format!("{name} = {}", literal(&mut r, g)));
                    }
                }
                if sets.is_empty() {
                    let (name, g) = t.cols[0];
                    sets.push(format!("{name} = {}", literal(&mut r, g)));
                }
                changes += keys.len();
                format!(
                    "UPDATE {} SET {} WHERE {}",
                    t.sql,
                    sets.join(", "),
                    where_keys(t, &keys)
                )
            } else if roll < 82 {
                // Change the key (replica identity) of one row, maybe more columns.
                let old = take_live(&mut r, &mut live[ti], 1)[0];
                let new = next_key;
                next_key += 1;
                live[ti].push(new);
                let mut sets: Vec<String> = t
                    .keys
                    .iter()
                    .zip((t.key)(new))
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect();
                if r.chance(40) {
                    let (name, g) = *r.pick(t.cols);
                    sets.push(format!("{name} = {}", literal(&mut r, g)));
                }
                changes += 1;
                format!(
                    "UPDATE {} SET {} WHERE {}",
                    t.sql,
                    sets.join(", "),
                    where_keys(t, &[old])
                )
            } else {
                let keys = take_live(&mut r, &mut live[ti], 3);
                changes += keys.len();
                format!("DELETE FROM {} WHERE {}", t.sql, where_keys(t, &keys))
            };
            stmts.push(stmt);
        }
        if r.chance(8) {
            stmts.push(format!(
                "SELECT pg_logical_emit_message(true, 'oracle', {})",
                sql_str(&format!("txn {txn}: {}", rand_text(&mut r, 3)))
            ));
        }
        if stmts.len() == 1 && r.chance(50) {
            batches.push(stmts.remove(0));
        } else {
            batches.push(format!("BEGIN; {}; COMMIT;", stmts.join("; ")));
        }
    }
    Workload {
        batches,
        transactions: count,
        changes,
        truncates,
    }
}

// ---------------------------------------------------------------------------------

const SEED: u64 = 0x5eed_0ac1e;

#[tokio::test]
async fn pgoutput_decoding_matches_test_decoding_row_by_row() {
    let started = Instant::now();
    let db = TestDb::new("oracle").await;
    db.exec(SCHEMA).await;
    let (slot, publication) = db.slot("oracle").await;
    let td_slot = format!("{}_td", db.name);
    db.client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&td_slot],
        )
        .await
        .unwrap();

    let work = workload(SEED, 180);
    for sql in &work.batches {
        db.exec(sql).await;
    }

    let mut source = Source::start(db.stream(&slot, &publication), Lsn::ZERO);
    let events = commits(&mut source, work.transactions).await;
    source.stop().await;

    let lines: Vec<String> = db
        .client
        .query(
            "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL,
                'include-xids', '0', 'skip-empty-xacts', '1')",
            &[&td_slot],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let oracle: Vec<Rec> = lines
        .iter()
        .map(|l| parse_line(l).unwrap_or_else(|e| panic!("test_decoding line: {e}")))
        .map(normalize_oracle)
        .collect();

    // Type names as test_decoding prints them (format_type_be).
    let mut types = HashMap::new();
    for e in &events {
        if let SourceEvent::Change(c) = e {
            for col in &c.relation.columns {
                if let std::collections::hash_map::Entry::Vacant(slot) = types.entry(col.type_oid) {
                    let row = db
                        .client
                        .query_one("SELECT format_type($1, NULL)", &[&col.type_oid])
                        .await
                        .unwrap();
                    slot.insert(row.get::<_, String>(0));
                }
            }
        }
    }
    let ours = our_records(&events, &types);

    let count = |recs: &[Rec], f: fn(&Rec) -> bool| recs.iter().filter(|r| f(r)).count();
    assert_eq!(
        count(&oracle, |r| matches!(r, Rec::Commit)),
        work.transactions,
        "test_decoding saw every transaction of the workload"
    );
    assert_same(&ours, &oracle);

    let changes = count(&ours, Rec::is_change);
    assert_eq!(changes, work.changes, "every row change the workload made");
    assert!(changes > 200, "only {changes} changes compared");
    assert_eq!(
        count(&ours, |r| matches!(r, Rec::Truncate { .. })),
        work.truncates
    );
    // The workload did reach the interesting cases.
    let unchanged = ours
        .iter()
        .filter(|r| {
            matches!(r, Rec::Update { new: Some(cols), .. }
                if cols.iter().any(|c| c.val == Val::UnchangedToast))
        })
        .count();
    let key_changes = count(
        &ours,
        |r| matches!(r, Rec::Update { table, old: Some(_), .. } if table != "public.audit" && table != "public.docs_full"),
    );
    let messages = count(&ours, |r| matches!(r, Rec::Message { .. }));
    assert!(unchanged >= 5, "{unchanged} updates with unchanged TOAST");
    assert!(key_changes >= 10, "{key_changes} key-changing updates");
    assert!(messages >= 3, "{messages} logical messages");
    eprintln!(
        "compared {} records: {changes} row changes in {} transactions, {} truncates, \
         {unchanged} unchanged-TOAST updates, {key_changes} key changes, {messages} messages, in {:?}",
        ours.len(),
        work.transactions,
        work.truncates,
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------
// The parser itself.

fn text_col(name: &str, ty: &str, v: &str) -> Col {
    Col {
        name: name.into(),
        ty: ty.into(),
        val: Val::Text(v.into()),
    }
}

#[test]
fn parses_rows_with_awkward_types_names_and_values() {
    let line = r#"table shop."Odd ""Name""": INSERT: id[integer]:1 name[text]:'it''s a "test" ] x[y]:z 日本' "qty x"[integer]:null tags[integer[]]:'{1,2,NULL}' ts[timestamp with time zone]:'2026-11-23 13:07:52+00' ok[boolean]:true body[text]:unchanged-toast-datum s[text]:'null' f[double precision]:-Infinity"#;
    let rec = normalize_oracle(parse_line(line).unwrap());
    let expected = Rec::Insert {
        table: r#"shop.Odd "Name""#.into(),
        new: Some(vec![
            text_col("id", "integer", "1"),
            text_col("name", "text", r#"it's a "test" ] x[y]:z 日本"#),
            Col {
                name: "qty x".into(),
                ty: "integer".into(),
                val: Val::Null,
            },
            text_col("tags", "integer[]", "{1,2,NULL}"),
            text_col("ts", "timestamp with time zone", "2026-11-23 13:07:52+00"),
            text_col("ok", "boolean", "t"),
            Col {
                name: "body".into(),
                ty: "text".into(),
                val: Val::UnchangedToast,
            },
            text_col("s", "text", "null"),
            text_col("f", "double precision", "-Infinity"),
        ]),
    };
    assert_eq!(rec, expected);
}

#[test]
fn parses_updates_deletes_truncates_and_messages() {
    let update = parse_line(
        "table public.lines: UPDATE: old-key: order_id[integer]:1 line[integer]:2 new-tuple: order_id[integer]:1 line[integer]:3 v[text]:' new-tuple: x[text]:''y'''",
    )
    .unwrap();
    assert_eq!(
        update,
        Rec::Update {
            table: "public.lines".into(),
            old: Some(Some(vec![
                text_col("order_id", "integer", "1"),
                text_col("line", "integer", "2"),
            ])),
            new: Some(vec![
                text_col("order_id", "integer", "1"),
                text_col("line", "integer", "3"),
                text_col("v", "text", " new-tuple: x[text]:'y'"),
            ]),
        }
    );
    assert_eq!(
        parse_line("table public.t: UPDATE: id[integer]:1").unwrap(),
        Rec::Update {
            table: "public.t".into(),
            old: None,
            new: Some(vec![text_col("id", "integer", "1")]),
        }
    );
    // An old tuple whose columns are all NULL prints no columns at all.
    assert_eq!(
        parse_line("table public.t: UPDATE: old-key: new-tuple: a[text]:null").unwrap(),
        Rec::Update {
            table: "public.t".into(),
            old: Some(Some(vec![])),
            new: Some(vec![Col {
                name: "a".into(),
                ty: "text".into(),
                val: Val::Null
            }]),
        }
    );
    assert_eq!(
        parse_line("table public.t: DELETE: (no-tuple-data)").unwrap(),
        Rec::Delete {
            table: "public.t".into(),
            old: None,
        }
    );
    assert_eq!(
        parse_line(r#"table public.lines, shop."A b": TRUNCATE: (no-flags)"#).unwrap(),
        Rec::Truncate {
            tables: vec!["public.lines".into(), "shop.A b".into()],
            restart_seqs: false,
            cascade: false,
        }
    );
    assert_eq!(
        parse_line("table shop.items: TRUNCATE: restart_seqs cascade").unwrap(),
        Rec::Truncate {
            tables: vec!["shop.items".into()],
            restart_seqs: true,
            cascade: true,
        }
    );
    assert_eq!(
        parse_line("message: transactional: 1 prefix: oracle, sz: 9 content:hé'llo\nx").unwrap(),
        Rec::Message {
            transactional: true,
            prefix: "oracle".into(),
            content: "hé'llo\nx".into(),
        }
    );
    assert!(parse_line("table public.t: INSERT: a[text]:'unterminated").is_err());
    assert!(parse_line("table public.t: INSERT: a[text:1").is_err());
    assert!(parse_line("table public.t: UPSERT: a[text]:1").is_err());
    assert!(parse_line("table public.t, public.u: INSERT: a[text]:1").is_err());
}
