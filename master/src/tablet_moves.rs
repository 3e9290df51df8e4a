//! Moving a tablet to another group (docs/elasticity.md): the master's side.
//!
//! A move is three commands in the master's log, driven by the leader between them:
//!
//! 1. `StartTabletMove` records the move; the tablet stays routed to its group.
//! 2. The leader has the old group *seal* the tablet (no more writes), drain its locks and
//!    flush it, which answers the tablet's *handoff*. Then `SwitchTablet` routes the tablet
//!    to the new group, one epoch up.
//! 3. The leader has the new group *adopt* the tablet with the handoff (its log opens the
//!    tablet, and its leader claims it in the manifest, fencing the old group), then
//!    `EndTabletMove` ends the move, and the old group closes its sealed copy.
//!
//! Every step can be repeated: sealing a sealed tablet answers the same handoff (the old
//! group keeps it until the end), and adopting an adopted one does nothing. So a new master
//! leader resumes a move from whatever its log says. Before the switch a move that cannot
//! seal is rolled back (unsealed and ended); after it, it only goes forward.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use luna_proto::group::group_control_client::GroupControlClient;
use luna_proto::group::{AdoptTablet, AdoptTabletRequest, SealTabletRequest, TabletHandoff};
use luna_proto::master::{TabletInfo, TabletMove};
use luna_proto::masterlog::command::Kind;
use luna_proto::masterlog::{Command, EndTabletMove, StartTabletMove, SwitchTablet};
use luna_proto::tablet::TabletError;
use luna_proto::tablet::tablet_error::Kind as ErrorKind;
use prost::Message;
use tonic::transport::{Channel, Endpoint};

use crate::core::{Core, lock};
use crate::error::MasterError;
use crate::state::State;

/// How long the master keeps trying to seal a tablet before it rolls the move back.
pub(crate) const SEAL_DEADLINE: Duration = Duration::from_secs(30);
/// How long the master tries to flush a tablet ahead of its seal.
const PREPARE_DEADLINE: Duration = Duration::from_secs(10);
/// How long one call to a group may take (a seal waits for locks for up to 5 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause between rounds of calls when no replica of a group answered.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// How often the leader looks for moves and splits to resume (after a failover, or a
/// failed step).
pub(crate) const RESUME_INTERVAL: Duration = Duration::from_secs(1);
/// An operation is resumed only this long after it started: until then, the call that
/// started it may still be driving it (on this leader, or on one that just lost the lead).
const RESUME_AFTER_MS: u64 = 5_000;

impl State {
    /// Tablet `tablet_id`, or NotFound.
    pub(crate) fn tablet(&self, tablet_id: u64) -> Result<&TabletInfo, MasterError> {
        self.tablets
            .get(&tablet_id)
            .ok_or_else(|| MasterError::not_found(format!("there is no tablet {tablet_id}")))
    }

    /// Starts moving a tablet (see `StartTabletMove` in master_log.proto).
    pub(crate) fn start_tablet_move(
        &mut self,
        proposed_ms: u64,
        start: &StartTabletMove,
    ) -> Result<(), MasterError> {
        let tablet = self.tablet(start.tablet_id)?;
        if !self.groups.contains_key(&start.to_group) {
            return Err(MasterError::not_found(format!(
                "there is no group {}",
                start.to_group
            )));
        }
        if tablet.group_id == start.to_group {
            return Err(MasterError::invalid(format!(
                "tablet {} is in group {} already",
                tablet.id, start.to_group
            )));
        }
        if let Some(moving) = self.tablet_moves.get(&tablet.id) {
            return Err(MasterError::precondition(format!(
                "tablet {} is already moving to group {}; wait for that move to end",
                tablet.id, moving.to_group
            )));
        }
        if self.tablet_splits.contains_key(&tablet.id) {
            return Err(MasterError::precondition(format!(
                "tablet {} is splitting; wait for the split to end",
                tablet.id
            )));
        }
        let moving = TabletMove {
            tablet_id: tablet.id,
            from_group: tablet.group_id,
            to_group: start.to_group,
            switched: false,
            started_ms: proposed_ms,
            from_epoch: tablet.epoch,
        };
        if start.reason == crate::moves::REASON_ADMIN {
            self.pinned_tablets.insert(moving.tablet_id);
        }
        self.tablet_moves.insert(moving.tablet_id, moving);
        Ok(())
    }

