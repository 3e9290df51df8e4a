//! `luna tablet-server`: one tablet server process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use clap::Args;
use luna_kernel::objstore::LunaObjectStore;
use luna_tablet_server::{TabletServer, TabletServerConfig};

use super::faults::FaultHooks;
use super::http::{HealthFn, HttpEndpoint, MetricsFn};
use super::metrics::object_store_text;
use super::{parse_addr, shutdown_signal};
use crate::error::CliError;
use crate::stdout::say;
use crate::store_args::StoreArgs;

/// A closure of the server's, set once the server exists (the HTTP endpoint starts first).
type FromServer<T> = Arc<OnceLock<Box<dyn Fn() -> T + Send + Sync>>>;

/// Flags of `luna tablet-server`.
#[derive(Debug, Args)]
pub struct TabletServerArgs {
    /// The master's gRPC address, or the master replicas' addresses separated by commas.
    #[arg(long, env = "LUNA_MASTER", default_value = "127.0.0.1:7420")]
    pub master: String,
    /// Tablet service address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Journal transport address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub raft_listen: String,
    /// HTTP address of /metrics and /health (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http: String,
    /// MemStore memory of all tablets together, in MiB, before writes stall.
    #[arg(long, default_value_t = 1024)]
    pub memory_mib: usize,
    /// Size at which a tablet's active memtable turns immutable and is flushed to the
    /// object store, in KiB. Small values mean more, smaller tables (and more compaction).
    #[arg(long, default_value_t = 32 * 1024)]
    pub memtable_kib: usize,
    /// Journal entries a tablet's unflushed writes may lie behind its group's newest
    /// before the tablet is flushed however small its MemStore, so that its group's log
    /// can be truncated.
    #[arg(long, default_value_t = TabletServerConfig::DEFAULT_FLUSH_BEHIND_ENTRIES)]
    pub flush_behind_entries: u64,
    /// The server's journal and identity live in DATA_DIR; every tablet server of a
    /// universe must use the same --object-store.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// How much a tablet server's MemStores may hold, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct MemStoreBounds {
    /// MemStore bytes of all tablets together, before writes stall.
    pub limit: usize,
    /// Bytes at which an active memtable turns immutable.
    pub memtable: usize,
    /// Journal entries a tablet's unflushed writes may lie behind before it is flushed.
    pub flush_behind_entries: u64,
}

/// A tablet server with its HTTP endpoint.
pub struct TabletProcess {
    server: TabletServer,
    http: HttpEndpoint,
}

impl TabletProcess {
    /// Starts a tablet server in `data_dir`; it registers with the master at
    /// `master`, waiting for it if needed.
    pub async fn start(
        data_dir: PathBuf,
        master: &str,
        object_store: Arc<LunaObjectStore>,
        addrs: [SocketAddr; 3],
        memory: MemStoreBounds,
    ) -> Result<TabletProcess, CliError> {
        let [listen, raft_listen, http] = addrs;
        // The endpoint starts first (the server reports its address to the master), and
        // renders the server's metrics once the server exists.
        let server_metrics: FromServer<String> = Arc::default();
        let metrics: MetricsFn = {
            let server_metrics = Arc::clone(&server_metrics);
            let store = Arc::clone(&object_store);
            Arc::new(move || {
                let mut text = server_metrics
                    .get()
                    .map(|render| render())
                    .unwrap_or_default();
                text.push_str(&object_store_text(&store));
                text
            })
        };
        let server_failure: FromServer<Option<String>> = Arc::default();
        let health: HealthFn = {
            let server_failure = Arc::clone(&server_failure);
            Arc::new(move || server_failure.get().and_then(|failure| failure()))
        };
        let hooks = FaultHooks::from_env(Some(Arc::clone(&object_store)));
        let http = HttpEndpoint::start(http, metrics, health, hooks.as_ref()).await?;
        let mut config = TabletServerConfig::new(
            data_dir,
            crate::cli::master_addrs(master)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            object_store,
        );
        config.listen_addr = listen;
        config.raft_listen_addr = raft_listen;
        config.http_addr = http.addr().to_string();
        config.memory_limit = memory.limit;
        config.memstore.memtable_size = memory.memtable;
        config.flush_behind_entries = memory.flush_behind_entries;
        let server = match TabletServer::start(config).await {
            Ok(server) => server,
            Err(error) => {
                http.stop().await;
                return Err(error.into());
            }
        };
        let _ = server_metrics.set(Box::new(server.metrics_renderer()));
        let _ = server_failure.set(Box::new(server.failure_checker()));
        if let Some(hooks) = &hooks {
            hooks.set_raft(server.raft_partition());
        }
        Ok(TabletProcess { server, http })
    }

    /// The server as started.
    pub fn server(&self) -> &TabletServer {
        &self.server
    }

    /// The HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.addr()
    }

    /// Stops the server (flushing what it owns) and its HTTP endpoint.
    pub async fn stop(self) {
        self.server.shutdown().await;
        self.http.stop().await;
    }
}

/// Runs `luna tablet-server` until Ctrl-C.
pub async fn run(args: TabletServerArgs) -> Result<(), CliError> {
    let addrs = [
        parse_addr("listen", &args.listen)?,
        parse_addr("raft-listen", &args.raft_listen)?,
        parse_addr("http", &args.http)?,
    ];
    let object_store = args.store.open()?;
    let process = TabletProcess::start(
        args.store.data_dir.clone(),
        &args.master,
        object_store,
        addrs,
        MemStoreBounds {
            limit: args.memory_mib.saturating_mul(1 << 20),
            memtable: args.memtable_kib.saturating_mul(1 << 10),
            flush_behind_entries: args.flush_behind_entries,
        },
    )
    .await?;
    let server = process.server();
    say(format_args!(
        "tablet server {} serving on {} (raft {}, http://{})",
        server.server_id(),
        server.addr(),
        server.raft_addr(),
        process.http_addr()
    ));
    shutdown_signal().await;
    process.stop().await;
    Ok(())
}
