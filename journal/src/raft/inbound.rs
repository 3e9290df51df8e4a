//! What a server takes from its peers before raft-rs sees it.
//!
//! raft-rs 0.7 trusts its peers: it panics on several messages that no correct peer sends
//! (entries whose indexes do not follow the message's, a snapshot whose configuration
//! cannot be restored, a leader transfer from a node it does not track, and more), and acts
//! on message types that only the local node should issue (a `MsgHup` from a peer starts an
//! election). A peer that sends such garbage is logged and ignored here instead.
//!
//! One message is not garbage but a sign of lost data: a heartbeat, in a term this replica
//! accepts, whose commit index is past this replica's log. Its leader counted entries as
//! durable here that the log no longer holds, so the disk lost acknowledged writes (a
//! wiped or restored directory). Going on could elect a leader without committed entries,
//! so the server fails with [`StreamError::Corruption`] and its operator replaces the
//! replica; raft-rs would have panicked.
//!
//! None of this authenticates peers: a peer that lies consistently (votes, entries in a
//! higher term) still misleads raft. See docs/journal.md, "Review findings".

use luna_kernel::stream::StreamError;
use raft::Raft;
use raft::eraftpb::{ConfState, Message, MessageType};

use super::storage::EngineStorage;

/// What to do with a peer's message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Inbound {
    /// Hand it to raft.
    Step,
    /// Log it and drop it, for this reason.
    Garbage(&'static str),
    /// This replica's log lost entries its leader knows were durable here.
    LostLog {
        /// The leader's commit index for this replica.
        commit: u64,
        /// Where this replica's log ends.
        last_index: u64,
    },
}

impl Inbound {
    /// The failure a [`LostLog`](Self::LostLog) means for stream `stream_id`.
    pub(super) fn lost_log(stream_id: u64, from: u64, commit: u64, last_index: u64) -> StreamError {
        StreamError::Corruption {
            location: format!("stream {stream_id}"),
            reason: format!(
                "the log was lost: leader {from} counts entries up to {commit} as durable \
                 here, but the log ends at {last_index}"
            ),
        }
    }
}

/// Checks `message`, which a peer sent to `raft`'s replica.
pub(super) fn check(raft: &Raft<EngineStorage>, message: &Message) -> Inbound {
    use MessageType::*;
    let last_index = raft.raft_log.last_index();
    match message.get_msg_type() {
        MsgHup | MsgBeat | MsgPropose | MsgUnreachable | MsgSnapStatus | MsgCheckQuorum => {
            Inbound::Garbage("a message type only the local node issues")
        }
        // raft-rs takes a message without a term as a local one; only a forwarded read
        // barrier travels without one.
        kind if message.term == 0 && kind != MsgReadIndex => Inbound::Garbage("no term"),
        MsgAppend => check_append(message),
        // The barrier's context travels as the one entry's data. A follower forwards a
        // barrier it gets to its leader as it came, and raft-rs panics when it sends one
        // with a term.
        MsgReadIndex | MsgReadIndexResp if message.entries.len() != 1 => {
            Inbound::Garbage("a read barrier without exactly one context")
        }
        MsgReadIndex if message.term != 0 => Inbound::Garbage("a read barrier with a term"),
        MsgAppendResponse if !message.reject && message.index > last_index => {
            Inbound::Garbage("acknowledges entries past the log")
        }
        MsgHeartbeat if message.term >= raft.term && message.commit > last_index => {
            Inbound::LostLog {
                commit: message.commit,
                last_index,
            }
        }
        MsgSnapshot => check_snapshot(message),
        // Transfers start on the leader here (`Replica::transfer_leader`), so no follower
        // forwards one. raft-rs panics on one from a node the leader does not track, and a
        // follower would forward it again with its term set, on which raft-rs panics too.
        MsgTransferLeader => Inbound::Garbage("a forwarded leader transfer"),
        _ => Inbound::Step,
    }
}

/// An append follows an entry of some term, and its entries follow its `index` one by one
/// (raft-rs slices by their indexes), in terms that never fall, from its `log_term` up to
/// the message's term.
fn check_append(message: &Message) -> Inbound {
    // raft-rs gives every index outside the log term 0, so such an append would match
    // wherever it points and move the commit index past the log.
    if message.index > 0 && message.log_term == 0 {
        return Inbound::Garbage("an entry of term 0 to append after");
    }
    let mut term = message.log_term;
    for (offset, entry) in message.entries.iter().enumerate() {
        if Some(entry.index) != message.index.checked_add(offset as u64 + 1) {
            return Inbound::Garbage("entries out of sequence");
        }
        if entry.term < term || entry.term > message.term {
            return Inbound::Garbage("entries with terms out of order");
        }
        term = entry.term;
    }
    Inbound::Step
}

/// A snapshot stands for an entry (not index 0, not term 0: raft-rs would match it with
/// any index outside the log, and commit past the log), with a configuration raft-rs can
/// restore.
fn check_snapshot(message: &Message) -> Inbound {
    let metadata = message.get_snapshot().get_metadata();
    if metadata.index == 0 || metadata.term == 0 {
        return Inbound::Garbage("a snapshot of no entry");
    }
    check_conf_state(metadata.get_conf_state())
}

/// A configuration raft-rs can restore: some voters, no node listed twice or in two roles,
/// and a joint configuration's pending learners among its outgoing voters.
fn check_conf_state(conf: &ConfState) -> Inbound {
    let unique = |ids: &[u64]| {
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        sorted.windows(2).all(|pair| pair[0] != pair[1])
    };
    let joint = !conf.voters_outgoing.is_empty();
    let lists = [
        &conf.voters,
        &conf.learners,
        &conf.voters_outgoing,
        &conf.learners_next,
    ];
    if conf.voters.is_empty()
        || lists.iter().any(|ids| !unique(ids) || ids.contains(&0))
        || conf.learners.iter().any(|id| {
            conf.voters.contains(id)
                || conf.voters_outgoing.contains(id)
                || conf.learners_next.contains(id)
        })
        || conf
            .learners_next
            .iter()
            .any(|id| conf.voters.contains(id) || !conf.voters_outgoing.contains(id))
        || (!joint && conf.auto_leave)
    {
        return Inbound::Garbage("a snapshot whose configuration cannot be restored");
    }
    Inbound::Step
}
