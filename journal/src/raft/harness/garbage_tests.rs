//! Peers that send garbage: well-formed raft messages that no correct peer sends. raft-rs
//! panics on several; a server must log and drop them instead (`inbound.rs`), or fail
//! cleanly when one shows that its log was lost.

use bytes::Bytes;
use raft::eraftpb::{ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use rand::Rng;
use rand::rngs::SmallRng;

use super::{STREAM, Sim, seeds, with_thirty_acknowledged};
use crate::raft::server::encode_envelope;

const TYPES: [MessageType; 19] = [
    MessageType::MsgHup,
    MessageType::MsgBeat,
    MessageType::MsgPropose,
    MessageType::MsgAppend,
    MessageType::MsgAppendResponse,
    MessageType::MsgRequestVote,
    MessageType::MsgRequestVoteResponse,
    MessageType::MsgSnapshot,
    MessageType::MsgHeartbeat,
    MessageType::MsgHeartbeatResponse,
    MessageType::MsgUnreachable,
    MessageType::MsgSnapStatus,
    MessageType::MsgCheckQuorum,
    MessageType::MsgTransferLeader,
    MessageType::MsgTimeoutNow,
    MessageType::MsgReadIndex,
    MessageType::MsgReadIndexResp,
    MessageType::MsgRequestPreVote,
    MessageType::MsgRequestPreVoteResponse,
];

/// What a forged message is made to look plausible against: a replica's state.
#[derive(Clone, Copy)]
struct View {
    term: u64,
    first: u64,
    committed: u64,
    last: u64,
}

fn view(sim: &Sim, id: u64) -> Option<View> {
    sim.host(id).with(|server| {
        let raft = &server.streams.get(&STREAM)?.node.raft;
        Some(View {
            term: raft.term,
            first: raft.raft_log.first_index(),
            committed: raft.raft_log.committed,
            last: raft.raft_log.last_index(),
        })
    })
}

fn pick(rng: &mut SmallRng, choices: &[u64]) -> u64 {
    choices[rng.random_range(0..choices.len())]
}

fn ids(rng: &mut SmallRng) -> Vec<u64> {
    (0..rng.random_range(0..4))
        .map(|_| rng.random_range(0..=5))
        .collect()
}

/// A message of any type to `to` from `from`, its fields drawn from values near `view`
/// (and a few far from it).
fn forged(rng: &mut SmallRng, from: u64, to: u64, view: View) -> Message {
    let indexes = [
        0,
        1,
        view.first.saturating_sub(2),
        view.first.saturating_sub(1),
        view.committed.saturating_sub(1),
        view.committed,
        view.last,
        view.last + 1,
        view.last + 7,
        u64::MAX / 2,
    ];
    let terms = [
        0,
        1,
        view.term.saturating_sub(1),
        view.term,
        view.term + 1,
        view.term + 4,
    ];
    let mut message = Message {
        from,
        to,
        term: pick(rng, &terms),
        log_term: pick(rng, &terms),
        index: pick(rng, &indexes),
        commit: pick(rng, &indexes),
        commit_term: pick(rng, &terms),
        reject: rng.random_bool(0.3),
        reject_hint: pick(rng, &indexes),
        request_snapshot: if rng.random_bool(0.2) {
            pick(rng, &indexes)
        } else {
            0
        },
        context: (0..rng.random_range(0..12)).map(|_| rng.random()).collect(),
        priority: rng.random_range(-2..3),
        ..Default::default()
    };
    message.set_msg_type(TYPES[rng.random_range(0..TYPES.len())]);
    let contiguous = rng.random_bool(0.7);
    for offset in 0..rng.random_range(0..4u64) {
        let mut entry = Entry {
            index: if contiguous {
                message.index.saturating_add(offset + 1)
            } else {
                pick(rng, &indexes)
            },
            term: pick(rng, &terms),
            data: (0..rng.random_range(0..16)).map(|_| rng.random()).collect(),
            ..Default::default()
        };
        if rng.random_bool(0.1) {
            entry.set_entry_type(if rng.random_bool(0.5) {
                EntryType::EntryConfChangeV2
            } else {
                EntryType::EntryConfChange
            });
        }
        message.entries.push(entry);
    }
    if message.get_msg_type() == MessageType::MsgSnapshot {
        let mut snapshot = Snapshot {
            data: (0..rng.random_range(0..16)).map(|_| rng.random()).collect(),
            ..Default::default()
        };
        let metadata = snapshot.mut_metadata();
        metadata.index = pick(rng, &indexes);
        metadata.term = pick(rng, &terms);
        metadata.set_conf_state(ConfState {
            voters: ids(rng),
            learners: ids(rng),
            voters_outgoing: ids(rng),
            learners_next: ids(rng),
            auto_leave: rng.random_bool(0.3),
            ..Default::default()
        });
        message.set_snapshot(snapshot);
    }
    message
}

/// What a supervisor does with a server that failed.
fn restart(sim: &mut Sim, id: u64) {
    sim.crash(id);
    sim.start(id);
}

/// Three replicas with a committed log (compacted on one of them) get thousands of forged
/// messages between their real ones. No server may panic. A server may fail cleanly when a
/// message shows its log was lost (it is then restarted from its disk, as a supervisor
/// would); the forgeries may break raft's guarantees, so only that is checked.
#[test]
fn no_message_from_a_peer_panics_a_server() {
    for seed in seeds(700..712) {
        println!("garbage: seed {seed}");
        let mut sim = Sim::new(seed, 3);
        let leader = with_thirty_acknowledged(&mut sim);
        let compacted_at = sim.committed(leader) / 2;
        let truncated = sim.host(leader).with(move |server| {
            server.truncate(STREAM, compacted_at, Bytes::from_static(b"snapshot"))
        });
        sim.drain(leader);
        assert!(
            matches!(truncated.blocking_recv(), Ok(Ok(()))),
            "seed {seed}: the leader compacts its log"
        );
        let mut failures = 0;
        for _ in 0..400 {
            let to = sim.rng.random_range(1..=3u64);
            let Some(view) = view(&sim, to) else {
                continue;
            };
            let from = pick(&mut sim.rng, &[1, 2, 3, 4]);
            let message = forged(&mut sim.rng, from, to, view);
            let envelope = encode_envelope(STREAM, &message).expect("encode");
            let mut arrivals = vec![(from, to, envelope)];
            arrivals.extend(
                std::mem::take(&mut sim.net)
                    .into_iter()
                    .map(|m| (m.from, m.to, m.bytes)),
            );
            // Answers to the forged sender 4 go nowhere.
            for (from, to, bytes) in arrivals.into_iter().filter(|&(_, to, _)| to <= 3) {
                let stepped = sim.host(to).with(move |server| server.step(from, &bytes));
                if stepped.is_err() {
                    failures += 1;
                    restart(&mut sim, to);
                }
            }
            for id in 1..=3 {
                sim.host(id).with(crate::raft::Server::tick);
                if sim.try_drain(id).is_err() {
                    failures += 1;
                    restart(&mut sim, id);
                }
            }
        }
        println!("garbage: seed {seed}: {failures} servers failed cleanly and restarted");
    }
}

/// Each kind of garbage `inbound::check` drops, next to the plausible message it was made
/// from, which it steps; and the heartbeat that shows a lost log.
#[test]
fn each_kind_of_garbage_is_told_from_a_plausible_message() {
    use crate::raft::inbound::{Inbound, check};

    let seed = seeds(720..721)[0];
    println!("garbage: seed {seed}");
    let mut sim = Sim::new(seed, 3);
    let first_leader = with_thirty_acknowledged(&mut sim);
    // A second term, so that a heartbeat can come from a stale one.
    sim.crash(first_leader);
    let leader = sim.run_until_leader(300);
    sim.propose(leader, Bytes::from_static(b"second term"));
    for _ in 0..20 {
        sim.step();
    }
    let follower = (1..=3)
        .find(|&id| id != leader && id != first_leader)
        .unwrap_or_default();
    let view = view(&sim, follower).expect("the follower is up");
    assert!(view.term >= 2, "seed {seed}: term {}", view.term);
    let verdict = |sim: &Sim, to: u64, message: Message| {
        sim.host(to).with(move |server| {
            check(
                &server.streams.get(&STREAM).expect("stream").node.raft,
                &message,
            )
        })
    };
    let garbage = |sim: &Sim, to: u64, message: Message| {
        matches!(verdict(sim, to, message), Inbound::Garbage(_))
    };
    let from_leader = |kind: MessageType| {
        let mut message = Message {
            from: leader,
            to: follower,
            term: view.term,
            ..Default::default()
        };
        message.set_msg_type(kind);
        message
    };
    let entry = |index: u64, term: u64| Entry {
        index,
        term,
        data: b"x".to_vec().into(),
        ..Default::default()
    };

    // Local message types, and messages without a term.
    assert!(garbage(&sim, follower, from_leader(MessageType::MsgHup)));
    assert!(garbage(
        &sim,
        follower,
        from_leader(MessageType::MsgPropose)
    ));
    let mut no_term = from_leader(MessageType::MsgHeartbeat);
    no_term.term = 0;
    assert!(garbage(&sim, follower, no_term));

    // Appends.
    let mut append = from_leader(MessageType::MsgAppend);
    append.index = view.last;
    append.log_term = view.term;
    append.entries = vec![
        entry(view.last + 1, view.term),
        entry(view.last + 2, view.term),
    ]
    .into();
    assert_eq!(verdict(&sim, follower, append.clone()), Inbound::Step);
    let mut probe = append.clone();
    probe.entries.clear();
    assert_eq!(verdict(&sim, follower, probe), Inbound::Step);
    let mut gap = append.clone();
    gap.entries[1].index += 1;
    assert!(garbage(&sim, follower, gap));
    let mut future = append.clone();
    future.entries[1].term = view.term + 1;
    assert!(garbage(&sim, follower, future));
    let mut falling = append.clone();
    falling.entries[1].term = view.term - 1;
    assert!(garbage(&sim, follower, falling));
    let mut nowhere = append.clone();
    nowhere.index = view.last + 5;
    nowhere.log_term = 0;
    nowhere.entries.clear();
    assert!(garbage(&sim, follower, nowhere));

    // An acknowledgement of entries the leader does not have.
    let mut ack = from_leader(MessageType::MsgAppendResponse);
    ack.from = follower;
    ack.to = leader;
    ack.index = sim.host(leader).with(|server| {
        let raft = &server.streams.get(&STREAM).expect("stream").node.raft;
        raft.raft_log.last_index()
    });
    assert_eq!(verdict(&sim, leader, ack.clone()), Inbound::Step);
    ack.index += 1;
    assert!(garbage(&sim, leader, ack));

    // Heartbeats: a commit past the log means it was lost, unless the term is stale.
    let mut heartbeat = from_leader(MessageType::MsgHeartbeat);
    heartbeat.commit = view.committed;
    assert_eq!(verdict(&sim, follower, heartbeat.clone()), Inbound::Step);
    heartbeat.commit = view.last + 1;
    assert_eq!(
        verdict(&sim, follower, heartbeat.clone()),
        Inbound::LostLog {
            commit: view.last + 1,
            last_index: view.last
        }
    );
    heartbeat.term = view.term - 1;
    assert_eq!(verdict(&sim, follower, heartbeat), Inbound::Step);

    // Snapshots.
    let snapshot = |index: u64, term: u64, conf: ConfState| {
        let mut message = from_leader(MessageType::MsgSnapshot);
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = index;
        snapshot.mut_metadata().term = term;
        snapshot.mut_metadata().set_conf_state(conf);
        message.set_snapshot(snapshot);
        message
    };
    let voters = |voters: Vec<u64>, learners: Vec<u64>| ConfState {
        voters,
        learners,
        ..Default::default()
    };
    let (index, term) = (view.last + 3, view.term);
    assert_eq!(
        verdict(
            &sim,
            follower,
            snapshot(index, term, voters(vec![1, 2, 3], vec![4]))
        ),
        Inbound::Step
    );
    assert!(garbage(
        &sim,
        follower,
        snapshot(index, 0, voters(vec![1, 2, 3], vec![]))
    ));
    assert!(garbage(
        &sim,
        follower,
        snapshot(0, term, voters(vec![1, 2, 3], vec![]))
    ));
    assert!(garbage(
        &sim,
        follower,
        snapshot(index, term, voters(vec![], vec![1]))
    ));
    assert!(garbage(
        &sim,
        follower,
        snapshot(index, term, voters(vec![1, 1, 2], vec![]))
    ));
    assert!(garbage(
        &sim,
        follower,
        snapshot(index, term, voters(vec![1, 2], vec![2]))
    ));
    let mut learner_next_not_outgoing = voters(vec![1, 2, 3], vec![]);
    learner_next_not_outgoing.voters_outgoing = vec![1, 2];
    learner_next_not_outgoing.learners_next = vec![3];
    assert!(garbage(
        &sim,
        follower,
        snapshot(index, term, learner_next_not_outgoing)
    ));
    let mut joint = voters(vec![1, 2, 3], vec![5]);
    joint.voters_outgoing = vec![1, 2, 4];
    joint.learners_next = vec![4];
    joint.auto_leave = true;
    assert_eq!(
        verdict(&sim, follower, snapshot(index, term, joint)),
        Inbound::Step
    );
    let mut auto_leave_not_joint = voters(vec![1, 2, 3], vec![]);
    auto_leave_not_joint.auto_leave = true;
    assert!(garbage(
        &sim,
        follower,
        snapshot(index, term, auto_leave_not_joint)
    ));

    // Read barriers: forwarded without a term and with one context.
    let mut barrier = from_leader(MessageType::MsgReadIndex);
    barrier.from = follower;
    barrier.to = leader;
    barrier.term = 0;
    barrier.entries = vec![entry(0, 0)].into();
    assert_eq!(verdict(&sim, leader, barrier.clone()), Inbound::Step);
    let mut with_term = barrier.clone();
    with_term.term = view.term;
    assert!(garbage(&sim, leader, with_term));
    barrier.entries.clear();
    assert!(garbage(&sim, leader, barrier));
    let mut answer = from_leader(MessageType::MsgReadIndexResp);
    answer.entries = vec![entry(0, 0)].into();
    assert_eq!(verdict(&sim, follower, answer.clone()), Inbound::Step);
    answer.entries.clear();
    assert!(garbage(&sim, follower, answer));

    // Leader transfers start on the leader, never forwarded.
    let mut transfer = from_leader(MessageType::MsgTransferLeader);
    transfer.from = follower;
    transfer.to = leader;
    assert!(garbage(&sim, leader, transfer));
}
