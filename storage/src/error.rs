//! The storage crate's one error type.

use thiserror::Error;

/// Everything that can go wrong in the storage engine.
///
/// Callers branch on [`StorageError::is_retryable`]; the message carries the detail.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The request itself is wrong (oversized key, empty key, key outside the tablet, ...).
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// What was wrong with it.
        message: String,
    },
    /// An object in the store is damaged or truncated. Other objects stay readable.
    #[error("corrupt object {object}: {detail}")]
    Corruption {
        /// The object's path.
        object: String,
        /// What was wrong with it.
        detail: String,
    },
    /// The object store failed; transient failures are retryable.
    #[error("object store {operation} of {path} failed: {source}")]
    ObjectStore {
        /// The kind of request, e.g. "get" or "put".
        operation: &'static str,
        /// The object's path.
        path: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// A newer owner of the tablet exists: this writer must stop.
    #[error(
        "tablet {tablet_id} is fenced: epoch {epoch} is older than the manifest's {current_epoch}"
    )]
    Fenced {
        /// The tablet.
        tablet_id: u64,
        /// The epoch this writer holds.
        epoch: u64,
        /// The epoch recorded in the manifest.
        current_epoch: u64,
    },
    /// The call needs the tablet's owner (the flushing replica), and this
    /// handle is a replica: ask the group leader, or claim the tablet first.
    #[error("tablet {tablet_id} is a replica here; only its owner flushes")]
    NotOwner {
        /// The tablet.
        tablet_id: u64,
    },
    /// The manifest does not (yet) record a flush the caller was told about:
    /// a replica applied a "flushed up to" marker the BaseStore does not show.
    #[error("tablet {tablet_id}: the manifest records a flush up to {found}, not {wanted}")]
    FlushNotVisible {
        /// The tablet.
        tablet_id: u64,
        /// The journal index the marker named.
        wanted: u64,
        /// The journal index the manifest records.
        found: u64,
    },
    /// The snapshot is older than the GC safe point: versions it needs may
    /// have been compacted away.
    #[error("snapshot at {read_ts} is older than the GC safe point {safe_point}")]
    SnapshotTooOld {
        /// The requested snapshot.
        read_ts: u64,
        /// The current safe point.
        safe_point: u64,
    },
    /// The tablet or store was closed.
    #[error("{what} is closed")]
    Closed {
        /// What was closed.
        what: &'static str,
    },
    /// Writing a table failed inside the Parquet encoder.
    #[error("encoding table {object}: {detail}")]
    Encode {
        /// The table being written.
        object: String,
        /// The encoder's message.
        detail: String,
    },
    /// A background job failed; the detail says which and why.
    #[error("background {job} failed: {detail}")]
    Job {
        /// The job kind.
        job: &'static str,
        /// Why.
        detail: String,
    },
}

impl StorageError {
    /// Whether the same call may succeed if repeated later (the store was
    /// unavailable, a write stalled, ...). Corruption, fencing and bad input are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::ObjectStore { source, .. } => matches!(
                source,
                object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
            ),
            StorageError::Job { .. } | StorageError::FlushNotVisible { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        StorageError::InvalidArgument {
            message: message.into(),
        }
    }

    pub(crate) fn corruption(object: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        StorageError::Corruption {
            object: object.into(),
            detail: detail.to_string(),
        }
    }

    pub(crate) fn store(
        operation: &'static str,
        path: &object_store::path::Path,
        source: object_store::Error,
    ) -> Self {
        StorageError::ObjectStore {
            operation,
            path: path.to_string(),
            source,
        }
    }
}

/// Result alias for the storage crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
