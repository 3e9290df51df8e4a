//! A deterministic in-memory network for raft journal servers, and tests on it.
//!
//! Time is a step counter: one step ticks every live server once, delivers the messages due,
//! and runs every server's ready rounds to quiescence (with a real fsync per round). The
//! network drops, delays, duplicates and reorders by a seeded RNG, and can isolate a server
//! and heal. Each test prints its seed; `LUNA_SEED=<n>` replays one: the fault schedule, the
//! client operations and, through fixed election timeouts per server, the elections.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use luna_kernel::stream::{Committed, Entry, Leadership, Snapshot, StreamError};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;
use tokio::sync::{oneshot, watch};

use super::server::election_jitter;
use super::{RaftConfig, Server, sync};

mod admin_tests;
mod core_tests;
mod disk_stall_tests;
mod garbage_tests;
mod idle_tests;
mod replay_tests;
mod snapshot_tests;

const STREAM: u64 = 7;
type Answer = oneshot::Receiver<Result<u64, StreamError>>;

/// A thread that owns one simulated server. raft-engine 0.4.2 caches decoded blocks in a
/// thread-local keyed by file position only, so engines sharing a thread read each other's
/// blocks; one thread per server keeps them apart, and calls stay sequential.
type Job = Box<dyn FnOnce(&mut Option<Server>) + Send>;

struct Host {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Host {
    fn spawn() -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            let mut server = None;
            while let Ok(job) = queue.recv() {
                job(&mut server);
            }
        });
        Self { jobs }
    }

    /// Runs `f` on the host's thread and waits for its result.
    fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Option<Server>) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = std::sync::mpsc::channel();
        let job = Box::new(move |server: &mut Option<Server>| {
            let _ = tx.send(f(server));
        });
        self.jobs.send(job).expect("host thread is alive");
        rx.recv().expect("host job finished")
    }

    /// Runs `f` on the (live) server.
    fn with<R: Send + 'static>(&self, f: impl FnOnce(&mut Server) -> R + Send + 'static) -> R {
        self.run(|server| f(server.as_mut().expect("server is up")))
    }
}

struct InFlight {
    deliver_at: u64,
    from: u64,
    to: u64,
    bytes: Bytes,
}

struct Sim {
    seed: u64,
    rng: SmallRng,
    dirs: Vec<TempDir>,
    /// Server `i` has node id `i + 1`.
    hosts: Vec<Host>,
    /// Leadership of each live server's replica; `None` while crashed.
    servers: Vec<Option<watch::Receiver<Leadership>>>,
    net: Vec<InFlight>,
    now: u64,
    isolated: Option<u64>,
    drop_rate: f64,
    dup_rate: f64,
    max_delay: u64,
    /// The one leader seen in each term.
    leaders: HashMap<u64, u64>,
    /// Acknowledged appends: index -> data.
    acked: BTreeMap<u64, Bytes>,
    appends: Vec<(Answer, Bytes)>,
    /// Read barriers with the highest index acknowledged before they were issued.
    reads: Vec<(Answer, u64)>,
    reads_checked: usize,
    /// The stream's voters at index 0, with which every replica bootstraps.
    initial_voters: Vec<u64>,
    /// Replicas that hold the log and are checked by `heal_and_verify`.
    members: Vec<u64>,
    /// Snapshot data given to `truncate` (unique per call), with the index it was for.
    snapshots: BTreeMap<Bytes, u64>,
    /// Chance that a server leaves a step's rounds unsynced, as the driver does while its
    /// sync thread is busy: later rounds, truncations and crashes then meet rounds that
    /// only the entry cache holds.
    defer_sync_rate: f64,
    /// Servers whose disks hang: their rounds are never synced while they are listed.
    stalled_disks: Vec<u64>,
    /// The servers' `tick_interval`. The simulation ticks them itself, so it sets only how
    /// long a leader lease lasts in wall time: an hour by default, so that the wall clock
    /// never decides a lease read and a seed replays however slowly the machine runs.
    tick_interval: Duration,
    /// Messages the servers sent, before the network dropped or duplicated any.
    sent: u64,
    /// Changes every server's settings from the defaults.
    configure: fn(&mut RaftConfig),
}

impl Sim {
    fn new(seed: u64, nodes: u64) -> Self {
        Self::with_spares(seed, nodes, 0)
    }

    /// `voters` servers that start the stream, and `spares` more that are not started.
    fn with_spares(seed: u64, voters: u64, spares: u64) -> Self {
        Self::build(seed, voters, spares, Duration::from_secs(3600), |_| {})
    }

    /// `nodes` servers whose leases last `tick_interval` times their lease ticks in wall
    /// time.
    fn with_tick_interval(seed: u64, nodes: u64, tick_interval: Duration) -> Self {
        Self::build(seed, nodes, 0, tick_interval, |_| {})
    }

