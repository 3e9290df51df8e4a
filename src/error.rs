//! The CLI's error type: every failure ends as one clear line on stderr.

use thiserror::Error;

/// What can stop a `luna` command.
#[derive(Debug, Error)]
pub enum CliError {
    /// A flag or argument is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The object store could not be opened.
    #[error(transparent)]
    Kernel(#[from] luna_kernel::KernelError),
    /// The storage engine failed.
    #[error(transparent)]
    Storage(#[from] luna_storage::StorageError),
    /// A journal server failed to start or serve.
    #[error("{what}: {source}")]
    Journal {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: luna_journal::JournalError,
    },
    /// A journal stream refused or failed an operation.
    #[error("{what}: {source}")]
    Stream {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: luna_kernel::stream::StreamError,
    },
    /// A listen address is taken or not allowed.
    #[error(
        "cannot listen on {addr}: {source} (is another luna already running? pick other ports)"
    )]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The universe refused or failed a request.
    #[error(transparent)]
    Client(#[from] luna_client::ClientError),
    /// What was asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The master failed to start or serve.
    #[error(transparent)]
    Master(#[from] luna_master::MasterError),
    /// A tablet server failed to start or serve.
    #[error(transparent)]
    TabletServer(#[from] luna_tablet_server::TabletServerError),
    /// Local I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
