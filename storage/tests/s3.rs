//! The engine over the S3 protocol: an in-process S3 server (s3s-fs), the
//! kernel's S3 backend under a key prefix, and a reopen from a new process
//! state. No concurrent races here: the test server's conditional PUT is not
//! atomic.

mod common;

use std::sync::Arc;

use common::*;
use luna_kernel::objstore::{ObjectStoreOptions, open_object_store};
use luna_kernel::testing::S3TestServer;
use luna_storage::{Direction, KeyRange, ScanRequest, StorageError, Tablet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_round_trips_through_s3() {
    let server = S3TestServer::start("luna-test")
        .await
        .expect("start the S3 test server");
    let options = ObjectStoreOptions {
        retry: fast_retries(),
        ..server.options()
    };
    let store = open_object_store(&server.url("luna"), &options).expect("open s3 store");
    let base = open_base(store.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 1, KeyRange::all()).await;

    let mut journal = Journal::default();
    journal.put_range(&tablet, 0..300, 1, 25).await;
    tablet.flush().await.expect("flush to s3");
    journal.put_range(&tablet, 150..400, 2, 25).await;
    for i in (0..400).step_by(11) {
        journal.delete(&tablet, key(i)).await;
    }
    tablet.flush().await.expect("flush to s3");
    assert!(
        base.compact_until_settled()
            .await
            .expect("compaction on s3")
            >= 1
    );
    assert!(base.version().level(0).is_empty());
    journal.verify(&tablet, "after compaction on s3").await;

    let gc = base.collect_garbage().await.expect("gc on s3");
    assert_eq!(gc.tables_deleted, 2, "{gc:?}");
    assert_eq!(
        table_objects(store.as_ref()).await,
        live_tables(&base.version())
    );

    // Claims are conditional PUTs: the same epoch cannot be claimed again.
    let again = Tablet::open(
        Arc::clone(&base),
        1,
        1,
        KeyRange::all(),
        memstore_options(),
        Arc::new(luna_storage::MemoryBudget::new(usize::MAX)),
    )
    .await;
    assert!(
        matches!(again, Err(StorageError::Fenced { .. })),
        "{}",
        describe(&again)
    );

    // An unflushed tail, then a crash.
    let flushed = journal.entries.len() as u64;
    journal.put_range(&tablet, 400..450, 3, 25).await;
    crash(tablet).await;
    base.close();
    drop(base);

    // A new process: a new store handle, BaseStore and tablet.
    let store = open_object_store(&server.url("luna"), &options).expect("reopen s3 store");
    let base = open_base(store.clone(), base_options()).await;
    let tablet = open_tablet(&base, 1, 2, KeyRange::all()).await;
    assert_eq!(tablet.recovered_up_to(), flushed);
    assert_eq!(journal.replay(&tablet).await, 2);
    journal.verify(&tablet, "after reopen from s3").await;
    let request = ScanRequest {
        range: KeyRange::new(key(100), Some(key(200))),
        read_ts: journal.ts,
        limit: 50,
        direction: Direction::Forward,
    };
    let scanned = tablet.scan(&request).await.expect("bounded scan");
    let want: Vec<_> = (100..200)
        .map(key)
        .filter_map(|k| journal.expected(&k, journal.ts).map(|v| (k, v)))
        .take(50)
        .collect();
    assert_eq!(scanned, want);
    tablet.flush().await.expect("flush after reopen");

    // Everything lives under the "luna/" prefix of the bucket.
    let bucket = open_object_store(&server.url(""), &options).expect("open the bucket root");
    let all = list(bucket.as_ref(), "").await;
    let under_prefix = list(store.as_ref(), "").await;
    assert!(!all.is_empty());
    assert_eq!(all.len(), under_prefix.len(), "nothing outside the prefix");
    for (full, relative) in all.iter().zip(&under_prefix) {
        assert_eq!(full.as_ref(), format!("luna/{relative}"), "{all:?}");
    }
    assert!(
        all.iter()
            .any(|p| p.as_ref().starts_with(&format!("luna/{ROOT}/manifest/")))
    );
    assert!(
        all.iter()
            .any(|p| p.as_ref().starts_with(&format!("luna/{ROOT}/tables/")))
    );
    base.close();
}
