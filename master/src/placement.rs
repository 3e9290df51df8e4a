//! Initial placement: which groups a new collection's tablets go to, and which groups to
//! create first.
//!
//! Groups form pools by replication factor. A pool is kept at `groups_per_server` x live
//! servers healthy groups (every replica alive); missing groups are created when a
//! collection needs them. Group `i` of a pool takes `rf` consecutive live servers starting
//! at server `i mod n`, so consecutive groups have different first replicas (the preferred
//! leader) and replicas spread evenly. Each tablet then goes to the healthy group with the
//! fewest tablets, ties to the lowest id. Everything here is a pure function of the state
//! and the live set, computed on the leader before proposing.

use std::collections::BTreeMap;

use luna_proto::masterlog::Group;

use crate::error::MasterError;
use crate::state::State;

/// Hands out ids from the state's one sequence while a command is being built.
#[derive(Debug)]
pub(crate) struct Ids {
    next: u64,
}

impl Ids {
    /// Starts at the state's next id.
    pub fn new(state: &State) -> Self {
        Self {
            next: state.next_id,
        }
    }

    /// The next fresh id.
    pub fn take(&mut self) -> u64 {
        let id = self.next;
        self.next = self.next.saturating_add(1);
        id
    }
}

/// Where a new collection's tablets go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    /// Groups to create with the collection.
    pub new_groups: Vec<Group>,
    /// The group of each tablet, in tablet order.
    pub tablet_groups: Vec<u64>,
}

