//! Starting and stopping a tablet server: identity, journal, services, heartbeats.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use luna_journal::raft::grpc::GrpcNode;
use luna_proto::group::group_control_server::GroupControlServer;
use luna_proto::master as mpb;
use luna_proto::tablet::tablet_server::TabletServer as TabletGrpcServer;
use luna_storage::MemoryBudget;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::config::TabletServerConfig;
use crate::error::{Result, TabletServerError};
use crate::group::{GroupContext, TabletIndex};
use crate::hosting::Hosting;
use crate::master_link::MasterLink;
use crate::metrics::ServerMetrics;
use crate::service::{GroupControlService, TabletService};
use crate::stores::CollectionStores;

/// The file in the data directory that keeps the id the master gave this server.
const SERVER_ID_FILE: &str = "server-id";
/// Largest request the tablet service accepts: a maximal value plus its key and framing.
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// A running tablet server.
pub struct TabletServer {
    server_id: u64,
    addr: SocketAddr,
    raft_addr: SocketAddr,
    hosting: Arc<Hosting>,
    /// Set to true to stop the service and end its `Multiplex` streams.
    stop_serving: watch::Sender<bool>,
    serving: JoinHandle<()>,
    heartbeats: JoinHandle<()>,
}

impl TabletServer {
    /// Starts a server: registers with the master (retrying until it answers), starts the
    /// journal and the tablet service, and begins heartbeating. Must run inside a tokio
    /// runtime.
    pub async fn start(config: TabletServerConfig) -> Result<TabletServer> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| {
            TabletServerError::io(format!("creating {}", config.data_dir.display()), source)
        })?;
        let listener = bind(config.listen_addr).await?;
        let raft_listener = bind(config.raft_listen_addr).await?;
        let addr = local_addr(&listener)?;
        let raft_addr = local_addr(&raft_listener)?;
        let master = Arc::new(MasterLink::new(&config.master_addrs)?);

        let known_id = read_server_id(&config.data_dir)?;
        let first = register(&master, &config, known_id, addr, raft_addr).await?;
        let server_id = first.server_id;
        if known_id != Some(server_id) {
            write_server_id(&config.data_dir, server_id)?;
        }

        let node = GrpcNode::start(
            config.raft_config(server_id),
            raft_listener,
            &HashMap::new(),
        )?;
        let ctx = Arc::new(GroupContext {
            server_id,
            stores: CollectionStores::new(
                Arc::clone(&config.object_store),
                config.base_store.clone(),
            ),
            budget: Arc::new(MemoryBudget::new(config.memory_limit)),
            memstore: config.memstore,
            master: Arc::clone(&master),
            tablet_groups: TabletIndex::default(),
            peer_addrs: RwLock::new(HashMap::new()),
            max_batch_writes: config.max_batch_writes.max(1),
            flush_behind_entries: config.flush_behind_entries.max(1),
            metrics: ServerMetrics::new(server_id).map_err(|error| {
                TabletServerError::Internal(format!("registering metrics: {error}"))
            })?,
        });
        let hosting = Arc::new(Hosting::new(ctx, node));

        let (stop_serving, stopping) = watch::channel(false);
        let mut stop = stopping.clone();
        let service = TabletGrpcServer::new(TabletService::new(Arc::clone(&hosting), stopping))
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES);
        let control = GroupControlServer::new(GroupControlService::new(Arc::clone(&hosting)))
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES);
        let serving = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(service)
                .add_service(control)
                .serve_with_incoming_shutdown(
                    // The builder's tcp_nodelay covers only sockets it binds itself: without
                    // this, small replies wait out Nagle and delayed ACKs (40 ms).
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    },
                )
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "tablet service failed");
            }
        });

        hosting.apply_assignment(&first).await;
        let heartbeats = tokio::spawn(heartbeat_loop(
            Arc::clone(&hosting),
            master,
            config.clone(),
            addr,
            raft_addr,
        ));
        tracing::info!(server_id, %addr, %raft_addr, "tablet server started");
        Ok(TabletServer {
            server_id,
            addr,
            raft_addr,
            hosting,
            stop_serving,
            serving,
            heartbeats,
        })
    }

    /// The id the master gave this server.
    pub fn server_id(&self) -> u64 {
        self.server_id
    }

    /// The tablet service's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The journal transport's address.
    pub fn raft_addr(&self) -> SocketAddr {
        self.raft_addr
    }

    /// The network partition the server's journal keeps (none unless a fault test cuts
    /// peers off; see `luna chaos`).
    pub fn raft_partition(&self) -> luna_journal::raft::Partition {
        self.hosting.raft_partition()
    }

    /// Tells why the server can no longer serve (its journal failed: see
    /// `luna_journal::raft::Node::failure`), if it cannot, for as long as the server runs.
    pub fn failure_checker(&self) -> impl Fn() -> Option<String> + Send + Sync + 'static {
        let hosting = Arc::clone(&self.hosting);
        move || {
            hosting
                .journal_failure()
                .map(|failure| format!("the journal failed: {failure}"))
        }
    }

    /// Renders the server's metrics in the Prometheus text format, for as long as the
    /// server runs (afterwards it renders the last state).
    pub fn metrics_renderer(&self) -> impl Fn() -> String + Send + Sync + 'static {
        let hosting = Arc::clone(&self.hosting);
        move || hosting.metrics_text()
    }

    /// Stops heartbeats and the service, then every group: tablets this server owns are
    /// flushed, and the journal is closed.
    pub async fn shutdown(self) {
        self.heartbeats.abort();
        self.stop_serving.send_replace(true);
        self.serving.abort();
        self.hosting.shutdown().await;
        tracing::info!(server_id = self.server_id, "tablet server stopped");
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| TabletServerError::io(format!("listening on {addr}"), source))
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr> {
    listener
        .local_addr()
        .map_err(|source| TabletServerError::io("reading a listener's address", source))
}

