//! The synchronous core of a raft journal server: every stream replica a server hosts, one
//! raft-engine, and the ready loop.
//!
//! The core does no I/O scheduling and owns no clock, so the deterministic harness drives it
//! step by step and the production driver (`driver.rs`) from one thread. A round is:
//!
//! 1. [`Server::tick`] (coalesced: one call ticks every stream), [`Server::step`] incoming
//!    messages, [`Server::propose`] / [`Server::read_index`];
//! 2. [`Server::ready`]: for every stream with a ready, in raft-rs's documented order, send
//!    the leader's messages and every replica's heartbeat responses at once, deliver
//!    committed entries, add new entries and the hard state to one `LogBatch` shared by all
//!    streams and rounds, answer read states, and `advance_append_async`. raft-rs 0.7
//!    reads entries back from storage once `advance_append_async` returns: each stream's
//!    entry cache serves them until the batch is written;
//! 3. [`Server::take_sync`] / [`sync`] / [`Server::finish_sync`]: one engine write with
//!    fsync covers every round since the last one (group commit across proposals and
//!    streams). Only after it do the messages that waited for it (votes, append acks)
//!    leave, and does raft hear `on_persist_ready`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use luna_kernel::stream::{Committed, Leadership, StreamError};
use protobuf::Message as _;
use raft::eraftpb::{EntryType, Message, MessageType};
use raft::{RawNode, StateRole};

use raft_engine::{Engine, LogBatch};
use tokio::sync::{oneshot, watch};

use super::inbound::{self, Inbound};
use super::logger;
use super::overload::OverloadStats;
use super::replica::{Published, Replica, Reply};
use super::round::{SyncRound, WriteFailure, fsync_failed, write_synced};
use super::snapshot::{Purge, to_kernel};
use super::storage::EngineStorage;
use crate::error::JournalError;

/// Most bytes one subscription read takes (on the driver thread).
const READ_BYTES: u64 = 4 * 1024 * 1024;
/// Engine region reserved for the sync marker (stream ids start at 1).
pub(super) const SYNC_REGION: u64 = 0;
/// Read barriers, membership changes and leader transfers still unanswered after this many
/// election timeouts fail.
const READ_TIMEOUT_ELECTIONS: u64 = 2;
/// A leader lease is this many ticks shorter than the election timeout during which the
/// followers that renewed it refuse to vote: slack for ticks that fire late.
pub(super) const LEASE_MARGIN_TICKS: u64 = 2;

/// How many ticks of random spread follower election timeouts get above `election_tick`:
/// half a timeout, not raft's default of a whole one. Randomness is there so that two
/// followers rarely campaign at once and split the vote; a vote takes about a millisecond
/// on a LAN, so half a timeout separates them as well, and the replacement of a dead
/// leader is not drawn from up to twice the timeout (failover time is the sum of the
/// time since its last heartbeat and the follower's timeout).
pub(crate) fn election_jitter(election_tick: usize) -> usize {
    election_tick.div_ceil(2).max(1)
}

/// Settings of one journal server (one process's share of every stream it hosts).
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This server's replica id in every stream it hosts; never 0.
    pub node_id: u64,
    /// Directory of the server's raft-engine log.
    pub dir: PathBuf,
    /// Ticks without a leader before a follower campaigns, at least: each follower draws
    /// its timeout from `[election_tick, 1.5 × election_tick)`.
    pub election_tick: usize,
    /// Ticks between a leader's heartbeats; less than `election_tick`.
    pub heartbeat_tick: usize,
    /// Largest entry accepted, in bytes.
    pub max_entry_size: usize,
    /// Bytes of log writes the server holds while its disk syncs what came before (a slow
    /// or hung fsync); past them, proposals fail with [`StreamError::Overloaded`] and
    /// peers' appends are dropped, for their leaders to resend. At least `max_entry_size`.
    pub max_unsynced_bytes: usize,
    /// Wall time of one tick of the driver's clock (the [`Node`](super::Node) ticks every
    /// stream at once, at this interval).
    pub tick_interval: Duration,
    /// Size at which the raft-engine log moves on to a new file, in bytes. Space is
    /// reclaimed in whole files, once every entry in a file is compacted.
    pub engine_file_size: u64,
    /// Log size above which raft-engine purges files of compacted entries, in bytes; at
    /// least `engine_file_size`.
    pub engine_purge_threshold: u64,
    /// An idle stream ticks once per this many server ticks (see [`Server::tick`]): fewer
    /// heartbeats for many idle streams, but an idle stream's leader is replaced that many
    /// times later. 1 ticks every stream every time, for a server of few streams whose
    /// failover must be quick (the master's).
    pub idle_tick_every: u64,
    /// Ticks a follower waits before it campaigns, the same every time instead of drawn at
    /// random (raft-rs draws from the thread's generator): a simulation that must replay
    /// from its seed sets it, at least `election_tick`. `None` everywhere else.
    pub fixed_election_timeout: Option<usize>,
}

