//! MVCC garbage collection on a universe of real processes, with a GC life time of 1 s: the
//! master's safe point trails the clock, stays at or below the snapshot of a transaction
//! that is still open, reaches the tablet servers (reads below it are refused), and lets the
//! groups drop the outcome records of finished two-phase transactions once no lock of
//! theirs can be left. (Compaction dropping versions below it is in
//! storage/tests/compaction_gc.rs.)

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use luna_client::{ClientError, Collection, ReadOptions};
use support::Universe;
use support::load::bank_universe_with;

/// A new master raises the safe point only a client lease (10 s) after it took over, then
/// every half life time.
const WAIT: Duration = Duration::from_secs(60);

/// Reads `key` at `read_ts` on the leader until the read is refused as too old.
async fn wait_too_old(collection: &Collection, key: &str, read_ts: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        match collection
            .get_with(key, &ReadOptions::leader().at(read_ts))
            .await
        {
            Err(ClientError::SnapshotTooOld {
                read_ts: refused,
                safe_point,
            }) => {
                assert_eq!(refused, read_ts);
                assert!(safe_point > read_ts);
                return;
            }
            Ok(_) => {}
            Err(other) => panic!("read at {read_ts}: {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "the safe point never passed {read_ts}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Outcome records kept by every group replica of every server, from their metrics.
fn txn_records(universe: &Universe) -> u64 {
    universe.server_gauge_sum("luna_group_txn_records")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_safe_point_trails_the_clock_but_not_an_open_transaction() {
    let (universe, client, db, _checking, savings) =
        bank_universe_with(&["--gc-life-time-secs", "1"]).await;
    let tablets = client
        .admin()
        .list_tablets("bank", "savings")
        .await
        .expect("tablets");
    assert!(
        tablets.len() == 2 && tablets[0].group_id != tablets[1].group_id,
        "savings' two tablets should be in two groups, for a two-phase commit: {tablets:?}"
    );

    let before = client.timestamp().await.expect("timestamp");
    savings.put("k", "v1").await.expect("put v1");
    let mut open = db.begin().await.expect("begin");
    assert_eq!(
        open.get(&savings, "k").await.expect("read v1"),
        Some(Bytes::from_static(b"v1"))
    );
    savings.put("k", "v2").await.expect("put v2");
    // "a" and "z" are in different groups: two phases, and an outcome record.
    db.transaction(|txn| {
        let savings = savings.clone();
        Box::pin(async move {
            txn.put(&savings, "a", "1")?;
            txn.put(&savings, "z", "1")
        })
    })
    .await
    .expect("two-group transaction");
    assert!(
        txn_records(&universe) > 0,
        "the primary's group records the outcome"
    );

    wait_too_old(&savings, "k", before).await;
    // The open transaction started after `before` and before the two-group one: the safe
    // point stops below it, so it still reads its snapshot and commits, and the younger
    // transaction's record stays.
    assert_eq!(
        open.get(&savings, "k").await.expect("snapshot kept"),
        Some(Bytes::from_static(b"v1"))
    );
    assert!(
        txn_records(&universe) > 0,
        "records above the safe point are kept"
    );
    let open_start = open.start_ts();
    open.put(&savings, "b", "1").expect("buffer");
    open.commit()
        .await
        .expect("an old but held snapshot commits");
    drop(open);

    // Nothing holds it back any more: once the client's lease ran out, the safe point
    // passes it, and the groups drop the finished transactions' records.
    wait_too_old(&savings, "k", open_start).await;
    let deadline = Instant::now() + WAIT;
    while txn_records(&universe) > 0 {
        assert!(
            Instant::now() < deadline,
            "outcome records were never dropped"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What the safe point left readable is still right.
    assert_eq!(
        savings.get("k").await.expect("read"),
        Some(Bytes::from_static(b"v2"))
    );
    let late = db.read_only_at(open_start);
    assert!(matches!(
        late.get(&savings, "k").await,
        Err(ClientError::SnapshotTooOld { .. })
    ));
}
