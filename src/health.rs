//! What an operator asks of a running daemon: is it the active instance, is it
//! streaming, how far behind is it, are its sinks and its slot well. The stream, the
//! sinks and the pipeline report here as they go (per session, per retry, per batch:
//! never per change); `/healthz`, `/readyz`, `/status` and the gauges read it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::lsn::Lsn;
use crate::sink::Position;

/// Which instance this is among daemons sharing one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Started, not yet streaming nor refused the slot.
    Starting,
    /// Another process holds the slot: this one waits to take over.
    Standby,
    /// This one holds the slot.
    Active,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Starting, Role::Standby, Role::Active];

    pub fn label(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Standby => "standby",
            Role::Active => "active",
        }
    }
}

/// The slot as last polled from the database (see `source::monitor`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotReport {
    pub server_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    pub confirmed_lsn: Option<Lsn>,
    pub wal_status: Option<String>,
    /// `safe_wal_size`: bytes the server may still write before the slot is
    /// invalidated; `None` without `max_slot_wal_keep_size`.
    pub safe_wal_bytes: Option<i64>,
    /// The backend that streams from the slot, if any.
    pub active_pid: Option<i32>,
    pub exists: bool,
}

impl SlotReport {
    /// WAL the server keeps for the slot: its LSN minus the slot's restart LSN.
    pub fn retained_bytes(&self) -> Option<u64> {
        Some(self.server_lsn?.0.saturating_sub(self.restart_lsn?.0))
    }

    /// WAL not yet confirmed: the server's LSN minus the slot's confirmed LSN.
    pub fn lag_bytes(&self) -> Option<u64> {
        Some(self.server_lsn?.0.saturating_sub(self.confirmed_lsn?.0))
    }
}

#[derive(Debug, Clone)]
struct SinkState {
    name: &'static str,
    healthy: bool,
    failing_since: Option<SystemTime>,
    last_error: Option<String>,
}

#[derive(Debug, Clone)]
struct Reloaded {
    at: SystemTime,
    result: Result<usize, String>,
}

#[derive(Debug)]
struct State {
    role: Role,
    streaming: bool,
    /// Why the stream is not streaming, when it is not.
    stream_error: Option<String>,
    position: Option<watch::Receiver<Position>>,
    /// When a batch was last handed to the sinks: the reader had something to do.
    dispatched_at: Option<Instant>,
    sinks: Vec<SinkState>,
    slot: Option<SlotReport>,
    slot_polled_at: Option<SystemTime>,
    slot_error: Option<String>,
    rules: usize,
    reloaded: Option<Reloaded>,
    /// The monitor's last round: proof that the runtime and its tasks run.
    tick: Instant,
}

/// The daemon's state for operators; one per `run`, shared.
#[derive(Debug)]
pub struct Health {
    name: String,
    slot: String,
    rules_file: String,
    ready_max_lag: Duration,
    started: Instant,
    started_at: SystemTime,
    state: Mutex<State>,
}

/// The stream idle this long with nothing in flight is caught up: its lag is 0.
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// No monitor round for this long: the process is not healthy.
const TICK_STALE: Duration = Duration::from_secs(15);

/// Whether the instance should receive traffic, and why not.
#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    pub ready: bool,
    pub role: Role,
    pub failing: Vec<String>,
}

impl Health {
    pub fn new(name: &str, slot: &str, rules_file: &str, ready_max_lag: Duration) -> Arc<Health> {
        let health = Arc::new(Health {
            name: name.into(),
            slot: slot.into(),
            rules_file: rules_file.into(),
            ready_max_lag,
            started: Instant::now(),
            started_at: SystemTime::now(),
            state: Mutex::new(State {
                role: Role::Starting,
                streaming: false,
                stream_error: None,
                position: None,
                dispatched_at: None,
                sinks: ["redis", "kafka"]
                    .into_iter()
                    .map(|name| SinkState {
                        name,
                        healthy: true,
                        failing_since: None,
                        last_error: None,
                    })
                    .collect(),
                slot: None,
                slot_polled_at: None,
                slot_error: None,
                rules: 0,
                reloaded: None,
                tick: Instant::now(),
            }),
        });
        health.publish();
        health
    }

