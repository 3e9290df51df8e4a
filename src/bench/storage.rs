//! `luna bench storage`: db_bench-style workloads on the embedded engine.
//!
//! Each of `--threads` workers owns one tablet (a disjoint key range) of one
//! BaseStore, as tablets of one collection would on a tablet server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use luna_kernel::objstore::{LunaObjectStore, MetricsSnapshot, OpKind};
use luna_storage::{
    BaseStore, BaseStoreOptions, BlockCache, CacheOptions, Direction, KeyRange, MemStoreOptions,
    MemoryBudget, ScanRequest, Tablet, WriteBatch,
};
use object_store::ObjectStore;
use object_store::path::Path;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::report::{Latencies, WorkloadReport};
use crate::error::CliError;
use crate::store_args::StoreArgs;

/// Flags of `luna bench storage`.
#[derive(Debug, Args)]
pub struct StorageBenchArgs {
    /// Keys per workload.
    #[arg(long, default_value_t = 100_000)]
    num: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Decoded-page cache size in bytes.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    cache_size: u64,
    /// Concurrent workers, one tablet each.
    #[arg(long, default_value_t = 1)]
    threads: u64,
    /// Workloads to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fillseq,fillrandom,overwrite,readseq,readrandom"
    )]
    workloads: Vec<Workload>,
    /// Memtable size in bytes.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    memtable_size: usize,
    /// Print one JSON object per workload instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep the benchmark's objects instead of deleting them at the end.
    #[arg(long)]
    keep: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    Fillseq,
    Fillrandom,
    Overwrite,
    Readseq,
    Readrandom,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Fillseq => "fillseq",
            Workload::Fillrandom => "fillrandom",
            Workload::Overwrite => "overwrite",
            Workload::Readseq => "readseq",
            Workload::Readrandom => "readrandom",
        }
    }
}

/// An open collection and its tablets, one per worker.
struct Collection {
    base: Arc<BaseStore>,
    tablets: Vec<Arc<Tablet>>,
    epoch: u64,
}

struct Bench {
    args: StorageBenchArgs,
    store: Arc<LunaObjectStore>,
    root: Path,
    value_pool: Bytes,
    /// Commit timestamps and journal indexes: one clock for every tablet.
    clock: AtomicU64,
}

/// Runs the benchmark and prints its reports.
pub async fn run(args: StorageBenchArgs) -> Result<(), CliError> {
    if args.num == 0 || args.threads == 0 {
        return Err(CliError::Invalid(
            "--num and --threads must be at least 1".into(),
        ));
    }
    let digits = args.num.to_string().len();
    if args.key_size < digits || args.key_size > 4096 {
        return Err(CliError::Invalid(format!(
            "--key-size must be between {digits} (to number {} keys) and 4096",
            args.num
        )));
    }
    let store = args.store.open()?;
    let root = Path::from(format!("bench-storage-{}", std::process::id()));
    let mut rng = SmallRng::seed_from_u64(42);
    let value_pool: Bytes = (0..args.value_size * 2 + 1024)
        .map(|_| rng.random::<u8>())
        .collect();
    let bench = Arc::new(Bench {
        args,
        store,
        root,
        value_pool,
        clock: AtomicU64::new(0),
    });
    let result = bench.run_all().await;
    if !bench.args.keep {
        bench.delete_objects().await;
    }
    result
}

