//! The master's operations, as the gRPC service and in-process callers use them.

use std::time::Instant;

use luna_proto::master::{
    CollectionInfo, CollectionRoute, CreateCollectionRequest, DatabaseInfo, GroupInfo,
    HeartbeatRequest, HeartbeatResponse, ListTabletsResponse, RoutingTable, ServerInfo, TabletInfo,
};
use luna_proto::masterlog::command::Kind;
use luna_proto::masterlog::{Command, RegisterServer, SetPreferredLeader, TsoWindow};

use crate::catalog;
use crate::core::Core;
use crate::error::MasterError;
use crate::heartbeat;
use crate::placement::Ids;
use crate::routing::View;
use crate::state::State;
use crate::tso::{MAX_TIMESTAMP_BATCH, Timestamps};

/// How often a leader transfer checks whether the new leader has reported in.
const TRANSFER_POLL: std::time::Duration = std::time::Duration::from_millis(50);

impl Core {
    /// Runs `read` on a consistent view of the state, soft state and routing version.
    pub fn view<R>(&self, read: impl FnOnce(&View<'_>) -> R) -> R {
        let state = self.read_state();
        let registry = self.registry();
        let view = View {
            state: &state,
            registry: &registry,
            now: Instant::now(),
            heartbeat_timeout: self.config.heartbeat_timeout,
            routing_version: *self.routing_version.borrow(),
        };
        read(&view)
    }

    pub(crate) fn alive_servers(&self) -> Vec<u64> {
        let state = self.read_state();
        let registry = self.registry();
        registry.alive(
            state.servers.keys().copied(),
            Instant::now(),
            self.config.heartbeat_timeout,
        )
    }

    /// Creates database `name`.
    pub async fn create_database(&self, name: &str) -> Result<DatabaseInfo, MasterError> {
        let turn = self.turn().await?;
        let now = self.config.clock.now_ms();
        let command = catalog::create_database(&self.read_state(), name, now)?;
        self.propose(&turn, &command).await?;
        catalog::find_database(&self.read_state(), name).cloned()
    }

    /// Drops database `name` and its collections.
    pub async fn drop_database(&self, name: &str) -> Result<(), MasterError> {
        let turn = self.turn().await?;
        let now = self.config.clock.now_ms();
        let command = catalog::drop_database(&self.read_state(), name, now)?;
        self.propose(&turn, &command).await
    }

    /// Creates a collection and places its tablets on the live servers.
    pub async fn create_collection(
        &self,
        request: &CreateCollectionRequest,
    ) -> Result<CollectionInfo, MasterError> {
        let turn = self.turn().await?;
        // A draining server takes no new replicas.
        let mut alive = self.alive_servers();
        alive.retain(|id| {
            !self
                .read_state()
                .servers
                .get(id)
                .is_some_and(|s| s.draining)
        });
        let now = self.config.clock.now_ms();
        let command =
            catalog::create_collection(&self.read_state(), request, &alive, &self.config, now)?;
        self.propose(&turn, &command).await?;
        catalog::find_collection(&self.read_state(), &request.database, &request.name).cloned()
    }

    /// Drops collection `name` of `database`.
    pub async fn drop_collection(&self, database: &str, name: &str) -> Result<(), MasterError> {
        let turn = self.turn().await?;
        let now = self.config.clock.now_ms();
        let command = catalog::drop_collection(&self.read_state(), database, name, now)?;
        self.propose(&turn, &command).await
    }

    /// Every database, by id.
    pub fn list_databases(&self) -> Vec<DatabaseInfo> {
        self.read_state().databases.values().cloned().collect()
    }

    /// The collections of `database` (every collection if empty), by id.
    pub fn list_collections(&self, database: &str) -> Result<Vec<CollectionInfo>, MasterError> {
        let state = self.read_state();
        let database_id = match database {
            "" => None,
            name => Some(catalog::find_database(&state, name)?.id),
        };
        Ok(state
            .collections
            .values()
            .filter(|c| database_id.is_none_or(|id| c.database_id == id))
            .cloned()
            .collect())
    }

    /// Tablets, filtered by database and collection (empty filters match everything); in
    /// routing-key order within a collection. With the moves and splits under way among them.
    pub fn list_tablets(
        &self,
        database: &str,
        collection: &str,
    ) -> Result<ListTabletsResponse, MasterError> {
        let state = self.read_state();
        let collections: Vec<u64> = match (database, collection) {
            ("", "") => state.collections.keys().copied().collect(),
            ("", _) => {
                return Err(MasterError::invalid(
                    "a collection filter needs its database: set both",
                ));
            }
            (database, "") => {
                let id = catalog::find_database(&state, database)?.id;
                state
                    .collections
                    .values()
                    .filter(|c| c.database_id == id)
                    .map(|c| c.id)
                    .collect()
            }
            (database, collection) => {
                vec![catalog::find_collection(&state, database, collection)?.id]
            }
        };
        let tablets: Vec<TabletInfo> = collections
            .into_iter()
            .flat_map(|id| state.tablets_of(id))
            .cloned()
            .collect();
        let moves = tablets
            .iter()
            .filter_map(|tablet| state.tablet_moves.get(&tablet.id).cloned())
            .collect();
        let splits = tablets
            .iter()
            .filter_map(|tablet| state.tablet_splits.get(&tablet.id).cloned())
            .collect();
        Ok(ListTabletsResponse {
            tablets,
            moves,
            splits,
        })
    }

    /// Every registered server, by id.
    pub fn list_servers(&self) -> Vec<ServerInfo> {
        self.view(|view| view.servers())
    }

    /// Every group, by id.
    pub fn list_groups(&self) -> Vec<GroupInfo> {
        self.view(|view| view.groups())
    }

    /// The route of one collection.
    pub fn routing(
        &self,
        database: &str,
        collection: &str,
    ) -> Result<CollectionRoute, MasterError> {
        self.view(|view| {
            let info = catalog::find_collection(view.state, database, collection)?;
            Ok(view.collection_route(info))
        })
    }

    /// The whole routing table.
    pub fn routing_table(&self) -> RoutingTable {
        self.view(|view| view.routing_table())
    }

    /// Makes server `to` the preferred leader of group `group_id` (its first replica, which
    /// the group's leaders hand leadership to) and waits until the master hears that it
    /// leads, for at most `transfer_wait`.
    pub async fn transfer_leader(&self, group_id: u64, to: u64) -> Result<GroupInfo, MasterError> {
        {
            let turn = self.turn().await?;
            let (holds, settled) = self
                .read_state()
                .groups
                .get(&group_id)
                .map(|group| {
                    let settled = group.replicas.first() == Some(&to) && group.leader_pinned;
                    (group.replicas.contains(&to), settled)
                })
                .ok_or_else(|| MasterError::not_found(format!("there is no group {group_id}")))?;
            // Apply rejects a server without a replica; liveness is soft state, checked here.
            if holds && !self.alive_servers().contains(&to) {
                return Err(MasterError::precondition(format!(
                    "server {to} is down; leadership can only move to a live replica"
                )));
            }
            if !settled {
                let command = Command {
                    proposed_ms: self.config.clock.now_ms(),
                    kind: Some(Kind::SetPreferredLeader(SetPreferredLeader {
                        group_id,
                        server_id: to,
                        pin: true,
                    })),
                };
                self.propose(&turn, &command).await?;
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.transfer_wait;
        loop {
            let group = self.view(|view| view.groups().into_iter().find(|g| g.id == group_id));
            let group = group
                .ok_or_else(|| MasterError::not_found(format!("there is no group {group_id}")))?;
            if group.leader_server_id == to {
                return Ok(group);
            }
            if tokio::time::Instant::now() >= deadline {
                // Not UNAVAILABLE: the change is persisted, and sending it again would only
                // wait again.
                return Err(MasterError::precondition(format!(
                    "server {to} is now group {group_id}'s preferred leader, but has not \
                     taken over within {:?} (leader: server {}); the group's leader tries \
                     again every few seconds while {to} answers it",
                    self.config.transfer_wait, group.leader_server_id
                )));
            }
            tokio::time::sleep(TRANSFER_POLL).await;
        }
    }

    /// Hands out `count` timestamps (0 means 1), persisting a new window first if needed.
    pub async fn timestamps(&self, count: u32, after: u64) -> Result<Timestamps, MasterError> {
        let count = count.max(1);
        if count > MAX_TIMESTAMP_BATCH {
            return Err(MasterError::invalid(format!(
                "{count} timestamps asked for; ask for at most {MAX_TIMESTAMP_BATCH} at a time"
            )));
        }
        let term = self.lead().await?;
        let mut tso = self.tso.lock().await;
        // The allocator was reset for the serving term (under this lock) when it began; if
        // that is not `term` any more, the lease check below fails.
        let now = self.config.clock.now_ms();
        let limit = self.read_state().tso_limit;
        let plan = tso.plan(now, count, after, limit, self.config.tso_window_ms())?;
        if let Some(limit) = plan.new_limit {
            // Not `turn()`, which may wait for a takeover: that needs the TSO lock held
            // here. A replica that lost the lead fails to append instead.
            let turn = self.proposals.lock().await;
            let command = Command {
                proposed_ms: now,
                kind: Some(Kind::TsoWindow(TsoWindow { limit })),
            };
            self.propose(&turn, &command).await?;
        }
        // Apply only raises the limit, so the batch is covered now.
        if plan.batch.last() >= self.read_state().tso_limit {
            return Err(MasterError::internal(
                "the persisted TSO window does not cover the batch",
            ));
        }
        self.check_lease(term).await?;
        tso.commit(plan.batch);
        Ok(plan.batch)
    }

    /// Registers or refreshes a tablet server and tells it what to host.
    pub async fn heartbeat(
        &self,
        request: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, MasterError> {
        heartbeat::validate(request)?;
        // Only the leader knows every registered server and keeps liveness, and only one
        // with its lease may tell a server to delete a replica.
        self.lead_with_lease().await?;
        let server_id = self.register_if_needed(request).await?;
        {
            let state = self.read_state();
            let mut registry = self.registry();
            let changed = registry.record(server_id, Instant::now(), request, |group| {
                state
                    .groups
                    .get(&group)
                    .is_some_and(|g| State::hosts(g, server_id))
            });
            // Bumped under the registry lock, so no view pairs the new leaders with the old
            // version.
            if changed {
                self.bump_routing_version();
            }
        }
        self.end_applied_moves(server_id, request).await;
        Ok(self.view(|view| view.heartbeat_response(server_id, request)))
    }

    /// Persists a new server, or a known server's changed addresses; returns its id.
    async fn register_if_needed(&self, request: &HeartbeatRequest) -> Result<u64, MasterError> {
        let id = request.server_id;
        if id != 0 {
            let state = self.read_state();
            let Some(known) = state.servers.get(&id) else {
                return Err(MasterError::precondition(format!(
                    "this master does not know server {id}; the server's data dir belongs to \
                     another universe: point the server at that universe's master, or start \
                     it with an empty data dir to join this one"
                )));
            };
            let unchanged = known.addr == request.addr
                && known.raft_addr == request.raft_addr
                && known.http_addr == request.http_addr;
            if unchanged {
                return Ok(id);
            }
        }
        let turn = self.turn().await?;
        let id = match id {
            0 => Ids::new(&self.read_state()).take(),
            id => id,
        };
        let command = Command {
            proposed_ms: self.config.clock.now_ms(),
            kind: Some(Kind::RegisterServer(RegisterServer {
                id,
                addr: request.addr.clone(),
                raft_addr: request.raft_addr.clone(),
                http_addr: request.http_addr.clone(),
            })),
        };
        self.propose(&turn, &command).await?;
        tracing::info!(server_id = id, addr = %request.addr, "tablet server registered");
        Ok(id)
    }
}
