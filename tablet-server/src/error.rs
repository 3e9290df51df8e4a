//! The tablet server's error type.

use luna_journal::JournalError;
use luna_kernel::stream::StreamError;
use luna_proto::tablet as pb;
use luna_storage::StorageError;

/// How long a client waits before it retries a write that an overloaded journal refused:
/// about a few fsyncs of a slow disk.
const OVERLOADED_RETRY_MS: u64 = 50;

/// Everything that can go wrong in a tablet server.
#[derive(Debug, thiserror::Error)]
pub enum TabletServerError {
    /// The request is malformed or breaks a limit; retrying it cannot help.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// This replica does not lead the tablet's group.
    #[error("not the leader of group {group_id} (leader: {leader:?})")]
    NotLeader {
        /// The group.
        group_id: u64,
        /// The leader's server id and address, when known.
        leader: Option<(u64, String)>,
    },
    /// The caller routed with another epoch of the tablet.
    #[error("tablet {tablet_id} is at epoch {current_epoch}, not {requested_epoch}")]
    EpochMismatch {
        /// The tablet.
        tablet_id: u64,
        /// The epoch the request carried.
        requested_epoch: u64,
        /// The epoch this server holds.
        current_epoch: u64,
    },
    /// The tablet is sealed here: it is moving to another group.
    #[error(
        "tablet {tablet_id} is moving to another group (as epoch {next_epoch}); refresh the routing and retry"
    )]
    TabletMoving {
        /// The tablet.
        tablet_id: u64,
        /// The epoch it gets in its new group.
        next_epoch: u64,
    },
    /// A tablet cannot be sealed for a move while transactions hold locks on it.
    #[error(
        "tablet {tablet_id} still holds {locks} locks of running transactions; the move gives up for now"
    )]
    LocksHeld {
        /// The tablet.
        tablet_id: u64,
        /// Locks left.
        locks: usize,
    },
    /// The tablet is not hosted here.
    #[error("tablet {0} is not hosted on this server")]
    TabletNotFound(u64),
    /// The server is shedding load; retry after the given time.
    #[error("server busy: {reason}")]
    Busy {
        /// Why.
        reason: String,
        /// When to retry.
        retry_after_ms: u64,
    },
    /// The read timestamp is below the GC safe point.
    #[error("snapshot at {read_ts} is older than the GC safe point {safe_point}")]
    SnapshotTooOld {
        /// The requested snapshot.
        read_ts: u64,
        /// The safe point.
        safe_point: u64,
    },
    /// A transaction's lock holds the key: resolve it through its primary, then retry.
    #[error("key locked by the transaction that started at {}", .0.start_ts)]
    Locked(Box<pb::LockInfo>),
    /// A version of the key committed at or after the transaction's start.
    #[error("write conflict: the key has a version committed at {commit_ts}")]
    WriteConflict {
        /// The key, in routing form.
        key: bytes::Bytes,
        /// The conflicting version's commit timestamp.
        commit_ts: u64,
    },
    /// The transaction was rolled back and can no longer commit.
    #[error("transaction {start_ts} was rolled back")]
    TxnAborted {
        /// The transaction's start timestamp.
        start_ts: u64,
    },
    /// The group's journal stream failed.
    #[error("journal of group {group_id}: {source}")]
    Stream {
        /// The group.
        group_id: u64,
        /// The stream's error.
        #[source]
        source: StreamError,
    },
    /// The write's client said it is done with it (it had its answer, or gave up), so a
    /// copy that arrives late is not applied, and its outcome is not reported.
    #[error(
        "write {seq} came after its client was done with every write below {done_below} (answered or given up on), so its outcome is not reported; send it as a new write if it is still wanted"
    )]
    RequestDone {
        /// The write's seq.
        seq: u64,
        /// What its client is done below.
        done_below: u64,
    },
    /// The journal server failed.
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    /// The storage engine failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The master could not be reached or refused a request.
    #[error("master at {addr}: {detail}")]
    Master {
        /// The master's address.
        addr: String,
        /// What happened.
        detail: String,
    },
    /// A local file or socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A replicated entry could not be decoded: the log was written by something else.
    #[error("group {group_id} log entry {index} is not a Luna group entry: {detail}")]
    CorruptEntry {
        /// The group.
        group_id: u64,
        /// The entry's index.
        index: u64,
        /// The decoder's message.
        detail: String,
    },
    /// The server is shutting down.
    #[error("the tablet server is shutting down")]
    ShuttingDown,
    /// Something failed inside the server; the message says what.
    #[error("internal error: {0}")]
    Internal(String),
}