    /// Routes a moving tablet to its new group, one epoch up.
    pub(crate) fn switch_tablet(&mut self, tablet_id: u64) -> Result<(), MasterError> {
        let (Some(moving), Some(tablet)) = (
            self.tablet_moves.get_mut(&tablet_id),
            self.tablets.get_mut(&tablet_id),
        ) else {
            return Err(MasterError::precondition(format!(
                "tablet {tablet_id} is not moving"
            )));
        };
        if moving.switched {
            return Err(MasterError::precondition(format!(
                "tablet {tablet_id} was switched already"
            )));
        }
        moving.switched = true;
        tablet.group_id = moving.to_group;
        tablet.epoch = moving.from_epoch + 1;
        Ok(())
    }

    /// Ends a tablet's move: done if it was switched, rolled back if not.
    pub(crate) fn end_tablet_move(&mut self, tablet_id: u64) -> Result<(), MasterError> {
        self.tablet_moves
            .remove(&tablet_id)
            .map(|_| ())
            .ok_or_else(|| MasterError::precondition(format!("tablet {tablet_id} is not moving")))
    }

    /// Drops the moves and splits of tablets that no longer exist (their collection was
    /// dropped).
    pub(crate) fn forget_moves_of_dropped_tablets(&mut self) {
        let tablets = &self.tablets;
        self.tablet_moves.retain(|id, _| tablets.contains_key(id));
        self.tablet_splits.retain(|id, _| tablets.contains_key(id));
        self.pinned_tablets.retain(|id| tablets.contains_key(id));
    }

    /// Whether tablet `tablet_id` is moving or splitting.
    pub(crate) fn busy(&self, tablet_id: u64) -> bool {
        self.tablet_moves.contains_key(&tablet_id) || self.tablet_splits.contains_key(&tablet_id)
    }

    /// The tablets group `group_id` should host, at the epochs it hosts them, and the ones
    /// it may be adopting (which it neither opens nor closes by itself).
    pub(crate) fn assigned_tablets(&self, group_id: u64) -> (Vec<TabletInfo>, Vec<u64>) {
        let mut tablets = Vec::new();
        let mut adopting = Vec::new();
        for tablet in self.tablets.values() {
            if let Some(split) = self.tablet_splits.get(&tablet.id) {
                // The group splits it when the master says so: until then it hosts it at
                // its epoch (it never goes back to a lower one), and the right half is not
                // its to open or close.
                if tablet.group_id == group_id {
                    tablets.push(tablet.clone());
                    adopting.push(split.new_tablet_id);
                }
                continue;
            }
            match self.tablet_moves.get(&tablet.id) {
                // Switched: the new group adopts it when the master says so; the old one
                // keeps its sealed copy (at the old epoch) until the move ends.
                Some(moving) if moving.switched => {
                    if moving.to_group == group_id {
                        adopting.push(tablet.id);
                    } else if moving.from_group == group_id {
                        tablets.push(TabletInfo {
                            group_id,
                            epoch: moving.from_epoch,
                            ..tablet.clone()
                        });
                    }
                }
                _ if tablet.group_id == group_id => tablets.push(tablet.clone()),
                _ => {}
            }
        }
        (tablets, adopting)
    }
}

/// Runs the tablet moves the log holds while this replica leads, until shutdown.
pub(crate) async fn tablet_move_loop(core: Arc<Core>) {
    core.every(RESUME_INTERVAL, "resuming tablet moves", || {
        resume_tablet_moves(Arc::clone(&core))
    })
    .await;
}

