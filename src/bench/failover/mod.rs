//! `luna bench failover`: how long writes stop when a process dies.
//!
//! Starts a universe of child processes on loopback (three master replicas, three tablet
//! servers, objects in `file://` under the work directory) with default settings, creates a
//! collection of one tablet, and keeps `--writers` writers putting to it and one client
//! asking for timestamps. Each of `--rounds` rounds kills -9 the tablet server that leads
//! the tablet's group, then the master leader; each killed process is restarted and the
//! universe settles before the next kill.
//!
//! A kill's *write gap* is the longest time between two consecutive acknowledged writes,
//! from the last one before the kill until writes have flowed again (no pause over 500 ms)
//! for a second: how long no write succeeded. The *timestamp gap* is the same for
//! timestamps.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Args;
use luna_client::{Client, Collection, CollectionSpec};
use serde::Serialize;

use crate::error::CliError;
use crate::harness::universe::{Universe, UniverseSpec};
use crate::harness::workdir::WorkDir;

const DATABASE: &str = "bench";
const COLLECTION: &str = "failover";
/// How long acknowledgements must flow again after a kill before the gap is measured.
const RECOVERED_FOR: Duration = Duration::from_secs(1);
/// How long the master must report the same group leader before it is killed.
const LEADER_STABLE: Duration = Duration::from_millis(1500);
/// How long a kill may stop writes before the benchmark gives up.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Flags of `luna bench failover`.
#[derive(Debug, Args)]
pub struct FailoverBenchArgs {
    /// Rounds; each kills the group leader once and the master leader once.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Concurrent writers, each putting one key at a time.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Directory of the universe's data and logs (default: a new directory under the
    /// system temp directory, deleted at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object per kind of kill.
    #[arg(long)]
    json: bool,
}

/// Results of one kind of kill over every round.
#[derive(Debug, Serialize)]
struct KillReport {
    /// `group_leader` or `master_leader`.
    kill: &'static str,
    /// Write gap of each round, in milliseconds.
    write_gaps_ms: Vec<f64>,
    median_write_gap_ms: f64,
    max_write_gap_ms: f64,
    /// Timestamp gap of each round, in milliseconds.
    timestamp_gaps_ms: Vec<f64>,
    median_timestamp_gap_ms: f64,
    max_timestamp_gap_ms: f64,
}

impl KillReport {
    fn new(kill: &'static str, gaps: &[(Duration, Duration)]) -> KillReport {
        let ms = |pick: fn(&(Duration, Duration)) -> Duration| -> Vec<f64> {
            gaps.iter()
                .map(|gap| pick(gap).as_secs_f64() * 1e3)
                .collect()
        };
        let write_gaps_ms = ms(|gap| gap.0);
        let timestamp_gaps_ms = ms(|gap| gap.1);
        KillReport {
            kill,
            median_write_gap_ms: median(&write_gaps_ms),
            max_write_gap_ms: write_gaps_ms.iter().copied().fold(0.0, f64::max),
            write_gaps_ms,
            median_timestamp_gap_ms: median(&timestamp_gaps_ms),
            max_timestamp_gap_ms: timestamp_gaps_ms.iter().copied().fold(0.0, f64::max),
            timestamp_gaps_ms,
        }
    }
}

/// Runs the benchmark and prints its report.
pub async fn run(args: FailoverBenchArgs) -> Result<(), CliError> {
    if args.rounds == 0 || args.writers == 0 {
        return Err(CliError::Invalid(
            "--rounds and --writers must be at least 1".to_owned(),
        ));
    }
    let dir = WorkDir::new("failover", args.dir.as_deref())?;
    let reports = bench(&args, &dir).await?;
    for report in &reports {
        if args.json {
            let line =
                serde_json::to_string(report).map_err(|e| CliError::Invalid(e.to_string()))?;
            println!("{line}");
        } else {
            println!(
                "failover  kill -9 {:<13} write gap median {:.0} ms  max {:.0} ms  timestamp gap median {:.0} ms  max {:.0} ms  ({} rounds, writes {:?} ms)",
                report.kill,
                report.median_write_gap_ms,
                report.max_write_gap_ms,
                report.median_timestamp_gap_ms,
                report.max_timestamp_gap_ms,
                report.write_gaps_ms.len(),
                report
                    .write_gaps_ms
                    .iter()
                    .map(|gap| gap.round())
                    .collect::<Vec<_>>(),
            );
        }
    }
    Ok(())
}

