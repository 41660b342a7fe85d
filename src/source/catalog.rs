//! What the catalog says about the rules' tables and the publication: shared by
//! `check` (which judges it) and `setup` (which adds what is missing), so the two can
//! never disagree about which tables are published.
//!
//! Which relations must be published for a rule's table to be followed:
//! - a plain table: the table itself and each of its inheritance children (each is a
//!   member of a publication on its own; a child added later needs adding too);
//! - a partitioned table: the table (its partitions, attached now or later, are then
//!   published with it);
//! - a partition: itself or one of its partitioned ancestors.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::source::error::{pg, SourceError};
use crate::source::table::TableName;

/// The oldest PostgreSQL major wal2cache streams from.
pub const MIN_SERVER_MAJOR: i32 = 14;

/// The server's version, read once per connection by `slot::check_preconditions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersion {
    /// `server_version_num`: 170002 for 17.2.
    pub num: i32,
    /// `server_version`: "17.2" (and whatever the build appends).
    pub text: String,
}

impl ServerVersion {
    /// The major: 17 for 17.2.
    pub fn major(&self) -> i32 {
        self.num / 10_000
    }

    /// Refuses a server older than [`MIN_SERVER_MAJOR`], naming it (`server`, as shown
    /// to the user) and its version.
    pub fn require_supported(&self, server: &str) -> Result<(), SourceError> {
        if self.major() < MIN_SERVER_MAJOR {
            return Err(SourceError::UnsupportedServer {
                server: server.to_string(),
                version: self.text.clone(),
            });
        }
        Ok(())
    }
}

/// `server_version_num` and `server_version`.
pub async fn server_version(client: &Client) -> Result<ServerVersion, SourceError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .await
        .map_err(pg("reading server_version_num"))?;
    Ok(ServerVersion {
        num: row.get(0),
        text: row.get(1),
    })
}

/// One column as the catalog describes it.
#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub type_name: String,
    /// May be stored out of line (TOAST), and then left out of an update.
    pub toastable: bool,
    /// The type has no length limit (text, bytea, json, unbounded varchar, ...).
    pub unbounded: bool,
    /// `attgenerated`: `s` stored, `v` virtual (18), none for an ordinary column.
    pub generated: Option<char>,
}

/// A relation whose changes the stream sends under its own name: the table itself,
/// each leaf partition of a partitioned table, each inheritance child.
#[derive(Debug, Clone)]
pub struct Member {
    pub table: TableName,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub identity: char,
    /// Columns of the replica identity key (primary key, or the identity index).
    pub key_columns: Vec<String>,
}

/// A rule's table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub oid: u32,
    /// `r` table, `p` partitioned table.
    pub kind: char,
    /// A partition of another table.
    pub is_partition: bool,
    pub columns: HashMap<String, ColumnInfo>,
    /// Where its rows' changes come from: itself (a plain table), its leaf partitions
    /// (a partitioned table), plus its inheritance children.
    pub members: Vec<Member>,
    /// Inheritance children (not partitions), at any depth.
    pub children: Vec<TableName>,
}

impl TableInfo {
    /// The members whose changes the WAL cannot identify (`REPLICA IDENTITY NOTHING`,
    /// or a default identity without a primary key): once they are in a publication that
    /// publishes updates or deletes, PostgreSQL refuses the application's UPDATE and
    /// DELETE on them.
    pub fn unidentified(&self) -> Vec<&Member> {
        self.members
            .iter()
            .filter(|m| m.identity == 'n' || m.key_columns.is_empty() && m.identity != 'f')
            .collect()
    }
}

