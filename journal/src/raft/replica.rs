//! One stream's replica on a server, and the work the ready loop does for it between raft
//! calls: settling appends, answering read barriers (with the leader lease), and following
//! leader transfers. Membership changes are in `membership.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use luna_kernel::stream::{Leadership, StreamError};
use raft::eraftpb::{Entry, EntryType, Message, MessageType};
use raft::{RawNode, ReadState, StateRole};
use raft_engine::LogBatch;
use tokio::sync::{oneshot, watch};

use super::lease::LeaseCell;
use super::membership::{Membership, PendingChange};
use super::recent::RecentEntries;
use super::storage::EngineStorage;
use crate::error::JournalError;

/// Where the answer to an append or a read barrier goes: an index, or why not.
pub(crate) type Reply = oneshot::Sender<Result<u64, StreamError>>;
/// Where the answer to a membership change or a leader transfer goes.
pub(crate) type AdminReply = oneshot::Sender<Result<u64, JournalError>>;

/// A read barrier waiting for raft. `reply` is `None` for the leader's own lease renewals.
struct PendingRead {
    issued: u64,
    issued_at: Instant,
    term: u64,
    by_leader: bool,
    reply: Option<Reply>,
}

struct PendingTransfer {
    to: u64,
    issued: u64,
    reply: AdminReply,
}

/// What a replica's stream handles read without the driver thread.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) lease: LeaseCell,
    pub(crate) recent: RecentEntries,
}

/// One stream's replica on this server.
pub(crate) struct Replica {
    pub(crate) stream_id: u64,
    pub(crate) node: RawNode<EngineStorage>,
    /// Proposed entries by index, with the term they were proposed in.
    pub(crate) appends: BTreeMap<u64, (u64, Reply)>,
    reads: HashMap<u64, PendingRead>,
    /// Barriers raft would drop now, held until it can take them (see
    /// [`Replica::send_deferred_reads`]): ids of this replica's own, and followers' forwarded
    /// `MsgReadIndex` messages.
    deferred_reads: Vec<u64>,
    deferred_forwarded: Vec<Message>,
    pub(super) change: Option<PendingChange>,
    transfer: Option<PendingTransfer>,
    /// While leader: lease reads are answered locally before this tick.
    lease_until: u64,
    /// The same lease in real time, for the stream handles (see `lease.rs`).
    lease_until_at: Option<Instant>,
    pub(crate) published: Arc<Published>,
    /// Votes are refused before this tick (see [`Replica::refuses_votes`]).
    quiet_until: u64,
    /// Ticks at the full rate before this server tick even when idle (see
    /// [`Replica::ticks_fast`]).
    fast_until: u64,
    /// The server tick at which this replica last became leader: raft's record of which
    /// peers answered recently starts empty then, and means something one election
    /// timeout later.
    led_since: u64,
    /// The index of a snapshot from the leader that is staged but not yet durable.
    pub(super) installing: Option<u64>,
    /// The server tick at which this replica was first seen not leading while appends it
    /// took as leader still waited (see [`Replica::expire`]).
    orphaned_since: Option<u64>,
    pub(crate) committed: watch::Sender<u64>,
    pub(crate) leadership: watch::Sender<Leadership>,
    pub(crate) membership: watch::Sender<Membership>,
}

impl Replica {
    /// `lease` is how long a lease lasts in real time.
    pub(crate) fn new(
        stream_id: u64,
        node: RawNode<EngineStorage>,
        now: u64,
        quiet: u64,
        lease: Duration,
    ) -> Self {
        let applied = node.raft.raft_log.applied;
        let membership = Membership::from_conf_state(&node.raft.prs().conf().to_conf_state());
        let replica = Self {
            stream_id,
            node,
            appends: BTreeMap::new(),
            orphaned_since: None,
            reads: HashMap::new(),
            deferred_reads: Vec::new(),
            deferred_forwarded: Vec::new(),
            change: None,
            transfer: None,
            lease_until: 0,
            lease_until_at: None,
            published: Arc::new(Published {
                lease: LeaseCell::new(lease / 2),
                recent: RecentEntries::default(),
            }),
            quiet_until: now + quiet,
            fast_until: 0,
            led_since: 0,
            installing: None,
            // Entries up to the recovered applied index are not delivered again.
            committed: watch::Sender::new(applied),
            leadership: watch::Sender::new(Leadership::default()),
            membership: watch::Sender::new(membership),
        };
        replica
            .leadership
            .send_replace(replica.current_leadership());
        replica
    }

