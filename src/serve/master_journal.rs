//! The journal a master replica keeps its state on: a local stream for a single master, or
//! a raft stream shared by the master replicas.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use luna_journal::raft::grpc::GrpcNode;
use luna_journal::raft::{RaftConfig, RaftStream};
use luna_journal::{LocalConfig, LocalStream};
use luna_kernel::stream::Stream;
use tokio::net::TcpListener;

use crate::error::CliError;

/// Where a single master keeps its log, and where a replica keeps its raft log, under the
/// data dir.
const LOCAL_DIR: &str = "journal";
const RAFT_DIR: &str = "raft";
/// The master's stream id on its journal servers (they host nothing else).
const MASTER_STREAM: u64 = 1;
/// Journal timing of the master replicas: 50 ms ticks and an election after 10 to 20 of
/// them, as on tablet servers, so a failover takes about a second. The master's stream is
/// idle most of the time (timestamps and heartbeats do not write it), and must not tick
/// slowly when idle, which would stretch its election timeout fivefold.
const TICK: Duration = Duration::from_millis(50);
const ELECTION_TICKS: usize = 10;

/// One master replica as every replica's `--replica` flag names it:
/// `ID=CLIENT_ADDR/RAFT_ADDR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaAddrs {
    /// The replica's id on the master's stream (1 or more).
    pub id: u64,
    /// Where it serves clients and tablet servers (gRPC).
    pub client: SocketAddr,
    /// Where it serves the raft transport to the other replicas.
    pub raft: SocketAddr,
}

impl FromStr for ReplicaAddrs {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage = || {
            format!(
                "`{text}` is not a master replica: expected ID=CLIENT_ADDR/RAFT_ADDR, e.g. \
                 1=127.0.0.1:7420/127.0.0.1:7430"
            )
        };
        let (id, addrs) = text.split_once('=').ok_or_else(usage)?;
        let (client, raft) = addrs.split_once('/').ok_or_else(usage)?;
        let id = id.trim().parse::<u64>().map_err(|_| usage())?;
        if id == 0 {
            return Err(format!("`{text}`: replica ids start at 1"));
        }
        Ok(ReplicaAddrs {
            id,
            client: client.trim().parse().map_err(|_| usage())?,
            raft: raft.trim().parse().map_err(|_| usage())?,
        })
    }
}

