//! Journal servers in one process, connected by the gRPC transport over loopback: three
//! voters, and for membership changes a fourth server that joins later. Every test is
//! bounded by `LIMIT`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use luna_journal::JournalError;
use luna_journal::raft::grpc::GrpcNode;
use luna_journal::raft::{Membership, RaftConfig, RaftStream};
use luna_kernel::stream::{Committed, Snapshot, Stream, StreamError};
use luna_proto::journal::RaftBatch;
use luna_proto::journal::raft_transport_client::RaftTransportClient;
use tempfile::TempDir;
use tokio::net::TcpListener;

const STREAM: u64 = 1;
const LIMIT: Duration = Duration::from_secs(60);

/// The stream's voters at index 0, on every server (including one that joins later).
const VOTERS: [u64; 3] = [1, 2, 3];

struct Cluster {
    dirs: Vec<TempDir>,
    addrs: HashMap<u64, SocketAddr>,
    nodes: Vec<Option<(GrpcNode, Arc<RaftStream>)>>,
    /// Listeners of servers that have not started yet (their peers know the address).
    spare: HashMap<u64, TcpListener>,
}

impl Cluster {
    async fn new() -> Self {
        Self::with_spares(0).await
    }

    /// The three voters, started, and `spares` more servers whose addresses every server
    /// knows but that do not run yet.
    async fn with_spares(spares: u64) -> Self {
        let size = 3 + spares;
        let mut listeners = Vec::new();
        let mut addrs = HashMap::new();
        for id in 1..=size {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.insert(id, listener.local_addr().expect("addr"));
            listeners.push(listener);
        }
        let mut cluster = Self {
            dirs: (0..size)
                .map(|_| tempfile::tempdir().expect("tempdir"))
                .collect(),
            addrs,
            nodes: (0..size).map(|_| None).collect(),
            spare: HashMap::new(),
        };
        for (id, listener) in (1..=size).zip(listeners) {
            if VOTERS.contains(&id) {
                cluster.start_on(id, listener).await;
            } else {
                cluster.spare.insert(id, listener);
            }
        }
        cluster
    }

    /// Starts a spare server.
    async fn start_spare(&mut self, id: u64) {
        let listener = self.spare.remove(&id).expect("a spare server");
        self.start_on(id, listener).await;
    }

    async fn start_on(&mut self, id: u64, listener: TcpListener) {
        let mut config = RaftConfig::new(id, self.dirs[id as usize - 1].path());
        config.tick_interval = Duration::from_millis(20);
        let node = GrpcNode::start(config, listener, &self.addrs).expect("start");
        let stream = node
            .node()
            .add_stream(STREAM, &VOTERS)
            .await
            .expect("add stream");
        self.nodes[id as usize - 1] = Some((node, Arc::new(stream)));
    }

    /// Restarts server `id` on its old address (the old listener may take a moment to go).
    async fn restart(&mut self, id: u64) {
        let addr = self.addrs[&id];
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.start_on(id, listener).await;
    }

    async fn kill(&mut self, id: u64) {
        if let Some((node, _)) = self.nodes[id as usize - 1].take() {
            node.shutdown().await;
        }
    }

    fn stream(&self, id: u64) -> Arc<RaftStream> {
        let (_, stream) = self.nodes[id as usize - 1].as_ref().expect("node is up");
        Arc::clone(stream)
    }

