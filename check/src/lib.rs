//! A snapshot-isolation checker for list-append transaction histories.
//!
//! The workload (as in Jepsen's Elle) has each transaction append unique integers to some keys
//! and read the whole list stored at others. Because every element is unique and lists only
//! grow, a read reveals the exact version it observed and the order of every version before
//! it. From the reads this crate infers each key's version order, derives the write-write,
//! write-read and read-write dependencies between committed transactions, and reports every
//! anomaly that Adya's PL-SI forbids: aborted and intermediate reads, non-linear version
//! orders, elements nobody wrote, and dependency cycles with no two adjacent anti-dependencies.
//! Write skew, which snapshot isolation allows, passes.
//!
//! ```
//! use luna_check::{Op, Outcome, Txn, check_snapshot_isolation};
//!
//! let history = [
//!     Txn { id: 1, outcome: Outcome::Committed, ops: vec![Op::Append { key: 7, element: 1 }] },
//!     Txn { id: 2, outcome: Outcome::Committed, ops: vec![Op::Read { key: 7, list: vec![1] }] },
//! ];
//! let summary = check_snapshot_isolation(&history).expect("a serial history is valid");
//! assert_eq!(summary.committed, 2);
//! ```

mod graph;
mod history;
mod report;

pub use report::{Anomaly, CycleKind, EdgeCounts, EdgeKind, Expected, Step, Summary, Violations};

/// A key of the list-append workload.
pub type Key = u64;

/// A value appended to a key's list; unique per key across the whole history.
pub type Element = u64;

/// What the client learned about a transaction's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The database acknowledged the commit.
    Committed,
    /// The database reported an abort; none of its effects may be visible.
    Aborted,
    /// The client lost the answer (timeout, crash): it may or may not have committed.
    Unknown,
}

/// One operation of a transaction, as the client observed it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// Append `element` to the end of `key`'s list.
    Append {
        /// The key appended to.
        key: Key,
        /// The element appended.
        element: Element,
    },
    /// Read the whole list at `key`.
    Read {
        /// The key read.
        key: Key,
        /// The list the database returned, oldest element first.
        list: Vec<Element>,
    },
}

/// One transaction of a history.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Txn {
    /// The client-assigned identifier; unique within a history.
    pub id: u64,
    /// What the client learned about the commit.
    pub outcome: Outcome,
    /// The operations in the order the transaction issued them.
    pub ops: Vec<Op>,
}

/// Why a history cannot be checked at all: the workload broke one of its own promises, so the
/// fault is in the test harness, not in the database under test.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedHistory {
    /// Two transactions carry the same id, so reports could not say which one is meant.
    #[error("transaction id {id} is used by more than one transaction")]
    DuplicateTxnId {
        /// The repeated id.
        id: u64,
    },
    /// The same element was appended to a key twice, so a read could not tell which append it
    /// observed.
    #[error("element {element} is appended to key {key} by both T{first} and T{second}")]
    DuplicateAppend {
        /// The key appended to.
        key: Key,
        /// The repeated element.
        element: Element,
        /// The transaction of the first append.
        first: u64,
        /// The transaction of the repeated append (may equal `first`).
        second: u64,
    },
}

/// Why [`check_snapshot_isolation`] did not accept a history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The history breaks the workload's own rules and cannot be judged.
    #[error("malformed history: {0}")]
    Malformed(#[from] MalformedHistory),
    /// The history is well formed and shows anomalies that snapshot isolation forbids.
    #[error(transparent)]
    Violations(#[from] Violations),
}

/// Checks a list-append history against snapshot isolation (Adya's PL-SI).
///
/// Returns what was checked when no anomaly is found. Reads of aborted and unknown
/// transactions are ignored; an unknown transaction's appends count as committed only if some
/// committed read observed one of them. Appends no committed read observed have no known
/// position and create no dependencies.
pub fn check_snapshot_isolation(history: &[Txn]) -> Result<Summary, CheckError> {
    let analysis = history::analyze(history)?;
    let graph = graph::DependencyGraph::build(history, &analysis);
    let mut anomalies = analysis.anomalies;
    anomalies.extend(graph.cycles());
    let summary = Summary {
        transactions: history.len(),
        committed: analysis.committed.iter().filter(|c| **c).count(),
        keys: analysis.keys,
        edges: graph.edge_counts(),
    };
    if anomalies.is_empty() {
        Ok(summary)
    } else {
        Err(Violations { summary, anomalies }.into())
    }
}
