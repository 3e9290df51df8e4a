//! Three journal servers in one process, connected by the gRPC transport over loopback.
//! Every test is bounded by `LIMIT`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use luna_journal::raft::grpc::GrpcNode;
use luna_journal::raft::{RaftConfig, RaftStream};
use luna_kernel::stream::{Stream, StreamError};
use luna_proto::journal::RaftBatch;
use luna_proto::journal::raft_transport_client::RaftTransportClient;
use tempfile::TempDir;
use tokio::net::TcpListener;

const STREAM: u64 = 1;
const LIMIT: Duration = Duration::from_secs(60);

struct Cluster {
    dirs: Vec<TempDir>,
    addrs: HashMap<u64, SocketAddr>,
    nodes: Vec<Option<(GrpcNode, Arc<RaftStream>)>>,
}

impl Cluster {
    async fn new() -> Self {
        let mut listeners = Vec::new();
        let mut addrs = HashMap::new();
        for id in 1..=3u64 {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.insert(id, listener.local_addr().expect("addr"));
            listeners.push(listener);
        }
        let mut cluster = Self {
            dirs: (0..3)
                .map(|_| tempfile::tempdir().expect("tempdir"))
                .collect(),
            addrs,
            nodes: (0..3).map(|_| None).collect(),
        };
        for (id, listener) in (1..=3u64).zip(listeners) {
            cluster.start_on(id, listener).await;
        }
        cluster
    }

    async fn start_on(&mut self, id: u64, listener: TcpListener) {
        let mut config = RaftConfig::new(id, self.dirs[id as usize - 1].path());
        config.tick_interval = Duration::from_millis(20);
        let node = GrpcNode::start(config, listener, &self.addrs).expect("start");
        let stream = node
            .node()
            .add_stream(STREAM, &[1, 2, 3])
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

/// Every non-empty entry of `stream` up to `to`, through a subscription from 1.
async fn read_all(stream: &RaftStream, to: u64) -> BTreeMap<u64, Bytes> {
    while stream.committed_index() < to {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut subscription = stream.subscribe(1).await.expect("subscribe");
    let mut seen = BTreeMap::new();
    for expected in 1..=to {
        let entry = subscription.next().await.expect("open").expect("entry");
        assert_eq!(entry.index, expected, "subscription skipped or reordered");
        if !entry.data.is_empty() {
            seen.insert(entry.index, entry.data);
        }
    }
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
