//! The leader's write path: commit timestamps and group commit.
//!
//! Writes queue for one batcher task per leadership term. It takes everything that queued
//! (up to a count and a byte bound), gives each write a commit timestamp in queue order,
//! and proposes them as one journal entry. Up to `WINDOW` entries are in flight at once:
//! they are proposed in order ([`RaftStream::append_ordered`]), so timestamps follow log
//! order, and the raft driver batches them further. Once an entry is applied here, its
//! writers get their answers, in log order. Batches grow with load.
//!
//! [`RaftStream::append_ordered`]: luna_journal::raft::RaftStream::append_ordered
//!
//! **Timestamps.** A commit timestamp is above the leader's floor (a fresh TSO timestamp,
//! and every timestamp already applied, taken when it became leader), above every
//! timestamp it assigned or saw a snapshot read at, and no lower than its clock. So a read
//! at a TSO timestamp `t` is repeatable: every write that commits after it gets a
//! timestamp above `t`, and a read waits for a write in flight that got one at or below.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use luna_kernel::stream::StreamError;
use luna_proto::group as gpb;
use luna_proto::tablet::Mutation;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::Group;
use super::dedup::{Prior, RequestKey};
use crate::error::{Result, TabletServerError};

/// Most bytes of mutations in one batch, unless a single write is larger; the group's
/// journal takes entries of up to `MAX_ENTRY_BYTES`, which holds any one valid write.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// The group journal's entry limit: above the largest write (an 8 MiB value, a 4 KiB key
/// and framing), so a valid write never fails for its size.
pub(crate) const MAX_ENTRY_BYTES: usize = 16 << 20;
/// Writes queued per group before writers wait.
const QUEUE_DEPTH: usize = 8192;
/// Journal entries of writes in flight per group.
const WINDOW: usize = 4;
/// How long a committed entry may take to be applied here before the writer gives up.
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Logical bits of a timestamp: (physical ms << 18) | logical.
pub(crate) const LOGICAL_BITS: u32 = 18;

/// A validated write for one tablet, its keys already in routing form.
pub(crate) struct WriteRequest {
    pub(crate) tablet_id: u64,
    pub(crate) epoch: u64,
    pub(crate) request_id: RequestKey,
    pub(crate) mutations: Vec<Mutation>,
    /// How a transactional write applies; `None` for a plain write.
    pub(crate) txn: Option<gpb::TxnWrite>,
}

impl WriteRequest {
    fn bytes(&self) -> usize {
        self.mutations
            .iter()
            .map(|mutation| mutation.key.len() + mutation.value.len() + 8)
            .sum()
    }
}

/// Which commit timestamp a proposal's writes get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stamp {
    /// A plain write: the next timestamp from the leader's clock, above the given one (the
    /// largest its client has seen, 0 for none), once no lock or latch holds any of its
    /// keys (checked as the batch is formed, so after every earlier proposal).
    Plain(u64),
    /// A one-phase commit: of a whole transaction above its `start_ts`, or of the primary's
    /// group of a two-phase one above every other prewrite's minimum. The next timestamp
    /// from the clock, above the given one. The leader checked its keys under latches.
    Above(u64),
    /// A two-phase transaction's commit timestamp, picked by the group of its primary.
    Given(u64),
    /// None: a prewrite or a rollback writes no version.
    Unstamped,
}

/// Writes that commit together, in one journal entry: one request's parts for one or more
/// tablets of the group.
struct Pending {
    requests: Vec<WriteRequest>,
    stamp: Stamp,
    reply: oneshot::Sender<Result<u64>>,
    /// When it joined the queue, for the queue-wait metric.
    queued: Instant,
}

impl Pending {
    fn bytes(&self) -> usize {
        self.requests.iter().map(WriteRequest::bytes).sum()
    }
}

/// The leader's write queue for one term.
#[derive(Clone)]
pub(crate) struct Serving {
    pub(super) term: u64,
    queue: mpsc::Sender<Pending>,
}

/// The leader's timestamp state.
#[derive(Debug, Default)]
pub(super) struct Clock {
    /// No commit timestamp of this term is below this.
    floor: u64,
    /// The largest timestamp assigned to a write or read at by a snapshot read.
    last: u64,
    /// The batches being committed, oldest first: number and smallest timestamp.
    inflight: VecDeque<(u64, u64)>,
    /// Number of the last batch proposed.
    batches: u64,
    /// Hashes of the keys that plain writes of each batch in flight write, oldest first:
    /// a latch waits only for the batches that write one of its keys.
    written: VecDeque<(u64, HashSet<u64>)>,
    key_hasher: RandomState,
    /// Keys a transactional request is checking and proposing, by tablet: plain writes to
    /// them are turned away until it is applied (see `txn.rs`).
    pub(super) latched: HashSet<(u64, Bytes)>,
}