/// Starts a driver for every move and split in the log that no task drives (on the serving
/// leader), each on its own: one whose group is down must not hold up the others.
async fn resume_tablet_moves(core: Arc<Core>) -> Result<(), MasterError> {
    let current = core.stream().leadership();
    if !current.is_leader || *core.serving.borrow() != current.term {
        return Ok(());
    }
    let driven = lock(&core.tablet_movers).clone();
    // The call that started an operation drives it (and answers its error); others wait.
    let started_before = core.config.clock.now_ms().saturating_sub(RESUME_AFTER_MS);
    let idle = |tablet_id: &u64, started_ms: u64| {
        !driven.contains(tablet_id) && started_ms <= started_before
    };
    let (moves, splits): (Vec<u64>, Vec<u64>) = {
        let state = core.read_state();
        (
            state
                .tablet_moves
                .values()
                .filter(|m| idle(&m.tablet_id, m.started_ms))
                .map(|m| m.tablet_id)
                .collect(),
            state
                .tablet_splits
                .values()
                .filter(|s| idle(&s.tablet_id, s.started_ms))
                .map(|s| s.tablet_id)
                .collect(),
        )
    };
    for tablet_id in moves {
        let core = Arc::clone(&core);
        tokio::spawn(async move {
            if let Err(error) = core.drive_tablet_move(tablet_id).await {
                tracing::warn!(tablet_id, %error, "tablet move step failed; retrying later");
            }
        });
    }
    for tablet_id in splits {
        let core = Arc::clone(&core);
        tokio::spawn(async move {
            if let Err(error) = core.drive_tablet_split(tablet_id).await {
                tracing::warn!(tablet_id, %error, "tablet split step failed; retrying later");
            }
        });
    }
    Ok(())
}

impl Core {
    /// Moves tablet `tablet_id` to group `to_group`, and answers the tablet as routed once
    /// the new group serves it (or the move was rolled back, as an error), with the bytes
    /// the move copied (see `MoveTabletResponse`).
    pub async fn move_tablet(
        &self,
        tablet_id: u64,
        to_group: u64,
    ) -> Result<(TabletInfo, u64), MasterError> {
        self.move_tablet_for(tablet_id, to_group, crate::moves::REASON_ADMIN)
            .await
    }

    /// [`Core::move_tablet`], for `reason` ("admin" pins the tablet).
    pub(crate) async fn move_tablet_for(
        &self,
        tablet_id: u64,
        to_group: u64,
        reason: &str,
    ) -> Result<(TabletInfo, u64), MasterError> {
        // Asked again (a client's retry), the same move is joined, and a finished one
        // answers as done.
        let under_way = {
            let state = self.read_state();
            let tablet = state.tablet(tablet_id)?;
            match state.tablet_moves.get(&tablet_id) {
                Some(moving) => moving.to_group == to_group,
                None if tablet.group_id == to_group => return Ok((tablet.clone(), 0)),
                None => false,
            }
        };
        if !under_way {
            self.propose_move_step(Kind::StartTabletMove(StartTabletMove {
                tablet_id,
                to_group,
                reason: reason.to_owned(),
            }))
            .await?;
            tracing::info!(tablet_id, to_group, reason, "tablet move started");
        }
        let copied = self.drive_tablet_move(tablet_id).await?;
        let state = self.read_state();
        match state.tablets.get(&tablet_id) {
            Some(tablet) if tablet.group_id == to_group => Ok((tablet.clone(), copied)),
            _ => Err(MasterError::precondition(format!(
                "the move of tablet {tablet_id} to group {to_group} was rolled back"
            ))),
        }
    }

