//! `luna master`: one master replica, its state on a local journal stream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use luna_journal::{LocalConfig, LocalStream};
use luna_kernel::stream::Stream;
use luna_master::{Master, MasterConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use prometheus::{Encoder, Registry, TextEncoder};

use super::grpc_metrics::GrpcMetrics;
use super::http::{HttpEndpoint, MetricsFn};
use super::{parse_addr, shutdown_signal};
use crate::error::CliError;
use crate::stdout::say;

/// Flags of `luna master`.
#[derive(Debug, Args)]
pub struct MasterArgs {
    /// Directory of the master's state (its journal).
    #[arg(long, env = "LUNA_DATA_DIR", default_value = "luna-data/master")]
    pub data_dir: PathBuf,
    /// gRPC address to serve on.
    #[arg(long, default_value = "127.0.0.1:7420")]
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
}

/// A master replica serving gRPC and HTTP.
pub struct MasterProcess {
    master: Master,
    stream: Arc<LocalStream>,
    addr: SocketAddr,
    http: HttpEndpoint,
    stop_serving: Option<oneshot::Sender<()>>,
    serving: JoinHandle<()>,
}

impl MasterProcess {
    /// Opens the master's journal in `data_dir`, replays it, and serves on the addresses.
    pub async fn start(
        data_dir: &Path,
        listen: SocketAddr,
        http: SocketAddr,
        config: MasterConfig,
    ) -> Result<MasterProcess, CliError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| CliError::Listen {
                addr: listen.to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| CliError::Io {
            what: "reading the master's address",
            source,
        })?;
        let stream = Arc::new(
            LocalStream::open(LocalConfig::new(data_dir.join("journal"))).map_err(|source| {
                CliError::Journal {
                    what: "opening the master's journal",
                    source,
                }
            })?,
        );
        let master = Master::open(config, Arc::clone(&stream) as Arc<dyn Stream>).await?;
        let service = master.service();
        let registry = Registry::new_custom(Some("luna".to_owned()), None)
            .map_err(|error| CliError::Invalid(format!("metrics registry: {error}")))?;
        let grpc_metrics = GrpcMetrics::register(&registry, "master")
            .map_err(|error| CliError::Invalid(format!("metrics registry: {error}")))?;
        let (stop_serving, stop) = oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .layer(grpc_metrics)
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop.await;
                })
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
        let http = HttpEndpoint::start(http, metrics).await?;
        Ok(MasterProcess {
            master,
            stream,
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
        // Connection tasks of the stopped service let go of the master a moment later;
        // closing the journal then waits for its writer. Were it still shared, dropping it
        // is safe too: every acknowledged entry is already fsynced.
        let mut stream = self.stream;
        for _ in 0..50 {
            match Arc::try_unwrap(stream) {
                Ok(stream) => return stream.close().await,
                Err(shared) => stream = shared,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
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
    let listen = parse_addr("listen", &args.listen)?;
    let http = parse_addr("http", &args.http)?;
    let config = master_config(
        args.replication_factor,
        Duration::from_secs(args.heartbeat_timeout_secs),
    );
    let process = MasterProcess::start(&args.data_dir, listen, http, config).await?;
    say(format_args!(
        "master serving on {} (http://{})",
        process.addr(),
        process.http_addr()
    ));
    shutdown_signal().await;
    process.stop().await;
    Ok(())
}
