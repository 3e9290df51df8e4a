//! Luna's protobuf messages and gRPC services, generated at build time from `proto/` by
//! protox, prost and tonic (no system protoc needed), plus the key encoding that clients and
//! servers must agree on ([`keys`]).

pub mod keys;
pub mod leader_hint;
pub mod multiplex;
pub mod request_ids;

/// Generated code, nested like the proto packages so cross-package references resolve.
mod generated {
    #![allow(missing_docs)]
    pub mod luna {
        pub mod manifest {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/luna.manifest.v1.rs"));
            }
        }
        pub mod journal {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/luna.journal.v1.rs"));
            }
        }
        pub mod master {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/luna.master.v1.rs"));
            }
        }
        pub mod masterlog {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/luna.masterlog.v1.rs"));
            }
        }
        pub mod tablet {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/luna.tablet.v1.rs"));
            }
        }
        pub mod group {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/luna.group.v1.rs"));
            }
        }
    }
}

/// The BaseStore manifest format (see docs/storage.md).
pub use generated::luna::manifest::v1 as manifest;

/// The raft transport between journal servers (see docs/journal.md).
pub use generated::luna::journal::v1 as journal;

/// The master service: catalog, routing, timestamps, heartbeats.
pub use generated::luna::master::v1 as master;

/// The master's replicated state machine (commands and snapshot).
pub use generated::luna::masterlog::v1 as masterlog;

/// The tablet service: reads and writes.
pub use generated::luna::tablet::v1 as tablet;

/// A tablet group's replicated log entries and snapshot.
pub use generated::luna::group::v1 as group;
