//! Compaction (GC safe point, tombstones, tablet boundaries), garbage
//! collection of tables and manifest objects, and fencing of old tablet owners.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use luna_storage::manifest::{Layout, ManifestObject};
use luna_storage::{BaseStoreOptions, KeyRange, Lookup, StorageError, Tablet, WriteBatch};
use object_store::{ObjectStore, ObjectStoreExt};

/// Manifest edit and checkpoint numbers in the store, ascending.
async fn manifest_objects(store: &dyn ObjectStore) -> (Vec<u64>, Vec<u64>) {
    let (mut edits, mut checkpoints) = (Vec::new(), Vec::new());
    for path in list(store, &format!("{ROOT}/manifest")).await {
        match Layout::parse_manifest_object(&path) {
            Some(ManifestObject::Edit(seq)) => edits.push(seq),
            Some(ManifestObject::Checkpoint(seq)) => checkpoints.push(seq),
            None => {}
        }
    }
    edits.sort_unstable();
    checkpoints.sort_unstable();
    (edits, checkpoints)
}

/// A batch putting every key of `keys` to `generation`.
fn generation(keys: std::ops::Range<usize>, generation: u64) -> WriteBatch {
    let mut batch = WriteBatch::new();
    for i in keys {
        batch.put(key(i), value(i, generation));
    }
    batch
}

/// Everything at or below the safe point collapses to the newest version per
/// key, and bottom-level tombstones disappear with what they deleted; reads
/// at or above the safe point are unchanged.
#[tokio::test]
async fn compaction_drops_shadowed_versions_and_bottom_tombstones() {
    let store = memory_store();
    let (base, tablet, mut journal) = single_tablet(&store).await;
    journal.put_range(&tablet, 0..60, 1, 10).await;
    tablet.flush().await.expect("flush");
    journal.put_range(&tablet, 0..60, 2, 10).await;
    tablet.flush().await.expect("flush");
    for i in (0..60).step_by(3) {
        journal.delete(&tablet, key(i)).await;
    }
    tablet.flush().await.expect("flush");
    assert_eq!(total_rows(&base.version()), 60 + 60 + 20);

    base.set_gc_safe_point(journal.ts);
    assert!(base.compact_until_settled().await.expect("compaction") >= 1);
    let version = base.version();
    assert!(version.level(0).is_empty());
    assert_eq!(
        total_rows(&version),
        40,
        "one version per live key, no tombstones"
    );
    journal
        .verify_at(&tablet, journal.ts, "at the safe point")
        .await;
    journal
        .verify_at(&tablet, journal.ts + 100, "above the safe point")
        .await;
    for i in (0..60).step_by(3) {
        let found = base
            .get(&version, &key(i), journal.ts, Lookup::Absent)
            .await
            .expect("get");
        assert_eq!(
            found,
            Lookup::Absent,
            "key {i}: the tombstone and what it deleted are gone"
        );
    }
    base.close();
}

/// Versions newer than the safe point all survive (a snapshot may still
/// read them), including tombstones; only versions shadowed at the safe
/// point go.
#[tokio::test]
async fn versions_above_the_safe_point_are_kept() {
    const KEYS: usize = 30;
    let store = memory_store();
    let (base, tablet, mut journal) = single_tablet(&store).await;
    // One batch per generation: generation g is written at ts g + 1.
    for g in 0..4 {
        journal.write(&tablet, generation(0..KEYS, g)).await;
        tablet.flush().await.expect("flush");
    }
    let mut deletes = WriteBatch::new();
    for i in (0..KEYS).step_by(2) {
        deletes.delete(key(i));
    }
    journal.write(&tablet, deletes).await;
    tablet.flush().await.expect("flush");
    assert_eq!(journal.ts, 5);
    assert_eq!(total_rows(&base.version()), (4 * KEYS + KEYS / 2) as u64);

    let safe_point = 2;
    base.set_gc_safe_point(safe_point);
    assert_eq!(base.gc_safe_point(), safe_point);
    assert!(base.compact_until_settled().await.expect("compaction") >= 1);
    // ts 1 is shadowed by ts 2 at the safe point; ts 2..=5 stay.
    assert_eq!(total_rows(&base.version()), (3 * KEYS + KEYS / 2) as u64);
    for ts in safe_point..=journal.ts + 1 {
        journal.verify_at(&tablet, ts, "after compaction").await;
    }
    // Spot check: the old value at the safe point, the tombstone above it.
    assert_eq!(
        tablet.get(&key(4), 2).await.expect("get"),
        Some(value(4, 1))
    );
    assert_eq!(
        tablet.get(&key(4), 4).await.expect("get"),
        Some(value(4, 3))
    );
    assert_eq!(tablet.get(&key(4), 5).await.expect("get"), None);
    // Below the safe point the answer could be wrong: it is refused instead.
    assert!(matches!(
        tablet.get(&key(4), 1).await,
        Err(StorageError::SnapshotTooOld {
            read_ts: 1,
            safe_point: 2
        })
    ));
    base.close();
}

