//! Operation deadlines and the backoff between retries.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::ClientOptions;

/// When an operation (with all its retries) must end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    /// A deadline `budget` from now.
    pub(crate) fn after(budget: Duration) -> Self {
        Deadline {
            at: Instant::now() + budget,
            budget,
        }
    }

    /// Time left, zero once passed.
    pub(crate) fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    pub(crate) fn expired(&self) -> bool {
        self.remaining().is_zero()
    }

    /// The whole budget, for error messages.
    pub(crate) fn budget(&self) -> Duration {
        self.budget
    }

    /// The timeout for one attempt: the per-request timeout, cut short by the deadline.
    pub(crate) fn attempt_timeout(&self, request_timeout: Duration) -> Duration {
        request_timeout.min(self.remaining())
    }

    /// Sleeps for `wait` before another attempt and returns true; or returns false at once
    /// if the deadline would pass first. Giving up early beats an attempt squeezed into the
    /// last instant, which would likely time out and leave a write's outcome unknown.
    pub(crate) async fn sleep(&self, wait: Duration) -> bool {
        if wait >= self.remaining() {
            return false;
        }
        tokio::time::sleep(wait).await;
        !self.expired()
    }
}

/// Longest wait between retries while replicas answer that their group (or the master)
/// has no leader, or name one that is gone: an election is under way, it takes a few
/// hundred milliseconds, and the first attempt after it should not wait out a backoff that
/// grew during it.
const ELECTION_POLL: Duration = Duration::from_millis(50);

/// Longest wait between retries while a tablet is not where the routing says: it is
/// moving between groups, and the handoff takes tens of milliseconds.
const MOVE_POLL: Duration = Duration::from_millis(10);

/// Exponential backoff with jitter: the wait before retry `n` (from 1) is uniform in
/// `[d/2, d]` with `d = min(max_backoff, min_backoff * 2^(n-1))`, so clients that failed
/// together do not retry together.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    retries: u32,
    rng: SmallRng,
}

impl Backoff {
    /// A fresh backoff for one operation; `seed` varies the jitter between operations.
    pub(crate) fn new(options: &ClientOptions, seed: u64) -> Self {
        Backoff {
            min: options.min_backoff,
            max: options.max_backoff.max(options.min_backoff),
            retries: 0,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// The next wait; each call doubles the ceiling up to the maximum.
    pub(crate) fn next_wait(&mut self) -> Duration {
        self.retries = self.retries.saturating_add(1);
        let factor = 2u32.saturating_pow(self.retries.saturating_sub(1).min(31));
        let ceiling = self.min.saturating_mul(factor).min(self.max);
        let half = ceiling / 2;
        // Any backoff worth configuring fits in u64 nanoseconds (584 years).
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(self.rng.random_range(0..=spread))
    }

    /// The next wait while an election is under way: [`Backoff::next_wait`], at most
    /// [`ELECTION_POLL`].
    pub(crate) fn next_election_wait(&mut self) -> Duration {
        self.next_wait().min(ELECTION_POLL)
    }

    /// The next wait while a tablet's routing is stale: [`Backoff::next_wait`], at most
    /// [`MOVE_POLL`].
    pub(crate) fn next_routing_wait(&mut self) -> Duration {
        self.next_wait().min(MOVE_POLL)
    }

    /// A random element of `items` (spreads replica reads), `None` if it is empty.
    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        items.get(self.rng.random_range(0..items.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds() {
        let options = ClientOptions {
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            ..ClientOptions::default()
        };
        let mut backoff = Backoff::new(&options, 7);
        let waits: Vec<Duration> = (0..10).map(|_| backoff.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(5) && waits[0] <= Duration::from_millis(10));
        assert!(waits[2] >= Duration::from_millis(20) && waits[2] <= Duration::from_millis(40));
        assert!(waits[9] >= Duration::from_millis(50) && waits[9] <= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn sleeps_past_the_deadline_give_up_at_once() {
        let deadline = Deadline::after(Duration::from_millis(200));
        let started = Instant::now();
        assert!(!deadline.sleep(Duration::from_secs(5)).await);
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(deadline.sleep(Duration::from_millis(1)).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(deadline.expired());
        assert_eq!(
            deadline.attempt_timeout(Duration::from_secs(1)),
            Duration::ZERO
        );
    }
}
