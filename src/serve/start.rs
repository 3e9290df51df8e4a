//! `luna start`: a whole local universe in one process — a master (or three master
//! replicas) and tablet servers on loopback, with the objects under the data directory by
//! default.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use luna_tablet_server::TabletServerConfig;

use super::master::{MasterProcess, bind, master_config, replica_addrs};
use super::master_journal::{MasterJournal, ReplicaAddrs};
use super::tablet::{MemStoreBounds, TabletProcess};
use super::{parse_addr, shutdown_signal};
use crate::error::CliError;
use crate::stdout::say;
use crate::store_args::StoreArgs;

/// Flags of `luna start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The master's gRPC address; tablet servers take the next ports (tablet service at
    /// +1.., journal at +11..), and further master replicas +21.. (their journals +31..).
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub master_addr: String,
    /// The master's HTTP address; tablet servers take the next ports, and further master
    /// replicas +11...
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub http_addr: String,
    /// Master replicas to run: 1, or 3 (or 5, 7) replicated on a raft stream so the
    /// universe survives the loss of a master.
    #[arg(long, default_value_t = 1)]
    pub masters: u16,
    /// Tablet servers to run.
    #[arg(long, default_value_t = 3)]
    pub servers: u16,
    /// Replicas of every group (at most --servers).
    #[arg(long, default_value_t = 3)]
    pub replication_factor: u32,
    /// MemStore memory per tablet server, in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: usize,
    /// A tablet whose data grows past this many MiB splits in the middle; 0: never.
    #[arg(long, default_value_t = 512)]
    pub split_size_mb: u64,
    /// Where the universe keeps its data.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Runs the universe until Ctrl-C, then stops it cleanly.
