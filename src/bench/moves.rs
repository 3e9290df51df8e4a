//! `luna bench move`: moves a tablet between two groups, back and forth, while clients write
//! and read it, and reports for each move how long it took, the bytes it copied, and the
//! unavailability window: the largest gap between successful writes (and reads) that
//! overlaps the move.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use luna_client::{Client, ClientError, Collection, CollectionSpec, WriteBatch};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::CliError;

/// `luna bench move` flags.
#[derive(Debug, clap::Args)]
pub struct MoveBenchArgs {
    /// Data loaded into the tablet before it moves, in MiB.
    #[arg(long, default_value_t = 10)]
    size_mb: u64,
    /// Skip loading: an earlier run with the same --size-mb and --value-size loaded it.
    #[arg(long)]
    skip_load: bool,
    /// Value size of the loaded records and of the writes during the moves, in bytes.
    #[arg(long, default_value_t = 4096)]
    value_size: usize,
    /// Client tasks writing the tablet during the moves.
    #[arg(long, default_value_t = 8)]
    writers: u64,
    /// Client tasks reading the tablet during the moves.
    #[arg(long, default_value_t = 4)]
    readers: u64,
    /// Moves, alternating between the tablet's group and another one.
    #[arg(long, default_value_t = 3)]
    moves: u32,
    /// The master's address, or the master replicas' addresses separated by commas.
    #[arg(long, env = "LUNA_MASTER", default_value = "127.0.0.1:7420")]
    master: String,
    /// Database of the collection under test, created if missing.
    #[arg(long, default_value = "bench_move")]
    database: String,
    /// Print one JSON object per move instead of a line.
    #[arg(long)]
    json: bool,
}

/// The collection: a range collection whose first tablet holds every key (`k...`).
const COLLECTION: &str = "moving";
/// Loading writes about this many bytes per batch.
const LOAD_BATCH_BYTES: usize = 1 << 20;
/// Concurrent batches while loading.
const LOAD_TASKS: usize = 8;
/// Load before the first move and after each.
const SETTLE: Duration = Duration::from_secs(1);

/// One move, as reported.
#[derive(Debug, Serialize)]
struct MoveReport {
    tablet_id: u64,
    from_group: u64,
    to_group: u64,
    /// Data loaded into the tablet, in MiB.
    tablet_mb: f64,
    /// The admin call, start to answer.
    move_ms: f64,
    /// The largest gap between successful writes to the tablet that overlaps the move.
    write_window_ms: f64,
    /// Where that gap began, from the start of the admin call (negative: before it). A
    /// gap that began long before the seal is a write stall, not the handoff.
    write_window_from_ms: f64,
    /// The same for reads.
    read_window_ms: f64,
    /// For comparison, the largest gap between writes in the second before the move, when
    /// nothing moved: the stalls the tablet's writes see anyway.
    write_gap_before_ms: f64,
    /// What the move flushed or sent besides metadata (see `MoveTabletResponse`).
    bytes_copied: u64,
    /// Successful writes and reads during the whole run, and failed ones.
    writes: u64,
    reads: u64,
    errors: u64,
}

/// Successful operations' completion times (microseconds since the start), per client task.
type Completions = Arc<std::sync::Mutex<Vec<u64>>>;

