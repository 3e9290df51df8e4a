//! `journal::local`: a single-replica [`Stream`] for development and tests.
//!
//! It keeps the replicated stream's durability rule: an append is acknowledged only after
//! the record is fsynced. One writer thread owns the log files; it takes every append that
//! queued while the previous fsync ran, writes them with one `write` and covers them with
//! one fsync (group commit). The log is a directory of segment files of CRC-checked records
//! (see `segment`); docs/journal.md explains why this is not raft-engine.
//!
//! Committed entries are also kept in memory from the first retained index, so subscribers
//! read without touching disk. [`Stream::truncate`] stores the application's snapshot in
//! one atomically replaced file (see `snapshot`), then frees that memory and deletes whole
//! segments; a reopen restores the snapshot, and subscriptions from at or below it start
//! with it. That is the right trade for development and tests, not for large logs.
//!
//! After a write or fsync error the stream fails: the affected appends and every later one
//! get [`StreamError::Io`], and the stream must be reopened. Retrying an fsync after a
//! failure is unsafe (the kernel may have dropped the dirty pages), so it is not tried.

mod segment;
mod snapshot;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::VecDeque;
use std::fs::{File, TryLockError};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use luna_kernel::stream::{
    Committed, Entry, Leadership, Snapshot, Stream, StreamError, Subscription,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::JournalError;
use crate::feed::{EntrySource, spawn_feed};
use writer::{DataSync, Request, SyncFile, Writer};

/// Largest `max_entry_size` accepted: records carry a 32-bit length.
const MAX_ENTRY_SIZE_LIMIT: usize = 64 << 20;
/// Appends that may wait for the writer before `append` itself waits (backpressure).
const QUEUE_DEPTH: usize = 4096;
/// The replica id a local stream reports as its (permanent) leader.
pub const LOCAL_REPLICA_ID: u64 = 1;

/// Settings of a [`LocalStream`].
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Directory holding the segment files (created if missing).
    pub dir: PathBuf,
    /// Largest entry accepted, in bytes (at most 64 MiB).
    pub max_entry_size: usize,
    /// A new segment starts once the active one reaches this many bytes.
    pub segment_size: u64,
    /// Most bytes of entries one group commit writes.
    pub max_batch_bytes: usize,
}

impl LocalConfig {
    /// Defaults for a log in `dir`: 8 MiB entries, 64 MiB segments, 4 MiB batches.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_entry_size: 8 << 20,
            segment_size: 64 << 20,
            max_batch_bytes: 4 << 20,
        }
    }

    fn validate(&self) -> Result<(), JournalError> {
        if self.max_entry_size == 0 || self.max_entry_size > MAX_ENTRY_SIZE_LIMIT {
            return Err(JournalError::InvalidConfig {
                name: "max_entry_size",
                reason: format!(
                    "{} is outside 1..={MAX_ENTRY_SIZE_LIMIT}",
                    self.max_entry_size
                ),
            });
        }
        if self.segment_size == 0 || self.max_batch_bytes == 0 {
            return Err(JournalError::InvalidConfig {
                name: "segment_size/max_batch_bytes",
                reason: "must be positive".to_owned(),
            });
        }
        Ok(())
    }
}

/// A single-replica stream on a local directory. It is always its own leader, in term 1.
#[derive(Debug)]
pub struct LocalStream {
    requests: mpsc::Sender<Request>,
    shared: Arc<Shared>,
    committed: watch::Receiver<u64>,
    leadership: watch::Sender<Leadership>,
    max_entry_size: usize,
    writer: std::thread::JoinHandle<()>,
}

impl LocalStream {
    /// Opens (or creates) the log in `config.dir`, recovering every acknowledged entry.
    ///
    /// A torn final write is cut off (it was never acknowledged); any other damage is
    /// [`JournalError::Corruption`], including a damaged snapshot file or segments that do
    /// not continue where the snapshot ends. Another open stream on the same directory is
    /// [`JournalError::Locked`].
    pub fn open(config: LocalConfig) -> Result<Self, JournalError> {
        Self::open_with(config, Box::new(DataSync))
    }

    /// [`open`](Self::open) with a chosen fsync step, so tests can make it fail.
    pub(crate) fn open_with(
        config: LocalConfig,
        syncer: Box<dyn SyncFile>,
    ) -> Result<Self, JournalError> {
        config.validate()?;
        let dir = &config.dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| JournalError::io(format!("creating {}", dir.display()), e))?;
        let lock = lock_dir(&config.dir)?;
        let snapshot = snapshot::read(dir)?;
        let mut recovered = segment::recover(dir)?;
        let log = MemLog::recover(dir, snapshot, &mut recovered)?;
        let next_index = recovered.next_index;
        let shared = Arc::new(Shared {
            log: Mutex::new(log),
            failed: Mutex::new(None),
        });
        let (committed_tx, committed) = watch::channel(next_index - 1);
        let (requests, queue) = mpsc::channel(QUEUE_DEPTH);
        let writer = Writer::open(
            &config,
            recovered,
            syncer,
            Arc::clone(&shared),
            committed_tx,
            lock,
        )?;
        let writer = std::thread::Builder::new()
            .name("luna-journal-local".to_owned())
            .spawn(move || writer.run(queue))
            .map_err(|e| JournalError::io("starting the journal writer thread", e))?;
        let leader = Leadership {
            term: 1,
            leader_id: Some(LOCAL_REPLICA_ID),
            is_leader: true,
        };
        Ok(Self {
            requests,
            shared,
            committed,
            leadership: watch::Sender::new(leader),
            max_entry_size: config.max_entry_size,
            writer,
        })
    }

    /// Stops the writer after the appends already queued, and waits until it has released
    /// the directory, so the log can be reopened at once.
    pub async fn close(self) {
        let Self {
            requests, writer, ..
        } = self;
        drop(requests);
        // A writer that panicked has already stopped, which is all close waits for.
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    }

    fn failure(&self) -> Option<StreamError> {
        lock(&self.shared.failed).clone()
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StreamError>>) -> Request,
    ) -> Result<T, StreamError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(make(reply))
            .await
            .map_err(|_| StreamError::Closed)?;
        answer.await.map_err(|_| StreamError::Closed)?
    }
}

