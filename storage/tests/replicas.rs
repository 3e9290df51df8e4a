//! Replicas of one tablet on separate BaseStore handles (separate processes
//! in a universe): the owner flushes, replicas follow its "flushed up to"
//! markers, and ownership moves by claim and release at newer epochs.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{base_options, describe, memory_store, open_base};
use luna_storage::{
    BaseStore, BaseStoreOptions, Direction, KeyRange, Limits, MemStoreOptions, MemoryBudget,
    ScanRequest, StorageError, Tablet, Timestamp, WriteBatch,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Small memtables, so both sides also rotate on size between markers.
fn small_memtables() -> MemStoreOptions {
    MemStoreOptions {
        memtable_size: 2 * 1024,
        limits: Limits::default(),
    }
}

fn budget() -> Arc<MemoryBudget> {
    Arc::new(MemoryBudget::new(usize::MAX))
}

async fn replica(base: &Arc<BaseStore>) -> Arc<Tablet> {
    Tablet::open_replica(
        Arc::clone(base),
        1,
        KeyRange::all(),
        small_memtables(),
        budget(),
    )
    .await
    .expect("open replica")
}

/// Tablet 1 opened and claimed at epoch 1.
async fn owner_at_epoch_1(base: &Arc<BaseStore>) -> Arc<Tablet> {
    let tablet = replica(base).await;
    tablet.claim(1).await.expect("claim at epoch 1");
    tablet
}

/// One journal entry of the group's log.
#[derive(Clone)]
enum Entry {
    Write(Timestamp, WriteBatch),
    /// "Everything up to this journal index is in the BaseStore."
    Flushed(u64),
}

/// Versions a replica has applied: key -> ts -> value (None = deleted).
#[derive(Default)]
struct Model(BTreeMap<Bytes, BTreeMap<Timestamp, Option<Bytes>>>);

impl Model {
    fn apply(&mut self, ts: Timestamp, batch: &WriteBatch) {
        for mutation in batch.mutations() {
            let (key, value) = match mutation {
                luna_storage::Mutation::Put { key, value } => (key.clone(), Some(value.clone())),
                luna_storage::Mutation::Delete { key } => (key.clone(), None),
            };
            self.0.entry(key).or_default().insert(ts, value);
        }
    }

    fn get(&self, key: &[u8], ts: Timestamp) -> Option<Bytes> {
        self.0.get(key)?.range(..=ts).next_back()?.1.clone()
    }

    fn scan(&self, ts: Timestamp) -> Vec<(Bytes, Bytes)> {
        self.0
            .keys()
            .filter_map(|key| Some((key.clone(), self.get(key, ts)?)))
            .collect()
    }
}

fn random_batch(rng: &mut StdRng, step: usize) -> WriteBatch {
    let mut batch = WriteBatch::new();
    for _ in 0..rng.random_range(1..4) {
        let key = format!("key{:03}", rng.random_range(0..40));
        if rng.random_bool(0.2) {
            batch.delete(key);
        } else {
            batch.put(
                key,
                format!("v{step}-{}", "x".repeat(rng.random_range(0..200))),
            );
        }
    }
    batch
}

/// Checks the replica against the model at random snapshots up to `newest`.
async fn check_reads(rng: &mut StdRng, tablet: &Tablet, model: &Model, newest: Timestamp) {
    for _ in 0..4 {
        let ts = rng.random_range(0..=newest);
        let key = format!("key{:03}", rng.random_range(0..40));
        let got = tablet.get(key.as_bytes(), ts).await.expect("replica get");
        assert_eq!(got, model.get(key.as_bytes(), ts), "get {key} at {ts}");
    }
    let ts = rng.random_range(0..=newest);
    let scan = tablet
        .scan(&ScanRequest {
            range: KeyRange::all(),
            read_ts: ts,
            limit: 0,
            direction: Direction::Forward,
        })
        .await
        .expect("replica scan");
    assert_eq!(scan, model.scan(ts), "scan at {ts}");
}

/// One replica in the randomized test: its tablet and BaseStore handle.
struct Side {
    tablet: Arc<Tablet>,
    base: Arc<BaseStore>,
}

/// What the follower has applied of the log.
#[derive(Default)]
struct Follower {
    applied: usize,
    model: Model,
    ts: Timestamp,
    /// Memtables dropped by markers so far.
    dropped: usize,
}

impl Follower {
    async fn apply(&mut self, tablet: &Tablet, log: &[Entry], to: usize) {
        while self.applied < to {
            let seq = self.applied as u64 + 1;
            match &log[self.applied] {
                Entry::Write(ts, batch) => {
                    tablet.write(seq, *ts, batch).await.expect("replica write");
                    self.model.apply(*ts, batch);
                    self.ts = *ts;
                }
                Entry::Flushed(up_to) => {
                    let before = tablet.memstore().immutable_count();
                    let applied = tablet.apply_flushed(*up_to).await;
                    assert!(applied.is_ok(), "marker {up_to}: {}", describe(&applied));
                    self.dropped += before.saturating_sub(tablet.memstore().immutable_count());
                }
            }
            self.applied += 1;
        }
    }
}

/// The owner (on one BaseStore handle) and a replica (on another) get the
/// same log; the owner flushes at random points and appends markers; the
/// replica lags by a random amount, applies markers and is read at random
/// snapshots. Leadership moves now and then (release, claim at a newer
/// epoch), and compaction runs on both handles meanwhile.
async fn follow_the_owner(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let store = memory_store();
    // A long grace: garbage collection is exercised in two_processes.rs.
    let options = BaseStoreOptions {
        gc_grace: Duration::from_secs(3600),
        ..base_options()
    };
    let mut epoch = 1;
    let owner_base = open_base(store.clone(), options.clone()).await;
    let mut owner = Side {
        tablet: Tablet::open(
            Arc::clone(&owner_base),
            1,
            epoch,
            KeyRange::all(),
            small_memtables(),
            budget(),
        )
        .await
        .expect("open owner"),
        base: owner_base,
    };
    let replica_base = open_base(store.clone(), options).await;
    let mut replica = Side {
        tablet: self::replica(&replica_base).await,
        base: replica_base,
    };
    let mut log: Vec<Entry> = Vec::new();
    let mut last_marker = 0;
    let mut follower = Follower::default();
    let mut ts = 0;
    let mut dropped = 0;
    for step in 0..400 {
        match rng.random_range(0..100) {
            0..55 => {
                ts += 1;
                let batch = random_batch(&mut rng, step);
                log.push(Entry::Write(ts, batch.clone()));
                owner
                    .tablet
                    .write(log.len() as u64, ts, &batch)
                    .await
                    .expect("owner write");
            }
            55..65 => owner.tablet.flush().await.expect("owner flush"),
            65..80 => {
                // The owner appends what its (foreground or background)
                // flushes made durable, as the group leader does.
                let up_to = owner.tablet.flushed_up_to();
                if up_to > last_marker {
                    last_marker = up_to;
                    log.push(Entry::Flushed(up_to));
                }
            }
            80..93 => {
                let to = rng.random_range(follower.applied..=log.len());
                follower.apply(&replica.tablet, &log, to).await;
            }
            93..95 => {
                // A leader change: the replica catches up on the log, as a
                // new raft leader does before serving, then claims.
                follower.apply(&replica.tablet, &log, log.len()).await;
                owner.tablet.release();
                epoch += 1;
                replica.tablet.claim(epoch).await.expect("claim");
                std::mem::swap(&mut owner, &mut replica);
                // The old owner applied everything the log holds.
                dropped += follower.dropped;
                follower = Follower {
                    applied: log.len(),
                    model: std::mem::take(&mut follower.model),
                    ts: follower.ts,
                    dropped: 0,
                };
            }
            95..98 => compact(&owner.base).await,
            _ => compact(&replica.base).await,
        }
        check_reads(&mut rng, &replica.tablet, &follower.model, follower.ts).await;
    }
    // Drain: flush everything, mark it, apply the rest of the log.
    owner.tablet.flush().await.expect("final flush");
    let up_to = owner.tablet.flushed_up_to();
    assert_eq!(up_to, owner_last_write(&log), "flush covers every write");
    log.push(Entry::Flushed(up_to));
    follower.apply(&replica.tablet, &log, log.len()).await;
    dropped += follower.dropped;
    assert!(dropped > 0, "markers dropped memtables along the way");
    // Every write is in the BaseStore: the replica holds no memtable memory.
    assert_eq!(replica.tablet.memstore().immutable_count(), 0);
    let used = replica.tablet.memstore().budget().used();
    assert_eq!(used, 0, "replica released its memtables");
    for _ in 0..20 {
        check_reads(&mut rng, &replica.tablet, &follower.model, follower.ts).await;
    }
    owner.base.shutdown().await;
    replica.base.shutdown().await;
}

/// A compaction may lose the race against the other handle's: a typed,
/// retryable refusal, never a wrong result.
async fn compact(base: &Arc<BaseStore>) {
    match base.compact_once().await {
        Ok(_) => {}
        Err(error @ StorageError::Job { .. }) => assert!(error.is_retryable()),
        Err(error) => panic!("compaction: {error}"),
    }
}

fn owner_last_write(log: &[Entry]) -> u64 {
    log.iter()
        .rposition(|entry| matches!(entry, Entry::Write(..)))
        .map_or(0, |index| index as u64 + 1)
}

#[tokio::test]
async fn a_replica_following_markers_always_reads_like_the_model() {
    for seed in 0..6 {
        follow_the_owner(seed).await;
    }
}

fn put(key: &str, value: &str) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch.put(key.to_string(), value.to_string());
    batch
}

