//! `journal::raft`: streams replicated with raft-rs, logs kept in raft-engine.
//!
//! A [`Node`] is one journal server: it hosts one replica of each of many streams, shares
//! one raft-engine among them, and drives them from one thread. Its driver ticks all
//! streams with one call (coalesced ticks, no per-stream timer) and runs one ready loop
//! whose engine write and fsync cover every proposal of every stream that arrived
//! meanwhile. Each hosted stream is a [`RaftStream`], the kernel's `Stream`.
//!
//! Raft messages leave a node through a [`Transport`] as bytes, batched per destination
//! server, and enter it through its [`Inbox`]. [`MemNetwork`] connects nodes in one process
//! for tests; [`grpc`] connects them over the network. [`Server`] is the synchronous core
//! under the driver, which the deterministic test harness drives step by step.
//!
//! A [`RaftStream`] also changes its stream's [`Membership`] (learners first, then
//! promotion, by joint consensus), transfers leadership, and serves lease reads.
//!
//! [`Stream::truncate`](luna_kernel::stream::Stream::truncate) stores the application's
//! snapshot with raft's metadata and compacts the log; a replica that lags behind the
//! compacted prefix, or joins after it, catches up from that snapshot.

mod admin;
mod cache;
mod driver;
#[cfg(test)]
mod driver_tests;
pub mod grpc;
#[cfg(test)]
mod harness;
mod inbound;
mod lease;
mod logger;
mod membership;
mod overload;
mod partition;
mod recent;
mod replica;
mod round;
mod server;
mod snapshot;
mod storage;
mod stream;
mod transport;

pub use driver::{Node, NodeStats};
pub use membership::Membership;
pub use partition::Partition;
pub use round::{SyncRound, sync};
pub use server::{RaftConfig, Server};
pub use stream::RaftStream;
pub use transport::{Inbox, MemNetwork, MemTransport, Transport};
