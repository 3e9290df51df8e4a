//! The one error type of the SDK.

use std::time::Duration;

use tonic::{Code, Status};

/// Everything an SDK call can fail with.
///
/// Callers branch on the variant (give up, fix the input, retry later); people read the
/// message, which says what to do. [`ClientError::is_retryable`] groups the variants that
/// may succeed if the whole call is repeated later.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The request is malformed: an empty or oversized key or value, a bad address, a bad
    /// range, or a server that answered INVALID_ARGUMENT. Repeating it will not help.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// What is wrong, and how to fix it.
        message: String,
    },
    /// A database or collection (or another named object) does not exist.
    #[error("not found: {message}")]
    NotFound {
        /// What is missing, from the master.
        message: String,
    },
    /// The database or collection to create exists already.
    #[error("already exists: {message}")]
    AlreadyExists {
        /// What exists, from the master.
        message: String,
    },
    /// No master address answered.
    #[error(
        "cannot reach the master at {}: is `luna start` running? set --master or LUNA_MASTER ({detail})",
        addrs.join(", ")
    )]
    MasterUnreachable {
        /// The addresses tried, as given to [`Client::connect`](crate::Client::connect).
        addrs: Vec<String>,
        /// The last failure.
        detail: String,
    },
    /// The tablet server that should serve the request could not be reached until the
    /// operation deadline: the tablet may be moving or its server down.
    #[error(
        "tablet server {addr} is unavailable ({detail}): the tablet may be moving or its server down; retry later"
    )]
    Unavailable {
        /// The tablet server's address.
        addr: String,
        /// The last failure.
        detail: String,
    },
    /// The operation did not complete before its deadline (`ClientOptions::operation_timeout`)
    /// and nothing was changed by it.
    #[error(
        "{operation} did not complete within {after:?} (last error: {last_error}); retry later or raise ClientOptions::operation_timeout"
    )]
    Timeout {
        /// What was attempted, for example `get` or `GetRouting`.
        operation: &'static str,
        /// The operation deadline.
        after: Duration,
        /// Why the last attempt failed.
        last_error: String,
    },
    /// A write may or may not have been applied: an attempt reached a server but its answer
    /// was lost, and the deadline passed before a retry could tell. Read the keys back to find
    /// out; writing them again is safe for puts and deletes.
    #[error(
        "the outcome of {operation} is unknown: it may or may not have been applied ({detail}); read the keys back before deciding to repeat it"
    )]
    OutcomeUnknown {
        /// What was attempted.
        operation: &'static str,
        /// The last failure.
        detail: String,
    },
    /// A read at `read_ts` asked for versions that garbage collection may already have
    /// dropped. Read at a newer timestamp (for example [`Client::timestamp`](crate::Client::timestamp)).
    #[error(
        "snapshot too old: read timestamp {read_ts} is below the GC safe point {safe_point}; read at a newer timestamp"
    )]
    SnapshotTooOld {
        /// The timestamp read at.
        read_ts: u64,
        /// The oldest timestamp still readable.
        safe_point: u64,
    },
    /// A write batch spanning several tablets was applied on some of them and failed on
    /// others: batches are atomic per tablet only.
    #[error(
        "write batch partially applied: {applied} of {parts} tablet parts were applied; the first failure: {first_error}"
    )]
    BatchPartiallyApplied {
        /// Parts (one per tablet) that were applied.
        applied: usize,
        /// Parts in total.
        parts: usize,
        /// The first failure among the other parts.
        first_error: Box<ClientError>,
    },
    /// A transaction lost a write-write conflict: another transaction committed one of its
    /// keys after it started, or holds a lock on one. Run the transaction again from the
    /// start (with a new snapshot); [`Database::transaction`](crate::Database::transaction)
    /// does.
    #[error("transaction conflict: {message}; run the transaction again")]
    Conflict {
        /// Which key, and with what.
        message: String,
    },
    /// The transaction was rolled back before it could commit: its locks expired and
    /// another client rolled it back, or it was rolled back explicitly. Run it again.
    #[error(
        "transaction {start_ts} was rolled back (its locks expired, or it was rolled back explicitly); run it again"
    )]
    TxnAborted {
        /// The transaction's start timestamp.
        start_ts: u64,
    },
    /// A transaction of one database was given a collection of another.
    #[error(
        "a transaction of database `{transaction}` cannot touch collection `{collection}` of database `{database}`: transactions span the collections of one database"
    )]
    CrossDatabase {
        /// The transaction's database.
        transaction: String,
        /// The other database.
        database: String,
        /// The collection that was given.
        collection: String,
    },
    /// The transaction was already committed or rolled back: start a new one.
    #[error("the transaction is already {state}: begin a new one")]
    TxnFinished {
        /// `committed` or `rolled back`.
        state: &'static str,
    },
    /// A server answered with an error the SDK does not expect (a gRPC status other than
    /// the documented ones).
    #[error("server error {code:?}: {message}")]
    Server {
        /// The gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// A server sent an answer that breaks the protocol (for example fewer lookups than keys).
    /// Report it: client and server versions probably disagree.
    #[error("protocol error: {message}; client and server versions may disagree")]
    Protocol {
        /// What was wrong with the answer.
        message: String,
    },
}

