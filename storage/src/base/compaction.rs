//! Leveled compaction: L0 (overlapping flushes) merges into L1; a level over
//! its size target pushes one table into the next level. Output tables are
//! cut at a target size and at tablet boundaries, and only between keys, so
//! sorted levels never split a key's versions across tables.

use std::sync::Arc;

use bytes::Bytes;
use luna_proto::manifest as pb;

use super::{BaseStore, BaseStoreOptions, Uploads, background};
use crate::error::{Result, StorageError};
use crate::manifest::{LEVELS, TableInfo, Version, table_to_pb};
use crate::merge::{GcFilter, MergeIterator, Source};
use crate::table::TableBuilder;
use crate::types::{Direction, KeyRange};

/// What one compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// The level written.
    pub output_level: u32,
    /// Tables read.
    pub input_tables: usize,
    /// Tables written.
    pub output_tables: usize,
    /// Versions read.
    pub input_rows: u64,
    /// Versions written.
    pub output_rows: u64,
    /// Bytes read.
    pub input_bytes: u64,
    /// Bytes written.
    pub output_bytes: u64,
}

struct Task {
    inputs: Vec<Arc<TableInfo>>,
    output_level: u32,
    drop_tombstones: bool,
}

fn key_span(tables: &[Arc<TableInfo>]) -> Option<(Bytes, Bytes)> {
    let smallest = tables.iter().map(|t| &t.smallest).min()?.clone();
    let largest = tables.iter().map(|t| &t.largest).max()?.clone();
    Some((smallest, largest))
}

fn overlapping(level: &[Arc<TableInfo>], smallest: &[u8], largest: &[u8]) -> Vec<Arc<TableInfo>> {
    level
        .iter()
        .filter(|t| t.smallest.as_ref() <= largest && t.largest.as_ref() >= smallest)
        .cloned()
        .collect()
}

/// Whether nothing below `output_level` could hold older versions of the span.
fn is_bottom(version: &Version, output_level: u32, smallest: &[u8], largest: &[u8]) -> bool {
    ((output_level as usize + 1)..LEVELS)
        .all(|level| overlapping(version.level(level), smallest, largest).is_empty())
}

/// The level most in need of compaction, scored RocksDB's way: L0 by its table count over
/// `l0_compaction_trigger`, a deeper level by its bytes over its target. L0 counts from a
/// score of 1, a deeper level above 1; the highest score goes first (L0 on ties). Taking L0
/// whenever it reached its trigger let L1 grow without bound under steady writes: a
/// tablet's writes spread over its whole key range, so every L0 table overlapped all of L1,
/// and each L0 -> L1 compaction rewrote all of it (a 1 GiB tablet wrote 8 GB of tables in
/// two minutes of `luna bench move`).
fn neediest_level(version: &Version, options: &BaseStoreOptions) -> Option<usize> {
    let trigger = options.l0_compaction_trigger.max(1);
    let l0_score = version.level(0).len() as f64 / trigger as f64;
    let mut neediest = (l0_score >= 1.0).then_some((l0_score, 0));
    let mut target = options.level1_bytes.max(1);
    for level in 1..LEVELS - 1 {
        let size: u64 = version.level(level).iter().map(|t| t.size_bytes).sum();
        let score = size as f64 / target as f64;
        if score > 1.0 && neediest.is_none_or(|(best, _)| score > best) {
            neediest = Some((score, level));
        }
        target = target.saturating_mul(options.level_multiplier);
    }
    neediest.map(|(_, level)| level)
}

fn pick(version: &Version, options: &BaseStoreOptions) -> Option<Task> {
    let level = neediest_level(version, options)?;
    let (inputs, output_level) = if level == 0 {
        // All of L0: a subset could leave older versions above newer ones.
        let l0 = version.level(0);
        let (smallest, largest) = key_span(l0)?;
        let mut inputs = l0.to_vec();
        inputs.extend(overlapping(version.level(1), &smallest, &largest));
        (inputs, 1)
    } else {
        // The oldest table first: it has waited longest to shed dead versions.
        let table = version
            .level(level)
            .iter()
            .min_by_key(|t| t.added_seq)?
            .clone();
        let mut inputs = vec![Arc::clone(&table)];
        inputs.extend(overlapping(
            version.level(level + 1),
            &table.smallest,
            &table.largest,
        ));
        (inputs, level as u32 + 1)
    };
    let (smallest, largest) = key_span(&inputs)?;
    let drop_tombstones = is_bottom(version, output_level, &smallest, &largest);
    Some(Task {
        inputs,
        output_level,
        drop_tombstones,
    })
}

