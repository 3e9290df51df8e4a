//! The YCSB core workloads: their operation mixes, and one client task running them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use indicatif::ProgressBar;
use luna_client::{ClientError, Collection};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::generator::{InsertCounter, KeyChooser};
use crate::bench::report::Latencies;

/// A YCSB core workload, or the load phase that inserts the records first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Inserts `--records` keys.
    Load,
    /// Update heavy: 50% reads, 50% updates.
    A,
    /// Read mostly: 95% reads, 5% updates.
    B,
    /// Read only.
    C,
    /// Read latest: 95% reads of recent keys, 5% inserts.
    D,
    /// Short ranges: 95% scans of 1 to 100 keys, 5% inserts.
    E,
    /// Read-modify-write: 50% reads, 50% read-modify-writes.
    F,
}

/// The kind of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpKind {
    /// A point read.
    Read,
    /// A put to an existing key.
    Update,
    /// A put to a new key.
    Insert,
    /// A scan of 1 to [`MAX_SCAN_LENGTH`] keys from an existing key.
    Scan,
    /// A read, then a put to the same key; timed as one operation.
    Rmw,
}

impl OpKind {
    const ALL: [OpKind; 5] = [
        OpKind::Read,
        OpKind::Update,
        OpKind::Insert,
        OpKind::Scan,
        OpKind::Rmw,
    ];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Update => "update",
            OpKind::Insert => "insert",
            OpKind::Scan => "scan",
            OpKind::Rmw => "rmw",
        }
    }
}

/// YCSB's default `maxscanlength`; scan lengths are uniform in 1..=this.
pub const MAX_SCAN_LENGTH: usize = 100;

impl Workload {
    /// The name in reports and flags.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Load => "load",
            Workload::A => "a",
            Workload::B => "b",
            Workload::C => "c",
            Workload::D => "d",
            Workload::E => "e",
            Workload::F => "f",
        }
    }

    /// The operation mix: each kind with its proportion, summing to 1.
    pub fn mix(self) -> &'static [(OpKind, f64)] {
        match self {
            Workload::Load => &[(OpKind::Insert, 1.0)],
            Workload::A => &[(OpKind::Read, 0.5), (OpKind::Update, 0.5)],
            Workload::B => &[(OpKind::Read, 0.95), (OpKind::Update, 0.05)],
            Workload::C => &[(OpKind::Read, 1.0)],
            Workload::D => &[(OpKind::Read, 0.95), (OpKind::Insert, 0.05)],
            Workload::E => &[(OpKind::Scan, 0.95), (OpKind::Insert, 0.05)],
            Workload::F => &[(OpKind::Read, 0.5), (OpKind::Rmw, 0.5)],
        }
    }

    /// The share of inserts, to size the zipfian key space for keys added during the run.
    pub fn insert_proportion(self) -> f64 {
        self.mix()
            .iter()
            .filter(|(kind, _)| *kind == OpKind::Insert)
            .map(|(_, share)| share)
            .sum()
    }

    fn pick(self, draw: f64) -> OpKind {
        let mut left = draw;
        for (kind, share) in self.mix() {
            if left < *share {
                return *kind;
            }
            left -= share;
        }
        // Rounding of the shares can leave a sliver above the last one.
        self.mix().last().map_or(OpKind::Read, |(kind, _)| *kind)
    }
}

/// Successes, failures and latencies of one operation kind.
pub struct KindStats {
    /// Completed operations (latencies recorded).
    pub ops: u64,
    /// Failed operations.
    pub errors: u64,
    /// Reads (alone or in a read-modify-write) that found no value.
    pub not_found: u64,
    /// Latencies of the completed operations.
    pub latencies: Latencies,
}

