//! Request ids of writes the group applied recently, so that a client's retry of a write is
//! answered with the original outcome instead of being applied twice.
//!
//! Every replica builds the same table from the log (apply is deterministic, and so is the
//! eviction: by count, oldest first), so a new leader deduplicates what the old one applied.
//! The table covers the most recent `CAPACITY` writes; a retry older than that is applied
//! again, which is why clients retry within a deadline of seconds.
//!
//! A request id also says which of its client's writes are done (`done_below`: answered or
//! given up on, never sent again). A tablet's handoff leaves those out, which keeps it to
//! the writes its clients may still retry.

use std::collections::{HashMap, VecDeque};

use foldhash::fast::RandomState;

use luna_proto::group::{AppliedRequest, RecentRequests};
use luna_proto::tablet::RequestId;

/// Writes remembered per group.
const CAPACITY: usize = 200_000;

/// A request id, checked: which write of which client, and which of that client's
/// writes are done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestKey {
    write: WriteId,
    done_below: u64,
}

/// Which write of which client: what the table is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct WriteId {
    client_id: [u8; 16],
    seq: u64,
}

impl RequestKey {
    /// The key of a request id; `None` if the client id is not 16 bytes.
    pub(crate) fn new(id: &RequestId) -> Option<RequestKey> {
        let client_id = <[u8; 16]>::try_from(id.client_id.as_ref()).ok()?;
        Some(RequestKey {
            write: WriteId {
                client_id,
                seq: id.seq,
            },
            done_below: id.done_below,
        })
    }

    /// The proto form of the key.
    pub(crate) fn to_proto(&self) -> RequestId {
        RequestId {
            client_id: bytes::Bytes::copy_from_slice(&self.write.client_id),
            seq: self.write.seq,
            done_below: self.done_below,
        }
    }
}

/// Where and when a request was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Applied {
    pub(crate) index: u64,
    pub(crate) commit_ts: u64,
}

/// One remembered request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    applied: Applied,
    /// The request's `done_below`.
    done_below: u64,
}

impl Record {
    /// A request restored from a snapshot or a handoff, which do not keep `done_below`.
    fn unknown_done(applied: Applied) -> Record {
        Record {
            applied,
            done_below: 0,
        }
    }
}

/// The recently applied requests of one group.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    /// Hashed with foldhash, seeded per process: SipHash made a snapshot's or a handoff's
    /// pass over a full table take about 50 ms, with the table locked.
    applied: HashMap<WriteId, Record, RandomState>,
    /// The same records in the order they were applied, which passes over the whole
    /// table read without a lookup each.
    order: VecDeque<(WriteId, Record)>,
}

impl Dedup {
    /// The earlier application of `key`, if remembered.
    pub(crate) fn get(&self, key: &RequestKey) -> Option<Applied> {
        self.applied.get(&key.write).map(|record| record.applied)
    }

    /// Records that `key` was applied; the oldest record goes once the table is full.
    pub(crate) fn insert(&mut self, key: RequestKey, applied: Applied) {
        let record = Record {
            applied,
            done_below: key.done_below,
        };
        self.remember(key.write, record);
    }

    /// Adds a record unless the table has one for `write`: the first application stands
    /// (a handoff may bring back a request this group applied before the tablet left).
    fn remember(&mut self, write: WriteId, record: Record) {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.applied.entry(write) {
            slot.insert(record);
            self.order.push_back((write, record));
        }
        while self.order.len() > CAPACITY {
            if let Some((oldest, _)) = self.order.pop_front() {
                self.applied.remove(&oldest);
            }
        }
    }

    /// The requests applied at or below `index`, with their indexes, for a snapshot of the
    /// group at `index`.
    pub(crate) fn records_up_to(&self, index: u64) -> RecentRequests {
        let mut recording = Recording::new(true);
        for (write, record) in &self.order {
            if record.applied.index <= index {
                recording.push(write, &record.applied);
            }
        }
        recording.recent
    }

