use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;

use super::writer::SyncFile;
use super::*;

fn config(dir: &std::path::Path) -> LocalConfig {
    LocalConfig {
        segment_size: 256,
        ..LocalConfig::new(dir)
    }
}

fn entry(i: u64) -> Bytes {
    Bytes::from(format!("entry-{i}"))
}

/// The first `count` items of a subscription from `from`.
async fn items(stream: &LocalStream, from: u64, count: usize) -> Vec<Committed> {
    let mut sub = stream.subscribe(from).await.expect("subscribe");
    let mut got = Vec::new();
    while got.len() < count {
        match sub.next().await {
            Some(Ok(item)) => got.push(item),
            other => panic!("subscription ended early: {other:?}"),
        }
    }
    got
}

/// The first `count` entries of a subscription from `from` (which has no snapshot).
async fn collect(stream: &LocalStream, from: u64, count: usize) -> Vec<Entry> {
    items(stream, from, count)
        .await
        .into_iter()
        .map(|item| match item {
            Committed::Entry(entry) => entry,
            Committed::Snapshot(s) => panic!("unexpected snapshot {s:?}"),
        })
        .collect()
}

#[tokio::test]
async fn appends_are_contiguous_and_delivered_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = LocalStream::open(config(dir.path())).expect("open");
    let mut live = stream.subscribe(1).await.expect("subscribe");
    for i in 1..=20 {
        assert_eq!(stream.append(entry(i)).await.expect("append"), i);
    }
    assert_eq!(stream.read_index().await.expect("read_index"), 20);
    for i in 1..=20 {
        let got = live.next().await.expect("open").expect("entry");
        let Committed::Entry(got) = got else {
            panic!("unexpected {got:?}")
        };
        assert_eq!((got.index, got.term, got.data), (i, 1, entry(i)));
    }
    let leader = stream.leadership();
    assert!(leader.is_leader);
    assert_eq!(leader.leader_id, Some(LOCAL_REPLICA_ID));
    stream.close().await;
}

#[tokio::test]
async fn reopen_recovers_every_acknowledged_entry_across_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = LocalStream::open(config(dir.path())).expect("open");
    for i in 1..=50 {
        stream.append(entry(i)).await.expect("append");
    }
    stream.close().await;
    let segments = std::fs::read_dir(dir.path()).expect("ls").count();
    assert!(
        segments > 3,
        "expected several segments, found {segments} files"
    );

    let stream = LocalStream::open(config(dir.path())).expect("reopen");
    assert_eq!(stream.read_index().await.expect("read_index"), 50);
    let got = collect(&stream, 1, 50).await;
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, e)| e.data == entry(i as u64 + 1))
    );
    assert_eq!(stream.append(entry(51)).await.expect("append"), 51);
    stream.close().await;
}

#[tokio::test]
async fn a_second_writer_is_locked_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = LocalStream::open(config(dir.path())).expect("open");
    let err = LocalStream::open(config(dir.path())).expect_err("second open");
    assert!(matches!(err, JournalError::Locked { .. }), "{err}");
    stream.close().await;
    LocalStream::open(config(dir.path()))
        .expect("open after close")
        .close()
        .await;
}

#[tokio::test]
async fn bad_entries_get_typed_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LocalConfig {
        max_entry_size: 8,
        ..config(dir.path())
    };
    let stream = LocalStream::open(cfg).expect("open");
    let err = stream
        .append(Bytes::from_static(b"123456789"))
        .await
        .expect_err("too large");
    assert!(
        matches!(err, StreamError::EntryTooLarge { size: 9, limit: 8 }),
        "{err}"
    );
    let err = stream.append(Bytes::new()).await.expect_err("empty");
    assert!(matches!(err, StreamError::EmptyEntry), "{err}");
    assert_eq!(
        stream
            .append(Bytes::from_static(b"12345678"))
            .await
            .expect("fits"),
        1
    );
    stream.close().await;
}

#[tokio::test]
async fn corrupt_log_is_a_typed_error_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = LocalStream::open(config(dir.path())).expect("open");
    for i in 1..=30 {
        stream.append(entry(i)).await.expect("append");
    }
    stream.close().await;
    let first = segment::segment_path(dir.path(), 1);
    let mut bytes = std::fs::read(&first).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&first, &bytes).expect("write");
    let err = LocalStream::open(config(dir.path())).expect_err("corrupt");
    assert!(matches!(err, JournalError::Corruption { .. }), "{err}");

    // An older segment cut short is lost acknowledged data, not a torn write.
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&first, &bytes).expect("write");
    let err = LocalStream::open(config(dir.path())).expect_err("truncated");
    assert!(matches!(err, JournalError::Corruption { .. }), "{err}");
}

