//! A tablet's storage: its MemStore in front of its collection's BaseStore,
//! bounded to the tablet's key range. This is the embedded API.

mod owner;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::base::BaseStore;
use crate::error::{Result, StorageError};
use crate::memstore::{MemStore, MemStoreOptions, MemoryBudget};
use crate::merge::{MergeIterator, Source};
use crate::types::{Direction, KeyRange, LogSpan, Lookup, TabletId, Timestamp, WriteBatch};

/// A range scan.
#[derive(Debug, Clone)]
pub struct ScanRequest {
    /// The keys to scan (intersected with the tablet's range).
    pub range: KeyRange,
    /// The snapshot timestamp.
    pub read_ts: Timestamp,
    /// At most this many keys (0 = no limit).
    pub limit: usize,
    /// Ascending or descending keys.
    pub direction: Direction,
}

/// One tablet's storage on one replica of its group.
///
/// Every replica applies the same journal entries to its own MemStore and
/// serves reads from it and the shared BaseStore. At most one replica, the
/// *owner* (the group leader), flushes: it claimed the tablet at an epoch in
/// the manifest, which fences every older owner. The others drop memtables
/// when the owner's "flushed up to" marker reaches them
/// ([`Tablet::apply_flushed`]). See docs/storage.md, "Replicas".
pub struct Tablet {
    id: TabletId,
    range: KeyRange,
    /// The journal this handle replays.
    span: LogSpan,
    recovered_up_to: u64,
    base: Arc<BaseStore>,
    memstore: Arc<MemStore>,
    /// One flush at a time, oldest memtable first.
    flush_lock: tokio::sync::Mutex<()>,
    /// Whether this handle flushes, and at which epoch.
    role: Mutex<Role>,
    /// Serialises claim and apply_flushed, which both swap the version and
    /// drop memtables.
    transitions: tokio::sync::Mutex<()>,
    /// The highest journal index whose writes are all in the BaseStore.
    flushed: watch::Sender<u64>,
}

/// A handle's role: a replica (`epoch == None`) or the owner at an epoch.
#[derive(Default)]
struct Role {
    epoch: Option<u64>,
    /// The epoch of the owner that fenced this one out; 0 while it is not fenced.
    fenced_by: u64,
    flusher: Option<JoinHandle<()>>,
}

impl Tablet {
    /// Opens tablet `id` as a replica: it applies writes and serves reads but
    /// never writes to the manifest until [`Tablet::claim`]. Replay the journal
    /// from [`Tablet::recovered_up_to`] + 1 before serving.
    pub async fn open_replica(
        base: Arc<BaseStore>,
        id: TabletId,
        range: KeyRange,
        options: MemStoreOptions,
        budget: Arc<MemoryBudget>,
    ) -> Result<Arc<Tablet>> {
        Tablet::open_replica_in(base, id, range, LogSpan::whole(), options, budget).await
    }

    /// [`Tablet::open_replica`] for a tablet whose writes `span` of a journal
    /// carries: a tablet that moves between journals.
    pub async fn open_replica_in(
        base: Arc<BaseStore>,
        id: TabletId,
        range: KeyRange,
        span: LogSpan,
        options: MemStoreOptions,
        budget: Arc<MemoryBudget>,
    ) -> Result<Arc<Tablet>> {
        // The newest manifest state: replay must not start before a flush
        // another replica already made durable, nor after it.
        let version = base.refresh().await?;
        let recorded = version.tablet(id).map(|t| (t.epoch, t.flushed_up_to));
        let recovered_up_to = span.replay_after(recorded);
        Ok(Arc::new(Tablet {
            id,
            range,
            span,
            recovered_up_to,
            base,
            memstore: Arc::new(MemStore::new(options, budget)),
            flush_lock: tokio::sync::Mutex::new(()),
            role: Mutex::new(Role::default()),
            transitions: tokio::sync::Mutex::new(()),
            flushed: watch::Sender::new(recovered_up_to),
        }))
    }

    /// Opens tablet `id` and claims it at `epoch` (fencing older owners): a
    /// replica that is the owner from the start. Replay the journal from
    /// [`Tablet::recovered_up_to`] + 1 before serving.
    pub async fn open(
        base: Arc<BaseStore>,
        id: TabletId,
        epoch: u64,
        range: KeyRange,
        options: MemStoreOptions,
        budget: Arc<MemoryBudget>,
    ) -> Result<Arc<Tablet>> {
        let tablet = Tablet::open_replica(base, id, range, options, budget).await?;
        tablet.claim(epoch).await?;
        Ok(tablet)
    }

    /// The tablet's id.
    pub fn id(&self) -> TabletId {
        self.id
    }

    /// The epoch this handle owns the tablet at; `None` while it is a replica.
    pub fn epoch(&self) -> Option<u64> {
        self.role.lock().ok().and_then(|role| role.epoch)
    }

    /// The tablet's key range.
    pub fn range(&self) -> &KeyRange {
        &self.range
    }

    /// Every journal index up to this was durable in the BaseStore when the
    /// tablet opened: replay starts after it.
    pub fn recovered_up_to(&self) -> u64 {
        self.recovered_up_to
    }

