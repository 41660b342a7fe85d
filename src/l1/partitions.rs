//! What the subscriber knows of each assigned partition: the next offset it expects
//! and when it last heard a heartbeat there. Pure bookkeeping, so that the rules for
//! gaps and silence are tested without a broker.
//!
//! What counts as a gap is documented on [`Gaps`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How forward jumps in a partition's offsets are treated.
///
/// **What counts as a gap.** Within a partition, a message whose offset is not the
/// previous one plus one:
/// - an offset *lower* than expected (the log was replaced: a topic deleted and
///   created again, a broker without persistence restarted) is always a gap;
/// - an offset *higher* than expected is a gap under [`Gaps::Strict`], the default.
///   The daemon's topic is written only by its idempotent, non-transactional
///   producer and is not compacted: the broker appends each batch once (an
///   idempotent retry is recognised and not appended again) at the next offsets, so
///   a skipped offset there means records this instance never got, for example
///   deleted by retention before it read them. (The local broker, Tansu, always
///   numbers contiguously.) Transaction markers, aborted transactions and
///   compaction do leave holes that lose nothing: on a topic with writers or
///   settings of that kind, use [`Gaps::Tolerate`], which counts forward jumps
///   (`Metrics::offset_gaps`) without resetting, and relies on the heartbeats and
///   on librdkafka's errors alone. A cluster that leaves holes in the daemon's topic
///   shows up as `resets` with "gap in partition" as the reason.
///
/// Either way, a position librdkafka cannot continue from (offset out of range, log
/// truncation) comes as a consumer error (`auto.offset.reset=error`), never as a
/// silent jump, and resets the cache like a gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gaps {
    /// Any offset other than the next one resets the cache (right for the daemon's
    /// topic: one idempotent, non-transactional producer, no compaction).
    #[default]
    Strict,
    /// A forward jump is counted but trusted (for topics with transactional
    /// producers or compaction); an offset going backwards still resets.
    Tolerate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// The next offset (or the first message since the assignment).
    InOrder,
    /// A forward jump: `expected` was never delivered.
    Skipped { expected: i64, got: i64 },
    /// An offset at or below one already seen.
    Backwards { expected: i64, got: i64 },
    /// A partition this assignment does not have.
    Unassigned,
}

#[derive(Debug, Default)]
struct Partition {
    next: Option<i64>,
    heartbeat: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct Partitions {
    parts: HashMap<i32, Partition>,
    assigned_at: Instant,
}

impl Partitions {
    pub fn new(ids: impl IntoIterator<Item = i32>, now: Instant) -> Partitions {
        Partitions {
            parts: ids.into_iter().map(|p| (p, Partition::default())).collect(),
            assigned_at: now,
        }
    }

    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Records a message at `offset` of `partition`.
    pub fn observe(&mut self, partition: i32, offset: i64) -> Seen {
        let Some(p) = self.parts.get_mut(&partition) else {
            return Seen::Unassigned;
        };
        let seen = match p.next {
            None => Seen::InOrder,
            Some(next) if offset == next => Seen::InOrder,
            Some(next) if offset > next => Seen::Skipped {
                expected: next,
                got: offset,
            },
            Some(next) => Seen::Backwards {
                expected: next,
                got: offset,
            },
        };
        if !matches!(seen, Seen::Backwards { .. }) {
            p.next = Some(offset + 1);
        }
        seen
    }

    pub fn heartbeat(&mut self, partition: i32, now: Instant) {
        if let Some(p) = self.parts.get_mut(&partition) {
            p.heartbeat = Some(now);
        }
    }

    /// A partition without a heartbeat for longer than `bound` (counting from the
    /// assignment for one never heard), and for how long.
    pub fn silent(&self, now: Instant, bound: Duration) -> Option<(i32, Duration)> {
        self.parts
            .iter()
            .map(|(id, p)| {
                (
                    *id,
                    now.duration_since(p.heartbeat.unwrap_or(self.assigned_at)),
                )
            })
            .filter(|(_, quiet)| *quiet > bound)
            .max_by_key(|(_, quiet)| *quiet)
    }

    /// Every partition had a heartbeat since the assignment, within `bound`.
    pub fn all_heard(&self, now: Instant, bound: Duration) -> bool {
        !self.parts.is_empty()
            && self
                .parts
                .values()
                .all(|p| p.heartbeat.is_some_and(|t| now.duration_since(t) <= bound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_offsets_from_the_first_message() {
        let mut p = Partitions::new([0, 1], Instant::now());
        assert_eq!(p.observe(0, 41), Seen::InOrder);
        assert_eq!(p.observe(0, 42), Seen::InOrder);
        assert_eq!(p.observe(1, 7), Seen::InOrder);
        assert_eq!(
            p.observe(0, 44),
            Seen::Skipped {
                expected: 43,
                got: 44
            }
        );
        assert_eq!(p.observe(0, 45), Seen::InOrder, "resumes after the jump");
        assert_eq!(
            p.observe(1, 3),
            Seen::Backwards {
                expected: 8,
                got: 3
            }
        );
        assert_eq!(
            p.observe(1, 7),
            Seen::Backwards {
                expected: 8,
                got: 7
            },
            "a repeated offset is not in order"
        );
        assert_eq!(p.observe(2, 0), Seen::Unassigned);
    }

    #[test]
    fn silence_and_health_per_partition() {
        let t0 = Instant::now();
        let bound = Duration::from_secs(2);
        let mut p = Partitions::new([0, 1], t0);
        assert!(!p.all_heard(t0, bound));
        assert_eq!(p.silent(t0 + Duration::from_secs(1), bound), None);
        p.heartbeat(0, t0 + Duration::from_secs(1));
        assert!(
            !p.all_heard(t0 + Duration::from_secs(1), bound),
            "partition 1 unheard"
        );
        assert_eq!(
            p.silent(t0 + Duration::from_secs(3), bound),
            Some((1, Duration::from_secs(3)))
        );
        p.heartbeat(1, t0 + Duration::from_secs(3));
        assert!(p.all_heard(t0 + Duration::from_secs(3), bound));
        assert_eq!(p.silent(t0 + Duration::from_secs(3), bound), None);
        assert_eq!(
            p.silent(t0 + Duration::from_millis(3500), bound),
            Some((0, Duration::from_millis(2500)))
        );
        assert!(!p.all_heard(t0 + Duration::from_millis(3500), bound));
    }
}
