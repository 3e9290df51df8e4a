use std::sync::Arc;

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use pb::manifest_edit::Change;

use super::*;

fn claim(tablet_id: u64, epoch: u64) -> Change {
    claim_from(tablet_id, epoch, 0, 0)
}

/// A claim by a journal whose epochs start at `log_floor` and that opened the tablet at
/// index `opened_at`.
fn claim_from(tablet_id: u64, epoch: u64, log_floor: u64, opened_at: u64) -> Change {
    Change::Claim(pb::ClaimTablet {
        tablet: Some(pb::TabletState {
            tablet_id,
            epoch,
            range: None,
            flushed_up_to: opened_at,
        }),
        log_floor,
    })
}

fn flush(tablet_id: u64, epoch: u64, upto: u64, name: &str) -> Change {
    Change::Flush(pb::Flush {
        tablet_id,
        epoch,
        flushed_up_to: upto,
        added: vec![pb::TableMeta {
            name: name.into(),
            smallest_key: b"a".to_vec(),
            largest_key: b"z".to_vec(),
            ..Default::default()
        }],
    })
}

fn log(store: &Arc<dyn ObjectStore>, every: u64) -> ManifestLog {
    ManifestLog::new(Arc::clone(store), Layout::new(Path::from("coll")), every)
}

async fn check_racing_writers(store: Arc<dyn ObjectStore>) {
    let setup = log(&store, 1000);
    let base = setup
        .commit(&Version::default(), |_| Ok(claim(1, 1)))
        .await
        .unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let writer = log(&store, 1000);
            let base = base.clone();
            tokio::spawn(async move {
                let mut version = base;
                for i in 0..10 {
                    let name = format!("w{w}-{i}");
                    version = writer
                        .commit(&version, |_| Ok(flush(1, 1, 1, &name)))
                        .await
                        .unwrap();
                    assert!(version.contains_table(&name));
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let loaded = log(&store, 1000).load().await.unwrap();
    assert_eq!(
        loaded.seq(),
        41,
        "every commit took its own sequence number"
    );
    assert_eq!(loaded.level(0).len(), 40, "no commit was lost in a race");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_all_commit_on_memory() {
    check_racing_writers(Arc::new(InMemory::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_all_commit_on_local_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    check_racing_writers(Arc::new(store)).await;
}

#[test]
fn a_claim_from_another_journal_restarts_the_flush_marker() {
    let mut version = Version::default();
    let edit = |seq, change| pb::ManifestEdit {
        seq,
        change: Some(change),
        ..Default::default()
    };
    version.apply(&edit(1, claim_from(7, 10, 10, 3))).unwrap();
    version.apply(&edit(2, flush(7, 10, 900, "t1"))).unwrap();
    // A new leader of the same journal keeps the marker.
    version.apply(&edit(3, claim_from(7, 11, 10, 3))).unwrap();
    assert_eq!(version.tablet(7).unwrap().flushed_up_to, 900);
    // The tablet moved: the new journal's marker starts where it opened the tablet, even
    // though that index is lower.
    version.apply(&edit(4, claim_from(7, 20, 20, 40))).unwrap();
    let moved = version.tablet(7).unwrap();
    assert_eq!((moved.epoch, moved.flushed_up_to), (20, 40));
    assert!(version.contains_table("t1"));
}

#[tokio::test]
async fn an_old_owner_is_fenced_out() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let old_owner = log(&store, 1000);
    let new_owner = log(&store, 1000);
    let old_view = old_owner
        .commit(&Version::default(), |_| Ok(claim(7, 1)))
        .await
        .unwrap();
    new_owner
        .commit(&old_view, |_| Ok(claim(7, 2)))
        .await
        .unwrap();
    // The old owner re-reads before writing, sees epoch 2, and refuses.
    let refused = old_owner
        .commit(&old_view, |v| {
            let current = v.tablet(7).map_or(0, |t| t.epoch);
            if current != 1 {
                return Err(StorageError::Fenced {
                    tablet_id: 7,
                    epoch: 1,
                    current_epoch: current,
                });
            }
            Ok(flush(7, 1, 5, "stale"))
        })
        .await;
    assert!(matches!(
        refused,
        Err(StorageError::Fenced {
            current_epoch: 2,
            ..
        })
    ));
    // An edit forced in with the stale epoch is ignored on replay by everyone.
    let forced = pb::ManifestEdit {
        seq: 3,
        written_at_ms: 0,
        writer: "old".into(),
        change: Some(flush(7, 1, 5, "stale")),
    };
    store
        .put(&old_owner.layout().edit(3), codec::encode(&forced).into())
        .await
        .unwrap();
    let loaded = new_owner.load().await.unwrap();
    assert_eq!(loaded.seq(), 3);
    assert!(!loaded.contains_table("stale"));
    assert_eq!(loaded.tablet(7).unwrap().epoch, 2);
}

#[tokio::test]
async fn checkpoints_bound_replay_after_old_edits_are_deleted() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let writer = log(&store, 4);
    let mut version = writer
        .commit(&Version::default(), |_| Ok(claim(1, 1)))
        .await
        .unwrap();
    for i in 0..9 {
        version = writer
            .commit(&version, |_| Ok(flush(1, 1, i, &format!("t{i}"))))
            .await
            .unwrap();
    }
    assert_eq!(writer.list().await.unwrap().checkpoints, vec![4, 8]);
    for seq in 1..=8 {
        store.delete(&writer.layout().edit(seq)).await.unwrap();
    }
    let loaded = log(&store, 4).load().await.unwrap();
    assert_eq!(loaded.seq(), 10);
    assert_eq!(loaded.level(0).len(), 9);
    assert_eq!(loaded.tablet(1).unwrap().flushed_up_to, 8);
}

#[tokio::test]
async fn damaged_or_missing_edits_are_typed_corruption() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let writer = log(&store, 1000);
    let mut version = writer
        .commit(&Version::default(), |_| Ok(claim(1, 1)))
        .await
        .unwrap();
    version = writer
        .commit(&version, |_| Ok(flush(1, 1, 1, "a")))
        .await
        .unwrap();
    writer
        .commit(&version, |_| Ok(flush(1, 1, 2, "b")))
        .await
        .unwrap();

    store
        .put(&writer.layout().edit(2), b"garbage".to_vec().into())
        .await
        .unwrap();
    match log(&store, 1000).load().await {
        Err(StorageError::Corruption { object, .. }) => {
            assert!(object.ends_with("00000000000000000002.edit"))
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    store.delete(&writer.layout().edit(2)).await.unwrap();
    match log(&store, 1000).load().await {
        Err(StorageError::Corruption { detail, .. }) => assert!(detail.contains("gap"), "{detail}"),
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[tokio::test]
async fn a_damaged_checkpoint_falls_back_to_edits() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let writer = log(&store, 2);
    let mut version = writer
        .commit(&Version::default(), |_| Ok(claim(1, 1)))
        .await
        .unwrap();
    for i in 0..3 {
        version = writer
            .commit(&version, |_| Ok(flush(1, 1, i, &format!("t{i}"))))
            .await
            .unwrap();
    }
    store
        .put(&writer.layout().checkpoint(4), b"junk".to_vec().into())
        .await
        .unwrap();
    let loaded = log(&store, 2).load().await.unwrap();
    assert_eq!(loaded.seq(), 4);
    assert_eq!(loaded.level(0).len(), 3);
}