    pub(crate) fn current_leadership(&self) -> Leadership {
        let raft = &self.node.raft;
        Leadership {
            term: raft.term,
            leader_id: (raft.leader_id != 0).then_some(raft.leader_id),
            is_leader: raft.state == StateRole::Leader,
        }
    }

    /// The first entry a follower may still need from this replica: above the lowest
    /// index any peer matched, while it leads; nothing otherwise.
    pub(crate) fn lagging_from(&self) -> u64 {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            return u64::MAX;
        }
        raft.prs()
            .iter()
            .filter(|&(&id, _)| id != raft.id)
            .map(|(_, progress)| progress.matched + 1)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Whether nothing is happening on this replica that a slower clock could delay: no
    /// operation waits, and the log is committed and (on a leader) matched everywhere.
    /// Idle replicas tick at a fraction of the server's rate (see `Server::tick`).
    pub(crate) fn is_idle(&self) -> bool {
        let raft = &self.node.raft;
        let last = raft.raft_log.last_index();
        let quiet = self.appends.is_empty()
            && self.reads.is_empty()
            && self.change.is_none()
            && self.transfer.is_none()
            && raft.raft_log.committed == last
            && raft.raft_log.applied == last
            && self.membership.borrow().outgoing.is_empty();
        quiet
            && match raft.state {
                StateRole::Leader => {
                    raft.lead_transferee.is_none()
                        && raft
                            .prs()
                            .iter()
                            .all(|(_, progress)| progress.matched == last)
                }
                StateRole::Follower => raft.leader_id != 0,
                StateRole::Candidate | StateRole::PreCandidate => false,
            }
    }

    /// Whether this replica takes server tick `now` when it is not a slow tick. Busy
    /// replicas do. So does one that was busy recently: a leader for three election
    /// timeouts after it was last busy, and a follower for two after it last was, or last
    /// received entries (`entries_received`). A follower therefore slows down only once
    /// its leader has stopped sending entries for two election timeouts, and its leader
    /// keeps heartbeating at the full rate for a third: the follower never counts fast
    /// ticks against slow heartbeats. And a follower whose busy leader dies counts its
    /// election timeout (10 to 20 ticks) at the full rate, so the new leader comes as
    /// quickly as on a stream that is never idle.
    pub(crate) fn ticks_fast(&mut self, now: u64, election_tick: u64) -> bool {
        if !self.is_idle() {
            let timeouts = if self.node.raft.state == StateRole::Leader {
                3
            } else {
                2
            };
            self.fast_until = self.fast_until.max(now + timeouts * election_tick);
            return true;
        }
        now < self.fast_until
    }

    /// Notes that a ready appended entries from the leader at server tick `now` (see
    /// [`ticks_fast`](Self::ticks_fast)).
    pub(crate) fn entries_received(&mut self, now: u64, election_tick: u64) {
        self.fast_until = self.fast_until.max(now + 2 * election_tick);
    }

    pub(crate) fn not_leader(&self) -> StreamError {
        let leadership = self.current_leadership();
        StreamError::NotLeader {
            leader_hint: leadership.leader_id,
            term: leadership.term,
        }
    }

    pub(super) fn admin_error(&self, source: StreamError) -> JournalError {
        JournalError::Stream {
            stream_id: self.stream_id,
            source,
        }
    }

    pub(super) fn membership_error(&self, reason: impl Into<String>) -> JournalError {
        JournalError::Membership {
            stream_id: self.stream_id,
            reason: reason.into(),
        }
    }

    /// A replica that restarted lost the memory of its leader, so raft's check-quorum
    /// lease would let it vote at once, and a new leader could be elected while the old one
    /// still serves lease reads. It refuses votes for one election timeout instead.
    pub(crate) fn refuses_votes(&self, now: u64) -> bool {
        now < self.quiet_until
    }

