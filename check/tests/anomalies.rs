//! Small handcrafted histories, one per anomaly the checker must flag or allow.

use luna_check::{
    Anomaly, CheckError, CycleKind, EdgeKind, Element, Expected, Key, MalformedHistory, Op,
    Outcome, Step, Summary, Txn, check_snapshot_isolation,
};

const X: Key = 0;
const Y: Key = 1;

fn txn(id: u64, outcome: Outcome, ops: Vec<Op>) -> Txn {
    Txn { id, outcome, ops }
}

fn ok(id: u64, ops: Vec<Op>) -> Txn {
    txn(id, Outcome::Committed, ops)
}

fn append(key: Key, element: Element) -> Op {
    Op::Append { key, element }
}

fn read(key: Key, list: &[Element]) -> Op {
    Op::Read {
        key,
        list: list.to_vec(),
    }
}

fn passes(history: &[Txn]) -> Summary {
    match check_snapshot_isolation(history) {
        Ok(summary) => summary,
        Err(error) => panic!("expected a valid history, got: {error}"),
    }
}

fn anomalies(history: &[Txn]) -> Vec<Anomaly> {
    match check_snapshot_isolation(history) {
        Err(CheckError::Violations(violations)) => violations.anomalies,
        Err(error) => panic!("expected violations, got: {error}"),
        Ok(summary) => panic!("expected violations, history passed: {summary}"),
    }
}

/// The single anomaly a history must produce.
fn only_anomaly(history: &[Txn]) -> Anomaly {
    let found = anomalies(history);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one anomaly, got {found:#?}"
    );
    found.into_iter().next().unwrap_or_else(|| unreachable!())
}

/// A cycle's steps rotated to start at its smallest transaction, so tests need not depend on
/// where the search happened to enter it.
fn canonical(steps: &[Step]) -> Vec<(u64, EdgeKind, Key)> {
    let start = (0..steps.len()).min_by_key(|&i| steps[i].txn).unwrap_or(0);
    steps
        .iter()
        .cycle()
        .skip(start)
        .take(steps.len())
        .map(|s| (s.txn, s.edge, s.key))
        .collect()
}

fn only_cycle(history: &[Txn]) -> (CycleKind, Vec<(u64, EdgeKind, Key)>) {
    match only_anomaly(history) {
        Anomaly::Cycle { kind, steps } => (kind, canonical(&steps)),
        other => panic!("expected a cycle, got {other:?}"),
    }
}

#[test]
fn lost_update_is_g_single() {
    // Both read x = [] and appended; the later read shows both appends landed.
    let history = [
        ok(1, vec![read(X, &[]), append(X, 1)]),
        ok(2, vec![read(X, &[]), append(X, 2)]),
        ok(3, vec![read(X, &[1, 2])]),
    ];
    let (kind, steps) = only_cycle(&history);
    assert_eq!(kind, CycleKind::GSingle);
    assert_eq!(steps, vec![(1, EdgeKind::Ww, X), (2, EdgeKind::Rw, X)]);
}

#[test]
fn lost_update_report_names_the_transactions() {
    let history = [
        ok(1, vec![read(X, &[]), append(X, 1)]),
        ok(2, vec![read(X, &[]), append(X, 2)]),
        ok(3, vec![read(X, &[1, 2])]),
    ];
    let report = match check_snapshot_isolation(&history) {
        Err(error) => error.to_string(),
        Ok(summary) => panic!("lost update passed: {summary}"),
    };
    assert!(
        report.starts_with("snapshot isolation violated: 1 anomaly"),
        "{report}"
    );
    assert!(report.contains("T2 -rw(0)-> T1 -ww(0)-> T2"), "{report}");
}

#[test]
fn read_skew_is_g_single() {
    // T1 sees x before T2 and y after T2.
    let history = [
        ok(0, vec![append(X, 1), append(Y, 1)]),
        ok(2, vec![append(X, 2), append(Y, 2)]),
        ok(1, vec![read(X, &[1]), read(Y, &[1, 2])]),
        ok(3, vec![read(X, &[1, 2]), read(Y, &[1, 2])]),
    ];
    let (kind, steps) = only_cycle(&history);
    assert_eq!(kind, CycleKind::GSingle);
    assert_eq!(steps, vec![(1, EdgeKind::Rw, X), (2, EdgeKind::Wr, Y)]);
}

