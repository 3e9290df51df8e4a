//! Truncation and snapshots through [`RaftStream`] on running nodes: a live subscription on
//! a follower that falls behind the leader's compacted log receives the snapshot, then the
//! entries after it. Every test is bounded by [`LIMIT`].

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;
use luna_kernel::stream::{Committed, Stream, StreamError};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use super::super::harness::dir_bytes;
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

/// Truncating gives the log's space back, purged on the driver's purge thread, and a
/// shutdown stops that thread with the rest, so the engine opens again in a new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_gives_log_space_back_and_the_log_reopens() {
    tokio::time::timeout(LIMIT, async {
        let mut cluster = Cluster::tuned(1, 0, |config| {
            config.engine_file_size = 64 << 10;
            config.engine_purge_threshold = 256 << 10;
        })
        .await;
        let stream = cluster.stream(cluster.leader().await);
        // Incompressible entries, so the log really takes the space.
        let mut rng = SmallRng::seed_from_u64(2);
        let mut last = 0;
        for _ in 0..30 {
            let appends: Vec<_> = (0..100)
                .map(|_| {
                    let mut data = vec![0u8; 1024];
                    rng.fill_bytes(&mut data);
                    let stream = Arc::clone(&stream);
                    tokio::spawn(async move { stream.append(Bytes::from(data)).await })
                })
                .collect();
            for append in appends {
                last = last.max(append.await.expect("join").expect("append"));
            }
        }
        while stream.committed_index() < last {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let dir = cluster.dirs[0].path().to_owned();
        let before = dir_bytes(&dir);
        stream
            .truncate(last, Bytes::from_static(b"all flushed"))
            .await
            .expect("truncate");
        while dir_bytes(&dir) * 2 >= before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(stream);
        cluster.stop(1).await;
        cluster.start(1).await;
        let mut subscription = cluster.stream(1).subscribe(1).await.expect("subscribe");
        match subscription.next().await {
            Some(Ok(Committed::Snapshot(snapshot))) => {
                assert_eq!(
                    (snapshot.index, &snapshot.data[..]),
                    (last, &b"all flushed"[..])
                );
            }
            other => panic!("expected the snapshot, got {other:?}"),
        }
    })
    .await
    .expect("test timed out");
}
