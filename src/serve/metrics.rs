//! Process-wide metrics that no single server owns: the object store's requests.

use std::fmt::Write;

use luna_kernel::objstore::{LunaObjectStore, OpKind};

/// The object store's request counters in the Prometheus text format.
pub fn object_store_text(store: &LunaObjectStore) -> String {
    let metrics = store.metrics();
    let mut out = String::new();
    let families = [
        (
            "luna_object_store_requests_total",
            "Object-store calls by kind",
        ),
        (
            "luna_object_store_bytes_total",
            "Payload bytes of successful object-store calls",
        ),
        (
            "luna_object_store_errors_total",
            "Object-store calls that failed after retries",
        ),
        (
            "luna_object_store_retries_total",
            "Object-store attempts repeated after transient errors",
        ),
    ];
    for (index, (name, help)) in families.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for kind in OpKind::ALL {
            let op = metrics.op(kind);
            let value = [op.requests, op.bytes, op.errors, op.retries][index];
            let _ = writeln!(out, "{name}{{kind=\"{}\"}} {value}", kind.name());
        }
    }
    out
}
