//! Merging sorted sources (memtables and tables) into one ordered stream of
//! versions, and reducing that stream to what a snapshot sees.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use bytes::Bytes;

use crate::error::Result;
use crate::memstore::MemCursor;
use crate::table::TableCursor;
use crate::types::{Direction, Kind, Timestamp, VersionedEntry};

/// One sorted input.
pub(crate) enum Source {
    Mem(MemCursor),
    Table(Box<TableCursor>),
}

impl Source {
    async fn next_entry(&mut self) -> Result<Option<VersionedEntry>> {
        match self {
            Source::Mem(cursor) => Ok(cursor.next_entry()),
            Source::Table(cursor) => cursor.next_entry().await,
        }
    }
}

struct Head {
    entry: VersionedEntry,
    /// Lower index = newer source; it wins ties on (key, ts).
    source: usize,
    direction: Direction,
}

impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        // Merge order is (key asc, ts desc) forward and its reverse backward;
        // BinaryHeap pops the greatest, so "comes first" must compare greatest.
        let merge_order = self
            .entry
            .key
            .cmp(&other.entry.key)
            .then_with(|| other.entry.ts.cmp(&self.entry.ts));
        let first = match self.direction {
            Direction::Forward => merge_order.reverse(),
            Direction::Reverse => merge_order,
        };
        first.then_with(|| other.source.cmp(&self.source))
    }
}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Head {}

/// Every version from all sources in (key asc, ts desc) order (or its
/// reverse), each (key, ts) once: the newest source's copy wins.
pub(crate) struct MergeIterator {
    sources: Vec<Source>,
    direction: Direction,
    heads: BinaryHeap<Head>,
    last: Option<(Bytes, Timestamp)>,
    /// The key `next_visible` last resolved: its older versions are skipped.
    resolved: Option<Bytes>,
}

impl MergeIterator {
    /// Merges `sources`, given newest first, all running in `direction`.
    pub(crate) async fn new(
        mut sources: Vec<Source>,
        direction: Direction,
    ) -> Result<MergeIterator> {
        let mut heads = BinaryHeap::with_capacity(sources.len());
        for (index, source) in sources.iter_mut().enumerate() {
            if let Some(entry) = source.next_entry().await? {
                heads.push(Head {
                    entry,
                    source: index,
                    direction,
                });
            }
        }
        Ok(MergeIterator {
            sources,
            direction,
            heads,
            last: None,
            resolved: None,
        })
    }

