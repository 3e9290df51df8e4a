//! The placement driver: on the master leader, keeps every group at its replication factor
//! and the servers evenly loaded, one persisted step at a time.
//!
//! Each pass (every `placement_interval`) takes at most one step, in this order:
//!
//! 0. **Leaders off slow disks.** A group whose preferred leader's journal reports its disk
//!    behind (it refuses writes) gets another replica as preferred leader.
//! 1. **Repair.** A replica on a server silent for longer than `repair_after` moves to a
//!    live server; so does the target of a move under way once it is that silent (the move
//!    is retargeted).
//! 2. **Drain.** A replica on a draining server moves to a live server.
//! 3. **Balance replicas.** If the live servers' replica counts differ by more than one, a
//!    replica of a healthy group moves from the fullest server to the emptiest, unless an
//!    operator moved one of the group's replicas (balancing would undo it). Otherwise, if
//!    the reads and writes of the groups a server hosts are over twice another's (and over
//!    them by `LOAD_GAP_OPS`), one of its replicas moves there.
//! 4. **Balance leaders.** If the live servers' preferred-leader counts differ by more than
//!    one, a group that an operator has not pinned gets a new preferred leader. Otherwise,
//!    if the reads and writes of the groups a server leads are over twice another's (and
//!    over them by `LOAD_GAP_OPS`), one of its groups hands leadership to that server.
//! 5. **Split tablets** that grew past `split_size` or stayed over `split_load_ops`.
//! 6. **Balance tablets.** If the healthy groups' tablet counts have differed by more than
//!    one for `tablet_balance_after`, a tablet moves from the fullest to the emptiest
//!    (both in `tablet_balance.rs`).
//!
//! Moves count against `max_moves` (the rate limit); a group moves one replica at a time.
//! Targets are live, non-draining servers that do not host the group, fewest replicas
//! first, ties to the lowest id. The choice is a pure function of the state and the
//! liveness sets ([`next_step`]), tested without a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use luna_proto::masterlog::command::Kind;
use luna_proto::masterlog::{Command, Group, SetPreferredLeader};

use crate::core::Core;
use crate::error::MasterError;
use crate::state::State;

/// One thing the placement driver does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Move group `group_id`'s replica from `from` to `to`.
    Move {
        group_id: u64,
        from: u64,
        to: u64,
        reason: &'static str,
    },
    /// Make `server_id` group `group_id`'s preferred leader.
    Prefer { group_id: u64, server_id: u64 },
}

/// Which servers are up and how busy groups are, as the driver sees them at one instant.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    /// Heard from within the heartbeat timeout.
    pub alive: BTreeSet<u64>,
    /// Silent for longer than `repair_after`: their replicas are replaced.
    pub lost: BTreeSet<u64>,
    /// Reads and writes per second by group, from its leader's last report.
    pub group_load: BTreeMap<u64, u64>,
    /// Servers whose journal's disk is behind (their last heartbeat said so): they refuse
    /// writes, so they should not lead.
    pub disk_behind: BTreeSet<u64>,
}

/// Leadership moves for load only when the busiest server's leader load is over twice the
/// idlest one's and over it by this many reads and writes per second: small or brief
/// differences are not worth a leader transfer.
const LOAD_GAP_OPS: u64 = 500;

/// The driver's next step, if any (see the module docs for the order).
pub(crate) fn next_step(state: &State, live: &Liveness, max_moves: usize) -> Option<Step> {
    let moving = state.groups.values().filter(|g| g.moving.is_some()).count();
    let draining: BTreeSet<u64> = state
        .servers
        .values()
        .filter(|s| s.draining)
        .map(|s| s.id)
        .collect();
    let targets: BTreeSet<u64> = live.alive.difference(&draining).copied().collect();
    let replica_counts = counts(state, &targets, State::hosts);
    let target_for = |group: &Group| {
        replica_counts
            .iter()
            .filter(|&(&server, _)| !State::hosts(group, server))
            .min_by_key(|&(&server, &count)| (count, server))
            .map(|(&server, _)| server)
    };
    // A move whose target was lost is retargeted; it is under way already, so it does not
    // wait for the rate limit.
    for group in state.groups.values() {
        if let Some(lost) = group
            .moving
            .as_ref()
            .map(|m| m.to_server_id)
            .filter(|to| live.lost.contains(to))
            && let Some(to) = target_for(group)
        {
            return Some(Step::Move {
                group_id: group.id,
                from: lost,
                to,
                reason: "repair",
            });
        }
    }
    // Leaders leave a server whose disk is behind before anything else is balanced: until
    // they do, the groups it leads refuse writes.
    let leader_targets: BTreeSet<u64> = targets.difference(&live.disk_behind).copied().collect();
    if let Some(step) = evict_leaders(state, live, &leader_targets) {
        return Some(step);
    }
    if moving < max_moves {
        for (reason, servers) in [("repair", &live.lost), ("drain", &draining)] {
            for group in state.groups.values().filter(|g| g.moving.is_none()) {
                let from = group.replicas.iter().find(|s| servers.contains(s));
                if let (Some(&from), Some(to)) = (from, target_for(group)) {
                    return Some(Step::Move {
                        group_id: group.id,
                        from,
                        to,
                        reason,
                    });
                }
            }
        }
        if let Some(step) = balance_replicas(state, live, &replica_counts)
            .or_else(|| balance_replica_load(state, live, &targets))
        {
            return Some(step);
        }
    }
    balance_leaders(state, live, &leader_targets)
        .or_else(|| balance_leader_load(state, live, &leader_targets))
}

