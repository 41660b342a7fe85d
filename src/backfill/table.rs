//! The table a backfill reads: its shape as the stream would describe it, its size,
//! and its pages (keyset pagination on its key).

use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::Client;

use super::{BackfillError, TableEstimate};
use crate::error::Error;
use crate::plan::Plan;
use crate::rules::Planner;
use crate::sink::{Item, Origin};
use crate::source::change::{Column, ReplicaIdentity, Row, Value};
use crate::source::error::pg;
use crate::source::table::TableName;
use crate::source::{Change, Op, Relation};

/// The table as the stream would describe it: its columns (generated ones aside, as
/// the stream sends none before 18) and the columns to page by.
pub(super) struct TableShape {
    relation: Arc<Relation>,
    key: Vec<usize>,
    /// `format_type` of each column, for the casts of the page's key values.
    types: Vec<String>,
}

pub(super) async fn table_shape(client: &Client, table: &TableName) -> Result<TableShape, Error> {
    let quoted = table.quoted();
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, format_type(a.atttypid, a.atttypmod),
                    c.oid::int8
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = ''
             ORDER BY a.attnum",
            &[&quoted],
        )
        .await
        .map_err(pg(format!("reading the columns of {table}")))?;
    let oid = rows.first().map_or(0, |r| r.get::<_, i64>(4) as u32);
    let mut columns: Vec<Column> = rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_oid: r.get::<_, i64>(1) as u32,
            type_modifier: r.get(2),
            is_key: false,
        })
        .collect();
    crate::source::catalog::resolve_domains(client, &mut columns)
        .await
        .map_err(pg(format!("reading the column types of {table}")))?;
    let types = rows.iter().map(|r| r.get::<_, String>(3)).collect();
    // The primary key, else the first unique index on NOT NULL columns only (no
    // expressions, no predicate).
    let key_rows = client
        .query(
            "SELECT array_agg(a.attname::text ORDER BY k.ord)
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indpred IS NULL
               AND i.indexprs IS NULL AND i.indisvalid
             GROUP BY i.indexrelid, i.indisprimary
             HAVING bool_and(a.attnotnull)
             ORDER BY i.indisprimary DESC, i.indexrelid
             LIMIT 1",
            &[&quoted],
        )
        .await
        .map_err(pg(format!("reading the keys of {table}")))?;
    let key_names: Vec<String> = key_rows.first().map(|r| r.get(0)).unwrap_or_default();
    let key: Vec<usize> = key_names
        .iter()
        .filter_map(|n| columns.iter().position(|c| &c.name == n))
        .collect();
    if key.is_empty() || key.len() != key_names.len() {
        return Err(Error::Backfill(BackfillError::NoKey {
            table: table.quoted(),
        }));
    }
    for &i in &key {
        columns[i].is_key = true;
    }
    Ok(TableShape {
        relation: Arc::new(Relation {
            oid,
            schema: table.schema.clone(),
            name: table.name.clone(),
            replica_identity: ReplicaIdentity::Default,
            columns,
            ancestors: Vec::new(),
        }),
        key,
        types,
    })
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A table's estimate from the catalog.
pub(super) async fn estimate(client: &Client, table: &TableName) -> Result<TableEstimate, Error> {
    let row = client
        .query_one(
            "SELECT c.reltuples::float8, pg_total_relation_size(c.oid)::int8
             FROM pg_class c WHERE c.oid = $1::text::regclass",
            &[&table.quoted()],
        )
        .await
        .map_err(pg(format!("reading the size of {table}")))?;
    let reltuples: f64 = row.get(0);
    Ok(TableEstimate {
        table: table.to_string(),
        // -1: never vacuumed nor analyzed (14 and later).
        rows: (reltuples >= 0.0).then_some(reltuples as u64),
        bytes: row.get::<_, i64>(1).max(0) as u64,
    })
}

/// One table's pages: the queries, and how to read a page's rows.
pub(super) struct Pages {
    shape: TableShape,
    first: String,
    next: String,
}

impl Pages {
    pub(super) fn new(table: &TableName, shape: TableShape) -> Pages {
        let columns: Vec<String> = shape
            .relation
            .columns
            .iter()
            .map(|c| format!("t.{}::text", ident(&c.name)))
            .collect();
        // Qualified: an ORDER BY "id" would sort by the output column "id", the text.
        let key_list = shape
            .key
            .iter()
            .map(|&i| format!("t.{}", ident(&shape.relation.columns[i].name)))
            .collect::<Vec<_>>()
            .join(", ");
        let after = shape
            .key
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("${}::text::{}", n + 1, shape.types[i]))
            .collect::<Vec<_>>()
            .join(", ");
        let limit = shape.key.len() + 1;
        let first = format!(
            "SELECT {} FROM {} AS t ORDER BY {key_list} LIMIT $1::int8",
            columns.join(", "),
            table.quoted(),
        );
        let next = format!(
            "SELECT {} FROM {} AS t WHERE ({key_list}) > ({after}) ORDER BY {key_list} LIMIT ${limit}::int8",
            columns.join(", "),
            table.quoted(),
        );
        Pages { shape, first, next }
    }

    /// The page after `last` (the key of the last row read; `None`: the first page).
    pub(super) async fn read(
        &self,
        reader: &Client,
        last: Option<&[String]>,
        rows: usize,
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let limit = rows as i64;
        match last {
            None => reader.query(self.first.as_str(), &[&limit]).await,
            Some(key) => {
                let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = key
                    .iter()
                    .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                params.push(&limit);
                reader.query(self.next.as_str(), &params).await
            }
        }
    }

    /// The key of `row`, where the next page starts.
    pub(super) fn key_of(&self, row: &tokio_postgres::Row) -> Vec<String> {
        self.shape
            .key
            .iter()
            .map(|&i| row.get::<_, Option<String>>(i).unwrap_or_default())
            .collect()
    }

    /// The page's rows as the republish of their INSERTs: one item for the page (its
    /// values only: no tag purge, no delete, nothing for subscribers).
    pub(super) fn plan(
        &self,
        planner: &mut Planner,
        rows: &[tokio_postgres::Row],
        origin: &Origin,
    ) -> Result<Item, Error> {
        let shape = &self.shape;
        let mut page = Plan::default();
        page.republish.reserve(rows.len());
        for row in rows {
            let values = (0..shape.relation.columns.len())
                .map(|i| match row.get::<_, Option<String>>(i) {
                    Some(text) => Value::Text(Bytes::from(text)),
                    None => Value::Null,
                })
                .collect();
            let change = Change {
                relation: shape.relation.clone(),
                op: Op::Insert,
                new: Some(Row(values)),
                old: None,
                old_kind: None,
            };
            let planned = planner.plan_change(&change);
            page.republish.extend(planned.republish);
            for rule in planned.rules {
                if !page.rules.contains(&rule) {
                    page.rules.push(rule);
                }
            }
        }
        Ok(Item {
            origin: origin.clone(),
            plan: Arc::new(page),
        })
    }
}
