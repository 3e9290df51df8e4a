//! How a tablet server is set up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use luna_journal::raft::RaftConfig;
use luna_kernel::objstore::LunaObjectStore;
use luna_storage::{BaseStoreOptions, MemStoreOptions};

/// A tablet server's settings.
#[derive(Clone)]
pub struct TabletServerConfig {
    /// Local state: the server id and the journal.
    pub data_dir: PathBuf,
    /// The universe's object store; every collection's BaseStore lives under
    /// `collections/{id}` in it.
    pub object_store: Arc<LunaObjectStore>,
    /// The gRPC addresses of the master replicas (any one finds the leader).
    pub master_addrs: Vec<String>,
    /// Where to serve the tablet service (port 0 picks one).
    pub listen_addr: SocketAddr,
    /// Where to serve the journal transport (port 0 picks one).
    pub raft_listen_addr: SocketAddr,
    /// The HTTP address this server reports to the master (its /metrics and /health),
    /// served by the caller.
    pub http_addr: String,
    /// Time between heartbeats to the master.
    pub heartbeat_interval: Duration,
    /// Bytes of MemStore memory, summed over every tablet on the server, above which
    /// writes stall (and new ones are refused with Busy).
    pub memory_limit: usize,
    /// Memtable size and input limits of each tablet.
    pub memstore: MemStoreOptions,
    /// BaseStore tuning, shared by every collection (caches, job slots).
    pub base_store: BaseStoreOptions,
    /// Journal timing: tick interval and election/heartbeat ticks.
    pub election_tick: usize,
    /// Ticks between a group leader's heartbeats.
    pub heartbeat_tick: usize,
    /// Wall time of one journal tick.
    pub tick_interval: Duration,
    /// Most writes the leader of a group puts in one journal entry.
    pub max_batch_writes: usize,
    /// Journal entries a tablet's oldest unflushed write may lie behind its group's newest
    /// before the tablet is flushed, however small its MemStore. The log is truncated only
    /// behind every tablet's flushed writes, so without this a tablet that stops taking
    /// writes before its memtable fills would keep the whole log from its last writes on.
    pub flush_behind_entries: u64,
}

impl TabletServerConfig {
    /// The default of [`TabletServerConfig::flush_behind_entries`].
    pub const DEFAULT_FLUSH_BEHIND_ENTRIES: u64 = 20_000;

    /// Defaults for a server keeping its state in `data_dir`, reaching the master at
    /// `master_addrs` (one address, or every master replica's), with the universe's
    /// objects in `object_store`.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        master_addrs: Vec<String>,
        object_store: Arc<LunaObjectStore>,
    ) -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            data_dir: data_dir.into(),
            object_store,
            master_addrs,
            listen_addr: loopback,
            raft_listen_addr: loopback,
            http_addr: String::new(),
            heartbeat_interval: Duration::from_millis(500),
            memory_limit: 1 << 30,
            memstore: MemStoreOptions::default(),
            base_store: BaseStoreOptions {
                // The master names the compactor of each collection.
                compactor: false,
                ..BaseStoreOptions::default()
            },
            election_tick: 10,
            heartbeat_tick: 2,
            tick_interval: Duration::from_millis(50),
            max_batch_writes: 1024,
            flush_behind_entries: Self::DEFAULT_FLUSH_BEHIND_ENTRIES,
        }
    }

    pub(crate) fn raft_config(&self, server_id: u64) -> RaftConfig {
        let mut config = RaftConfig::new(server_id, self.data_dir.join("journal"));
        config.election_tick = self.election_tick;
        config.heartbeat_tick = self.heartbeat_tick;
        config.tick_interval = self.tick_interval;
        config.max_entry_size = crate::group::MAX_ENTRY_BYTES;
        config
    }
}
