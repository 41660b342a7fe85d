//! The daemon's HTTP listener (`metrics.listen`) against the real services.

mod support;

use std::time::Duration;

use support::config::ConfigBuilder;
use support::db::{wait_streaming, TestDb, EXAMPLE_SCHEMA};
use support::env::unique;
use support::inproc::InProcess;
use support::net::{free_addr, http_async};
use support::wait::eventually;

#[tokio::test]
async fn the_listener_serves_get_metrics_and_404_elsewhere() {
    let db = TestDb::new("http").await;
    db.exec(EXAMPLE_SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("http");
    let topic = unique("w2c_http");
    let addr = free_addr();
    let config = ConfigBuilder::example(&db, &prefix, &topic)
        .name(&format!("http-{}", db.name))
        .metrics_listen(addr)
        .write(dir.path());

    let mut daemon = InProcess::start(&config);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    db.exec("INSERT INTO categories VALUES (1, 'c'); INSERT INTO products VALUES (1, 'p-1', 1, 'P', 1.50, NULL)")
        .await;
    eventually(
        "/metrics to count the applied change",
        Duration::from_secs(30),
        || async {
            let r = http_async(addr, "GET", "/metrics").await;
            matches!(r, Some((200, body)) if body.contains("wal2cache_changes_applied_total"))
        },
    )
    .await;
    let (status, body) = http_async(addr, "GET", "/nope").await.expect("an answer");
    assert_eq!(status, 404, "{body}");
    let (status, _) = http_async(addr, "GET", "/").await.expect("an answer");
    assert_eq!(status, 404);
    let (status, _) = http_async(addr, "POST", "/metrics")
        .await
        .expect("an answer");
    assert_ne!(status, 200, "POST /metrics");
    daemon.assert_running("while serving HTTP").await;
    daemon.stop_ok().await;
}

#[tokio::test]
async fn a_taken_metrics_port_is_an_error_naming_metrics_listen() {
    let db = TestDb::new("http_taken").await;
    db.exec(EXAMPLE_SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = ConfigBuilder::example(&db, &unique("http"), &unique("w2c_http"))
        .name(&format!("http-{}", db.name))
        .metrics_listen(addr)
        .write(dir.path());
    // The binary prints this error as its last line and exits with its code.
    let e = InProcess::start(&config)
        .exited(Duration::from_secs(60))
        .await
        .expect_err("a taken port stops run");
    let err = e.to_string();
    assert_eq!(e.exit_code(), 1, "{err}");
    assert!(
        err.contains("metrics.listen") && err.contains(&addr.to_string()),
        "{err}"
    );
}
