//! The master through its public API: a real tonic server with the generated client, and
//! restarts on a local journal.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use luna_journal::{LocalConfig, LocalStream};
use luna_kernel::stream::Stream;
use luna_master::{Clock, Master, MasterConfig};
use luna_proto::master::master_client::MasterClient;
use luna_proto::master::{
    CreateCollectionRequest, CreateDatabaseRequest, GetRoutingRequest, GetTimestampsRequest,
    GroupReport, HeartbeatRequest, ListTabletsRequest, Partitioning, WatchRoutingRequest,
};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic::transport::Channel;

/// A wall clock the test sets.
#[derive(Debug)]
struct ManualClock(AtomicU64);

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn open_stream(dir: &Path) -> Arc<LocalStream> {
    match LocalStream::open(LocalConfig::new(dir)) {
        Ok(stream) => Arc::new(stream),
        Err(e) => panic!("opening the local stream: {e}"),
    }
}

async fn open_master(config: MasterConfig, stream: &Arc<LocalStream>) -> Master {
    let stream: Arc<dyn Stream> = Arc::clone(stream) as Arc<dyn Stream>;
    match Master::open(config, stream).await {
        Ok(master) => master,
        Err(e) => panic!("opening the master: {e}"),
    }
}

async fn close(master: Master, stream: Arc<LocalStream>) {
    master.shutdown().await;
    match Arc::try_unwrap(stream) {
        Ok(stream) => stream.close().await,
        Err(_) => panic!("the master still holds the stream after shutdown"),
    }
}

fn heartbeat(id: u64, addr: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        server_id: id,
        addr: addr.to_owned(),
        raft_addr: format!("{addr}0"),
        ..HeartbeatRequest::default()
    }
}

fn hash_collection(name: &str, tablets: u32) -> CreateCollectionRequest {
    CreateCollectionRequest {
        database: "db".into(),
        name: name.into(),
        partitioning: Partitioning::Hash as i32,
        tablets,
        ..CreateCollectionRequest::default()
    }
}

/// Serves `master` on a fresh loopback port; send on the returned sender to stop.
async fn serve(master: &Master) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(e) => panic!("binding: {e}"),
    };
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = oneshot::channel::<()>();
    let service = master.service();
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = result {
            panic!("master server failed: {e}");
        }
    });
    (addr, stop)
}

async fn connect(addr: SocketAddr) -> MasterClient<Channel> {
    match MasterClient::connect(format!("http://{addr}")).await {
        Ok(client) => client,
        Err(e) => panic!("connecting: {e}"),
    }
}

macro_rules! ok {
    ($e:expr) => {
        match $e {
            Ok(value) => value,
            Err(e) => panic!("{} failed: {e:?}", stringify!($e)),
        }
    };
}

