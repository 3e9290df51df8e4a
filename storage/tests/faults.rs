//! Object-store faults injected through the kernel's `LunaObjectStore`: the
//! engine must report them as typed errors and never lose acknowledged data.
//!
//! Faults that must hit one particular request (the manifest edit of a flush,
//! the second read of a table) are armed by [`Trigger`], a thin store in front
//! of the wrapper that calls the wrapper's fault injector when that request
//! arrives.

mod common;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures::stream::BoxStream;
use luna_kernel::objstore::{FaultAction, FaultInjector, FaultRule, LunaObjectStore, OpKind};
use luna_storage::{Direction, KeyRange, ScanRequest, StorageError, WriteBatch};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = object_store::Result<T>> + Send + 'a>>;
type Arming = Box<dyn FnOnce(&FaultInjector) + Send>;

struct Armed {
    kind: OpKind,
    path_contains: &'static str,
    skip: u32,
    arm: Arming,
}

/// Forwards everything to a `LunaObjectStore`; when a request of an armed
/// kind whose path contains the armed text arrives (after `skip` such
/// requests), runs the arming closure on the wrapper's fault injector first.
struct Trigger {
    inner: Arc<LunaObjectStore>,
    armed: Mutex<Vec<Armed>>,
}

impl Trigger {
    fn new(inner: Arc<LunaObjectStore>) -> Arc<Trigger> {
        Arc::new(Trigger {
            inner,
            armed: Mutex::new(Vec::new()),
        })
    }

    fn arm(
        &self,
        kind: OpKind,
        path_contains: &'static str,
        skip: u32,
        arm: impl FnOnce(&FaultInjector) + Send + 'static,
    ) {
        self.armed.lock().expect("trigger lock").push(Armed {
            kind,
            path_contains,
            skip,
            arm: Box::new(arm),
        });
    }

    fn is_armed(&self) -> bool {
        !self.armed.lock().expect("trigger lock").is_empty()
    }

    fn fire(&self, kind: OpKind, location: &Path) {
        let fired = {
            let mut armed = self.armed.lock().expect("trigger lock");
            let matching = armed
                .iter_mut()
                .position(|a| a.kind == kind && location.as_ref().contains(a.path_contains));
            match matching {
                Some(i) if armed[i].skip > 0 => {
                    armed[i].skip -= 1;
                    None
                }
                Some(i) => Some(armed.remove(i)),
                None => None,
            }
        };
        if let Some(armed) = fired {
            (armed.arm)(self.inner.faults());
        }
    }
}

impl fmt::Debug for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trigger")
            .field("inner", &self.inner)
            .finish()
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Trigger({})", self.inner)
    }
}

// The trait is declared with `async_trait`, which this crate does not depend
// on: these are the signatures that macro expands to.
impl ObjectStore for Trigger {
    fn put_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> BoxFuture<'async_trait, PutResult>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.fire(OpKind::Put, location);
            self.inner.put_opts(location, payload, opts).await
        })
    }

    fn put_multipart_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        opts: PutMultipartOptions,
    ) -> BoxFuture<'async_trait, Box<dyn MultipartUpload>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move { self.inner.put_multipart_opts(location, opts).await })
    }

    fn get_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        options: GetOptions,
    ) -> BoxFuture<'async_trait, GetResult>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let kind = if options.head {
                OpKind::Head
            } else {
                OpKind::Get
            };
            self.fire(kind, location);
            self.inner.get_opts(location, options).await
        })
    }

    fn get_ranges<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        ranges: &'life2 [std::ops::Range<u64>],
    ) -> BoxFuture<'async_trait, Vec<Bytes>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.fire(OpKind::Get, location);
            self.inner.get_ranges(location, ranges).await
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_delimiter<'life0, 'life1, 'async_trait>(
        &'life0 self,
        prefix: Option<&'life1 Path>,
    ) -> BoxFuture<'async_trait, ListResult>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move { self.inner.list_with_delimiter(prefix).await })
    }

    fn copy_opts<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        from: &'life1 Path,
        to: &'life2 Path,
        options: CopyOptions,
    ) -> BoxFuture<'async_trait, ()>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move { self.inner.copy_opts(from, to, options).await })
    }
}

