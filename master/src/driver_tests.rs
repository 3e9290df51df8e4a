use luna_proto::master::ReplicaMove;
use luna_proto::masterlog::Server;

use super::*;

/// A state with servers `1..=servers` and the given groups (replica lists), ids from 100.
fn state(servers: u64, groups: &[&[u64]]) -> State {
    let mut state = State::default();
    for id in 1..=servers {
        state.servers.insert(
            id,
            Server {
                id,
                ..Server::default()
            },
        );
    }
    for (i, replicas) in groups.iter().enumerate() {
        let id = 100 + i as u64;
        state.groups.insert(
            id,
            Group {
                id,
                replicas: replicas.to_vec(),
                ..Group::default()
            },
        );
    }
    state
}

fn live(alive: &[u64], lost: &[u64]) -> Liveness {
    Liveness {
        alive: alive.iter().copied().collect(),
        lost: lost.iter().copied().collect(),
        group_load: BTreeMap::new(),
        disk_behind: BTreeSet::new(),
    }
}

/// Group `group_id` moving its replica on `from` to `to`, as `MoveReplica` leaves it.
fn moving(state: &mut State, group_id: u64, from: u64, to: u64) {
    if let Some(group) = state.groups.get_mut(&group_id) {
        for replica in &mut group.replicas {
            if *replica == from {
                *replica = to;
            }
        }
        group.moving = Some(ReplicaMove {
            from_server_id: from,
            to_server_id: to,
            ..ReplicaMove::default()
        });
    }
}

#[test]
fn a_lost_servers_replicas_go_to_the_emptiest_live_server() {
    // Server 4 hosts one group, server 5 none: 5 gets the lost replica.
    let state = state(5, &[&[1, 2, 3], &[1, 2, 4]]);
    let step = next_step(&state, &live(&[2, 3, 4, 5], &[1]), 2);
    assert_eq!(
        step,
        Some(Step::Move {
            group_id: 100,
            from: 1,
            to: 5,
            reason: "repair"
        })
    );
}

#[test]
fn a_server_that_is_only_down_is_not_replaced_yet() {
    let state = state(4, &[&[1, 2, 3]]);
    // Server 1 missed heartbeats but is not lost: nothing moves (4 would balance, but the
    // group is not healthy).
    assert_eq!(next_step(&state, &live(&[2, 3, 4], &[]), 2), None);
}

#[test]
fn moves_wait_for_the_rate_limit_but_a_lost_target_is_retargeted() {
    let mut state = state(6, &[&[1, 2, 3], &[1, 2, 3], &[1, 2, 3]]);
    // Group 100 moves 1 -> 4 and group 101 moves 1 -> 5: two moves, the limit.
    moving(&mut state, 100, 1, 4);
    moving(&mut state, 101, 1, 5);
    // Group 102 also needs repair, but waits.
    assert_eq!(next_step(&state, &live(&[2, 3, 4, 5, 6], &[1]), 2), None);
    // Server 5 is lost too: group 101's move is retargeted to 6 at once.
    let step = next_step(&state, &live(&[2, 3, 4, 6], &[1, 5]), 2);
    assert_eq!(
        step,
        Some(Step::Move {
            group_id: 101,
            from: 5,
            to: 6,
            reason: "repair"
        })
    );
}

#[test]
fn a_draining_server_is_emptied_and_gets_nothing() {
    let mut state = state(4, &[&[1, 2, 3]]);
    if let Some(server) = state.servers.get_mut(&3) {
        server.draining = true;
    }
    let step = next_step(&state, &live(&[1, 2, 3, 4], &[]), 2);
    assert_eq!(
        step,
        Some(Step::Move {
            group_id: 100,
            from: 3,
            to: 4,
            reason: "drain"
        })
    );
    // With nowhere to go, the replica stays.
    assert_eq!(next_step(&state, &live(&[1, 2, 3], &[]), 2), None);
}

#[test]
fn replicas_and_leaders_are_balanced_across_live_servers() {
    // Servers 1..3 host two groups each and server 4 none: one replica moves to 4.
    let mut state = state(4, &[&[1, 2, 3], &[2, 3, 1]]);
    let step = next_step(&state, &live(&[1, 2, 3, 4], &[]), 2);
    assert_eq!(
        step,
        Some(Step::Move {
            group_id: 100,
            from: 1,
            to: 4,
            reason: "balance"
        })
    );
    // Groups an operator placed are left where they are.
    for group in state.groups.values_mut() {
        group.replicas_pinned = true;
    }
    assert_eq!(next_step(&state, &live(&[1, 2, 3, 4], &[]), 2), None);
    // Leaders: server 1 is the preferred leader of three groups, 2 and 3 of none.
    let mut state = self::state(3, &[&[1, 2, 3], &[1, 3, 2], &[1, 2, 3]]);
    let step = next_step(&state, &live(&[1, 2, 3], &[]), 2);
    assert_eq!(
        step,
        Some(Step::Prefer {
            group_id: 100,
            server_id: 2
        })
    );
    // An operator's pin is left alone.
    for group in state.groups.values_mut() {
        group.leader_pinned = true;
    }
    assert_eq!(next_step(&state, &live(&[1, 2, 3], &[]), 2), None);
}