impl Clock {
    /// The largest timestamp assigned to a write or read at by a snapshot read.
    pub(super) fn last_assigned(&self) -> u64 {
        self.last
    }

    /// Assigns nothing at or below `ts` from now on (a tablet moved in, whose old group
    /// went up to `ts`).
    pub(super) fn raise(&mut self, ts: u64) {
        self.last = self.last.max(ts);
    }

    fn key_hash(&self, tablet_id: u64, key: &[u8]) -> u64 {
        self.key_hasher.hash_one((tablet_id, key))
    }

    /// The newest batch in flight that writes one of `keys` (by tablet), if any.
    pub(super) fn newest_writing(&self, keys: &[(u64, Bytes)]) -> Option<u64> {
        if self.written.is_empty() {
            return None;
        }
        let hashes: Vec<u64> = keys
            .iter()
            .map(|(tablet_id, key)| self.key_hash(*tablet_id, key))
            .collect();
        self.written
            .iter()
            .rev()
            .find(|(_, written)| hashes.iter().any(|hash| written.contains(hash)))
            .map(|&(batch, _)| batch)
    }
}

/// The current wall clock in milliseconds since the epoch: a timestamp's physical part.
pub(crate) fn physical_now_ms() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis());
    u64::try_from(ms).unwrap_or(u64::MAX >> LOGICAL_BITS)
}

/// The current wall clock as a timestamp with no logical part.
fn physical_now() -> u64 {
    physical_now_ms() << LOGICAL_BITS
}

impl Group {
    /// Starts serving writes for `term` with timestamps from `floor` on.
    pub(super) fn start_serving(&self, term: u64, floor: u64) {
        if let Ok(mut clock) = self.clock.lock() {
            clock.floor = floor;
            clock.last = clock.last.max(floor.saturating_sub(1));
            clock.inflight.clear();
            clock.latched.clear();
            clock.written.clear();
        }
        // Every batch of earlier terms is settled: the new leader applied the whole log.
        let proposed = self.clock.lock().map_or(0, |clock| clock.batches);
        self.batches_done
            .send_modify(|done| *done = (*done).max(proposed));
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let batcher = tokio::spawn(run_batcher(self.weak(), receiver));
        self.track(batcher.abort_handle());
        self.serving.send_replace(Some(Serving { term, queue }));
    }

    /// Commits `request` through the leader's batcher at a timestamp above `commit_above`,
    /// and returns its commit timestamp (the original one if the group applied this request
    /// id before).
    pub(crate) async fn write(&self, request: WriteRequest, commit_above: u64) -> Result<u64> {
        self.commit_writes(vec![request], Stamp::Plain(commit_above))
            .await
    }

    /// Commits `requests` (parts of one request, for tablets of this group) in one journal
    /// entry, stamped as `stamp` says, and returns their commit timestamp (0 if unstamped).
    pub(super) async fn commit_writes(
        &self,
        requests: Vec<WriteRequest>,
        stamp: Stamp,
    ) -> Result<u64> {
        let serving = self.serving.borrow().clone();
        let Some(serving) = serving else {
            return Err(self.not_leader());
        };
        let Some(request_id) = requests.first().map(|request| request.request_id.clone()) else {
            return Err(TabletServerError::InvalidArgument(
                "a request needs at least one tablet".to_owned(),
            ));
        };
        match self.dedup_prior(&request_id) {
            Prior::New => {}
            Prior::Applied(applied) => return Ok(applied.commit_ts),
            Prior::Done { done_below } => {
                return Err(request_done(&request_id, done_below));
            }
        }
        if self.ctx.budget.is_exhausted() {
            return Err(TabletServerError::Busy {
                reason: "memory is full until flushes catch up".to_owned(),
                retry_after_ms: 50,
            });
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            requests,
            stamp,
            reply,
            queued: Instant::now(),
        };
        if serving.queue.send(pending).await.is_err() {
            return Err(self.not_leader());
        }
        // A dropped reply means the term ended: the write may or may not have committed,
        // and the client's retry (same request id) is deduplicated by the next leader.
        answer.await.unwrap_or_else(|_| Err(self.not_leader()))
    }

