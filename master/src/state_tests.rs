use luna_proto::master::{KeyRange, Partitioning};
use luna_proto::masterlog::{DropCollection, DropDatabase, GcSafePoint, TsoWindow};

use super::*;

fn command(proposed_ms: u64, kind: Kind) -> Command {
    Command {
        proposed_ms,
        kind: Some(kind),
    }
}

fn register(id: u64, addr: &str) -> Command {
    command(
        1,
        Kind::RegisterServer(RegisterServer {
            id,
            addr: addr.to_owned(),
            raft_addr: format!("{addr}-raft"),
            http_addr: String::new(),
        }),
    )
}

fn create_db(id: u64, name: &str) -> Command {
    command(
        7,
        Kind::CreateDatabase(CreateDatabase {
            id,
            name: name.to_owned(),
        }),
    )
}

/// A collection `id` in database 4 ("db") with tablets `id+1`, `id+2` on a new group
/// `id+3` of servers 1..=3.
fn create_coll(id: u64, name: &str) -> Command {
    let tablet = |tid: u64, start: &[u8], end: Option<&[u8]>| TabletInfo {
        id: tid,
        collection_id: id,
        database_id: 4,
        partitioning: Partitioning::Range as i32,
        range: Some(KeyRange {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
        }),
        epoch: 1,
        group_id: id + 3,
    };
    command(
        9,
        Kind::CreateCollection(CreateCollection {
            collection: Some(CollectionInfo {
                id,
                database_id: 4,
                database: "db".into(),
                name: name.into(),
                partitioning: Partitioning::Range as i32,
                replication_factor: 3,
                created_ms: 9,
                tablet_count: 2,
            }),
            tablets: vec![tablet(id + 2, b"m", None), tablet(id + 1, b"", Some(b"m"))],
            new_groups: vec![Group {
                id: id + 3,
                replicas: vec![2, 3, 1],
                ..Group::default()
            }],
        }),
    )
}

/// Servers 1..=3, database 4, collection 5 with tablets 6 and 7 on group 8.
fn log() -> Vec<Command> {
    vec![
        register(1, "a:1"),
        register(2, "b:1"),
        register(3, "c:1"),
        create_db(4, "db"),
        create_coll(5, "c"),
        command(10, Kind::TsoWindow(TsoWindow { limit: 1000 })),
    ]
}

fn replay(commands: &[Command]) -> (State, Vec<Result<Applied, MasterError>>) {
    let mut state = State::default();
    let results = commands
        .iter()
        .enumerate()
        .map(|(i, c)| state.apply(i as u64 + 1, c))
        .collect();
    (state, results)
}

#[test]
fn a_log_builds_the_catalog() {
    let (state, results) = replay(&log());
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(state.applied_index, 6);
    assert_eq!(state.next_id, 9);
    assert_eq!(state.database_named("db").map(|d| d.created_ms), Some(7));
    let tablets: Vec<u64> = state.tablets_of(5).iter().map(|t| t.id).collect();
    assert_eq!(
        tablets,
        vec![6, 7],
        "routing-key order, not id order of the log"
    );
    assert_eq!(state.tablet_counts().get(&8), Some(&2));
    assert_eq!(state.tso_limit, 1000);
}

#[test]
fn replaying_the_same_log_gives_the_same_state() {
    let mut commands = log();
    commands.push(create_db(4, "dup-id"));
    commands.push(command(11, Kind::DropCollection(DropCollection { id: 5 })));
    let (first, first_results) = replay(&commands);
    let (second, second_results) = replay(&commands);
    assert_eq!(first, second);
    assert_eq!(first.snapshot(), second.snapshot());
    assert_eq!(
        format!("{first_results:?}"),
        format!("{second_results:?}"),
        "rejections are deterministic too"
    );
    assert_eq!(State::from_snapshot(first.snapshot()), first);
}

