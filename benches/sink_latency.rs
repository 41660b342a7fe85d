//! The sinks alone, without the daemon: what the broker and Redis cost per change, to
//! tell the daemon's own latency from theirs (see benches/latency.rs).
//!
//!     cargo bench --bench sink_latency
//!     W2C_BENCH_LINGERS=0,1 W2C_BENCH_SECONDS=5 cargo bench --bench sink_latency
//!
//! 1. Kafka produce -> acknowledgement: an rdkafka `FutureProducer` configured as the
//!    daemon's (idempotent, `message.timeout.ms=30000`) sends one ~400-byte event at a
//!    time on a fixed schedule of `W2C_BENCH_RATE` (2,000) per second for
//!    `W2C_BENCH_SECONDS` (5), round-robin over 3 partitions, once per `linger.ms` in
//!    `W2C_BENCH_LINGERS` (`0,1,5`); prints send -> delivery report percentiles.
//! 2. Kafka acknowledged vs stored: `W2C_BENCH_BURST` (20,000) events sent at once,
//!    every delivery report awaited; then the sum of the partitions' high watermarks
//!    right away and 2 s later, and how many a consumer reads back (from the start,
//!    past the watermarks, until nothing came for 2 s). Tansu 0.6.0 reports a
//!    partition's high watermark as the base offset of its last batch: the
//!    watermarks fall short by the last batch of each partition while a consumer
//!    reads every event.
//! 3. Redis: the commands the daemon pipelines for one change of the latency bench's
//!    rules (UNLINK of two keys, the versioned SET script, the tag purge script) sent
//!    one change at a time, on the same schedule; prints round-trip percentiles.
//!
//! Env: `WAL2CACHE_TEST_KAFKA`, `WAL2CACHE_TEST_REDIS`. Topics `w2cb-sink-<pid>-*`
//! are deleted at the end (where the broker can), Redis keys `w2cb_sink_<pid>*` too.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{env_usize, load_average, ms, percentile, thousands, BoxError};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use support::env::{kafka_brokers, redis_url};
use support::kafka::{consume_topic, create_topic, topic_watermarks};

const PARTITIONS: i32 = 3;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let topics: Arc<Mutex<Vec<String>>> = Arc::default();
    let prefix = format!("w2cb_sink_{}", std::process::id());
    let result = rt.block_on(async {
        tokio::select! {
            result = run(topics.clone(), &prefix) => result,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    rt.block_on(async {
        let names = topics.lock().unwrap().clone();
        for t in names {
            daemon::delete_topic_or_warn(&t).await;
        }
        let _ = daemon::cleanup_redis(&prefix).await;
    });
    if let Err(e) = result {
        eprintln!("sink_latency failed: {}", common::chain(&*e));
        std::process::exit(1);
    }
}

fn producer(linger_ms: &str) -> Result<FutureProducer, BoxError> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .set("linger.ms", linger_ms)
        .set("client.id", "w2c-bench-sink")
        .create()?)
}

/// A topic of the bench's own (deleted at the end).
async fn new_topic(topics: &Mutex<Vec<String>>, name: String) -> String {
    create_topic(&name, PARTITIONS).await;
    topics.lock().unwrap().push(name.clone());
    // Let the metadata settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    name
}

/// An event the size of the daemon's for the bench rules.
fn payload(i: usize) -> String {
    format!(
        r#"{{"schema":1,"kind":"invalidate","source":"bench-latency","lsn":"0/7739ED50","xid":{i},"commit_time":"2026-11-23T13:49:30.645341Z","table":"public.items","op":"update","keys":["w2cb_latency_1234:item:v1:{i}","w2cb_latency_1234:item:slug:v1:item-{i}","w2cb_latency_1234:item:json:v1:{i}"],"tags":["w2cb_latency_1234:category:{}"]}}"#,
        i % 50
    )
}

