//! Idle streams: slow ticks while nothing happens, full-rate ticks while something does,
//! and a new leader after a crash either way.

use bytes::Bytes;

use super::{STREAM, Sim, seeds};
use crate::raft::RaftConfig;

#[test]
fn idle_streams_tick_slowly_and_still_replace_a_crashed_leader() {
    let seed = seeds(300..301)[0];
    println!("idle_streams: seed {seed}");
    let mut sim = Sim::new(seed, 3);
    let leader = sim.run_until_leader(300);
    sim.propose(leader, Bytes::from_static(b"x"));
    for _ in 0..20 {
        sim.step();
    }
    assert_eq!(sim.acked.len(), 1, "seed {seed}");
    let idle = |sim: &Sim, id: u64| sim.host(id).with(|s| s.streams[&STREAM].is_idle());
    for id in 1..=3 {
        assert!(idle(&sim, id), "seed {seed}: replica {id} is not idle");
    }
    // A waiting append makes the leader busy, so it ticks at full rate again.
    sim.propose(leader, Bytes::from_static(b"y"));
    assert!(!idle(&sim, leader), "seed {seed}");
    for _ in 0..20 {
        sim.step();
    }
    // The followers of an idle stream still elect a new leader when the old one dies,
    // after an election timeout of slow ticks.
    sim.crash(leader);
    let ticks = 2 * 10 * RaftConfig::new(1, "").idle_tick_every + 100;
    let new_leader = sim.run_until_leader(ticks);
    assert_ne!(new_leader, leader, "seed {seed}");
    sim.propose(new_leader, Bytes::from_static(b"z"));
    for _ in 0..20 {
        sim.step();
    }
    assert_eq!(sim.acked.len(), 3, "seed {seed}");
}

#[test]
fn a_busy_streams_followers_replace_a_crashed_leader_at_full_speed() {
    let election_tick = RaftConfig::new(1, "").election_tick as u64;
    // One timeout of full-rate ticks (10 to 15) plus the last heartbeat's lag; slow ticks
    // would make the first campaign alone take 50 or more.
    let quick = election_tick * 3 / 2 + 5;
    let mut quick_elections = 0;
    for seed in seeds(320..330) {
        let mut sim = Sim::new(seed, 3);
        let leader = sim.run_until_leader(300);
        // Steady writes: the followers are idle between entries, but were sent entries
        // lately, so they keep counting at the full rate.
        for i in 0..50 {
            sim.propose(leader, Bytes::from(format!("entry-{i}")));
            sim.step();
        }
        // A moment without writes: the followers learn the commit index and go idle.
        for _ in 0..4 {
            sim.step();
        }
        sim.crash(leader);
        let crashed_at = sim.now;
        // The simulated nodes tick in lockstep, so split votes (another timeout each) are
        // common here; raft-rs draws its timeouts from its own unseeded rng.
        let new_leader = sim.run_until_leader(12 * election_tick);
        let ticks = sim.now - crashed_at;
        println!("seed {seed}: a new leader {ticks} ticks after the crash");
        assert_ne!(new_leader, leader, "seed {seed}");
        if ticks <= quick {
            quick_elections += 1;
        }
    }
    assert!(
        quick_elections >= 2,
        "only {quick_elections} of 10 elections took at most {quick} ticks"
    );
}
