//! The gRPC service: thin translations between the generated API and [`Core`].

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream as FuturesStream;
use luna_proto::master::master_server::Master as MasterRpc;
use luna_proto::master::{
    CollectionRoute, CreateCollectionRequest, CreateCollectionResponse, CreateDatabaseRequest,
    CreateDatabaseResponse, DrainServerRequest, DrainServerResponse, DropCollectionRequest,
    DropCollectionResponse, DropDatabaseRequest, DropDatabaseResponse, GetRoutingRequest,
    GetTimestampsRequest, GetTimestampsResponse, HeartbeatRequest, HeartbeatResponse,
    KeepSnapshotsRequest, KeepSnapshotsResponse, ListCollectionsRequest, ListCollectionsResponse,
    ListDatabasesRequest, ListDatabasesResponse, ListGroupsRequest, ListGroupsResponse,
    ListServersRequest, ListServersResponse, ListTabletsRequest, ListTabletsResponse,
    MoveReplicaRequest, MoveReplicaResponse, MoveTabletRequest, MoveTabletResponse, RoutingTable,
    SplitTabletRequest, SplitTabletResponse, TransferLeaderRequest, TransferLeaderResponse,
    WatchRoutingRequest,
};
use tonic::{Request, Response, Status};

use crate::core::Core;

/// The master's gRPC service; mount it with [`Master::service`](crate::Master::service).
#[derive(Debug, Clone)]
pub struct MasterService {
    core: Arc<Core>,
}

impl MasterService {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// The core, once this replica serves as leader and holds its lease: reads of a replica
    /// that does not lead could be stale, so they are redirected like writes.
    async fn leader(&self) -> Result<&Core, Status> {
        self.core.lead_with_lease().await?;
        Ok(&self.core)
    }
}

/// The routing tables of one WatchRouting call.
pub type RoutingStream = Pin<Box<dyn FuturesStream<Item = Result<RoutingTable, Status>> + Send>>;

#[tonic::async_trait]
impl MasterRpc for MasterService {
    async fn create_database(
        &self,
        request: Request<CreateDatabaseRequest>,
    ) -> Result<Response<CreateDatabaseResponse>, Status> {
        let database = self.core.create_database(&request.get_ref().name).await?;
        Ok(Response::new(CreateDatabaseResponse {
            database: Some(database),
        }))
    }

    async fn drop_database(
        &self,
        request: Request<DropDatabaseRequest>,
    ) -> Result<Response<DropDatabaseResponse>, Status> {
        self.core.drop_database(&request.get_ref().name).await?;
        Ok(Response::new(DropDatabaseResponse {}))
    }

    async fn list_databases(
        &self,
        _request: Request<ListDatabasesRequest>,
    ) -> Result<Response<ListDatabasesResponse>, Status> {
        Ok(Response::new(ListDatabasesResponse {
            databases: self.leader().await?.list_databases(),
        }))
    }

    async fn create_collection(
        &self,
        request: Request<CreateCollectionRequest>,
    ) -> Result<Response<CreateCollectionResponse>, Status> {
        let collection = self.core.create_collection(request.get_ref()).await?;
        Ok(Response::new(CreateCollectionResponse {
            collection: Some(collection),
        }))
    }

    async fn drop_collection(
        &self,
        request: Request<DropCollectionRequest>,
    ) -> Result<Response<DropCollectionResponse>, Status> {
        let request = request.get_ref();
        self.core
            .drop_collection(&request.database, &request.name)
            .await?;
        Ok(Response::new(DropCollectionResponse {}))
    }

    async fn list_collections(
        &self,
        request: Request<ListCollectionsRequest>,
    ) -> Result<Response<ListCollectionsResponse>, Status> {
        let collections = self
            .leader()
            .await?
            .list_collections(&request.get_ref().database)?;
        Ok(Response::new(ListCollectionsResponse { collections }))
    }

    async fn list_servers(
        &self,
        _request: Request<ListServersRequest>,
    ) -> Result<Response<ListServersResponse>, Status> {
        Ok(Response::new(ListServersResponse {
            servers: self.leader().await?.list_servers(),
        }))
    }