/// Everything one or all client tasks measured, per operation kind.
pub struct Stats {
    /// Per kind, only kinds that ran.
    pub kinds: BTreeMap<OpKind, KindStats>,
    /// The first error seen, to show what went wrong.
    pub first_error: Option<String>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            kinds: BTreeMap::new(),
            first_error: None,
        }
    }

    fn kind(&mut self, kind: OpKind) -> &mut KindStats {
        self.kinds.entry(kind).or_insert_with(|| KindStats {
            ops: 0,
            errors: 0,
            not_found: 0,
            latencies: Latencies::new(),
        })
    }

    /// Adds another task's results.
    pub fn merge(&mut self, other: Stats) {
        for (kind, theirs) in other.kinds {
            let ours = self.kind(kind);
            ours.ops += theirs.ops;
            ours.errors += theirs.errors;
            ours.not_found += theirs.not_found;
            ours.latencies.merge(&theirs.latencies);
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// A new, empty result set for the merge of all tasks.
    pub fn empty() -> Stats {
        Stats::new()
    }
}

/// What every client task of one workload shares.
pub struct Shared {
    /// The collection under test.
    pub collection: Collection,
    /// Key and value shapes.
    pub keys: Arc<KeySpace>,
    /// Operations handed out so far; tasks stop when it reaches `operations`.
    pub claimed: AtomicU64,
    /// Operations to run (the load phase: records to insert).
    pub operations: u64,
    /// New keys for inserts, and the range reads may choose from.
    pub inserts: Arc<InsertCounter>,
    /// Shown on the terminal; hidden with `--json`.
    pub bar: ProgressBar,
}

/// Keys `"user"` + zero-padded number, and values cut from a random pool.
pub struct KeySpace {
    /// Key length in bytes.
    pub key_size: usize,
    /// Value length in bytes.
    pub value_size: usize,
    /// Random bytes that values are slices of, so that making a value copies nothing.
    pub value_pool: Bytes,
}

/// Every key starts with this, as in YCSB.
pub const KEY_PREFIX: &[u8] = b"user";

impl KeySpace {
    /// Key number `index`: the prefix, then its decimal digits zero-padded to the key size.
    /// The caller checks that the key size holds the prefix and the largest number.
    pub fn key(&self, index: u64) -> Bytes {
        let mut key = vec![b'0'; self.key_size.max(KEY_PREFIX.len())];
        key[..KEY_PREFIX.len()].copy_from_slice(KEY_PREFIX);
        let mut rest = index;
        for byte in key[KEY_PREFIX.len()..].iter_mut().rev() {
            *byte = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        Bytes::from(key)
    }

    /// A value; `salt` varies which bytes, so updates change the stored value.
    pub fn value(&self, salt: u64) -> Bytes {
        let spare = self.value_pool.len() - self.value_size;
        let offset = (salt as usize).wrapping_mul(7919) % (spare + 1);
        self.value_pool.slice(offset..offset + self.value_size)
    }
}

/// One client task: claims operations until all are handed out and runs them one at a
/// time, as one YCSB client thread does.
pub async fn run_task(
    shared: Arc<Shared>,
    workload: Workload,
    mut chooser: KeyChooser,
    seed: u64,
    load_range: std::ops::Range<u64>,
) -> Stats {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut stats = Stats::new();
    if workload == Workload::Load {
        // Each task inserts its own contiguous share, so that with range partitioning the
        // tasks write to every tablet at once instead of all to the one holding the
        // next key.
        for index in load_range {
            let started = Instant::now();
            let result = shared
                .collection
                .put(shared.keys.key(index), shared.keys.value(index))
                .await;
            record(&mut stats, OpKind::Insert, started, result.map(|_| true));
            shared.bar.inc(1);
        }
        return stats;
    }
    while shared.claimed.fetch_add(1, Ordering::Relaxed) < shared.operations {
        let kind = workload.pick(rng.random());
        let started = Instant::now();
        let result = match kind {
            OpKind::Insert => {
                let index = shared.inserts.claim();
                let result = shared
                    .collection
                    .put(shared.keys.key(index), shared.keys.value(index))
                    .await;
                shared.inserts.complete(index);
                result.map(|_| true)
            }
            OpKind::Read => {
                let index = chooser.next(&mut rng, shared.inserts.limit());
                shared
                    .collection
                    .get(shared.keys.key(index))
                    .await
                    .map(|value| value.is_some())
            }
            OpKind::Update => {
                let index = chooser.next(&mut rng, shared.inserts.limit());
                shared
                    .collection
                    .put(shared.keys.key(index), shared.keys.value(rng.random()))
                    .await
                    .map(|_| true)
            }
            OpKind::Scan => {
                let index = chooser.next(&mut rng, shared.inserts.limit());
                let length = rng.random_range(1..=MAX_SCAN_LENGTH);
                shared
                    .collection
                    .scan(shared.keys.key(index).., length, false)
                    .await
                    .map(|pairs| !pairs.is_empty())
            }
            OpKind::Rmw => {
                let index = chooser.next(&mut rng, shared.inserts.limit());
                let key = shared.keys.key(index);
                match shared.collection.get(&key).await {
                    Ok(value) => {
                        // "Modify": a new value; YCSB also writes a fresh value, not one
                        // derived from what was read.
                        let found = value.is_some();
                        shared
                            .collection
                            .put(key, shared.keys.value(rng.random()))
                            .await
                            .map(|_| found)
                    }
                    Err(error) => Err(error),
                }
            }
        };
        record(&mut stats, kind, started, result);
        shared.bar.inc(1);
    }
    stats
}

/// Counts one operation; `Ok(found)` says whether a read found its key.
fn record(stats: &mut Stats, kind: OpKind, started: Instant, result: Result<bool, ClientError>) {
    let elapsed = started.elapsed();
    match result {
        Ok(found) => {
            let entry = stats.kind(kind);
            entry.ops += 1;
            entry.not_found += u64::from(!found);
            entry.latencies.record(elapsed);
        }
        Err(error) => {
            stats.kind(kind).errors += 1;
            if stats.first_error.is_none() {
                stats.first_error = Some(format!("{}: {error}", kind.name()));
            }
        }
    }
}

/// The report of one operation kind.
#[derive(Debug, Serialize)]
pub struct KindReport {
    /// Completed operations.
    pub ops: u64,
    /// Failed operations.
    pub errors: u64,
    /// Reads that found no value (reads, read-modify-writes, scans that returned nothing).
    pub not_found: u64,
    /// Completed operations per second of the workload's wall time.
    pub ops_per_sec: f64,
    /// Latency percentiles of completed operations, in microseconds.
    pub p50_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Slowest.
    pub max_us: f64,
}

/// The per-kind reports, in a fixed order.
pub fn kind_reports(stats: &Stats, seconds: f64) -> BTreeMap<&'static str, KindReport> {
    let mut reports = BTreeMap::new();
    for kind in OpKind::ALL {
        let Some(entry) = stats.kinds.get(&kind) else {
            continue;
        };
        reports.insert(
            kind.name(),
            KindReport {
                ops: entry.ops,
                errors: entry.errors,
                not_found: entry.not_found,
                ops_per_sec: if seconds > 0.0 {
                    entry.ops as f64 / seconds
                } else {
                    0.0
                },
                p50_us: entry.latencies.quantile(0.5),
                p95_us: entry.latencies.quantile(0.95),
                p99_us: entry.latencies.quantile(0.99),
                max_us: entry.latencies.max(),
            },
        );
    }
    reports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_sum_to_one_and_pick_in_proportion() {
        for workload in [
            Workload::Load,
            Workload::A,
            Workload::B,
            Workload::C,
            Workload::D,
            Workload::E,
            Workload::F,
        ] {
            let total: f64 = workload.mix().iter().map(|(_, share)| share).sum();
            assert!((total - 1.0).abs() < 1e-9, "{}", workload.name());
        }
        assert_eq!(Workload::B.pick(0.949), OpKind::Read);
        assert_eq!(Workload::B.pick(0.951), OpKind::Update);
        assert_eq!(Workload::E.pick(0.999_999), OpKind::Insert);
        assert_eq!(Workload::D.insert_proportion(), 0.05);
        assert_eq!(Workload::A.insert_proportion(), 0.0);
    }

    #[test]
    fn keys_are_padded_numbers() {
        let keys = KeySpace {
            key_size: 16,
            value_size: 4,
            value_pool: Bytes::from_static(b"0123456789"),
        };
        assert_eq!(&keys.key(42)[..], b"user000000000042");
        assert_eq!(&keys.key(0)[..], b"user000000000000");
        assert!(keys.key(9) < keys.key(10));
        for salt in 0..100 {
            assert_eq!(keys.value(salt).len(), 4);
        }
    }
}