#[test]
fn rejected_commands_leave_the_state_untouched() {
    let (mut state, _) = replay(&log());
    let before = state.clone();
    // Duplicate name, reused id, unknown database, unknown group server.
    for (i, bad) in [
        create_db(20, "db"),
        create_db(3, "other"),
        command(1, Kind::DropDatabase(DropDatabase { id: 99 })),
        create_coll(5, "again"),
    ]
    .iter()
    .enumerate()
    {
        let index = 10 + i as u64;
        assert!(state.apply(index, bad).is_err(), "{bad:?} was accepted");
        assert_eq!(state.applied_index, index);
        state.applied_index = before.applied_index;
        assert_eq!(state, before);
    }
    let mut other = before.clone();
    let mut coll = create_coll(30, "x");
    if let Some(Kind::CreateCollection(c)) = &mut coll.kind {
        c.new_groups[0].replicas = vec![1, 1, 2];
    }
    assert!(matches!(
        other.apply(20, &coll),
        Err(MasterError::InvalidArgument { .. })
    ));
    other.applied_index = before.applied_index;
    assert_eq!(other, before);
}

#[test]
fn dropping_a_database_drops_its_collections_and_tablets() {
    let mut commands = log();
    commands.push(command(1, Kind::DropDatabase(DropDatabase { id: 4 })));
    let (state, results) = replay(&commands);
    assert!(results.iter().all(Result::is_ok));
    assert!(state.databases.is_empty());
    assert!(state.collections.is_empty());
    assert!(state.tablets.is_empty());
    // Groups are a pool shared by collections: they stay.
    assert_eq!(state.groups.len(), 1);
    // Ids are never reused.
    let (mut state, _) = (state, ());
    assert!(state.apply(20, &create_db(4, "db")).is_err());
    assert!(state.apply(21, &create_db(9, "db")).is_ok());
}

#[test]
fn servers_update_addresses_and_the_tso_limit_never_drops() {
    let (mut state, _) = replay(&log());
    let same = state.apply(10, &register(2, "b:1"));
    assert_eq!(same.ok().map(|a| a.routing_changed), Some(false));
    let moved = state.apply(11, &register(2, "b:2"));
    assert_eq!(moved.ok().map(|a| a.routing_changed), Some(true));
    assert_eq!(state.servers.get(&2).map(|s| s.addr.as_str()), Some("b:2"));
    let lower = command(1, Kind::TsoWindow(TsoWindow { limit: 10 }));
    assert!(state.apply(12, &lower).is_ok());
    assert_eq!(state.tso_limit, 1000);
    let empty = Command {
        proposed_ms: 1,
        kind: None,
    };
    assert!(state.apply(13, &empty).is_err());
}

#[test]
fn a_preferred_leader_moves_to_the_front_and_bad_ones_are_refused() {
    use luna_proto::masterlog::SetPreferredLeader;
    let prefer = |group_id, server_id| {
        command(
            11,
            Kind::SetPreferredLeader(SetPreferredLeader {
                group_id,
                server_id,
                pin: true,
            }),
        )
    };
    let (mut state, _) = replay(&log());
    assert!(state.apply(20, &prefer(8, 1)).is_ok());
    assert_eq!(state.groups[&8].replicas, [1, 2, 3]);
    assert!(state.apply(21, &prefer(8, 3)).is_ok());
    assert_eq!(
        state.groups[&8].replicas,
        [3, 1, 2],
        "the others keep their order"
    );
    let before = state.snapshot();
    assert!(matches!(
        state.apply(22, &prefer(8, 9)),
        Err(MasterError::InvalidArgument { .. })
    ));
    assert!(matches!(
        state.apply(23, &prefer(99, 1)),
        Err(MasterError::NotFound { .. })
    ));
    let mut after = state.snapshot();
    after.applied_index = before.applied_index;
    assert_eq!(after, before, "a refused command changes nothing");
}