    async fn list_groups(
        &self,
        _request: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        Ok(Response::new(ListGroupsResponse {
            groups: self.leader().await?.list_groups(),
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let request = request.get_ref();
        let group = self
            .core
            .transfer_leader(request.group_id, request.to_server_id)
            .await?;
        Ok(Response::new(TransferLeaderResponse { group: Some(group) }))
    }

    async fn move_replica(
        &self,
        request: Request<MoveReplicaRequest>,
    ) -> Result<Response<MoveReplicaResponse>, Status> {
        let request = request.get_ref();
        let group = self
            .core
            .move_replica(
                request.group_id,
                request.from_server_id,
                request.to_server_id,
            )
            .await?;
        Ok(Response::new(MoveReplicaResponse { group: Some(group) }))
    }

    async fn drain_server(
        &self,
        request: Request<DrainServerRequest>,
    ) -> Result<Response<DrainServerResponse>, Status> {
        let request = request.get_ref();
        let server = self
            .core
            .drain_server(request.server_id, request.cancel)
            .await?;
        Ok(Response::new(DrainServerResponse {
            server: Some(server),
        }))
    }

    async fn list_tablets(
        &self,
        request: Request<ListTabletsRequest>,
    ) -> Result<Response<ListTabletsResponse>, Status> {
        let request = request.get_ref();
        let listed = self
            .leader()
            .await?
            .list_tablets(&request.database, &request.collection)?;
        Ok(Response::new(listed))
    }

    async fn split_tablet(
        &self,
        request: Request<SplitTabletRequest>,
    ) -> Result<Response<SplitTabletResponse>, Status> {
        let request = request.into_inner();
        let (left, right) = self
            .leader()
            .await?
            .split_tablet(request.tablet_id, request.at, request.epoch)
            .await?;
        Ok(Response::new(SplitTabletResponse {
            left: Some(left),
            right: Some(right),
        }))
    }

    async fn move_tablet(
        &self,
        request: Request<MoveTabletRequest>,
    ) -> Result<Response<MoveTabletResponse>, Status> {
        let request = request.get_ref();
        let (tablet, bytes_copied) = self
            .leader()
            .await?
            .move_tablet(request.tablet_id, request.to_group_id)
            .await?;
        Ok(Response::new(MoveTabletResponse {
            tablet: Some(tablet),
            bytes_copied,
        }))
    }

    async fn get_routing(
        &self,
        request: Request<GetRoutingRequest>,
    ) -> Result<Response<CollectionRoute>, Status> {
        let request = request.get_ref();
        let route = self
            .leader()
            .await?
            .routing(&request.database, &request.collection)?;
        Ok(Response::new(route))
    }

    type WatchRoutingStream = RoutingStream;

    async fn watch_routing(
        &self,
        request: Request<WatchRoutingRequest>,
    ) -> Result<Response<Self::WatchRoutingStream>, Status> {
        let after = request.get_ref().after_version;
        let term = self.core.lead_with_lease().await?;
        let core = Arc::clone(&self.core);
        // The stream ends with the term it started in: the watcher reconnects and finds
        // the new leader, whose table is the one that counts.
        let versions = core.routing_version.subscribe();
        let shutdown = core.shutdown.subscribe();
        let serving = core.serving.subscribe();
        let tables = futures::stream::unfold(
            (core, versions, shutdown, serving, after),
            move |(core, mut versions, mut shutdown, mut serving, after)| async move {
                let changed = tokio::select! {
                    changed = versions.wait_for(|&version| version > after) => changed.is_ok(),
                    _ = shutdown.wait_for(|&stop| stop) => false,
                    _ = serving.wait_for(|&served| served != term) => false,
                };
                if !changed {
                    return None;
                }
                let table = core.routing_table();
                let sent = table.routing_version;
                Some((Ok(table), (core, versions, shutdown, serving, sent)))
            },
        );
        Ok(Response::new(Box::pin(tables)))
    }

    async fn get_timestamps(
        &self,
        request: Request<GetTimestampsRequest>,
    ) -> Result<Response<GetTimestampsResponse>, Status> {
        let request = request.get_ref();
        let batch = self.core.timestamps(request.count, request.after).await?;
        Ok(Response::new(GetTimestampsResponse {
            first: batch.first,
            count: batch.count,
        }))
    }

    async fn keep_snapshots(
        &self,
        request: Request<KeepSnapshotsRequest>,
    ) -> Result<Response<KeepSnapshotsResponse>, Status> {
        let request = request.get_ref();
        let gc_safe_point = self
            .core
            .keep_snapshots(&request.client_id, request.oldest_start_ts)
            .await?;
        Ok(Response::new(KeepSnapshotsResponse {
            gc_safe_point,
            lease_ms: u64::try_from(self.core.config.snapshot_lease.as_millis())
                .unwrap_or(u64::MAX),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let response = self.core.heartbeat(request.get_ref()).await?;
        Ok(Response::new(response))
    }
}
