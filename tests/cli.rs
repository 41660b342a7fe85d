//! The `wal2cache` binary: `setup`, `tail`, configuration errors and exit codes.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};
use support::config::ConfigBuilder;
use support::daemon::{base_env, bin, run_binary};
use support::db::{slot_active, url_for, TestDb};
use support::env::unique;
use support::wait::eventually;

/// A rule per table of `tables`, keys `k<i>:{id}`.
fn rules_on(tables: &[&str]) -> String {
    let mut rules = String::new();
    for (i, t) in tables.iter().enumerate() {
        rules.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\ntable = \"{t}\"\nkeys = [\"k{i}:{{id}}\"]\n"
        ));
    }
    rules
}

/// A config on `url` with slot `slot` and a rule per table of `tables`; Redis and the
/// brokers do not answer (`run` gets as far as connecting to Redis, then exits 1).
fn config_on(url: &str, slot: &str, tables: &[&str]) -> ConfigBuilder {
    ConfigBuilder::on_url(url)
        .slot(slot)
        .rules(&rules_on(tables))
}

#[tokio::test]
async fn setup_creates_then_reports_ok() {
    let db = TestDb::new("cli_setup").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = tempfile::tempdir().unwrap();
    let slot = format!("{}_s", db.name);
    let config = config_on(&db.url, &slot, &["public.t"]).write(dir.path());
    let config = config.to_str().unwrap();

    let (code, out, err) = run_binary(&["setup", "--config", config], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("publication \"w2c\": created") && out.contains("created"),
        "{out}"
    );
    let (code, out, err) = run_binary(&["setup", "--config", config], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("publication \"w2c\": ok; slot") && out.contains(": ok"),
        "{out}"
    );
    assert!(db.confirmed_lsn(&slot).await.is_some());
}

#[tokio::test]
async fn tail_prints_every_change_as_a_json_line_on_a_temporary_slot() {
    let db = TestDb::new("cli_tail").await;
    db.exec(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text, price numeric, meta jsonb);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_on(&db.url, "unused_slot", &["public.docs"]).write(dir.path());
    let mut child = Command::new(bin())
        .envs(base_env())
        .args(["tail", "--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });

    // Write only once tail's temporary slot streams.
    let temp_slot = format!("wal2cache_tail_{}", child.id());
    eventually(
        "tail's temporary slot to be active",
        Duration::from_secs(20),
        || async {
            db.client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND temporary AND active AND confirmed_flush_lsn IS NOT NULL",
                &[&temp_slot],
            )
            .await
            .unwrap()
            .is_some()
        },
    )
    .await;
    db.exec_each(&[
        "INSERT INTO docs VALUES (1, 'héllo', repeat('x', 4000), 12.50, '{\"a\": 1}')",
        "UPDATE docs SET title = 'world' WHERE id = 1",
        "DELETE FROM docs WHERE id = 1",
        "TRUNCATE docs",
    ])
    .await;
    let mut got = Vec::new();
    while got.len() < 4 {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("a JSON line from tail within 20 s");
        got.push(serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("{line}: {e}")));
    }
    let insert = &got[0];
    assert_eq!(insert["table"], "public.docs");
    assert_eq!(insert["op"], "insert");
    assert_eq!(insert["key_columns"], json!(["id"]));
    assert_eq!(insert["new"]["title"], "héllo");
    assert_eq!(insert["new"]["price"], "12.50");
    assert_eq!(insert["new"]["meta"], json!({"a": 1}));
    assert_eq!(insert["new"]["id"], 1);
    assert!(insert["lsn"].as_str().unwrap().contains('/'));
    assert!(insert["xid"].as_u64().unwrap() > 0);
    assert!(insert["commit_time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(insert["plan"], json!({"delete": ["k0:1"]}));

    let update = &got[1];
    assert_eq!(update["op"], "update");
    assert_eq!(update["unchanged"], json!(["body"]));
    assert!(
        update["new"].get("body").is_none(),
        "unchanged TOAST is never a value: {update}"
    );
    assert_eq!(update["new"]["title"], "world");

    let delete = &got[2];
    assert_eq!(delete["op"], "delete");
    assert_eq!(delete["old"], json!({"id": 1}));
    assert_eq!(delete["old_kind"], "key");
    assert_eq!(got[3]["op"], "truncate");
    assert_eq!(got[3]["tables"], json!(["public.docs"]));

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "tail exits 0 on SIGTERM");
    eventually(
        "the temporary slot to vanish",
        Duration::from_secs(10),
        || async {
            db.client
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&temp_slot],
                )
                .await
                .unwrap()
                .is_none()
        },
    )
    .await;
}

