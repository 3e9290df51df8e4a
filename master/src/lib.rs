//! The universe master: catalog, routing, timestamps and placement.
//!
//! Empty until the serving-universe issue lands; see docs/design.md.