/// Replicas `a` and `b` of tablet 1, on their own BaseStores over one object store.
async fn two_replicas() -> (Arc<BaseStore>, Arc<BaseStore>, Arc<Tablet>, Arc<Tablet>) {
    let store = memory_store();
    let base_a = open_base(store.clone(), base_options()).await;
    let base_b = open_base(store, base_options()).await;
    let a = replica(&base_a).await;
    let b = replica(&base_b).await;
    (base_a, base_b, a, b)
}

/// Asserts that `tablet` reads each key's value at `read_ts`.
async fn assert_reads(tablet: &Tablet, read_ts: Timestamp, pairs: &[(&str, &str)]) {
    for (key, value) in pairs {
        let got = tablet.get(key.as_bytes(), read_ts).await.expect("get");
        assert_eq!(got.as_deref(), Some(value.as_bytes()), "{key}");
    }
}

fn seq_after(seq: u64) -> u64 {
    seq + 1
}

fn is_fenced<T>(result: &luna_storage::Result<T>) -> bool {
    matches!(result, Err(StorageError::Fenced { .. }))
}

#[tokio::test]
async fn ownership_moves_by_claim_and_release_at_newer_epochs() {
    let (base_a, base_b, a, b) = two_replicas().await;
    assert_eq!((a.epoch(), b.epoch()), (None, None));
    assert!(matches!(
        a.flush().await,
        Err(StorageError::NotOwner { .. })
    ));

    let mut seq = 0;
    let mut write_both = async |batch: WriteBatch| {
        seq += 1;
        a.write(seq, seq, &batch).await.expect("write a");
        b.write(seq, seq, &batch).await.expect("write b");
        seq
    };

    a.claim(1).await.expect("a claims at 1");
    let first = write_both(put("k1", "one")).await;
    a.flush().await.expect("a flushes");
    assert_eq!(*a.watch_flushed().borrow(), first);
    b.apply_flushed(first).await.expect("b follows a");

    // b takes over at 2 without a releasing first: a is fenced on its next flush.
    assert!(is_fenced(&b.claim(1).await), "an epoch must be newer");
    b.claim(2).await.expect("b claims at 2");
    let second = write_both(put("k2", "two")).await;
    assert!(is_fenced(&a.flush().await), "stale owner cannot flush");
    assert!(is_fenced(&a.write(99, 99, &put("k9", "x")).await));
    // Leadership loss: a becomes a replica again and follows b.
    a.release();
    assert_eq!(a.epoch(), None);
    assert!(matches!(
        a.flush().await,
        Err(StorageError::NotOwner { .. })
    ));
    b.flush().await.expect("b flushes");
    assert_eq!(b.flushed_up_to(), second);
    a.apply_flushed(second).await.expect("a follows b");
    assert_eq!(a.memstore().immutable_count(), 0);

    // b releases, a claims again at 3, and a released b cannot reclaim at 3.
    b.release();
    let third = write_both(put("k3", "three")).await;
    assert!(is_fenced(&a.claim(2).await));
    a.claim(3).await.expect("a claims at 3");
    assert!(
        is_fenced(&b.claim(3).await),
        "released owner stays fenced out"
    );
    a.flush().await.expect("a flushes at 3");
    b.apply_flushed(third).await.expect("b follows a again");
    b.claim(4).await.expect("b claims at 4");
    a.write(seq_after(third), 100, &put("k4", "four"))
        .await
        .expect("a has not learnt it is fenced yet");
    assert!(is_fenced(&a.flush().await), "owner at 3 is fenced by 4");
    a.release();

    for tablet in [&a, &b] {
        assert_reads(
            tablet,
            100,
            &[("k1", "one"), ("k2", "two"), ("k3", "three")],
        )
        .await;
    }
    // A late release for an older claim leaves a newer claim on the same handle alone.
    a.claim(5).await.expect("a claims at 5");
    a.claim(6).await.expect("a claims again at 6");
    a.release_at(5);
    assert_eq!(a.epoch(), Some(6));
    a.release_at(6);
    assert_eq!(a.epoch(), None);

    // A fresh replica starts after everything flushed so far.
    let c = replica(&base_a).await;
    assert_eq!(c.recovered_up_to(), third);
    base_a.shutdown().await;
    base_b.shutdown().await;
}