/// Shorthand for results of SDK calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

impl ClientError {
    /// Whether repeating the whole call later may succeed: the servers were unreachable, busy
    /// or too slow, or (for a transaction, repeated from its start) it lost a conflict.
    /// [`ClientError::OutcomeUnknown`] is not included: decide after reading back.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::MasterUnreachable { .. }
                | ClientError::Unavailable { .. }
                | ClientError::Timeout { .. }
                | ClientError::Conflict { .. }
                | ClientError::TxnAborted { .. }
        )
    }

    /// Whether a transaction failed because of another one, so that running it again from
    /// the start may succeed ([`ClientError::Conflict`], [`ClientError::TxnAborted`]).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            ClientError::Conflict { .. } | ClientError::TxnAborted { .. }
        )
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        ClientError::InvalidArgument {
            message: message.into(),
        }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        ClientError::Protocol {
            message: message.into(),
        }
    }

    /// The error for a gRPC status that is an answer, not a transport failure.
    pub(crate) fn from_status(status: &Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            Code::InvalidArgument => ClientError::InvalidArgument { message },
            Code::NotFound => ClientError::NotFound { message },
            Code::AlreadyExists => ClientError::AlreadyExists { message },
            code => ClientError::Server { code, message },
        }
    }
}

/// Whether a status means the request may not have been served and could be sent again:
/// the server or the connection failed, or the call timed out (tonic reports its own
/// timeouts as CANCELLED).
pub(crate) fn is_transport_failure(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown
    )
}

/// Whether a transport failure certainly happened before the request left the client (the
/// connection could not be made), so a write cannot have been applied.
///
/// tonic keeps no typed source for connect failures; it reports them as UNAVAILABLE with the
/// connector's message, so this reads the message. Getting it wrong only makes a timed-out
/// write report [`ClientError::OutcomeUnknown`] instead of [`ClientError::Unavailable`].
pub(crate) fn is_connect_failure(status: &Status) -> bool {
    if status.code() != Code::Unavailable {
        return false;
    }
    let message = status.message().to_ascii_lowercase();
    message.contains("connect error") || message.contains("connection refused")
}

/// One line describing a status, for error messages.
pub(crate) fn describe_status(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_typed_errors() {
        assert!(matches!(
            ClientError::from_status(&Status::invalid_argument("bad")),
            ClientError::InvalidArgument { .. }
        ));
        assert!(matches!(
            ClientError::from_status(&Status::not_found("db")),
            ClientError::NotFound { .. }
        ));
        assert!(matches!(
            ClientError::from_status(&Status::already_exists("db")),
            ClientError::AlreadyExists { .. }
        ));
        assert!(matches!(
            ClientError::from_status(&Status::internal("x")),
            ClientError::Server {
                code: Code::Internal,
                ..
            }
        ));
    }

    #[test]
    fn transport_failures_are_told_apart_from_answers() {
        assert!(is_transport_failure(&Status::unavailable("down")));
        assert!(is_transport_failure(&Status::cancelled("Timeout expired")));
        assert!(!is_transport_failure(&Status::invalid_argument("bad")));
        assert!(is_connect_failure(&Status::unavailable(
            "tcp connect error"
        )));
        assert!(!is_connect_failure(&Status::unavailable("shutting down")));
    }

    #[test]
    fn master_unreachable_says_what_to_do() {
        let error = ClientError::MasterUnreachable {
            addrs: vec!["127.0.0.1:7420".into()],
            detail: "connection refused".into(),
        };
        let text = error.to_string();
        assert!(text.contains("127.0.0.1:7420"), "{text}");
        assert!(text.contains("LUNA_MASTER"), "{text}");
        assert!(error.is_retryable());
    }
}