/// A compaction records the safe point it dropped versions below, so another
/// process sharing the BaseStore refuses reads below it once it sees the
/// compacted tables, even though nobody told that process the safe point; and
/// a process that reopens the store starts from it.
#[tokio::test]
async fn another_process_learns_the_safe_point_from_the_compaction() {
    let store = memory_store();
    let (base, tablet, mut journal) = single_tablet(&store).await;
    for g in 0..3 {
        journal.write(&tablet, generation(0..10, g)).await;
        tablet.flush().await.expect("flush");
    }
    let other = open_base(store.clone(), base_options()).await;
    assert_eq!(other.gc_safe_point(), 0);
    base.set_gc_safe_point(3);
    assert!(base.compact_until_settled().await.expect("compaction") >= 1);
    assert_eq!(base.version().gc_safe_point(), 3);
    assert_eq!(other.gc_safe_point(), 0, "not refreshed yet");
    other.refresh().await.expect("refresh");
    assert_eq!(other.version().gc_safe_point(), 3);
    assert_eq!(other.gc_safe_point(), 3);
    // A lower safe point from a lagging master never lowers it.
    other.set_gc_safe_point(1);
    assert_eq!(other.gc_safe_point(), 3);
    let reopened = open_base(store.clone(), base_options()).await;
    assert_eq!(reopened.gc_safe_point(), 3, "replayed from the manifest");
    base.close();
    other.close();
    reopened.close();
}

/// Two tablets share a BaseStore; compaction merges their flushes but cuts
/// its output where the second tablet begins.
#[tokio::test]
async fn compaction_output_is_cut_at_tablet_boundaries() {
    let store = memory_store();
    let base = open_base(store.clone(), base_options()).await;
    let boundary = Bytes::from_static(b"m");
    let left = open_tablet(
        &base,
        1,
        1,
        KeyRange::new(Bytes::new(), Some(boundary.clone())),
    )
    .await;
    let right = open_tablet(&base, 2, 1, KeyRange::new(boundary.clone(), None)).await;
    let letter_key = |letter: u8, i: usize| Bytes::from(format!("{}{i:03}", letter as char));
    let (mut left_journal, mut right_journal) = (Journal::default(), Journal::default());
    for round in 0..2u64 {
        for letter in b'a'..=b'z' {
            let (tablet, journal) = if letter < b'm' {
                (&left, &mut left_journal)
            } else {
                (&right, &mut right_journal)
            };
            let mut batch = WriteBatch::new();
            for i in 0..10 {
                batch.put(letter_key(letter, i), Bytes::from(format!("round {round}")));
            }
            journal.write(tablet, batch).await;
        }
        left.flush().await.expect("flush left");
        right.flush().await.expect("flush right");
    }
    assert_eq!(base.version().level(0).len(), 4);

    let report = base
        .compact_once()
        .await
        .expect("compaction")
        .expect("L0 is over its trigger");
    assert_eq!(report.input_tables, 4);
    let version = base.version();
    assert!(version.level(0).is_empty());
    let mut sides = (0, 0);
    for table in version.tables() {
        let spans_boundary = table.smallest < boundary && table.largest >= boundary;
        assert!(
            !spans_boundary,
            "table {} spans {:?}..={:?}",
            table.name, table.smallest, table.largest
        );
        if table.largest < boundary {
            sides.0 += 1;
        } else {
            sides.1 += 1;
        }
    }
    assert!(
        sides.0 >= 1 && sides.1 >= 1,
        "output on both sides: {sides:?}"
    );
    left_journal.verify(&left, "left tablet").await;
    right_journal.verify(&right, "right tablet").await;
    base.close();
}

