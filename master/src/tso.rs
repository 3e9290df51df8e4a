//! The timestamp oracle's arithmetic.
//!
//! A timestamp is `(physical ms << 18) | logical`. The allocator hands out strictly
//! increasing batches: each starts above the last timestamp handed out and at or above the
//! clock, so it follows wall time when the clock moves and stays monotonic when it does
//! not (or goes back). Before handing out a timestamp at or above the persisted window
//! limit, the master persists a new limit (a `TsoWindow` command, `now + window`); after a
//! restart it starts above the persisted limit, so no timestamp is ever repeated even if
//! the clock went backwards in between.

use crate::error::MasterError;

/// Bits of the logical counter below the physical milliseconds.
pub const LOGICAL_BITS: u32 = 18;
/// Most timestamps one request may ask for: one millisecond's worth.
pub const MAX_TIMESTAMP_BATCH: u32 = 1 << LOGICAL_BITS;

/// A batch of timestamps: `first ..= first + count - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamps {
    /// The first timestamp of the batch.
    pub first: u64,
    /// How many consecutive timestamps the batch holds.
    pub count: u32,
}

impl Timestamps {
    /// The last timestamp of the batch.
    pub fn last(&self) -> u64 {
        self.first + u64::from(self.count.max(1)) - 1
    }
}

/// How far ahead of the master's clock a request's `after` may be: commit timestamps run
/// ahead of wall time only by their logical counters, and a client cannot push the oracle
/// into the future.
pub const MAX_AFTER_AHEAD_MS: u64 = 60_000;

/// The physical milliseconds of a timestamp.
pub fn physical_ms(timestamp: u64) -> u64 {
    timestamp >> LOGICAL_BITS
}

/// A batch planned by [`TsoAllocator::plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub batch: Timestamps,
    /// The window limit to persist before handing the batch out, if the current one is
    /// too low.
    pub new_limit: Option<u64>,
}

/// Hands out timestamps above everything handed out before (in memory: the leader's).
#[derive(Debug)]
pub(crate) struct TsoAllocator {
    last: u64,
}

impl TsoAllocator {
    /// Starts above the persisted `limit`: timestamps below it may have been handed out by
    /// a previous leader or run.
    pub fn new(limit: u64) -> Self {
        Self { last: limit }
    }

    /// Plans the next `count` timestamps (1..=[`MAX_TIMESTAMP_BATCH`]) at wall time
    /// `now_ms`, all above `after`, given the persisted window `limit`.
    pub fn plan(
        &self,
        now_ms: u64,
        count: u32,
        after: u64,
        limit: u64,
        window_ms: u64,
    ) -> Result<Plan, MasterError> {
        let overflow = || MasterError::internal("the timestamp space is exhausted");
        let now = now_ms.checked_mul(1 << LOGICAL_BITS).ok_or_else(overflow)?;
        if physical_ms(after) > now_ms.saturating_add(MAX_AFTER_AHEAD_MS) {
            return Err(MasterError::invalid(format!(
                "`after` ({after}) is more than {MAX_AFTER_AHEAD_MS} ms ahead of the master's clock"
            )));
        }
        let first = self
            .last
            .max(after)
            .checked_add(1)
            .ok_or_else(overflow)?
            .max(now);
        let last = first
            .checked_add(u64::from(count.max(1)) - 1)
            .ok_or_else(overflow)?;
        let new_limit = if last >= limit {
            // Reach `window_ms` past both the clock and the batch, so the next batches
            // need no write for a while even if the logical counter ran ahead of the clock.
            let base = now_ms.max(physical_ms(last));
            let limit = base
                .checked_add(window_ms.max(1))
                .and_then(|ms| ms.checked_mul(1 << LOGICAL_BITS))
                .ok_or_else(overflow)?;
            Some(limit)
        } else {
            None
        };
        Ok(Plan {
            batch: Timestamps { first, count },
            new_limit,
        })
    }

    /// Records that `batch` was handed out.
    pub fn commit(&mut self, batch: Timestamps) {
        self.last = self.last.max(batch.last());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_increase_strictly_and_windows_are_persisted_before_use() {
        let mut limit = 0;
        let mut tso = TsoAllocator::new(limit);
        let mut previous = 0;
        let mut windows = 0;
        // The clock stalls, jumps ahead and goes back.
        let clock = [100, 100, 100, 5_000, 4_000, 4_000, 200, 9_000, 9_001];
        for (i, now) in clock.iter().cycle().take(300).enumerate() {
            let count = 1 + (i as u32 * 7919) % 5000;
            let plan = tso
                .plan(*now, count, 0, limit, 3000)
                .unwrap_or_else(|e| panic!("{e}"));
            if let Some(new_limit) = plan.new_limit {
                assert!(new_limit > plan.batch.last());
                limit = limit.max(new_limit);
                windows += 1;
            }
            assert!(plan.batch.first > previous, "batch {i} went backwards");
            assert!(
                plan.batch.last() < limit,
                "batch {i} is not covered by the window"
            );
            previous = plan.batch.last();
            tso.commit(plan.batch);
        }
        assert!(windows < 20, "windows are reused, {windows} written");
    }

    #[test]
    fn a_restart_starts_above_the_persisted_limit_even_if_the_clock_went_back() {
        let mut tso = TsoAllocator::new(0);
        let plan = tso
            .plan(10_000, 5, 0, 0, 3000)
            .unwrap_or_else(|e| panic!("{e}"));
        let limit = plan.new_limit.unwrap_or_default();
        tso.commit(plan.batch);
        let restarted = TsoAllocator::new(limit);
        let after = restarted
            .plan(1, 1, 0, limit, 3000)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(after.batch.first > limit);
        assert!(after.new_limit.is_some_and(|l| l > after.batch.first));
    }

    #[test]
    fn timestamps_follow_the_clock() {
        let tso = TsoAllocator::new(0);
        let plan = tso
            .plan(1234, 1, 0, 0, 3000)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(physical_ms(plan.batch.first), 1234);
        assert_eq!(plan.batch.first & ((1 << LOGICAL_BITS) - 1), 0);
        assert!(tso.plan(u64::MAX, 1, 0, 0, 3000).is_err());
    }

    #[test]
    fn batches_start_above_after_and_after_far_ahead_is_refused() {
        let mut tso = TsoAllocator::new(0);
        let after = (1_000 << LOGICAL_BITS) + 77;
        let plan = tso
            .plan(1_000, 3, after, 0, 3000)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plan.batch.first, after + 1);
        tso.commit(plan.batch);
        let next = tso
            .plan(1_000, 1, 0, u64::MAX, 3000)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(next.batch.first > plan.batch.last());
        let far = (1_000 + MAX_AFTER_AHEAD_MS + 1) << LOGICAL_BITS;
        assert!(tso.plan(1_000, 1, far, u64::MAX, 3000).is_err());
    }
}
