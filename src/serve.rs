//! The daemon's HTTP listener (`metrics.listen`): `GET /metrics` in the Prometheus
//! text format, 404 for every other path. Routes are added in `router`.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::MetricsConfig;
use crate::error::Error;

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: PrometheusHandle,
}

/// The routes of the listener; any other path is 404, another method on a known path
/// 405.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found: try GET /metrics\n")
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
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| Error::Io {
            context: "installing the Prometheus recorder".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Binds `metrics.listen` (when set), installs the Prometheus recorder (see
/// `recorder`) and serves in the background for as long as the process runs. A port
/// that cannot be bound is an error naming `metrics.listen`.
pub async fn start(config: &MetricsConfig) -> Result<(), Error> {
    let Some(addr) = config.listen else {
        return Ok(());
    };
    let listener = bind(addr).await?;
    let handle = recorder()?;
    // Histograms are drained into their summaries by upkeep; without it they grow.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let app = router(HttpState { metrics: handle });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(%addr, "the metrics listener stopped: {e}; /metrics is not served until wal2cache restarts");
        }
    });
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
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

    #[tokio::test]
    async fn a_second_start_in_the_same_process_reuses_the_recorder() {
        for _ in 0..2 {
            let config = MetricsConfig {
                listen: Some("127.0.0.1:0".parse().unwrap()),
            };
            start(&config).await.unwrap();
        }
    }

    #[tokio::test]
    async fn only_get_metrics_is_served() {
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(HttpState { metrics: handle });
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
        assert_eq!(status("GET", "/metrics").await, 200);
        assert_eq!(status("GET", "/nope").await, 404);
        assert_eq!(status("GET", "/").await, 404);
        assert_eq!(status("POST", "/metrics").await, 405);
    }
}
