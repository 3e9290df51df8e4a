//! The [`Server`]'s membership changes, leader transfers and lease reads: requests that
//! `replica.rs` carries out on one stream.

use luna_kernel::stream::StreamError;
use tokio::sync::{oneshot, watch};

use super::membership::Membership;
use super::replica::{AdminReply, Reply};
use super::server::{LEASE_MARGIN_TICKS, Server, next_id};
use crate::error::JournalError;

impl Server {
    /// How long a leader lease lasts after the read barrier that renewed it, in ticks; 0
    /// turns lease reads into read barriers.
    pub(super) fn lease_ticks(&self) -> u64 {
        (self.config.election_tick as u64).saturating_sub(LEASE_MARGIN_TICKS)
    }

    /// Stops hosting `stream_id` and deletes its log and state, for a replica that was
    /// removed from the stream's membership (or never joined it). Waiting operations fail
    /// with `Closed`. The deletion goes into the next sync round's batch, so it lands after
    /// everything staged for the stream before, and the stream cannot be added again until
    /// that round is durable. A crash before then leaves the old state, which a later
    /// `add_stream` recovers as a replica that fell behind. Returns whether the stream was
    /// hosted.
    pub fn remove_stream(&mut self, stream_id: u64) -> bool {
        let Some(replica) = self.streams.remove(&stream_id) else {
            return false;
        };
        replica.fail(&StreamError::Closed);
        self.touched.remove(&stream_id);
        self.removing.insert(stream_id);
        let round = &mut self.unsynced;
        round
            .batch
            .add_command(stream_id, raft_engine::Command::Clean);
        round.removed.push(stream_id);
        round.must_sync = true;
        true
    }

    /// The membership of `stream_id` as this replica applied it, as it changes.
    pub fn watch_membership(&self, stream_id: u64) -> Option<watch::Receiver<Membership>> {
        self.streams
            .get(&stream_id)
            .map(|r| r.membership.subscribe())
    }

    /// Changes `stream_id`'s membership to `voters` and `learners` (on the leader only).
    /// One changed node is a simple change; more go through joint consensus, which raft
    /// leaves by itself. New voters must be caught-up learners already. The receiver
    /// answers with the index of the entry that finished the change.
    pub fn change_membership(
        &mut self,
        stream_id: u64,
        voters: &[u64],
        learners: &[u64],
    ) -> oneshot::Receiver<Result<u64, JournalError>> {
        let (reply, answer) = oneshot::channel();
        self.change_membership_to(stream_id, voters, learners, reply);
        answer
    }

    /// [`change_membership`](Self::change_membership), answering on `reply`.
    pub(crate) fn change_membership_to(
        &mut self,
        stream_id: u64,
        voters: &[u64],
        learners: &[u64],
        reply: AdminReply,
    ) {
        let now = self.ticks;
        self.touched.insert(stream_id);
        match self.streams.get_mut(&stream_id) {
            Some(replica) => replica.change_membership(voters, learners, now, reply),
            None => closed(stream_id, reply),
        }
    }

    /// Hands the leadership of `stream_id` to voter `to` (on the leader only). The receiver
    /// answers with the new term once this replica sees `to` lead.
    pub fn transfer_leader(
        &mut self,
        stream_id: u64,
        to: u64,
    ) -> oneshot::Receiver<Result<u64, JournalError>> {
        let (reply, answer) = oneshot::channel();
        self.transfer_leader_to(stream_id, to, reply);
        answer
    }

    /// [`transfer_leader`](Self::transfer_leader), answering on `reply`.
    pub(crate) fn transfer_leader_to(&mut self, stream_id: u64, to: u64, reply: AdminReply) {
        let now = self.ticks;
        self.touched.insert(stream_id);
        match self.streams.get_mut(&stream_id) {
            Some(replica) => replica.transfer_leader(to, now, reply),
            None => closed(stream_id, reply),
        }
    }

    /// A read barrier that a leader with a valid lease answers at once from its committed
    /// index, without a round of heartbeats. Anywhere else it is
    /// [`read_index`](Self::read_index), whose answer on a leader renews the lease.
    pub fn lease_read(&mut self, stream_id: u64) -> oneshot::Receiver<Result<u64, StreamError>> {
        let (reply, answer) = oneshot::channel();
        self.lease_read_to(stream_id, reply);
        answer
    }

    /// [`lease_read`](Self::lease_read), answering on `reply`.
    pub(crate) fn lease_read_to(&mut self, stream_id: u64, reply: Reply) {
        let (now, lease_ticks) = (self.ticks, self.lease_ticks());
        let lease = self
            .streams
            .get(&stream_id)
            .and_then(|r| r.lease_read(now, lease_ticks));
        let Some((committed, renew)) = lease else {
            self.read_index_to(stream_id, reply);
            return;
        };
        let _ = reply.send(Ok(committed));
        // Renewed in the background before it lapses, so steady lease reads never wait.
        if renew && let Some(replica) = self.streams.get_mut(&stream_id) {
            self.touched.insert(stream_id);
            replica.start_read(next_id(&mut self.next_read_id), now, None);
        }
    }
}

fn closed(stream_id: u64, reply: AdminReply) {
    let _ = reply.send(Err(JournalError::Stream {
        stream_id,
        source: StreamError::Closed,
    }));
}
