//! One memtable: a lock-free skiplist of versions ordered by (key asc, ts desc).

use std::cmp::Ordering as CmpOrdering;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;

use super::budget::MemoryBudget;
use crate::types::{Direction, KeyRange, Kind, Lookup, Timestamp, VersionedEntry};

/// Bytes a skiplist entry costs beyond its key and value: the node (header, the
/// [`MemKey`] itself, the tower) and allocator rounding of the two allocations.
/// Measured by `tests/memstore_memory.rs`; the estimate drives rotation and backpressure.
pub(crate) const ENTRY_OVERHEAD: usize = 88;

/// A version in the skiplist. Key and value share one allocation, which keeps a
/// MemStore under 2x the raw bytes it holds; only (key, ts) take part in ordering.
pub(crate) struct MemKey {
    /// The key's first 16 bytes, big-endian and zero-padded: most comparisons
    /// during a skiplist search end here, without touching the heap.
    prefix: u128,
    data: Box<[u8]>,
    key_len: u32,
    kind: Kind,
    ts: Timestamp,
}

impl MemKey {
    fn new(key: &[u8], ts: Timestamp, kind: Kind, value: &[u8]) -> MemKey {
        let mut data = Vec::with_capacity(key.len() + value.len());
        data.extend_from_slice(key);
        data.extend_from_slice(value);
        let mut prefix = [0u8; 16];
        let head = key.len().min(16);
        prefix[..head].copy_from_slice(&key[..head]);
        MemKey {
            prefix: u128::from_be_bytes(prefix),
            data: data.into_boxed_slice(),
            // Keys are limited to a few KiB long before they reach a memtable.
            key_len: u32::try_from(key.len()).unwrap_or(u32::MAX),
            kind,
            ts,
        }
    }

    /// A search key: sorts before every version of `key` visible at `ts`.
    fn probe(key: &[u8], ts: Timestamp) -> MemKey {
        MemKey::new(key, ts, Kind::Put, &[])
    }

    pub(crate) fn key(&self) -> &[u8] {
        &self.data[..self.key_len as usize]
    }

    pub(crate) fn value(&self) -> &[u8] {
        &self.data[self.key_len as usize..]
    }

    pub(crate) fn ts(&self) -> Timestamp {
        self.ts
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    fn to_entry(&self) -> VersionedEntry {
        VersionedEntry {
            key: Bytes::copy_from_slice(self.key()),
            ts: self.ts,
            kind: self.kind,
            value: Bytes::copy_from_slice(self.value()),
        }
    }

    fn duplicate(&self) -> MemKey {
        MemKey {
            prefix: self.prefix,
            data: self.data.clone(),
            key_len: self.key_len,
            kind: self.kind,
            ts: self.ts,
        }
    }
}

impl Ord for MemKey {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.prefix
            .cmp(&other.prefix)
            .then_with(|| self.key().cmp(other.key()))
            .then_with(|| other.ts.cmp(&self.ts))
    }
}

impl PartialOrd for MemKey {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for MemKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for MemKey {}

/// A skiplist of versions plus the bookkeeping a flush needs.
pub struct Memtable {
    map: SkipMap<MemKey, ()>,
    approximate_bytes: AtomicUsize,
    raw_bytes: AtomicUsize,
    max_seq: AtomicU64,
    max_ts: AtomicU64,
    budget: Arc<MemoryBudget>,
}

impl Memtable {
    pub(crate) fn new(budget: Arc<MemoryBudget>) -> Memtable {
        Memtable {
            map: SkipMap::new(),
            approximate_bytes: AtomicUsize::new(0),
            raw_bytes: AtomicUsize::new(0),
            max_seq: AtomicU64::new(0),
            max_ts: AtomicU64::new(0),
            budget,
        }
    }

    /// Inserts one version written by journal entry `seq`. Re-inserting the
    /// same (key, ts) replaces it, which makes replay idempotent.
    pub(crate) fn insert(&self, key: &[u8], ts: Timestamp, kind: Kind, value: &[u8], seq: u64) {
        let raw = key.len() + value.len();
        let charged = raw + ENTRY_OVERHEAD;
        self.map.insert(MemKey::new(key, ts, kind, value), ());
        self.approximate_bytes.fetch_add(charged, Ordering::Relaxed);
        self.raw_bytes.fetch_add(raw, Ordering::Relaxed);
        self.budget.charge(charged);
        self.max_seq.fetch_max(seq, Ordering::Relaxed);
        self.max_ts.fetch_max(ts, Ordering::Relaxed);
    }

    /// Records that journal entries up to `seq` are reflected here even if they wrote nothing.
    pub(crate) fn note_seq(&self, seq: u64) {
        self.max_seq.fetch_max(seq, Ordering::Relaxed);
    }

    /// The newest version of `key` with a timestamp at or below `read_ts`.
    pub fn get(&self, key: &[u8], read_ts: Timestamp) -> Lookup {
        let probe = MemKey::probe(key, read_ts);
        match self.map.lower_bound(Bound::Included(&probe)) {
            Some(entry) if entry.key().key() == key => {
                let version = entry.key();
                match version.kind() {
                    Kind::Put => Lookup::Value {
                        value: Bytes::copy_from_slice(version.value()),
                        ts: version.ts(),
                    },
                    Kind::Delete => Lookup::Deleted { ts: version.ts() },
                }
            }
            _ => Lookup::Absent,
        }
    }

