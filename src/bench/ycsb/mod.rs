//! `luna bench ycsb`: the YCSB core workloads against a running universe, through the
//! client SDK.
//!
//! The load phase inserts `--records` keys; workloads A to F then run `--operations`
//! operations each, from `--threads` concurrent client tasks that share one client (as
//! YCSB's client threads share one binding). Keys are `user` plus a zero-padded number,
//! values random bytes. Reads are leader (lease) reads, the SDK's default. A failed
//! operation is counted and reported; only a workload in which every operation failed
//! stops the run.

mod generator;
mod workload;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use luna_client::{Client, ClientError, Collection, CollectionSpec, Partitioning};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use self::generator::{InsertCounter, KeyChooser, ScrambledZipfian, ZIPFIAN_THETA, Zipfian};
use self::workload::{KEY_PREFIX, KeySpace, KindReport, Shared, Stats, Workload, kind_reports};
use crate::error::CliError;

/// Flags of `luna bench ycsb`.
#[derive(Debug, Args)]
pub struct YcsbBenchArgs {
    /// Workloads to run, in order: `load` inserts the records, `a` to `f` are YCSB's core
    /// workloads. Run `load` first unless the collection holds the records already.
    #[arg(
        long = "workloads",
        visible_alias = "workload",
        value_delimiter = ',',
        default_value = "load,a,b,c,d,e,f"
    )]
    workloads: Vec<Workload>,
    /// Keys the load phase inserts (and the other workloads read).
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Operations of each workload after the load phase.
    #[arg(long, default_value_t = 100_000)]
    operations: u64,
    /// Concurrent client tasks, each running one operation at a time.
    #[arg(long, default_value_t = 64)]
    threads: u64,
    /// Key size in bytes: `user` plus the key number, zero-padded.
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// The master's address, or the master replicas' addresses separated by commas.
    #[arg(long, env = "LUNA_MASTER", default_value = "127.0.0.1:7420")]
    master: String,
    /// Database of the collection under test, created if missing.
    #[arg(long, default_value = "ycsb")]
    database: String,
    /// Collection under test, created if missing.
    #[arg(long, default_value = "usertable")]
    collection: String,
    /// Tablets of the collection when it is created.
    #[arg(long, default_value_t = 8)]
    tablets: u32,
    /// Partitioning of the collection when it is created (default: range if workload E,
    /// which scans key ranges, is selected, else hash).
    #[arg(long, value_enum)]
    partitioning: Option<PartitioningArg>,
    /// How keys are chosen (default: as YCSB, latest for D and zipfian for the others).
    #[arg(long, value_enum)]
    distribution: Option<Distribution>,
    /// Seed of the key and operation choices.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object per workload instead of a table.
    #[arg(long)]
    json: bool,
}

/// How the collection is partitioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PartitioningArg {
    Range,
    Hash,
}

/// How the key of each read, update, scan and read-modify-write is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Distribution {
    /// YCSB's scrambled zipfian, theta 0.99: a few hot keys spread over the key space.
    Zipfian,
    /// Every key equally likely.
    Uniform,
    /// The newest keys most likely.
    Latest,
}

impl Distribution {
    fn name(self) -> &'static str {
        match self {
            Distribution::Zipfian => "zipfian",
            Distribution::Uniform => "uniform",
            Distribution::Latest => "latest",
        }
    }
}

/// One workload's results; printed as a table, or as one JSON line with `--json`.
#[derive(Debug, Serialize)]
struct YcsbReport {
    workload: &'static str,
    /// Key distribution; none for the load phase, which inserts every key once.
    #[serde(skip_serializing_if = "Option::is_none")]
    distribution: Option<&'static str>,
    records: u64,
    threads: u64,
    key_size: usize,
    value_size: usize,
    /// Completed operations, all kinds.
    ops: u64,
    /// Failed operations, all kinds.
    errors: u64,
    seconds: f64,
    /// Completed operations per second.
    ops_per_sec: f64,
    /// Per operation kind: read, update, insert, scan, rmw (only those that ran).
    kinds: BTreeMap<&'static str, KindReport>,
    /// The first failure, when there were any.
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
}