fn lock_dir(dir: &std::path::Path) -> Result<File, JournalError> {
    let path = dir.join("LOCK");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| JournalError::io(format!("opening {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(JournalError::Locked {
            path: dir.to_owned(),
        }),
        Err(TryLockError::Error(e)) => {
            Err(JournalError::io(format!("locking {}", path.display()), e))
        }
    }
}

#[async_trait]
impl Stream for LocalStream {
    fn max_entry_size(&self) -> usize {
        self.max_entry_size
    }

    async fn append(&self, data: Bytes) -> Result<u64, StreamError> {
        StreamError::check_entry(&data, self.max_entry_size)?;
        if let Some(e) = self.failure() {
            return Err(e);
        }
        self.request(|reply| Request::Append { data, reply }).await
    }

    async fn subscribe(&self, from: u64) -> Result<Subscription, StreamError> {
        let source: Arc<dyn EntrySource> = Arc::clone(&self.shared) as Arc<dyn EntrySource>;
        Ok(spawn_feed(source, self.committed.clone(), from.max(1)))
    }

    async fn truncate(&self, up_to: u64, snapshot: Bytes) -> Result<(), StreamError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        self.request(|reply| Request::Truncate {
            up_to,
            data: snapshot,
            reply,
        })
        .await
    }

    fn leadership(&self) -> Leadership {
        *self.leadership.borrow()
    }

    fn watch_leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    async fn read_index(&self) -> Result<u64, StreamError> {
        // Appends are acknowledged only after `committed` covers them, so the committed
        // index now covers every append acknowledged before this call.
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(*self.committed.borrow()),
        }
    }
}

/// State shared by the stream handle, its writer thread and subscription feeds.
#[derive(Debug)]
struct Shared {
    log: Mutex<MemLog>,
    /// Set once by the writer on a write or fsync error; the stream is dead after it.
    failed: Mutex<Option<StreamError>>,
}

/// Committed entries from `first_index`: `entries[i].index == first_index + i`, and the
/// snapshot that replaced the entries before them (`first_index` is its index + 1).
#[derive(Debug)]
struct MemLog {
    first_index: u64,
    entries: VecDeque<Entry>,
    snapshot: Option<Snapshot>,
}

impl MemLog {
    /// Combines the snapshot and the segments found at open. Segments may still hold
    /// entries the snapshot covers (truncation deletes whole segments only): those are
    /// dropped. They must continue the snapshot without a gap, and reach at least its
    /// index, since it only ever covers committed (fsynced) entries.
    fn recover(
        dir: &std::path::Path,
        snapshot: Option<Snapshot>,
        recovered: &mut segment::Recovered,
    ) -> Result<Self, JournalError> {
        let entries = std::mem::take(&mut recovered.entries);
        let log_start = recovered.segments.first().copied();
        let corrupt = |reason: String| JournalError::Corruption {
            path: dir.to_owned(),
            offset: 0,
            reason,
        };
        let Some(snapshot) = snapshot else {
            if let Some(start) = log_start.filter(|&start| start > 1) {
                return Err(corrupt(format!(
                    "the log starts at {start} but there is no snapshot"
                )));
            }
            return Ok(Self {
                first_index: 1,
                entries: entries.into(),
                snapshot: None,
            });
        };
        match log_start {
            Some(start) if start > snapshot.index + 1 => {
                return Err(corrupt(format!(
                    "the log starts at {start}, after the snapshot at {}",
                    snapshot.index
                )));
            }
            Some(_) if recovered.next_index <= snapshot.index => {
                return Err(corrupt(format!(
                    "the log ends at {}, before the snapshot at {}",
                    recovered.next_index - 1,
                    snapshot.index
                )));
            }
            Some(_) => {}
            // Every segment gone: the first one is created where the snapshot ends.
            None => recovered.next_index = snapshot.index + 1,
        }
        Ok(Self {
            first_index: snapshot.index + 1,
            entries: entries
                .into_iter()
                .filter(|e| e.index > snapshot.index)
                .collect(),
            snapshot: Some(snapshot),
        })
    }
}

#[async_trait]
impl EntrySource for Shared {
    async fn read(&self, from: u64, to: u64) -> Result<Vec<Committed>, StreamError> {
        let log = lock(&self.log);
        if let Some(snapshot) = log.snapshot.as_ref().filter(|s| from <= s.index) {
            return Ok(vec![Committed::Snapshot(snapshot.clone())]);
        }
        // Only the snapshot moves `first_index`, so `from` is never below it here.
        let start = usize::try_from(from.saturating_sub(log.first_index)).unwrap_or(usize::MAX);
        let count = usize::try_from(to.saturating_sub(from) + 1).unwrap_or(usize::MAX);
        Ok(log
            .entries
            .iter()
            .skip(start)
            .take(count)
            .cloned()
            .map(Committed::Entry)
            .collect())
    }
}

/// Locks `mutex`, ignoring poison: every critical section leaves the data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
