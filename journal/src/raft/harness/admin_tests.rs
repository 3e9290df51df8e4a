//! Membership changes, leader transfer and lease reads on the deterministic harness.

use std::time::Duration;

use bytes::Bytes;
use luna_kernel::stream::StreamError;
use rand::Rng;
use tokio::sync::oneshot;

use super::{STREAM, Sim, seeds};
use crate::error::JournalError;
use crate::raft::server::LEASE_MARGIN_TICKS;
use crate::raft::{Membership, RaftConfig, Server};

type AdminAnswer = oneshot::Receiver<Result<u64, JournalError>>;

impl Sim {
    /// Runs `op` on the current leader and steps until it answers, with a proposal on most
    /// steps so changes happen under load. Retries (on the new leader) what a fault can
    /// cause: a lost leadership, a learner still catching up, a timeout.
    pub(super) fn admin(
        &mut self,
        what: &str,
        op: impl Fn(&mut Server) -> AdminAnswer + Clone + Send + 'static,
    ) -> u64 {
        for _attempt in 0..30 {
            let leader = self.run_until_leader(500);
            let mut answer = self.host(leader).with(op.clone());
            for step in 0..200u64 {
                match answer.try_recv() {
                    Ok(Ok(index)) => return index,
                    Ok(Err(
                        e @ (JournalError::Stream { .. }
                        | JournalError::NotCaughtUp { .. }
                        | JournalError::ChangeInProgress { .. }
                        | JournalError::LeaderTransfer { .. }),
                    )) => {
                        println!("seed {}: {what} retried after {e}", self.seed);
                        for _ in 0..10 {
                            self.step();
                        }
                        break;
                    }
                    // A transferee that restarted lately may not have answered the new
                    // leader yet: transient, unlike the other membership refusals.
                    Ok(Err(e @ JournalError::Membership { .. }))
                        if e.to_string().contains("has not answered") =>
                    {
                        println!("seed {}: {what} retried after {e}", self.seed);
                        for _ in 0..10 {
                            self.step();
                        }
                        break;
                    }
                    Ok(Err(e)) => panic!("seed {}: {what} failed: {e}", self.seed),
                    Err(oneshot::error::TryRecvError::Closed) => break,
                    Err(oneshot::error::TryRecvError::Empty) => {}
                }
                if step % 3 != 0 {
                    self.propose_on_leader(what);
                }
                self.step();
            }
        }
        panic!("seed {}: {what} never finished", self.seed);
    }

    pub(super) fn propose_on_leader(&mut self, tag: &str) {
        if let Some(leader) = self.leader() {
            let n = self.rng.random::<u32>();
            self.propose(leader, Bytes::from(format!("{tag}-{n}")));
        }
    }

    fn membership(&self, id: u64) -> Membership {
        self.host(id).with(|server| {
            let watch = server.watch_membership(STREAM).expect("stream");
            watch.borrow().clone()
        })
    }
}

fn membership(voters: &[u64], learners: &[u64]) -> Membership {
    Membership {
        voters: voters.to_vec(),
        learners: learners.to_vec(),
        outgoing: Vec::new(),
    }
}

#[test]
fn membership_changes_survive_message_loss_and_restart() {
    for seed in seeds(300..303) {
        println!("membership_changes: seed {seed} (replay with LUNA_SEED={seed})");
        let mut sim = Sim::with_spares(seed, 3, 1);
        sim.drop_rate = 0.05;
        sim.dup_rate = 0.05;
        sim.max_delay = 3;
        sim.run_until_leader(300);
        for _ in 0..30 {
            sim.propose_on_leader("before");
            sim.step();
        }
        // Server 4 hosts the stream with the initial voters, then is added as a learner and
        // catches up from index 1.
        sim.start(4);
        sim.members.push(4);
        sim.admin("add learner", |s| {
            s.change_membership(STREAM, &[1, 2, 3], &[4])
        });
        // Promote 4 and remove one old voter (not the leader) in one joint change.
        let leader = sim.run_until_leader(500);
        let removed = (1..=3).find(|&id| id != leader).expect("a follower");
        let voters: Vec<u64> = (1..=4).filter(|&id| id != removed).collect();
        let target = voters.clone();
        sim.admin("promote and remove", move |s| {
            s.change_membership(STREAM, &target, &[])
        });
        sim.members.retain(|&id| id != removed);
        sim.crash(removed);
        for _ in 0..30 {
            sim.propose_on_leader("after");
            sim.step();
        }
        sim.heal_and_verify();
        let expected = membership(&voters, &[]);
        for id in sim.members.clone() {
            assert_eq!(sim.membership(id), expected, "seed {seed}: replica {id}");
        }
        // The new configuration survives a restart of every member.
        for id in sim.members.clone() {
            sim.crash(id);
        }
        for id in sim.members.clone() {
            sim.start(id);
            assert_eq!(sim.membership(id), expected, "seed {seed}: replica {id}");
        }
        sim.heal_and_verify();
        println!(
            "seed {seed}: {} appends acknowledged, {removed} replaced by 4",
            sim.acked.len()
        );
    }
}

