//! Universes of child processes on loopback, for benchmarks and chaos runs.

mod ports;
pub mod procs;
pub mod universe;
pub mod workdir;
