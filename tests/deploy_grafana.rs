//! `deploy/grafana/wal2cache.json`: every metric the dashboard queries is one a running
//! daemon exports. A renamed metric would otherwise leave an empty panel that nobody
//! notices until the night it is needed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use support::config::ConfigBuilder;
use support::db::{wait_streaming, TestDb, EXAMPLE_SCHEMA};
use support::env::unique;
use support::inproc::InProcess;
use support::net::{free_addr, http_async};
use support::scrape::series;
use support::wait::eventually;

const DASHBOARD: &str = include_str!("../deploy/grafana/wal2cache.json");

/// The suffixes of a summary's or histogram's series beside its base name.
const SERIES_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// Every string of the dashboard under one of `keys` (its PromQL is under the panels'
/// `expr` and the variables' `query` and `definition`).
fn queries(value: &Value, keys: &[&str], out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match v {
                    Value::String(s) if keys.contains(&key.as_str()) => out.push(s.clone()),
                    _ => queries(v, keys, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| queries(v, keys, out)),
        _ => {}
    }
}

/// The identifiers of a PromQL expression that start with `wal2cache_`, outside string
/// literals (a label value such as `rule="wal2cache_x"` names no metric).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                let mut escaped = false;
                for d in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' && c != '`' {
                        escaped = true;
                    } else if d == c {
                        break;
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let mut ident = String::from(c);
                while let Some(&d) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                        ident.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if ident.starts_with("wal2cache_") {
                    names.push(ident);
                }
            }
            _ => {}
        }
    }
    names
}

/// A scrape in the Prometheus text format: the declared type of each metric family,
/// and the name of every sample.
struct Scrape {
    types: BTreeMap<String, String>,
    samples: BTreeSet<String>,
}

fn parse_scrape(body: &str) -> Scrape {
    let mut types = BTreeMap::new();
    let mut samples = BTreeSet::new();
    for line in body.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                types.insert(name.to_string(), kind.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_string());
        }
    }
    Scrape { types, samples }
}

/// The metric family a series name belongs to: `x_sum`, `x_count` and `x_bucket` are
/// `x`'s when `x` is a summary or histogram. When the scrape does not declare `x` (it
/// is missing), the dashboard's own bare use of `x` says the same.
fn base_name(name: &str, scrape: &Scrape, used: &BTreeSet<String>) -> String {
    for suffix in SERIES_SUFFIXES {
        if let Some(base) = name.strip_suffix(suffix) {
            let declared = scrape.types.get(base).map(String::as_str);
            if matches!(declared, Some("summary" | "histogram"))
                || (declared.is_none() && !scrape.types.contains_key(name) && used.contains(base))
            {
                return base.to_string();
            }
        }
    }
    name.to_string()
}

#[test]
fn the_tokenizer_finds_metric_names_outside_strings() {
    assert_eq!(
        metric_names(
            r#"sum by (rule) (rate(wal2cache_rule_keys_total{rule="wal2cache_x", a='wal2cache_y'}[5m])) / wal2cache_up"#
        ),
        ["wal2cache_rule_keys_total", "wal2cache_up"]
    );
    let scrape = parse_scrape(
        "# TYPE wal2cache_b_seconds summary\nwal2cache_b_seconds{quantile=\"0.5\"} 1\nwal2cache_b_seconds_sum 1\nwal2cache_b_seconds_count 1\n# TYPE wal2cache_c_count counter\nwal2cache_c_count 2\n",
    );
    let used = BTreeSet::new();
    assert_eq!(
        base_name("wal2cache_b_seconds_sum", &scrape, &used),
        "wal2cache_b_seconds"
    );
    // A counter whose own name ends in _count is its own family.
    assert_eq!(
        base_name("wal2cache_c_count", &scrape, &used),
        "wal2cache_c_count"
    );
}

#[tokio::test]
async fn every_metric_of_the_dashboard_is_exported_by_the_daemon() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    assert_eq!(dashboard["schemaVersion"], 39, "schemaVersion");
    let mut exprs = Vec::new();
    queries(&dashboard, &["expr", "query", "definition"], &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(
        used.len() >= 10,
        "the dashboard queries only {used:?}: did the tokenizer find its expressions?"
    );

    let db = TestDb::new("grafana").await;
    db.exec(EXAMPLE_SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("grafana");
    let addr = free_addr();
    let config = ConfigBuilder::example(&db, &prefix, &unique("w2c_grafana"))
        .name(&format!("grafana-{}", db.name))
        .metrics_listen(addr)
        .write(dir.path());
    let daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    // Changes every sink and rule handles: keys, tags, a republished value, and a
    // NULL placeholder (a product without category).
    db.exec(
        "INSERT INTO categories VALUES (1, 'c');
         INSERT INTO products VALUES (1, 'p-1', 1, 'P', 1.50, NULL);
         INSERT INTO products VALUES (2, 'p-2', NULL, 'Q', 2.50, NULL);
         INSERT INTO tenant_settings VALUES (7, '{\"a\": 1}')",
    )
    .await;
    eventually(
        "/metrics to count the applied changes",
        Duration::from_secs(60),
        || async {
            matches!(http_async(addr, "GET", "/metrics").await,
                Some((200, text)) if series(&text, "wal2cache_changes_applied_total")
                    .is_some_and(|n| n >= 4.0))
        },
    )
    .await;
    let (status, body) = http_async(addr, "GET", "/metrics")
        .await
        .expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    daemon.stop_ok().await;

    let scrape = parse_scrape(&body);
    let mut missing = BTreeSet::new();
    let mut found = BTreeSet::new();
    for name in &used {
        let base = base_name(name, &scrape, &used);
        // A summary's quantiles are samples of its base name, its _sum and _count
        // samples of their own: the dashboard's name itself must be a sample.
        if scrape.samples.contains(name) {
            found.insert(base);
        } else {
            missing.insert(base);
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the daemon does not export: {missing:?}\n(found: {found:?})"
    );
}

/// The panels' expressions with Grafana's variables replaced by values Prometheus
/// accepts: `$__rate_interval`, `$__interval` and `$__range` by durations, any other
/// `$name` or `${name}` (a label matcher's value) by `.*`.
fn with_variables_filled(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, tail) = match after.strip_prefix('{') {
            Some(b) => {
                let end = b.find('}').expect("a closed ${...}");
                (&b[..end], &b[end + 1..])
            }
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        out.push_str(match name {
            "__rate_interval" | "__interval" => "1m",
            "__range" => "1h",
            _ => ".*",
        });
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// Every panel's query is PromQL that Prometheus parses (`promtool check rules` on the
/// expressions as recording rules; `deploy/local/test.sh` installs promtool).
#[test]
fn every_query_of_the_dashboard_parses_as_promql() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut found = Vec::new();
    queries(&dashboard, &["expr"], &mut found);
    assert!(found.len() >= 10, "only {} expressions found", found.len());
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    for (i, e) in found.iter().enumerate() {
        let filled = with_variables_filled(e);
        assert!(!filled.contains('$'), "{filled}");
        rules.push_str(&format!(
            "  - record: dashboard_query_{i}\n    expr: {}\n",
            serde_json::to_string(&filled).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard_rules.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .expect("promtool runs (deploy/local/test.sh installs it: Debian's prometheus package)");
    assert!(
        out.status.success(),
        "promtool refused a dashboard query:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{} rules found", found.len())),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn grafana_variables_are_filled() {
    assert_eq!(
        with_variables_filled(
            "rate(x{instance=~\"$instance\", a=\"${datasource}\"}[$__rate_interval]) + y[$__range]"
        ),
        "rate(x{instance=~\".*\", a=\".*\"}[1m]) + y[1h]"
    );
}
