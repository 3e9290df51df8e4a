//! [`RaftStream`]: the kernel [`Stream`] over one stream replica of a [`Node`](super::Node).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use luna_kernel::stream::{Committed, Leadership, Stream, StreamError, Subscription};
use tokio::sync::{oneshot, watch};

use super::driver::{Event, Events};
use super::membership::Membership;
use super::replica::Published;
use crate::error::JournalError;
use crate::feed::{EntrySource, spawn_feed};

/// One replica of a raft-replicated stream, hosted by a [`Node`](super::Node).
///
/// Every operation is an event to the node's driver thread, which batches it with
/// everything else that arrived meanwhile. Appends work on the leader only; followers
/// answer [`StreamError::NotLeader`] with a hint. [`read_index`](Stream::read_index) works on
/// every replica (a follower asks the leader).
#[derive(Debug)]
pub struct RaftStream {
    stream_id: u64,
    events: Events,
    committed: watch::Receiver<u64>,
    leadership: watch::Receiver<Leadership>,
    membership: watch::Receiver<Membership>,
    published: Arc<Published>,
    max_entry_size: usize,
}

impl RaftStream {
    pub(crate) fn new(
        stream_id: u64,
        events: Events,
        committed: watch::Receiver<u64>,
        leadership: watch::Receiver<Leadership>,
        membership: watch::Receiver<Membership>,
        published: Arc<Published>,
        max_entry_size: usize,
    ) -> Self {
        Self {
            stream_id,
            events,
            committed,
            leadership,
            membership,
            published,
            max_entry_size,
        }
    }

    /// The stream's id.
    pub fn stream_id(&self) -> u64 {
        self.stream_id
    }

    /// The highest index this replica knows is committed.
    pub fn committed_index(&self) -> u64 {
        *self.committed.borrow()
    }

    /// The membership as this replica has applied it.
    pub fn membership(&self) -> Membership {
        self.membership.borrow().clone()
    }

    /// A receiver notified whenever [`membership`](Self::membership) changes.
    pub fn watch_membership(&self) -> watch::Receiver<Membership> {
        self.membership.clone()
    }

    /// Changes the membership to `voters` and `learners`, on the leader. One changed node
    /// is a simple change; more go through joint consensus (`ConfChangeV2`), which the
    /// stream leaves by itself before answering. A new voter must be a learner first (see
    /// [`add_learner`](Self::add_learner)) and caught up, or the answer is
    /// [`JournalError::NotCaughtUp`]: retry later. The leader cannot remove itself:
    /// [`transfer_leader`](Self::transfer_leader) first. Answers the index of the entry
    /// that finished the change (the applied index when nothing changes). A [`StreamError::Timeout`] inside
    /// [`JournalError::Stream`] means the outcome is unknown: check
    /// [`membership`](Self::membership).
    pub async fn change_membership(
        &self,
        voters: &[u64],
        learners: &[u64],
    ) -> Result<u64, JournalError> {
        let (reply, answer) = oneshot::channel();
        let event = Event::ChangeMembership {
            stream_id: self.stream_id,
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            reply,
        };
        self.admin(event, answer).await
    }

    /// Adds `node` as a learner: it receives the log (the node hosts the stream with
    /// [`Node::add_stream`](super::Node::add_stream) and the stream's initial voters) but
    /// does not vote. If the log was compacted, it starts from the leader's snapshot.
    pub async fn add_learner(&self, node: u64) -> Result<u64, JournalError> {
        let mut target = self.membership();
        target.learners.push(node);
        self.change_membership(&target.voters, &target.learners)
            .await
    }

    /// Promotes learner `node` to voter.
    pub async fn promote(&self, node: u64) -> Result<u64, JournalError> {
        let mut target = self.membership();
        target.learners.retain(|&id| id != node);
        target.voters.push(node);
        self.change_membership(&target.voters, &target.learners)
            .await
    }

    /// Removes `node` (a voter or a learner) from the stream.
    pub async fn remove(&self, node: u64) -> Result<u64, JournalError> {
        let mut target = self.membership();
        target.voters.retain(|&id| id != node);
        target.learners.retain(|&id| id != node);
        self.change_membership(&target.voters, &target.learners)
            .await
    }

    /// Hands leadership to voter `to`, on the leader; answers the new term once this
    /// replica sees `to` lead. [`JournalError::LeaderTransfer`] if another replica won,
    /// [`StreamError::Timeout`] (in [`JournalError::Stream`]) after two election timeouts.
    pub async fn transfer_leader(&self, to: u64) -> Result<u64, JournalError> {
        let (reply, answer) = oneshot::channel();
        let event = Event::TransferLeader {
            stream_id: self.stream_id,
            to,
            reply,
        };
        self.admin(event, answer).await
    }

