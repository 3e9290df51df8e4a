//! The MemStore of one tablet: an active memtable and the immutable ones
//! waiting to be flushed.

mod budget;
mod memtable;

use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

pub use budget::MemoryBudget;
pub(crate) use memtable::MemCursor;
pub use memtable::Memtable;

use crate::error::{Result, StorageError};
use crate::types::{Kind, Limits, Mutation, Timestamp, WriteBatch};

/// How big memtables grow and how much memory a MemStore may hold.
#[derive(Debug, Clone, Copy)]
pub struct MemStoreOptions {
    /// The active memtable turns immutable once it holds this many bytes.
    pub memtable_size: usize,
    /// Input limits checked on every write.
    pub limits: Limits,
}

impl Default for MemStoreOptions {
    fn default() -> Self {
        MemStoreOptions {
            memtable_size: 32 * 1024 * 1024,
            limits: Limits::default(),
        }
    }
}

struct Memtables {
    active: Arc<Memtable>,
    /// The highest journal index already handed to a flush: an empty active
    /// memtable is only worth rotating when it moves the marker past this.
    rotated_seq: u64,
    /// Oldest first: they must reach the BaseStore in this order, so that each
    /// flush's "flushed up to" marker only moves forward.
    immutable: Vec<Arc<Memtable>>,
}

/// The in-memory part of a tablet.
pub struct MemStore {
    tables: RwLock<Memtables>,
    /// Serialises writers: journal entries arrive in order from one apply
    /// loop, and rotation must not split a journal entry across memtables.
    writer: Mutex<u64>,
    budget: Arc<MemoryBudget>,
    options: MemStoreOptions,
    became_immutable: Notify,
}

impl MemStore {
    /// An empty MemStore charging its memory to `budget`.
    pub fn new(options: MemStoreOptions, budget: Arc<MemoryBudget>) -> MemStore {
        MemStore {
            tables: RwLock::new(Memtables {
                active: Arc::new(Memtable::new(Arc::clone(&budget))),
                rotated_seq: 0,
                immutable: Vec::new(),
            }),
            writer: Mutex::new(0),
            budget,
            options,
            became_immutable: Notify::new(),
        }
    }

    /// The options it was built with.
    pub fn options(&self) -> &MemStoreOptions {
        &self.options
    }

    /// Applies `batch` at commit timestamp `ts` as journal entry `seq`.
    ///
    /// Stalls while the memory budget is exhausted. `seq` must not go
    /// backwards: it becomes the "flushed up to" marker recovery replays from.
    pub async fn write(&self, seq: u64, ts: Timestamp, batch: &WriteBatch) -> Result<()> {
        self.options.limits.check_batch(batch)?;
        self.budget.wait_for_room().await;
        self.insert_batch(seq, ts, batch)
    }

    /// Like [`MemStore::write`], but never stalls on the budget (it is still charged).
    ///
    /// For replicas that cannot flush: their memory is freed only when the owner's flush
    /// markers are applied, and those arrive through the same apply loop a stall would
    /// block. The owner throttles the group instead.
    pub fn write_unthrottled(&self, seq: u64, ts: Timestamp, batch: &WriteBatch) -> Result<()> {
        self.options.limits.check_batch(batch)?;
        self.insert_batch(seq, ts, batch)
    }

    fn insert_batch(&self, seq: u64, ts: Timestamp, batch: &WriteBatch) -> Result<()> {
        let mut last_seq = self.writer.lock().map_err(|_| poisoned())?;
        if seq < *last_seq {
            return Err(StorageError::invalid(format!(
                "journal index {seq} is older than the last applied {}",
                *last_seq
            )));
        }
        *last_seq = seq;
        let mut active = self.tables.read().map_err(|_| poisoned())?.active.clone();
        // A full memtable turns immutable only when a new journal index begins. One
        // entry may carry several batches for this tablet (a group commits many writes
        // per entry), and a flush marks its memtable's highest index flushed: had the
        // entry's later batches gone to the next memtable, a replica recovering from
        // that marker would skip them.
        if active.approximate_bytes() >= self.options.memtable_size && seq > active.max_seq() {
            self.rotate_locked()?;
            active = self.tables.read().map_err(|_| poisoned())?.active.clone();
        }
        for mutation in batch.mutations() {
            match mutation {
                Mutation::Put { key, value } => active.insert(key, ts, Kind::Put, value, seq),
                Mutation::Delete { key } => active.insert(key, ts, Kind::Delete, &[], seq),
            }
        }
        active.note_seq(seq);
        Ok(())
    }

    /// Turns the active memtable immutable so it can be flushed, if it holds
    /// anything or advances the flush marker. Returns whether it rotated.
    pub fn rotate(&self) -> Result<bool> {
        let _writer = self.writer.lock().map_err(|_| poisoned())?;
        self.rotate_locked()
    }

