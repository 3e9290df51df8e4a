//! A server's rounds: handling every stream's ready (step 2), and the write and fsync of the
//! rounds since the last sync, off the ready loop (step 3), after which raft learns they
//! are durable. See docs/journal.md, "The ready loop".

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use bytes::Bytes;
use luna_kernel::stream::StreamError;
use raft::eraftpb::{Message, MessageType};
use raft_engine::{Engine, LogBatch};

use super::server::{SYNC_REGION, Server, encode_envelope, kernel_entry};
use super::snapshot::{TruncateReply, snapshot_recipients};

/// Bytes of written entries a stream keeps in memory for followers that lag.
const MAX_CACHED_BYTES: usize = 4 * 1024 * 1024;

/// Ready rounds not yet durable: what they write, and what waits for it.
#[derive(Debug, Default)]
pub struct SyncRound {
    /// Every round's writes, for every stream, in order.
    pub(super) batch: LogBatch,
    /// `(stream, ready number)` in order, for `on_persist_ready`.
    readies: Vec<(u64, u64)>,
    /// The last entry (index, term) each stream appended.
    last_entries: HashMap<u64, (u64, u64)>,
    /// Messages that may leave once the round is durable, as `(to, envelope)`.
    messages: Vec<(u64, Bytes)>,
    /// Streams whose deletion `batch` carries (see [`Server::remove_stream`]).
    pub(super) removed: Vec<u64>,
    /// Truncations whose compaction `batch` carries, answered once it is durable.
    pub(super) truncations: Vec<TruncateReply>,
    pub(super) must_sync: bool,
}

impl SyncRound {
    /// Whether [`sync`] must fsync for this round (it wrote entries or a hard state).
    pub fn must_sync(&self) -> bool {
        self.must_sync
    }

    /// Tells the truncations this round carried that it was not written.
    pub(super) fn fail_truncations(&mut self, error: &StreamError) {
        for reply in self.truncations.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
    }
}

impl Server {
    /// Handles every stream's ready (step 2 of a round) and returns the messages to send
    /// now as `(to, envelope)`. An engine write error fails the server: the caller stops
    /// it, and every waiting append learns [`StreamError::Io`] (never an acknowledgement).
    pub fn ready(&mut self) -> Result<Vec<(u64, Bytes)>, StreamError> {
        // Added to the batch of every round since the last sync; put back below.
        let mut batch = std::mem::take(&mut self.unsynced.batch);
        let mut out = Vec::new();
        let lease_ticks = self.lease_ticks();
        let lease_duration = self.config.tick_interval * lease_ticks as u32;
        let mut applied = Vec::new();
        // Every stream proposed to is touched, so this round moves what they took into the
        // batch.
        self.taken_unready = 0;
        for stream_id in std::mem::take(&mut self.touched) {
            let Some(replica) = self.streams.get_mut(&stream_id) else {
                continue;
            };
            if !replica.node.has_ready() {
                continue;
            }
            // Handling a ready can leave another (raft hands out entries in slices):
            // visit again next round.
            self.touched.insert(stream_id);
            let mut ready = replica.node.ready();
            // Before this ready acknowledges appends (see `lease.rs`).
            let published = Arc::clone(&replica.published);
            published
                .lease
                .set_committed(replica.node.raft.raft_log.committed);
            // A leader sends before persisting: replication overlaps its own fsync.
            let messages = ready.take_messages();
            let snapshots_sent = snapshot_recipients(&messages);
            push_messages(&mut out, stream_id, messages);
            // A snapshot from the leader goes first: it replaces the log that the entries
            // and hard state of this ready continue.
            if !ready.snapshot().is_empty()
                && let Err(e) = replica.install_snapshot(ready.snapshot(), &mut batch)
            {
                return Err(self.fail(e));
            }
            let committed = ready.take_committed_entries();
            published.recent.push(committed.iter().map(kernel_entry));
            if let Err(e) = replica.apply_committed(&committed, &mut batch) {
                return Err(self.fail(e));
            }
            let storage = replica.node.mut_store();
            let persisted = storage.append(ready.entries(), &mut batch).and_then(|()| {
                ready
                    .hs()
                    .map_or(Ok(()), |hs| storage.set_hard_state(hs, &mut batch))
            });
            if let Err(e) = persisted {
                return Err(self.fail(StreamError::Io {
                    context: format!("staging raft state of stream {stream_id}"),
                    source: Arc::new(std::io::Error::other(e.to_string())),
                }));
            }
            if !ready.entries().is_empty() {
                replica.entries_received(self.ticks, self.config.election_tick as u64);
            }
            replica.answer_reads(ready.take_read_states(), lease_ticks, lease_duration);
            self.unsynced.must_sync |= ready.must_sync();
            if let Some(last) = ready.entries().last() {
                self.unsynced
                    .last_entries
                    .insert(stream_id, (last.index, last.term));
            }
            // A heartbeat response vouches for nothing on disk (etcd's raft sends it ahead
            // of the fsync too). Held behind a stalled fsync on the followers, it would
            // starve the leader's quorum check and depose a leader whose replicas are up.
            let (now, after_sync): (Vec<_>, Vec<_>) = ready
                .take_persisted_messages()
                .into_iter()
                .partition(|m| m.get_msg_type() == MessageType::MsgHeartbeatResponse);
            push_messages(&mut out, stream_id, now);
            push_messages(&mut self.unsynced.messages, stream_id, after_sync);
            self.unsynced.readies.push((stream_id, ready.number()));
            replica.node.advance_append_async(ready);
            replica.report_snapshots(snapshots_sent);
            if let Some(last) = committed.last() {
                applied.push((stream_id, last.index));
            }
            replica.update_leadership(self.ticks);
            replica.send_deferred_reads();
            replica.publish_lease();
        }
        self.unsynced.batch = batch;
        // Only now: applying may append an entry (raft leaves a joint configuration by
        // itself), at the last index in storage, so this round's entries must be there
        // (in the entry cache) first.
        for (stream_id, index) in applied {
            if let Some(replica) = self.streams.get_mut(&stream_id) {
                replica.node.advance_apply_to(index);
                replica.committed.send_replace(index);
            }
        }
        Ok(out)
    }