impl RaftConfig {
    /// Defaults: 100 ms ticks, election after 10 ticks (1 s), heartbeats every 2, 8 MiB
    /// entries, 128 MiB of unsynced writes at most, 128 MiB log files purged above 1 GiB.
    pub fn new(node_id: u64, dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id,
            dir: dir.into(),
            election_tick: 10,
            heartbeat_tick: 2,
            max_entry_size: 8 << 20,
            max_unsynced_bytes: 128 << 20,
            tick_interval: Duration::from_millis(100),
            engine_file_size: 128 << 20,
            engine_purge_threshold: 1 << 30,
            idle_tick_every: 5,
            fixed_election_timeout: None,
        }
    }
}

/// Every stream replica of one server, and the engine they share.
pub struct Server {
    pub(super) config: RaftConfig,
    engine: Arc<Engine>,
    pub(super) streams: BTreeMap<u64, Replica>,
    /// Streams that may have a ready: touched (ticked, stepped, proposed to...) since the
    /// last [`ready`](Self::ready), or with a ready in it. `ready` visits only these, so a
    /// thousand idle streams cost nothing per round.
    pub(super) touched: BTreeSet<u64>,
    /// Removed streams whose deletion is not durable yet: they cannot be added again until
    /// it is, or the deletion could land after the new replica's first writes.
    pub(super) removing: BTreeSet<u64>,
    logger: slog::Logger,
    pub(super) unsynced: SyncRound,
    /// Entry bytes taken since the last [`ready`](Self::ready), proposed here or appended
    /// by peers, which will join `unsynced`.
    pub(super) taken_unready: usize,
    /// Whether the last check found `unsynced` over its bound (to log the transitions).
    pub(super) overloaded: bool,
    /// What the bound refused and dropped so far (`unsynced_bytes` unset).
    pub(super) overload_counts: OverloadStats,
    pub(super) next_read_id: u64,
    pub(super) ticks: u64,
    pub(super) purge: Purge,
}

