//! Tablet-server heartbeats: what the master tells a server to host.

pub(crate) mod registry;

use std::collections::{BTreeMap, BTreeSet};

use luna_proto::master::{GroupAssignment, HeartbeatRequest, HeartbeatResponse};

use crate::error::MasterError;
use crate::routing::View;
use crate::state::State;

/// Longest address a server may report.
const MAX_ADDR_LEN: usize = 256;

/// Rejects heartbeats whose addresses cannot be served to clients.
pub(crate) fn validate(request: &HeartbeatRequest) -> Result<(), MasterError> {
    if request.addr.is_empty() {
        return Err(MasterError::invalid(
            "the heartbeat has no addr: a tablet server must report its tablet service address",
        ));
    }
    for (name, addr) in [
        ("addr", &request.addr),
        ("raft_addr", &request.raft_addr),
        ("http_addr", &request.http_addr),
    ] {
        if addr.len() > MAX_ADDR_LEN {
            return Err(MasterError::invalid(format!(
                "{name} has {} bytes, more than {MAX_ADDR_LEN}",
                addr.len()
            )));
        }
    }
    Ok(())
}

impl View<'_> {
    /// The complete set of group replicas `server_id` should host, with their peers.
    /// Groups the server reports hosting whose replicas there may go are listed as removed.
    pub fn heartbeat_response(
        &self,
        server_id: u64,
        request: &HeartbeatRequest,
    ) -> HeartbeatResponse {
        let mut peers = BTreeSet::new();
        let groups = self
            .state
            .groups
            .values()
            .filter(|g| State::hosts(g, server_id))
            .map(|group| {
                peers.extend(group.replicas.iter().copied());
                peers.extend(group.moving.as_ref().map(|m| m.from_server_id));
                let (tablets, adopting) = self.state.assigned_tablets(group.id);
                GroupAssignment {
                    group_id: group.id,
                    voters: group.replicas.clone(),
                    tablets,
                    adopting,
                    initial_voters: if group.initial_voters.is_empty() {
                        group.replicas.clone()
                    } else {
                        group.initial_voters.clone()
                    },
                }
            })
            .collect();
        let peers = peers
            .into_iter()
            .filter_map(|id| self.state.servers.get(&id))
            .map(|server| self.server_info(server))
            .collect();
        // Unassigned is not enough: a replica whose move was retargeted may already be a
        // voter, and deleting a voter's log would let it vote again without it.
        let removed_groups = request
            .groups
            .iter()
            .map(|report| report.group_id)
            .filter(|&group_id| {
                let assigned = self
                    .state
                    .groups
                    .get(&group_id)
                    .is_some_and(|group| State::hosts(group, server_id));
                !assigned && self.registry.left_out(group_id, server_id)
            })
            .collect();
        HeartbeatResponse {
            server_id,
            groups,
            peers,
            routing_version: self.routing_version,
            gc_safe_point: self.state.gc_safe_point,
            removed_groups,
            txn_record_floor: self.registry.lock_floor(self.state.groups.keys().copied()),
            compacting_collections: self.compacting_collections(server_id),
        }
    }

    /// The collections whose compactor `server_id` is: for each collection, the leader
    /// of the group hosting its first tablet (by id), or while that group's leader is
    /// unknown its first voter. One server per collection, since processes compacting
    /// the same tables each do all the work and keep one result; and a leader, since it
    /// flushes (and so learns of new tables) first.
    fn compacting_collections(&self, server_id: u64) -> Vec<u64> {
        let mut first_tablets: BTreeMap<u64, u64> = BTreeMap::new();
        for tablet in self.state.tablets.values() {
            first_tablets
                .entry(tablet.collection_id)
                .or_insert(tablet.group_id);
        }
        first_tablets
            .into_iter()
            .filter(|&(_, group_id)| {
                let leader = self.registry.leader(group_id).server_id;
                let compactor = if leader != 0 {
                    Some(leader)
                } else {
                    let group = self.state.groups.get(&group_id);
                    group.and_then(|group| group.replicas.first().copied())
                };
                compactor == Some(server_id)
            })
            .map(|(collection_id, _)| collection_id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use luna_proto::master::{GroupReport, TabletInfo};
    use luna_proto::masterlog::Group;

    use super::*;
    use crate::heartbeat::registry::Registry;

    #[test]
    fn each_collection_has_one_compactor_the_leader_of_its_first_tablet() {
        let mut state = State::default();
        for (id, replicas) in [(10, vec![1, 2, 3]), (11, vec![3, 1, 2])] {
            let group = Group {
                id,
                replicas,
                ..Group::default()
            };
            state.groups.insert(id, group);
        }
        // Collection 5's first tablet is in group 10, collection 6's in group 11.
        for (id, collection_id, group_id) in [(20, 5, 10), (21, 5, 11), (22, 6, 11)] {
            let tablet = TabletInfo {
                id,
                collection_id,
                group_id,
                ..TabletInfo::default()
            };
            state.tablets.insert(id, tablet);
        }
        let mut registry = Registry::default();
        let leads_group_10 = HeartbeatRequest {
            groups: vec![GroupReport {
                group_id: 10,
                is_leader: true,
                term: 2,
                leader_server_id: 2,
                ..GroupReport::default()
            }],
            ..HeartbeatRequest::default()
        };
        registry.record(2, Instant::now(), &leads_group_10, |_| true);
        let view = View {
            state: &state,
            registry: &registry,
            now: Instant::now(),
            heartbeat_timeout: Duration::from_secs(5),
            routing_version: 1,
        };
        // Group 10's reported leader compacts collection 5; group 11 has no known leader,
        // so its first voter compacts collection 6.
        assert_eq!(view.compacting_collections(2), vec![5]);
        assert_eq!(view.compacting_collections(3), vec![6]);
        assert!(view.compacting_collections(1).is_empty());
    }

    #[test]
    fn heartbeats_need_a_usable_address() {
        let mut request = HeartbeatRequest::default();
        assert!(matches!(
            validate(&request),
            Err(MasterError::InvalidArgument { .. })
        ));
        request.addr = "127.0.0.1:7421".into();
        assert!(validate(&request).is_ok());
        request.http_addr = "h".repeat(MAX_ADDR_LEN + 1);
        assert!(validate(&request).is_err());
    }
}
