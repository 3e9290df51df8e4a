//! A group's transaction state, built by every replica from the log: the locks of
//! prewritten transactions, and the outcomes of transactions whose primary key is here.
//!
//! Locks live in memory only. They are rebuilt by replaying the log, which is why the log is
//! never truncated at an index where a lock was held ([`TxnState::truncation_bound`]): a
//! group snapshot then never has to carry locks. Outcomes are kept in snapshots, because a
//! transaction's other keys are resolved through its primary's outcome long after the
//! primary's lock is gone.
//!
//! Outcomes are dropped once no lock of their transaction can be left anywhere: a `TxnGc`
//! entry carries the master's GC safe point, below which no prewrite locks anything from
//! then on, and the record floor, below which every group reported no lock (see
//! [`TxnState::lock_floor`]).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use bytes::Bytes;
use luna_proto::group::TxnRecord;
use luna_proto::tablet::{LockInfo, Mutation};
use luna_storage::KeyRange;

/// A prewritten transaction's lock on one key.
#[derive(Debug, Clone)]
pub(crate) struct Lock {
    pub(crate) start_ts: u64,
    /// The locked key's collection's name.
    pub(crate) collection: String,
    pub(crate) primary_collection: String,
    pub(crate) primary_key: Bytes,
    pub(crate) ttl_ms: u64,
    /// What the transaction writes to the key once it commits.
    pub(crate) mutation: Mutation,
    /// Journal index of the prewrite.
    pub(crate) prewrite_index: u64,
}

impl Lock {
    /// The lock as the caller that meets it sees it.
    pub(crate) fn info(&self) -> LockInfo {
        LockInfo {
            key: self.mutation.key.clone(),
            start_ts: self.start_ts,
            primary_collection: self.primary_collection.clone(),
            primary_key: self.primary_key.clone(),
            ttl_ms: self.ttl_ms,
            collection: self.collection.clone(),
        }
    }
}

/// Locks by tablet and key, and transaction outcomes by primary.
#[derive(Debug, Default)]
pub(crate) struct TxnState {
    locks: BTreeMap<(u64, Bytes), Lock>,
    /// `(tablet, primary key, start_ts)` to `(commit_ts, index)`; commit_ts 0 is a rollback.
    outcomes: HashMap<(u64, Bytes, u64), (u64, u64)>,
    /// `(prewrite index, resolve index)` of locks resolved above the truncation point: the
    /// log must not be truncated between the two either.
    resolved: Vec<(u64, u64)>,
    /// The GC safe point of the last `TxnGc` entry: no transaction that started below it
    /// takes a lock here any more.
    safe_point: u64,
}

impl TxnState {
    /// Whether no key is locked (the fast path of every plain write and read).
    pub(crate) fn has_locks(&self) -> bool {
        !self.locks.is_empty()
    }

    /// The lock on `key` of `tablet`, if any.
    pub(crate) fn lock(&self, tablet_id: u64, key: &Bytes) -> Option<&Lock> {
        self.locks.get(&(tablet_id, key.clone()))
    }

    /// A lock that keeps a read at `read_ts` of `key` from deciding what it sees: one of a
    /// transaction that started at or before it, so that may commit below it.
    pub(crate) fn blocking_read(&self, tablet_id: u64, key: &Bytes, read_ts: u64) -> Option<&Lock> {
        self.lock(tablet_id, key)
            .filter(|lock| lock.start_ts <= read_ts)
    }

    /// The first lock in `range` of `tablet` that blocks a read at `read_ts`.
    pub(crate) fn blocking_scan(
        &self,
        tablet_id: u64,
        range: &KeyRange,
        read_ts: u64,
    ) -> Option<&Lock> {
        let start = Bound::Included((tablet_id, range.start.clone()));
        let end = match &range.end {
            Some(end) => Bound::Excluded((tablet_id, end.clone())),
            None => Bound::Excluded((tablet_id.saturating_add(1), Bytes::new())),
        };
        self.locks
            .range((start, end))
            .map(|(_, lock)| lock)
            .find(|lock| lock.start_ts <= read_ts)
    }

