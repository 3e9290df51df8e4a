//! Request counters by kind, kept with relaxed atomics so that counting never contends.

use std::fmt;
use std::ops::Sub;
use std::sync::atomic::{AtomicU64, Ordering};

/// The kind of an object-store request, as counted by [`MetricsSnapshot`] and selected by
/// fault rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// A single-request upload (`put_opts`).
    Put,
    /// A multipart upload: its creation, each part, and its completion or abort.
    PutMultipart,
    /// A read of an object's bytes (`get_opts`, `get_range`, `get_ranges`).
    Get,
    /// A metadata-only read (`head`, or `get_opts` with `head` set).
    Head,
    /// A delete of one object.
    Delete,
    /// A listing (`list`, `list_with_offset`, `list_with_delimiter`).
    List,
    /// A server-side copy (`copy`, `copy_if_not_exists`, and the copy step of a rename).
    Copy,
}

impl OpKind {
    /// Every kind, in display order.
    pub const ALL: [OpKind; 7] = [
        OpKind::Put,
        OpKind::PutMultipart,
        OpKind::Get,
        OpKind::Head,
        OpKind::Delete,
        OpKind::List,
        OpKind::Copy,
    ];

    /// A short lowercase name, as used in logs and [`MetricsSnapshot`]'s display.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Put => "put",
            OpKind::PutMultipart => "put_multipart",
            OpKind::Get => "get",
            OpKind::Head => "head",
            OpKind::Delete => "delete",
            OpKind::List => "list",
            OpKind::Copy => "copy",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const KINDS: usize = OpKind::ALL.len();

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counters of one request kind, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpMetrics {
    /// Calls made by callers; an attempt repeated by a retry is counted in `retries` instead.
    pub requests: u64,
    /// Payload bytes of successful calls: bytes uploaded for puts and parts, bytes of the
    /// returned range for gets.
    pub bytes: u64,
    /// Calls that returned an error to the caller (after any retries).
    pub errors: u64,
    /// Attempts repeated after a transient error.
    pub retries: u64,
}

impl Sub for OpMetrics {
    type Output = OpMetrics;

    /// Saturates at zero, so that diffing snapshots taken in the wrong order cannot panic.
    fn sub(self, rhs: OpMetrics) -> OpMetrics {
        OpMetrics {
            requests: self.requests.saturating_sub(rhs.requests),
            bytes: self.bytes.saturating_sub(rhs.bytes),
            errors: self.errors.saturating_sub(rhs.errors),
            retries: self.retries.saturating_sub(rhs.retries),
        }
    }
}

/// A copy of all counters of a [`LunaObjectStore`](super::LunaObjectStore).
///
/// Counters only grow, so `after - before` gives the activity between two snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    ops: [OpMetrics; KINDS],
}

impl MetricsSnapshot {
    /// The counters of one kind.
    pub fn op(&self, kind: OpKind) -> OpMetrics {
        self.ops[kind.index()]
    }
}

impl Sub for MetricsSnapshot {
    type Output = MetricsSnapshot;

    fn sub(self, rhs: MetricsSnapshot) -> MetricsSnapshot {
        let mut ops = self.ops;
        for (op, before) in ops.iter_mut().zip(rhs.ops) {
            *op = *op - before;
        }
        MetricsSnapshot { ops }
    }
}

impl fmt::Display for MetricsSnapshot {
    /// One line, naming only the kinds that saw any activity.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for kind in OpKind::ALL {
            let m = self.op(kind);
            if m == OpMetrics::default() {
                continue;
            }
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(
                f,
                "{kind}: {} req, {} B, {} retries, {} errors",
                m.requests, m.bytes, m.retries, m.errors
            )?;
        }
        if first {
            f.write_str("no object store requests")?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
}

/// The live counters. Relaxed ordering suffices: each counter is independent and readers only
/// need eventually consistent totals.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    ops: [Counters; KINDS],
}

impl Metrics {
    pub(crate) fn request(&self, kind: OpKind) {
        self.ops[kind.index()]
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn retry(&self, kind: OpKind) {
        self.ops[kind.index()]
            .retries
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn error(&self, kind: OpKind) {
        self.ops[kind.index()]
            .errors
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bytes(&self, kind: OpKind, bytes: u64) {
        self.ops[kind.index()]
            .bytes
            .fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let mut snapshot = MetricsSnapshot::default();
        for (out, c) in snapshot.ops.iter_mut().zip(&self.ops) {
            *out = OpMetrics {
                requests: c.requests.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                retries: c.retries.load(Ordering::Relaxed),
            };
        }
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_diff_per_kind_and_saturate() {
        let metrics = Metrics::default();
        metrics.request(OpKind::Put);
        metrics.bytes(OpKind::Put, 10);
        let before = metrics.snapshot();
        metrics.request(OpKind::Put);
        metrics.bytes(OpKind::Put, 5);
        metrics.request(OpKind::Get);
        metrics.retry(OpKind::Get);
        metrics.error(OpKind::Get);
        let after = metrics.snapshot();

        let diff = after - before;
        assert_eq!(
            diff.op(OpKind::Put),
            OpMetrics {
                requests: 1,
                bytes: 5,
                errors: 0,
                retries: 0
            }
        );
        assert_eq!(
            diff.op(OpKind::Get),
            OpMetrics {
                requests: 1,
                bytes: 0,
                errors: 1,
                retries: 1
            }
        );
        assert_eq!(diff.op(OpKind::List), OpMetrics::default());
        assert_eq!(before - after, MetricsSnapshot::default());
    }

    #[test]
    fn display_is_one_line_naming_active_kinds() {
        let metrics = Metrics::default();
        assert_eq!(metrics.snapshot().to_string(), "no object store requests");
        metrics.request(OpKind::Put);
        metrics.bytes(OpKind::Put, 3);
        metrics.request(OpKind::Delete);
        let line = metrics.snapshot().to_string();
        assert_eq!(
            line,
            "put: 1 req, 3 B, 0 retries, 0 errors; delete: 1 req, 0 B, 0 retries, 0 errors"
        );
    }
}
