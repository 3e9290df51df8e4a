//! The leader lease as a stream's handles see it: the ready loop publishes it, and
//! [`RaftStream::lease_read`](super::RaftStream::lease_read) checks it without a trip to
//! the driver thread, which cost a channel send, a wake-up and a reply per read.
//!
//! The lease is in real time: it runs from the instant a read barrier that a quorum
//! confirmed was issued, for `lease_ticks` tick intervals (two ticks less than an election
//! timeout). A follower that heard from the leader after that instant refuses to vote for
//! an election timeout of its own ticks, so no other leader exists before the lease ends.
//!
//! The published index is raft's commit index, stored before the ready loop acknowledges
//! any append up to it and before the lease that it goes with, so a read that sees a valid
//! lease also sees an index at or past every acknowledged append and past the read barrier
//! that granted the lease (which covers what earlier leaders committed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One replica's published lease.
#[derive(Debug)]
pub(crate) struct LeaseCell {
    /// When the clock below started.
    origin: Instant,
    /// The lease's end in nanoseconds since `origin`; 0 when there is none.
    until: AtomicU64,
    /// Raft's commit index, as of the latest publication.
    committed: AtomicU64,
    /// A lease this close to its end is renewed through the driver instead.
    renew_before: Duration,
}

impl LeaseCell {
    pub(crate) fn new(renew_before: Duration) -> Self {
        Self {
            origin: Instant::now(),
            until: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            renew_before,
        }
    }

    /// Publishes raft's commit index. Must come before any append up to it is acknowledged.
    pub(crate) fn set_committed(&self, index: u64) {
        self.committed.fetch_max(index, Ordering::Release);
    }

    /// Publishes the lease's end (`None`: no lease), after the commit index it goes with.
    pub(crate) fn publish(&self, until: Option<Instant>) {
        let nanos = until.map_or(0, |until| self.nanos(until).max(1));
        self.until.store(nanos, Ordering::Release);
    }

    /// The commit index to read at, if the lease is valid now and not about to end.
    pub(crate) fn read(&self) -> Option<u64> {
        let until = self.until.load(Ordering::Acquire);
        let renew_at = until.checked_sub(self.renew_before.as_nanos() as u64)?;
        (self.nanos(Instant::now()) < renew_at).then(|| self.committed.load(Ordering::Acquire))
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_serves_until_its_renewal_margin() {
        let cell = LeaseCell::new(Duration::from_millis(100));
        assert_eq!(cell.read(), None, "no lease yet");
        cell.set_committed(7);
        cell.publish(Some(Instant::now() + Duration::from_secs(60)));
        assert_eq!(cell.read(), Some(7));
        cell.set_committed(5);
        assert_eq!(cell.read(), Some(7), "the index never goes back");
        cell.publish(Some(Instant::now() + Duration::from_millis(50)));
        assert_eq!(
            cell.read(),
            None,
            "inside the renewal margin: ask the driver"
        );
        cell.publish(Some(Instant::now() + Duration::from_secs(60)));
        cell.publish(None);
        assert_eq!(cell.read(), None, "ended");
    }
}
