//! Luna's storage engine: per-tablet MemStores in front of a per-collection
//! BaseStore, an LSM of Parquet tables in an object store.
//!
//! See docs/storage.md for the table format, the manifest protocol and
//! compaction.

pub mod base;
pub mod cache;
pub mod error;
pub mod manifest;
pub mod memstore;
mod merge;
pub mod table;
pub mod tablet;
pub mod types;

pub use base::{BaseStore, BaseStoreOptions, CompactionReport, GcReport};
pub use cache::{BlockCache, CacheOptions};
pub use error::{Result, StorageError};
pub use memstore::{MemStore, MemStoreOptions, MemoryBudget};
pub use tablet::{ScanRequest, Tablet};
pub use types::{
    Direction, KeyRange, Kind, Limits, LogSpan, Lookup, Mutation, TabletId, Timestamp,
    VersionedEntry, WriteBatch,
};
