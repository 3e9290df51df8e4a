//! Two BaseStore handles on one object-store root, as two tablet servers
//! hosting tablets of one collection: both compact and collect garbage at
//! the same time.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{describe, memory_store, open_base};
use futures::TryStreamExt;
use luna_kernel::objstore::{FaultAction, OpKind};
use luna_storage::{
    BaseStore, BaseStoreOptions, KeyRange, Limits, Lookup, MemStoreOptions, MemoryBudget,
    StorageError, Tablet, WriteBatch,
};
use object_store::ObjectStore;
use object_store::path::Path;

fn options(gc_grace: Duration) -> BaseStoreOptions {
    BaseStoreOptions {
        background_jobs: false,
        gc_grace,
        l0_compaction_trigger: 2,
        // Small levels, so deeper compactions run too.
        level1_bytes: 8 * 1024,
        level_multiplier: 2,
        table_target_bytes: 4 * 1024,
        ..BaseStoreOptions::default()
    }
}

fn memstore_options() -> MemStoreOptions {
    MemStoreOptions {
        memtable_size: 1 << 30,
        limits: Limits::default(),
    }
}

async fn tablet(base: &Arc<BaseStore>, epoch: Option<u64>) -> Arc<Tablet> {
    let budget = Arc::new(MemoryBudget::new(usize::MAX));
    let range = KeyRange::all();
    let opened = match epoch {
        Some(epoch) => {
            Tablet::open(
                Arc::clone(base),
                1,
                epoch,
                range,
                memstore_options(),
                budget,
            )
            .await
        }
        None => Tablet::open_replica(Arc::clone(base), 1, range, memstore_options(), budget).await,
    };
    opened.expect("open tablet")
}

fn generation(keys: std::ops::Range<usize>, generation: usize) -> WriteBatch {
    let mut batch = WriteBatch::new();
    for i in keys {
        batch.put(
            format!("key{i:04}"),
            format!("gen{generation}-{}", "v".repeat(i % 50)),
        );
    }
    batch
}

async fn table_objects(store: &dyn ObjectStore) -> HashSet<String> {
    store
        .list(Some(&Path::from("coll/tables")))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .expect("list tables")
}

/// Garbage collection must not delete a table as soon as it is old: another
/// process may still read it from a version it loaded before the compaction
/// that dropped it. The grace period runs from when it became unreferenced.
#[tokio::test]
async fn gc_grace_runs_from_when_a_table_became_unreferenced() {
    let grace = Duration::from_millis(300);
    let store = memory_store();
    let base_a = open_base(store.clone(), options(grace)).await;
    let owner = tablet(&base_a, Some(1)).await;
    owner
        .write(1, 1, &generation(0..20, 1))
        .await
        .expect("write");
    owner.flush().await.expect("flush");
    owner
        .write(2, 2, &generation(10..30, 2))
        .await
        .expect("write");
    owner.flush().await.expect("flush");
    // The second process loads the version with both L0 tables.
    let base_b = open_base(store.clone(), options(grace)).await;
    let stale = base_b.version();
    assert_eq!(stale.level(0).len(), 2);
    tokio::time::sleep(grace + Duration::from_millis(100)).await;

    assert!(base_a.compact_once().await.expect("compact").is_some());
    let report = base_a.collect_garbage().await.expect("gc");
    assert_eq!(report.tables_deleted, 0, "unreferenced only just now");
    // The other process still reads through its old version.
    for i in [0usize, 15, 29] {
        let key = format!("key{i:04}");
        let found = base_b.get(&stale, key.as_bytes(), 10, Lookup::Absent).await;
        assert!(
            matches!(found, Ok(Lookup::Value { .. })),
            "{key}: {}",
            describe(&found)
        );
    }

    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    let report = base_a.collect_garbage().await.expect("gc");
    assert_eq!(report.tables_deleted, 2, "collected once the grace passed");
    drop(stale);
    base_b.refresh().await.expect("refresh");
    let found = base_b
        .get(&base_b.version(), b"key0015", 10, Lookup::Absent)
        .await;
    assert!(
        matches!(found, Ok(Lookup::Value { .. })),
        "{}",
        describe(&found)
    );
}

