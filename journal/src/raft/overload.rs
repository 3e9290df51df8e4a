//! A bound on the log writes a server holds in memory while its disk is slow.
//!
//! The driver never waits for the disk: while one fsync is in flight, every round after
//! it joins one unsynced batch (docs/journal.md, "The ready loop"). A disk that hangs
//! would let that batch grow without end, with every proposal a client makes and every
//! append a leader sends, until memory runs out or raft-engine refuses the batch (over 2
//! GiB) and the server fails. Past [`RaftConfig::max_unsynced_bytes`]:
//!
//! - proposals fail at once with [`StreamError::Overloaded`]: nothing was appended, so the
//!   caller backs off and retries (a tablet server answers `Busy`);
//! - peers' appends that carry entries are dropped. Raft allows losing any message; the
//!   leader finds the gap from the next append's rejection, or from the heartbeat round,
//!   and resends. Everything else (heartbeats and their answers, votes, read barriers)
//!   still goes through, so a slow disk does not depose a leader whose peers are up.
//!
//! The bound counts what waits *behind* the fsync in flight; the round that fsync writes
//! was under the bound when it was taken, so at most about twice the bound is held.
//!
//! [`RaftConfig::max_unsynced_bytes`]: super::RaftConfig::max_unsynced_bytes

use luna_kernel::stream::StreamError;
use raft::eraftpb::{Message, MessageType};

use super::server::Server;

/// What the bound did so far, and how close the server is to it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OverloadStats {
    /// [`Server::unsynced_bytes`] now.
    pub(crate) unsynced_bytes: usize,
    /// Whether they are over the bound now.
    pub(crate) over_bound: bool,
    /// Proposals refused with [`StreamError::Overloaded`].
    pub(crate) proposals_refused: u64,
    /// Peers' appends dropped.
    pub(crate) peer_appends_dropped: u64,
}

impl Server {
    /// The bound's figures, for [`NodeStats`](super::NodeStats).
    pub(crate) fn overload_stats(&self) -> OverloadStats {
        let unsynced_bytes = self.unsynced_bytes();
        OverloadStats {
            unsynced_bytes,
            over_bound: unsynced_bytes > self.config.max_unsynced_bytes,
            ..self.overload_counts
        }
    }

    /// Bytes of log writes not yet handed to an fsync: the rounds since the last one was
    /// taken, and the entries proposed or appended by peers since the last
    /// [`ready`](Self::ready) (a turn may take many before its round).
    pub fn unsynced_bytes(&self) -> usize {
        self.unsynced.batch.approximate_size() + self.taken_unready
    }

    /// The error a proposal gets while the unsynced writes are over their bound, if they
    /// are. Logs when the server enters and leaves that state.
    pub(super) fn overload(&mut self) -> Option<StreamError> {
        let unsynced_bytes = self.unsynced_bytes();
        let limit = self.config.max_unsynced_bytes;
        let over = unsynced_bytes > limit;
        if over != self.overloaded {
            self.overloaded = over;
            if over {
                tracing::warn!(
                    node = self.config.node_id,
                    unsynced_bytes,
                    limit,
                    "the disk is behind: refusing proposals and dropping peers' appends"
                );
            } else {
                tracing::info!(
                    node = self.config.node_id,
                    unsynced_bytes,
                    "the disk caught up: taking proposals and appends again"
                );
            }
        }
        over.then_some(StreamError::Overloaded {
            unsynced_bytes,
            limit,
        })
    }

    /// Whether `message`, from a peer, is an append with entries that must wait because
    /// the unsynced writes are over their bound (its leader resends it). An append that
    /// may go on counts towards the bound at once.
    pub(super) fn drops_peer_append(&mut self, stream_id: u64, message: &Message) -> bool {
        if message.get_msg_type() != MessageType::MsgAppend || message.entries.is_empty() {
            return false;
        }
        let dropped = self.overload().is_some();
        if !dropped {
            self.taken_unready += message.entries.iter().map(|e| e.data.len()).sum::<usize>();
        }
        if dropped {
            self.overload_counts.peer_appends_dropped += 1;
            tracing::debug!(
                stream_id,
                from = message.from,
                index = message.index,
                "dropping a peer's append until the disk catches up"
            );
        }
        dropped
    }
}