pub async fn run(args: StartArgs) -> Result<(), CliError> {
    // Tablet services take ports +1..+10 and journals +11..+20 after the master's.
    if args.servers > 10 {
        return Err(CliError::Invalid(format!(
            "--servers {} is more than luna start runs (10); run more with `luna tablet-server`",
            args.servers
        )));
    }
    if args.servers == 0 || u32::from(args.servers) < args.replication_factor {
        return Err(CliError::Invalid(format!(
            "--servers {} cannot hold --replication-factor {}: run at least as many servers as replicas",
            args.servers, args.replication_factor
        )));
    }
    if !(1..=7).contains(&args.masters) || args.masters.is_multiple_of(2) {
        return Err(CliError::Invalid(format!(
            "--masters {}: run 1, 3, 5 or 7 master replicas (a majority must survive)",
            args.masters
        )));
    }
    let master_addr = parse_addr("master-addr", &args.master_addr)?;
    let http_addr = parse_addr("http-addr", &args.http_addr)?;
    let object_store = args.store.open()?;
    let data_dir = &args.store.data_dir;

    let masters = start_masters(&args, master_addr, http_addr).await?;
    let master_target = masters
        .iter()
        .map(|master| master.addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let first = masters[0].addr();
    let mut servers = Vec::new();
    for i in 1..=args.servers {
        let addrs = [
            offset(first, i)?,
            offset(first, 10 + i)?,
            offset(masters[0].http_addr(), i)?,
        ];
        let server = TabletProcess::start(
            data_dir.join("servers").join(i.to_string()),
            &master_target,
            std::sync::Arc::clone(&object_store),
            addrs,
            MemStoreBounds {
                limit: args.memory_mib.saturating_mul(1 << 20),
                memtable: luna_storage::MemStoreOptions::default().memtable_size,
                flush_behind_entries: TabletServerConfig::DEFAULT_FLUSH_BEHIND_ENTRIES,
            },
        )
        .await;
        match server {
            Ok(server) => servers.push(server),
            Err(error) => {
                stop_all(servers, masters).await;
                return Err(error);
            }
        }
    }

    say(format_args!(
        "Luna is running (data in {}).",
        data_dir.display()
    ));
    for (i, master) in masters.iter().enumerate() {
        let name = match masters.len() {
            1 => "master".to_owned(),
            _ => format!("master {}", i + 1),
        };
        say(format_args!(
            "  {name:<17} {}  http://{}",
            master.addr(),
            master.http_addr()
        ));
    }
    for process in &servers {
        let server = process.server();
        say(format_args!(
            "  tablet server {:<3} {}  http://{}  (journal {})",
            server.server_id(),
            server.addr(),
            process.http_addr(),
            server.raft_addr()
        ));
    }
    say(format_args!(
        "Try: luna db create app && luna collection create app/users && luna put app/users alice 1"
    ));
    say(format_args!("Press Ctrl-C to stop."));
    shutdown_signal().await;
    say(format_args!("Stopping..."));
    stop_all(servers, masters).await;
    say(format_args!("Stopped."));
    Ok(())
}

/// Starts the master: alone on a local journal in `DATA_DIR/master`, or as `--masters`
/// replicas on a raft stream, each in `DATA_DIR/masters/ID`.
async fn start_masters(
    args: &StartArgs,
    master_addr: SocketAddr,
    http_addr: SocketAddr,
) -> Result<Vec<MasterProcess>, CliError> {
    let data_dir = &args.store.data_dir;
    let mut config = master_config(args.replication_factor, Duration::from_secs(10));
    config.split_size = args.split_size_mb.saturating_mul(1 << 20);
    // A universe's catalog lives where its first start put it; another layout would start
    // an empty master beside it.
    let (other, other_flag) = match args.masters {
        1 => (data_dir.join("masters"), "--masters 3 (or 5, 7)"),
        _ => (data_dir.join("master"), "--masters 1"),
    };
    if other.exists() {
        return Err(CliError::Invalid(format!(
            "{} holds a universe started with {other_flag}: start it the same way, or use \
             another --data-dir",
            data_dir.display()
        )));
    }
    if args.masters == 1 {
        let journal = MasterJournal::local(&data_dir.join("master"))?;
        let master = MasterProcess::start(bind(master_addr).await?, http_addr, journal, config);
        return Ok(vec![master.await?]);
    }
    // Every listener first: with port 0 the replicas learn each other's ports this way.
    let mut listeners = Vec::new();
    let mut replicas = Vec::new();
    for id in 1..=args.masters {
        let client_offset = if id == 1 { 0 } else { 19 + id };
        let client = bind(offset(master_addr, client_offset)?).await?;
        let raft = bind(offset(master_addr, 30 + id)?).await?;
        let read = |listener: &tokio::net::TcpListener| {
            listener.local_addr().map_err(|source| CliError::Io {
                what: "reading a master listener's address",
                source,
            })
        };
        replicas.push(ReplicaAddrs {
            id: u64::from(id),
            client: read(&client)?,
            raft: read(&raft)?,
        });
        let http = offset(http_addr, if id == 1 { 0 } else { 9 + id })?;
        listeners.push((client, raft, http));
    }
    let mut config = config;
    config.replica_addrs = replica_addrs(&replicas);
    // Opened together: each one's open waits for the election the others take part in.
    let opening = listeners
        .into_iter()
        .zip(&replicas)
        .map(|((client, raft, http), replica)| {
            let config = config.clone();
            let replicas = &replicas;
            async move {
                let dir = data_dir.join("masters").join(replica.id.to_string());
                let journal = MasterJournal::replicated(&dir, replica.id, replicas, raft).await?;
                MasterProcess::start(client, http, journal, config).await
            }
        });
    let mut masters = Vec::new();
    let mut failure = None;
    for started in futures::future::join_all(opening).await {
        match started {
            Ok(master) => masters.push(master),
            Err(error) => failure = Some(error),
        }
    }
    if let Some(error) = failure {
        for master in masters {
            master.stop().await;
        }
        return Err(error);
    }
    Ok(masters)
}

async fn stop_all(servers: Vec<TabletProcess>, masters: Vec<MasterProcess>) {
    for server in servers {
        server.stop().await;
    }
    for master in masters {
        master.stop().await;
    }
}

/// `base` with its port moved up by `by` (port 0 stays 0: pick any free port).
fn offset(base: SocketAddr, by: u16) -> Result<SocketAddr, CliError> {
    if base.port() == 0 {
        return Ok(base);
    }
    let port = base.port().checked_add(by).ok_or_else(|| {
        CliError::Invalid(format!(
            "port {} + {by} is past 65535; pick a lower port",
            base.port()
        ))
    })?;
    Ok(SocketAddr::new(base.ip(), port))
}