fn fail_all(kind: OpKind) -> FaultRule {
    FaultRule {
        action: FaultAction::Fail,
        fraction: 1.0,
        kind: Some(kind),
    }
}

fn assert_retryable_store_error(error: &StorageError, operation: &str, context: &str) {
    assert!(
        error.is_retryable(),
        "{context}: {error:?} should be retryable"
    );
    match error {
        StorageError::ObjectStore { operation: op, .. } => {
            assert_eq!(*op, operation, "{context}: {error:?}")
        }
        other => panic!("{context}: expected an object-store {operation} error, got {other:?}"),
    }
}

/// Every PUT fails for longer than the retry budget: the flush fails with a
/// retryable error, nothing leaves memory, reads and writes go on; once the
/// store heals, the flush succeeds and a crash after it loses nothing.
#[tokio::test]
async fn failed_flush_keeps_data_in_memory_until_a_later_flush_succeeds() {
    let store = memory_store();
    let (base, tablet, mut journal) = single_tablet(&store).await;
    journal.put_range(&tablet, 0..100, 1, 10).await;
    tablet.flush().await.expect("healthy flush");
    let tables_before = live_tables(&base.version());
    let marker_before = base.version().tablet(1).expect("claimed").flushed_up_to;
    assert_eq!(marker_before, journal.entries.len() as u64);

    journal.put_range(&tablet, 50..200, 2, 10).await;
    journal.delete(&tablet, key(7)).await;
    journal.delete(&tablet, key(150)).await;

    store
        .faults()
        .add_rule(fail_all(OpKind::Put))
        .expect("valid rule");
    let puts_before = store.metrics().op(OpKind::Put);
    let error = tablet
        .flush()
        .await
        .expect_err("flush must fail while every PUT fails");
    assert_retryable_store_error(&error, "put", "failed flush");
    let puts = store.metrics().op(OpKind::Put) - puts_before;
    assert!(
        puts.errors >= 1 && puts.retries >= 2,
        "the wrapper retried before giving up: {puts:?}"
    );

    // Nothing reached the manifest, and the memtable is still there.
    assert_eq!(live_tables(&base.version()), tables_before);
    assert_eq!(
        base.version().tablet(1).expect("claimed").flushed_up_to,
        marker_before
    );
    assert!(tablet.memstore().immutable_count() >= 1);
    journal.verify(&tablet, "after the failed flush").await;
    // Writes keep being accepted.
    journal.put_range(&tablet, 200..220, 3, 5).await;
    journal
        .verify(&tablet, "after writing behind the failed flush")
        .await;

    store.faults().clear();
    tablet.flush().await.expect("flush after the store healed");
    assert_eq!(tablet.memstore().immutable_count(), 0);
    let flushed = journal.entries.len() as u64;
    assert_eq!(
        base.version().tablet(1).expect("claimed").flushed_up_to,
        flushed
    );
    journal.verify(&tablet, "after the successful flush").await;

    // An unflushed tail, then a crash: recovery replays exactly that tail.
    journal.put_range(&tablet, 300..310, 4, 5).await;
    crash(tablet).await;
    base.close();
    let base = open_base(store.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 2, KeyRange::all()).await;
    assert_eq!(tablet.recovered_up_to(), flushed);
    assert_eq!(journal.replay(&tablet).await, 2);
    journal.verify(&tablet, "after crash and replay").await;
    base.close();
}

