//! Luna's protobuf messages, generated at build time from `proto/` by protox
//! and prost (no system protoc needed).

/// The BaseStore manifest format (see docs/storage.md).
pub mod manifest {
    #![allow(missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/luna.manifest.v1.rs"));
}
