//! The Rust client SDK.
//!
//! Empty until the serving-universe issue lands; see docs/design.md.