impl BaseStore {
    /// Runs one compaction if any level needs it. `None` when none does.
    ///
    /// The compaction runs on a thread of its own at a lower CPU priority
    /// (see `background.rs`): it merges and encodes for seconds without a pause, which on
    /// the async workers would hold up every request of the process behind it (a tablet
    /// move's handoff waited 1.8 s once), and at equal priority would take half of a
    /// two-core machine from them.
    pub async fn compact_once(self: &Arc<Self>) -> Result<Option<CompactionReport>> {
        let _slot =
            self.options
                .compaction_slots
                .acquire()
                .await
                .map_err(|_| StorageError::Closed {
                    what: "compaction slots",
                })?;
        let version = self.version();
        let Some(task) = pick(&version, self.options()) else {
            return Ok(None);
        };
        if let Some(table) = moves_down_whole(&task, &version) {
            return self.move_down(&table, task.output_level).await.map(Some);
        }
        let base = Arc::clone(self);
        background::on_own_thread(move || async move { base.run_compaction(&version, task).await })
            .await
            .map(Some)
    }

    /// Compacts until no level needs it; returns how many compactions ran.
    pub async fn compact_until_settled(self: &Arc<Self>) -> Result<usize> {
        let mut runs = 0;
        while self.compact_once().await?.is_some() {
            runs += 1;
        }
        Ok(runs)
    }

    async fn run_compaction(&self, version: &Version, task: Task) -> Result<CompactionReport> {
        let mut report = CompactionReport {
            output_level: task.output_level,
            input_tables: task.inputs.len(),
            ..CompactionReport::default()
        };
        let mut sources = Vec::with_capacity(task.inputs.len());
        for table in &task.inputs {
            let reader = self.reader(table).await?.load_whole().await?;
            sources.push(Source::Table(Box::new(
                reader.cursor(&KeyRange::all(), Direction::Forward).await?,
            )));
            report.input_rows += table.rows;
            report.input_bytes += table.size_bytes;
        }
        let boundaries = tablet_boundaries(version);
        let mut merge = MergeIterator::new(sources, Direction::Forward).await?;
        let mut uploads = self.uploads();
        let safe_point = self.gc_safe_point();
        let mut filter = GcFilter::new(safe_point, task.drop_tombstones);
        let mut outputs = Vec::new();
        let mut builder = TableBuilder::new();
        while let Some(entry) = merge.next_entry().await? {
            if !filter.keep(&entry) {
                continue;
            }
            if let Some(last) = builder.last_key()
                && last != entry.key.as_ref()
                && (builder.encoded_bytes() >= self.options.table_target_bytes
                    || crosses_boundary(&boundaries, last, &entry.key))
            {
                let full = std::mem::take(&mut builder);
                outputs.extend(
                    self.write_output(full, task.output_level, &mut uploads)
                        .await?,
                );
            }
            builder.push(&entry.key, entry.ts, entry.kind, &entry.value);
        }
        outputs.extend(
            self.write_output(builder, task.output_level, &mut uploads)
                .await?,
        );
        report.output_tables = outputs.len();
        report.output_rows = outputs.iter().map(|t| t.rows).sum();
        report.output_bytes = outputs.iter().map(|t| t.size_bytes).sum();
        let removed: Vec<String> = task.inputs.iter().map(|t| t.name.clone()).collect();
        let span = key_span(&task.inputs);
        self.commit(|current| {
            uploads.check_fresh()?;
            if let Some(gone) = removed.iter().find(|name| !current.contains_table(name)) {
                return Err(StorageError::Job {
                    job: "compaction",
                    detail: format!("input {gone} was compacted away concurrently"),
                });
            }
            // Another process may have compacted into the output level from
            // a different version meanwhile: a sorted level must stay free of
            // overlaps, so a clash refuses this commit.
            let level = current.level(task.output_level as usize);
            for output in &outputs {
                if let Some(clash) = overlapping(level, &output.smallest, &output.largest)
                    .iter()
                    .find(|table| !removed.contains(&table.name))
                {
                    return Err(StorageError::Job {
                        job: "compaction",
                        detail: format!(
                            "output overlaps {} committed concurrently in level {}",
                            clash.name, task.output_level
                        ),
                    });
                }
            }
            if task.drop_tombstones
                && let Some((smallest, largest)) = &span
                && !is_bottom(current, task.output_level, smallest, largest)
            {
                return Err(StorageError::Job {
                    job: "compaction",
                    detail: "a deeper table appeared; tombstones are still needed".into(),
                });
            }
            Ok(pb::manifest_edit::Change::Compaction(pb::Compaction {
                removed: removed.clone(),
                added: outputs.iter().map(table_to_pb).collect(),
                gc_safe_point: safe_point,
            }))
        })
        .await?;
        tracing::debug!(?report, "compaction committed");
        Ok(report)
    }

