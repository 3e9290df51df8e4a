//! `journal::raft`: streams replicated with raft-rs, logs kept in raft-engine.
//!
//! A [`Server`] hosts one replica of each of many streams and shares one raft-engine among
//! them. Its driver ticks all of them with one call (coalesced ticks, no per-stream timer)
//! and runs one ready loop whose engine write and fsync cover every proposal of every
//! stream that arrived meanwhile. Raft messages leave the core as `(to, bytes)` pairs and
//! enter it through [`Server::step`] as bytes, so any transport (the in-memory test network,
//! later gRPC) can carry, batch, drop or reorder them.

#[cfg(test)]
mod harness;
mod logger;
mod server;
mod storage;

pub use server::{RaftConfig, Server, SyncRound, sync};
