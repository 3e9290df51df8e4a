//! Log compaction with metadata-only snapshots, on the leader and on followers.
//!
//! - [`Server::truncate`]: the application hands over its snapshot of index `up_to` (opaque
//!   bytes, see `kernel::stream`). It is stored with raft's metadata for that index (term,
//!   conf state) in the engine, and the log is compacted up to it, in the next round's
//!   write; the answer comes after that round's fsync. Each replica truncates its own log.
//! - A follower that needs entries the leader no longer holds gets the leader's snapshot
//!   (raft's `MsgSnapshot`). The ready loop installs it in raft-rs's documented order
//!   (before entries and the hard state of the same ready), and once the round is durable
//!   ([`Replica::finish_snapshot`]) raft applies past it and subscribers receive it.
//! - Space comes back when raft-engine purges files that hold only compacted entries
//!   ([`Server::purge_if_due`], at most once per election timeout). A purge rewrites what
//!   is still live in old files and can take hundreds of milliseconds on a busy disk, so
//!   the driver runs it on a thread of its own ([`Server::purge_in_background`]): on the
//!   driver thread it would hold up every stream's ticks and messages meanwhile.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use bytes::Bytes;
use luna_kernel::stream::{self, StreamError};
use raft::SnapshotStatus;
use raft::eraftpb::{Message, MessageType, Snapshot};
use raft_engine::{Engine, LogBatch};
use tokio::sync::oneshot;

use super::membership::Membership;
use super::replica::Replica;
use super::server::Server;

/// When raft-engine may next purge, whether a compaction asked it to, and where purges
/// run.
#[derive(Debug, Default)]
pub(super) struct Purge {
    due: bool,
    not_before: u64,
    /// Requests to the purging thread; without one, purges run in the caller.
    background: Option<SyncSender<()>>,
}

/// A truncation's answer: sent once the snapshot it stored is durable.
pub(crate) type TruncateReply = oneshot::Sender<Result<(), StreamError>>;

impl Server {
    /// Stores `data`, the application's snapshot of its state as of `up_to`, for
    /// `stream_id`, and compacts the stream's log up to it. The answer comes once that is
    /// durable: the application may then drop what the snapshot replaces.
    ///
    /// `up_to` past this replica's applied index (what its subscribers have been given) is
    /// [`StreamError::BeyondCommitted`]; at or below the current snapshot nothing is
    /// written, but the answer still waits for the next sync, which covers a compaction to
    /// it that an earlier call staged.
    pub fn truncate(
        &mut self,
        stream_id: u64,
        up_to: u64,
        data: Bytes,
    ) -> oneshot::Receiver<Result<(), StreamError>> {
        let (reply, answer) = oneshot::channel();
        self.truncate_to(stream_id, up_to, data, reply);
        answer
    }

