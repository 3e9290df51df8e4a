//! A universe of child processes for `luna bench failover` and `luna chaos`: three master
//! replicas and a few tablet servers, with objects in `file://` under the work directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use luna_client::Client;
use luna_proto::leader_hint;
use luna_proto::master::GetTimestampsRequest;
use luna_proto::master::master_client::MasterClient;

use super::procs::{Process, free_addr};
use crate::error::CliError;
use crate::serve::faults::FAULT_HOOKS_ENV;

/// Master replicas.
const MASTERS: usize = 3;
/// How long the universe may take to settle after a start or restart.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What to start.
#[derive(Debug, Clone, Copy)]
pub struct UniverseSpec {
    /// Tablet servers.
    pub servers: usize,
    /// The masters' `--repair-after-secs`.
    pub repair_after_secs: u64,
    /// Whether the processes serve the fault hooks (see `serve::faults`).
    pub fault_hooks: bool,
    /// The tablet servers' `--memtable-kib`.
    pub memtable_kib: usize,
}

/// The running processes, and how to start each again.
pub struct Universe {
    spec: UniverseSpec,
    dir: PathBuf,
    /// `ID=CLIENT/RAFT` for every master replica.
    replicas: Vec<String>,
    /// Client addresses of the master replicas, by replica id - 1.
    master_addrs: Vec<String>,
    masters: Vec<Option<Process>>,
    servers: Vec<Option<Process>>,
}

impl Universe {
    /// Starts every process of `spec` in `dir`.
    pub fn start(dir: &Path, spec: UniverseSpec) -> Result<Universe, CliError> {
        let mut replicas = Vec::new();
        let mut master_addrs = Vec::new();
        for id in 1..=MASTERS {
            let client = free_addr()?;
            replicas.push(format!("{id}={client}/{}", free_addr()?));
            master_addrs.push(client);
        }
        let mut universe = Universe {
            spec,
            dir: dir.to_path_buf(),
            replicas,
            master_addrs,
            masters: (0..MASTERS).map(|_| None).collect(),
            servers: (0..spec.servers).map(|_| None).collect(),
        };
        for i in 0..MASTERS {
            universe.start_master(i)?;
        }
        for i in 0..spec.servers {
            universe.start_server(i)?;
        }
        Ok(universe)
    }

    /// The master addresses, for clients.
    pub fn master_addrs(&self) -> &[String] {
        &self.master_addrs
    }

    /// Starts (or restarts) master replica `i`.
    pub fn start_master(&mut self, i: usize) -> Result<(), CliError> {
        let args = [
            "master".to_owned(),
            "--data-dir".to_owned(),
            self.path(&format!("master-{i}")),
            "--http".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--heartbeat-timeout-secs".to_owned(),
            "3".to_owned(),
            "--repair-after-secs".to_owned(),
            self.spec.repair_after_secs.to_string(),
            "--replica-id".to_owned(),
            (i + 1).to_string(),
            "--replica".to_owned(),
            self.replicas.join(","),
        ];
        let log = self.dir.join(format!("master-{i}.log"));
        self.masters[i] = Some(Process::start(&args, &self.env(), &log)?);
        Ok(())
    }

    /// Starts (or restarts) tablet server `i`.
    pub fn start_server(&mut self, i: usize) -> Result<(), CliError> {
        let args = [
            "tablet-server".to_owned(),
            "--master".to_owned(),
            self.master_addrs.join(","),
            "--data-dir".to_owned(),
            self.path(&format!("server-{i}")),
            "--object-store".to_owned(),
            format!("file://{}", self.path("objects")),
            "--memtable-kib".to_owned(),
            self.spec.memtable_kib.to_string(),
        ];
        std::fs::create_dir_all(self.dir.join("objects")).map_err(|source| CliError::Io {
            what: "creating the objects directory",
            source,
        })?;
        let log = self.dir.join(format!("server-{i}.log"));
        self.servers[i] = Some(Process::start(&args, &self.env(), &log)?);
        Ok(())
    }

    fn env(&self) -> Vec<(&'static str, &'static str)> {
        match self.spec.fault_hooks {
            true => vec![(FAULT_HOOKS_ENV, "1")],
            false => Vec::new(),
        }
    }

    /// Master replica `i`, if running.
    pub fn master(&self, i: usize) -> Option<&Process> {
        self.masters[i].as_ref()
    }

