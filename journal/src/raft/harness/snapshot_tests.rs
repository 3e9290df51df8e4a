//! Log compaction and snapshots on the deterministic harness: replicas truncate at random
//! points under faults, and a partitioned, crashed or new replica catches up from another
//! replica's snapshot. `heal_and_verify` checks what every replica's subscription would
//! deliver: a snapshot exactly as some application gave it, then contiguous entries equal
//! on every replica, holding every acknowledged entry after the snapshot.

use bytes::Bytes;
use luna_kernel::stream::{Snapshot, StreamError};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::sync::oneshot::error::TryRecvError;

use super::{STREAM, Sim, dir_bytes, seeds, with_thirty_acknowledged};
use crate::raft::{Membership, RaftConfig, Server, sync};

impl Sim {
    /// Has replica `id`'s application truncate at `up_to`, with snapshot data unique to the
    /// call that names the replica. An index past the replica's committed one is refused.
    fn truncate(&mut self, id: u64, up_to: u64) {
        let data = Bytes::from(format!(
            "replica {id} state at {up_to} (#{})",
            self.snapshots.len()
        ));
        let given = data.clone();
        let mut answer = self
            .host(id)
            .with(move |s| s.truncate(STREAM, up_to, given));
        match answer.try_recv() {
            // Not answered yet: it is durable after the next sync, but the replica may
            // send the snapshot before that.
            Err(TryRecvError::Empty) => {
                self.snapshots.insert(data, up_to);
                self.drain(id);
            }
            Ok(Err(StreamError::BeyondCommitted { up_to, committed })) => {
                assert!(up_to > committed, "seed {}", self.seed)
            }
            Ok(result) => panic!(
                "seed {}: truncate on {id} answered before a sync: {result:?}",
                self.seed
            ),
            Err(TryRecvError::Closed) => panic!("seed {}: truncate on {id} dropped", self.seed),
        }
    }

    fn snapshot_of(&self, id: u64) -> Option<Snapshot> {
        self.host(id).with(|s| s.snapshot(STREAM))
    }

    fn first_index_of(&self, id: u64) -> Option<u64> {
        self.host(id).with(|s| s.first_index(STREAM))
    }

    fn is_up(&self, id: u64) -> bool {
        self.servers[id as usize - 1].is_some()
    }

    /// `steps` steps under load, in which members crash and restart, one is partitioned now
    /// and then, and live members truncate at random points near (sometimes past) their
    /// committed index.
    fn churn(&mut self, steps: u64, tag: &str) {
        for step in 0..steps {
            let members = self.members.clone();
            let id = members[self.rng.random_range(0..members.len())];
            let roll = self.rng.random_range(0..100);
            if self.is_up(id) {
                if roll < 55 {
                    self.propose_on_leader(tag);
                } else if roll < 62 {
                    let committed = self.committed(id);
                    let up_to = committed.saturating_sub(self.rng.random_range(0..20))
                        + self.rng.random_range(0..2);
                    if up_to > 0 {
                        self.truncate(id, up_to);
                    }
                } else if roll == 62 && step % 2 == 0 {
                    self.crash(id);
                }
            } else if roll < 10 {
                self.start(id);
            }
            if self.isolated.is_none() && roll == 99 {
                self.isolated = Some(id);
            } else if self.isolated.is_some() && roll >= 95 {
                self.isolated = None;
            }
            self.step();
        }
    }

    /// Steps with load until replica `id` has committed as far as the leader.
    fn catch_up(&mut self, id: u64, what: &str) {
        for step in 0..600u64 {
            if step % 3 == 0 {
                self.propose_on_leader(what);
            }
            self.step();
            if let Some(leader) = self.leader()
                && self.committed(id) >= self.committed(leader)
            {
                return;
            }
        }
        panic!("seed {}: {what}: {id} never caught up", self.seed);
    }

    /// Asserts that replica `id` holds a snapshot another replica's application made.
    fn assert_caught_up_from_a_snapshot(&self, id: u64) -> Snapshot {
        let snapshot = self
            .snapshot_of(id)
            .unwrap_or_else(|| panic!("seed {}: {id} caught up without a snapshot", self.seed));
        let text = String::from_utf8_lossy(&snapshot.data).into_owned();
        assert!(
            !text.starts_with(&format!("replica {id} ")),
            "seed {}: {id} holds its own snapshot {text:?}",
            self.seed
        );
        snapshot
    }
}