#[test]
fn g_nonadjacent_cycle_with_two_separated_anti_dependencies() {
    let history = [
        ok(1, vec![read(X, &[]), read(Y, &[4])]),
        ok(2, vec![append(X, 2)]),
        ok(3, vec![read(X, &[2]), read(Y, &[])]),
        ok(4, vec![append(Y, 4)]),
    ];
    let (kind, steps) = only_cycle(&history);
    assert_eq!(kind, CycleKind::GNonadjacent);
    assert_eq!(
        steps,
        vec![
            (1, EdgeKind::Rw, X),
            (2, EdgeKind::Wr, X),
            (3, EdgeKind::Rw, Y),
            (4, EdgeKind::Wr, Y)
        ]
    );
}

#[test]
fn g0_write_cycle() {
    // T1 is before T2 on x and after it on y.
    let history = [
        ok(1, vec![append(X, 1), append(Y, 2)]),
        ok(2, vec![append(X, 3), append(Y, 4)]),
        ok(3, vec![read(X, &[1, 3]), read(Y, &[4, 2])]),
    ];
    let (kind, steps) = only_cycle(&history);
    assert_eq!(kind, CycleKind::G0);
    assert_eq!(steps, vec![(1, EdgeKind::Ww, X), (2, EdgeKind::Ww, Y)]);
}

#[test]
fn g0_counts_an_unknown_transaction_once_its_append_is_observed() {
    let history = [
        ok(1, vec![append(X, 1), append(Y, 2)]),
        txn(2, Outcome::Unknown, vec![append(X, 3), append(Y, 4)]),
        ok(3, vec![read(X, &[1, 3]), read(Y, &[4, 2])]),
    ];
    let (kind, _) = only_cycle(&history);
    assert_eq!(kind, CycleKind::G0);
}

#[test]
fn g1a_aborted_read() {
    let history = [
        txn(1, Outcome::Aborted, vec![append(X, 1)]),
        ok(2, vec![read(X, &[1])]),
    ];
    assert_eq!(
        only_anomaly(&history),
        Anomaly::AbortedRead {
            key: X,
            element: 1,
            writer: 1,
            reader: 2
        }
    );
}

#[test]
fn g1b_intermediate_read() {
    let history = [
        ok(1, vec![append(X, 1), append(X, 2)]),
        ok(2, vec![read(X, &[1])]),
    ];
    assert_eq!(
        only_anomaly(&history),
        Anomaly::IntermediateRead {
            key: X,
            element: 1,
            writer: 1,
            writer_last: 2,
            reader: 2
        }
    );
}

#[test]
fn g1c_circular_information_flow() {
    // Each transaction read the other's write.
    let history = [
        ok(1, vec![append(X, 1), read(Y, &[2])]),
        ok(2, vec![append(Y, 2), read(X, &[1])]),
    ];
    let (kind, steps) = only_cycle(&history);
    assert_eq!(kind, CycleKind::G1c);
    assert_eq!(steps, vec![(1, EdgeKind::Wr, X), (2, EdgeKind::Wr, Y)]);
}

#[test]
fn incompatible_orders() {
    let history = [
        ok(1, vec![append(X, 1)]),
        ok(2, vec![append(X, 2)]),
        ok(3, vec![read(X, &[1, 2])]),
        ok(4, vec![read(X, &[2, 1])]),
    ];
    assert_eq!(
        only_anomaly(&history),
        Anomaly::IncompatibleOrder {
            key: X,
            reader_a: 3,
            list_a: vec![1, 2],
            reader_b: 4,
            list_b: vec![2, 1]
        }
    );
}

#[test]
fn phantom_element() {
    let history = [ok(1, vec![append(X, 1)]), ok(2, vec![read(X, &[1, 7])])];
    assert_eq!(
        only_anomaly(&history),
        Anomaly::Phantom {
            key: X,
            element: 7,
            reader: 2
        }
    );
}

#[test]
fn duplicate_element_in_a_read() {
    let history = [ok(1, vec![append(X, 1)]), ok(2, vec![read(X, &[1, 1])])];
    assert_eq!(
        only_anomaly(&history),
        Anomaly::DuplicateElement {
            key: X,
            element: 1,
            reader: 2
        }
    );
}

#[test]
fn internal_read_missing_own_append() {
    let history = [ok(1, vec![append(X, 1), read(X, &[])])];
    assert_eq!(
        only_anomaly(&history),
        Anomaly::Internal {
            txn: 1,
            key: X,
            observed: vec![],
            expected: Expected::EndsWith {
                own_appends: vec![1]
            },
        }
    );
}

