//! Rules from TOML text, and what `check` says of them against a database.

use std::sync::Arc;

use wal2cache::rules::check::{check, CheckReport};
use wal2cache::rules::RuleSet;
use wal2cache::source::catalog::server_version;

use super::db::TestDb;

/// Rules from TOML text, compiled as `rules.path` would load them.
#[allow(dead_code)]
pub fn compile_rules(text: &str) -> Arc<RuleSet> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.toml");
    std::fs::write(&file, text).unwrap();
    Arc::new(wal2cache::rules::load(&file).unwrap_or_else(|e| panic!("{e}")))
}

/// The problems `check` finds in `text` against the database (publication `w2c`;
/// with `create`, tables missing from it are to be added, not problems).
#[allow(dead_code)]
pub async fn problems(db: &TestDb, text: &str, create: bool) -> Vec<String> {
    let report = checked(db, text, create).await;
    report.problems.iter().map(ToString::to_string).collect()
}

/// The warnings `check` gives on `text` against the database (publication `w2c`,
/// with `create`).
#[allow(dead_code)]
pub async fn warnings(db: &TestDb, text: &str) -> Vec<String> {
    let report = checked(db, text, true).await;
    report.warnings.iter().map(ToString::to_string).collect()
}

/// What `check` says of `text` against the database (publication `w2c`).
#[allow(dead_code)]
pub async fn checked(db: &TestDb, text: &str, create: bool) -> CheckReport {
    let server = server_version(&db.client).await.unwrap();
    check(&db.client, &server, &compile_rules(text), "w2c", create)
        .await
        .unwrap()
}

/// The example rules (`rules/example.toml`) with every key and tag under a prefix of
/// the test's own.
#[allow(dead_code)]
pub fn example_rules(prefix: &str) -> String {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/example.toml"))
            .unwrap();
    example
        .replace("\"shop:", &format!("\"{prefix}:shop:"))
        .replace("\"cfg:", &format!("\"{prefix}:cfg:"))
}
