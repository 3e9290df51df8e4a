//! Request ids of the writes a group applied, so that a client's retry of a write is
//! answered with the original outcome instead of being applied twice (the RIFL scheme,
//! "Implementing Linearizability at Large Scale and Low Latency", SOSP 2015).
//!
//! **Forgetting.** A request id also says which of its client's writes are done
//! (`done_below`: answered or given up on, never sent again). The table forgets those
//! writes as soon as a later write says so, which keeps it to the writes in flight: tens
//! per client. A copy of a done write that still arrives (delayed in the network, or
//! proposed before its client gave up on it) is refused, not applied: applied late, it
//! could overwrite a later write of the same client. Writes of clients that never say
//! what is done are forgotten oldest first past `CAPACITY`, and clients past
//! `CLIENT_CAPACITY`, least recently written first.
//!
//! **Replicas agree.** What the table remembers, forgets and refuses depends only on the
//! entries applied, in order, so every replica builds the same table from the log and a
//! new leader deduplicates what the old one applied. A table learns what clients are done
//! with only from a `DedupLearning` entry on: builds before 2026-12-04 did not, their
//! snapshots do not record it, and each replica truncated at its own index, so replicas
//! started from them could otherwise know different things.
//!
//! **Snapshots.** A snapshot stands for the group at its index `x`, but the table goes in
//! as it is when the snapshot is built, at a later index `a` (`recent_at`): forgetting
//! loses what the table held at `x`. With it go the requests refused between the two. A
//! replica restored from the snapshot leaves its table alone while it replays up to `a`,
//! and refuses exactly those requests; from `a` on it decides like every other replica.

mod encoding;
#[cfg(test)]
mod tests;

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, VecDeque};

use foldhash::fast::RandomState;

use luna_proto::group::{AppliedRequest, GroupSnapshot, RecentRequests, RefusedRequest};
use luna_proto::tablet::RequestId;

use self::encoding::{Recording, clients, legacy_records, replay};

/// Writes remembered per group that their clients have not said are done.
const CAPACITY: usize = 200_000;
/// Clients remembered per group.
const CLIENT_CAPACITY: usize = 10_000;

/// How much a table remembers.
#[derive(Debug, Clone, Copy)]
struct Limits {
    writes: usize,
    clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            writes: CAPACITY,
            clients: CLIENT_CAPACITY,
        }
    }
}
/// Forgotten writes the apply order may keep before it is compacted.
const ORDER_SLACK: usize = 1024;

type ClientId = [u8; 16];

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
    client_id: ClientId,
    seq: u64,
}

impl RequestKey {
    /// The key of a request id; `None` if the client id is not 16 bytes, or if it says
    /// the write itself is done (`done_below` above `seq`).
    pub(crate) fn new(id: &RequestId) -> Option<RequestKey> {
        let client_id = <ClientId>::try_from(id.client_id.as_ref()).ok()?;
        if id.done_below > id.seq {
            return None;
        }
        Some(RequestKey {
            write: WriteId {
                client_id,
                seq: id.seq,
            },
            done_below: id.done_below,
        })
    }

    /// Which of its client's writes it is.
    pub(crate) fn seq(&self) -> u64 {
        self.write.seq
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

/// What the group knows of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prior {
    /// Nothing: it may be applied.
    New,
    /// It was applied.
    Applied(Applied),
    /// Its client said it is done with every write below `done_below`, this one too.
    Done { done_below: u64 },
}

/// One remembered request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    applied: Applied,
    /// Its place in the apply order, which outlives the record there.
    slot: u64,
}

/// What the group knows of one client.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Client {
    done_below: u64,
    /// The index of the last entry that wrote for it.
    last_index: u64,
    /// The seqs of its remembered writes.
    seqs: BTreeSet<u64>,
}

impl Client {
    /// Whether the table knows nothing of the client worth keeping: no write, and a
    /// `done_below` that refuses nothing (seqs start at 1). Such a client is dropped, and
    /// never restored from a snapshot, so every replica counts the same clients.
    fn knows_nothing(&self) -> bool {
        self.seqs.is_empty() && self.done_below <= 1
    }
}

/// The recently applied requests of one group.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    /// Hashed with foldhash, seeded per process: SipHash made a pass over a full table
    /// take about 50 ms, with the table locked.
    applied: HashMap<WriteId, Record, RandomState>,
    /// Requests in the order they were applied, by slot; a forgotten one stays until the
    /// front reaches it or a compaction drops it.
    order: VecDeque<(WriteId, u64)>,
    next_slot: u64,
    clients: HashMap<ClientId, Client, RandomState>,
    /// The index of the last entry that changed the table.
    at: u64,
    /// Entries up to here are already in the table, which came from a snapshot built after
    /// them: they are decided by `refused` alone.
    settled_up_to: u64,
    /// Requests refused at indexes the journal may replay (above its last truncation).
    refused: VecDeque<RefusedRequest>,
    /// Whether it learns what clients are done with: not until a `DedupLearning` entry,
    /// so that replicas started from snapshots of older builds, which did not, agree.
    learning: bool,
    limits: Limits,
}