#[test]
fn a_config_error_names_the_key_and_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_on("postgres://u@127.0.0.1:1/db", "s", &["public.t"])
        .raw("postgres", "sloot = \"x\"")
        .write(dir.path());
    let (code, _, err) = run_binary(&["setup", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("sloot") && err.contains("wal2cache.toml"),
        "{err}"
    );
}

#[test]
fn an_unknown_runtime_is_refused_naming_the_choices() {
    let args = ["check", "--config", "/nonexistent/wal2cache.toml"];
    let (code, _, err) = run_binary(&args, &[("WAL2CACHE_RUNTIME", "multithread")]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("WAL2CACHE_RUNTIME=\"multithread\"")
            && err.contains("current_thread")
            && err.contains("multi_thread"),
        "{err}"
    );
    // Both runtimes it names start: the command gets as far as the missing config.
    for runtime in ["current_thread", "multi_thread"] {
        let (code, _, err) = run_binary(&args, &[("WAL2CACHE_RUNTIME", runtime)]);
        assert_eq!(code, 3, "{err}");
        assert!(
            err.contains("/nonexistent/wal2cache.toml") && !err.contains("WAL2CACHE_RUNTIME"),
            "{runtime}: {err}"
        );
    }
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_on("postgres://u@127.0.0.1:1/db", "s", &["public.t"]).write(dir.path());
    let config = config.to_str().unwrap();
    let (code, _, err) = run_binary(
        &["setup", "--config", config],
        &[("WAL2CACHE__POSTGRES__SLOT", "Not-Valid")],
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("postgres.slot = \"Not-Valid\""), "{err}");
}

#[test]
fn unknown_keys_are_listed_together_from_the_file_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_on("postgres://u@127.0.0.1:1/db", "s", &["public.t"])
        .raw("rules", "paths = \"x\"")
        .raw("pipeline", "batch = 1")
        .write(dir.path());
    let (code, _, err) = run_binary(
        &["check", "--config", config.to_str().unwrap()],
        &[("WAL2CACHE__POSTGRES__SLOTNAME", "x")],
    );
    assert_eq!(code, 3, "{err}");
    for key in ["rules.paths", "pipeline.batch", "postgres.slotname"] {
        assert!(err.contains(&format!("{key}: unknown key")), "{key}: {err}");
    }
}

#[test]
fn an_unreachable_server_exits_1_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_on("postgres://u:secret@127.0.0.1:1/db", "s", &[]).write(dir.path());
    std::fs::write(dir.path().join("rules.toml"), "").unwrap();
    let (code, _, err) = run_binary(&["setup", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot connect to PostgreSQL at postgres://u@127.0.0.1:1/db"),
        "{err}"
    );
    assert!(
        !err.contains("secret"),
        "the password must not be printed: {err}"
    );
    assert!(
        err.contains("Connection refused") && err.contains("check the host and port"),
        "the cause is shown: {err}"
    );
}

#[test]
fn a_missing_database_shows_the_server_message_and_sqlstate() {
    let dir = tempfile::tempdir().unwrap();
    let database = unique("w2c_no_such_db");
    let config = config_on(&url_for(&database, None), "s", &[]).write(dir.path());
    std::fs::write(dir.path().join("rules.toml"), "").unwrap();
    for command in ["setup", "check"] {
        let (code, _, err) = run_binary(&[command, "--config", config.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!(
                "database \"{database}\" does not exist (SQLSTATE 3D000)"
            )) && err.contains("check the database name in postgres.url"),
            "{command}: {err}"
        );
    }
}

#[test]
fn a_missing_rules_file_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_on("postgres://u@127.0.0.1:1/db", "s", &[]).write(dir.path());
    std::fs::remove_file(dir.path().join("rules.toml")).unwrap();
    let (code, _, err) = run_binary(&["setup", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("rules.toml") && err.contains("rules.path"),
        "{err}"
    );
}

