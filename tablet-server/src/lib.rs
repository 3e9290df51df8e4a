//! Tablet server: tablet groups, the apply loop and the data RPCs.
//!
//! Empty until the serving-universe issue lands; see docs/design.md.