/// One handle owns the tablet and flushes; the other follows as a replica.
/// Both compact and collect garbage concurrently each round. Nothing is lost,
/// no referenced table is deleted, and a conflicting compaction is refused
/// with a retryable error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_base_stores_compact_and_collect_at_the_same_time() {
    let grace = Duration::from_millis(100);
    let store = memory_store();
    let base_a = open_base(store.clone(), options(grace)).await;
    let base_b = open_base(store.clone(), options(grace)).await;
    let owner = tablet(&base_a, Some(1)).await;
    let follower = tablet(&base_b, None).await;
    let mut compactions = 0;
    let mut refused = 0;
    let mut deleted = 0;
    let keys = 200;
    for round in 1..=30usize {
        let seq = round as u64;
        let start = (round * 37) % keys;
        let batch = generation(start..(start + 60).min(keys), round);
        owner.write(seq, seq, &batch).await.expect("owner write");
        follower
            .write(seq, seq, &batch)
            .await
            .expect("replica write");
        owner.flush().await.expect("flush");
        follower.apply_flushed(seq).await.expect("marker");

        let jobs = [&base_a, &base_b, &base_a, &base_b]
            .into_iter()
            .enumerate()
            .map(|(job, base)| {
                let base = Arc::clone(base);
                tokio::spawn(async move {
                    if job < 2 {
                        base.compact_once().await.map(|ran| (ran.is_some(), 0))
                    } else {
                        base.collect_garbage()
                            .await
                            .map(|report| (false, report.tables_deleted))
                    }
                })
            })
            .collect::<Vec<_>>();
        for job in jobs {
            match job.await.expect("job task") {
                Ok((ran, tables_deleted)) => {
                    compactions += usize::from(ran);
                    deleted += tables_deleted;
                }
                Err(error @ StorageError::Job { .. }) => {
                    assert!(error.is_retryable());
                    refused += 1;
                }
                Err(error) => panic!("round {round}: {error}"),
            }
        }
        if round % 5 == 0 {
            tokio::time::sleep(grace + Duration::from_millis(20)).await;
        }
        // Every key's newest value, through both handles.
        for i in 0..keys {
            let key = format!("key{i:04}");
            let a = owner.get(key.as_bytes(), seq).await.expect("owner get");
            let b = follower
                .get(key.as_bytes(), seq)
                .await
                .expect("replica get");
            assert_eq!(a, b, "round {round}: {key}");
        }
    }
    // Every referenced table exists; after the grace, every other one is gone.
    tokio::time::sleep(grace + Duration::from_millis(20)).await;
    for base in [&base_a, &base_b, &base_a, &base_b] {
        base.collect_garbage().await.expect("gc");
    }
    tokio::time::sleep(grace + Duration::from_millis(20)).await;
    for base in [&base_a, &base_b] {
        deleted += base.collect_garbage().await.expect("gc").tables_deleted;
    }
    let live: HashSet<String> = base_a
        .refresh()
        .await
        .expect("refresh")
        .tables()
        .map(|t| format!("coll/{}", t.name))
        .collect();
    let live_b: HashSet<String> = base_b
        .refresh()
        .await
        .expect("refresh")
        .tables()
        .map(|t| format!("coll/{}", t.name))
        .collect();
    assert_eq!(live, live_b, "both handles agree on the live set");
    assert_eq!(table_objects(store.as_ref()).await, live);
    assert!(
        compactions > 0 && deleted > 0,
        "{compactions} compactions, {deleted} deleted"
    );
    eprintln!("{compactions} compactions, {refused} refused, {deleted} tables deleted");
    // The newest generation of every key survived everything.
    for i in 0..keys {
        let key = format!("key{i:04}");
        let newest = (1..=30usize)
            .rev()
            .find(|round| {
                let start = (round * 37) % keys;
                (start..(start + 60).min(keys)).contains(&i)
            })
            .map(|round| format!("gen{round}-{}", "v".repeat(i % 50)));
        let got = follower.get(key.as_bytes(), 30).await.expect("get");
        assert_eq!(
            got.map(|v| String::from_utf8_lossy(&v).into_owned()),
            newest,
            "{key}"
        );
    }
}

/// An upload slower than half the grace period is not committed: another
/// process's GC may already count it as an orphan. The flush fails with a
/// retryable error, keeps its memtable, and a later flush succeeds.
#[tokio::test]
async fn uploads_older_than_half_the_grace_are_not_committed() {
    let grace = Duration::from_millis(200);
    let store = memory_store();
    let base = open_base(store.clone(), options(grace)).await;
    let owner = tablet(&base, Some(1)).await;
    owner
        .write(1, 1, &generation(0..10, 1))
        .await
        .expect("write");
    store
        .faults()
        .inject_next(OpKind::Put, 1, FaultAction::Delay(grace / 2 + grace / 4));
    let slow = owner.flush().await;
    assert!(
        matches!(&slow, Err(error @ StorageError::Job { .. }) if error.is_retryable()),
        "{}",
        describe(&slow)
    );
    assert_eq!(base.version().tables().count(), 0, "nothing committed");
    owner.flush().await.expect("a prompt flush commits");
    assert_eq!(base.version().tables().count(), 1);
    assert_eq!(owner.flushed_up_to(), 1);
    let got = owner.get(b"key0003", 1).await.expect("get");
    assert!(got.is_some());
}
