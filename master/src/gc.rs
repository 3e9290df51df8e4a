//! The MVCC GC safe point (docs/transactions.md, "Garbage collection").
//!
//! Versions below the safe point may be dropped by compaction, so the safe point must stay
//! at or below the snapshot of every transaction still running. Clients hold it back with
//! leases ([`Holds`]): each renews the oldest start timestamp of its live transactions
//! well within the lease. The leader raises the safe point to the lower of that and
//! `now - gc_life_time`, and persists it in the master's log, so it never goes back, not
//! even across a failover.
//!
//! Holds are soft state, on the leader only. A new leader has none, so it waits one lease
//! after taking over before it raises the safe point: by then every live client has
//! renewed its hold with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use luna_proto::masterlog::command::Kind;
use luna_proto::masterlog::{Command, GcSafePoint};

use crate::core::Core;
use crate::error::MasterError;
use crate::tso::LOGICAL_BITS;

/// Longest client id a hold may carry.
pub(crate) const MAX_CLIENT_ID_LEN: usize = 128;
/// Most clients holding the safe point at once: a client that leaks ids cannot grow the
/// leader's memory without bound.
pub(crate) const MAX_HOLDS: usize = 100_000;

/// Clients' holds on the safe point, by client id: the oldest start timestamp each still
/// reads at, and when its lease runs out.
#[derive(Debug)]
pub(crate) struct Holds {
    /// When this replica began serving as leader: it raises nothing for a lease after.
    leading_since: Instant,
    holds: HashMap<String, (u64, Instant)>,
}

impl Holds {
    /// No holds, for a leader that began serving at `now`.
    pub fn new(now: Instant) -> Holds {
        Holds {
            leading_since: now,
            holds: HashMap::new(),
        }
    }

    /// Records (or with `oldest_start_ts` 0 releases) `client_id`'s hold until `now + lease`.
    pub fn renew(
        &mut self,
        client_id: &str,
        oldest_start_ts: u64,
        now: Instant,
        lease: Duration,
    ) -> Result<(), MasterError> {
        if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID_LEN {
            return Err(MasterError::invalid(format!(
                "a client id has 1 to {MAX_CLIENT_ID_LEN} bytes, not {}",
                client_id.len()
            )));
        }
        if oldest_start_ts == 0 {
            self.holds.remove(client_id);
            return Ok(());
        }
        if self.holds.len() >= MAX_HOLDS && !self.holds.contains_key(client_id) {
            self.holds.retain(|_, (_, until)| *until > now);
            if self.holds.len() >= MAX_HOLDS {
                return Err(MasterError::precondition(format!(
                    "{MAX_HOLDS} clients hold snapshots already; retry once some finish"
                )));
            }
        }
        self.holds
            .insert(client_id.to_owned(), (oldest_start_ts, now + lease));
        Ok(())
    }

    /// The oldest start timestamp a live hold keeps; `None` when no lease is live.
    pub fn oldest(&mut self, now: Instant) -> Option<u64> {
        self.holds.retain(|_, (_, until)| *until > now);
        self.holds.values().map(|&(ts, _)| ts).min()
    }

    /// The safe point to raise to at `now`, or `None` while this leader has served for less
    /// than a lease (clients may not have renewed their holds with it yet).
    pub fn candidate(
        &mut self,
        now: Instant,
        now_ms: u64,
        life_time: Duration,
        lease: Duration,
    ) -> Option<u64> {
        if now.saturating_duration_since(self.leading_since) < lease {
            return None;
        }
        let life_ms = u64::try_from(life_time.as_millis()).unwrap_or(u64::MAX);
        let by_age = now_ms.saturating_sub(life_ms) << LOGICAL_BITS;
        Some(self.oldest(now).map_or(by_age, |oldest| oldest.min(by_age)))
    }
}

/// Raises the safe point every `gc_interval` while this replica leads, until shutdown.
pub(crate) async fn gc_loop(core: Arc<Core>) {
    let core = &*core;
    core.every(core.config.gc_interval, "raising the GC safe point", || {
        core.raise_safe_point()
    })
    .await;
}

