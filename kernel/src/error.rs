//! The kernel's one error type.

/// Errors returned by the kernel.
///
/// Errors from the object store itself pass through unchanged as
/// [`object_store::Error`] from [`LunaObjectStore`](crate::objstore::LunaObjectStore)'s
/// trait methods; this enum covers the kernel's own entry points.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// An object-store URL that cannot be opened.
    #[error("invalid object store URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },

    /// An argument outside its allowed range.
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// Which argument.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },

    /// The object store backend rejected its configuration or failed to start.
    #[error("cannot open object store {url:?}: {source}")]
    OpenStore {
        /// The URL being opened.
        url: String,
        /// The backend's error.
        #[source]
        source: object_store::Error,
    },

    /// A local I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the kernel was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
