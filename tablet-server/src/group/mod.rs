//! A tablet group replica: one journal stream and the tablets whose writes it carries.
//!
//! Every replica applies the group's committed entries in order ([`apply`]). The leader
//! also assigns commit timestamps and batches writes into entries ([`commit`]), claims its
//! tablets in their BaseStores so that it alone flushes them, and records flushes in the log
//! so that followers can drop the same data from memory ([`leader`]).

mod apply;
mod commit;
mod dedup;
mod leader;
mod locks;
mod membership;
mod moves;
mod reads;
mod reconcile;
mod splits;
mod truncation;
mod txn;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use luna_journal::raft::RaftStream;
use luna_kernel::stream::Stream;
use luna_proto::group as gpb;
use luna_proto::master::TabletInfo;
use luna_storage::{KeyRange, LogSpan, MemStoreOptions, MemoryBudget, Tablet};
use prost::Message;
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;

use self::commit::{Clock, Serving};
use self::dedup::Dedup;
use self::locks::TxnState;
use crate::error::{Result, TabletServerError};
use crate::master_link::MasterLink;
use crate::metrics::ServerMetrics;
use crate::stores::CollectionStores;

pub(crate) use self::commit::{LOGICAL_BITS, MAX_ENTRY_BYTES, WriteRequest, physical_now_ms};
pub(crate) use self::dedup::RequestKey;
pub(crate) use self::moves::Sealed;
pub(crate) use self::txn::{Prewrite, Resolve, TabletPart};

/// What every group on a server shares.
pub(crate) struct GroupContext {
    pub(crate) server_id: u64,
    pub(crate) stores: CollectionStores,
    pub(crate) budget: Arc<MemoryBudget>,
    pub(crate) memstore: MemStoreOptions,
    pub(crate) master: Arc<MasterLink>,
    /// The group hosting each tablet here, for request routing.
    pub(crate) tablet_groups: TabletIndex,
    /// Server id to tablet-service address, for NotLeader hints.
    pub(crate) peer_addrs: RwLock<HashMap<u64, String>>,
    pub(crate) max_batch_writes: usize,
    /// See `TabletServerConfig::flush_behind_entries`.
    pub(crate) flush_behind_entries: u64,
    pub(crate) metrics: ServerMetrics,
}

/// Which group replica of this server serves each tablet: the one that hosts it at the
/// highest epoch. While a tablet moves between two groups that both have a replica here,
/// both host it for a while (the old one sealed), in either order after a restart.
#[derive(Debug, Default)]
pub(crate) struct TabletIndex {
    /// Tablet id to (group id, epoch).
    serving: RwLock<HashMap<u64, (u64, u64)>>,
    /// The last tablets closed here that no other group here hosts, with the epoch each
    /// had (see [`TabletIndex::not_hosted`]).
    departed: Mutex<VecDeque<(u64, u64)>>,
}

/// Closed tablets a server remembers: looked up only for requests naming a tablet it does
/// not host, so a linear search is cheap enough.
const DEPARTED_REMEMBERED: usize = 1024;

impl TabletIndex {
    /// The group serving `tablet_id` here.
    pub(crate) fn group_of(&self, tablet_id: u64) -> Option<u64> {
        let index = self.serving.read().ok()?;
        index.get(&tablet_id).map(|&(group_id, _)| group_id)
    }

    /// Why tablet `tablet_id` at `epoch` is not hosted here. One closed here at that epoch
    /// or later moved away (or split, or was dropped): the request's routing is stale,
    /// which `EpochMismatch` says, so that a transaction naming it starts over at once
    /// rather than retrying until its deadline. Otherwise its group may just not have
    /// opened it yet.
    pub(crate) fn not_hosted(&self, tablet_id: u64, epoch: u64) -> TabletServerError {
        let closed_at = self.departed.lock().ok().and_then(|departed| {
            departed
                .iter()
                .rev()
                .find(|&&(id, _)| id == tablet_id)
                .map(|&(_, closed_epoch)| closed_epoch)
        });
        match closed_at {
            Some(closed_epoch) if closed_epoch >= epoch => TabletServerError::EpochMismatch {
                tablet_id,
                requested_epoch: epoch,
                current_epoch: closed_epoch + 1,
            },
            _ => TabletServerError::TabletNotFound(tablet_id),
        }
    }