    /// Takes tablet `tablet_id`'s move through its remaining steps, and answers the bytes
    /// it copied. One driver per tablet: a second caller waits for the first one's move to
    /// end (and answers 0).
    async fn drive_tablet_move(&self, tablet_id: u64) -> Result<u64, MasterError> {
        let Some(_driving) = Driving::claim(self, tablet_id) else {
            return self.wait_operation_ended(tablet_id).await.map(|()| 0);
        };
        let Some(moving) = self.read_state().tablet_moves.get(&tablet_id).cloned() else {
            return Ok(0);
        };
        let next_epoch = moving.from_epoch + 1;
        let seal = SealTabletRequest {
            group_id: moving.from_group,
            tablet_id,
            epoch: moving.from_epoch,
            next_epoch,
            cancel: false,
            prepare: false,
        };
        let mut prepared_bytes = 0;
        if !moving.switched {
            // Best effort: a failed flush leaves more to the seal, which flushes anyway.
            let prepare = SealTabletRequest {
                prepare: true,
                ..seal
            };
            match self.seal(&prepare, Some(PREPARE_DEADLINE)).await {
                Ok((_, flushed)) => prepared_bytes = flushed,
                Err(error) => tracing::debug!(tablet_id, %error, "flushing ahead of a seal"),
            }
        }
        // From the seal on, the tablet is unavailable: the log says how long each step took.
        let sealing = tokio::time::Instant::now();
        let mut seal_ms = 0;
        let (handoff, flushed_bytes) = if moving.switched {
            // Sealed before the switch; the old group answers the same handoff again.
            self.seal(&seal, None).await?
        } else {
            match self.seal(&seal, Some(SEAL_DEADLINE)).await {
                Ok(sealed) => {
                    seal_ms = sealing.elapsed().as_millis();
                    self.propose_move_step(Kind::SwitchTablet(SwitchTablet { tablet_id }))
                        .await?;
                    tracing::info!(tablet_id, to_group = moving.to_group, "tablet switched");
                    sealed
                }
                Err(error) => {
                    let cancel = SealTabletRequest {
                        cancel: true,
                        ..seal
                    };
                    // Unseals the tablet (answering no handoff).
                    self.seal(&cancel, None).await?;
                    self.propose_move_step(Kind::EndTabletMove(EndTabletMove { tablet_id }))
                        .await?;
                    tracing::warn!(tablet_id, %error, "tablet move rolled back");
                    return Err(MasterError::precondition(format!(
                        "the move of tablet {tablet_id} was rolled back: {error}"
                    )));
                }
            }
        };
        let switched_ms = sealing.elapsed().as_millis();
        let handoff_bytes = handoff.encoded_len() as u64;
        let copied = prepared_bytes + flushed_bytes + handoff_bytes;
        // Above every timestamp the old group used, and above the TSO's too.
        let min_ts = self.timestamps(1, handoff.min_ts).await?.first;
        let timestamp_ms = sealing.elapsed().as_millis();
        let tablet = self.read_state().tablet(tablet_id)?.clone();
        let adopt = AdoptTabletRequest {
            group_id: moving.to_group,
            adopt: Some(AdoptTablet {
                tablet: Some(tablet),
                handoff: Some(TabletHandoff { min_ts, ..handoff }),
            }),
        };
        self.call_group(moving.to_group, tablet_id, None, |mut client| {
            let adopt = adopt.clone();
            async move {
                let reply = client.adopt_tablet(adopt).await?.into_inner();
                Ok((reply.error, ()))
            }
        })
        .await?;
        let adopted_ms = sealing.elapsed().as_millis();
        self.propose_move_step(Kind::EndTabletMove(EndTabletMove { tablet_id }))
            .await?;
        tracing::info!(
            tablet_id,
            to_group = moving.to_group,
            copied,
            handoff_bytes,
            seal_ms,
            switched_ms,
            timestamp_ms,
            adopted_ms,
            "tablet move done (times since the seal began)"
        );
        Ok(copied)
    }

    /// Seals the tablet in its old group and answers the handoff and the bytes flushed.
    async fn seal(
        &self,
        seal: &SealTabletRequest,
        deadline: Option<Duration>,
    ) -> Result<(TabletHandoff, u64), MasterError> {
        self.call_group(seal.group_id, seal.tablet_id, deadline, |mut client| {
            let seal = *seal;
            async move {
                let reply = client.seal_tablet(seal).await?.into_inner();
                let sealed = (reply.handoff.unwrap_or_default(), reply.flushed_bytes);
                Ok((reply.error, sealed))
            }
        })
        .await
    }

    pub(crate) async fn propose_move_step(&self, kind: Kind) -> Result<(), MasterError> {
        let turn = self.turn().await?;
        let command = Command {
            proposed_ms: self.config.clock.now_ms(),
            kind: Some(kind),
        };
        self.propose(&turn, &command).await
    }

    /// Waits until tablet `tablet_id` is not moving or splitting any more (another caller
    /// drives it).
    pub(crate) async fn wait_operation_ended(&self, tablet_id: u64) -> Result<(), MasterError> {
        let mut applied = self.watch_applied();
        while self.read_state().busy(tablet_id) {
            applied.changed().await.map_err(|_| MasterError::Closed)?;
        }
        Ok(())
    }

