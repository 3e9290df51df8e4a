//! `luna bench txn`: transactions against a running universe, through the client SDK.
//!
//! Accounts `acct-00000`... live in two range collections of `--tablets` tablets each (so in
//! several groups). Each mode runs `--clients` concurrent tasks for `--duration-secs`:
//!
//! - `put`: single plain puts, the baseline the targets compare with;
//! - `one-group`: transactions of two blind writes to neighbouring accounts of one
//!   collection (one tablet, so one group: one-phase commits);
//! - `two-group`: transactions of two blind writes, one per collection (two groups:
//!   two-phase commits);
//! - `transfer`: bank transfers, reading two random accounts of the two collections and
//!   writing both, with uniform keys.
//!
//! Conflicts are counted as aborts and not retried, so the abort rate is what a client sees
//! before it retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use luna_client::{Client, ClientError, Collection, CollectionSpec, Database};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::report::Latencies;
use crate::error::CliError;

/// Flags of `luna bench txn`.
#[derive(Debug, Args)]
pub struct TxnBenchArgs {
    /// Modes to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "put,one-group,two-group,transfer"
    )]
    modes: Vec<Mode>,
    /// Accounts per collection.
    #[arg(long, default_value_t = 10_000)]
    accounts: u64,
    /// Concurrent client tasks, each running one transaction at a time.
    #[arg(long, default_value_t = 64)]
    clients: u64,
    /// How long each mode runs.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Tablets of each collection when it is created.
    #[arg(long, default_value_t = 4)]
    tablets: u32,
    /// The master's address, or the master replicas' addresses separated by commas.
    #[arg(long, env = "LUNA_MASTER", default_value = "127.0.0.1:7420")]
    master: String,
    /// Database of the accounts, created if missing.
    #[arg(long, default_value = "bench_txn")]
    database: String,
    /// Seed of the account choices.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object per mode instead of a line.
    #[arg(long)]
    json: bool,
}

/// What each transaction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Put,
    OneGroup,
    TwoGroup,
    Transfer,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Put => "put",
            Mode::OneGroup => "one-group",
            Mode::TwoGroup => "two-group",
            Mode::Transfer => "transfer",
        }
    }
}

/// One mode's results.
#[derive(Debug, Serialize)]
struct TxnReport {
    mode: &'static str,
    clients: u64,
    accounts: u64,
    seconds: f64,
    /// Committed transactions (or puts).
    committed: u64,
    /// Transactions that lost a conflict.
    aborted: u64,
    /// Other failures.
    errors: u64,
    committed_per_sec: f64,
    /// Aborted over attempted, in percent.
    abort_rate_pct: f64,
    /// Latency of committed ones, begin to commit, in microseconds.
    p50_us: f64,
    p99_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
}

/// The two collections.
const COLLECTIONS: [&str; 2] = ["checking", "savings"];
/// An account's starting balance.
const OPENING_BALANCE: i64 = 1_000;

/// Runs the modes and prints a report for each.
pub async fn run(args: TxnBenchArgs) -> Result<(), CliError> {
    if args.accounts < 2 || args.clients == 0 || args.tablets == 0 || args.duration_secs == 0 {
        return Err(CliError::Invalid(
            "--accounts must be at least 2, and --clients, --tablets and --duration-secs at least 1"
                .into(),
        ));
    }
    let client = Client::connect(crate::cli::master_addrs(&args.master)).await?;
    let db = prepare(&client, &args).await?;
    for &mode in &args.modes {
        let report = run_mode(&args, &db, mode).await;
        if args.json {
            println!("{}", super::report::json_line(&report)?);
        } else {
            println!(
                "txn  {:<10} {:>9.0} committed/s  abort rate {:>5.2}%  p50 {:>7.0} us  p99 {:>7.0} us  ({} committed, {} aborted, {} errors, {} clients, {} s)",
                report.mode,
                report.committed_per_sec,
                report.abort_rate_pct,
                report.p50_us,
                report.p99_us,
                report.committed,
                report.aborted,
                report.errors,
                report.clients,
                report.seconds.round()
            );
        }
        if report.committed == 0 {
            return Err(CliError::Invalid(format!(
                "nothing committed in mode {}; the first error: {}",
                report.mode,
                report.first_error.as_deref().unwrap_or("none")
            )));
        }
    }
    Ok(())
}

fn account(number: u64) -> Bytes {
    Bytes::from(format!("acct-{number:08}"))
}

/// Creates the database and collections (split evenly over the account keys) if missing,
/// and opens every account that has no balance yet.
async fn prepare(client: &Client, args: &TxnBenchArgs) -> Result<Database, CliError> {
    let admin = client.admin();
    match admin.create_database(&args.database).await {
        Ok(_) | Err(ClientError::AlreadyExists { .. }) => {}
        Err(error) => return Err(error.into()),
    }
    let splits: Vec<Bytes> = (1..u64::from(args.tablets))
        .map(|i| account(args.accounts * i / u64::from(args.tablets)))
        .collect();
    for name in COLLECTIONS {
        let spec = CollectionSpec::range().split_keys(splits.clone());
        match admin.create_collection(&args.database, name, spec).await {
            Ok(_) | Err(ClientError::AlreadyExists { .. }) => {}
            Err(error) => return Err(error.into()),
        }
    }
    let db = client.database(&args.database);
    for name in COLLECTIONS {
        let collection = db.collection(name);
        // A run after another keeps its balances, so their total stays what it was.
        let accounts = usize::try_from(args.accounts).unwrap_or(usize::MAX);
        let open: std::collections::HashSet<Bytes> = collection
            .scan(account(0)..account(args.accounts), accounts, false)
            .await?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        let missing: Vec<Bytes> = (0..args.accounts)
            .map(account)
            .filter(|key| !open.contains(key))
            .collect();
        for chunk in missing.chunks(500) {
            let mut batch = luna_client::WriteBatch::new();
            for key in chunk {
                batch.put(key.clone(), OPENING_BALANCE.to_string());
            }
            // Plain puts: nothing else touches an account before it is opened.
            collection.batch(batch).await?;
        }
    }
    Ok(db)
}

