//! Tests of the driver and [`RaftStream`] over the in-memory transport, on real time with
//! short ticks. Every test is bounded by [`LIMIT`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use luna_kernel::stream::{Committed, Stream, StreamError};
use tempfile::TempDir;

use super::{MemNetwork, Node, RaftConfig, RaftStream, Transport};

mod admin;
mod snapshots;

const STREAM: u64 = 3;
const LIMIT: Duration = Duration::from_secs(30);

struct Cluster {
    network: Arc<MemNetwork>,
    dirs: Vec<TempDir>,
    nodes: Vec<Option<(Node, Arc<RaftStream>)>>,
    /// The stream's voters at index 0, with which every replica bootstraps.
    initial: Vec<u64>,
    /// Adjusts each server's configuration before it starts.
    tune: fn(&mut RaftConfig),
}

fn config(id: u64, dir: &TempDir) -> RaftConfig {
    let mut config = RaftConfig::new(id, dir.path());
    config.tick_interval = Duration::from_millis(10);
    config
}

impl Cluster {
    async fn new(size: u64) -> Self {
        Self::with_spares(size, 0).await
    }

    /// `size` voters, started, and `spares` more servers that are not.
    async fn with_spares(size: u64, spares: u64) -> Self {
        Self::tuned(size, spares, |_| {}).await
    }

    /// As [`with_spares`](Self::with_spares), with every configuration passed to `tune`.
    async fn tuned(size: u64, spares: u64, tune: fn(&mut RaftConfig)) -> Self {
        let mut cluster = Self {
            network: MemNetwork::new(),
            dirs: (0..size + spares)
                .map(|_| tempfile::tempdir().expect("tempdir"))
                .collect(),
            nodes: (0..size + spares).map(|_| None).collect(),
            initial: (1..=size).collect(),
            tune,
        };
        for id in 1..=size {
            cluster.start(id).await;
        }
        cluster
    }

    async fn start(&mut self, id: u64) {
        let transport = self.network.transport(id) as Arc<dyn Transport>;
        let dir = &self.dirs[id as usize - 1];
        let mut config = config(id, dir);
        (self.tune)(&mut config);
        let node = Node::start(config, transport).expect("start node");
        self.network.register(id, node.inbox());
        let stream = node
            .add_stream(STREAM, &self.initial)
            .await
            .expect("add stream");
        self.nodes[id as usize - 1] = Some((node, Arc::new(stream)));
    }

    async fn stop(&mut self, id: u64) {
        if let Some((node, _)) = self.nodes[id as usize - 1].take() {
            node.shutdown().await;
        }
    }

    fn stream(&self, id: u64) -> Arc<RaftStream> {
        let (_, stream) = self.nodes[id as usize - 1].as_ref().expect("node is up");
        Arc::clone(stream)
    }

