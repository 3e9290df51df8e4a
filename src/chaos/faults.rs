//! The faults `luna chaos` injects into its universe, one at a time: each is chosen by a
//! seeded generator, held for a while, then healed.

use std::time::Duration;

use rand::Rng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::CliError;
use crate::harness::universe::Universe;

/// How long a fault hook request may take.
const HOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// The kinds of fault, as `--faults` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum FaultKind {
    /// kill -9 a tablet server, then restart it.
    KillServer,
    /// kill -9 a master replica, then restart it.
    KillMaster,
    /// SIGSTOP a tablet server, then SIGCONT.
    PauseServer,
    /// SIGSTOP a master replica, then SIGCONT.
    PauseMaster,
    /// Cut a tablet server's raft traffic to and from every other tablet server.
    PartitionServer,
    /// Cut a master replica's raft traffic to and from the other replicas.
    PartitionMaster,
    /// Fail a fraction of every tablet server's object-store requests and slow the rest.
    ObjectStore,
}

impl FaultKind {
    /// The name `--faults` and the report use.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillServer => "kill-server",
            FaultKind::KillMaster => "kill-master",
            FaultKind::PauseServer => "pause-server",
            FaultKind::PauseMaster => "pause-master",
            FaultKind::PartitionServer => "partition-server",
            FaultKind::PartitionMaster => "partition-master",
            FaultKind::ObjectStore => "object-store",
        }
    }
}

/// The kinds of fault in a seeded order: every kind once, shuffled, then again, so that a
/// run as short as one round meets each kind.
pub struct Schedule {
    kinds: Vec<FaultKind>,
    round: Vec<FaultKind>,
}

impl Schedule {
    /// A schedule of `kinds`.
    pub fn new(kinds: &[FaultKind]) -> Schedule {
        Schedule {
            kinds: kinds.to_vec(),
            round: Vec::new(),
        }
    }

    /// The next kind.
    pub fn next(&mut self, rng: &mut SmallRng) -> Option<FaultKind> {
        if self.round.is_empty() {
            self.round = self.kinds.clone();
            self.round.shuffle(rng);
        }
        self.round.pop()
    }
}

/// One injected fault: its kind and target process (index among the servers or masters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub target: usize,
}

impl Fault {
    /// A fault of `kind` on a random process of `universe`.
    pub fn pick(rng: &mut SmallRng, kind: FaultKind, universe: &Universe) -> Fault {
        let processes = match kind {
            FaultKind::KillMaster | FaultKind::PauseMaster | FaultKind::PartitionMaster => {
                universe.master_count()
            }
            _ => universe.server_count(),
        };
        Fault {
            kind,
            target: rng.random_range(0..processes.max(1)),
        }
    }

    /// Injects the fault.
    pub async fn inject(self, universe: &mut Universe, rng: &mut SmallRng) -> Result<(), CliError> {
        let i = self.target;
        match self.kind {
            FaultKind::KillServer => universe.kill_server(i),
            FaultKind::KillMaster => universe.kill_master(i),
            FaultKind::PauseServer => {
                if let Some(server) = universe.server(i) {
                    server.pause();
                }
            }
            FaultKind::PauseMaster => {
                if let Some(master) = universe.master(i) {
                    master.pause();
                }
            }
            FaultKind::PartitionServer => partition(universe, Side::Servers, Some(i)).await?,
            FaultKind::PartitionMaster => partition(universe, Side::Masters, Some(i)).await?,
            FaultKind::ObjectStore => {
                let fail = rng.random_range(0.05..0.5);
                let delay_ms = rng.random_range(0..200);
                let query = format!("fail={fail:.2}&delay_ms={delay_ms}");
                for addr in http_addrs(universe, Side::Servers) {
                    hook(&addr, "/faults/object-store", &query).await?;
                }
            }
        }
        Ok(())
    }

    /// Undoes the fault: restarts, resumes, heals. Returns how many object-store requests
    /// the servers failed on purpose so far (0 for other kinds).
    pub async fn heal(self, universe: &mut Universe) -> Result<u64, CliError> {
        let i = self.target;
        match self.kind {
            FaultKind::KillServer => universe.start_server(i)?,
            FaultKind::KillMaster => universe.start_master(i)?,
            FaultKind::PauseServer => {
                if let Some(server) = universe.server(i) {
                    server.resume();
                }
            }
            FaultKind::PauseMaster => {
                if let Some(master) = universe.master(i) {
                    master.resume();
                }
            }
            FaultKind::PartitionServer => partition(universe, Side::Servers, None).await?,
            FaultKind::PartitionMaster => partition(universe, Side::Masters, None).await?,
            FaultKind::ObjectStore => {
                let mut injected = 0;
                for addr in http_addrs(universe, Side::Servers) {
                    let answer = hook(&addr, "/faults/object-store", "fail=0&delay_ms=0").await?;
                    let count = answer
                        .split_whitespace()
                        .next()
                        .and_then(|n| n.parse().ok());
                    injected += count.unwrap_or(0u64);
                }
                return Ok(injected);
            }
        }
        Ok(0)
    }
}

/// The tablet servers or the master replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Servers,
    Masters,
}

/// Cuts process `cut` of `side` off from the others of its side, both ways, or heals every
/// process of the side (`None`).
async fn partition(universe: &Universe, side: Side, cut: Option<usize>) -> Result<(), CliError> {
    // Journal node ids: server ids of tablet servers, replica ids (index + 1) of masters.
    let count = match side {
        Side::Servers => universe.server_count(),
        Side::Masters => universe.master_count(),
    };
    let node_id = |i: usize| match side {
        Side::Servers => universe.server_id(i).unwrap_or(0),
        Side::Masters => i as u64 + 1,
    };
    for i in 0..count {
        let Some(addr) = http_addr(universe, side, i) else {
            continue;
        };
        let peers: Vec<u64> = match cut {
            None => Vec::new(),
            Some(cut) if cut == i => (0..count).filter(|&j| j != i).map(node_id).collect(),
            Some(cut) => vec![node_id(cut)],
        };
        let list: Vec<String> = peers.iter().map(u64::to_string).collect();
        hook(&addr, "/faults/raft", &format!("cut={}", list.join(","))).await?;
    }
    Ok(())
}

fn http_addr(universe: &Universe, side: Side, i: usize) -> Option<String> {
    let process = match side {
        Side::Servers => universe.server(i),
        Side::Masters => universe.master(i),
    };
    process.and_then(|p| p.http_addr()).map(str::to_owned)
}

fn http_addrs(universe: &Universe, side: Side) -> Vec<String> {
    let count = match side {
        Side::Servers => universe.server_count(),
        Side::Masters => universe.master_count(),
    };
    (0..count)
        .filter_map(|i| http_addr(universe, side, i))
        .collect()
}

/// POSTs to a fault hook of the process at `addr`, checks that it answered 200, and
/// returns the body.
async fn hook(addr: &str, path: &str, query: &str) -> Result<String, CliError> {
    let failed = |detail: String| {
        CliError::Invalid(format!("fault hook {path}?{query} at {addr}: {detail}"))
    };
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!(
            "POST {path}?{query} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(HOOK_TIMEOUT, exchange)
        .await
        .map_err(|_| failed(format!("no answer within {HOOK_TIMEOUT:?}")))?
        .map_err(|error| failed(error.to_string()))?;
    let response = String::from_utf8_lossy(&response);
    if !response.starts_with("HTTP/1.1 200") {
        return Err(failed(response.lines().next().unwrap_or("").to_owned()));
    }
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok(body.to_owned())
}