/// A held version keeps its tables alive through compaction and GC; once it
/// is dropped, the next GC deletes them.
#[tokio::test]
async fn gc_never_deletes_tables_of_a_held_version() {
    let store = memory_store();
    let (base, tablet, mut journal) = single_tablet(&store).await;
    journal.put_range(&tablet, 0..100, 1, 10).await;
    tablet.flush().await.expect("flush");
    journal.put_range(&tablet, 50..150, 2, 10).await;
    tablet.flush().await.expect("flush");

    let held = base.version();
    let held_tables = live_tables(&held);
    assert_eq!(held_tables.len(), 2);
    base.compact_once()
        .await
        .expect("compaction")
        .expect("L0 needs compaction");
    assert!(
        held_tables
            .iter()
            .all(|name| !base.version().contains_table(name))
    );
    let report = base.collect_garbage().await.expect("gc");
    assert_eq!(report.tables_deleted, 0, "{report:?}");
    for name in &held_tables {
        let path = base.layout().table(name);
        store
            .head(&path)
            .await
            .unwrap_or_else(|e| panic!("held table {name} was deleted: {e}"));
    }
    // The held version reads through its own (compacted-away) tables; their
    // pages were never cached, so this fetches them.
    for key in journal.keys() {
        let found = base
            .get(&held, &key, journal.ts, Lookup::Absent)
            .await
            .expect("read the held version");
        assert_eq!(
            found.into_value(),
            journal.expected(&key, journal.ts),
            "key {key:?}"
        );
    }

    drop(held);
    let report = base.collect_garbage().await.expect("gc");
    assert_eq!(report.tables_deleted, 2, "{report:?}");
    assert_eq!(
        table_objects(store.as_ref()).await,
        live_tables(&base.version())
    );
    journal.verify(&tablet, "after gc").await;
    base.close();
}

/// Nothing younger than the grace period is deleted, neither tables nor
/// manifest objects; a collector without grace shows there was garbage.
#[tokio::test]
async fn gc_respects_the_grace_period() {
    let store = memory_store();
    let options = BaseStoreOptions {
        gc_grace: Duration::from_secs(3600),
        checkpoint_every: 2,
        ..base_options()
    };
    let base = open_base(store.clone(), options).await;
    let tablet = open_tablet(&base, 1, 1, KeyRange::all()).await;
    let mut journal = Journal::default();
    for round in 0..4 {
        journal
            .put_range(&tablet, round * 30..round * 30 + 60, round as u64, 10)
            .await;
        tablet.flush().await.expect("flush");
    }
    base.compact_until_settled().await.expect("compaction");
    let tables_before = table_objects(store.as_ref()).await;
    let manifest_before = manifest_objects(store.as_ref()).await;
    assert!(
        tables_before.len() > live_tables(&base.version()).len(),
        "compaction left garbage"
    );
    assert!(
        manifest_before.1.len() >= 3,
        "checkpoints: {:?}",
        manifest_before.1
    );

    let report = base.collect_garbage().await.expect("gc");
    assert_eq!(report, luna_storage::GcReport::default());
    assert_eq!(table_objects(store.as_ref()).await, tables_before);
    assert_eq!(manifest_objects(store.as_ref()).await, manifest_before);

    let impatient = open_base(store.clone(), base_options()).await;
    let report = impatient.collect_garbage().await.expect("gc");
    assert_eq!(
        report.tables_deleted,
        tables_before.len() - live_tables(&impatient.version()).len()
    );
    assert!(report.manifest_objects_deleted > 0, "{report:?}");
    impatient.close();
    journal.verify(&tablet, "after gc").await;
    base.close();
}