/// How long the collection's tablets may take to answer after it is created.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the benchmark and prints a report per workload.
pub async fn run(args: YcsbBenchArgs) -> Result<(), CliError> {
    validate(&args)?;
    let client = Client::connect(crate::cli::master_addrs(&args.master)).await?;
    let collection = prepare(&client, &args).await?;
    let keys = Arc::new(KeySpace {
        key_size: args.key_size,
        value_size: args.value_size,
        value_pool: value_pool(args.value_size, args.seed),
    });
    // Shared across workloads, so that D's inserts are readable in a later E.
    let inserts = Arc::new(InsertCounter::new(args.records));
    for (position, &workload) in args.workloads.iter().enumerate() {
        let report = run_workload(
            &args,
            &collection,
            &keys,
            &inserts,
            workload,
            position as u64,
        )
        .await?;
        print(&args, &report)?;
        if report.ops == 0 && report.errors > 0 {
            return Err(CliError::Invalid(format!(
                "every operation of workload {} failed; the first: {}",
                report.workload,
                report.first_error.as_deref().unwrap_or("unknown")
            )));
        }
    }
    Ok(())
}

fn validate(args: &YcsbBenchArgs) -> Result<(), CliError> {
    if args.records == 0 || args.threads == 0 || args.value_size == 0 || args.tablets == 0 {
        return Err(CliError::Invalid(
            "--records, --threads, --value-size and --tablets must be at least 1".into(),
        ));
    }
    if args.workloads.is_empty() {
        return Err(CliError::Invalid("name at least one workload".into()));
    }
    if args.value_size > luna_client::MAX_VALUE_LEN {
        return Err(CliError::Invalid(format!(
            "--value-size must be at most {} bytes",
            luna_client::MAX_VALUE_LEN
        )));
    }
    // The largest key number: every record, plus at most one insert per operation.
    let inserting = args
        .workloads
        .iter()
        .filter(|w| w.insert_proportion() > 0.0)
        .count() as u64;
    let largest = args
        .records
        .saturating_add(args.operations.saturating_mul(inserting));
    let shortest = KEY_PREFIX.len() + largest.to_string().len();
    if args.key_size < shortest || args.key_size > 1024 {
        return Err(CliError::Invalid(format!(
            "--key-size must be between {shortest} (\"user\" and the numbers of {largest} keys) and 1024"
        )));
    }
    if args.workloads.contains(&Workload::E) && args.partitioning == Some(PartitioningArg::Hash) {
        return Err(CliError::Invalid(
            "workload E scans key ranges, which hash-partitioned collections cannot do; use --partitioning range".into(),
        ));
    }
    Ok(())
}