impl Core {
    /// Records a client's hold and answers the current safe point.
    pub async fn keep_snapshots(
        &self,
        client_id: &str,
        oldest_start_ts: u64,
    ) -> Result<u64, MasterError> {
        // A deposed leader must not take holds the new leader never hears of.
        self.lead_with_lease().await?;
        self.holds().renew(
            client_id,
            oldest_start_ts,
            Instant::now(),
            self.config.snapshot_lease,
        )?;
        Ok(self.read_state().gc_safe_point)
    }

    /// Persists a higher safe point, if this replica serves as leader and may raise it.
    async fn raise_safe_point(&self) -> Result<(), MasterError> {
        let current = self.stream().leadership();
        if !current.is_leader || *self.serving.borrow() != current.term {
            return Ok(());
        }
        let now_ms = self.config.clock.now_ms();
        let Some(candidate) = self.holds().candidate(
            Instant::now(),
            now_ms,
            self.config.gc_life_time,
            self.config.snapshot_lease,
        ) else {
            return Ok(());
        };
        if candidate <= self.read_state().gc_safe_point {
            return Ok(());
        }
        let turn = self.turn().await?;
        let command = Command {
            proposed_ms: now_ms,
            kind: Some(Kind::GcSafePoint(GcSafePoint { ts: candidate })),
        };
        self.propose(&turn, &command).await?;
        tracing::debug!(safe_point = candidate, "GC safe point raised");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);
    const LIFE: Duration = Duration::from_secs(40);

    fn ts(ms: u64) -> u64 {
        ms << LOGICAL_BITS
    }

    #[test]
    fn a_new_leader_raises_nothing_until_clients_had_a_lease_to_renew() {
        let start = Instant::now();
        let mut holds = Holds::new(start);
        let now_ms = 1_000_000;
        assert_eq!(holds.candidate(start, now_ms, LIFE, LEASE), None);
        assert_eq!(
            holds.candidate(start + LEASE / 2, now_ms, LIFE, LEASE),
            None
        );
        assert_eq!(
            holds.candidate(start + LEASE, now_ms, LIFE, LEASE),
            Some(ts(now_ms - 40_000)),
            "no hold: the life time alone"
        );
    }

    #[test]
    fn the_oldest_live_hold_keeps_the_safe_point_down_until_its_lease_ends() {
        let start = Instant::now();
        let mut holds = Holds::new(start);
        let now = start + LEASE;
        let now_ms = 1_000_000;
        holds.renew("a", ts(900_000), now, LEASE).expect("renew");
        holds.renew("b", ts(950_000), now, LEASE).expect("renew");
        holds.renew("c", ts(999_000), now, LEASE).expect("renew");
        assert_eq!(holds.candidate(now, now_ms, LIFE, LEASE), Some(ts(900_000)));
        holds.renew("a", 0, now, LEASE).expect("release");
        assert_eq!(holds.candidate(now, now_ms, LIFE, LEASE), Some(ts(950_000)));
        // A hold younger than the life time does not matter.
        holds.renew("b", ts(990_000), now, LEASE).expect("renew");
        assert_eq!(holds.candidate(now, now_ms, LIFE, LEASE), Some(ts(960_000)));
        // b renews late, c not at all: c's lease ran out.
        holds
            .renew("b", ts(930_000), now + LEASE, LEASE)
            .expect("renew");
        let later = now + LEASE + Duration::from_millis(1);
        assert_eq!(holds.oldest(later), Some(ts(930_000)));
        assert_eq!(holds.holds.len(), 1, "c's lease ended");
    }

    #[test]
    fn bad_client_ids_are_refused() {
        let now = Instant::now();
        let mut holds = Holds::new(now);
        assert!(matches!(
            holds.renew("", 5, now, LEASE),
            Err(MasterError::InvalidArgument { .. })
        ));
        let long = "x".repeat(MAX_CLIENT_ID_LEN + 1);
        assert!(holds.renew(&long, 5, now, LEASE).is_err());
        assert!(
            holds
                .renew(&"x".repeat(MAX_CLIENT_ID_LEN), 5, now, LEASE)
                .is_ok()
        );
    }
}
