//! Property tests against an in-test model of a multi-version database.
//!
//! The model gives each transaction a snapshot at start, buffers its appends and applies them
//! at commit, with first-committer-wins optionally enforced. Start and commit events of
//! several concurrent transactions are interleaved by a generated schedule. With
//! first-committer-wins every history is snapshot isolation and must pass; without it the
//! model knows exactly which conflicts it let through and the checker must agree.

use std::collections::{HashMap, HashSet};

use luna_check::{CheckError, Element, Key, Op, Outcome, Txn, check_snapshot_isolation};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

const KEYS: Key = 3;

#[derive(Debug, Clone)]
enum Step {
    Read(Key),
    Append(Key),
}

#[derive(Debug, Clone)]
struct Plan {
    steps: Vec<Step>,
    /// The client gives up before commit.
    client_abort: bool,
    /// The client never learns the outcome, whatever it was.
    lose_answer: bool,
}

/// Which start and commit events interleave, and how many transactions may run at once.
#[derive(Debug, Clone)]
struct Schedule {
    choices: Vec<u8>,
    max_active: usize,
}

struct Running {
    plan: usize,
    start: u64,
    ops: Vec<Op>,
    writes: Vec<(Key, Element)>,
    reads: HashSet<Key>,
}

/// A transaction the model really committed, with its place in time.
struct Committed {
    start: u64,
    commit: u64,
    writes: HashSet<Key>,
    reads: HashSet<Key>,
    /// The client learned the commit, so the checker may use the transaction's reads.
    acknowledged: bool,
}

struct Execution {
    history: Vec<Txn>,
    /// Two concurrent committed transactions appended to the same key.
    write_conflict: bool,
    /// Such a pair where the later committer also read the key and the client saw its
    /// commit: its read provably missed the earlier commit, so the anomaly is observable.
    observable_lost_update: bool,
}

/// Runs `plans` over keys `0..keys`.
fn execute(plans: &[Plan], schedule: &Schedule, first_committer_wins: bool) -> Execution {
    execute_over(KEYS, plans, schedule, first_committer_wins)
}

fn execute_over(
    keys: Key,
    plans: &[Plan],
    schedule: &Schedule,
    first_committer_wins: bool,
) -> Execution {
    // Each key's elements with the commit time that made them visible: a snapshot is then
    // just a start time, and cheap even for long histories.
    let mut db: HashMap<Key, Vec<(u64, Element)>> = HashMap::new();
    let mut last_commit: HashMap<Key, u64> = HashMap::new();
    let mut clock = 0;
    let mut next_element: Element = 0;
    let mut next_plan = 0;
    let mut active: Vec<Running> = Vec::new();
    let mut history = Vec::new();
    let mut committed = Vec::new();
    let mut choices = schedule.choices.iter().copied().cycle();
    loop {
        let choice = usize::from(choices.next().unwrap_or(0));
        let can_start = next_plan < plans.len() && active.len() < schedule.max_active.max(1);
        if can_start && (active.is_empty() || choice % 2 == 0) {
            let plan = &plans[next_plan];
            let mut txn = Running {
                plan: next_plan,
                start: clock,
                ops: Vec::new(),
                writes: Vec::new(),
                reads: HashSet::new(),
            };
            for step in &plan.steps {
                match *step {
                    Step::Read(key) => {
                        let versions = db.get(&key).map_or(&[][..], Vec::as_slice);
                        let visible = versions.partition_point(|&(at, _)| at <= txn.start);
                        let mut list: Vec<Element> =
                            versions[..visible].iter().map(|v| v.1).collect();
                        list.extend(txn.writes.iter().filter(|(k, _)| *k == key).map(|w| w.1));
                        txn.reads.insert(key);
                        txn.ops.push(Op::Read { key, list });
                    }
                    Step::Append(key) => {
                        next_element += 1;
                        txn.writes.push((key, next_element));
                        txn.ops.push(Op::Append {
                            key,
                            element: next_element,
                        });
                    }
                }
            }
            active.push(txn);
            next_plan += 1;
            continue;
        }
        if active.is_empty() {
            break;
        }
        let txn = active.swap_remove((choice / 2) % active.len());
        let plan = &plans[txn.plan];
        let conflict = txn
            .writes
            .iter()
            .any(|(key, _)| last_commit.get(key).is_some_and(|&at| at > txn.start));
        let rejected = first_committer_wins && conflict;
        let commits = !plan.client_abort && !rejected;
        if commits {
            clock += 1;
            for &(key, element) in &txn.writes {
                db.entry(key).or_default().push((clock, element));
                last_commit.insert(key, clock);
            }
            committed.push(Committed {
                start: txn.start,
                commit: clock,
                writes: txn.writes.iter().map(|w| w.0).collect(),
                reads: txn.reads.clone(),
                acknowledged: !plan.lose_answer,
            });
        }
        let outcome = match (plan.lose_answer, commits) {
            (true, _) => Outcome::Unknown,
            (false, true) => Outcome::Committed,
            (false, false) => Outcome::Aborted,
        };
        history.push(Txn {
            id: txn.plan as u64,
            outcome,
            ops: txn.ops,
        });
    }
    // A final serial reader observes every committed append, giving each a known position.
    let ops = (0..keys)
        .map(|key| {
            let list = db
                .get(&key)
                .map_or_else(Vec::new, |v| v.iter().map(|e| e.1).collect());
            Op::Read { key, list }
        })
        .collect();
    history.push(Txn {
        id: plans.len() as u64,
        outcome: Outcome::Committed,
        ops,
    });

    let mut write_conflict = false;
    let mut observable_lost_update = false;
    // Commit times are 1, 2, ... in `committed` order, so the transactions that committed
    // while `later` ran sit between its start and its own commit.
    for later in &committed {
        let window = committed.get(later.start as usize..later.commit as usize - 1);
        for earlier in window.unwrap_or_default() {
            let concurrent = later.start < earlier.commit && earlier.commit < later.commit;
            let shared: Vec<&Key> = earlier.writes.intersection(&later.writes).collect();
            if concurrent && !shared.is_empty() {
                write_conflict = true;
                if later.acknowledged && shared.iter().any(|k| later.reads.contains(k)) {
                    observable_lost_update = true;
                }
            }
        }
    }
    Execution {
        history,
        write_conflict,
        observable_lost_update,
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..KEYS).prop_map(Step::Read),
        (0..KEYS).prop_map(Step::Append)
    ]
}

