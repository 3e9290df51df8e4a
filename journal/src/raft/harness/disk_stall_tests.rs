//! Disks that hang: a replica whose fsync does not return acknowledges nothing, but the
//! leader of replicas that are up is not deposed for it.

use bytes::Bytes;
use luna_kernel::stream::StreamError;
use tokio::sync::oneshot;

use super::{STREAM, Sim, seeds};
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

/// Entries of this size, against a bound of `UNSYNCED_BOUND_ENTRIES` of them.
const ENTRY_BYTES: usize = 1024;
const UNSYNCED_BOUND_ENTRIES: usize = 16;

fn small_unsynced_bound(config: &mut RaftConfig) {
    config.max_entry_size = ENTRY_BYTES;
    config.max_unsynced_bytes = ENTRY_BYTES * UNSYNCED_BOUND_ENTRIES;
}

/// What a server may hold past its bound: the proposal or append that crossed it, and a
/// round's hard state and bookkeeping.
const UNSYNCED_SLACK: usize = 4 * ENTRY_BYTES;

/// Checks that server `id` holds no more unsynced writes than its bound allows.
fn assert_within_bound(sim: &Sim, id: u64) {
    let unsynced = sim.host(id).with(|server| server.unsynced_bytes());
    assert!(
        unsynced <= ENTRY_BYTES * UNSYNCED_BOUND_ENTRIES + UNSYNCED_SLACK,
        "seed {}: server {id} holds {unsynced} unsynced bytes",
        sim.seed
    );
}

fn entry(seed: u64, n: usize) -> Bytes {
    let mut data = format!("seed {seed} entry {n} ").into_bytes();
    data.resize(ENTRY_BYTES, b'.');
    Bytes::from(data)
}

/// The leader's disk hangs. Its followers still commit what it proposes, but its own
/// unsynced writes grow with every proposal: past the bound it refuses them as
/// `Overloaded` instead of holding more. Once the disk is back it takes proposals again,
/// and every acknowledged entry is on every replica.
#[test]
fn a_leader_whose_disk_hangs_refuses_proposals_past_its_bound() {
    for seed in seeds(350..353) {
        println!("disk_stall: seed {seed}");
        let mut sim = Sim::with_config(seed, 3, small_unsynced_bound);
        let leader = sim.run_until_leader(300);
        sim.stalled_disks = vec![leader];
        let mut refused = 0;
        for n in 0..UNSYNCED_BOUND_ENTRIES * 3 {
            let data = entry(seed, n);
            let mut answer = sim
                .host(leader)
                .with(move |server| server.propose(STREAM, data));
            match answer.try_recv() {
                Ok(Err(StreamError::Overloaded {
                    unsynced_bytes,
                    limit,
                })) => {
                    assert!(unsynced_bytes > limit, "seed {seed}");
                    refused += 1;
                }
                Err(oneshot::error::TryRecvError::Empty) => {
                    sim.appends.push((answer, entry(seed, n)))
                }
                other => panic!("seed {seed}: proposal {n} answered {other:?}"),
            }
            sim.step();
            assert_within_bound(&sim, leader);
        }
        assert!(
            refused >= UNSYNCED_BOUND_ENTRIES,
            "seed {seed}: only {refused} proposals were refused"
        );
        let stats = sim.host(leader).with(|server| server.overload_stats());
        assert_eq!(stats.proposals_refused, refused as u64, "seed {seed}");
        assert!(stats.over_bound, "seed {seed}: the disk is behind");
        assert_eq!(sim.leader(), Some(leader), "seed {seed}");
        sim.stalled_disks.clear();
        sim.step();
        let data = entry(seed, usize::MAX);
        let mut answer = sim
            .host(leader)
            .with(move |server| server.propose(STREAM, data));
        assert!(
            matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "seed {seed}: a proposal was refused after the disk came back"
        );
        sim.appends.push((answer, entry(seed, usize::MAX)));
        sim.heal_and_verify();
        let stats = sim.host(leader).with(|server| server.overload_stats());
        assert!(!stats.over_bound, "seed {seed}: the disk caught up");
        assert!(
            sim.acked
                .values()
                .any(|data| *data == entry(seed, usize::MAX)),
            "seed {seed}: the proposal after the stall was not acknowledged"
        );
    }
}

/// A follower's disk hangs while its leader keeps appending (the other follower commits
/// with it). The follower drops appends past its bound instead of holding them; once its
/// disk is back, its leader resends what it dropped and it catches up.
#[test]
fn a_follower_whose_disk_hangs_drops_appends_past_its_bound_and_catches_up() {
    for seed in seeds(360..363) {
        println!("disk_stall: seed {seed}");
        let mut sim = Sim::with_config(seed, 3, small_unsynced_bound);
        let leader = sim.run_until_leader(300);
        let follower = (1..=3).find(|&id| id != leader).unwrap_or_default();
        // Until its leader hears that it holds the log, a follower gets one probe per
        // heartbeat; after, it gets every append at once.
        sim.propose(leader, entry(seed, usize::MAX));
        for _ in 0..20 {
            sim.step();
        }
        assert_eq!(
            sim.committed(follower),
            sim.committed(leader),
            "seed {seed}"
        );
        sim.stalled_disks = vec![follower];
        for n in 0..UNSYNCED_BOUND_ENTRIES * 3 {
            sim.propose(leader, entry(seed, n));
            sim.step();
            assert_within_bound(&sim, follower);
        }
        for _ in 0..20 {
            sim.step();
        }
        assert_eq!(
            sim.acked.len(),
            UNSYNCED_BOUND_ENTRIES * 3 + 1,
            "seed {seed}: the leader and the other follower commit on their own"
        );
        assert!(
            sim.committed(follower) < sim.committed(leader),
            "seed {seed}: the stalled follower cannot have committed everything"
        );
        let dropped = sim
            .host(follower)
            .with(|server| server.overload_stats().peer_appends_dropped);
        assert!(dropped > 0, "seed {seed}: the follower dropped nothing");
        sim.stalled_disks.clear();
        sim.heal_and_verify();
    }
}