/// Places `tablets` tablets with replication factor `rf` on the `alive` servers (sorted by
/// id, all registered).
pub(crate) fn place(
    state: &State,
    alive: &[u64],
    rf: u32,
    groups_per_server: u32,
    tablets: usize,
    ids: &mut Ids,
) -> Result<Placement, MasterError> {
    let rf_servers = usize::try_from(rf).unwrap_or(usize::MAX);
    if alive.len() < rf_servers {
        return Err(MasterError::precondition(format!(
            "replication factor {rf} needs {rf} live tablet servers, {} are alive; start more \
             tablet servers or use a lower replication_factor",
            alive.len()
        )));
    }
    let pool: Vec<&Group> = state
        .groups
        .values()
        .filter(|g| g.replicas.len() == rf_servers)
        .collect();
    let healthy: Vec<u64> = pool
        .iter()
        .filter(|g| g.replicas.iter().all(|s| alive.binary_search(s).is_ok()))
        .map(|g| g.id)
        .collect();
    let target = usize::try_from(groups_per_server)
        .unwrap_or(usize::MAX)
        .saturating_mul(alive.len());
    let mut new_groups = Vec::new();
    for i in pool.len()..pool.len() + target.saturating_sub(healthy.len()) {
        let replicas = (0..rf_servers)
            .map(|j| alive[(i + j) % alive.len()])
            .collect();
        new_groups.push(Group {
            id: ids.take(),
            replicas,
            ..Group::default()
        });
    }
    let counts = state.tablet_counts();
    let mut load: BTreeMap<u64, u32> = healthy
        .iter()
        .chain(new_groups.iter().map(|g| &g.id))
        .map(|id| (*id, counts.get(id).copied().unwrap_or(0)))
        .collect();
    let mut tablet_groups = Vec::with_capacity(tablets);
    for _ in 0..tablets {
        // BTreeMap iterates by id, and min_by_key keeps the first minimum: ties go to the
        // lowest id.
        let Some((&group, count)) = load.iter_mut().min_by_key(|(_, count)| **count) else {
            return Err(MasterError::internal("no group to place a tablet on"));
        };
        *count += 1;
        tablet_groups.push(group);
    }
    Ok(Placement {
        new_groups,
        tablet_groups,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use luna_proto::master::TabletInfo;
    use luna_proto::masterlog::Server;

    use super::*;

    fn state_with_servers(n: u64) -> State {
        let mut state = State::default();
        for id in 1..=n {
            state.servers.insert(
                id,
                Server {
                    id,
                    ..Server::default()
                },
            );
        }
        state.next_id = n + 1;
        state
    }

    /// Adds the placement to the state as if the command had been applied.
    fn commit(state: &mut State, placement: &Placement, ids: &mut Ids) {
        for group in &placement.new_groups {
            state.groups.insert(group.id, group.clone());
        }
        for &group_id in &placement.tablet_groups {
            let id = ids.take();
            let tablet = TabletInfo {
                id,
                group_id,
                ..TabletInfo::default()
            };
            state.tablets.insert(id, tablet);
        }
        state.next_id = ids.take();
    }

    #[test]
    fn groups_use_distinct_servers_and_rotate_their_leader() {
        let state = state_with_servers(4);
        let mut ids = Ids::new(&state);
        let placement = place(&state, &[1, 2, 3, 4], 3, 2, 8, &mut ids).unwrap_or_else(|e| {
            panic!("{e}");
        });
        assert_eq!(placement.new_groups.len(), 8);
        for group in &placement.new_groups {
            let distinct: BTreeSet<u64> = group.replicas.iter().copied().collect();
            assert_eq!(distinct.len(), 3, "{group:?}");
        }
        let firsts: Vec<u64> = placement.new_groups.iter().map(|g| g.replicas[0]).collect();
        assert_eq!(firsts, vec![1, 2, 3, 4, 1, 2, 3, 4]);
        let mut replicas_per_server: BTreeMap<u64, usize> = BTreeMap::new();
        for server in placement.new_groups.iter().flat_map(|g| &g.replicas) {
            *replicas_per_server.entry(*server).or_default() += 1;
        }
        assert!(replicas_per_server.values().all(|&n| n == 6));
    }

    #[test]
    fn tablets_balance_across_groups_over_many_collections() {
        let mut state = state_with_servers(3);
        for tablets in [5, 1, 4, 2] {
            let mut ids = Ids::new(&state);
            let placement = place(&state, &[1, 2, 3], 3, 1, tablets, &mut ids)
                .unwrap_or_else(|e| panic!("{e}"));
            commit(&mut state, &placement, &mut ids);
        }
        assert_eq!(state.groups.len(), 3, "the pool is created once");
        let counts: Vec<u32> = state.tablet_counts().values().copied().collect();
        assert_eq!(counts, vec![4, 4, 4]);
    }

    #[test]
    fn too_few_live_servers_is_a_failed_precondition() {
        let state = state_with_servers(3);
        let mut ids = Ids::new(&state);
        let error = place(&state, &[1, 2], 3, 1, 1, &mut ids).err();
        let Some(MasterError::FailedPrecondition { message }) = error else {
            panic!("expected a failed precondition, got {error:?}");
        };
        assert!(message.contains("needs 3 live"), "{message}");
        assert!(message.contains("2 are alive"), "{message}");
    }

    #[test]
    fn groups_with_a_dead_replica_get_no_new_tablets() {
        let mut state = state_with_servers(4);
        let mut ids = Ids::new(&state);
        let first = place(&state, &[1, 2, 3], 3, 1, 3, &mut ids).unwrap_or_else(|e| {
            panic!("{e}");
        });
        commit(&mut state, &first, &mut ids);
        // Server 3 died, server 4 joined: every old group has 3 as a replica.
        let mut ids = Ids::new(&state);
        let second = place(&state, &[1, 2, 4], 3, 1, 3, &mut ids).unwrap_or_else(|e| {
            panic!("{e}");
        });
        assert_eq!(second.new_groups.len(), 3);
        let new: BTreeSet<u64> = second.new_groups.iter().map(|g| g.id).collect();
        assert!(second.tablet_groups.iter().all(|g| new.contains(g)));
        assert!(second.new_groups.iter().all(|g| !g.replicas.contains(&3)));
    }
}
