//! Waiting for a condition with a deadline; never a bare sleep.

use std::future::Future;
use std::time::{Duration, Instant};

/// Waits until `check` holds, failing the test after `deadline`. Checks every 10 ms
/// for the first second (a cache eviction is quick), then every 50 ms (a database
/// asked for minutes is not asked 100 times a second).
#[allow(dead_code)]
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        let pause = if start.elapsed() < Duration::from_secs(1) {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(50)
        };
        tokio::time::sleep(pause).await;
    }
}
