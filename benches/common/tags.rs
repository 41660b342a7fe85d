//! The tag-heavy shape of the catch-up bench (`W2C_BENCH_SHAPE=tags`): single-row
//! UPDATE transactions from several concurrent writers on `items`, whose delete rule
//! deletes the row's key(s) and purges one tag every row shares (a list page tag), and
//! a share of them on `offers`, whose rule republishes the row. Scaling knobs: keys per
//! change (key templates of the delete rule) and delete rules on `items` (each with one
//! key). Included by `catchup` with `#[path = "common/tags.rs"] mod tags;`.

use std::collections::HashMap;

use crate::common::env_usize;

/// The workload, from the environment (see the doc comment of benches/catchup.rs).
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub struct TagShape {
    /// Key templates of the delete rule `item` (`W2C_BENCH_KEYS`, 1).
    pub keys: usize,
    /// Delete rules on `items` (`W2C_BENCH_RULES`, 1): `item` and `rules - 1` more of
    /// one key each.
    pub rules: usize,
    /// Tags every row shares on rule `item` (`W2C_BENCH_TAGS`, 1: `PFX:list`; more:
    /// `PFX:list:t<j>`; 0: none, to see what the purges cost).
    pub tags: usize,
    /// Concurrent writers, each a connection calling its own procedure
    /// (`W2C_BENCH_WRITERS`, 4).
    pub writers: usize,
    /// Every n-th transaction of each writer updates `offers` instead of `items`
    /// (`W2C_BENCH_OTHER_EVERY`, 10; 0: never).
    pub other_every: usize,
    /// Rows of `offers` (`W2C_BENCH_OTHER_ROWS`, 1,000).
    pub other_rows: usize,
    /// Members of the shared tag's set before the run (`W2C_BENCH_TAG_MEMBERS`, 1,000).
    pub tag_members: usize,
}

#[allow(dead_code)]
impl TagShape {
    pub fn from_env() -> TagShape {
        TagShape {
            keys: env_usize("W2C_BENCH_KEYS", 1).max(1),
            rules: env_usize("W2C_BENCH_RULES", 1).max(1),
            tags: env_usize("W2C_BENCH_TAGS", 1),
            writers: env_usize("W2C_BENCH_WRITERS", 4).max(1),
            other_every: env_usize("W2C_BENCH_OTHER_EVERY", 10),
            other_rows: env_usize("W2C_BENCH_OTHER_ROWS", 1_000).max(1),
            tag_members: env_usize("W2C_BENCH_TAG_MEMBERS", 1_000),
        }
    }

    pub fn describe(&self) -> String {
        let other = if self.other_every == 0 {
            "no updates on offers".to_string()
        } else {
            format!(
                "every {}th transaction of each writer updates offers ({} rows) instead, whose rule republishes a 4-column projection with a TTL",
                self.other_every, self.other_rows
            )
        };
        format!(
            "{} concurrent writers; items: {} delete rule(s), the first with {} key(s) + {} tag(s) every row shares (the first with {} members seeded), the others 1 key each; {other}",
            self.writers, self.rules, self.keys, self.tags, self.tag_members
        )
    }

    /// The shared tags.
    pub fn tags(&self, prefix: &str) -> Vec<String> {
        (0..self.tags)
            .map(|j| {
                if j == 0 {
                    format!("{prefix}:list")
                } else {
                    format!("{prefix}:list:t{j}")
                }
            })
            .collect()
    }

    /// The key templates of rule `item`: `PFX:item:v1:{id}` first (the one the topic
    /// is read back by), then `PFX:item:k<j>:v1:{id}`.
    fn item_templates(&self, prefix: &str) -> Vec<String> {
        (0..self.keys)
            .map(|j| {
                if j == 0 {
                    format!("{prefix}:item:v1:{{id}}")
                } else {
                    format!("{prefix}:item:k{j}:v1:{{id}}")
                }
            })
            .collect()
    }

