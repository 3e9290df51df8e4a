//! A universe of real `luna` processes on loopback for integration tests: one `luna master`
//! (or three replicated ones) and `luna tablet-server`s, each a child process killed by PID
//! when the test ends (also on panic), with its log in the test's directory.

#![allow(dead_code)]

pub mod history;
pub mod load;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use luna_client::Client;
use luna_proto::master::GetTimestampsRequest;
use luna_proto::master::master_client::MasterClient;

/// How long a process may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process, killed (SIGKILL) and reaped on drop.
pub struct Proc {
    child: Child,
    /// What it printed when it started serving.
    pub banner: String,
}

impl Proc {
    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process stops dead, sockets open, as in a long GC pause or a VM stall.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// The `/metrics` text it serves (its banner names the `http://` address).
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let addr = self
            .banner
            .split_once("http://")
            .and_then(|(_, rest)| rest.split([')', ' ']).next())
            .unwrap_or_else(|| panic!("no http address in `{}`", self.banner));
        let mut stream = std::net::TcpStream::connect(addr).expect("connect to /metrics");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).expect("send GET");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read /metrics");
        response
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `luna ARGS`, logging to `log`, and waits for its first stdout line.
fn spawn(args: &[String], log: &Path) -> Proc {
    let stderr = File::create(log).expect("create the process log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_luna"))
        .args(args)
        .env("LUNA_LOG", "info")
        .env_remove("LUNA_MASTER")
        .env_remove("LUNA_DATA_DIR")
        .env_remove("LUNA_OBJECT_STORE")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("spawn luna");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        // Keeps draining after the test stops listening, so the child never writes into
        // a closed pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut proc = Proc {
        child,
        banner: String::new(),
    };
    match received.recv_timeout(START_TIMEOUT) {
        Ok(line) => proc.banner = line,
        Err(_) => panic!(
            "`luna {}` printed nothing within {START_TIMEOUT:?}; log:\n{}",
            args.join(" "),
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
    proc
}

/// The word after `marker` in `banner`.
fn word_after<'a>(banner: &'a str, marker: &str) -> &'a str {
    banner
        .split_once(marker)
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `{marker}` in `{banner}`"))
}

/// A free loopback port, for processes that must know each other's addresses before they
/// start (another process may take it meanwhile, which fails the test loudly, not wrongly).
pub fn free_addr() -> String {
    ports::free_loopback_addr().expect("a free port")
}

#[path = "../../src/harness/ports.rs"]
mod ports;

/// The master's processes, and tablet servers sharing one `file://` object store.
pub struct Universe {
    pub dir: tempfile::TempDir,
    /// One master, or the replicas of a replicated one (by replica id - 1).
    pub masters: Vec<Option<Proc>>,
    /// The `--replica` entries of a replicated master (empty for one master).
    pub replicas: Vec<String>,
    /// The client address of every master, separated by commas.
    pub master_addr: String,
    pub servers: Vec<Option<Proc>>,
    /// The masters' `--repair-after-secs`: long (the default), so that only tests of repair
    /// see replicas move.
    pub repair_after_secs: u64,
    /// More flags for every master process.
    pub master_flags: Vec<String>,
    /// More flags for every tablet server process.
    pub server_flags: Vec<String>,
}

impl Universe {
    /// Starts a master and `servers` tablet servers.
    pub fn start(servers: usize) -> Universe {
        Universe::start_with_masters(1, servers)
    }

    /// Starts `masters` master replicas (one runs alone, on a local journal) and `servers`
    /// tablet servers.
    pub fn start_with_masters(masters: usize, servers: usize) -> Universe {
        Universe::start_with_repair(masters, servers, 300)
    }

    /// Like [`start_with_masters`](Self::start_with_masters), with masters that replace the
    /// replicas of a server silent for `repair_after_secs`.
    pub fn start_with_repair(masters: usize, servers: usize, repair_after_secs: u64) -> Universe {
        Universe::start_with_master_flags(masters, servers, repair_after_secs, &[])
    }

