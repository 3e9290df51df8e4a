//! [`raft::Storage`] over a shared raft-engine: one raft-engine "region" per stream.
//!
//! Entries live in the engine's log; the hard state and conf state are engine key-values of
//! the stream. Writes are added to a [`LogBatch`] that collects every ready round of every
//! stream until the sync thread writes and fsyncs it in one engine write; only then does
//! raft learn the round is persisted. Until it is written, raft reads the entries from the
//! stream's [`EntryCache`], which also keeps the tail the followers still need.

use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Engine, LogBatch, MessageExt};

use super::cache::EntryCache;
use crate::error::JournalError;

const HARD_STATE_KEY: &[u8] = b"hs";
const CONF_STATE_KEY: &[u8] = b"cs";
/// The index of the last membership change applied, written with the conf state it made.
const APPLIED_KEY: &[u8] = b"ap";

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
    /// Every entry not yet written to the engine, and recent ones kept for replication.
    cache: EntryCache,
    /// Entries up to here are in the engine as they are in the cache.
    written: u64,
    /// The first and last index of the log. Kept here because raft asks for them on every
    /// `has_ready` and message, and each engine lookup takes a lock of its region map:
    /// with a thousand idle streams that was most of a server's CPU.
    first: u64,
    last: u64,
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
                batch
                    .put_message(stream_id, CONF_STATE_KEY.to_vec(), &conf_state)
                    .map_err(|e| engine_error(format!("encoding conf state: {e}")))?;
                conf_state
            }
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
        // and raft must not replay changes at or below it.
        if applied > hard_state.commit {
            return Err(engine_error(format!(
                "applied index {applied} is past the commit index {}",
                hard_state.commit
            )));
        }
        let storage = Self {
            stream_id,
            state: RaftState {
                hard_state,
                conf_state,
            },
            applied,
            cache: EntryCache::default(),
            written: 0,
            first: engine.first_index(stream_id).unwrap_or(1),
            last: engine.last_index(stream_id).unwrap_or(0),
            engine,
        };
        let last = storage.last;
        if storage.state.hard_state.commit > last {
            return Err(engine_error(format!(
                "commit index {} is past the last stored entry {last}",
                storage.state.hard_state.commit
            )));
        }
        Ok(storage)
    }

    /// Adds `entries` (which may overwrite a conflicting tail) to `batch`, and to the cache
    /// that serves them until the batch is written.
    pub(crate) fn append(&mut self, entries: &[Entry], batch: &mut LogBatch) -> raft::Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        batch
            .add_entries::<EntryExt>(self.stream_id, entries)
            .map_err(|e| store_error(format!("adding entries: {e}")))?;
        // What the engine holds from here on is stale until the batch is written.
        self.written = self.written.min(first.index - 1);
        self.cache.append(entries);
        self.last = self.cache.last().unwrap_or(self.last);
        Ok(())
    }

    /// Notes that the batch holding entry `index` of `term` is written: the cached entries
    /// up to it may go, except those from `keep_from` on (which followers still need) while
    /// the cache holds less than `max_cached` bytes.
    pub(crate) fn on_written(&mut self, index: u64, term: u64, keep_from: u64, max_cached: usize) {
        // A different term there means a later round overwrote the entry, and what follows
        // it is not written yet: wait for that round. The same term means the same entry,
        // and (by raft's log matching) the same entries before it.
        if self.cache.term(index) == Some(term) {
            self.written = self.written.max(index);
        }
        // The last entry stays: raft reads its term on most messages.
        let keep_from = keep_from.min(self.last);
        self.cache
            .compact_to(self.written.min(keep_from.saturating_sub(1)));
        // Past the budget, written entries go even if a follower still needs them: it
        // reads them from the engine.
        while self.cache.bytes() > max_cached
            && let Some(first) = self.cache.first()
            && first <= self.written
            && first < self.last
        {
            self.cache.compact_to(first);
        }
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
        batch
            .put_message(self.stream_id, CONF_STATE_KEY.to_vec(), conf_state)
            .map_err(|e| store_error(format!("encoding conf state: {e}")))?;
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

    /// The applied index recovered from disk (that of the last membership change).
    pub(crate) fn applied(&self) -> u64 {
        self.applied
    }

    /// The first index still in the log.
    pub(crate) fn first_index_inner(&self) -> u64 {
        self.first
    }

    fn last_index_inner(&self) -> u64 {
        self.last
    }

    /// Discards the log before `index`, as log compaction will.
    #[cfg(test)]
    pub(crate) fn compact_to(&mut self, index: u64) {
        self.engine.compact_to(self.stream_id, index);
        self.first = self.engine.first_index(self.stream_id).unwrap_or(1);
    }

    /// Entries `low..high`, from the engine and then the cache, at most `max_size` bytes
    /// as raft counts them (at least one entry).
    pub(crate) fn read(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index_inner() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let cached_from = self.cache.first().unwrap_or(u64::MAX).max(low);
        let mut entries = Vec::new();
        let from_engine = cached_from.min(high);
        if low < from_engine {
            let limit = max_size.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
            self.engine
                .fetch_entries_to::<EntryExt>(self.stream_id, low, from_engine, limit, &mut entries)
                .map_err(|e| match e {
                    raft_engine::Error::EntryCompacted => {
                        raft::Error::Store(StorageError::Compacted)
                    }
                    raft_engine::Error::EntryNotFound => {
                        raft::Error::Store(StorageError::Unavailable)
                    }
                    other => store_error(format!("reading entries {low}..{from_engine}: {other}")),
                })?;
            raft::util::limit_size(&mut entries, max_size);
            if entries.len() as u64 != from_engine - low {
                // Cut short by the size limit.
                return Ok(entries);
            }
        }
        let used = entries.iter().map(|e| u64::from(e.compute_size())).sum();
        if !self
            .cache
            .read(cached_from, high, max_size, used, &mut entries)
        {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(entries)
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
        self.read(low, high, max_size.into())
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        // Logs are never compacted yet, so index 0 is the only entry before the first.
        if index == 0 {
            return Ok(0);
        }
        if let Some(first) = self.cache.first()
            && index >= first
        {
            return self
                .cache
                .term(index)
                .ok_or(raft::Error::Store(StorageError::Unavailable));
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

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Logs are not compacted yet, so a follower always catches up from the log.
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}
