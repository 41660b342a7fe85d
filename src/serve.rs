//! The daemon's HTTP listener (`metrics.listen`), for operators and their tools:
//! `GET /metrics` in the Prometheus text format; `GET /healthz` (the process and its
//! tasks run), `GET /readyz` (active, streaming, sinks healthy, lag under
//! `metrics.ready_max_lag`; otherwise 503 saying which fails) and `GET /status` (JSON
//! for people and scripts), from [`Health`]. 404 for every other path.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::MetricsConfig;
use crate::error::Error;
use crate::health::Health;

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: PrometheusHandle,
    pub health: Arc<Health>,
}

/// The paths served: what probes and scrapers may point at.
pub const PATHS: [&str; 4] = ["/metrics", "/healthz", "/readyz", "/status"];

/// The routes of the listener; any other path is 404, another method on a known path
/// 405.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .fallback(not_found)
        .with_state(state)
}

fn json_response(code: StatusCode, body: serde_json::Value) -> axum::response::Response {
    let mut text = body.to_string();
    text.push('\n');
    (code, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

async fn healthz(State(state): State<HttpState>) -> axum::response::Response {
    match state.health.alive() {
        Ok(()) => json_response(StatusCode::OK, serde_json::json!({"alive": true})),
        Err(why) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"alive": false, "failing": [why]}),
        ),
    }
}

async fn readyz(State(state): State<HttpState>) -> axum::response::Response {
    let r = state.health.readiness();
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        code,
        serde_json::json!({"ready": r.ready, "role": r.role.label(), "failing": r.failing}),
    )
}

async fn status(State(state): State<HttpState>) -> axum::response::Response {
    json_response(StatusCode::OK, state.health.status())
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        "not found: try GET /metrics, /healthz, /readyz or /status\n",
    )
}

/// Upper bounds (seconds) of the buckets of every histogram the daemon exports
/// (`wal2cache_commit_to_redis_seconds`, `wal2cache_commit_to_kafka_seconds`,
/// `wal2cache_batch_seconds`, `wal2cache_redis_wait_seconds`): fine from a quarter of a
/// millisecond to 30 ms, where a healthy daemon's latencies fall, then coarser up to
/// five minutes, for a catch-up.
///
/// Histograms, not summaries: a histogram counts every sample into fixed buckets, adds
/// up across instances and gives quantiles over any window at query time
/// (`histogram_quantile`). The exporter's summaries kept a rolling sketch per 20 s
/// bucket and dropped the samples of a drain older than its newest one when no bucket
/// was open yet (the first drain after start or after an idle minute: at a burst after
/// a quiet time, most of the burst). Draining a sample into a summary also cost about
/// 570 instructions against 170 into the buckets: in the tag-heavy catch-up
/// (`benches/catchup.rs`, two samples per change) 3.5% of the daemon's instructions.
pub const SECONDS_BUCKETS: [f64; 25] = [
    0.000_25, 0.000_5, 0.001, 0.001_5, 0.002, 0.003, 0.005, 0.007_5, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The exporter's settings: histograms with `SECONDS_BUCKETS`.
fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets(&SECONDS_BUCKETS)
        .expect("the bucket list is not empty")
}

