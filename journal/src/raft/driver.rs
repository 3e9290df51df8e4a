//! The production driver of a [`Server`]: one thread runs the ready loop of every stream a
//! server hosts, and a second thread runs the fsyncs.
//!
//! The driver thread runs the loop as a task on a runtime of its own (current-thread),
//! which a transport can run its network tasks on too (`grpc::GrpcNode` does): a message
//! from a peer then reaches the loop, and the loop's messages reach the socket, without
//! waking another thread. On this project's 2-core VM every such wake-up costs tens of
//! microseconds, and a commit crosses several (docs/journal.md, "The driver").
//!
//! The driver thread owns the `Server` and is the only thread that reads its raft-engine
//! (raft-engine 0.4.2 caches decoded blocks per thread, keyed by file position only, so a
//! thread must not read two engines; see docs/journal.md). Everything else talks to it by
//! [`Event`]s on one channel. One turn of the loop:
//!
//! 1. wait for an event or the next tick, then take every event queued meanwhile, so all
//!    proposals and messages that arrived during the previous turn share this one;
//! 2. tick every stream once if the tick is due (coalesced: one timer for all streams);
//! 3. run [`Server::ready`] and hand the messages to the transport, one batch per peer;
//! 4. if no sync is running, give every round since the last one to the sync thread, which
//!    writes them to the engine with one fsync and sends the messages that waited for it
//!    (append acks, votes) at once. Meanwhile the loop keeps running rounds, whose entries
//!    the streams' entry caches serve, so it never waits for the disk. When the sync is
//!    done ([`Event::Synced`]) raft learns it is persisted, and the next sync covers
//!    everything that queued meanwhile.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use luna_kernel::stream::{Committed, StreamError};
use raft_engine::Engine;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{mpsc, oneshot};

use super::overload::OverloadStats;
use super::replica::{AdminReply, Reply};
use super::round::{SyncRound, sync};
use super::server::{RaftConfig, Server};
use super::snapshot::purge_expired;
use super::stream::RaftStream;
use super::transport::{Inbox, Transport};
use crate::error::JournalError;

/// Turns in a row without waiting for an event after which the ready loop yields to the
/// transport's tasks on its runtime.
const BUSY_TURNS_BEFORE_YIELD: u32 = 4;

/// The driver's event queue: unbounded, because peers, clients and the sync thread must
/// never block on it (the transport's and the streams' own queues bound what enters).
pub(crate) type Events = mpsc::UnboundedSender<Event>;

/// Everything the driver thread reacts to.
#[derive(Debug)]
pub(crate) enum Event {
    /// Raft messages from peer server `from`, `bytes` long in all (counted in the node's
    /// queued peer bytes until handled).
    Messages {
        from: u64,
        messages: Vec<Bytes>,
        bytes: usize,
    },
    /// A client append.
    Propose {
        stream_id: u64,
        data: Bytes,
        reply: Reply,
    },
    /// A client read barrier.
    ReadIndex { stream_id: u64, reply: Reply },
    /// A client read barrier that a leader with a valid lease answers at once.
    LeaseRead { stream_id: u64, reply: Reply },
    /// A membership change.
    ChangeMembership {
        stream_id: u64,
        voters: Vec<u64>,
        learners: Vec<u64>,
        reply: AdminReply,
    },
    /// A leader transfer.
    TransferLeader {
        stream_id: u64,
        to: u64,
        reply: AdminReply,
    },
    /// A subscription reading committed entries `from..=to`.
    Read {
        stream_id: u64,
        from: u64,
        to: u64,
        reply: oneshot::Sender<Result<Vec<Committed>, StreamError>>,
    },
    /// The application's snapshot of `up_to`: store it and compact the log.
    Truncate {
        stream_id: u64,
        up_to: u64,
        data: Bytes,
        reply: oneshot::Sender<Result<(), StreamError>>,
    },
    /// Host a replica of a stream.
    AddStream {
        stream_id: u64,
        voters: Vec<u64>,
        reply: oneshot::Sender<Result<RaftStream, JournalError>>,
    },
    /// The sync thread finished `round`.
    Synced {
        round: Box<SyncRound>,
        result: Result<(), StreamError>,
    },
    /// The purge thread failed, leaving the engine in an unknown state.
    PurgeFailed(StreamError),
    /// Stop hosting a stream and delete its data.
    RemoveStream {
        stream_id: u64,
        reply: oneshot::Sender<bool>,
    },
    /// Stop the driver: waiting operations fail with `Closed`.
    Stop,
    /// Panic on the driver thread, for the tests of what a panic there does (no message
    /// from a peer makes raft-rs panic any more, see `inbound.rs`).
    #[cfg(test)]
    Panic,
}

