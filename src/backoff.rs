//! Capped exponential backoff with jitter, for every retry loop in the daemon.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The next delay: doubling from `initial` up to `max`, then a random point in
    /// its upper half, so that many instances retrying together spread out.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Call after a success: the next failure starts again from `initial`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_capped_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(2), "{d:?} over the cap");
        }
        let late = b.next_delay();
        assert!(
            late >= Duration::from_secs(1),
            "{late:?} should be in the cap's upper half"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
