use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::encoding::ClientState;
use super::*;

fn request(client_id: ClientId, seq: u64, done_below: u64) -> RequestKey {
    RequestKey {
        write: WriteId { client_id, seq },
        done_below,
    }
}

fn key(seq: u64) -> RequestKey {
    request([7; 16], seq, 0)
}

/// A table past its `DedupLearning` entry.
fn learning() -> Dedup {
    Dedup {
        learning: true,
        ..Dedup::default()
    }
}

/// `dedup` restored from a snapshot of the group at `index`, through the wire form.
fn restored(dedup: &Dedup, index: u64) -> Dedup {
    let mut snapshot = GroupSnapshot::default();
    dedup.snapshot(index, &mut snapshot);
    let wire = prost::Message::encode_to_vec(&snapshot);
    let snapshot: GroupSnapshot =
        prost::Message::decode(wire.as_slice()).unwrap_or_else(|e| panic!("{e}"));
    Dedup::from_snapshot(&snapshot, index)
}

fn at(index: u64) -> Applied {
    Applied {
        index,
        commit_ts: index * 10,
    }
}

/// The requests `(client, seq)`, in order, as a snapshot records them (index and commit
/// timestamp 1).
fn records(writes: impl IntoIterator<Item = (ClientId, u64)>) -> RecentRequests {
    let mut recording = Recording::new(true);
    let applied = Applied {
        index: 1,
        commit_ts: 1,
    };
    for (client_id, seq) in writes {
        recording.push(&WriteId { client_id, seq }, &applied);
    }
    recording.finish([])
}

/// Everything a table holds that decides what it does next: its records in order, its
/// clients, and whether it learns.
type TableState = (Vec<(WriteId, Applied)>, Vec<(ClientId, Client)>, bool);

fn state(dedup: &Dedup) -> TableState {
    let order = dedup
        .in_order()
        .map(|(write, record)| (*write, record.applied))
        .collect();
    let mut clients: Vec<(ClientId, Client)> = dedup
        .clients
        .iter()
        .map(|(id, client)| (*id, client.clone()))
        .collect();
    clients.sort_unstable_by_key(|(id, _)| *id);
    (order, clients, dedup.learning)
}

#[test]
fn remembers_and_evicts_oldest_first() {
    let mut dedup = learning();
    for seq in 0..(CAPACITY as u64 + 2) {
        dedup.insert(&key(seq), at(seq));
    }
    assert_eq!(dedup.get(&key(0)), None);
    assert_eq!(dedup.get(&key(1)), None);
    assert_eq!(dedup.get(&key(2)), Some(at(2)));
    assert_eq!(dedup.applied.len(), CAPACITY);
    assert!(dedup.order.len() <= 2 * CAPACITY + ORDER_SLACK);
}

/// The table forgets a write once a later one of its client says it is done, and
/// refuses a copy of it that arrives after that: applied late, it could overwrite that
/// later write.
#[test]
fn a_write_its_client_is_done_with_is_forgotten_and_refused() {
    let client = [1; 16];
    let mut dedup = learning();
    for (index, seq, done_below) in [(1, 1, 1), (2, 2, 1), (3, 3, 3)] {
        let key = request(client, seq, done_below);
        assert!(dedup.admit(index, 0, &key));
        dedup.insert(&key, at(index));
    }
    assert_eq!(dedup.get(&request(client, 1, 1)), None);
    assert_eq!(dedup.get(&request(client, 2, 1)), None);
    assert_eq!(dedup.get(&request(client, 3, 3)), Some(at(3)));
    assert_eq!(dedup.counts(), (1, 1));
    assert_eq!(
        dedup.prior(&request(client, 2, 1)),
        Prior::Done { done_below: 3 }
    );
    assert!(!dedup.admit(4, 0, &request(client, 2, 1)), "a late copy");
    assert!(!dedup.admit(4, 1, &request(client, 3, 3)), "a retry");
    assert!(dedup.admit(4, 2, &request(client, 4, 3)));
    assert_eq!(
        dedup
            .refused
            .iter()
            .map(|r| (r.index, r.unit))
            .collect::<Vec<_>>(),
        vec![(4, 0), (4, 1)]
    );
    // Another client's writes are not its business.
    assert_eq!(dedup.prior(&request([2; 16], 2, 0)), Prior::New);
    dedup.truncated(4);
    assert!(dedup.refused.is_empty());
}

#[test]
fn a_snapshot_round_trips_the_table_and_its_order() {
    let mut dedup = learning();
    for seq in 0..100u64 {
        let client_id = [u8::from(seq % 3 == 0); 16];
        let applied = Applied {
            index: seq / 4 + 1,
            commit_ts: 1_000 - seq,
        };
        dedup.insert(&request(client_id, seq, seq.saturating_sub(5)), applied);
    }
    let restored = restored(&dedup, 3);
    assert_eq!(state(&restored), state(&dedup));
    assert_eq!(restored.settled_up_to, 25);
    assert!(restored.learns());
}