/// The Prometheus recorder this process installed, once.
static RECORDER: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// The process's Prometheus recorder: installed as the global recorder the first time,
/// the same one after. The binary starts once per process; the tests and benches run
/// the daemon (`app::run`) several times in one process, and a global recorder cannot
/// be installed twice: each later start reuses the first one (its counters go on from
/// where the earlier runs left them, as they would in one process).
fn recorder() -> Result<PrometheusHandle, Error> {
    let mut installed = RECORDER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = builder().install_recorder().map_err(|e| Error::Io {
        context: "installing the Prometheus recorder".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Binds `metrics.listen` (when set), installs the Prometheus recorder (see
/// `recorder`) and serves in the background for as long as the process runs. A port
/// that cannot be bound is an error naming `metrics.listen`.
pub async fn start(config: &MetricsConfig, health: Arc<Health>) -> Result<(), Error> {
    let Some(addr) = config.listen else {
        return Ok(());
    };
    let listener = bind(addr).await?;
    let handle = recorder()?;
    describe();
    health.publish();
    // Histograms are drained into their summaries by upkeep; without it they grow.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let app = router(HttpState {
        metrics: handle,
        health,
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(%addr, "the metrics listener stopped: {e}; /metrics, /healthz, /readyz and /status are not served until wal2cache restarts");
        }
    });
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz and /status");
    Ok(())
}

/// Every metric the daemon exports, registered with its help text at start, so that a
/// scrape shows each one (at 0) before anything happened: dashboards and alerts see a
/// series, not a gap.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("wal2cache_up", "1 while the daemon runs");
    describe_gauge!(
        "wal2cache_role",
        "1 for this instance's role (active, standby, starting), 0 for the others"
    );
    describe_gauge!(
        "wal2cache_streaming",
        "1 while the replication stream is connected"
    );
    describe_gauge!("wal2cache_replication_lag_seconds", Unit::Seconds, "now minus the commit time of the newest change applied to every sink; 0 when idle and caught up");
    describe_gauge!(
        "wal2cache_slot_retained_wal_bytes",
        Unit::Bytes,
        "WAL the server keeps for the slot: its current LSN minus the slot's restart_lsn (polled)"
    );
    describe_gauge!("wal2cache_slot_safe_wal_bytes", Unit::Bytes, "safe_wal_size of the slot: WAL the server may write before it invalidates the slot (NaN without max_slot_wal_keep_size, 0 before the first poll)");
    describe_gauge!(
        "wal2cache_confirmed_lsn",
        "the last LSN confirmed to PostgreSQL, as a number"
    );
    describe_gauge!(
        "wal2cache_sink_healthy",
        "1 while the sink applies batches, 0 while it retries"
    );
    describe_counter!(
        "wal2cache_changes_applied_total",
        "row changes applied to every sink"
    );
    describe_counter!("wal2cache_sink_batches_total", "batches a sink applied");
    describe_counter!(
        "wal2cache_sink_items_total",
        "changes (plans) in the batches a sink applied"
    );
    describe_counter!(
        "wal2cache_sink_errors_total",
        "failed sink attempts, by kind: retry (transient, retried) or stop (the daemon stops)"
    );
    describe_counter!("wal2cache_sink_retries_total", "batches retried by a sink");
    describe_counter!(
        "wal2cache_backfill_rows_total",
        "rows a backfill (rules.backfill = \"new\") read, by table"
    );
    describe_gauge!(
        "wal2cache_backfill_progress",
        "rows read over rows expected (0 to 1) of the backfill of a rule (rules.backfill = \"new\")"
    );
    describe_counter!(
        "wal2cache_redis_refused_total",
        "versioned writes Redis refused because it held that version or a newer one (replays after a restart, backfilled rows the stream wrote first)"
    );
    describe_counter!(
        "wal2cache_slot_losses_total",
        "times changes may have been missed (slot lost), by reason"
    );
    describe_counter!(
        "wal2cache_visibility_waits_total",
        "batches held back because a transaction in them was committed in the WAL but not yet visible to other sessions"
    );
    describe_counter!(
        "wal2cache_reload_failures_total",
        "SIGHUP reloads refused (the old rules stay)"
    );
    describe_counter!(
        "wal2cache_rule_plans_total",
        "changes a rule produced something for"
    );
    describe_counter!(
        "wal2cache_rule_keys_total",
        "keys a rule produced (deleted or republished)"
    );
    describe_counter!(
        "wal2cache_rule_null_keys_total",
        "keys a rule skipped because a placeholder was NULL"
    );
    describe_histogram!(
        "wal2cache_commit_to_redis_seconds",
        Unit::Seconds,
        "commit in PostgreSQL to applied in Redis"
    );
    describe_histogram!(
        "wal2cache_commit_to_kafka_seconds",
        Unit::Seconds,
        "commit in PostgreSQL to acknowledged by the brokers"
    );
    describe_histogram!(
        "wal2cache_batch_seconds",
        Unit::Seconds,
        "time a sink took to apply a batch"
    );
    metrics::counter!("wal2cache_redis_refused_total").increment(0);
    for sink in ["redis", "kafka"] {
        metrics::counter!("wal2cache_sink_batches_total", "sink" => sink).increment(0);
        metrics::counter!("wal2cache_sink_items_total", "sink" => sink).increment(0);
        metrics::counter!("wal2cache_sink_retries_total", "sink" => sink).increment(0);
        for kind in ["retry", "stop"] {
            metrics::counter!("wal2cache_sink_errors_total", "sink" => sink, "kind" => kind)
                .increment(0);
        }
        let _ = metrics::histogram!("wal2cache_batch_seconds", "sink" => sink);
    }
    for reason in crate::source::identity::LossReason::ALL {
        metrics::counter!("wal2cache_slot_losses_total", "reason" => reason.label()).increment(0);
    }
    metrics::counter!("wal2cache_changes_applied_total").increment(0);
    metrics::counter!("wal2cache_reload_failures_total").increment(0);
    metrics::counter!("wal2cache_visibility_waits_total").increment(0);
    metrics::gauge!("wal2cache_replication_lag_seconds").set(0.0);
    metrics::gauge!("wal2cache_slot_retained_wal_bytes").set(0.0);
    metrics::gauge!("wal2cache_slot_safe_wal_bytes").set(0.0);
}

