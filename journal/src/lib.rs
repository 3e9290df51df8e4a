//! Journal streams (raft-rs replicated streams and a single-replica local stream).
//!
//! Empty until the journal issue lands; see docs/design.md for what will live here.