impl TabletServerError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// The same error for another caller that shares its outcome (one failed journal
    /// append fails every write it carried). Errors that cannot be copied keep their
    /// message.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::InvalidArgument(message) => Self::InvalidArgument(message.clone()),
            Self::NotLeader { group_id, leader } => Self::NotLeader {
                group_id: *group_id,
                leader: leader.clone(),
            },
            Self::TabletNotFound(tablet_id) => Self::TabletNotFound(*tablet_id),
            Self::Locked(lock) => Self::Locked(lock.clone()),
            Self::Busy {
                reason,
                retry_after_ms,
            } => Self::Busy {
                reason: reason.clone(),
                retry_after_ms: *retry_after_ms,
            },
            Self::Stream { group_id, source } => Self::Stream {
                group_id: *group_id,
                source: source.clone(),
            },
            Self::ShuttingDown => Self::ShuttingDown,
            Self::RequestDone { seq, done_below } => Self::RequestDone {
                seq: *seq,
                done_below: *done_below,
            },
            other => Self::Internal(other.to_string()),
        }
    }

    /// A short label of the error's kind, for metrics.
    pub(crate) fn kind_label(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) | Self::Storage(StorageError::InvalidArgument { .. }) => {
                "invalid_argument"
            }
            Self::NotLeader { .. } => "not_leader",
            Self::EpochMismatch { .. } | Self::TabletMoving { .. } => "epoch_mismatch",
            Self::TabletNotFound(_) => "tablet_not_found",
            Self::Busy { .. }
            | Self::Stream {
                source: StreamError::Overloaded { .. },
                ..
            } => "busy",
            Self::Locked(_) => "locked",
            Self::WriteConflict { .. } => "write_conflict",
            Self::TxnAborted { .. } => "txn_aborted",
            Self::RequestDone { .. } => "request_done",
            Self::Stream {
                source: StreamError::Closed | StreamError::Timeout { .. } | StreamError::Io { .. },
                ..
            } => "outcome_unknown",
            Self::SnapshotTooOld { .. } | Self::Storage(StorageError::SnapshotTooOld { .. }) => {
                "snapshot_too_old"
            }
            _ => "error",
        }
    }

    /// The error as the tablet service answers it: a typed `TabletError` in the response
    /// for what the client should react to, a gRPC status for the rest.
    pub fn into_reply(self) -> Result<pb::TabletError, tonic::Status> {
        let message = self.to_string();
        let kind = match self {
            Self::NotLeader { leader, .. } => {
                let (leader_server_id, leader_addr) = leader.unwrap_or_default();
                pb::tablet_error::Kind::NotLeader(pb::NotLeader {
                    leader_server_id,
                    leader_addr,
                })
            }
            Self::EpochMismatch { current_epoch, .. }
            | Self::TabletMoving {
                next_epoch: current_epoch,
                ..
            } => pb::tablet_error::Kind::EpochMismatch(pb::EpochMismatch { current_epoch }),
            Self::TabletNotFound(_) => {
                pb::tablet_error::Kind::TabletNotFound(pb::TabletNotFound {})
            }
            Self::Busy { retry_after_ms, .. } => {
                pb::tablet_error::Kind::Busy(pb::Busy { retry_after_ms })
            }
            Self::LocksHeld { .. } => pb::tablet_error::Kind::Busy(pb::Busy { retry_after_ms: 0 }),
            // Refused before it entered the log: the client backs off and retries.
            Self::Stream {
                source: StreamError::Overloaded { .. },
                ..
            } => pb::tablet_error::Kind::Busy(pb::Busy {
                retry_after_ms: OVERLOADED_RETRY_MS,
            }),
            Self::SnapshotTooOld { safe_point, .. }
            | Self::Storage(StorageError::SnapshotTooOld { safe_point, .. }) => {
                pb::tablet_error::Kind::SnapshotTooOld(pb::SnapshotTooOld { safe_point })
            }
            Self::Locked(lock) => pb::tablet_error::Kind::Locked(pb::Locked { lock: Some(*lock) }),
            Self::WriteConflict { key, commit_ts } => {
                pb::tablet_error::Kind::WriteConflict(pb::WriteConflict { key, commit_ts })
            }
            Self::TxnAborted { start_ts } => {
                pb::tablet_error::Kind::TxnAborted(pb::TxnAborted { start_ts })
            }
            Self::InvalidArgument(_) | Self::Storage(StorageError::InvalidArgument { .. }) => {
                return Err(tonic::Status::invalid_argument(message));
            }
            // A stream that lost leadership mid-request: the client finds the new leader.
            Self::Stream {
                source: StreamError::NotLeader { .. },
                ..
            } => pb::tablet_error::Kind::NotLeader(pb::NotLeader::default()),
            // The stream's outcome-unknown errors: a write may still commit. The client
            // counts it as maybe applied and retries it under the same request id, which
            // the group's dedup answers; an error the client took as final would report a
            // write that committed as failed. A typed answer, not UNAVAILABLE: the trouble
            // is this group's, and the server's other groups still serve.
            Self::Stream {
                source: StreamError::Closed | StreamError::Timeout { .. } | StreamError::Io { .. },
                ..
            } => pb::tablet_error::Kind::OutcomeUnknown(pb::OutcomeUnknown {}),
            Self::ShuttingDown => return Err(tonic::Status::unavailable(message)),
            Self::RequestDone { .. } => {
                return Err(tonic::Status::failed_precondition(message));
            }
            _ => return Err(tonic::Status::internal(message)),
        };
        Ok(pb::TabletError {
            kind: Some(kind),
            message,
        })
    }
}

