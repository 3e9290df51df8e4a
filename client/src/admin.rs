//! The administration API: databases, collections, and views of servers, groups, tablets.

use std::sync::Arc;

use bytes::Bytes;
use luna_proto::master::{
    CollectionInfo, CreateCollectionRequest, CreateDatabaseRequest, DatabaseInfo,
    DrainServerRequest, DropCollectionRequest, DropDatabaseRequest, GroupInfo,
    ListCollectionsRequest, ListDatabasesRequest, ListGroupsRequest, ListServersRequest,
    ListTabletsRequest, ListTabletsResponse, MoveReplicaRequest, MoveTabletRequest, Partitioning,
    ServerInfo, SplitTabletRequest, TabletInfo, TabletMove, TabletSplit, TransferLeaderRequest,
};

use crate::Inner;
use crate::collection::checked_routing_key;
use crate::error::{ClientError, Result};
use crate::retry::Deadline;

/// A tablet that moved, as [`Admin::move_tablet`] answers it.
#[derive(Debug, Clone, PartialEq)]
pub struct TabletMoved {
    /// The tablet as routed now: its new group, one epoch up.
    pub tablet: TabletInfo,
    /// What the move wrote or sent besides metadata: the MemStore tail the old group
    /// flushed, and the handoff. 0 if another call drove the move.
    pub bytes_copied: u64,
}

/// The least time a tablet move is given: the master may try to seal the tablet for 30 s
/// before it rolls the move back.
const MOVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How to create a collection: partitioning, initial tablets, replication.
#[derive(Debug, Clone)]
pub struct CollectionSpec {
    partitioning: Partitioning,
    tablets: u32,
    split_keys: Vec<Bytes>,
    replication_factor: u32,
}

impl CollectionSpec {
    /// Range partitioning (the default): tablets own ranges of keys, scans return keys in
    /// order. One tablet unless split keys or a tablet count are given.
    pub fn range() -> Self {
        CollectionSpec {
            partitioning: Partitioning::Range,
            tablets: 0,
            split_keys: Vec::new(),
            replication_factor: 0,
        }
    }

    /// Hash partitioning into `tablets` tablets (0: the universe default): sequential keys
    /// spread over all tablets; scans return keys in hash order.
    pub fn hash(tablets: u32) -> Self {
        CollectionSpec {
            partitioning: Partitioning::Hash,
            tablets,
            ..CollectionSpec::range()
        }
    }

    /// Range collections: start with a tablet boundary at each of `keys` (strictly
    /// increasing), so N keys make N + 1 tablets.
    pub fn split_keys<I, K>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: Into<Bytes>,
    {
        self.split_keys = keys.into_iter().map(Into::into).collect();
        self
    }

    /// Range collections: how many tablets to start with, when not split at keys.
    pub fn tablets(mut self, tablets: u32) -> Self {
        self.tablets = tablets;
        self
    }

    /// Replicas per tablet group; 0 (the default) means the universe default.
    pub fn replication_factor(mut self, replicas: u32) -> Self {
        self.replication_factor = replicas;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.split_keys.is_empty() {
            return Ok(());
        }
        if self.partitioning == Partitioning::Hash {
            return Err(ClientError::invalid(
                "split keys are for range-partitioned collections; give a hash collection a tablet count",
            ));
        }
        if self.tablets != 0 {
            return Err(ClientError::invalid(
                "give either split keys or a tablet count, not both",
            ));
        }
        for key in &self.split_keys {
            checked_routing_key(Partitioning::Range, key)?;
        }
        if self.split_keys.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(ClientError::invalid(
                "split keys must be strictly increasing",
            ));
        }
        Ok(())
    }
}

impl Default for CollectionSpec {
    fn default() -> Self {
        CollectionSpec::range()
    }
}

/// The administration API, from [`Client::admin`](crate::Client::admin). Calls go to the
/// master and are retried on other listed masters and with backoff until the operation
/// deadline. A create whose answer was lost is sent again and may then report
/// [`ClientError::AlreadyExists`].
#[derive(Debug, Clone)]
pub struct Admin {
    inner: Arc<Inner>,
}