/// The table upload lands but the manifest edit fails: the table is an
/// orphan. Nothing is lost after a crash, GC deletes the orphan, and GC
/// never deletes a live table.
#[tokio::test]
async fn orphan_table_from_a_failed_manifest_edit_is_collected() {
    let store = memory_store();
    let trigger = Trigger::new(store.clone());
    let base = open_base(trigger.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 1, KeyRange::all()).await;
    let mut journal = Journal::default();
    journal.put_range(&tablet, 0..100, 1, 10).await;
    tablet.flush().await.expect("healthy flush");
    let flushed = journal.entries.len() as u64;
    journal.put_range(&tablet, 80..160, 2, 10).await;

    // The first manifest edit PUT (after the table upload) starts a total PUT outage.
    trigger.arm(OpKind::Put, ".edit", 0, |faults| {
        faults.add_rule(fail_all(OpKind::Put)).expect("valid rule");
    });
    let error = tablet.flush().await.expect_err("the manifest edit fails");
    assert!(!trigger.is_armed(), "the edit PUT was reached");
    assert_retryable_store_error(&error, "put", "failed manifest edit");
    let live = live_tables(&base.version());
    let objects = table_objects(store.as_ref()).await;
    assert_eq!(live.len(), 1);
    let orphans: Vec<&String> = objects.iter().filter(|name| !live.contains(name)).collect();
    assert_eq!(
        orphans.len(),
        1,
        "one uploaded, unreferenced table: {objects:?} vs live {live:?}"
    );
    let orphan = orphans[0].clone();
    journal.verify(&tablet, "after the failed edit").await;

    crash(tablet).await;
    base.close();
    store.faults().clear();

    let base = open_base(store.clone(), base_options()).await;
    assert!(
        !base.version().contains_table(&orphan),
        "the orphan is not in the manifest"
    );
    let tablet = open_tablet(&base, 1, 2, KeyRange::all()).await;
    assert_eq!(
        tablet.recovered_up_to(),
        flushed,
        "the failed flush did not move the marker"
    );
    assert_eq!(journal.replay(&tablet).await, 8);
    journal.verify(&tablet, "after crash and replay").await;

    let report = base.collect_garbage().await.expect("gc");
    assert_eq!(report.tables_deleted, 1, "{report:?}");
    let objects = table_objects(store.as_ref()).await;
    assert_eq!(
        objects,
        live_tables(&base.version()),
        "only live tables remain"
    );
    assert!(!objects.contains(&orphan));

    // A second pass after another flush deletes nothing.
    tablet.flush().await.expect("flush");
    let report = base.collect_garbage().await.expect("gc");
    assert_eq!(report.tables_deleted, 0, "{report:?}");
    assert_eq!(
        table_objects(store.as_ref()).await,
        live_tables(&base.version())
    );

    // A cold reader (fresh caches) finds every live table's bytes.
    crash(tablet).await;
    base.close();
    let base = open_base(store.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 3, KeyRange::all()).await;
    assert_eq!(journal.replay(&tablet).await, 0);
    journal.verify(&tablet, "cold read after gc").await;
    base.close();
}

/// The manifest edit's conditional PUT lands but reports failure: the retry
/// meets its own edit, the flush succeeds, and the table is recorded once.
#[tokio::test]
async fn ambiguous_manifest_edit_is_recognised_as_our_own() {
    let store = memory_store();
    let trigger = Trigger::new(store.clone());
    let base = open_base(trigger.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 1, KeyRange::all()).await;
    let mut journal = Journal::default();
    journal.put_range(&tablet, 0..120, 1, 12).await;

    trigger.arm(OpKind::Put, ".edit", 0, |faults| {
        faults.inject_next(OpKind::Put, 1, FaultAction::FailAfterApply);
    });
    let puts_before = store.metrics().op(OpKind::Put);
    tablet
        .flush()
        .await
        .expect("the retried edit is recognised as ours");
    assert!(!trigger.is_armed(), "the edit PUT was reached");
    let puts = store.metrics().op(OpKind::Put) - puts_before;
    assert_eq!(
        (puts.requests, puts.retries, puts.errors),
        (2, 1, 0),
        "table + edit, the edit retried once"
    );

    let version = base.version();
    let live = live_tables(&version);
    assert_eq!(live.len(), 1, "{live:?}");
    let edits: Vec<Path> = list(store.as_ref(), &format!("{ROOT}/manifest"))
        .await
        .into_iter()
        .filter(|p| p.as_ref().ends_with(".edit"))
        .collect();
    assert_eq!(
        edits.len(),
        2,
        "claim and one flush, no duplicate: {edits:?}"
    );
    assert_eq!(version.seq(), 2);
    assert_eq!(
        version.tablet(1).expect("claimed").flushed_up_to,
        journal.entries.len() as u64
    );

    // A fresh reader of the manifest sees the table exactly once, too.
    crash(tablet).await;
    base.close();
    let base = open_base(store.clone(), base_options()).await;
    let reloaded = base.version();
    assert_eq!(reloaded.seq(), 2);
    let names: Vec<String> = reloaded.tables().map(|t| t.name.clone()).collect();
    assert_eq!(names, live);
    let tablet = open_tablet(&base, 1, 2, KeyRange::all()).await;
    assert_eq!(journal.replay(&tablet).await, 0);
    journal.verify(&tablet, "after reopen").await;
    base.close();
}