/// What a tablet's handoff carries after a busy minute: 50,000 requests of two
/// clients (of an SDK that says nothing is done), interleaved, with commit timestamps a
/// few logical ticks or milliseconds apart. It costs bytes per request, not the ~45 of a
/// record each, and the new group gets every request back with its commit timestamp, at
/// the adoption's index.
#[test]
fn a_handoff_of_many_requests_is_small_and_complete() {
    let mut dedup = learning();
    let mut commit_ts = 1_796_000_000_000u64 << 18;
    let clients = [[1u8; 16], [2u8; 16]];
    for seq in 0..25_000u64 {
        for client_id in clients {
            commit_ts += if seq % 7 == 0 { 1 << 18 } else { 3 };
            let applied = Applied {
                index: 1_000 + seq,
                commit_ts,
            };
            dedup.insert(&request(client_id, seq, 0), applied);
        }
    }
    let handoff = dedup.recent(0, 50_000);
    let bytes = prost::Message::encoded_len(&luna_proto::group::TabletHandoff {
        recent: Some(handoff.clone()),
        ..Default::default()
    });
    assert!(bytes < 50_000 * 6, "{bytes} bytes for 50,000 requests");
    let mut adopted = learning();
    adopted.insert_handed_off(Some(&handoff), &[], 77);
    assert_eq!(adopted.applied.len(), 50_000);
    for (write, record) in &dedup.applied {
        assert_eq!(
            adopted.applied.get(write).map(|adopted| adopted.applied),
            Some(Applied {
                index: 77,
                ..record.applied
            })
        );
    }
}

/// A handoff carries the writes their clients may still retry and what each client is
/// done with, so the new group refuses a late copy of a done write too.
#[test]
fn a_handoff_carries_what_clients_are_done_with() {
    let (windowed, old_sdk) = ([1; 16], [2; 16]);
    let mut dedup = learning();
    let mut index = 0;
    // Up to four writes in flight; the newest applies first in each pair.
    for seq in (1..=100u64).collect::<Vec<_>>().chunks(2) {
        for &seq in seq.iter().rev() {
            index += 1;
            dedup.insert(
                &request(windowed, seq, seq.saturating_sub(3).max(1)),
                at(index),
            );
        }
    }
    for seq in 1..=5 {
        index += 1;
        dedup.insert(&request(old_sdk, seq, 0), at(index));
    }
    let handoff = dedup.recent(0, 1_000);
    let handed_off = replay(Some(&handoff));
    let seqs = |client| -> Vec<u64> {
        let mut seqs: Vec<u64> = handed_off
            .iter()
            .filter(|(write, _)| write.client_id == client)
            .map(|(write, _)| write.seq)
            .collect();
        seqs.sort_unstable();
        seqs
    };
    assert_eq!(seqs(windowed), vec![97, 98, 99, 100]);
    assert_eq!(seqs(old_sdk), vec![1, 2, 3, 4, 5], "0 says nothing is done");
    let mut adopted = learning();
    adopted.insert_handed_off(Some(&handoff), &[], 500);
    assert_eq!(
        adopted.prior(&request(windowed, 50, 1)),
        Prior::Done { done_below: 97 }
    );
    assert!(matches!(
        adopted.prior(&request(windowed, 98, 95)),
        Prior::Applied(Applied { index: 500, .. })
    ));
    assert_eq!(adopted.prior(&request(old_sdk, 6, 0)), Prior::New);
}

/// A client the table knows nothing useful of (no write, and done below 1) is dropped
/// however it got there, as a restored table never has it: replicas count the same
/// clients, which decides whom they forget first.
#[test]
fn a_client_that_says_nothing_is_dropped_as_a_restore_would() {
    let client = [5; 16];
    let mut dedup = learning();
    dedup.insert_handed_off(Some(&records([(client, 0)])), &[], 1);
    assert_eq!(dedup.counts(), (1, 1));
    let done_below_1 = Recording::new(false).finish([(client, 1, 0)]);
    dedup.insert_handed_off(Some(&done_below_1), &[], 2);
    assert_eq!(dedup.counts(), (0, 0));
    assert_eq!(state(&restored(&dedup, 2)), state(&dedup));
}

