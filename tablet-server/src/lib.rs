//! The tablet server: hosts replicas of tablet groups and serves their tablets.
//!
//! A group is one journal stream (raft, replicated on the group's servers) plus the
//! tablets whose writes it carries, each with a MemStore over its collection's shared
//! BaseStore. Every replica applies the group's committed entries in order; the leader
//! batches writes into entries with commit timestamps consistent with the master's TSO,
//! serves linearizable reads under its lease, and alone flushes tablets to the BaseStores.
//! Followers serve ReadIndex and stale reads. The master assigns groups and tablets through
//! heartbeat responses. See docs/tablet-server.md and docs/operations.md.

mod config;
mod error;
mod group;
mod hosting;
mod master_link;
mod metrics;
mod server;
mod service;
mod stores;

pub use config::TabletServerConfig;
pub use error::{Result, TabletServerError};
pub use server::TabletServer;
