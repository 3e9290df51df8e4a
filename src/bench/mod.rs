//! `luna bench ...`: benchmarks whose numbers go in docs/benchmarks.md.

mod failover;
mod journal;
mod moves;
mod report;
mod storage;
mod txn;
mod ycsb;

use clap::Subcommand;

use crate::error::CliError;

/// The benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// The embedded storage engine: fills, overwrites and reads on one BaseStore.
    Storage(storage::StorageBenchArgs),
    /// Replicated journal streams: N streams, R replicas over loopback gRPC, concurrent appenders.
    Journal(journal::JournalBenchArgs),
    /// Write unavailability when the group leader, or the master leader, is killed -9.
    Failover(failover::FailoverBenchArgs),
    /// YCSB core workloads (load, A-F) against a running universe, through the client SDK.
    Ycsb(ycsb::YcsbBenchArgs),
    /// Transactions against a running universe: one- and two-group commits and bank
    /// transfers, against single puts.
    Txn(txn::TxnBenchArgs),
    /// Tablet moves between groups under writes and reads: unavailability window, bytes
    /// copied and move time.
    Move(moves::MoveBenchArgs),
}

/// Runs a benchmark.
pub async fn run(command: BenchCommand) -> Result<(), CliError> {
    match command {
        BenchCommand::Storage(args) => storage::run(args).await,
        BenchCommand::Journal(args) => journal::run(args).await,
        BenchCommand::Ycsb(args) => ycsb::run(args).await,
        BenchCommand::Failover(args) => failover::run(args).await,
        BenchCommand::Txn(args) => txn::run(args).await,
        BenchCommand::Move(args) => moves::run(args).await,
    }
}