    /// Sets every gauge from the state: at start, and again once the metrics recorder
    /// is installed (gauges set before it went nowhere).
    pub fn publish(&self) {
        let (role, streaming, sinks) = {
            let s = self.state();
            let sinks: Vec<_> = s.sinks.iter().map(|k| (k.name, k.healthy)).collect();
            (s.role, s.streaming, sinks)
        };
        self.publish_role(role);
        metrics::gauge!("wal2cache_up").set(1.0);
        metrics::gauge!("wal2cache_streaming").set(if streaming { 1.0 } else { 0.0 });
        for (sink, healthy) in sinks {
            metrics::gauge!("wal2cache_sink_healthy", "sink" => sink).set(if healthy {
                1.0
            } else {
                0.0
            });
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_role(&self, role: Role) {
        for r in Role::ALL {
            metrics::gauge!("wal2cache_role", "role" => r.label()).set(if r == role {
                1.0
            } else {
                0.0
            });
        }
    }

    /// The stream started a session on the slot: this instance is the active one.
    pub fn streaming(&self) {
        let changed = {
            let mut s = self.state();
            let changed = s.role != Role::Active;
            s.role = Role::Active;
            s.streaming = true;
            s.stream_error = None;
            changed
        };
        if changed {
            self.publish_role(Role::Active);
            systemd::notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&format!(
                    "active: streaming from replication slot {:?}",
                    self.slot
                )),
            ]);
        }
        metrics::gauge!("wal2cache_streaming").set(1.0);
    }

    /// The session ended with `error`; `standby` when another process holds the slot.
    pub fn not_streaming(&self, error: &str, standby: bool) {
        let (role, was) = {
            let mut s = self.state();
            let was = s.role;
            s.streaming = false;
            s.stream_error = Some(error.to_string());
            if standby {
                s.role = Role::Standby;
            }
            (s.role, was)
        };
        self.publish_role(role);
        metrics::gauge!("wal2cache_streaming").set(0.0);
        if role == Role::Standby && was != Role::Standby {
            // Started as far as a service manager is concerned: waiting is its job.
            systemd::notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&format!(
                    "standby: another process holds replication slot {:?}; taking over when it is free",
                    self.slot
                )),
            ]);
        }
    }

    pub fn role(&self) -> Role {
        self.state().role
    }

    /// The pipeline of this stream life: where it stands.
    pub fn watch_position(&self, position: watch::Receiver<Position>) {
        self.state().position = Some(position);
    }

    /// A batch went to the sinks.
    pub fn dispatched(&self) {
        self.state().dispatched_at = Some(Instant::now());
    }

    /// A handle for one sink's reports.
    pub fn sink(self: &Arc<Self>, name: &'static str) -> SinkHealth {
        SinkHealth {
            health: self.clone(),
            name,
        }
    }

    pub fn rules_loaded(&self, count: usize) {
        self.state().rules = count;
    }

    /// A SIGHUP's outcome: the rule count, or why the old rules stay.
    pub fn reloaded(&self, result: Result<usize, String>) {
        let mut s = self.state();
        if let Ok(n) = result {
            s.rules = n;
        }
        s.reloaded = Some(Reloaded {
            at: SystemTime::now(),
            result,
        });
    }

    /// The slot as polled now, or why it could not be.
    pub fn slot_polled(&self, slot: Result<SlotReport, String>) {
        let mut s = self.state();
        match slot {
            Ok(report) => {
                let retained = report.retained_bytes();
                metrics::gauge!("wal2cache_slot_retained_wal_bytes")
                    .set(retained.unwrap_or(0) as f64);
                // NaN without max_slot_wal_keep_size: no limit, not "0 bytes left".
                metrics::gauge!("wal2cache_slot_safe_wal_bytes")
                    .set(report.safe_wal_bytes.map_or(f64::NAN, |b| b as f64));
                s.slot = Some(report);
                s.slot_polled_at = Some(SystemTime::now());
                s.slot_error = None;
            }
            Err(e) => s.slot_error = Some(e),
        }
    }

    /// One round of the monitor: the lag gauge, and proof of life (to systemd's
    /// watchdog too, when the unit has `WatchdogSec`).
    pub fn tick(&self) {
        let lag = {
            let mut s = self.state();
            s.tick = Instant::now();
            lag_seconds(&s)
        };
        metrics::gauge!("wal2cache_replication_lag_seconds").set(lag);
        if systemd::watchdog() {
            systemd::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }

    /// `/healthz`: the runtime and its tasks run (the monitor's rounds arrive).
    pub fn alive(&self) -> Result<(), String> {
        let since = self.state().tick.elapsed();
        if since > TICK_STALE {
            return Err(format!(
                "the monitor task last ran {}s ago: the daemon's tasks are stuck",
                since.as_secs()
            ));
        }
        Ok(())
    }

    /// `/readyz`: active, streaming, both sinks healthy, lag under
    /// `metrics.ready_max_lag`.
    pub fn readiness(&self) -> Readiness {
        let s = self.state();
        let mut failing = Vec::new();
        match s.role {
            Role::Active => {}
            Role::Standby => failing.push(format!(
                "standby: another process holds replication slot {:?}",
                self.slot
            )),
            Role::Starting => failing.push("starting: not streaming yet".into()),
        }
        if s.role == Role::Active && !s.streaming {
            failing.push(format!(
                "not streaming: {}",
                s.stream_error.as_deref().unwrap_or("reconnecting")
            ));
        }
        for sink in &s.sinks {
            if !sink.healthy {
                failing.push(format!(
                    "{} failing: {}",
                    sink.name,
                    sink.last_error.as_deref().unwrap_or("retrying")
                ));
            }
        }
        let lag = lag_seconds(&s);
        if lag > self.ready_max_lag.as_secs_f64() {
            failing.push(format!(
                "lag {lag:.1}s is over metrics.ready_max_lag ({}s)",
                self.ready_max_lag.as_secs_f64()
            ));
        }
        Readiness {
            ready: failing.is_empty(),
            role: s.role,
            failing,
        }
    }

    /// `/status`: everything above, for people and scripts.
    pub fn status(&self) -> Value {
        let ready = self.readiness();
        let s = self.state();
        let position = s.position.as_ref().map(|p| *p.borrow());
        let sinks: serde_json::Map<String, Value> = s
            .sinks
            .iter()
            .map(|k| {
                (
                    k.name.to_string(),
                    json!({
                        "healthy": k.healthy,
                        "failing_since": k.failing_since.map(rfc3339),
                        "last_error": k.last_error,
                    }),
                )
            })
            .collect();
        let slot = s.slot.as_ref().map(|r| {
            json!({
                "exists": r.exists,
                "server_lsn": r.server_lsn.map(|l| l.to_string()),
                "confirmed_lsn": r.confirmed_lsn.map(|l| l.to_string()),
                "restart_lsn": r.restart_lsn.map(|l| l.to_string()),
                "lag_bytes": r.lag_bytes(),
                "retained_wal_bytes": r.retained_bytes(),
                "safe_wal_bytes": r.safe_wal_bytes,
                "wal_status": r.wal_status,
                "active_pid": r.active_pid,
            })
        });
        json!({
            "name": self.name,
            "version": env!("CARGO_PKG_VERSION"),
            "role": s.role.label(),
            "ready": ready.ready,
            "failing": ready.failing,
            "streaming": s.streaming,
            "stream_error": s.stream_error,
            "slot_name": self.slot,
            "slot": slot,
            "slot_polled_at": s.slot_polled_at.map(rfc3339),
            "slot_error": s.slot_error,
            "confirmed_lsn": position.map(|p| p.confirmed.to_string()),
            "last_commit_applied": position
                .and_then(|p| p.applied_commit_time)
                .map(crate::pgtime::PgTime)
                .map(|t| t.to_string()),
            "lag_seconds": lag_seconds(&s),
            "lag_bytes": s.slot.as_ref().and_then(SlotReport::lag_bytes),
            "sinks": sinks,
            "rules": {
                "count": s.rules,
                "file": self.rules_file,
                "last_reload": s.reloaded.as_ref().map(|r| json!({
                    "at": rfc3339(r.at),
                    "ok": r.result.is_ok(),
                    "error": r.result.as_ref().err(),
                })),
            },
            "started_at": rfc3339(self.started_at),
            "uptime_seconds": self.started.elapsed().as_secs(),
        })
    }
}