#[test]
fn lagging_and_new_replicas_catch_up_from_snapshots_under_faults() {
    for seed in seeds(800..806) {
        println!("snapshots_under_faults: seed {seed} (replay with LUNA_SEED={seed})");
        let mut sim = Sim::with_spares(seed, 3, 1);
        sim.drop_rate = 0.05;
        sim.dup_rate = 0.05;
        sim.max_delay = 3;
        sim.defer_sync_rate = 0.3;
        sim.run_until_leader(300);
        sim.churn(250, "warm");

        // A partitioned follower falls behind a compaction of every other replica.
        sim.isolated = None;
        for id in 1..=3 {
            if !sim.is_up(id) {
                sim.start(id);
            }
        }
        let leader = sim.run_until_leader(500);
        let lagging = (1..=3).find(|&id| id != leader).expect("a follower");
        sim.isolated = Some(lagging);
        for _ in 0..60 {
            sim.propose_on_leader("partitioned");
            sim.step();
        }
        let others: Vec<u64> = (1..=3).filter(|&id| id != lagging).collect();
        for _ in 0..300 {
            let commits: Vec<u64> = others.iter().map(|&id| sim.committed(id)).collect();
            if commits[0] == commits[1] && sim.appends.is_empty() {
                break;
            }
            sim.step();
        }
        for &id in &others {
            let committed = sim.committed(id);
            sim.truncate(id, committed);
        }
        sim.isolated = None;
        sim.catch_up(lagging, "healed");
        let snapshot = sim.assert_caught_up_from_a_snapshot(lagging);
        println!(
            "seed {seed}: {lagging} caught up from the snapshot at {}",
            snapshot.index
        );

        // A replica that joins after the compaction starts from a snapshot too.
        sim.start(4);
        sim.members.push(4);
        sim.admin("add learner", |s| {
            s.change_membership(STREAM, &[1, 2, 3], &[4])
        });
        sim.catch_up(4, "joined");
        let snapshot = sim.assert_caught_up_from_a_snapshot(4);
        println!(
            "seed {seed}: 4 joined from the snapshot at {}",
            snapshot.index
        );
        sim.admin("promote", |s| {
            s.change_membership(STREAM, &[1, 2, 3, 4], &[])
        });

        sim.churn(250, "after");
        sim.heal_and_verify();
        println!(
            "seed {seed}: {} appends acknowledged, {} snapshots given",
            sim.acked.len(),
            sim.snapshots.len()
        );
    }
}

#[test]
fn restart_after_compaction_recovers_the_snapshot_and_first_index() {
    let seed = seeds(900..901)[0];
    println!("restart_after_compaction: seed {seed}");
    let mut sim = Sim::new(seed, 3);
    let leader = with_thirty_acknowledged(&mut sim);
    let (_, log) = sim.log(leader, 20);
    let term_of_20 = log.last().map(|e| e.term);
    for id in 1..=3 {
        sim.truncate(id, 20);
    }
    let before: Vec<_> = (1..=3).map(|id| sim.snapshot_of(id)).collect();
    for (id, snapshot) in (1..=3).zip(&before) {
        let snapshot = snapshot.as_ref().expect("a snapshot");
        assert_eq!(snapshot.index, 20, "seed {seed}: replica {id}");
        assert_eq!(Some(snapshot.term), term_of_20, "seed {seed}: replica {id}");
        assert_eq!(
            sim.first_index_of(id),
            Some(21),
            "seed {seed}: replica {id}"
        );
    }
    // Below the snapshot nothing changes; past the committed index is refused.
    sim.truncate(leader, 10);
    sim.truncate(leader, 1_000);
    assert_eq!(sim.snapshot_of(leader), before[leader as usize - 1]);
    for id in 1..=3 {
        sim.crash(id);
    }
    for id in 1..=3 {
        sim.start(id);
        assert_eq!(sim.snapshot_of(id), before[id as usize - 1], "seed {seed}");
        assert_eq!(
            sim.first_index_of(id),
            Some(21),
            "seed {seed}: replica {id}"
        );
        assert!(sim.committed(id) >= 20, "seed {seed}: replica {id}");
    }
    sim.heal_and_verify();
}

