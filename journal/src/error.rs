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
}

impl JournalError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