#[test]
fn internal_read_disagreeing_with_earlier_read() {
    let history = [ok(1, vec![read(X, &[]), append(X, 1), read(X, &[])])];
    assert_eq!(
        only_anomaly(&history),
        Anomaly::Internal {
            txn: 1,
            key: X,
            observed: vec![],
            expected: Expected::Exactly { list: vec![1] },
        }
    );
}

#[test]
fn internal_read_of_own_append_before_it_happened() {
    let history = [ok(1, vec![read(X, &[1]), append(X, 1)])];
    let found = anomalies(&history);
    assert!(
        found
            .iter()
            .any(|a| matches!(a, Anomaly::Internal { txn: 1, .. })),
        "{found:#?}"
    );
}

#[test]
fn reading_own_appends_after_a_snapshot_passes() {
    let history = [
        ok(1, vec![append(X, 1)]),
        ok(
            2,
            vec![
                read(X, &[1]),
                append(X, 2),
                append(X, 3),
                read(X, &[1, 2, 3]),
            ],
        ),
        ok(3, vec![append(X, 4), read(X, &[1, 2, 3, 4])]),
    ];
    let summary = passes(&history);
    // Own appends are stripped before inferring dependencies, so no self-edges and no rw.
    let edges = summary.edges;
    assert_eq!((edges.ww, edges.wr, edges.rw), (2, 2, 0), "{summary}");
}

#[test]
fn write_skew_is_allowed() {
    // Both read x and y from the same snapshot and each appended to a different key.
    let history = [
        ok(0, vec![append(X, 0), append(Y, 0)]),
        ok(1, vec![read(X, &[0]), read(Y, &[0]), append(X, 1)]),
        ok(2, vec![read(X, &[0]), read(Y, &[0]), append(Y, 2)]),
        ok(3, vec![read(X, &[0, 1]), read(Y, &[0, 2])]),
    ];
    let summary = passes(&history);
    // The two anti-dependencies form a cycle; the checker must see it and still accept it.
    assert_eq!(summary.edges.rw, 2);
    assert_eq!(summary.committed, 4);
}

#[test]
fn serial_history_passes() {
    let history = [
        ok(1, vec![read(X, &[]), append(X, 1), append(Y, 1)]),
        ok(2, vec![read(X, &[1]), read(Y, &[1]), append(X, 2)]),
        ok(3, vec![append(Y, 3), read(Y, &[1, 3]), read(X, &[1, 2])]),
        ok(4, vec![read(X, &[1, 2]), read(Y, &[1, 3])]),
    ];
    let summary = passes(&history);
    assert_eq!(
        (summary.transactions, summary.committed, summary.keys),
        (4, 4, 2),
        "{summary}"
    );
    assert!(summary.edges.total() > 0);
}

#[test]
fn reads_of_aborted_and_unknown_transactions_are_ignored() {
    let history = [
        txn(1, Outcome::Aborted, vec![read(X, &[99])]),
        txn(2, Outcome::Unknown, vec![read(X, &[98]), read(Y, &[1, 2])]),
        ok(3, vec![append(X, 1)]),
    ];
    passes(&history);
}

#[test]
fn unknown_appends_count_only_when_observed() {
    let unobserved = [
        txn(1, Outcome::Unknown, vec![append(X, 1)]),
        ok(2, vec![read(X, &[])]),
    ];
    assert_eq!(passes(&unobserved).committed, 1);
    let observed = [
        txn(1, Outcome::Unknown, vec![append(X, 1)]),
        ok(2, vec![read(X, &[1])]),
    ];
    let summary = passes(&observed);
    assert_eq!((summary.committed, summary.edges.wr), (2, 1));
}

#[test]
fn duplicate_transaction_ids_are_malformed() {
    let history = [ok(1, vec![]), ok(1, vec![])];
    assert_eq!(
        check_snapshot_isolation(&history),
        Err(CheckError::Malformed(MalformedHistory::DuplicateTxnId {
            id: 1
        }))
    );
}

#[test]
fn duplicate_appends_are_malformed() {
    let history = [
        ok(1, vec![append(X, 5)]),
        txn(2, Outcome::Aborted, vec![append(X, 5)]),
    ];
    assert_eq!(
        check_snapshot_isolation(&history),
        Err(CheckError::Malformed(MalformedHistory::DuplicateAppend {
            key: X,
            element: 5,
            first: 1,
            second: 2
        }))
    );
}
