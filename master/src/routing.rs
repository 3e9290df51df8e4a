//! Read views of the master: routing tables, and server and group listings.
//!
//! A [`View`] joins the replicated state with the soft state from heartbeats (liveness and
//! group leaders) at one instant, under the locks its caller holds, so one answer is
//! consistent with one routing version.

use std::time::{Duration, Instant};

use luna_proto::master::{
    CollectionInfo, CollectionRoute, GroupInfo, ReplicaAddr, RoutingTable, ServerInfo, TabletRoute,
};
use luna_proto::masterlog::Server;

use crate::heartbeat::registry::Registry;
use crate::state::State;

/// The state and the soft state, seen together.
#[derive(Debug)]
pub(crate) struct View<'a> {
    pub state: &'a State,
    pub registry: &'a Registry,
    pub now: Instant,
    pub heartbeat_timeout: Duration,
    pub routing_version: u64,
}

impl View<'_> {
    /// A server with its liveness and group counts.
    pub fn server_info(&self, server: &Server) -> ServerInfo {
        let groups = self
            .state
            .groups
            .values()
            .filter(|g| State::hosts(g, server.id));
        let (mut replicas, mut leaders) = (0u32, 0u32);
        for group in groups {
            replicas += 1;
            if self.registry.leader(group.id).server_id == server.id {
                leaders += 1;
            }
        }
        ServerInfo {
            id: server.id,
            addr: server.addr.clone(),
            raft_addr: server.raft_addr.clone(),
            http_addr: server.http_addr.clone(),
            last_heartbeat_ago_ms: self.registry.last_heartbeat_ago_ms(server.id, self.now),
            alive: self
                .registry
                .is_alive(server.id, self.now, self.heartbeat_timeout),
            group_replicas: replicas,
            group_leaders: leaders,
            draining: server.draining,
        }
    }

    /// Every registered server, by id.
    pub fn servers(&self) -> Vec<ServerInfo> {
        self.state
            .servers
            .values()
            .map(|s| self.server_info(s))
            .collect()
    }

    /// Every group, by id.
    pub fn groups(&self) -> Vec<GroupInfo> {
        let counts = self.state.tablet_counts();
        self.state
            .groups
            .values()
            .map(|group| {
                let leader = self.registry.leader(group.id);
                GroupInfo {
                    id: group.id,
                    replicas: group.replicas.clone(),
                    leader_server_id: leader.server_id,
                    term: leader.term,
                    tablet_count: counts.get(&group.id).copied().unwrap_or(0),
                    moving: group.moving.clone(),
                }
            })
            .collect()
    }

    /// One collection's tablets in routing-key order, with leaders and replica addresses.
    pub fn collection_route(&self, collection: &CollectionInfo) -> CollectionRoute {
        let tablets = self
            .state
            .tablets_of(collection.id)
            .into_iter()
            .map(|tablet| {
                let replicas = self
                    .state
                    .groups
                    .get(&tablet.group_id)
                    .map(|g| g.replicas.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|&server_id| ReplicaAddr {
                        server_id,
                        addr: self
                            .state
                            .servers
                            .get(&server_id)
                            .map(|s| s.addr.clone())
                            .unwrap_or_default(),
                    })
                    .collect();
                TabletRoute {
                    tablet: Some(tablet.clone()),
                    leader_server_id: self.registry.leader(tablet.group_id).server_id,
                    replicas,
                }
            })
            .collect();
        CollectionRoute {
            collection: Some(collection.clone()),
            tablets,
            routing_version: self.routing_version,
        }
    }

    /// Every collection's route, by collection id.
    pub fn routing_table(&self) -> RoutingTable {
        RoutingTable {
            routing_version: self.routing_version,
            collections: self
                .state
                .collections
                .values()
                .map(|c| self.collection_route(c))
                .collect(),
        }
    }
}
