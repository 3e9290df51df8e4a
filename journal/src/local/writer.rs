//! The local stream's writer thread: group commit, segment rolling, and truncation with
//! the application's snapshot.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use luna_kernel::stream::{Entry, Snapshot, StreamError};
use tokio::sync::{mpsc, oneshot, watch};

use super::segment::{self, MAGIC, Recovered};
use super::snapshot;
use super::{LocalConfig, Shared, lock};
use crate::error::JournalError;

/// Work for the writer thread.
#[derive(Debug)]
pub(super) enum Request {
    /// Append one entry; answered with its index once fsynced.
    Append {
        data: Bytes,
        reply: oneshot::Sender<Result<u64, StreamError>>,
    },
    /// Store `data` as the snapshot of `up_to`, then discard entries up to it.
    Truncate {
        up_to: u64,
        data: Bytes,
        reply: oneshot::Sender<Result<(), StreamError>>,
    },
}

/// The step that makes written bytes durable. Production uses `fdatasync`; tests swap in
/// one that fails or counts.
pub(crate) trait SyncFile: Send {
    /// Makes everything written to `file` durable.
    fn sync(&mut self, file: &File) -> io::Result<()>;
}

/// `fdatasync`: the record bytes and the file length, which is all recovery needs.
pub(super) struct DataSync;

impl SyncFile for DataSync {
    fn sync(&mut self, file: &File) -> io::Result<()> {
        file.sync_data()
    }
}

/// Owns the log files. Runs on its own thread so fsyncs never block the async runtime.
pub(super) struct Writer {
    dir: PathBuf,
    file: File,
    /// First index of each segment; the last one is `file`.
    segments: VecDeque<u64>,
    active_len: u64,
    next_index: u64,
    segment_size: u64,
    max_batch_bytes: usize,
    syncer: Box<dyn SyncFile>,
    shared: Arc<Shared>,
    committed: watch::Sender<u64>,
    buf: Vec<u8>,
    /// Held (locked) for as long as the writer owns the directory.
    _lock: File,
}

impl Writer {
    /// Opens the active segment after recovery, cutting a torn tail off it, or creates the
    /// first segment of a new log.
    pub(super) fn open(
        config: &LocalConfig,
        recovered: Recovered,
        syncer: Box<dyn SyncFile>,
        shared: Arc<Shared>,
        committed: watch::Sender<u64>,
        lock: File,
    ) -> Result<Self, JournalError> {
        let Recovered {
            segments,
            active_len,
            next_index,
            ..
        } = recovered;
        let mut segments = VecDeque::from(segments);
        let (file, active_len) = match segments.back().copied() {
            None => {
                segments.push_back(next_index);
                let file = create_segment(&config.dir, next_index)
                    .map_err(|e| JournalError::io("creating the first segment", e))?;
                (file, MAGIC.len() as u64)
            }
            Some(first) => reopen_segment(&config.dir, first, active_len)
                .map_err(|e| JournalError::io("reopening the active segment", e))?,
        };
        Ok(Self {
            dir: config.dir.clone(),
            file,
            segments,
            active_len,
            next_index,
            segment_size: config.segment_size,
            max_batch_bytes: config.max_batch_bytes,
            syncer,
            shared,
            committed,
            buf: Vec::new(),
            _lock: lock,
        })
    }

    /// Serves requests until every stream handle is gone.
    pub(super) fn run(mut self, mut queue: mpsc::Receiver<Request>) {
        while let Some(first) = queue.blocking_recv() {
            let mut appends = Vec::new();
            let mut truncates = Vec::new();
            let mut bytes = 0;
            let mut next = Some(first);
            // Group commit: everything that queued during the last fsync goes in this one.
            while let Some(request) = next.take() {
                match request {
                    Request::Append { data, reply } => {
                        bytes += data.len();
                        appends.push((data, reply));
                    }
                    Request::Truncate { up_to, data, reply } => {
                        truncates.push((up_to, data, reply))
                    }
                }
                if bytes < self.max_batch_bytes {
                    next = queue.try_recv().ok();
                }
            }
            if let Some(e) = lock(&self.shared.failed).clone() {
                fail_all(appends, truncates, &e);
                continue;
            }
            if !appends.is_empty() {
                self.commit(appends);
            }
            for (up_to, data, reply) in truncates {
                let _ = reply.send(self.truncate(up_to, data));
            }
        }
    }

