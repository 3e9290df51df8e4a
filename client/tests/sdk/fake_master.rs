//! The fake master: routing as the test last published it, a small catalog, a timestamp
//! counter.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use luna_proto::master::master_server::Master;
use luna_proto::master::*;
use tonic::{Request, Response, Status};

use crate::fake::lock;
/// The fake master: routing as last published, a small catalog, a timestamp counter.
#[derive(Debug, Default)]
pub struct FakeMaster {
    pub routes: Mutex<HashMap<(String, String), CollectionRoute>>,
    pub routing_calls: AtomicUsize,
    databases: Mutex<Vec<DatabaseInfo>>,
    pub created_collections: Mutex<Vec<CreateCollectionRequest>>,
    next_ts: AtomicU64,
    /// Answer GetRouting and GetTimestamps with UNAVAILABLE (a master that lost leadership).
    pub unavailable: AtomicBool,
    /// With `unavailable`: the leader's address to name in the answer, as a master replica
    /// that does not lead does.
    pub leader_hint: Mutex<Option<String>>,
}

impl FakeMaster {
    pub fn routing_calls(&self) -> usize {
        self.routing_calls.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl Master for FakeMaster {
    async fn create_database(
        &self,
        request: Request<CreateDatabaseRequest>,
    ) -> Result<Response<CreateDatabaseResponse>, Status> {
        let name = request.into_inner().name;
        let mut databases = lock(&self.databases);
        if databases.iter().any(|db| db.name == name) {
            return Err(Status::already_exists(format!("database {name} exists")));
        }
        let info = DatabaseInfo {
            id: databases.len() as u64 + 1,
            name,
            created_ms: 1,
        };
        databases.push(info.clone());
        Ok(Response::new(CreateDatabaseResponse {
            database: Some(info),
        }))
    }
    async fn drop_database(
        &self,
        request: Request<DropDatabaseRequest>,
    ) -> Result<Response<DropDatabaseResponse>, Status> {
        let name = request.into_inner().name;
        let mut databases = lock(&self.databases);
        let before = databases.len();
        databases.retain(|db| db.name != name);
        if databases.len() == before {
            return Err(Status::not_found(format!("no database {name}")));
        }
        Ok(Response::new(DropDatabaseResponse {}))
    }
    async fn list_databases(
        &self,
        _: Request<ListDatabasesRequest>,
    ) -> Result<Response<ListDatabasesResponse>, Status> {
        Ok(Response::new(ListDatabasesResponse {
            databases: lock(&self.databases).clone(),
        }))
    }
    async fn create_collection(
        &self,
        request: Request<CreateCollectionRequest>,
    ) -> Result<Response<CreateCollectionResponse>, Status> {
        let request = request.into_inner();
        let info = CollectionInfo {
            name: request.name.clone(),
            database: request.database.clone(),
            partitioning: request.partitioning,
            ..Default::default()
        };
        lock(&self.created_collections).push(request);
        Ok(Response::new(CreateCollectionResponse {
            collection: Some(info),
        }))
    }
    async fn drop_collection(
        &self,
        _: Request<DropCollectionRequest>,
    ) -> Result<Response<DropCollectionResponse>, Status> {
        Ok(Response::new(DropCollectionResponse {}))
    }
    async fn list_collections(
        &self,
        _: Request<ListCollectionsRequest>,
    ) -> Result<Response<ListCollectionsResponse>, Status> {
        Ok(Response::new(ListCollectionsResponse::default()))
    }
    async fn list_servers(
        &self,
        _: Request<ListServersRequest>,
    ) -> Result<Response<ListServersResponse>, Status> {
        Ok(Response::new(ListServersResponse::default()))
    }
    async fn list_groups(
        &self,
        _: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        Ok(Response::new(ListGroupsResponse::default()))
    }
    async fn transfer_leader(
        &self,
        _: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        Err(Status::unimplemented("the fake master moves no leaders"))
    }
    async fn move_replica(
        &self,
        _: Request<MoveReplicaRequest>,
    ) -> Result<Response<MoveReplicaResponse>, Status> {
        Err(Status::unimplemented("the fake master moves no replicas"))
    }
    async fn drain_server(
        &self,
        _: Request<DrainServerRequest>,
    ) -> Result<Response<DrainServerResponse>, Status> {
        Err(Status::unimplemented("the fake master drains no servers"))
    }
    async fn split_tablet(
        &self,
        _: Request<luna_proto::master::SplitTabletRequest>,
    ) -> Result<Response<luna_proto::master::SplitTabletResponse>, Status> {
        Err(Status::unimplemented("the fake master splits no tablets"))
    }
    async fn move_tablet(
        &self,
        _: Request<luna_proto::master::MoveTabletRequest>,
    ) -> Result<Response<luna_proto::master::MoveTabletResponse>, Status> {
        Err(Status::unimplemented("the fake master moves no tablets"))
    }
    async fn list_tablets(
        &self,
        _: Request<ListTabletsRequest>,
    ) -> Result<Response<ListTabletsResponse>, Status> {
        Ok(Response::new(ListTabletsResponse::default()))
    }
    async fn get_routing(
        &self,
        request: Request<GetRoutingRequest>,
    ) -> Result<Response<CollectionRoute>, Status> {
        self.routing_calls.fetch_add(1, Ordering::SeqCst);
        if self.unavailable.load(Ordering::SeqCst) {
            let mut status = Status::unavailable("not the leader");
            if let Some(leader) = lock(&self.leader_hint).as_deref() {
                luna_proto::leader_hint::attach(&mut status, leader);
            }
            return Err(status);
        }
        let request = request.into_inner();
        lock(&self.routes)
            .get(&(request.database.clone(), request.collection.clone()))
            .cloned()
            .map(Response::new)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no collection {}.{}",
                    request.database, request.collection
                ))
            })
    }
    type WatchRoutingStream = tokio_stream::Empty<Result<RoutingTable, Status>>;
    async fn watch_routing(
        &self,
        _: Request<WatchRoutingRequest>,
    ) -> Result<Response<Self::WatchRoutingStream>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn get_timestamps(
        &self,
        request: Request<GetTimestampsRequest>,
    ) -> Result<Response<GetTimestampsResponse>, Status> {
        let count = request.into_inner().count.max(1);
        let first = self.next_ts.fetch_add(u64::from(count), Ordering::SeqCst) + 1;
        Ok(Response::new(GetTimestampsResponse { first, count }))
    }
    async fn keep_snapshots(
        &self,
        _: Request<KeepSnapshotsRequest>,
    ) -> Result<Response<KeepSnapshotsResponse>, Status> {
        Ok(Response::new(KeepSnapshotsResponse {
            gc_safe_point: 0,
            lease_ms: 10_000,
        }))
    }
    async fn heartbeat(
        &self,
        _: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}