/// Creates the database and collection if missing, and waits until its tablets answer.
async fn prepare(client: &Client, args: &YcsbBenchArgs) -> Result<Collection, CliError> {
    let admin = client.admin();
    match admin.create_database(&args.database).await {
        Ok(_) | Err(ClientError::AlreadyExists { .. }) => {}
        Err(error) => return Err(error.into()),
    }
    let wants_range = args.workloads.contains(&Workload::E);
    let partitioning = args.partitioning.unwrap_or(if wants_range {
        PartitioningArg::Range
    } else {
        PartitioningArg::Hash
    });
    let keys = KeySpace {
        key_size: args.key_size,
        value_size: 1,
        value_pool: Bytes::from_static(b"x"),
    };
    let spec = match partitioning {
        PartitioningArg::Hash => CollectionSpec::hash(args.tablets),
        PartitioningArg::Range => {
            // Boundaries spread evenly over the records, so the load and the reads reach
            // every tablet; inserted keys go to the last one, as in a growing table.
            let mut splits: Vec<Bytes> = (1..u64::from(args.tablets))
                .map(|i| keys.key(fraction(args.records, i, u64::from(args.tablets))))
                .collect();
            splits.dedup();
            splits.retain(|key| *key != keys.key(0));
            CollectionSpec::range().split_keys(splits)
        }
    };
    match admin
        .create_collection(&args.database, &args.collection, spec)
        .await
    {
        Ok(_) => {}
        Err(ClientError::AlreadyExists { .. }) => {
            let existing = admin.list_collections(&args.database).await?;
            let info = existing.iter().find(|info| info.name == args.collection);
            if wants_range && info.is_some_and(|info| info.partitioning() == Partitioning::Hash) {
                return Err(CliError::Invalid(format!(
                    "{}/{} is hash-partitioned, and workload E needs range scans: pick another --collection",
                    args.database, args.collection
                )));
            }
        }
        Err(error) => return Err(error.into()),
    }
    let collection = client.database(&args.database).collection(&args.collection);
    // New tablets elect leaders first: wait for them outside the timed runs. Keys spread
    // over the records reach every tablet of either partitioning with high probability.
    let probes: Vec<Bytes> = (0..u64::from(args.tablets) * 8)
        .map(|i| keys.key(fraction(args.records, i, u64::from(args.tablets) * 8)))
        .collect();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match collection.batch_get(probes.clone()).await {
            Ok(_) => return Ok(collection),
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                tracing::info!(%error, "waiting for the collection's tablets");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// `total * part / parts`, without overflowing for any flag values (`part` <= `parts`).
fn fraction(total: u64, part: u64, parts: u64) -> u64 {
    let exact = u128::from(total) * u128::from(part) / u128::from(parts.max(1));
    u64::try_from(exact).unwrap_or(total)
}

fn value_pool(value_size: usize, seed: u64) -> Bytes {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..value_size * 2 + 1024)
        .map(|_| rng.random::<u8>())
        .collect()
}

async fn run_workload(
    args: &YcsbBenchArgs,
    collection: &Collection,
    keys: &Arc<KeySpace>,
    inserts: &Arc<InsertCounter>,
    workload: Workload,
    position: u64,
) -> Result<YcsbReport, CliError> {
    let operations = if workload == Workload::Load {
        args.records
    } else {
        args.operations
    };
    let distribution = (workload != Workload::Load).then(|| {
        args.distribution.unwrap_or(if workload == Workload::D {
            Distribution::Latest
        } else {
            Distribution::Zipfian
        })
    });
    // Built once, since "latest" sums over every existing key; tasks get clones.
    let chooser = match distribution {
        Some(Distribution::Latest) => {
            KeyChooser::Latest(Zipfian::new(inserts.limit().max(1), ZIPFIAN_THETA))
        }
        Some(Distribution::Uniform) | None => KeyChooser::Uniform,
        Some(Distribution::Zipfian) => {
            // As YCSB: cover the keys that this run's inserts will add (twice the expected
            // count), so that new keys are chosen too once they exist.
            let expected = (operations as f64 * workload.insert_proportion() * 2.0) as u64;
            KeyChooser::Zipfian(ScrambledZipfian::new(inserts.limit() + expected))
        }
    };
    let shared = Arc::new(Shared {
        collection: collection.clone(),
        keys: Arc::clone(keys),
        claimed: AtomicU64::new(0),
        operations,
        inserts: Arc::clone(inserts),
        bar: progress(args.json, workload, operations),
    });
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..args.threads {
        let load_range = fraction(args.records, task, args.threads)
            ..fraction(args.records, task + 1, args.threads);
        let seed = args
            .seed
            .wrapping_add(position.wrapping_mul(1_000_003))
            .wrapping_add(task.wrapping_mul(7919));
        tasks.push(tokio::spawn(workload::run_task(
            Arc::clone(&shared),
            workload,
            chooser.clone(),
            seed,
            load_range,
        )));
    }
    let mut stats = Stats::empty();
    for task in tasks {
        let task_stats = task
            .await
            .map_err(|e| CliError::Invalid(format!("a benchmark task failed: {e}")))?;
        stats.merge(task_stats);
    }
    let seconds = started.elapsed().as_secs_f64();
    shared.bar.finish_and_clear();
    let ops: u64 = stats.kinds.values().map(|kind| kind.ops).sum();
    let errors: u64 = stats.kinds.values().map(|kind| kind.errors).sum();
    Ok(YcsbReport {
        workload: workload.name(),
        distribution: distribution.map(Distribution::name),
        records: args.records,
        threads: args.threads,
        key_size: args.key_size,
        value_size: args.value_size,
        ops,
        errors,
        seconds,
        ops_per_sec: if seconds > 0.0 {
            ops as f64 / seconds
        } else {
            0.0
        },
        kinds: kind_reports(&stats, seconds),
        first_error: stats.first_error,
    })
}

fn progress(json: bool, workload: Workload, total: u64) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{msg:<6} [{bar:40}] {pos}/{len} {per_sec}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(workload.name());
    bar
}

fn print(args: &YcsbBenchArgs, report: &YcsbReport) -> Result<(), CliError> {
    if args.json {
        let line = serde_json::to_string(report).map_err(|e| CliError::Invalid(e.to_string()))?;
        println!("{line}");
        return Ok(());
    }
    println!(
        "ycsb {:<4} {} threads, {}: {} ops in {:.2} s = {:.0} ops/s, {} errors",
        report.workload,
        report.threads,
        report.distribution.unwrap_or("every record once"),
        report.ops,
        report.seconds,
        report.ops_per_sec,
        report.errors,
    );
    for (kind, entry) in &report.kinds {
        println!(
            "  {kind:<6} {:>9} ops {:>9.0} ops/s  p50 {:>6.0} us  p95 {:>6.0} us  p99 {:>6.0} us  max {:>8.0} us  errors {}  not found {}",
            entry.ops,
            entry.ops_per_sec,
            entry.p50_us,
            entry.p95_us,
            entry.p99_us,
            entry.max_us,
            entry.errors,
            entry.not_found,
        );
    }
    if let Some(error) = &report.first_error {
        println!("  first error: {error}");
    }
    Ok(())
}