#[test]
fn bad_membership_changes_are_typed_errors() {
    let seed = seeds(400..401)[0];
    println!("bad_membership_changes: seed {seed}");
    let mut sim = Sim::with_spares(seed, 3, 1);
    let leader = sim.run_until_leader(300);
    let follower = if leader == 1 { 2 } else { 1 };
    let answer = |sim: &Sim, id: u64, voters: Vec<u64>, learners: Vec<u64>| {
        let mut answer = sim
            .host(id)
            .with(move |s| s.change_membership(STREAM, &voters, &learners));
        answer.try_recv().expect("answered at once")
    };
    assert!(matches!(
        answer(&sim, follower, vec![1, 2, 3], vec![4]),
        Err(JournalError::Stream {
            source: StreamError::NotLeader { .. },
            ..
        })
    ));
    // A voter must be a learner first.
    assert!(matches!(
        answer(&sim, leader, vec![1, 2, 3, 4], vec![]),
        Err(JournalError::Membership { .. })
    ));
    let others: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    assert!(matches!(
        answer(&sim, leader, others, vec![]),
        Err(JournalError::Membership { .. })
    ));
    assert!(matches!(
        answer(&sim, leader, vec![1, 2, 3], vec![3]),
        Err(JournalError::Membership { .. })
    ));
    // Learner 4 is down: it is added, but cannot be promoted before it catches up.
    for _ in 0..80 {
        sim.propose(leader, Bytes::from_static(b"load"));
        sim.step();
    }
    sim.admin("add learner", |s| {
        s.change_membership(STREAM, &[1, 2, 3], &[4])
    });
    let leader = sim.run_until_leader(300);
    match answer(&sim, leader, vec![1, 2, 3, 4], vec![]) {
        Err(JournalError::NotCaughtUp { node: 4, .. }) => {}
        other => panic!("seed {seed}: expected NotCaughtUp, got {other:?}"),
    }
}

#[test]
fn leader_transfer_completes_under_message_loss() {
    for seed in seeds(500..503) {
        println!("leader_transfer: seed {seed} (replay with LUNA_SEED={seed})");
        let mut sim = Sim::new(seed, 3);
        sim.drop_rate = 0.05;
        sim.max_delay = 2;
        let leader = sim.run_until_leader(300);
        for _ in 0..20 {
            sim.propose_on_leader("before");
            sim.step();
        }
        let to = (1..=3).find(|&id| id != leader).expect("a follower");
        let term = sim.admin("transfer", move |s| s.transfer_leader(STREAM, to));
        let leadership = sim
            .host(to)
            .with(|s| *s.watch_leadership(STREAM).expect("stream").borrow());
        assert_eq!(leadership.leader_id, Some(to), "seed {seed}");
        assert!(leadership.term >= term, "seed {seed}");
        // A transfer to a non-member is refused at once.
        let new_leader = sim.run_until_leader(300);
        let mut answer = sim.host(new_leader).with(|s| s.transfer_leader(STREAM, 9));
        assert!(
            matches!(answer.try_recv(), Ok(Err(JournalError::Membership { .. }))),
            "seed {seed}"
        );
        sim.heal_and_verify();
    }
}

#[test]
fn read_barriers_right_after_an_election_are_answered() {
    for seed in seeds(700..740) {
        let mut sim = Sim::new(seed, 3);
        // Messages overtake each other.
        sim.max_delay = 4;
        let leader = sim.run_until_leader(300);
        // Issued before the leader's first entry of its term commits: raft-rs drops such
        // a barrier, on the leader and when a follower forwards it alike, so the leader
        // must hold both until that commit rather than let them time out.
        let leader_read = sim.host(leader).with(|s| s.read_index(STREAM));
        let mut others = (1..=3).filter(|&id| id != leader);
        let (follower, down) = (others.next().unwrap_or(1), others.next().unwrap_or(1));
        // The leader's first commit then waits for the follower, whose barrier can
        // overtake its acknowledgement on the way.
        sim.crash(down);
        // A follower refuses barriers until it knows the leader.
        let knows_leader = |sim: &Sim| {
            let watch = sim.servers[follower as usize - 1].as_ref();
            watch.is_some_and(|w| w.borrow().leader_id == Some(leader))
        };
        for _ in 0..20 {
            if knows_leader(&sim) {
                break;
            }
            sim.step();
        }
        let follower_read = sim.host(follower).with(|s| s.read_index(STREAM));
        let mut answers = [(leader, leader_read), (follower, follower_read)];
        for (id, answer) in &mut answers {
            let mut steps = 0;
            let result = loop {
                if let Ok(result) = answer.try_recv() {
                    break result;
                }
                assert!(
                    steps < 100,
                    "seed {seed}: replica {id}: no answer in {steps} steps"
                );
                sim.step();
                steps += 1;
            };
            assert!(
                result.is_ok() || sim.leader() != Some(leader),
                "seed {seed}: replica {id}'s barrier failed while the leader kept its term: \
                 {result:?}"
            );
        }
        sim.start(down);
        sim.heal_and_verify();
    }
}

