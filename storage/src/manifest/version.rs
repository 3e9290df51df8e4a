//! The state a manifest describes: the live tables by level, and the tablets
//! with their epochs and flush markers. Replaying edits in order over a
//! checkpoint rebuilds it; every reader applies the same rules, so every
//! reader agrees on which edits were fenced out.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use luna_proto::manifest as pb;

use crate::table::PinnedIndex;
use crate::types::{KeyRange, TabletId, Timestamp};

/// Number of levels in a BaseStore's LSM (L0 plus six sorted levels).
pub const LEVELS: usize = 7;

/// An immutable table in the BaseStore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Object name relative to the BaseStore root.
    pub name: String,
    /// LSM level.
    pub level: u32,
    /// Smallest user key.
    pub smallest: Bytes,
    /// Largest user key.
    pub largest: Bytes,
    /// Oldest commit timestamp held.
    pub min_ts: Timestamp,
    /// Newest commit timestamp held.
    pub max_ts: Timestamp,
    /// Versions held.
    pub rows: u64,
    /// Object size.
    pub size_bytes: u64,
    /// Sequence number of the edit that added it.
    pub added_seq: u64,
    /// The open index, while the cache holds it.
    pub pinned: PinnedIndex,
}

/// What the BaseStore records about one tablet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TabletInfo {
    /// The tablet.
    pub tablet_id: TabletId,
    /// Its current owner's epoch.
    pub epoch: u64,
    /// Its key range.
    pub range: KeyRange,
    /// Every journal entry up to this index is in a table.
    pub flushed_up_to: u64,
}

/// One consistent state of the BaseStore.
#[derive(Debug, Clone)]
pub struct Version {
    seq: u64,
    /// L0 newest first; deeper levels sorted by smallest key, not overlapping.
    levels: Vec<Vec<Arc<TableInfo>>>,
    tablets: BTreeMap<TabletId, TabletInfo>,
    /// The highest GC safe point any compaction dropped versions below: reads below it
    /// may miss versions.
    gc_safe_point: Timestamp,
}

/// Why an edit was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The writer's epoch is older than the tablet's current one.
    StaleEpoch {
        /// The tablet.
        tablet_id: TabletId,
        /// The writer's epoch.
        epoch: u64,
        /// The recorded epoch (0 when the tablet is unknown).
        current: u64,
    },
    /// A compaction removed a table that was no longer live.
    MissingTable(String),
    /// The edit carried no change.
    Empty,
}

impl Default for Version {
    fn default() -> Self {
        Version {
            seq: 0,
            levels: vec![Vec::new(); LEVELS],
            tablets: BTreeMap::new(),
            gc_safe_point: 0,
        }
    }
}

impl Version {
    /// The sequence number of the last edit reflected.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The highest GC safe point a compaction in this version used: reads below it
    /// may miss versions the compaction dropped.
    pub fn gc_safe_point(&self) -> Timestamp {
        self.gc_safe_point
    }

    /// The tables of `level`.
    pub fn level(&self, level: usize) -> &[Arc<TableInfo>] {
        self.levels.get(level).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every live table.
    pub fn tables(&self) -> impl Iterator<Item = &Arc<TableInfo>> {
        self.levels.iter().flatten()
    }

    /// A tablet's record.
    pub fn tablet(&self, tablet_id: TabletId) -> Option<&TabletInfo> {
        self.tablets.get(&tablet_id)
    }

    /// Every tablet's record.
    pub fn tablets(&self) -> impl Iterator<Item = &TabletInfo> {
        self.tablets.values()
    }

    /// Whether a table of that name is live.
    pub fn contains_table(&self, name: &str) -> bool {
        self.tables().any(|table| table.name == name)
    }

    /// Tables whose key span holds `key`: L0 newest first, then at most one
    /// per sorted level, found by binary search.
    pub fn tables_for_key<'a>(
        &'a self,
        key: &'a [u8],
    ) -> impl Iterator<Item = &'a Arc<TableInfo>> + 'a {
        let covers = move |table: &&Arc<TableInfo>| {
            table.smallest.as_ref() <= key && key <= table.largest.as_ref()
        };
        let l0 = self.level(0).iter().filter(covers);
        let sorted = self.levels.iter().skip(1).filter_map(move |level| {
            let index = level.partition_point(|table| table.largest.as_ref() < key);
            level.get(index).filter(covers)
        });
        l0.chain(sorted)
    }