    /// [`truncate`](Self::truncate), answering on `reply`.
    ///
    /// The compaction joins the round being built, not a write of its own: a synced write
    /// here would hold up every stream of the server for an fsync (hundreds of
    /// milliseconds while the disk writes back a burst of table data). The snapshot is
    /// this replica's at once, so raft may send it to a follower before it is durable
    /// here: that is safe, because the application already made the state it describes
    /// durable in shared storage, and a crash before the sync only leaves the old, longer
    /// log behind.
    pub(crate) fn truncate_to(
        &mut self,
        stream_id: u64,
        up_to: u64,
        data: Bytes,
        reply: TruncateReply,
    ) {
        match self.stage_truncation(stream_id, up_to, data) {
            Ok(()) => {
                self.unsynced.truncations.push(reply);
                self.unsynced.must_sync = true;
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn stage_truncation(
        &mut self,
        stream_id: u64,
        up_to: u64,
        data: Bytes,
    ) -> Result<(), StreamError> {
        let Some(replica) = self.streams.get_mut(&stream_id) else {
            return Err(StreamError::Closed);
        };
        let applied = replica.node.raft.raft_log.applied;
        if up_to > applied {
            return Err(StreamError::BeyondCommitted {
                up_to,
                committed: applied,
            });
        }
        let storage = replica.node.mut_store();
        if up_to <= storage.snapshot_ref().get_metadata().index {
            return Ok(());
        }
        // Rounds still at the sync thread are written before this batch, and raft applies
        // only persisted entries, so no unwritten round holds an entry this compacts; a
        // history key it deletes but an earlier round still writes is ignored as stale (see
        // `EngineStorage::conf_state_at`).
        let snapshot = storage
            .stage_compaction(up_to, data, &mut self.unsynced.batch)
            .map_err(|reason| StreamError::Corruption {
                location: format!("raft stream {stream_id} at {up_to}"),
                reason,
            })?;
        // From here raft reads nothing below the cut, which the batch deletes.
        storage.set_snapshot(snapshot);
        // A subscription from below the cut starts with the snapshot, as it would once
        // the entries are gone from the engine.
        replica.published.recent.discard_through(up_to);
        // The compaction may leave a follower needing the snapshot: let the next ready see
        // this stream even if nothing else touched it.
        self.touched.insert(stream_id);
        Ok(())
    }

    /// Once a round is durable: answers the truncations it carried and lets raft-engine
    /// purge the files they emptied.
    pub(super) fn finish_truncations(&mut self, truncations: Vec<TruncateReply>) {
        if truncations.is_empty() {
            return;
        }
        for reply in truncations {
            let _ = reply.send(Ok(()));
        }
        self.purge.due = true;
        self.purge_if_due();
    }

    /// The latest snapshot of `stream_id` on this replica, if its log was ever compacted.
    pub fn snapshot(&self, stream_id: u64) -> Option<stream::Snapshot> {
        let replica = self.streams.get(&stream_id)?;
        to_kernel(replica.node.store().snapshot_ref())
    }

    /// The first index still in `stream_id`'s log on this replica.
    pub fn first_index(&self, stream_id: u64) -> Option<u64> {
        let replica = self.streams.get(&stream_id)?;
        Some(replica.node.store().first_index_inner())
    }

    /// Lets raft-engine purge log files that hold only compacted entries, if a compaction
    /// happened and the last purge was an election timeout ago or more. Purging rewrites
    /// what little is still live in old files, so it is not run on every compaction.
    pub(super) fn purge_if_due(&mut self) {
        if !self.purge.due || self.ticks < self.purge.not_before {
            return;
        }
        self.purge.due = false;
        self.purge.not_before = self.ticks + self.config.election_tick as u64;
        match &self.purge.background {
            // Full means a purge is already waiting to start, which covers this one.
            Some(requests) => {
                let _ = requests.try_send(());
            }
            None => {
                if let Err(e) = purge_expired(&self.engine()) {
                    self.fail(e);
                }
            }
        }
    }

    /// From now on, due purges are requests on `requests` (a queue of one) to a thread
    /// that runs [`purge_expired`] on this server's engine; `None` purges in the caller
    /// again, which lets that thread end.
    pub(super) fn purge_in_background(&mut self, requests: Option<SyncSender<()>>) {
        self.purge.background = requests;
    }
}

/// Purges `engine`'s log files that hold only compacted entries. A panic in raft-engine
/// is an error: the engine's state is unknown after it.
pub(super) fn purge_expired(engine: &Engine) -> Result<(), StreamError> {
    let started = std::time::Instant::now();
    let purged = catch_unwind(AssertUnwindSafe(|| engine.purge_expired_files()));
    tracing::debug!(ms = started.elapsed().as_millis(), "raft log purged");
    match purged {
        Ok(Ok(pinned)) if !pinned.is_empty() => {
            // raft-engine asks for these to be compacted: only their applications can.
            tracing::info!(streams = ?pinned, "streams that are not truncated pin old raft log files");
            Ok(())
        }
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "purging raft log files failed");
            Ok(())
        }
        Err(_) => Err(StreamError::Io {
            context: "purging the raft log".to_owned(),
            source: Arc::new(std::io::Error::other("raft-engine purge panicked")),
        }),
    }
}

/// The kernel's view of a raft snapshot; `None` for the empty one (index 0).
pub(super) fn to_kernel(snapshot: &Snapshot) -> Option<stream::Snapshot> {
    let meta = snapshot.get_metadata();
    (meta.index > 0).then(|| stream::Snapshot {
        index: meta.index,
        term: meta.term,
        data: snapshot.data.clone(),
    })
}

/// The peers that `messages` send a snapshot to.
pub(super) fn snapshot_recipients(messages: &[Message]) -> Vec<u64> {
    messages
        .iter()
        .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
        .map(|m| m.to)
        .collect()
}

impl Replica {
    /// Stages a snapshot that raft received from the leader in `batch` (it replaces this
    /// replica's log and conf state). It counts as applied, and reaches subscribers, only
    /// once the round is durable: [`finish_snapshot`](Self::finish_snapshot).
    pub(crate) fn install_snapshot(
        &mut self,
        snapshot: &Snapshot,
        batch: &mut LogBatch,
    ) -> Result<(), StreamError> {
        self.node
            .mut_store()
            .apply_snapshot(snapshot, batch)
            .map_err(|e| StreamError::Io {
                context: format!("staging a snapshot of stream {}", self.stream_id),
                source: Arc::new(std::io::Error::other(e.to_string())),
            })?;
        let index = snapshot.get_metadata().index;
        tracing::info!(
            stream_id = self.stream_id,
            index,
            "installing a raft snapshot"
        );
        self.installing = Some(index);
        self.published.recent.clear();
        let conf_state = self.node.raft.prs().conf().to_conf_state();
        self.membership
            .send_replace(Membership::from_conf_state(&conf_state));
        // Entries up to the snapshot never reach this replica as entries, so appends
        // waiting for them (from when it led) cannot learn their outcome here.
        while let Some(entry) = self.appends.first_entry() {
            if *entry.key() > index {
                break;
            }
            let (_, (_, reply)) = entry.remove_entry();
            let _ = reply.send(Err(StreamError::Closed));
        }
        Ok(())
    }

    /// Once the snapshot being installed is durable: raft applies it, and the committed
    /// watch moves to it, so subscriptions behind it receive it.
    pub(crate) fn finish_snapshot(&mut self) {
        let Some(index) = self.installing else {
            return;
        };
        if self.node.raft.raft_log.persisted < index {
            return;
        }
        self.installing = None;
        if self.node.raft.raft_log.applied < index {
            self.node.advance_apply_to(index);
        }
        self.committed.send_if_modified(|committed| {
            let moved = *committed < index;
            *committed = (*committed).max(index);
            moved
        });
    }

    /// Tells raft that snapshots to `peers` left. If one is lost, the follower rejects the
    /// next append and the leader sends the snapshot again; without this report raft would
    /// wait for the follower forever (the transport never reports a loss).
    pub(crate) fn report_snapshots(&mut self, peers: Vec<u64>) {
        for peer in peers {
            self.node.report_snapshot(peer, SnapshotStatus::Finish);
        }
    }
}