/// Runs ready rounds of a lone server until it has nothing left to do.
fn drain(server: &mut Server) {
    loop {
        server.ready().expect("ready");
        let Some(mut round) = server.take_sync() else {
            return;
        };
        // A lone server: no peer waits for the messages.
        sync(&server.engine(), &mut round).expect("fsync");
        server.finish_sync(round);
    }
}

/// A lone voter's server on `dir`, with small raft-engine files, leading its stream.
fn lone_leader(dir: &std::path::Path) -> Server {
    let mut config = RaftConfig::new(1, dir);
    config.engine_file_size = 64 << 10;
    config.engine_purge_threshold = 256 << 10;
    let mut server = Server::open(config).expect("open");
    server.add_stream(STREAM, &[1]).expect("add stream");
    let leadership = server.watch_leadership(STREAM).expect("stream");
    for _ in 0..100 {
        server.tick();
        drain(&mut server);
        if leadership.borrow().is_leader {
            break;
        }
    }
    assert!(leadership.borrow().is_leader, "a lone voter leads");
    server
}

#[test]
fn a_truncation_is_answered_once_its_round_is_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = lone_leader(dir.path());
    let appended: Vec<_> = (0..20)
        .map(|i| server.propose(STREAM, Bytes::from(format!("entry-{i}"))))
        .collect();
    drain(&mut server);
    for mut answer in appended {
        assert!(matches!(answer.try_recv(), Ok(Ok(_))), "an append failed");
    }
    let mut lost = server.truncate(STREAM, 15, Bytes::from_static(b"at 15"));
    // Staged, not written: a crash now keeps the whole log, and the answer never came.
    assert!(matches!(lost.try_recv(), Err(TryRecvError::Empty)));
    assert_eq!(
        server.first_index(STREAM),
        Some(16),
        "raft reads past the cut"
    );
    drop(server);
    assert!(matches!(lost.try_recv(), Err(TryRecvError::Closed)));
    let mut server = lone_leader(dir.path());
    assert_eq!(server.snapshot(STREAM), None);
    assert_eq!(server.first_index(STREAM), Some(1));
    let mut truncated = server.truncate(STREAM, 15, Bytes::from_static(b"at 15"));
    // Below the staged cut: nothing to write, but answered only with it.
    let mut below = server.truncate(STREAM, 10, Bytes::from_static(b"at 10"));
    assert!(matches!(below.try_recv(), Err(TryRecvError::Empty)));
    drain(&mut server);
    assert!(matches!(truncated.try_recv(), Ok(Ok(()))));
    assert!(matches!(below.try_recv(), Ok(Ok(()))));
    drop(server);
    let server = lone_leader(dir.path());
    assert_eq!(server.first_index(STREAM), Some(16));
    let snapshot = server.snapshot(STREAM).expect("the snapshot is durable");
    assert_eq!(
        (snapshot.index, snapshot.data),
        (15, Bytes::from_static(b"at 15"))
    );
}

#[test]
fn compaction_reclaims_log_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = lone_leader(dir.path());
    // Incompressible entries, so the log really takes the space.
    let mut rng = SmallRng::seed_from_u64(1);
    let mut answers = Vec::new();
    for i in 0..3000 {
        let mut data = vec![0u8; 1024];
        rng.fill_bytes(&mut data);
        answers.push(server.propose(STREAM, Bytes::from(data)));
        if i % 50 == 0 {
            drain(&mut server);
        }
    }
    drain(&mut server);
    for mut answer in answers {
        assert!(matches!(answer.try_recv(), Ok(Ok(_))), "an append failed");
    }
    let committed = *server.watch_committed(STREAM).expect("stream").borrow();
    assert!(committed >= 3000, "committed {committed}");
    let (used, disk) = (server.engine().get_used_size(), dir_bytes(dir.path()));
    let mut truncated = server.truncate(
        STREAM,
        committed,
        Bytes::from_static(b"everything is flushed"),
    );
    drain(&mut server);
    assert!(matches!(truncated.try_recv(), Ok(Ok(()))), "truncate");
    let (used_after, disk_after) = (server.engine().get_used_size(), dir_bytes(dir.path()));
    println!("log files: {used} -> {used_after} bytes in use, {disk} -> {disk_after} on disk");
    assert!(used_after * 2 < used, "{used} -> {used_after} bytes in use");
    assert!(
        disk_after * 4 < disk * 3,
        "{disk} -> {disk_after} bytes on disk"
    );
    assert_eq!(server.first_index(STREAM), Some(committed + 1));
    // The stream goes on after it.
    let mut answer = server.propose(STREAM, Bytes::from_static(b"next"));
    drain(&mut server);
    let next = answer.try_recv();
    assert!(matches!(next, Ok(Ok(i)) if i == committed + 1), "{next:?}");
}