    /// Group `group_id` opened `tablet_id` at `epoch`.
    fn opened(&self, tablet_id: u64, group_id: u64, epoch: u64) {
        if let Ok(mut index) = self.serving.write() {
            let entry = index.entry(tablet_id).or_insert((group_id, epoch));
            if epoch >= entry.1 {
                *entry = (group_id, epoch);
            }
        }
    }

    /// Group `group_id` closed `tablet_id` (or stopped); whether no group here serves
    /// it any more.
    fn closed(&self, tablet_id: u64, group_id: u64) -> bool {
        self.serving.write().is_ok_and(|mut index| {
            let serving = index
                .get(&tablet_id)
                .is_some_and(|&(serving, _)| serving == group_id);
            serving && index.remove(&tablet_id).is_some()
        })
    }

    /// Tablet `tablet_id` left this server at `epoch`: its group's log closed it.
    fn departed(&self, tablet_id: u64, epoch: u64) {
        if let Ok(mut departed) = self.departed.lock() {
            if departed.len() >= DEPARTED_REMEMBERED {
                departed.pop_front();
            }
            departed.push_back((tablet_id, epoch));
        }
    }
}

/// A tablet hosted by a group replica, at the epoch the group's log opened it with.
#[derive(Clone)]
pub(crate) struct Hosted {
    /// Shared, because every request clones its tablet's `Hosted`.
    pub(crate) info: Arc<TabletInfo>,
    pub(crate) tablet: Arc<Tablet>,
    pub(crate) load: Arc<TabletLoad>,
}

impl Hosted {
    /// Whether the tablet holds writes in memory (not yet in its BaseStore).
    pub(crate) fn holds_writes(&self) -> bool {
        self.tablet.memstore().snapshot().map_or(true, |memtables| {
            memtables.iter().any(|memtable| !memtable.is_empty())
        })
    }
}

/// Requests served for a tablet since it opened here, for the load in heartbeats.
#[derive(Debug, Default)]
pub(crate) struct TabletLoad {
    pub(crate) reads: AtomicU64,
    pub(crate) writes: AtomicU64,
    /// The tablet's data in its tables, as the leader last measured it.
    pub(crate) size_bytes: AtomicU64,
}

/// One replica of a tablet group.
pub(crate) struct Group {
    me: Weak<Group>,
    id: u64,
    stream: Arc<RaftStream>,
    ctx: Arc<GroupContext>,
    tablets: RwLock<HashMap<u64, Hosted>>,
    /// Highest applied journal index.
    applied: watch::Sender<u64>,
    /// Highest commit timestamp applied: a new leader starts its clock above it.
    max_applied_ts: AtomicU64,
    /// Index of the last entry that opened or closed a tablet.
    last_control_index: AtomicU64,
    /// The log is truncated up to here.
    truncated: AtomicU64,
    dedup: Mutex<Dedup>,
    /// Transactions' locks and outcomes, from the log.
    txns: Mutex<TxnState>,
    /// Tablets sealed for a move, from the log (see `moves.rs`).
    sealed: Mutex<HashMap<u64, gpb::SealTablet>>,
    clock: Mutex<Clock>,
    /// Wakes transactional requests waiting for a latch.
    latches_released: Notify,
    /// The write queue while this replica serves as leader.
    serving: watch::Sender<Option<Serving>>,
    /// Number of the last write batch whose outcome is known.
    batches_done: watch::Sender<u64>,
    /// Wakes the leader's owner loop when the log opens or closes a tablet.
    tablets_changed: Notify,
    tasks: Mutex<Vec<AbortHandle>>,
    /// This replica's last attempt to hand leadership to the preferred one.
    transfer_tried: Mutex<Option<TransferAttempt>>,
}

/// An attempt to hand a group's leadership to its preferred replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TransferAttempt {
    term: u64,
    to: u64,
    at: Instant,
    failed: bool,
}

/// How long a leader waits before it tries again a leader transfer that failed. A transfer
/// holds back writes until it completes or an election timeout passes, so a transferee
/// that keeps failing (down, or far behind) must not stall writes at every heartbeat.
const TRANSFER_RETRY: Duration = Duration::from_secs(5);

