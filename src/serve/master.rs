//! `luna master`: a master replica, its state on a local journal stream, or on a raft
//! stream shared with the other replicas (`--replica-id` and `--replica`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use luna_master::{Master, MasterConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use prometheus::{Encoder, Registry, TextEncoder};

use super::faults::FaultHooks;
use super::grpc_metrics::GrpcMetrics;
use super::http::{HttpEndpoint, MetricsFn};
use super::master_journal::{MasterJournal, ReplicaAddrs, check_replicas};
use super::{parse_addr, shutdown_signal};
use crate::error::CliError;
use crate::stdout::say;

/// Flags of `luna master`.
#[derive(Debug, Args)]
pub struct MasterArgs {
    /// Directory of the master's state (its journal).
    #[arg(long, env = "LUNA_DATA_DIR", default_value = "luna-data/master")]
    pub data_dir: PathBuf,
    /// gRPC address to serve on (a replica serves on its own `--replica` entry instead).
    #[arg(long, default_value = "127.0.0.1:7420", conflicts_with = "replicas")]
    pub listen: String,
    /// HTTP address of /metrics and /health.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub http: String,
    /// Replicas per group unless a collection asks otherwise.
    #[arg(long, default_value_t = 3)]
    pub replication_factor: u32,
    /// Seconds without a heartbeat after which a tablet server counts as down.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_timeout_secs: u64,
    /// Seconds a tablet server must be silent before its replicas are rebuilt on other
    /// servers (at least the heartbeat timeout).
    #[arg(long, default_value_t = 300)]
    pub repair_after_secs: u64,
    /// Most replica moves under way at once for repair, drain and balancing (each new
    /// replica replays its group's log from the others).
    #[arg(long, default_value_t = 2)]
    pub max_moves: usize,
    /// Seconds an overwritten or deleted version stays readable (at least 1): the GC
    /// safe point trails the clock by this much, and further while a transaction or
    /// snapshot that started earlier is still open.
    #[arg(long, default_value_t = 600)]
    pub gc_life_time_secs: u64,
    /// Seconds the groups' tablet counts must stay more than one apart before a tablet
    /// moves to even them out (tablets an operator moved or split stay put); 0: never.
    #[arg(long, default_value_t = 60)]
    pub tablet_balance_after_secs: u64,
    /// A tablet whose data grows past this many MiB splits in the middle; 0: never.
    #[arg(long, default_value_t = 512)]
    pub split_size_mb: u64,
    /// A tablet that serves this many reads and writes per second for
    /// --split-load-secs splits in the middle; 0: never.
    #[arg(long, default_value_t = 10_000)]
    pub split_load_ops: u64,
    /// Seconds a tablet's load must stay over --split-load-ops before it splits.
    #[arg(long, default_value_t = 30)]
    pub split_load_secs: u64,
    /// This replica's id, for a replicated master: one of the `--replica` ids.
    #[arg(long, requires = "replicas")]
    pub replica_id: Option<u64>,
    /// Every master replica, as ID=CLIENT_ADDR/RAFT_ADDR (repeat the flag, or separate
    /// with commas); the same list on each replica. Without it the master runs alone.
    #[arg(
        long = "replica",
        id = "replicas",
        value_delimiter = ',',
        requires = "replica_id"
    )]
    pub replicas: Vec<ReplicaAddrs>,
}

/// A master replica serving gRPC and HTTP.
pub struct MasterProcess {
    master: Master,
    journal: MasterJournal,
    addr: SocketAddr,
    http: HttpEndpoint,
    stop_serving: Option<oneshot::Sender<()>>,
    serving: JoinHandle<()>,
}