#[tokio::test]
async fn check_passes_good_rules_and_lists_every_problem_of_bad_ones() {
    let db = TestDb::new("cli_check").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, qty int)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_on(&db.url, "s", &["public.items"]).write(dir.path());
    let config = config.to_str().unwrap();
    let (code, out, err) = run_binary(&["check", "--config", config], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok: 1 rules on 1 tables"), "{out}");
    assert!(
        out.contains("setup will add to publication \"w2c\": public.items"),
        "{out}"
    );

    std::fs::write(
        dir.path().join("rules.toml"),
        "[[rule]]\nname = \"a\"\ntable = \"public.items\"\nkeys = [\"a:{nope}\"]\n\
         [[rule]]\nname = \"b\"\ntable = \"public.items\"\nkeys = [\"b:{qty}\"]\n",
    )
    .unwrap();
    let (code, _, err) = run_binary(&["check", "--config", config], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("2 problems"), "{err}");
    assert!(
        err.contains("rule \"a\"") && err.contains("\"nope\""),
        "{err}"
    );
    assert!(
        err.contains("rule \"b\"")
            && err.contains("ALTER TABLE \"public\".\"items\" REPLICA IDENTITY FULL;"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("rules.toml"),
        "[[rule]]\nname = \"a\"\ntable = \"public.items\"\nkeys = [\"a:{id\"]\naction = \"upsert\"\n",
    )
    .unwrap();
    let (code, _, err) = run_binary(&["check", "--config", config], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("2 problems in the rules"), "{err}");
    assert!(
        err.contains("keys: \"a:{id\"") && err.contains("action: unknown action \"upsert\""),
        "{err}"
    );
}

/// Lines of a child's pipe, read on a thread of their own.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for_line(lines: &mpsc::Receiver<String>, what: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(what) => return line,
            Ok(_) => {}
            Err(_) => panic!("no line containing {what:?} within 20 s"),
        }
    }
}

#[tokio::test]
async fn tail_shows_plans_and_reloads_rules_on_sighup_keeping_old_ones_on_failure() {
    let db = TestDb::new("cli_hup").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, qty int)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_on(&db.url, "s", &["public.items"]).write(dir.path());
    let mut child = Command::new(bin())
        .envs(base_env())
        .args(["tail", "--config", config.to_str().unwrap()])
        .env("WAL2CACHE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines_of(child.stdout.take().unwrap());
    let err = lines_of(child.stderr.take().unwrap());
    wait_for_line(&err, "streaming");
    let hup = |child: &std::process::Child| {
        let ok = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    let plan_of =
        |line: String| -> Value { serde_json::from_str::<Value>(&line).unwrap()["plan"].clone() };

    db.exec("INSERT INTO items VALUES (1, 1)").await;
    assert_eq!(
        plan_of(wait_for_line(&out, "\"op\":\"insert\"")),
        json!({"delete": ["k0:1"]})
    );

    // Rules that do not check: refused, the old ones stay.
    std::fs::write(
        dir.path().join("rules.toml"),
        "[[rule]]\nname = \"x\"\ntable = \"public.items\"\nkeys = [\"x:{nope}\"]\n",
    )
    .unwrap();
    hup(&child);
    wait_for_line(&err, "rules not reloaded");
    wait_for_line(&err, "column \"nope\"");
    db.exec("INSERT INTO items VALUES (2, 1)").await;
    assert_eq!(
        plan_of(wait_for_line(&out, "\"op\":\"insert\"")),
        json!({"delete": ["k0:2"]})
    );

    // Good rules: in force from the next change.
    std::fs::write(
        dir.path().join("rules.toml"),
        "[[rule]]\nname = \"y\"\ntable = \"public.items\"\nkeys = [\"item:v2:{id}\"]\ntags = [\"items\"]\n",
    )
    .unwrap();
    hup(&child);
    wait_for_line(&err, "rules reloaded");
    db.exec("INSERT INTO items VALUES (3, 1)").await;
    assert_eq!(
        plan_of(wait_for_line(&out, "\"op\":\"insert\"")),
        json!({"delete": ["item:v2:3"], "purge_tags": ["items"]})
    );

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// splitmix64: random bit patterns without a dependency, reproducible from the seed.
fn random_bits(seed: u64, n: usize) -> Vec<u64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
        .collect()
}

/// The `new` row of a tail line with each value's JSON text exactly as printed.
fn raw_new_row(line: &str) -> std::collections::HashMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Line {
        new: std::collections::HashMap<String, Box<serde_json::value::RawValue>>,
    }
    let parsed: Line = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
    parsed
        .new
        .into_iter()
        .map(|(k, v)| (k, v.get().to_string()))
        .collect()
}

