use luna_proto::masterlog::Server;

use super::*;

fn invalid_message<T: std::fmt::Debug>(result: Result<T, MasterError>) -> String {
    match result {
        Err(MasterError::InvalidArgument { message }) => message,
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

#[test]
fn names_are_checked() {
    assert!(validate_name("database", "orders_2024-v1.x").is_ok());
    assert!(validate_name("database", &"a".repeat(64)).is_ok());
    for bad in ["", "has space", "slash/y", "é", &"a".repeat(65)] {
        let message = invalid_message(validate_name("database", bad));
        assert!(message.contains("1 to 64 characters"), "{message}");
    }
}

#[test]
fn hash_ranges_cover_the_key_space_without_gaps() {
    let ranges = tablet_ranges(Partitioning::Hash, 8, &[], 4).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ranges.len(), 8);
    assert!(ranges[0].start.is_empty());
    assert_eq!(ranges[7].end, None);
    for pair in ranges.windows(2) {
        assert_eq!(pair[0].end.as_ref(), Some(&pair[1].start));
        assert!(pair[0].start < pair[1].start);
    }
    let default = tablet_ranges(Partitioning::Hash, 0, &[], 4).unwrap_or_default();
    assert_eq!(default.len(), 4);
    invalid_message(tablet_ranges(Partitioning::Hash, 4097, &[], 4));
    invalid_message(tablet_ranges(Partitioning::Hash, 2, &[b"k".to_vec()], 4));
}

#[test]
fn range_collections_need_split_keys_to_have_several_tablets() {
    let one = tablet_ranges(Partitioning::Range, 0, &[], 4).unwrap_or_default();
    assert_eq!(
        one,
        vec![KeyRange {
            start: vec![],
            end: None
        }]
    );
    let message = invalid_message(tablet_ranges(Partitioning::Range, 4, &[], 4));
    assert!(message.contains("split_keys"), "{message}");
    let keys = vec![b"g".to_vec(), b"p".to_vec()];
    let ranges = tablet_ranges(Partitioning::Range, 0, &keys, 4).unwrap_or_default();
    assert_eq!(ranges.len(), 3);
    assert_eq!(ranges[1].start, b"g");
    assert_eq!(ranges[1].end.as_deref(), Some(&b"p"[..]));
    assert!(tablet_ranges(Partitioning::Range, 3, &keys, 4).is_ok());
    invalid_message(tablet_ranges(Partitioning::Range, 5, &keys, 4));
    let message = invalid_message(tablet_ranges(
        Partitioning::Range,
        0,
        &[b"p".to_vec(), b"g".to_vec()],
        4,
    ));
    assert!(message.contains("strictly increasing"), "{message}");
    invalid_message(tablet_ranges(
        Partitioning::Range,
        0,
        &[b"g".to_vec(), b"g".to_vec()],
        4,
    ));
    invalid_message(tablet_ranges(Partitioning::Range, 0, &[Vec::new()], 4));
}

fn universe() -> State {
    let mut state = State::default();
    for id in 1..=3 {
        state.servers.insert(
            id,
            Server {
                id,
                ..Server::default()
            },
        );
    }
    state.next_id = 4;
    let create = create_database(&state, "db", 5).unwrap_or_else(|e| panic!("{e}"));
    state.apply(1, &create).unwrap_or_else(|e| panic!("{e}"));
    state
}

fn request(name: &str) -> CreateCollectionRequest {
    CreateCollectionRequest {
        database: "db".into(),
        name: name.into(),
        partitioning: Partitioning::Hash as i32,
        tablets: 6,
        split_keys: vec![],
        replication_factor: 0,
    }
}

#[test]
fn create_collection_builds_an_applicable_command() {
    let mut state = universe();
    let config = MasterConfig::default();
    let create = create_collection(&state, &request("c"), &[1, 2, 3], &config, 9)
        .unwrap_or_else(|e| panic!("{e}"));
    state.apply(2, &create).unwrap_or_else(|e| panic!("{e}"));
    let db = find_database(&state, "db")
        .map(|d| d.id)
        .unwrap_or_default();
    let coll = find_collection(&state, "db", "c")
        .cloned()
        .unwrap_or_default();
    assert_eq!(coll.database_id, db);
    assert_eq!(coll.replication_factor, 3);
    assert_eq!(coll.tablet_count, 6);
    assert_eq!(state.tablets_of(coll.id).len(), 6);
    assert_eq!(state.groups.len(), 3);
    assert!(matches!(
        create_collection(&state, &request("c"), &[1, 2, 3], &config, 9),
        Err(MasterError::AlreadyExists { .. })
    ));
    assert!(matches!(
        create_database(&state, "db", 1),
        Err(MasterError::AlreadyExists { .. })
    ));
}

#[test]
fn create_collection_rejects_bad_requests() {
    let state = universe();
    let config = MasterConfig::default();
    let alive = [1, 2, 3];
    let mut bad_db = request("c");
    bad_db.database = "nope".into();
    assert!(matches!(
        create_collection(&state, &bad_db, &alive, &config, 1),
        Err(MasterError::NotFound { .. })
    ));
    let mut bad_rf = request("c");
    bad_rf.replication_factor = 8;
    invalid_message(create_collection(&state, &bad_rf, &alive, &config, 1));
    let mut bad_partitioning = request("c");
    bad_partitioning.partitioning = 7;
    invalid_message(create_collection(
        &state,
        &bad_partitioning,
        &alive,
        &config,
        1,
    ));
    invalid_message(create_collection(
        &state,
        &request("bad name"),
        &alive,
        &config,
        1,
    ));
    assert!(matches!(
        create_collection(&state, &request("c"), &[1, 2], &config, 1),
        Err(MasterError::FailedPrecondition { .. })
    ));
    assert!(matches!(
        drop_collection(&state, "db", "c", 1),
        Err(MasterError::NotFound { .. })
    ));
    assert!(matches!(
        drop_database(&state, "other", 1),
        Err(MasterError::NotFound { .. })
    ));
}
