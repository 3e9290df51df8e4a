//! The BaseStore of one collection: its tables and manifest in the object
//! store, shared by every tablet of the collection wherever it is hosted.

mod background;
mod compaction;
mod gc;
mod sizing;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use luna_proto::manifest as pb;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::sync::{Notify, Semaphore, watch};

pub use compaction::CompactionReport;
pub use gc::GcReport;

use crate::cache::{BlockCache, CacheOptions};
use crate::error::{Result, StorageError};
use crate::manifest::{Layout, ManifestLog, TableInfo, TabletInfo, Version, table_to_pb};
use crate::memstore::Memtable;
use crate::merge::Source;
use crate::table::{PinnedIndex, TableBuilder, TableReader, TableSummary};
use crate::types::{Direction, KeyRange, LogSpan, Lookup, TabletId, Timestamp};

/// Tuning of a BaseStore.
#[derive(Clone)]
pub struct BaseStoreOptions {
    /// Caches, shareable between BaseStores.
    pub cache: Arc<BlockCache>,
    /// Bounds concurrent compactions, shareable between BaseStores.
    pub compaction_slots: Arc<Semaphore>,
    /// Bounds concurrent flushes, shareable between BaseStores.
    pub flush_slots: Arc<Semaphore>,
    /// A checkpoint is written every this many manifest edits.
    pub checkpoint_every: u64,
    /// L0 tables that trigger an L0 -> L1 compaction.
    pub l0_compaction_trigger: usize,
    /// Target size of L1; each deeper level is `level_multiplier` times larger.
    pub level1_bytes: u64,
    /// Growth factor between levels.
    pub level_multiplier: u64,
    /// Compaction cuts output tables at about this size.
    pub table_target_bytes: usize,
    /// An unreferenced object is deleted only once it is this old, so a
    /// reader elsewhere that still uses an older manifest version finishes first.
    pub gc_grace: Duration,
    /// Run compaction (and garbage collection every `gc_interval`) in the background.
    pub background_jobs: bool,
    /// Whether this process is the store's compactor from the start (see
    /// [`BaseStore::set_compactor`]). Only the compactor runs the background jobs: every
    /// process compacting the same tables would do the work several times over and
    /// keep one result.
    pub compactor: bool,
    /// How often the compactor looks for tables other processes flushed, which wake
    /// no compaction here.
    pub compactor_poll: Duration,
    /// How often background garbage collection runs.
    pub gc_interval: Duration,
}

impl Default for BaseStoreOptions {
    fn default() -> Self {
        BaseStoreOptions {
            cache: Arc::new(BlockCache::new(CacheOptions::default())),
            compaction_slots: Arc::new(Semaphore::new(1)),
            flush_slots: Arc::new(Semaphore::new(2)),
            checkpoint_every: 32,
            l0_compaction_trigger: 4,
            level1_bytes: 64 * 1024 * 1024,
            level_multiplier: 10,
            table_target_bytes: 32 * 1024 * 1024,
            gc_grace: Duration::from_secs(600),
            background_jobs: true,
            compactor: true,
            compactor_poll: Duration::from_secs(2),
            gc_interval: Duration::from_secs(60),
        }
    }
}

/// Names of tables being uploaded by one flush or compaction; garbage
/// collection leaves them alone until the guard drops (after the commit).
struct Uploads<'a> {
    base: &'a BaseStore,
    names: Vec<String>,
    /// When the first upload started.
    started: Option<tokio::time::Instant>,
}

