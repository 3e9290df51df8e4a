//! Moving replicas between servers: the admin operations (`MoveReplica`, `DrainServer`),
//! and ending a move once the group's leader reports it applied.
//!
//! A move is persisted in one step (`MoveReplica`): the target takes the source's place
//! among the group's replicas, and the source keeps hosting. The group's leader then
//! changes the journal membership to match (learner, catch up, joint consensus; see the
//! tablet server's `membership.rs`), and reports it in its heartbeats. The master ends the
//! move (`EndMove`) when a report matches, and the source stops hosting. Every step is in
//! the master's log or derived from reports, so a master failover loses nothing: the new
//! leader sends the same assignments and ends the move from the next report.

use luna_proto::master::{GroupInfo, GroupReport, HeartbeatRequest, ServerInfo};
use luna_proto::masterlog::command::Kind;
use luna_proto::masterlog::{Command, EndMove, MoveReplica, SetDraining};

use crate::core::Core;
use crate::error::MasterError;

/// Why a move was started, as [`ReplicaMove::reason`](luna_proto::master::ReplicaMove) says.
pub(crate) const REASON_ADMIN: &str = "admin";
/// A move the placement driver makes to even out load or counts.
pub(crate) const REASON_BALANCE: &str = "balance";

impl Core {
    /// Starts moving group `group_id`'s replica on server `from` to server `to`; answers once
    /// the move is persisted.
    pub async fn move_replica(
        &self,
        group_id: u64,
        from: u64,
        to: u64,
    ) -> Result<GroupInfo, MasterError> {
        if !self.alive_servers().contains(&to) {
            return Err(MasterError::precondition(format!(
                "server {to} is not a live tablet server; a replica can only move to one"
            )));
        }
        self.start_move(group_id, from, to, REASON_ADMIN).await?;
        self.group_info(group_id)
    }

    /// Persists a `MoveReplica` (apply checks it against the state).
    pub(crate) async fn start_move(
        &self,
        group_id: u64,
        from: u64,
        to: u64,
        reason: &str,
    ) -> Result<(), MasterError> {
        let turn = self.turn().await?;
        let command = Command {
            proposed_ms: self.config.clock.now_ms(),
            kind: Some(Kind::MoveReplica(MoveReplica {
                group_id,
                from,
                to,
                reason: reason.to_owned(),
            })),
        };
        self.propose(&turn, &command).await?;
        tracing::info!(group_id, from, to, reason, "replica move started");
        Ok(())
    }

    /// Marks server `server_id` as draining (or not, with `cancel`).
    pub async fn drain_server(
        &self,
        server_id: u64,
        cancel: bool,
    ) -> Result<ServerInfo, MasterError> {
        let turn = self.turn().await?;
        let command = Command {
            proposed_ms: self.config.clock.now_ms(),
            kind: Some(Kind::SetDraining(SetDraining {
                server_id,
                draining: !cancel,
            })),
        };
        self.propose(&turn, &command).await?;
        drop(turn);
        self.view(|view| {
            let server = view.state.servers.get(&server_id);
            server.map(|server| view.server_info(server))
        })
        .ok_or_else(|| MasterError::not_found(format!("there is no server {server_id}")))
    }

    /// Ends the moves whose group leaders in `request` (from server `server_id`) report the
    /// journal membership equal to the group's replicas.
    pub(crate) async fn end_applied_moves(&self, server_id: u64, request: &HeartbeatRequest) {
        let done: Vec<EndMove> = {
            let state = self.read_state();
            request
                .groups
                .iter()
                .filter(|report| report.is_leader)
                .filter_map(|report| {
                    let group = state.groups.get(&report.group_id)?;
                    let moving = group.moving.as_ref()?;
                    applied(report, &group.replicas).then_some(EndMove {
                        group_id: group.id,
                        to: moving.to_server_id,
                    })
                })
                .collect()
        };
        for end in done {
            let Ok(turn) = self.turn().await else {
                return;
            };
            let (group_id, to) = (end.group_id, end.to);
            let command = Command {
                proposed_ms: self.config.clock.now_ms(),
                kind: Some(Kind::EndMove(end)),
            };
            match self.propose(&turn, &command).await {
                Ok(()) => tracing::info!(group_id, to, leader = server_id, "replica move done"),
                // Another heartbeat ended it first, or a retarget overtook this report.
                Err(error) => tracing::debug!(group_id, to, %error, "ending a replica move"),
            }
        }
    }

    fn group_info(&self, group_id: u64) -> Result<GroupInfo, MasterError> {
        self.view(|view| view.groups().into_iter().find(|g| g.id == group_id))
            .ok_or_else(|| MasterError::not_found(format!("there is no group {group_id}")))
    }
}

/// Whether a leader's report shows the journal membership at exactly `replicas`: no joint
/// consensus, no learner left.
fn applied(report: &GroupReport, replicas: &[u64]) -> bool {
    let mut voters = report.voters.clone();
    voters.sort_unstable();
    let mut wanted = replicas.to_vec();
    wanted.sort_unstable();
    voters == wanted && report.learners.is_empty() && report.outgoing_voters.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_is_applied_only_once_the_membership_matches_exactly() {
        let report = |voters: &[u64], learners: &[u64], outgoing: &[u64]| GroupReport {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            outgoing_voters: outgoing.to_vec(),
            ..GroupReport::default()
        };
        let replicas = [4, 2, 3];
        assert!(applied(&report(&[2, 3, 4], &[], &[]), &replicas));
        // The learner is still catching up.
        assert!(!applied(&report(&[1, 2, 3], &[4], &[]), &replicas));
        // In joint consensus.
        assert!(!applied(&report(&[2, 3, 4], &[], &[1, 2, 3]), &replicas));
        assert!(!applied(&report(&[1, 2, 3], &[], &[]), &replicas));
    }
}