    /// Like [`start_with_repair`](Self::start_with_repair), with more flags for the masters.
    pub fn start_with_master_flags(
        masters: usize,
        servers: usize,
        repair_after_secs: u64,
        master_flags: &[&str],
    ) -> Universe {
        Universe::start_with_flags(masters, servers, repair_after_secs, master_flags, &[])
    }

    /// Like [`start`](Self::start), with more flags for the tablet servers.
    pub fn start_with_server_flags(servers: usize, server_flags: &[&str]) -> Universe {
        Universe::start_with_flags(1, servers, 300, &[], server_flags)
    }

    fn start_with_flags(
        masters: usize,
        servers: usize,
        repair_after_secs: u64,
        master_flags: &[&str],
        server_flags: &[&str],
    ) -> Universe {
        let dir = tempfile::tempdir().expect("tempdir");
        let replicas: Vec<String> = match masters {
            1 => Vec::new(),
            _ => (1..=masters)
                .map(|id| format!("{id}={}/{}", free_addr(), free_addr()))
                .collect(),
        };
        let master_addr = match masters {
            1 => "127.0.0.1:0".to_owned(),
            _ => replicas
                .iter()
                .map(|replica| replica_client_addr(replica).to_owned())
                .collect::<Vec<_>>()
                .join(","),
        };
        let mut universe = Universe {
            dir,
            masters: (0..masters).map(|_| None).collect(),
            replicas,
            master_addr,
            servers: Vec::new(),
            repair_after_secs,
            master_flags: master_flags.iter().map(|flag| (*flag).to_owned()).collect(),
            server_flags: server_flags.iter().map(|flag| (*flag).to_owned()).collect(),
        };
        universe.start_master();
        for i in 0..servers {
            let server = universe.spawn_server(i);
            universe.servers.push(Some(server));
        }
        universe
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// (Re)starts every master process that is not running, on its first address after
    /// the first start.
    pub fn start_master(&mut self) {
        for i in 0..self.masters.len() {
            if self.masters[i].is_none() {
                self.restart_master(i);
            }
        }
    }

    /// (Re)starts master process `i` on its data directory.
    pub fn restart_master(&mut self, i: usize) {
        let mut args: Vec<String> = [
            "master",
            "--data-dir",
            &self.path(&format!("master-{i}")).display().to_string(),
            "--http",
            "127.0.0.1:0",
            "--heartbeat-timeout-secs",
            "3",
            "--repair-after-secs",
            &self.repair_after_secs.to_string(),
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        args.extend(self.master_flags.iter().cloned());
        if self.replicas.is_empty() {
            args.extend(["--listen".to_owned(), self.master_addr.clone()]);
        } else {
            args.extend(["--replica-id".to_owned(), (i + 1).to_string()]);
            args.extend(["--replica".to_owned(), self.replicas.join(",")]);
        }
        let master = spawn(&args, &self.path(&format!("master-{i}.log")));
        if self.replicas.is_empty() {
            self.master_addr = word_after(&master.banner, "serving on ").to_owned();
        }
        self.masters[i] = Some(master);
    }

    /// SIGKILLs master process `i`.
    pub fn kill_master(&mut self, i: usize) {
        if let Some(master) = self.masters[i].take() {
            master.kill();
        }
    }

    /// The client address of master process `i`.
    pub fn master_addr_of(&self, i: usize) -> &str {
        match self.replicas.get(i) {
            Some(replica) => replica_client_addr(replica),
            None => &self.master_addr,
        }
    }

    /// The index of the master process that leads: the one that hands out timestamps.
    pub async fn leading_master(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for i in 0..self.masters.len() {
                if self.masters[i].is_none() {
                    continue;
                }
                let addr = format!("http://{}", self.master_addr_of(i));
                let Ok(mut master) = MasterClient::connect(addr).await else {
                    continue;
                };
                if master
                    .get_timestamps(GetTimestampsRequest { count: 1, after: 0 })
                    .await
                    .is_ok()
                {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no master replica leads");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn spawn_server(&self, i: usize) -> Proc {
        let objects = self.path("objects");
        std::fs::create_dir_all(&objects).expect("objects dir");
        let mut args: Vec<String> = [
            "tablet-server",
            "--master",
            &self.master_addr,
            "--data-dir",
            &self.path(&format!("server-{i}")).display().to_string(),
            "--object-store",
            &format!("file://{}", objects.display()),
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        args.extend(self.server_flags.iter().cloned());
        spawn(&args, &self.path(&format!("server-{i}.log")))
    }

    /// The id the master gave tablet server `i`.
    pub fn server_id(&self, i: usize) -> u64 {
        let proc = self.servers[i].as_ref().expect("server running");
        word_after(&proc.banner, "tablet server ")
            .parse()
            .expect("server id")
    }

    /// The index of the process running server `id`.
    pub fn index_of(&self, id: u64) -> usize {
        (0..self.servers.len())
            .find(|&i| self.servers[i].is_some() && self.server_id(i) == id)
            .unwrap_or_else(|| panic!("no running process is server {id}"))
    }

    /// Starts one more tablet server; returns its index.
    pub fn add_server(&mut self) -> usize {
        let i = self.servers.len();
        let server = self.spawn_server(i);
        self.servers.push(Some(server));
        i
    }

    /// SIGKILLs tablet server `i`.
    pub fn kill_server(&mut self, i: usize) {
        if let Some(server) = self.servers[i].take() {
            server.kill();
        }
    }

    /// The running process of tablet server `i`.
    pub fn server(&self, i: usize) -> &Proc {
        self.servers[i].as_ref().expect("server running")
    }

    /// Restarts tablet server `i` on its data directory.
    pub fn restart_server(&mut self, i: usize) {
        let server = self.spawn_server(i);
        self.servers[i] = Some(server);
    }

    /// SIGKILLs every process.
    pub fn kill_all(&mut self) {
        for i in 0..self.servers.len() {
            self.kill_server(i);
        }
        for i in 0..self.masters.len() {
            self.kill_master(i);
        }
    }

    /// A client of this universe.
    pub async fn client(&self) -> Client {
        Client::connect(self.master_addr.split(','))
            .await
            .expect("connect to the master")
    }

    /// Waits until the master counts `count` live servers.
    pub async fn wait_servers_up(&self, client: &Client, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(servers) = client.admin().list_servers().await
                && servers.iter().filter(|server| server.alive).count() >= count
            {
                return;
            }
            assert!(Instant::now() < deadline, "{count} servers never came up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs the `luna` CLI against this universe.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_luna"))
            .args(args)
            .env("LUNA_MASTER", &self.master_addr)
            .output()
            .expect("run the luna CLI")
    }

    /// The sum of gauge `name` (every label set) over the running tablet servers' metrics.
    pub fn server_gauge_sum(&self, name: &str) -> u64 {
        let prefix = format!("{name}{{");
        self.servers
            .iter()
            .flatten()
            .map(Proc::metrics)
            .flat_map(|text| {
                text.lines()
                    .filter(|line| line.starts_with(&prefix))
                    .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Everything tablet server `i` has logged so far.
    pub fn server_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.path(&format!("server-{i}.log"))).unwrap_or_default()
    }

    /// The process logs, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|ext| ext == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    out.push_str(&format!("--- {}\n", path.display()));
                    for line in tail.into_iter().rev() {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

/// The client address in a `--replica` entry (ID=CLIENT/RAFT).
fn replica_client_addr(replica: &str) -> &str {
    replica
        .split_once('=')
        .and_then(|(_, addrs)| addrs.split_once('/'))
        .map(|(client, _)| client)
        .unwrap_or_else(|| panic!("`{replica}` is not a replica entry"))
}

/// Runs `command` with its output captured, killing it (by its PID) if it outlives `limit`.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn luna");
    let started = Instant::now();
    while child.try_wait().expect("poll luna").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect luna output")
}

/// The JSON reports a successful `luna ... --json` run printed, one per line.
pub fn json_reports(output: &Output) -> Vec<serde_json::Value> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "luna failed: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON report per line"))
        .collect()
}