    /// `nodes` servers whose settings `configure` changes from the defaults.
    fn with_config(seed: u64, nodes: u64, configure: fn(&mut RaftConfig)) -> Self {
        Self::build(seed, nodes, 0, Duration::from_secs(3600), configure)
    }

    fn build(
        seed: u64,
        voters: u64,
        spares: u64,
        tick_interval: Duration,
        configure: fn(&mut RaftConfig),
    ) -> Self {
        let mut sim = Self {
            seed,
            rng: SmallRng::seed_from_u64(seed),
            dirs: Vec::new(),
            hosts: Vec::new(),
            servers: Vec::new(),
            net: Vec::new(),
            now: 0,
            isolated: None,
            drop_rate: 0.0,
            dup_rate: 0.0,
            max_delay: 1,
            leaders: HashMap::new(),
            acked: BTreeMap::new(),
            appends: Vec::new(),
            reads: Vec::new(),
            reads_checked: 0,
            initial_voters: (1..=voters).collect(),
            members: (1..=voters).collect(),
            snapshots: BTreeMap::new(),
            defer_sync_rate: 0.0,
            stalled_disks: Vec::new(),
            sent: 0,
            tick_interval,
            configure,
        };
        for _ in 0..voters + spares {
            sim.dirs.push(tempfile::tempdir().expect("tempdir"));
            sim.hosts.push(Host::spawn());
            sim.servers.push(None);
        }
        for id in 1..=voters {
            sim.start(id);
        }
        sim
    }

    fn start(&mut self, id: u64) {
        let dir = self.dirs[id as usize - 1].path().to_owned();
        let voters = self.initial_voters.clone();
        let mut config = RaftConfig::new(id, dir);
        config.tick_interval = self.tick_interval;
        // Distinct for up to five servers, so that two never campaign on the same tick
        // every time; a seed then replays the same elections.
        let spread = election_jitter(config.election_tick) as u64;
        config.fixed_election_timeout =
            Some(config.election_tick + ((id + self.seed) % spread) as usize);
        (self.configure)(&mut config);
        let leadership = self.host(id).run(move |slot| {
            let mut server = Server::open(config).expect("open server");
            server.add_stream(STREAM, &voters).expect("add stream");
            let leadership = server.watch_leadership(STREAM).expect("stream");
            *slot = Some(server);
            leadership
        });
        self.servers[id as usize - 1] = Some(leadership);
    }

    fn crash(&mut self, id: u64) {
        self.host(id).run(|slot| *slot = None);
        self.servers[id as usize - 1] = None;
    }

    fn host(&self, id: u64) -> &Host {
        &self.hosts[id as usize - 1]
    }