    pub fn rules(&self, prefix: &str) -> String {
        let mut out = String::with_capacity(100 * self.rules + 400);
        let keys: Vec<String> = self
            .item_templates(prefix)
            .iter()
            .map(|t| format!("{t:?}"))
            .collect();
        let tags: Vec<String> = self.tags(prefix).iter().map(|t| format!("{t:?}")).collect();
        out.push_str(&format!(
            "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [{}]\ntags = [{}]\n\n",
            keys.join(", "),
            tags.join(", ")
        ));
        for r in 1..self.rules {
            out.push_str(&format!(
                "[[rule]]\nname = \"item_r{r}\"\ntable = \"public.items\"\nkeys = [\"{prefix}:item:r{r}:v1:{{id}}\"]\n\n"
            ));
        }
        out.push_str(&format!(
            r#"[[rule]]
name = "offer_json"
table = "public.offers"
keys = ["{prefix}:offer:json:v1:{{id}}"]
action = "republish"
columns = ["id", "item_id", "price", "seller"]
ttl = "1h"
"#
        ));
        out
    }

    /// Every key the rules on `items` produce for row `id`.
    pub fn item_keys(&self, prefix: &str, id: i32) -> Vec<String> {
        let mut keys: Vec<String> = self
            .item_templates(prefix)
            .iter()
            .map(|t| t.replace("{id}", &id.to_string()))
            .collect();
        keys.extend((1..self.rules).map(|r| format!("{prefix}:item:r{r}:v1:{id}")));
        keys
    }

    pub fn offer_key(prefix: &str, id: i32) -> String {
        format!("{prefix}:offer:json:v1:{id}")
    }

    /// `offers` (default replica identity: its rule keys on the primary key), its
    /// rows, and the writers' procedure: writer `w` of `nw` commits `n` single-row
    /// UPDATEs; its i-th updates `offers` row `1 + ((i / every) * nw + w) % noffers`
    /// when `i % every = every - 1`, else `items` row `1 + (i * nw + w) % nrows` (the
    /// writers take turns over the rows, so they seldom wait for each other's locks).
    pub fn sql(&self) -> String {
        format!(
            "CREATE TABLE offers (
               id       int PRIMARY KEY,
               item_id  int NOT NULL,
               price    numeric(10, 2) NOT NULL,
               seller   text NOT NULL,
               note     text
             );
             INSERT INTO offers
               SELECT i, 1 + i % 1000, 5 + (i % 500) / 10.0, 'seller-' || (i % 37), 'offer ' || md5(i::text)
                 FROM generate_series(1, {}) i;
             CREATE PROCEDURE bench_tag_writer(w int, nw int, n int, nrows int, noffers int, every int)
             LANGUAGE plpgsql AS $$
             BEGIN
               FOR i IN 0..n - 1 LOOP
                 IF every > 0 AND i % every = every - 1 THEN
                   UPDATE offers SET price = price + 0.01 WHERE id = 1 + ((i / every) * nw + w) % noffers;
                 ELSE
                   UPDATE items SET price = price + 0.01, stock = stock + 1 WHERE id = 1 + (i * nw + w) % nrows;
                 END IF;
                 COMMIT;
               END LOOP;
             END $$;",
            self.other_rows
        )
    }

    /// Transactions per writer for `total` of them.
    pub fn per_writer(&self, total: usize) -> Vec<usize> {
        (0..self.writers)
            .map(|w| total / self.writers + usize::from(w < total % self.writers))
            .collect()
    }

    /// Per row, how many updates the writers make (`("items", id)` / `("offers", id)`),
    /// mirroring the procedure, for `total` transactions.
    pub fn updates(&self, total: usize, table_rows: usize) -> HashMap<(&'static str, i32), u64> {
        let mut out: HashMap<(&'static str, i32), u64> = HashMap::new();
        let nw = self.writers;
        for (w, n) in self.per_writer(total).into_iter().enumerate() {
            for i in 0..n {
                let e = self.other_every;
                let row = if e > 0 && i % e == e - 1 {
                    ("offers", (1 + ((i / e) * nw + w) % self.other_rows) as i32)
                } else {
                    ("items", (1 + (i * nw + w) % table_rows) as i32)
                };
                *out.entry(row).or_default() += 1;
            }
        }
        out
    }
}