    fn rotate_locked(&self) -> Result<bool> {
        let mut tables = self.tables.write().map_err(|_| poisoned())?;
        let max_seq = tables.active.max_seq();
        if tables.active.is_empty() && max_seq <= tables.rotated_seq {
            return Ok(false);
        }
        tables.rotated_seq = max_seq;
        let fresh = Arc::new(Memtable::new(Arc::clone(&self.budget)));
        fresh.note_seq(max_seq);
        let full = std::mem::replace(&mut tables.active, fresh);
        tables.immutable.push(full);
        drop(tables);
        self.became_immutable.notify_one();
        Ok(true)
    }

    /// Every memtable, newest first: what a read must merge.
    pub fn snapshot(&self) -> Result<Vec<Arc<Memtable>>> {
        let tables = self.tables.read().map_err(|_| poisoned())?;
        let mut all = Vec::with_capacity(tables.immutable.len() + 1);
        all.push(Arc::clone(&tables.active));
        all.extend(tables.immutable.iter().rev().cloned());
        Ok(all)
    }

    /// The oldest immutable memtable: the next one to flush.
    pub fn oldest_immutable(&self) -> Result<Option<Arc<Memtable>>> {
        Ok(self
            .tables
            .read()
            .map_err(|_| poisoned())?
            .immutable
            .first()
            .cloned())
    }

    /// Drops a memtable once its table is in the BaseStore's live version.
    /// The order matters to readers: install the version first, then call this.
    pub fn remove_flushed(&self, flushed: &Arc<Memtable>) -> Result<()> {
        let mut tables = self.tables.write().map_err(|_| poisoned())?;
        tables
            .immutable
            .retain(|table| !Arc::ptr_eq(table, flushed));
        Ok(())
    }

    /// Drops every memtable whose writes all have journal index <= `up_to`:
    /// a replica's answer to the owner's "flushed up to" marker. With
    /// `rotate`, a non-empty active memtable turns immutable first, so it is
    /// dropped now if it qualifies, or by a later marker otherwise (the
    /// active one could never be dropped while it keeps taking writes).
    /// A memtable holding anything above `up_to` stays. The caller must have
    /// installed a BaseStore version holding the flush before calling this.
    /// Returns how many memtables were dropped.
    pub fn drop_flushed(&self, up_to: u64, rotate: bool) -> Result<usize> {
        let _writer = self.writer.lock().map_err(|_| poisoned())?;
        let active_has_writes = !self
            .tables
            .read()
            .map_err(|_| poisoned())?
            .active
            .is_empty();
        if rotate && active_has_writes {
            self.rotate_locked()?;
        }
        let dropped = {
            let mut tables = self.tables.write().map_err(|_| poisoned())?;
            let before = tables.immutable.len();
            // max_seq bounds every write's index from above, so this is exact
            // for "all writes <= up_to" and conservative otherwise.
            tables.immutable.retain(|table| table.max_seq() > up_to);
            before - tables.immutable.len()
        };
        Ok(dropped)
    }

    /// Waits until a memtable turns immutable.
    pub async fn immutable_ready(&self) {
        self.became_immutable.notified().await;
    }

    /// Number of memtables waiting for a flush.
    pub fn immutable_count(&self) -> usize {
        self.tables.read().map(|t| t.immutable.len()).unwrap_or(0)
    }

    /// The memory budget writes are charged to.
    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }
}