    fn send(&mut self, from: u64, messages: Vec<(u64, Bytes)>) {
        self.sent += messages.len() as u64;
        for (to, bytes) in messages {
            if self.rng.random_bool(self.drop_rate) {
                continue;
            }
            let copies = if self.rng.random_bool(self.dup_rate) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let deliver_at = self.now + self.rng.random_range(1..=self.max_delay);
                self.net.push(InFlight {
                    deliver_at,
                    from,
                    to,
                    bytes: bytes.clone(),
                });
            }
        }
    }

    /// Runs ready rounds of server `id` until it has nothing left to do.
    fn drain(&mut self, id: u64) {
        if let Err(error) = self.try_drain(id) {
            panic!("seed {}: server {id} failed: {error}", self.seed);
        }
    }

    /// [`drain`](Self::drain), which returns the error that failed the server, if one did.
    fn try_drain(&mut self, id: u64) -> Result<(), StreamError> {
        for _ in 0..100 {
            // Rolled only when enabled, so other tests' seeds replay as before.
            let defer = (self.defer_sync_rate > 0.0 && self.rng.random_bool(self.defer_sync_rate))
                || self.stalled_disks.contains(&id);
            let (out, more) = self.host(id).with(move |server| {
                let mut out = server.ready()?;
                if defer {
                    return Ok((out, false));
                }
                let Some(mut round) = server.take_sync() else {
                    return Ok((out, false));
                };
                out.extend(sync(&server.engine(), &mut round)?);
                server.finish_sync(round);
                Ok((out, true))
            })?;
            self.send(id, out);
            if !more {
                return Ok(());
            }
        }
        panic!("seed {}: server {id} never quiesced", self.seed);
    }

    fn step(&mut self) {
        self.advance(true);
    }

    /// One step in which no server ticks: messages flow, but no heartbeat or election
    /// starts.
    fn step_without_ticks(&mut self) {
        self.advance(false);
    }

    fn advance(&mut self, tick: bool) {
        self.now += 1;
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.net)
            .into_iter()
            .partition(|m| m.deliver_at <= now);
        self.net = later;
        for m in due {
            let cut = self.isolated.is_some_and(|i| i == m.from || i == m.to);
            if !cut && self.servers[m.to as usize - 1].is_some() {
                let failed = self
                    .host(m.to)
                    .with(move |server| server.step(m.from, &m.bytes));
                if let Err(error) = failed {
                    panic!("seed {}: server {} failed: {error}", self.seed, m.to);
                }
            }
        }
        for id in 1..=self.servers.len() as u64 {
            if self.servers[id as usize - 1].is_some() {
                if tick {
                    self.host(id).with(Server::tick);
                }
                self.drain(id);
            }
        }
        self.check();
    }

    /// At most one leader per term; every answer consistent with what was acknowledged.
    fn check(&mut self) {
        for (i, watch) in self.servers.iter().enumerate() {
            let Some(watch) = watch else { continue };
            let leadership = *watch.borrow();
            if leadership.is_leader {
                let id = i as u64 + 1;
                let seen = *self.leaders.entry(leadership.term).or_insert(id);
                assert_eq!(
                    seen, id,
                    "seed {}: two leaders in term {}",
                    self.seed, leadership.term
                );
            }
        }
        let mut pending = Vec::new();
        for (mut answer, data) in std::mem::take(&mut self.appends) {
            match answer.try_recv() {
                Ok(Ok(index)) => {
                    let previous = self.acked.insert(index, data.clone());
                    assert!(
                        previous.is_none(),
                        "seed {}: index {index} acknowledged twice",
                        self.seed
                    );
                }
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => {}
                Err(oneshot::error::TryRecvError::Empty) => pending.push((answer, data)),
            }
        }
        self.appends = pending;
        let mut pending = Vec::new();
        for (mut answer, floor) in std::mem::take(&mut self.reads) {
            match answer.try_recv() {
                Ok(Ok(index)) => {
                    assert!(
                        index >= floor,
                        "seed {}: read_index {index} < acked {floor}",
                        self.seed
                    );
                    self.reads_checked += 1;
                }
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => {}
                Err(oneshot::error::TryRecvError::Empty) => pending.push((answer, floor)),
            }
        }
        self.reads = pending;
    }

    fn leader(&self) -> Option<u64> {
        self.servers.iter().flatten().find_map(|watch| {
            let l = *watch.borrow();
            l.is_leader.then_some(l.leader_id).flatten()
        })
    }

    /// The term that server `id` is in (0 while it is crashed).
    fn term_of(&self, id: u64) -> u64 {
        self.servers[id as usize - 1]
            .as_ref()
            .map_or(0, |watch| watch.borrow().term)
    }

    fn run_until_leader(&mut self, max_steps: u64) -> u64 {
        for _ in 0..max_steps {
            if let Some(leader) = self.leader() {
                return leader;
            }
            self.step();
        }
        panic!("seed {}: no leader after {max_steps} steps", self.seed);
    }

    fn propose(&mut self, id: u64, data: Bytes) {
        let proposed = data.clone();
        let answer = self
            .host(id)
            .with(move |server| server.propose(STREAM, proposed));
        self.appends.push((answer, data));
    }

    fn read(&mut self, id: u64) {
        let floor = self.acked.keys().next_back().copied().unwrap_or(0);
        let answer = self.host(id).with(|server| server.read_index(STREAM));
        self.reads.push((answer, floor));
    }

    /// A lease read, checked like [`read`](Self::read).
    fn lease_read(&mut self, id: u64) {
        let floor = self.acked.keys().next_back().copied().unwrap_or(0);
        let answer = self.host(id).with(|server| server.lease_read(STREAM));
        self.reads.push((answer, floor));
    }

    fn committed(&self, id: u64) -> u64 {
        self.host(id)
            .with(|server| *server.watch_committed(STREAM).expect("stream").borrow())
    }

    /// Replica `id`'s committed log up to `to`, read as a subscription from 1 reads it:
    /// its snapshot (if the log was compacted), then every entry after it.
    fn log(&self, id: u64, to: u64) -> (Option<Snapshot>, Vec<Entry>) {
        self.host(id).with(move |server| {
            let (mut snapshot, mut entries, mut next) = (None, Vec::new(), 1);
            while next <= to {
                let items = server.read(STREAM, next, to).expect("read log");
                assert!(!items.is_empty(), "nothing held at {next}");
                for item in items {
                    next = item.index() + 1;
                    match item {
                        Committed::Snapshot(s) => {
                            assert!(entries.is_empty(), "a snapshot after entries");
                            snapshot = Some(s);
                        }
                        Committed::Entry(entry) => entries.push(entry),
                    }
                }
            }
            (snapshot, entries)
        })
    }

    /// Heals everything, lets the cluster converge, and checks every replica's committed
    /// log: identical across replicas, and holding each acknowledged entry at its index.
    fn heal_and_verify(&mut self) {
        self.isolated = None;
        self.drop_rate = 0.0;
        self.defer_sync_rate = 0.0;
        let members = self.members.clone();
        for &id in &members {
            if self.servers[id as usize - 1].is_none() {
                self.start(id);
            }
        }
        let leader = self.run_until_leader(500);
        // A fresh entry in the leader's term commits everything before it everywhere.
        self.propose(leader, Bytes::from_static(b"final"));
        for _ in 0..500 {
            self.step();
            let target = self.acked.keys().next_back().copied().unwrap_or(0);
            let commits: Vec<u64> = members.iter().map(|&id| self.committed(id)).collect();
            if self.appends.is_empty() && commits.iter().all(|&c| c == commits[0] && c >= target) {
                break;
            }
        }
        let seed = self.seed;
        let commit = self.committed(members[0]);
        // Every replica's log: contiguous after its snapshot (if any), equal to the others'
        // where they overlap, holding every acknowledged entry after its snapshot.
        let mut reference: BTreeMap<u64, Entry> = BTreeMap::new();
        let mut snapshots = Vec::new();
        for &id in &members {
            assert_eq!(self.committed(id), commit, "seed {seed}: replica {id} lags");
            let (snapshot, log) = self.log(id, commit);
            let start = snapshot.as_ref().map_or(1, |s| s.index + 1);
            let indexes: Vec<u64> = log.iter().map(|e| e.index).collect();
            let expected: Vec<u64> = (start..=commit).collect();
            assert_eq!(
                indexes, expected,
                "seed {seed}: replica {id}'s log has gaps"
            );
            for entry in log {
                let held = reference
                    .entry(entry.index)
                    .or_insert_with(|| entry.clone());
                assert_eq!(*held, entry, "seed {seed}: replica {id} diverged");
            }
            for (index, data) in self.acked.range(start..) {
                let entry = reference.get(index).map(|e| &e.data);
                assert_eq!(entry, Some(data), "seed {seed}: {id} lost entry {index}");
            }
            snapshots.extend(snapshot.map(|s| (id, s)));
        }
        for (id, snapshot) in snapshots {
            // Delivered exactly as some replica's application gave it, for that index, and
            // with the term of the entry it replaced.
            let given = self.snapshots.get(&snapshot.data);
            assert_eq!(given, Some(&snapshot.index), "seed {seed}: {id}'s snapshot");
            if let Some(entry) = reference.get(&snapshot.index) {
                assert_eq!(
                    entry.term, snapshot.term,
                    "seed {seed}: {id}'s snapshot term"
                );
            }
        }
    }
}