    /// Moves `table` to `level` by a manifest edit alone (see [`moves_down_whole`]).
    async fn move_down(&self, table: &TableInfo, level: u32) -> Result<CompactionReport> {
        self.commit(|current| {
            if !current.contains_table(&table.name) {
                return Err(StorageError::Job {
                    job: "compaction",
                    detail: format!("input {} was compacted away concurrently", table.name),
                });
            }
            if let Some(clash) = overlapping(
                current.level(level as usize),
                &table.smallest,
                &table.largest,
            )
            .first()
            {
                return Err(StorageError::Job {
                    job: "compaction",
                    detail: format!(
                        "{} was committed to level {level} concurrently, overlapping {}",
                        clash.name, table.name
                    ),
                });
            }
            let moved = pb::TableMeta {
                level,
                ..table_to_pb(table)
            };
            Ok(pb::manifest_edit::Change::Compaction(pb::Compaction {
                removed: vec![table.name.clone()],
                added: vec![moved],
                // No version was dropped.
                gc_safe_point: 0,
            }))
        })
        .await?;
        Ok(CompactionReport {
            output_level: level,
            input_tables: 1,
            output_tables: 1,
            input_rows: table.rows,
            output_rows: table.rows,
            input_bytes: table.size_bytes,
            // Nothing was written.
            output_bytes: 0,
        })
    }

    /// Encodes one output table right here (on the compaction's own thread) and uploads it.
    async fn write_output(
        &self,
        builder: TableBuilder,
        level: u32,
        uploads: &mut Uploads<'_>,
    ) -> Result<Option<TableInfo>> {
        let name = uploads.track_new();
        let encoded = builder.finish(&name)?;
        self.upload_table(name, encoded, level).await
    }
}

/// The one table of `task` if it can move down a level as it is, with no rewrite: it is
/// alone (nothing in the output level overlaps it) and lies within one tablet (output is
/// cut at tablet boundaries). L0 always merges. Versions it holds below the GC safe point
/// wait for a later merge. Without this a sequential load rewrote every table once per
/// level on its way down.
fn moves_down_whole(task: &Task, version: &Version) -> Option<Arc<TableInfo>> {
    let [table] = task.inputs.as_slice() else {
        return None;
    };
    let within_one_tablet =
        !crosses_boundary(&tablet_boundaries(version), &table.smallest, &table.largest);
    (task.output_level >= 2 && within_one_tablet).then(|| Arc::clone(table))
}

/// Where tablets begin: compaction output is cut there, so a tablet's data
/// stays in its own tables wherever it can.
fn tablet_boundaries(version: &Version) -> Vec<Bytes> {
    let mut starts: Vec<Bytes> = version
        .tablets()
        .map(|t| t.range.start.clone())
        .filter(|start| !start.is_empty())
        .collect();
    starts.sort();
    starts.dedup();
    starts
}

