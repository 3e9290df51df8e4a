//! The journal crate's one error type, for opening and configuring streams.
//!
//! Operations on an open stream answer
//! [`StreamError`](luna_kernel::stream::StreamError), the kernel's contract type.

use std::path::PathBuf;

/// Errors from opening or configuring a journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// A configuration value outside its allowed range.
    #[error("invalid journal configuration {name}: {reason}")]
    InvalidConfig {
        /// Which setting.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },

    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the journal was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Another process (or another open stream in this one) holds the log directory.
    #[error("journal directory {path:?} is locked by another writer")]
    Locked {
        /// The directory.
        path: PathBuf,
    },

    /// A log file is damaged beyond a torn final write.
    #[error("corrupt journal file {path:?} at offset {offset}: {reason}")]
    Corruption {
        /// The damaged file.
        path: PathBuf,
        /// Byte offset of the first bad record.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// The raft log engine failed to open or recover.
    #[error("raft log engine at {path:?}: {reason}")]
    Engine {
        /// The engine directory.
        path: PathBuf,
        /// The engine's message.
        reason: String,
    },

    /// raft-rs rejected the stored state or configuration of a stream.
    #[error("raft stream {stream_id}: {reason}")]
    Raft {
        /// The stream.
        stream_id: u64,
        /// raft-rs's message.
        reason: String,
    },

    /// An operation on a stream (a membership change, a leader transfer) failed the way
    /// stream operations fail: not the leader, timed out, closed, or an I/O error.
    #[error("raft stream {stream_id}: {source}")]
    Stream {
        /// The stream.
        stream_id: u64,
        /// Why, as a stream operation would say it.
        #[source]
        source: luna_kernel::stream::StreamError,
    },

    /// A membership change that cannot be made as asked.
    #[error("raft stream {stream_id}: invalid membership change: {reason}")]
    Membership {
        /// The stream.
        stream_id: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// Another membership change has not applied yet (a new leader also waits until it has
    /// applied its whole log); retry once it has.
    #[error("raft stream {stream_id}: another membership change is in progress")]
    ChangeInProgress {
        /// The stream.
        stream_id: u64,
    },

    /// A learner is too far behind the log to be promoted yet; retry once it caught up.
    #[error(
        "raft stream {stream_id}: learner {node} has {matched} of {committed} committed entries"
    )]
    NotCaughtUp {
        /// The stream.
        stream_id: u64,
        /// The learner.
        node: u64,
        /// The last index the leader knows the learner holds.
        matched: u64,
        /// The leader's committed index.
        committed: u64,
    },

    /// Leadership went to another replica than the transfer asked for.
    #[error("raft stream {stream_id}: leadership went to {leader:?}, not to {to}")]
    LeaderTransfer {
        /// The stream.
        stream_id: u64,
        /// The replica asked to lead.
        to: u64,
        /// Who leads instead.
        leader: Option<u64>,
    },
}

impl JournalError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