#[tokio::test]
async fn grpc_catalog_routing_and_heartbeats() {
    let dir = ok!(tempfile::tempdir());
    let stream = open_stream(dir.path());
    let master = open_master(MasterConfig::default(), &stream).await;
    let (addr, stop) = serve(&master).await;
    let mut client = connect(addr).await;

    // Three servers register with their first heartbeat.
    let mut ids = Vec::new();
    for port in 1..=3 {
        let response = ok!(client.heartbeat(heartbeat(0, &format!("ts{port}:1"))).await);
        ids.push(response.into_inner().server_id);
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "ids {ids:?} are not distinct");
    assert!(ids.iter().all(|&id| id != 0));

    ok!(client
        .create_database(CreateDatabaseRequest { name: "db".into() })
        .await);
    let mut watch = ok!(client
        .watch_routing(WatchRoutingRequest { after_version: 0 })
        .await)
    .into_inner();
    let first = ok!(ok!(watch.message().await).ok_or("watch ended"));
    let created = ok!(client.create_collection(hash_collection("c", 8)).await).into_inner();
    assert_eq!(created.collection.map(|c| c.tablet_count), Some(8));

    // WatchRouting sees the new collection under a newer version.
    let next = ok!(ok!(watch.message().await).ok_or("watch ended"));
    assert!(next.routing_version > first.routing_version);
    assert_eq!(next.collections.len(), first.collections.len() + 1);

    let route = ok!(client
        .get_routing(GetRoutingRequest {
            database: "db".into(),
            collection: "c".into(),
        })
        .await)
    .into_inner();
    assert_eq!(route.tablets.len(), 8);
    let ranges: Vec<_> = route
        .tablets
        .iter()
        .map(|t| {
            t.tablet
                .as_ref()
                .and_then(|t| t.range.clone())
                .unwrap_or_default()
        })
        .collect();
    assert!(
        ranges[0].start.is_empty(),
        "the first tablet starts at the beginning"
    );
    assert_eq!(ranges[7].end, None, "the last tablet is unbounded");
    for pair in ranges.windows(2) {
        assert_eq!(pair[0].end.as_ref(), Some(&pair[1].start), "gap or overlap");
    }
    for tablet in &route.tablets {
        assert_eq!(tablet.replicas.len(), 3);
        assert!(tablet.replicas.iter().all(|r| r.addr.starts_with("ts")));
        assert_eq!(tablet.tablet.as_ref().map(|t| t.epoch), Some(1));
    }

    // Each server learns its groups; together they hold every tablet three times.
    let mut tablets_hosted = 0;
    let mut leaders = Vec::new();
    for &id in &ids {
        let mut request = heartbeat(id, &format!("ts{}:1", id - ids[0] + 1));
        let response = ok!(client.heartbeat(request.clone()).await).into_inner();
        assert_eq!(response.server_id, id);
        assert!(!response.groups.is_empty(), "server {id} got no groups");
        for group in &response.groups {
            assert!(group.voters.contains(&id));
            tablets_hosted += group.tablets.len();
            if group.voters[0] == id {
                leaders.push(group.group_id);
            }
        }
        assert_eq!(response.peers.len(), 3);
        // Report leadership of the groups this server is the preferred leader of.
        request.groups = response
            .groups
            .iter()
            .filter(|g| g.voters[0] == id)
            .map(|g| GroupReport {
                group_id: g.group_id,
                is_leader: true,
                term: 1,
                ..GroupReport::default()
            })
            .collect();
        ok!(client.heartbeat(request).await);
    }
    assert_eq!(tablets_hosted, 8 * 3);
    assert_eq!(
        leaders.len(),
        3,
        "each server is the preferred leader of one group"
    );
    let routed = ok!(client
        .get_routing(GetRoutingRequest {
            database: "db".into(),
            collection: "c".into(),
        })
        .await)
    .into_inner();
    assert!(
        routed.routing_version > route.routing_version,
        "leaders changed routing"
    );
    assert!(routed.tablets.iter().all(|t| t.leader_server_id != 0));

    let tablets = ok!(client
        .list_tablets(ListTabletsRequest {
            database: "db".into(),
            collection: "c".into(),
        })
        .await)
    .into_inner()
    .tablets;
    assert_eq!(tablets.len(), 8);

    let stamps = ok!(client
        .get_timestamps(GetTimestampsRequest {
            count: 10,
            after: 0
        })
        .await);
    assert_eq!(stamps.get_ref().count, 10);

    // Errors carry the codes callers act on.
    let unknown = client.heartbeat(heartbeat(999, "x:1")).await.err();
    assert_eq!(
        unknown.as_ref().map(|s| s.code()),
        Some(Code::FailedPrecondition)
    );
    assert!(unknown.is_some_and(|s| s.message().contains("another universe")));
    let duplicate = client
        .create_collection(hash_collection("c", 8))
        .await
        .err();
    assert_eq!(duplicate.map(|s| s.code()), Some(Code::AlreadyExists));
    let mut too_many_replicas = hash_collection("d", 2);
    too_many_replicas.replication_factor = 5;
    let status = client.create_collection(too_many_replicas).await.err();
    assert_eq!(status.map(|s| s.code()), Some(Code::FailedPrecondition));
    let mut no_db = hash_collection("d", 2);
    no_db.database = "nope".into();
    let status = client.create_collection(no_db).await.err();
    assert_eq!(status.map(|s| s.code()), Some(Code::NotFound));
    let range = CreateCollectionRequest {
        partitioning: Partitioning::Range as i32,
        ..hash_collection("r", 4)
    };
    let status = client.create_collection(range).await.err();
    assert_eq!(
        status.as_ref().map(|s| s.code()),
        Some(Code::InvalidArgument)
    );
    assert!(status.is_some_and(|s| s.message().contains("split_keys")));

    // Dropping the database drops its collections.
    ok!(client
        .drop_database(luna_proto::master::DropDatabaseRequest { name: "db".into() })
        .await);
    let gone = client
        .get_routing(GetRoutingRequest {
            database: "db".into(),
            collection: "c".into(),
        })
        .await
        .err();
    assert_eq!(gone.map(|s| s.code()), Some(Code::NotFound));
    let listed = ok!(client.list_tablets(ListTabletsRequest::default()).await);
    assert!(listed.get_ref().tablets.is_empty());

    let _ = stop.send(());
    drop(watch);
    drop(client);
}