async fn bench(args: &FailoverBenchArgs, dir: &WorkDir) -> Result<Vec<KillReport>, CliError> {
    let spec = UniverseSpec {
        servers: 3,
        repair_after_secs: 300,
        fault_hooks: false,
        memtable_kib: 32 * 1024,
    };
    let mut universe = Universe::start(&dir.path, spec)?;
    let client = Client::connect(universe.master_addrs()).await?;
    let admin = client.admin();
    admin.create_database(DATABASE).await?;
    admin
        .create_collection(DATABASE, COLLECTION, CollectionSpec::hash(1))
        .await?;
    universe.settle(&client, DATABASE, COLLECTION).await?;

    let collection = client.database(DATABASE).collection(COLLECTION);
    let load = Load::start(&client, &collection, args.writers);
    let mut group_kills = Vec::new();
    let mut master_kills = Vec::new();
    for round in 1..=args.rounds {
        let leader = group_leader(&client, &universe).await?;
        tracing::info!(round, process = leader, "killing the group leader");
        let gaps = load
            .measure(|| universe.kill_server(leader), "the group leader")
            .await?;
        tracing::info!(round, ?gaps, "group leader killed");
        group_kills.push(gaps);
        universe.start_server(leader)?;
        universe.settle(&client, DATABASE, COLLECTION).await?;

        let leader = universe.master_leader().await?;
        tracing::info!(round, replica = leader + 1, "killing the master leader");
        let gaps = load
            .measure(|| universe.kill_master(leader), "the master leader")
            .await?;
        tracing::info!(round, ?gaps, "master leader killed");
        master_kills.push(gaps);
        universe.start_master(leader)?;
        universe.wait_master_ready(leader).await?;
        universe.settle(&client, DATABASE, COLLECTION).await?;
    }
    load.stop().await;
    Ok(vec![
        KillReport::new("group_leader", &group_kills),
        KillReport::new("master_leader", &master_kills),
    ])
}