/// Results in the tablet server.
pub type Result<T, E = TabletServerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_of_unknown_outcome_is_answered_as_such_so_the_client_retries_it() {
        let unknown = [
            StreamError::Closed,
            StreamError::Timeout {
                operation: "applying a committed write",
            },
            StreamError::Io {
                context: "fsync".to_owned(),
                source: std::sync::Arc::new(std::io::Error::other("EIO")),
            },
        ];
        for source in unknown {
            let error = TabletServerError::Stream {
                group_id: 7,
                source: source.clone(),
            };
            assert_eq!(error.kind_label(), "outcome_unknown", "{source:?}");
            let reply = error.into_reply().expect("a tablet error, not a status");
            assert!(
                matches!(reply.kind, Some(pb::tablet_error::Kind::OutcomeUnknown(_))),
                "{source:?}: {reply:?}"
            );
        }
        // A stream that lost leadership refused the append: the client finds the leader.
        let refused = TabletServerError::Stream {
            group_id: 7,
            source: StreamError::NotLeader {
                leader_hint: None,
                term: 3,
            },
        };
        let reply = refused.into_reply().expect("a tablet error");
        assert!(matches!(
            reply.kind,
            Some(pb::tablet_error::Kind::NotLeader(_))
        ));
        // A server on its way down is unavailable as a whole.
        let status = TabletServerError::ShuttingDown
            .into_reply()
            .expect_err("a status");
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn a_write_an_overloaded_journal_refused_is_answered_busy() {
        let error = TabletServerError::Stream {
            group_id: 7,
            source: StreamError::Overloaded {
                unsynced_bytes: 200,
                limit: 100,
            },
        };
        assert_eq!(error.kind_label(), "busy");
        let reply = error.into_reply().expect("a tablet error, not a status");
        assert_eq!(
            reply.kind,
            Some(pb::tablet_error::Kind::Busy(pb::Busy {
                retry_after_ms: OVERLOADED_RETRY_MS
            }))
        );
    }
}