    /// How many keys are locked, and how many outcomes are kept.
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.locks.len(), self.outcomes.len())
    }

    /// The GC safe point this group's log applied: a prewrite below it locks nothing.
    pub(crate) fn safe_point(&self) -> u64 {
        self.safe_point
    }

    /// No lock of a transaction that started below this is held here, or can be taken
    /// from now on; it never goes down.
    pub(crate) fn lock_floor(&self) -> u64 {
        self.locks
            .values()
            .map(|lock| lock.start_ts)
            .fold(self.safe_point, u64::min)
    }

    /// Whether a `TxnGc` entry with `safe_point` and `record_floor` would change anything.
    pub(crate) fn collectable(&self, safe_point: u64, record_floor: u64) -> bool {
        safe_point > self.safe_point
            || self
                .outcomes
                .keys()
                .any(|&(_, _, start_ts)| start_ts < record_floor)
    }

    /// Applies a `TxnGc` entry: raises the safe point, and drops the outcomes of
    /// transactions that started below `record_floor`.
    pub(crate) fn collect(&mut self, safe_point: u64, record_floor: u64) {
        self.safe_point = self.safe_point.max(safe_point);
        self.outcomes
            .retain(|&(_, _, start_ts), _| start_ts >= record_floor);
    }

    /// Locks `key` of `tablet` for a prewrite (replacing nothing: the leader checked).
    pub(crate) fn install(&mut self, tablet_id: u64, lock: Lock) {
        self.locks
            .insert((tablet_id, lock.mutation.key.clone()), lock);
    }

    /// Removes `start_ts`'s lock on `key`, resolved at `index`, and returns it; `None` if
    /// the key holds no lock of that transaction (resolved before).
    pub(crate) fn release(
        &mut self,
        tablet_id: u64,
        key: &Bytes,
        start_ts: u64,
        index: u64,
    ) -> Option<Lock> {
        let map_key = (tablet_id, key.clone());
        if self.locks.get(&map_key)?.start_ts != start_ts {
            return None;
        }
        let lock = self.locks.remove(&map_key)?;
        self.resolved.push((lock.prewrite_index, index));
        Some(lock)
    }

    /// What became of the transaction `start_ts` whose primary is `primary_key`:
    /// `Some(commit_ts)` once decided, 0 for a rollback.
    pub(crate) fn outcome(
        &self,
        tablet_id: u64,
        primary_key: &Bytes,
        start_ts: u64,
    ) -> Option<u64> {
        self.outcomes
            .get(&(tablet_id, primary_key.clone(), start_ts))
            .map(|&(commit_ts, _)| commit_ts)
    }

    /// Records the outcome of the transaction `start_ts` whose primary is `primary_key`,
    /// decided at `index`. The first decision stands.
    pub(crate) fn decide(
        &mut self,
        tablet_id: u64,
        primary_key: Bytes,
        start_ts: u64,
        commit_ts: u64,
        index: u64,
    ) {
        self.outcomes
            .entry((tablet_id, primary_key, start_ts))
            .or_insert((commit_ts, index));
    }

    /// The highest index at most `candidate` at which no lock was held: truncating the log
    /// there keeps every prewrite of a lock that was live at or after it.
    pub(crate) fn truncation_bound(&self, candidate: u64) -> u64 {
        let mut spans: Vec<(u64, u64)> = self
            .locks
            .values()
            .map(|lock| (lock.prewrite_index, u64::MAX))
            .chain(self.resolved.iter().copied())
            .collect();
        // Highest prewrite first: lowering the bound below one span can only move it into
        // spans that start lower.
        spans.sort_unstable_by(|a, b| b.cmp(a));
        let mut bound = candidate;
        for (prewrite, resolve) in spans {
            if prewrite <= bound && bound < resolve {
                bound = prewrite.saturating_sub(1);
            }
        }
        bound
    }

    /// Forgets resolved spans that end at or below the truncation point.
    pub(crate) fn truncated(&mut self, index: u64) {
        self.resolved.retain(|&(_, resolve)| resolve > index);
    }

    /// The number of keys of tablet `tablet_id` that are locked.
    pub(crate) fn locks_in(&self, tablet_id: u64) -> usize {
        self.locks
            .range((tablet_id, Bytes::new())..)
            .take_while(|((tablet, _), _)| *tablet == tablet_id)
            .count()
    }

    /// Hands the outcomes of tablet `from`'s primaries at or above `at` to tablet `to`: the
    /// tablet split there.
    pub(crate) fn move_records(&mut self, from: u64, at: &[u8], to: u64) {
        let moving: Vec<(u64, Bytes, u64)> = self
            .outcomes
            .keys()
            .filter(|(tablet, primary, _)| *tablet == from && primary.as_ref() >= at)
            .cloned()
            .collect();
        for key in moving {
            if let Some(outcome) = self.outcomes.remove(&key) {
                let (_, primary, start_ts) = key;
                self.outcomes.insert((to, primary, start_ts), outcome);
            }
        }
    }

    /// The outcomes of transactions whose primary is in tablet `tablet_id`, for the group
    /// the tablet moves to.
    pub(crate) fn records_of(&self, tablet_id: u64) -> Vec<TxnRecord> {
        self.records_where(|tablet, _| tablet == tablet_id)
    }

    /// The outcomes decided at or below `index`, for a snapshot of the group there.
    pub(crate) fn records_up_to(&self, index: u64) -> Vec<TxnRecord> {
        self.records_where(|_, at| at <= index)
    }

    /// The outcomes whose tablet and deciding index pass `keep`, oldest decision first.
    fn records_where(&self, keep: impl Fn(u64, u64) -> bool) -> Vec<TxnRecord> {
        let mut records: Vec<TxnRecord> = self
            .outcomes
            .iter()
            .filter(|((tablet_id, _, _), (_, at))| keep(*tablet_id, *at))
            .map(
                |((tablet_id, primary_key, start_ts), (commit_ts, at))| TxnRecord {
                    tablet_id: *tablet_id,
                    primary_key: primary_key.clone(),
                    start_ts: *start_ts,
                    commit_ts: *commit_ts,
                    index: *at,
                },
            )
            .collect();
        records.sort_by_key(|record| record.index);
        records
    }

    /// The state a snapshot stands for: its outcomes and safe point, and no locks.
    pub(crate) fn from_records(records: &[TxnRecord], safe_point: u64) -> TxnState {
        let mut state = TxnState {
            safe_point,
            ..TxnState::default()
        };
        for record in records {
            state.decide(
                record.tablet_id,
                record.primary_key.clone(),
                record.start_ts,
                record.commit_ts,
                record.index,
            );
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(key: &'static str, start_ts: u64, prewrite_index: u64) -> Lock {
        Lock {
            start_ts,
            collection: "c".into(),
            primary_collection: "c".into(),
            primary_key: Bytes::from_static(b"p"),
            ttl_ms: 3000,
            mutation: Mutation {
                key: Bytes::from_static(key.as_bytes()),
                ..Mutation::default()
            },
            prewrite_index,
        }
    }

    #[test]
    fn reads_are_blocked_only_by_transactions_that_started_at_or_before_them() {
        let mut state = TxnState::default();
        state.install(1, lock("b", 10, 5));
        let key = Bytes::from_static(b"b");
        assert!(state.blocking_read(1, &key, 9).is_none());
        assert!(state.blocking_read(1, &key, 10).is_some());
        assert!(state.blocking_read(2, &key, 10).is_none(), "other tablet");
        let range = |start: &'static str, end: Option<&'static str>| {
            KeyRange::new(
                Bytes::from_static(start.as_bytes()),
                end.map(|end| Bytes::from_static(end.as_bytes())),
            )
        };
        assert!(state.blocking_scan(1, &range("a", Some("c")), 11).is_some());
        assert!(
            state.blocking_scan(1, &range("a", Some("b")), 11).is_none(),
            "end is exclusive"
        );
        assert!(state.blocking_scan(1, &range("a", None), 11).is_some());
        assert!(state.blocking_scan(0, &range("a", None), 11).is_none());
        assert!(state.blocking_scan(1, &range("c", None), 11).is_none());
    }

    #[test]
    fn only_the_owner_releases_a_lock() {
        let mut state = TxnState::default();
        state.install(1, lock("k", 10, 5));
        let key = Bytes::from_static(b"k");
        assert!(state.release(1, &key, 11, 6).is_none());
        assert!(state.release(1, &key, 10, 7).is_some());
        assert!(state.release(1, &key, 10, 8).is_none(), "released once");
        assert!(!state.has_locks());
    }

    #[test]
    fn the_log_is_never_truncated_where_a_lock_was_held() {
        let mut state = TxnState::default();
        state.install(1, lock("b", 11, 30));
        state.release(1, &Bytes::from_static(b"b"), 11, 40);
        state.install(1, lock("c", 12, 45));
        state.release(1, &Bytes::from_static(b"c"), 12, 50);
        assert_eq!(state.truncation_bound(15), 15, "before every lock");
        assert_eq!(state.truncation_bound(47), 44, "c was held at 47");
        assert_eq!(state.truncation_bound(42), 42, "between b and c");
        assert_eq!(state.truncation_bound(35), 29, "b was held at 35");
        assert_eq!(state.truncation_bound(60), 60, "both resolved by 60");
        state.install(1, lock("a", 10, 20));
        assert_eq!(state.truncation_bound(60), 19, "a is held");
        state.release(1, &Bytes::from_static(b"a"), 10, 55);
        assert_eq!(state.truncation_bound(60), 60);
        assert_eq!(state.truncation_bound(52), 19, "a was held at 52");
        state.truncated(55);
        assert!(
            state.resolved.is_empty(),
            "spans that ended by the truncation are dropped"
        );
    }

    #[test]
    fn outcomes_survive_a_snapshot_and_the_first_decision_stands() {
        let mut state = TxnState::default();
        let primary = Bytes::from_static(b"p");
        state.decide(1, primary.clone(), 10, 15, 7);
        state.decide(1, primary.clone(), 10, 0, 9);
        state.decide(1, primary.clone(), 20, 0, 12);
        assert_eq!(state.outcome(1, &primary, 10), Some(15));
        let restored = TxnState::from_records(&state.records_up_to(10), 7);
        assert_eq!(restored.outcome(1, &primary, 10), Some(15));
        assert_eq!(restored.outcome(1, &primary, 20), None, "decided after 10");
        assert_eq!(restored.safe_point(), 7);
    }

    #[test]
    fn gc_drops_outcomes_below_the_record_floor_and_the_floor_follows_locks() {
        let mut state = TxnState::default();
        let primary = Bytes::from_static(b"p");
        state.decide(1, primary.clone(), 10, 15, 7);
        state.decide(1, primary.clone(), 20, 0, 8);
        state.decide(2, primary.clone(), 30, 35, 9);
        assert_eq!(state.lock_floor(), 0, "no safe point applied yet");
        state.install(1, lock("k", 25, 10));
        assert!(!state.collectable(0, 10), "nothing started below 10");
        assert!(state.collectable(0, 11));
        assert!(state.collectable(5, 0), "a higher safe point");
        state.collect(40, 21);
        assert_eq!(state.outcome(1, &primary, 10), None);
        assert_eq!(state.outcome(1, &primary, 20), None);
        assert_eq!(state.outcome(2, &primary, 30), Some(35));
        assert_eq!(state.safe_point(), 40);
        assert_eq!(state.lock_floor(), 25, "the held lock is older");
        state.release(1, &Bytes::from_static(b"k"), 25, 11);
        assert_eq!(state.lock_floor(), 40);
        state.collect(30, 0);
        assert_eq!(state.safe_point(), 40, "never lowered");
        assert!(!state.collectable(40, 30));
    }
}