/// A running journal server: the raft replicas of many streams, their shared raft-engine,
/// and the threads that drive them. Peers' messages enter through [`inbox`](Self::inbox);
/// the node's own leave through the [`Transport`] it was started with.
///
/// Dropping a node stops it without waiting; [`shutdown`](Self::shutdown) also waits until
/// the engine is closed, so the directory can be reopened at once.
#[derive(Debug)]
pub struct Node {
    node_id: u64,
    events: Events,
    driver: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
}

/// What a node has done since it started, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// fsyncs of the raft log (each covers every round written before it).
    pub fsyncs: u64,
    /// Microseconds the writes that ended in those fsyncs took, in all (with `fsyncs`, the
    /// mean time a round waits for the disk).
    pub sync_micros: u64,
    /// Sync steps: each covers every ready round written since the previous one, and
    /// fsyncs unless those rounds wrote nothing durable.
    pub rounds: u64,
    /// Batches of peers' messages dropped because the driver was too far behind on them.
    pub peer_batches_dropped: u64,
    /// Bytes of peers' messages delivered and not yet handled (a gauge).
    pub peer_bytes_queued: usize,
    /// Bytes of log writes waiting behind the fsync in flight (a gauge; see
    /// [`RaftConfig::max_unsynced_bytes`](super::RaftConfig::max_unsynced_bytes)).
    pub unsynced_bytes: usize,
    /// Proposals refused with `StreamError::Overloaded` because the disk was behind.
    pub proposals_refused: u64,
    /// Peers' appends dropped because the disk was behind (their leaders resend them).
    pub peer_appends_dropped: u64,
    /// Whether `unsynced_bytes` is over the bound now: the disk is behind, and the node
    /// refuses proposals.
    pub disk_behind: bool,
}

/// What a node's threads and its inbox share: the stats' counters, the peer bytes queued
/// for the driver, and why the node failed.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    fsyncs: AtomicU64,
    sync_micros: AtomicU64,
    rounds: AtomicU64,
    /// Bytes of peers' messages delivered and not yet handled by the driver.
    pub(crate) peer_bytes_queued: AtomicUsize,
    pub(crate) peer_batches_dropped: AtomicU64,
    /// The driver's copy of the server's overload figures, after each turn.
    overload: Mutex<OverloadStats>,
    /// Why the node stopped working (its log failed, or its driver panicked), once it has.
    failure: Mutex<Option<String>>,
}

impl Counters {
    fn record_failure(&self, why: String) {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(why);
    }
}

impl Node {
    /// Opens (or creates) the raft-engine log in `config.dir` and starts the driver. Streams
    /// are added with [`add_stream`](Self::add_stream).
    pub fn start(config: RaftConfig, transport: Arc<dyn Transport>) -> Result<Node, JournalError> {
        Self::start_on(config, driver_runtime()?, transport)
    }