/// Reads a table; `None` when it does not exist (or is not a table).
pub async fn table_info(
    client: &Client,
    table: &TableName,
) -> Result<Option<TableInfo>, SourceError> {
    let Some(row) = client
        .query_opt(
            "SELECT c.oid, c.relkind::text, c.relispartition FROM pg_class c
              WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
            &[&table.quoted()],
        )
        .await
        .map_err(pg(format!("looking up table {table}")))?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let kind = row.get::<_, String>(1).chars().next().unwrap_or('r');
    let is_partition: bool = row.get(2);
    let columns = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typstorage <> 'p',
                    a.attgenerated::text,
                    t.typlen = -1 AND a.atttypmod < 0 AND t.typcategory <> 'N'
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid],
        )
        .await
        .map_err(pg(format!("reading the columns of {table}")))?
        .iter()
        .map(|r| {
            let generated: String = r.get(3);
            (
                r.get::<_, String>(0),
                ColumnInfo {
                    type_name: r.get(1),
                    toastable: r.get(2),
                    generated: generated.chars().next().filter(|c| *c != '\0'),
                    unbounded: r.get(4),
                },
            )
        })
        .collect();
    // Every relation below this one, with how it hangs there: leaf partitions and
    // inheritance children send their changes under their own names.
    let rows = client
        .query(
            "WITH RECURSIVE down(relid) AS (
                 SELECT $1::oid
               UNION ALL
                 SELECT i.inhrelid FROM pg_inherits i JOIN down ON i.inhparent = down.relid
             )
             SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, c.relispartition,
                    c.relreplident::text,
                    ARRAY(SELECT a.attname::text FROM pg_index i
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                           WHERE i.indrelid = c.oid
                             AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                                     WHEN 'i' THEN i.indisreplident ELSE false END
                           ORDER BY a.attnum)
               FROM down JOIN pg_class c ON c.oid = down.relid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              ORDER BY n.nspname, c.relname",
            &[&oid],
        )
        .await
        .map_err(pg(format!("reading the partitions and children of {table}")))?;
    let mut members = Vec::new();
    let mut children = Vec::new();
    for r in rows {
        let member_oid: u32 = r.get(0);
        let name = TableName::new(r.get::<_, String>(1), r.get::<_, String>(2));
        let relkind = r.get::<_, String>(3);
        let partition: bool = r.get(4);
        if member_oid != oid && !partition {
            children.push(name.clone());
        }
        // A partitioned table has no rows of its own.
        if relkind == "p" {
            continue;
        }
        members.push(Member {
            table: name,
            identity: r.get::<_, String>(5).chars().next().unwrap_or('d'),
            key_columns: r.get(6),
        });
    }
    Ok(Some(TableInfo {
        oid,
        kind,
        is_partition,
        columns,
        members,
        children,
    }))
}

/// A publication's settings.
#[derive(Debug, Clone)]
pub struct PublicationInfo {
    pub oid: u32,
    pub all_tables: bool,
    pub via_root: bool,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
    /// `pubgencols` (18): `s` publishes stored generated columns; `n` or none does not.
    pub generated_columns: Option<char>,
}

pub async fn publication(
    client: &Client,
    name: &str,
    server_version: i32,
) -> Result<Option<PublicationInfo>, SourceError> {
    let gencols = if server_version >= 180000 {
        "pubgencols::text"
    } else {
        "NULL::text"
    };
    let row = client
        .query_opt(
            &format!(
                "SELECT oid, puballtables, pubviaroot, pubinsert, pubupdate, pubdelete, pubtruncate, {gencols}
                   FROM pg_publication WHERE pubname = $1"
            ),
            &[&name],
        )
        .await
        .map_err(pg(format!("reading publication {name:?}")))?;
    Ok(row.map(|r| PublicationInfo {
        oid: r.get(0),
        all_tables: r.get(1),
        via_root: r.get(2),
        insert: r.get(3),
        update: r.get(4),
        delete: r.get(5),
        truncate: r.get(6),
        generated_columns: r.get::<_, Option<String>>(7).and_then(|s| s.chars().next()),
    }))
}

/// A relation to add to the publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToPublish {
    pub table: TableName,
    /// A partitioned table brings its partitions; a plain table is added alone
    /// (`ONLY`), its children each on their own.
    pub partitioned: bool,
    /// The rule's table this is for (itself, or one of its children).
    pub for_table: TableName,
}

impl ToPublish {
    /// The relation in a publication's table list: `ONLY "s"."t"` or `"s"."p"`.
    pub fn object(&self) -> String {
        if self.partitioned {
            self.table.quoted()
        } else {
            format!("ONLY {}", self.table.quoted())
        }
    }
}

