//! `journal::raft`: streams replicated with raft-rs, logs kept in raft-engine.
//!
//! A [`Server`] hosts one replica of each of many streams; one driver ticks all of them
//! (coalesced: one tick call per server, no per-stream timer) and runs one ready loop whose
//! raft-engine write and fsync cover every proposal of every stream that arrived meanwhile.
//! Peers exchange raft messages as bytes through a [`Transport`].

mod logger;
mod server;
mod storage;
#[cfg(test)]
mod harness;

pub use server::{RaftConfig, Server, SyncRound, sync};

/// Carries raft messages between servers. Implementations batch per destination server and
/// may drop, delay or reorder: raft tolerates all of that. A message arrives as bytes and is
/// handed to the destination's [`Server::step`] with the sender's id.
pub trait Transport: Send + Sync {
    /// Sends `(to, envelope)` pairs from this server.
    fn send(&self, messages: Vec<(u64, bytes::Bytes)>);
}
