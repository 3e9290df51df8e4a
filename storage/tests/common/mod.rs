//! Helpers shared by the storage integration tests: stores, a journal that
//! replays into a reopened tablet, expected state, and object counting.
//!
//! Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use luna_kernel::objstore::{LunaObjectStore, ObjectStoreOptions, RetryPolicy, open_object_store};
use luna_storage::manifest::Version;
use luna_storage::{
    BaseStore, BaseStoreOptions, Direction, KeyRange, Limits, MemStoreOptions, MemoryBudget,
    ScanRequest, Tablet, TabletId, Timestamp, WriteBatch,
};
use object_store::ObjectStore;
use object_store::path::Path;

/// Where every test's BaseStore lives inside its object store.
pub const ROOT: &str = "coll";

/// Few attempts and tiny waits: failures surface fast and retries stay cheap.
pub fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
    }
}

/// A fresh in-memory store behind the kernel wrapper (retries, metrics, faults).
pub fn memory_store() -> Arc<LunaObjectStore> {
    let options = ObjectStoreOptions {
        retry: fast_retries(),
        ..ObjectStoreOptions::default()
    };
    open_object_store("memory://", &options).expect("memory:// always opens")
}

/// Deterministic options: no background jobs, no GC grace, small L0 trigger.
pub fn base_options() -> BaseStoreOptions {
    BaseStoreOptions {
        background_jobs: false,
        gc_grace: Duration::ZERO,
        l0_compaction_trigger: 2,
        ..BaseStoreOptions::default()
    }
}

pub async fn open_base(store: Arc<dyn ObjectStore>, options: BaseStoreOptions) -> Arc<BaseStore> {
    BaseStore::open(store, Path::from(ROOT), options)
        .await
        .expect("open base store")
}

/// Memtables large enough never to rotate on their own: flushes happen only
/// when a test asks, so the background flusher stays idle.
pub fn memstore_options() -> MemStoreOptions {
    MemStoreOptions {
        memtable_size: 1 << 30,
        limits: Limits::default(),
    }
}

pub async fn open_tablet(
    base: &Arc<BaseStore>,
    id: TabletId,
    epoch: u64,
    range: KeyRange,
) -> Arc<Tablet> {
    Tablet::open(
        Arc::clone(base),
        id,
        epoch,
        range,
        memstore_options(),
        Arc::new(MemoryBudget::new(usize::MAX)),
    )
    .await
    .expect("open tablet")
}

/// The usual start of a test: a BaseStore on `store` with tablet 1 at epoch 1
/// over every key, and an empty journal for it.
pub async fn single_tablet(store: &Arc<LunaObjectStore>) -> (Arc<BaseStore>, Arc<Tablet>, Journal) {
    let base = open_base(store.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 1, KeyRange::all()).await;
    (base, tablet, Journal::default())
}

pub fn key(i: usize) -> Bytes {
    Bytes::from(format!("key{i:05}"))
}

pub fn value(i: usize, generation: u64) -> Bytes {
    Bytes::from(format!("value-{i}-gen{generation}-{}", "x".repeat(i % 13)))
}

/// A tablet's journal as the tests keep it: what a tablet server would replay.
/// It also tracks the expected newest value of every key.
#[derive(Default)]
pub struct Journal {
    pub entries: Vec<(u64, Timestamp, WriteBatch)>,
    /// key -> ts -> value (None = deleted).
    pub model: BTreeMap<Bytes, BTreeMap<Timestamp, Option<Bytes>>>,
    pub ts: Timestamp,
}

impl Journal {
    pub fn next_seq(&self) -> u64 {
        self.entries.len() as u64 + 1
    }

    /// Writes `batch` at the next timestamp and journal index, recording it.
    pub async fn write(&mut self, tablet: &Tablet, batch: WriteBatch) {
        self.ts += 1;
        let seq = self.next_seq();
        tablet.write(seq, self.ts, &batch).await.expect("write");
        self.record(seq, batch);
    }

    /// Records a batch as journaled at the next index and current timestamp
    /// without applying it (for writes a test applies itself).
    pub fn record(&mut self, seq: u64, batch: WriteBatch) {
        for mutation in batch.mutations() {
            let (key, value) = match mutation {
                luna_storage::Mutation::Put { key, value } => (key.clone(), Some(value.clone())),
                luna_storage::Mutation::Delete { key } => (key.clone(), None),
            };
            self.model.entry(key).or_default().insert(self.ts, value);
        }
        self.entries.push((seq, self.ts, batch));
    }

    pub async fn put(&mut self, tablet: &Tablet, key: Bytes, value: Bytes) {
        let mut batch = WriteBatch::new();
        batch.put(key, value);
        self.write(tablet, batch).await;
    }

