//! A tablet's storage: its MemStore in front of its collection's BaseStore,
//! bounded to the tablet's key range. This is the embedded API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::base::BaseStore;
use crate::error::{Result, StorageError};
use crate::memstore::{MemStore, MemStoreOptions, MemoryBudget};
use crate::merge::{MergeIterator, Source};
use crate::types::{Direction, KeyRange, Lookup, TabletId, Timestamp, WriteBatch};

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

/// One tablet's storage, owned at one epoch.
pub struct Tablet {
    id: TabletId,
    epoch: u64,
    range: KeyRange,
    recovered_up_to: u64,
    base: Arc<BaseStore>,
    memstore: Arc<MemStore>,
    /// One flush at a time, oldest memtable first.
    flush_lock: tokio::sync::Mutex<()>,
    /// The epoch of the owner that fenced this one out; 0 while it is not fenced.
    fenced_by: AtomicU64,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl Tablet {
    /// Claims tablet `id` at `epoch` in `base` (fencing older owners) and
    /// returns it with an empty MemStore. Replay the journal from
    /// [`Tablet::recovered_up_to`] + 1 before serving.
    pub async fn open(
        base: Arc<BaseStore>,
        id: TabletId,
        epoch: u64,
        range: KeyRange,
        options: MemStoreOptions,
        budget: Arc<MemoryBudget>,
    ) -> Result<Arc<Tablet>> {
        let claimed = base.claim_tablet(id, epoch, range.clone()).await?;
        let tablet = Arc::new(Tablet {
            id,
            epoch,
            range,
            recovered_up_to: claimed.flushed_up_to,
            base,
            memstore: Arc::new(MemStore::new(options, budget)),
            flush_lock: tokio::sync::Mutex::new(()),
            fenced_by: AtomicU64::new(0),
            flusher: Mutex::new(None),
        });
        let flusher = tokio::spawn(background_flusher(
            Arc::downgrade(&tablet),
            Arc::clone(&tablet.memstore),
        ));
        if let Ok(mut slot) = tablet.flusher.lock() {
            *slot = Some(flusher);
        }
        Ok(tablet)
    }

    /// The tablet's id.
    pub fn id(&self) -> TabletId {
        self.id
    }

    /// The epoch this handle owns.
    pub fn epoch(&self) -> u64 {
        self.epoch
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

    fn check_open(&self) -> Result<()> {
        match self.fenced_by.load(Ordering::Acquire) {
            0 => Ok(()),
            current_epoch => Err(StorageError::Fenced {
                tablet_id: self.id,
                epoch: self.epoch,
                current_epoch,
            }),
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

    /// Applies `batch` at `ts` as journal entry `seq` (non-decreasing).
    /// Stalls while the memory budget is exhausted.
    pub async fn write(&self, seq: u64, ts: Timestamp, batch: &WriteBatch) -> Result<()> {
        self.check_open()?;
        for mutation in batch.mutations() {
            self.check_key(mutation.key())?;
        }
        self.memstore.write(seq, ts, batch).await
    }

    /// The newest version of `key` visible at `read_ts`.
    pub async fn get_version(&self, key: &[u8], read_ts: Timestamp) -> Result<Lookup> {
        self.memstore.options().limits.check_key(key)?;
        self.check_key(key)?;
        self.check_snapshot(read_ts)?;
        // Memtables before the version: a flush installs its table before it
        // drops the memtable, so this order never misses data.
        let memtables = self.memstore.snapshot()?;
        let version = self.base.version();
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
        self.check_snapshot(request.read_ts)?;
        let range = request.range.intersect(&self.range);
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let memtables = self.memstore.snapshot()?;
        let version = self.base.version();
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

    /// Makes everything written so far durable in the BaseStore.
    pub async fn flush(&self) -> Result<()> {
        self.memstore.rotate()?;
        self.flush_immutables().await
    }

    async fn flush_immutables(&self) -> Result<()> {
        let _one_at_a_time = self.flush_lock.lock().await;
        while let Some(memtable) = self.memstore.oldest_immutable()? {
            self.check_open()?;
            match self.base.flush(self.id, self.epoch, &memtable).await {
                Ok(_) => self.memstore.remove_flushed(&memtable)?,
                Err(error @ StorageError::Fenced { current_epoch, .. }) => {
                    self.fenced_by
                        .store(current_epoch.max(self.epoch + 1), Ordering::Release);
                    return Err(error);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Flushes everything and stops the background flusher.
    pub async fn close(&self) -> Result<()> {
        let result = self.flush().await;
        if let Some(flusher) = self.flusher.lock().ok().and_then(|mut slot| slot.take()) {
            flusher.abort();
        }
        result
    }
}

impl Drop for Tablet {
    fn drop(&mut self) {
        if let Some(flusher) = self.flusher.get_mut().ok().and_then(Option::take) {
            flusher.abort();
        }
    }
}

/// Flushes memtables as they turn immutable. A failed flush keeps its
/// memtable (nothing is lost) and is retried with backoff; writers stall on
/// the memory budget meanwhile.
async fn background_flusher(tablet: std::sync::Weak<Tablet>, memstore: Arc<MemStore>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        memstore.immutable_ready().await;
        loop {
            let Some(tablet) = tablet.upgrade() else {
                return;
            };
            match tablet.flush_immutables().await {
                Ok(()) => {
                    backoff = Duration::from_millis(50);
                    break;
                }
                Err(error @ (StorageError::Fenced { .. } | StorageError::Closed { .. })) => {
                    tracing::warn!(tablet = tablet.id, %error, "flusher stopping");
                    return;
                }
                Err(error) => {
                    tracing::warn!(tablet = tablet.id, %error, "flush failed; will retry");
                    drop(tablet);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}