impl Uploads<'_> {
    /// A fresh table name, tracked from now on.
    fn track_new(&mut self) -> String {
        let name = format!("tables/{}.parquet", uuid::Uuid::new_v4().simple());
        if let Ok(mut uploading) = self.base.uploading.lock() {
            uploading.insert(name.clone());
        }
        self.names.push(name.clone());
        self.started.get_or_insert_with(tokio::time::Instant::now);
        name
    }

    /// Refuses to commit uploads that garbage collection in another process
    /// may already delete: it sees them as unreferenced from (at latest) their
    /// upload on, and deletes them `gc_grace` after it first saw them. Half
    /// the grace leaves the other half for the manifest put itself. A zero
    /// grace (single-process tests) disables the check.
    fn check_fresh(&self) -> Result<()> {
        let grace = self.base.options.gc_grace;
        match self.started {
            Some(started) if !grace.is_zero() && started.elapsed() >= grace / 2 => {
                Err(StorageError::Job {
                    job: "commit",
                    detail: format!(
                        "uploads took {:?}, over half the GC grace period {grace:?}; \
                         another process may collect them, so they are left as orphans",
                        started.elapsed()
                    ),
                })
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Uploads<'_> {
    fn drop(&mut self) {
        if let Ok(mut uploading) = self.base.uploading.lock() {
            for name in &self.names {
                uploading.remove(name);
            }
        }
    }
}

/// A collection's LSM of tables in the object store.
pub struct BaseStore {
    store: Arc<dyn ObjectStore>,
    log: ManifestLog,
    options: BaseStoreOptions,
    current: RwLock<Arc<Version>>,
    /// Versions replaced while readers may still hold them: their tables are
    /// not garbage until the last holder drops them.
    retired: Mutex<Vec<Weak<Version>>>,
    /// Tables uploaded but not yet committed: not garbage, whatever their age.
    uploading: Mutex<HashSet<String>>,
    /// Table objects garbage collection found unreferenced, and when it first
    /// did: the grace period runs from then, not from the upload.
    unreferenced_since: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Serialises this process's manifest writers (flushes, compactions);
    /// other processes are handled by put-if-absent.
    commit_lock: tokio::sync::Mutex<()>,
    gc_safe_point: AtomicU64,
    compaction_wanted: Arc<Notify>,
    closed: AtomicBool,
    shutdown: watch::Sender<bool>,
    /// Whether this process runs the background jobs now.
    compactor: watch::Sender<bool>,
    /// The background compaction and GC tasks, awaited by [`BaseStore::shutdown`].
    jobs: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl BaseStore {
    /// Opens (or creates) the BaseStore under `root` in `store`, replaying its manifest.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        root: Path,
        options: BaseStoreOptions,
    ) -> Result<Arc<BaseStore>> {
        let log = ManifestLog::new(
            Arc::clone(&store),
            Layout::new(root),
            options.checkpoint_every,
        );
        let version = log.load().await?;
        let safe_point = version.gc_safe_point();
        let base = Arc::new(BaseStore {
            store,
            log,
            current: RwLock::new(Arc::new(version)),
            retired: Mutex::new(Vec::new()),
            uploading: Mutex::new(HashSet::new()),
            unreferenced_since: Mutex::new(HashMap::new()),
            commit_lock: tokio::sync::Mutex::new(()),
            gc_safe_point: AtomicU64::new(safe_point),
            compaction_wanted: Arc::new(Notify::new()),
            closed: AtomicBool::new(false),
            shutdown: watch::Sender::new(false),
            compactor: watch::Sender::new(options.compactor),
            jobs: Mutex::new(Vec::new()),
            options,
        });
        if base.options.background_jobs {
            let jobs = [
                background::spawn_compactions(&base),
                gc::spawn_collections(&base),
            ];
            if let Ok(mut slot) = base.jobs.lock() {
                slot.extend(jobs);
            }
        }
        Ok(base)
    }

    /// The object store it lives in.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object layout.
    pub fn layout(&self) -> &Layout {
        self.log.layout()
    }

    /// The options it was opened with.
    pub fn options(&self) -> &BaseStoreOptions {
        &self.options
    }

    /// The current version. Holding it keeps its tables from being collected.
    pub fn version(&self) -> Arc<Version> {
        self.current.read().map_or_else(
            |poisoned| Arc::clone(&poisoned.into_inner()),
            |v| Arc::clone(&v),
        )
    }

    /// Versions below this timestamp may be dropped by compaction. The caller
    /// (the master, in a universe) guarantees no read will go below it. It never
    /// goes back.
    pub fn set_gc_safe_point(&self, ts: Timestamp) {
        self.gc_safe_point.fetch_max(ts, Ordering::AcqRel);
    }

    /// The current GC safe point: the highest set here or used by a compaction in
    /// the current version (possibly another process's).
    pub fn gc_safe_point(&self) -> Timestamp {
        self.gc_safe_point.load(Ordering::Acquire)
    }

    /// Makes this process the store's compactor, or no longer: the one that runs
    /// compaction and garbage collection in the background. In a universe the master
    /// names one tablet server per collection. Two for a while (while the choice moves)
    /// waste work but do no harm: manifest edits are conditional.
    pub fn set_compactor(&self, compactor: bool) {
        self.compactor.send_if_modified(|current| {
            let changed = *current != compactor;
            *current = compactor;
            changed
        });
    }

    /// Whether this process is the store's compactor.
    pub fn is_compactor(&self) -> bool {
        *self.compactor.borrow()
    }

    /// Picks up edits other processes wrote.
    pub async fn refresh(&self) -> Result<Arc<Version>> {
        let _commit = self.commit_lock.lock().await;
        let current = self.version();
        match self.log.catch_up(&current).await? {
            Some(newer) => Ok(self.install(newer)),
            None => Ok(current),
        }
    }

    fn install(&self, version: Version) -> Arc<Version> {
        // Raised before the version is published: a reader that loads the version and
        // then checks the safe point never passes a read the version cannot serve.
        self.set_gc_safe_point(version.gc_safe_point());
        let version = Arc::new(version);
        let previous = match self.current.write() {
            Ok(mut current) => std::mem::replace(&mut *current, Arc::clone(&version)),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), Arc::clone(&version)),
        };
        if let Ok(mut retired) = self.retired.lock() {
            retired.retain(|weak| weak.strong_count() > 0);
            retired.push(Arc::downgrade(&previous));
        }
        version
    }

    async fn commit(
        &self,
        make: impl FnMut(&Version) -> Result<pb::manifest_edit::Change>,
    ) -> Result<Arc<Version>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed { what: "base store" });
        }
        let _commit = self.commit_lock.lock().await;
        match self.log.commit(&self.version(), make).await {
            Ok(next) => Ok(self.install(next)),
            Err(error @ StorageError::Fenced { .. }) => {
                // The log read a newer state to refuse this change: keep it, so
                // reads and later checks see the new owner.
                if let Ok(Some(newer)) = self.log.catch_up(&self.version()).await {
                    self.install(newer);
                }
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// Takes ownership of a tablet at `epoch` (which must be newer than the
    /// recorded one), fencing any older owner. Returns the tablet's record,
    /// whose `flushed_up_to` tells where journal replay must start.
    ///
    /// `span` says which journal the claimer replays: an owner recorded below
    /// its epochs counted its flush marker in another journal, so the marker
    /// restarts at `span.opened_at`.
    pub async fn claim_tablet(
        &self,
        tablet_id: TabletId,
        epoch: u64,
        range: KeyRange,
        span: &LogSpan,
    ) -> Result<TabletInfo> {
        let version = self
            .commit(|version| {
                let current = version.tablet(tablet_id).map_or(0, |t| t.epoch);
                if epoch <= current {
                    return Err(StorageError::Fenced {
                        tablet_id,
                        epoch,
                        current_epoch: current,
                    });
                }
                let claimed = TabletInfo {
                    tablet_id,
                    epoch,
                    range: range.clone(),
                    flushed_up_to: span.opened_at,
                };
                Ok(pb::manifest_edit::Change::Claim(pb::ClaimTablet {
                    tablet: Some(crate::manifest::tablet_to_pb(&claimed)),
                    log_floor: span.epochs.start,
                }))
            })
            .await?;
        version
            .tablet(tablet_id)
            .cloned()
            .ok_or_else(|| StorageError::Job {
                job: "claim",
                detail: format!("tablet {tablet_id} missing right after its claim"),
            })
    }

    /// Writes `memtable` as a table and records it, with the flush marker, in
    /// the manifest. Fails with `Fenced` if a newer owner claimed the tablet.
    pub async fn flush(
        &self,
        tablet_id: TabletId,
        epoch: u64,
        memtable: &Arc<Memtable>,
    ) -> Result<Arc<Version>> {
        let _slot = self
            .options
            .flush_slots
            .acquire()
            .await
            .map_err(|_| StorageError::Closed {
                what: "flush slots",
            })?;
        let source = Arc::clone(memtable);
        let build = move || {
            let mut builder = TableBuilder::new();
            source.for_each(|version| {
                builder.push(version.key(), version.ts(), version.kind(), version.value())
            });
            builder
        };
        let mut uploads = self.uploads();
        let added = match self.write_table(build, 0, &mut uploads).await? {
            Some(table) => vec![table],
            None => Vec::new(),
        };
        let flushed_up_to = memtable.max_seq();
        let version = self
            .commit(|version| {
                uploads.check_fresh()?;
                let current = version.tablet(tablet_id).map_or(0, |t| t.epoch);
                if current != epoch {
                    return Err(StorageError::Fenced {
                        tablet_id,
                        epoch,
                        current_epoch: current,
                    });
                }
                Ok(pb::manifest_edit::Change::Flush(pb::Flush {
                    tablet_id,
                    epoch,
                    flushed_up_to,
                    added: added.iter().map(table_to_pb).collect(),
                }))
            })
            .await?;
        self.compaction_wanted.notify_one();
        Ok(version)
    }

    /// Starts tracking uploads whose manifest edit is still to come.
    fn uploads(&self) -> Uploads<'_> {
        Uploads {
            base: self,
            names: Vec::new(),
            started: None,
        }
    }

    /// Builds, encodes and uploads a table; `None` when it is empty.
    async fn write_table(
        &self,
        build: impl FnOnce() -> TableBuilder + Send + 'static,
        level: u32,
        uploads: &mut Uploads<'_>,
    ) -> Result<Option<TableInfo>> {
        let name = uploads.track_new();
        // Building and encoding are CPU-bound: keep them off the async workers.
        let encoded = tokio::task::spawn_blocking({
            let name = name.clone();
            move || build().finish(&name)
        })
        .await
        .map_err(|e| StorageError::Job {
            job: "table encoding",
            detail: e.to_string(),
        })??;
        self.upload_table(name, encoded, level).await
    }

    /// Uploads a table encoded under `name` (tracked in `uploads` before it was built);
    /// `None` when it was empty.
    async fn upload_table(
        &self,
        name: String,
        encoded: Option<(Bytes, TableSummary)>,
        level: u32,
    ) -> Result<Option<TableInfo>> {
        let Some((bytes, summary)) = encoded else {
            return Ok(None);
        };
        let path = self.layout().table(&name);
        let size_bytes = bytes.len() as u64;
        self.store
            .put(&path, bytes.into())
            .await
            .map_err(|e| StorageError::store("put", &path, e))?;
        let TableSummary {
            smallest,
            largest,
            min_ts,
            max_ts,
            rows,
        } = summary;
        Ok(Some(TableInfo {
            name,
            level,
            smallest,
            largest,
            min_ts,
            max_ts,
            rows,
            size_bytes,
            added_seq: 0,
            pinned: PinnedIndex::default(),
        }))
    }

    async fn reader(&self, table: &TableInfo) -> Result<TableReader> {
        if let Some(index) = table.pinned.get() {
            return Ok(TableReader::new(index, &self.store, &self.options.cache));
        }
        let path = self.layout().table(&table.name);
        let index = self
            .options
            .cache
            .index(&self.store, &path, table.size_bytes, table.rows)
            .await?;
        table.pinned.set(&index);
        Ok(TableReader::new(index, &self.store, &self.options.cache))
    }

    /// The newest version of `key` at or below `read_ts` in the tables of
    /// `version`, or `best` if that is newer. Tables that cannot hold
    /// anything newer than `best` are skipped without I/O.
    pub async fn get(
        &self,
        version: &Version,
        key: &[u8],
        read_ts: Timestamp,
        best: Lookup,
    ) -> Result<Lookup> {
        let mut best = best;
        for table in version.tables_for_key(key) {
            if table.min_ts > read_ts {
                continue;
            }
            if best.ts().is_some_and(|found| found >= table.max_ts) {
                continue;
            }
            best = best.newer(self.reader(table).await?.get(key, read_ts).await?);
        }
        Ok(best)
    }

    /// Cursors over the tables of `version` that overlap `range`.
    pub(crate) async fn sources(
        &self,
        version: &Version,
        range: &KeyRange,
        direction: Direction,
    ) -> Result<Vec<Source>> {
        let mut sources = Vec::new();
        for table in version.overlapping(range) {
            let cursor = self.reader(&table).await?.cursor(range, direction).await?;
            sources.push(Source::Table(Box::new(cursor)));
        }
        Ok(sources)
    }

    /// Stops background jobs and refuses further manifest writes. Dropping the
    /// last handle does the same.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.shutdown.send_replace(true);
    }

    /// Closes the store and waits for its background jobs to stop, so that no
    /// upload of theirs lands afterwards (a cut-short compaction's outputs are
    /// orphans for the next garbage collection).
    pub async fn shutdown(&self) {
        self.close();
        let jobs = self
            .jobs
            .lock()
            .map(|mut jobs| std::mem::take(&mut *jobs))
            .unwrap_or_default();
        for job in jobs {
            // A job that panicked has nothing left to wait for.
            let _ = job.await;
        }
    }
}