    pub(crate) async fn next_entry(&mut self) -> Result<Option<VersionedEntry>> {
        while let Some(Head {
            entry,
            source,
            direction,
        }) = self.heads.pop()
        {
            if let Some(next) = self.sources[source].next_entry().await? {
                self.heads.push(Head {
                    entry: next,
                    source,
                    direction,
                });
            }
            let duplicate = self
                .last
                .as_ref()
                .is_some_and(|(key, ts)| *key == entry.key && *ts == entry.ts);
            if !duplicate {
                self.last = Some((entry.key.clone(), entry.ts));
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// The next live key and its value as of `read_ts`, skipping deleted keys,
    /// versions newer than the snapshot, and older versions.
    pub(crate) async fn next_visible(
        &mut self,
        read_ts: Timestamp,
    ) -> Result<Option<(Bytes, Bytes)>> {
        if self.direction == Direction::Reverse {
            return self.previous_visible(read_ts).await;
        }
        while let Some(entry) = self.next_entry().await? {
            if self.resolved.as_ref() == Some(&entry.key) || entry.ts > read_ts {
                continue;
            }
            self.resolved = Some(entry.key.clone());
            if entry.kind == Kind::Put {
                return Ok(Some((entry.key, entry.value)));
            }
        }
        Ok(None)
    }

    /// Backward, a key's versions arrive oldest first: the visible one is the
    /// last at or below `read_ts` before the key changes.
    async fn previous_visible(&mut self, read_ts: Timestamp) -> Result<Option<(Bytes, Bytes)>> {
        while let Some(first) = self.next_entry().await? {
            let mut visible = (first.ts <= read_ts).then_some(first.clone());
            while self
                .heads
                .peek()
                .is_some_and(|head| head.entry.key == first.key)
            {
                match self.next_entry().await? {
                    Some(entry) if entry.ts <= read_ts => visible = Some(entry),
                    Some(_) => {}
                    None => break,
                }
            }
            if let Some(entry) = visible.filter(|entry| entry.kind == Kind::Put) {
                return Ok(Some((entry.key, entry.value)));
            }
        }
        Ok(None)
    }
}

/// Decides which versions a compaction keeps.
///
/// Versions above the GC safe point are all kept (a snapshot may read them).
/// At or below it only the newest version of each key matters, and not even
/// that when it is a tombstone with nothing older left beneath the output.
pub(crate) struct GcFilter {
    safe_point: Timestamp,
    drop_tombstones: bool,
    key: Option<Bytes>,
    kept_below_safe_point: bool,
}

impl GcFilter {
    pub(crate) fn new(safe_point: Timestamp, drop_tombstones: bool) -> GcFilter {
        GcFilter {
            safe_point,
            drop_tombstones,
            key: None,
            kept_below_safe_point: false,
        }
    }

    /// Whether to keep `entry`; entries must arrive in merge order.
    pub(crate) fn keep(&mut self, entry: &VersionedEntry) -> bool {
        if self.key.as_ref() != Some(&entry.key) {
            self.key = Some(entry.key.clone());
            self.kept_below_safe_point = false;
        }
        if entry.ts > self.safe_point {
            return true;
        }
        if self.kept_below_safe_point {
            return false;
        }
        // The newest version at or below the safe point: what every snapshot sees.
        self.kept_below_safe_point = true;
        !(entry.kind == Kind::Delete && self.drop_tombstones)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::memstore::{MemoryBudget, Memtable};
    use crate::types::KeyRange;

    fn memtable(entries: &[(&str, u64, Kind)]) -> Arc<Memtable> {
        let table = Arc::new(Memtable::new(Arc::new(MemoryBudget::new(usize::MAX))));
        for (key, ts, kind) in entries {
            table.insert(
                key.as_bytes(),
                *ts,
                *kind,
                format!("{key}@{ts}").as_bytes(),
                1,
            );
        }
        table
    }

    async fn merged(tables: &[Arc<Memtable>]) -> MergeIterator {
        merged_in(tables, Direction::Forward).await
    }

    async fn merged_in(tables: &[Arc<Memtable>], direction: Direction) -> MergeIterator {
        let sources = tables
            .iter()
            .map(|t| Source::Mem(t.cursor(&KeyRange::all(), direction)))
            .collect();
        MergeIterator::new(sources, direction).await.unwrap()
    }

    #[tokio::test]
    async fn merges_in_order_and_drops_duplicates() {
        let newer = memtable(&[("a", 5, Kind::Put), ("c", 9, Kind::Put)]);
        let older = memtable(&[
            ("a", 5, Kind::Put),
            ("a", 3, Kind::Put),
            ("b", 1, Kind::Delete),
        ]);
        let mut merge = merged(&[newer, older]).await;
        let mut seen = Vec::new();
        while let Some(e) = merge.next_entry().await.unwrap() {
            seen.push((String::from_utf8(e.key.to_vec()).unwrap(), e.ts));
        }
        let want = [("a", 5), ("a", 3), ("b", 1), ("c", 9)].map(|(k, t)| (k.to_string(), t));
        assert_eq!(seen, want);
    }

    #[tokio::test]
    async fn visible_reads_respect_snapshot_and_tombstones() {
        let table = memtable(&[
            ("a", 5, Kind::Put),
            ("a", 3, Kind::Put),
            ("b", 4, Kind::Delete),
            ("b", 2, Kind::Put),
            ("c", 9, Kind::Put),
        ]);
        let collect = |read_ts| {
            let table = Arc::clone(&table);
            async move {
                let mut merge = merged_in(&[table], Direction::Forward).await;
                let mut seen = Vec::new();
                while let Some((_, v)) = merge.next_visible(read_ts).await.unwrap() {
                    seen.push(String::from_utf8(v.to_vec()).unwrap());
                }
                seen
            }
        };
        assert_eq!(collect(10).await, ["a@5", "c@9"]);
        assert_eq!(collect(3).await, ["a@3", "b@2"]);
        assert!(collect(1).await.is_empty());
        for read_ts in [1, 3, 4, 10] {
            let mut merge = merged_in(&[Arc::clone(&table)], Direction::Reverse).await;
            let mut backward = Vec::new();
            while let Some((_, v)) = merge.next_visible(read_ts).await.unwrap() {
                backward.push(String::from_utf8(v.to_vec()).unwrap());
            }
            backward.reverse();
            assert_eq!(backward, collect(read_ts).await, "at {read_ts}");
        }
    }

    #[test]
    fn gc_keeps_what_snapshots_at_or_after_the_safe_point_see() {
        let entry = |key: &'static str, ts, kind| VersionedEntry {
            key: Bytes::from_static(key.as_bytes()),
            ts,
            kind,
            value: Bytes::new(),
        };
        let mut gc = GcFilter::new(10, true);
        assert!(gc.keep(&entry("a", 12, Kind::Put)), "above the safe point");
        assert!(
            gc.keep(&entry("a", 8, Kind::Put)),
            "newest at the safe point"
        );
        assert!(
            !gc.keep(&entry("a", 5, Kind::Put)),
            "shadowed below the safe point"
        );
        assert!(!gc.keep(&entry("b", 9, Kind::Delete)), "bottom tombstone");
        assert!(!gc.keep(&entry("b", 4, Kind::Put)), "under a tombstone");
        let mut keep_tombstones = GcFilter::new(10, false);
        assert!(keep_tombstones.keep(&entry("b", 9, Kind::Delete)));
        assert!(!keep_tombstones.keep(&entry("b", 4, Kind::Put)));
    }
}