impl MasterProcess {
    /// Opens the master on `journal` and serves gRPC on `listener` and HTTP on `http`.
    pub async fn start(
        listener: TcpListener,
        http: SocketAddr,
        journal: MasterJournal,
        config: MasterConfig,
    ) -> Result<MasterProcess, CliError> {
        let addr = listener.local_addr().map_err(|source| CliError::Io {
            what: "reading the master's address",
            source,
        })?;
        let master = match Master::open(config, journal.stream()).await {
            Ok(master) => master,
            Err(error) => {
                journal.close().await;
                return Err(error.into());
            }
        };
        let service = master.service();
        let registry = Registry::new_custom(Some("luna".to_owned()), None)
            .map_err(|error| CliError::Invalid(format!("metrics registry: {error}")))?;
        let grpc_metrics = GrpcMetrics::register(&registry, "master")
            .map_err(|error| CliError::Invalid(format!("metrics registry: {error}")))?;
        let (stop_serving, stop) = oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .layer(grpc_metrics)
                .add_service(service)
                .serve_with_incoming_shutdown(
                    // The builder's tcp_nodelay covers only sockets it binds itself: without
                    // this, small replies wait out Nagle and delayed ACKs (40 ms).
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stop.await;
                    },
                )
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "master service failed");
            }
        });
        let state = master.state_renderer();
        let metrics: MetricsFn = Arc::new(move || {
            let mut text = Vec::new();
            let _ = TextEncoder::new().encode(&registry.gather(), &mut text);
            let mut text = String::from_utf8(text).unwrap_or_default();
            text.push_str(&state());
            text
        });
        let hooks = FaultHooks::from_env(None);
        if let (Some(hooks), Some(partition)) = (&hooks, journal.raft_partition()) {
            hooks.set_raft(partition);
        }
        let http = HttpEndpoint::start(http, metrics, Arc::new(|| None), hooks.as_ref()).await?;
        Ok(MasterProcess {
            master,
            journal,
            addr,
            http,
            stop_serving: Some(stop_serving),
            serving,
        })
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.addr()
    }

    /// Stops serving and closes the journal.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop_serving.take() {
            let _ = stop.send(());
        }
        // Open client streams would hold the graceful stop; the service holds the master.
        self.serving.abort();
        let _ = (&mut self.serving).await;
        self.http.stop().await;
        self.master.shutdown().await;
        self.journal.close().await;
    }
}

/// Binds a gRPC listener, with the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| CliError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// The client addresses of `replicas`, by id, for the master's leader hints.
pub fn replica_addrs(replicas: &[ReplicaAddrs]) -> std::collections::BTreeMap<u64, String> {
    replicas
        .iter()
        .map(|replica| (replica.id, replica.client.to_string()))
        .collect()
}

/// The master settings the flags ask for.
pub fn master_config(replication_factor: u32, heartbeat_timeout: Duration) -> MasterConfig {
    MasterConfig {
        default_replication_factor: replication_factor,
        heartbeat_timeout,
        ..MasterConfig::default()
    }
}

/// Runs `luna master` until Ctrl-C.
pub async fn run(args: MasterArgs) -> Result<(), CliError> {
    let http = parse_addr("http", &args.http)?;
    let mut config = master_config(
        args.replication_factor,
        Duration::from_secs(args.heartbeat_timeout_secs),
    );
    config.repair_after = Duration::from_secs(args.repair_after_secs);
    config.max_moves = args.max_moves;
    config.gc_life_time = Duration::from_secs(args.gc_life_time_secs);
    config.tablet_balance_after = Duration::from_secs(args.tablet_balance_after_secs);
    config.split_size = args.split_size_mb.saturating_mul(1 << 20);
    config.split_load_ops = args.split_load_ops;
    config.split_load_for = Duration::from_secs(args.split_load_secs);
    // Raised at least twice per life time, so versions live about as long as asked.
    config.gc_interval = config.gc_interval.min(config.gc_life_time / 2);
    let process = match args.replica_id {
        None => {
            let listener = bind(parse_addr("listen", &args.listen)?).await?;
            let journal = MasterJournal::local(&args.data_dir)?;
            MasterProcess::start(listener, http, journal, config).await?
        }
        Some(me) => {
            check_replicas(&args.replicas, me)?;
            let own = args
                .replicas
                .iter()
                .find(|replica| replica.id == me)
                .ok_or_else(|| CliError::Invalid(format!("no --replica entry for {me}")))?;
            let listener = bind(own.client).await?;
            let raft_listener = bind(own.raft).await?;
            let journal =
                MasterJournal::replicated(&args.data_dir, me, &args.replicas, raft_listener)
                    .await?;
            config.replica_addrs = replica_addrs(&args.replicas);
            MasterProcess::start(listener, http, journal, config).await?
        }
    };
    say(format_args!(
        "master serving on {} (http://{})",
        process.addr(),
        process.http_addr()
    ));
    shutdown_signal().await;
    process.stop().await;
    Ok(())
}
