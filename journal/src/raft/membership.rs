//! Membership changes of a [`Replica`]: planning a `ConfChangeV2` (learners first, then
//! promotion, by joint consensus), applying committed ones and persisting the conf state,
//! and getting a stream out of a joint configuration its leader left behind.

use std::collections::BTreeSet;

use luna_kernel::stream::StreamError;
use protobuf::Message as _;
use raft::StateRole;
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry,
};
use raft_engine::LogBatch;

use super::replica::{AdminReply, Replica};
use crate::error::JournalError;

/// A learner this many entries behind the committed index may be promoted: under load it is
/// always a round trip behind, and it closes the gap as a voter at once.
const PROMOTE_MAX_LAG: u64 = 64;

/// Who replicates a stream, as one replica has applied it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Voters (of the incoming configuration while a change is in joint consensus).
    pub voters: Vec<u64>,
    /// Learners: they receive the log but neither vote nor count toward commits.
    pub learners: Vec<u64>,
    /// Voters of the outgoing configuration; non-empty only in joint consensus.
    pub outgoing: Vec<u64>,
}

impl Membership {
    pub(super) fn from_conf_state(cs: &ConfState) -> Self {
        let sorted = |ids: &[u64]| {
            let mut ids = ids.to_vec();
            ids.sort_unstable();
            ids
        };
        let mut learners = sorted(&cs.learners);
        learners.extend(&cs.learners_next);
        learners.sort_unstable();
        Self {
            voters: sorted(&cs.voters),
            learners,
            outgoing: sorted(&cs.voters_outgoing),
        }
    }
}

/// A membership change proposed here, until it (and a joint consensus it entered) applies.
pub(super) struct PendingChange {
    index: u64,
    term: u64,
    pub(super) issued: u64,
    entered_joint: bool,
    pub(super) reply: AdminReply,
}

impl Replica {
    /// raft-rs leaves a joint configuration only when the leader that applies the joint
    /// entry proposes the leave entry (its `commit_apply` hook). If that leader crashes
    /// first, or the leave entry is lost with it, a new leader may never propose it
    /// (raft-rs notes this), and the stream stays joint and refuses every later change.
    /// So on every tick a leader in a joint configuration with no change pending proposes
    /// the leave entry itself.
    ///
    /// A leader that is not a voter of the incoming configuration must not leave it: raft-rs
    /// would keep it leading without a progress entry for itself, and panic. It hands the
    /// leadership to the most caught-up incoming voter instead, which then leaves.
    pub(crate) fn leave_stuck_joint(&mut self) {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader || raft.has_pending_conf() {
            return;
        }
        // The applied configuration, read without allocating: this runs on every tick.
        let hand_over = {
            let membership = self.membership.borrow();
            if membership.outgoing.is_empty() {
                return;
            }
            (!membership.voters.contains(&raft.id)).then(|| {
                membership
                    .voters
                    .iter()
                    .copied()
                    .max_by_key(|&id| raft.prs().get(id).map_or(0, |p| p.matched))
            })
        };
        if let Some(best) = hand_over {
            if let Some(to) = best
                && raft.lead_transferee.is_none()
            {
                tracing::info!(
                    stream_id = self.stream_id,
                    to,
                    "handing over a joint configuration"
                );
                self.end_lease();
                self.node.transfer_leader(to);
            }
            return;
        }
        tracing::info!(stream_id = self.stream_id, "leaving a joint configuration");
        // An empty ConfChangeV2 is the leave entry.
        if let Err(e) = self
            .node
            .propose_conf_change(Vec::new(), ConfChangeV2::default())
        {
            tracing::debug!(stream_id = self.stream_id, error = %e, "leave entry dropped");
        }
    }

    /// Proposes the membership `voters` + `learners` by joint consensus (one simple change
    /// when only one node changes). New voters must be learners already, and caught up.
    pub(crate) fn change_membership(
        &mut self,
        voters: &[u64],
        learners: &[u64],
        now: u64,
        reply: AdminReply,
    ) {
        match self.plan_change(voters, learners) {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(changes) if changes.is_empty() => {
                let _ = reply.send(Ok(self.node.raft.raft_log.applied));
            }
            Ok(changes) => {
                let cc = ConfChangeV2 {
                    transition: ConfChangeTransition::Auto,
                    changes: changes.into(),
                    ..Default::default()
                };
                if let Err(e) = self.node.propose_conf_change(Vec::new(), cc) {
                    tracing::debug!(stream_id = self.stream_id, error = %e, "conf change dropped");
                    let _ = reply.send(Err(self.admin_error(self.not_leader())));
                    return;
                }
                self.change = Some(PendingChange {
                    index: self.node.raft.raft_log.last_index(),
                    term: self.node.raft.term,
                    issued: now,
                    entered_joint: false,
                    reply,
                });
            }
        }
    }

