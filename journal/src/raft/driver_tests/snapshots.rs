//! Truncation and snapshots through [`RaftStream`] on running nodes: a live subscription on
//! a follower that falls behind the leader's compacted log receives the snapshot, then the
//! entries after it. Every test is bounded by [`LIMIT`].

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use luna_kernel::stream::{Committed, Stream, StreamError};

use super::{Cluster, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_subscription_on_a_lagging_follower_receives_the_snapshot() {
    tokio::time::timeout(LIMIT, async {
        let mut cluster = Cluster::new(3).await;
        let before = cluster.append_many(20, "before").await;
        let leader_id = cluster.leader().await;
        let follower_id = (1..=3).find(|&id| id != leader_id).expect("a follower");
        let follower = cluster.stream(follower_id);
        let first_last = *before.keys().next_back().expect("acked");
        while follower.committed_index() < first_last {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut subscription = follower.subscribe(1).await.expect("subscribe");
        let mut next = 1;
        while next <= first_last {
            match subscription.next().await {
                Some(Ok(Committed::Entry(entry))) => {
                    assert_eq!(entry.index, next);
                    next += 1;
                }
                other => panic!("expected entry {next}, got {other:?}"),
            }
        }
        // The follower is cut off while the others move on and compact past it.
        cluster.network.isolate(follower_id);
        let after = cluster.append_many(50, "after").await;
        assert!(after.keys().all(|&index| index > first_last));
        let last = *after.keys().next_back().expect("acked");
        let data = Bytes::from(format!("tablets flushed to {last}"));
        for id in (1..=3).filter(|&id| id != follower_id) {
            let stream = cluster.stream(id);
            while stream.committed_index() < last {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stream.truncate(last, data.clone()).await.expect("truncate");
        }
        // Past the follower's committed index: typed, and nothing changes.
        let err = follower
            .truncate(last, Bytes::from_static(b"too far"))
            .await
            .expect_err("beyond committed");
        assert!(matches!(err, StreamError::BeyondCommitted { .. }), "{err}");
        cluster.network.heal();
        // With nothing appended after the compaction, installing the snapshot alone must
        // reach the subscriber.
        let snapshot = match subscription.next().await {
            Some(Ok(Committed::Snapshot(snapshot))) => snapshot,
            other => panic!("expected the snapshot, got {other:?}"),
        };
        assert_eq!((snapshot.index, snapshot.data), (last, data));
        next = last + 1;
        // Fresh entries after the snapshot arrive as entries.
        let tail = cluster.append_many(10, "tail").await;
        let end = *tail.keys().next_back().expect("acked");
        let mut entries = BTreeMap::new();
        while next <= end {
            match subscription.next().await {
                Some(Ok(Committed::Entry(entry))) => {
                    assert_eq!(entry.index, next, "skipped or reordered");
                    next += 1;
                    if !entry.data.is_empty() {
                        entries.insert(entry.index, entry.data);
                    }
                }
                other => panic!("subscription ended: {other:?}"),
            }
        }
        assert_eq!(entries, tail);
        for id in 1..=3 {
            cluster.stop(id).await;
        }
    })
    .await
    .expect("test timed out");
}
