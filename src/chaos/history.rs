//! Single-key register histories, and their check for linearizability.
//!
//! `luna chaos` and the kill tests in tests/ share this file (the tests include it with
//! `#[path]`), so it uses nothing of the binary. Tasks put and get a few keys while
//! processes are killed. Every operation is recorded
//! with the logical times of its invocation and completion (one counter for all tasks, so
//! the order of events is the real-time order). At the end each key's history is checked
//! with the Wing–Gong–Lowe algorithm (`todc-utils`). A write whose outcome the client could
//! not learn may have taken effect at any time after its invocation, so it completes after
//! every other operation; a write the client knows failed never took effect and is left
//! out of the check, as are failed reads (failed writes stay in the history, marked, for the
//! report). A violation prints the smallest failing sub-history found by removing
//! operations one at a time; that part can end in an innocent read, so `luna chaos` prints
//! the key's history around it too.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use luna_client::{ClientError, Collection};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use todc_utils::linearizability::WGLChecker;
use todc_utils::linearizability::history::{Action, History};
use todc_utils::specifications::Specification;

/// What one operation did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOp {
    /// Wrote this value.
    Write(u64),
    /// Read this value (`None`: the key was absent).
    Read(Option<u64>),
    /// Tried to write this value and was told it failed: it never took effect, so the check
    /// leaves it out; a read of it shows a write reported failed that took effect.
    FailedWrite(u64),
}

/// One operation with the logical times it began and ended (`None`: unknown outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub op: RegisterOp,
    pub invoked: u64,
    pub completed: Option<u64>,
}

/// A register holding an optional value, absent at first.
struct Register;

impl Specification for Register {
    type State = Option<u64>;
    type Operation = RegisterOp;

    fn init() -> Self::State {
        None
    }

    fn apply(op: &RegisterOp, state: &Option<u64>) -> (bool, Option<u64>) {
        match op {
            RegisterOp::Write(value) => (true, Some(*value)),
            RegisterOp::Read(seen) => (seen == state, *state),
            RegisterOp::FailedWrite(_) => (true, *state),
        }
    }
}

/// The operations of `ops` that may have taken effect, which the check covers.
fn checked(ops: &[Recorded]) -> Vec<Recorded> {
    ops.iter()
        .filter(|op| !matches!(op.op, RegisterOp::FailedWrite(_)))
        .copied()
        .collect()
}

/// Whether `ops` (one key's history) is linearizable.
pub fn is_linearizable(ops: &[Recorded]) -> bool {
    let ops = checked(ops);
    if ops.is_empty() {
        return true;
    }
    let end = ops
        .iter()
        .map(|op| op.completed.unwrap_or(op.invoked))
        .max()
        .unwrap_or(0)
        + 1;
    // (time, is a response, process, action); calls sort before responses at equal times.
    let mut events = Vec::with_capacity(ops.len() * 2);
    for (process, op) in ops.iter().enumerate() {
        events.push((op.invoked, false, process, Action::Call(op.op)));
        let completed = op.completed.unwrap_or(end);
        events.push((completed, true, process, Action::Response(op.op)));
    }
    events.sort_by_key(|(time, is_response, process, _)| (*time, *is_response, *process));
    let actions = events
        .into_iter()
        .map(|(_, _, process, action)| (process, action))
        .collect();
    WGLChecker::<Register>::is_linearizable(History::from_actions(actions))
}

/// A smallest non-linearizable sub-history of `ops` (which must not be linearizable):
/// operations are removed one at a time while the rest still fails.
pub fn minimal_failing(ops: &[Recorded]) -> Vec<Recorded> {
    let mut failing = checked(ops);
    let mut i = 0;
    while i < failing.len() {
        let mut without = failing.clone();
        without.remove(i);
        if is_linearizable(&without) {
            i += 1;
        } else {
            failing = without;
        }
    }
    failing
}

/// How long the tasks use one generation of keys before moving to fresh ones. The checker's
/// cost grows steeply with the length of a key's history (a 10-minute run on five keys ran
/// the machine out of memory), so histories are kept to a few thousand operations each;
/// every generation is still checked in full, with as much concurrency as before.
const KEY_GENERATION: Duration = Duration::from_secs(5);

