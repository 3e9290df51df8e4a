//! What a check found, in a form both code and people can read.

use std::fmt;

use crate::{Element, Key};

/// How much of a history a check covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Transactions in the history, whatever their outcome.
    pub transactions: usize,
    /// Transactions taken as committed: acknowledged ones, plus unknown ones whose appends a
    /// committed read observed.
    pub committed: usize,
    /// Distinct keys the history touches.
    pub keys: usize,
    /// Dependency edges inferred between committed transactions.
    pub edges: EdgeCounts,
}

/// Number of distinct dependency edges of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EdgeCounts {
    /// Write-write dependencies.
    pub ww: usize,
    /// Write-read dependencies.
    pub wr: usize,
    /// Read-write anti-dependencies.
    pub rw: usize,
}

impl EdgeCounts {
    /// All edges, whatever their kind.
    pub fn total(&self) -> usize {
        self.ww + self.wr + self.rw
    }
}

/// The kind of a dependency between two committed transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EdgeKind {
    /// The target appended the element right after one the source appended.
    Ww,
    /// The target read a version whose last element the source appended.
    Wr,
    /// The source read a version the target's append then replaced (an anti-dependency).
    Rw,
}

/// One hop of a dependency cycle: `txn` depends forward on the next step's transaction (the
/// last step on the first) through an `edge` of `key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Step {
    /// The transaction this hop leaves from.
    pub txn: u64,
    /// The kind of dependency to the next transaction.
    pub edge: EdgeKind,
    /// The key that creates the dependency.
    pub key: Key,
}

/// Adya's name for a forbidden dependency cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CycleKind {
    /// Write cycle: only ww edges.
    G0,
    /// Circular information flow: ww and wr edges, at least one wr.
    G1c,
    /// Exactly one rw edge (read skew, lost update).
    GSingle,
    /// Several rw edges, no two of them adjacent.
    GNonadjacent,
}

/// What a read of a transaction that had already touched the key should have returned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expected {
    /// The transaction read the key before, so the list is its earlier read plus its own
    /// appends since.
    Exactly {
        /// The predicted list.
        list: Vec<Element>,
    },
    /// The transaction only appended so far: the list must end with those appends and hold
    /// no other element the transaction appends.
    EndsWith {
        /// The transaction's own appends to the key so far.
        own_appends: Vec<Element>,
    },
}

/// One anomaly snapshot isolation forbids.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Anomaly {
    /// Two committed reads of a key where neither list is a prefix of the other: the key has
    /// no single version order.
    IncompatibleOrder {
        /// The key read.
        key: Key,
        /// The transaction of the first read.
        reader_a: u64,
        /// The first read's list.
        list_a: Vec<Element>,
        /// The transaction of the second read.
        reader_b: u64,
        /// The second read's list.
        list_b: Vec<Element>,
    },
    /// G1a: a committed read observed an element of an aborted transaction.
    AbortedRead {
        /// The key read.
        key: Key,
        /// The aborted element.
        element: Element,
        /// The aborted transaction that appended it.
        writer: u64,
        /// The committed transaction that read it.
        reader: u64,
    },
    /// G1b: a committed read's version ends in the middle of another transaction's appends.
    IntermediateRead {
        /// The key read.
        key: Key,
        /// The last element of the observed version.
        element: Element,
        /// The transaction that appended it.
        writer: u64,
        /// The last element `writer` appended to the key.
        writer_last: Element,
        /// The committed transaction that read it.
        reader: u64,
    },
    /// A committed read shows an element no transaction appended to that key.
    Phantom {
        /// The key read.
        key: Key,
        /// The element nobody appended.
        element: Element,
        /// The committed transaction that read it.
        reader: u64,
    },
    /// A committed read shows the same element twice, though each is appended once.
    DuplicateElement {
        /// The key read.
        key: Key,
        /// The repeated element.
        element: Element,
        /// The committed transaction that read it.
        reader: u64,
    },
    /// A transaction's read disagrees with its own earlier reads and appends of the key.
    Internal {
        /// The committed transaction.
        txn: u64,
        /// The key read.
        key: Key,
        /// What the read returned.
        observed: Vec<Element>,
        /// What the transaction's own operations imply it should have returned.
        expected: Expected,
    },
    /// A dependency cycle snapshot isolation forbids.
    Cycle {
        /// Adya's name for the cycle.
        kind: CycleKind,
        /// The cycle, one hop per step; the last step leads back to the first.
        steps: Vec<Step>,
    },
}

/// Every anomaly a check found, with what was checked; `Display` prints a report for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Violations {
    /// How much of the history was checked.
    pub summary: Summary,
    /// The anomalies, history-level ones first, then cycles.
    pub anomalies: Vec<Anomaly>,
}