impl Dedup {
    /// The earlier application of `key`, if remembered.
    pub(crate) fn get(&self, key: &RequestKey) -> Option<Applied> {
        self.applied.get(&key.write).map(|record| record.applied)
    }

    /// How many writes and clients the table remembers.
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.applied.len(), self.clients.len())
    }

    /// What the table says of `key`.
    pub(crate) fn prior(&self, key: &RequestKey) -> Prior {
        if let Some(applied) = self.get(key) {
            return Prior::Applied(applied);
        }
        match self.clients.get(&key.write.client_id) {
            Some(client) if key.write.seq < client.done_below => Prior::Done {
                done_below: client.done_below,
            },
            _ => Prior::New,
        }
    }

    /// Whether the `unit`th request of the entry at `index`, `key`, is applied: not if it
    /// was before, or is done. A refusal is kept for snapshots.
    pub(crate) fn admit(&mut self, index: u64, unit: u32, key: &RequestKey) -> bool {
        let request = RefusedRequest { index, unit };
        if index <= self.settled_up_to {
            return !self.refused.contains(&request);
        }
        if self.prior(key) == Prior::New {
            return true;
        }
        self.refused.push_back(request);
        false
    }

    /// Records that `key` was applied, and forgets its client's writes that it says are
    /// done.
    pub(crate) fn insert(&mut self, key: &RequestKey, applied: Applied) {
        if applied.index <= self.settled_up_to {
            return;
        }
        self.at = self.at.max(applied.index);
        self.remember(key.write, applied, applied.index);
        self.advance(key.write.client_id, key.done_below, applied.index);
        self.evict_over_capacity();
    }

    /// Adds a record unless the table has one for `write` (the first application stands:
    /// a handoff may bring back a request this group applied before the tablet left) or
    /// its client is done with it.
    fn remember(&mut self, write: WriteId, applied: Applied, index: u64) {
        let client = self.clients.entry(write.client_id).or_default();
        client.last_index = client.last_index.max(index);
        if write.seq < client.done_below {
            return;
        }
        if let Entry::Vacant(vacant) = self.applied.entry(write) {
            vacant.insert(Record {
                applied,
                slot: self.next_slot,
            });
            self.order.push_back((write, self.next_slot));
            self.next_slot += 1;
            client.seqs.insert(write.seq);
        }
    }

    /// Raises what `client_id` is done below to `done_below`, forgetting its writes below;
    /// only its last write's index while the table does not learn.
    fn advance(&mut self, client_id: ClientId, done_below: u64, index: u64) {
        let done_below = if self.learning { done_below } else { 0 };
        let mut client = match self.clients.entry(client_id) {
            Entry::Occupied(known) => known,
            Entry::Vacant(_) if done_below <= 1 => return,
            Entry::Vacant(vacant) => vacant.insert_entry(Client::default()),
        };
        let known = client.get_mut();
        known.last_index = known.last_index.max(index);
        if done_below <= known.done_below {
            return;
        }
        known.done_below = done_below;
        while let Some(&seq) = known.seqs.first()
            && seq < done_below
        {
            known.seqs.pop_first();
            self.applied.remove(&WriteId { client_id, seq });
        }
        if known.knows_nothing() {
            client.remove();
        }
    }

    /// Forgets the oldest writes past `CAPACITY` and the least recently written clients
    /// past `CLIENT_CAPACITY`, and drops forgotten writes from the order.
    fn evict_over_capacity(&mut self) {
        while self.applied.len() > self.limits.writes {
            let Some((write, slot)) = self.order.pop_front() else {
                break;
            };
            if self.is_live(&write, slot) {
                self.applied.remove(&write);
                if let Entry::Occupied(mut client) = self.clients.entry(write.client_id) {
                    client.get_mut().seqs.remove(&write.seq);
                    if client.get().knows_nothing() {
                        client.remove();
                    }
                }
            }
        }
        if self.clients.len() > self.limits.clients {
            self.evict_clients();
        }
        if self.order.len() > 2 * self.applied.len() + ORDER_SLACK {
            let applied = &self.applied;
            self.order
                .retain(|(write, slot)| applied.get(write).is_some_and(|r| r.slot == *slot));
        }
    }

    /// Forgets a tenth of the clients, least recently written first, with their writes.
    fn evict_clients(&mut self) {
        let mut by_age: Vec<(u64, ClientId)> = self
            .clients
            .iter()
            .map(|(client_id, client)| (client.last_index, *client_id))
            .collect();
        by_age.sort_unstable();
        let excess = self.clients.len() - self.limits.clients * 9 / 10;
        for (_, client_id) in by_age.into_iter().take(excess) {
            if let Some(client) = self.clients.remove(&client_id) {
                for seq in client.seqs {
                    self.applied.remove(&WriteId { client_id, seq });
                }
            }
        }
    }

    fn is_live(&self, write: &WriteId, slot: u64) -> bool {
        self.applied
            .get(write)
            .is_some_and(|record| record.slot == slot)
    }

    /// The remembered writes in the order they were applied.
    fn in_order(&self) -> impl DoubleEndedIterator<Item = (&WriteId, &Record)> {
        self.order.iter().filter_map(|(write, slot)| {
            let record = self.applied.get(write)?;
            (record.slot == *slot).then_some((write, record))
        })
    }

    /// Puts the table into `snapshot`, a snapshot of the group at `up_to` built now: the
    /// table, the index it describes, the requests refused above `up_to`, and whether it
    /// learns.
    pub(crate) fn snapshot(&self, up_to: u64, snapshot: &mut GroupSnapshot) {
        let mut recording = Recording::new(true);
        for (write, record) in self.in_order() {
            recording.push(write, &record.applied);
        }
        let recent = recording.finish(
            self.clients
                .iter()
                .map(|(id, client)| (*id, client.done_below, client.last_index)),
        );
        snapshot.recent = Some(recent);
        snapshot.recent_at = self.at.max(self.settled_up_to);
        snapshot.refused = self
            .refused
            .iter()
            .filter(|request| request.index > up_to)
            .copied()
            .collect();
        snapshot.dedup_learning = self.learning;
    }

    /// Drops refusals the journal will not replay: it was truncated up to `up_to`.
    pub(crate) fn truncated(&mut self, up_to: u64) {
        while self
            .refused
            .front()
            .is_some_and(|request| request.index <= up_to)
        {
            self.refused.pop_front();
        }
    }

    /// The newest requests (at most `limit`) committed at or above `min_commit_ts`, oldest
    /// first and without their indexes, and what every client said is done, for the group
    /// a tablet moves to.
    pub(crate) fn recent(&self, min_commit_ts: u64, limit: usize) -> RecentRequests {
        let newest: Vec<(&WriteId, &Record)> = self
            .in_order()
            .rev()
            .filter(|(_, record)| record.applied.commit_ts >= min_commit_ts)
            .take(limit)
            .collect();
        let mut recording = Recording::new(false);
        for (write, record) in newest.into_iter().rev() {
            recording.push(write, &record.applied);
        }
        let clients: Vec<_> = self
            .clients
            .iter()
            .filter(|(id, client)| client.done_below > 1 || recording.has_client(id))
            .map(|(id, client)| (*id, client.done_below, client.last_index))
            .collect();
        recording.finish(clients)
    }

    /// The table a snapshot of the group at `index` recorded, in any of its forms:
    /// `recent` as of `recent_at` with the requests refused up to there, or (older forms)
    /// as of `index`.
    pub(crate) fn from_snapshot(snapshot: &GroupSnapshot, index: u64) -> Dedup {
        let recent = snapshot.recent.as_ref();
        let mut dedup = Dedup {
            learning: snapshot.dedup_learning,
            ..Dedup::default()
        };
        for (write, applied) in legacy_records(&snapshot.recent_requests).chain(replay(recent)) {
            dedup.remember(write, applied, applied.index);
        }
        for (client_id, done_below, last_index) in clients(recent) {
            dedup.advance(client_id, done_below, last_index);
        }
        dedup.at = snapshot.recent_at.max(index);
        dedup.settled_up_to = snapshot.recent_at;
        // Requests after `recent_at` are decided again as they replay, and recorded then.
        dedup.refused = snapshot
            .refused
            .iter()
            .filter(|request| request.index <= snapshot.recent_at)
            .copied()
            .collect();
        dedup
    }

    /// Whether the table learns what clients are done with (see `DedupLearning`).
    pub(crate) fn learns(&self) -> bool {
        self.learning
    }

    /// From the entry at `index` on, the table learns what clients are done with.
    pub(crate) fn start_learning(&mut self, index: u64) {
        if index <= self.settled_up_to {
            return;
        }
        self.at = self.at.max(index);
        self.learning = true;
    }

    /// Records the requests of a tablet's handoff, in either of its forms, as applied at
    /// `index` (the adoption's), and what their clients said is done.
    pub(crate) fn insert_handed_off(
        &mut self,
        recent: Option<&RecentRequests>,
        legacy: &[AppliedRequest],
        index: u64,
    ) {
        if index <= self.settled_up_to {
            return;
        }
        self.at = self.at.max(index);
        for (client_id, done_below, _) in clients(recent) {
            self.advance(client_id, done_below, index);
        }
        for (write, applied) in legacy_records(legacy).chain(replay(recent)) {
            self.remember(write, Applied { index, ..applied }, index);
        }
        self.evict_over_capacity();
    }
}