/// A group commits many writes per journal entry, so one entry can carry several batches
/// for one tablet. A memtable that fills up in the middle of an entry must not turn
/// immutable there: its flush marks the entry's index flushed, and a replica recovering
/// from that marker would skip the entry's batches left in the next memtable.
#[tokio::test]
async fn a_journal_entry_is_never_split_between_memtables() {
    let store = memory_store();
    let owner_base = open_base(store.clone(), base_options()).await;
    let owner = owner_at_epoch_1(&owner_base).await;
    let fills_a_memtable = put("big", &"v".repeat(4 * 1024));
    owner
        .write_committed(1, 1, &fills_a_memtable)
        .await
        .expect("first batch of entry 1");
    owner
        .write_committed(1, 1, &put("second", "same entry"))
        .await
        .expect("second batch of entry 1");
    let next_entry = put("next", "entry 2");
    owner
        .write_committed(2, 2, &next_entry)
        .await
        .expect("entry 2");
    let mut flushed = owner.watch_flushed();
    tokio::time::timeout(
        Duration::from_secs(10),
        flushed.wait_for(|&up_to| up_to >= 1),
    )
    .await
    .expect("the background flusher flushes the full memtable")
    .expect("flush watch");

    // The owner crashes with entry 2 in memory; a new replica replays after the marker.
    let recovered_base = open_base(store, base_options()).await;
    let recovered = replica(&recovered_base).await;
    assert!(recovered.recovered_up_to() >= 1);
    if recovered.recovered_up_to() < 2 {
        recovered
            .write_committed(2, 2, &next_entry)
            .await
            .expect("replay entry 2");
    }
    assert_reads(
        &recovered,
        2,
        &[("second", "same entry"), ("next", "entry 2")],
    )
    .await;
    owner_base.shutdown().await;
    recovered_base.shutdown().await;
}