/// While work is in flight: now minus the commit time of the oldest batch not yet
/// applied everywhere (a sink that stopped applying shows as a growing lag, even with
/// nothing applied since the start; a change held up after a quiet hour is as old as
/// it is, not as old as the last one applied). Otherwise, for a second after the
/// reader was busy: now minus the commit time of the newest change applied. 0 when the
/// stream is idle and caught up (a lag that stays at its last value while nothing
/// happens would alert on a quiet database).
fn lag_seconds(s: &State) -> f64 {
    let Some(position) = s.position.as_ref().map(|p| *p.borrow()) else {
        return 0.0;
    };
    let recent = s.dispatched_at.is_some_and(|t| t.elapsed() < IDLE_AFTER);
    let commit_time = if position.busy {
        position
            .pending_commit_time
            .or(position.applied_commit_time)
    } else if recent {
        position.applied_commit_time
    } else {
        return 0.0;
    };
    commit_time
        .and_then(crate::pgtime::since_pg_time)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// systemd's `Type=notify` protocol: READY=1 once streaming or on standby, STATUS=,
/// WATCHDOG=1 from the monitor, RELOADING=1 / STOPPING=1. Nothing without
/// `NOTIFY_SOCKET` (not under systemd).
pub mod systemd {
    use std::sync::OnceLock;

    pub use sd_notify::NotifyState;

    pub fn notify(states: &[NotifyState<'_>]) {
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            if let Err(e) = sd_notify::notify(false, states) {
                tracing::debug!("sd_notify: {e}");
            }
        }
    }

    /// The unit asks for watchdog pings: `WATCHDOG_USEC` set, and `WATCHDOG_PID`
    /// this process or unset (as libsystemd's `sd_watchdog_enabled` reads them; the
    /// crate's version wants the PID).
    pub fn watchdog() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            let usec = std::env::var("WATCHDOG_USEC")
                .ok()
                .and_then(|u| u.parse::<u64>().ok());
            let pid = std::env::var("WATCHDOG_PID").ok();
            usec.is_some_and(|u| u > 0) && pid.is_none_or(|p| p.parse() == Ok(std::process::id()))
        })
    }
}