impl Server {
    /// Opens (or creates) the server's raft-engine log. Streams are added with
    /// [`add_stream`](Self::add_stream).
    pub fn open(config: RaftConfig) -> Result<Self, JournalError> {
        if config.node_id == 0
            || config.heartbeat_tick == 0
            || config.tick_interval.is_zero()
            || config.idle_tick_every == 0
        {
            return Err(JournalError::InvalidConfig {
                name: "node_id/heartbeat_tick/tick_interval/idle_tick_every",
                reason: "must be positive".to_owned(),
            });
        }
        if config.max_unsynced_bytes < config.max_entry_size {
            return Err(JournalError::InvalidConfig {
                name: "max_unsynced_bytes",
                reason: format!(
                    "{} is below max_entry_size ({})",
                    config.max_unsynced_bytes, config.max_entry_size
                ),
            });
        }
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| JournalError::io(format!("creating {}", config.dir.display()), e))?;
        let engine_config = raft_engine::Config {
            dir: config.dir.display().to_string(),
            // Tolerating a torn tail is safe: it was never fsynced, so never acknowledged.
            recovery_mode: raft_engine::RecoveryMode::TolerateTailCorruption,
            target_file_size: raft_engine::ReadableSize(config.engine_file_size),
            purge_threshold: raft_engine::ReadableSize(config.engine_purge_threshold),
            // Small raft batches hardly compress, and LZ4 would run on every sync.
            batch_compression_threshold: raft_engine::ReadableSize(0),
            ..raft_engine::Config::default()
        };
        let engine = Engine::open(engine_config).map_err(|e| JournalError::Engine {
            path: config.dir.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            logger: logger::raft_logger(config.node_id),
            config,
            engine: Arc::new(engine),
            streams: BTreeMap::new(),
            touched: BTreeSet::new(),
            removing: BTreeSet::new(),
            unsynced: SyncRound::default(),
            taken_unready: 0,
            overloaded: false,
            overload_counts: OverloadStats::default(),
            next_read_id: first_read_id(),
            ticks: 0,
            purge: Purge::default(),
        })
    }

    /// Largest entry a proposal may carry, in bytes.
    pub fn max_entry_size(&self) -> usize {
        self.config.max_entry_size
    }

    /// The engine, which the sync step (off the ready loop) writes its marker to.
    pub fn engine(&self) -> Arc<Engine> {
        Arc::clone(&self.engine)
    }

    /// Entries from `from` up to `to` of `stream_id` as stored here (committed ones up to
    /// [`watch_committed`](Self::watch_committed)); fewer when they pass `READ_BYTES`. If
    /// `from` is at or below the snapshot, the snapshot alone.
    pub fn read(&self, stream_id: u64, from: u64, to: u64) -> Result<Vec<Committed>, StreamError> {
        let replica = self.streams.get(&stream_id).ok_or(StreamError::Closed)?;
        if let Some(snapshot) =
            to_kernel(replica.node.store().snapshot_ref()).filter(|s| from <= s.index)
        {
            return Ok(vec![Committed::Snapshot(snapshot)]);
        }
        // Bounded in bytes, not only in count: this runs on the driver thread, and a
        // huge read would delay every stream's heartbeats. At least one entry comes back.
        let entries = replica
            .node
            .store()
            .read(from, to + 1, Some(READ_BYTES))
            .map_err(|e| StreamError::Io {
                context: format!("reading entries of stream {stream_id}"),
                source: Arc::new(std::io::Error::other(e.to_string())),
            })?;
        Ok(entries
            .iter()
            .map(kernel_entry)
            .map(Committed::Entry)
            .collect())
    }

    /// Hosts a replica of `stream_id` whose initial voters (at index 0) are `voters`, the
    /// same list on every replica, including one that joins later and replays the
    /// membership changes from the log. A stream already on disk recovers its hard state,
    /// conf state, applied index and log.
    pub fn add_stream(&mut self, stream_id: u64, voters: &[u64]) -> Result<(), JournalError> {
        if stream_id == SYNC_REGION {
            return Err(JournalError::InvalidConfig {
                name: "stream_id",
                reason: "0 is reserved".to_owned(),
            });
        }
        if self.streams.contains_key(&stream_id) {
            return Err(JournalError::InvalidConfig {
                name: "stream_id",
                reason: format!("stream {stream_id} is already hosted"),
            });
        }
        if self.removing.contains(&stream_id) {
            return Err(JournalError::InvalidConfig {
                name: "stream_id",
                reason: format!("stream {stream_id} is still being deleted here; try again"),
            });
        }
        let mut batch = LogBatch::default();
        let storage = EngineStorage::open(Arc::clone(&self.engine), stream_id, voters, &mut batch)?;
        match write_synced(&self.engine, &mut batch, true) {
            Ok(()) => {}
            Err(WriteFailure::Engine(e)) => {
                return Err(JournalError::Engine {
                    path: self.config.dir.clone(),
                    reason: format!("bootstrapping stream {stream_id}: {e}"),
                });
            }
            Err(WriteFailure::FsyncPanicked) => {
                // The engine's state is unknown after a failed fsync: the server stops.
                let error = self.fail(fsync_failed());
                return Err(JournalError::Engine {
                    path: self.config.dir.clone(),
                    reason: format!("bootstrapping stream {stream_id}: {error}"),
                });
            }
        }
        let election_tick = self.config.election_tick;
        let (min_election_tick, max_election_tick) = match self.config.fixed_election_timeout {
            // raft-rs draws from [min, max).
            Some(ticks) => (ticks, ticks + 1),
            None => (
                election_tick,
                election_tick + election_jitter(election_tick),
            ),
        };
        let raft_config = raft::Config {
            id: self.config.node_id,
            applied: storage.applied(),
            election_tick: self.config.election_tick,
            min_election_tick,
            max_election_tick,
            heartbeat_tick: self.config.heartbeat_tick,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            // Followers learn the commit index from the next append or heartbeat; an empty
            // append (and its answer) for every commit was a third of the messages with one
            // writer (docs/journal.md).
            skip_bcast_commit: true,
            ..raft::Config::default()
        };
        let logger = self.logger.new(slog::o!("stream" => stream_id));
        let node =
            RawNode::new(&raft_config, storage, &logger).map_err(|e| JournalError::Raft {
                stream_id,
                reason: e.to_string(),
            })?;
        let quiet = self.config.election_tick as u64;
        let lease = self.config.tick_interval * self.lease_ticks() as u32;
        let replica = Replica::new(stream_id, node, self.ticks, quiet, lease);
        self.streams.insert(stream_id, replica);
        self.touched.insert(stream_id);
        Ok(())
    }

    /// What the ready loop publishes for `stream_id`'s handles.
    pub(crate) fn published(&self, stream_id: u64) -> Option<Arc<Published>> {
        self.streams
            .get(&stream_id)
            .map(|r| Arc::clone(&r.published))
    }

    /// The committed index of `stream_id` as it advances (entries up to it are readable).
    pub fn watch_committed(&self, stream_id: u64) -> Option<watch::Receiver<u64>> {
        self.streams
            .get(&stream_id)
            .map(|r| r.committed.subscribe())
    }

    /// The leadership of `stream_id` as it changes.
    pub fn watch_leadership(&self, stream_id: u64) -> Option<watch::Receiver<Leadership>> {
        self.streams
            .get(&stream_id)
            .map(|r| r.leadership.subscribe())
    }

    /// Proposes `data` on `stream_id`; the receiver answers once it commits (or cannot).
    pub fn propose(
        &mut self,
        stream_id: u64,
        data: Bytes,
    ) -> oneshot::Receiver<Result<u64, StreamError>> {
        let (reply, answer) = oneshot::channel();
        self.propose_to(stream_id, data, reply);
        answer
    }

    /// [`propose`](Self::propose), answering on `reply`.
    pub(crate) fn propose_to(&mut self, stream_id: u64, data: Bytes, reply: Reply) {
        self.touched.insert(stream_id);
        let limit = self.config.max_entry_size;
        let overloaded = self.overload();
        let Some(replica) = self.streams.get_mut(&stream_id) else {
            let _ = reply.send(Err(StreamError::Closed));
            return;
        };
        let error = if let Err(invalid) = StreamError::check_entry(&data, limit) {
            Some(invalid)
        } else if replica.node.raft.state != StateRole::Leader {
            // Not forwarded to the leader: the caller retries there, with the hint.
            Some(replica.not_leader())
        } else if let Some(overloaded) = overloaded {
            self.overload_counts.proposals_refused += 1;
            Some(overloaded)
        } else {
            match replica.node.propose(Vec::new(), data.to_vec()) {
                Ok(()) => {
                    self.taken_unready += data.len();
                    let index = replica.node.raft.raft_log.last_index();
                    replica
                        .appends
                        .insert(index, (replica.node.raft.term, reply));
                    return;
                }
                Err(e) => {
                    tracing::debug!(stream_id, error = %e, "proposal dropped");
                    Some(replica.not_leader())
                }
            }
        };
        if let Some(error) = error {
            let _ = reply.send(Err(error));
        }
    }

    /// Starts a read barrier on `stream_id` (followers ask their leader).
    pub fn read_index(&mut self, stream_id: u64) -> oneshot::Receiver<Result<u64, StreamError>> {
        let (reply, answer) = oneshot::channel();
        self.read_index_to(stream_id, reply);
        answer
    }

    /// [`read_index`](Self::read_index), answering on `reply`.
    pub(crate) fn read_index_to(&mut self, stream_id: u64, reply: Reply) {
        self.touched.insert(stream_id);
        let Some(replica) = self.streams.get_mut(&stream_id) else {
            let _ = reply.send(Err(StreamError::Closed));
            return;
        };
        if replica.node.raft.leader_id == 0 {
            let _ = reply.send(Err(replica.not_leader()));
            return;
        }
        replica.start_read(next_id(&mut self.next_read_id), self.ticks, Some(reply));
    }

    /// Advances every stream's logical clock by one tick, and expires stale read barriers,
    /// membership changes and leader transfers. Idle streams (see `Replica::is_idle`) tick
    /// only every `idle_tick_every` calls: their heartbeats, the main cost of a stream
    /// nobody writes to, become that much rarer. docs/journal.md explains why that is safe.
    pub fn tick(&mut self) {
        self.ticks += 1;
        let timeout = self.config.election_tick as u64 * READ_TIMEOUT_ELECTIONS;
        let slow_tick = self.ticks.is_multiple_of(self.config.idle_tick_every);
        let election_tick = self.config.election_tick as u64;
        for (&stream_id, replica) in &mut self.streams {
            if !slow_tick && !replica.ticks_fast(self.ticks, election_tick) {
                continue;
            }
            replica.node.tick();
            replica.expire(self.ticks, timeout);
            replica.leave_stuck_joint();
            self.touched.insert(stream_id);
        }
        self.purge_if_due();
    }

    /// Steps one message from peer server `from`. Garbage is logged and ignored (see
    /// `inbound.rs`). A heartbeat that shows this replica's log lost acknowledged entries
    /// fails the server with [`StreamError::Corruption`], as a failed write does.
    pub fn step(&mut self, from: u64, envelope: &Bytes) -> Result<(), StreamError> {
        let Some((stream_id, message)) = decode_envelope(envelope) else {
            tracing::warn!(
                from,
                len = envelope.len(),
                "ignoring undecodable raft message"
            );
            return Ok(());
        };
        if message.from != from || message.to != self.config.node_id {
            tracing::warn!(from, stream_id, "ignoring misaddressed raft message");
            return Ok(());
        }
        if self.drops_peer_append(stream_id, &message) {
            return Ok(());
        }
        let Some(replica) = self.streams.get_mut(&stream_id) else {
            tracing::debug!(
                from,
                stream_id,
                "ignoring message for a stream not hosted here"
            );
            return Ok(());
        };
        let vote = matches!(
            message.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        );
        self.touched.insert(stream_id);
        if vote && replica.refuses_votes(self.ticks) {
            tracing::debug!(from, stream_id, "refusing a vote right after a restart");
            return Ok(());
        }
        match inbound::check(&replica.node.raft, &message) {
            Inbound::Step => {}
            Inbound::Garbage(why) => {
                let kind = message.get_msg_type();
                tracing::warn!(from, stream_id, ?kind, why, "ignoring a peer's garbage");
                return Ok(());
            }
            Inbound::LostLog { commit, last_index } => {
                return Err(self.fail(Inbound::lost_log(stream_id, from, commit, last_index)));
            }
        }
        let Some(message) = replica.defer_forwarded_read(message) else {
            return Ok(());
        };
        if let Err(e) = replica.node.step(message) {
            tracing::debug!(from, stream_id, error = %e, "raft rejected a message");
        }
        Ok(())
    }
}