    async fn leader(&self) -> u64 {
        loop {
            for (id, slot) in (1..).zip(&self.nodes) {
                if let Some((_, stream)) = slot
                    && stream.leadership().is_leader
                {
                    return id;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Appends `count` entries concurrently on the leader, retrying on `NotLeader` (a
    /// leader that just lost its term); returns what was acknowledged.
    async fn append_many(&self, count: usize, tag: &str, acked: &mut BTreeMap<u64, Bytes>) {
        let mut remaining: Vec<Bytes> = (0..count)
            .map(|i| Bytes::from(format!("{tag}-{i}")))
            .collect();
        while !remaining.is_empty() {
            let leader = self.stream(self.leader().await);
            let mut tasks = Vec::new();
            for data in std::mem::take(&mut remaining) {
                let stream = Arc::clone(&leader);
                tasks.push(tokio::spawn(async move {
                    (stream.append(data.clone()).await, data)
                }));
            }
            for task in tasks {
                match task.await.expect("join") {
                    (Ok(index), data) => {
                        assert!(acked.insert(index, data).is_none(), "{index} twice")
                    }
                    (Err(StreamError::NotLeader { .. }), data) => remaining.push(data),
                    (Err(e), _) => panic!("append failed: {e}"),
                }
            }
        }
    }
}

/// What a subscription from 1 delivers up to `to`: the snapshot, if the log was
/// compacted, and every non-empty entry after it.
async fn subscribe_all(stream: &RaftStream, to: u64) -> (Option<Snapshot>, BTreeMap<u64, Bytes>) {
    while stream.committed_index() < to {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut subscription = stream.subscribe(1).await.expect("subscribe");
    let (mut snapshot, mut seen) = (None, BTreeMap::new());
    let mut expected = 1;
    while expected <= to {
        match subscription.next().await.expect("open").expect("item") {
            Committed::Snapshot(s) => {
                assert!(
                    snapshot.is_none() && seen.is_empty(),
                    "snapshot after entries"
                );
                expected = s.index + 1;
                snapshot = Some(s);
            }
            Committed::Entry(entry) => {
                assert_eq!(entry.index, expected, "subscription skipped or reordered");
                expected += 1;
                if !entry.data.is_empty() {
                    seen.insert(entry.index, entry.data);
                }
            }
        }
    }
    (snapshot, seen)
}

/// Every non-empty entry of `stream` up to `to`, through a subscription from 1 of a log
/// that was never compacted.
async fn read_all(stream: &RaftStream, to: u64) -> BTreeMap<u64, Bytes> {
    let (snapshot, seen) = subscribe_all(stream, to).await;
    assert_eq!(snapshot, None);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_and_full_restart_keep_every_acknowledged_entry() {
    tokio::time::timeout(LIMIT, async {
        let mut cluster = Cluster::new().await;
        let mut acked = BTreeMap::new();
        cluster.append_many(200, "first", &mut acked).await;

        let old = cluster.leader().await;
        cluster.kill(old).await;
        let new = cluster.leader().await;
        assert_ne!(new, old, "a dead server cannot lead");
        cluster.append_many(100, "second", &mut acked).await;

        for id in 1..=3 {
            cluster.kill(id).await;
        }
        for id in 1..=3 {
            cluster.restart(id).await;
        }
        cluster.append_many(1, "final", &mut acked).await;
        let last = *acked.keys().next_back().expect("acked");
        for id in 1..=3 {
            assert_eq!(
                read_all(&cluster.stream(id), last).await,
                acked,
                "replica {id}"
            );
        }
        for id in 1..=3 {
            cluster.kill(id).await;
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_a_peer_is_ignored() {
    tokio::time::timeout(LIMIT, async {
        let mut cluster = Cluster::new().await;
        let mut acked = BTreeMap::new();
        cluster.append_many(10, "before", &mut acked).await;
        let leader = cluster.leader().await;
        let endpoint = format!("http://{}", cluster.addrs[&leader]);
        let mut client = RaftTransportClient::connect(endpoint)
            .await
            .expect("connect");
        let batches = vec![
            RaftBatch {
                from: 9,
                to: leader,
                messages: vec![
                    Bytes::new(),
                    Bytes::from_static(b"\x01\0\0\0\0\0\0\0not a raft message"),
                    Bytes::from(vec![0xff; 100]),
                ],
            },
            RaftBatch {
                from: 2,
                to: 42,
                messages: vec![Bytes::from_static(b"for someone else")],
            },
        ];
        // The receiver may end the exchange or not; either way it must keep serving.
        let _ = client.exchange(tokio_stream::iter(batches)).await;
        cluster.append_many(10, "after", &mut acked).await;
        assert_eq!(acked.len(), 20);
        for id in 1..=3 {
            cluster.kill(id).await;
        }
    })
    .await
    .expect("test timed out");
}

/// Retries a membership change while the stream is busy or the learner still catches up.
async fn change(what: &str, op: impl AsyncFn() -> Result<u64, JournalError>) -> u64 {
    loop {
        match op().await {
            Ok(index) => return index,
            Err(JournalError::ChangeInProgress { .. } | JournalError::NotCaughtUp { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_added_after_truncation_catches_up_from_the_snapshot_and_votes() {
    tokio::time::timeout(LIMIT, async {
        let mut cluster = Cluster::with_spares(1).await;
        let mut acked = BTreeMap::new();
        cluster.append_many(200, "before", &mut acked).await;
        let last = *acked.keys().next_back().expect("acked");
        // Every replica's application has flushed up to `last` and truncates there.
        let data = Bytes::from(format!("tablets flushed to {last}"));
        for id in VOTERS {
            let stream = cluster.stream(id);
            while stream.committed_index() < last {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            stream.truncate(last, data.clone()).await.expect("truncate");
        }
        // Server 4 starts with the initial voters, is added as a learner and gets the
        // snapshot: the log it would need from index 1 is gone everywhere.
        cluster.start_spare(4).await;
        let leader = cluster.stream(cluster.leader().await);
        change("add learner", || leader.add_learner(4)).await;
        cluster.append_many(50, "learning", &mut acked).await;
        let end = *acked.keys().next_back().expect("acked");
        let learner = cluster.stream(4);
        let (snapshot, seen) = subscribe_all(&learner, end).await;
        let snapshot = snapshot.expect("the learner caught up without the snapshot");
        assert_eq!(snapshot.data, data);
        assert!(snapshot.index >= last, "snapshot at {}", snapshot.index);
        let mut expected = acked.clone();
        expected.retain(|&index, _| index > snapshot.index);
        assert_eq!(seen, expected, "the learner's entries after the snapshot");

        // Promoted, it is a voter: it can lead, and with one old voter down the other two
        // and server 4 still make a quorum of four.
        change("promote", || leader.promote(4)).await;
        let voters = Membership {
            voters: vec![1, 2, 3, 4],
            learners: Vec::new(),
            outgoing: Vec::new(),
        };
        assert_eq!(leader.membership(), voters);
        // Server 4 applies the change it received like any other entry.
        while learner.membership() != voters {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let term = loop {
            let leader = cluster.stream(cluster.leader().await);
            match leader.transfer_leader(4).await {
                Ok(term) => break term,
                Err(JournalError::LeaderTransfer { .. } | JournalError::Stream { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("transfer: {e}"),
            }
        };
        while !learner.leadership().is_leader {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(learner.leadership().term >= term);
        let index = learner
            .append(Bytes::from_static(b"led by 4"))
            .await
            .expect("append on 4");
        acked.insert(index, Bytes::from_static(b"led by 4"));
        cluster.kill(1).await;
        cluster.append_many(20, "three of four", &mut acked).await;
        let end = *acked.keys().next_back().expect("acked");
        for id in [2, 3, 4] {
            let (snapshot, seen) = subscribe_all(&cluster.stream(id), end).await;
            let start = snapshot.map_or(1, |s| s.index + 1);
            let mut expected = acked.clone();
            expected.retain(|&index, _| index >= start);
            assert_eq!(seen, expected, "replica {id}");
        }
        for id in [2, 3, 4] {
            cluster.kill(id).await;
        }
    })
    .await
    .expect("test timed out");
}