#[test]
fn a_move_replaces_the_replica_keeps_the_source_hosting_and_ends_once() {
    use luna_proto::masterlog::{EndMove, MoveReplica};
    let start_for = |from, to, reason: &str| {
        command(
            30,
            Kind::MoveReplica(MoveReplica {
                group_id: 8,
                from,
                to,
                reason: reason.into(),
            }),
        )
    };
    let start = |from, to| start_for(from, to, "repair");
    let end = |to| command(31, Kind::EndMove(EndMove { group_id: 8, to }));
    let mut commands = log();
    commands.push(register(20, "d:1"));
    commands.push(register(21, "e:1"));
    let (mut state, _) = replay(&commands);
    assert!(state.apply(40, &start(3, 20)).is_ok());
    let group = &state.groups[&8];
    assert_eq!(
        group.replicas,
        [2, 20, 1],
        "the target takes the source's place"
    );
    assert_eq!(
        group.initial_voters,
        [2, 3, 1],
        "the stream's first voters stay known"
    );
    assert!(State::hosts(group, 3) && State::hosts(group, 20));
    // One move per group; a second one is refused, and so is a move onto a replica.
    assert!(matches!(
        state.apply(41, &start(2, 21)),
        Err(MasterError::FailedPrecondition { .. })
    ));
    assert!(matches!(
        state.apply(42, &start(2, 1)),
        Err(MasterError::AlreadyExists { .. })
    ));
    // The target failed: the move is retargeted, and its source still hosts.
    assert!(state.apply(43, &start(20, 21)).is_ok());
    let group = &state.groups[&8];
    assert_eq!(group.replicas, [2, 21, 1]);
    assert_eq!(group.moving.as_ref().map(|m| m.from_server_id), Some(3));
    assert!(!State::hosts(group, 20));
    // Ending the old target's move is stale; the new one ends it.
    assert!(state.apply(44, &end(20)).is_err());
    assert!(state.apply(45, &end(21)).is_ok());
    assert!(state.groups[&8].moving.is_none());
    assert!(!State::hosts(&state.groups[&8], 3));
    assert!(state.apply(46, &end(21)).is_err(), "a move ends once");
    assert!(
        !state.groups[&8].replicas_pinned,
        "the driver's moves leave it to the driver"
    );
    // An operator's move pins the group's replicas against balancing.
    assert!(state.apply(47, &start_for(21, 3, "admin")).is_ok());
    assert!(state.groups[&8].replicas_pinned);
    // It survives a snapshot.
    let restored = State::from_snapshot(state.snapshot());
    assert_eq!(restored, state);
}

#[test]
fn the_gc_safe_point_never_goes_down_and_survives_a_snapshot() {
    let raise = |ts| command(1, Kind::GcSafePoint(GcSafePoint { ts }));
    let (state, results) = replay(&[raise(500), raise(300), raise(700)]);
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(state.gc_safe_point, 700);
    let (state, _) = replay(&[raise(900), raise(800)]);
    assert_eq!(
        state.gc_safe_point, 900,
        "a stale proposal does not lower it"
    );
    assert_eq!(State::from_snapshot(state.snapshot()).gc_safe_point, 900);
}

#[test]
fn a_tablet_move_switches_once_and_the_old_group_keeps_its_copy_until_the_end() {
    use luna_proto::masterlog::{EndTabletMove, StartTabletMove, SwitchTablet};
    let start = |tablet_id, to_group| {
        command(
            20,
            Kind::StartTabletMove(StartTabletMove {
                tablet_id,
                to_group,
                reason: "admin".into(),
            }),
        )
    };
    let switch = command(21, Kind::SwitchTablet(SwitchTablet { tablet_id: 6 }));
    let end = command(22, Kind::EndTabletMove(EndTabletMove { tablet_id: 6 }));
    // Collection 5's tablets 6 and 7 are on group 8; collection 9's are on group 12.
    let mut commands = log();
    commands.push(create_coll(9, "d"));
    commands.push(start(6, 12));
    let (mut state, results) = replay(&commands);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let ids = |tablets: &[TabletInfo]| tablets.iter().map(|t| (t.id, t.epoch)).collect::<Vec<_>>();
    assert_eq!(ids(&state.assigned_tablets(8).0), [(6, 1), (7, 1)]);
    assert!(state.assigned_tablets(12).1.is_empty());

    // A second move of the same tablet, a move in place, and one to nowhere are refused.
    for refused in [start(6, 8), start(7, 8), start(7, 99)] {
        let before = state.clone();
        assert!(state.apply(100, &refused).is_err());
        assert_eq!(state.tablets, before.tablets);
        assert_eq!(state.tablet_moves, before.tablet_moves);
    }

    state.apply(101, &switch).expect("switch");
    assert!(state.apply(102, &switch).is_err(), "switched twice");
    let moved = &state.tablets[&6];
    assert_eq!((moved.group_id, moved.epoch), (12, 2));
    // The old group keeps its sealed copy at the old epoch; the new one adopts it.
    assert_eq!(ids(&state.assigned_tablets(8).0), [(6, 1), (7, 1)]);
    assert_eq!(state.assigned_tablets(8).0[0].group_id, 8);
    assert_eq!(state.assigned_tablets(12).1, [6]);
    assert!(!ids(&state.assigned_tablets(12).0).contains(&(6, 2)));
    assert_eq!(State::from_snapshot(state.snapshot()), state);

    state.apply(103, &end).expect("end");
    assert!(state.apply(104, &end).is_err(), "ended twice");
    assert_eq!(ids(&state.assigned_tablets(8).0), [(7, 1)]);
    assert!(ids(&state.assigned_tablets(12).0).contains(&(6, 2)));
    assert!(state.assigned_tablets(12).1.is_empty());

    // Dropping the collection forgets a move under way.
    state.apply(105, &start(7, 12)).expect("start");
    let drop = command(23, Kind::DropCollection(DropCollection { id: 5 }));
    state.apply(106, &drop).expect("drop");
    assert!(state.tablet_moves.is_empty());
}