    /// Writes and fsyncs one batch, then acknowledges it; on error fails the stream.
    fn commit(&mut self, appends: Vec<(Bytes, oneshot::Sender<Result<u64, StreamError>>)>) {
        if self.active_len >= self.segment_size
            && let Err(e) = self.roll()
        {
            let replies = appends.into_iter().map(|(_, reply)| reply);
            return self.fail(replies, "starting a new segment", e);
        }
        self.buf.clear();
        for (offset, (data, _)) in appends.iter().enumerate() {
            segment::encode_record(&mut self.buf, self.next_index + offset as u64, data);
        }
        let written = self
            .file
            .write_all_at(&self.buf, self.active_len)
            .and_then(|()| self.syncer.sync(&self.file));
        if let Err(e) = written {
            // Cut the unacknowledged records off so a reopen does not find them; if even
            // that fails, they may reappear, which the `Io` contract allows.
            if let Err(cut) = self.file.set_len(self.active_len) {
                tracing::error!(error = %cut, "cannot cut off a failed journal write");
            }
            let replies = appends.into_iter().map(|(_, reply)| reply);
            return self.fail(replies, "writing the journal", e);
        }
        self.active_len += self.buf.len() as u64;
        let mut replies = Vec::with_capacity(appends.len());
        {
            let mut log = lock(&self.shared.log);
            for (data, reply) in appends {
                let index = self.next_index;
                self.next_index += 1;
                log.entries.push_back(Entry {
                    index,
                    term: 1,
                    data,
                });
                replies.push((index, reply));
            }
        }
        // Publish before acknowledging, so `read_index` covers every acknowledged append.
        self.committed.send_replace(self.next_index - 1);
        for (index, reply) in replies {
            let _ = reply.send(Ok(index));
        }
    }

    fn fail(
        &mut self,
        replies: impl Iterator<Item = oneshot::Sender<Result<u64, StreamError>>>,
        context: &str,
        source: io::Error,
    ) {
        tracing::error!(error = %source, dir = %self.dir.display(), "{context}; journal failed");
        let error = StreamError::Io {
            context: format!("{context} in {}", self.dir.display()),
            source: Arc::new(source),
        };
        *lock(&self.shared.failed) = Some(error.clone());
        for reply in replies {
            let _ = reply.send(Err(error.clone()));
        }
    }

    /// Starts a new segment at `next_index`.
    fn roll(&mut self) -> io::Result<()> {
        self.file = create_segment(&self.dir, self.next_index)?;
        self.segments.push_back(self.next_index);
        self.active_len = MAGIC.len() as u64;
        Ok(())
    }

    /// Stores `data` as the snapshot of `up_to` (durably, before anything is deleted),
    /// drops entries up to it from memory, and deletes the segments that hold nothing
    /// newer. A failed snapshot write leaves the previous snapshot and every segment.
    fn truncate(&mut self, up_to: u64, data: Bytes) -> Result<(), StreamError> {
        let committed = self.next_index - 1;
        if up_to > committed {
            return Err(StreamError::BeyondCommitted { up_to, committed });
        }
        let current = lock(&self.shared.log)
            .snapshot
            .as_ref()
            .map_or(0, |s| s.index);
        if up_to <= current {
            return Ok(());
        }
        let snapshot = Snapshot {
            index: up_to,
            term: 1,
            data,
        };
        snapshot::write(&self.dir, &snapshot)
            .map_err(|e| io_error(format!("writing the snapshot in {}", self.dir.display()), e))?;
        {
            let mut log = lock(&self.shared.log);
            while log.entries.front().is_some_and(|e| e.index <= up_to) {
                log.entries.pop_front();
            }
            log.first_index = up_to + 1;
            log.snapshot = Some(snapshot);
        }
        let mut deleted = false;
        while self.segments.len() > 1 && self.segments.get(1).is_some_and(|&next| next <= up_to + 1)
        {
            let Some(first) = self.segments.pop_front() else {
                break;
            };
            let path = segment::segment_path(&self.dir, first);
            std::fs::remove_file(&path)
                .map_err(|e| io_error(format!("deleting {}", path.display()), e))?;
            deleted = true;
        }
        if deleted {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error(format!("syncing {}", self.dir.display()), e))?;
        }
        Ok(())
    }
}

/// Creates the segment starting at `first`, durable (file and directory entry) before use.
fn create_segment(dir: &Path, first: u64) -> io::Result<File> {
    let path = segment::segment_path(dir, first);
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    file.write_all_at(MAGIC, 0)?;
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Opens the newest segment for appending after cutting off what recovery rejected as a
/// torn tail; returns it and its length.
fn reopen_segment(dir: &Path, first: u64, valid_len: u64) -> io::Result<(File, u64)> {
    let path = segment::segment_path(dir, first);
    let file = File::options().read(true).write(true).open(&path)?;
    if valid_len < MAGIC.len() as u64 {
        // The header itself was torn: start the segment over.
        file.set_len(0)?;
        file.write_all_at(MAGIC, 0)?;
        file.sync_all()?;
        return Ok((file, MAGIC.len() as u64));
    }
    if file.metadata()?.len() > valid_len {
        file.set_len(valid_len)?;
        file.sync_all()?;
    }
    Ok((file, valid_len))
}

fn io_error(context: String, source: io::Error) -> StreamError {
    StreamError::Io {
        context,
        source: Arc::new(source),
    }
}

type TruncateReply = oneshot::Sender<Result<(), StreamError>>;

fn fail_all(
    appends: Vec<(Bytes, oneshot::Sender<Result<u64, StreamError>>)>,
    truncates: Vec<(u64, Bytes, TruncateReply)>,
    error: &StreamError,
) {
    for (_, reply) in appends {
        let _ = reply.send(Err(error.clone()));
    }
    for (_, _, reply) in truncates {
        let _ = reply.send(Err(error.clone()));
    }
}