/// The group's apply loop runs apart from the task that learns of a lost
/// leadership: an owner can be fenced (its flush refused) and still apply the
/// new leader's committed writes before it releases. It must apply them, or
/// once it leads again its flush marker covers a write it never had, every
/// replica drops that write from memory, and an acknowledged write is gone.
#[tokio::test]
async fn a_fenced_owner_applies_committed_writes_so_its_next_flush_skips_none() {
    let (base_a, base_b, a, b) = two_replicas().await;
    a.claim(1).await.expect("a claims at 1");
    let batch = put("k1", "one");
    a.write_committed(1, 1, &batch).await.expect("write a");
    b.write_committed(1, 1, &batch).await.expect("write b");

    // b leads at 2; a learns it only from its refused flush.
    b.claim(2).await.expect("b claims at 2");
    assert!(is_fenced(&a.flush().await));
    let batch = put("k2", "two");
    assert!(
        is_fenced(&a.write(2, 2, &batch).await),
        "the embedded API refuses"
    );
    a.write_committed(2, 2, &batch)
        .await
        .expect("a fenced owner applies a committed write");
    b.write_committed(2, 2, &batch).await.expect("write b");

    // b loses the lead before it flushed; a leads again at 3 and flushes past 2.
    a.release();
    b.release();
    a.claim(3).await.expect("a claims at 3");
    let batch = put("k3", "three");
    a.write_committed(3, 3, &batch).await.expect("write a");
    b.write_committed(3, 3, &batch).await.expect("write b");
    a.flush().await.expect("a flushes at 3");
    assert_eq!(a.flushed_up_to(), 3);
    b.apply_flushed(3).await.expect("b follows a");
    assert_eq!(b.memstore().immutable_count(), 0);
    for tablet in [&a, &b] {
        assert_reads(tablet, 3, &[("k1", "one"), ("k2", "two"), ("k3", "three")]).await;
    }
    base_a.shutdown().await;
    base_b.shutdown().await;
}

