//! A master and three tablet servers in one process on loopback: writes replicate through
//! the group's journal, reads see them, a retried write applies once, a new leader keeps
//! every acknowledged write, and a restart brings everything back.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use luna_journal::{LocalConfig, LocalStream};
use luna_kernel::objstore::{LunaObjectStore, ObjectStoreOptions, open_object_store};
use luna_kernel::stream::Stream;
use luna_master::{Master, MasterConfig};
use luna_proto::master::{CollectionRoute, CreateCollectionRequest, Partitioning};
use luna_proto::tablet::tablet_client::TabletClient;
use luna_proto::tablet::{self as pb, mutation::Op};
use luna_tablet_server::{TabletServer, TabletServerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;

struct Universe {
    master: Option<Master>,
    master_stream: Arc<LocalStream>,
    master_addr: SocketAddr,
    master_task: JoinHandle<()>,
    servers: Vec<Option<TabletServer>>,
    dir: tempfile::TempDir,
    store: Arc<LunaObjectStore>,
}

async fn start_master(
    dir: &Path,
    addr: Option<SocketAddr>,
) -> (Master, Arc<LocalStream>, SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind(addr.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))))
        .await
        .expect("bind master");
    let addr = listener.local_addr().expect("master addr");
    let stream =
        Arc::new(LocalStream::open(LocalConfig::new(dir.join("master"))).expect("master journal"));
    let config = MasterConfig {
        heartbeat_timeout: Duration::from_secs(5),
        ..MasterConfig::default()
    };
    let master = Master::open(config, Arc::clone(&stream) as Arc<dyn Stream>)
        .await
        .expect("open master");
    let service = master.service();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    (master, stream, addr, task)
}