    /// Starts a read barrier at tick `now`; a leader's answer renews its lease.
    pub(crate) fn start_read(&mut self, id: u64, now: u64, reply: Option<Reply>) {
        if self.takes_reads() {
            self.node.read_index(self.read_context(id));
        } else {
            self.deferred_reads.push(id);
        }
        let read = PendingRead {
            issued: now,
            issued_at: Instant::now(),
            term: self.node.raft.term,
            by_leader: self.node.raft.state == StateRole::Leader,
            reply,
        };
        self.reads.insert(id, read);
    }

    /// The context raft carries with barrier `id`: the id, then this replica's node id.
    /// The leader keys the barriers it tracks by context and drops one whose context it
    /// already tracks, and every server counts its ids from 1, so without the node id a
    /// follower's forwarded barrier and the leader's own would collide.
    fn read_context(&self, id: u64) -> Vec<u8> {
        [id.to_le_bytes(), self.node.raft.id.to_le_bytes()].concat()
    }

    /// Whether raft would act on a read barrier now: raft-rs silently drops one on a
    /// leader that has not yet committed an entry of its own term, so it would only time
    /// out. (A replica that knows no leader refuses barriers before they get here.)
    fn takes_reads(&self) -> bool {
        let raft = &self.node.raft;
        raft.state != StateRole::Leader || raft.commit_to_current_term()
    }

    /// Holds a follower's forwarded read barrier that raft would drop (see
    /// [`takes_reads`](Self::takes_reads)) until this leader commits in its term; returns
    /// the message if raft can take it now.
    pub(crate) fn defer_forwarded_read(&mut self, message: Message) -> Option<Message> {
        let leads = self.node.raft.state == StateRole::Leader;
        if leads && message.get_msg_type() == MessageType::MsgReadIndex && !self.takes_reads() {
            self.deferred_forwarded.push(message);
            return None;
        }
        Some(message)
    }

    /// Hands raft the read barriers that waited for this leader's first commit in its
    /// term, its own and its followers'. The lease still counts from when a barrier was issued, which is earlier, so
    /// it only gets shorter.
    pub(crate) fn send_deferred_reads(&mut self) {
        if self.deferred_reads.is_empty() && self.deferred_forwarded.is_empty()
            || !self.takes_reads()
        {
            return;
        }
        for id in std::mem::take(&mut self.deferred_reads) {
            // Expired or failed barriers are gone from `reads`.
            if self.reads.contains_key(&id) {
                self.node.read_index(self.read_context(id));
            }
        }
        for message in std::mem::take(&mut self.deferred_forwarded) {
            if let Err(error) = self.node.step(message) {
                tracing::debug!(stream_id = self.stream_id, %error, "forwarded read barrier");
            }
        }
    }

    /// Ends the lease, for the driver and the stream handles alike.
    pub(super) fn end_lease(&mut self) {
        self.lease_until = 0;
        self.lease_until_at = None;
        self.published.lease.publish(None);
    }

    /// Publishes the commit index and the lease to the stream handles, at the end of a
    /// ready (after this ready's leadership change, if any).
    pub(crate) fn publish_lease(&self) {
        let lease = &self.published.lease;
        lease.set_committed(self.node.raft.raft_log.committed);
        let leads = self.node.raft.state == StateRole::Leader && self.transfer.is_none();
        lease.publish(self.lease_until_at.filter(|_| leads));
    }

    /// The committed index, if this replica leads with a lease valid at tick `now` and in
    /// wall time. `renew` says whether the lease is old enough to renew in the background.
    ///
    /// The wall-time bound matters when the driver thread stalls in the middle of a turn
    /// (a SIGSTOP, a long page fault): `now` is the tick count taken at the turn's start,
    /// and the events the turn takes after the stall would otherwise be judged by it.
    pub(crate) fn lease_read(&self, now: u64, lease_ticks: u64) -> Option<(u64, bool)> {
        let leads = self.node.raft.state == StateRole::Leader && self.transfer.is_none();
        let in_wall_time = self
            .lease_until_at
            .is_some_and(|until| Instant::now() < until);
        (leads && now < self.lease_until && in_wall_time).then(|| {
            let renew = self.lease_until - now < lease_ticks / 2;
            (self.node.raft.raft_log.committed, renew)
        })
    }

