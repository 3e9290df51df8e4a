//! The linearizability checker the fault tests use (tests/support/history.rs), against
//! histories whose answer is known: any history generated from a sequential run with
//! overlapping intervals around each operation's point passes, and stale or invented reads
//! fail, with the offending read in the smallest failing part.

mod support;

use proptest::prelude::*;
use support::history::{Recorded, RegisterOp, around, is_linearizable, minimal_failing};

/// A sequential run of `steps` (true: write), each operation stretched around its point
/// by the given slack before and after; some writes' outcomes are unknown (`None`), and
/// of those, some never took effect.
fn history(steps: &[(bool, u64, u64, u8)]) -> Vec<Recorded> {
    let mut state = None;
    let mut next_value = 0;
    steps
        .iter()
        .enumerate()
        .map(|(i, &(write, before, after, unknown))| {
            let point = 200 * (i as u64 + 1);
            let invoked = point - before;
            let completed = Some(point + after);
            if !write {
                return Recorded {
                    op: RegisterOp::Read(state),
                    invoked,
                    completed,
                };
            }
            next_value += 1;
            // 0: known; 1: unknown but applied; 2: unknown and never applied.
            if unknown != 2 {
                state = Some(next_value);
            }
            Recorded {
                op: RegisterOp::Write(next_value),
                invoked,
                completed: if unknown == 0 { completed } else { None },
            }
        })
        .collect()
}

proptest! {
    #[test]
    fn histories_of_a_sequential_run_are_linearizable(
        steps in prop::collection::vec((any::<bool>(), 0..150u64, 0..150u64, 0..3u8), 1..40)
    ) {
        let ops = history(&steps);
        prop_assert!(is_linearizable(&ops), "{ops:?}");
    }

    #[test]
    fn a_stale_read_after_a_newer_write_completed_fails(
        steps in prop::collection::vec((any::<bool>(), 0..40u64, 0..40u64, 0..1u8), 0..20)
    ) {
        let mut ops = history(&steps);
        let end = ops.iter().filter_map(|op| op.completed).max().unwrap_or(0);
        // Two writes, one after the other, then a read strictly later that sees the first.
        let first = Recorded { op: RegisterOp::Write(1_000), invoked: end + 10, completed: Some(end + 20) };
        let second = Recorded { op: RegisterOp::Write(2_000), invoked: end + 30, completed: Some(end + 40) };
        let stale = Recorded { op: RegisterOp::Read(Some(1_000)), invoked: end + 50, completed: Some(end + 60) };
        ops.extend([first, second, stale]);
        prop_assert!(!is_linearizable(&ops));
        let minimal = minimal_failing(&ops);
        prop_assert!(minimal.contains(&stale), "{minimal:?}");
        prop_assert!(minimal.len() <= 3, "{minimal:?}");
    }
}

#[test]
fn a_read_may_see_an_unknown_write_but_not_an_invented_value() {
    let unknown = Recorded {
        op: RegisterOp::Write(7),
        invoked: 1,
        completed: None,
    };
    let sees_it = Recorded {
        op: RegisterOp::Read(Some(7)),
        invoked: 5,
        completed: Some(6),
    };
    assert!(is_linearizable(&[unknown, sees_it]));
    let invented = Recorded {
        op: RegisterOp::Read(Some(8)),
        invoked: 7,
        completed: Some(8),
    };
    assert!(!is_linearizable(&[unknown, sees_it, invented]));
    assert_eq!(minimal_failing(&[unknown, sees_it, invented]), [invented]);
    // A read of an absent key before any write is fine; after a completed write it is not.
    let absent = Recorded {
        op: RegisterOp::Read(None),
        invoked: 0,
        completed: Some(1),
    };
    assert!(is_linearizable(&[absent]));
    let written = Recorded {
        op: RegisterOp::Write(1),
        invoked: 2,
        completed: Some(3),
    };
    let absent_later = Recorded {
        op: RegisterOp::Read(None),
        invoked: 4,
        completed: Some(5),
    };
    assert!(!is_linearizable(&[written, absent_later]));
}

/// A write the client was told failed never took effect: a read of its value fails the
/// check, a read that does not see it passes, and the report around a failing read shows
/// the failed write however long before it was.
#[test]
fn a_write_reported_failed_is_left_out_of_the_check_but_shown_in_the_report() {
    let op = |op, invoked, completed| Recorded {
        op,
        invoked,
        completed: Some(completed),
    };
    let failed = op(RegisterOp::FailedWrite(5), 0, 1);
    let not_seen = op(RegisterOp::Read(None), 2, 3);
    assert!(is_linearizable(&[failed, not_seen]));
    let seen = op(RegisterOp::Read(Some(5)), 2_000, 2_001);
    let history = [failed, not_seen, seen];
    assert!(!is_linearizable(&history));
    let minimal = minimal_failing(&history);
    assert_eq!(minimal, [seen]);
    let shown = around(&history, &minimal);
    assert_eq!(shown, [failed, seen], "the failed write, not the old read");
}