/// The listener for `addr`, or an error that names `metrics.listen`.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            context: format!(
                "cannot listen on metrics.listen = \"{addr}\" (is another process using the port?): choose a free address in metrics.listen (or WAL2CACHE__METRICS__LISTEN), or remove it to serve no metrics"
            ),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Arc<Health> {
        Health::new("t", "slot", "rules.toml", Duration::from_secs(30))
    }

    #[tokio::test]
    async fn a_port_in_use_is_an_error_naming_metrics_listen() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err().to_string();
        assert!(
            err.contains("metrics.listen") && err.contains(&addr.to_string()),
            "{err}"
        );
    }

    /// Every sample lands in its bucket, also the ones of a burst drained together
    /// (the exporter's summaries dropped the older samples of a first drain).
    #[test]
    fn latencies_are_histograms_that_count_every_sample() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let h = metrics::histogram!("wal2cache_commit_to_redis_seconds");
            for i in 0..1000 {
                // 0.1 ms .. 100 ms
                h.record(f64::from(i + 1) / 10_000.0);
            }
        });
        handle.run_upkeep();
        let text = handle.render();
        let value = |series: &str| -> f64 {
            let line = text
                .lines()
                .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
                .unwrap_or_else(|| panic!("no {series} in\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(
            text.contains("# TYPE wal2cache_commit_to_redis_seconds histogram"),
            "{text}"
        );
        assert!(!text.contains("quantile="), "{text}");
        assert_eq!(value("wal2cache_commit_to_redis_seconds_count"), 1000.0);
        // Samples <= 1 ms: 10; <= 10 ms: 100; <= 30 ms: 300; all of them by +Inf.
        assert_eq!(
            value("wal2cache_commit_to_redis_seconds_bucket{le=\"0.001\"}"),
            10.0
        );
        assert_eq!(
            value("wal2cache_commit_to_redis_seconds_bucket{le=\"0.01\"}"),
            100.0
        );
        assert_eq!(
            value("wal2cache_commit_to_redis_seconds_bucket{le=\"0.03\"}"),
            300.0
        );
        assert_eq!(
            value("wal2cache_commit_to_redis_seconds_bucket{le=\"+Inf\"}"),
            1000.0
        );
    }

    #[test]
    fn the_buckets_rise() {
        assert!(SECONDS_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn a_second_start_in_the_same_process_reuses_the_recorder() {
        for _ in 0..2 {
            let config = MetricsConfig {
                listen: Some("127.0.0.1:0".parse().unwrap()),
                ..MetricsConfig::default()
            };
            start(&config, health()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn only_the_operator_paths_are_served() {
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(HttpState {
            metrics: handle,
            health: health(),
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let status = |method: &'static str, path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out.split(' ').nth(1).unwrap().parse::<u16>().unwrap()
        };
        for path in PATHS {
            assert_ne!(status("GET", path).await, 404, "{path} is served");
        }
        assert_eq!(status("GET", "/metrics").await, 200);
        assert_eq!(status("GET", "/healthz").await, 200);
        // Starting: not ready yet.
        assert_eq!(status("GET", "/readyz").await, 503);
        assert_eq!(status("GET", "/status").await, 200);
        assert_eq!(status("POST", "/readyz").await, 405);
        assert_eq!(status("GET", "/nope").await, 404);
        assert_eq!(status("GET", "/").await, 404);
        assert_eq!(status("POST", "/metrics").await, 405);
    }
}