    /// The newest requests (at most `limit`) committed at or above `min_commit_ts` that
    /// their clients may still retry, oldest first and without their indexes, for the
    /// group a tablet moves to. A write below the highest `done_below` its client sent is
    /// done: the client never sends it again, so no other group will meet it.
    pub(crate) fn recent(&self, min_commit_ts: u64, limit: usize) -> RecentRequests {
        let mut done_below: HashMap<[u8; 16], u64, RandomState> = HashMap::default();
        for (write, record) in &self.order {
            let done = done_below.entry(write.client_id).or_default();
            *done = (*done).max(record.done_below);
        }
        let may_retry = |write: &WriteId, record: &Record| {
            record.applied.commit_ts >= min_commit_ts
                && done_below
                    .get(&write.client_id)
                    .is_none_or(|&done| write.seq >= done)
        };
        let newest: Vec<&(WriteId, Record)> = self
            .order
            .iter()
            .rev()
            .filter(|(write, record)| may_retry(write, record))
            .take(limit)
            .collect();
        let mut recording = Recording::new(false);
        for (write, record) in newest.into_iter().rev() {
            recording.push(write, &record.applied);
        }
        recording.recent
    }

    /// The table a snapshot recorded, in either of its forms.
    pub(crate) fn from_snapshot(
        recent: Option<&RecentRequests>,
        legacy: &[AppliedRequest],
    ) -> Dedup {
        let mut dedup = Dedup::default();
        for (write, applied) in legacy_records(legacy).chain(replay(recent)) {
            dedup.remember(write, Record::unknown_done(applied));
        }
        dedup
    }

    /// Records the requests of a tablet's handoff, in either of its forms, as applied at
    /// `index` (the adoption's).
    pub(crate) fn insert_handed_off(
        &mut self,
        recent: Option<&RecentRequests>,
        legacy: &[AppliedRequest],
        index: u64,
    ) {
        for (write, applied) in legacy_records(legacy).chain(replay(recent)) {
            self.remember(write, Record::unknown_done(Applied { index, ..applied }));
        }
    }
}

/// Builds a [`RecentRequests`], request by request in the order they were applied.
struct Recording {
    recent: RecentRequests,
    with_index: bool,
    /// Each client's place in `client_ids`.
    slots: HashMap<[u8; 16], u32, RandomState>,
    /// Each client's last sequence number, by place.
    last_seq: Vec<u64>,
    last_commit_ts: u64,
    last_index: u64,
}

impl Recording {
    fn new(with_index: bool) -> Self {
        Self {
            recent: RecentRequests::default(),
            with_index,
            slots: HashMap::default(),
            last_seq: Vec::new(),
            last_commit_ts: 0,
            last_index: 0,
        }
    }

    fn push(&mut self, write: &WriteId, applied: &Applied) {
        let slot = *self.slots.entry(write.client_id).or_insert_with(|| {
            self.recent
                .client_ids
                .push(bytes::Bytes::copy_from_slice(&write.client_id));
            self.last_seq.push(0);
            u32::try_from(self.last_seq.len() - 1).unwrap_or(u32::MAX)
        });
        self.recent.clients.push(slot);
        if let Some(last) = self.last_seq.get_mut(slot as usize) {
            self.recent.seq_deltas.push(delta(last, write.seq));
        }
        let step = delta(&mut self.last_commit_ts, applied.commit_ts);
        self.recent.commit_ts_deltas.push(step);
        if self.with_index {
            let step = delta(&mut self.last_index, applied.index);
            self.recent.index_deltas.push(step);
        }
    }
}

#[cfg(test)]
impl Recording {
    /// The requests `(client, seq)`, in order, as a snapshot records them (index and
    /// commit timestamp 1).
    fn records(writes: impl IntoIterator<Item = ([u8; 16], u64)>) -> RecentRequests {
        let mut recording = Recording::new(true);
        let applied = Applied {
            index: 1,
            commit_ts: 1,
        };
        for (client_id, seq) in writes {
            recording.push(&WriteId { client_id, seq }, &applied);
        }
        recording.recent
    }
}

/// The step from `*last` to `next`, which becomes the new `*last`.
fn delta(last: &mut u64, next: u64) -> i64 {
    let step = next.wrapping_sub(*last) as i64;
    *last = next;
    step
}