#[tokio::test]
async fn tail_prints_every_value_exactly_as_postgres_does() {
    let db = TestDb::new("cli_tail_exact").await;
    db.exec("CREATE TABLE v (id int PRIMARY KEY, f float8, j json, jb jsonb)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_on(&db.url, "unused_slot", &["public.v"]).write(dir.path());
    let mut child = Command::new(bin())
        .envs(base_env())
        .args(["tail", "--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = lines_of(child.stdout.take().unwrap());
    let temp_slot = format!("wal2cache_tail_{}", child.id());
    eventually(
        "tail's temporary slot to stream",
        Duration::from_secs(30),
        || slot_active(&db, &temp_slot),
    )
    .await;

    // Random bit patterns cover every exponent (subnormals, NaN and infinities too),
    // plus the edges.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut floats: Vec<f64> = random_bits(seed, 1000)
        .into_iter()
        .map(f64::from_bits)
        .collect();
    floats.extend([
        0.0,
        -0.0,
        5e-324,
        f64::MIN_POSITIVE,
        f64::MAX,
        1e20,
        0.1,
        1e22,
        1e-7,
    ]);
    let ids: Vec<i32> = (1..=floats.len() as i32).collect();
    db.client
        .execute(
            "INSERT INTO v (id, f) SELECT * FROM unnest($1::int[], $2::float8[])",
            &[&ids, &floats],
        )
        .await
        .unwrap();
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let deep_object = format!("{}0{}", "{\"a\": ".repeat(200), "}".repeat(200));
    db.exec_each(&[
        "INSERT INTO v (id, j, jb) VALUES (-1, '1e400', '10000000000000000000000001')",
        &format!("INSERT INTO v (id, j, jb) VALUES (-2, '{deep_object}', '{deep}')"),
        "INSERT INTO v (id, j) VALUES (-3, '{\"a\":\n  [1e-400, -0.0e+0]}')",
    ])
    .await;

    /// PostgreSQL's own text of f, j and jb, by id.
    type Texts = (Option<String>, Option<String>, Option<String>);
    let expected: std::collections::HashMap<i32, Texts> = db
        .client
        .query("SELECT id, f::text, j::text, jb::text FROM v", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let as_json = |text: &Option<String>, float: bool| match text.as_deref() {
        None => "null".to_string(),
        Some(t) if float && !t.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => {
            format!("{t:?}")
        }
        Some(t) if float && t.starts_with("-I") => format!("{t:?}"),
        Some(t) => t.replace('\n', " "),
    };
    let mut wrong = Vec::new();
    for printed in 0..expected.len() {
        let line = out
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "tail printed {printed} lines of {}, {} of them wrong (seed {seed}): {:?}",
                    expected.len(),
                    wrong.len(),
                    &wrong[..wrong.len().min(5)]
                )
            });
        let row = raw_new_row(&line);
        let id: i32 = row["id"].parse().unwrap();
        let (f, j, jb) = &expected[&id];
        for (column, text, float) in [("f", f, true), ("j", j, false), ("jb", jb, false)] {
            let want = as_json(text, float);
            if row[column] != want {
                wrong.push(format!(
                    "id {id} {column}: printed {} for {want}",
                    row[column]
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} values printed differently from PostgreSQL's text (seed {seed}), e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(child.try_wait().unwrap(), None, "tail is still running");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn a_malformed_redis_url_is_shown_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_on("postgres://u@127.0.0.1:1/db", "s", &[])
        .redis("redis//:secret@host/0")
        .write(dir.path());
    let (code, _, err) = run_binary(&["run", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("redis//:***@host/0"), "{err}");
    assert!(
        !err.contains("secret"),
        "the password must not be printed: {err}"
    );
}

#[test]
fn check_reports_the_sections_run_would_miss() {
    let dir = tempfile::tempdir().unwrap();
    let without = config_on("postgres://u@127.0.0.1:1/db", "s", &[])
        .without_redis()
        .without_kafka();
    let config = without.write(dir.path());
    // Before the database is asked (it does not answer here).
    let (code, _, err) = run_binary(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("no [redis] and [kafka] section")
            && err.contains("`wal2cache run` needs them"),
        "{err}"
    );
    without
        .kafka_key("brokers", "127.0.0.1:1")
        .write(dir.path());
    let (code, _, err) = run_binary(&["check", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no [redis] section"), "{err}");
    assert_eq!(err.matches("[redis]").count(), 1, "printed once: {err}");
}

#[tokio::test]
async fn run_with_no_rules_warns() {
    let db = TestDb::new("cli_no_rules").await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_on(&db.url, &format!("{}_s", db.name), &[]).write(dir.path());
    let (code, _, err) = run_binary(
        &["run", "--config", config.to_str().unwrap()],
        &[("WAL2CACHE_LOG", "warn")],
    );
    assert_eq!(code, 1, "Redis does not answer: {err}");
    assert!(
        err.contains("WARN") && err.contains("the rules have no [[rule]]"),
        "{err}"
    );
}

#[test]
fn a_fatal_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_on("postgres://u@127.0.0.1:1/db", "s", &[]).write(dir.path());
    std::fs::write(dir.path().join("rules.toml"), "").unwrap();
    let (code, _, err) = run_binary(&["setup", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.matches("cannot connect to PostgreSQL").count(),
        1,
        "once: {err}"
    );
    assert!(
        err.trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("error: "),
        "{err}"
    );
}

/// The exit code of `wal2cache args` when its standard error is a pipe nobody reads
/// (the read end is closed: every write fails with EPIPE).
fn exit_code_with_stderr_closed(args: &[&str], envs: &[(&str, &str)]) -> Option<i32> {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(bin())
        .envs(base_env())
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(writer))
        .status()
        .unwrap()
        .code()
}

#[tokio::test]
async fn a_closed_stderr_does_not_make_it_panic() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_on("postgres://u@127.0.0.1:1/db", "s", &[])
        .raw("postgres", "sloot = 1")
        .write(dir.path());
    assert_eq!(
        exit_code_with_stderr_closed(&["check", "--config", config.to_str().unwrap()], &[]),
        Some(3),
        "a bad config exits 3, not 101 (a panic)"
    );

    // Logs first (a warning), then a fatal error.
    let db = TestDb::new("cli_closed_stderr").await;
    let config = config_on(&db.url, &format!("{}_s", db.name), &[]).write(dir.path());
    assert_eq!(
        exit_code_with_stderr_closed(
            &["run", "--config", config.to_str().unwrap()],
            &[("WAL2CACHE_LOG", "info")]
        ),
        Some(1),
        "run exits 1, not 101 (a panic)"
    );
}

#[tokio::test]
async fn a_dropped_replication_connection_is_reported_by_wal2cache_alone() {
    let db = TestDb::new("cli_quiet").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY)").await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_on(&db.url, "s", &["public.items"]).write(dir.path());
    let mut child = Command::new(bin())
        .envs(base_env())
        .args(["tail", "--config", config.to_str().unwrap()])
        .env("WAL2CACHE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines_of(child.stderr.take().unwrap());
    wait_for_line(&err, "streaming");
    let temp_slot = format!("wal2cache_tail_{}", child.id());
    db.client
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&temp_slot],
        )
        .await
        .unwrap();
    // Everything it logs until it streams again.
    let mut logged = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = err
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("tail did not stream again within 30 s: {logged:#?}"));
        let done = line.contains("streaming");
        logged.push(line);
        if done {
            break;
        }
    }
    assert!(
        logged
            .iter()
            .any(|l| l.contains("WARN") && l.contains("wal2cache")),
        "wal2cache says the connection dropped: {logged:#?}"
    );
    assert!(
        !logged.iter().any(|l| l.contains("pgwire_replication")),
        "the replication crate's own events are not shown: {logged:#?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn tail_ends_quietly_when_its_reader_goes_away() {
    let db = TestDb::new("cli_tail_pipe").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_on(&db.url, "unused_slot", &["public.t"]).write(dir.path());
    let mut child = Command::new(bin())
        .envs(base_env())
        .args(["tail", "--config", config.to_str().unwrap()])
        .env("WAL2CACHE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let temp_slot = format!("wal2cache_tail_{}", child.id());
    eventually("tail to stream", Duration::from_secs(20), || async {
        db.client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active AND confirmed_flush_lsn IS NOT NULL",
                &[&temp_slot],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    db.exec("INSERT INTO t VALUES (1)").await;
    // `tail | head -1`: read one line, then close the pipe.
    let mut first = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("\"op\":\"insert\""), "{first}");
    drop(stdout);
    let mut id = 2;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(id < 600, "tail kept running with nobody reading");
        db.client
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap();
        id += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
}
