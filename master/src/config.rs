//! Master settings and the injectable wall clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::MasterError;

/// Largest replication factor a collection may ask for.
pub const MAX_REPLICATION_FACTOR: u32 = 7;
/// Most tablets one collection may be created with.
pub const MAX_TABLETS: u32 = 4096;
/// Most groups per live server the placement driver keeps per replica-set pool.
pub const MAX_GROUPS_PER_SERVER: u32 = 64;

/// Wall time in milliseconds since the Unix epoch.
///
/// The master reads wall time only on the leader, to stamp proposals and to pick TSO
/// windows; apply never reads it. Tests inject a clock that stands still or goes backwards.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock before 1970 reads as 0: the TSO still moves forward from its persisted
        // window, it just stops tracking wall time until the clock is fixed.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| {
                u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
            })
    }
}

/// Settings of a [`Master`](crate::Master).
#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// Replicas per group for collections that do not ask for a number (1..=7).
    pub default_replication_factor: u32,
    /// Tablets of a hash collection created with `tablets = 0` (1..=4096).
    pub default_hash_tablets: u32,
    /// Groups per live server in each replica-set pool (1..=64).
    pub groups_per_server: u32,
    /// A server is alive if the master heard from it within this time.
    pub heartbeat_timeout: Duration,
    /// How far ahead of the clock each persisted TSO window reaches (at least 1 ms).
    pub tso_window: Duration,
    /// The wall clock (proposal stamps and TSO physical time).
    pub clock: Arc<dyn Clock>,
    /// The client (gRPC) address of every master replica, by its replica id on the master's
    /// stream. A replica that does not lead names the leader's address in its answers, so
    /// clients go there next. Empty for a single master.
    pub replica_addrs: BTreeMap<u64, String>,
    /// How long a request waits for a leader while the master replicas elect one (or the
    /// new leader catches up) before it fails as unavailable.
    pub election_wait: Duration,
    /// How long `TransferLeader` waits for the new group leader to report in (less than
    /// the SDK's default request timeout, so callers get the master's answer).
    pub transfer_wait: Duration,
    /// How long a server must have been silent before the placement driver replaces its
    /// replicas on other servers. Short enough to restore redundancy before a second
    /// failure, long enough that a restart or a brief partition moves nothing.
    pub repair_after: Duration,
    /// Most replica moves under way at once, universe-wide (repair, drain and balancing
    /// together; an operator's `move-replica` is not held back), so that catching up new
    /// replicas does not swamp the servers.
    pub max_moves: usize,
    /// How often the placement driver looks for work.
    pub placement_interval: Duration,
    /// How long the groups' tablet counts must stay more than one apart before the
    /// placement driver moves a tablet to even them out; zero turns tablet balancing off.
    pub tablet_balance_after: Duration,
    /// A tablet whose data grows past this many bytes splits in the middle; 0: never.
    pub split_size: u64,
    /// A tablet serving this many reads and writes per second for `split_load_for`
    /// splits in the middle; 0: never.
    pub split_load_ops: u64,
    /// How long a tablet's load must stay over `split_load_ops` before it splits.
    pub split_load_for: Duration,
    /// How long MVCC versions stay readable after they were overwritten: the GC safe
    /// point trails the clock by this much, or more while an older snapshot is held
    /// (at least 1 s).
    pub gc_life_time: Duration,
    /// How often the leader raises the GC safe point.
    pub gc_interval: Duration,
    /// How long a client's hold on the safe point lasts without a renewal.
    pub snapshot_lease: Duration,
}

impl Default for MasterConfig {
    fn default() -> Self {
        Self {
            default_replication_factor: 3,
            default_hash_tablets: 8,
            groups_per_server: 1,
            heartbeat_timeout: Duration::from_secs(10),
            tso_window: Duration::from_secs(3),
            clock: Arc::new(SystemClock),
            replica_addrs: BTreeMap::new(),
            election_wait: Duration::from_secs(2),
            transfer_wait: Duration::from_millis(2500),
            repair_after: Duration::from_secs(300),
            max_moves: 2,
            placement_interval: Duration::from_secs(1),
            tablet_balance_after: Duration::from_secs(60),
            split_size: 512 << 20,
            split_load_ops: 10_000,
            split_load_for: Duration::from_secs(30),
            gc_life_time: Duration::from_secs(600),
            gc_interval: Duration::from_secs(10),
            snapshot_lease: Duration::from_secs(10),
        }
    }
}

impl MasterConfig {
    /// The TSO window in whole milliseconds.
    pub(crate) fn tso_window_ms(&self) -> u64 {
        u64::try_from(self.tso_window.as_millis()).unwrap_or(u64::MAX)
    }

    /// Rejects settings the master cannot honour.
    pub fn validate(&self) -> Result<(), MasterError> {
        let rf = self.default_replication_factor;
        if !(1..=MAX_REPLICATION_FACTOR).contains(&rf) {
            return Err(MasterError::invalid(format!(
                "default_replication_factor {rf} is outside 1..={MAX_REPLICATION_FACTOR}"
            )));
        }
        let tablets = self.default_hash_tablets;
        if !(1..=MAX_TABLETS).contains(&tablets) {
            return Err(MasterError::invalid(format!(
                "default_hash_tablets {tablets} is outside 1..={MAX_TABLETS}"
            )));
        }
        let groups = self.groups_per_server;
        if !(1..=MAX_GROUPS_PER_SERVER).contains(&groups) {
            return Err(MasterError::invalid(format!(
                "groups_per_server {groups} is outside 1..={MAX_GROUPS_PER_SERVER}"
            )));
        }
        if self.heartbeat_timeout.is_zero() {
            return Err(MasterError::invalid("heartbeat_timeout must be positive"));
        }
        if self.repair_after < self.heartbeat_timeout {
            return Err(MasterError::invalid(format!(
                "repair_after ({:?}) must be at least the heartbeat timeout ({:?}): a server \
                 is only replaced once it is down",
                self.repair_after, self.heartbeat_timeout
            )));
        }
        if self.max_moves == 0 || self.placement_interval.is_zero() {
            return Err(MasterError::invalid(
                "max_moves and placement_interval must be positive",
            ));
        }
        if self.gc_life_time < Duration::from_secs(1)
            || self.gc_interval.is_zero()
            || self.snapshot_lease.is_zero()
        {
            return Err(MasterError::invalid(
                "gc_life_time must be at least 1 s, and gc_interval and snapshot_lease positive",
            ));
        }
        // Windows past an hour would let a restarted master jump far ahead of real time.
        let window = self.tso_window_ms();
        if !(1..=3_600_000).contains(&window) {
            return Err(MasterError::invalid(format!(
                "tso_window of {window} ms is outside 1 ms..=1 h"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bounds_are_checked() {
        assert!(MasterConfig::default().validate().is_ok());
        let bad = MasterConfig {
            default_replication_factor: 8,
            ..MasterConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(MasterError::InvalidArgument { .. })
        ));
        let bad = MasterConfig {
            tso_window: Duration::ZERO,
            ..MasterConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(SystemClock.now_ms() > 1_600_000_000_000);
    }
}