/// Stops a master and closes its journal, so the next one can open it.
async fn stop_master(master: Master, stream: Arc<LocalStream>, task: JoinHandle<()>) {
    task.abort();
    let _ = task.await;
    master.shutdown().await;
    // Connection tasks of the stopped service let go of the master a moment later.
    let mut stream = stream;
    for _ in 0..100 {
        match Arc::try_unwrap(stream) {
            Ok(stream) => return stream.close().await,
            Err(shared) => stream = shared,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the master journal is still in use 5 s after shutdown");
}

async fn start_server(
    dir: &Path,
    i: usize,
    master: SocketAddr,
    store: &Arc<LunaObjectStore>,
) -> TabletServer {
    let mut config = TabletServerConfig::new(
        dir.join(format!("server-{i}")),
        vec![master.to_string()],
        Arc::clone(store),
    );
    config.heartbeat_interval = Duration::from_millis(100);
    config.tick_interval = Duration::from_millis(20);
    // Small memtables flush often, so the logs get truncated behind snapshots.
    config.memstore.memtable_size = 16 * 1024;
    TabletServer::start(config)
        .await
        .expect("start tablet server")
}

impl Universe {
    async fn start() -> Universe {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().join("objects").display());
        std::fs::create_dir_all(dir.path().join("objects")).expect("objects dir");
        let store = open_object_store(&url, &ObjectStoreOptions::default()).expect("store");
        let (master, master_stream, master_addr, master_task) =
            start_master(dir.path(), None).await;
        let mut servers = Vec::new();
        for i in 0..3 {
            servers.push(Some(start_server(dir.path(), i, master_addr, &store).await));
        }
        Universe {
            master: Some(master),
            master_stream,
            master_addr,
            master_task,
            servers,
            dir,
            store,
        }
    }

    fn master(&self) -> &Master {
        self.master.as_ref().expect("master running")
    }

    /// Creates database `app` and its range collection `users`, split at `split_keys`, and
    /// waits for its routing.
    async fn create_users(&self, split_keys: Vec<Vec<u8>>) -> CollectionRoute {
        self.master()
            .create_database("app")
            .await
            .expect("create db");
        self.master()
            .create_collection(&CreateCollectionRequest {
                database: "app".to_owned(),
                name: "users".to_owned(),
                partitioning: Partitioning::Range as i32,
                split_keys,
                ..CreateCollectionRequest::default()
            })
            .await
            .expect("create collection");
        self.wait_route("app", "users").await
    }

    /// Waits until every tablet of the collection has a leader that serves it.
    async fn wait_route(&self, database: &str, collection: &str) -> CollectionRoute {
        for _ in 0..200 {
            if let Ok(route) = self.master().routing(database, collection)
                && !route.tablets.is_empty()
                && route
                    .tablets
                    .iter()
                    .all(|tablet| tablet.leader_server_id != 0)
            {
                return route;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("collection {database}/{collection} never got leaders");
    }

    async fn stop(mut self) {
        for server in self.servers.iter_mut().filter_map(Option::take) {
            server.shutdown().await;
        }
        if let Some(master) = self.master.take() {
            stop_master(master, self.master_stream, self.master_task).await;
        }
    }
}

async fn client(addr: &str) -> TabletClient<Channel> {
    TabletClient::connect(format!("http://{addr}"))
        .await
        .expect("connect tablet server")
}

fn put(key: &str, value: &str) -> pb::Mutation {
    pb::Mutation {
        op: Op::Put as i32,
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

/// Writes through whichever replica leads, following NotLeader hints.
async fn write(
    route: &CollectionRoute,
    tablet: usize,
    request_seq: u64,
    mutations: Vec<pb::Mutation>,
) -> u64 {
    write_above(route, tablet, request_seq, mutations, 0).await
}

/// [`write`] with a lower bound on the commit timestamp.
async fn write_above(
    route: &CollectionRoute,
    tablet: usize,
    request_seq: u64,
    mutations: Vec<pb::Mutation>,
    commit_above: u64,
) -> u64 {
    let tablet = &route.tablets[tablet];
    let info = tablet.tablet.as_ref().expect("tablet info");
    for _ in 0..100 {
        for replica in &tablet.replicas {
            let mut client = client(&replica.addr).await;
            let response = client
                .write(pb::WriteRequest {
                    tablet: Some(pb::TabletRef {
                        tablet_id: info.id,
                        epoch: info.epoch,
                    }),
                    request_id: Some(pb::RequestId {
                        client_id: Bytes::from_static(&[9; 16]),
                        seq: request_seq,
                        done_below: 0,
                    }),
                    mutations: mutations.clone(),
                    commit_above,
                })
                .await
                .expect("write rpc")
                .into_inner();
            if response.error.is_none() {
                return response.commit_ts;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no replica accepted the write");
}

async fn get(
    route: &CollectionRoute,
    tablet: usize,
    key: &str,
    mode: pb::ReadMode,
) -> Option<Bytes> {
    let tablet = &route.tablets[tablet];
    let info = tablet.tablet.as_ref().expect("tablet info");
    for _ in 0..100 {
        for replica in &tablet.replicas {
            let response = client(&replica.addr)
                .await
                .get(pb::GetRequest {
                    tablet: Some(pb::TabletRef {
                        tablet_id: info.id,
                        epoch: info.epoch,
                    }),
                    key: Bytes::copy_from_slice(key.as_bytes()),
                    options: Some(pb::ReadOptions {
                        mode: mode as i32,
                        read_ts: 0,
                    }),
                })
                .await
                .expect("get rpc")
                .into_inner();
            if response.error.is_none() {
                return response.found.then_some(response.value);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no replica answered the read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_replicate_dedup_and_survive_restart() {
    let universe = Universe::start().await;
    let route = universe.create_users(vec![b"m".to_vec()]).await;
    assert_eq!(route.tablets.len(), 2);

    let first = write(&route, 0, 1, vec![put("alice", "1")]).await;
    let retried = write(&route, 0, 1, vec![put("alice", "changed")]).await;
    assert_eq!(
        first, retried,
        "a retried request id is answered, not applied again"
    );
    let second = write(&route, 1, 2, vec![put("zed", "2"), put("x", "3")]).await;
    // A write commits above the largest timestamp its client saw, even one ahead of the
    // leader's clock (a TSO timestamp handed out in the same millisecond, say).
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let seen = (now_ms + 10_000) << 18;
    let above = write_above(&route, 0, 4, vec![put("carol", "1")], seen).await;
    assert!(above > seen, "{above} is not above {seen}");
    // Not too far ahead: one client must not push the group's timestamps into the future.
    let tablet = &route.tablets[0];
    let info = tablet.tablet.as_ref().expect("info");
    let far = client(&tablet.replicas[0].addr)
        .await
        .write(pb::WriteRequest {
            tablet: Some(pb::TabletRef {
                tablet_id: info.id,
                epoch: info.epoch,
            }),
            request_id: None,
            mutations: vec![put("carol", "2")],
            commit_above: (now_ms + 120_000) << 18,
        })
        .await
        .expect_err("refused");
    assert_eq!(far.code(), tonic::Code::InvalidArgument, "{far}");
    // The largest valid value fits in one journal entry.
    let largest = "v".repeat(8 << 20);
    write(&route, 1, 3, vec![put("zbig", &largest)]).await;
    assert!(second > 0);

    assert_eq!(
        get(&route, 0, "alice", pb::ReadMode::Leader)
            .await
            .as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(
        get(&route, 1, "x", pb::ReadMode::Follower).await.as_deref(),
        Some(&b"3"[..])
    );
    assert_eq!(get(&route, 1, "nobody", pb::ReadMode::Leader).await, None);

    // Every replica applied the writes: each one answers a follower read.
    let tablet = &route.tablets[1];
    let info = tablet.tablet.as_ref().expect("info");
    for replica in &tablet.replicas {
        // A replica may briefly know no leader (an election after the preferred-leader
        // transfer): that refusal is retryable, so retry it for a while.
        let mut response = pb::GetResponse::default();
        for _ in 0..100 {
            response = client(&replica.addr)
                .await
                .get(pb::GetRequest {
                    tablet: Some(pb::TabletRef {
                        tablet_id: info.id,
                        epoch: info.epoch,
                    }),
                    key: Bytes::from_static(b"zed"),
                    options: Some(pb::ReadOptions {
                        mode: pb::ReadMode::Follower as i32,
                        read_ts: 0,
                    }),
                })
                .await
                .expect("get")
                .into_inner();
            let no_leader_yet = matches!(
                response.error.as_ref().and_then(|error| error.kind.as_ref()),
                Some(pb::tablet_error::Kind::NotLeader(hint)) if hint.leader_server_id == 0
            );
            if !no_leader_yet {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            response.error.is_none(),
            "replica {} refused: {:?}",
            replica.server_id,
            response.error
        );
        assert_eq!(&response.value[..], b"2");
    }

    // Enough writes to flush several memtables: the group's log is truncated behind a
    // snapshot, and the restart below replays from it.
    for seq in 0..300u64 {
        let key = format!("bulk{seq:05}");
        write(&route, 0, 100 + seq, vec![put(&key, &"v".repeat(200))]).await;
    }
    let mut truncated = false;
    for _ in 0..100 {
        truncated = universe.servers.iter().flatten().any(|server| {
            let text = (server.metrics_renderer())();
            text.lines().any(|line| {
                line.starts_with("luna_group_truncated_index")
                    && line.rsplit(' ').next().is_some_and(|value| value != "0")
            })
        });
        if truncated {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(truncated, "no group log was truncated after many flushes");

    // Full restart on the same directories.
    let Universe {
        master,
        master_stream,
        master_addr,
        master_task,
        mut servers,
        dir,
        store,
    } = universe;
    for server in servers.iter_mut().filter_map(Option::take) {
        server.shutdown().await;
    }
    stop_master(master.expect("master"), master_stream, master_task).await;
    let (master, master_stream, master_addr, master_task) =
        start_master(dir.path(), Some(master_addr)).await;
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(Some(start_server(dir.path(), i, master_addr, &store).await));
    }
    let universe = Universe {
        master: Some(master),
        master_stream,
        master_addr,
        master_task,
        servers,
        dir,
        store,
    };
    let route = universe.wait_route("app", "users").await;
    assert_eq!(
        get(&route, 0, "alice", pb::ReadMode::Leader)
            .await
            .as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(
        get(&route, 1, "zed", pb::ReadMode::Leader).await.as_deref(),
        Some(&b"2"[..])
    );
    universe.stop().await;
}

/// Commands on a `Multiplex` stream answer as the unary calls do, each with its own id, and
/// a server that stops ends its streams instead of waiting for its clients to hang up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multiplexed_commands_answer_like_unary_calls_and_stop_with_the_server() {
    let mut universe = Universe::start().await;
    let route = universe.create_users(Vec::new()).await;
    write(&route, 0, 1, vec![put("alice", "1")]).await;
    let tablet = &route.tablets[0];
    let info = tablet.tablet.as_ref().expect("tablet info");
    let tablet_ref = Some(pb::TabletRef {
        tablet_id: info.id,
        epoch: info.epoch,
    });
    // A replica that leads (the routing may lag a leader change: ask each in turn).
    let mut leader = None;
    for replica in &tablet.replicas {
        let mut client = client(&replica.addr).await;
        let reply = client
            .get(pb::GetRequest {
                tablet: tablet_ref,
                key: Bytes::from_static(b"alice"),
                options: None,
            })
            .await
            .expect("get rpc")
            .into_inner();
        if reply.error.is_none() {
            leader = Some((replica.server_id, client));
        }
    }
    let (leader_id, mut client) = leader.expect("a replica leads the tablet");

    let get = |id, key: &'static [u8]| pb::Command {
        id,
        request: Some(pb::command::Request::Get(pb::GetRequest {
            tablet: tablet_ref,
            key: Bytes::from_static(key),
            options: None,
        })),
    };
    let commands = vec![
        get(7, b"alice"),
        get(8, b"nobody"),
        pb::Command {
            id: 9,
            request: Some(pb::command::Request::Write(pb::WriteRequest {
                tablet: tablet_ref,
                request_id: None,
                mutations: vec![put("bob", "2")],
                commit_above: 0,
            })),
        },
        get(10, b""),
        pb::Command {
            id: 11,
            request: None,
        },
    ];
    let (sender, outbound) = tokio::sync::mpsc::unbounded_channel();
    sender
        .send(pb::CommandBatch { commands })
        .expect("queue commands");
    let mut replies = client
        .multiplex(tokio_stream::wrappers::UnboundedReceiverStream::new(
            outbound,
        ))
        .await
        .expect("open the stream")
        .into_inner();
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 5 {
        let batch = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("replies within 10 s")
            .expect("stream healthy")
            .expect("stream open");
        for reply in batch.replies {
            assert!(
                answers.insert(reply.id, reply.response).is_none(),
                "one reply per id"
            );
        }
    }
    use pb::command_reply::Response as Answer;
    assert!(matches!(&answers[&7], Some(Answer::Get(found)) if found.found && found.value == "1"));
    assert!(
        matches!(&answers[&8], Some(Answer::Get(missing)) if !missing.found && missing.error.is_none())
    );
    assert!(matches!(&answers[&9], Some(Answer::Write(written)) if written.commit_ts > 0));
    for bad in [10, 11] {
        assert!(
            matches!(&answers[&bad], Some(Answer::Status(status)) if status.code == tonic::Code::InvalidArgument as i32),
            "command {bad}: {:?}",
            answers[&bad]
        );
    }

    // Stop the leader with the stream still open (its sender is alive).
    let index = universe
        .servers
        .iter()
        .position(|server| server.as_ref().is_some_and(|s| s.server_id() == leader_id))
        .expect("leader is one of ours");
    if let Some(server) = universe.servers[index].take() {
        server.shutdown().await;
    }
    let end = tokio::time::timeout(Duration::from_secs(10), replies.message())
        .await
        .expect("the stream ends within 10 s of the shutdown");
    assert!(!matches!(end, Ok(Some(_))), "no more replies: {end:?}");
    drop(sender);
    universe.stop().await;
}

/// A heartbeat whose commit is past the replica's log (what a replica whose disk was wiped
/// gets from its leader) shows the journal lost acknowledged entries, and fails it. The
/// server then stops heartbeating, so that the master sees it gone and replaces its
/// replicas instead of routing to a server that serves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_whose_journal_fails_stops_heartbeating() {
    use luna_proto::journal::RaftBatch;
    use luna_proto::journal::raft_transport_client::RaftTransportClient;
    use luna_proto::master::ListServersRequest;
    use luna_proto::master::master_client::MasterClient;

    /// The fields of raft-rs's `eraftpb.Message` a heartbeat needs.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RaftMessage {
        #[prost(int32, tag = "1")]
        msg_type: i32,
        #[prost(uint64, tag = "2")]
        to: u64,
        #[prost(uint64, tag = "3")]
        from: u64,
        #[prost(uint64, tag = "4")]
        term: u64,
        #[prost(uint64, tag = "8")]
        commit: u64,
    }
    const MSG_HEARTBEAT: i32 = 8;

    let universe = Universe::start().await;
    let route = universe.create_users(Vec::new()).await;
    let group_id = route.tablets[0].tablet.as_ref().expect("info").group_id;
    let target = universe.servers[0].as_ref().expect("server 0");
    let peer = universe.servers[1].as_ref().expect("server 1").server_id();
    let mut envelope = group_id.to_le_bytes().to_vec();
    prost::Message::encode(
        &RaftMessage {
            msg_type: MSG_HEARTBEAT,
            to: target.server_id(),
            from: peer,
            term: 1_000,
            commit: 1_000_000,
        },
        &mut envelope,
    )
    .expect("encode");
    let mut raft = RaftTransportClient::connect(format!("http://{}", target.raft_addr()))
        .await
        .expect("connect to the journal port");
    let batch = RaftBatch {
        from: peer,
        to: target.server_id(),
        messages: vec![Bytes::from(envelope)],
    };
    let _exchange = raft
        .exchange(tokio_stream::iter(vec![batch]))
        .await
        .expect("exchange");

    let mut master = MasterClient::connect(format!("http://{}", universe.master_addr))
        .await
        .expect("connect to the master");
    let silent_for = |servers: &[luna_proto::master::ServerInfo], id: u64| {
        servers
            .iter()
            .find(|server| server.id == id)
            .map_or(0, |server| server.last_heartbeat_ago_ms)
    };
    let mut silent = false;
    for _ in 0..200 {
        let servers = master
            .list_servers(ListServersRequest {})
            .await
            .expect("list servers")
            .into_inner()
            .servers;
        // Heartbeats come every 100 ms: two seconds of silence is no accident.
        if silent_for(&servers, target.server_id()) > 2_000 {
            assert!(
                silent_for(&servers, peer) < 2_000,
                "the other servers keep heartbeating"
            );
            silent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(silent, "the failed server kept heartbeating");
    let failure = target.failure_checker()().expect("the server says why it stopped");
    assert!(failure.contains("the log was lost"), "{failure}");
    // Connections to the master hold it; a stopped universe lets go of its journal.
    drop((master, raft));
    universe.stop().await;
}
