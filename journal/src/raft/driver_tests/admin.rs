//! Membership changes, leader transfer and lease reads through [`RaftStream`] on running
//! nodes. Every test is bounded by [`LIMIT`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use luna_kernel::stream::{Stream, StreamError};

use super::{Cluster, LIMIT, STREAM, read_all};
use crate::error::JournalError;
use crate::raft::{Membership, RaftStream};

/// Appends `count` entries one after another on `stream`, in a task.
fn append_in_background(
    stream: Arc<RaftStream>,
    count: usize,
) -> tokio::task::JoinHandle<BTreeMap<u64, Bytes>> {
    tokio::spawn(async move {
        let mut acked = BTreeMap::new();
        for i in 0..count {
            let data = Bytes::from(format!("during-{i}"));
            let index = stream.append(data.clone()).await.expect("append");
            acked.insert(index, data);
        }
        acked
    })
}

async fn wait_committed(stream: &RaftStream, index: u64) {
    while stream.committed_index() < index {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_catches_up_is_promoted_and_the_new_membership_survives_restart() {
    tokio::time::timeout(LIMIT, async {
        let mut cluster = Cluster::with_spares(3, 1).await;
        let mut acked = cluster.append_many(100, "before").await;
        let leader_id = cluster.leader().await;
        let leader = cluster.stream(leader_id);
        // Server 4 hosts the stream with its initial voters and catches up from index 1.
        cluster.start(4).await;
        leader.add_learner(4).await.expect("add learner");
        let learner = cluster.stream(4);
        let last = *acked.keys().next_back().expect("acked");
        wait_committed(&learner, last).await;
        assert_eq!(read_all(&learner, last).await, acked, "learner's log");
        assert!(matches!(
            learner.append(Bytes::from_static(b"x")).await,
            Err(StreamError::NotLeader { .. })
        ));
        // Promote it, then remove an old follower, while appends continue.
        let during = append_in_background(Arc::clone(&leader), 100);
        loop {
            match leader.promote(4).await {
                Ok(_) => break,
                Err(JournalError::NotCaughtUp { .. }) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("promote: {e}"),
            }
        }
        let removed = (1..=3).find(|&id| id != leader_id).expect("a follower");
        leader.remove(removed).await.expect("remove");
        acked.extend(during.await.expect("join"));
        let voters: Vec<u64> = (1..=4).filter(|&id| id != removed).collect();
        let expected = Membership {
            voters: voters.clone(),
            learners: Vec::new(),
            outgoing: Vec::new(),
        };
        assert_eq!(leader.membership(), expected);
        // The leader cannot remove itself.
        let without_leader: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|&id| id != leader_id)
            .collect();
        assert!(matches!(
            leader.change_membership(&without_leader, &[]).await,
            Err(JournalError::Membership { .. })
        ));
        // The removed replica deletes its copy: restarted, it starts again from the
        // initial voters, with nothing of the log.
        let (node, handle) = cluster.nodes[removed as usize - 1]
            .as_ref()
            .expect("removed node is up");
        assert!(node.remove_stream(STREAM).await.expect("remove stream"));
        assert!(!node.remove_stream(STREAM).await.expect("remove again"));
        assert!(matches!(
            handle.read_index().await,
            Err(StreamError::Closed)
        ));
        cluster.stop(removed).await;
        cluster.start(removed).await;
        let fresh = Membership {
            voters: vec![1, 2, 3],
            ..Membership::default()
        };
        assert_eq!(cluster.stream(removed).membership(), fresh);
        cluster.stop(removed).await;
        for &id in &voters {
            cluster.stop(id).await;
        }
        for &id in &voters {
            cluster.start(id).await;
            assert_eq!(cluster.stream(id).membership(), expected, "replica {id}");
        }
        let leader = cluster.stream(cluster.leader().await);
        let last = leader
            .append(Bytes::from_static(b"final"))
            .await
            .expect("append after restart");
        acked.insert(last, Bytes::from_static(b"final"));
        for &id in &voters {
            let stream = cluster.stream(id);
            wait_committed(&stream, last).await;
            assert_eq!(read_all(&stream, last).await, acked, "replica {id}");
        }
        for &id in &voters {
            cluster.stop(id).await;
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_transfer_completes_and_lease_reads_cover_acknowledged_appends() {
    tokio::time::timeout(LIMIT, async {
        let mut cluster = Cluster::new(3).await;
        cluster.append_many(20, "before").await;
        let old = cluster.leader().await;
        let to = (1..=3).find(|&id| id != old).expect("a follower");
        let follower = (1..=3)
            .find(|&id| id != old && id != to)
            .expect("a follower");
        assert!(matches!(
            cluster.stream(follower).transfer_leader(to).await,
            Err(JournalError::Stream {
                source: StreamError::NotLeader { .. },
                ..
            })
        ));
        let term = cluster
            .stream(old)
            .transfer_leader(to)
            .await
            .expect("transfer");
        let leadership = cluster.stream(to).leadership();
        assert!(
            leadership.is_leader && leadership.term == term,
            "{leadership:?}"
        );
        assert_eq!(cluster.leader().await, to);
        // Lease reads on the new leader cover every acknowledged append; after the first
        // renews the lease they are answered without a heartbeat round.
        let leader = cluster.stream(to);
        for round in 0..20 {
            let acked = cluster.append_many(5, &format!("r{round}")).await;
            let last = *acked.keys().next_back().expect("acked");
            let index = leader.read_index_by_lease().await.expect("lease read");
            assert!(index >= last, "lease read {index} < acked {last}");
            // A follower's lease read is a read barrier through the leader.
            let index = cluster
                .stream(old)
                .read_index_by_lease()
                .await
                .expect("follower read");
            assert!(index >= last, "follower read {index} < acked {last}");
        }
        for id in 1..=3 {
            cluster.stop(id).await;
        }
    })
    .await
    .expect("test timed out");
}
