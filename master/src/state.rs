//! The master's replicated state machine.
//!
//! [`State`] changes only through [`State::apply`], one committed [`Command`] at a time in
//! log order. Apply is deterministic: it reads nothing but the state and the command (the
//! leader chose ids, placement and `proposed_ms` before proposing), so every replica, and
//! every replay of the same log, builds the same state. A command that fails validation is
//! rejected as a whole, leaving the state untouched except for `applied_index`: rejection is
//! deterministic too, so replicas still agree.

use std::collections::{BTreeMap, BTreeSet};

use luna_proto::master::ReplicaMove;
use luna_proto::master::{CollectionInfo, DatabaseInfo, TabletInfo, TabletMove, TabletSplit};
use luna_proto::masterlog::command::Kind;
use luna_proto::masterlog::{
    Command, CreateCollection, CreateDatabase, EndMove, Group, MasterState, MoveReplica,
    RegisterServer, Server, SetDraining, SetPreferredLeader,
};

use crate::error::MasterError;

/// The first id handed out; 0 means "none" everywhere (e.g. an unregistered server).
const FIRST_ID: u64 = 1;

/// Everything the master's log has built.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct State {
    /// The last log index applied (including skipped and rejected entries).
    pub applied_index: u64,
    /// Next id of the one sequence shared by databases, collections, tablets, groups and
    /// servers, so an id names one thing forever.
    pub next_id: u64,
    pub databases: BTreeMap<u64, DatabaseInfo>,
    pub collections: BTreeMap<u64, CollectionInfo>,
    pub tablets: BTreeMap<u64, TabletInfo>,
    pub groups: BTreeMap<u64, Group>,
    pub servers: BTreeMap<u64, Server>,
    /// Timestamps below this may be handed out without another write.
    pub tso_limit: u64,
    /// MVCC versions below this may be dropped; it never goes down.
    pub gc_safe_point: u64,
    /// Tablets moving between groups, by tablet id (see `tablet_moves.rs`).
    pub tablet_moves: BTreeMap<u64, TabletMove>,
    /// Tablets splitting, by tablet id (see `tablet_splits.rs`).
    pub tablet_splits: BTreeMap<u64, TabletSplit>,
    /// Tablets an operator moved or split: balancing leaves them where they are.
    pub pinned_tablets: BTreeSet<u64>,
}

/// What an applied command changed, beyond the state itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Applied {
    /// Routing (tablets, groups or replica addresses) changed: bump the routing version.
    pub routing_changed: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            applied_index: 0,
            next_id: FIRST_ID,
            databases: BTreeMap::new(),
            collections: BTreeMap::new(),
            tablets: BTreeMap::new(),
            groups: BTreeMap::new(),
            servers: BTreeMap::new(),
            tso_limit: 0,
            gc_safe_point: 0,
            tablet_moves: BTreeMap::new(),
            tablet_splits: BTreeMap::new(),
            pinned_tablets: BTreeSet::new(),
        }
    }
}

impl State {
    /// Records that `index` was applied without a command (an internal or corrupt entry).
    pub fn skip(&mut self, index: u64) {
        self.applied_index = index;
    }

    /// Applies the command committed at `index`.
    pub fn apply(&mut self, index: u64, command: &Command) -> Result<Applied, MasterError> {
        self.applied_index = index;
        let Some(kind) = &command.kind else {
            return Err(MasterError::invalid(format!(
                "master log entry {index} has no command"
            )));
        };
        let routing_changed = match kind {
            Kind::CreateDatabase(create) => {
                self.create_database(command.proposed_ms, create)?;
                true
            }
            Kind::DropDatabase(drop) => {
                self.drop_database(drop.id)?;
                true
            }
            Kind::CreateCollection(create) => {
                self.create_collection(create)?;
                true
            }
            Kind::DropCollection(drop) => {
                self.drop_collection(drop.id)?;
                true
            }
            Kind::RegisterServer(register) => self.register_server(register)?,
            Kind::TsoWindow(window) => {
                // Never lower: a stale window must not let timestamps repeat.
                self.tso_limit = self.tso_limit.max(window.limit);
                false
            }
            Kind::SetPreferredLeader(preferred) => {
                self.set_preferred_leader(preferred)?;
                true
            }
            Kind::MoveReplica(start) => {
                self.move_replica(command.proposed_ms, start)?;
                true
            }
            Kind::EndMove(end) => {
                self.end_move(end)?;
                true
            }
            Kind::SetDraining(drain) => {
                self.set_draining(drain)?;
                false
            }
            Kind::GcSafePoint(raise) => {
                self.gc_safe_point = self.gc_safe_point.max(raise.ts);
                false
            }
            Kind::StartTabletMove(start) => {
                self.start_tablet_move(command.proposed_ms, start)?;
                true
            }
            Kind::SwitchTablet(switch) => {
                self.switch_tablet(switch.tablet_id)?;
                true
            }
            Kind::EndTabletMove(end) => {
                self.end_tablet_move(end.tablet_id)?;
                true
            }
            Kind::StartTabletSplit(start) => {
                self.start_tablet_split(command.proposed_ms, start)?;
                true
            }
            Kind::EndTabletSplit(end) => {
                self.end_tablet_split(end)?;
                true
            }
        };
        Ok(Applied { routing_changed })
    }

