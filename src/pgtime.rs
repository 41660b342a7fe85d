//! Postgres timestamps: microseconds since 2000-01-01 UTC, as the replication stream
//! carries commit times. Neutral ground: the source reads them, the sinks write them
//! into events, the pipeline measures lag from them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Postgres timestamps count microseconds from 2000-01-01 UTC.
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A Postgres timestamp as RFC 3339 with microseconds: `2026-11-23T09:30:00.123456Z`.
pub fn format_pg_time(micros_since_2000: i64) -> String {
    PgTime(micros_since_2000).to_string()
}

/// A Postgres timestamp that displays as RFC 3339 with microseconds, written without
/// parsing a format string (it is in every event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgTime(pub i64);

impl PgTime {
    /// Appends the RFC 3339 text, digits written by hand (the time is in every event).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        use chrono::{Datelike, Timelike};
        /// `YYYY-MM-DDTHH:MM:SS.` of the last second written on this thread: the
        /// events of a stretch of commits mostly share it.
        type Second = (i64, [u8; 20]);
        thread_local! {
            static LAST: std::cell::Cell<Second> = const { std::cell::Cell::new((i64::MIN, [0; 20])) };
        }
        let unix = self.0.saturating_add(PG_EPOCH_UNIX_MICROS);
        let (second, micros) = (unix.div_euclid(1_000_000), unix.rem_euclid(1_000_000));
        let (last, mut prefix) = LAST.with(|c| c.get());
        if last != second {
            let Some(t) = chrono::DateTime::from_timestamp(second, 0) else {
                out.extend_from_slice(format!("invalid timestamp {}", self.0).as_bytes());
                return;
            };
            let year = t.year();
            if !(0..=9999).contains(&year) {
                out.extend_from_slice(
                    format!(
                        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                        year,
                        t.month(),
                        t.day(),
                        t.hour(),
                        t.minute(),
                        t.second(),
                        micros
                    )
                    .as_bytes(),
                );
                return;
            }
            prefix = *b"0000-00-00T00:00:00.";
            put_digits(&mut prefix[0..4], year as u32);
            put_digits(&mut prefix[5..7], t.month());
            put_digits(&mut prefix[8..10], t.day());
            put_digits(&mut prefix[11..13], t.hour());
            put_digits(&mut prefix[14..16], t.minute());
            put_digits(&mut prefix[17..19], t.second());
            LAST.with(|c| c.set((second, prefix)));
        }
        let mut buf = *b"0000-00-00T00:00:00.000000Z";
        buf[..20].copy_from_slice(&prefix);
        put_digits(&mut buf[20..26], micros as u32);
        out.extend_from_slice(&buf);
    }
}

/// `v`'s last `to.len()` decimal digits, zero-padded, into `to`.
fn put_digits(to: &mut [u8], mut v: u32) {
    for d in to.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

impl std::fmt::Display for PgTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = Vec::with_capacity(27);
        self.write_to(&mut s);
        f.write_str(std::str::from_utf8(&s).map_err(|_| std::fmt::Error)?)
    }
}

impl crate::event::JsonString for PgTime {
    /// Digits and punctuation: nothing to escape.
    fn write_json(&self, out: &mut Vec<u8>) {
        self.write_to(out)
    }
}

/// Now as a Postgres timestamp.
pub fn pg_now() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    unix - PG_EPOCH_UNIX_MICROS
}

/// How long ago a Postgres timestamp was; `None` when it is in the future.
pub fn since_pg_time(micros_since_2000: i64) -> Option<Duration> {
    pg_time_between(micros_since_2000, pg_now())
}

/// How long before `now` (a Postgres timestamp) a Postgres timestamp was; `None` when
/// it is after `now`. For many timestamps measured against one reading of the clock.
pub fn pg_time_between(micros_since_2000: i64, now: i64) -> Option<Duration> {
    u64::try_from(now.checked_sub(micros_since_2000)?)
        .ok()
        .map(Duration::from_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_commit_times() {
        assert_eq!(format_pg_time(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(format_pg_time(1_500_001), "2000-01-01T00:00:01.500001Z");
        // As chrono's own formatting, over a spread of instants.
        for micros in [
            -1,
            86_399_999_999,
            849_000_000_123_456,
            1_000_000_000_000_001,
            // Year 9999, the last the digits are written by hand for.
            252_000_000_000_000_000,
        ] {
            let unix = micros + PG_EPOCH_UNIX_MICROS;
            let t = chrono::DateTime::from_timestamp_micros(unix).unwrap();
            assert_eq!(
                format_pg_time(micros),
                t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
            );
        }
    }

    #[test]
    fn consecutive_times_in_and_across_seconds_are_each_their_own() {
        // The date of the last second is reused: going forward, back, and across a
        // day, each time is still written whole.
        let day = 86_400_000_000;
        for micros in [
            1_999_999,
            2_000_000,
            2_000_001,
            1_999_998,
            day - 1,
            day,
            -1,
            0,
            day - 1,
        ] {
            let unix = micros + PG_EPOCH_UNIX_MICROS;
            let t = chrono::DateTime::from_timestamp_micros(unix).unwrap();
            assert_eq!(
                format_pg_time(micros),
                t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                "{micros}"
            );
        }
    }

    #[test]
    fn measures_time_since_a_commit() {
        let second_ago = pg_now() - 1_000_000;
        let since = since_pg_time(second_ago).unwrap();
        assert!(since >= Duration::from_secs(1) && since < Duration::from_secs(60));
        assert_eq!(since_pg_time(pg_now() + 60_000_000), None);
    }
}