/// Runs the benchmark and prints a report per move.
pub async fn run(args: MoveBenchArgs) -> Result<(), CliError> {
    if args.value_size == 0 || args.writers == 0 || args.moves == 0 {
        return Err(CliError::Invalid(
            "--value-size, --writers and --moves must be at least 1".into(),
        ));
    }
    let client = Client::connect(crate::cli::master_addrs(&args.master)).await?;
    let collection = prepare(&client, &args.database).await?;
    let records = (args.size_mb << 20).div_ceil(args.value_size as u64).max(1);
    if !args.skip_load {
        load(&collection, records, args.value_size).await?;
    }
    let tablet_mb = (records * args.value_size as u64) as f64 / f64::from(1 << 20);

    let admin = client.admin();
    let tablet = admin
        .list_tablets(&args.database, COLLECTION)
        .await?
        .into_iter()
        .find(|tablet| tablet.range.as_ref().is_none_or(|r| r.start.is_empty()))
        .ok_or_else(|| CliError::Invalid("the collection has no first tablet".into()))?;
    let home = tablet.group_id;
    let away = admin
        .list_groups()
        .await?
        .iter()
        .map(|group| group.id)
        .find(|&id| id != home)
        .ok_or_else(|| {
            CliError::Invalid("the universe has one group only: nowhere to move to".into())
        })?;

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let spawn = |tasks: u64, write: bool| -> Vec<(Completions, tokio::task::JoinHandle<()>)> {
        (0..tasks)
            .map(|task| {
                let done: Completions = Arc::default();
                let handle = tokio::spawn(client_task(ClientTask {
                    collection: collection.clone(),
                    records,
                    value_size: args.value_size,
                    write,
                    seed: task * 2 + u64::from(write),
                    started,
                    stop: Arc::clone(&stop),
                    errors: Arc::clone(&errors),
                    done: Arc::clone(&done),
                }));
                (done, handle)
            })
            .collect()
    };
    let writers = spawn(args.writers, true);
    let readers = spawn(args.readers, false);

    let mut moves = Vec::new();
    let mut from = home;
    for round in 0..args.moves {
        tokio::time::sleep(SETTLE).await;
        let to = if round % 2 == 0 { away } else { home };
        let begun = started.elapsed();
        let moved = admin.move_tablet(tablet.id, to).await?;
        let ended = started.elapsed();
        moves.push((from, to, begun, ended, moved.bytes_copied));
        from = to;
    }
    tokio::time::sleep(SETTLE).await;
    stop.store(true, Ordering::Relaxed);
    let writes = collect(writers).await;
    let reads = collect(readers).await;

    for (from_group, to_group, begun, ended, bytes_copied) in moves {
        let write_window = window(&writes, begun, ended);
        let report = MoveReport {
            tablet_id: tablet.id,
            from_group,
            to_group,
            tablet_mb,
            move_ms: ms(ended - begun),
            write_window_ms: write_window.length_ms,
            write_window_from_ms: write_window.from_ms,
            read_window_ms: window(&reads, begun, ended).length_ms,
            write_gap_before_ms: largest_gap_within(&writes, begun.saturating_sub(SETTLE), begun),
            bytes_copied,
            writes: writes.len() as u64,
            reads: reads.len() as u64,
            errors: errors.load(Ordering::Relaxed),
        };
        if args.json {
            println!("{}", super::report::json_line(&report)?);
        } else {
            println!(
                "move tablet {} ({:.0} MiB) group {} -> {}: {:.1} ms, write window {:.1} ms (from {:+.1} ms; {:.1} ms in the second before), read window {:.1} ms, {} bytes copied ({} writes, {} reads, {} errors)",
                report.tablet_id,
                report.tablet_mb,
                report.from_group,
                report.to_group,
                report.move_ms,
                report.write_window_ms,
                report.write_window_from_ms,
                report.write_gap_before_ms,
                report.read_window_ms,
                report.bytes_copied,
                report.writes,
                report.reads,
                report.errors
            );
        }
    }
    Ok(())
}

/// Creates the database and the collection if missing.
async fn prepare(client: &Client, database: &str) -> Result<Collection, CliError> {
    let admin = client.admin();
    match admin.create_database(database).await {
        Ok(_) | Err(ClientError::AlreadyExists { .. }) => {}
        Err(error) => return Err(error.into()),
    }
    // The second tablet stays empty: it only makes the collection take a second group.
    let spec = CollectionSpec::range().split_keys(["~"]);
    match admin.create_collection(database, COLLECTION, spec).await {
        Ok(_) | Err(ClientError::AlreadyExists { .. }) => {}
        Err(error) => return Err(error.into()),
    }
    Ok(client.database(database).collection(COLLECTION))
}

fn key(number: u64) -> Bytes {
    Bytes::from(format!("k{number:012}"))
}

fn value(rng: &mut SmallRng, size: usize) -> Bytes {
    let mut value = vec![0u8; size];
    rng.fill(&mut value[..]);
    Bytes::from(value)
}