    fn create_database(
        &mut self,
        proposed_ms: u64,
        create: &CreateDatabase,
    ) -> Result<(), MasterError> {
        let next_id = self.check_fresh(&[create.id])?;
        if self.database_named(&create.name).is_some() {
            return Err(MasterError::exists(format!(
                "database {:?} already exists",
                create.name
            )));
        }
        self.next_id = next_id;
        let info = DatabaseInfo {
            id: create.id,
            name: create.name.clone(),
            created_ms: proposed_ms,
        };
        self.databases.insert(create.id, info);
        Ok(())
    }

    fn drop_database(&mut self, id: u64) -> Result<(), MasterError> {
        if self.databases.remove(&id).is_none() {
            return Err(MasterError::not_found(format!("no database with id {id}")));
        }
        self.collections.retain(|_, c| c.database_id != id);
        self.tablets.retain(|_, t| t.database_id != id);
        self.forget_moves_of_dropped_tablets();
        Ok(())
    }

    fn create_collection(&mut self, create: &CreateCollection) -> Result<(), MasterError> {
        let info = create
            .collection
            .as_ref()
            .ok_or_else(|| MasterError::invalid("CreateCollection without a collection"))?;
        let database = self.databases.get(&info.database_id).ok_or_else(|| {
            MasterError::not_found(format!("no database with id {}", info.database_id))
        })?;
        if database.name != info.database {
            return Err(MasterError::invalid(format!(
                "database {} is named {:?}, not {:?}",
                database.id, database.name, info.database
            )));
        }
        if self
            .collection_named(info.database_id, &info.name)
            .is_some()
        {
            return Err(MasterError::exists(format!(
                "collection {:?} already exists in database {:?}",
                info.name, info.database
            )));
        }
        if create.tablets.is_empty()
            || usize::try_from(info.tablet_count).ok() != Some(create.tablets.len())
        {
            return Err(MasterError::invalid(format!(
                "collection {:?} declares {} tablets but carries {}",
                info.name,
                info.tablet_count,
                create.tablets.len()
            )));
        }
        for group in &create.new_groups {
            self.check_group(group)?;
        }
        let new_groups: BTreeSet<u64> = create.new_groups.iter().map(|g| g.id).collect();
        for tablet in &create.tablets {
            let belongs = tablet.collection_id == info.id
                && tablet.database_id == info.database_id
                && tablet.partitioning == info.partitioning
                && tablet.epoch >= 1
                && tablet.range.is_some();
            if !belongs {
                return Err(MasterError::invalid(format!(
                    "tablet {} does not match collection {}",
                    tablet.id, info.id
                )));
            }
            if !self.groups.contains_key(&tablet.group_id) && !new_groups.contains(&tablet.group_id)
            {
                return Err(MasterError::invalid(format!(
                    "tablet {} is placed on unknown group {}",
                    tablet.id, tablet.group_id
                )));
            }
        }
        let mut ids = vec![info.id];
        ids.extend(create.tablets.iter().map(|t| t.id));
        ids.extend(create.new_groups.iter().map(|g| g.id));
        self.next_id = self.check_fresh(&ids)?;
        for group in &create.new_groups {
            let mut group = group.clone();
            // Kept apart from `replicas`, which moves and reorders.
            group.initial_voters.clone_from(&group.replicas);
            self.groups.insert(group.id, group);
        }
        for tablet in &create.tablets {
            self.tablets.insert(tablet.id, tablet.clone());
        }
        self.collections.insert(info.id, info.clone());
        Ok(())
    }

    /// A new group must have distinct, registered replicas.
    fn check_group(&self, group: &Group) -> Result<(), MasterError> {
        let distinct: BTreeSet<u64> = group.replicas.iter().copied().collect();
        if group.replicas.is_empty() || distinct.len() != group.replicas.len() {
            return Err(MasterError::invalid(format!(
                "group {} needs distinct replicas, has {:?}",
                group.id, group.replicas
            )));
        }
        if let Some(unknown) = group
            .replicas
            .iter()
            .find(|s| !self.servers.contains_key(s))
        {
            return Err(MasterError::invalid(format!(
                "group {} names unknown server {unknown}",
                group.id
            )));
        }
        Ok(())
    }