/// Compaction fails on GETs (inputs unreadable), on PUTs (output upload) and
/// on its manifest edit (output orphaned): each time it reports a retryable
/// error, the live tables stay as they were and reads stay right. Once the
/// store heals it succeeds, and GC removes inputs and orphans.
#[tokio::test]
async fn failed_compactions_lose_nothing() {
    let store = memory_store();
    let trigger = Trigger::new(store.clone());
    let base = open_base(trigger.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 1, KeyRange::all()).await;
    let mut journal = Journal::default();
    journal.put_range(&tablet, 0..150, 1, 10).await;
    tablet.flush().await.expect("flush");
    journal.put_range(&tablet, 100..250, 2, 10).await;
    for i in (0..250).step_by(9) {
        journal.delete(&tablet, key(i)).await;
    }
    tablet.flush().await.expect("flush");
    let inputs = live_tables(&base.version());
    assert_eq!(base.version().level(0).len(), 2);

    // Output upload fails. Reads need only GETs, so they work meanwhile.
    store
        .faults()
        .add_rule(fail_all(OpKind::Put))
        .expect("valid rule");
    let error = base.compact_once().await.expect_err("output upload fails");
    assert_retryable_store_error(&error, "put", "compaction with failing PUTs");
    assert_eq!(live_tables(&base.version()), inputs);
    assert_eq!(
        table_objects(store.as_ref()).await,
        inputs,
        "no partial output"
    );
    journal.verify(&tablet, "during the PUT outage").await;
    store.faults().clear();

    // Inputs cannot be read: compaction fetches each input whole, cached index or not.
    store
        .faults()
        .add_rule(fail_all(OpKind::Get))
        .expect("valid rule");
    let error = base.compact_once().await.expect_err("inputs unreadable");
    assert_retryable_store_error(&error, "get", "compaction with failing GETs");
    assert_eq!(live_tables(&base.version()), inputs);
    store.faults().clear();
    journal.verify(&tablet, "after the GET outage").await;

    // The output lands, the manifest edit fails: an orphan.
    trigger.arm(OpKind::Put, ".edit", 0, |faults| {
        faults.add_rule(fail_all(OpKind::Put)).expect("valid rule");
    });
    let error = base.compact_once().await.expect_err("manifest edit fails");
    assert_retryable_store_error(&error, "put", "compaction with a failing edit");
    assert_eq!(live_tables(&base.version()), inputs);
    assert_eq!(
        table_objects(store.as_ref()).await.len(),
        inputs.len() + 1,
        "one orphaned output"
    );
    journal.verify(&tablet, "after the failed edit").await;
    store.faults().clear();

    let report = base
        .compact_once()
        .await
        .expect("healthy compaction")
        .expect("L0 needs compaction");
    assert_eq!(report.input_tables, 2);
    assert!(base.version().level(0).is_empty());
    journal.verify(&tablet, "after compaction").await;

    let gc = base.collect_garbage().await.expect("gc");
    assert_eq!(
        gc.tables_deleted,
        inputs.len() + 1,
        "both inputs and the orphan: {gc:?}"
    );
    assert_eq!(
        table_objects(store.as_ref()).await,
        live_tables(&base.version())
    );
    crash(tablet).await;
    base.close();

    let base = open_base(store.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 2, KeyRange::all()).await;
    assert_eq!(journal.replay(&tablet).await, 0);
    journal
        .verify(&tablet, "cold read after compaction and gc")
        .await;
    base.close();
}