async fn run(topics: Arc<Mutex<Vec<String>>>, prefix: &str) -> Result<(), BoxError> {
    let rate = env_usize("W2C_BENCH_RATE", 2000).max(1);
    let seconds = env_usize("W2C_BENCH_SECONDS", 5).max(1);
    let burst = env_usize("W2C_BENCH_BURST", 20_000).max(1);
    let lingers = std::env::var("W2C_BENCH_LINGERS").unwrap_or_else(|_| "0,1,5".into());
    println!(
        "sink_latency: Kafka at {}, Redis at {}; load average {}",
        kafka_brokers(),
        redis_url(),
        load_average()
    );
    let pid = std::process::id();

    // 1. Produce -> ack at a fixed rate.
    for linger in lingers.split(',').map(str::trim).filter(|l| !l.is_empty()) {
        let topic = new_topic(&topics, format!("w2cb-sink-{pid}-paced-{linger}")).await;
        let p = producer(linger)?;
        // Warm up: metadata, connections, producer id.
        p.send(
            FutureRecord::to(&topic).key("warm").payload("warm"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
        let n = rate * seconds;
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let t0 = Instant::now() + Duration::from_millis(20);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sender = {
            let topic = topic.clone();
            let p = p.clone();
            tokio::spawn(async move {
                for i in 0..n {
                    tokio::time::sleep_until((t0 + period.mul_f64(i as f64)).into()).await;
                    let key = format!("k{i}");
                    let body = payload(i);
                    let sent = Instant::now();
                    let record = FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&body)
                        .partition((i % PARTITIONS as usize) as i32);
                    match p.send_result(record) {
                        Ok(delivery) => {
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                let ok = matches!(delivery.await, Ok(Ok(_)));
                                let _ = tx.send((sent.elapsed(), ok));
                            });
                        }
                        Err((e, _)) => return Err(format!("send: {e}")),
                    }
                }
                Ok(())
            })
        };
        sender.await??;
        let mut lat = Vec::with_capacity(n);
        let mut failed = 0;
        while lat.len() + failed < n {
            match tokio::time::timeout(Duration::from_secs(40), rx.recv()).await {
                Ok(Some((d, true))) => lat.push(d),
                Ok(Some((_, false))) => failed += 1,
                _ => break,
            }
        }
        lat.sort();
        println!(
            "Kafka produce->ack, linger.ms={linger:<2} at {rate}/s for {seconds} s: p50 {} p90 {} p99 {} p99.9 {} max {} ({} acked, {failed} failed)",
            ms(percentile(&lat, 0.5).as_secs_f64()),
            ms(percentile(&lat, 0.9).as_secs_f64()),
            ms(percentile(&lat, 0.99).as_secs_f64()),
            ms(percentile(&lat, 0.999).as_secs_f64()),
            ms(lat.last().copied().unwrap_or_default().as_secs_f64()),
            thousands(lat.len() as u64)
        );
    }

    // 2. Acknowledged vs stored.
    {
        let topic = new_topic(&topics, format!("w2cb-sink-{pid}-burst")).await;
        let p = producer("1")?;
        p.send(
            FutureRecord::to(&topic)
                .key("warm")
                .payload("warm")
                .partition(0),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
        let stored = |marks: Vec<(i32, i64, i64)>| -> i64 {
            marks.iter().map(|(_, lo, hi)| hi - lo).sum::<i64>() - 1
        };
        let t = Instant::now();
        let mut deliveries = Vec::with_capacity(burst);
        for i in 0..burst {
            let key = format!("k{i}");
            let body = payload(i);
            loop {
                match p.send_result(FutureRecord::to(&topic).key(&key).payload(&body)) {
                    Ok(d) => {
                        deliveries.push(d);
                        break;
                    }
                    Err((_, _)) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
        }
        let mut acked = 0i64;
        for d in deliveries {
            if matches!(d.await, Ok(Ok(_))) {
                acked += 1;
            }
        }
        let acked_after = t.elapsed();
        let at_once = stored(topic_watermarks(&topic).await);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let later = stored(topic_watermarks(&topic).await);
        drop(p);
        let (read, ends) = consume_topic(
            &topic,
            Duration::from_secs(2),
            Duration::from_secs(60),
            |_, _, _| {},
        )
        .await;
        let read = read as i64 - 1;
        println!(
            "Kafka burst of {} events: {} acked in {:.3} s; the high watermarks show {} right after the last ack, {} 2 s later; a consumer reads {} ({}); per partition (high watermark, end of what was read): {:?}",
            thousands(burst as u64),
            thousands(acked as u64),
            acked_after.as_secs_f64(),
            thousands(at_once.max(0) as u64),
            thousands(later.max(0) as u64),
            thousands(read.max(0) as u64),
            if read >= acked {
                "all stored".to_string()
            } else {
                format!("{} ACKNOWLEDGED EVENTS LOST", acked - read)
            },
            ends.iter().map(|(_, hi, n)| (*hi, *n)).collect::<Vec<_>>()
        );
    }

    // 3. Redis round trip per change.
    let mut r = support::store::redis().await;
    let republish = redis::Script::new(
        "local stored = redis.call('GET', KEYS[2])
         if stored and stored >= ARGV[1] then return 0 end
         redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
         redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[4])
         return 1",
    );
    let purge = redis::Script::new(
        "local members = redis.call('SMEMBERS', KEYS[1])
         for i = 1, #members, 500 do
           redis.call('UNLINK', unpack(members, i, math.min(i + 499, #members)))
         end
         redis.call('UNLINK', KEYS[1])
         return #members",
    );
    republish.load_async(&mut r).await?;
    purge.load_async(&mut r).await?;
    let n = rate * seconds;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let t0 = Instant::now() + Duration::from_millis(20);
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until((t0 + period.mul_f64(i as f64)).into()).await;
        let id = i % 10_000;
        let json = format!("{prefix}:item:json:v1:{id}");
        let mut pipe = redis::pipe();
        pipe.cmd("UNLINK")
            .arg(format!("{prefix}:item:v1:{id}"))
            .arg(format!("{prefix}:item:slug:v1:item-{id}"))
            .ignore();
        pipe.cmd("EVALSHA")
            .arg(republish.get_hash())
            .arg(2)
            .arg(&json)
            .arg(format!("{{{json}}}:w2c:v"))
            .arg(format!("{:024x}", i + 1))
            .arg(format!(
                r#"{{"id":{id},"name":"Item {id}","price":"12.34","stock":100}}"#
            ))
            .arg(3600)
            .arg(86400)
            .ignore();
        pipe.cmd("EVALSHA")
            .arg(purge.get_hash())
            .arg(1)
            .arg(format!("{prefix}:tag:{prefix}:category:{}", id % 50))
            .ignore();
        let s = Instant::now();
        pipe.query_async::<()>(&mut r).await?;
        lat.push(s.elapsed());
    }
    lat.sort();
    println!(
        "Redis one change's pipeline (UNLINK 2 keys, versioned SET script, tag purge script) at {rate}/s for {seconds} s: p50 {} p90 {} p99 {} p99.9 {} max {}",
        ms(percentile(&lat, 0.5).as_secs_f64()),
        ms(percentile(&lat, 0.9).as_secs_f64()),
        ms(percentile(&lat, 0.99).as_secs_f64()),
        ms(percentile(&lat, 0.999).as_secs_f64()),
        ms(lat.last().copied().unwrap_or_default().as_secs_f64()),
    );
    println!("load average at the end: {}", load_average());
    Ok(())
}
