//! `deploy/local/services.sh`, for the tests that stop and start a service (they run
//! alone in their binary). `WAL2CACHE_TEST_SERVICES` names another services.sh (of
//! another checkout) to point them at services of their own, with the ports moved
//! (`WAL2CACHE_REDIS_PORT`, `WAL2CACHE_KAFKA_PORT`, and `WAL2CACHE_TEST_*` to match).

use std::process::Command;

/// Runs `services.sh args`, failing the test if it fails.
#[allow(dead_code)]
pub fn services(args: &[&str]) {
    let script = std::env::var("WAL2CACHE_TEST_SERVICES").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/services.sh").into()
    });
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `service` again when dropped: a test that fails while it is stopped leaves
/// it running for the next. `std::mem::forget` it once the test started it itself.
#[allow(dead_code)]
pub struct StartAgain(pub &'static str);

impl Drop for StartAgain {
    fn drop(&mut self) {
        services(&["start", self.0]);
    }
}