#[tokio::test]
async fn torn_final_write_is_cut_and_numbering_continues() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LocalConfig::new(dir.path());
    let stream = LocalStream::open(cfg.clone()).expect("open");
    for i in 1..=3 {
        stream.append(entry(i)).await.expect("append");
    }
    stream.close().await;
    let path = segment::segment_path(dir.path(), 1);
    let len = std::fs::metadata(&path).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(len - 1)
        .expect("cut");
    let stream = LocalStream::open(cfg).expect("reopen");
    assert_eq!(stream.read_index().await.expect("read_index"), 2);
    assert_eq!(stream.append(entry(3)).await.expect("append"), 3);
    assert_eq!(collect(&stream, 1, 3).await[2].data, entry(3));
    stream.close().await;
}

/// Fails every fsync after the first `ok` ones.
struct FailingSync {
    ok: usize,
}

impl SyncFile for FailingSync {
    fn sync(&mut self, file: &File) -> std::io::Result<()> {
        if self.ok == 0 {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        self.ok -= 1;
        file.sync_data()
    }
}

#[tokio::test]
async fn fsync_failure_fails_the_append_and_never_acknowledges_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let syncer = Box::new(FailingSync { ok: 2 });
    let stream = LocalStream::open_with(LocalConfig::new(dir.path()), syncer).expect("open");
    assert_eq!(stream.append(entry(1)).await.expect("append"), 1);
    assert_eq!(stream.append(entry(2)).await.expect("append"), 2);
    let err = stream.append(entry(3)).await.expect_err("fsync fails");
    assert!(matches!(err, StreamError::Io { .. }), "{err}");
    // The stream stays failed: a later fsync "succeeding" would not make lost pages durable.
    let err = stream.append(entry(4)).await.expect_err("failed stream");
    assert!(matches!(err, StreamError::Io { .. }), "{err}");
    assert!(stream.read_index().await.is_err());
    stream.close().await;

    let stream = LocalStream::open(LocalConfig::new(dir.path())).expect("reopen");
    assert_eq!(stream.read_index().await.expect("read_index"), 2);
    let got = collect(&stream, 1, 2).await;
    assert_eq!(got[1].data, entry(2));
    stream.close().await;
}

/// Blocks the first fsync until the test releases it, and counts fsyncs.
struct GatedSync {
    entered: std_mpsc::Sender<()>,
    release: std_mpsc::Receiver<()>,
    count: Arc<AtomicUsize>,
}