    /// Proposes `data` before returning, and returns a future of its commit index with the
    /// same meaning as [`Stream::append`]. Appends started one after another from one task
    /// are proposed, and so committed, in that order, so a caller can keep several in
    /// flight (the future of `append` proposes only when first polled).
    pub fn append_ordered(
        &self,
        data: Bytes,
    ) -> impl Future<Output = Result<u64, StreamError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = StreamError::check_entry(&data, self.max_entry_size).and_then(|()| {
            self.events
                .send(Event::Propose {
                    stream_id: self.stream_id,
                    data,
                    reply,
                })
                .map_err(|_| StreamError::Closed)
        });
        async move {
            sent?;
            answer.await.map_err(|_| StreamError::Closed)?
        }
    }

    /// A linearizable read barrier like [`Stream::read_index`], which a leader holding a
    /// lease answers from its committed index at once, without a round of heartbeats.
    /// The lease comes from the leader's last answered read barrier and lasts two ticks
    /// less than an election timeout; elsewhere (a follower, an expired lease, a leader
    /// transfer in progress) this is a `read_index`. While the lease is far from its end,
    /// the answer comes from what the ready loop published, without the driver thread.
    pub async fn read_index_by_lease(&self) -> Result<u64, StreamError> {
        if let Some(committed) = self.published.lease.read() {
            return Ok(committed);
        }
        let stream_id = self.stream_id;
        self.request(|reply| Event::LeaseRead { stream_id, reply })
            .await
    }

    async fn admin(
        &self,
        event: Event,
        answer: oneshot::Receiver<Result<u64, JournalError>>,
    ) -> Result<u64, JournalError> {
        let closed = || JournalError::Stream {
            stream_id: self.stream_id,
            source: StreamError::Closed,
        };
        self.events.send(event).map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    async fn request(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<u64, StreamError>>) -> Event,
    ) -> Result<u64, StreamError> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(make(reply))
            .map_err(|_| StreamError::Closed)?;
        answer.await.map_err(|_| StreamError::Closed)?
    }
}

#[async_trait]
impl Stream for RaftStream {
    fn max_entry_size(&self) -> usize {
        self.max_entry_size
    }

    async fn append(&self, data: Bytes) -> Result<u64, StreamError> {
        // Checked here too, so bad input never costs the driver a turn.
        self.append_ordered(data).await
    }

    async fn subscribe(&self, from: u64) -> Result<Subscription, StreamError> {
        let source = Arc::new(DriverSource {
            stream_id: self.stream_id,
            events: self.events.clone(),
            published: Arc::clone(&self.published),
        });
        Ok(spawn_feed(source, self.committed.clone(), from.max(1)))
    }

    async fn truncate(&self, up_to: u64, snapshot: Bytes) -> Result<(), StreamError> {
        let (reply, answer) = oneshot::channel();
        let event = Event::Truncate {
            stream_id: self.stream_id,
            up_to,
            data: snapshot,
            reply,
        };
        self.events.send(event).map_err(|_| StreamError::Closed)?;
        answer.await.map_err(|_| StreamError::Closed)?
    }

    fn leadership(&self) -> Leadership {
        *self.leadership.borrow()
    }

    fn watch_leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    async fn read_index(&self) -> Result<u64, StreamError> {
        let stream_id = self.stream_id;
        self.request(|reply| Event::ReadIndex { stream_id, reply })
            .await
    }

    async fn lease_read(&self) -> Result<u64, StreamError> {
        // A follower's read barrier asks the leader, which proves nothing about this one.
        self.leadership().check_leads()?;
        self.read_index_by_lease().await
    }
}

/// Reads a subscription's entries from the latest committed ones (see `recent.rs`), or on
/// the driver thread, the only one that reads the engine.
struct DriverSource {
    stream_id: u64,
    events: Events,
    published: Arc<Published>,
}

#[async_trait]
impl EntrySource for DriverSource {
    async fn read(&self, from: u64, to: u64) -> Result<Vec<Committed>, StreamError> {
        if let Some(entries) = self.published.recent.take(from, to) {
            return Ok(entries);
        }
        let (reply, answer) = oneshot::channel();
        let event = Event::Read {
            stream_id: self.stream_id,
            from,
            to,
            reply,
        };
        self.events.send(event).map_err(|_| StreamError::Closed)?;
        answer.await.map_err(|_| StreamError::Closed)?
    }
}
