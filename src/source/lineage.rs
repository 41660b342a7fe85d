//! The tables each partition or inheritance child belonged to. A Relation message is
//! answered from the catalog as it is when the message is read, not as it was when
//! the change was written: a partition detached (or dropped) between the two reads as
//! a table of its own, and its earlier changes would miss its parent's rules. So the
//! stream remembers the ancestors of every partition and child it has seen, from the
//! catalog at the start of each session and from every description, and a table that
//! has none now keeps those it had.
//!
//! A table detached for good keeps its former parents' rules for the rest of the
//! process: its later changes invalidate more than needed, never less.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use crate::source::table::TableName;

/// Every inheritance link, each relation with its ancestors nearest first.
const ALL_ANCESTORS: &str = "
WITH RECURSIVE up(relid, parent, depth) AS (
    SELECT inhrelid, inhparent, 1 FROM pg_inherits
  UNION ALL
    SELECT up.relid, i.inhparent, up.depth + 1 FROM pg_inherits i JOIN up ON i.inhrelid = up.parent
)
SELECT up.relid, n.nspname::text, c.relname::text
  FROM up JOIN pg_class c ON c.oid = up.parent JOIN pg_namespace n ON n.oid = c.relnamespace
 ORDER BY up.relid, up.depth, c.relname";

/// The ancestors last seen for each relation that had any.
#[derive(Debug, Default)]
pub struct Lineage {
    by_oid: HashMap<u32, Vec<TableName>>,
    /// Relations already said to be taken as their former parents'.
    warned: HashSet<u32>,
}

impl Lineage {
    /// Learns every link the catalog has now (the start of a session).
    pub async fn learn_all(&mut self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let rows = client.query(ALL_ANCESTORS, &[]).await?;
        let mut now: HashMap<u32, Vec<TableName>> = HashMap::new();
        for r in rows {
            now.entry(r.get(0))
                .or_default()
                .push(TableName::new(r.get::<_, String>(1), r.get::<_, String>(2)));
        }
        self.by_oid.extend(now);
        Ok(())
    }

    /// The ancestors to plan `table`'s changes with, given those the catalog has for
    /// it now: these when it has any (and they are remembered), else those it had.
    pub fn ancestors(
        &mut self,
        oid: u32,
        table: &TableName,
        now: Vec<TableName>,
    ) -> Vec<TableName> {
        if !now.is_empty() {
            self.by_oid.insert(oid, now.clone());
            return now;
        }
        let Some(former) = self.by_oid.get(&oid) else {
            return now;
        };
        if self.warned.insert(oid) {
            tracing::warn!(
                table = %table,
                parents = ?former.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "table {table} has no parent table now, but was a partition or child of {}: it was detached or dropped after changes the stream is reading now, and they are planned with the rules of its former parents (so are its later changes, until wal2cache restarts)",
                former.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            );
        }
        former.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TableName {
        TableName::new("public", name)
    }

    #[test]
    fn a_table_without_parents_now_keeps_those_it_had() {
        let mut l = Lineage::default();
        assert_eq!(
            l.ancestors(1, &t("orders_eu"), vec![t("orders")]),
            [t("orders")]
        );
        // Detached: the catalog has no parent for it any more.
        assert_eq!(l.ancestors(1, &t("orders_eu"), vec![]), [t("orders")]);
        // Attached elsewhere: the catalog's answer wins, and is remembered.
        assert_eq!(
            l.ancestors(1, &t("orders_eu"), vec![t("archive")]),
            [t("archive")]
        );
        assert_eq!(l.ancestors(1, &t("orders_eu"), vec![]), [t("archive")]);
    }

    #[test]
    fn a_table_never_seen_with_parents_has_none() {
        let mut l = Lineage::default();
        assert!(l.ancestors(2, &t("plain"), vec![]).is_empty());
    }
}