/// A server whose disk is behind refuses writes in the groups it leads: their preferred
/// leadership goes, one group per step, to a replica whose disk keeps up, before replicas
/// are balanced, and leader balancing gives it none back until its disk catches up.
#[test]
fn a_server_whose_disk_is_behind_hands_its_leaderships_away() {
    // Server 4 has no replica, so replicas are unbalanced too: eviction comes first.
    let mut state = state(4, &[&[1, 2, 3], &[2, 1, 3], &[3, 1, 2], &[1, 3, 2]]);
    let mut live = live(&[1, 2, 3, 4], &[]);
    live.disk_behind = [1].into();
    let mut evicted = Vec::new();
    while let Some(Step::Prefer {
        group_id,
        server_id,
    }) = next_step(&state, &live, 2)
    {
        assert_ne!(server_id, 1);
        let group = state.groups.get_mut(&group_id).expect("group");
        group.replicas.retain(|&s| s != server_id);
        group.replicas.insert(0, server_id);
        evicted.push(group_id);
        assert!(evicted.len() <= 2, "evicted {evicted:?}");
    }
    assert_eq!(evicted, [100, 103]);
    assert!(matches!(
        next_step(&state, &live, 2),
        Some(Step::Move { to: 4, .. })
    ));
    // Then replicas are balanced (server 4 gets one). Server 1 leads nothing now; leader
    // balancing would give it a group, but not while its disk is behind.
    assert_eq!(next_step(&state, &live, 0), None);
    live.disk_behind.clear();
    assert_eq!(
        next_step(&state, &live, 0),
        Some(Step::Prefer {
            group_id: 100,
            server_id: 1
        })
    );
    // An operator's pin keeps the leader even on a slow disk.
    let mut state = self::state(3, &[&[1, 2, 3]]);
    if let Some(group) = state.groups.get_mut(&100) {
        group.leader_pinned = true;
    }
    let mut live = self::live(&[1, 2, 3], &[]);
    live.disk_behind = [1].into();
    assert_eq!(next_step(&state, &live, 2), None);
}

#[test]
fn a_balanced_universe_has_nothing_to_do() {
    let state = state(3, &[&[1, 2, 3], &[2, 3, 1], &[3, 1, 2]]);
    assert_eq!(next_step(&state, &live(&[1, 2, 3], &[]), 2), None);
}

#[test]
fn leadership_moves_from_the_busiest_server_when_loads_differ_enough() {
    // Each server is the preferred leader of two groups; server 1's are busy.
    let groups: [&[u64]; 6] = [
        &[1, 2, 3],
        &[1, 3, 2],
        &[2, 1, 3],
        &[2, 3, 1],
        &[3, 1, 2],
        &[3, 2, 1],
    ];
    let state = state(3, &groups);
    let with_load = |loads: [u64; 6]| {
        let mut live = live(&[1, 2, 3], &[]);
        live.group_load = (100..).zip(loads).collect();
        live
    };
    // Counts would differ by two after any single handover, so nothing moves.
    assert_eq!(
        next_step(&state, &with_load([3000, 3000, 10, 10, 10, 10]), 2),
        None
    );
    // Once server 1 leads a third group, it hands one of its busy groups over.
    let mut state = state;
    state.groups.insert(
        106,
        Group {
            id: 106,
            replicas: vec![1, 2, 3],
            ..Group::default()
        },
    );
    let mut live = with_load([3000, 1000, 10, 10, 10, 10]);
    live.group_load.insert(106, 10);
    assert_eq!(
        next_step(&state, &live, 2),
        Some(Step::Prefer {
            group_id: 101,
            server_id: 2
        }),
        "the group closest to half the gap goes to the idlest server"
    );
    // A small difference, or a pinned group, stays.
    live.group_load.insert(100, 300);
    live.group_load.insert(101, 200);
    assert_eq!(next_step(&state, &live, 2), None);
    live.group_load.insert(100, 3000);
    live.group_load.insert(101, 1000);
    for group in state.groups.values_mut() {
        group.leader_pinned = true;
    }
    assert_eq!(next_step(&state, &live, 2), None);
}

#[test]
fn a_replica_moves_off_the_server_whose_groups_are_busiest() {
    let groups: [&[u64]; 5] = [&[1, 2, 3], &[1, 2, 3], &[1, 4, 2], &[1, 4, 3], &[4, 2, 3]];
    let mut state = state(4, &groups);
    let mut live = live(&[1, 2, 3, 4], &[]);
    live.group_load = (100..).zip([1000, 1000, 10, 10, 10]).collect();
    assert_eq!(
        next_step(&state, &live, 2),
        Some(Step::Move {
            group_id: 100,
            from: 1,
            to: 4,
            reason: "balance"
        })
    );
    // Not a group an operator placed, and not past the rate limit.
    state
        .groups
        .values_mut()
        .for_each(|g| g.replicas_pinned = true);
    assert!(!matches!(
        next_step(&state, &live, 2),
        Some(Step::Move { .. })
    ));
    state
        .groups
        .values_mut()
        .for_each(|g| g.replicas_pinned = false);
    moving(&mut state, 104, 4, 1);
    moving(&mut state, 103, 3, 2);
    assert!(!matches!(
        next_step(&state, &live, 2),
        Some(Step::Move { .. })
    ));
}