impl Bench {
    /// Key `index`: its decimal digits, zero-padded to the key size.
    fn key(&self, index: u64) -> Bytes {
        let mut key = vec![b'0'; self.args.key_size];
        let mut rest = index;
        for byte in key.iter_mut().rev() {
            *byte = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        Bytes::from(key)
    }

    fn value(&self, index: u64) -> Bytes {
        let offset = (index as usize * 7) % 1024;
        self.value_pool.slice(offset..offset + self.args.value_size)
    }

    /// Key index range of worker `worker`.
    fn share(&self, worker: u64) -> std::ops::Range<u64> {
        let per = self.args.num.div_ceil(self.args.threads);
        (worker * per).min(self.args.num)..((worker + 1) * per).min(self.args.num)
    }

    fn tablet_range(&self, worker: u64) -> KeyRange {
        let share = self.share(worker);
        let start = if worker == 0 {
            Bytes::new()
        } else {
            self.key(share.start)
        };
        let end = (worker + 1 < self.args.threads).then(|| self.key(share.end));
        KeyRange::new(start, end)
    }

    async fn open(&self, name: &str, epoch: u64) -> Result<Collection, CliError> {
        let options = BaseStoreOptions {
            cache: Arc::new(BlockCache::new(CacheOptions {
                page_bytes: self.args.cache_size,
                ..CacheOptions::default()
            })),
            ..BaseStoreOptions::default()
        };
        let object_store: Arc<dyn ObjectStore> = self.store.clone();
        let base = BaseStore::open(object_store, self.root.clone().join(name), options).await?;
        let budget = Arc::new(MemoryBudget::new(
            self.args.memtable_size.saturating_mul(4).max(64 << 20),
        ));
        let memstore = MemStoreOptions {
            memtable_size: self.args.memtable_size,
            ..MemStoreOptions::default()
        };
        let mut tablets = Vec::new();
        for worker in 0..self.args.threads {
            let tablet = Tablet::open(
                Arc::clone(&base),
                worker + 1,
                epoch,
                self.tablet_range(worker),
                memstore,
                Arc::clone(&budget),
            )
            .await?;
            tablets.push(tablet);
        }
        Ok(Collection {
            base,
            tablets,
            epoch,
        })
    }

    async fn close(&self, collection: Collection) -> Result<(), CliError> {
        for tablet in &collection.tablets {
            tablet.close().await?;
        }
        collection.base.shutdown().await;
        Ok(())
    }

    async fn run_all(self: &Arc<Self>) -> Result<(), CliError> {
        let mut filled: Option<Collection> = None;
        for &workload in &self.args.workloads.clone() {
            let collection = match (workload, filled.take()) {
                (Workload::Fillseq | Workload::Fillrandom, previous) => {
                    if let Some(previous) = previous {
                        self.close(previous).await?;
                    }
                    self.open(workload.name(), 1).await?
                }
                (Workload::Overwrite, Some(current)) => current,
                (Workload::Readseq | Workload::Readrandom, Some(current)) if current.epoch == 1 => {
                    // Reads run after a reopen, so they hit tables, not memtables.
                    let name = current
                        .base
                        .layout()
                        .root()
                        .filename()
                        .unwrap_or_default()
                        .to_string();
                    self.close(current).await?;
                    self.open(&name, 2).await?
                }
                (_, Some(current)) => current,
                (_, None) => {
                    return Err(CliError::Invalid(format!(
                        "{} needs a fill workload before it",
                        workload.name()
                    )));
                }
            };
            let before = self.store.metrics();
            let started = Instant::now();
            let (ops, found, latencies) = self.run_workload(workload, &collection).await?;
            if matches!(
                workload,
                Workload::Fillseq | Workload::Fillrandom | Workload::Overwrite
            ) {
                // Count a fill as done once its data is durable in the object store.
                for tablet in &collection.tablets {
                    tablet.flush().await?;
                }
            }
            let elapsed = started.elapsed();
            let delta = self.store.metrics() - before;
            let mut report = WorkloadReport::new(workload.name(), ops, elapsed, &latencies);
            fill_store_counts(&mut report, &delta);
            report.found = found;
            self.print(&report)?;
            filled = Some(collection);
        }
        if let Some(collection) = filled {
            self.close(collection).await?;
        }
        Ok(())
    }

    fn print(&self, report: &WorkloadReport) -> Result<(), CliError> {
        if self.args.json {
            let line =
                serde_json::to_string(report).map_err(|e| CliError::Invalid(e.to_string()))?;
            println!("{line}");
        } else {
            println!("{}", report.line());
        }
        Ok(())
    }

    fn progress(&self, workload: Workload, total: u64) -> ProgressBar {
        if self.args.json {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template("{msg:<11} [{bar:40}] {pos}/{len} {per_sec}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(workload.name());
        bar
    }

    async fn run_workload(
        self: &Arc<Self>,
        workload: Workload,
        collection: &Collection,
    ) -> Result<(u64, Option<u64>, Latencies), CliError> {
        let bar = self.progress(workload, self.args.num);
        let mut workers = Vec::new();
        for worker in 0..self.args.threads {
            let bench = Arc::clone(self);
            let tablet = Arc::clone(&collection.tablets[worker as usize]);
            let bar = bar.clone();
            workers.push(tokio::spawn(async move {
                bench.worker(workload, worker, tablet, bar).await
            }));
        }
        let mut latencies = Latencies::new();
        let (mut ops, mut found) = (0, 0);
        for worker in workers {
            let (worker_ops, worker_found, worker_latencies) = worker
                .await
                .map_err(|e| CliError::Invalid(format!("benchmark worker failed: {e}")))??;
            ops += worker_ops;
            found += worker_found;
            latencies.merge(&worker_latencies);
        }
        bar.finish_and_clear();
        let reads = matches!(workload, Workload::Readrandom | Workload::Readseq);
        Ok((ops, reads.then_some(found), latencies))
    }

    async fn worker(
        &self,
        workload: Workload,
        worker: u64,
        tablet: Arc<Tablet>,
        bar: ProgressBar,
    ) -> Result<(u64, u64, Latencies), CliError> {
        let share = self.share(worker);
        let mut rng = SmallRng::seed_from_u64(worker * 7919 + workload as u64);
        let mut latencies = Latencies::new();
        let (mut ops, mut found) = (0u64, 0u64);
        match workload {
            Workload::Fillseq | Workload::Fillrandom | Workload::Overwrite => {
                for i in share.clone() {
                    let index = if workload == Workload::Fillseq {
                        i
                    } else {
                        rng.random_range(share.clone())
                    };
                    let mut batch = WriteBatch::new();
                    batch.put(self.key(index), self.value(index));
                    let tick = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
                    let started = Instant::now();
                    tablet.write(tick, tick, &batch).await?;
                    latencies.record(started.elapsed());
                    ops += 1;
                    if ops % 1024 == 0 {
                        bar.inc(1024);
                    }
                }
            }
            Workload::Readrandom => {
                let read_ts = self.clock.load(Ordering::Relaxed);
                for _ in share.clone() {
                    let index = rng.random_range(share.clone());
                    let started = Instant::now();
                    let hit = tablet.get(&self.key(index), read_ts).await?;
                    latencies.record(started.elapsed());
                    found += u64::from(hit.is_some());
                    ops += 1;
                    if ops % 1024 == 0 {
                        bar.inc(1024);
                    }
                }
            }
            Workload::Readseq => {
                let read_ts = self.clock.load(Ordering::Relaxed);
                let mut start = tablet.range().start.clone();
                loop {
                    let request = ScanRequest {
                        range: KeyRange::new(start.clone(), tablet.range().end.clone()),
                        read_ts,
                        limit: 1000,
                        direction: Direction::Forward,
                    };
                    let started = Instant::now();
                    let page = tablet.scan(&request).await?;
                    latencies.record(started.elapsed() / page.len().max(1) as u32);
                    let Some((last, _)) = page.last() else { break };
                    ops += page.len() as u64;
                    found += page.len() as u64;
                    bar.inc(page.len() as u64);
                    let mut next = last.to_vec();
                    next.push(0);
                    start = Bytes::from(next);
                }
            }
        }
        Ok((ops, found, latencies))
    }

    async fn delete_objects(&self) {
        use futures::StreamExt;
        let store: Arc<dyn ObjectStore> = self.store.clone();
        let locations = store
            .list(Some(&self.root))
            .filter_map(|meta| async move { meta.ok().map(|m| Ok(m.location)) });
        let mut deleted = store.delete_stream(locations.boxed());
        while let Some(result) = deleted.next().await {
            if let Err(error) = result {
                tracing::warn!(%error, "could not delete a benchmark object");
            }
        }
    }
}

fn fill_store_counts(report: &mut WorkloadReport, delta: &MetricsSnapshot) {
    let put = delta.op(OpKind::Put);
    let part = delta.op(OpKind::PutMultipart);
    report.object_store_puts = put.requests + part.requests;
    report.object_store_gets = delta.op(OpKind::Get).requests;
    report.bytes_written = put.bytes + part.bytes;
}