fn poisoned() -> StorageError {
    StorageError::Job {
        job: "memstore",
        detail: "a writer panicked while holding the memstore lock".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Lookup;

    fn store(memtable_size: usize) -> MemStore {
        MemStore::new(
            MemStoreOptions {
                memtable_size,
                limits: Limits::default(),
            },
            Arc::new(MemoryBudget::new(usize::MAX)),
        )
    }

    #[tokio::test]
    async fn rotates_at_the_size_threshold() {
        let memstore = store(1024);
        let mut seq = 0;
        while memstore.immutable_count() == 0 {
            seq += 1;
            let mut batch = WriteBatch::new();
            batch.put(format!("key{seq:04}"), vec![7u8; 100]);
            memstore.write(seq, seq, &batch).await.unwrap();
            assert!(seq < 100, "memtable never rotated");
        }
        // It turned immutable when the entry after the one that filled it arrived.
        let oldest = memstore.oldest_immutable().unwrap().unwrap();
        assert!(oldest.approximate_bytes() >= 1024);
        assert_eq!(oldest.max_seq(), seq - 1);
        // A full memtable still takes more of its last entry's batches.
        let mut batch = WriteBatch::new();
        batch.put("more", vec![7u8; 2048]);
        memstore.write(seq, seq, &batch).await.unwrap();
        memstore.write(seq, seq, &batch).await.unwrap();
        assert_eq!(memstore.immutable_count(), 1);
        // Reads still see rotated data until it is removed after a flush.
        let hit = memstore
            .snapshot()
            .unwrap()
            .iter()
            .map(|t| t.get(b"key0001", 100))
            .find(|l| *l != Lookup::Absent);
        assert!(hit.is_some());
    }

    #[tokio::test]
    async fn drop_flushed_keeps_memtables_with_newer_writes_and_frees_memory() {
        let budget = Arc::new(MemoryBudget::new(usize::MAX));
        let memstore = MemStore::new(MemStoreOptions::default(), Arc::clone(&budget));
        let put = |key: &str| {
            let mut batch = WriteBatch::new();
            batch.put(key.to_string(), b"value".to_vec());
            batch
        };
        for seq in 1..=3 {
            memstore.write(seq, seq, &put("a")).await.unwrap();
        }
        memstore.rotate().unwrap();
        for seq in 4..=6 {
            memstore.write(seq, seq, &put("b")).await.unwrap();
        }
        // A marker inside the first memtable drops nothing, but rotates the
        // active one so that a later marker can drop it.
        assert_eq!(memstore.drop_flushed(2, true).unwrap(), 0);
        assert_eq!(memstore.immutable_count(), 2);
        assert_eq!(memstore.drop_flushed(3, true).unwrap(), 1);
        assert_eq!(memstore.immutable_count(), 1);
        // An empty active memtable is not rotated.
        assert_eq!(memstore.drop_flushed(6, true).unwrap(), 1);
        assert_eq!(memstore.immutable_count(), 0);
        assert_eq!(budget.used(), 0, "dropped memtables return their memory");
        let reads = memstore.snapshot().unwrap();
        assert_eq!(reads.len(), 1);
        assert!(reads[0].is_empty());
    }

    #[tokio::test]
    async fn rejects_bad_input_and_backwards_journal_index() {
        let memstore = store(1 << 20);
        let mut empty_key = WriteBatch::new();
        empty_key.put(&b""[..], &b"v"[..]);
        assert!(matches!(
            memstore.write(1, 1, &empty_key).await,
            Err(StorageError::InvalidArgument { .. })
        ));
        let mut ok = WriteBatch::new();
        ok.put(&b"k"[..], &b"v"[..]);
        memstore.write(5, 1, &ok).await.unwrap();
        assert!(matches!(
            memstore.write(4, 2, &ok).await,
            Err(StorageError::InvalidArgument { .. })
        ));
    }

    #[tokio::test]
    async fn writes_stall_on_an_exhausted_budget() {
        let budget = Arc::new(MemoryBudget::new(1000));
        let memstore = Arc::new(MemStore::new(
            MemStoreOptions {
                memtable_size: 1 << 20,
                limits: Limits::default(),
            },
            Arc::clone(&budget),
        ));
        let mut big = WriteBatch::new();
        big.put(&b"k"[..], vec![0u8; 2000]);
        memstore.write(1, 1, &big).await.unwrap();
        let stalled = tokio::spawn({
            let memstore = Arc::clone(&memstore);
            async move {
                let mut small = WriteBatch::new();
                small.put(&b"j"[..], &b"v"[..]);
                memstore.write(2, 2, &small).await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!stalled.is_finished(), "write must stall while over budget");
        memstore.rotate().unwrap();
        let flushed = memstore.oldest_immutable().unwrap().unwrap();
        memstore.remove_flushed(&flushed).unwrap();
        drop(flushed);
        tokio::time::timeout(std::time::Duration::from_secs(5), stalled)
            .await
            .expect("write resumes after the flush frees memory")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn unthrottled_writes_pass_an_exhausted_budget_and_are_charged() {
        let budget = Arc::new(MemoryBudget::new(1000));
        let memstore = MemStore::new(MemStoreOptions::default(), Arc::clone(&budget));
        let mut big = WriteBatch::new();
        big.put(&b"k"[..], vec![0u8; 2000]);
        memstore.write_unthrottled(1, 1, &big).unwrap();
        assert!(budget.is_exhausted());
        let used = budget.used();
        let mut small = WriteBatch::new();
        small.put(&b"j"[..], &b"v"[..]);
        memstore.write_unthrottled(2, 2, &small).unwrap();
        assert!(
            budget.used() > used,
            "the replica's memory is still charged"
        );
        assert_eq!(
            memstore.snapshot().unwrap()[0]
                .get(b"j", 5)
                .into_value()
                .as_deref(),
            Some(&b"v"[..])
        );
    }
}
