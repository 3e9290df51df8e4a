//! [`raft::Storage`] over a shared raft-engine: one raft-engine "region" per stream.
//!
//! Entries live in the engine's log; the hard state, conf state and snapshot are engine
//! key-values of the stream. Writes are added to a [`LogBatch`] that the server writes once
//! per ready round for all of its streams (without fsync, so raft can read them back at
//! once); a separate sync step makes the round durable before raft learns it is persisted.
//!
//! A snapshot is metadata only: raft's index, term and conf state, and the application's
//! bytes (see `kernel::stream`). The log starts right after it. Because the application
//! may snapshot an index older than the last membership change, the conf state each change
//! made is also kept by index (the history), until a snapshot covers it.

use std::sync::Arc;

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command, Engine, LogBatch, MessageExt};

use crate::error::JournalError;

const HARD_STATE_KEY: &[u8] = b"hs";
const CONF_STATE_KEY: &[u8] = b"cs";
/// The index of the last membership change applied, written with the conf state it made.
const APPLIED_KEY: &[u8] = b"ap";
/// The snapshot (raft's `Snapshot`: metadata and the application's data).
const SNAPSHOT_KEY: &[u8] = b"sn";
/// Conf state history: `c/ ‖ index (big endian)` holds the conf state the change at
/// `index` made (index 0: the initial voters). Big endian keeps the keys in index order.
const HISTORY_PREFIX: &[u8] = b"c/";

fn history_key(index: u64) -> Vec<u8> {
    let mut key = HISTORY_PREFIX.to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// Tells raft-engine where the index of a raft entry is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(entry: &Entry) -> u64 {
        entry.index
    }
}

/// One stream's raft log and state in the server's engine.
pub(crate) struct EngineStorage {
    engine: Arc<Engine>,
    stream_id: u64,
    state: RaftState,
    applied: u64,
    /// The latest snapshot; index 0 (the default) while the log was never compacted.
    snapshot: Snapshot,
}