#[tokio::test]
async fn restart_replays_the_catalog_and_timestamps_never_go_back() {
    let dir = ok!(tempfile::tempdir());
    let clock = Arc::new(ManualClock(AtomicU64::new(1_000_000_000_000)));
    let config = MasterConfig {
        default_replication_factor: 1,
        clock: Arc::clone(&clock) as Arc<dyn Clock>,
        ..MasterConfig::default()
    };

    let stream = open_stream(dir.path());
    let master = open_master(config.clone(), &stream).await;
    let registered = ok!(master.heartbeat(&heartbeat(0, "ts:1")).await);
    ok!(master.create_database("db").await);
    ok!(master.create_collection(&hash_collection("c", 4)).await);
    let mut last = 0;
    for i in 0..200u32 {
        if i % 50 == 0 {
            clock.0.fetch_add(1, Ordering::SeqCst);
        }
        let batch = ok!(master.timestamps(1 + i % 97).await);
        assert!(
            batch.first > last,
            "batch {i} is not above the previous one"
        );
        last = batch.last();
    }
    let state = master.state();
    let version = master.routing_version();
    close(master, stream).await;

    // The clock went back an hour while the master was down.
    clock.0.fetch_sub(3_600_000, Ordering::SeqCst);
    let stream = open_stream(dir.path());
    let master = open_master(config.clone(), &stream).await;
    assert_eq!(master.state(), state, "replay rebuilt a different state");
    assert!(
        master.routing_version() > version,
        "routing versions went back"
    );
    for i in 0..50 {
        let batch = ok!(master.timestamps(3).await);
        assert!(
            batch.first > last,
            "timestamp repeated after a restart (batch {i})"
        );
        last = batch.last();
    }
    // The restarted master knows the server and its groups.
    let again = ok!(master
        .heartbeat(&heartbeat(registered.server_id, "ts:1"))
        .await);
    assert_eq!(
        again.groups,
        registered_groups(&master, registered.server_id)
    );
    let route = ok!(master.routing("db", "c"));
    assert_eq!(route.tablets.len(), 4);
    close(master, stream).await;
}

/// What a heartbeat of `server_id` should carry, computed from the listing API.
fn registered_groups(master: &Master, server_id: u64) -> Vec<luna_proto::master::GroupAssignment> {
    let state = master.state();
    state
        .groups
        .iter()
        .filter(|g| g.replicas.contains(&server_id))
        .map(|g| luna_proto::master::GroupAssignment {
            group_id: g.id,
            voters: g.replicas.clone(),
            tablets: state
                .tablets
                .iter()
                .filter(|t| t.group_id == g.id)
                .cloned()
                .collect(),
            initial_voters: g.initial_voters.clone(),
            adopting: Vec::new(),
        })
        .collect()
}