    /// [`start`](Self::start) on `runtime`, made by [`driver_runtime`], whose handle the
    /// transport already holds to run its tasks on the driver thread.
    pub(crate) fn start_on(
        config: RaftConfig,
        runtime: DriverRuntime,
        transport: Arc<dyn Transport>,
    ) -> Result<Node, JournalError> {
        let (events, queue) = mpsc::unbounded_channel();
        let (opened_tx, opened) = std::sync::mpsc::channel();
        let node_id = config.node_id;
        let loop_events = events.clone();
        let counters = Arc::new(Counters::default());
        let sync_counters = Arc::clone(&counters);
        let driver_counters = Arc::clone(&counters);
        let panic_counters = Arc::clone(&counters);
        let driver = std::thread::Builder::new()
            .name(format!("luna-raft-{node_id}"))
            .spawn(move || {
                // The engine is opened on the driver thread: only this thread reads it.
                let tick = config.tick_interval;
                let max_catch_up = config.election_tick as u64 + 1;
                let mut server = match Server::open(config) {
                    Ok(server) => server,
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                let syncer = match SyncThread::spawn(
                    server.engine(),
                    Arc::clone(&transport),
                    loop_events.clone(),
                    sync_counters,
                ) {
                    Ok(syncer) => syncer,
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                let purger = match PurgeThread::spawn(&mut server, loop_events.clone()) {
                    Ok(purger) => purger,
                    Err(e) => {
                        syncer.stop();
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                let _ = opened_tx.send(Ok(()));
                let driver = Driver {
                    server,
                    transport,
                    events: loop_events,
                    counters: driver_counters,
                    tick,
                    max_catch_up,
                    syncing: false,
                    failed: None,
                };
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runtime.run(driver.run(queue, syncer, purger));
                }));
                if let Err(panic) = ran {
                    // raft-rs panics where it finds its state inconsistent; what peers
                    // send is checked before it sees it (`inbound.rs`), so a panic here
                    // is a bug, ours or raft-rs's.
                    let why = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("no message");
                    tracing::error!(
                        node_id,
                        panic = why,
                        "the raft driver panicked; every stream of this server is closed"
                    );
                    panic_counters.record_failure(format!("the raft driver panicked: {why}"));
                }
                // The transport's tasks on this runtime end with it.
                drop(runtime);
            })
            .map_err(|e| JournalError::io("starting the raft driver thread", e))?;
        match opened.recv() {
            Ok(Ok(())) => Ok(Node {
                node_id,
                events,
                driver: Mutex::new(Some(driver)),
                counters,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(JournalError::Raft {
                stream_id: 0,
                reason: "the raft driver thread stopped while opening".to_owned(),
            }),
        }
    }

    /// This server's replica id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Counters since the node started.
    pub fn stats(&self) -> NodeStats {
        let overload = *self
            .counters
            .overload
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        NodeStats {
            fsyncs: self.counters.fsyncs.load(Ordering::Relaxed),
            sync_micros: self.counters.sync_micros.load(Ordering::Relaxed),
            rounds: self.counters.rounds.load(Ordering::Relaxed),
            peer_batches_dropped: self.counters.peer_batches_dropped.load(Ordering::Relaxed),
            peer_bytes_queued: self.counters.peer_bytes_queued.load(Ordering::Relaxed),
            unsynced_bytes: overload.unsynced_bytes,
            proposals_refused: overload.proposals_refused,
            peer_appends_dropped: overload.peer_appends_dropped,
            disk_behind: overload.over_bound,
        }
    }

    /// Why the node stopped working, if it has: its log could not be written, or its driver
    /// panicked. Every stream of a failed node is closed; its server should step aside (stop
    /// reporting itself healthy) so that its replicas are replaced.
    pub fn failure(&self) -> Option<String> {
        self.counters
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Where transports deliver messages from peers.
    pub fn inbox(&self) -> Inbox {
        Inbox {
            events: self.events.clone(),
            counters: Arc::clone(&self.counters),
        }
    }

    /// Hosts a replica of `stream_id` whose initial voters (at index 0) are `voters`, and
    /// returns its [`Stream`] handle. Every replica passes the same list, including one that
    /// joins later: it learns the current membership from the log once the leader adds it
    /// ([`RaftStream::add_learner`]). A stream already on disk recovers its state and log.
    ///
    /// [`Stream`]: luna_kernel::stream::Stream
    pub async fn add_stream(
        &self,
        stream_id: u64,
        voters: &[u64],
    ) -> Result<RaftStream, JournalError> {
        let (reply, answer) = oneshot::channel();
        let event = Event::AddStream {
            stream_id,
            voters: voters.to_vec(),
            reply,
        };
        let stopped = || JournalError::Raft {
            stream_id,
            reason: "the journal server has stopped".to_owned(),
        };
        self.events.send(event).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Stops hosting `stream_id` and deletes its log and state (see
    /// [`Server::remove_stream`]); returns whether it was hosted. Handles of the stream
    /// fail with [`StreamError::Closed`] from then on.
    pub async fn remove_stream(&self, stream_id: u64) -> Result<bool, JournalError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || JournalError::Raft {
            stream_id,
            reason: "the journal server has stopped".to_owned(),
        };
        self.events
            .send(Event::RemoveStream { stream_id, reply })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    /// Stops the driver and waits until the engine is closed. Operations in flight fail
    /// with [`StreamError::Closed`] (their outcome is unknown).
    pub async fn shutdown(&self) {
        let _ = self.events.send(Event::Stop);
        let driver = self
            .driver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(driver) = driver {
            // A driver that panicked has stopped too, which is all shutdown waits for.
            let _ = tokio::task::spawn_blocking(move || driver.join()).await;
        }
    }
}

#[cfg(test)]
impl Node {
    /// Makes the driver thread panic.
    pub(super) fn inject_panic(&self) {
        let _ = self.events.send(Event::Panic);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.events.send(Event::Stop);
    }
}

/// The runtime of a driver thread: current-thread, with the I/O and time drivers a
/// transport needs. Built before the thread starts, so that its transport can hold the
/// handle.
#[derive(Debug)]
pub(crate) struct DriverRuntime {
    /// Taken only when dropped.
    runtime: Option<Runtime>,
    handle: Handle,
}

/// Builds a [`DriverRuntime`].
pub(crate) fn driver_runtime() -> Result<DriverRuntime, JournalError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| JournalError::io("building the raft driver's runtime", e))?;
    Ok(DriverRuntime {
        handle: runtime.handle().clone(),
        runtime: Some(runtime),
    })
}

impl DriverRuntime {
    /// A handle to spawn the transport's tasks with.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `future` to completion on the calling thread, with the runtime's other tasks.
    fn run(&self, future: impl Future<Output = ()>) {
        if let Some(runtime) = &self.runtime {
            runtime.block_on(future);
        }
    }
}

impl Drop for DriverRuntime {
    fn drop(&mut self) {
        // Without waiting: dropping a runtime the plain way panics inside another runtime,
        // which is where a failed start drops it (the thread that should own it did not
        // start).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The error a membership change or leader transfer gets on a failed server.
fn failed(stream_id: u64, source: &StreamError) -> JournalError {
    JournalError::Stream {
        stream_id,
        source: source.clone(),
    }
}

/// The thread that writes and fsyncs rounds, so the ready loop never waits for the disk.
struct SyncThread {
    rounds: std::sync::mpsc::Sender<SyncRound>,
    thread: JoinHandle<()>,
}

impl SyncThread {
    fn spawn(
        engine: Arc<Engine>,
        transport: Arc<dyn Transport>,
        events: Events,
        counters: Arc<Counters>,
    ) -> Result<Self, JournalError> {
        let (rounds, queue) = std::sync::mpsc::channel::<SyncRound>();
        let thread = std::thread::Builder::new()
            .name("luna-raft-sync".to_owned())
            .spawn(move || {
                while let Ok(mut round) = queue.recv() {
                    // The acks go from here straight into their exchanges' queues, not
                    // through the ready loop's event queue: that would add whatever round
                    // the loop is busy with to every commit. (The socket write itself is
                    // the driver thread's, on its runtime.)
                    let started = Instant::now();
                    let synced = sync(&engine, &mut round);
                    let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    let result = synced.map(|out| send(&*transport, out));
                    counters.rounds.fetch_add(1, Ordering::Relaxed);
                    if round.must_sync() {
                        counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                        counters.sync_micros.fetch_add(took, Ordering::Relaxed);
                    }
                    if events
                        .send(Event::Synced {
                            round: Box::new(round),
                            result,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            })
            .map_err(|e| JournalError::io("starting the raft sync thread", e))?;
        Ok(Self { rounds, thread })
    }

    /// Stops the thread and waits for it, so its handle on the engine is released.
    fn stop(self) {
        drop(self.rounds);
        let _ = self.thread.join();
    }
}

/// The thread that purges obsolete raft-engine files, so that a purge (a rewrite of what is
/// still live in old files, slow on a busy disk) never holds up the driver's streams.
struct PurgeThread {
    thread: JoinHandle<()>,
}

impl PurgeThread {
    /// Starts the thread and makes `server` send its due purges there.
    fn spawn(server: &mut Server, events: Events) -> Result<Self, JournalError> {
        let (requests, queue) = std::sync::mpsc::sync_channel::<()>(1);
        let engine = server.engine();
        let thread = std::thread::Builder::new()
            .name("luna-raft-purge".to_owned())
            .spawn(move || {
                while queue.recv().is_ok() {
                    if let Err(error) = purge_expired(&engine) {
                        let _ = events.send(Event::PurgeFailed(error));
                        return;
                    }
                }
            })
            .map_err(|e| JournalError::io("starting the raft purge thread", e))?;
        server.purge_in_background(Some(requests));
        Ok(Self { thread })
    }

    /// Takes the request queue back from `server`, which ends the thread, and waits for
    /// it, so its handle on the engine is released.
    fn stop(self, server: &mut Server) {
        server.purge_in_background(None);
        let _ = self.thread.join();
    }
}

struct Driver {
    server: Server,
    transport: Arc<dyn Transport>,
    /// For answering subscriptions' handles, which send their reads here.
    events: Events,
    /// Shared with the node and its inbox: the peer bytes queued here, and the failure.
    counters: Arc<Counters>,
    tick: Duration,
    /// Most ticks made up at once after the thread was late.
    max_catch_up: u64,
    /// Whether a round is at the sync thread (at most one, so rounds finish in order).
    syncing: bool,
    /// Set once the log could not be written; every later operation gets it.
    failed: Option<StreamError>,
}

impl Driver {
    async fn run(
        mut self,
        mut queue: mpsc::UnboundedReceiver<Event>,
        syncer: SyncThread,
        purger: PurgeThread,
    ) {
        let mut next_tick = Instant::now() + self.tick;
        // Turns in a row that found an event waiting, so never waited.
        let mut busy_turns = 0;
        'run: loop {
            let first = match queue.try_recv() {
                Ok(event) => {
                    busy_turns += 1;
                    Some(event)
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    busy_turns = 0;
                    // While this waits, the runtime runs the transport's tasks.
                    match tokio::time::timeout_at(next_tick.into(), queue.recv()).await {
                        Ok(Some(event)) => Some(event),
                        Err(_elapsed) => None,
                        Ok(None) => break 'run,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break 'run,
            };
            // Ticks come before any event is handled: a lease read queued while this
            // thread was stalled must see the lease as the wall clock has aged it.
            let now = Instant::now();
            if now >= next_tick {
                // Ticks missed while the thread was late are made up, so a leader's lease,
                // counted in ticks, never outlasts the wall time it stands for. Past an
                // election timeout's worth, more ticks change nothing.
                let late = now.duration_since(next_tick).as_nanos() / self.tick.as_nanos();
                let ticks = u64::try_from(late).unwrap_or(u64::MAX).saturating_add(1);
                for _ in 0..ticks.min(self.max_catch_up) {
                    self.server.tick();
                }
                next_tick = if ticks > self.max_catch_up {
                    now + self.tick
                } else {
                    next_tick + self.tick * ticks as u32
                };
            }
            if let Some(event) = first
                && !self.handle(event, &syncer)
            {
                break 'run;
            }
            // Everything that queued meanwhile joins this turn: one engine write, one sync.
            while let Ok(event) = queue.try_recv() {
                if !self.handle(event, &syncer) {
                    break 'run;
                }
            }
            if self.failed.is_none() {
                match self.server.ready() {
                    Ok(out) => send(&*self.transport, out),
                    Err(e) => self.failed_with(e),
                }
            }
            self.start_sync(&syncer);
            self.publish_overload();
            // While events keep coming the loop never waits, and the transport's tasks on
            // this runtime (writing the turns' batches, reading peers') would run only when
            // tokio's budget forces a wait, up to 128 turns later. A yield lets the runtime
            // poll its I/O and run them. Not after every turn: when the loop waits anyway,
            // a yield only adds a system call to each commit (15 us at one appender).
            if busy_turns >= BUSY_TURNS_BEFORE_YIELD {
                busy_turns = 0;
                tokio::task::yield_now().await;
            }
        }
        // Waiting appends and reads learn the outcome is unknown; then the engine closes.
        if self.failed.is_none() {
            self.server.fail(StreamError::Closed);
        }
        syncer.stop();
        purger.stop(&mut self.server);
    }

    /// Reacts to one event; `false` means stop.
    fn handle(&mut self, event: Event, syncer: &SyncThread) -> bool {
        match event {
            Event::Messages {
                from,
                messages,
                bytes,
            } => {
                self.counters
                    .peer_bytes_queued
                    .fetch_sub(bytes, Ordering::Relaxed);
                for message in &messages {
                    if let Err(error) = self.server.step(from, message) {
                        self.failed_with(error);
                    }
                }
            }
            Event::Propose {
                stream_id,
                data,
                reply,
            } => match &self.failed {
                Some(e) => {
                    let _ = reply.send(Err(e.clone()));
                }
                None => self.server.propose_to(stream_id, data, reply),
            },
            Event::ReadIndex { stream_id, reply } => match &self.failed {
                Some(e) => {
                    let _ = reply.send(Err(e.clone()));
                }
                None => self.server.read_index_to(stream_id, reply),
            },
            Event::LeaseRead { stream_id, reply } => match &self.failed {
                Some(e) => {
                    let _ = reply.send(Err(e.clone()));
                }
                None => self.server.lease_read_to(stream_id, reply),
            },
            Event::ChangeMembership {
                stream_id,
                voters,
                learners,
                reply,
            } => match &self.failed {
                Some(e) => {
                    let _ = reply.send(Err(failed(stream_id, e)));
                }
                None => self
                    .server
                    .change_membership_to(stream_id, &voters, &learners, reply),
            },
            Event::TransferLeader {
                stream_id,
                to,
                reply,
            } => match &self.failed {
                Some(e) => {
                    let _ = reply.send(Err(failed(stream_id, e)));
                }
                None => self.server.transfer_leader_to(stream_id, to, reply),
            },
            Event::Read {
                stream_id,
                from,
                to,
                reply,
            } => {
                let _ = reply.send(self.server.read(stream_id, from, to));
            }
            Event::Truncate {
                stream_id,
                up_to,
                data,
                reply,
            } => match &self.failed {
                Some(e) => {
                    let _ = reply.send(Err(e.clone()));
                }
                None => self.server.truncate_to(stream_id, up_to, data, reply),
            },
            Event::AddStream {
                stream_id,
                voters,
                reply,
            } => {
                let _ = reply.send(self.add_stream(stream_id, &voters));
            }
            Event::Synced { mut round, result } => {
                self.syncing = false;
                match (result, &self.failed) {
                    (Ok(()), None) => self.server.finish_sync(*round),
                    (Ok(()), Some(e)) => round.fail_truncations(e),
                    (Err(e), _) => {
                        round.fail_truncations(&e);
                        self.fail(e);
                    }
                }
                self.start_sync(syncer);
            }
            Event::PurgeFailed(e) => self.fail(e),
            Event::RemoveStream { stream_id, reply } => {
                let _ = reply.send(self.server.remove_stream(stream_id));
                self.start_sync(syncer);
            }
            Event::Stop => return false,
            #[cfg(test)]
            Event::Panic => panic!("a panic the test asked for"),
        }
        true
    }

    fn add_stream(&mut self, stream_id: u64, voters: &[u64]) -> Result<RaftStream, JournalError> {
        if let Some(e) = &self.failed {
            return Err(JournalError::Raft {
                stream_id,
                reason: format!("the journal server failed: {e}"),
            });
        }
        self.server.add_stream(stream_id, voters)?;
        let missing = || JournalError::Raft {
            stream_id,
            reason: "stream vanished after it was added".to_owned(),
        };
        let committed = self.server.watch_committed(stream_id).ok_or_else(missing)?;
        let leadership = self
            .server
            .watch_leadership(stream_id)
            .ok_or_else(missing)?;
        let membership = self
            .server
            .watch_membership(stream_id)
            .ok_or_else(missing)?;
        let published = self.server.published(stream_id).ok_or_else(missing)?;
        Ok(RaftStream::new(
            stream_id,
            self.events.clone(),
            committed,
            leadership,
            membership,
            published,
            self.server.max_entry_size(),
        ))
    }

    /// Fails every stream and every later operation with `error`.
    fn fail(&mut self, error: StreamError) {
        self.server.fail(error.clone());
        self.failed_with(error);
    }

    /// Keeps `error` for every later operation, and for [`Node::failure`].
    fn failed_with(&mut self, error: StreamError) {
        self.counters.record_failure(error.to_string());
        self.failed = Some(error);
    }

    /// Copies the server's overload figures where [`Node::stats`] reads them.
    fn publish_overload(&self) {
        *self
            .counters
            .overload
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.server.overload_stats();
    }

    /// Hands the rounds written since the last sync to the sync thread, unless one is there.
    fn start_sync(&mut self, syncer: &SyncThread) {
        if self.syncing || self.failed.is_some() {
            return;
        }
        if let Some(round) = self.server.take_sync() {
            if syncer.rounds.send(round).is_err() {
                self.fail(StreamError::Closed);
                return;
            }
            self.syncing = true;
        }
    }
}

/// Sends `out`, one batch per destination server.
fn send(transport: &dyn Transport, out: Vec<(u64, Bytes)>) {
    let mut batches: BTreeMap<u64, Vec<Bytes>> = BTreeMap::new();
    for (to, message) in out {
        batches.entry(to).or_default().push(message);
    }
    for (to, messages) in batches {
        transport.send(to, messages);
    }
}