/// With frequent checkpoints, GC deletes edits and checkpoints older than
/// the second-newest checkpoint; the store reopens to the same state and the
/// log continues from there.
#[tokio::test]
async fn manifest_gc_keeps_the_store_reopenable() {
    let store = memory_store();
    let options = || BaseStoreOptions {
        checkpoint_every: 3,
        ..base_options()
    };
    let base = open_base(store.clone(), options()).await;
    let tablet = open_tablet(&base, 1, 1, KeyRange::all()).await;
    let mut journal = Journal::default();
    for round in 0..20 {
        journal
            .put_range(&tablet, round * 5..round * 5 + 10, round as u64, 5)
            .await;
        tablet.flush().await.expect("flush");
    }
    let version = base.version();
    assert_eq!(version.seq(), 21, "one claim and 20 flushes");
    let (edits, checkpoints) = manifest_objects(store.as_ref()).await;
    assert_eq!(edits, (1..=21).collect::<Vec<_>>());
    assert_eq!(checkpoints, vec![3, 6, 9, 12, 15, 18, 21]);

    let report = base.collect_garbage().await.expect("gc");
    // Kept: checkpoints 18 and 21, and the edits after 18.
    assert_eq!(report.manifest_objects_deleted, 18 + 5, "{report:?}");
    assert_eq!(report.tables_deleted, 0);
    assert_eq!(
        manifest_objects(store.as_ref()).await,
        (vec![19, 20, 21], vec![18, 21])
    );

    crash(tablet).await;
    base.close();
    let base = open_base(store.clone(), options()).await;
    let reopened = base.version();
    assert_eq!(reopened.seq(), version.seq());
    assert_eq!(live_tables(&reopened), live_tables(&version));
    assert_eq!(reopened.tablet(1), version.tablet(1));
    let tablet = open_tablet(&base, 1, 2, KeyRange::all()).await;
    assert_eq!(journal.replay(&tablet).await, 0);
    journal
        .verify(&tablet, "after manifest gc and reopen")
        .await;

    // The log goes on after the collected prefix.
    journal.put_range(&tablet, 500..520, 99, 5).await;
    tablet.flush().await.expect("flush after reopen");
    crash(tablet).await;
    base.close();
    let base = open_base(store.clone(), options()).await;
    assert_eq!(base.version().seq(), 23, "claim at 22, flush at 23");
    let tablet = open_tablet(&base, 1, 3, KeyRange::all()).await;
    assert_eq!(journal.replay(&tablet).await, 0);
    journal.verify(&tablet, "after a second reopen").await;
    base.close();
}

async fn fencing_scenario(second_process: bool) {
    let context = if second_process {
        "second BaseStore"
    } else {
        "same BaseStore"
    };
    let store = memory_store();
    let base = open_base(store.clone(), base_options()).await;
    let old = open_tablet(&base, 1, 1, KeyRange::all()).await;
    let mut journal = Journal::default();
    journal.put_range(&old, 0..50, 1, 10).await;
    old.flush().await.expect("flush by the first owner");
    let flushed = journal.entries.len() as u64;
    journal.put_range(&old, 50..80, 2, 10).await;

    let new_base = if second_process {
        open_base(store.clone(), base_options()).await
    } else {
        Arc::clone(&base)
    };
    let new = open_tablet(&new_base, 1, 2, KeyRange::all()).await;
    assert_eq!(new.recovered_up_to(), flushed, "{context}");
    assert_eq!(journal.replay(&new).await, 3, "{context}");

    // (Which current epoch the error reports depends on whether this flush or
    // the background flusher reached the manifest first; see
    // `fenced_error_reports_the_fencing_epoch`.)
    let error = old.flush().await.expect_err("the old owner is fenced");
    assert!(
        matches!(
            error,
            StorageError::Fenced {
                tablet_id: 1,
                epoch: 1,
                ..
            }
        ),
        "{context}: {error:?}"
    );
    assert!(!error.is_retryable());
    let mut batch = WriteBatch::new();
    batch.put(key(999), Bytes::from_static(b"stale"));
    let error = old
        .write(journal.next_seq(), journal.ts + 1, &batch)
        .await
        .expect_err("fenced writer");
    assert!(
        matches!(error, StorageError::Fenced { .. }),
        "{context}: {error:?}"
    );
    // An epoch cannot be claimed twice, nor an older one.
    for epoch in [1, 2] {
        let claim = Tablet::open(
            Arc::clone(&new_base),
            1,
            epoch,
            KeyRange::all(),
            memstore_options(),
            Arc::new(luna_storage::MemoryBudget::new(usize::MAX)),
        )
        .await;
        assert!(
            matches!(claim, Err(StorageError::Fenced { .. })),
            "{context}: epoch {epoch}: {}",
            describe(&claim)
        );
    }

    journal.put_range(&new, 80..100, 3, 10).await;
    journal.verify(&new, context).await;
    new.flush().await.expect("the new owner flushes");
    let version = new_base.refresh().await.expect("refresh");
    assert_eq!(version.tablet(1).expect("claimed").epoch, 2);
    assert_eq!(
        version.tables().count(),
        2,
        "{context}: the fenced flush added nothing"
    );
    assert_eq!(
        version.tablet(1).expect("claimed").flushed_up_to,
        journal.entries.len() as u64
    );

    drop(old);
    crash(new).await;
    base.close();
    new_base.close();
    let base = open_base(store.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 3, KeyRange::all()).await;
    assert_eq!(journal.replay(&tablet).await, 0);
    journal
        .verify(&tablet, &format!("{context}: after reopen"))
        .await;
    assert_eq!(
        tablet.get(&key(999), journal.ts + 1).await.expect("get"),
        None,
        "{context}"
    );
    base.close();
}