#[test]
fn a_split_keeps_the_tablet_until_it_ends_and_then_routes_both_halves() {
    use luna_proto::masterlog::{EndTabletSplit, StartTabletSplit};
    let start = |tablet_id, new_tablet_id, at: &[u8]| {
        command(
            30,
            Kind::StartTabletSplit(StartTabletSplit {
                tablet_id,
                new_tablet_id,
                at: at.to_vec(),
                reason: "admin".into(),
            }),
        )
    };
    let end = |done, at: &[u8]| {
        command(
            31,
            Kind::EndTabletSplit(EndTabletSplit {
                tablet_id: 6,
                done,
                at: at.to_vec(),
            }),
        )
    };
    // Tablet 6 is ["", m) and 7 is [m, end), both on group 8; ids up to 8 are taken.
    let (mut state, results) = replay(&log());
    assert!(results.iter().all(Result::is_ok));
    for refused in [
        start(6, 9, b"m"),
        start(6, 9, b"z"),
        start(6, 5, b"c"),
        start(99, 9, b"c"),
    ] {
        assert!(state.apply(100, &refused).is_err(), "{refused:?}");
    }
    state.apply(101, &start(6, 9, b"")).expect("start");
    assert!(
        state.apply(102, &start(6, 10, b"c")).is_err(),
        "split twice"
    );
    assert_eq!(state.next_id, 10);
    // The group keeps the tablet at its epoch, and leaves the right half alone.
    let (hosted, adopting) = state.assigned_tablets(8);
    assert_eq!(
        hosted.iter().map(|t| (t.id, t.epoch)).collect::<Vec<_>>(),
        [(6, 1), (7, 1)]
    );
    assert_eq!(adopting, [9]);
    assert!(
        state.apply(103, &end(true, b"q")).is_err(),
        "outside the tablet"
    );
    assert_eq!(State::from_snapshot(state.snapshot()), state);

    state.apply(104, &end(true, b"c")).expect("end");
    let (left, right) = (&state.tablets[&6], &state.tablets[&9]);
    assert_eq!(left.range.as_ref().unwrap().end.as_deref(), Some(&b"c"[..]));
    assert_eq!(right.range.as_ref().unwrap().start, b"c");
    assert_eq!(
        right.range.as_ref().unwrap().end.as_deref(),
        Some(&b"m"[..])
    );
    assert_eq!((left.epoch, right.epoch, right.group_id), (2, 2, 8));
    assert_eq!(state.collections[&5].tablet_count, 3);
    assert_eq!(state.assigned_tablets(8).0.len(), 3);

    // A cancelled split changes nothing but ends.
    state.apply(105, &start(6, 10, b"")).expect("start again");
    state.apply(106, &end(false, b"")).expect("cancel");
    assert_eq!(state.tablets.len(), 3);
    assert!(state.tablet_splits.is_empty());
}