/// Writes records `0..records`, a batch of about 1 MiB at a time.
async fn load(collection: &Collection, records: u64, value_size: usize) -> Result<(), CliError> {
    let per_batch = (LOAD_BATCH_BYTES / value_size).max(1) as u64;
    let batches: Vec<u64> = (0..records.div_ceil(per_batch)).collect();
    for wave in batches.chunks(LOAD_TASKS) {
        let mut tasks = Vec::new();
        for &batch_number in wave {
            let collection = collection.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = SmallRng::seed_from_u64(batch_number);
                let mut batch = WriteBatch::new();
                let first = batch_number * per_batch;
                for number in first..(first + per_batch).min(records) {
                    batch.put(key(number), value(&mut rng, value_size));
                }
                collection.batch(batch).await
            }));
        }
        for task in tasks {
            task.await
                .map_err(|error| CliError::Invalid(format!("a load task failed: {error}")))??;
        }
    }
    Ok(())
}

/// What one client task does until stopped.
struct ClientTask {
    collection: Collection,
    records: u64,
    value_size: usize,
    write: bool,
    seed: u64,
    started: Instant,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    done: Completions,
}

async fn client_task(task: ClientTask) {
    let mut rng = SmallRng::seed_from_u64(task.seed);
    while !task.stop.load(Ordering::Relaxed) {
        let key = key(rng.random_range(0..task.records));
        let outcome = if task.write {
            let value = value(&mut rng, task.value_size);
            task.collection.put(key, value).await.map(|_| ())
        } else {
            task.collection.get(key).await.map(|_| ())
        };
        match outcome {
            Ok(()) => {
                let at = u64::try_from(task.started.elapsed().as_micros()).unwrap_or(u64::MAX);
                if let Ok(mut done) = task.done.lock() {
                    done.push(at);
                }
            }
            Err(_) => {
                task.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Every task's completion times, merged and sorted.
async fn collect(tasks: Vec<(Completions, tokio::task::JoinHandle<()>)>) -> Vec<u64> {
    let mut all = Vec::new();
    for (done, handle) in tasks {
        let _ = handle.await;
        if let Ok(done) = done.lock() {
            all.extend_from_slice(&done);
        }
    }
    all.sort_unstable();
    all
}

/// The largest gap between consecutive completions that overlaps a move.
#[derive(Debug, PartialEq)]
struct Window {
    length_ms: f64,
    /// Where it began, from the start of the move.
    from_ms: f64,
}

/// The largest gap between consecutive completions (in µs) that overlaps `[begun, ended]`.
fn window(completions: &[u64], begun: Duration, ended: Duration) -> Window {
    let (begun, ended) = (micros(begun), micros(ended));
    let (from, to) = completions
        .windows(2)
        .filter(|pair| pair[1] >= begun && pair[0] <= ended)
        .map(|pair| (pair[0], pair[1]))
        .max_by_key(|(from, to)| to - from)
        .unwrap_or((begun, ended));
    Window {
        length_ms: to.saturating_sub(from) as f64 / 1000.0,
        from_ms: (from as f64 - begun as f64) / 1000.0,
    }
}

/// The largest gap between consecutive completions (in µs) inside `[from, to]`, in ms.
fn largest_gap_within(completions: &[u64], from: Duration, to: Duration) -> f64 {
    let (from, to) = (micros(from), micros(to));
    let largest = completions
        .windows(2)
        .filter(|pair| pair[0] >= from && pair[1] <= to)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or(0);
    largest as f64 / 1000.0
}

fn micros(at: Duration) -> u64 {
    u64::try_from(at.as_micros()).unwrap_or(u64::MAX)
}

fn ms(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_the_largest_gap_overlapping_the_move() {
        let at = Duration::from_micros;
        // A 40 ms gap before the move does not count; the 25 ms one across its start does.
        let completions = [0, 40_000, 50_000, 75_000, 76_000, 200_000];
        let gap = |length_ms, from_ms| Window { length_ms, from_ms };
        assert_eq!(
            window(&completions, at(60_000), at(70_000)),
            gap(25.0, -10.0)
        );
        // The gap after the last completion before the end counts too.
        assert_eq!(
            window(&completions, at(76_500), at(80_000)),
            gap(124.0, -0.5)
        );
        // Nothing completed at all: the whole move was a gap.
        assert_eq!(window(&[], at(1_000), at(3_000)), gap(2.0, 0.0));
        // Before a move, only gaps wholly inside the span count.
        assert_eq!(largest_gap_within(&completions, at(0), at(60_000)), 40.0);
        assert_eq!(
            largest_gap_within(&completions, at(45_000), at(80_000)),
            25.0
        );
    }
}