impl EngineStorage {
    /// Loads the stream's state, or bootstraps it with `voters` if the engine has none.
    /// Every replica of a stream bootstraps with the same voters, at index 0, including one
    /// that joins later: it replays the membership changes from the log.
    pub(crate) fn open(
        engine: Arc<Engine>,
        stream_id: u64,
        voters: &[u64],
        batch: &mut LogBatch,
    ) -> Result<Self, JournalError> {
        let engine_error = |reason: String| JournalError::Raft { stream_id, reason };
        let hard_state = match engine.get(stream_id, HARD_STATE_KEY) {
            Some(bytes) => HardState::parse_from_bytes(&bytes)
                .map_err(|e| engine_error(format!("stored hard state: {e}")))?,
            None => HardState::default(),
        };
        let conf_state = match engine.get(stream_id, CONF_STATE_KEY) {
            Some(bytes) => ConfState::parse_from_bytes(&bytes)
                .map_err(|e| engine_error(format!("stored conf state: {e}")))?,
            None => {
                let conf_state = ConfState {
                    voters: voters.to_vec(),
                    ..Default::default()
                };
                for key in [CONF_STATE_KEY.to_vec(), history_key(0)] {
                    batch
                        .put_message(stream_id, key, &conf_state)
                        .map_err(|e| engine_error(format!("encoding conf state: {e}")))?;
                }
                conf_state
            }
        };
        let snapshot = match engine.get(stream_id, SNAPSHOT_KEY) {
            Some(bytes) => Snapshot::parse_from_bytes(&bytes)
                .map_err(|e| engine_error(format!("stored snapshot: {e}")))?,
            None => Snapshot::default(),
        };
        let applied = match engine.get(stream_id, APPLIED_KEY) {
            Some(bytes) => bytes
                .as_slice()
                .try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| {
                    engine_error(format!("stored applied index of {} bytes", bytes.len()))
                })?,
            None => 0,
        };
        // The conf state was written with the applied index of the change that made it,
        // and raft must not replay changes at or below it, nor anything a snapshot covers.
        let applied = applied.max(snapshot.get_metadata().index);
        if applied > hard_state.commit {
            return Err(engine_error(format!(
                "applied index {applied} is past the commit index {}",
                hard_state.commit
            )));
        }
        let storage = Self {
            engine,
            stream_id,
            state: RaftState {
                hard_state,
                conf_state,
            },
            applied,
            snapshot,
        };
        let last = storage.last_index_inner();
        if storage.state.hard_state.commit > last {
            return Err(engine_error(format!(
                "commit index {} is past the last stored entry {last}",
                storage.state.hard_state.commit
            )));
        }
        Ok(storage)
    }

    /// Adds `entries` (which may overwrite a conflicting tail) to `batch`.
    pub(crate) fn append(&mut self, entries: &[Entry], batch: &mut LogBatch) -> raft::Result<()> {
        batch
            .add_entries::<EntryExt>(self.stream_id, entries)
            .map_err(|e| store_error(format!("adding entries: {e}")))
    }

    /// Adds a new hard state to `batch` and makes it the one raft reads.
    pub(crate) fn set_hard_state(
        &mut self,
        hard_state: &HardState,
        batch: &mut LogBatch,
    ) -> raft::Result<()> {
        batch
            .put_message(self.stream_id, HARD_STATE_KEY.to_vec(), hard_state)
            .map_err(|e| store_error(format!("encoding hard state: {e}")))?;
        self.state.hard_state = hard_state.clone();
        Ok(())
    }

    /// Adds the conf state made by the membership change at `index` to `batch`, with that
    /// index as the applied index a restart resumes from.
    pub(crate) fn set_conf_state(
        &mut self,
        conf_state: &ConfState,
        index: u64,
        batch: &mut LogBatch,
    ) -> raft::Result<()> {
        for key in [CONF_STATE_KEY.to_vec(), history_key(index)] {
            batch
                .put_message(self.stream_id, key, conf_state)
                .map_err(|e| store_error(format!("encoding conf state: {e}")))?;
        }
        batch
            .put(
                self.stream_id,
                APPLIED_KEY.to_vec(),
                index.to_le_bytes().to_vec(),
            )
            .map_err(|e| store_error(format!("encoding applied index: {e}")))?;
        self.state.conf_state = conf_state.clone();
        self.applied = index;
        Ok(())
    }

    /// The applied index recovered from disk: that of the last membership change, or of
    /// the snapshot if it is newer.
    pub(crate) fn applied(&self) -> u64 {
        self.applied
    }

    /// The latest snapshot (index 0 if there is none).
    pub(crate) fn snapshot_ref(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The first index still in the log: the one after the snapshot.
    pub(crate) fn first_index_inner(&self) -> u64 {
        match self.snapshot.get_metadata().index {
            0 => self.engine.first_index(self.stream_id).unwrap_or(1),
            index => index + 1,
        }
    }

    fn last_index_inner(&self) -> u64 {
        let last = self.engine.last_index(self.stream_id).unwrap_or(0);
        last.max(self.snapshot.get_metadata().index)
    }

    /// Stages a snapshot of `index` holding `data`, and the compaction of the log up to
    /// it, in `batch`; returns the snapshot, which becomes this storage's once the batch is
    /// written ([`set_snapshot`](Self::set_snapshot)). `index` must be in the log.
    pub(crate) fn stage_compaction(
        &self,
        index: u64,
        data: Bytes,
        batch: &mut LogBatch,
    ) -> Result<Snapshot, String> {
        use raft::Storage as _;
        let term = self
            .term(index)
            .map_err(|e| format!("the term of {index}: {e}"))?;
        let conf_state = self.conf_state_at(index)?;
        let snapshot = Snapshot {
            data,
            metadata: Some(SnapshotMetadata {
                conf_state: Some(conf_state).into(),
                index,
                term,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        batch
            .put_message(self.stream_id, SNAPSHOT_KEY.to_vec(), &snapshot)
            .map_err(|e| format!("encoding the snapshot: {e}"))?;
        // The snapshot holds the conf state at `index`: older history is not needed.
        for key in self.history_keys(index)? {
            batch.delete(self.stream_id, key);
        }
        batch.add_command(self.stream_id, Command::Compact { index: index + 1 });
        Ok(snapshot)
    }

    /// Makes a snapshot written by [`stage_compaction`](Self::stage_compaction) current.
    pub(crate) fn set_snapshot(&mut self, snapshot: Snapshot) {
        self.snapshot = snapshot;
    }

    /// Stages the installation of a snapshot that raft received from the leader: the log
    /// is replaced by the snapshot (entries after it may conflict with the leader's, and
    /// raft expects none), and the conf state is the snapshot's.
    pub(crate) fn apply_snapshot(
        &mut self,
        snapshot: &Snapshot,
        batch: &mut LogBatch,
    ) -> raft::Result<()> {
        let meta = snapshot.get_metadata();
        let conf_state = meta.get_conf_state();
        let mut hard_state = self.state.hard_state.clone();
        hard_state.commit = hard_state.commit.max(meta.index);
        // `Clean` drops the stream's entries and key-values, so every key is written again.
        batch.add_command(self.stream_id, Command::Clean);
        let id = self.stream_id;
        let encoding = |e: raft_engine::Error| store_error(format!("encoding a snapshot: {e}"));
        batch
            .put_message(id, SNAPSHOT_KEY.to_vec(), snapshot)
            .map_err(encoding)?;
        batch
            .put_message(id, CONF_STATE_KEY.to_vec(), conf_state)
            .map_err(encoding)?;
        batch
            .put_message(id, HARD_STATE_KEY.to_vec(), &hard_state)
            .map_err(encoding)?;
        batch
            .put(
                self.stream_id,
                APPLIED_KEY.to_vec(),
                meta.index.to_le_bytes().to_vec(),
            )
            .map_err(|e| store_error(format!("encoding applied index: {e}")))?;
        self.state.conf_state = conf_state.clone();
        self.state.hard_state = hard_state;
        self.applied = meta.index;
        self.snapshot = snapshot.clone();
        Ok(())
    }

    /// The conf state in force at `index` (at or after the snapshot): the latest one in
    /// the history at or before it, else the snapshot's.
    fn conf_state_at(&self, index: u64) -> Result<ConfState, String> {
        let mut found = None;
        let end = history_key(index.saturating_add(1));
        self.engine
            .scan_raw_messages(
                self.stream_id,
                Some(&history_key(0)),
                Some(&end),
                true,
                |_, bytes| {
                    found = Some(ConfState::parse_from_bytes(bytes));
                    false
                },
            )
            .map_err(|e| format!("reading the conf state history: {e}"))?;
        match found {
            Some(parsed) => parsed.map_err(|e| format!("stored conf state history: {e}")),
            None if self.snapshot.get_metadata().index > 0 => {
                Ok(self.snapshot.get_metadata().get_conf_state().clone())
            }
            None => Err(format!("no conf state recorded at or before {index}")),
        }
    }

    /// Keys of the conf state history at or before `index`.
    fn history_keys(&self, index: u64) -> Result<Vec<Vec<u8>>, String> {
        let mut keys = Vec::new();
        let end = history_key(index.saturating_add(1));
        self.engine
            .scan_raw_messages(
                self.stream_id,
                Some(&history_key(0)),
                Some(&end),
                false,
                |key, _| {
                    keys.push(key.to_vec());
                    true
                },
            )
            .map_err(|e| format!("reading the conf state history: {e}"))?;
        Ok(keys)
    }
}

fn store_error(reason: String) -> raft::Error {
    raft::Error::Store(StorageError::Other(reason.into()))
}

impl raft::Storage for EngineStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(self.state.clone())
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index_inner() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let max_size = max_size
            .into()
            .map(|m| usize::try_from(m).unwrap_or(usize::MAX));
        let mut entries = Vec::new();
        self.engine
            .fetch_entries_to::<EntryExt>(self.stream_id, low, high, max_size, &mut entries)
            .map_err(|e| match e {
                raft_engine::Error::EntryCompacted => raft::Error::Store(StorageError::Compacted),
                raft_engine::Error::EntryNotFound => raft::Error::Store(StorageError::Unavailable),
                other => store_error(format!("reading entries {low}..{high}: {other}")),
            })?;
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        // The snapshot stands in for its last entry (index 0, term 0 while there is none).
        let meta = self.snapshot.get_metadata();
        if index == meta.index {
            return Ok(meta.term);
        }
        if index < meta.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.engine.get_entry::<EntryExt>(self.stream_id, index) {
            Ok(Some(entry)) => Ok(entry.term),
            Ok(None) if index < self.first_index_inner() => {
                Err(raft::Error::Store(StorageError::Compacted))
            }
            Ok(None) => Err(raft::Error::Store(StorageError::Unavailable)),
            Err(e) => Err(store_error(format!("reading the term of {index}: {e}"))),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_inner())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_inner())
    }

    /// The latest snapshot, for a follower that needs entries the log no longer holds.
    ///
    /// raft-rs refuses a snapshot whose conf state does not name the recipient. A replica
    /// added after the snapshot's index is not named in it, but it is in the leader's
    /// configuration, and the log after the snapshot holds the change that added it. So
    /// the copy sent to such a replica lists it as a learner: replaying that change later
    /// ("add learner" for a learner) changes nothing, and every replica ends at the same
    /// configuration.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let index = self.snapshot.get_metadata().index;
        if index == 0 || index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snapshot = self.snapshot.clone();
        let cs = snapshot.mut_metadata().mut_conf_state();
        let named = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .chain(&cs.voters_outgoing)
            .any(|&id| id == to);
        if !named {
            cs.learners.push(to);
        }
        Ok(snapshot)
    }
}