    /// Estimated memory held, used for rotation and backpressure.
    pub fn approximate_bytes(&self) -> usize {
        self.approximate_bytes.load(Ordering::Relaxed)
    }

    /// Sum of key and value lengths held.
    pub fn raw_bytes(&self) -> usize {
        self.raw_bytes.load(Ordering::Relaxed)
    }

    /// Number of versions held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the memtable holds no version.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The highest journal index written into this memtable.
    pub fn max_seq(&self) -> u64 {
        self.max_seq.load(Ordering::Relaxed)
    }

    /// The highest commit timestamp held (0 when empty).
    pub fn max_ts(&self) -> Timestamp {
        self.max_ts.load(Ordering::Relaxed)
    }

    /// Visits every version in (key asc, ts desc) order.
    pub(crate) fn for_each(&self, mut visit: impl FnMut(&MemKey)) {
        for entry in self.map.iter() {
            visit(entry.key());
        }
    }

    /// A cursor over the versions of keys in `range`: (key asc, ts desc)
    /// forward, the exact reverse of that backward.
    pub(crate) fn cursor(self: &Arc<Self>, range: &KeyRange, direction: Direction) -> MemCursor {
        let position = match (direction, &range.end) {
            (Direction::Forward, _) => Bound::Included(MemKey::probe(&range.start, Timestamp::MAX)),
            // Every version of every key below `end` sorts before (end, MAX).
            (Direction::Reverse, Some(end)) => Bound::Excluded(MemKey::probe(end, Timestamp::MAX)),
            (Direction::Reverse, None) => Bound::Unbounded,
        };
        MemCursor {
            table: Arc::clone(self),
            position,
            range: range.clone(),
            direction,
        }
    }
}

impl Drop for Memtable {
    fn drop(&mut self) {
        self.budget.release(self.approximate_bytes());
    }
}

/// An owned forward cursor over a memtable. Each step re-seeks from the last
/// key, so it holds no skiplist reference between steps and never blocks writers.
pub(crate) struct MemCursor {
    table: Arc<Memtable>,
    position: Bound<MemKey>,
    range: KeyRange,
    direction: Direction,
}

impl MemCursor {
    pub(crate) fn next_entry(&mut self) -> Option<VersionedEntry> {
        let entry = match self.direction {
            Direction::Forward => self.table.map.lower_bound(self.position.as_ref())?,
            Direction::Reverse => self.table.map.upper_bound(self.position.as_ref())?,
        };
        let version = entry.key();
        if !self.range.contains(version.key()) {
            return None;
        }
        let owned = version.to_entry();
        self.position = Bound::Excluded(version.duplicate());
        Some(owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Arc<Memtable> {
        Arc::new(Memtable::new(Arc::new(MemoryBudget::new(usize::MAX))))
    }

    #[test]
    fn get_sees_newest_version_at_or_below_read_ts() {
        let t = table();
        t.insert(b"k", 10, Kind::Put, b"v10", 1);
        t.insert(b"k", 20, Kind::Delete, b"", 2);
        t.insert(b"k", 30, Kind::Put, b"v30", 3);
        t.insert(b"j", 25, Kind::Put, b"j", 4);
        assert_eq!(t.get(b"k", 5), Lookup::Absent);
        assert_eq!(t.get(b"k", 10).into_value().as_deref(), Some(&b"v10"[..]));
        assert_eq!(t.get(b"k", 19).into_value().as_deref(), Some(&b"v10"[..]));
        assert_eq!(t.get(b"k", 20), Lookup::Deleted { ts: 20 });
        assert_eq!(
            t.get(b"k", u64::MAX).into_value().as_deref(),
            Some(&b"v30"[..])
        );
        assert_eq!(t.get(b"kk", u64::MAX), Lookup::Absent);
        assert_eq!(t.max_seq(), 4);
        assert_eq!(t.max_ts(), 30);
    }

    #[test]
    fn cursor_walks_keys_ascending_and_versions_descending() {
        let t = table();
        for (key, ts) in [(&b"b"[..], 1), (b"a", 1), (b"b", 3), (b"c", 2), (b"a", 2)] {
            t.insert(key, ts, Kind::Put, b"", 1);
        }
        let range = KeyRange::new(&b"a"[..], Some(Bytes::from_static(b"c")));
        let walk = |direction| {
            let mut cursor = t.cursor(&range, direction);
            let mut seen = Vec::new();
            while let Some(entry) = cursor.next_entry() {
                seen.push((entry.key.to_vec(), entry.ts));
            }
            seen
        };
        let mut forward = vec![
            (b"a".to_vec(), 2),
            (b"a".to_vec(), 1),
            (b"b".to_vec(), 3),
            (b"b".to_vec(), 1),
        ];
        assert_eq!(walk(Direction::Forward), forward);
        forward.reverse();
        assert_eq!(walk(Direction::Reverse), forward);
    }

    #[test]
    fn reinserting_a_version_replaces_it() {
        let t = table();
        t.insert(b"k", 7, Kind::Put, b"x", 1);
        t.insert(b"k", 7, Kind::Put, b"x", 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn dropping_releases_the_budget() {
        let budget = Arc::new(MemoryBudget::new(usize::MAX));
        let t = Memtable::new(Arc::clone(&budget));
        t.insert(b"k", 1, Kind::Put, b"value", 1);
        assert!(budget.used() > 0);
        drop(t);
        assert_eq!(budget.used(), 0);
    }
}