    /// Makes a leader read at `read_ts` repeatable: later writes get larger timestamps, and
    /// a write in flight at or below it is waited for.
    pub(super) async fn observe_read_ts(&self, read_ts: u64) -> Result<()> {
        let wait_for = match self.clock.lock() {
            Ok(mut clock) => {
                clock.last = clock.last.max(read_ts);
                // Batches finish in order, so waiting for the newest one at or below
                // `read_ts` waits for all of them.
                clock
                    .inflight
                    .iter()
                    .rev()
                    .find(|&&(_, min_ts)| min_ts <= read_ts)
                    .map(|&(batch, _)| batch)
            }
            Err(_) => None,
        };
        if let Some(batch) = wait_for {
            let mut done = self.batches_done.subscribe();
            done.wait_for(|done| *done >= batch)
                .await
                .map_err(|_| TabletServerError::ShuttingDown)?;
        }
        Ok(())
    }

    /// Assigns timestamps and proposes the batch as one entry; the returned future
    /// resolves once the entry is applied here (or failed). Plain writes to locked or
    /// latched keys are answered at once instead.
    fn start_batch(self: Arc<Self>, batch: Vec<Pending>) -> InFlight {
        let mut writes = Vec::with_capacity(batch.len());
        let mut accepted = Vec::with_capacity(batch.len());
        let number = match self.clock.lock() {
            Ok(mut clock) => {
                let now = physical_now();
                let mut min_ts: Option<u64> = None;
                let mut written = HashSet::new();
                for pending in batch {
                    let plain = matches!(pending.stamp, Stamp::Plain(_));
                    if plain && let Err(refusal) = self.check_unlocked(&clock, &pending.requests) {
                        let _ = pending.reply.send(Err(refusal));
                        continue;
                    }
                    let ts = match pending.stamp {
                        Stamp::Plain(above) | Stamp::Above(above) => clock
                            .floor
                            .max(clock.last + 1)
                            .max(now)
                            .max(above.saturating_add(1)),
                        Stamp::Given(commit_ts) => commit_ts,
                        Stamp::Unstamped => 0,
                    };
                    if ts != 0 {
                        clock.last = clock.last.max(ts);
                        min_ts = Some(min_ts.map_or(ts, |min| min.min(ts)));
                    }
                    if plain {
                        for request in &pending.requests {
                            for mutation in &request.mutations {
                                written.insert(clock.key_hash(request.tablet_id, &mutation.key));
                            }
                        }
                    }
                    for request in &pending.requests {
                        writes.push(gpb::TabletWrite {
                            tablet_id: request.tablet_id,
                            epoch: request.epoch,
                            request_id: Some(request.request_id.to_proto()),
                            commit_ts: ts,
                            mutations: request.mutations.clone(),
                            txn: request.txn.clone(),
                        });
                    }
                    accepted.push(pending);
                }
                clock.batches += 1;
                let number = clock.batches;
                if let Some(ts) = min_ts {
                    clock.inflight.push_back((number, ts));
                }
                if !written.is_empty() {
                    clock.written.push_back((number, written));
                }
                Ok(number)
            }
            Err(_) => Err(TabletServerError::ShuttingDown),
        };
        let batch = accepted;
        let proposed = Instant::now();
        let metrics = &self.ctx.metrics;
        for pending in &batch {
            metrics
                .write_queue_seconds
                .observe(proposed.duration_since(pending.queued).as_secs_f64());
        }
        if !writes.is_empty() {
            metrics.batch_writes.observe(writes.len() as f64);
        }
        let entry = gpb::GroupEntry {
            kind: Some(gpb::group_entry::Kind::Writes(gpb::Writes { writes })),
        };
        let append = number.as_ref().ok().map(|_| {
            self.stream
                .append_ordered(Bytes::from(entry.encode_to_vec()))
        });
        Box::pin(async move {
            let outcome = match (number, append) {
                (Ok(number), Some(append)) => match append.await {
                    Ok(index) => {
                        let committed = Instant::now();
                        let metrics = &self.ctx.metrics;
                        metrics
                            .commit_seconds
                            .observe(committed.duration_since(proposed).as_secs_f64());
                        let applied =
                            tokio::time::timeout(APPLY_TIMEOUT, self.wait_applied(index)).await;
                        metrics
                            .apply_wait_seconds
                            .observe(committed.elapsed().as_secs_f64());
                        match applied {
                            Ok(applied) => (number, applied),
                            Err(_) => (
                                number,
                                Err(TabletServerError::Stream {
                                    group_id: self.id,
                                    source: StreamError::Timeout {
                                        operation: "applying a committed write",
                                    },
                                }),
                            ),
                        }
                    }
                    Err(source) => (number, Err(self.append_error(source))),
                },
                (Ok(number), None) => (number, Err(TabletServerError::ShuttingDown)),
                (Err(error), _) => (0, Err(error)),
            };
            (self, batch, outcome)
        })
    }

