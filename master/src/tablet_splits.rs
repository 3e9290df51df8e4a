//! Splitting a tablet in two within its group (docs/elasticity.md): the master's side.
//!
//! `StartTabletSplit` records the split and the right half's id; the tablet keeps its range
//! and is routed as before. The leader then asks the tablet's group to split it (seal,
//! drain, flush, and a `SplitTablet` entry that opens both halves), and `EndTabletSplit`
//! routes the halves. Asking the group again answers where it split, so a new leader
//! resumes a split from its log; one that cannot seal the tablet is cancelled (unsealed)
//! unless the group has split it already. While a split is under way, the group's
//! assignment keeps the tablet at its old epoch (a group never goes back to a lower one)
//! and lists the right half as `adopting`, which the group neither opens nor closes by
//! itself.

use bytes::Bytes;
use luna_proto::group::SplitTabletRequest as GroupSplitRequest;
use luna_proto::keys;
use luna_proto::master::{KeyRange, Partitioning, TabletInfo, TabletSplit};
use luna_proto::masterlog::command::Kind;
use luna_proto::masterlog::{EndTabletSplit, StartTabletSplit};

use crate::core::Core;
use crate::error::MasterError;
use crate::state::State;
use crate::tablet_moves::{Driving, SEAL_DEADLINE};

impl State {
    /// Starts splitting a tablet (see `StartTabletSplit` in master_log.proto).
    pub(crate) fn start_tablet_split(
        &mut self,
        proposed_ms: u64,
        start: &StartTabletSplit,
    ) -> Result<(), MasterError> {
        let tablet = self.tablet(start.tablet_id)?;
        if self.tablet_moves.contains_key(&tablet.id) || self.tablet_splits.contains_key(&tablet.id)
        {
            return Err(MasterError::precondition(format!(
                "tablet {} is moving or splitting already; wait for that to end",
                tablet.id
            )));
        }
        if !start.at.is_empty() && !strictly_inside(tablet, &start.at) {
            return Err(MasterError::invalid(format!(
                "the split key {:?} is not inside tablet {}",
                String::from_utf8_lossy(&start.at),
                tablet.id
            )));
        }
        let split = TabletSplit {
            tablet_id: tablet.id,
            new_tablet_id: start.new_tablet_id,
            at: start.at.clone(),
            from_epoch: tablet.epoch,
            started_ms: proposed_ms,
        };
        self.next_id = self.check_fresh(&[start.new_tablet_id])?;
        if start.reason == crate::moves::REASON_ADMIN {
            self.pinned_tablets
                .extend([split.tablet_id, split.new_tablet_id]);
        }
        self.tablet_splits.insert(split.tablet_id, split);
        Ok(())
    }

    /// Ends a split: with `done`, routes the two halves.
    pub(crate) fn end_tablet_split(&mut self, end: &EndTabletSplit) -> Result<(), MasterError> {
        let split = self.tablet_splits.get(&end.tablet_id).ok_or_else(|| {
            MasterError::precondition(format!("tablet {} is not splitting", end.tablet_id))
        })?;
        if end.done {
            let tablet = self.tablet(end.tablet_id)?;
            if !strictly_inside(tablet, &end.at) {
                return Err(MasterError::invalid(format!(
                    "tablet {} cannot split at {:?}, outside it",
                    tablet.id,
                    String::from_utf8_lossy(&end.at)
                )));
            }
            let range = tablet.range.clone().unwrap_or_default();
            let left = TabletInfo {
                epoch: split.from_epoch + 1,
                range: Some(KeyRange {
                    start: range.start,
                    end: Some(end.at.to_vec()),
                }),
                ..tablet.clone()
            };
            let right = TabletInfo {
                id: split.new_tablet_id,
                range: Some(KeyRange {
                    start: end.at.to_vec(),
                    end: range.end,
                }),
                ..left.clone()
            };
            if let Some(collection) = self.collections.get_mut(&left.collection_id) {
                collection.tablet_count += 1;
            }
            self.tablets.insert(left.id, left);
            self.tablets.insert(right.id, right);
        }
        self.tablet_splits.remove(&end.tablet_id);
        Ok(())
    }
}

/// Whether `at` cuts `tablet`'s range into two non-empty halves.
fn strictly_inside(tablet: &TabletInfo, at: &[u8]) -> bool {
    let range = tablet.range.clone().unwrap_or_default();
    at > range.start.as_slice() && range.end.as_deref().is_none_or(|end| at < end)
}

impl Core {
    /// Splits tablet `tablet_id` at `at` (empty: in the middle) and answers its halves once
    /// its group serves them.
    /// `epoch`, when not 0, is the tablet's epoch as the caller saw it.
    pub async fn split_tablet(
        &self,
        tablet_id: u64,
        at: Vec<u8>,
        epoch: u64,
    ) -> Result<(TabletInfo, TabletInfo), MasterError> {
        {
            let state = self.read_state();
            let tablet = state.tablet(tablet_id)?;
            if epoch != 0 && tablet.epoch != epoch && !state.tablet_splits.contains_key(&tablet_id)
            {
                return Err(MasterError::precondition(format!(
                    "tablet {tablet_id} is at epoch {}, not {epoch}: it split or moved since; \
                     see `luna tablets`",
                    tablet.epoch
                )));
            }
        }
        self.split_tablet_for(tablet_id, at, crate::moves::REASON_ADMIN)
            .await
    }

