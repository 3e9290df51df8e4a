//! `luna`: the one binary. For now it runs the storage benchmark; the
//! universe (`luna start`) arrives with the serving issue.

mod bench;
mod error;
mod store_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;

/// Luna: a disaggregated, transactional key-value engine on object storage.
#[derive(Parser)]
#[command(name = "luna", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure Luna's components on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
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
        Command::Bench(command) => runtime.block_on(bench::run(command)),
    }
}