/// Checks a replica set: distinct ids and addresses, and `me` among them.
pub fn check_replicas(replicas: &[ReplicaAddrs], me: u64) -> Result<(), CliError> {
    let mut ids = BTreeMap::new();
    let mut addrs = HashMap::new();
    for replica in replicas {
        if ids.insert(replica.id, replica).is_some() {
            return Err(CliError::Invalid(format!(
                "master replica {} is named twice",
                replica.id
            )));
        }
        for addr in [replica.client, replica.raft] {
            if let Some(other) = addrs.insert(addr, replica.id) {
                return Err(CliError::Invalid(format!(
                    "{addr} is given to master replicas {other} and {}",
                    replica.id
                )));
            }
        }
    }
    if !ids.contains_key(&me) {
        return Err(CliError::Invalid(format!(
            "--replica-id {me} is not among the --replica entries ({})",
            ids.keys()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}

/// The stream under a master replica, and what must be stopped with it.
pub enum MasterJournal {
    /// A single master: a local log in the data directory.
    Local(Arc<LocalStream>),
    /// One of several replicas: a raft stream served on the replica's raft address.
    Replicated {
        /// The journal server (its transport and driver).
        node: GrpcNode,
        /// The master's stream on it.
        stream: Arc<RaftStream>,
    },
}

impl MasterJournal {
    /// Opens the local log in `data_dir/journal`.
    pub fn local(data_dir: &Path) -> Result<MasterJournal, CliError> {
        if data_dir.join(RAFT_DIR).exists() {
            return Err(CliError::Invalid(format!(
                "{} holds a master replica's log ({RAFT_DIR}/): start it as that replica, with \
                 --replica-id and --replica",
                data_dir.display()
            )));
        }
        let stream =
            LocalStream::open(LocalConfig::new(data_dir.join(LOCAL_DIR))).map_err(|source| {
                CliError::Journal {
                    what: "opening the master's journal",
                    source,
                }
            })?;
        Ok(MasterJournal::Local(Arc::new(stream)))
    }

    /// Starts replica `me` of `replicas` on `raft_listener`, its log in `data_dir/raft`.
    pub async fn replicated(
        data_dir: &Path,
        me: u64,
        replicas: &[ReplicaAddrs],
        raft_listener: TcpListener,
    ) -> Result<MasterJournal, CliError> {
        if data_dir.join(LOCAL_DIR).exists() {
            // Its catalog would be left behind silently: a replica set starts empty.
            return Err(CliError::Invalid(format!(
                "{} holds a single master's journal ({LOCAL_DIR}/); a single master cannot \
                 become a replica yet: start it without --replica-id, or use an empty data dir",
                data_dir.display()
            )));
        }
        let mut config = RaftConfig::new(me, data_dir.join(RAFT_DIR));
        config.tick_interval = TICK;
        config.election_tick = ELECTION_TICKS;
        config.idle_tick_every = 1;
        let peers: HashMap<u64, SocketAddr> = replicas.iter().map(|r| (r.id, r.raft)).collect();
        let voters: Vec<u64> = replicas.iter().map(|r| r.id).collect();
        let node =
            GrpcNode::start(config, raft_listener, &peers).map_err(|source| CliError::Journal {
                what: "starting the master's journal server",
                source,
            })?;
        let stream = match node.node().add_stream(MASTER_STREAM, &voters).await {
            Ok(stream) => Arc::new(stream),
            Err(source) => {
                node.shutdown().await;
                return Err(CliError::Journal {
                    what: "opening the master's stream",
                    source,
                });
            }
        };
        Ok(MasterJournal::Replicated { node, stream })
    }

    /// The stream, for the master.
    pub fn stream(&self) -> Arc<dyn Stream> {
        match self {
            MasterJournal::Local(stream) => Arc::clone(stream) as Arc<dyn Stream>,
            MasterJournal::Replicated { stream, .. } => Arc::clone(stream) as Arc<dyn Stream>,
        }
    }

    /// The partition a replica's journal keeps, for fault tests (a single master has none).
    pub fn raft_partition(&self) -> Option<luna_journal::raft::Partition> {
        match self {
            MasterJournal::Local(_) => None,
            MasterJournal::Replicated { node, .. } => Some(node.partition().clone()),
        }
    }

    /// Closes the journal once the master has let go of the stream.
    pub async fn close(self) {
        match self {
            MasterJournal::Local(stream) => {
                // Connection tasks of the stopped service let go of the master a moment
                // later; closing the log then waits for its writer. Were it still shared,
                // dropping it is safe too: every acknowledged entry is already fsynced.
                let mut stream = stream;
                for _ in 0..50 {
                    match Arc::try_unwrap(stream) {
                        Ok(stream) => return stream.close().await,
                        Err(shared) => stream = shared,
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            MasterJournal::Replicated { node, stream } => {
                drop(stream);
                node.shutdown().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_data_dir_is_opened_only_the_way_it_was_created() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(dir.path().join(RAFT_DIR)).unwrap_or_else(|e| panic!("{e}"));
        let error = MasterJournal::local(dir.path())
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("--replica-id")));

        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(dir.path().join(LOCAL_DIR)).unwrap_or_else(|e| panic!("{e}"));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let me = ReplicaAddrs {
            id: 1,
            client: "127.0.0.1:1".parse().unwrap_or_else(|e| panic!("{e}")),
            raft: listener.local_addr().unwrap_or_else(|e| panic!("{e}")),
        };
        let opened = MasterJournal::replicated(dir.path(), 1, &[me], listener).await;
        let error = opened.err().map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("single master's journal")));
    }

    #[test]
    fn replicas_parse_and_bad_sets_are_refused() {
        let one: ReplicaAddrs = "1=127.0.0.1:7420/127.0.0.1:7430"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.id, 1);
        assert_eq!(one.client.port(), 7420);
        assert_eq!(one.raft.port(), 7430);
        for bad in [
            "127.0.0.1:7420/127.0.0.1:7430",
            "0=127.0.0.1:7420/127.0.0.1:7430",
            "x=127.0.0.1:7420/127.0.0.1:7430",
            "1=127.0.0.1:7420",
            "1=host/127.0.0.1:7430",
        ] {
            assert!(bad.parse::<ReplicaAddrs>().is_err(), "{bad} was accepted");
        }
        let two: ReplicaAddrs = "2=127.0.0.1:7421/127.0.0.1:7431"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(check_replicas(&[one, two], 2).is_ok());
        assert!(check_replicas(&[one, two], 3).is_err(), "me is missing");
        assert!(check_replicas(&[one, one], 1).is_err(), "an id twice");
        let clash = ReplicaAddrs { id: 3, ..two };
        assert!(
            check_replicas(&[one, two, clash], 1).is_err(),
            "an address twice"
        );
    }
}
