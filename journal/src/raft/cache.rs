//! The in-memory tail of one stream's raft log.
//!
//! raft-rs 0.7 reads entries back from storage as soon as `advance_append_async` returns,
//! but the ready loop hands the engine write to the sync thread (so the loop never waits
//! behind an fsync in raft-engine's write group). Until that write lands, the entries live
//! only here. The cache also keeps recent written entries that a leader's followers have
//! not matched yet, so replication is served from memory instead of decoding the engine's
//! files.

use std::collections::VecDeque;

use protobuf::Message as _;
use raft::eraftpb::Entry;

/// Contiguous entries `first..=last` of one stream, and their total size.
#[derive(Debug, Default)]
pub(crate) struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl EntryCache {
    /// The first cached index, if any.
    pub(crate) fn first(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    /// The last cached index, if any.
    pub(crate) fn last(&self) -> Option<u64> {
        self.entries.back().map(|e| e.index)
    }

    /// Bytes of entry data cached.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends `entries` (contiguous), replacing every cached entry at or after the first
    /// of them: raft overwrites a conflicting tail that way.
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        match (self.first(), self.last()) {
            (Some(start), Some(last)) if first.index > start && first.index <= last + 1 => {
                self.truncate_from(first.index);
            }
            // Empty, or the new entries start at or before the cache (a conflict older
            // than anything cached), or after a gap: the cache restarts with them.
            _ => self.clear(),
        }
        for entry in entries {
            self.bytes += entry.data.len();
            self.entries.push_back(entry.clone());
        }
    }

    fn truncate_from(&mut self, index: u64) {
        while self.last().is_some_and(|last| last >= index) {
            if let Some(entry) = self.entries.pop_back() {
                self.bytes -= entry.data.len();
            }
        }
    }

    fn position(&self, index: u64) -> Option<usize> {
        let first = self.first()?;
        let offset = usize::try_from(index.checked_sub(first)?).ok()?;
        (offset < self.entries.len()).then_some(offset)
    }

    /// The term of the entry at `index`, if cached.
    pub(crate) fn term(&self, index: u64) -> Option<u64> {
        self.position(index).map(|i| self.entries[i].term)
    }

    /// Appends the cached entries `low..high` to `out` while they fit in `max_size` bytes
    /// (as raft counts them, in addition to `used`; at least one entry if `out` is empty).
    /// Returns false if an index in the range is not cached.
    pub(crate) fn read(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
        mut used: u64,
        out: &mut Vec<Entry>,
    ) -> bool {
        if low >= high {
            return true;
        }
        let (Some(start), Some(end)) = (self.position(low), self.position(high - 1)) else {
            return false;
        };
        for entry in self.entries.range(start..=end) {
            used += u64::from(entry.compute_size());
            if !out.is_empty() && max_size.is_some_and(|max| used > max) {
                break;
            }
            out.push(entry.clone());
        }
        true
    }

    /// Drops every entry: a snapshot replaced the log.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops the entries up to `index` (inclusive).
    pub(crate) fn compact_to(&mut self, index: u64) {
        while self.first().is_some_and(|first| first <= index) {
            if let Some(entry) = self.entries.pop_front() {
                self.bytes -= entry.data.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![0; 10].into(),
            ..Default::default()
        }
    }

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|i| entry(i, term)).collect()
    }

    #[test]
    fn appends_replace_a_conflicting_tail() {
        let mut cache = EntryCache::default();
        cache.append(&entries(1..=5, 1));
        assert_eq!(
            (cache.first(), cache.last(), cache.bytes()),
            (Some(1), Some(5), 50)
        );
        cache.append(&entries(4..=6, 2));
        assert_eq!((cache.first(), cache.last()), (Some(1), Some(6)));
        assert_eq!(cache.term(3), Some(1));
        assert_eq!(cache.term(4), Some(2));
        assert_eq!(cache.term(7), None);
        // A conflict before the first cached entry restarts the cache.
        cache.append(&entries(1..=2, 3));
        assert_eq!(
            (cache.first(), cache.last(), cache.bytes()),
            (Some(1), Some(2), 20)
        );
    }

    #[test]
    fn reads_stop_at_the_size_limit_and_report_holes() {
        let mut cache = EntryCache::default();
        cache.append(&entries(3..=8, 1));
        let size = u64::from(entry(3, 1).compute_size());
        let mut out = Vec::new();
        assert!(cache.read(3, 9, Some(size * 2), 0, &mut out));
        assert_eq!(out.iter().map(|e| e.index).collect::<Vec<_>>(), [3, 4]);
        let mut out = Vec::new();
        assert!(cache.read(4, 6, Some(0), 0, &mut out));
        assert_eq!(out.len(), 1, "at least one entry");
        assert!(!cache.read(2, 5, None, 0, &mut Vec::new()));
        assert!(!cache.read(7, 10, None, 0, &mut Vec::new()));
        cache.compact_to(5);
        assert_eq!((cache.first(), cache.bytes()), (Some(6), 30));
        cache.compact_to(100);
        assert_eq!(
            (cache.first(), cache.last(), cache.bytes()),
            (None, None, 0)
        );
    }
}