    /// Tables that may hold keys of `range`, in the order a read consults them:
    /// L0 newest first, then each deeper level.
    pub fn overlapping(&self, range: &KeyRange) -> Vec<Arc<TableInfo>> {
        self.tables()
            .filter(|table| range.overlaps(&table.smallest, &table.largest))
            .cloned()
            .collect()
    }

    /// Applies edit `edit` (whose sequence must be the next one), or says why not.
    /// The sequence advances either way: a rejected edit is still a log position.
    pub fn apply(&mut self, edit: &pb::ManifestEdit) -> Result<(), Rejection> {
        self.seq = edit.seq;
        match &edit.change {
            Some(pb::manifest_edit::Change::Claim(claim)) => {
                let tablet = claim.tablet.as_ref().ok_or(Rejection::Empty)?;
                self.apply_claim(tablet_from_pb(tablet), claim.log_floor)
            }
            Some(pb::manifest_edit::Change::Flush(flush)) => self.apply_flush(flush, edit.seq),
            Some(pb::manifest_edit::Change::Compaction(compaction)) => {
                self.apply_compaction(compaction, edit.seq)
            }
            None => Err(Rejection::Empty),
        }
    }

    /// A claim from a journal whose epochs start at `log_floor`: a recorded owner below it
    /// counted its flush marker in another journal's indexes, so the claim's marker
    /// replaces it.
    fn apply_claim(&mut self, tablet: TabletInfo, log_floor: u64) -> Result<(), Rejection> {
        let current = self.tablets.get(&tablet.tablet_id);
        let current_epoch = current.map_or(0, |t| t.epoch);
        if tablet.epoch <= current_epoch {
            return Err(Rejection::StaleEpoch {
                tablet_id: tablet.tablet_id,
                epoch: tablet.epoch,
                current: current_epoch,
            });
        }
        // A new owner in the same journal inherits the flush marker: what was flushed
        // stays flushed.
        let flushed_up_to = match current {
            Some(current) if current.epoch >= log_floor => {
                current.flushed_up_to.max(tablet.flushed_up_to)
            }
            _ => tablet.flushed_up_to,
        };
        self.tablets.insert(
            tablet.tablet_id,
            TabletInfo {
                flushed_up_to,
                ..tablet
            },
        );
        Ok(())
    }

    fn apply_flush(&mut self, flush: &pb::Flush, seq: u64) -> Result<(), Rejection> {
        let tablet = self.tablets.get_mut(&flush.tablet_id);
        let current = tablet.as_ref().map_or(0, |t| t.epoch);
        let Some(tablet) = tablet.filter(|t| t.epoch == flush.epoch) else {
            return Err(Rejection::StaleEpoch {
                tablet_id: flush.tablet_id,
                epoch: flush.epoch,
                current,
            });
        };
        tablet.flushed_up_to = tablet.flushed_up_to.max(flush.flushed_up_to);
        for added in &flush.added {
            self.insert_table(table_from_pb(added, seq));
        }
        Ok(())
    }

    fn apply_compaction(&mut self, compaction: &pb::Compaction, seq: u64) -> Result<(), Rejection> {
        if let Some(missing) = compaction
            .removed
            .iter()
            .find(|name| !self.contains_table(name))
        {
            return Err(Rejection::MissingTable(missing.clone()));
        }
        for level in &mut self.levels {
            level.retain(|table| !compaction.removed.contains(&table.name));
        }
        for added in &compaction.added {
            self.insert_table(table_from_pb(added, seq));
        }
        self.gc_safe_point = self.gc_safe_point.max(compaction.gc_safe_point);
        Ok(())
    }

