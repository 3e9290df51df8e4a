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
//!   index is delivered to every subscriber exactly once, in increasing order, with no gaps.
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

    /// The requested entries were discarded by [`Stream::truncate`].
    #[error("entry {requested} was truncated; the stream starts at {first_index}")]
    Truncated {
        /// The index asked for.
        requested: u64,
        /// The first index still held.
        first_index: u64,
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

/// Committed entries of a stream in index order, from [`Stream::subscribe`].
///
/// Ends (`None`) when the stream closes. An `Err` item ends it too: the subscriber fell
/// behind a truncation, or the log could not be read.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Result<Entry, StreamError>>,
}

impl Subscription {
    /// Wraps the receiving end that an implementation feeds.
    pub fn new(rx: mpsc::Receiver<Result<Entry, StreamError>>) -> Self {
        Self { rx }
    }

    /// The next committed entry; waits until one is committed.
    pub async fn next(&mut self) -> Option<Result<Entry, StreamError>> {
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

    /// Committed entries from index `from` onwards, including those committed later.
    /// `from` below the first retained index answers [`StreamError::Truncated`].
    async fn subscribe(&self, from: u64) -> Result<Subscription, StreamError>;

    /// Allows the stream to discard entries up to and including `up_to`, which every
    /// consumer must have made durable elsewhere. Space is reclaimed lazily; entries above
    /// `up_to` are kept. Truncating past the committed index is capped at it.
    async fn truncate(&self, up_to: u64) -> Result<(), StreamError>;

    /// The current leadership as this replica sees it.
    fn leadership(&self) -> Leadership;

    /// A receiver that is notified whenever [`leadership`](Self::leadership) changes.
    fn watch_leadership(&self) -> watch::Receiver<Leadership>;

    /// The linearizable read barrier: an index that this replica must have applied before
    /// serving a read. Works on followers too (it asks the leader).
    async fn read_index(&self) -> Result<u64, StreamError>;
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
            tx.send(Ok(entry)).await.ok();
        }
        drop(tx);
        let mut seen = Vec::new();
        while let Some(item) = sub.next().await {
            match item {
                Ok(entry) => seen.push(entry.index),
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
    }
}
