//! The daemon's HTTP listener (`metrics.listen`) against the real services.

mod support;

use std::time::Duration;

use support::config::ConfigBuilder;
use support::daemon::Daemon;
use support::db::{wait_streaming, TestDb, EXAMPLE_SCHEMA};
use support::env::unique;
use support::inproc::InProcess;
use support::net::{free_addr, http_async};
use support::proc::thread_cpu_secs;
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

/// The quantiles the benches print from the daemon's histograms: linear inside the
/// bucket, as Prometheus' `histogram_quantile`.
#[test]
fn histogram_quantiles_interpolate_inside_their_bucket() {
    use support::scrape::histogram_with;
    let text = "\
# TYPE x_seconds histogram
x_seconds_bucket{sink=\"kafka\",le=\"0.001\"} 1
x_seconds_bucket{sink=\"kafka\",le=\"+Inf\"} 1
x_seconds_bucket{sink=\"redis\",le=\"0.001\"} 10
x_seconds_bucket{sink=\"redis\",le=\"0.002\"} 50
x_seconds_bucket{sink=\"redis\",le=\"0.005\"} 90
x_seconds_bucket{sink=\"redis\",le=\"0.01\"} 99
x_seconds_bucket{sink=\"redis\",le=\"+Inf\"} 100
x_seconds_sum{sink=\"redis\"} 0.4
x_seconds_count{sink=\"redis\"} 100
";
    let h = histogram_with(text, "x_seconds", &["sink=\"redis\""]);
    assert_eq!(h.count, Some(100.0));
    assert_eq!(h.sum, Some(0.4));
    assert_eq!(h.buckets.len(), 5);
    let close = |got: Option<f64>, want: f64| {
        assert!(
            got.is_some_and(|g| (g - want).abs() < 1e-12),
            "{got:?} != {want}"
        )
    };
    close(h.get(0.1), 0.001);
    close(h.get(0.05), 0.0005);
    close(h.get(0.5), 0.002);
    close(h.get(0.7), 0.0035);
    close(h.get(0.99), 0.01);
    // In the +Inf bucket: no estimate.
    assert_eq!(h.get(0.995), None);
    assert_eq!(h.get(1.0), None);
    assert_eq!(h.share_at_most(0.002), Some(0.5));
    assert_eq!(h.share_at_most(0.01), Some(0.99));
    assert_eq!(h.share_at_most(0.003), None, "not a bound");
    let k = histogram_with(text, "x_seconds", &["sink=\"kafka\""]);
    close(k.get(1.0), 0.001);
    close(k.get(0.5), 0.0005);
    assert_eq!(
        histogram_with(text, "x_seconds", &[]).buckets.len(),
        0,
        "labels must match"
    );
}

/// The latencies are histograms counting every transaction once per sink, also a burst
/// drained at once after a quiet start (the exporter's summaries kept only the newest
/// samples of such a drain). The binary runs as a process of its own: the test
/// process's recorder is shared by its in-process daemons.
/// An idle daemon sleeps: the thread serving librdkafka's delivery reports waits in
/// rounds and uses (nearly) no CPU between them. rdkafka's own polling thread spun
/// through the last fraction of a millisecond of every 100 ms round: about 40 ms of
/// CPU in these 5 s.
#[tokio::test]
async fn an_idle_daemon_does_not_spin() {
    let db = TestDb::new("http_idle").await;
    db.exec(EXAMPLE_SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("http_idle");
    let topic = unique("w2c_http_idle");
    let config = ConfigBuilder::example(&db, &prefix, &topic)
        .name(&format!("http-idle-{}", db.name))
        .write(dir.path());
    let daemon = Daemon::start(&config, &[]);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    let pid = daemon.pid();
    let reports = || thread_cpu_secs(pid, "kafka reports").expect("the producer's thread");
    // Settled: the start-up's metadata and first heartbeat are done.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = reports();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let used = reports() - before;
    assert!(
        used < 0.015,
        "the producer's polling thread used {used:.3} s of CPU in 5 idle seconds"
    );
    daemon.stop();
}

#[tokio::test]
async fn the_latency_histograms_count_every_transaction() {
    use support::scrape::{histogram, metric};
    let db = TestDb::new("http_hist").await;
    db.exec(EXAMPLE_SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("http_hist");
    let topic = unique("w2c_http_hist");
    let addr = free_addr();
    let config = ConfigBuilder::example(&db, &prefix, &topic)
        .name(&format!("http-hist-{}", db.name))
        .metrics_listen(addr)
        .write(dir.path());
    let mut daemon = Daemon::start(&config, &[]);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    // The daemon's process runs without transparent huge pages (src/main.rs,
    // tune_allocator), as the README says.
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["THP_enabled:", "0"])),
        "THP_enabled in the daemon's /proc status: {:?}",
        status.lines().find(|l| l.starts_with("THP_enabled"))
    );
    db.exec("INSERT INTO categories VALUES (1, 'c'); INSERT INTO products VALUES (1, 'p-1', 1, 'P', 1.50, NULL)")
        .await;
    let scrape = || async {
        match http_async(addr, "GET", "/metrics").await {
            Some((200, body)) => body,
            other => panic!("GET /metrics: {other:?}"),
        }
    };
    let counts = |body: &str| {
        ["redis", "kafka"].map(|s| {
            metric(
                body,
                &format!("wal2cache_commit_to_{s}_seconds_count"),
                None,
            )
            .unwrap_or(0.0)
        })
    };
    // The first transaction applied by both sinks.
    let first = std::cell::Cell::new([0.0; 2]);
    eventually(
        "the first transaction counted by both sinks",
        Duration::from_secs(30),
        || async {
            first.set(counts(&scrape().await));
            first.get().iter().all(|c| *c >= 1.0)
        },
    )
    .await;
    let before = first.get();
    let body0 = scrape().await;
    let hist0 =
        ["redis", "kafka"].map(|s| histogram(&body0, &format!("wal2cache_commit_to_{s}_seconds")));
    let sum0 = hist0.each_ref().map(|h| h.sum.unwrap_or(0.0));

    let burst = 300;
    let mut sql = String::new();
    for i in 0..burst {
        sql.push_str(&format!(
            "BEGIN; UPDATE products SET price = {i} WHERE id = 1; COMMIT;"
        ));
    }
    db.exec(&sql).await;
    eventually(
        "the burst counted by both sinks",
        Duration::from_secs(30),
        || async {
            let now = counts(&scrape().await);
            now[0] >= before[0] + f64::from(burst) && now[1] >= before[1] + f64::from(burst)
        },
    )
    .await;
    // Settled: nothing more arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = scrape().await;
    assert!(!body.contains("quantile="), "no summaries:\n{body}");
    for (i, sink) in ["redis", "kafka"].iter().enumerate() {
        let name = format!("wal2cache_commit_to_{sink}_seconds");
        assert!(body.contains(&format!("# TYPE {name} histogram")), "{body}");
        let h = histogram(&body, &name);
        let count = h.count.expect("a count");
        assert_eq!(
            count,
            before[i] + f64::from(burst),
            "{sink}: one sample per transaction"
        );
        assert_eq!(h.buckets.len(), 26, "{sink}: 25 bounds and +Inf");
        assert!(
            h.buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{sink}: cumulative"
        );
        assert_eq!(
            h.buckets.last().unwrap().1,
            count,
            "{sink}: +Inf holds every sample"
        );
        // The burst's samples are all in the buckets: under 5 minutes, and the sum
        // grew by their latencies.
        let at_300s = h.buckets[h.buckets.len() - 2];
        assert_eq!(at_300s, (300.0, count), "{sink}");
        let grown = hist0[i].buckets.last().map_or(0.0, |b| b.1);
        assert_eq!(
            count - grown,
            f64::from(burst),
            "{sink}: the burst is counted whole"
        );
        assert!(h.sum.unwrap() > sum0[i], "{sink}: the sum grew");
        let p50 = h.get(0.5).expect("a median");
        assert!(p50 > 0.0 && p50 < 300.0, "{sink}: p50 {p50}");
    }
    daemon.assert_running("while serving HTTP");
    daemon.stop();
}