/// The process index of the tablet server leading the collection's group, once the master
/// has reported the group's preferred replica as leader for [`LEADER_STABLE`]: a new
/// leader hands leadership to the preferred replica once it is back and caught up, and
/// heartbeats report it only every half second. Killing a leader about to hand over would
/// kill a follower, and measure nothing.
async fn group_leader(client: &Client, universe: &Universe) -> Result<usize, CliError> {
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    let mut seen = (preferred_leader(client).await?, Instant::now());
    loop {
        if let (Some(server), true) = (seen.0, seen.1.elapsed() >= LEADER_STABLE) {
            return universe.server_index(server).ok_or_else(|| {
                CliError::Invalid(format!("no running process is server {server}"))
            });
        }
        if Instant::now() > deadline {
            return Err(CliError::Invalid(format!(
                "the group's preferred replica did not lead for {LEADER_STABLE:?} in a row"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let leader = preferred_leader(client).await?;
        if leader != seen.0 {
            seen = (leader, Instant::now());
        }
    }
}

/// The collection group's preferred replica (the master keeps it first), if the master
/// reports it as the leader.
async fn preferred_leader(client: &Client) -> Result<Option<u64>, CliError> {
    let admin = client.admin();
    let tablets = admin.list_tablets(DATABASE, COLLECTION).await?;
    let groups = admin.list_groups().await?;
    let group = tablets
        .first()
        .and_then(|tablet| groups.iter().find(|group| group.id == tablet.group_id));
    Ok(group.and_then(|group| {
        group
            .replicas
            .first()
            .copied()
            .filter(|first| *first == group.leader_server_id)
    }))
}

/// The steady writes and timestamp requests, with when each was acknowledged.
struct Load {
    stop: Arc<AtomicBool>,
    writes: Arc<Acks>,
    timestamps: Arc<Acks>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(client: &Client, collection: &Collection, writers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(Acks::default());
        let timestamps = Arc::new(Acks::default());
        let mut tasks = Vec::new();
        for writer in 0..writers {
            let (collection, stop, acks) = (collection.clone(), stop.clone(), writes.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("w{writer}-{n}");
                    if collection.put(key, "x").await.is_ok() {
                        acks.record();
                    }
                }
            }));
        }
        let (client, stop_ts, acks) = (client.clone(), stop.clone(), timestamps.clone());
        tasks.push(tokio::spawn(async move {
            while !stop_ts.load(Ordering::Relaxed) {
                if client.timestamp().await.is_ok() {
                    acks.record();
                }
            }
        }));
        Load {
            stop,
            writes,
            timestamps,
            tasks,
        }
    }

    /// Runs `kill` and returns the write and timestamp gaps around it.
    async fn measure(
        &self,
        kill: impl FnOnce(),
        what: &str,
    ) -> Result<(Duration, Duration), CliError> {
        // A gap is measured from the last acknowledgement before the kill.
        for acks in [&self.writes, &self.timestamps] {
            acks.wait_any(what).await?;
        }
        let killed_at = Instant::now();
        kill();
        let write_gap = self.writes.gap_after(killed_at, "writes", what).await?;
        let timestamp_gap = self
            .timestamps
            .gap_after(killed_at, "timestamps", what)
            .await?;
        Ok((write_gap, timestamp_gap))
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// When operations were acknowledged.
#[derive(Default)]
struct Acks {
    times: Mutex<Vec<Instant>>,
}

impl Acks {
    fn record(&self) {
        // Taken before the lock, so waiting for it does not count as time without writes.
        let now = Instant::now();
        let mut times = self.times.lock().unwrap_or_else(PoisonError::into_inner);
        times.push(now);
    }

    /// Waits until something was acknowledged since the last measurement.
    async fn wait_any(&self, what: &str) -> Result<(), CliError> {
        let deadline = Instant::now() + RECOVERY_TIMEOUT;
        while self
            .times
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
        {
            if Instant::now() > deadline {
                return Err(CliError::Invalid(format!(
                    "nothing succeeded for {RECOVERY_TIMEOUT:?} before killing {what}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until acknowledgements have flowed again without a pause for
    /// [`RECOVERED_FOR`], then returns the longest gap between consecutive ones from the
    /// last before `killed_at` on, and forgets them. (An answer the dying process sent just
    /// before the kill took effect can land after `killed_at`; the gap that follows it
    /// still counts.)
    async fn gap_after(
        &self,
        killed_at: Instant,
        operations: &str,
        what: &str,
    ) -> Result<Duration, CliError> {
        let deadline = killed_at + RECOVERY_TIMEOUT;
        loop {
            let flowing_since = {
                let mut times = self.times.lock().unwrap_or_else(PoisonError::into_inner);
                // Acknowledgements from concurrent tasks are recorded slightly out of order.
                times.sort_unstable();
                flowing_since(&times, Instant::now())
            };
            // A kill that did not stop these operations leaves a run that began before it.
            let recovered =
                flowing_since.is_some_and(|since| since.max(killed_at).elapsed() >= RECOVERED_FOR);
            if recovered {
                break;
            }
            if Instant::now() > deadline {
                return Err(CliError::Invalid(format!(
                    "{operations} did not flow again within {RECOVERY_TIMEOUT:?} after killing {what}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut times =
            std::mem::take(&mut *self.times.lock().unwrap_or_else(PoisonError::into_inner));
        // More may have come since the last sort.
        times.sort_unstable();
        let from = times
            .partition_point(|&at| at <= killed_at)
            .saturating_sub(1);
        let gap = times[from..]
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap_or_default();
        Ok(gap)
    }
}

/// The longest pause that still counts as operations flowing.
const FLOWING_PAUSE: Duration = Duration::from_millis(500);

/// When the current unbroken run of acknowledgements began: the first one after the last
/// pause longer than [`FLOWING_PAUSE`], if the newest one is recent. `times` is sorted.
fn flowing_since(times: &[Instant], now: Instant) -> Option<Instant> {
    let newest = *times.last()?;
    if now.saturating_duration_since(newest) > FLOWING_PAUSE {
        return None;
    }
    let start = times
        .windows(2)
        .rposition(|pair| pair[1] - pair[0] > FLOWING_PAUSE)
        .map_or(0, |gap| gap + 1);
    Some(times[start])
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