/// `TABLE ONLY "s"."a", ONLY "s"."b"`: what follows `FOR` or `ADD` (one `TABLE`
/// keyword for the list, the form PostgreSQL 14 accepts too).
pub fn table_list(tables: &[ToPublish]) -> String {
    let objects: Vec<String> = tables.iter().map(ToPublish::object).collect();
    format!("TABLE {}", objects.join(", "))
}

/// Whether a relation's changes are published by `publication`: it, or a partitioned
/// ancestor, is a member; or its schema is (15+); or the publication is for all tables.
async fn is_published(
    client: &Client,
    publication: &PublicationInfo,
    table: &TableName,
    server_version: i32,
) -> Result<bool, SourceError> {
    if publication.all_tables {
        return Ok(true);
    }
    let schema = if server_version >= 150000 {
        "OR EXISTS (SELECT 1 FROM pg_publication_namespace pn JOIN pg_class c ON c.relnamespace = pn.pnnspid
                     WHERE pn.pnpubid = $1 AND c.oid = to_regclass($2))"
    } else {
        ""
    };
    let row = client
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_rel pr
                                 WHERE pr.prpubid = $1
                                   AND (pr.prrelid = to_regclass($2)
                                        OR pr.prrelid IN (SELECT relid FROM pg_partition_ancestors(to_regclass($2)))))
                        {schema}"
            ),
            &[&publication.oid, &table.quoted()],
        )
        .await
        .map_err(pg(format!("reading whether {table} is published")))?;
    Ok(row.get(0))
}

/// What must be added to the publication (`None`: it does not exist) so that every
/// change to `info`'s table, its partitions and its children is published.
pub async fn unpublished(
    client: &Client,
    publication: Option<&PublicationInfo>,
    table: &TableName,
    info: &TableInfo,
    server_version: i32,
) -> Result<Vec<ToPublish>, SourceError> {
    let mut wanted = vec![(table.clone(), info.kind == 'p')];
    wanted.extend(info.children.iter().map(|c| (c.clone(), false)));
    let mut out = Vec::new();
    for (t, partitioned) in wanted {
        let published = match publication {
            Some(p) => is_published(client, p, &t, server_version).await?,
            None => false,
        };
        if !published {
            out.push(ToPublish {
                table: t,
                partitioned,
                for_table: table.clone(),
            });
        }
    }
    Ok(out)
}

/// The last base type of each domain among the type OIDs `$1` (a domain over a
/// domain: the base of the last one).
const DOMAIN_BASES: &str = "
WITH RECURSIVE d(oid, base) AS (
    SELECT t.oid, t.typbasetype FROM pg_type t
     WHERE t.oid = ANY($1::int8[]::oid[]) AND t.typtype = 'd'
  UNION ALL
    SELECT d.oid, t.typbasetype FROM d JOIN pg_type t ON t.oid = d.base AND t.typtype = 'd'
)
SELECT d.oid::int8, d.base::int8 FROM d JOIN pg_type t ON t.oid = d.base WHERE t.typtype <> 'd'";

/// The first OID of objects made after initdb (`FirstNormalObjectId`): the built-in
/// types are below it, and none of them is a domain a value is written by.
const FIRST_NORMAL_OID: u32 = 16_384;

/// Gives each column of a domain type its base type (Postgres sends the domain's OID),
/// so its values are written as the base type's are: a domain over jsonb embedded, a
/// domain over bigint a number. One query, for tables with a user-defined type only.
pub async fn resolve_domains(
    client: &Client,
    columns: &mut [crate::source::change::Column],
) -> Result<(), tokio_postgres::Error> {
    let user: Vec<i64> = columns
        .iter()
        .filter(|c| c.type_oid >= FIRST_NORMAL_OID)
        .map(|c| i64::from(c.type_oid))
        .collect();
    if user.is_empty() {
        return Ok(());
    }
    for row in client.query(DOMAIN_BASES, &[&user]).await? {
        let (domain, base) = (row.get::<_, i64>(0) as u32, row.get::<_, i64>(1) as u32);
        for c in columns.iter_mut().filter(|c| c.type_oid == domain) {
            c.type_oid = base;
        }
    }
    Ok(())
}