impl SyncFile for GatedSync {
    fn sync(&mut self, file: &File) -> std::io::Result<()> {
        if self.count.fetch_add(1, Ordering::SeqCst) == 0 {
            let _ = self.entered.send(());
            let _ = self.release.recv();
        }
        file.sync_data()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fsync_covers_every_append_queued_meanwhile() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (entered_tx, entered) = std_mpsc::channel();
    let (release, release_rx) = std_mpsc::channel();
    let count = Arc::new(AtomicUsize::new(0));
    let syncer = GatedSync {
        entered: entered_tx,
        release: release_rx,
        count: Arc::clone(&count),
    };
    let stream = Arc::new(
        LocalStream::open_with(LocalConfig::new(dir.path()), Box::new(syncer)).expect("open"),
    );
    let first = tokio::spawn({
        let stream = Arc::clone(&stream);
        async move { stream.append(entry(0)).await }
    });
    tokio::task::spawn_blocking(move || entered.recv())
        .await
        .expect("join")
        .expect("entered");
    let mut rest = Vec::new();
    for i in 1..=99 {
        let stream = Arc::clone(&stream);
        rest.push(tokio::spawn(async move { stream.append(entry(i)).await }));
    }
    // Wait until all 99 sit in the writer's queue, behind the blocked fsync.
    while stream.requests.max_capacity() - stream.requests.capacity() < 99 {
        tokio::task::yield_now().await;
    }
    release.send(()).expect("release");
    assert_eq!(first.await.expect("join").expect("append"), 1);
    let mut indexes = Vec::new();
    for task in rest {
        indexes.push(task.await.expect("join").expect("append"));
    }
    indexes.sort_unstable();
    assert_eq!(indexes, (2..=100).collect::<Vec<_>>());
    assert_eq!(
        count.load(Ordering::SeqCst),
        2,
        "99 queued appends must share one fsync"
    );
}

/// The items a subscription from `from` must yield after a truncation at `snapshot`:
/// the snapshot if `from` is at or below it, then entries up to `last`.
fn expected(from: u64, snapshot: &Snapshot, last: u64) -> Vec<Committed> {
    let mut items = Vec::new();
    let mut next = from;
    if from <= snapshot.index {
        items.push(Committed::Snapshot(snapshot.clone()));
        next = snapshot.index + 1;
    }
    items.extend((next..=last).map(|i| {
        Committed::Entry(Entry {
            index: i,
            term: 1,
            data: entry(i),
        })
    }));
    items
}

#[tokio::test]
async fn truncate_stores_the_snapshot_deletes_segments_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = LocalStream::open(config(dir.path())).expect("open");
    for i in 1..=40 {
        stream.append(entry(i)).await.expect("append");
    }
    let files_before = std::fs::read_dir(dir.path()).expect("ls").count();
    let data = Bytes::from_static(b"tablets flushed to 30");
    stream.truncate(30, data.clone()).await.expect("truncate");
    let files_after = std::fs::read_dir(dir.path()).expect("ls").count();
    // One snapshot file more, and several segments fewer.
    assert!(
        files_after + 1 < files_before,
        "{files_after} files, before {files_before}"
    );
    let snapshot = Snapshot {
        index: 30,
        term: 1,
        data,
    };
    for from in [0, 1, 30, 31, 35] {
        let want = expected(from, &snapshot, 40);
        assert_eq!(items(&stream, from, want.len()).await, want, "from {from}");
    }
    // Beyond the committed index is an error; at or below the snapshot nothing changes.
    let err = stream
        .truncate(41, Bytes::from_static(b"future"))
        .await
        .expect_err("beyond committed");
    assert!(
        matches!(
            err,
            StreamError::BeyondCommitted {
                up_to: 41,
                committed: 40
            }
        ),
        "{err}"
    );
    stream
        .truncate(20, Bytes::from_static(b"older"))
        .await
        .expect("no-op");
    assert_eq!(items(&stream, 1, 1).await, expected(1, &snapshot, 30)[..1]);
    assert_eq!(stream.append(entry(41)).await.expect("append"), 41);
    stream.close().await;

    let stream = LocalStream::open(config(dir.path())).expect("reopen");
    assert_eq!(lock(&stream.shared.log).first_index, 31);
    assert_eq!(stream.read_index().await.expect("read_index"), 41);
    for from in [1, 30, 31, 40] {
        let want = expected(from, &snapshot, 41);
        assert_eq!(items(&stream, from, want.len()).await, want, "from {from}");
    }
    // Truncating everything keeps the active segment, and numbering continues.
    let last = Snapshot {
        index: 41,
        term: 1,
        data: Bytes::from_static(b"everything"),
    };
    stream
        .truncate(41, last.data.clone())
        .await
        .expect("truncate");
    assert_eq!(stream.append(entry(42)).await.expect("append"), 42);
    stream.close().await;
    let stream = LocalStream::open(config(dir.path())).expect("reopen");
    assert_eq!(items(&stream, 1, 2).await, expected(1, &last, 42));
    stream.close().await;
}

#[tokio::test]
async fn a_damaged_or_missing_snapshot_is_corruption_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = LocalStream::open(config(dir.path())).expect("open");
    for i in 1..=40 {
        stream.append(entry(i)).await.expect("append");
    }
    stream
        .truncate(30, Bytes::from_static(b"state at 30"))
        .await
        .expect("truncate");
    stream.close().await;
    let path = dir.path().join("SNAPSHOT");
    let good = std::fs::read(&path).expect("read");
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    std::fs::write(&path, &bad).expect("write");
    let err = LocalStream::open(config(dir.path())).expect_err("corrupt snapshot");
    assert!(
        matches!(&err, JournalError::Corruption { path: p, .. } if *p == path),
        "{err}"
    );
    // Without its snapshot, a log that no longer starts at 1 cannot be replayed.
    std::fs::remove_file(&path).expect("remove");
    let err = LocalStream::open(config(dir.path())).expect_err("missing snapshot");
    assert!(matches!(err, JournalError::Corruption { .. }), "{err}");
    std::fs::write(&path, &good).expect("restore");
    LocalStream::open(config(dir.path()))
        .expect("intact again")
        .close()
        .await;
}
