//! Reading a `Source` (the stream of a slot) in a test.

use std::time::Duration;

use wal2cache::source::{Change, Source, SourceEvent};

/// Reads events until `done` says so, failing after `deadline`. Idle positions
/// (`SourceEvent::Idle`, from the server's keepalives, whenever it sends one) are left
/// out: these tests read what the stream decodes.
#[allow(dead_code)]
pub async fn collect_until(
    source: &mut Source,
    deadline: Duration,
    mut done: impl FnMut(&[SourceEvent]) -> bool,
) -> Vec<SourceEvent> {
    let mut events = Vec::new();
    let result = tokio::time::timeout(deadline, async {
        while !done(&events) {
            match source.next().await {
                Some(Ok(SourceEvent::Idle { .. })) => {}
                Some(Ok(e)) => events.push(e),
                Some(Err(e)) => panic!("source failed: {e}"),
                None => panic!("source ended"),
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "timed out after {deadline:?}; got {} events: {:#?}",
        events.len(),
        events.iter().rev().take(5).collect::<Vec<_>>()
    );
    events
}

/// The fatal error a source ends with, which must come within `within` (not retries),
/// after idle positions only (the server's keepalives come before the change it
/// fails on).
#[allow(dead_code)]
pub async fn fatal_error(source: &mut Source, within: Duration) -> wal2cache::source::SourceError {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, source.next()).await {
            Ok(Some(Ok(SourceEvent::Idle { .. }))) => {}
            Ok(Some(Err(e))) => return e,
            Ok(other) => panic!("expected a fatal error, got {other:?}"),
            Err(_) => panic!("no fatal error within {within:?}: the source kept retrying"),
        }
    }
}

/// Events up to and including the `n`th commit.
#[allow(dead_code)]
pub async fn commits(source: &mut Source, n: usize) -> Vec<SourceEvent> {
    collect_until(source, Duration::from_secs(30), |evs| {
        evs.iter()
            .filter(|e| matches!(e, SourceEvent::Commit(_)))
            .count()
            >= n
    })
    .await
}

#[allow(dead_code)]
pub fn changes(events: &[SourceEvent]) -> Vec<&Change> {
    events
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Change(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// A column of a row in text form; `None` for NULL, panics when not sent.
#[allow(dead_code)]
pub fn text(change: &Change, new: bool, column: &str) -> Option<String> {
    use wal2cache::source::Value;
    let row = if new {
        change.new.as_ref()
    } else {
        change.old.as_ref()
    }
    .expect("row present");
    let i = change.relation.column_index(column).expect("column exists");
    match &row.0[i] {
        Value::Null => None,
        Value::Text(b) => Some(String::from_utf8(b.to_vec()).unwrap()),
        other => panic!("column {column} is {other:?}"),
    }
}