/// Hands the preferred leadership of a group whose preferred leader's disk is behind to
/// another of its replicas among `targets` (live, not draining, disk not behind). Groups an
/// operator pinned keep their leader.
fn evict_leaders(state: &State, live: &Liveness, targets: &BTreeSet<u64>) -> Option<Step> {
    state.groups.values().find_map(|group| {
        let &first = group.replicas.first()?;
        if group.leader_pinned || !live.disk_behind.contains(&first) || !healthy(group, live) {
            return None;
        }
        let &to = group.replicas.iter().find(|s| targets.contains(s))?;
        Some(Step::Prefer {
            group_id: group.id,
            server_id: to,
        })
    })
}

/// How many groups each of `servers` counts for, by `counts_for(group, server)`.
fn counts(
    state: &State,
    servers: &BTreeSet<u64>,
    counts_for: impl Fn(&Group, u64) -> bool,
) -> BTreeMap<u64, usize> {
    servers
        .iter()
        .map(|&server| {
            let count = state
                .groups
                .values()
                .filter(|group| counts_for(group, server))
                .count();
            (server, count)
        })
        .collect()
}

/// The fullest and the emptiest of `counts`, if they differ by more than one.
fn imbalance(counts: &BTreeMap<u64, usize>) -> Option<(u64, u64)> {
    let (&full, &most) = counts
        .iter()
        .max_by_key(|&(&id, &count)| (count, u64::MAX - id))?;
    let (&empty, &least) = counts.iter().min_by_key(|&(&id, &count)| (count, id))?;
    (most > least + 1).then_some((full, empty))
}

/// Whether every replica of `group` is alive and nothing moves in it.
fn healthy(group: &Group, live: &Liveness) -> bool {
    group.moving.is_none() && group.replicas.iter().all(|s| live.alive.contains(s))
}

fn balance_replicas(
    state: &State,
    live: &Liveness,
    replica_counts: &BTreeMap<u64, usize>,
) -> Option<Step> {
    let (full, empty) = imbalance(replica_counts)?;
    let group = state.groups.values().find(|g| {
        healthy(g, live)
            && !g.replicas_pinned
            && g.replicas.contains(&full)
            && !State::hosts(g, empty)
    })?;
    Some(Step::Move {
        group_id: group.id,
        from: full,
        to: empty,
        reason: crate::moves::REASON_BALANCE,
    })
}

/// Whether `server` is `group`'s preferred leader.
fn leads(group: &Group, server: u64) -> bool {
    group.replicas.first() == Some(&server)
}

fn balance_leaders(state: &State, live: &Liveness, targets: &BTreeSet<u64>) -> Option<Step> {
    let leader_counts = counts(state, targets, leads);
    let (full, empty) = imbalance(&leader_counts)?;
    let group = state.groups.values().find(|g| {
        healthy(g, live)
            && !g.leader_pinned
            && g.replicas.first() == Some(&full)
            && g.replicas.contains(&empty)
    })?;
    Some(Step::Prefer {
        group_id: group.id,
        server_id: empty,
    })
}

/// Hands the preferred leadership of a group from the server whose led groups serve the
/// most reads and writes to the one serving the fewest, when they differ enough.
fn balance_leader_load(state: &State, live: &Liveness, targets: &BTreeSet<u64>) -> Option<Step> {
    let (group_id, _, cool) = shift_load(state, live, targets, leads, |group, _, cool| {
        !group.leader_pinned && group.replicas.contains(&cool)
    })?;
    Some(Step::Prefer {
        group_id,
        server_id: cool,
    })
}