/// Counts of one client task.
struct TaskResult {
    latencies: Latencies,
    committed: u64,
    aborted: u64,
    errors: u64,
    first_error: Option<String>,
}

async fn run_mode(args: &TxnBenchArgs, db: &Database, mode: Mode) -> TxnReport {
    let stop = Arc::new(AtomicBool::new(false));
    let collections: Arc<[Collection; 2]> = Arc::new(COLLECTIONS.map(|name| db.collection(name)));
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|task| {
            let (db, collections, stop) = (db.clone(), collections.clone(), stop.clone());
            let accounts = args.accounts;
            let seed = args.seed ^ (task + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            tokio::spawn(async move {
                client_task(&db, &collections, mode, accounts, seed, &stop).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(args.duration_secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Latencies::new();
    let (mut committed, mut aborted, mut errors) = (0, 0, 0);
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(result) => {
                latencies.merge(&result.latencies);
                committed += result.committed;
                aborted += result.aborted;
                errors += result.errors;
                first_error = first_error.or(result.first_error);
            }
            Err(error) => {
                errors += 1;
                first_error = first_error.or(Some(error.to_string()));
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let attempted = (committed + aborted).max(1);
    TxnReport {
        mode: mode.name(),
        clients: args.clients,
        accounts: args.accounts,
        seconds,
        committed,
        aborted,
        errors,
        committed_per_sec: committed as f64 / seconds,
        abort_rate_pct: 100.0 * aborted as f64 / attempted as f64,
        p50_us: latencies.quantile(0.5),
        p99_us: latencies.quantile(0.99),
        first_error,
    }
}

async fn client_task(
    db: &Database,
    collections: &[Collection; 2],
    mode: Mode,
    accounts: u64,
    seed: u64,
    stop: &AtomicBool,
) -> TaskResult {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut result = TaskResult {
        latencies: Latencies::new(),
        committed: 0,
        aborted: 0,
        errors: 0,
        first_error: None,
    };
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let outcome = match mode {
            Mode::Put => {
                let key = account(rng.random_range(0..accounts));
                collections[0]
                    .put(key, rng.random::<u32>().to_string())
                    .await
                    .map(|_| ())
            }
            Mode::OneGroup => {
                let first = rng.random_range(0..accounts - 1);
                blind_writes(
                    db,
                    [(&collections[0], first), (&collections[0], first + 1)],
                    &mut rng,
                )
                .await
            }
            Mode::TwoGroup => {
                let first = rng.random_range(0..accounts);
                let second = rng.random_range(0..accounts);
                blind_writes(
                    db,
                    [(&collections[0], first), (&collections[1], second)],
                    &mut rng,
                )
                .await
            }
            Mode::Transfer => {
                let from = (&collections[0], account(rng.random_range(0..accounts)));
                let to = (&collections[1], account(rng.random_range(0..accounts)));
                transfer(db, from, to, rng.random_range(1..10)).await
            }
        };
        match outcome {
            Ok(()) => {
                result.latencies.record(started.elapsed());
                result.committed += 1;
            }
            Err(error) if error.is_conflict() => result.aborted += 1,
            Err(error) => {
                result.errors += 1;
                result.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    result
}

/// One transaction writing a random value to each of two accounts.
async fn blind_writes(
    db: &Database,
    writes: [(&Collection, u64); 2],
    rng: &mut SmallRng,
) -> Result<(), ClientError> {
    let mut txn = db.begin().await?;
    for (collection, number) in writes {
        txn.put(collection, account(number), rng.random::<u32>().to_string())?;
    }
    txn.commit().await.map(|_| ())
}

/// Moves `amount` from one account to another, if the first holds it.
async fn transfer(
    db: &Database,
    (from_collection, from): (&Collection, Bytes),
    (to_collection, to): (&Collection, Bytes),
    amount: i64,
) -> Result<(), ClientError> {
    let mut txn = db.begin().await?;
    let balance = |value: Option<Bytes>| {
        value
            .and_then(|value| std::str::from_utf8(&value).ok()?.parse::<i64>().ok())
            .unwrap_or(0)
    };
    let from_balance = balance(txn.get(from_collection, from.clone()).await?);
    let to_balance = balance(txn.get(to_collection, to.clone()).await?);
    if from_balance >= amount {
        txn.put(from_collection, from, (from_balance - amount).to_string())?;
        txn.put(to_collection, to, (to_balance + amount).to_string())?;
    }
    txn.commit().await.map(|_| ())
}