/// Replicas that start from snapshots an older build wrote, each at its own index, agree
/// on a late copy of a write its client was done with: the older build's log did not
/// teach tables what clients are done with, and neither does its replay, so every replica
/// starts learning at the `DedupLearning` entry.
#[test]
fn replicas_started_from_an_older_builds_snapshots_agree() {
    let client = [6; 16];
    let old_log = [request(client, 1, 1), request(client, 3, 3)];
    // One replica replays the older build's whole log; the other starts from that build's
    // snapshot at index 2 (records only, as it wrote them).
    let mut replayed = Dedup::default();
    for (index, key) in (1u64..).zip(&old_log) {
        assert!(replayed.admit(index, 0, key));
        replayed.insert(key, at(index));
    }
    let legacy: Vec<AppliedRequest> = (1u64..)
        .zip(&old_log)
        .map(|(index, key)| AppliedRequest {
            request_id: Some(key.to_proto()),
            commit_ts: at(index).commit_ts,
            index,
        })
        .collect();
    let snapshot = GroupSnapshot {
        recent_requests: legacy,
        ..GroupSnapshot::default()
    };
    let mut restored = Dedup::from_snapshot(&snapshot, 2);
    assert_eq!(state(&restored), state(&replayed));
    // Entry 3 starts learning; entry 4 is a late copy of write 2, which the client gave up
    // on before the upgrade. Neither replica knows, so both apply it.
    let late_copy = request(client, 2, 1);
    for table in [&mut replayed, &mut restored] {
        table.start_learning(3);
        assert!(table.admit(4, 0, &late_copy));
        table.insert(&late_copy, at(4));
    }
    assert_eq!(state(&restored), state(&replayed));
    // From then on both learn: write 5 says 1 to 4 are done.
    for table in [&mut replayed, &mut restored] {
        let next = request(client, 5, 5);
        assert!(table.admit(5, 0, &next));
        table.insert(&next, at(5));
        assert_eq!(
            table.prior(&request(client, 4, 4)),
            Prior::Done { done_below: 5 }
        );
    }
    assert_eq!(state(&restored), state(&replayed));
}

/// A handoff that brings back a request the group applied before keeps the first
/// record, so the table and its order stay one.
#[test]
fn the_first_application_of_a_request_stands() {
    let mut dedup = learning();
    let first = at(5);
    dedup.insert(&key(1), first);
    let handoff = records([([7; 16], 1), ([7; 16], 2)]);
    dedup.insert_handed_off(Some(&handoff), &[], 9);
    assert_eq!(dedup.get(&key(1)), Some(first));
    assert_eq!(dedup.get(&key(2)).map(|applied| applied.index), Some(9));
    assert_eq!(dedup.order.len(), dedup.applied.len());
}

#[test]
fn the_older_record_form_is_still_read() {
    let legacy = [AppliedRequest {
        request_id: Some(key(5).to_proto()),
        commit_ts: 50,
        index: 9,
    }];
    let snapshot = GroupSnapshot {
        recent_requests: legacy.to_vec(),
        ..GroupSnapshot::default()
    };
    let restored = Dedup::from_snapshot(&snapshot, 9);
    assert!(!restored.learns(), "older builds did not learn");
    let expected = Applied {
        index: 9,
        commit_ts: 50,
    };
    assert_eq!(restored.get(&key(5)), Some(expected));
    assert_eq!(restored.at, 9, "the table stands for the snapshot's index");
    let mut adopted = learning();
    adopted.insert_handed_off(None, &legacy, 3);
    assert_eq!(adopted.get(&key(5)).map(|applied| applied.index), Some(3));
}

/// A malformed list (a peer's bug, or a damaged entry) loses requests, never panics.
#[test]
fn malformed_lists_are_skipped_or_cut_short() {
    let recent = RecentRequests {
        client_ids: vec![
            bytes::Bytes::from_static(b"short"),
            bytes::Bytes::from_static(&[7; 16]),
        ],
        clients: vec![0, 1, 1, 5, 1],
        seq_deltas: vec![1, 3, i64::MIN, 4],
        commit_ts_deltas: vec![1, 29, -5, 1, 2],
        index_deltas: vec![i64::MAX],
        done_below: vec![9, 2],
        last_index: vec![],
    };
    let snapshot = GroupSnapshot {
        recent: Some(recent),
        recent_at: 1,
        dedup_learning: true,
        ..GroupSnapshot::default()
    };
    let restored = Dedup::from_snapshot(&snapshot, 1);
    assert_eq!(restored.applied.len(), 2);
    assert_eq!(
        restored.get(&key(3)).map(|applied| applied.commit_ts),
        Some(30)
    );
    assert_eq!(restored.prior(&key(1)), Prior::Done { done_below: 2 });
}

#[test]
fn rejects_malformed_request_ids() {
    let id = RequestId {
        client_id: bytes::Bytes::from_static(b"short"),
        seq: 1,
        done_below: 0,
    };
    assert!(RequestKey::new(&id).is_none());
    let id = RequestId {
        client_id: bytes::Bytes::from_static(&[1; 16]),
        seq: 9,
        done_below: 10,
    };
    assert!(RequestKey::new(&id).is_none(), "done with itself");
    let id = RequestId {
        client_id: bytes::Bytes::from_static(&[1; 16]),
        seq: 9,
        done_below: 7,
    };
    assert_eq!(RequestKey::new(&id).map(|key| key.to_proto()), Some(id));
}