fn plans() -> impl Strategy<Value = Vec<Plan>> {
    let plan = (
        proptest::collection::vec(step(), 1..6),
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.15),
    )
        .prop_map(|(steps, client_abort, lose_answer)| Plan {
            steps,
            client_abort,
            lose_answer,
        });
    proptest::collection::vec(plan, 1..24)
}

fn schedule() -> impl Strategy<Value = Schedule> {
    (proptest::collection::vec(any::<u8>(), 1..64), 2..6usize).prop_map(|(choices, max_active)| {
        Schedule {
            choices,
            max_active,
        }
    })
}

fn serial() -> Schedule {
    Schedule {
        choices: vec![0],
        max_active: 1,
    }
}

fn verdict(history: &[Txn]) -> Result<(), String> {
    match check_snapshot_isolation(history) {
        Ok(_) => Ok(()),
        Err(CheckError::Violations(violations)) => Err(violations.to_string()),
        Err(other) => panic!("the model produced a malformed history: {other}\n{history:#?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn snapshot_isolation_executions_pass(plans in plans(), schedule in schedule()) {
        let run = execute(&plans, &schedule, true);
        prop_assert!(!run.write_conflict, "first-committer-wins let a conflict through");
        if let Err(report) = verdict(&run.history) {
            prop_assert!(false, "valid SI history rejected:\n{report}\n{:#?}", run.history);
        }
    }

    #[test]
    fn lost_updates_are_flagged(plans in plans(), schedule in schedule()) {
        let run = execute(&plans, &schedule, false);
        let flagged = verdict(&run.history).is_err();
        if run.observable_lost_update {
            prop_assert!(flagged, "lost update passed:\n{:#?}", run.history);
        }
        if flagged {
            // Without a conflict the execution is one that first-committer-wins allows.
            prop_assert!(run.write_conflict, "flagged without any conflict: {:?}",
                verdict(&run.history));
        }
    }

    #[test]
    fn serial_executions_pass(plans in plans(), first_committer_wins in any::<bool>()) {
        let run = execute(&plans, &serial(), first_committer_wins);
        prop_assert!(!run.write_conflict);
        if let Err(report) = verdict(&run.history) {
            prop_assert!(false, "serial history rejected:\n{report}\n{:#?}", run.history);
        }
    }

    /// Untrusted input: arbitrary histories give a verdict or a typed error, never a panic.
    #[test]
    fn arbitrary_histories_never_panic(history in arbitrary_history()) {
        if let Err(error) = check_snapshot_isolation(&history) {
            prop_assert!(!error.to_string().is_empty());
        }
    }

    /// As above, but with unique appends so the history reaches the graph checks.
    #[test]
    fn well_formed_arbitrary_histories_never_panic(history in unique_append_history()) {
        match check_snapshot_isolation(&history) {
            Err(CheckError::Malformed(error)) => prop_assert!(false, "{error}"),
            Err(error) => prop_assert!(!error.to_string().is_empty()),
            Ok(summary) => prop_assert_eq!(summary.transactions, history.len()),
        }
    }
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Committed),
        Just(Outcome::Aborted),
        Just(Outcome::Unknown)
    ]
}