    /// Takes every ready round since the last call, for one engine write and fsync (step 3
    /// of a round). Rounds must be synced and finished in the order they are taken.
    pub fn take_sync(&mut self) -> Option<SyncRound> {
        if self.unsynced.readies.is_empty()
            && self.unsynced.removed.is_empty()
            && self.unsynced.truncations.is_empty()
        {
            return None;
        }
        Some(std::mem::take(&mut self.unsynced))
    }

    /// Tells raft that `round`, which [`sync`] wrote, is durable, and lets the entry caches
    /// drop what the engine now serves.
    pub fn finish_sync(&mut self, round: SyncRound) {
        for stream_id in round.removed {
            self.removing.remove(&stream_id);
        }
        for (stream_id, number) in round.readies {
            if let Some(replica) = self.streams.get_mut(&stream_id) {
                replica.node.on_persist_ready(number);
                self.touched.insert(stream_id);
                replica.finish_snapshot();
            }
        }
        for (stream_id, (index, term)) in round.last_entries {
            if let Some(replica) = self.streams.get_mut(&stream_id) {
                let keep_from = replica.lagging_from();
                replica
                    .node
                    .mut_store()
                    .on_written(index, term, keep_from, MAX_CACHED_BYTES);
            }
        }
        self.finish_truncations(round.truncations);
    }
}

fn push_messages(out: &mut Vec<(u64, Bytes)>, stream_id: u64, messages: Vec<Message>) {
    for message in messages {
        match encode_envelope(stream_id, &message) {
            Some(bytes) => out.push((message.to, bytes)),
            None => tracing::error!(stream_id, "cannot encode a raft message; raft will resend"),
        }
    }
}

/// The write and fsync step of a round, run off the ready loop (it blocks). Returns the
/// messages that waited for the round to be durable, as `(to, envelope)`: they may leave
/// at once, before [`Server::finish_sync`]. raft-engine panics when fsync fails, so the
/// panic is caught and reported as an error: the server must stop.
pub fn sync(engine: &Engine, round: &mut SyncRound) -> Result<Vec<(u64, Bytes)>, StreamError> {
    if round.must_sync && round.batch.is_empty() {
        // raft-engine skips the fsync of an empty batch, so a tiny marker carries it.
        round
            .batch
            .put(SYNC_REGION, b"sync".to_vec(), Vec::new())
            .map_err(engine_error)?;
    }
    match write_synced(engine, &mut round.batch, round.must_sync) {
        Ok(()) => Ok(std::mem::take(&mut round.messages)),
        Err(WriteFailure::Engine(e)) => Err(engine_error(e)),
        Err(WriteFailure::FsyncPanicked) => Err(fsync_failed()),
    }
}

/// Why an engine write failed.
pub(crate) enum WriteFailure {
    /// The engine refused the write; its state is intact.
    Engine(raft_engine::Error),
    /// raft-engine 0.4.2 panics when an fsync fails; its state is unknown after that.
    FsyncPanicked,
}

/// Writes `batch` (with an fsync if `sync`), turning raft-engine's panic on a failed fsync
/// into an error, so no thread that writes dies of it.
pub(crate) fn write_synced(
    engine: &Engine,
    batch: &mut LogBatch,
    sync: bool,
) -> Result<(), WriteFailure> {
    match catch_unwind(AssertUnwindSafe(|| engine.write(batch, sync))) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(WriteFailure::Engine(e)),
        Err(_) => Err(WriteFailure::FsyncPanicked),
    }
}

/// The error that stops a server whose fsync failed.
pub(crate) fn fsync_failed() -> StreamError {
    StreamError::Io {
        context: "fsync of the raft log".to_owned(),
        source: Arc::new(std::io::Error::other("raft-engine fsync failed")),
    }
}

fn engine_error(e: raft_engine::Error) -> StreamError {
    StreamError::Io {
        context: "writing the raft log".to_owned(),
        source: Arc::new(std::io::Error::other(e.to_string())),
    }
}