/// Reads that cannot reach the store fail with a retryable object-store
/// error, and the same reads succeed once the store heals (a failed load is
/// not cached).
#[tokio::test]
async fn read_errors_are_typed_retryable_and_transient() {
    let store = memory_store();
    let (base, tablet, mut journal) = single_tablet(&store).await;
    journal.put_range(&tablet, 0..300, 1, 20).await;
    tablet.flush().await.expect("flush");
    crash(tablet).await;
    base.close();

    // Fresh caches: nothing of the table is in memory.
    let base = open_base(store.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 2, KeyRange::all()).await;
    assert_eq!(journal.replay(&tablet).await, 0);
    store
        .faults()
        .add_rule(fail_all(OpKind::Get))
        .expect("valid rule");

    let error = tablet
        .get(&key(42), journal.ts)
        .await
        .expect_err("the table cannot be read");
    assert_retryable_store_error(&error, "get", "point read");
    let request = ScanRequest {
        range: KeyRange::all(),
        read_ts: journal.ts,
        limit: 0,
        direction: Direction::Forward,
    };
    let error = tablet
        .scan(&request)
        .await
        .expect_err("the table cannot be scanned");
    assert_retryable_store_error(&error, "get", "scan");
    // An absent key inside the table's key span still needs the index (bloom filter) first.
    let error = tablet
        .get(b"key00100-absent", journal.ts)
        .await
        .expect_err("the index cannot be read");
    assert_retryable_store_error(&error, "get", "absent key");

    store.faults().clear();
    journal.verify(&tablet, "after the store healed").await;

    // With index and pages cached, a GET outage no longer matters for these keys.
    store
        .faults()
        .add_rule(fail_all(OpKind::Get))
        .expect("valid rule");
    assert_eq!(
        tablet.get(&key(42), journal.ts).await.expect("cached"),
        journal.expected(&key(42), journal.ts)
    );
    store.faults().clear();
    base.close();
}

/// A table whose footer region is larger than the tail fetched first needs a
/// second GET to open. A transient failure of that GET is a store failure,
/// not damage: it must be retryable.
#[tokio::test]
async fn read_error_opening_a_large_table_index_is_retryable() {
    let store = memory_store();
    let trigger = Trigger::new(store.clone());
    let base = open_base(trigger.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 1, KeyRange::all()).await;
    // Long keys make the page index (first and last key of every page) far
    // larger than the 64 KiB + 4 bytes/row tail read at open.
    let long_key = |i: usize| Bytes::from(format!("{i:05}{}", "k".repeat(4000)));
    let mut seq = 0;
    for chunk in (0..1000).collect::<Vec<usize>>().chunks(100) {
        let mut batch = WriteBatch::new();
        for &i in chunk {
            batch.put(long_key(i), Bytes::from_static(b"v"));
        }
        seq += 1;
        tablet.write(seq, seq, &batch).await.expect("write");
    }
    tablet.flush().await.expect("flush");
    crash(tablet).await;
    base.close();

    let base = open_base(trigger.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 2, KeyRange::all()).await;
    // The tail GET succeeds; every GET after it fails.
    trigger.arm(OpKind::Get, "/tables/", 1, |faults| {
        faults.add_rule(fail_all(OpKind::Get)).expect("valid rule");
    });
    let error = tablet
        .get(&long_key(7), seq)
        .await
        .expect_err("the footer cannot be read");
    assert!(!trigger.is_armed(), "the table needed a second GET to open");
    assert_retryable_store_error(&error, "get", "opening a large table");
    store.faults().clear();
    assert_eq!(
        tablet.get(&long_key(7), seq).await.expect("healed"),
        Some(Bytes::from_static(b"v"))
    );
    base.close();
}

/// Every request is delayed: flushes, compactions, reads and GC all stall
/// but complete with the right results.
#[tokio::test]
async fn slow_store_stalls_but_completes() {
    let store = memory_store();
    let base = open_base(store.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 1, KeyRange::all()).await;
    store
        .faults()
        .add_rule(FaultRule {
            action: FaultAction::Delay(Duration::from_millis(3)),
            fraction: 1.0,
            kind: None,
        })
        .expect("valid rule");
    let mut journal = Journal::default();
    journal.put_range(&tablet, 0..100, 1, 25).await;
    tablet.flush().await.expect("slow flush");
    journal.put_range(&tablet, 50..150, 2, 25).await;
    tablet.flush().await.expect("slow flush");
    assert!(base.compact_until_settled().await.expect("slow compaction") >= 1);
    journal.verify(&tablet, "slow reads").await;
    let gc = base.collect_garbage().await.expect("slow gc");
    assert_eq!(gc.tables_deleted, 2);
    let delayed = store.faults().injected();
    assert!(delayed >= 20, "only {delayed} requests were delayed");
    let metrics = store.metrics();
    // Delays are not failures: nothing was retried (errors count the expected
    // not-found probes for the next manifest edit).
    for kind in OpKind::ALL {
        assert_eq!(metrics.op(kind).retries, 0, "{kind}: {metrics}");
    }
    store.faults().clear();
    base.close();
}