fn raw_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..KEYS, 0..8u64).prop_map(|(key, element)| Op::Append { key, element }),
        (0..KEYS, proptest::collection::vec(0..8u64, 0..6))
            .prop_map(|(key, list)| Op::Read { key, list }),
    ]
}

fn arbitrary_history() -> impl Strategy<Value = Vec<Txn>> {
    let txn = (
        0..6u64,
        outcome(),
        proptest::collection::vec(raw_op(), 0..5),
    )
        .prop_map(|(id, outcome, ops)| Txn { id, outcome, ops });
    proptest::collection::vec(txn, 0..8)
}

fn unique_append_history() -> impl Strategy<Value = Vec<Txn>> {
    arbitrary_history().prop_map(|mut history| {
        let mut next = 0;
        for (index, txn) in history.iter_mut().enumerate() {
            txn.id = index as u64;
            for op in &mut txn.ops {
                if let Op::Append { element, .. } = op {
                    // Reads draw from 0..8, so early appends can be observed.
                    *element = next;
                    next += 1;
                }
            }
        }
        history
    })
}

/// The lost-update property is only as strong as the share of runs that hold a conflict.
#[test]
fn lost_update_generator_produces_observable_conflicts() {
    let mut runner = TestRunner::deterministic();
    let strategy = (plans(), schedule());
    let mut observable = 0;
    for _ in 0..200 {
        let (plans, schedule) = strategy
            .new_tree(&mut runner)
            .map(|tree| tree.current())
            .unwrap_or_else(|reason| panic!("cannot generate: {reason}"));
        let run = execute(&plans, &schedule, false);
        if run.observable_lost_update {
            observable += 1;
            assert!(
                verdict(&run.history).is_err(),
                "lost update passed: {:#?}",
                run.history
            );
        }
    }
    assert!(
        observable >= 40,
        "only {observable} of 200 runs held an observable lost update"
    );
}

/// A history of the size real test runs produce is checked in one pass, without deep
/// recursion, and a valid one passes.
#[test]
fn fifty_thousand_transactions() {
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut random = move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    // Enough keys that lists stay short, as in a real run, rather than 50k elements long.
    const MANY_KEYS: Key = 2_000;
    let plans: Vec<Plan> = (0..50_000)
        .map(|_| Plan {
            steps: (0..1 + random(4))
                .map(|_| {
                    let key = random(MANY_KEYS);
                    if random(2) == 0 {
                        Step::Read(key)
                    } else {
                        Step::Append(key)
                    }
                })
                .collect(),
            client_abort: random(20) == 0,
            lose_answer: random(20) == 0,
        })
        .collect();
    let choices = (0..4096).map(|_| random(256) as u8).collect();
    let run = execute_over(
        MANY_KEYS,
        &plans,
        &Schedule {
            choices,
            max_active: 4,
        },
        true,
    );
    let started = std::time::Instant::now();
    let summary = match check_snapshot_isolation(&run.history) {
        Ok(summary) => summary,
        Err(error) => panic!("{error}"),
    };
    eprintln!("checked in {:?}: {summary}", started.elapsed());
    assert_eq!(summary.transactions, 50_001);
    assert!(summary.edges.total() > 50_000, "{summary}");
}
