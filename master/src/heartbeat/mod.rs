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

    /// The collections whose compactor `server_id` is. For each collection, one of the
    /// live servers with a replica of a group hosting its tablets, chosen by collection id
    /// so that collections spread over the servers. One, since processes compacting the
    /// same tables each do all the work and keep one result; and a choice that holds still
    /// while tablets move between groups on the same servers, since a compaction the old
    /// compactor had under way races the new one's.
    fn compacting_collections(&self, server_id: u64) -> Vec<u64> {
        let mut hosts: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for tablet in self.state.tablets.values() {
            let Some(group) = self.state.groups.get(&tablet.group_id) else {
                continue;
            };
            let live = group.replicas.iter().copied().filter(|&server| {
                self.registry
                    .is_alive(server, self.now, self.heartbeat_timeout)
            });
            hosts.entry(tablet.collection_id).or_default().extend(live);
        }
        hosts
            .into_iter()
            .filter(|(collection_id, servers)| {
                let count = servers.len() as u64;
                count > 0
                    && servers.iter().nth((collection_id % count) as usize) == Some(&server_id)
            })
            .map(|(collection_id, _)| collection_id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use luna_proto::master::TabletInfo;
    use luna_proto::masterlog::Group;

    use super::*;
    use crate::heartbeat::registry::Registry;

    #[test]
    fn each_collection_has_one_live_compactor_among_its_servers() {
        let mut state = State::default();
        for (id, replicas) in [(10, vec![1, 2, 3]), (11, vec![3, 4, 1])] {
            let group = Group {
                id,
                replicas,
                ..Group::default()
            };
            state.groups.insert(id, group);
        }
        // Collection 5 lives in both groups (servers 1 to 4), collection 6 in group 10.
        for (id, collection_id, group_id) in [(20, 5, 10), (21, 5, 11), (22, 6, 10)] {
            let tablet = TabletInfo {
                id,
                collection_id,
                group_id,
                ..TabletInfo::default()
            };
            state.tablets.insert(id, tablet);
        }
        let mut registry = Registry::default();
        let now = Instant::now();
        for server in [1, 2, 3, 4] {
            registry.record(server, now, &HeartbeatRequest::default(), |_| true);
        }
        let compactors = |registry: &Registry, server: u64| {
            let view = View {
                state: &state,
                registry,
                now,
                heartbeat_timeout: Duration::from_secs(5),
                routing_version: 1,
            };
            view.compacting_collections(server)
        };
        // 5 % 4 servers picks the second of {1, 2, 3, 4}; 6 % 3 the first of {1, 2, 3}.
        let chosen: Vec<Vec<u64>> = (1..=4)
            .map(|server| compactors(&registry, server))
            .collect();
        assert_eq!(chosen, vec![vec![6], vec![5], vec![], vec![]]);
        // Server 2 stops heartbeating: collection 5 goes to another of its servers (the
        // third of {1, 3, 4}), and collection 6 stays.
        let mut without_2 = Registry::default();
        for server in [1, 3, 4] {
            without_2.record(server, now, &HeartbeatRequest::default(), |_| true);
        }
        let chosen: Vec<Vec<u64>> = (1..=4)
            .map(|server| compactors(&without_2, server))
            .collect();
        assert_eq!(chosen, vec![vec![6], vec![], vec![], vec![5]]);
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
