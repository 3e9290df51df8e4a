//! Luna's protobuf messages and gRPC services, generated at build time from `proto/` by
//! protox, prost and tonic (no system protoc needed).

/// The BaseStore manifest format (see docs/storage.md).
pub mod manifest {
    #![allow(missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/luna.manifest.v1.rs"));
}

/// The raft transport between journal servers (see docs/journal.md).
pub mod journal {
    #![allow(missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/luna.journal.v1.rs"));
}