#[tokio::test]
async fn concurrent_timestamp_batches_never_overlap() {
    let dir = ok!(tempfile::tempdir());
    let stream = open_stream(dir.path());
    let config = MasterConfig {
        // Small windows, so many batches need a new one.
        tso_window: std::time::Duration::from_millis(1),
        ..MasterConfig::default()
    };
    let master = Arc::new(open_master(config, &stream).await);
    let mut tasks = Vec::new();
    for task in 0..8u32 {
        let master = Arc::clone(&master);
        tasks.push(tokio::spawn(async move {
            let mut batches = Vec::new();
            for i in 0..40u32 {
                let batch = ok!(master.timestamps(1 + (task * 40 + i) % 300).await);
                batches.push((batch.first, batch.last()));
            }
            batches
        }));
    }
    let mut batches = Vec::new();
    for task in tasks {
        batches.extend(ok!(task.await));
    }
    batches.sort_unstable();
    assert_eq!(batches.len(), 320);
    for pair in batches.windows(2) {
        assert!(pair[0].1 < pair[1].0, "batches {pair:?} overlap");
    }
    let limit = master.state().tso_limit;
    assert!(
        batches.iter().all(|b| b.1 < limit),
        "a batch is above the window"
    );
    match Arc::try_unwrap(master) {
        Ok(master) => close(master, stream).await,
        Err(_) => panic!("a task still holds the master"),
    }
}

#[tokio::test]
async fn undecodable_entries_are_skipped_on_replay() {
    let dir = ok!(tempfile::tempdir());
    let stream = open_stream(dir.path());
    // Not a Command: field 15 with a truncated varint.
    ok!(stream.append(bytes::Bytes::from_static(b"\x78\xff")).await);
    let master = open_master(MasterConfig::default(), &stream).await;
    assert_eq!(master.state().applied_index, 1);
    let db = ok!(master.create_database("db").await);
    assert_eq!(db.name, "db");
    assert_eq!(master.state().applied_index, 2);
    let again = master.create_database("db").await.err();
    assert!(matches!(
        again,
        Some(luna_master::MasterError::AlreadyExists { .. })
    ));
    close(master, stream).await;
}

#[tokio::test]
async fn restart_after_truncation_loads_the_snapshot() {
    let dir = ok!(tempfile::tempdir());
    let config = MasterConfig {
        default_replication_factor: 1,
        ..MasterConfig::default()
    };
    let stream = open_stream(dir.path());
    let master = open_master(config.clone(), &stream).await;
    // More commands than one truncation interval (1,024 entries), so the log's start is
    // discarded behind a snapshot of the state.
    for i in 0..1100 {
        ok!(master.create_database(&format!("db{i}")).await);
    }
    let state = master.state();
    close(master, stream).await;
    let segments_before = std::fs::read_dir(dir.path()).map_or(0, |entries| entries.count());

    let stream = open_stream(dir.path());
    let master = open_master(config, &stream).await;
    assert_eq!(
        master.state(),
        state,
        "snapshot + tail rebuilt a different state"
    );
    assert!(
        dir.path().join("SNAPSHOT").exists(),
        "no snapshot was written (files: {segments_before})"
    );
    ok!(master.create_database("after-restart").await);
    close(master, stream).await;
}

#[tokio::test]
async fn a_log_that_cannot_be_applied_fails_the_open() {
    let dir = ok!(tempfile::tempdir());
    let stream = open_stream(dir.path());
    let index = ok!(stream.append(bytes::Bytes::from_static(b"\x78\xff")).await);
    // A snapshot that is not a master state: nothing can be rebuilt from it.
    ok!(stream
        .truncate(index, bytes::Bytes::from_static(b"not a master state"))
        .await);
    match Master::open(
        MasterConfig::default(),
        Arc::clone(&stream) as Arc<dyn Stream>,
    )
    .await
    {
        Err(luna_master::MasterError::Corrupt { index: at, .. }) => assert_eq!(at, index),
        Err(other) => panic!("the open failed, but not as corrupt: {other:?}"),
        Ok(_) => panic!("a master opened on a corrupt snapshot"),
    }
}