/// Moves a replica from the server whose groups serve the most reads and writes to the one
/// whose groups serve the fewest, when they differ enough.
fn balance_replica_load(state: &State, live: &Liveness, targets: &BTreeSet<u64>) -> Option<Step> {
    let (group_id, hot, cool) =
        shift_load(state, live, targets, State::hosts, |group, _, cool| {
            !group.replicas_pinned && !State::hosts(group, cool)
        })?;
    Some(Step::Move {
        group_id,
        from: hot,
        to: cool,
        reason: crate::moves::REASON_BALANCE,
    })
}

/// A group to shift from the busiest of `targets` to the idlest, as `(group, from, to)`:
/// a server's load is the reads and writes per second of the groups it `carries`. Only
/// when the busiest carries over twice the idlest's load, and `LOAD_GAP_OPS` more. The
/// group is a healthy one that `movable` allows whose load comes closest to halving the
/// difference (one carrying more than the difference would only move the hot spot), and
/// the counts of carried groups stay within one of each other, or count balancing would
/// shift it back.
fn shift_load(
    state: &State,
    live: &Liveness,
    targets: &BTreeSet<u64>,
    carries: impl Fn(&Group, u64) -> bool + Copy,
    movable: impl Fn(&Group, u64, u64) -> bool,
) -> Option<(u64, u64, u64)> {
    let load = |group: &Group| live.group_load.get(&group.id).copied().unwrap_or(0);
    let server_load = |server: u64| -> u64 {
        state
            .groups
            .values()
            .filter(|group| carries(group, server))
            .map(load)
            .sum()
    };
    let loads: BTreeMap<u64, u64> = targets.iter().map(|&s| (s, server_load(s))).collect();
    let (&hot, &hot_load) = loads
        .iter()
        .max_by_key(|&(&id, &load)| (load, u64::MAX - id))?;
    let (&cool, &cool_load) = loads.iter().min_by_key(|&(&id, &load)| (load, id))?;
    let gap = hot_load.saturating_sub(cool_load);
    if hot_load <= cool_load.saturating_mul(2) || gap <= LOAD_GAP_OPS {
        return None;
    }
    let mut after = counts(state, targets, carries);
    *after.entry(hot).or_insert(0) -= 1;
    *after.entry(cool).or_insert(0) += 1;
    if imbalance(&after).is_some() {
        return None;
    }
    let group = state
        .groups
        .values()
        .filter(|g| healthy(g, live) && carries(g, hot) && movable(g, hot, cool))
        .filter(|g| (1..gap).contains(&load(g)))
        .min_by_key(|g| ((gap / 2).abs_diff(load(g)), g.id))?;
    Some((group.id, hot, cool))
}

/// Takes the driver's steps while this replica leads, until shutdown.
pub(crate) async fn placement_loop(core: Arc<Core>) {
    core.every(
        core.config.placement_interval,
        "placement driver step",
        || Arc::clone(&core).place_once(),
    )
    .await;
}

impl Core {
    /// Takes the driver's next step, if this replica serves as leader.
    async fn place_once(self: Arc<Self>) -> Result<(), MasterError> {
        let current = self.stream().leadership();
        if !current.is_leader || *self.serving.borrow() != current.term {
            return Ok(());
        }
        let (step, healthy_groups) = {
            let state = self.read_state();
            let registry = self.registry();
            let now = Instant::now();
            let servers = state.servers.keys().copied();
            let live = Liveness {
                alive: servers
                    .clone()
                    .filter(|&s| registry.is_alive(s, now, self.config.heartbeat_timeout))
                    .collect(),
                lost: servers
                    .filter(|&s| !registry.is_alive(s, now, self.config.repair_after))
                    .collect(),
                group_load: registry.group_loads(),
                disk_behind: registry.disks_behind(),
            };
            let healthy_groups: BTreeSet<u64> = state
                .groups
                .values()
                .filter(|group| healthy(group, &live))
                .map(|group| group.id)
                .collect();
            (
                next_step(&state, &live, self.config.max_moves),
                healthy_groups,
            )
        };
        match step {
            None => {
                self.start_tablet_step(&healthy_groups);
                Ok(())
            }
            Some(Step::Move {
                group_id,
                from,
                to,
                reason,
            }) => self.start_move(group_id, from, to, reason).await,
            Some(Step::Prefer {
                group_id,
                server_id,
            }) => {
                let turn = self.turn().await?;
                let command = Command {
                    proposed_ms: self.config.clock.now_ms(),
                    kind: Some(Kind::SetPreferredLeader(SetPreferredLeader {
                        group_id,
                        server_id,
                        pin: false,
                    })),
                };
                self.propose(&turn, &command).await?;
                tracing::info!(group_id, server_id, "preferred leader rebalanced");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