    /// Waits until a live node leads; returns its id.
    async fn leader(&self) -> u64 {
        loop {
            for (node, stream) in self.nodes.iter().flatten() {
                if stream.leadership().is_leader {
                    return node.node_id();
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Cuts the leader off the network and waits for another node to lead; returns the old
    /// and the new leader.
    async fn isolate_leader(&self) -> (u64, u64) {
        let old = self.leader().await;
        self.network.isolate(old);
        loop {
            let id = self.leader().await;
            if id != old {
                return (old, id);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Appends `count` entries concurrently on the leader; returns index -> data.
    async fn append_many(&self, count: usize, tag: &str) -> BTreeMap<u64, Bytes> {
        let mut pending: Vec<Bytes> = (0..count)
            .map(|i| Bytes::from(format!("{tag}-{i}")))
            .collect();
        let mut acked = BTreeMap::new();
        // A leader change on a loaded machine answers NotLeader, which promises the entry
        // never commits: those are sent again to the new leader.
        for _ in 0..20 {
            if pending.is_empty() {
                break;
            }
            let leader = self.stream(self.leader().await);
            let tasks: Vec<_> = pending
                .drain(..)
                .map(|data| {
                    let stream = Arc::clone(&leader);
                    tokio::spawn(async move { (stream.append(data.clone()).await, data) })
                })
                .collect();
            for task in tasks {
                match task.await.expect("join") {
                    (Ok(index), data) => {
                        assert!(acked.insert(index, data).is_none(), "index {index} twice")
                    }
                    (Err(StreamError::NotLeader { .. }), data) => pending.push(data),
                    (Err(error), _) => panic!("append failed: {error}"),
                }
            }
        }
        assert!(
            pending.is_empty(),
            "{} appends never found a stable leader",
            pending.len()
        );
        acked
    }
}

/// Reads every non-empty entry of `stream` up to `to` through a subscription.
async fn read_all(stream: &RaftStream, to: u64) -> BTreeMap<u64, Bytes> {
    let mut subscription = stream.subscribe(1).await.expect("subscribe");
    let mut seen = BTreeMap::new();
    let mut expected = 1;
    while expected <= to {
        let item = subscription.next().await.expect("open").expect("entry");
        let Committed::Entry(entry) = item else {
            panic!("unexpected {item:?}")
        };
        assert_eq!(entry.index, expected, "subscription skipped or reordered");
        expected += 1;
        if !entry.data.is_empty() {
            seen.insert(entry.index, entry.data);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_commit_once_and_reach_every_replica() {
    tokio::time::timeout(LIMIT, async {
        let cluster = Cluster::new(3).await;
        let acked = cluster.append_many(300, "a").await;
        let last = *acked.keys().next_back().expect("acked");
        let leader = cluster.leader().await;
        // One fsync covers many concurrent appends.
        let (node, _) = cluster.nodes[leader as usize - 1].as_ref().expect("up");
        let stats = node.stats();
        assert!(
            stats.fsyncs < 300,
            "{} fsyncs for 300 appends",
            stats.fsyncs
        );
        assert!(stats.fsyncs > 0 && stats.sync_micros > 0, "{stats:?}");
        for id in 1..=3 {
            let stream = cluster.stream(id);
            // A read barrier on any replica covers every acknowledged append.
            let barrier = stream.read_index().await.expect("read_index");
            assert!(barrier >= last, "read_index {barrier} < acked {last}");
            assert_eq!(read_all(&stream, last).await, acked, "replica {id}");
        }
        let follower = if leader == 1 { 2 } else { 1 };
        match cluster
            .stream(follower)
            .append(Bytes::from_static(b"x"))
            .await
        {
            Err(StreamError::NotLeader { leader_hint, .. }) => {
                assert_eq!(leader_hint, Some(leader))
            }
            other => panic!("expected NotLeader, got {other:?}"),
        }
        let stream = cluster.stream(leader);
        assert!(matches!(
            stream.append(Bytes::new()).await,
            Err(StreamError::EmptyEntry)
        ));
        let big = Bytes::from(vec![1; stream.max_entry_size() + 1]);
        assert!(matches!(
            stream.append(big).await,
            Err(StreamError::EntryTooLarge { .. })
        ));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_is_replaced_and_restart_keeps_everything() {
    tokio::time::timeout(LIMIT, async {
        let mut cluster = Cluster::new(3).await;
        let mut acked = cluster.append_many(50, "before").await;
        let (_, new) = cluster.isolate_leader().await;
        // The old leader learns nothing while isolated; appends go to the new one.
        let leader = cluster.stream(new);
        for i in 0..50 {
            let data = Bytes::from(format!("after-{i}"));
            let index = leader.append(data.clone()).await.expect("append");
            assert!(acked.insert(index, data).is_none());
        }
        cluster.network.heal();
        for id in 1..=3 {
            cluster.stop(id).await;
        }
        for id in 1..=3 {
            cluster.start(id).await;
        }
        let leader = cluster.stream(cluster.leader().await);
        // A fresh entry in the new term commits everything before it.
        let last = leader
            .append(Bytes::from_static(b"final"))
            .await
            .expect("append");
        acked.insert(last, Bytes::from_static(b"final"));
        for id in 1..=3 {
            let stream = cluster.stream(id);
            while stream.committed_index() < last {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(read_all(&stream, last).await, acked, "replica {id}");
        }
        // After a truncation a subscription below it starts with the snapshot.
        let data = Bytes::from_static(b"state at 10");
        leader.truncate(10, data.clone()).await.expect("truncate");
        let mut subscription = leader.subscribe(5).await.expect("subscribe");
        match subscription.next().await {
            Some(Ok(Committed::Snapshot(snapshot))) => {
                assert_eq!((snapshot.index, snapshot.data), (10, data))
            }
            other => panic!("expected the snapshot, got {other:?}"),
        }
        match subscription.next().await {
            Some(Ok(Committed::Entry(entry))) => assert_eq!(entry.index, 11),
            other => panic!("expected entry 11, got {other:?}"),
        }
        for id in 1..=3 {
            cluster.stop(id).await;
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_after_shutdown_are_closed() {
    tokio::time::timeout(LIMIT, async {
        let mut cluster = Cluster::new(1).await;
        let stream = cluster.stream(1);
        cluster.leader().await;
        let index = stream
            .append(Bytes::from_static(b"one"))
            .await
            .expect("append");
        assert_eq!(stream.read_index().await.expect("read"), index);
        cluster.stop(1).await;
        assert!(matches!(
            stream.append(Bytes::from_static(b"two")).await,
            Err(StreamError::Closed)
        ));
        assert!(matches!(
            stream.read_index().await,
            Err(StreamError::Closed)
        ));
    })
    .await
    .expect("test timed out");
}

/// Lease reads on a stream handle answer from the lease the ready loop published: at or past
/// every acknowledged append, and never once another leader may have acknowledged more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_reads_cover_acknowledged_appends_and_end_with_the_lease() {
    tokio::time::timeout(LIMIT, async {
        let mut cluster = Cluster::new(3).await;
        cluster.append_many(10, "warm").await;
        let old = cluster.leader().await;
        let leader = cluster.stream(old);
        for i in 0..200 {
            let index = match leader.append(Bytes::from(format!("entry-{i}"))).await {
                Ok(index) => index,
                // A leader change on a loaded machine: the rest of the test needs a new one.
                Err(StreamError::NotLeader { .. }) => break,
                Err(error) => panic!("append failed: {error}"),
            };
            let read = leader
                .read_index_by_lease()
                .await
                .expect("lease read on the leader");
            assert!(
                read >= index,
                "lease read at {read} after append {index} was acknowledged"
            );
        }

        let (old, new) = cluster.isolate_leader().await;
        let acked = cluster
            .stream(new)
            .append(Bytes::from_static(b"on the new leader"))
            .await
            .expect("append on the new leader");
        let stale = tokio::time::timeout(
            Duration::from_secs(1),
            cluster.stream(old).read_index_by_lease(),
        )
        .await;
        assert!(
            !matches!(stale, Ok(Ok(index)) if index < acked),
            "the isolated old leader answered {stale:?} after the new leader acknowledged {acked}"
        );
        cluster.network.heal();
        for id in 1..=3 {
            cluster.stop(id).await;
        }
    })
    .await
    .expect("test timed out");
}

/// The driver uncounts the peer bytes it handles, so a node's inbox keeps accepting
/// batches (garbage here, which the driver logs and ignores) long past its bound in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handled_peer_messages_leave_the_inbox_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let network = MemNetwork::new();
    let node = Node::start(config(1, &dir), network.transport(1)).expect("node");
    let inbox = node.inbox();
    let garbage = Bytes::from(vec![0u8; 100 << 20]);
    tokio::time::timeout(LIMIT, async {
        for _ in 0..4 {
            assert!(inbox.deliver(2, vec![garbage.clone()]));
            while node.stats().peer_bytes_queued > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    })
    .await
    .expect("the driver handles the batches");
    assert_eq!(node.stats().peer_batches_dropped, 0);
    node.shutdown().await;
}

/// A heartbeat whose commit is past this replica's log (its leader counted entries as
/// durable here that the log no longer holds: a wiped directory) fails the node cleanly:
/// it says why, so that its server can step aside, and its streams are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_log_was_lost_reports_the_failure() {
    use raft::eraftpb::{Message, MessageType};

    let dir = tempfile::tempdir().expect("tempdir");
    let network = MemNetwork::new();
    let node = Node::start(config(1, &dir), network.transport(1)).expect("node");
    let stream = node.add_stream(STREAM, &[1, 2]).await.expect("stream");
    assert_eq!(node.failure(), None);
    let mut heartbeat = Message::default();
    heartbeat.set_msg_type(MessageType::MsgHeartbeat);
    heartbeat.from = 2;
    heartbeat.to = 1;
    heartbeat.term = 5;
    heartbeat.commit = 1_000;
    let envelope = super::server::encode_envelope(STREAM, &heartbeat).expect("encode");
    assert!(node.inbox().deliver(2, vec![envelope]));
    let failure = reported_failure(&node).await;
    assert!(failure.contains("the log was lost"), "{failure}");
    assert!(matches!(
        stream.append(Bytes::from_static(b"x")).await,
        Err(StreamError::Corruption { .. })
    ));
}

/// A panic on the driver thread (a bug, ours or raft-rs's) ends the node cleanly too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_that_panics_reports_the_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(config(1, &dir), MemNetwork::new().transport(1)).expect("node");
    let stream = node.add_stream(STREAM, &[1]).await.expect("stream");
    node.inject_panic();
    let failure = reported_failure(&node).await;
    assert!(failure.contains("panicked"), "{failure}");
    assert!(matches!(
        stream.append(Bytes::from_static(b"x")).await,
        Err(StreamError::Closed)
    ));
}

/// Waits until `node` reports why it failed.
async fn reported_failure(node: &Node) -> String {
    tokio::time::timeout(LIMIT, async {
        loop {
            if let Some(failure) = node.failure() {
                return failure;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the node reports its failure")
}

/// A bound on unsynced writes below one entry would refuse entries that are allowed.
#[test]
fn a_server_refuses_an_unsynced_bound_below_its_entry_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config(1, &dir);
    config.max_unsynced_bytes = config.max_entry_size - 1;
    match Node::start(config, MemNetwork::new().transport(1)) {
        Err(crate::JournalError::InvalidConfig { name, .. }) => {
            assert_eq!(name, "max_unsynced_bytes")
        }
        Err(other) => panic!("expected InvalidConfig, got {other}"),
        Ok(_) => panic!("expected InvalidConfig, the node started"),
    }
}
