//! The daemon end to end on a Redis Cluster (three masters, one replica each, of the
//! test's own) while it is changed under it: a replica promoted by `CLUSTER FAILOVER`,
//! a slot range moved between masters (`redis-cli --cluster reshard`: MOVED and ASK
//! mid-batch), a master killed with SIGKILL and replaced by its replica. Writes go on
//! throughout; afterwards every key a change touched was invalidated, every
//! republished value equals its row, and every update has its event. With
//! `redis.wait_replicas = 1` nothing a dead master acknowledged is lost: a batch counts
//! as applied only once the replicas have it.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::AsyncCommands;
use serde_json::Value;
use support::config::ConfigBuilder;
use support::daemon::Daemon;
use support::db::{wait_streaming, TestDb, EXAMPLE_SCHEMA as SCHEMA};
use support::env::unique;
use support::kafka::read_topic;
use support::store::{cluster_cli, node_cli, PrivateCluster};

const PRODUCTS: i32 = 40;

/// Round-robin over the products: an application caches the product's key (a stale
/// value), then the row is updated; counts the updates that committed, per id.
/// Errors (a master failing over) are retried.
async fn writer(
    db_url: String,
    redis_url: String,
    prefix: String,
    stop: Arc<AtomicBool>,
    committed: Arc<Mutex<HashMap<i32, u32>>>,
) {
    let (client, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut r = ClusterClient::new(vec![redis_url])
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let mut n: i32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = 1 + n % PRODUCTS;
        let key = format!("{prefix}:shop:product:v3:{id}");
        if r.set::<_, _, ()>(&key, format!("stale {n}")).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        client
            .execute(
                "UPDATE products SET price = price + 1, name = $2 WHERE id = $1",
                &[&id, &format!("v{n}")],
            )
            .await
            .unwrap();
        *committed.lock().unwrap().entry(id).or_default() += 1;
        n += 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

#[tokio::test]
async fn the_daemon_keeps_a_cluster_in_step_through_failover_resharding_and_a_killed_master() {
    let mut cluster = PrivateCluster::start().await;
    let db = TestDb::new("rc_e2e").await;
    db.exec(SCHEMA).await;
    db.exec("INSERT INTO categories VALUES (7, 'mugs')").await;
    db.exec(&format!(
        "INSERT INTO products SELECT i, 'mug-' || i, 7, 'Mug', 1, NULL FROM generate_series(1, {PRODUCTS}) i"
    ))
    .await;
    let prefix = unique("rc");
    let topic = format!("{prefix}.events");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::example(&db, &prefix, &topic)
        .redis_key("url", cluster.url())
        .redis_key("cluster", true)
        .redis_key("wait_replicas", 1)
        .write(dir.path());
    let log = dir.path().join("daemon.log");
    let mut daemon = Daemon::start_logging(&config, &[], &log);
    wait_streaming(&db, &format!("{}_d", db.name)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(Mutex::new(HashMap::new()));
    let writes = tokio::spawn(writer(
        db.url.clone(),
        cluster.url(),
        prefix.clone(),
        stop.clone(),
        committed.clone(),
    ));
    let first_port = cluster.urls()[0]
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let pause = || tokio::time::sleep(Duration::from_secs(1));
    pause().await;

    // 1. A replica takes over from its master (not the node in redis.url).
    let nodes = cluster.nodes();
    let replica = nodes
        .iter()
        .find(|n| {
            !n.master
                && nodes
                    .iter()
                    .any(|m| Some(&m.id) == n.of.as_ref() && m.port != first_port)
        })
        .unwrap()
        .clone();
    node_cli(replica.port, &["CLUSTER", "FAILOVER"]);
    support::wait::eventually("the replica promoted", Duration::from_secs(30), || async {
        cluster
            .nodes()
            .iter()
            .any(|n| n.id == replica.id && n.master)
    })
    .await;
    cluster.wait_healthy().await;
    pause().await;

    // 2. 2,000 slots move from one master to another while batches are applied.
    let masters: Vec<_> = cluster.nodes().into_iter().filter(|n| n.master).collect();
    let (from, to) = (masters[0].id.clone(), masters[1].id.clone());
    let resharded = tokio::task::spawn_blocking(move || {
        cluster_cli(
            first_port,
            &[
                "reshard",
                "{node}",
                "--cluster-from",
                &from,
                "--cluster-to",
                &to,
                "--cluster-slots",
                "2000",
                "--cluster-yes",
            ],
        )
    })
    .await
    .unwrap();
    assert!(resharded.contains("Moving slot"), "{resharded}");
    cluster.wait_healthy().await;
    pause().await;

    // 3. SIGKILL of a master (not the node in redis.url); its replica takes over, and
    // the killed node comes back as a replica.
    let victim = cluster
        .nodes()
        .into_iter()
        .find(|n| n.master && n.port != first_port)
        .unwrap();
    cluster.kill(victim.port);
    support::wait::eventually(
        "a replica promoted for the killed master",
        Duration::from_secs(30),
        || async {
            // Three masters without the killed one: a replica has taken its slots. (Right
            // after the kill the dead node is still listed as a master that has not
            // failed; restarted then, it would come back as that master with what it
            // had on disk.)
            let nodes = cluster.nodes();
            nodes
                .iter()
                .filter(|n| n.master && !n.failed && n.id != victim.id)
                .count()
                == 3
        },
    )
    .await;
    cluster.restart(victim.port);
    cluster.wait_healthy().await;
    pause().await;
    stop.store(true, Ordering::Relaxed);
    writes.await.unwrap();

    // Every product key invalidated, every republished value equal to its row.
    let rows = db
        .client
        .query(
            "SELECT id, name, price::text FROM products ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let mut r = ClusterClient::new(cluster.urls())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut wrong = Vec::new();
        for row in &rows {
            let id: i32 = row.get(0);
            let want = serde_json::json!({"id": id, "name": row.get::<_, String>(1), "price": row.get::<_, String>(2)});
            let json: Option<String> = r
                .get(format!("{prefix}:shop:product:json:v3:{id}"))
                .await
                .unwrap();
            if json
                .as_deref()
                .map(|j| serde_json::from_str::<Value>(j).unwrap())
                != Some(want.clone())
            {
                wrong.push(format!("product {id}: republished {json:?}, row {want}"));
            }
            let stale: Option<String> = r
                .get(format!("{prefix}:shop:product:v3:{id}"))
                .await
                .unwrap();
            if let Some(stale) = stale {
                wrong.push(format!("product {id}: key still holds {stale:?}"));
            }
        }
        if wrong.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 60 s:\n{}\ndaemon log:\n{}",
            wrong.join("\n"),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every committed update has its event.
    let committed = committed.lock().unwrap().clone();
    let key_prefix = format!("{prefix}:shop:product:v3:");
    let count = move |events: &[Value]| {
        let mut per_id: HashMap<i32, u32> = HashMap::new();
        for e in events.iter().filter(|e| e["op"] == "update") {
            for k in e["keys"].as_array().into_iter().flatten() {
                if let Some(id) = k
                    .as_str()
                    .and_then(|k| k.strip_prefix(&key_prefix))
                    .and_then(|id| id.parse().ok())
                {
                    *per_id.entry(id).or_default() += 1;
                }
            }
        }
        per_id
    };
    let wanted = committed.clone();
    let counter = count.clone();
    let events = read_topic(&topic, move |events| {
        let seen = counter(events);
        wanted
            .iter()
            .all(|(id, n)| seen.get(id).copied().unwrap_or(0) >= *n)
    })
    .await;
    let seen = count(&events);
    for (id, n) in &committed {
        let got = seen.get(id).copied().unwrap_or(0);
        assert!(
            got >= *n,
            "product {id}: {n} updates committed, {got} events"
        );
    }
    assert!(committed.values().sum::<u32>() > 100, "{committed:?}");
    daemon.assert_running("after the cluster changes");
    daemon.stop();
}
