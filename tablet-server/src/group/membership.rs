//! The group's journal membership, which its leader keeps in line with the master's list
//! of voters: how a replica moves between servers.
//!
//! The master persists a move as a new list of voters (the target replaces the source).
//! On every heartbeat the leader takes one step toward that list, in this order, so each
//! step is safe on its own and a step that fails is simply taken again:
//!
//! 1. learners the list no longer wants are removed (a move that was retargeted);
//! 2. a server on the list that holds no replica joins as a learner, and catches up from
//!    the log (or a snapshot of the group, which points at the shared base data: nothing
//!    is copied);
//! 3. a leader that is not on the list hands leadership to a voter that is;
//! 4. the voters switch to the list by joint consensus, which the journal refuses until
//!    the learners have caught up, and leaves by itself.
//!
//! The master sees the result in the leader's heartbeat report and ends the move.

use std::collections::BTreeSet;

use super::Group;

impl Group {
    /// On a serving leader: takes the next step toward journal voters `voters` (see the
    /// module docs); anywhere else, nothing.
    pub(crate) async fn reconcile_membership(&self, voters: &[u64]) {
        if self.serving.borrow().is_none() || voters.is_empty() {
            return;
        }
        let current = self.stream.membership();
        if !current.outgoing.is_empty() {
            // Joint consensus: the journal leaves it by itself.
            return;
        }
        let wanted: BTreeSet<u64> = voters.iter().copied().collect();
        let voting: BTreeSet<u64> = current.voters.iter().copied().collect();
        let (step, result) =
            if let Some(&stale) = current.learners.iter().find(|id| !wanted.contains(id)) {
                let learners: Vec<u64> = current
                    .learners
                    .iter()
                    .copied()
                    .filter(|&id| id != stale)
                    .collect();
                (
                    "removing a learner",
                    self.stream
                        .change_membership(&current.voters, &learners)
                        .await,
                )
            } else if let Some(&new) = wanted
                .iter()
                .find(|id| !voting.contains(id) && !current.learners.contains(id))
            {
                ("adding a learner", self.stream.add_learner(new).await)
            } else if !wanted.contains(&self.ctx.server_id) {
                let Some(&to) = voters.iter().find(|id| voting.contains(id)) else {
                    return;
                };
                (
                    "handing leadership over before leaving",
                    self.stream.transfer_leader(to).await,
                )
            } else if wanted != voting {
                (
                    "switching voters",
                    self.stream.change_membership(voters, &[]).await,
                )
            } else {
                return;
            };
        match result {
            Ok(_) => tracing::info!(group = self.id, ?voters, step, "group membership changed"),
            // Catching up, a change still in flight, a lost leadership: the next heartbeat
            // takes the step again.
            Err(error) => {
                tracing::debug!(group = self.id, ?voters, step, %error, "group membership")
            }
        }
    }
}
