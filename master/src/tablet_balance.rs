//! The placement driver's tablet steps (docs/elasticity.md), one at a time and only while
//! no tablet moves or splits:
//!
//! - **Automatic splits.** A tablet of a healthy group whose data passed `split_size`, or
//!   whose reads and writes stayed over `split_load_ops` for `split_load_for`, splits in
//!   the middle. A split that fails (a tablet with no middle) is not tried again for a
//!   while.
//! - **Balancing.** Once the groups' tablet counts have stayed more than one apart for
//!   `tablet_balance_after`, a tablet moves from the fullest to the emptiest. Tablets an
//!   operator moved or split are pinned and never move for balance.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::core::{Core, lock};
use crate::moves::REASON_BALANCE;
use crate::state::State;

/// The move that evens out the tablet counts of the `healthy` groups, as
/// `(tablet, to_group)`: a tablet of the group with the most tablets goes to the group with
/// the fewest among those with as many replicas, when they differ by more than one. The
/// tablet is the unpinned one with the lowest id. `None` while a tablet moves or splits.
pub(crate) fn tablet_to_balance(state: &State, healthy: &BTreeSet<u64>) -> Option<(u64, u64)> {
    if !state.tablet_moves.is_empty() || !state.tablet_splits.is_empty() {
        return None;
    }
    // Groups by replica count: a tablet keeps its replication factor when it moves.
    let mut pools: BTreeMap<usize, BTreeMap<u64, Vec<u64>>> = BTreeMap::new();
    for group in state.groups.values().filter(|g| healthy.contains(&g.id)) {
        pools
            .entry(group.replicas.len())
            .or_default()
            .insert(group.id, Vec::new());
    }
    for tablet in state.tablets.values() {
        for pool in pools.values_mut() {
            if let Some(tablets) = pool.get_mut(&tablet.group_id) {
                tablets.push(tablet.id);
            }
        }
    }
    pools.values().find_map(|pool| {
        let most = pool
            .iter()
            .max_by_key(|&(&id, tablets)| (tablets.len(), u64::MAX - id))
            .map(|(_, tablets)| tablets)?;
        let (&empty, least) = pool
            .iter()
            .min_by_key(|&(&id, tablets)| (tablets.len(), id))?;
        if most.len() <= least.len() + 1 {
            return None;
        }
        let tablet = most
            .iter()
            .copied()
            .filter(|id| !state.pinned_tablets.contains(id))
            .min()?;
        Some((tablet, empty))
    })
}

/// How long a tablet whose automatic split failed is left alone.
const SPLIT_RETRY: Duration = Duration::from_secs(60);

/// The leader's memory of tablets' load and failed splits (soft state).
#[derive(Debug, Default)]
pub(crate) struct SplitWatch {
    /// Since when each tablet's load has been over the threshold.
    hot_since: HashMap<u64, Instant>,
    /// When each tablet's last automatic split failed.
    failed_at: HashMap<u64, Instant>,
}

/// Why a tablet splits by itself.
const REASON_SIZE: &str = "size";
const REASON_LOAD: &str = "load";

/// A tablet step of the placement driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TabletStep {
    Split {
        tablet_id: u64,
        reason: &'static str,
    },
    Move {
        tablet_id: u64,
        to_group: u64,
    },
}

impl Core {
    /// Starts the driver's next tablet step, if one is due: a split, else a move for
    /// balance. It runs in a task of its own, one at a time: a move or split can wait on a
    /// group for long, and must not hold back the driver's repairs meanwhile.
    pub(crate) fn start_tablet_step(self: &Arc<Self>, healthy: &BTreeSet<u64>) {
        if self.tablet_step_running.load(Ordering::Acquire) {
            return;
        }
        let step = self
            .split_due(healthy)
            .map(|(tablet_id, reason)| TabletStep::Split { tablet_id, reason })
            .or_else(|| {
                self.balance_due(healthy)
                    .map(|(tablet_id, to_group)| TabletStep::Move {
                        tablet_id,
                        to_group,
                    })
            });
        let Some(step) = step else {
            return;
        };
        self.tablet_step_running.store(true, Ordering::Release);
        let core = Arc::clone(self);
        tokio::spawn(async move {
            tracing::info!(?step, "placement driver tablet step");
            let result = match step {
                TabletStep::Split { tablet_id, reason } => {
                    let split = core.split_tablet_for(tablet_id, Vec::new(), reason).await;
                    let mut watch = lock(&core.split_watch);
                    watch.hot_since.remove(&tablet_id);
                    if split.is_err() {
                        watch.failed_at.insert(tablet_id, Instant::now());
                    }
                    split.map(|_| ())
                }
                TabletStep::Move {
                    tablet_id,
                    to_group,
                } => core
                    .move_tablet_for(tablet_id, to_group, REASON_BALANCE)
                    .await
                    .map(|_| ()),
            };
            if let Err(error) = result {
                tracing::warn!(?step, %error, "placement driver tablet step failed");
            }
            core.tablet_step_running.store(false, Ordering::Release);
        });
    }

