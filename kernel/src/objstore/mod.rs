//! Object-storage access for every Luna component.
//!
//! [`open_object_store`] turns a URL (`file:///path`, `memory://`, `s3://bucket/prefix`) into a
//! [`LunaObjectStore`]. That wrapper is the only layer that retries (the backends' own client
//! retries are turned off), so that metrics count every attempt once and fault injection sees
//! every request.

mod faults;
mod metrics;
mod multipart;
mod open;
mod retry;
mod shared;
mod wrapper;

pub use faults::{FaultAction, FaultInjector, FaultRule};
pub use metrics::{MetricsSnapshot, OpKind, OpMetrics};
pub use open::{ObjectStoreOptions, open_object_store};
pub use retry::RetryPolicy;
pub use wrapper::LunaObjectStore;

#[cfg(test)]
mod conditional_tests;
#[cfg(test)]
mod s3_tests;
#[cfg(test)]
mod wrapper_tests;
