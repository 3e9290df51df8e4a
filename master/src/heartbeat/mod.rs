//! Tablet-server heartbeats: what the master tells a server to host.

pub(crate) mod registry;

use std::collections::BTreeSet;

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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
