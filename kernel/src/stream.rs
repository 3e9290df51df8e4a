//! Journal streams: the replicated, ordered, durable log that tablet groups and the master
//! run on.
//!
//! A [`Stream`] is a log with one leader. The leader [appends](Stream::append) opaque entries;
//! every replica [subscribes](Stream::subscribe) to the entries that are committed, in index
//! order, and applies them. Implementations live in the `luna-journal` crate:
//! `journal::raft` (N replicas on raft-rs) and `journal::local` (one replica, same
//! durability rules, for development and tests).
//!
//! # Contract
//!
//! - **Committed** means durable on the stream's quorum: fsynced on a majority of replicas
//!   (on the one replica of a local stream). A committed entry is never lost while a quorum
//!   of replicas keeps its disks, and never changes.
//! - **Indexes** are assigned by the stream, start at 1 and are contiguous. Every committed
//!   index is delivered to every subscriber exactly once, in increasing order, with no gaps,
//!   except that a [snapshot](#snapshots-and-truncation) stands in for a discarded prefix.
//!   Some indexes are written by the stream itself (a new leader's first entry, membership
//!   changes): they arrive with empty [`Entry::data`], and an application skips them. Because
//!   [`Stream::append`] rejects empty data, an empty entry is always such an internal entry.
//! - **Acknowledgement.** [`Stream::append`] returns `Ok(index)` only once the entry is
//!   committed at `index`. [`StreamError::NotLeader`], [`StreamError::EntryTooLarge`] and
//!   [`StreamError::EmptyEntry`] mean the entry was not committed and never will be.
//!   [`StreamError::Closed`], [`StreamError::Io`], and dropping the future (e.g. on a
//!   timeout) mean the outcome is unknown: the entry was not acknowledged but may still
//!   commit, so the caller must find out from the subscription before retrying a
//!   non-idempotent write.
//! - **Ordering.** Appends acknowledged to one caller in sequence are committed in that
//!   sequence. Concurrent appends are committed in some order, each exactly once.
//! - **Reads.** [`Stream::read_index`] is the linearizable read barrier: once a replica has
//!   applied every entry up to the returned index, a read served from its state reflects
//!   every append acknowledged before `read_index` was called.
//!
//! # Snapshots and truncation
//!
//! A stream does not keep its log forever. Once the application has made the effect of a
//! prefix durable elsewhere (Luna: a tablet group's tablets flushed their MemStores to
//! shared storage), it calls [`Stream::truncate`]`(up_to, snapshot)`. `snapshot` is the
//! application's own metadata describing its state as of index `up_to` (for a tablet group:
//! its tablets, their epochs and manifest positions). It is opaque to the stream and holds
//! no base data, which is already in shared storage. The stream stores it durably, then
//! may discard entries up to `up_to` and reclaim their space.
//!
//! - A subscription that starts at or below the snapshot's index, or that falls behind it,
//!   first yields [`Committed::Snapshot`] with the snapshot's index, term and exactly the
//!   bytes the application gave, then [`Committed::Entry`] from `index + 1` on. The
//!   application rebuilds its state from the snapshot (reading base data from shared
//!   storage) and applies the entries after it. So "every committed index once, in order"
//!   holds with a snapshot standing in for the prefix it replaced.
//! - On a replicated stream the snapshot also reaches replicas that lag behind the
//!   discarded prefix, or that join after it: their subscriptions deliver it the same way.
//!   So the snapshot of `up_to` must be valid on every replica, which shared-storage
//!   metadata is.
//! - `up_to` must be committed (delivered to this replica's subscriptions), otherwise
//!   [`StreamError::BeyondCommitted`]; truncating at or below the current snapshot's index
//!   changes nothing. Each replica truncates its own copy of the log.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

/// One committed entry of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the stream: contiguous, starting at 1.
    pub index: u64,
    /// Leader term that wrote the entry (always 1 on a single-replica stream).
    pub term: u64,
    /// The appended bytes; empty for entries the stream wrote itself.
    pub data: Bytes,
}

/// The application's metadata standing in for a discarded prefix of a stream, as given to
/// [`Stream::truncate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The last index the snapshot covers; entries resume at `index + 1`.
    pub index: u64,
    /// Term of the entry at `index` (always 1 on a single-replica stream).
    pub term: u64,
    /// The bytes the application passed to [`Stream::truncate`], unchanged.
    pub data: Bytes,
}