/// One request of a generated log.
#[derive(Debug, Clone)]
enum Op {
    Write(RequestKey),
    Handoff(RecentRequests),
    /// A `DedupLearning` entry.
    Learn,
}

/// A log of `entries` entries from five clients: new writes, retries (some batched right
/// behind their original), late copies of done writes, and handoffs.
fn generated_log(rng: &mut StdRng, entries: usize) -> Vec<Vec<Op>> {
    let client = |n: u8| [n; 16];
    let mut next_seq = [1u64; 5];
    let mut log = Vec::with_capacity(entries);
    // Where the table starts learning; at 0 it learns from the start.
    let learn_at = rng.random_range(0..entries / 2);
    for number in 0..entries {
        let mut entry = Vec::new();
        if number == learn_at {
            entry.push(Op::Learn);
            log.push(entry);
            continue;
        }
        if rng.random_ratio(1, 25) {
            let mut recording = Recording::new(false);
            for _ in 0..rng.random_range(0..4) {
                let write = WriteId {
                    client_id: client(rng.random_range(0..5)),
                    seq: rng.random_range(0..40),
                };
                recording.push(&write, &at(1));
            }
            let done: Vec<ClientState> = (0..rng.random_range(0..3))
                .map(|_| (client(rng.random_range(0..5)), rng.random_range(0..40), 0))
                .collect();
            entry.push(Op::Handoff(recording.finish(done)));
            log.push(entry);
            continue;
        }
        for _ in 0..rng.random_range(1..4) {
            let n = rng.random_range(0..5u8);
            let slot = &mut next_seq[n as usize];
            let seq = if rng.random_ratio(2, 3) {
                *slot += 1;
                *slot - 1
            } else {
                rng.random_range(1..=*slot)
            };
            // Client 4 is an old SDK: it never says what is done.
            let done_below = if n == 4 {
                0
            } else {
                seq - rng.random_range(0..4).min(seq - 1)
            };
            let key = request(client(n), seq, done_below);
            if rng.random_ratio(1, 10) {
                entry.push(Op::Write(key.clone()));
            }
            entry.push(Op::Write(key));
        }
        log.push(entry);
    }
    log
}

/// Applies entry `index` of a log as the apply loop does; returns which requests applied.
fn apply(dedup: &mut Dedup, index: u64, entry: &[Op]) -> Vec<bool> {
    entry
        .iter()
        .enumerate()
        .map(|(unit, op)| match op {
            Op::Write(key) => {
                let admitted = dedup.admit(index, unit as u32, key);
                if admitted {
                    dedup.insert(key, at(index));
                }
                admitted
            }
            Op::Handoff(recent) => {
                dedup.insert_handed_off(Some(recent), &[], index);
                true
            }
            Op::Learn => {
                dedup.start_learning(index);
                true
            }
        })
        .collect()
}

/// A replica restored from a snapshot built later than the snapshot's index, which then
/// replays the log from that index, decides every request as the replicas that applied
/// the whole log did, and ends with the same table. Over generated logs with small limits,
/// so that every way of forgetting happens, and a `DedupLearning` entry somewhere in the
/// first half. `LUNA_SEED=<n>` replays one log.
#[test]
fn a_replica_restored_from_a_later_snapshot_decides_as_the_others() {
    let seeds: Vec<u64> = match std::env::var("LUNA_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => vec![seed],
        None => (0..300).collect(),
    };
    let limits = Limits {
        writes: 12,
        clients: 4,
    };
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let log = generated_log(&mut rng, 120);
        let built_at = rng.random_range(1..=log.len() as u64);
        let index = rng.random_range(1..=built_at);
        let truncated = rng.random_range(0..index);
        let mut leader = Dedup {
            limits,
            ..Dedup::default()
        };
        let mut decisions = Vec::new();
        let mut snapshot = None;
        for (i, entry) in log.iter().enumerate() {
            let at_index = i as u64 + 1;
            decisions.push(apply(&mut leader, at_index, entry));
            if at_index == index {
                leader.truncated(truncated);
            }
            if at_index == built_at {
                snapshot = Some(restored(&leader, index));
            }
        }
        let mut restored = snapshot.unwrap_or_default();
        restored.limits = limits;
        for (i, entry) in log.iter().enumerate().skip(index as usize) {
            let at_index = i as u64 + 1;
            assert_eq!(
                apply(&mut restored, at_index, entry),
                decisions[i],
                "seed {seed}: entry {at_index} (snapshot at {index}, built at {built_at})"
            );
        }
        assert_eq!(
            state(&restored),
            state(&leader),
            "seed {seed}: final tables"
        );
    }
}
