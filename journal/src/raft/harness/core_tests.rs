//! The journal's basic guarantees on the simulated network: committed entries survive
//! faults, followers refuse appends, restarts keep what was acknowledged, garbage is
//! ignored, and commits reach followers without a broadcast of their own.

use bytes::Bytes;
use luna_kernel::stream::StreamError;

use super::{STREAM, Sim, run_with_faults, seeds, with_thirty_acknowledged};
use crate::raft::{RaftConfig, Server};

/// A restarted server counts its read barrier ids from elsewhere than before the restart,
/// so that a leader never takes a new barrier for one still pending from before it.
#[test]
fn a_restarted_server_does_not_reuse_read_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = Server::open(RaftConfig::new(1, dir.path()))
        .expect("open")
        .next_read_id;
    let after = Server::open(RaftConfig::new(1, dir.path()))
        .expect("reopen")
        .next_read_id;
    assert_ne!(before, after);
}

#[test]
fn committed_entries_survive_faults() {
    for seed in seeds(0..6) {
        println!("committed_entries_survive_faults: seed {seed} (replay with LUNA_SEED={seed})");
        let sim = run_with_faults(seed);
        println!(
            "seed {seed}: {} appends acknowledged, {} read barriers checked, {} terms",
            sim.acked.len(),
            sim.reads_checked,
            sim.leaders.len()
        );
        assert!(
            !sim.acked.is_empty(),
            "seed {seed}: nothing was acknowledged"
        );
        assert!(
            sim.reads_checked > 0,
            "seed {seed}: no read barrier was answered"
        );
    }
}

#[test]
fn append_on_a_follower_is_not_leader_with_a_hint() {
    let seed = seeds(100..101)[0];
    println!("append_on_a_follower: seed {seed}");
    let mut sim = Sim::new(seed, 3);
    let leader = sim.run_until_leader(300);
    for _ in 0..20 {
        sim.step();
    }
    let follower = if leader == 1 { 2 } else { 1 };
    let mut answer = sim
        .host(follower)
        .with(|server| server.propose(STREAM, Bytes::from_static(b"x")));
    match answer.try_recv() {
        Ok(Err(StreamError::NotLeader { leader_hint, .. })) => {
            assert_eq!(leader_hint, Some(leader), "seed {seed}")
        }
        other => panic!("seed {seed}: expected NotLeader, got {other:?}"),
    }
    // A read barrier on a follower goes through the leader and covers acknowledged appends.
    sim.propose(leader, Bytes::from_static(b"y"));
    for _ in 0..10 {
        sim.step();
    }
    assert_eq!(sim.acked.len(), 1, "seed {seed}");
    sim.read(follower);
    for _ in 0..10 {
        sim.step();
    }
    assert_eq!(sim.reads_checked, 1, "seed {seed}");
}

#[test]
fn restart_from_disk_keeps_acknowledged_entries() {
    let seed = seeds(200..201)[0];
    println!("restart_from_disk: seed {seed}");
    let mut sim = Sim::new(seed, 3);
    with_thirty_acknowledged(&mut sim);
    for id in 1..=3 {
        sim.crash(id);
    }
    for id in 1..=3 {
        sim.start(id);
    }
    sim.heal_and_verify();
}

#[test]
fn garbage_from_a_peer_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::open(RaftConfig::new(1, dir.path())).expect("open");
    server.add_stream(STREAM, &[1, 2, 3]).expect("add");
    let garbage = [
        Bytes::new(),
        Bytes::from_static(b"\x07\0\0\0\0\0\0\0garbage that is not protobuf"),
        Bytes::from_static(&[0xff; 64]),
    ];
    for bytes in &garbage {
        assert!(server.step(2, bytes).is_ok());
    }
    let other = raft::eraftpb::Message {
        from: 3,
        to: 1,
        ..Default::default()
    };
    let envelope = crate::raft::server::encode_envelope(STREAM, &other).expect("encode");
    assert!(server.step(2, &envelope).is_ok());
    assert!(server.ready().is_ok());
    assert_eq!(
        server.watch_leadership(STREAM).map(|w| w.borrow().term),
        Some(0)
    );
}

/// A leader does not broadcast a commit: one append costs an append to each follower and
/// their acks, and the followers learn the commit index from the next heartbeat.
#[test]
fn a_commit_reaches_followers_with_the_next_heartbeat_not_a_broadcast() {
    let seed = seeds(900..901)[0];
    println!("commit_without_broadcast: seed {seed}");
    let mut sim = Sim::new(seed, 3);
    let leader = sim.run_until_leader(300);
    for _ in 0..30 {
        sim.step();
    }
    // Heartbeat answers still on the way would make the leader send again.
    for _ in 0..3 {
        sim.step_without_ticks();
    }
    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let before = sim.committed(leader);
    for &id in &followers {
        assert_eq!(
            sim.committed(id),
            before,
            "seed {seed}: follower {id} lags already"
        );
    }

    let sent = sim.sent;
    sim.propose(leader, Bytes::from_static(b"x"));
    for _ in 0..10 {
        sim.step_without_ticks();
    }
    assert_eq!(
        sim.acked.len(),
        1,
        "seed {seed}: the append was not acknowledged"
    );
    let committed = sim.committed(leader);
    assert_eq!(committed, before + 1, "seed {seed}");
    assert_eq!(
        sim.sent - sent,
        4,
        "seed {seed}: one append, one ack per follower, and nothing else"
    );
    for &id in &followers {
        assert_eq!(sim.committed(id), before, "seed {seed}: follower {id}");
    }

    let heartbeat_tick = RaftConfig::new(1, "").heartbeat_tick;
    for _ in 0..heartbeat_tick + 1 {
        sim.step();
    }
    for &id in &followers {
        assert_eq!(sim.committed(id), committed, "seed {seed}: follower {id}");
    }
}

/// A leader cut off from its peers takes an append it can no longer commit. It steps down
/// (check_quorum) and never hears from the new leader, so it cannot tell whether the entry
/// commits; the append fails as `Timeout` (outcome unknown) instead of waiting for the
/// partition to heal.
#[test]
fn an_append_on_a_leader_that_was_cut_off_times_out() {
    let election_tick = RaftConfig::new(1, "").election_tick as u64;
    for seed in seeds(910..913) {
        println!("orphaned_append: seed {seed}");
        let mut sim = Sim::new(seed, 3);
        let leader = sim.run_until_leader(300);
        sim.isolated = Some(leader);
        let mut answer = sim
            .host(leader)
            .with(|server| server.propose(STREAM, Bytes::from_static(b"cut off")));
        for _ in 0..election_tick * 6 {
            sim.step();
        }
        assert_ne!(
            sim.leader(),
            Some(leader),
            "seed {seed}: the leader stepped down"
        );
        match answer.try_recv() {
            Ok(Err(StreamError::Timeout { .. })) => {}
            other => panic!("seed {seed}: the append was answered {other:?}"),
        }
        sim.heal_and_verify();
    }
}