#[test]
fn a_deposed_leader_drops_its_uncommitted_tail_when_it_installs_a_snapshot() {
    let seed = seeds(1000..1001)[0];
    println!("deposed_leader_snapshot: seed {seed}");
    let mut sim = Sim::new(seed, 3);
    let old = sim.run_until_leader(300);
    for i in 0..20 {
        sim.propose(old, Bytes::from(format!("entry-{i}")));
    }
    for _ in 0..10 {
        sim.step();
    }
    // Cut off, the old leader grows a tail that never commits.
    sim.isolated = Some(old);
    for i in 0..30 {
        sim.propose(old, Bytes::from(format!("lost-{i}")));
    }
    let new = (0..500)
        .find_map(|_| {
            sim.step();
            sim.leader().filter(|&id| id != old)
        })
        .expect("a new leader");
    for i in 0..5 {
        sim.propose(new, Bytes::from(format!("new-{i}")));
    }
    for _ in 0..20 {
        sim.step();
    }
    let others: Vec<u64> = (1..=3).filter(|&id| id != old).collect();
    for &id in &others {
        let committed = sim.committed(id);
        sim.truncate(id, committed);
    }
    let snapshot = sim.snapshot_of(new).expect("a snapshot");
    sim.isolated = None;
    for _ in 0..200 {
        sim.step();
        if sim.snapshot_of(old).is_some() {
            break;
        }
    }
    assert_eq!(sim.snapshot_of(old).map(|s| s.index), Some(snapshot.index));
    // Nothing of the lost tail survives the snapshot.
    let after = snapshot.index + 1;
    let held = sim
        .host(old)
        .with(move |s| s.read(STREAM, after, after).unwrap_or_default());
    assert!(
        held.is_empty(),
        "seed {seed}: kept {held:?} after the snapshot"
    );
    sim.heal_and_verify();
}

#[test]
fn a_snapshot_holds_the_configuration_of_its_own_index() {
    let seed = seeds(1100..1101)[0];
    println!("snapshot_configuration: seed {seed}");
    let mut sim = Sim::with_spares(seed, 3, 1);
    let leader = sim.run_until_leader(300);
    for i in 0..10 {
        sim.propose(leader, Bytes::from(format!("entry-{i}")));
    }
    for _ in 0..10 {
        sim.step();
    }
    let before_change = sim.committed(leader);
    sim.start(4);
    sim.members.push(4);
    let added = sim.admin("add learner", |s| {
        s.change_membership(STREAM, &[1, 2, 3], &[4])
    });
    assert!(added > before_change, "seed {seed}");
    // The application snapshots an index before the change: the snapshot must not claim
    // 4 already replicated there, or replaying the change would apply it twice.
    for id in 1..=3 {
        sim.truncate(id, before_change);
    }
    let conf_state = |sim: &Sim, id: u64| {
        sim.host(id).with(|s| {
            let replica = s.streams.get(&STREAM).expect("stream");
            let meta = replica.node.store().snapshot_ref().get_metadata().clone();
            (
                meta.index,
                Membership::from_conf_state(meta.get_conf_state()),
            )
        })
    };
    for id in 1..=3 {
        let (index, membership) = conf_state(&sim, id);
        assert_eq!(index, before_change, "seed {seed}: replica {id}");
        assert_eq!(membership.voters, [1, 2, 3], "seed {seed}: replica {id}");
        assert_eq!(membership.learners, [0u64; 0], "seed {seed}: replica {id}");
    }
    // After the change, a later snapshot holds it.
    let later = sim.committed(leader);
    sim.truncate(leader, later);
    let (_, membership) = conf_state(&sim, leader);
    assert_eq!(membership.learners, [4], "seed {seed}");
    sim.heal_and_verify();
}