#[tokio::test]
async fn a_claim_drops_memtables_an_earlier_owner_flushed() {
    let store = memory_store();
    let base_a = open_base(store.clone(), base_options()).await;
    let base_b = open_base(store.clone(), base_options()).await;
    let a = replica(&base_a).await;
    let b_budget = budget();
    let b = Tablet::open_replica(
        Arc::clone(&base_b),
        1,
        KeyRange::all(),
        small_memtables(),
        Arc::clone(&b_budget),
    )
    .await
    .expect("open b");
    a.claim(1).await.expect("claim a");
    for seq in 1..=20 {
        let batch = put(&format!("k{seq:02}"), &"v".repeat(300));
        a.write(seq, seq, &batch).await.expect("write a");
        b.write(seq, seq, &batch).await.expect("write b");
    }
    a.flush().await.expect("flush a");
    // b never saw the marker, but its claim reads the manifest's.
    assert!(b.memstore().immutable_count() > 0, "b rotated on size");
    b.claim(2).await.expect("claim b");
    assert_eq!(b.memstore().immutable_count(), 0);
    assert_eq!(b.flushed_up_to(), 20);
    for seq in 1..=20 {
        let got = b
            .get(format!("k{seq:02}").as_bytes(), 20)
            .await
            .expect("get");
        assert!(got.is_some(), "k{seq:02} readable after the drop");
    }
    base_a.shutdown().await;
    base_b.shutdown().await;
}

#[tokio::test]
async fn apply_flushed_waits_for_the_manifest_and_reports_when_it_never_shows() {
    let store = memory_store();
    let base_a = open_base(store.clone(), base_options()).await;
    let base_b = open_base(store.clone(), base_options()).await;
    let owner = owner_at_epoch_1(&base_a).await;
    let follower = replica(&base_b).await;
    for seq in 1..=5 {
        let batch = put(&format!("k{seq}"), "v");
        owner.write(seq, seq, &batch).await.expect("write owner");
        follower
            .write(seq, seq, &batch)
            .await
            .expect("write replica");
    }
    // The marker reaches the replica before the manifest shows the flush.
    let early = tokio::spawn({
        let follower = Arc::clone(&follower);
        async move { follower.apply_flushed(5).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    owner.flush().await.expect("flush");
    let applied = early.await.expect("task");
    assert!(applied.is_ok(), "{}", describe(&applied));
    assert_eq!(follower.memstore().immutable_count(), 0);

    // A marker the manifest never records: a typed error, nothing dropped.
    let batch = put("k6", "v");
    owner.write(6, 6, &batch).await.expect("write owner");
    follower.write(6, 6, &batch).await.expect("write replica");
    let missing = follower.apply_flushed(6).await;
    assert!(
        matches!(
            missing,
            Err(StorageError::FlushNotVisible {
                wanted: 6,
                found: 5,
                ..
            })
        ),
        "{}",
        describe(&missing)
    );
    let got = follower.get(b"k6", 6).await.expect("get");
    assert_eq!(got.as_deref(), Some(&b"v"[..]));
    base_a.shutdown().await;
    base_b.shutdown().await;
}