    pub async fn delete(&mut self, tablet: &Tablet, key: Bytes) {
        let mut batch = WriteBatch::new();
        batch.delete(key);
        self.write(tablet, batch).await;
    }

    /// Puts keys `range` with `generation`, `per_batch` keys per journal entry.
    pub async fn put_range(
        &mut self,
        tablet: &Tablet,
        range: std::ops::Range<usize>,
        generation: u64,
        per_batch: usize,
    ) {
        let keys: Vec<usize> = range.collect();
        for chunk in keys.chunks(per_batch.max(1)) {
            let mut batch = WriteBatch::new();
            for &i in chunk {
                batch.put(key(i), value(i, generation));
            }
            self.write(tablet, batch).await;
        }
    }

    /// Replays every entry after the tablet's recovered marker, as recovery does.
    pub async fn replay(&self, tablet: &Tablet) -> usize {
        let mut replayed = 0;
        for (seq, ts, batch) in self
            .entries
            .iter()
            .filter(|(seq, _, _)| *seq > tablet.recovered_up_to())
        {
            tablet.write(*seq, *ts, batch).await.expect("replay");
            replayed += 1;
        }
        replayed
    }

    /// The expected value of `key` at `ts`.
    pub fn expected(&self, key: &[u8], ts: Timestamp) -> Option<Bytes> {
        self.model.get(key)?.range(..=ts).next_back()?.1.clone()
    }

    /// Every key the journal touched.
    pub fn keys(&self) -> Vec<Bytes> {
        self.model.keys().cloned().collect()
    }

    /// Checks point reads of every key and a full scan, at the newest timestamp.
    pub async fn verify(&self, tablet: &Tablet, context: &str) {
        self.verify_at(tablet, self.ts, context).await;
    }

    pub async fn verify_at(&self, tablet: &Tablet, ts: Timestamp, context: &str) {
        for key in self.model.keys().filter(|k| tablet.range().contains(k)) {
            let got = tablet
                .get(key, ts)
                .await
                .unwrap_or_else(|e| panic!("{context}: get {key:?}: {e}"));
            assert_eq!(
                got,
                self.expected(key, ts),
                "{context}: key {key:?} at ts {ts}"
            );
        }
        let request = ScanRequest {
            range: KeyRange::all(),
            read_ts: ts,
            limit: 0,
            direction: Direction::Forward,
        };
        let scanned = tablet
            .scan(&request)
            .await
            .unwrap_or_else(|e| panic!("{context}: scan: {e}"));
        let want: Vec<(Bytes, Bytes)> = self
            .model
            .keys()
            .filter(|k| tablet.range().contains(k))
            .filter_map(|k| self.expected(k, ts).map(|v| (k.clone(), v)))
            .collect();
        assert_eq!(
            scanned.len(),
            want.len(),
            "{context}: scan length at ts {ts}"
        );
        assert_eq!(scanned, want, "{context}: scan at ts {ts}");
    }
}

/// Simulates a crash: drops the tablet without flushing and waits until any
/// in-flight background flush attempt has let go of it.
pub async fn crash(tablet: Arc<Tablet>) {
    let weak: Weak<Tablet> = Arc::downgrade(&tablet);
    drop(tablet);
    while weak.strong_count() > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Every object below `prefix` (relative to the store's root).
pub async fn list(store: &dyn ObjectStore, prefix: &str) -> Vec<Path> {
    let prefix = Path::from(prefix);
    let mut paths: Vec<Path> = store
        .list(Some(&prefix))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await
        .expect("list");
    paths.sort();
    paths
}

/// Table objects in the store, as names relative to the BaseStore root ("tables/x.parquet").
pub async fn table_objects(store: &dyn ObjectStore) -> Vec<String> {
    let root = format!("{ROOT}/");
    list(store, &format!("{ROOT}/tables"))
        .await
        .into_iter()
        .map(|p| {
            p.as_ref()
                .strip_prefix(&root)
                .expect("under the root")
                .to_string()
        })
        .collect()
}

/// Names of the live tables of a version, sorted.
pub fn live_tables(version: &Version) -> Vec<String> {
    let mut names: Vec<String> = version.tables().map(|t| t.name.clone()).collect();
    names.sort();
    names
}

/// Versions held by all tables of a version.
pub fn total_rows(version: &Version) -> u64 {
    version.tables().map(|t| t.rows).sum()
}

/// A base-store error text, for assertion messages.
pub fn describe<T>(result: &luna_storage::Result<T>) -> String {
    match result {
        Ok(_) => "Ok".to_string(),
        Err(e) => format!("{e:?}"),
    }
}
