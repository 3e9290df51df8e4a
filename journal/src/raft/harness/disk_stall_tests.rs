//! Disks that hang: a replica whose fsync does not return acknowledges nothing, but the
//! leader of replicas that are up is not deposed for it.

use bytes::Bytes;

use super::{Sim, seeds};
use crate::raft::RaftConfig;

/// Both followers' disks hang for several election timeouts while the leader keeps
/// proposing. Nothing commits meanwhile, yet the followers still answer heartbeats, so
/// the leader's quorum check passes and it stays leader in its term; once the disks come
/// back, everything proposed commits.
#[test]
fn a_leader_stays_while_its_followers_disks_hang() {
    let election_tick = RaftConfig::new(1, "").election_tick as u64;
    for seed in seeds(340..344) {
        println!("disk_stall: seed {seed}");
        let mut sim = Sim::new(seed, 3);
        let leader = sim.run_until_leader(300);
        let term = sim.term_of(leader);
        sim.stalled_disks = (1..=3).filter(|&id| id != leader).collect();
        let mut proposed = 0;
        for step in 0..election_tick * 6 {
            if step % 5 == 0 {
                sim.propose(leader, Bytes::from(format!("entry-{step}")));
                proposed += 1;
            }
            sim.step();
        }
        assert!(
            sim.acked.is_empty(),
            "seed {seed}: an append was acknowledged while no follower could sync"
        );
        assert_eq!(
            (sim.leader(), sim.term_of(leader)),
            (Some(leader), term),
            "seed {seed}: the leader was deposed while its followers were up"
        );
        sim.stalled_disks.clear();
        for _ in 0..50 {
            sim.step();
        }
        assert_eq!(sim.acked.len(), proposed, "seed {seed}");
    }
}