    /// [`Core::split_tablet`], for `reason` ("admin" pins both halves).
    pub(crate) async fn split_tablet_for(
        &self,
        tablet_id: u64,
        at: Vec<u8>,
        reason: &str,
    ) -> Result<(TabletInfo, TabletInfo), MasterError> {
        let planned = {
            let state = self.read_state();
            let tablet = state.tablet(tablet_id)?;
            match state.tablet_splits.get(&tablet_id) {
                // Asked again (a client's retry): join the split under way.
                Some(split) => Err(split.new_tablet_id),
                None => Ok(split_key(tablet, at)?),
            }
        };
        let new_tablet_id = match planned {
            Ok(at) => self.propose_split_start(tablet_id, at, reason).await?,
            Err(new_tablet_id) => new_tablet_id,
        };
        self.drive_tablet_split(tablet_id).await?;
        let state = self.read_state();
        match (
            state.tablets.get(&tablet_id),
            state.tablets.get(&new_tablet_id),
        ) {
            (Some(left), Some(right)) => Ok((left.clone(), right.clone())),
            _ => Err(MasterError::precondition(format!(
                "the split of tablet {tablet_id} was cancelled"
            ))),
        }
    }

    /// Persists the start of a split and answers the right half's id.
    async fn propose_split_start(
        &self,
        tablet_id: u64,
        at: Vec<u8>,
        reason: &str,
    ) -> Result<u64, MasterError> {
        let turn = self.turn().await?;
        let new_tablet_id = self.read_state().next_id;
        let command = luna_proto::masterlog::Command {
            proposed_ms: self.config.clock.now_ms(),
            kind: Some(Kind::StartTabletSplit(StartTabletSplit {
                tablet_id,
                new_tablet_id,
                at,
                reason: reason.to_owned(),
            })),
        };
        self.propose(&turn, &command).await?;
        tracing::info!(tablet_id, new_tablet_id, reason, "tablet split started");
        Ok(new_tablet_id)
    }

    /// Takes tablet `tablet_id`'s split through its remaining steps (one driver per tablet).
    pub(crate) async fn drive_tablet_split(&self, tablet_id: u64) -> Result<(), MasterError> {
        let Some(_driving) = Driving::claim(self, tablet_id) else {
            return self.wait_operation_ended(tablet_id).await;
        };
        let (Some(split), Some(group_id)) = ({
            let state = self.read_state();
            (
                state.tablet_splits.get(&tablet_id).cloned(),
                state.tablets.get(&tablet_id).map(|t| t.group_id),
            )
        }) else {
            return Ok(());
        };
        let request = GroupSplitRequest {
            group_id,
            tablet_id,
            epoch: split.from_epoch,
            new_tablet_id: split.new_tablet_id,
            at: Bytes::from(split.at.clone()),
            cancel: false,
        };
        let call = |request: GroupSplitRequest| {
            move |mut client: luna_proto::group::group_control_client::GroupControlClient<
                tonic::transport::Channel,
            >| {
                let request = request.clone();
                async move {
                    let reply = client.split_tablet(request).await?.into_inner();
                    Ok((reply.error.clone(), reply))
                }
            }
        };
        let (done, at, failure) = match self
            .call_group(
                group_id,
                tablet_id,
                Some(SEAL_DEADLINE),
                call(request.clone()),
            )
            .await
        {
            Ok(reply) => (true, reply.at, None),
            Err(error) => {
                let cancel = GroupSplitRequest {
                    cancel: true,
                    ..request
                };
                let reply = self
                    .call_group(group_id, tablet_id, None, call(cancel))
                    .await?;
                (reply.split, reply.at, Some(error))
            }
        };
        self.propose_move_step(Kind::EndTabletSplit(EndTabletSplit {
            tablet_id,
            done,
            at: at.to_vec(),
        }))
        .await?;
        match failure {
            Some(error) if !done => {
                tracing::warn!(tablet_id, %error, "tablet split cancelled");
                Err(MasterError::precondition(format!(
                    "the split of tablet {tablet_id} was cancelled: {error}"
                )))
            }
            _ => {
                tracing::info!(
                    tablet_id,
                    new_tablet_id = split.new_tablet_id,
                    "tablet split"
                );
                Ok(())
            }
        }
    }
}

/// Where to split `tablet`: `at` if given (a range collection's key), else the middle of a
/// hash tablet's hash range; empty for a range tablet, whose group finds the middle of its
/// data.
fn split_key(tablet: &TabletInfo, at: Vec<u8>) -> Result<Vec<u8>, MasterError> {
    let range = tablet.range.clone().unwrap_or_default();
    match (tablet.partitioning(), at.is_empty()) {
        (Partitioning::Hash, true) => keys::hash_range_middle(&range.start, range.end.as_deref())
            .ok_or_else(|| {
                MasterError::precondition(format!(
                    "tablet {} covers one hash value and cannot split",
                    tablet.id
                ))
            }),
        (Partitioning::Hash, false) => Err(MasterError::invalid(
            "a hash collection's tablet splits in the middle of its hash range: give no key",
        )),
        (Partitioning::Range, _) if !at.is_empty() && !strictly_inside(tablet, &at) => {
            Err(MasterError::invalid(format!(
                "the split key {:?} is not inside tablet {}",
                String::from_utf8_lossy(&at),
                tablet.id
            )))
        }
        (Partitioning::Range, _) => Ok(at),
    }
}