/// `sim` (3 servers) once its leader holds a lease, with 10 entries acknowledged: the
/// leader, and the last acknowledged index.
fn leader_with_a_lease(mut sim: Sim) -> (Sim, u64, u64) {
    let seed = sim.seed;
    let leader = sim.run_until_leader(300);
    for i in 0..10 {
        sim.propose(leader, Bytes::from(format!("entry-{i}")));
    }
    for _ in 0..10 {
        sim.step();
    }
    assert_eq!(sim.acked.len(), 10, "seed {seed}");
    let acked = sim.acked.keys().next_back().copied().unwrap_or(0);
    // Before any read barrier was answered there is no lease: a lease read waits for a
    // round of heartbeats.
    let mut first = sim.host(leader).with(|s| s.lease_read(STREAM));
    assert!(
        first.try_recv().is_err(),
        "seed {seed}: answered without a lease"
    );
    for _ in 0..5 {
        sim.step();
    }
    assert!(
        matches!(first.try_recv(), Ok(Ok(i)) if i >= acked),
        "seed {seed}"
    );
    // That answer renewed the lease: the next one is answered at once, with no step.
    let mut local = sim.host(leader).with(|s| s.lease_read(STREAM));
    assert!(
        matches!(local.try_recv(), Ok(Ok(i)) if i >= acked),
        "seed {seed}"
    );
    (sim, leader, acked)
}

#[test]
fn lease_reads_are_local_and_lapse_on_a_partitioned_leader() {
    let seed = seeds(600..601)[0];
    println!("lease_reads: seed {seed} (replay with LUNA_SEED={seed})");
    let (mut sim, leader, acked) = leader_with_a_lease(Sim::new(seed, 3));
    // Partition the leader. While it still answers locally no other replica may lead.
    sim.isolated = Some(leader);
    let lease_ticks = RaftConfig::new(1, "").election_tick as u64;
    let mut lapsed = None;
    for step in 0..lease_ticks {
        let mut answer = sim.host(leader).with(|s| s.lease_read(STREAM));
        match answer.try_recv() {
            Ok(Ok(index)) => {
                assert!(index >= acked, "seed {seed}");
                let other = (1..=3).filter(|&id| id != leader).find(|&id| {
                    sim.host(id).with(|s| {
                        s.watch_leadership(STREAM)
                            .expect("stream")
                            .borrow()
                            .is_leader
                    })
                });
                assert_eq!(other, None, "seed {seed}: lease read beside another leader");
            }
            Err(oneshot::error::TryRecvError::Empty) => {
                lapsed = Some((step, answer));
                break;
            }
            other => panic!("seed {seed}: unexpected {other:?}"),
        }
        sim.step();
    }
    let (step, mut answer) = lapsed.expect("the lease never lapsed");
    println!("seed {seed}: lease lapsed {step} steps after the partition");
    // The fallback read barrier cannot reach a quorum: it fails, never answers an index.
    for _ in 0..100 {
        sim.step();
        match answer.try_recv() {
            Ok(Err(StreamError::NotLeader { .. } | StreamError::Timeout { .. })) => {
                sim.heal_and_verify();
                return;
            }
            Err(oneshot::error::TryRecvError::Empty) => {}
            other => panic!("seed {seed}: partitioned leader answered {other:?}"),
        }
    }
    panic!("seed {seed}: the fallback read never failed");
}