    /// A tablet that grew too big or stayed too busy, and why, if no tablet moves or
    /// splits.
    fn split_due(&self, healthy: &BTreeSet<u64>) -> Option<(u64, &'static str)> {
        let (split_size, split_ops) = (self.config.split_size, self.config.split_load_ops);
        let state = self.read_state();
        if !state.tablet_moves.is_empty() || !state.tablet_splits.is_empty() {
            return None;
        }
        let registry = self.registry();
        let mut watch = lock(&self.split_watch);
        let now = Instant::now();
        watch
            .failed_at
            .retain(|_, at| now.duration_since(*at) < SPLIT_RETRY);
        let mut choice = None;
        for tablet in state.tablets.values() {
            if !healthy.contains(&tablet.group_id) {
                continue;
            }
            let stats = registry.tablet_stats(tablet.id);
            let hot = split_ops > 0 && stats.ops_per_sec >= split_ops;
            let hot_for = match (hot, watch.hot_since.get(&tablet.id)) {
                (true, Some(since)) => now.duration_since(*since),
                (true, None) => {
                    watch.hot_since.insert(tablet.id, now);
                    Duration::ZERO
                }
                (false, _) => {
                    watch.hot_since.remove(&tablet.id);
                    Duration::ZERO
                }
            };
            let reason = if split_size > 0 && stats.size_bytes >= split_size {
                REASON_SIZE
            } else if hot && hot_for >= self.config.split_load_for {
                REASON_LOAD
            } else {
                continue;
            };
            if choice.is_none() && !watch.failed_at.contains_key(&tablet.id) {
                choice = Some((tablet.id, reason));
            }
        }
        choice
    }

    /// The move that evens out the groups' tablet counts, once they have been out of
    /// balance for `tablet_balance_after`.
    fn balance_due(&self, healthy: &BTreeSet<u64>) -> Option<(u64, u64)> {
        if self.config.tablet_balance_after.is_zero() {
            return None;
        }
        let choice = tablet_to_balance(&self.read_state(), healthy);
        let mut since = lock(&self.tablet_imbalance);
        if choice.is_none() {
            *since = None;
            return None;
        }
        let started = *since.get_or_insert_with(Instant::now);
        if started.elapsed() < self.config.tablet_balance_after {
            return None;
        }
        *since = None;
        choice
    }
}

#[cfg(test)]
mod tests {
    use luna_proto::master::{TabletInfo, TabletMove};
    use luna_proto::masterlog::Group;

    use super::*;

    /// Groups 1-3 of three replicas and group 4 of one; `tablets` as (id, group).
    fn with_tablets(tablets: &[(u64, u64)]) -> State {
        let mut state = State::default();
        for (id, replicas) in [(1, 3), (2, 3), (3, 3), (4, 1)] {
            let group = Group {
                id,
                replicas: (1..=replicas).collect(),
                ..Group::default()
            };
            state.groups.insert(id, group);
        }
        for &(id, group_id) in tablets {
            let tablet = TabletInfo {
                id,
                group_id,
                epoch: 1,
                ..TabletInfo::default()
            };
            state.tablets.insert(id, tablet);
        }
        state
    }

    #[test]
    fn the_fullest_group_gives_its_lowest_unpinned_tablet_to_the_emptiest() {
        let all: BTreeSet<u64> = [1, 2, 3, 4].into();
        // 3, 1, 0 tablets (and the one-replica group's own): within its pool only.
        let mut state = with_tablets(&[
            (10, 1),
            (11, 1),
            (12, 1),
            (13, 2),
            (14, 4),
            (15, 4),
            (16, 4),
        ]);
        assert_eq!(tablet_to_balance(&state, &all), Some((10, 3)));
        state.pinned_tablets.insert(10);
        assert_eq!(tablet_to_balance(&state, &all), Some((11, 3)));
        // An unhealthy group neither gives nor takes.
        assert_eq!(tablet_to_balance(&state, &[1, 2, 4].into()), Some((11, 2)));
        assert_eq!(tablet_to_balance(&state, &[2, 3, 4].into()), None);
        // Nothing while a tablet moves.
        state.tablet_moves.insert(13, TabletMove::default());
        assert_eq!(tablet_to_balance(&state, &all), None);
        state.tablet_moves.clear();
        // Pinned tablets stay; counts one apart are balanced.
        state.pinned_tablets.extend([11, 12]);
        assert_eq!(tablet_to_balance(&state, &all), None);
        let even = with_tablets(&[(10, 1), (11, 1), (12, 2), (13, 3)]);
        assert_eq!(tablet_to_balance(&even, &all), None);
    }
}
