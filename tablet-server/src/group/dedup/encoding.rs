//! The compact form of a dedup table in snapshots and handoffs ([`RecentRequests`]):
//! per-request deltas, which take a byte or two where one record each took ~45.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use luna_proto::group::{AppliedRequest, RecentRequests};

use super::{Applied, ClientId, RequestKey, WriteId};

/// What a table knows of one client: `(client, done_below, last_index)`.
pub(super) type ClientState = (ClientId, u64, u64);

/// Builds a [`RecentRequests`], request by request in the order they were applied, then
/// client by client.
pub(super) struct Recording {
    recent: RecentRequests,
    with_index: bool,
    /// Each client's place in `client_ids`.
    slots: HashMap<ClientId, u32, RandomState>,
    /// Each client's last sequence number, by place.
    last_seq: Vec<u64>,
    last_commit_ts: u64,
    last_index: u64,
}

impl Recording {
    /// A recording that keeps indexes (for a snapshot) or not (for a handoff).
    pub(super) fn new(with_index: bool) -> Self {
        Self {
            recent: RecentRequests::default(),
            with_index,
            slots: HashMap::default(),
            last_seq: Vec::new(),
            last_commit_ts: 0,
            last_index: 0,
        }
    }

    pub(super) fn push(&mut self, write: &WriteId, applied: &Applied) {
        let slot = self.slot(write.client_id);
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

    /// Whether a request of `client` was pushed.
    pub(super) fn has_client(&self, client: &ClientId) -> bool {
        self.slots.contains_key(client)
    }

    /// The recording, with what the table knows of `clients` (those that have no request
    /// here are added); `last_index` only where indexes are kept.
    pub(super) fn finish(
        mut self,
        clients: impl IntoIterator<Item = ClientState>,
    ) -> RecentRequests {
        let mut known: Vec<(u32, u64, u64)> = clients
            .into_iter()
            .map(|(client, done_below, last_index)| (self.slot(client), done_below, last_index))
            .collect();
        known.sort_unstable();
        let count = self.recent.client_ids.len();
        self.recent.done_below = vec![0; count];
        if self.with_index {
            self.recent.last_index = vec![0; count];
        }
        for (slot, done_below, last_index) in known {
            if let Some(done) = self.recent.done_below.get_mut(slot as usize) {
                *done = done_below;
            }
            if let Some(last) = self.recent.last_index.get_mut(slot as usize) {
                *last = last_index;
            }
        }
        self.recent
    }

    fn slot(&mut self, client: ClientId) -> u32 {
        *self.slots.entry(client).or_insert_with(|| {
            self.recent
                .client_ids
                .push(bytes::Bytes::copy_from_slice(&client));
            self.last_seq.push(0);
            u32::try_from(self.last_seq.len() - 1).unwrap_or(u32::MAX)
        })
    }
}

/// The step from `*last` to `next`, which becomes the new `*last`.
fn delta(last: &mut u64, next: u64) -> i64 {
    let step = next.wrapping_sub(*last) as i64;
    *last = next;
    step
}

/// The client ids of `recent`, `None` where malformed.
fn client_ids(recent: &RecentRequests) -> Vec<Option<ClientId>> {
    recent
        .client_ids
        .iter()
        .map(|id| <ClientId>::try_from(id.as_ref()).ok())
        .collect()
}

/// The requests of `recent`, in order. A request of a malformed client id is skipped, and
/// the requests end where the shortest list ends. Index 0 where indexes are not kept.
pub(super) fn replay(recent: Option<&RecentRequests>) -> Vec<(WriteId, Applied)> {
    let Some(recent) = recent else {
        return Vec::new();
    };
    let client_ids = client_ids(recent);
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

/// What `recent` says of its clients (0 where it says nothing), malformed ids skipped.
pub(super) fn clients(recent: Option<&RecentRequests>) -> Vec<ClientState> {
    let Some(recent) = recent else {
        return Vec::new();
    };
    client_ids(recent)
        .into_iter()
        .enumerate()
        .filter_map(|(i, client)| {
            let done_below = recent.done_below.get(i).copied().unwrap_or(0);
            let last_index = recent.last_index.get(i).copied().unwrap_or(0);
            Some((client?, done_below, last_index))
        })
        .collect()
}

/// The requests of the form written before [`RecentRequests`].
pub(super) fn legacy_records(
    records: &[AppliedRequest],
) -> impl Iterator<Item = (WriteId, Applied)> + '_ {
    records.iter().filter_map(|record| {
        let key = RequestKey::new(record.request_id.as_ref()?)?;
        let applied = Applied {
            index: record.index,
            commit_ts: record.commit_ts,
        };
        Some((key.write, applied))
    })
}
