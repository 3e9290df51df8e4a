//! Three master replicas on one raft stream (an in-process network that can cut a replica
//! off): only the leader serves, the others name it, and a failover keeps the catalog and
//! never hands out a timestamp twice or out of order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use luna_journal::raft::{MemNetwork, Node, RaftConfig, RaftStream, Transport};
use luna_kernel::stream::Stream;
use luna_master::{Master, MasterConfig, MasterError};

const REPLICAS: [u64; 3] = [1, 2, 3];

macro_rules! ok {
    ($e:expr) => {
        match $e {
            Ok(value) => value,
            Err(e) => panic!("{} failed: {e:?}", stringify!($e)),
        }
    };
}

struct Replica {
    master: Master,
    stream: Arc<RaftStream>,
    node: Node,
}

struct Masters {
    network: Arc<MemNetwork>,
    replicas: BTreeMap<u64, Replica>,
    _dir: tempfile::TempDir,
}

fn addr_of(id: u64) -> String {
    format!("127.0.0.1:{}", 7420 + id)
}

impl Masters {
    async fn start() -> Masters {
        let dir = ok!(tempfile::tempdir());
        let network = MemNetwork::new();
        let replica_addrs: BTreeMap<u64, String> =
            REPLICAS.iter().map(|&id| (id, addr_of(id))).collect();
        let mut streams = BTreeMap::new();
        for id in REPLICAS {
            let mut config = RaftConfig::new(id, dir.path().join(id.to_string()));
            config.tick_interval = Duration::from_millis(20);
            let transport = network.transport(id) as Arc<dyn Transport>;
            let node = ok!(Node::start(config, transport));
            network.register(id, node.inbox());
            let stream = Arc::new(ok!(node.add_stream(1, &REPLICAS).await));
            streams.insert(id, (node, stream));
        }
        // Opened together: each open waits for the election the others take part in.
        let opening = streams.iter().map(|(&id, (_, stream))| {
            let config = MasterConfig {
                replica_addrs: replica_addrs.clone(),
                election_wait: Duration::from_secs(5),
                ..MasterConfig::default()
            };
            let stream = Arc::clone(stream) as Arc<dyn Stream>;
            async move { (id, Master::open(config, stream).await) }
        });
        let mut replicas = BTreeMap::new();
        for (id, master) in futures::future::join_all(opening).await {
            let (node, stream) = ok!(streams.remove(&id).ok_or("no stream"));
            let master = ok!(master);
            replicas.insert(
                id,
                Replica {
                    master,
                    stream,
                    node,
                },
            );
        }
        Masters {
            network,
            replicas,
            _dir: dir,
        }
    }

    /// The replica that serves, once one does (among those not `except`).
    async fn leader(&self, except: Option<u64>) -> u64 {
        for _ in 0..500 {
            for (&id, replica) in &self.replicas {
                if Some(id) == except {
                    continue;
                }
                if replica.master.timestamps(1).await.is_ok() {
                    return id;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no master replica served within 10 s");
    }

    fn master(&self, id: u64) -> &Master {
        &ok!(self.replicas.get(&id).ok_or("no such replica")).master
    }

    async fn stop(self) {
        for replica in self.replicas.into_values() {
            replica.master.shutdown().await;
            drop(replica.stream);
            replica.node.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_serves_and_the_others_name_it() {
    let masters = Masters::start().await;
    let leader = masters.leader(None).await;
    ok!(masters.master(leader).create_database("app").await);
    for id in REPLICAS.into_iter().filter(|&id| id != leader) {
        match masters.master(id).create_database("other").await {
            Err(MasterError::NotLeader {
                leader_addr: Some(addr),
                ..
            }) => assert_eq!(addr, addr_of(leader), "replica {id} names the leader"),
            other => panic!("replica {id} answered {other:?}, not a redirect to {leader}"),
        }
        match masters.master(id).timestamps(1).await {
            Err(MasterError::NotLeader { .. }) => {}
            other => panic!("replica {id} handed out timestamps: {other:?}"),
        }
        // Followers still apply the log, so they are ready to take over.
        let mut caught_up = false;
        for _ in 0..250 {
            if masters.master(id).state().databases.len() == 1 {
                caught_up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(caught_up, "replica {id} never applied the new database");
    }
    masters.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_keeps_the_catalog_and_timestamps_only_move_forward() {
    let masters = Masters::start().await;
    let old = masters.leader(None).await;
    ok!(masters.master(old).create_database("app").await);
    let mut last = 0;
    for _ in 0..100 {
        let batch = ok!(masters.master(old).timestamps(100).await);
        assert!(batch.first > last, "timestamps went back on one leader");
        last = batch.first + u64::from(batch.count) - 1;
    }

    masters.network.isolate(old);
    let new = masters.leader(Some(old)).await;
    assert_ne!(new, old);
    let batch = ok!(masters.master(new).timestamps(1).await);
    assert!(
        batch.first > last,
        "the new leader handed out {} at or below the old leader's last timestamp {last}",
        batch.first
    );
    let names: Vec<String> = masters
        .master(new)
        .state()
        .databases
        .iter()
        .map(|db| db.name.clone())
        .collect();
    assert_eq!(names, ["app"], "the new leader lost the catalog");
    ok!(masters.master(new).create_database("after").await);

    // The cut-off leader's lease has run out: it must not hand out timestamps any more,
    // which would go back below the new leader's.
    match masters.master(old).timestamps(1).await {
        Err(error) => assert!(
            matches!(
                error,
                MasterError::NotLeader { .. }
                    | MasterError::Unavailable { .. }
                    | MasterError::Stream { .. }
            ),
            "unexpected error from the cut-off leader: {error:?}"
        ),
        Ok(batch) => panic!(
            "the cut-off leader handed out {} after replica {new} took over",
            batch.first
        ),
    }

    // Healed, the old leader follows and names the new one.
    masters.network.heal();
    let mut redirected = false;
    for _ in 0..250 {
        if let Err(MasterError::NotLeader {
            leader_addr: Some(addr),
            ..
        }) = masters.master(old).create_database("x").await
        {
            assert_eq!(addr, addr_of(new));
            redirected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(redirected, "the healed old leader never named the new one");
    masters.stop().await;
}