#[test]
fn a_lease_lapses_in_wall_time_though_no_tick_came() {
    let seed = seeds(601..602)[0];
    println!("lease_wall_time: seed {seed} (replay with LUNA_SEED={seed})");
    let tick = Duration::from_millis(50);
    let (sim, leader, _acked) = leader_with_a_lease(Sim::with_tick_interval(seed, 3, tick));
    // What a driver thread stopped mid-turn sees: the lease's wall time passes, and the
    // events it takes after the stop are judged before its next tick.
    let election_tick = RaftConfig::new(1, "").election_tick as u64;
    let lease_ticks = (election_tick - LEASE_MARGIN_TICKS) as u32;
    std::thread::sleep(tick * (lease_ticks + 1));
    let mut late = sim.host(leader).with(|s| s.lease_read(STREAM));
    assert!(
        matches!(late.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
        "seed {seed}: a lapsed lease answered without a round of heartbeats"
    );
}

#[test]
fn a_restarted_replica_refuses_votes_for_an_election_timeout() {
    use protobuf::Message as _;
    use raft::eraftpb::{Message, MessageType};

    let dir = tempfile::tempdir().expect("tempdir");
    let config = RaftConfig::new(1, dir.path());
    let election_tick = config.election_tick;
    let mut server = Server::open(config).expect("open");
    server.add_stream(STREAM, &[1, 2, 3]).expect("add");
    let request = Message {
        msg_type: MessageType::MsgRequestPreVote,
        from: 2,
        to: 1,
        term: 1,
        ..Default::default()
    };
    let envelope = crate::raft::server::encode_envelope(STREAM, &request).expect("encode");
    // Every message the server sends to 2 after stepping the request, decoded.
    let answers = |server: &mut Server| -> Vec<MessageType> {
        server.step(2, &envelope).expect("a pre-vote is stepped");
        let mut out = server.ready().expect("ready");
        if let Some(mut round) = server.take_sync() {
            out.extend(crate::raft::sync(&server.engine(), &mut round).expect("fsync"));
            server.finish_sync(round);
        }
        out.into_iter()
            .filter(|(to, _)| *to == 2)
            .filter_map(|(_, bytes)| Message::parse_from_bytes(bytes.get(8..)?).ok())
            .map(|m| m.get_msg_type())
            .collect()
    };
    assert!(
        !answers(&mut server).contains(&MessageType::MsgRequestPreVoteResponse),
        "answered a pre-vote right after starting"
    );
    for _ in 0..election_tick {
        server.tick();
    }
    assert!(
        answers(&mut server).contains(&MessageType::MsgRequestPreVoteResponse),
        "still refusing pre-votes after an election timeout"
    );
}

#[test]
fn a_joint_change_finishes_when_its_leader_crashes() {
    for seed in seeds(700..706) {
        println!("joint_change_leader_crash: seed {seed} (replay with LUNA_SEED={seed})");
        let mut sim = Sim::with_spares(seed, 3, 2);
        sim.drop_rate = 0.02;
        sim.max_delay = 2;
        sim.run_until_leader(300);
        for id in [4, 5] {
            sim.start(id);
            sim.members.push(id);
        }
        sim.admin("add learners", |s| {
            s.change_membership(STREAM, &[1, 2, 3], &[4, 5])
        });
        for _ in 0..20 {
            sim.propose_on_leader("catch-up");
            sim.step();
        }
        // Replace two voters in one joint change, and crash its leader a few steps in.
        let leader = sim.run_until_leader(300);
        let keep = leader;
        let voters = vec![keep, 4, 5];
        let target = voters.clone();
        let _answer = sim
            .host(leader)
            .with(move |s| s.change_membership(STREAM, &target, &[]));
        let crash_after = sim.rng.random_range(0..4);
        for _ in 0..crash_after {
            sim.step();
        }
        let joint_at_crash = !sim.membership(leader).outgoing.is_empty();
        println!("seed {seed}: leader {leader} crashed in joint consensus: {joint_at_crash}");
        sim.crash(leader);
        for _ in 0..20 {
            sim.step();
        }
        sim.start(leader);
        // Whatever committed, the stream must leave joint consensus: the leader and every
        // voter it counts on. (A replica the change removed may never hear of it.)
        let mut settled = None;
        for _ in 0..600 {
            sim.step();
            let Some(leader) = sim.leader() else { continue };
            let config = sim.membership(leader);
            let joint = !config.outgoing.is_empty()
                || config
                    .voters
                    .iter()
                    .any(|&id| !sim.membership(id).outgoing.is_empty());
            if !joint {
                settled = Some(config);
                break;
            }
        }
        let settled = settled.unwrap_or_else(|| {
            let states: Vec<_> = (1..=5).map(|id| (id, sim.membership(id))).collect();
            panic!("seed {seed}: stuck in joint consensus: {states:?}")
        });
        println!("seed {seed}: settled on {settled:?}");
        // `keep` votes in every configuration here; the finishing change needs it to lead.
        sim.admin("transfer back", move |s| s.transfer_leader(STREAM, keep));
        let target = voters.clone();
        sim.admin("finish", move |s| s.change_membership(STREAM, &target, &[]));
        sim.members = voters;
        sim.heal_and_verify();
    }
}