impl Admin {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Admin { inner }
    }

    fn deadline(&self) -> Deadline {
        Deadline::after(self.inner.options.operation_timeout)
    }

    /// Creates database `name`; [`ClientError::AlreadyExists`] if it exists.
    pub async fn create_database(&self, name: &str) -> Result<DatabaseInfo> {
        let request = CreateDatabaseRequest {
            name: name.to_string(),
        };
        let response = self
            .inner
            .call_master("CreateDatabase", &self.deadline(), |mut master| {
                let request = request.clone();
                async move { master.create_database(request).await }
            })
            .await?;
        response
            .database
            .ok_or_else(|| ClientError::protocol("CreateDatabase answered without the database"))
    }

    /// Drops database `name` and its collections; [`ClientError::NotFound`] if it does not exist.
    pub async fn drop_database(&self, name: &str) -> Result<()> {
        let request = DropDatabaseRequest {
            name: name.to_string(),
        };
        self.inner
            .call_master("DropDatabase", &self.deadline(), |mut master| {
                let request = request.clone();
                async move { master.drop_database(request).await }
            })
            .await?;
        self.inner.forget_routes(name, None);
        Ok(())
    }

    /// Every database.
    pub async fn list_databases(&self) -> Result<Vec<DatabaseInfo>> {
        let response = self
            .inner
            .call_master("ListDatabases", &self.deadline(), |mut master| async move {
                master.list_databases(ListDatabasesRequest {}).await
            })
            .await?;
        Ok(response.databases)
    }

    /// Creates collection `name` in `database` as `spec` says.
    pub async fn create_collection(
        &self,
        database: &str,
        name: &str,
        spec: CollectionSpec,
    ) -> Result<CollectionInfo> {
        spec.validate()?;
        let request = CreateCollectionRequest {
            database: database.to_string(),
            name: name.to_string(),
            partitioning: spec.partitioning.into(),
            tablets: spec.tablets,
            split_keys: spec.split_keys.iter().map(|key| key.to_vec()).collect(),
            replication_factor: spec.replication_factor,
        };
        let response = self
            .inner
            .call_master("CreateCollection", &self.deadline(), |mut master| {
                let request = request.clone();
                async move { master.create_collection(request).await }
            })
            .await?;
        self.inner.forget_routes(database, Some(name));
        response.collection.ok_or_else(|| {
            ClientError::protocol("CreateCollection answered without the collection")
        })
    }

    /// Drops collection `name` of `database` and its data.
    pub async fn drop_collection(&self, database: &str, name: &str) -> Result<()> {
        let request = DropCollectionRequest {
            database: database.to_string(),
            name: name.to_string(),
        };
        self.inner
            .call_master("DropCollection", &self.deadline(), |mut master| {
                let request = request.clone();
                async move { master.drop_collection(request).await }
            })
            .await?;
        self.inner.forget_routes(database, Some(name));
        Ok(())
    }

    /// The collections of `database`.
    pub async fn list_collections(&self, database: &str) -> Result<Vec<CollectionInfo>> {
        let request = ListCollectionsRequest {
            database: database.to_string(),
        };
        let response = self
            .inner
            .call_master("ListCollections", &self.deadline(), |mut master| {
                let request = request.clone();
                async move { master.list_collections(request).await }
            })
            .await?;
        Ok(response.collections)
    }

    /// Every tablet server the master knows, alive or not.
    pub async fn list_servers(&self) -> Result<Vec<ServerInfo>> {
        let response = self
            .inner
            .call_master("ListServers", &self.deadline(), |mut master| async move {
                master.list_servers(ListServersRequest {}).await
            })
            .await?;
        Ok(response.servers)
    }

    /// Every tablet group.
    pub async fn list_groups(&self) -> Result<Vec<GroupInfo>> {
        let response = self
            .inner
            .call_master("ListGroups", &self.deadline(), |mut master| async move {
                master.list_groups(ListGroupsRequest {}).await
            })
            .await?;
        Ok(response.groups)
    }

    /// Moves group `group_id`'s leadership to its replica on server `to` and keeps it there
    /// (that replica becomes the group's preferred leader). Returns the group once the
    /// master has heard from the new leader. If that takes longer than the master waits,
    /// [`ClientError::Server`] with `FAILED_PRECONDITION`: the change is persisted and the
    /// group's leader keeps trying while the new one answers it.
    pub async fn transfer_leader(&self, group_id: u64, to: u64) -> Result<GroupInfo> {
        let request = TransferLeaderRequest {
            group_id,
            to_server_id: to,
        };
        let response = self
            .inner
            .call_master(
                "TransferLeader",
                &self.deadline(),
                |mut master| async move { master.transfer_leader(request).await },
            )
            .await?;
        response
            .group
            .ok_or_else(|| ClientError::protocol("TransferLeader answered without the group"))
    }

    /// Starts moving group `group_id`'s replica on server `from` to server `to`, and returns
    /// the group once the move is persisted: its `moving` field shows the move until the
    /// group's journal membership has switched (poll [`list_groups`](Self::list_groups)).
    /// No base data is copied; the new replica replays the group's log.
    pub async fn move_replica(&self, group_id: u64, from: u64, to: u64) -> Result<GroupInfo> {
        let request = MoveReplicaRequest {
            group_id,
            from_server_id: from,
            to_server_id: to,
        };
        let response = self
            .inner
            .call_master("MoveReplica", &self.deadline(), |mut master| async move {
                master.move_replica(request).await
            })
            .await?;
        response
            .group
            .ok_or_else(|| ClientError::protocol("MoveReplica answered without the group"))
    }

    /// Moves tablet `tablet_id` to group `to_group`, and returns the tablet once the group
    /// serves it. No base data is copied: the old group seals and flushes the tablet, the
    /// new one opens it from the shared BaseStore, and requests are unavailable only for the
    /// handoff between the two (the SDK retries through it). A move that cannot seal the
    /// tablet (transactions keep it locked) is rolled back and fails with a
    /// [`ClientError::Server`] of code `FailedPrecondition`.
    pub async fn move_tablet(&self, tablet_id: u64, to_group: u64) -> Result<TabletMoved> {
        let request = MoveTabletRequest {
            tablet_id,
            to_group_id: to_group,
        };
        let deadline = Deadline::after(self.inner.options.operation_timeout.max(MOVE_TIMEOUT));
        let response = self
            .inner
            .call_master("MoveTablet", &deadline, |mut master| async move {
                master.move_tablet(request).await
            })
            .await?;
        let tablet = response
            .tablet
            .ok_or_else(|| ClientError::protocol("MoveTablet answered without the tablet"))?;
        Ok(TabletMoved {
            tablet,
            bytes_copied: response.bytes_copied,
        })
    }

    /// Splits tablet `tablet_id` in two at `at` and returns the halves once their group
    /// serves them: the tablet keeps `[start, at)` (one epoch up), a new tablet takes
    /// `[at, end)`. An empty `at` splits in the middle: of the tablet's data by size in a range
    /// collection, of its hash range in a hash collection (which takes no key). Metadata only:
    /// no table is rewritten, and requests pause for a handoff as short as a move's.
    pub async fn split_tablet(
        &self,
        tablet_id: u64,
        at: impl AsRef<[u8]>,
    ) -> Result<(TabletInfo, TabletInfo)> {
        // The epoch makes a retry of a split that was done fail instead of splitting again.
        let epoch = self
            .list_tablets("", "")
            .await?
            .iter()
            .find(|tablet| tablet.id == tablet_id)
            .map_or(0, |tablet| tablet.epoch);
        let request = SplitTabletRequest {
            tablet_id,
            at: at.as_ref().to_vec(),
            epoch,
        };
        let deadline = Deadline::after(self.inner.options.operation_timeout.max(MOVE_TIMEOUT));
        let response = self
            .inner
            .call_master("SplitTablet", &deadline, |mut master| {
                let request = request.clone();
                async move { master.split_tablet(request).await }
            })
            .await?;
        match (response.left, response.right) {
            (Some(left), Some(right)) => Ok((left, right)),
            _ => Err(ClientError::protocol(
                "SplitTablet answered without both halves",
            )),
        }
    }

    /// Marks server `server_id` as draining (or, with `cancel`, no longer): the master moves
    /// its replicas to other servers a few at a time and places nothing new on it. Returns
    /// the server; its `group_replicas` falls to 0 when the drain is done.
    pub async fn drain_server(&self, server_id: u64, cancel: bool) -> Result<ServerInfo> {
        let request = DrainServerRequest { server_id, cancel };
        let response = self
            .inner
            .call_master("DrainServer", &self.deadline(), |mut master| async move {
                master.drain_server(request).await
            })
            .await?;
        response
            .server
            .ok_or_else(|| ClientError::protocol("DrainServer answered without the server"))
    }

    /// The tablets of one collection, of one database (`collection` empty), or of the whole
    /// universe (both empty).
    pub async fn list_tablets(&self, database: &str, collection: &str) -> Result<Vec<TabletInfo>> {
        Ok(self.tablets_and_moves(database, collection).await?.tablets)
    }

    /// The tablet moves under way among the tablets [`list_tablets`](Self::list_tablets)
    /// lists.
    pub async fn tablet_moves(&self, database: &str, collection: &str) -> Result<Vec<TabletMove>> {
        Ok(self.tablets_and_moves(database, collection).await?.moves)
    }

    /// The tablet splits under way among the tablets [`list_tablets`](Self::list_tablets)
    /// lists.
    pub async fn tablet_splits(
        &self,
        database: &str,
        collection: &str,
    ) -> Result<Vec<TabletSplit>> {
        Ok(self.tablets_and_moves(database, collection).await?.splits)
    }

    async fn tablets_and_moves(
        &self,
        database: &str,
        collection: &str,
    ) -> Result<ListTabletsResponse> {
        let request = ListTabletsRequest {
            database: database.to_string(),
            collection: collection.to_string(),
        };
        self.inner
            .call_master("ListTablets", &self.deadline(), |mut master| {
                let request = request.clone();
                async move { master.list_tablets(request).await }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked_before_sending() {
        assert!(CollectionSpec::range().validate().is_ok());
        assert!(
            CollectionSpec::range()
                .split_keys(["b", "m"])
                .validate()
                .is_ok()
        );
        assert!(
            CollectionSpec::range()
                .split_keys(["m", "b"])
                .validate()
                .is_err()
        );
        assert!(
            CollectionSpec::range()
                .split_keys(["b", "b"])
                .validate()
                .is_err()
        );
        assert!(
            CollectionSpec::hash(4)
                .split_keys(["b"])
                .validate()
                .is_err()
        );
        assert!(
            CollectionSpec::range()
                .tablets(2)
                .split_keys(["b"])
                .validate()
                .is_err()
        );
    }
}
