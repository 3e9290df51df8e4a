//! `luna chaos`: a universe of real processes on loopback under client load, with faults
//! injected one at a time (kill -9 and restart, SIGSTOP and SIGCONT, raft partitions,
//! object-store errors and latency), then healed. Every operation's invocation and
//! completion is recorded; at the end single-key register histories are checked for
//! linearizability and every acknowledged write must read back. The run is bounded by
//! `--duration-secs`, and a seed replays its choice of faults.

pub mod faults;
pub mod history;
pub mod writes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use luna_client::{Client, CollectionSpec};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use self::faults::{Fault, FaultKind, Schedule};
use self::history::{Recorded, Registers, around, check_registers};
use self::writes::Writers;
use crate::error::CliError;
use crate::harness::universe::{Universe, UniverseSpec};
use crate::harness::workdir::WorkDir;
use crate::stdout::say;

const DATABASE: &str = "chaos";
const COLLECTION: &str = "registers";
/// How long the universe has to serve writes again once every fault is healed.
const RECOVERY: Duration = Duration::from_secs(60);

/// Flags of `luna chaos`.
#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// How long to inject faults; the run then heals, recovers and checks.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// The seed of the fault schedule and the workload's choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Tablet servers (at least 3; groups have 3 replicas).
    #[arg(long, default_value_t = 4)]
    servers: usize,
    /// The kinds of fault to inject (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<FaultKind>,
    /// Seconds of silence after which the master rebuilds a server's replicas elsewhere;
    /// one kill in ten lasts longer than this, so long runs exercise repair too.
    #[arg(long, default_value_t = 15)]
    repair_after_secs: u64,
    /// Directory of the universe's data and logs (default: a new directory under the
    /// system temp directory, deleted at the end unless the run finds a violation).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Runs the chaos suite and prints what it did and found; fails on a violation.
pub async fn run(args: ChaosArgs) -> Result<(), CliError> {
    if args.servers < 3 || args.duration_secs == 0 {
        return Err(CliError::Invalid(
            "luna chaos needs --servers 3 or more and a positive --duration-secs".to_owned(),
        ));
    }
    let seed = args.seed.unwrap_or_else(clock_seed);
    let kinds: Vec<FaultKind> = match args.faults.is_empty() {
        true => <FaultKind as clap::ValueEnum>::value_variants().to_vec(),
        false => args.faults.clone(),
    };
    say(format_args!(
        "chaos: seed {seed} (--seed {seed} repeats the schedule), {} s of faults, {} tablet \
         servers, 3 master replicas",
        args.duration_secs, args.servers
    ));
    let dir = WorkDir::new("chaos", args.dir.as_deref())?;
    let result = chaos(&args, seed, &kinds, &dir).await;
    if result.is_err() {
        // The logs are what a reader needs next.
        dir.keep();
        say(format_args!(
            "chaos: the universe's logs are in {}",
            dir.path.display()
        ));
    }
    result
}

