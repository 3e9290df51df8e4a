//! Request ids of writes the group applied recently, so that a client's retry of a write is
//! answered with the original outcome instead of being applied twice.
//!
//! Every replica builds the same table from the log (apply is deterministic, and so is the
//! eviction: by count, oldest first), so a new leader deduplicates what the old one applied.
//! The table covers the most recent `CAPACITY` writes; a retry older than that is applied
//! again, which is why clients retry within a deadline of seconds.

use std::collections::{HashMap, VecDeque};

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