    fn insert_table(&mut self, table: TableInfo) {
        let level = (table.level as usize).min(LEVELS - 1);
        let tables = &mut self.levels[level];
        tables.push(Arc::new(table));
        if level == 0 {
            tables.sort_by(|a, b| {
                b.added_seq
                    .cmp(&a.added_seq)
                    .then_with(|| a.name.cmp(&b.name))
            });
        } else {
            tables.sort_by(|a, b| a.smallest.cmp(&b.smallest));
        }
    }

    /// The state as a checkpoint message.
    pub fn to_checkpoint(&self) -> pb::Checkpoint {
        pb::Checkpoint {
            seq: self.seq,
            tables: self.tables().map(|t| table_to_pb(t)).collect(),
            tablets: self.tablets.values().map(tablet_to_pb).collect(),
            gc_safe_point: self.gc_safe_point,
        }
    }

    /// Rebuilds the state from a checkpoint.
    pub fn from_checkpoint(checkpoint: &pb::Checkpoint) -> Version {
        let mut version = Version {
            seq: checkpoint.seq,
            gc_safe_point: checkpoint.gc_safe_point,
            ..Version::default()
        };
        for table in &checkpoint.tables {
            version.insert_table(table_from_pb(table, table.added_seq));
        }
        for tablet in &checkpoint.tablets {
            let tablet = tablet_from_pb(tablet);
            version.tablets.insert(tablet.tablet_id, tablet);
        }
        version
    }
}

/// The protobuf form of a key range.
pub fn range_to_pb(range: &KeyRange) -> pb::KeyRange {
    pb::KeyRange {
        start: range.start.to_vec(),
        end: range.end.as_ref().map(|end| end.to_vec()),
    }
}

fn range_from_pb(range: Option<&pb::KeyRange>) -> KeyRange {
    range.map_or_else(KeyRange::all, |range| KeyRange {
        start: Bytes::copy_from_slice(&range.start),
        end: range.end.as_deref().map(Bytes::copy_from_slice),
    })
}

/// The protobuf form of a tablet record.
pub fn tablet_to_pb(tablet: &TabletInfo) -> pb::TabletState {
    pb::TabletState {
        tablet_id: tablet.tablet_id,
        epoch: tablet.epoch,
        range: Some(range_to_pb(&tablet.range)),
        flushed_up_to: tablet.flushed_up_to,
    }
}

fn tablet_from_pb(tablet: &pb::TabletState) -> TabletInfo {
    TabletInfo {
        tablet_id: tablet.tablet_id,
        epoch: tablet.epoch,
        range: range_from_pb(tablet.range.as_ref()),
        flushed_up_to: tablet.flushed_up_to,
    }
}

/// The protobuf form of a table record.
pub fn table_to_pb(table: &TableInfo) -> pb::TableMeta {
    pb::TableMeta {
        name: table.name.clone(),
        level: table.level,
        smallest_key: table.smallest.to_vec(),
        largest_key: table.largest.to_vec(),
        min_ts: table.min_ts,
        max_ts: table.max_ts,
        rows: table.rows,
        size_bytes: table.size_bytes,
        added_seq: table.added_seq,
    }
}