/// One item of a [`Subscription`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// The application's state as of `index`: entries up to it are gone, and the next item
    /// is the entry at `index + 1`. Comes first when a subscription starts at or below the
    /// snapshot, or later when this replica caught up by a snapshot instead of entries.
    Snapshot(Snapshot),
    /// The next committed entry.
    Entry(Entry),
}

impl Committed {
    /// The last index this item covers: the entry's index, or the snapshot's.
    pub fn index(&self) -> u64 {
        match self {
            Committed::Snapshot(snapshot) => snapshot.index,
            Committed::Entry(entry) => entry.index,
        }
    }
}

/// Who leads a stream, as this replica currently knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Leadership {
    /// The latest term this replica has seen.
    pub term: u64,
    /// The leader of `term`, if this replica knows one.
    pub leader_id: Option<u64>,
    /// Whether this replica is that leader.
    pub is_leader: bool,
}

impl Leadership {
    /// `Ok` if this replica leads, else [`StreamError::NotLeader`] with the known leader.
    pub fn check_leads(&self) -> Result<(), StreamError> {
        if self.is_leader {
            return Ok(());
        }
        Err(StreamError::NotLeader {
            leader_hint: self.leader_id,
            term: self.term,
        })
    }
}

/// Errors returned by [`Stream`] operations.
///
/// Cheap to clone: one failed fsync fails every append it covered, each with the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// This replica does not lead the stream; the entry was not appended (or was overwritten
    /// by a new leader before it committed). Retry on `leader_hint` when there is one.
    #[error("not the leader of term {term} (leader hint: {leader_hint:?})")]
    NotLeader {
        /// The replica believed to lead, if any.
        leader_hint: Option<u64>,
        /// The term this replica has seen.
        term: u64,
    },

    /// The entry exceeds the stream's per-entry limit.
    #[error("entry of {size} bytes exceeds the limit of {limit} bytes")]
    EntryTooLarge {
        /// Size of the rejected entry.
        size: usize,
        /// The stream's limit.
        limit: usize,
    },

    /// Empty entries are reserved for the stream's own bookkeeping.
    #[error("empty entries cannot be appended")]
    EmptyEntry,

    /// [`Stream::truncate`] asked to discard entries that are not committed here yet: the
    /// application's snapshot would describe a state the log does not hold. Retry once
    /// this replica has committed `up_to`.
    #[error("cannot truncate up to {up_to}: committed only up to {committed}")]
    BeyondCommitted {
        /// The index asked for.
        up_to: u64,
        /// This replica's committed index.
        committed: u64,
    },

    /// The server holds too many log writes that its disk has not made durable yet (a
    /// slow or hung fsync); the entry was not appended. Retry after backing off.
    #[error("the journal is overloaded: {unsynced_bytes} bytes wait for the disk (limit {limit})")]
    Overloaded {
        /// Bytes written since the last completed fsync, and proposed since.
        unsynced_bytes: usize,
        /// The server's limit.
        limit: usize,
    },

    /// The stream was shut down or failed; an operation in flight has an unknown outcome.
    #[error("the stream is closed")]
    Closed,

    /// The replica gave up waiting for a quorum (e.g. a read barrier during a partition).
    #[error("{operation} timed out")]
    Timeout {
        /// What timed out.
        operation: &'static str,
    },

    /// Local disk I/O failed; the affected appends were not acknowledged.
    #[error("{context}: {source}")]
    Io {
        /// What the stream was doing.
        context: String,
        /// The underlying error, shared by every operation it failed.
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The log on disk is damaged.
    #[error("corrupt log at {location}: {reason}")]
    Corruption {
        /// Which file and offset (or which stream and index).
        location: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl StreamError {
    /// Checks an entry against the rules every [`Stream::append`] applies:
    /// not empty (empty entries are the stream's own) and at most `limit` bytes.
    pub fn check_entry(data: &[u8], limit: usize) -> Result<(), StreamError> {
        if data.is_empty() {
            return Err(StreamError::EmptyEntry);
        }
        if data.len() > limit {
            return Err(StreamError::EntryTooLarge {
                size: data.len(),
                limit,
            });
        }
        Ok(())
    }
}

/// Committed entries of a stream in index order, from [`Stream::subscribe`], with a
/// [`Committed::Snapshot`] standing in for any discarded prefix.
///
/// Ends (`None`) when the stream closes. An `Err` item ends it too: the log could not be
/// read.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Result<Committed, StreamError>>,
}

impl Subscription {
    /// Wraps the receiving end that an implementation feeds.
    pub fn new(rx: mpsc::Receiver<Result<Committed, StreamError>>) -> Self {
        Self { rx }
    }

    /// The next committed item; waits until one is committed.
    pub async fn next(&mut self) -> Option<Result<Committed, StreamError>> {
        self.rx.recv().await
    }
}

/// A replicated, ordered, durable log with one leader. See the [module docs](self) for the
/// contract every implementation keeps.
#[async_trait]
pub trait Stream: Send + Sync {
    /// Largest entry [`append`](Self::append) accepts, in bytes.
    fn max_entry_size(&self) -> usize;

    /// Appends `data` and returns its index once it is committed. Only the leader accepts
    /// appends; others answer [`StreamError::NotLeader`]. Concurrent appends are batched:
    /// one fsync (and one replication round) covers all that are waiting.
    async fn append(&self, data: Bytes) -> Result<u64, StreamError>;

    /// Committed entries from index `from` onwards, including those committed later. If
    /// `from` is at or below the snapshot's index (entries there were discarded), the
    /// snapshot comes first and entries follow from its index + 1; a subscriber that falls
    /// behind a snapshot later gets it the same way (see the [module docs](self)).
    async fn subscribe(&self, from: u64) -> Result<Subscription, StreamError>;

    /// Stores `snapshot`, the application's metadata for its state as of `up_to`, durably
    /// before returning, and lets the stream discard entries up to and including `up_to`
    /// and reclaim their space. Entries above `up_to` are kept. `up_to` beyond the
    /// committed index is [`StreamError::BeyondCommitted`]; at or below the current
    /// snapshot's index the call changes nothing.
    async fn truncate(&self, up_to: u64, snapshot: Bytes) -> Result<(), StreamError>;

    /// The current leadership as this replica sees it.
    fn leadership(&self) -> Leadership;

    /// A receiver that is notified whenever [`leadership`](Self::leadership) changes.
    fn watch_leadership(&self) -> watch::Receiver<Leadership>;

    /// The linearizable read barrier: an index that this replica must have applied before
    /// serving a read. Works on followers too (it asks the leader).
    async fn read_index(&self) -> Result<u64, StreamError>;

    /// A read barrier like [`read_index`](Self::read_index) that also proves this replica
    /// still leads: it fails on a replica that does not lead. A leader holding a lease may
    /// answer from its committed index without a round trip. A single-replica stream is
    /// its own quorum, so by default this is `read_index` on a leader.
    async fn lease_read(&self) -> Result<u64, StreamError> {
        self.leadership().check_leads()?;
        self.read_index().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The trait must stay object-safe: servers hold streams as `Arc<dyn Stream>`.
    const _: Option<Arc<dyn Stream>> = None;

    #[tokio::test]
    async fn subscription_yields_in_order_then_ends() {
        let (tx, rx) = mpsc::channel(4);
        let mut sub = Subscription::new(rx);
        for index in 1..=3 {
            let entry = Entry {
                index,
                term: 1,
                data: Bytes::from(vec![index as u8]),
            };
            tx.send(Ok(Committed::Entry(entry))).await.ok();
        }
        drop(tx);
        let mut seen = Vec::new();
        while let Some(item) = sub.next().await {
            match item {
                Ok(item) => seen.push(item.index()),
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        assert_eq!(seen, vec![1, 2, 3]);
    }

    #[test]
    fn errors_name_their_fields() {
        let e = StreamError::NotLeader {
            leader_hint: Some(3),
            term: 7,
        };
        assert_eq!(
            e.to_string(),
            "not the leader of term 7 (leader hint: Some(3))"
        );
        let e = StreamError::EntryTooLarge { size: 10, limit: 4 };
        assert_eq!(
            e.to_string(),
            "entry of 10 bytes exceeds the limit of 4 bytes"
        );
        let e = StreamError::BeyondCommitted {
            up_to: 9,
            committed: 5,
        };
        assert_eq!(
            e.to_string(),
            "cannot truncate up to 9: committed only up to 5"
        );
    }
}
