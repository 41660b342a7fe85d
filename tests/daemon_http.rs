//! The daemon's HTTP listener (`metrics.listen`) against the real services.

mod common;

use std::time::Duration;

use common::daemon::*;
use common::*;

#[tokio::test]
async fn the_listener_serves_get_metrics_and_404_elsewhere() {
    let db = TestDb::new("http").await;
    db.exec(include_str!("../migrations/001_example_schema.sql"))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("http");
    let topic = unique("w2c_http");
    let config = write_example_config(dir.path(), "http", &db, &prefix, &topic);
    let addr = free_addr();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("[metrics]\nlisten = \"{addr}\"\n"));
    std::fs::write(&config, text).unwrap();

    let mut daemon = Daemon::start(&config, &[]);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    db.exec("INSERT INTO categories VALUES (1, 'c'); INSERT INTO products VALUES (1, 'p-1', 1, 'P', 1.50, NULL)")
        .await;
    eventually(
        "/metrics to count the applied change",
        Duration::from_secs(30),
        || async {
            let r = tokio::task::spawn_blocking(move || http(addr, "GET", "/metrics"))
                .await
                .unwrap();
            matches!(r, Some((200, body)) if body.contains("wal2cache_changes_applied_total"))
        },
    )
    .await;
    let (status, body) = http(addr, "GET", "/nope").expect("an answer");
    assert_eq!(status, 404, "{body}");
    let (status, _) = http(addr, "GET", "/").expect("an answer");
    assert_eq!(status, 404);
    let (status, _) = http(addr, "POST", "/metrics").expect("an answer");
    assert_ne!(status, 200, "POST /metrics");
    daemon.assert_running("while serving HTTP");
    daemon.stop();
}

#[tokio::test]
async fn a_taken_metrics_port_is_an_error_naming_metrics_listen() {
    let db = TestDb::new("http_taken").await;
    db.exec(include_str!("../migrations/001_example_schema.sql"))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_example_config(
        dir.path(),
        "http",
        &db,
        &unique("http"),
        &unique("w2c_http"),
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("[metrics]\nlisten = \"{addr}\"\n"));
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("WAL2CACHE_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("metrics.listen") && err.contains(&addr.to_string()),
        "{err}"
    );
}
