//! `luna start`: a whole local universe in one process — a master and tablet servers on
//! loopback, with the objects under the data directory by default.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use super::master::{MasterProcess, master_config};
use super::tablet::TabletProcess;
use super::{parse_addr, shutdown_signal};
use crate::error::CliError;
use crate::stdout::say;
use crate::store_args::StoreArgs;

/// Flags of `luna start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The master's gRPC address; tablet servers take the next ports (tablet service at
    /// +1.., journal at +11..).
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub master_addr: String,
    /// The master's HTTP address; tablet servers take the next ports.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub http_addr: String,
    /// Tablet servers to run.
    #[arg(long, default_value_t = 3)]
    pub servers: u16,
    /// Replicas of every group (at most --servers).
    #[arg(long, default_value_t = 3)]
    pub replication_factor: u32,
    /// MemStore memory per tablet server, in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: usize,
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
    let master_addr = parse_addr("master-addr", &args.master_addr)?;
    let http_addr = parse_addr("http-addr", &args.http_addr)?;
    let object_store = args.store.open()?;
    let data_dir = &args.store.data_dir;

    let master = MasterProcess::start(
        &data_dir.join("master"),
        master_addr,
        http_addr,
        master_config(args.replication_factor, Duration::from_secs(10)),
    )
    .await?;
    let master_target = master.addr().to_string();
    let mut servers = Vec::new();
    for i in 1..=args.servers {
        let addrs = [
            offset(master.addr(), i)?,
            offset(master.addr(), 10 + i)?,
            offset(master.http_addr(), i)?,
        ];
        let server = TabletProcess::start(
            data_dir.join("servers").join(i.to_string()),
            &master_target,
            std::sync::Arc::clone(&object_store),
            addrs,
            args.memory_mib.saturating_mul(1 << 20),
        )
        .await;
        match server {
            Ok(server) => servers.push(server),
            Err(error) => {
                stop_all(servers, master).await;
                return Err(error);
            }
        }
    }

    say(format_args!(
        "Luna is running (data in {}).",
        data_dir.display()
    ));
    say(format_args!(
        "  master            {}  http://{}",
        master.addr(),
        master.http_addr()
    ));
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
    stop_all(servers, master).await;
    say(format_args!("Stopped."));
    Ok(())
}

async fn stop_all(servers: Vec<TabletProcess>, master: MasterProcess) {
    for server in servers {
        server.stop().await;
    }
    master.stop().await;
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
