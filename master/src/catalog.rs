//! Catalog requests: validation and the commands the leader proposes for them.
//!
//! Everything here is pure: it reads the applied state and the request and returns a
//! [`Command`] whose ids, placement and timestamps are already decided, so that apply never
//! has to choose anything.

use luna_proto::keys::hash_split_points;
use luna_proto::master::{
    CollectionInfo, CreateCollectionRequest, DatabaseInfo, KeyRange, Partitioning, TabletInfo,
};
use luna_proto::masterlog::command::Kind;
use luna_proto::masterlog::{
    Command, CreateCollection, CreateDatabase, DropCollection, DropDatabase,
};

use crate::config::{MAX_REPLICATION_FACTOR, MAX_TABLETS, MasterConfig};
use crate::error::MasterError;
use crate::placement::{Ids, place};
use crate::state::State;

/// Longest database or collection name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest split key of a range collection.
pub const MAX_SPLIT_KEY_LEN: usize = 4096;

/// Checks a database or collection name: 1..=64 characters of `[A-Za-z0-9_.-]`, so names
/// are safe in URLs, paths and metric labels.
pub(crate) fn validate_name(what: &str, name: &str) -> Result<(), MasterError> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if name.is_empty() || name.len() > MAX_NAME_LEN || !valid_chars {
        return Err(MasterError::invalid(format!(
            "{what} name {name:?} is invalid: use 1 to {MAX_NAME_LEN} characters of A-Z, a-z, \
             0-9, '_', '-' and '.'"
        )));
    }
    Ok(())
}

/// The database named `name`, or NOT_FOUND.
pub(crate) fn find_database<'s>(
    state: &'s State,
    name: &str,
) -> Result<&'s DatabaseInfo, MasterError> {
    state.database_named(name).ok_or_else(|| {
        MasterError::not_found(format!(
            "database {name:?} does not exist; create it first or check the name"
        ))
    })
}

/// The collection `name` of database `database`, or NOT_FOUND.
pub(crate) fn find_collection<'s>(
    state: &'s State,
    database: &str,
    name: &str,
) -> Result<&'s CollectionInfo, MasterError> {
    let db = find_database(state, database)?;
    state.collection_named(db.id, name).ok_or_else(|| {
        MasterError::not_found(format!(
            "collection {name:?} does not exist in database {database:?}; create it first or \
             check the name"
        ))
    })
}

fn command(now_ms: u64, kind: Kind) -> Command {
    Command {
        proposed_ms: now_ms,
        kind: Some(kind),
    }
}

/// The command creating database `name`.
pub(crate) fn create_database(
    state: &State,
    name: &str,
    now_ms: u64,
) -> Result<Command, MasterError> {
    validate_name("database", name)?;
    if state.database_named(name).is_some() {
        return Err(MasterError::exists(format!(
            "database {name:?} already exists; pick another name or drop it first"
        )));
    }
    let id = Ids::new(state).take();
    let kind = Kind::CreateDatabase(CreateDatabase {
        id,
        name: name.to_owned(),
    });
    Ok(command(now_ms, kind))
}

/// The command dropping database `name` with all its collections.
pub(crate) fn drop_database(
    state: &State,
    name: &str,
    now_ms: u64,
) -> Result<Command, MasterError> {
    let id = find_database(state, name)?.id;
    Ok(command(now_ms, Kind::DropDatabase(DropDatabase { id })))
}

/// The command dropping collection `name` of `database`.
pub(crate) fn drop_collection(
    state: &State,
    database: &str,
    name: &str,
    now_ms: u64,
) -> Result<Command, MasterError> {
    let id = find_collection(state, database, name)?.id;
    Ok(command(now_ms, Kind::DropCollection(DropCollection { id })))
}