impl Server {
    /// Fails every waiting append and read with `error`, and drops all streams: after a
    /// lost write the in-memory raft state is ahead of the disk, so nothing may continue.
    pub fn fail(&mut self, error: StreamError) -> StreamError {
        if matches!(error, StreamError::Closed) {
            tracing::debug!(node = self.config.node_id, "journal server stopped");
        } else {
            tracing::error!(error = %error, node = self.config.node_id, "journal server failed");
        }
        for (_, replica) in std::mem::take(&mut self.streams) {
            replica.fail(&error);
        }
        self.unsynced.fail_truncations(&error);
        error
    }
}

/// Where this run of a server starts counting read barrier ids: at random, so that no
/// earlier run used the same ids. A leader matches barriers by id (with the node id), and
/// drops a barrier whose id it already has pending; a follower that restarted from 1 could
/// then have its new barrier answered with the index of one it forwarded before the
/// restart, from before writes that were acknowledged since: a stale read. The journal
/// harness hit that once in 150 seeds ("read_index 24 < acked 29").
fn first_read_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Counts `counter` up by one and answers it.
pub(super) fn next_id(counter: &mut u64) -> u64 {
    *counter = counter.wrapping_add(1);
    *counter
}

/// A raft message for `stream_id` on the wire: the stream id, then the protobuf bytes.
pub(crate) fn encode_envelope(stream_id: u64, message: &Message) -> Option<Bytes> {
    // Encoded straight behind the id: one copy of the entries, not two.
    let size = message.compute_size() as usize;
    let mut buf = Vec::with_capacity(8 + size);
    buf.extend_from_slice(&stream_id.to_le_bytes());
    let mut out = protobuf::CodedOutputStream::vec(&mut buf);
    message.write_to_with_cached_sizes(&mut out).ok()?;
    out.flush().ok()?;
    drop(out);
    Some(Bytes::from(buf))
}

fn decode_envelope(bytes: &Bytes) -> Option<(u64, Message)> {
    let id = bytes.first_chunk::<8>()?;
    // Entry data become slices of the received buffer, not copies of it.
    let message = Message::parse_from_carllerche_bytes(&bytes.slice(8..)).ok()?;
    Some((u64::from_le_bytes(*id), message))
}

/// A raft entry as subscribers see it. Membership changes are the stream's own entries:
/// subscribers see them empty, as the kernel contract says.
pub(super) fn kernel_entry(entry: &raft::eraftpb::Entry) -> luna_kernel::stream::Entry {
    luna_kernel::stream::Entry {
        index: entry.index,
        term: entry.term,
        data: match entry.get_entry_type() {
            EntryType::EntryNormal => entry.data.clone(),
            EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => Bytes::new(),
        },
    }
}