impl Group {
    /// Starts a replica on `stream`: its apply loop and its leadership task.
    pub(crate) fn start(id: u64, stream: RaftStream, ctx: Arc<GroupContext>) -> Arc<Group> {
        let group = Arc::new_cyclic(|me| Group {
            me: me.clone(),
            id,
            stream: Arc::new(stream),
            ctx,
            tablets: RwLock::new(HashMap::new()),
            applied: watch::Sender::new(0),
            max_applied_ts: AtomicU64::new(0),
            last_control_index: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            dedup: Mutex::new(Dedup::default()),
            txns: Mutex::new(TxnState::default()),
            sealed: Mutex::new(HashMap::new()),
            clock: Mutex::new(Clock::default()),
            latches_released: Notify::new(),
            serving: watch::Sender::new(None),
            batches_done: watch::Sender::new(0),
            tablets_changed: Notify::new(),
            tasks: Mutex::new(Vec::new()),
            transfer_tried: Mutex::new(None),
        });
        let apply = tokio::spawn(apply::run(Arc::downgrade(&group)));
        let lead = tokio::spawn(leader::run(Arc::downgrade(&group)));
        group.track(apply.abort_handle());
        group.track(lead.abort_handle());
        group
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn stream(&self) -> &RaftStream {
        &self.stream
    }

    fn weak(&self) -> Weak<Group> {
        self.me.clone()
    }

    fn track(&self, task: AbortHandle) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.retain(|task| !task.is_finished());
            tasks.push(task);
        }
    }

    /// The highest commit timestamp applied.
    pub(crate) fn max_applied_ts(&self) -> u64 {
        self.max_applied_ts.load(Ordering::Acquire)
    }

    /// The log is truncated up to here.
    pub(crate) fn truncated_index(&self) -> u64 {
        self.truncated.load(Ordering::Acquire)
    }

    /// The highest applied journal index.
    pub(crate) fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until the apply loop has applied `index`.
    pub(crate) async fn wait_applied(&self, index: u64) -> Result<()> {
        let mut applied = self.applied.subscribe();
        applied
            .wait_for(|applied| *applied >= index)
            .await
            .map(|_| ())
            .map_err(|_| TabletServerError::ShuttingDown)
    }

    /// The tablets this replica hosts.
    pub(crate) fn hosted(&self) -> Vec<Hosted> {
        self.tablets
            .read()
            .map(|tablets| tablets.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The tablet `tablet_id` if hosted here at `epoch` and not sealed for a move.
    pub(crate) fn tablet(&self, tablet_id: u64, epoch: u64) -> Result<Hosted> {
        self.tablet_for(tablet_id, epoch, Sealed::Refuse)
    }

    /// The epoch tablet `tablet_id` is hosted at here, if it is.
    pub(super) fn hosted_epoch(&self, tablet_id: u64) -> Option<u64> {
        self.tablets
            .read()
            .ok()
            .and_then(|tablets| tablets.get(&tablet_id).map(|hosted| hosted.info.epoch))
    }

    /// The tablet `tablet_id` if hosted here at `epoch`; `sealed` says whether one sealed
    /// for a move will do (it does only for resolving the locks it holds).
    pub(crate) fn tablet_for(&self, tablet_id: u64, epoch: u64, sealed: Sealed) -> Result<Hosted> {
        let hosted = self
            .tablets
            .read()
            .ok()
            .and_then(|tablets| tablets.get(&tablet_id).cloned())
            .ok_or(TabletServerError::TabletNotFound(tablet_id))?;
        if epoch > hosted.info.epoch {
            // This replica has not applied the move or split that made `epoch` yet (a
            // follower learns commits with the leader's next message): the request's
            // routing is newer, not stale, so it is sent on rather than refreshed.
            return Err(TabletServerError::TabletNotFound(tablet_id));
        }
        if hosted.info.epoch != epoch {
            return Err(TabletServerError::EpochMismatch {
                tablet_id,
                requested_epoch: epoch,
                current_epoch: hosted.info.epoch,
            });
        }
        if sealed == Sealed::Refuse
            && let Some(seal) = self.seal_of(tablet_id)
        {
            return Err(TabletServerError::TabletMoving {
                tablet_id,
                next_epoch: seal.next_epoch,
            });
        }
        Ok(hosted)
    }

    /// The error that sends a client to this group's leader.
    pub(crate) fn not_leader(&self) -> TabletServerError {
        let leadership = self.stream.leadership();
        let leader = leadership.leader_id.filter(|&id| id != 0).and_then(|id| {
            let addrs = self.ctx.peer_addrs.read().ok()?;
            addrs.get(&id).map(|addr| (id, addr.clone()))
        });
        TabletServerError::NotLeader {
            group_id: self.id,
            leader,
        }
    }

    /// Hands leadership to `preferred` (the master's preferred leader, the first voter)
    /// once per term and preferred replica, so that leaders spread over the servers and an
    /// operator's `transfer-leader` takes effect. Only a serving leader that is not the
    /// preferred one tries; a failed transfer is tried again after `TRANSFER_RETRY`.
    pub(crate) async fn prefer_leader(&self, preferred: u64) {
        let term = match self.serving.borrow().as_ref() {
            Some(serving) => serving.term,
            None => return,
        };
        // A learner that is about to replace a voter cannot lead yet.
        if preferred == 0
            || preferred == self.ctx.server_id
            || !self.stream.membership().voters.contains(&preferred)
        {
            return;
        }
        let now = Instant::now();
        let due = self.transfer_tried.lock().is_ok_and(|mut tried| {
            let due = match *tried {
                Some(last) if (last.term, last.to) == (term, preferred) => {
                    last.failed && now.duration_since(last.at) >= TRANSFER_RETRY
                }
                _ => true,
            };
            if due {
                *tried = Some(TransferAttempt {
                    term,
                    to: preferred,
                    at: now,
                    failed: false,
                });
            }
            due
        });
        if !due {
            return;
        }
        match self.stream.transfer_leader(preferred).await {
            Ok(_) => tracing::info!(
                group = self.id,
                to = preferred,
                "leadership handed to the preferred leader"
            ),
            Err(error) => {
                tracing::debug!(group = self.id, to = preferred, %error, "leader transfer failed");
                if let Ok(mut tried) = self.transfer_tried.lock()
                    && let Some(last) = tried.as_mut()
                    && (last.term, last.to, last.at) == (term, preferred, now)
                {
                    last.failed = true;
                }
            }
        }
    }

    /// Appends one control entry (not a write) and waits until it is applied here.
    async fn propose(&self, kind: gpb::group_entry::Kind) -> Result<u64> {
        let entry = gpb::GroupEntry { kind: Some(kind) };
        let index = self
            .stream
            .append(Bytes::from(entry.encode_to_vec()))
            .await
            .map_err(|source| TabletServerError::Stream {
                group_id: self.id,
                source,
            })?;
        self.wait_applied(index).await?;
        Ok(index)
    }

    /// The MemStore bytes of tablet `tablet_id` (0 if it is not hosted here).
    pub(crate) fn memory_bytes(&self, tablet_id: u64) -> u64 {
        self.tablets
            .read()
            .ok()
            .and_then(|tablets| {
                tablets.get(&tablet_id).map(|hosted| {
                    let memtables = hosted.tablet.memstore().snapshot().unwrap_or_default();
                    memtables
                        .iter()
                        .map(|memtable| memtable.approximate_bytes() as u64)
                        .sum()
                })
            })
            .unwrap_or(0)
    }

    /// Stops the replica's tasks and closes its tablets (flushing what the leader owns).
    pub(crate) async fn stop(&self) {
        if let Ok(tasks) = self.tasks.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
        self.serving.send_replace(None);
        for hosted in self.hosted() {
            // Not a departure: the tablet stays where it is routed, only this replica goes.
            self.ctx.tablet_groups.closed(hosted.info.id, self.id);
            if let Err(error) = hosted.tablet.close().await {
                tracing::debug!(group = self.id, tablet = hosted.info.id, %error, "closing tablet");
            }
        }
    }
}

/// The storage key range of a tablet from its catalog record.
pub(crate) fn storage_range(info: &TabletInfo) -> KeyRange {
    match &info.range {
        Some(range) => KeyRange::new(
            Bytes::copy_from_slice(&range.start),
            range.end.as_ref().map(|end| Bytes::copy_from_slice(end)),
        ),
        None => KeyRange::all(),
    }
}

/// The manifest epoch a leader claims a tablet with: the routing epoch first, so a move
/// to another group fences the old one, then the leader's term, so a new leader in the
/// same group fences the old leader.
pub(crate) fn owner_epoch(routing_epoch: u64, term: u64) -> u64 {
    (routing_epoch << 32) | (term & u64::from(u32::MAX))
}

/// The part of this group's journal that carries a tablet hosted at `routing_epoch` from
/// journal index `opened_at` on: every owner epoch of that routing epoch.
pub(crate) fn log_span(routing_epoch: u64, opened_at: u64) -> LogSpan {
    LogSpan {
        epochs: owner_epoch(routing_epoch, 0)..owner_epoch(routing_epoch.saturating_add(1), 0),
        opened_at,
    }
}