    /// Answers every writer of a finished batch.
    fn finish_batch(&self, batch: Vec<Pending>, number: u64, outcome: Result<()>) {
        for pending in batch {
            let answer = match &outcome {
                // Applied, now or before: the dedup table has its timestamp. Absent means
                // its tablet closed or changed epoch while it was in flight, or its client
                // gave up on it.
                Ok(()) => match pending.requests.first() {
                    Some(request) => match self.dedup_prior(&request.request_id) {
                        Prior::Applied(applied) => Ok(applied.commit_ts),
                        Prior::Done { done_below } => {
                            Err(request_done(&request.request_id, done_below))
                        }
                        Prior::New => Err(TabletServerError::TabletNotFound(request.tablet_id)),
                    },
                    None => Err(TabletServerError::ShuttingDown),
                },
                Err(error) => Err(error.duplicate()),
            };
            let _ = pending.reply.send(answer);
        }
        if let Ok(mut clock) = self.clock.lock() {
            clock.inflight.retain(|&(batch, _)| batch != number);
            clock.written.retain(|&(batch, _)| batch != number);
        }
        self.batches_done
            .send_modify(|done| *done = (*done).max(number));
    }

    pub(super) fn append_error(&self, source: StreamError) -> TabletServerError {
        match source {
            StreamError::NotLeader { .. } => self.not_leader(),
            StreamError::EntryTooLarge { .. } => {
                TabletServerError::InvalidArgument(source.to_string())
            }
            source => TabletServerError::Stream {
                group_id: self.id,
                source,
            },
        }
    }
}

/// The answer to a write its client said it is done with.
fn request_done(key: &RequestKey, done_below: u64) -> TabletServerError {
    TabletServerError::RequestDone {
        seq: key.seq(),
        done_below,
    }
}

/// A batch on its way through the journal: resolves to the group, the batch, its number
/// and its outcome.
type InFlight = Pin<Box<dyn Future<Output = (Arc<Group>, Vec<Pending>, (u64, Result<()>))> + Send>>;

/// Commits the queue's writes, a batch per journal entry and up to `WINDOW` entries at a
/// time, until the term ends (the queue's sender is dropped) and the last entry finished,
/// or the group goes away.
async fn run_batcher(group: Weak<Group>, mut queue: mpsc::Receiver<Pending>) {
    let mut inflight: FuturesOrdered<InFlight> = FuturesOrdered::new();
    // A write taken from the queue that would have made the last batch too big.
    let mut carried: Option<Pending> = None;
    let mut open = true;
    loop {
        tokio::select! {
            // Finishing first keeps the window moving.
            biased;
            Some((group, batch, (number, outcome))) = inflight.next(), if !inflight.is_empty() => {
                group.finish_batch(batch, number, outcome);
            }
            pending = next_write(&mut queue, &mut carried), if (open || carried.is_some()) && inflight.len() < WINDOW => {
                let Some(first) = pending else {
                    open = false;
                    continue;
                };
                let Some(group) = group.upgrade() else {
                    return;
                };
                let mut bytes = first.bytes();
                let mut batch = vec![first];
                while batch.len() < group.ctx.max_batch_writes {
                    let Ok(pending) = queue.try_recv() else {
                        break;
                    };
                    if bytes + pending.bytes() > MAX_BATCH_BYTES {
                        carried = Some(pending);
                        break;
                    }
                    bytes += pending.bytes();
                    batch.push(pending);
                }
                inflight.push_back(group.start_batch(batch));
            }
            else => return,
        }
    }
}

/// The carried-over write if there is one, else the next one from the queue.
async fn next_write(
    queue: &mut mpsc::Receiver<Pending>,
    carried: &mut Option<Pending>,
) -> Option<Pending> {
    match carried.take() {
        Some(pending) => Some(pending),
        None => queue.recv().await,
    }
}