/// Random failures (seeded) on every kind of request while a tablet writes,
/// flushes, compacts and collects garbage. Every error is retryable, and once
/// the faults stop a crash and recovery finds every acknowledged write.
#[tokio::test]
async fn random_faults_never_lose_acknowledged_writes() {
    const SEED: u64 = 0x5eed_f417;
    let store = memory_store();
    // A failed flush leaves the background flusher retrying concurrently; a
    // grace period keeps GC off its uploaded-but-uncommitted tables.
    let graceful = luna_storage::BaseStoreOptions {
        gc_grace: Duration::from_secs(3600),
        ..base_options()
    };
    let base = open_base(store.clone(), graceful).await;
    let tablet = open_tablet(&base, 1, 1, KeyRange::all()).await;
    store.faults().set_seed(SEED);
    for (action, fraction) in [
        (FaultAction::Fail, 0.5),
        (FaultAction::FailAfterApply, 0.15),
    ] {
        store
            .faults()
            .add_rule(FaultRule {
                action,
                fraction,
                kind: None,
            })
            .expect("valid rule");
    }
    let mut journal = Journal::default();
    let mut failures = 0;
    for round in 0..20usize {
        journal
            .put_range(&tablet, round * 20..round * 20 + 40, round as u64, 10)
            .await;
        journal.delete(&tablet, key(round * 7)).await;
        let step = match round % 3 {
            0 => tablet.flush().await,
            1 => base.compact_once().await.map(|_| ()),
            _ => base.collect_garbage().await.map(|_| ()),
        };
        if let Err(error) = step {
            failures += 1;
            assert!(
                error.is_retryable(),
                "seed {SEED:#x}, round {round}: {error:?}"
            );
        }
        let read = tablet.get(&key(round * 20), journal.ts).await;
        match read {
            Ok(value) => assert_eq!(
                value,
                journal.expected(&key(round * 20), journal.ts),
                "seed {SEED:#x}, round {round}"
            ),
            Err(error) => {
                failures += 1;
                assert!(
                    error.is_retryable(),
                    "seed {SEED:#x}, round {round}: {error:?}"
                );
            }
        }
    }
    println!(
        "seed {SEED:#x}: {failures} operations failed, {} faults injected",
        store.faults().injected()
    );
    assert!(store.faults().injected() > 0, "seed {SEED:#x}");
    store.faults().clear();
    journal
        .verify(
            &tablet,
            &format!("seed {SEED:#x}: after the faults stopped"),
        )
        .await;
    tablet
        .flush()
        .await
        .unwrap_or_else(|e| panic!("seed {SEED:#x}: final flush: {e}"));
    crash(tablet).await;
    base.close();

    let base = open_base(store.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 2, KeyRange::all()).await;
    assert_eq!(journal.replay(&tablet).await, 0, "seed {SEED:#x}");
    journal
        .verify(&tablet, &format!("seed {SEED:#x}: after recovery"))
        .await;
    base.compact_until_settled()
        .await
        .unwrap_or_else(|e| panic!("seed {SEED:#x}: compaction: {e}"));
    base.collect_garbage()
        .await
        .unwrap_or_else(|e| panic!("seed {SEED:#x}: gc: {e}"));
    assert_eq!(
        table_objects(store.as_ref()).await,
        live_tables(&base.version()),
        "seed {SEED:#x}"
    );
    journal
        .verify(&tablet, &format!("seed {SEED:#x}: after compaction and gc"))
        .await;
    base.close();
}
