//! Validation of a history and everything read-level: which transactions committed, what each
//! committed read observed, and each key's version order.

use std::collections::{HashMap, HashSet};

use crate::report::{Anomaly, Expected};
use crate::{Element, Key, MalformedHistory, Op, Outcome, Txn};

/// A read of a committed transaction, kept for dependency inference.
pub(crate) struct ObservedRead<'h> {
    /// Index of the reading transaction in the history.
    pub txn: usize,
    pub key: Key,
    pub list: &'h [Element],
    /// Length of the part other transactions wrote: the list without the reader's own trailing
    /// appends. Its end is the committed version the reader's snapshot held.
    pub external: usize,
}

/// What the read-level pass learned, for the graph pass.
pub(crate) struct Analysis<'h> {
    /// Per transaction index: taken as committed.
    pub committed: Vec<bool>,
    /// Which transaction (by index) appended each element.
    pub writers: HashMap<(Key, Element), usize>,
    pub reads: Vec<ObservedRead<'h>>,
    /// Each read key's version order: its longest committed read.
    pub orders: HashMap<Key, &'h [Element]>,
    pub keys: usize,
    pub anomalies: Vec<Anomaly>,
}

/// Validates `history` and runs every check that needs no dependency graph.
pub(crate) fn analyze(history: &[Txn]) -> Result<Analysis<'_>, MalformedHistory> {
    let mut ids = HashSet::with_capacity(history.len());
    for txn in history {
        if !ids.insert(txn.id) {
            return Err(MalformedHistory::DuplicateTxnId { id: txn.id });
        }
    }
    let (writers, last_appends) = index_appends(history)?;
    let committed = committed_set(history, &writers);
    let keys = history
        .iter()
        .flat_map(|t| &t.ops)
        .map(|op| match op {
            Op::Append { key, .. } | Op::Read { key, .. } => *key,
        })
        .collect::<HashSet<_>>()
        .len();

    let mut anomalies = Vec::new();
    let mut reads = Vec::new();
    for (index, txn) in history.iter().enumerate() {
        if txn.outcome != Outcome::Committed {
            continue;
        }
        check_internal(index, txn, &writers, &mut anomalies);
        for op in &txn.ops {
            let Op::Read { key, list } = op else { continue };
            let read = observe(index, *key, list, &writers);
            check_elements(history, &read, &writers, &last_appends, &mut anomalies);
            reads.push(read);
        }
    }
    let orders = version_orders(history, &reads, &mut anomalies);
    Ok(Analysis {
        committed,
        writers,
        reads,
        orders,
        keys,
        anomalies,
    })
}

type Writers = HashMap<(Key, Element), usize>;
type LastAppends = HashMap<(usize, Key), Element>;

/// Maps each element to its writer, and each (writer, key) to the last element it appended,
/// which is the only one a complete version of that writer may end with.
fn index_appends(history: &[Txn]) -> Result<(Writers, LastAppends), MalformedHistory> {
    let mut writers = Writers::new();
    let mut last = LastAppends::new();
    for (index, txn) in history.iter().enumerate() {
        for op in &txn.ops {
            let Op::Append { key, element } = *op else {
                continue;
            };
            if let Some(&first) = writers.get(&(key, element)) {
                let first = history.get(first).map_or(txn.id, |t| t.id);
                return Err(MalformedHistory::DuplicateAppend {
                    key,
                    element,
                    first,
                    second: txn.id,
                });
            }
            writers.insert((key, element), index);
            last.insert((index, key), element);
        }
    }
    Ok((writers, last))
}

/// Acknowledged transactions, plus unknown ones whose effects a committed read proves.
fn committed_set(history: &[Txn], writers: &Writers) -> Vec<bool> {
    let mut committed: Vec<bool> = history
        .iter()
        .map(|t| t.outcome == Outcome::Committed)
        .collect();
    for txn in history.iter().filter(|t| t.outcome == Outcome::Committed) {
        for op in &txn.ops {
            let Op::Read { key, list } = op else { continue };
            for element in list {
                let Some(&writer) = writers.get(&(*key, *element)) else {
                    continue;
                };
                let unknown = history
                    .get(writer)
                    .is_some_and(|w| w.outcome == Outcome::Unknown);
                if unknown && let Some(flag) = committed.get_mut(writer) {
                    *flag = true;
                }
            }
        }
    }
    committed
}

fn observe<'h>(txn: usize, key: Key, list: &'h [Element], writers: &Writers) -> ObservedRead<'h> {
    let own = list
        .iter()
        .rev()
        .take_while(|e| writers.get(&(key, **e)) == Some(&txn))
        .count();
    ObservedRead {
        txn,
        key,
        list,
        external: list.len() - own,
    }
}

