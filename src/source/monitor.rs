//! The slot as the database sees it, read over an ordinary connection: by the daemon's
//! monitor (the slot gauges, `/status`) and by `wal2cache status`, which asks the
//! database whether wal2cache runs anywhere.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::health::{Health, SlotReport};
use crate::lsn::Lsn;
use crate::source::error::{pg, SourceError};
use crate::source::target::PgTarget;

/// The slot and the server's position; `exists = false` when there is no such slot.
pub async fn slot_report(client: &Client, slot: &str) -> Result<SlotReport, SourceError> {
    let row = client
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                          ELSE pg_current_wal_lsn() END)::text,
                    s.slot_name IS NOT NULL,
                    s.restart_lsn::text, s.confirmed_flush_lsn::text, s.wal_status,
                    s.safe_wal_size, s.active_pid
             FROM (SELECT 1) AS one
             LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg("reading the slot from pg_replication_slots"))?;
    let lsn = |i: usize| {
        row.get::<_, Option<String>>(i)
            .and_then(|s| s.parse::<Lsn>().ok())
    };
    Ok(SlotReport {
        server_lsn: lsn(0),
        exists: row.get(1),
        restart_lsn: lsn(2),
        confirmed_lsn: lsn(3),
        wal_status: row.get(4),
        safe_wal_bytes: row.get(5),
        active_pid: row.get(6),
    })
}

/// Who streams from the slot, from `pg_stat_replication`: the application name (a
/// wal2cache daemon says `wal2cache NAME`), the client's address, since when, and its
/// last reply.
pub async fn slot_holder(client: &Client, pid: i32) -> Result<Option<String>, SourceError> {
    let row = client
        .query_opt(
            "SELECT application_name, coalesce(host(client_addr), 'local socket'),
                    to_char(backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    coalesce(to_char(reply_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), 'never')
             FROM pg_stat_replication WHERE pid = $1",
            &[&pid],
        )
        .await
        .map_err(pg("reading pg_stat_replication"))?;
    Ok(row.map(|r| {
        format!(
            "{:?} from {} since {}, last reply {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3)
        )
    }))
}

/// Runs until `stop`: every second a round of the health state (the lag gauge, proof
/// of life for `/healthz`); every `poll` the slot, on one connection kept between
/// polls (made again after an error, which is reported in `/status`, not logged in a
/// loop).
pub async fn monitor(
    target: PgTarget,
    slot: String,
    health: Arc<Health>,
    poll: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut client: Option<Client> = None;
    let mut next_poll = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        health.tick();
        if tokio::time::Instant::now() < next_poll {
            continue;
        }
        next_poll = tokio::time::Instant::now() + poll;
        let polled = async {
            if client.as_ref().is_none_or(Client::is_closed) {
                client = Some(target.connect().await?);
            }
            slot_report(client.as_ref().expect("connected above"), &slot).await
        };
        let polled = tokio::select! {
            p = tokio::time::timeout(poll.max(Duration::from_secs(1)), polled) => p,
            _ = stop.wait_for(|s| *s) => return,
        };
        match polled {
            Ok(Ok(report)) => health.slot_polled(Ok(report)),
            Ok(Err(e)) => {
                client = None;
                health.slot_polled(Err(e.to_string()));
            }
            Err(_) => {
                client = None;
                health.slot_polled(Err(format!(
                    "the database did not answer within {}s",
                    poll.max(Duration::from_secs(1)).as_secs()
                )));
            }
        }
    }
}