/// The command creating a collection, placed on the `alive` servers (sorted ids).
pub(crate) fn create_collection(
    state: &State,
    request: &CreateCollectionRequest,
    alive: &[u64],
    config: &MasterConfig,
    now_ms: u64,
) -> Result<Command, MasterError> {
    validate_name("collection", &request.name)?;
    let partitioning = Partitioning::try_from(request.partitioning).map_err(|_| {
        MasterError::invalid(format!(
            "unknown partitioning {}; use RANGE or HASH",
            request.partitioning
        ))
    })?;
    let rf = match request.replication_factor {
        0 => config.default_replication_factor,
        rf if rf <= MAX_REPLICATION_FACTOR => rf,
        rf => {
            return Err(MasterError::invalid(format!(
                "replication factor {rf} is outside 1..={MAX_REPLICATION_FACTOR}"
            )));
        }
    };
    let ranges = tablet_ranges(
        partitioning,
        request.tablets,
        &request.split_keys,
        config.default_hash_tablets,
    )?;
    let database = find_database(state, &request.database)?;
    if state.collection_named(database.id, &request.name).is_some() {
        return Err(MasterError::exists(format!(
            "collection {:?} already exists in database {:?}; pick another name or drop it first",
            request.name, request.database
        )));
    }
    let mut ids = Ids::new(state);
    let collection_id = ids.take();
    let placement = place(
        state,
        alive,
        rf,
        config.groups_per_server,
        ranges.len(),
        &mut ids,
    )?;
    let tablets: Vec<TabletInfo> = ranges
        .into_iter()
        .zip(placement.tablet_groups)
        .map(|(range, group_id)| TabletInfo {
            id: ids.take(),
            collection_id,
            database_id: database.id,
            partitioning: partitioning as i32,
            range: Some(range),
            epoch: 1,
            group_id,
        })
        .collect();
    let collection = CollectionInfo {
        id: collection_id,
        database_id: database.id,
        database: database.name.clone(),
        name: request.name.clone(),
        partitioning: partitioning as i32,
        replication_factor: rf,
        created_ms: now_ms,
        tablet_count: u32::try_from(tablets.len()).unwrap_or(u32::MAX),
    };
    let kind = Kind::CreateCollection(CreateCollection {
        collection: Some(collection),
        tablets,
        new_groups: placement.new_groups,
    });
    Ok(command(now_ms, kind))
}

/// The key ranges of a new collection's tablets, in order, covering the whole key space.
pub(crate) fn tablet_ranges(
    partitioning: Partitioning,
    tablets: u32,
    split_keys: &[Vec<u8>],
    default_hash_tablets: u32,
) -> Result<Vec<KeyRange>, MasterError> {
    let points = match partitioning {
        Partitioning::Hash => {
            if !split_keys.is_empty() {
                return Err(MasterError::invalid(
                    "hash collections are split evenly: give `tablets`, not split_keys",
                ));
            }
            let tablets = if tablets == 0 {
                default_hash_tablets
            } else {
                tablets
            };
            check_tablet_count(tablets)?;
            hash_split_points(tablets)
        }
        Partitioning::Range if split_keys.is_empty() => {
            if tablets > 1 {
                return Err(MasterError::invalid(format!(
                    "a range collection cannot be cut into {tablets} tablets without knowing its \
                     keys: give split_keys (N strictly increasing keys make N+1 tablets), or \
                     use hash partitioning"
                )));
            }
            Vec::new()
        }
        Partitioning::Range => {
            let count = u32::try_from(split_keys.len())
                .unwrap_or(u32::MAX)
                .saturating_add(1);
            if tablets != 0 && tablets != count {
                return Err(MasterError::invalid(format!(
                    "{} split_keys make {count} tablets, but tablets = {tablets}; give one or \
                     the other",
                    split_keys.len()
                )));
            }
            check_tablet_count(count)?;
            check_split_keys(split_keys)?;
            split_keys.to_vec()
        }
    };
    let mut ranges = Vec::with_capacity(points.len() + 1);
    let mut start = Vec::new();
    for point in points {
        ranges.push(KeyRange {
            start: std::mem::replace(&mut start, point.clone()),
            end: Some(point),
        });
    }
    ranges.push(KeyRange { start, end: None });
    Ok(ranges)
}

fn check_tablet_count(tablets: u32) -> Result<(), MasterError> {
    if !(1..=MAX_TABLETS).contains(&tablets) {
        return Err(MasterError::invalid(format!(
            "{tablets} tablets is outside 1..={MAX_TABLETS}; use fewer tablets (they split \
             later as data grows)"
        )));
    }
    Ok(())
}

fn check_split_keys(split_keys: &[Vec<u8>]) -> Result<(), MasterError> {
    if let Some(i) = split_keys
        .iter()
        .position(|k| k.is_empty() || k.len() > MAX_SPLIT_KEY_LEN)
    {
        return Err(MasterError::invalid(format!(
            "split key {i} has {} bytes; split keys must have 1..={MAX_SPLIT_KEY_LEN} bytes",
            split_keys[i].len()
        )));
    }
    if let Some(i) = split_keys.windows(2).position(|pair| pair[0] >= pair[1]) {
        return Err(MasterError::invalid(format!(
            "split keys must be strictly increasing, but key {} is not above key {i}",
            i + 1
        )));
    }
    Ok(())
}

#[cfg(test)]
#[path = "catalog_tests.rs"]
mod tests;
