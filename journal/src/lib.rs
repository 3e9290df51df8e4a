//! Luna's journal: implementations of the kernel's [`Stream`](luna_kernel::stream::Stream).
//!
//! - [`local`]: one replica on a local directory, for development and tests.
//! - [`raft`]: N replicas on raft-rs, logs in raft-engine.
//!
//! docs/journal.md describes the design.

pub mod error;
mod feed;
pub mod local;
pub mod raft;

pub use error::JournalError;
pub use local::{LocalConfig, LocalStream};