/// A heartbeat that says who this server is and where it listens, and nothing else.
fn heartbeat_request(
    config: &TabletServerConfig,
    server_id: u64,
    addr: SocketAddr,
    raft_addr: SocketAddr,
) -> mpb::HeartbeatRequest {
    mpb::HeartbeatRequest {
        server_id,
        addr: addr.to_string(),
        raft_addr: raft_addr.to_string(),
        http_addr: config.http_addr.clone(),
        ..Default::default()
    }
}

/// The first heartbeat: registers (or re-announces) this server, waiting for the master
/// with backoff, since servers may start before it.
async fn register(
    master: &MasterLink,
    config: &TabletServerConfig,
    known_id: Option<u64>,
    addr: SocketAddr,
    raft_addr: SocketAddr,
) -> Result<mpb::HeartbeatResponse> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let request = heartbeat_request(config, known_id.unwrap_or(0), addr, raft_addr);
        match master.heartbeat(&request).await {
            Ok(response) => return Ok(response),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                return Err(TabletServerError::Master {
                    addr: master.addrs(),
                    detail: status.message().to_owned(),
                });
            }
            Err(status) => {
                tracing::info!(master = %master.addrs(), error = %status.message(), "waiting for the master");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn heartbeat_loop(
    hosting: Arc<Hosting>,
    master: Arc<MasterLink>,
    config: TabletServerConfig,
    addr: SocketAddr,
    raft_addr: SocketAddr,
) {
    let mut ticker = tokio::time::interval(config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Every group of a server whose journal failed is closed. Heartbeats would keep it
        // registered as alive, so the master would never replace its replicas: stop them.
        if let Some(failure) = hosting.journal_failure() {
            tracing::error!(
                server_id = hosting.server_id(),
                %failure,
                "the journal failed; heartbeats stop so that the master replaces this server's replicas"
            );
            return;
        }
        let request = mpb::HeartbeatRequest {
            groups: hosting.report(),
            memory_bytes: hosting.context().budget.used() as u64,
            disk_behind: hosting.disk_behind(),
            ..heartbeat_request(&config, hosting.server_id(), addr, raft_addr)
        };
        match master.heartbeat(&request).await {
            Ok(response) => hosting.apply_assignment(&response).await,
            Err(status) => {
                tracing::warn!(master = %master.addrs(), error = %status.message(), "heartbeat failed");
            }
        }
    }
}

fn read_server_id(data_dir: &Path) -> Result<Option<u64>> {
    let path = data_dir.join(SERVER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().map(Some).map_err(|_| {
            TabletServerError::InvalidArgument(format!(
                "{} does not hold a server id; remove it only if this directory holds no data",
                path.display()
            ))
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TabletServerError::io(
            format!("reading {}", path.display()),
            source,
        )),
    }
}

/// Writes the id durably (temp file, fsync, rename, directory fsync): a server that
/// forgot its id would register again and strand its replicas.
fn write_server_id(data_dir: &Path, server_id: u64) -> Result<()> {
    let path = data_dir.join(SERVER_ID_FILE);
    let temp = data_dir.join(format!("{SERVER_ID_FILE}.tmp"));
    let io =
        |what: &str, source| TabletServerError::io(format!("{what} {}", path.display()), source);
    let file = std::fs::File::create(&temp).map_err(|e| io("creating", e))?;
    std::io::Write::write_all(&mut &file, format!("{server_id}\n").as_bytes())
        .map_err(|e| io("writing", e))?;
    file.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&temp, &path).map_err(|e| io("renaming", e))?;
    std::fs::File::open(data_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| io("syncing the directory of", e))?;
    Ok(())
}
