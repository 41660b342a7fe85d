//! Operating the daemon, against the real services: `/healthz`, `/readyz`, `/status`
//! and the operator metrics of an active and of a standby instance, `wal2cache status`
//! from the database's side, JSON logs, and the takeover of the slot by a standby when
//! the active instance is killed, with the crash oracle showing nothing lost.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::config::ConfigBuilder;
use support::daemon::{run_binary, Daemon};
use support::db::{wait_streaming, TestDb};
use support::env::unique;
use support::kafka::PrivateBroker;
use support::net::{free_addr, http_async};
use support::oracle::{assert_nothing_lost, items_config, writer, ITEMS};
use support::scrape::series;
use support::store::{redis, unlink_matching, PrivateRedis};
use support::wait::eventually;

/// `GET path` on `addr`: the status code and the body as JSON (Null when not JSON).
async fn get_json(addr: SocketAddr, path: &'static str) -> Option<(u16, Value)> {
    let (code, body) = http_async(addr, "GET", path).await?;
    Some((code, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

async fn metrics(addr: SocketAddr) -> String {
    http_async(addr, "GET", "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// Waits until the instance at `addr` reports `role` and, when active, streaming.
async fn wait_role(addr: SocketAddr, role: &str, within: Duration) {
    eventually(&format!("{addr} to be {role}"), within, || async {
        matches!(get_json(addr, "/status").await, Some((200, s)) if s["role"] == role
            && (role != "active" || s["streaming"] == true))
    })
    .await;
}

/// A daemon on the items table, its config changed by `with` (a sink of the test's
/// own), active and ready: the database, the listener's address, the daemon and the
/// directory of its config.
async fn ready_daemon(
    label: &str,
    with: impl FnOnce(ConfigBuilder, &str) -> ConfigBuilder,
) -> (TestDb, SocketAddr, Daemon, tempfile::TempDir) {
    let db = TestDb::new(label).await;
    db.exec(ITEMS).await;
    let prefix = unique("op");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let builder = items_config(&db, &prefix, &topic)
        .name(&format!("op-{}", db.name))
        .metrics_listen(addr);
    let config = with(builder, &topic).write(dir.path());
    let daemon = Daemon::start(&config, &[]);
    wait_role(addr, "active", Duration::from_secs(30)).await;
    eventually("ready", Duration::from_secs(30), || async {
        matches!(get_json(addr, "/readyz").await, Some((200, _)))
    })
    .await;
    (db, addr, daemon, dir)
}

fn config(
    db: &TestDb,
    prefix: &str,
    topic: &str,
    metrics: SocketAddr,
    dir: &Path,
) -> std::path::PathBuf {
    items_config(db, prefix, topic)
        .name(&format!("op-{}", db.name))
        .metrics_listen(metrics)
        .raw("metrics", "slot_poll = \"1s\"")
        .raw("postgres", "takeover = \"500ms\"")
        .write(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_and_status_describe_an_active_daemon() {
    let db = TestDb::new("op_active").await;
    db.exec(ITEMS).await;
    let prefix = unique("op");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let config = config(&db, &prefix, &topic, addr, dir.path());
    let cfg = config.to_str().unwrap();
    let slot = format!("{}_c", db.name);

    // Nothing runs yet: `status` says so, with exit code 5.
    let (code, out, err) = run_binary(&["status", "--config", cfg], &[]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(out.contains("does not exist"), "{out}");

    let daemon = Daemon::start(&config, &[]);
    wait_streaming(&db, &slot).await;
    wait_role(addr, "active", Duration::from_secs(30)).await;
    let (code, _) = get_json(addr, "/healthz").await.expect("an answer");
    assert_eq!(code, 200);
    let (code, ready) = get_json(addr, "/readyz").await.expect("an answer");
    assert_eq!(code, 200, "{ready}");
    assert_eq!(ready["role"], "active");

    db.exec("INSERT INTO items VALUES (1, 1, 'one')").await;
    eventually(
        "the slot polled after the insert",
        Duration::from_secs(30),
        || async {
            let m = metrics(addr).await;
            series(&m, "wal2cache_rule_plans_total{rule=\"item\"}").is_some_and(|v| v >= 1.0)
                && series(&m, "wal2cache_slot_retained_wal_bytes").is_some_and(|v| v > 0.0)
        },
    )
    .await;
    // Idle and caught up: the lag is 0, not the age of the last change.
    eventually(
        "the lag back to 0 once idle",
        Duration::from_secs(30),
        || async { series(&metrics(addr).await, "wal2cache_replication_lag_seconds") == Some(0.0) },
    )
    .await;
    let m = metrics(addr).await;
    for (name, want) in [
        ("wal2cache_up", 1.0),
        ("wal2cache_role{role=\"active\"}", 1.0),
        ("wal2cache_role{role=\"standby\"}", 0.0),
        ("wal2cache_streaming", 1.0),
        ("wal2cache_sink_healthy{sink=\"redis\"}", 1.0),
        ("wal2cache_sink_healthy{sink=\"kafka\"}", 1.0),
        ("wal2cache_rule_keys_total{rule=\"item\"}", 1.0),
        ("wal2cache_rule_keys_total{rule=\"item_json\"}", 1.0),
        ("wal2cache_slot_losses_total{reason=\"slot_missing\"}", 0.0),
    ] {
        assert_eq!(series(&m, name), Some(want), "{name} in\n{m}");
    }
    assert!(
        series(&m, "wal2cache_sink_batches_total{sink=\"redis\"}").is_some_and(|v| v >= 1.0),
        "{m}"
    );

    let (code, status) = get_json(addr, "/status").await.expect("an answer");
    assert_eq!(code, 200);
    assert_eq!(status["role"], "active", "{status}");
    assert_eq!(status["slot_name"], slot.as_str());
    assert_eq!(status["slot"]["exists"], true, "{status}");
    assert_eq!(status["rules"]["count"], 2, "{status}");
    assert_eq!(status["sinks"]["redis"]["healthy"], true);
    assert!(status["confirmed_lsn"].is_string(), "{status}");
    assert!(status["uptime_seconds"].is_u64(), "{status}");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));

    // From the database's side: streaming, by a wal2cache of this name.
    let (code, out, err) = run_binary(&["status", "--config", cfg], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("streaming: PID"), "{out}");
    assert!(out.contains(&format!("wal2cache op-{}", db.name)), "{out}");
    let (code, out, err) = run_binary(&["status", "--config", cfg, "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let json: Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(json["streaming"], true, "{json}");
    assert!(json["retained_wal_bytes"].as_u64().is_some(), "{json}");
    assert!(json["record"]["confirmed"].is_string(), "{json}");

    daemon.stop();
    let (code, out, _) = run_binary(&["status", "--config", cfg], &[]);
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("NOT streaming"), "{out}");
    unlink_matching(&mut redis().await, &format!("{prefix}:*")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_down_makes_the_instance_unready_and_says_which() {
    let redis_server = PrivateRedis::start().await;
    let port: u16 = redis_server
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (db, addr, _daemon, _dir) =
        ready_daemon("op_sink", |c, _| c.redis(&redis_server.url)).await;
    drop(redis_server);
    db.exec("INSERT INTO items VALUES (1, 1, 'one')").await;
    eventually("unready, naming Redis", Duration::from_secs(30), || async {
        matches!(get_json(addr, "/readyz").await, Some((503, r))
            if r["failing"].as_array().is_some_and(|f| f.iter().any(|x| x.as_str().unwrap_or("").starts_with("redis failing"))))
    })
    .await;
    let m = metrics(addr).await;
    assert_eq!(
        series(&m, "wal2cache_sink_healthy{sink=\"redis\"}"),
        Some(0.0),
        "{m}"
    );
    assert!(
        series(
            &m,
            "wal2cache_sink_errors_total{kind=\"retry\",sink=\"redis\"}"
        )
        .or_else(|| series(
            &m,
            "wal2cache_sink_errors_total{sink=\"redis\",kind=\"retry\"}"
        ))
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
    // Alive all the same: a sink outage is not a reason to restart the process.
    let (code, _) = get_json(addr, "/healthz").await.expect("an answer");
    assert_eq!(code, 200);
    let _again = PrivateRedis::start_on(port).await;
    eventually("ready again", Duration::from_secs(60), || async {
        matches!(get_json(addr, "/readyz").await, Some((200, _)))
    })
    .await;
}

/// The broker down: librdkafka says at once that every broker is down, and the
/// instance is unready, naming Kafka, without waiting for a batch's delivery to time
/// out (30 s); once the broker is back and a message is delivered, ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_down_makes_the_instance_unready_and_says_so() {
    let mut broker = PrivateBroker::start().await;
    let port: u16 = broker.brokers.rsplit(':').next().unwrap().parse().unwrap();
    let (db, addr, _daemon, _dir) =
        ready_daemon("op_broker", |c, topic| c.kafka(&broker.brokers, topic)).await;
    broker.kill();
    // Nothing written: no batch waits on the broker, only librdkafka knows.
    eventually(
        "unready, saying that all brokers are down",
        Duration::from_secs(60),
        || async {
            matches!(get_json(addr, "/readyz").await, Some((503, r))
            if r["failing"].as_array().is_some_and(|f| f.iter().any(|x| {
                let x = x.as_str().unwrap_or("");
                x.starts_with("kafka failing: all brokers are down")
            })))
        },
    )
    .await;
    assert_eq!(
        series(
            &metrics(addr).await,
            "wal2cache_sink_healthy{sink=\"kafka\"}"
        ),
        Some(0.0)
    );
    let _again = PrivateBroker::start_on(port).await;
    db.exec("INSERT INTO items VALUES (1, 1, 'one')").await;
    eventually("ready again", Duration::from_secs(90), || async {
        matches!(get_json(addr, "/readyz").await, Some((200, _)))
    })
    .await;
}

/// Two daemons on one config: one streams, the other is a standby (503, "standby").
/// Under a steady write load: SIGKILL the active, and the standby streams; start a
/// new standby and SIGKILL it (the active goes on); SIGKILL both and start both. The
/// crash oracle then finds every write invalidated, republished and announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_is_killed_and_nothing_is_lost() {
    let db = TestDb::new("op_takeover").await;
    db.exec(ITEMS).await;
    let prefix = unique("op");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (free_addr(), free_addr());
    let config = config(&db, &prefix, &topic, a, dir.path());
    let slot = format!("{}_c", db.name);
    let listen_b = b.to_string();
    let start = |addr: &str| Daemon::start(&config, &[("WAL2CACHE__METRICS__LISTEN", addr)]);

    let first = start(&a.to_string());
    wait_streaming(&db, &slot).await;
    wait_role(a, "active", Duration::from_secs(30)).await;
    let second = start(&listen_b);
    wait_role(b, "standby", Duration::from_secs(30)).await;
    let (code, ready) = get_json(b, "/readyz").await.expect("an answer");
    assert_eq!(code, 503, "{ready}");
    assert_eq!(ready["role"], "standby", "{ready}");
    let m = metrics(b).await;
    assert_eq!(
        series(&m, "wal2cache_role{role=\"standby\"}"),
        Some(1.0),
        "{m}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(writer(db.url.clone(), prefix.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. The active dies: the standby takes the slot.
    drop(first);
    let killed = Instant::now();
    wait_role(b, "active", Duration::from_secs(60)).await;
    let takeover = killed.elapsed();
    println!("takeover after SIGKILL of the active: {takeover:?} (postgres.takeover = 500ms)");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 2. A new standby, killed: the active goes on.
    let third = start(&a.to_string());
    wait_role(a, "standby", Duration::from_secs(30)).await;
    drop(third);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, ready) = get_json(b, "/readyz").await.expect("the active answers");
    assert_eq!(code, 200, "the active after its standby died: {ready}");

    // 3. Both die; both start again: one streams, the other waits.
    drop(second);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut one = start(&a.to_string());
    let mut two = start(&listen_b);
    eventually("one of the two active, the other standby", Duration::from_secs(60), || async {
        let ra = get_json(a, "/status").await.map(|(_, s)| s["role"].clone());
        let rb = get_json(b, "/status").await.map(|(_, s)| s["role"].clone());
        matches!((ra, rb), (Some(x), Some(y)) if (x == "active" && y == "standby") || (x == "standby" && y == "active"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (writes, rows) = writing.await.unwrap();
    assert!(writes.len() > 300, "only {} writes", writes.len());
    let events = assert_nothing_lost(&db, &prefix, &topic, &writes, &rows).await;
    println!(
        "{} writes through 4 SIGKILLs and a takeover, {events} events, zero misses",
        writes.len()
    );
    one.assert_running("at the end");
    two.assert_running("at the end");
    unlink_matching(&mut redis().await, &format!("{prefix}:*")).await;
}

/// Without `log.format`, a daemon whose standard error is not a terminal logs one JSON
/// object per line, with the event's fields at the top level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_when_stderr_is_not_a_terminal() {
    let db = TestDb::new("op_json").await;
    db.exec(ITEMS).await;
    let prefix = unique("op");
    let dir = tempfile::tempdir().unwrap();
    let config = items_config(&db, &prefix, &format!("{prefix}.events"))
        .name(&format!("op-{}", db.name))
        .write(dir.path());
    let log = dir.path().join("daemon.log");
    let mut child = std::process::Command::new(support::daemon::BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("WAL2CACHE_LOG", "info")
        .env_remove("WAL2CACHE__LOG__FORMAT")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let slot = format!("{}_c", db.name);
    wait_streaming(&db, &slot).await;
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the streaming line", Duration::from_secs(30), || async {
        text().contains("\"streaming\"")
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let lines: Vec<Value> = text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let streaming = lines
        .iter()
        .find(|l| l["message"] == "streaming")
        .unwrap_or_else(|| panic!("no streaming line in {lines:?}"));
    assert_eq!(streaming["level"], "INFO");
    assert_eq!(streaming["slot"], slot.as_str(), "{streaming}");
}

/// Under systemd (`Type=notify`): READY=1 with a STATUS once streaming, WATCHDOG=1
/// pings while `WATCHDOG_USEC` is set, STOPPING=1 on SIGTERM. The notify socket here is
/// a datagram socket of the test's own, as systemd's is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_tells_systemd_when_it_is_ready_alive_and_stopping() {
    let db = TestDb::new("op_notify").await;
    db.exec(ITEMS).await;
    let prefix = unique("op");
    let dir = tempfile::tempdir().unwrap();
    let config = items_config(&db, &prefix, &format!("{prefix}.events"))
        .name(&format!("op-{}", db.name))
        .write(dir.path());
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let daemon = Daemon::start(
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut receive_until = |what: &str, seen: &mut Vec<String>| {
        while !seen.iter().any(|m| m.lines().any(|l| l.starts_with(what))) {
            let n = socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {what} within 30 s ({e}); got {seen:?}"));
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    receive_until("READY=1", &mut seen);
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=active: streaming"), "{ready}");
    receive_until("WATCHDOG=1", &mut seen);
    let (code, _) = daemon.terminate(Duration::from_secs(30)).expect("it stops");
    assert_eq!(code, Some(0));
    receive_until("STOPPING=1", &mut seen);
}
