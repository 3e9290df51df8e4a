//! Request ids of writes the group applied recently, so that a client's retry of a write is
//! answered with the original outcome instead of being applied twice.
//!
//! Every replica builds the same table from the log (apply is deterministic, and so is the
//! eviction: by count, oldest first), so a new leader deduplicates what the old one applied.
//! The table covers the most recent `CAPACITY` writes; a retry older than that is applied
//! again, which is why clients retry within a deadline of seconds.

use std::collections::{HashMap, VecDeque};

use luna_proto::group::AppliedRequest;
use luna_proto::tablet::RequestId;

/// Writes remembered per group.
const CAPACITY: usize = 200_000;

/// A request id as a map key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RequestKey {
    client_id: [u8; 16],
    seq: u64,
}

impl RequestKey {
    /// The key of a request id; `None` if the client id is not 16 bytes.
    pub(crate) fn new(id: &RequestId) -> Option<RequestKey> {
        let client_id = <[u8; 16]>::try_from(id.client_id.as_ref()).ok()?;
        Some(RequestKey {
            client_id,
            seq: id.seq,
        })
    }

    /// The proto form of the key.
    pub(crate) fn to_proto(&self) -> RequestId {
        RequestId {
            client_id: bytes::Bytes::copy_from_slice(&self.client_id),
            seq: self.seq,
        }
    }
}

/// Where and when a request was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Applied {
    pub(crate) index: u64,
    pub(crate) commit_ts: u64,
}

/// The recently applied requests of one group.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    applied: HashMap<RequestKey, Applied>,
    order: VecDeque<RequestKey>,
}

impl Dedup {
    /// The earlier application of `key`, if remembered.
    pub(crate) fn get(&self, key: &RequestKey) -> Option<Applied> {
        self.applied.get(key).copied()
    }

    /// Records that `key` was applied; the oldest record goes once the table is full.
    pub(crate) fn insert(&mut self, key: RequestKey, applied: Applied) {
        if self.applied.insert(key.clone(), applied).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > CAPACITY {
            if let Some(oldest) = self.order.pop_front() {
                self.applied.remove(&oldest);
            }
        }
    }

    /// The records of requests applied at or below `index`, oldest first, for a snapshot
    /// of the group at `index`.
    pub(crate) fn records_up_to(&self, index: u64) -> Vec<AppliedRequest> {
        self.order
            .iter()
            .filter_map(|key| {
                let applied = self.applied.get(key)?;
                (applied.index <= index).then(|| record(key, applied))
            })
            .collect()
    }

    /// The newest records (at most `limit`) of requests committed at or above
    /// `min_commit_ts`, oldest first: the ones a client may still retry, for the group a
    /// tablet moves to.
    pub(crate) fn recent(&self, min_commit_ts: u64, limit: usize) -> Vec<AppliedRequest> {
        let mut records: Vec<AppliedRequest> = self
            .order
            .iter()
            .rev()
            .filter_map(|key| {
                let applied = self.applied.get(key)?;
                (applied.commit_ts >= min_commit_ts).then(|| record(key, applied))
            })
            .take(limit)
            .collect();
        records.reverse();
        records
    }

    /// The table a snapshot recorded.
    pub(crate) fn from_records(records: &[AppliedRequest]) -> Dedup {
        let mut dedup = Dedup::default();
        for record in records {
            if let Some(key) = record.request_id.as_ref().and_then(RequestKey::new) {
                dedup.insert(
                    key,
                    Applied {
                        index: record.index,
                        commit_ts: record.commit_ts,
                    },
                );
            }
        }
        dedup
    }
}

/// The proto form of one remembered request.
fn record(key: &RequestKey, applied: &Applied) -> AppliedRequest {
    AppliedRequest {
        request_id: Some(key.to_proto()),
        commit_ts: applied.commit_ts,
        index: applied.index,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seq: u64) -> RequestKey {
        RequestKey {
            client_id: [7; 16],
            seq,
        }
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
        assert_eq!(records.len(), 3);
        let restored = Dedup::from_records(&records);
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

    #[test]
    fn rejects_malformed_client_ids() {
        let id = RequestId {
            client_id: bytes::Bytes::from_static(b"short"),
            seq: 1,
        };
        assert!(RequestKey::new(&id).is_none());
        let id = RequestId {
            client_id: bytes::Bytes::from_static(&[1; 16]),
            seq: 9,
        };
        assert_eq!(RequestKey::new(&id).map(|key| key.to_proto()), Some(id));
    }
}