fn table_from_pb(table: &pb::TableMeta, added_seq: u64) -> TableInfo {
    TableInfo {
        name: table.name.clone(),
        level: table.level,
        smallest: Bytes::copy_from_slice(&table.smallest_key),
        largest: Bytes::copy_from_slice(&table.largest_key),
        min_ts: table.min_ts,
        max_ts: table.max_ts,
        rows: table.rows,
        size_bytes: table.size_bytes,
        added_seq,
        pinned: PinnedIndex::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::manifest_edit::Change;

    fn table(name: &str, level: u32, smallest: &str, largest: &str) -> pb::TableMeta {
        pb::TableMeta {
            name: name.into(),
            level,
            smallest_key: smallest.into(),
            largest_key: largest.into(),
            ..Default::default()
        }
    }

    fn edit(seq: u64, change: Change) -> pb::ManifestEdit {
        pb::ManifestEdit {
            seq,
            written_at_ms: 0,
            writer: "t".into(),
            change: Some(change),
        }
    }

    fn claim(seq: u64, tablet_id: u64, epoch: u64) -> pb::ManifestEdit {
        edit(
            seq,
            Change::Claim(pb::ClaimTablet {
                tablet: Some(pb::TabletState {
                    tablet_id,
                    epoch,
                    range: None,
                    flushed_up_to: 0,
                }),
                log_floor: 0,
            }),
        )
    }

    fn flush(
        seq: u64,
        tablet_id: u64,
        epoch: u64,
        upto: u64,
        added: Vec<pb::TableMeta>,
    ) -> pb::ManifestEdit {
        edit(
            seq,
            Change::Flush(pb::Flush {
                tablet_id,
                epoch,
                flushed_up_to: upto,
                added,
            }),
        )
    }

    #[test]
    fn stale_epochs_are_fenced_out() {
        let mut v = Version::default();
        v.apply(&claim(1, 9, 1)).unwrap();
        v.apply(&flush(2, 9, 1, 10, vec![table("a", 0, "a", "b")]))
            .unwrap();
        v.apply(&claim(3, 9, 2)).unwrap();
        let fenced = v.apply(&flush(4, 9, 1, 20, vec![table("b", 0, "a", "b")]));
        assert_eq!(
            fenced,
            Err(Rejection::StaleEpoch {
                tablet_id: 9,
                epoch: 1,
                current: 2
            })
        );
        assert!(!v.contains_table("b"));
        assert_eq!(
            v.tablet(9).unwrap().flushed_up_to,
            10,
            "the new owner inherits the marker"
        );
        assert!(
            v.apply(&claim(5, 9, 2)).is_err(),
            "an epoch cannot be claimed twice"
        );
        assert_eq!(v.seq(), 5);
    }

    #[test]
    fn compaction_replaces_tables_and_rejects_missing_inputs() {
        let mut v = Version::default();
        v.apply(&claim(1, 1, 1)).unwrap();
        v.apply(&flush(2, 1, 1, 1, vec![table("x", 0, "a", "m")]))
            .unwrap();
        v.apply(&flush(3, 1, 1, 2, vec![table("y", 0, "c", "z")]))
            .unwrap();
        assert_eq!(v.level(0)[0].name, "y", "L0 is newest first");
        let compact = |seq, removed: Vec<&str>| {
            edit(
                seq,
                Change::Compaction(pb::Compaction {
                    removed: removed.into_iter().map(String::from).collect(),
                    added: vec![table("z1", 1, "n", "z"), table("z0", 1, "a", "m")],
                    gc_safe_point: seq * 10,
                }),
            )
        };
        v.apply(&compact(4, vec!["x", "y"])).unwrap();
        assert!(v.level(0).is_empty());
        assert_eq!(v.gc_safe_point(), 40, "the compaction's safe point");
        assert_eq!(
            Version::from_checkpoint(&v.to_checkpoint()).gc_safe_point(),
            40
        );
        let names: Vec<_> = v.level(1).iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["z0", "z1"], "sorted levels are ordered by key");
        assert_eq!(
            v.apply(&compact(5, vec!["x"])),
            Err(Rejection::MissingTable("x".into()))
        );
        let range = KeyRange::new(&b"o"[..], None);
        assert_eq!(v.overlapping(&range).len(), 1);
        let names = |key: &[u8]| {
            v.tables_for_key(key)
                .map(|t| t.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(b"b"), ["z0"]);
        assert_eq!(names(b"q"), ["z1"]);
        assert_eq!(names(b"m\x01"), Vec::<String>::new(), "between tables");
    }

    #[test]
    fn checkpoint_round_trip_preserves_state() {
        let mut v = Version::default();
        v.apply(&claim(1, 1, 3)).unwrap();
        v.apply(&flush(2, 1, 3, 44, vec![table("x", 0, "a", "m")]))
            .unwrap();
        let restored = Version::from_checkpoint(&v.to_checkpoint());
        assert_eq!(restored.seq(), 2);
        assert_eq!(restored.tablet(1), v.tablet(1));
        assert_eq!(restored.level(0), v.level(0));
        assert_eq!(restored.level(0)[0].added_seq, 2);
    }
}