/// The requests of `recent`, in order. A request of a malformed client id is skipped, and
/// the requests end where the shortest list ends. Index 0 where indexes are not kept.
fn replay(recent: Option<&RecentRequests>) -> Vec<(WriteId, Applied)> {
    let Some(recent) = recent else {
        return Vec::new();
    };
    let client_ids: Vec<Option<[u8; 16]>> = recent
        .client_ids
        .iter()
        .map(|id| <[u8; 16]>::try_from(id.as_ref()).ok())
        .collect();
    let mut last_seq = vec![0u64; client_ids.len()];
    let (mut commit_ts, mut index) = (0u64, 0u64);
    let mut requests = Vec::with_capacity(recent.clients.len());
    let steps = recent
        .clients
        .iter()
        .zip(&recent.seq_deltas)
        .zip(&recent.commit_ts_deltas);
    for (i, ((&client, &seq_step), &ts_step)) in steps.enumerate() {
        commit_ts = commit_ts.wrapping_add(ts_step as u64);
        if let Some(&index_step) = recent.index_deltas.get(i) {
            index = index.wrapping_add(index_step as u64);
        }
        let (Some(last), Some(Some(client_id))) = (
            last_seq.get_mut(client as usize),
            client_ids.get(client as usize),
        ) else {
            continue;
        };
        *last = last.wrapping_add(seq_step as u64);
        let write = WriteId {
            client_id: *client_id,
            seq: *last,
        };
        requests.push((write, Applied { index, commit_ts }));
    }
    requests
}

