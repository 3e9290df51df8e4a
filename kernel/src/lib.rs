//! Luna's kernel: what the engine runs on.
//!
//! Today this is object-storage access ([`objstore`]): one URL-driven way to open a store, and
//! one wrapper that measures, retries and (in tests) injects faults into every request; and
//! the journal [`stream`] abstraction that tablet groups and the master run on.

pub mod error;
pub mod objstore;
pub mod stream;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::KernelError;