/// A new owner fences the old one (both on one BaseStore): the old owner's
/// flush fails with `Fenced`, its writes are refused after that, and the new
/// owner's data is intact.
#[tokio::test]
async fn fenced_owner_on_the_same_base_store_cannot_flush_or_write() {
    fencing_scenario(false).await;
}

/// The same with the new owner in another process (a second BaseStore on the
/// same object store).
#[tokio::test]
async fn fenced_owner_in_another_process_cannot_flush_or_write() {
    fencing_scenario(true).await;
}

/// A BaseStore that has not refreshed for a while commits after another
/// process collected the manifest edits it has not seen. Its flush must not
/// report success while the edit is invisible to everyone else.
#[tokio::test]
async fn stale_writer_does_not_commit_behind_collected_manifest_edits() {
    let store = memory_store();
    let options = || BaseStoreOptions {
        checkpoint_every: 2,
        ..base_options()
    };
    let stale_base = open_base(store.clone(), options()).await;
    let stale = open_tablet(
        &stale_base,
        1,
        1,
        KeyRange::new(Bytes::new(), Some(Bytes::from_static(b"m"))),
    )
    .await;
    assert_eq!(stale_base.version().seq(), 1);

    // Another process claims a tablet, flushes a lot and collects garbage.
    let busy_base = open_base(store.clone(), options()).await;
    let busy = open_tablet(
        &busy_base,
        2,
        1,
        KeyRange::new(Bytes::from_static(b"m"), None),
    )
    .await;
    for round in 0..10u64 {
        let mut batch = WriteBatch::new();
        batch.put(
            Bytes::from(format!("m{round:03}")),
            Bytes::from_static(b"busy"),
        );
        busy.write(round + 1, round + 1, &batch)
            .await
            .expect("write");
        busy.flush().await.expect("flush");
    }
    busy_base.collect_garbage().await.expect("gc");
    let (edits, _) = manifest_objects(store.as_ref()).await;
    assert!(!edits.contains(&2), "edit 2 was collected: {edits:?}");

    // The stale process flushes.
    let mut journal = Journal::default();
    journal.put_range(&stale, 0..20, 1, 5).await;
    let flushed = stale.flush().await;
    let fresh = open_base(store.clone(), options()).await;
    if flushed.is_ok() {
        let seen = fresh.version();
        assert_eq!(
            seen.tablet(1).expect("tablet 1").flushed_up_to,
            journal.entries.len() as u64,
            "a flush reported durable must be in the manifest other processes read (version {})",
            seen.seq()
        );
    }
    // And another process's GC must not delete what the stale process reads.
    fresh.collect_garbage().await.expect("gc");
    journal
        .verify(&stale, "stale process after another process's gc")
        .await;
    busy_base.close();
    stale_base.close();
    fresh.close();
}

/// A GC pass from a process that only reads the manifest deletes exactly the
/// compacted-away tables, never a live one.
#[tokio::test]
async fn gc_from_a_second_process_keeps_every_live_table() {
    let store = memory_store();
    let (base, tablet, mut journal) = single_tablet(&store).await;
    for round in 0..3 {
        journal
            .put_range(&tablet, round * 40..round * 40 + 80, round as u64, 20)
            .await;
        tablet.flush().await.expect("flush");
    }
    base.compact_until_settled().await.expect("compaction");
    let other = open_base(store.clone(), base_options()).await;
    let report = other.collect_garbage().await.expect("gc");
    assert_eq!(report.tables_deleted, 3, "{report:?}");
    assert_eq!(
        table_objects(store.as_ref()).await,
        live_tables(&base.version())
    );
    other.close();
    crash(tablet).await;
    base.close();
    let base = open_base(store.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 2, KeyRange::all()).await;
    journal.verify(&tablet, "after gc by another process").await;
    base.close();
}