    /// Calls group `group_id`'s leader, for the move or split of tablet `tablet_id`, until
    /// it answers without an error: its last known leader first, then every replica,
    /// following NotLeader hints. Gives up after `deadline` (never without one), on an
    /// invalid request, when the master stops leading, or when the tablet's operation is
    /// over (its collection was dropped).
    pub(crate) async fn call_group<T, F, Fut>(
        &self,
        group_id: u64,
        tablet_id: u64,
        deadline: Option<Duration>,
        call: F,
    ) -> Result<T, MasterError>
    where
        F: Fn(GroupControlClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(Option<TabletError>, T), tonic::Status>>,
    {
        let give_up = deadline.map(|deadline| tokio::time::Instant::now() + deadline);
        let mut last = String::from("no replica answered");
        loop {
            self.check_running()?;
            if !self.stream().leadership().is_leader {
                return Err(MasterError::unavailable(
                    "this master replica stopped leading during a tablet move",
                ));
            }
            if !self.read_state().busy(tablet_id) {
                return Err(MasterError::precondition(format!(
                    "tablet {tablet_id} is not moving or splitting any more"
                )));
            }
            let mut addrs = self.group_addrs(group_id);
            let mut tried = BTreeSet::new();
            while let Some(addr) = addrs.pop() {
                if !tried.insert(addr.clone()) {
                    continue;
                }
                let reply = match self.group_control(&addr) {
                    Ok(client) => call(client).await,
                    Err(error) => Err(tonic::Status::unavailable(error.to_string())),
                };
                match reply {
                    Ok((None, value)) => return Ok(value),
                    Ok((Some(error), _)) => {
                        if let Some(ErrorKind::NotLeader(hint)) = &error.kind
                            && !hint.leader_addr.is_empty()
                        {
                            addrs.push(hint.leader_addr.clone());
                        }
                        last = format!("{addr}: {}", error.message);
                    }
                    Err(status) if status.code() == tonic::Code::InvalidArgument => {
                        return Err(MasterError::invalid(format!(
                            "group {group_id}: {}",
                            status.message()
                        )));
                    }
                    Err(status) => last = format!("{addr}: {}", status.message()),
                }
            }
            if give_up.is_some_and(|at| tokio::time::Instant::now() >= at) {
                return Err(MasterError::unavailable(format!(
                    "group {group_id} did not answer: {last}"
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// A client of the group control service at `addr`, on a channel kept for the next
    /// calls (it connects on first use and reconnects by itself).
    fn group_control(
        &self,
        addr: &str,
    ) -> Result<GroupControlClient<Channel>, tonic::transport::Error> {
        let mut channels = lock(&self.group_channels);
        let channel = match channels.get(addr) {
            Some(channel) => channel.clone(),
            None => {
                let channel = Endpoint::from_shared(format!("http://{addr}"))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .timeout(CALL_TIMEOUT)
                    .tcp_nodelay(true)
                    .connect_lazy();
                channels.insert(addr.to_owned(), channel.clone());
                channel
            }
        };
        Ok(GroupControlClient::new(channel))
    }

    /// The tablet-service addresses of group `group_id`'s replicas, its last reported
    /// leader last (the caller pops from the end).
    fn group_addrs(&self, group_id: u64) -> Vec<String> {
        let state = self.read_state();
        let leader = self.registry().leader(group_id).server_id;
        let Some(group) = state.groups.get(&group_id) else {
            return Vec::new();
        };
        let mut servers: Vec<u64> = group
            .replicas
            .iter()
            .copied()
            .filter(|&s| s != leader)
            .collect();
        if leader != 0 {
            servers.push(leader);
        }
        servers
            .into_iter()
            .filter_map(|server| state.servers.get(&server).map(|s| s.addr.clone()))
            .collect()
    }
}

/// The right to drive one tablet's move or split, released on drop.
pub(crate) struct Driving<'a> {
    core: &'a Core,
    tablet_id: u64,
}

impl<'a> Driving<'a> {
    pub(crate) fn claim(core: &'a Core, tablet_id: u64) -> Option<Self> {
        // Not `then_some`: it would build (and drop, which locks) a guard while locked.
        let claimed = lock(&core.tablet_movers).insert(tablet_id);
        claimed.then(|| Driving { core, tablet_id })
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        lock(&self.core.tablet_movers).remove(&self.tablet_id);
    }
}
