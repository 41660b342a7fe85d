//! `rules.backfill = "new"`: the daemon backfills, in the background and while it
//! streams, every republish rule it has not backfilled before, at start and each time
//! a reload takes effect.
//!
//! What was backfilled is remembered in Redis (`wal2cache:{NAME}:backfilled`, rule
//! name → fingerprint of the rule's table, keys, columns and TTL), so a restart does
//! not backfill again, a rule whose shape changed is backfilled again, and a new (or
//! flushed) Redis is warmed from scratch. Only the active instance backfills.
//!
//! Why the stream and the backfill cannot miss a change between them: the backfill
//! starts only once the pipeline has put the rules in force (`in_force` changes when
//! the pipeline reads the point where a reload takes effect), and its snapshot is
//! exported after that, so every change the snapshot does not see is read by the
//! stream after that point, under the new rules. The version guard does the rest, as
//! for `wal2cache backfill`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::health::{Health, Role};
use crate::rules::{Action, Rule, RuleSet};
use crate::sink::redis::StreamState;

use super::{LogObserver, Observer, Options, TableEstimate};

/// How long to wait before trying a failed backfill again, at first and at most.
const RETRY_FIRST: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(600);

/// The fingerprint of what a republish rule writes: its table, key templates, columns
/// and TTL (FNV-1a 64, stable across processes and versions).
pub fn fingerprint(rule: &Rule) -> String {
    let (columns, ttl) = match &rule.action {
        Action::Republish { columns, ttl } => (columns.clone(), ttl.map(|t| t.as_secs())),
        Action::Delete => (None, None),
    };
    let keys: Vec<String> = rule.keys.iter().map(|k| k.to_string()).collect();
    let shape = format!(
        "table={}\nkeys={}\ncolumns={}\nttl={}",
        rule.table,
        keys.join("\u{1f}"),
        columns.map_or("*".into(), |c| c.join("\u{1f}")),
        ttl.map_or("none".into(), |t| t.to_string()),
    );
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in shape.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The republish rules of `rules` whose fingerprint `done` does not hold.
pub fn not_backfilled(rules: &RuleSet, done: &HashMap<String, String>) -> Vec<Arc<Rule>> {
    rules
        .rules()
        .iter()
        .filter(|r| matches!(r.action, Action::Republish { .. }))
        .filter(|r| done.get(&r.name) != Some(&fingerprint(r)))
        .cloned()
        .collect()
}

/// Log lines every 30 s, and `wal2cache_backfill_progress{rule}` (rows read over rows
/// expected, 0 to 1) for each rule being backfilled.
struct DaemonObserver {
    log: LogObserver,
    rules: Vec<String>,
}

impl DaemonObserver {
    fn set(&self, progress: f64) {
        for rule in &self.rules {
            metrics::gauge!("wal2cache_backfill_progress", "rule" => rule.clone()).set(progress);
        }
    }
}

impl Observer for DaemonObserver {
    fn planned(&mut self, tables: &[TableEstimate], expected: Duration) {
        self.set(0.0);
        self.log.planned(tables, expected);
    }

    fn progress(&mut self, table: &str, rows: u64, expected_rows: u64) {
        if expected_rows > 0 {
            self.set((rows as f64 / expected_rows as f64).min(1.0));
        }
        self.log.progress(table, rows, expected_rows);
    }

    fn table_done(&mut self, table: &str, rows: u64) {
        self.log.table_done(table, rows);
    }
}

/// Runs until `stop`: backfills what the rules in force have not had backfilled,
/// whenever this instance is the active one.
pub async fn warm(
    config: Config,
    mut in_force: watch::Receiver<Arc<RuleSet>>,
    health: Arc<Health>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = RETRY_FIRST;
    loop {
        // Only the instance that streams backfills: a standby waits.
        while health.role() != Role::Active {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        let rules = in_force.borrow_and_update().clone();
        match warm_once(&config, &rules, &mut stop).await {
            Ok(()) => retry = RETRY_FIRST,
            Err(e) => {
                tracing::error!(retry_in_s = retry.as_secs(), "rules.backfill: the backfill of new rules failed, trying again later (the stream is not affected): {e}");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = in_force.changed() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        }
        if *stop.borrow() {
            return;
        }
        // Done with these rules: wait for the next ones.
        tokio::select! {
            changed = in_force.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Backfills the rules not backfilled yet, one table at a time (one snapshot each),
/// and records each table's rules once done. A table that fails (no usable key, say)
/// does not hold back the others; the error names every table that failed.
async fn warm_once(
    config: &Config,
    rules: &RuleSet,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), crate::error::Error> {
    let (redis_config, _) = config.sinks()?;
    let mut state = StreamState::connect(redis_config, &config.name).await?;
    let todo = not_backfilled(rules, &state.backfilled().await?);
    let mut tables: Vec<(String, Vec<Arc<Rule>>)> = Vec::new();
    for rule in todo {
        let table = rule.table.to_string();
        match tables.iter_mut().find(|(t, _)| *t == table) {
            Some((_, rules)) => rules.push(rule),
            None => tables.push((table, vec![rule])),
        }
    }
    let mut failed = Vec::new();
    for (table, todo) in tables {
        let names: Vec<String> = todo.iter().map(|r| r.name.clone()).collect();
        tracing::info!(table = %table, rules = ?names, rate = config.rules.backfill_rate, "rules.backfill: backfilling republish rules not backfilled before, in the background");
        let options = Options {
            rules: names.clone(),
            rate: Some(config.rules.backfill_rate),
            ..Options::default()
        };
        let mut observer = DaemonObserver {
            log: LogObserver::new(Duration::from_secs(30)),
            rules: names.clone(),
        };
        let report = match super::run(config, rules, &options, &mut observer, stop.clone()).await {
            Ok(report) => report,
            Err(e) => {
                tracing::error!(table = %table, rules = ?names, "rules.backfill: cannot backfill: {e}");
                failed.push(table);
                continue;
            }
        };
        if report.interrupted {
            tracing::info!(table = %table, rows = report.rows, "rules.backfill: stopped with the daemon; the next start backfills these rules again");
            return Ok(());
        }
        for rule in &todo {
            state
                .mark_backfilled(&rule.name, &fingerprint(rule))
                .await?;
        }
        observer.set(1.0);
        tracing::info!(table = %table, rules = ?names, rows = report.rows, keys = report.keys, refused = report.refused, elapsed_s = report.elapsed.as_secs_f64(), "rules.backfill: done");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(crate::error::Error::Backfill(super::BackfillError::Failed(
            failed.join(", "),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> RuleSet {
        (*crate::rules::testing::rule_set(text)).clone()
    }

    #[test]
    fn a_rule_is_new_until_recorded_and_again_when_its_shape_changes() {
        let first = rules(
            r#"
[[rule]]
name = "item_json"
table = "public.items"
keys = ["item:json:{id}"]
action = "republish"
columns = ["id", "name"]

[[rule]]
name = "item"
table = "public.items"
keys = ["item:{id}"]
"#,
        );
        let todo = not_backfilled(&first, &HashMap::new());
        assert_eq!(todo.len(), 1, "delete rules have nothing to backfill");
        assert_eq!(todo[0].name, "item_json");
        let done: HashMap<String, String> =
            [("item_json".to_string(), fingerprint(&todo[0]))].into();
        assert!(not_backfilled(&first, &done).is_empty());
        // Another column, TTL, key or table: another shape, backfilled again.
        for changed in [
            r#"columns = ["id", "name", "price"]"#,
            "columns = [\"id\", \"name\"]\nttl = \"1h\"",
        ] {
            let text = format!(
                r#"
[[rule]]
name = "item_json"
table = "public.items"
keys = ["item:json:{{id}}"]
action = "republish"
{changed}
"#
            );
            assert_eq!(not_backfilled(&rules(&text), &done).len(), 1, "{changed}");
        }
        let moved = rules(
            r#"
[[rule]]
name = "item_json"
table = "public.items"
keys = ["item:v2:{id}"]
action = "republish"
columns = ["id", "name"]
"#,
        );
        assert_eq!(not_backfilled(&moved, &done).len(), 1);
    }
}