/// Every `Fenced` error names the epoch that fenced the writer, also when the
/// new owner lives in another process and the error comes from a later call.
#[tokio::test]
async fn fenced_error_reports_the_fencing_epoch() {
    let store = memory_store();
    let base = open_base(store.clone(), base_options()).await;
    let old = open_tablet(&base, 1, 1, KeyRange::all()).await;
    let mut journal = Journal::default();
    journal.put_range(&old, 0..10, 1, 5).await;
    let other = open_base(store.clone(), base_options()).await;
    let _new = open_tablet(&other, 1, 2, KeyRange::all()).await;
    for attempt in 0..2 {
        let error = old.flush().await.expect_err("fenced");
        assert!(
            matches!(
                error,
                StorageError::Fenced {
                    tablet_id: 1,
                    epoch: 1,
                    current_epoch: 2
                }
            ),
            "attempt {attempt}: {error}"
        );
    }
    let mut batch = WriteBatch::new();
    batch.put(key(1), Bytes::from_static(b"x"));
    let error = old.write(100, 100, &batch).await.expect_err("fenced");
    assert!(
        matches!(
            error,
            StorageError::Fenced {
                current_epoch: 2,
                ..
            }
        ),
        "write: {error}"
    );
    other.close();
    base.close();
}

/// A flush with nothing new to write does not append a manifest edit: an
/// idle tablet flushed periodically must not grow the manifest.
#[tokio::test]
async fn idle_flush_appends_no_manifest_edit() {
    let store = memory_store();
    let (base, tablet, mut journal) = single_tablet(&store).await;
    journal.put_range(&tablet, 0..10, 1, 5).await;
    tablet.flush().await.expect("flush");
    let seq = base.version().seq();
    let puts = store
        .metrics()
        .op(luna_kernel::objstore::OpKind::Put)
        .requests;
    for _ in 0..3 {
        tablet.flush().await.expect("idle flush");
    }
    assert_eq!(tablet.memstore().immutable_count(), 0);
    assert_eq!(
        base.version().seq(),
        seq,
        "idle flushes appended manifest edits"
    );
    assert_eq!(
        store
            .metrics()
            .op(luna_kernel::objstore::OpKind::Put)
            .requests,
        puts,
        "idle flushes wrote objects"
    );
    base.close();
}

#[tokio::test]
async fn background_jobs_end_when_the_store_is_dropped() {
    let options = BaseStoreOptions {
        background_jobs: true,
        gc_interval: Duration::from_millis(5),
        ..base_options()
    };
    let base = open_base(memory_store(), options).await;
    let weak = Arc::downgrade(&base);
    // Let both jobs run at least once.
    tokio::time::sleep(Duration::from_millis(30)).await;
    drop(base);
    let mut released = false;
    for _ in 0..200 {
        if weak.upgrade().is_none() {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(released, "a background job kept the dropped store alive");
}

/// Only the store's compactor compacts in the background, and it finds the tables another
/// process flushed without being told: a process named compactor later takes over.
#[tokio::test]
async fn only_the_compactor_compacts_and_it_sees_other_processes_flushes() {
    let store = memory_store();
    let (writer, tablet, mut journal) = single_tablet(&store).await;
    let bystander_options = BaseStoreOptions {
        background_jobs: true,
        compactor: false,
        compactor_poll: Duration::from_millis(10),
        ..base_options()
    };
    let bystander = open_base(store.clone(), bystander_options).await;
    for round in 0..3 {
        journal.put_range(&tablet, 0..40, round, 10).await;
        tablet.flush().await.expect("flush");
    }
    // Over the trigger (2), yet nobody compacts: the writer runs no jobs and the
    // bystander is not the compactor.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(writer.refresh().await.expect("refresh").level(0).len(), 3);

    bystander.set_compactor(true);
    assert!(bystander.is_compactor());
    let mut compacted = false;
    for _ in 0..500 {
        if writer.refresh().await.expect("refresh").level(0).is_empty() {
            compacted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        compacted,
        "the new compactor never compacted the writer's tables"
    );
    journal
        .verify(&tablet, "after another process compacted")
        .await;
    bystander.close();
    writer.close();
}
