//! Random sequences of writes, reads, scans, flushes, compactions, reopens and
//! crashes, checked against a BTreeMap model of every version.
//!
//! A crash drops the tablet without flushing; the test then replays its own
//! journal from the tablet's recovered marker, as a tablet server would.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use luna_storage::{
    BaseStore, BaseStoreOptions, Direction, KeyRange, Limits, MemStoreOptions, MemoryBudget,
    ScanRequest, Tablet, WriteBatch,
};
use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::path::Path;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u16),
    Delete(u8),
    Get(u8),
    GetAt(u8, u8),
    Scan(u8, u8, bool),
    Flush,
    Compact,
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (any::<u8>(), any::<u16>()).prop_map(|(k, v)| Op::Put(k % 64, v)),
        2 => any::<u8>().prop_map(|k| Op::Delete(k % 64)),
        3 => any::<u8>().prop_map(|k| Op::Get(k % 64)),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(k, back)| Op::GetAt(k % 64, back)),
        2 => (any::<u8>(), any::<u8>(), any::<bool>()).prop_map(|(k, n, reverse)| Op::Scan(k % 64, n % 20, reverse)),
        1 => Just(Op::Flush),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

fn key(k: u8) -> Bytes {
    Bytes::from(format!("key{k:03}"))
}

fn value(v: u16) -> Bytes {
    // Varying sizes exercise page cuts.
    Bytes::from(format!("{v:05}").repeat(1 + (v as usize % 7)))
}

/// Every version of every key: key -> ts -> value (None = deleted).
type Model = BTreeMap<Bytes, BTreeMap<u64, Option<Bytes>>>;

fn model_get(model: &Model, key: &Bytes, ts: u64) -> Option<Bytes> {
    model.get(key)?.range(..=ts).next_back()?.1.clone()
}

struct Harness {
    store: Arc<dyn ObjectStore>,
    base: Arc<BaseStore>,
    tablet: Arc<Tablet>,
    epoch: u64,
    journal: Vec<(u64, u64, WriteBatch)>,
}

fn base_options() -> BaseStoreOptions {
    BaseStoreOptions {
        l0_compaction_trigger: 2,
        level1_bytes: 4 * 1024,
        level_multiplier: 2,
        table_target_bytes: 2 * 1024,
        background_jobs: false,
        checkpoint_every: 5,
        ..BaseStoreOptions::default()
    }
}

impl Harness {
    async fn open(
        store: Arc<dyn ObjectStore>,
        epoch: u64,
        journal: Vec<(u64, u64, WriteBatch)>,
    ) -> Harness {
        let base = BaseStore::open(Arc::clone(&store), Path::from("coll"), base_options())
            .await
            .unwrap();
        let options = MemStoreOptions {
            memtable_size: 3000,
            limits: Limits::default(),
        };
        let tablet = Tablet::open(
            Arc::clone(&base),
            1,
            epoch,
            KeyRange::all(),
            options,
            Arc::new(MemoryBudget::new(1 << 30)),
        )
        .await
        .unwrap();
        for (seq, ts, batch) in journal
            .iter()
            .filter(|(seq, _, _)| *seq > tablet.recovered_up_to())
        {
            tablet.write(*seq, *ts, batch).await.unwrap();
        }
        Harness {
            store,
            base,
            tablet,
            epoch,
            journal,
        }
    }

    async fn restart(self, flush_first: bool) -> Harness {
        if flush_first {
            self.tablet.close().await.unwrap();
        }
        self.base.close();
        let Harness {
            store,
            epoch,
            journal,
            ..
        } = self;
        Harness::open(store, epoch + 1, journal).await
    }
}

async fn write(h: &mut Harness, model: &mut Model, ts: &mut u64, k: u8, new_value: Option<Bytes>) {
    *ts += 1;
    let mut batch = WriteBatch::new();
    match &new_value {
        Some(v) => batch.put(key(k), v.clone()),
        None => batch.delete(key(k)),
    };
    let seq = h.journal.len() as u64 + 1;
    h.tablet.write(seq, *ts, &batch).await.unwrap();
    h.journal.push((seq, *ts, batch));
    model.entry(key(k)).or_default().insert(*ts, new_value);
}

async fn run(ops: Vec<Op>) {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let mut h = Harness::open(store, 1, Vec::new()).await;
    let mut model = Model::new();
    let mut ts = 0u64;
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Put(k, v) => write(&mut h, &mut model, &mut ts, k, Some(value(v))).await,
            Op::Delete(k) => write(&mut h, &mut model, &mut ts, k, None).await,
            Op::Get(k) => {
                let got = h.tablet.get(&key(k), ts).await.unwrap();
                assert_eq!(got, model_get(&model, &key(k), ts), "step {step}: get {k}");
            }
            Op::GetAt(k, back) => {
                let at = ts.saturating_sub(u64::from(back));
                let got = h.tablet.get(&key(k), at).await.unwrap();
                assert_eq!(
                    got,
                    model_get(&model, &key(k), at),
                    "step {step}: get {k} at {at}"
                );
            }
            Op::Scan(k, limit, reverse) => {
                // Forward from key k up; backward from just below key k down.
                let (range, direction) = if reverse {
                    (
                        KeyRange::new(Bytes::new(), Some(key(k))),
                        Direction::Reverse,
                    )
                } else {
                    (KeyRange::new(key(k), None), Direction::Forward)
                };
                let request = ScanRequest {
                    range,
                    read_ts: ts,
                    limit: limit as usize,
                    direction,
                };
                let got = h.tablet.scan(&request).await.unwrap();
                let live =
                    |(key, _): (&Bytes, _)| model_get(&model, key, ts).map(|v| (key.clone(), v));
                let take = if limit == 0 {
                    usize::MAX
                } else {
                    limit as usize
                };
                let want: Vec<(Bytes, Bytes)> = if reverse {
                    model
                        .range(..key(k))
                        .rev()
                        .filter_map(live)
                        .take(take)
                        .collect()
                } else {
                    model.range(key(k)..).filter_map(live).take(take).collect()
                };
                assert_eq!(
                    got, want,
                    "step {step}: scan from {k} limit {limit} reverse {reverse}"
                );
            }
            Op::Flush => h.tablet.flush().await.unwrap(),
            Op::Compact => {
                h.base.compact_until_settled().await.unwrap();
            }
            Op::Reopen => h = h.restart(true).await,
            Op::Crash => h = h.restart(false).await,
        }
    }
    // Everything acknowledged survives a final crash and recovery.
    h = h.restart(false).await;
    for (k, _) in model.iter() {
        assert_eq!(h.tablet.get(k, ts).await.unwrap(), model_get(&model, k, ts));
    }
    h.base.close();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn storage_matches_model(ops in proptest::collection::vec(op(), 1..160)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), run(ops)).await.expect("case timed out");
        });
    }
}