    /// Answers the read barriers raft resolved. A barrier the leader issued at tick `t`
    /// proves a quorum still followed it at `t`, and no follower of that quorum votes for
    /// another candidate for an election timeout after hearing from it: the lease runs until
    /// `t + lease_ticks`, which is shorter than that.
    pub(crate) fn answer_reads(
        &mut self,
        states: Vec<ReadState>,
        lease_ticks: u64,
        lease_duration: Duration,
    ) {
        for state in states {
            let id = state
                .request_ctx
                .first_chunk::<8>()
                .map(|b| u64::from_le_bytes(*b));
            let Some(read) = id.and_then(|id| self.reads.remove(&id)) else {
                continue;
            };
            let raft = &self.node.raft;
            if read.by_leader && raft.state == StateRole::Leader && raft.term == read.term {
                self.lease_until = self.lease_until.max(read.issued + lease_ticks);
                let until = read.issued_at + lease_duration;
                self.lease_until_at = Some(self.lease_until_at.map_or(until, |at| at.max(until)));
            }
            if let Some(reply) = read.reply {
                let _ = reply.send(Ok(state.index));
            }
        }
    }

    /// Fails whatever waited longer than `timeout` ticks.
    pub(crate) fn expire(&mut self, now: u64, timeout: u64) {
        self.expire_orphaned_appends(now, timeout);
        let expired: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, read)| now - read.issued > timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(PendingRead {
                reply: Some(reply), ..
            }) = self.reads.remove(&id)
            {
                let _ = reply.send(Err(StreamError::Timeout {
                    operation: "read_index",
                }));
            }
        }
        if self
            .change
            .as_ref()
            .is_some_and(|c| now - c.issued > timeout)
            && let Some(change) = self.change.take()
        {
            // The change may still apply: the caller checks the membership.
            let error = self.admin_error(StreamError::Timeout {
                operation: "change_membership",
            });
            let _ = change.reply.send(Err(error));
        }
        if self
            .transfer
            .as_ref()
            .is_some_and(|t| now - t.issued > timeout)
            && let Some(transfer) = self.transfer.take()
        {
            let error = self.admin_error(StreamError::Timeout {
                operation: "transfer_leader",
            });
            let _ = transfer.reply.send(Err(error));
        }
    }

    /// Appends taken by a leader that lost its term are settled when the commit index
    /// passes them: committed in the term they were proposed in, or overwritten. A former
    /// leader cut off from the new one never learns which, so `timeout` ticks after it
    /// stopped leading its appends fail with [`StreamError::Timeout`]: their outcome is
    /// unknown (they may still commit), and the caller retries or asks the new leader.
    fn expire_orphaned_appends(&mut self, now: u64, timeout: u64) {
        if self.appends.is_empty() || self.node.raft.state == StateRole::Leader {
            self.orphaned_since = None;
            return;
        }
        let since = *self.orphaned_since.get_or_insert(now);
        if now - since > timeout {
            self.orphaned_since = None;
            for (_, (_, reply)) in std::mem::take(&mut self.appends) {
                let _ = reply.send(Err(StreamError::Timeout {
                    operation: "append on a replica that stopped leading",
                }));
            }
        }
    }

    /// Fails every waiting operation with `error` (the server stops).
    pub(crate) fn fail(self, error: &StreamError) {
        for (_, (_, reply)) in self.appends {
            let _ = reply.send(Err(error.clone()));
        }
        for read in self.reads.into_values() {
            if let Some(reply) = read.reply {
                let _ = reply.send(Err(error.clone()));
            }
        }
        let admin = |source: StreamError| JournalError::Stream {
            stream_id: self.stream_id,
            source,
        };
        if let Some(change) = self.change {
            let _ = change.reply.send(Err(admin(error.clone())));
        }
        if let Some(transfer) = self.transfer {
            let _ = transfer.reply.send(Err(admin(error.clone())));
        }
    }

    /// Publishes a leadership change. Read barriers of an old term can no longer be answered
    /// safely, so they fail and the callers retry; the lease ends; a transfer settles.
    pub(crate) fn update_leadership(&mut self, tick: u64) {
        let now = self.current_leadership();
        let before = *self.leadership.borrow();
        if now == before {
            return;
        }
        if now.is_leader && !before.is_leader {
            self.led_since = tick;
        }
        self.leadership.send_replace(now);
        if now.term != before.term || now.leader_id != before.leader_id {
            self.end_lease();
            self.deferred_reads.clear();
            self.deferred_forwarded.clear();
            let error = self.not_leader();
            for (_, read) in self.reads.drain() {
                if let Some(reply) = read.reply {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
        let Some(transfer) = self.transfer.take() else {
            return;
        };
        match now.leader_id {
            Some(leader) if leader == transfer.to => {
                let _ = transfer.reply.send(Ok(now.term));
            }
            Some(leader) if leader != self.node.raft.id => {
                let error = JournalError::LeaderTransfer {
                    stream_id: self.stream_id,
                    to: transfer.to,
                    leader: Some(leader),
                };
                let _ = transfer.reply.send(Err(error));
            }
            // Still leading, or an election is running: keep waiting.
            _ => self.transfer = Some(transfer),
        }
    }

    /// Asks raft to hand leadership to `to`; answers with the new term once `to` leads.
    pub(crate) fn transfer_leader(&mut self, to: u64, now: u64, reply: AdminReply) {
        let raft = &self.node.raft;
        if raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.admin_error(self.not_leader())));
            return;
        }
        if to == raft.id {
            let _ = reply.send(Ok(raft.term));
            return;
        }
        if !raft.prs().conf().voters().contains(to) {
            let error = self.membership_error(format!("{to} is not a voter"));
            let _ = reply.send(Err(error));
            return;
        }
        // raft holds back proposals until a transfer completes or an election timeout
        // passes: a transferee that has not answered for that long would only stall writes.
        // (A leader younger than an election timeout cannot tell yet.)
        let settled = now >= self.led_since + raft.election_timeout() as u64;
        let active = raft.prs().get(to).is_some_and(|p| p.recent_active);
        if settled && !active {
            let error =
                self.membership_error(format!("{to} has not answered within an election timeout"));
            let _ = reply.send(Err(error));
            return;
        }
        if let Some(previous) = self.transfer.take() {
            let error = JournalError::LeaderTransfer {
                stream_id: self.stream_id,
                to: previous.to,
                leader: Some(raft.id),
            };
            let _ = previous.reply.send(Err(error));
        }
        // The transferee campaigns without waiting for the followers' leases to lapse, so
        // this leader's lease is no proof of leadership any more.
        self.end_lease();
        self.node.transfer_leader(to);
        self.transfer = Some(PendingTransfer {
            to,
            issued: now,
            reply,
        });
    }

    /// The application side of committed entries: settle the appends they decide, and
    /// apply membership changes, staging the new conf state (with its index, the applied
    /// index a restart resumes from) in `batch`.
    pub(crate) fn apply_committed(
        &mut self,
        committed: &[Entry],
        batch: &mut LogBatch,
    ) -> Result<(), StreamError> {
        for entry in committed {
            self.settle_appends(entry);
            match entry.get_entry_type() {
                EntryType::EntryConfChangeV2 => self.apply_conf_change(entry, batch)?,
                EntryType::EntryNormal => self.settle_refused_change(entry),
                // Never proposed: only ConfChangeV2 is.
                EntryType::EntryConfChange => tracing::error!(
                    stream_id = self.stream_id,
                    index = entry.index,
                    "ignoring a v1 conf change entry"
                ),
            }
        }
        Ok(())
    }

    fn settle_appends(&mut self, entry: &Entry) {
        while let Some(entry_ref) = self.appends.first_entry() {
            if *entry_ref.key() > entry.index {
                break;
            }
            let (index, (term, reply)) = entry_ref.remove_entry();
            // An entry commits at the index it was proposed at, or never: a different term
            // there means a new leader overwrote it.
            let ours = index == entry.index
                && term == entry.term
                && entry.get_entry_type() == EntryType::EntryNormal;
            let _ = reply.send(if ours {
                Ok(index)
            } else {
                Err(self.not_leader())
            });
        }
    }
}
