//! Seeded fault injection, for tests that prove retries and conditional writes are safe.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::OpKind;
use crate::KernelError;

/// The `store` name of injected errors, which are [`object_store::Error::Generic`] so that the
/// retry layer treats them as transient.
const FAULT_STORE: &str = "fault-injection";

/// What an injected fault does to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Fail without sending the request to the inner store.
    Fail,
    /// Send the request to the inner store, then fail anyway: the request took effect but the
    /// caller cannot know it, as after a timeout.
    FailAfterApply,
    /// Wait this long before sending the request.
    Delay(Duration),
}

/// A rule that applies its action to a random fraction of requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultRule {
    /// What to do to a selected request.
    pub action: FaultAction,
    /// The probability, in `0.0..=1.0`, that a request is selected.
    pub fraction: f64,
    /// Only requests of this kind are eligible; `None` means all kinds.
    pub kind: Option<OpKind>,
}

/// Injects faults into the requests of a [`LunaObjectStore`](super::LunaObjectStore).
///
/// Faults apply per attempt, so a retried request rolls again. Random choices come from a
/// seeded [`StdRng`], so a single-task test replays exactly from its seed.
#[derive(Debug)]
pub struct FaultInjector {
    /// Whether any rule or pending fault exists; the only cost of an idle injector.
    active: AtomicBool,
    injected: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rng: StdRng,
    rules: Vec<FaultRule>,
    pending: Vec<Pending>,
}

#[derive(Debug)]
struct Pending {
    kind: OpKind,
    remaining: u32,
    action: FaultAction,
}

/// The faults chosen for one attempt.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) delay: Duration,
    pub(crate) fail_before: bool,
    pub(crate) fail_after: bool,
}

/// The error inside an injected [`object_store::Error::Generic`].
#[derive(Debug, thiserror::Error)]
#[error("injected fault: {kind} request failed {when} applying")]
struct InjectedFault {
    kind: OpKind,
    when: &'static str,
}

impl Default for FaultInjector {
    fn default() -> Self {
        FaultInjector {
            active: AtomicBool::new(false),
            injected: AtomicU64::new(0),
            state: Mutex::new(State {
                rng: StdRng::seed_from_u64(0),
                rules: Vec::new(),
                pending: Vec::new(),
            }),
        }
    }
}

impl FaultInjector {
    /// Restarts the random sequence from `seed`.
    pub fn set_seed(&self, seed: u64) {
        self.lock().rng = StdRng::seed_from_u64(seed);
    }