    fn drop_collection(&mut self, id: u64) -> Result<(), MasterError> {
        if self.collections.remove(&id).is_none() {
            return Err(MasterError::not_found(format!(
                "no collection with id {id}"
            )));
        }
        self.tablets.retain(|_, t| t.collection_id != id);
        self.forget_moves_of_dropped_tablets();
        Ok(())
    }

    /// Registers a new server or updates a known one's addresses; returns whether routing
    /// (replica addresses) changed.
    fn register_server(&mut self, register: &RegisterServer) -> Result<bool, MasterError> {
        let server = Server {
            id: register.id,
            addr: register.addr.clone(),
            raft_addr: register.raft_addr.clone(),
            http_addr: register.http_addr.clone(),
            draining: false,
        };
        if let Some(known) = self.servers.get_mut(&register.id) {
            let changed = known.addr != server.addr;
            *known = Server {
                draining: known.draining,
                ..server
            };
            return Ok(changed);
        }
        self.next_id = self.check_fresh(&[register.id])?;
        self.servers.insert(register.id, server);
        Ok(false)
    }

    /// Moves `server_id` to the front of group `group_id`'s replicas, keeping the others'
    /// order.
    fn set_preferred_leader(&mut self, preferred: &SetPreferredLeader) -> Result<(), MasterError> {
        let (group_id, server_id) = (preferred.group_id, preferred.server_id);
        let group = self
            .groups
            .get_mut(&group_id)
            .ok_or_else(|| MasterError::not_found(format!("there is no group {group_id}")))?;
        let Some(at) = group.replicas.iter().position(|&id| id == server_id) else {
            return Err(MasterError::invalid(format!(
                "server {server_id} holds no replica of group {group_id} (replicas: {:?})",
                group.replicas
            )));
        };
        let first = group.replicas.remove(at);
        group.replicas.insert(0, first);
        group.leader_pinned = preferred.pin;
        Ok(())
    }

    /// Starts moving a replica (see `MoveReplica` in master_log.proto).
    fn move_replica(&mut self, proposed_ms: u64, start: &MoveReplica) -> Result<(), MasterError> {
        let (group_id, from, to) = (start.group_id, start.from, start.to);
        if !self.servers.contains_key(&to) {
            return Err(MasterError::not_found(format!("there is no server {to}")));
        }
        let group = self
            .groups
            .get_mut(&group_id)
            .ok_or_else(|| MasterError::not_found(format!("there is no group {group_id}")))?;
        let Some(at) = group.replicas.iter().position(|&id| id == from) else {
            return Err(MasterError::invalid(format!(
                "server {from} holds no replica of group {group_id} (replicas: {:?})",
                group.replicas
            )));
        };
        if group.replicas.contains(&to)
            || group
                .moving
                .as_ref()
                .is_some_and(|m| m.from_server_id == to)
        {
            return Err(MasterError::exists(format!(
                "server {to} already holds a replica of group {group_id}"
            )));
        }
        // A move under way can only be retargeted (its target is `from` here); its source
        // keeps hosting until the new target has replaced it.
        let source = match &group.moving {
            None => from,
            Some(moving) if moving.to_server_id == from => moving.from_server_id,
            Some(moving) => {
                return Err(MasterError::precondition(format!(
                    "group {group_id} is already moving a replica from server {} to server {}; \
                     wait for it, or move server {}'s replica elsewhere",
                    moving.from_server_id, moving.to_server_id, moving.to_server_id
                )));
            }
        };
        if group.initial_voters.is_empty() {
            group.initial_voters.clone_from(&group.replicas);
        }
        group.replicas[at] = to;
        group.replicas_pinned |= start.reason == crate::moves::REASON_ADMIN;
        group.moving = Some(ReplicaMove {
            from_server_id: source,
            to_server_id: to,
            reason: start.reason.clone(),
            started_ms: proposed_ms,
        });
        Ok(())
    }

    /// Ends the move to `end.to`, once the group's membership matches its replicas.
    fn end_move(&mut self, end: &EndMove) -> Result<(), MasterError> {
        let group = self
            .groups
            .get_mut(&end.group_id)
            .ok_or_else(|| MasterError::not_found(format!("there is no group {}", end.group_id)))?;
        match &group.moving {
            Some(moving) if moving.to_server_id == end.to => {
                group.moving = None;
                Ok(())
            }
            _ => Err(MasterError::precondition(format!(
                "group {} is not moving a replica to server {}",
                end.group_id, end.to
            ))),
        }
    }

    fn set_draining(&mut self, drain: &SetDraining) -> Result<(), MasterError> {
        let server = self.servers.get_mut(&drain.server_id).ok_or_else(|| {
            MasterError::not_found(format!("there is no server {}", drain.server_id))
        })?;
        server.draining = drain.draining;
        Ok(())
    }