fn crosses_boundary(boundaries: &[Bytes], last: &[u8], next: &[u8]) -> bool {
    // The first boundary above `last`: is `next` at or past it?
    let index = boundaries.partition_point(|b| b.as_ref() <= last);
    boundaries.get(index).is_some_and(|b| b.as_ref() <= next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_cut_between_tablets() {
        let boundaries = vec![Bytes::from_static(b"m"), Bytes::from_static(b"t")];
        assert!(crosses_boundary(&boundaries, b"a", b"m"));
        assert!(crosses_boundary(&boundaries, b"l", b"z"));
        assert!(!crosses_boundary(&boundaries, b"m", b"s"));
        assert!(!crosses_boundary(&boundaries, b"a", b"b"));
        assert!(!crosses_boundary(&[], b"a", b"z"));
    }

    /// A version holding, per level, tables of these sizes (each spanning all keys in L0,
    /// a slice of them below).
    fn version_with(levels: &[(u32, &[u64])]) -> Version {
        let mut tables = Vec::new();
        for &(level, sizes) in levels {
            for (i, &size_bytes) in sizes.iter().enumerate() {
                let (smallest, largest) = match level {
                    0 => (b"a".to_vec(), b"z".to_vec()),
                    _ => (
                        format!("k{i:04}").into_bytes(),
                        format!("k{i:04}~").into_bytes(),
                    ),
                };
                tables.push(pb::TableMeta {
                    name: format!("tables/{level}-{i}.parquet"),
                    level,
                    smallest_key: smallest,
                    largest_key: largest,
                    size_bytes,
                    added_seq: i as u64 + 1,
                    ..pb::TableMeta::default()
                });
            }
        }
        Version::from_checkpoint(&pb::Checkpoint {
            tables,
            ..pb::Checkpoint::default()
        })
    }

    #[test]
    fn the_level_furthest_over_its_target_is_compacted_first() {
        let options = BaseStoreOptions {
            l0_compaction_trigger: 4,
            level1_bytes: 64 << 20,
            level_multiplier: 10,
            ..BaseStoreOptions::default()
        };
        let mib = 1 << 20;
        // L0 at its trigger (score 1), L1 at 16 times its target: L1 drains first, else
        // every L0 compaction would rewrite all of it.
        let bloated_l1 = version_with(&[(0, &[mib; 4]), (1, &[64 * mib; 16])]);
        assert_eq!(neediest_level(&bloated_l1, &options), Some(1));
        let task = pick(&bloated_l1, &options).expect("a task");
        assert_eq!((task.output_level, task.inputs.len()), (2, 1));
        // L0 well past its trigger beats a level just over its target.
        let busy_l0 = version_with(&[(0, &[mib; 12]), (1, &[65 * mib])]);
        assert_eq!(neediest_level(&busy_l0, &options), Some(0));
        // At its target exactly, a level waits; below its trigger, L0 waits.
        let settled = version_with(&[(0, &[mib; 3]), (1, &[64 * mib]), (2, &[640 * mib])]);
        assert_eq!(neediest_level(&settled, &options), None);
        // A deeper level counts against its own, larger target.
        let deep = version_with(&[(1, &[10 * mib]), (2, &[700 * mib])]);
        assert_eq!(neediest_level(&deep, &options), Some(2));
    }

    #[test]
    fn a_lone_table_within_one_tablet_moves_down_without_a_rewrite() {
        let options = BaseStoreOptions {
            level1_bytes: 64 << 20,
            ..BaseStoreOptions::default()
        };
        // L1's tables cover disjoint slices ("k0000".."k0000~", ...); L2 is empty.
        let lone = version_with(&[(1, &[40 << 20, 40 << 20])]);
        let task = pick(&lone, &options).expect("L1 is over its target");
        let moved = moves_down_whole(&task, &lone).expect("nothing below overlaps it");
        assert_eq!(
            (moved.name.as_str(), task.output_level),
            ("tables/1-0.parquet", 2)
        );

        // A table below overlapping it: merged, not moved.
        let mut overlapped = version_with(&[(1, &[40 << 20, 40 << 20])]).to_checkpoint();
        overlapped.tables.push(pb::TableMeta {
            name: "tables/2-x.parquet".into(),
            level: 2,
            smallest_key: b"k0000a".to_vec(),
            largest_key: b"k0000b".to_vec(),
            ..pb::TableMeta::default()
        });
        let overlapped = Version::from_checkpoint(&overlapped);
        let task = pick(&overlapped, &options).expect("a task");
        assert_eq!(task.inputs.len(), 2);
        assert!(moves_down_whole(&task, &overlapped).is_none());

        // A table across a tablet boundary: rewritten, so that output is cut there.
        let mut split = lone.to_checkpoint();
        split.tablets.push(pb::TabletState {
            tablet_id: 2,
            range: Some(pb::KeyRange {
                start: b"k0000m".to_vec(),
                end: None,
            }),
            ..pb::TabletState::default()
        });
        let split = Version::from_checkpoint(&split);
        let task = pick(&split, &options).expect("a task");
        assert!(moves_down_whole(&task, &split).is_none());
    }
}