/// Tasks putting and getting a few keys at random, recording every operation.
pub struct Registers {
    stop: Arc<AtomicBool>,
    histories: Arc<Mutex<BTreeMap<String, Vec<Recorded>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Registers {
    /// Starts `tasks` tasks on `keys` keys of `collection`; `seed` drives their choices.
    pub fn spawn(collection: &Collection, tasks: usize, keys: usize, seed: u64) -> Registers {
        let stop = Arc::new(AtomicBool::new(false));
        let clock = Arc::new(AtomicU64::new(0));
        let histories: Arc<Mutex<BTreeMap<String, Vec<Recorded>>>> = Arc::default();
        let started = Instant::now();
        let tasks = (0..tasks as u64)
            .map(|task| {
                let (collection, stop) = (collection.clone(), Arc::clone(&stop));
                let (clock, histories) = (Arc::clone(&clock), Arc::clone(&histories));
                tokio::spawn(async move {
                    let mut rng = SmallRng::seed_from_u64(seed ^ (task + 1));
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let generation = started.elapsed().as_secs() / KEY_GENERATION.as_secs();
                        let key = format!("register-{generation}-{}", rng.random_range(0..keys));
                        let invoked = clock.fetch_add(1, Ordering::SeqCst);
                        let recorded = if rng.random_bool(0.5) {
                            n += 1;
                            // Unique per write, so a read names the write it saw.
                            let value = (task << 32) | n;
                            let result = collection.put(key.clone(), value.to_string()).await;
                            let completed = clock.fetch_add(1, Ordering::SeqCst);
                            match result {
                                Ok(_) => Some((RegisterOp::Write(value), Some(completed))),
                                Err(ClientError::OutcomeUnknown { .. }) => {
                                    Some((RegisterOp::Write(value), None))
                                }
                                Err(_) => Some((RegisterOp::FailedWrite(value), Some(completed))),
                            }
                        } else {
                            let result = collection.get(key.clone()).await;
                            let completed = clock.fetch_add(1, Ordering::SeqCst);
                            // A value that is not a number no write of ours made: it can
                            // never match, so the checker reports it.
                            result.ok().map(|value| {
                                let seen = value.map(|bytes| {
                                    String::from_utf8_lossy(&bytes)
                                        .parse::<u64>()
                                        .unwrap_or(u64::MAX)
                                });
                                (RegisterOp::Read(seen), Some(completed))
                            })
                        };
                        if let Some((op, completed)) = recorded
                            && let Ok(mut histories) = histories.lock()
                        {
                            histories.entry(key).or_default().push(Recorded {
                                op,
                                invoked,
                                completed,
                            });
                        }
                    }
                })
            })
            .collect();
        Registers {
            stop,
            histories,
            tasks,
        }
    }

    /// Stops the tasks and returns every key's history.
    pub async fn stop(self) -> BTreeMap<String, Vec<Recorded>> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            // A task that panicked recorded nothing false; its history so far still counts.
            let _ = task.await;
        }
        self.histories
            .lock()
            .map(|histories| histories.clone())
            .unwrap_or_default()
    }
}

/// What checking the histories found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterCheck {
    /// Keys checked.
    pub keys: usize,
    /// Operations checked (writes reported failed are not).
    pub operations: usize,
    /// Writes whose outcome the client could not learn.
    pub unknown: usize,
    /// The first key whose history is not linearizable, with a smallest failing part of it.
    pub violation: Option<(String, Vec<Recorded>)>,
}

/// Checks every key's history for linearizability.
pub fn check_registers(histories: &BTreeMap<String, Vec<Recorded>>) -> RegisterCheck {
    let mut check = RegisterCheck {
        keys: histories.len(),
        operations: histories.values().map(|ops| checked(ops).len()).sum(),
        unknown: histories
            .values()
            .flatten()
            .filter(|op| op.completed.is_none())
            .count(),
        violation: None,
    };
    check.violation = histories
        .iter()
        .find(|(_, ops)| !is_linearizable(ops))
        .map(|(key, ops)| (key.clone(), minimal_failing(ops)));
    check
}

/// Logical ticks of history shown before a failing part (about a quarter of a second of
/// `luna chaos`'s register traffic).
const CONTEXT_TICKS: u64 = 300;

/// The operations of `ops` around `part` (a failing part of it), in invocation order: from
/// `CONTEXT_TICKS` before its first invocation to its last completion, and every write of a
/// value its reads saw, whenever it was.
pub fn around(ops: &[Recorded], part: &[Recorded]) -> Vec<Recorded> {
    let from = part.iter().map(|op| op.invoked).min().unwrap_or(0);
    let from = from.saturating_sub(CONTEXT_TICKS);
    let to = part
        .iter()
        .map(|op| op.completed.unwrap_or(op.invoked))
        .max()
        .unwrap_or(u64::MAX);
    let seen: Vec<u64> = part
        .iter()
        .filter_map(|op| match op.op {
            RegisterOp::Read(Some(value)) => Some(value),
            _ => None,
        })
        .collect();
    let mut shown: Vec<Recorded> = ops
        .iter()
        .filter(|op| {
            let written = match op.op {
                RegisterOp::Write(value) | RegisterOp::FailedWrite(value) => Some(value),
                RegisterOp::Read(_) => None,
            };
            (op.invoked <= to && op.completed.is_none_or(|done| done >= from))
                || written.is_some_and(|value| seen.contains(&value))
        })
        .copied()
        .collect();
    shown.sort_by_key(|op| op.invoked);
    shown
}