/// The bytes of the files directly in `dir`.
pub(super) fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("ls")
        .map(|item| item.expect("entry").metadata().expect("metadata").len())
        .sum()
}

/// Three servers whose leader acknowledged `entry-0` to `entry-29`; returns the leader.
fn with_thirty_acknowledged(sim: &mut Sim) -> u64 {
    let leader = sim.run_until_leader(300);
    for i in 0..30 {
        sim.propose(leader, Bytes::from(format!("entry-{i}")));
    }
    for _ in 0..20 {
        sim.step();
    }
    assert_eq!(sim.acked.len(), 30, "seed {}", sim.seed);
    leader
}

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("LUNA_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => vec![seed],
        None => default.collect(),
    }
}

/// Three servers under 600 steps of appends, reads, crashes, restarts and partitions, with
/// lost, duplicated, delayed and unsynced messages, then healed and checked.
fn run_with_faults(seed: u64) -> Sim {
    {
        let mut sim = Sim::new(seed, 3);
        sim.drop_rate = 0.05;
        sim.dup_rate = 0.05;
        sim.max_delay = 3;
        sim.defer_sync_rate = 0.2;
        sim.run_until_leader(300);
        for step in 0..600u64 {
            let id = sim.rng.random_range(1..=3u64);
            let roll = sim.rng.random_range(0..100);
            if sim.servers[id as usize - 1].is_some() {
                let target = if roll < 50 {
                    sim.leader().unwrap_or(id)
                } else {
                    id
                };
                if sim.servers[target as usize - 1].is_some() && roll < 60 {
                    sim.propose(target, Bytes::from(format!("s{seed}-{step}")));
                } else if roll < 65 {
                    sim.read(id);
                } else if roll < 70 {
                    sim.lease_read(id);
                } else if roll == 70 {
                    sim.crash(id);
                }
            } else if roll < 10 {
                sim.start(id);
            }
            if sim.isolated.is_none() && roll == 99 {
                sim.isolated = Some(id);
            } else if sim.isolated.is_some() && roll >= 95 {
                sim.isolated = None;
            }
            sim.step();
        }
        sim.heal_and_verify();
        sim
    }
}
