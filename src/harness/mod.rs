//! Universes of child processes on loopback, for benchmarks and chaos runs.

pub mod procs;
pub mod universe;
pub mod workdir;
