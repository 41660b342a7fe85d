//! SIGTERM while a sink refuses writes or is gone (the binary, for its signal and exit
//! code): the daemon stops within
//! `pipeline.shutdown_timeout` with exit code 1, and confirms nothing past what the
//! sinks applied. The Redis here is a private `redis-server`, made to refuse writes
//! (`maxmemory 1`, `noeviction`), and the broker a private Tansu, killed, so that no
//! other test sees them fail.

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use support::config::ConfigBuilder;
use support::daemon::Daemon;
use support::db::{connect, wait_streaming, TestDb};
use support::env::unique;
use support::kafka::PrivateBroker;
use support::store::PrivateRedis;
use support::wait::eventually;

const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_daemon_while_redis_refuses_writes() {
    let db = TestDb::new("shutdown").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)")
        .await;
    let redis = PrivateRedis::start().await;
    let mut r = redis.connect().await;
    let prefix = unique("shutdown");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new(&db)
        .slot_suffix(&db, "s")
        .rules(&format!(
            "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:json:{{id}}\"]\naction = \"republish\"\n"
        ))
        .redis(&redis.url)
        .kafka_topic(&format!("{prefix}.events"))
        .pipeline("shutdown_timeout", SHUTDOWN_TIMEOUT)
        .pipeline("idle_heartbeat", "0s")
        .pipeline("sink_error_after", "1s")
        .write(dir.path());
    let slot = format!("{}_s", db.name);
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start_logging(&config, &[("WAL2CACHE_LOG", "info")], &log);
    wait_streaming(&db, &slot).await;

    // A first row is applied and confirmed.
    // The end of its commit record, not the server's position after it.
    let first = db.exec_commit_end("INSERT INTO items VALUES (0, 0)").await;
    eventually(
        "the first row to be confirmed",
        Duration::from_secs(30),
        || async { db.confirmed_lsn(&slot).await.is_some_and(|l| l >= first) },
    )
    .await;
    let key0 = format!("{prefix}:json:0");
    assert!(r.exists::<_, bool>(&key0).await.unwrap());
    let applied = db.confirmed_lsn(&slot).await.unwrap();

    // Redis refuses every write from now on (OOM): the applier retries, the batch
    // channel fills and the reader waits for room.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut r)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(1)
        .query_async(&mut r)
        .await
        .unwrap();
    // The end of the first refused transaction's commit record: the slot may move
    // up to that transaction (the server's idle positions, WAL of other tests), never
    // past it.
    let refused = db.exec_commit_end("INSERT INTO items VALUES (1, 1)").await;
    for id in 2..=200 {
        db.client
            .execute("INSERT INTO items VALUES ($1, $1)", &[&id])
            .await
            .unwrap();
    }
    let written = db.current_lsn().await;
    // The walsender has sent everything: the daemon holds more transactions than
    // its channel takes.
    eventually("the walsender to send the writes", Duration::from_secs(30), || async {
        db.client
            .query_opt(
                "SELECT 1 FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid
                  WHERE s.slot_name = $1 AND r.sent_lsn >= $2::text::pg_lsn",
                &[&slot, &written.to_string()],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    // Failing for longer than pipeline.sink_error_after: said once at ERROR.
    eventually(
        "the ERROR about the failing sink",
        Duration::from_secs(30),
        || async {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("Redis has been failing for")
        },
    )
    .await;
    // Writes go on while it stops.
    let writer_url = db.url.clone();
    let writer = tokio::spawn(async move {
        let c = connect(&writer_url).await;
        for id in 1000..1200 {
            if c.execute("INSERT INTO items VALUES ($1, $1)", &[&id])
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    let margin = Duration::from_secs(12);
    let exited = tokio::task::spawn_blocking(move || daemon.terminate(SHUTDOWN_TIMEOUT + margin))
        .await
        .unwrap();
    writer.abort();
    let stderr = std::fs::read_to_string(&log).unwrap();
    let (code, took) = exited.unwrap_or_else(|| {
        panic!("still running {:?} after SIGTERM with shutdown_timeout = {SHUTDOWN_TIMEOUT:?}:\n{stderr}", SHUTDOWN_TIMEOUT + margin)
    });
    assert_eq!(
        code,
        Some(1),
        "exit code past the shutdown deadline:\n{stderr}"
    );
    assert!(
        took >= SHUTDOWN_TIMEOUT,
        "exited after {took:?}, before the deadline: did it drain?\n{stderr}"
    );
    assert!(stderr.contains("shutdown deadline"), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("has been failing for"))
        .collect();
    assert_eq!(errors.len(), 1, "one ERROR per outage: {errors:#?}");
    assert!(
        errors[0].contains("attempts") && errors[0].contains("OOM"),
        "{}",
        errors[0]
    );
    let warns = stderr
        .lines()
        .filter(|l| l.contains("Redis failed; retrying"))
        .count();
    assert!(
        warns <= 3,
        "retry WARNs are rate-limited: {warns}\n{stderr}"
    );
    let confirmed = db.confirmed_lsn(&slot).await.unwrap();
    assert!(
        confirmed >= applied && confirmed < refused,
        "nothing Redis refused is confirmed: confirmed {confirmed}, the first refused transaction ends at {refused}"
    );
    // And indeed none of it reached Redis.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(!r
        .exists::<_, bool>(format!("{prefix}:json:1"))
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_daemon_while_the_broker_is_gone() {
    let db = TestDb::new("shutdown_k").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)")
        .await;
    let mut broker = PrivateBroker::start().await;
    let prefix = unique("shutdown_k");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new(&db)
        .slot_suffix(&db, "s")
        .rules(&format!(
            "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:k:{{id}}\"]\n"
        ))
        .kafka(&broker.brokers, &format!("{prefix}.events"))
        .pipeline("shutdown_timeout", SHUTDOWN_TIMEOUT)
        .pipeline("idle_heartbeat", "0s")
        .write(dir.path());
    let slot = format!("{}_s", db.name);
    let log = dir.path().join("daemon.log");
    let daemon = Daemon::start_logging(&config, &[("WAL2CACHE_LOG", "info")], &log);
    wait_streaming(&db, &slot).await;
    // The end of its commit record, not the server's position after it.
    let first = db.exec_commit_end("INSERT INTO items VALUES (0, 0)").await;
    eventually(
        "the first row to be confirmed",
        Duration::from_secs(30),
        || async { db.confirmed_lsn(&slot).await.is_some_and(|l| l >= first) },
    )
    .await;
    let applied = db.confirmed_lsn(&slot).await.unwrap();

    // The broker is gone: deliveries wait, the channel fills.
    broker.kill();
    // The end of the first refused transaction's commit record: the slot may move
    // up to that transaction (the server's idle positions, WAL of other tests), never
    // past it.
    let refused = db.exec_commit_end("INSERT INTO items VALUES (1, 1)").await;
    for id in 2..=200 {
        db.client
            .execute("INSERT INTO items VALUES ($1, $1)", &[&id])
            .await
            .unwrap();
    }
    eventually(
        "librdkafka to notice the broker is gone",
        Duration::from_secs(30),
        || async {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("librdkafka")
        },
    )
    .await;

    let margin = Duration::from_secs(8);
    let exited = tokio::task::spawn_blocking(move || daemon.terminate(SHUTDOWN_TIMEOUT + margin))
        .await
        .unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    let (code, took) = exited.unwrap_or_else(|| {
        panic!(
            "still running {:?} after SIGTERM with shutdown_timeout = {SHUTDOWN_TIMEOUT:?}:\n{stderr}",
            SHUTDOWN_TIMEOUT + margin
        )
    });
    assert_eq!(
        code,
        Some(1),
        "exit code past the shutdown deadline:\n{stderr}"
    );
    assert!(stderr.contains("shutdown deadline"), "{stderr}");
    println!("exited {took:?} after SIGTERM");
    let confirmed = db.confirmed_lsn(&slot).await.unwrap();
    assert!(
        confirmed >= applied && confirmed < refused,
        "nothing the broker did not acknowledge is confirmed: confirmed {confirmed}, the first refused transaction ends at {refused}"
    );
}