async fn chaos(
    args: &ChaosArgs,
    seed: u64,
    kinds: &[FaultKind],
    dir: &WorkDir,
) -> Result<(), CliError> {
    let spec = UniverseSpec {
        servers: args.servers,
        repair_after_secs: args.repair_after_secs,
        fault_hooks: true,
        // Small memtables (a flush every few seconds somewhere), so the object store's
        // faults meet real traffic. Much smaller ones fill the disk: objects that
        // compaction replaced stay for the 10 min GC grace (64 KiB wrote 20 GB in 10 min).
        memtable_kib: 1024,
    };
    let mut universe = Universe::start(&dir.path, spec)?;
    let client = Client::connect(universe.master_addrs()).await?;
    client.admin().create_database(DATABASE).await?;
    client
        .admin()
        .create_collection(DATABASE, COLLECTION, CollectionSpec::hash(4))
        .await?;
    universe.settle(&client, DATABASE, COLLECTION).await?;
    let collection = client.database(DATABASE).collection(COLLECTION);
    let registers = Registers::spawn(&collection, 4, 5, seed);
    let writers = Writers::spawn(&collection, 4);

    let (injected, store_failures) = inject_faults(&mut universe, args, seed, kinds).await?;
    let counts: Vec<String> = injected
        .iter()
        .map(|(kind, count)| format!("{} {count}", kind.name()))
        .collect();
    say(format_args!(
        "chaos: faults injected: {} ({store_failures} object-store requests failed on purpose)",
        counts.join(", ")
    ));

    // Everything is healed: the universe must serve writes again.
    universe.settle(&client, DATABASE, COLLECTION).await?;
    if !writers.wait_progress(20, RECOVERY).await {
        return Err(CliError::Invalid(format!(
            "chaos (seed {seed}): writes did not resume within {RECOVERY:?} after every fault \
             was healed"
        )));
    }
    let histories = registers.stop().await;
    let written = writers.stop_and_check().await;
    let check = check_registers(&histories);
    say(format_args!(
        "chaos: registers: {} keys, {} operations ({} writes of unknown outcome): {}",
        check.keys,
        check.operations,
        check.unknown,
        if check.violation.is_none() {
            "linearizable"
        } else {
            "NOT linearizable"
        }
    ));
    say(format_args!(
        "chaos: writes: {} acknowledged, {} missing",
        written.acked,
        written.missing.len()
    ));
    if check.operations == 0 {
        return Err(CliError::Invalid(format!(
            "chaos (seed {seed}): the register tasks completed no operation, so nothing was \
             checked"
        )));
    }
    if let Some((key, minimal)) = check.violation {
        let lines = |ops: &[Recorded]| {
            ops.iter()
                .map(|op| format!("  {op:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let whole = histories.get(&key).map(Vec::as_slice).unwrap_or_default();
        return Err(CliError::Invalid(format!(
            "chaos (seed {seed}): {key}'s history is not linearizable; a smallest failing \
             part:\n{}\nthe key's history around it:\n{}",
            lines(&minimal),
            lines(&around(whole, &minimal))
        )));
    }
    if !written.missing.is_empty() {
        return Err(CliError::Invalid(format!(
            "chaos (seed {seed}): {} of {} acknowledged writes are missing or wrong: {:?}",
            written.missing.len(),
            written.acked,
            &written.missing[..written.missing.len().min(10)]
        )));
    }
    Ok(())
}

/// Injects faults one at a time for `--duration-secs`, every kind once per round in a
/// seeded order, each held for 1 to 4 s (one kill of
/// a server in ten, past the repair time), with 0.5 to 1.5 s of calm between; returns how
/// many of each kind, and how many object-store requests failed on purpose.
async fn inject_faults(
    universe: &mut Universe,
    args: &ChaosArgs,
    seed: u64,
    kinds: &[FaultKind],
) -> Result<(BTreeMap<FaultKind, usize>, u64), CliError> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let mut injected = BTreeMap::new();
    let mut store_failures = 0;
    let mut schedule = Schedule::new(kinds);
    while Instant::now() < deadline {
        let Some(kind) = schedule.next(&mut rng) else {
            break;
        };
        let fault = Fault::pick(&mut rng, kind, universe);
        let long = fault.kind == FaultKind::KillServer && rng.random_bool(0.1);
        let hold = match long {
            true => Duration::from_secs(args.repair_after_secs + 5),
            false => Duration::from_millis(rng.random_range(1000..4000)),
        };
        say(format_args!(
            "chaos: {:>6.1} s  {} #{} for {:.1} s",
            started.elapsed().as_secs_f64(),
            fault.kind.name(),
            fault.target,
            hold.as_secs_f64()
        ));
        fault.inject(universe, &mut rng).await?;
        *injected.entry(fault.kind).or_insert(0) += 1;
        tokio::time::sleep(hold).await;
        // Counters restart with a restarted server: the latest total is a lower bound.
        store_failures = store_failures.max(fault.heal(universe).await?);
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
    }
    Ok((injected, store_failures))
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}