/// One sink's reports: failing (with the error, one line) or well again.
#[derive(Debug, Clone)]
pub struct SinkHealth {
    health: Arc<Health>,
    name: &'static str,
}

impl SinkHealth {
    pub fn failing(&self, error: &str) {
        {
            let mut s = self.health.state();
            if let Some(k) = s.sinks.iter_mut().find(|k| k.name == self.name) {
                k.healthy = false;
                k.failing_since.get_or_insert_with(SystemTime::now);
                k.last_error = Some(error.to_string());
            }
        }
        metrics::gauge!("wal2cache_sink_healthy", "sink" => self.name).set(0.0);
    }

    pub fn ok(&self) {
        {
            let mut s = self.health.state();
            if let Some(k) = s.sinks.iter_mut().find(|k| k.name == self.name) {
                k.healthy = true;
                k.failing_since = None;
            }
        }
        metrics::gauge!("wal2cache_sink_healthy", "sink" => self.name).set(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Arc<Health> {
        Health::new("main", "w2c", "rules.toml", Duration::from_secs(30))
    }

    #[test]
    fn a_standby_is_not_ready_and_says_so() {
        let h = health();
        h.not_streaming("replication slot \"w2c\" is in use", true);
        let r = h.readiness();
        assert!(!r.ready);
        assert_eq!(r.role, Role::Standby);
        assert!(r.failing[0].starts_with("standby"), "{:?}", r.failing);
    }

    #[test]
    fn active_streaming_and_healthy_is_ready_until_a_sink_fails() {
        let h = health();
        assert!(!h.readiness().ready, "starting is not ready");
        h.streaming();
        assert!(h.readiness().ready, "{:?}", h.readiness());
        let redis = h.sink("redis");
        redis.failing("connection refused");
        let r = h.readiness();
        assert!(!r.ready);
        assert_eq!(
            r.failing,
            vec!["redis failing: connection refused".to_string()]
        );
        redis.ok();
        assert!(h.readiness().ready);
        h.not_streaming("connection reset", false);
        let r = h.readiness();
        assert_eq!(r.role, Role::Active);
        assert_eq!(
            r.failing,
            vec!["not streaming: connection reset".to_string()]
        );
    }

    #[test]
    fn lag_is_the_applied_commit_age_while_busy_and_zero_when_idle() {
        let h = health();
        h.streaming();
        let hour_ago = crate::pgtime::pg_now() - 3_600_000_000;
        let (tx, rx) = watch::channel(Position {
            confirmed: Lsn(10),
            applied_commit_time: Some(hour_ago),
            pending_commit_time: None,
            busy: true,
        });
        h.watch_position(rx);
        let r = h.readiness();
        assert!(!r.ready);
        assert!(r.failing[0].starts_with("lag 3600"), "{:?}", r.failing);
        tx.send_modify(|p| p.busy = false);
        // Idle, nothing dispatched within the last second: caught up.
        assert!(h.readiness().ready, "{:?}", h.readiness());
        h.dispatched();
        assert!(!h.readiness().ready, "reading again: the lag counts");
    }

    #[test]
    fn while_busy_the_lag_is_the_oldest_pending_commit_age() {
        let h = health();
        h.streaming();
        let now = crate::pgtime::pg_now();
        // Nothing applied since the start, a batch an hour old in flight: behind.
        let (tx, rx) = watch::channel(Position {
            confirmed: Lsn(10),
            applied_commit_time: None,
            pending_commit_time: Some(now - 3_600_000_000),
            busy: true,
        });
        h.watch_position(rx);
        let r = h.readiness();
        assert!(r.failing[0].starts_with("lag 3600"), "{:?}", r.failing);
        // After a quiet hour, a change held up for a moment: that moment.
        tx.send_modify(|p| {
            p.applied_commit_time = Some(now - 3_600_000_000);
            p.pending_commit_time = Some(now - 500_000);
        });
        assert!(h.readiness().ready, "{:?}", h.readiness());
    }

    #[test]
    fn status_has_what_an_operator_asks() {
        let h = health();
        h.streaming();
        h.rules_loaded(3);
        h.reloaded(Err("rules.toml: bad".into()));
        h.slot_polled(Ok(SlotReport {
            server_lsn: Some(Lsn(1000)),
            restart_lsn: Some(Lsn(400)),
            confirmed_lsn: Some(Lsn(900)),
            wal_status: Some("reserved".into()),
            safe_wal_bytes: None,
            active_pid: Some(42),
            exists: true,
        }));
        let s = h.status();
        assert_eq!(s["role"], "active");
        assert_eq!(s["slot"]["retained_wal_bytes"], 600);
        assert_eq!(s["lag_bytes"], 100);
        assert_eq!(s["rules"]["count"], 3);
        assert_eq!(s["rules"]["last_reload"]["ok"], false);
        assert_eq!(s["sinks"]["kafka"]["healthy"], true);
        assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    }
}