/// A report of thousands of anomalies helps nobody read it; the full list stays in the value.
const MAX_REPORTED: usize = 50;

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "snapshot isolation violated: {} anomal{} ({})",
            self.anomalies.len(),
            if self.anomalies.len() == 1 {
                "y"
            } else {
                "ies"
            },
            self.summary
        )?;
        for (i, anomaly) in self.anomalies.iter().take(MAX_REPORTED).enumerate() {
            writeln!(f, "  {}. {anomaly}", i + 1)?;
        }
        if self.anomalies.len() > MAX_REPORTED {
            writeln!(f, "  ... and {} more", self.anomalies.len() - MAX_REPORTED)?;
        }
        Ok(())
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} transactions, {} committed, {} keys, {} edges: {} ww, {} wr, {} rw",
            self.transactions,
            self.committed,
            self.keys,
            self.edges.total(),
            self.edges.ww,
            self.edges.wr,
            self.edges.rw
        )
    }
}

impl fmt::Display for EdgeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EdgeKind::Ww => "ww",
            EdgeKind::Wr => "wr",
            EdgeKind::Rw => "rw",
        })
    }
}

impl fmt::Display for CycleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CycleKind::G0 => "G0 (write cycle)",
            CycleKind::G1c => "G1c (circular information flow)",
            CycleKind::GSingle => "G-single (one anti-dependency)",
            CycleKind::GNonadjacent => "G-nonadjacent (no two adjacent anti-dependencies)",
        })
    }
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anomaly::IncompatibleOrder {
                key,
                reader_a,
                list_a,
                reader_b,
                list_b,
            } => {
                let at = list_a
                    .iter()
                    .zip(list_b)
                    .take_while(|(a, b)| a == b)
                    .count();
                write!(
                    f,
                    "incompatible order of key {key}: T{reader_a} read {} and T{reader_b} read \
                     {}, which differ at index {at}",
                    ListView(list_a),
                    ListView(list_b)
                )
            }
            Anomaly::AbortedRead {
                key,
                element,
                writer,
                reader,
            } => write!(
                f,
                "G1a (aborted read): T{reader} read element {element} of key {key}, appended \
                 by aborted T{writer}"
            ),
            Anomaly::IntermediateRead {
                key,
                element,
                writer,
                writer_last,
                reader,
            } => write!(
                f,
                "G1b (intermediate read): T{reader} read key {key} ending at element {element} \
                 of T{writer}, whose last append to it was {writer_last}"
            ),
            Anomaly::Phantom {
                key,
                element,
                reader,
            } => write!(
                f,
                "phantom element: T{reader} read element {element} of key {key}, which no \
                 transaction appended"
            ),
            Anomaly::DuplicateElement {
                key,
                element,
                reader,
            } => write!(
                f,
                "duplicate element: T{reader} read element {element} of key {key} more than once"
            ),
            Anomaly::Internal {
                txn,
                key,
                observed,
                expected,
            } => {
                write!(
                    f,
                    "internal: T{txn} read key {key} as {} but expected ",
                    ListView(observed)
                )?;
                match expected {
                    Expected::Exactly { list } => {
                        write!(
                            f,
                            "{} from its own earlier read and appends",
                            ListView(list)
                        )
                    }
                    Expected::EndsWith { own_appends } => write!(
                        f,
                        "a list ending with its own appends {} and holding no other of them",
                        ListView(own_appends)
                    ),
                }
            }
            Anomaly::Cycle { kind, steps } => {
                write!(f, "{kind}: ")?;
                for step in steps {
                    write!(f, "T{} -{}({})-> ", step.txn, step.edge, step.key)?;
                }
                match steps.first() {
                    Some(first) => write!(f, "T{}", first.txn),
                    None => f.write_str("(empty)"),
                }
            }
        }
    }
}

/// Prints a list, eliding the middle of long ones: versions can hold thousands of elements.
struct ListView<'a>(&'a [Element]);

impl fmt::Display for ListView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const EDGE: usize = 4;
        let list = self.0;
        let join = |f: &mut fmt::Formatter<'_>, part: &[Element]| -> fmt::Result {
            for (i, e) in part.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{e}")?;
            }
            Ok(())
        };
        f.write_str("[")?;
        if list.len() <= 2 * EDGE + 1 {
            join(f, list)?;
        } else {
            join(f, &list[..EDGE])?;
            write!(f, ", ..{} more.., ", list.len() - 2 * EDGE)?;
            join(f, &list[list.len() - EDGE..])?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lists_are_elided_in_the_middle() {
        let list: Vec<Element> = (0..20).collect();
        assert_eq!(
            ListView(&list).to_string(),
            "[0, 1, 2, 3, ..12 more.., 16, 17, 18, 19]"
        );
        assert_eq!(ListView(&[1, 2]).to_string(), "[1, 2]");
    }

    #[test]
    fn cycles_print_every_hop_and_close_the_loop() {
        let anomaly = Anomaly::Cycle {
            kind: CycleKind::GSingle,
            steps: vec![
                Step {
                    txn: 1,
                    edge: EdgeKind::Ww,
                    key: 9,
                },
                Step {
                    txn: 2,
                    edge: EdgeKind::Rw,
                    key: 9,
                },
            ],
        };
        assert_eq!(
            anomaly.to_string(),
            "G-single (one anti-dependency): T1 -ww(9)-> T2 -rw(9)-> T1"
        );
    }
}
