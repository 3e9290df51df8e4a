//! [`raft::Storage`] over a shared raft-engine: one raft-engine "region" per stream.
//!
//! Entries live in the engine's log; the hard state, conf state and snapshot are engine
//! key-values of the stream. Writes are added to a [`LogBatch`] that collects every ready
//! round of every stream until the sync thread writes and fsyncs it in one engine write;
//! only then does raft learn the round is persisted. Until it is written, raft reads the
//! entries from the stream's [`EntryCache`], which also keeps the tail the followers still
//! need.
//!
//! A snapshot is metadata only: raft's index, term and conf state, and the application's
//! bytes (see `kernel::stream`). The log starts right after it. Because the application
//! may snapshot an index older than the last membership change, the conf state each change
//! made is also kept by index (the history), until a snapshot covers it. The history is
//! mirrored in memory: a change may still wait in the sync thread's batch when the
//! application truncates at its index, so the engine alone may not know it yet.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command, Engine, LogBatch, MessageExt};

use super::cache::EntryCache;
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

/// The index of a history key, if `key` is one.
fn history_index(key: &[u8]) -> Option<u64> {
    let index = key.strip_prefix(HISTORY_PREFIX)?;
    Some(u64::from_be_bytes(index.try_into().ok()?))
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
    /// The conf state history as written (or staged) to the engine, by index.
    history: BTreeMap<u64, ConfState>,
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
        let mut history = load_history(&engine, stream_id).map_err(engine_error)?;
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
                history.insert(0, conf_state.clone());
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
        let snapshot_index = snapshot.get_metadata().index;
        let (first, last) = match snapshot_index {
            0 => (
                engine.first_index(stream_id).unwrap_or(1),
                engine.last_index(stream_id).unwrap_or(0),
            ),
            // The snapshot may be all there is: installed, with nothing appended after it.
            index => (
                index + 1,
                engine.last_index(stream_id).unwrap_or(0).max(index),
            ),
        };
        let storage = Self {
            stream_id,
            state: RaftState {
                hard_state,
                conf_state,
            },
            applied,
            snapshot,
            history,
            cache: EntryCache::default(),
            // Everything on disk is written.
            written: last,
            first,
            last,
            engine,
        };
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
        self.history.insert(index, conf_state.clone());
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

    /// The first index still in the log: the one after the snapshot, if there is one.
    pub(crate) fn first_index_inner(&self) -> u64 {
        self.first
    }

    /// The last index of the log, or the snapshot's if nothing follows it.
    fn last_index_inner(&self) -> u64 {
        self.last
    }

    /// Stages a snapshot of `index` holding `data`, and the compaction of the log up to
    /// it, in `batch`; returns the snapshot, which becomes this storage's once the batch is
    /// written ([`set_snapshot`](Self::set_snapshot)). `index` must be in the log and
    /// applied: raft applies only persisted entries, so the engine holds the log up to it
    /// and compacting there never drops an entry that only the cache has.
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
        for &at in self.history.range(..=index).map(|(at, _)| at) {
            batch.delete(self.stream_id, history_key(at));
        }
        batch.add_command(self.stream_id, Command::Compact { index: index + 1 });
        Ok(snapshot)
    }

    /// Makes a snapshot written by [`stage_compaction`](Self::stage_compaction) current:
    /// the log starts after it, and the cache and history drop what it covers.
    pub(crate) fn set_snapshot(&mut self, snapshot: Snapshot) {
        let index = snapshot.get_metadata().index;
        self.first = index + 1;
        self.cache.compact_to(index);
        self.history.retain(|&at, _| at > index);
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
        // The log is the snapshot alone now. The cache goes whole: a stale tail in it may
        // conflict with the leader's log, and rounds still in the sync thread that wrote it
        // are followed in the engine by this batch's `Clean`. Nothing at or before the
        // snapshot is read from the log again, so it counts as written.
        self.history.clear();
        self.cache.clear();
        self.first = meta.index + 1;
        self.last = meta.index;
        self.written = meta.index;
        self.snapshot = snapshot.clone();
        Ok(())
    }

    /// The conf state in force at `index` (at or after the snapshot): the latest one in
    /// the history at or before it, else the snapshot's. A history entry at or before the
    /// snapshot can only be stale (a compaction deleted it while the sync thread still had
    /// it to write), so the snapshot's conf state wins over it.
    fn conf_state_at(&self, index: u64) -> Result<ConfState, String> {
        let snapshot = self.snapshot.get_metadata();
        match self.history.range(..=index).next_back() {
            Some((&at, conf_state)) if snapshot.index == 0 || at > snapshot.index => {
                Ok(conf_state.clone())
            }
            _ if snapshot.index > 0 => Ok(snapshot.get_conf_state().clone()),
            _ => Err(format!("no conf state recorded at or before {index}")),
        }
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

/// The conf state history stored for `stream_id`, by index.
fn load_history(engine: &Engine, stream_id: u64) -> Result<BTreeMap<u64, ConfState>, String> {
    let mut history = BTreeMap::new();
    let mut failed = None;
    // The history keys are exactly those from `c/` up to the next prefix, `c0`.
    let end = [HISTORY_PREFIX[0], HISTORY_PREFIX[1] + 1];
    engine
        .scan_raw_messages(
            stream_id,
            Some(HISTORY_PREFIX),
            Some(&end),
            false,
            |key, bytes| {
                let parsed = history_index(key).ok_or_else(|| format!("history key {key:?}"));
                match parsed.and_then(|at| {
                    ConfState::parse_from_bytes(bytes)
                        .map(|conf_state| (at, conf_state))
                        .map_err(|e| format!("stored conf state history: {e}"))
                }) {
                    Ok((at, conf_state)) => {
                        history.insert(at, conf_state);
                        true
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            },
        )
        .map_err(|e| format!("reading the conf state history: {e}"))?;
    match failed {
        Some(e) => Err(e),
        None => Ok(history),
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
        // The snapshot stands in for its last entry (index 0, term 0 while there is none).
        let meta = self.snapshot.get_metadata();
        if index == meta.index {
            return Ok(meta.term);
        }
        if index < meta.index {
            return Err(raft::Error::Store(StorageError::Compacted));
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

#[cfg(test)]
mod tests {
    use raft::Storage as _;

    use super::*;

    fn open_engine(dir: &tempfile::TempDir) -> Arc<Engine> {
        let config = raft_engine::Config {
            dir: dir.path().display().to_string(),
            ..raft_engine::Config::default()
        };
        Arc::new(Engine::open(config).expect("open engine"))
    }

    fn open(engine: &Arc<Engine>) -> EngineStorage {
        let mut batch = LogBatch::default();
        let storage = EngineStorage::open(Arc::clone(engine), 1, &[1, 2, 3], &mut batch)
            .expect("open storage");
        engine.write(&mut batch, true).expect("bootstrap");
        storage
    }

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range
            .map(|index| Entry {
                index,
                term,
                data: vec![7; 16].into(),
                ..Default::default()
            })
            .collect()
    }

    fn with_learner(learner: u64) -> ConfState {
        ConfState {
            voters: vec![1, 2, 3],
            learners: vec![learner],
            ..Default::default()
        }
    }

    /// A truncation runs on the driver while the sync thread may still hold the round that
    /// applied a membership change at or below `up_to`: the snapshot must hold that
    /// change's conf state anyway, and the late round must not bring back what the
    /// compaction dropped, also after a restart.
    #[test]
    fn compaction_sees_conf_changes_the_sync_thread_has_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open_engine(&dir);
        let mut storage = open(&engine);
        let mut written = LogBatch::default();
        storage
            .append(&entries(1..=5, 1), &mut written)
            .expect("append");
        let committed = HardState {
            term: 1,
            commit: 5,
            ..Default::default()
        };
        storage
            .set_hard_state(&committed, &mut written)
            .expect("hard state");
        engine.write(&mut written, true).expect("write");
        storage.on_written(5, 1, u64::MAX, 0);
        // The change at 3 waits in a round the sync thread has not written.
        let mut pending = LogBatch::default();
        storage
            .set_conf_state(&with_learner(4), 3, &mut pending)
            .expect("conf state");
        let mut compaction = LogBatch::default();
        let snapshot = storage
            .stage_compaction(4, Bytes::from_static(b"app"), &mut compaction)
            .expect("stage");
        assert_eq!(snapshot.get_metadata().get_conf_state(), &with_learner(4));
        engine.write(&mut compaction, true).expect("compact");
        storage.set_snapshot(snapshot);
        assert_eq!(
            (storage.first_index(), storage.last_index()),
            (Ok(5), Ok(5))
        );
        assert_eq!(storage.term(4), Ok(1));
        assert_eq!(
            storage.term(3),
            Err(raft::Error::Store(StorageError::Compacted))
        );
        // The late round writes the history key the compaction deleted.
        engine.write(&mut pending, true).expect("late round");
        // A later change, then a restart.
        let mut round = LogBatch::default();
        storage
            .set_conf_state(&with_learner(5), 5, &mut round)
            .expect("conf state");
        engine.write(&mut round, true).expect("write");
        drop(storage);
        let storage = open(&engine);
        assert_eq!(
            (storage.first_index(), storage.last_index()),
            (Ok(5), Ok(5))
        );
        assert_eq!(storage.term(4), Ok(1));
        assert_eq!(storage.conf_state_at(4), Ok(with_learner(4)));
        assert_eq!(storage.conf_state_at(5), Ok(with_learner(5)));
        let entries = storage
            .entries(5, 6, None, GetEntriesContext::empty(false))
            .expect("entries");
        assert_eq!(entries.iter().map(|e| e.index).collect::<Vec<_>>(), [5]);
    }

    /// Installing a snapshot wipes the log in memory at once: the cache's stale tail, which
    /// a round still unwritten holds, is never read again, and the `Clean` behind that
    /// round in the engine drops it on disk.
    #[test]
    fn an_installed_snapshot_replaces_a_stale_cached_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open_engine(&dir);
        let mut storage = open(&engine);
        let mut stale = LogBatch::default();
        storage
            .append(&entries(1..=8, 1), &mut stale)
            .expect("append");
        let snapshot = Snapshot {
            data: Bytes::from_static(b"leader's"),
            metadata: Some(SnapshotMetadata {
                conf_state: Some(with_learner(4)).into(),
                index: 6,
                term: 2,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let mut round = LogBatch::default();
        storage
            .apply_snapshot(&snapshot, &mut round)
            .expect("install");
        storage
            .append(&entries(7..=7, 2), &mut round)
            .expect("append");
        assert_eq!(
            (storage.first_index(), storage.last_index()),
            (Ok(7), Ok(7))
        );
        assert_eq!(storage.term(6), Ok(2));
        assert_eq!(storage.term(7), Ok(2));
        assert_eq!(
            storage.term(8),
            Err(raft::Error::Store(StorageError::Unavailable))
        );
        // The sync thread writes the stale round, then the one with the install.
        engine.write(&mut stale, true).expect("stale round");
        storage.on_written(8, 1, u64::MAX, 0);
        assert_eq!(storage.term(7), Ok(2), "the stale round moved nothing");
        engine.write(&mut round, true).expect("install round");
        storage.on_written(7, 2, u64::MAX, 0);
        drop(storage);
        let storage = open(&engine);
        assert_eq!(
            (storage.first_index(), storage.last_index()),
            (Ok(7), Ok(7))
        );
        assert_eq!(storage.term(7), Ok(2));
        assert_eq!(storage.conf_state_at(7), Ok(with_learner(4)));
        assert_eq!(
            storage.initial_state().map(|s| s.conf_state),
            Ok(with_learner(4))
        );
    }
}
