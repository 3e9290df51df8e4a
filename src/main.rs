//! `luna`: the one binary. `luna start` runs a local universe; `luna master` and
//! `luna tablet-server` run the roles as separate processes; the other subcommands talk
//! to a running universe or measure Luna on this machine.

mod bench;
mod chaos;
mod cli;
mod error;
mod harness;
mod serve;
mod stdout;
mod store_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;

// glibc malloc took ~15% of the server's CPU under load (arena locking and
// consolidation across tokio's worker threads); mimalloc's thread-local free lists cut it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Luna: a disaggregated, transactional key-value engine on object storage.
#[derive(Parser)]
#[command(name = "luna", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connection: cli::Connection,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local universe: a master and 3 tablet servers, replication factor 3.
    Start(serve::start::StartArgs),
    /// Run a master.
    Master(serve::master::MasterArgs),
    /// Run a tablet server.
    TabletServer(serve::tablet::TabletServerArgs),
    /// Measure Luna's components on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Inject faults into a universe of local processes under load, and check that what
    /// clients saw is linearizable and that no acknowledged write was lost.
    Chaos(chaos::ChaosArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LUNA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io {
            what: "starting the async runtime",
            source: e,
        })?;
    match cli.command {
        Command::Start(args) => runtime.block_on(serve::start::run(args)),
        Command::Master(args) => runtime.block_on(serve::master::run(args)),
        Command::TabletServer(args) => runtime.block_on(serve::tablet::run(args)),
        Command::Bench(command) => runtime.block_on(bench::run(command)),
        Command::Chaos(args) => runtime.block_on(chaos::run(args)),
        Command::Client(command) => runtime.block_on(cli::run(command, &cli.connection)),
    }
}