/// The requests of the form written before [`RecentRequests`].
fn legacy_records(records: &[AppliedRequest]) -> impl Iterator<Item = (WriteId, Applied)> + '_ {
    records.iter().filter_map(|record| {
        let key = RequestKey::new(record.request_id.as_ref()?)?;
        let applied = Applied {
            index: record.index,
            commit_ts: record.commit_ts,
        };
        Some((key.write, applied))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(client_id: [u8; 16], seq: u64, done_below: u64) -> RequestKey {
        RequestKey {
            write: WriteId { client_id, seq },
            done_below,
        }
    }

    fn key(seq: u64) -> RequestKey {
        request([7; 16], seq, 0)
    }

    #[test]
    fn remembers_and_evicts_oldest_first() {
        let mut dedup = Dedup::default();
        for seq in 0..(CAPACITY as u64 + 2) {
            dedup.insert(
                key(seq),
                Applied {
                    index: seq,
                    commit_ts: seq,
                },
            );
        }
        assert_eq!(dedup.get(&key(0)), None);
        assert_eq!(dedup.get(&key(1)), None);
        assert_eq!(
            dedup.get(&key(2)),
            Some(Applied {
                index: 2,
                commit_ts: 2
            })
        );
        assert_eq!(dedup.applied.len(), CAPACITY);
        assert_eq!(dedup.order.len(), CAPACITY);
    }

    #[test]
    fn snapshot_records_stop_at_the_index_and_round_trip() {
        let mut dedup = Dedup::default();
        for seq in 1..=5 {
            dedup.insert(
                key(seq),
                Applied {
                    index: seq * 10,
                    commit_ts: seq * 100,
                },
            );
        }
        let records = dedup.records_up_to(30);
        assert_eq!(replay(Some(&records)).len(), 3);
        let restored = Dedup::from_snapshot(Some(&records), &[]);
        assert_eq!(
            restored.get(&key(3)),
            Some(Applied {
                index: 30,
                commit_ts: 300
            })
        );
        assert_eq!(
            restored.get(&key(4)),
            None,
            "applied after the snapshot's index"
        );
    }

    /// What a tablet's handoff carries after a busy minute: 50,000 requests of two
    /// clients, interleaved, with commit timestamps a few logical ticks or milliseconds
    /// apart. It costs bytes per request, not the ~45 of a record each, and the new group
    /// gets every request back with its commit timestamp, at the adoption's index.
    #[test]
    fn a_handoff_of_many_requests_is_small_and_complete() {
        let mut dedup = Dedup::default();
        let mut commit_ts = 1_796_000_000_000u64 << 18;
        let clients = [[1u8; 16], [2u8; 16]];
        for seq in 0..25_000u64 {
            for client_id in clients {
                commit_ts += if seq % 7 == 0 { 1 << 18 } else { 3 };
                let applied = Applied {
                    index: 1_000 + seq,
                    commit_ts,
                };
                dedup.insert(request(client_id, seq, 0), applied);
            }
        }
        let handoff = dedup.recent(0, 50_000);
        let bytes = prost::Message::encoded_len(&luna_proto::group::TabletHandoff {
            recent: Some(handoff.clone()),
            ..Default::default()
        });
        assert!(bytes < 50_000 * 6, "{bytes} bytes for 50,000 requests");
        let mut adopted = Dedup::default();
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

    /// A handoff carries only the writes their clients may still retry: not those below
    /// the highest `done_below` a client sent, whatever order its writes applied in.
    #[test]
    fn a_handoff_leaves_out_what_clients_are_done_with() {
        let (windowed, old_sdk, restored) = ([1; 16], [2; 16], [3; 16]);
        let mut dedup = Dedup::from_snapshot(
            Some(&Recording::records([(restored, 1), (restored, 2)])),
            &[],
        );
        let applied = |dedup: &mut Dedup, key: RequestKey| {
            let at = dedup.order.len() as u64 + 1;
            dedup.insert(
                key,
                Applied {
                    index: at,
                    commit_ts: at,
                },
            );
        };
        // Up to four writes in flight; the newest applies first in each pair.
        for seq in (1..=100u64).collect::<Vec<_>>().chunks(2) {
            for &seq in seq.iter().rev() {
                applied(
                    &mut dedup,
                    request(windowed, seq, seq.saturating_sub(3).max(1)),
                );
            }
        }
        for seq in 1..=5 {
            applied(&mut dedup, request(old_sdk, seq, 0));
        }
        applied(&mut dedup, request(restored, 3, 3));
        let handed_off = replay(Some(&dedup.recent(0, 1_000)));
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
        assert_eq!(
            seqs(restored),
            vec![3],
            "a later write says the older ones are done"
        );
        // The group itself still answers a retry of any of them.
        assert!(dedup.get(&request(windowed, 1, 0)).is_some());
    }

    /// A handoff that brings back a request the group applied before keeps the first
    /// record, so the table and its order stay one.
    #[test]
    fn the_first_application_of_a_request_stands() {
        let mut dedup = Dedup::default();
        let first = Applied {
            index: 5,
            commit_ts: 50,
        };
        dedup.insert(key(1), first);
        let handoff = Recording::records([([7; 16], 1), ([7; 16], 2)]);
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
        let restored = Dedup::from_snapshot(None, &legacy);
        let expected = Applied {
            index: 9,
            commit_ts: 50,
        };
        assert_eq!(restored.get(&key(5)), Some(expected));
        let mut adopted = Dedup::default();
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
        };
        let restored = Dedup::from_snapshot(Some(&recent), &[]);
        assert_eq!(restored.applied.len(), 2);
        assert_eq!(
            restored.get(&key(3)).map(|applied| applied.commit_ts),
            Some(30)
        );
    }

    /// Replicas evict requests oldest first, so a replica restored from a snapshot must
    /// hold them in the order the others applied them, clients interleaved.
    #[test]
    fn a_snapshot_keeps_the_order_requests_were_applied_in() {
        let mut dedup = Dedup::default();
        for seq in 0..100u64 {
            let client_id = [u8::from(seq % 3 == 0); 16];
            let applied = Applied {
                index: seq / 4,
                commit_ts: 1_000 - seq,
            };
            dedup.insert(request(client_id, seq, 0), applied);
        }
        let restored = Dedup::from_snapshot(Some(&dedup.records_up_to(u64::MAX)), &[]);
        assert_eq!(restored.order, dedup.order);
        assert_eq!(restored.applied, dedup.applied);
    }

    #[test]
    fn rejects_malformed_client_ids() {
        let id = RequestId {
            client_id: bytes::Bytes::from_static(b"short"),
            seq: 1,
            done_below: 0,
        };
        assert!(RequestKey::new(&id).is_none());
        let id = RequestId {
            client_id: bytes::Bytes::from_static(&[1; 16]),
            seq: 9,
            done_below: 7,
        };
        assert_eq!(RequestKey::new(&id).map(|key| key.to_proto()), Some(id));
    }
}