    /// Adds a rule; rules accumulate until [`clear`](Self::clear).
    ///
    /// Fails if `fraction` is not within `0.0..=1.0`.
    pub fn add_rule(&self, rule: FaultRule) -> Result<(), KernelError> {
        if !(0.0..=1.0).contains(&rule.fraction) {
            return Err(KernelError::InvalidArgument {
                name: "fault fraction",
                reason: format!("{} is not within 0.0..=1.0", rule.fraction),
            });
        }
        let mut state = self.lock();
        state.rules.push(rule);
        self.active.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Applies `action` to the next `count` requests of `kind`, before any random rule.
    pub fn inject_next(&self, kind: OpKind, count: u32, action: FaultAction) {
        if count == 0 {
            return;
        }
        let mut state = self.lock();
        state.pending.push(Pending {
            kind,
            remaining: count,
            action,
        });
        self.active.store(true, Ordering::Relaxed);
    }

    /// Removes all rules and pending faults.
    pub fn clear(&self) {
        let mut state = self.lock();
        state.rules.clear();
        state.pending.clear();
        self.active.store(false, Ordering::Relaxed);
    }

    /// How many faults (failures and delays) have been injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Chooses the faults for one attempt of a `kind` request.
    pub(crate) fn decide(&self, kind: OpKind) -> Decision {
        let mut decision = Decision::default();
        if !self.active.load(Ordering::Relaxed) {
            return decision;
        }
        let mut state = self.lock();
        let state = &mut *state;
        let mut actions = Vec::new();
        if let Some(i) = state.pending.iter().position(|p| p.kind == kind) {
            actions.push(state.pending[i].action);
            state.pending[i].remaining -= 1;
            if state.pending[i].remaining == 0 {
                state.pending.remove(i);
            }
        }
        for rule in &state.rules {
            if rule.kind.is_none_or(|k| k == kind) && state.rng.random_bool(rule.fraction) {
                actions.push(rule.action);
            }
        }
        if state.rules.is_empty() && state.pending.is_empty() {
            self.active.store(false, Ordering::Relaxed);
        }
        for action in &actions {
            match action {
                FaultAction::Fail => decision.fail_before = true,
                FaultAction::FailAfterApply => decision.fail_after = true,
                FaultAction::Delay(d) => decision.delay = decision.delay.saturating_add(*d),
            }
        }
        let count = u64::try_from(actions.len()).unwrap_or(u64::MAX);
        self.injected.fetch_add(count, Ordering::Relaxed);
        decision
    }

    /// The error returned for an injected failure.
    pub(crate) fn error(kind: OpKind, after_apply: bool) -> object_store::Error {
        let when = if after_apply { "after" } else { "before" };
        object_store::Error::Generic {
            store: FAULT_STORE,
            source: Box::new(InjectedFault { kind, when }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: FaultAction, fraction: f64, kind: Option<OpKind>) -> FaultRule {
        FaultRule {
            action,
            fraction,
            kind,
        }
    }

    #[test]
    fn idle_injector_decides_nothing() {
        let faults = FaultInjector::default();
        assert_eq!(faults.decide(OpKind::Put), Decision::default());
        assert_eq!(faults.injected(), 0);
    }

    #[test]
    fn rejects_fractions_outside_unit_interval() {
        let faults = FaultInjector::default();
        for bad in [-0.1, 1.5, f64::NAN] {
            let err = faults
                .add_rule(rule(FaultAction::Fail, bad, None))
                .unwrap_err();
            assert!(matches!(err, KernelError::InvalidArgument { .. }), "{err}");
        }
        assert_eq!(faults.decide(OpKind::Put), Decision::default());
    }

    #[test]
    fn same_seed_same_choices() {
        let run = |seed| {
            let faults = FaultInjector::default();
            faults.set_seed(seed);
            faults.add_rule(rule(FaultAction::Fail, 0.5, None)).unwrap();
            (0..64)
                .map(|_| faults.decide(OpKind::Get).fail_before)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        let fails = run(42).into_iter().filter(|f| *f).count();
        assert!((16..=48).contains(&fails), "{fails} of 64");
    }

    #[test]
    fn rules_respect_kind_and_clear() {
        let faults = FaultInjector::default();
        faults
            .add_rule(rule(FaultAction::Fail, 1.0, Some(OpKind::Put)))
            .unwrap();
        faults
            .add_rule(rule(
                FaultAction::Delay(Duration::from_millis(3)),
                1.0,
                None,
            ))
            .unwrap();
        let put = faults.decide(OpKind::Put);
        assert!(put.fail_before && put.delay == Duration::from_millis(3));
        let get = faults.decide(OpKind::Get);
        assert!(!get.fail_before && get.delay == Duration::from_millis(3));
        assert_eq!(faults.injected(), 3);
        faults.clear();
        assert_eq!(faults.decide(OpKind::Put), Decision::default());
    }

    #[test]
    fn inject_next_hits_exactly_n_requests_of_kind() {
        let faults = FaultInjector::default();
        faults.inject_next(OpKind::Put, 2, FaultAction::FailAfterApply);
        assert_eq!(faults.decide(OpKind::Get), Decision::default());
        assert!(faults.decide(OpKind::Put).fail_after);
        assert!(faults.decide(OpKind::Put).fail_after);
        assert_eq!(faults.decide(OpKind::Put), Decision::default());
        assert!(!faults.active.load(Ordering::Relaxed));
    }

    #[test]
    fn injected_errors_are_generic_from_the_fault_store() {
        let err = FaultInjector::error(OpKind::Delete, true);
        assert!(matches!(
            err,
            object_store::Error::Generic {
                store: FAULT_STORE,
                ..
            }
        ));
        assert!(
            err.to_string()
                .contains("delete request failed after applying"),
            "{err}"
        );
    }
}