    /// Tablet server `i`, if running.
    pub fn server(&self, i: usize) -> Option<&Process> {
        self.servers[i].as_ref()
    }

    /// How many tablet servers the universe has (running or not).
    pub fn server_count(&self) -> usize {
        self.servers.len()
    }

    /// How many master replicas it has (running or not).
    pub fn master_count(&self) -> usize {
        self.masters.len()
    }

    /// The server id of tablet server `i` (from its banner), if it runs.
    pub fn server_id(&self, i: usize) -> Option<u64> {
        self.servers[i].as_ref().and_then(|server| {
            server
                .banner
                .strip_prefix("tablet server ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|id| id.parse::<u64>().ok())
        })
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// SIGKILLs master replica `i`.
    pub fn kill_master(&mut self, i: usize) {
        if let Some(master) = self.masters[i].take() {
            master.kill();
        }
    }

    /// SIGKILLs tablet server `i`.
    pub fn kill_server(&mut self, i: usize) {
        if let Some(server) = self.servers[i].take() {
            server.kill();
        }
    }

    /// The process index of tablet server `server_id` (from its banner).
    pub fn server_index(&self, server_id: u64) -> Option<usize> {
        (0..self.servers.len()).find(|&i| self.server_id(i) == Some(server_id))
    }

    /// The master replica that leads: the one that hands out timestamps.
    pub async fn master_leader(&self) -> Result<usize, CliError> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while Instant::now() < deadline {
            let mut leaders = Vec::new();
            for (i, addr) in self.master_addrs.iter().enumerate() {
                if self.masters[i].is_some() && ask_master(addr).await == MasterAnswer::Leads {
                    leaders.push(i);
                }
            }
            match leaders[..] {
                [leader] => return Ok(leader),
                [] => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => {
                    return Err(CliError::Invalid(format!(
                        "master replicas {leaders:?} all hand out timestamps: a split brain"
                    )));
                }
            }
        }
        Err(CliError::Invalid(format!(
            "no master replica led within {SETTLE_TIMEOUT:?}; see the logs in {}",
            self.dir.display()
        )))
    }

    /// Waits until master replica `i` answers, as leader or naming the leader.
    pub async fn wait_master_ready(&self, i: usize) -> Result<(), CliError> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while Instant::now() < deadline {
            if ask_master(&self.master_addrs[i]).await != MasterAnswer::Down {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(CliError::Invalid(format!(
            "master replica {} did not rejoin within {SETTLE_TIMEOUT:?}",
            i + 1
        )))
    }

    /// Waits until every tablet server is alive and every group of `database/collection`
    /// has a leader.
    pub async fn settle(
        &self,
        client: &Client,
        database: &str,
        collection: &str,
    ) -> Result<(), CliError> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while Instant::now() < deadline {
            if self.settled(client, database, collection).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(CliError::Invalid(format!(
            "the universe did not settle within {SETTLE_TIMEOUT:?}; see the logs in {}",
            self.dir.display()
        )))
    }

    async fn settled(&self, client: &Client, database: &str, collection: &str) -> bool {
        let admin = client.admin();
        let (Ok(servers), Ok(groups), Ok(tablets)) = (
            admin.list_servers().await,
            admin.list_groups().await,
            admin.list_tablets(database, collection).await,
        ) else {
            return false;
        };
        servers.iter().filter(|server| server.alive).count() >= self.spec.servers
            && tablets.iter().all(|tablet| {
                groups
                    .iter()
                    .any(|group| group.id == tablet.group_id && group.leader_server_id != 0)
            })
    }
}

/// What one master replica says to a timestamp request.
#[derive(Debug, PartialEq, Eq)]
enum MasterAnswer {
    /// It handed one out.
    Leads,
    /// It named the leader.
    Follows,
    /// No answer, or no leader known.
    Down,
}

async fn ask_master(addr: &str) -> MasterAnswer {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return MasterAnswer::Down;
    };
    let endpoint = endpoint.timeout(Duration::from_secs(1));
    let Ok(Ok(channel)) = tokio::time::timeout(Duration::from_secs(1), endpoint.connect()).await
    else {
        return MasterAnswer::Down;
    };
    match MasterClient::new(channel)
        .get_timestamps(GetTimestampsRequest { count: 1, after: 0 })
        .await
    {
        Ok(_) => MasterAnswer::Leads,
        Err(status) if leader_hint::read(&status).is_some() => MasterAnswer::Follows,
        Err(_) => MasterAnswer::Down,
    }
}