    fn plan_change(
        &self,
        voters: &[u64],
        learners: &[u64],
    ) -> Result<Vec<ConfChangeSingle>, JournalError> {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            return Err(self.admin_error(self.not_leader()));
        }
        let target_voters: BTreeSet<u64> = voters.iter().copied().collect();
        let target_learners: BTreeSet<u64> = learners.iter().copied().collect();
        if target_voters.is_empty() {
            return Err(self.membership_error("a stream needs at least one voter"));
        }
        if target_voters.contains(&0) || target_learners.contains(&0) {
            return Err(self.membership_error("0 is not a replica id"));
        }
        if let Some(both) = target_voters.intersection(&target_learners).next() {
            return Err(self.membership_error(format!("{both} is both voter and learner")));
        }
        let current = Membership::from_conf_state(&raft.prs().conf().to_conf_state());
        if self.change.is_some() || raft.has_pending_conf() || !current.outgoing.is_empty() {
            return Err(JournalError::ChangeInProgress {
                stream_id: self.stream_id,
            });
        }
        if !target_voters.contains(&raft.id) {
            return Err(self.membership_error(format!(
                "{} leads: transfer leadership before removing it",
                raft.id
            )));
        }
        let committed = raft.raft_log.committed;
        let mut changes = Vec::new();
        for &id in &target_voters {
            if current.voters.contains(&id) {
                continue;
            }
            if !current.learners.contains(&id) {
                return Err(self.membership_error(format!("add {id} as a learner first")));
            }
            let matched = raft.prs().get(id).map_or(0, |p| p.matched);
            if matched + PROMOTE_MAX_LAG < committed {
                return Err(JournalError::NotCaughtUp {
                    stream_id: self.stream_id,
                    node: id,
                    matched,
                    committed,
                });
            }
            changes.push(single(id, ConfChangeType::AddNode));
        }
        for &id in &target_learners {
            if current.learners.contains(&id) {
                continue;
            }
            // A new replica catches up from index 1, or from the snapshot if the log was
            // compacted.
            changes.push(single(id, ConfChangeType::AddLearnerNode));
        }
        for &id in current.voters.iter().chain(&current.learners) {
            if !target_voters.contains(&id) && !target_learners.contains(&id) {
                changes.push(single(id, ConfChangeType::RemoveNode));
            }
        }
        Ok(changes)
    }

    /// raft turns a conf change it will not take (one is already pending) into an empty
    /// normal entry; a new leader's entry may also have overwritten the proposal.
    pub(super) fn settle_refused_change(&mut self, entry: &Entry) {
        let Some(change) = self.change.take_if(|c| c.index == entry.index) else {
            return;
        };
        let error = if change.term == entry.term {
            JournalError::ChangeInProgress {
                stream_id: self.stream_id,
            }
        } else {
            self.admin_error(self.not_leader())
        };
        let _ = change.reply.send(Err(error));
    }

    pub(super) fn apply_conf_change(
        &mut self,
        entry: &Entry,
        batch: &mut LogBatch,
    ) -> Result<(), StreamError> {
        let cc =
            ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| StreamError::Corruption {
                location: format!("stream {} index {}", self.stream_id, entry.index),
                reason: format!("conf change does not decode: {e}"),
            })?;
        // Every replica applies the same entries to the same configuration, so a change
        // raft refuses is refused everywhere and the configurations stay equal.
        let conf_state = match self.node.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                tracing::warn!(stream_id = self.stream_id, index = entry.index, error = %e,
                    "raft refused a committed conf change");
                if let Some(change) = self.change.take_if(|c| c.index == entry.index) {
                    let error = self.membership_error(format!("raft refused the change: {e}"));
                    let _ = change.reply.send(Err(error));
                }
                return Ok(());
            }
        };
        self.node
            .mut_store()
            .set_conf_state(&conf_state, entry.index, batch)
            .map_err(|e| StreamError::Io {
                context: format!("staging the conf state of stream {}", self.stream_id),
                source: std::sync::Arc::new(std::io::Error::other(e.to_string())),
            })?;
        let raft = &mut self.node.raft;
        if raft.state == StateRole::Leader && !conf_state.voters.contains(&raft.id) {
            // raft-rs keeps a leader that a committed change removed in the leader state
            // with no progress entry for itself, and panics at its next commit. (A leader
            // elected during a joint change may be a voter of the outgoing half only, and
            // commit the leave entry.) It steps down instead; the others elect a leader.
            tracing::info!(
                stream_id = self.stream_id,
                "stepping down: removed as a voter"
            );
            let term = raft.term;
            raft.become_follower(term, raft::INVALID_ID);
            // No entry reaches a removed replica any more, so its waiting appends would
            // never settle: their outcome is unknown, which is what `Closed` says.
            for (_, (_, reply)) in std::mem::take(&mut self.appends) {
                let _ = reply.send(Err(StreamError::Closed));
            }
        }
        let membership = Membership::from_conf_state(&conf_state);
        let joint = !membership.outgoing.is_empty();
        self.membership.send_replace(membership);
        let Some(change) = self.change.as_mut() else {
            return Ok(());
        };
        let done = if change.index == entry.index {
            if change.term != entry.term {
                Some(Err(self.not_leader()))
            } else if joint {
                change.entered_joint = true;
                None
            } else {
                Some(Ok(entry.index))
            }
        } else {
            (change.entered_joint && !joint).then_some(Ok(entry.index))
        };
        if let Some(result) = done
            && let Some(change) = self.change.take()
        {
            let _ = change.reply.send(result.map_err(|e| self.admin_error(e)));
        }
        Ok(())
    }
}

fn single(node_id: u64, change_type: ConfChangeType) -> ConfChangeSingle {
    ConfChangeSingle {
        change_type,
        node_id,
        ..Default::default()
    }
}