/// A transaction sees its own appends on top of one snapshot, so each read is predictable
/// from the transaction's earlier operations on the key.
fn check_internal(index: usize, txn: &Txn, writers: &Writers, anomalies: &mut Vec<Anomaly>) {
    #[derive(Default)]
    struct KeyState {
        /// The full list, once a read has revealed the snapshot.
        known: Option<Vec<Element>>,
        own: Vec<Element>,
    }
    let mut states: HashMap<Key, KeyState> = HashMap::new();
    for op in &txn.ops {
        match op {
            Op::Append { key, element } => {
                let state = states.entry(*key).or_default();
                state.own.push(*element);
                if let Some(known) = &mut state.known {
                    known.push(*element);
                }
            }
            Op::Read { key, list } => {
                let state = states.entry(*key).or_default();
                let expected = match &state.known {
                    Some(known) if known != list => Some(Expected::Exactly {
                        list: known.clone(),
                    }),
                    Some(_) => None,
                    None if !ends_with_only_own(index, *key, list, &state.own, writers) => {
                        Some(Expected::EndsWith {
                            own_appends: state.own.clone(),
                        })
                    }
                    None => None,
                };
                if let Some(expected) = expected {
                    anomalies.push(Anomaly::Internal {
                        txn: txn.id,
                        key: *key,
                        observed: list.clone(),
                        expected,
                    });
                }
                state.known = Some(list.clone());
            }
        }
    }
}

fn ends_with_only_own(
    index: usize,
    key: Key,
    list: &[Element],
    own: &[Element],
    writers: &Writers,
) -> bool {
    let Some(split) = list.len().checked_sub(own.len()) else {
        return false;
    };
    let (before, tail) = list.split_at(split);
    tail == own
        && !before
            .iter()
            .any(|e| writers.get(&(key, *e)) == Some(&index))
}

/// Element-level checks of one committed read: G1a, G1b, phantoms and duplicates.
fn check_elements(
    history: &[Txn],
    read: &ObservedRead<'_>,
    writers: &Writers,
    last_appends: &LastAppends,
    anomalies: &mut Vec<Anomaly>,
) {
    let key = read.key;
    let reader = history.get(read.txn).map_or(0, |t| t.id);
    let mut seen = HashSet::with_capacity(read.list.len());
    let mut duplicates = HashSet::new();
    for &element in read.list {
        if !seen.insert(element) && duplicates.insert(element) {
            anomalies.push(Anomaly::DuplicateElement {
                key,
                element,
                reader,
            });
        }
        let writer = writers.get(&(key, element)).and_then(|w| history.get(*w));
        match writer {
            None => anomalies.push(Anomaly::Phantom {
                key,
                element,
                reader,
            }),
            Some(w) if w.outcome == Outcome::Aborted => {
                anomalies.push(Anomaly::AbortedRead {
                    key,
                    element,
                    writer: w.id,
                    reader,
                });
            }
            Some(_) => {}
        }
    }
    let Some(&element) = read.external.checked_sub(1).and_then(|i| read.list.get(i)) else {
        return;
    };
    let Some(&writer) = writers.get(&(key, element)) else {
        return;
    };
    let Some(w) = history.get(writer) else { return };
    // An aborted writer is already G1a; calling its partial state intermediate adds nothing.
    if w.outcome == Outcome::Aborted {
        return;
    }
    if let Some(&writer_last) = last_appends.get(&(writer, key))
        && writer_last != element
    {
        anomalies.push(Anomaly::IntermediateRead {
            key,
            element,
            writer: w.id,
            writer_last,
            reader,
        });
    }
}

/// Takes each key's longest committed read as its version order. Lists only grow, so every
/// other read must be a prefix of it; one that is not proves the order is not linear.
fn version_orders<'h>(
    history: &[Txn],
    reads: &[ObservedRead<'h>],
    anomalies: &mut Vec<Anomaly>,
) -> HashMap<Key, &'h [Element]> {
    let mut longest: HashMap<Key, &ObservedRead<'h>> = HashMap::new();
    for read in reads {
        let entry = longest.entry(read.key).or_insert(read);
        if read.list.len() > entry.list.len() {
            *entry = read;
        }
    }
    let mut reported = HashSet::new();
    for read in reads {
        let Some(order) = longest.get(&read.key) else {
            continue;
        };
        if order.list.starts_with(read.list) || !reported.insert(read.key) {
            continue;
        }
        let id = |index: usize| history.get(index).map_or(0, |t| t.id);
        anomalies.push(Anomaly::IncompatibleOrder {
            key: read.key,
            reader_a: id(order.txn),
            list_a: order.list.to_vec(),
            reader_b: id(read.txn),
            list_b: read.list.to_vec(),
        });
    }
    longest
        .into_iter()
        .map(|(key, read)| (key, read.list))
        .collect()
}
