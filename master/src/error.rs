//! The master's one error type and its mapping onto gRPC statuses.

use luna_kernel::stream::StreamError;

/// Everything a master operation can fail with.
///
/// The variants are the few kinds a caller can act on (fix the request, create or look up
/// the thing, wait for servers, retry later); the message says what exactly and what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MasterError {
    /// The request is malformed or out of bounds; retrying it unchanged cannot succeed.
    #[error("{message}")]
    InvalidArgument {
        /// What is wrong and how to fix it.
        message: String,
    },

    /// A named database, collection or server does not exist.
    #[error("{message}")]
    NotFound {
        /// What was looked for.
        message: String,
    },

    /// The thing to create exists already.
    #[error("{message}")]
    AlreadyExists {
        /// What exists.
        message: String,
    },

    /// The universe is not in a state that allows the request (e.g. too few live servers,
    /// or a server from another universe).
    #[error("{message}")]
    FailedPrecondition {
        /// What is missing.
        message: String,
    },

    /// The master cannot serve right now (not the leader, stream unavailable); retry later.
    #[error("{message}")]
    Unavailable {
        /// Why.
        message: String,
    },

    /// This replica does not lead the master's stream; the request belongs on the leader.
    #[error("this master replica does not lead (term {term}); {}", match .leader_addr {
        Some(addr) => format!("the leader is at {addr}"),
        None => "no leader is known yet".to_owned(),
    })]
    NotLeader {
        /// The leader's client address, when this replica knows it.
        leader_addr: Option<String>,
        /// The latest term this replica has seen.
        term: u64,
    },

    /// The master's journal stream failed.
    #[error("master journal: {context}: {source}")]
    Stream {
        /// What the master was doing.
        context: &'static str,
        /// The stream's error.
        #[source]
        source: StreamError,
    },

    /// An entry of the master's log cannot be decoded.
    #[error("master log entry {index} is corrupt: {reason}")]
    Corrupt {
        /// The log index.
        index: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// The master was shut down or its apply loop stopped.
    #[error("the master is shut down")]
    Closed,

    /// A broken invariant: a bug, reported rather than panicking.
    #[error("internal error: {message}")]
    Internal {
        /// What went wrong.
        message: String,
    },
}

impl MasterError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            message: message.into(),
        }
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound {
            message: message.into(),
        }
    }

    pub(crate) fn exists(message: impl Into<String>) -> Self {
        Self::AlreadyExists {
            message: message.into(),
        }
    }

    pub(crate) fn precondition(message: impl Into<String>) -> Self {
        Self::FailedPrecondition {
            message: message.into(),
        }
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
        }
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::Internal {
            message: message.into(),
        }
    }

    pub(crate) fn stream(context: &'static str, source: StreamError) -> Self {
        Self::Stream { context, source }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            Self::NotFound { .. } => tonic::Code::NotFound,
            Self::AlreadyExists { .. } => tonic::Code::AlreadyExists,
            Self::FailedPrecondition { .. } => tonic::Code::FailedPrecondition,
            Self::Unavailable { .. } | Self::NotLeader { .. } | Self::Closed => {
                tonic::Code::Unavailable
            }
            // Losing leadership or a quorum is transient; a broken disk or log is not.
            Self::Stream { source, .. } => match source {
                StreamError::NotLeader { .. }
                | StreamError::Closed
                | StreamError::Timeout { .. }
                | StreamError::Overloaded { .. } => tonic::Code::Unavailable,
                _ => tonic::Code::Internal,
            },
            Self::Corrupt { .. } | Self::Internal { .. } => tonic::Code::Internal,
        }
    }
}

impl From<MasterError> for tonic::Status {
    fn from(error: MasterError) -> Self {
        let message = match &error {
            MasterError::Stream {
                source: StreamError::NotLeader { .. },
                ..
            } => format!("{error}; retry on the master leader"),
            MasterError::Closed | MasterError::Unavailable { .. } => {
                format!("{error}; retry later")
            }
            _ => error.to_string(),
        };
        let mut status = tonic::Status::new(error.code(), message);
        if let MasterError::NotLeader {
            leader_addr: Some(addr),
            ..
        } = &error
        {
            luna_proto::leader_hint::attach(&mut status, addr);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_codes_callers_act_on() {
        let status = tonic::Status::from(MasterError::not_found("no database x"));
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "no database x");
        let not_leader = MasterError::stream(
            "appending",
            StreamError::NotLeader {
                leader_hint: None,
                term: 2,
            },
        );
        let status = tonic::Status::from(not_leader);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("retry"));
        let status = tonic::Status::from(MasterError::NotLeader {
            leader_addr: Some("127.0.0.1:7421".into()),
            term: 3,
        });
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            luna_proto::leader_hint::read(&status).as_deref(),
            Some("127.0.0.1:7421")
        );
        assert!(status.message().contains("the leader is at 127.0.0.1:7421"));
        let corrupt = MasterError::Corrupt {
            index: 3,
            reason: "bad".into(),
        };
        assert_eq!(corrupt.code(), tonic::Code::Internal);
    }
}
