//! The universe master: catalog, routing, timestamps and placement.
//!
//! The master's state (databases, collections, tablets, groups, servers, the TSO window)
//! is a deterministic state machine on a journal [`Stream`]: every change is a
//! `masterlog::Command` appended by the leader and applied in log order, and opening a
//! master replays the log. Liveness and group leaders are soft state rebuilt from
//! heartbeats. docs/master.md describes the design.
//!
//! ```no_run
//! # async fn run(stream: std::sync::Arc<dyn luna_kernel::stream::Stream>) -> Result<(), Box<dyn std::error::Error>> {
//! use luna_master::{Master, MasterConfig};
//! let master = Master::open(MasterConfig::default(), stream).await?;
//! tonic::transport::Server::builder()
//!     .add_service(master.service())
//!     .serve("127.0.0.1:7420".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```

mod catalog;
mod config;
mod core;
mod driver;
mod error;
mod gc;
mod heartbeat;
mod leadership;
mod moves;
mod ops;
mod placement;
mod routing;
mod service;
mod state;
mod tablet_balance;
mod tablet_moves;
mod tablet_splits;
mod tso;

use std::sync::Arc;

use luna_kernel::stream::Stream;
use luna_proto::master::master_server::MasterServer;
use luna_proto::master::{
    CollectionInfo, CollectionRoute, CreateCollectionRequest, DatabaseInfo, HeartbeatRequest,
    HeartbeatResponse, RoutingTable,
};
use luna_proto::masterlog::MasterState;
use tokio::task::JoinHandle;

pub use crate::catalog::{MAX_NAME_LEN, MAX_SPLIT_KEY_LEN};
pub use crate::config::{
    Clock, MAX_GROUPS_PER_SERVER, MAX_REPLICATION_FACTOR, MAX_TABLETS, MasterConfig, SystemClock,
};
pub use crate::error::MasterError;
pub use crate::service::{MasterService, RoutingStream};
pub use crate::tso::{LOGICAL_BITS, MAX_TIMESTAMP_BATCH, Timestamps, physical_ms};

use crate::core::Core;

/// A running master replica.
///
/// Dropping it stops the apply loop; [`shutdown`](Self::shutdown) also waits for it.
#[derive(Debug)]
pub struct Master {
    core: Arc<Core>,
    apply_task: Option<JoinHandle<()>>,
}

impl Master {
    /// Opens the master on `stream`: replays every committed entry from index 1 and returns
    /// once the state has caught up with everything committed before the call. A replica of
    /// a replicated master waits for that at most twice `election_wait` (it needs a leader
    /// to learn what was committed); it keeps catching up after `open` returns.
    pub async fn open(config: MasterConfig, stream: Arc<dyn Stream>) -> Result<Self, MasterError> {
        let (core, apply_task) = Core::open(config, stream).await?;
        Ok(Self {
            core,
            apply_task: Some(apply_task),
        })
    }

    /// The gRPC service to mount on a tonic server.
    pub fn service(&self) -> MasterServer<MasterService> {
        MasterServer::new(MasterService::new(Arc::clone(&self.core)))
    }

    /// Hands out `count` timestamps (0 means 1), as `GetTimestamps` does.
    pub async fn timestamps(&self, count: u32) -> Result<Timestamps, MasterError> {
        self.core.timestamps(count, 0).await
    }

    /// Hands out `count` timestamps (0 means 1), all above `after`, as `GetTimestamps`
    /// does.
    pub async fn timestamps_after(
        &self,
        count: u32,
        after: u64,
    ) -> Result<Timestamps, MasterError> {
        self.core.timestamps(count, after).await
    }

    /// Creates a database, as `CreateDatabase` does.
    pub async fn create_database(&self, name: &str) -> Result<DatabaseInfo, MasterError> {
        self.core.create_database(name).await
    }

    /// Creates a collection, as `CreateCollection` does.
    pub async fn create_collection(
        &self,
        request: &CreateCollectionRequest,
    ) -> Result<CollectionInfo, MasterError> {
        self.core.create_collection(request).await
    }

    /// Handles a tablet-server heartbeat, as `Heartbeat` does.
    pub async fn heartbeat(
        &self,
        request: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, MasterError> {
        self.core.heartbeat(request).await
    }

    /// The route of one collection, as `GetRouting` returns it.
    pub fn routing(
        &self,
        database: &str,
        collection: &str,
    ) -> Result<CollectionRoute, MasterError> {
        self.core.routing(database, collection)
    }

    /// The whole routing table.
    pub fn routing_table(&self) -> RoutingTable {
        self.core.routing_table()
    }

    /// The current routing version.
    pub fn routing_version(&self) -> u64 {
        *self.core.routing_version.borrow()
    }

    /// The replicated state as a snapshot message (for inspection and tests).
    pub fn state(&self) -> MasterState {
        self.core.read_state().snapshot()
    }

    /// Renders the master's state as Prometheus gauges (catalog sizes, servers alive, routing
    /// version, TSO window), for the process's `/metrics`.
    pub fn state_renderer(&self) -> impl Fn() -> String + Send + Sync + 'static {
        let core = Arc::clone(&self.core);
        move || {
            let state = core.read_state().snapshot();
            let servers = core.list_servers();
            let alive = servers.iter().filter(|server| server.alive).count();
            let routing_version = *core.routing_version.borrow();
            let gauges = [
                (
                    "luna_master_databases",
                    "Databases in the catalog",
                    state.databases.len() as u64,
                ),
                (
                    "luna_master_collections",
                    "Collections in the catalog",
                    state.collections.len() as u64,
                ),
                (
                    "luna_master_tablets",
                    "Tablets in the catalog",
                    state.tablets.len() as u64,
                ),
                (
                    "luna_master_groups",
                    "Tablet groups",
                    state.groups.len() as u64,
                ),
                (
                    "luna_master_servers",
                    "Registered tablet servers",
                    servers.len() as u64,
                ),
                (
                    "luna_master_servers_alive",
                    "Tablet servers heard from within the heartbeat timeout",
                    alive as u64,
                ),
                (
                    "luna_master_routing_version",
                    "Routing table version",
                    routing_version,
                ),
                (
                    "luna_master_applied_index",
                    "Highest applied index of the master's journal",
                    state.applied_index,
                ),
                (
                    "luna_master_tso_limit",
                    "Persisted TSO window limit",
                    state.tso_limit,
                ),
                (
                    "luna_master_gc_safe_point",
                    "MVCC versions below this timestamp may be dropped",
                    state.gc_safe_point,
                ),
            ];
            let mut out = String::new();
            for (name, help, value) in gauges {
                out.push_str(&format!(
                    "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
                ));
            }
            out
        }
    }

    /// Stops the apply loop and ends open WatchRouting streams; later requests fail with
    /// UNAVAILABLE. Waits until the loop has stopped.
    pub async fn shutdown(mut self) {
        self.core.shutdown.send_replace(true);
        if let Some(task) = self.apply_task.take() {
            // A loop that panicked has stopped too, which is all this waits for.
            let _ = task.await;
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.core.shutdown.send_replace(true);
    }
}