    /// The MemStore.
    pub fn memstore(&self) -> &Arc<MemStore> {
        &self.memstore
    }

    /// The BaseStore.
    pub fn base(&self) -> &Arc<BaseStore> {
        &self.base
    }

    /// Refuses writes once this handle was fenced as owner: a newer owner
    /// exists, so this one's MemStore may miss its writes. [`Tablet::release`]
    /// turns it back into a replica, which applies writes again.
    fn check_open(&self) -> Result<()> {
        let role = self.role.lock().map_err(|_| poisoned())?;
        match (role.epoch, role.fenced_by) {
            (Some(epoch), current_epoch) if current_epoch > 0 => Err(StorageError::Fenced {
                tablet_id: self.id,
                epoch,
                current_epoch,
            }),
            _ => Ok(()),
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        if !self.range.contains(key) {
            return Err(StorageError::invalid(format!(
                "key {:?} is outside tablet {}",
                String::from_utf8_lossy(key),
                self.id
            )));
        }
        Ok(())
    }

    /// Refuses a read below the GC safe point. Called after the version the read
    /// uses was loaded: installing a version raises the safe point first.
    fn check_snapshot(&self, read_ts: Timestamp) -> Result<()> {
        let safe_point = self.base.gc_safe_point();
        if read_ts < safe_point {
            return Err(StorageError::SnapshotTooOld {
                read_ts,
                safe_point,
            });
        }
        Ok(())
    }

    /// Applies `batch` at `ts` as journal entry `seq` (non-decreasing), unless
    /// this handle was fenced as owner (see [`Tablet::write_committed`] for a
    /// journal that replicas share).
    pub async fn write(&self, seq: u64, ts: Timestamp, batch: &WriteBatch) -> Result<()> {
        self.check_open()?;
        self.write_committed(seq, ts, batch).await
    }

    /// Applies `batch` at `ts` as entry `seq` (non-decreasing) of a replicated
    /// journal that committed it, fenced or not: every replica must apply every
    /// committed entry, whoever proposed it. A fenced owner that skipped one
    /// would, once it owns the tablet again, flush a memtable whose marker
    /// covers the skipped entry, and every replica would drop it from memory.
    ///
    /// An owner that can flush stalls while the memory budget is exhausted; a
    /// replica or a fenced owner (whose memory only a release and the new
    /// owner's markers free) does not (see [`MemStore::write_unthrottled`]).
    pub async fn write_committed(&self, seq: u64, ts: Timestamp, batch: &WriteBatch) -> Result<()> {
        for mutation in batch.mutations() {
            self.check_key(mutation.key())?;
        }
        let flushes = self
            .role
            .lock()
            .is_ok_and(|role| role.epoch.is_some() && role.fenced_by == 0);
        if flushes {
            self.memstore.write(seq, ts, batch).await
        } else {
            self.memstore.write_unthrottled(seq, ts, batch)
        }
    }

    /// The newest version of `key` visible at `read_ts`.
    pub async fn get_version(&self, key: &[u8], read_ts: Timestamp) -> Result<Lookup> {
        self.memstore.options().limits.check_key(key)?;
        self.check_key(key)?;
        // Memtables before the version: a flush installs its table before it
        // drops the memtable, so this order never misses data.
        let memtables = self.memstore.snapshot()?;
        let version = self.base.version();
        self.check_snapshot(read_ts)?;
        let mut best = Lookup::Absent;
        for memtable in &memtables {
            if best.ts().is_some_and(|found| found >= memtable.max_ts()) {
                continue;
            }
            best = best.newer(memtable.get(key, read_ts));
        }
        self.base.get(&version, key, read_ts, best).await
    }

    /// The value of `key` at `read_ts`, if live.
    pub async fn get(&self, key: &[u8], read_ts: Timestamp) -> Result<Option<Bytes>> {
        Ok(self.get_version(key, read_ts).await?.into_value())
    }

    /// Live keys and values in the request's range, in its direction.
    pub async fn scan(&self, request: &ScanRequest) -> Result<Vec<(Bytes, Bytes)>> {
        let range = request.range.intersect(&self.range);
        let memtables = self.memstore.snapshot()?;
        let version = self.base.version();
        self.check_snapshot(request.read_ts)?;
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let mut sources: Vec<Source> = memtables
            .iter()
            .map(|memtable| Source::Mem(memtable.cursor(&range, request.direction)))
            .collect();
        sources.extend(
            self.base
                .sources(&version, &range, request.direction)
                .await?,
        );
        let mut merge = MergeIterator::new(sources, request.direction).await?;
        let mut out = Vec::new();
        while request.limit == 0 || out.len() < request.limit {
            match merge.next_visible(request.read_ts).await? {
                Some(pair) => out.push(pair),
                None => break,
            }
        }
        Ok(out)
    }
}

fn poisoned() -> StorageError {
    StorageError::Job {
        job: "tablet",
        detail: "a thread panicked while holding the tablet's role lock".into(),
    }
}