    /// Checks that `ids` are distinct and never handed out before; returns the next id
    /// after them.
    pub(crate) fn check_fresh(&self, ids: &[u64]) -> Result<u64, MasterError> {
        let distinct: BTreeSet<u64> = ids.iter().copied().collect();
        if distinct.len() != ids.len() {
            return Err(MasterError::invalid(format!(
                "ids {ids:?} are not distinct"
            )));
        }
        match distinct.first() {
            Some(&lowest) if lowest < self.next_id => Err(MasterError::invalid(format!(
                "id {lowest} was handed out before (next id is {})",
                self.next_id
            ))),
            _ => Ok(distinct
                .last()
                .map_or(self.next_id, |&highest| highest.saturating_add(1))),
        }
    }

    /// The database named `name`.
    pub fn database_named(&self, name: &str) -> Option<&DatabaseInfo> {
        self.databases.values().find(|d| d.name == name)
    }

    /// The collection named `name` in database `database_id`.
    pub fn collection_named(&self, database_id: u64, name: &str) -> Option<&CollectionInfo> {
        self.collections
            .values()
            .find(|c| c.database_id == database_id && c.name == name)
    }

    /// The tablets of a collection in routing-key order.
    pub fn tablets_of(&self, collection_id: u64) -> Vec<&TabletInfo> {
        let mut tablets: Vec<&TabletInfo> = self
            .tablets
            .values()
            .filter(|t| t.collection_id == collection_id)
            .collect();
        tablets.sort_by(|a, b| range_start(a).cmp(range_start(b)));
        tablets
    }

    /// Whether server `server_id` hosts a replica of `group`: one of its replicas, or the
    /// source of a move under way.
    pub fn hosts(group: &Group, server_id: u64) -> bool {
        group.replicas.contains(&server_id)
            || group
                .moving
                .as_ref()
                .is_some_and(|m| m.from_server_id == server_id)
    }

    /// Live tablets per group (groups without tablets are listed with 0).
    pub fn tablet_counts(&self) -> BTreeMap<u64, u32> {
        let mut counts: BTreeMap<u64, u32> = self.groups.keys().map(|&id| (id, 0)).collect();
        for tablet in self.tablets.values() {
            *counts.entry(tablet.group_id).or_insert(0) += 1;
        }
        counts
    }

    /// The whole state as the snapshot message (entities in id order).
    pub fn snapshot(&self) -> MasterState {
        MasterState {
            applied_index: self.applied_index,
            next_id: self.next_id,
            databases: self.databases.values().cloned().collect(),
            collections: self.collections.values().cloned().collect(),
            tablets: self.tablets.values().cloned().collect(),
            groups: self.groups.values().cloned().collect(),
            servers: self.servers.values().cloned().collect(),
            tso_limit: self.tso_limit,
            gc_safe_point: self.gc_safe_point,
            tablet_moves: self.tablet_moves.values().cloned().collect(),
            tablet_splits: self.tablet_splits.values().cloned().collect(),
            pinned_tablets: self.pinned_tablets.iter().copied().collect(),
        }
    }

    /// Rebuilds a state from [`snapshot`](Self::snapshot), for when the stream can start
    /// from a snapshot instead of index 1.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn from_snapshot(snapshot: MasterState) -> Self {
        Self {
            applied_index: snapshot.applied_index,
            next_id: snapshot.next_id.max(FIRST_ID),
            databases: snapshot.databases.into_iter().map(|d| (d.id, d)).collect(),
            collections: snapshot
                .collections
                .into_iter()
                .map(|c| (c.id, c))
                .collect(),
            tablets: snapshot.tablets.into_iter().map(|t| (t.id, t)).collect(),
            groups: snapshot.groups.into_iter().map(|g| (g.id, g)).collect(),
            servers: snapshot.servers.into_iter().map(|s| (s.id, s)).collect(),
            tso_limit: snapshot.tso_limit,
            gc_safe_point: snapshot.gc_safe_point,
            tablet_moves: snapshot
                .tablet_moves
                .into_iter()
                .map(|m| (m.tablet_id, m))
                .collect(),
            tablet_splits: snapshot
                .tablet_splits
                .into_iter()
                .map(|s| (s.tablet_id, s))
                .collect(),
            pinned_tablets: snapshot.pinned_tablets.into_iter().collect(),
        }
    }
}

/// Start of a tablet's range; a tablet without one sorts first (apply rejects those).
pub(crate) fn range_start(tablet: &TabletInfo) -> &[u8] {
    tablet.range.as_ref().map_or(&[], |r| r.start.as_slice())
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
