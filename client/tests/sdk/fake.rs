//! In-process fake master and tablet servers, served by tonic on 127.0.0.1:0.
//!
//! A [`Universe`] holds the truth: tablets (range, epoch, which server leads them) and their
//! data. Fake tablet servers check each request against it the way real ones would
//! (unknown tablet, wrong epoch, not the leader, key outside the tablet) and can be told to
//! answer the next requests (or all) with a scripted error instead. The fake master
//! publishes routing that tests can let go stale on purpose.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use luna_client::{Client, ClientOptions};
use luna_proto::master::master_server::MasterServer;
use luna_proto::master::*;
use luna_proto::multiplex;
use luna_proto::tablet::tablet_error::Kind;
use luna_proto::tablet::tablet_server::{Tablet, TabletServer};
use luna_proto::tablet::*;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

pub use crate::fake_master::FakeMaster;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A tablet to create: start key, end key (`None`: unbounded), index of the leading server.
pub type Bounds<'a> = (&'a [u8], Option<&'a [u8]>, usize);

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One tablet as the universe knows it.
#[derive(Debug, Clone)]
pub struct TabletMeta {
    pub id: u64,
    pub collection: (String, String),
    pub partitioning: Partitioning,
    pub epoch: u64,
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
    /// Index of the leading server.
    pub leader: usize,
    pub data: BTreeMap<Bytes, Bytes>,
}

impl TabletMeta {
    fn contains(&self, key: &[u8]) -> bool {
        self.start.as_slice() <= key && self.end.as_deref().is_none_or(|end| key < end)
    }
}

/// What a fake server answers instead of serving.
#[derive(Debug, Clone)]
pub enum Scripted {
    Error(TabletError),
    Status(tonic::Code),
    /// Never answers (the client's request timeout fires).
    Hang,
}

pub fn not_leader(hint: &str) -> Scripted {
    Scripted::Error(TabletError {
        kind: Some(Kind::NotLeader(NotLeader {
            leader_server_id: if hint.is_empty() { 0 } else { 1 },
            leader_addr: hint.to_string(),
        })),
        message: String::new(),
    })
}

pub fn busy(retry_after_ms: u64) -> Scripted {
    Scripted::Error(TabletError {
        kind: Some(Kind::Busy(Busy { retry_after_ms })),
        message: String::new(),
    })
}

pub fn outcome_unknown() -> Scripted {
    Scripted::Error(TabletError {
        kind: Some(Kind::OutcomeUnknown(OutcomeUnknown {})),
        message: String::new(),
    })
}

pub fn snapshot_too_old(safe_point: u64) -> Scripted {
    Scripted::Error(TabletError {
        kind: Some(Kind::SnapshotTooOld(SnapshotTooOld { safe_point })),
        message: String::new(),
    })
}

/// A request as a fake server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: &'static str,
    pub tablet: TabletRef,
    pub request_id: Option<RequestId>,
    pub read: Option<ReadOptions>,
}

#[derive(Debug, Default)]
pub struct Universe {
    pub tablets: Mutex<BTreeMap<u64, TabletMeta>>,
    pub server_addrs: Mutex<Vec<String>>,
    next_tablet: AtomicU64,
}

impl Universe {
    pub fn data_of(&self, tablet: u64) -> Vec<(Bytes, Bytes)> {
        lock(&self.tablets)
            .get(&tablet)
            .map(|meta| meta.data.clone().into_iter().collect())
            .unwrap_or_default()
    }

    pub fn update(&self, tablet: u64, change: impl FnOnce(&mut TabletMeta)) {
        if let Some(meta) = lock(&self.tablets).get_mut(&tablet) {
            change(meta);
        }
    }
}

/// A fake tablet server.
#[derive(Debug)]
pub struct FakeTablet {
    pub index: usize,
    pub addr: String,
    universe: Arc<Universe>,
    pub script: Mutex<VecDeque<Scripted>>,
    /// Answered to every request after the script runs out, if set.
    pub always: Mutex<Option<Scripted>>,
    pub seen: Mutex<Vec<Seen>>,
    /// The `commit_above` of every write served, in order.
    pub commit_floors: Mutex<Vec<u64>>,
    /// Most pairs per scan page.
    pub page_size: AtomicUsize,
    /// This fake, for the `Multiplex` streams it serves.
    me: Weak<FakeTablet>,
}

impl FakeTablet {
    pub fn push(&self, answer: Scripted) {
        lock(&self.script).push_back(answer);
    }

    pub fn set_always(&self, answer: Option<Scripted>) {
        *lock(&self.always) = answer;
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// The request ids of the requests seen that carried one, in order.
    pub fn request_ids(&self) -> Vec<RequestId> {
        lock(&self.seen)
            .iter()
            .filter_map(|s| s.request_id.clone())
            .collect()
    }

    /// Records the request and decides: `Ok(None)` to serve it, `Ok(Some(error))` to refuse.
    async fn admit(
        &self,
        method: &'static str,
        tablet: Option<TabletRef>,
        keys: &[&[u8]],
        request_id: Option<RequestId>,
        read: Option<ReadOptions>,
    ) -> Result<Option<TabletError>, Status> {
        let tablet = tablet.ok_or_else(|| Status::invalid_argument("no tablet"))?;
        let needs_leader = read.is_none_or(|read| read.mode == ReadMode::Leader as i32);
        lock(&self.seen).push(Seen {
            method,
            tablet,
            request_id,
            read,
        });
        let scripted = lock(&self.script)
            .pop_front()
            .or_else(|| lock(&self.always).clone());
        match scripted {
            Some(Scripted::Error(error)) => return Ok(Some(error)),
            Some(Scripted::Status(code)) => return Err(Status::new(code, "scripted")),
            Some(Scripted::Hang) => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return Err(Status::unavailable("hung"));
            }
            None => {}
        }
        let tablets = lock(&self.universe.tablets);
        let refusal = |kind| {
            Ok(Some(TabletError {
                kind: Some(kind),
                message: String::new(),
            }))
        };
        let Some(meta) = tablets.get(&tablet.tablet_id) else {
            return refusal(Kind::TabletNotFound(TabletNotFound {}));
        };
        if meta.epoch != tablet.epoch {
            return refusal(Kind::EpochMismatch(EpochMismatch {
                current_epoch: meta.epoch,
            }));
        }
        if needs_leader && meta.leader != self.index {
            let leader_addr = lock(&self.universe.server_addrs)
                .get(meta.leader)
                .cloned()
                .unwrap_or_default();
            return refusal(Kind::NotLeader(NotLeader {
                leader_server_id: meta.leader as u64 + 1,
                leader_addr,
            }));
        }
        if keys.iter().any(|key| !meta.contains(key)) {
            return Err(Status::invalid_argument("key outside the tablet"));
        }
        Ok(None)
    }

    fn with_data<T>(&self, tablet: u64, read: impl FnOnce(&mut BTreeMap<Bytes, Bytes>) -> T) -> T {
        let mut tablets = lock(&self.universe.tablets);
        let mut empty = BTreeMap::new();
        match tablets.get_mut(&tablet) {
            Some(meta) => read(&mut meta.data),
            None => read(&mut empty),
        }
    }
}

#[tonic::async_trait]
impl Tablet for FakeTablet {
    type MultiplexStream = multiplex::ReplyStream;

    async fn multiplex(
        &self,
        request: Request<Streaming<CommandBatch>>,
    ) -> Result<Response<Self::MultiplexStream>, Status> {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| Status::unavailable("stopped"))?;
        // The fakes stop with their test: with the sender gone, nothing ends the streams.
        let (_, never) = tokio::sync::watch::channel(false);
        Ok(Response::new(multiplex::serve(
            me,
            request.into_inner(),
            never,
        )))
    }

    async fn prewrite(
        &self,
        _: Request<PrewriteRequest>,
    ) -> Result<Response<PrewriteResponse>, Status> {
        Err(Status::unimplemented(
            "the fake tablet server has no transactions",
        ))
    }

    async fn resolve(
        &self,
        _: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        Err(Status::unimplemented(
            "the fake tablet server has no transactions",
        ))
    }

    async fn check_txn(
        &self,
        _: Request<CheckTxnRequest>,
    ) -> Result<Response<CheckTxnResponse>, Status> {
        Err(Status::unimplemented(
            "the fake tablet server has no transactions",
        ))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let request = request.into_inner();
        let keys = [request.key.as_ref()];
        if let Some(error) = self
            .admit("get", request.tablet, &keys, None, request.options)
            .await?
        {
            return Ok(Response::new(GetResponse {
                error: Some(error),
                ..Default::default()
            }));
        }
        let tablet = request.tablet.map(|t| t.tablet_id).unwrap_or_default();
        let value = self.with_data(tablet, |data| data.get(&request.key).cloned());
        Ok(Response::new(GetResponse {
            error: None,
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn batch_get(
        &self,
        request: Request<BatchGetRequest>,
    ) -> Result<Response<BatchGetResponse>, Status> {
        let request = request.into_inner();
        let keys: Vec<&[u8]> = request.keys.iter().map(|key| key.as_ref()).collect();
        if let Some(error) = self
            .admit("batch_get", request.tablet, &keys, None, request.options)
            .await?
        {
            return Ok(Response::new(BatchGetResponse {
                error: Some(error),
                lookups: vec![],
            }));
        }
        let tablet = request.tablet.map(|t| t.tablet_id).unwrap_or_default();
        let lookups = self.with_data(tablet, |data| {
            request
                .keys
                .iter()
                .map(|key| match data.get(key) {
                    Some(value) => Lookup {
                        found: true,
                        value: value.clone(),
                    },
                    None => Lookup::default(),
                })
                .collect()
        });
        Ok(Response::new(BatchGetResponse {
            error: None,
            lookups,
        }))
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let request = request.into_inner();
        let mut bounds: Vec<&[u8]> = vec![request.start.as_ref()];
        if let Some(end) = &request.end {
            // The end is exclusive: the tablet must hold the key just below it.
            if end.as_ref() <= request.start.as_ref() {
                return Err(Status::invalid_argument("empty scan range"));
            }
            bounds.push(end.as_ref());
        }
        let tablet_ref = request.tablet;
        if let Some(error) = self
            .admit("scan", tablet_ref, &bounds[..1], None, request.options)
            .await?
        {
            return Ok(Response::new(ScanResponse {
                error: Some(error),
                ..Default::default()
            }));
        }
        let page = self.page_size.load(Ordering::Relaxed).max(1);
        let limit = if request.limit == 0 {
            page
        } else {
            (request.limit as usize).min(page)
        };
        let tablet = tablet_ref.map(|t| t.tablet_id).unwrap_or_default();
        let (pairs, more) = self.with_data(tablet, |data| {
            let range = data
                .range(request.start.clone()..)
                .filter(|(key, _)| request.end.as_ref().is_none_or(|end| *key < end));
            let all: Vec<KeyValue> = if request.reverse {
                let mut all: Vec<KeyValue> = range
                    .map(|(k, v)| KeyValue {
                        key: k.clone(),
                        value: v.clone(),
                    })
                    .collect();
                all.reverse();
                all
            } else {
                range
                    .map(|(k, v)| KeyValue {
                        key: k.clone(),
                        value: v.clone(),
                    })
                    .collect()
            };
            let more = all.len() > limit;
            (all.into_iter().take(limit).collect::<Vec<_>>(), more)
        });
        Ok(Response::new(ScanResponse {
            error: None,
            pairs,
            more,
        }))
    }

    async fn write(
        &self,
        request: Request<WriteRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        let keys: Vec<&[u8]> = request.mutations.iter().map(|m| m.key.as_ref()).collect();
        if let Some(error) = self
            .admit(
                "write",
                request.tablet,
                &keys,
                request.request_id.clone(),
                None,
            )
            .await?
        {
            return Ok(Response::new(WriteResponse {
                error: Some(error),
                commit_ts: 0,
            }));
        }
        lock(&self.commit_floors).push(request.commit_above);
        let tablet = request.tablet.map(|t| t.tablet_id).unwrap_or_default();
        self.with_data(tablet, |data| {
            for mutation in &request.mutations {
                if mutation.op == mutation::Op::Delete as i32 {
                    data.remove(&mutation.key);
                } else {
                    data.insert(mutation.key.clone(), mutation.value.clone());
                }
            }
        });
        let commit_ts = request.request_id.map(|id| 1000 + id.seq).unwrap_or(1);
        Ok(Response::new(WriteResponse {
            error: None,
            commit_ts,
        }))
    }
}

/// A fake universe: a master and `servers` tablet servers, all on loopback.
pub struct Harness {
    pub universe: Arc<Universe>,
    pub master: Arc<FakeMaster>,
    pub master_addr: String,
    pub servers: Vec<Arc<FakeTablet>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn listen() -> Result<(TcpListener, String), std::io::Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    Ok((listener, addr))
}

/// Options that keep tests fast: short timeouts and backoffs.
pub fn fast_options() -> ClientOptions {
    ClientOptions::default()
        .connect_timeout(Duration::from_millis(500))
        .request_timeout(Duration::from_millis(500))
        .operation_timeout(Duration::from_secs(3))
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
}

impl Harness {
    pub async fn start(servers: usize) -> Result<Harness, Box<dyn std::error::Error>> {
        let universe = Arc::new(Universe::default());
        let master = Arc::new(FakeMaster::default());
        let mut tasks = Vec::new();
        let (listener, master_addr) = listen().await?;
        let service = MasterServer::from_arc(master.clone());
        tasks.push(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        }));
        let mut fakes = Vec::new();
        for index in 0..servers {
            let (listener, addr) = listen().await?;
            let fake = Arc::new_cyclic(|me| FakeTablet {
                index,
                addr: addr.clone(),
                universe: universe.clone(),
                script: Mutex::default(),
                always: Mutex::default(),
                seen: Mutex::default(),
                commit_floors: Mutex::default(),
                page_size: AtomicUsize::new(1000),
                me: me.clone(),
            });
            lock(&universe.server_addrs).push(addr);
            let service = TabletServer::from_arc(fake.clone());
            tasks.push(tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(TcpListenerStream::new(listener))
                    .await;
            }));
            fakes.push(fake);
        }
        Ok(Harness {
            universe,
            master,
            master_addr,
            servers: fakes,
            tasks,
        })
    }

    pub async fn client(&self) -> Result<Client, luna_client::ClientError> {
        Client::connect_with([self.master_addr.as_str()], fast_options()).await
    }

    /// Adds collection `db.name` with tablets at `bounds` (start, end, leader server), each
    /// in its own group replicated on every server, and publishes its routing. Returns
    /// the tablet ids in order.
    pub fn add_collection(
        &self,
        db: &str,
        name: &str,
        partitioning: Partitioning,
        bounds: &[Bounds<'_>],
    ) -> Vec<u64> {
        let mut ids = Vec::new();
        {
            let mut tablets = lock(&self.universe.tablets);
            for (start, end, leader) in bounds {
                let id = self.universe.next_tablet.fetch_add(1, Ordering::SeqCst) + 1;
                tablets.insert(
                    id,
                    TabletMeta {
                        id,
                        collection: (db.to_string(), name.to_string()),
                        partitioning,
                        epoch: 1,
                        start: start.to_vec(),
                        end: end.map(<[u8]>::to_vec),
                        leader: *leader,
                        data: BTreeMap::new(),
                    },
                );
                ids.push(id);
            }
        }
        self.publish(db, name);
        ids
    }

    /// Publishes the universe's current truth about `db.name` as the master's routing.
    pub fn publish(&self, db: &str, name: &str) {
        let addrs = lock(&self.universe.server_addrs).clone();
        let tablets = lock(&self.universe.tablets);
        let mut partitioning = Partitioning::Range;
        let routes = tablets
            .values()
            .filter(|meta| meta.collection == (db.to_string(), name.to_string()))
            .map(|meta| {
                partitioning = meta.partitioning;
                TabletRoute {
                    tablet: Some(TabletInfo {
                        id: meta.id,
                        partitioning: meta.partitioning.into(),
                        range: Some(KeyRange {
                            start: meta.start.clone(),
                            end: meta.end.clone(),
                        }),
                        epoch: meta.epoch,
                        group_id: meta.id,
                        ..Default::default()
                    }),
                    leader_server_id: meta.leader as u64 + 1,
                    replicas: addrs
                        .iter()
                        .enumerate()
                        .map(|(index, addr)| ReplicaAddr {
                            server_id: index as u64 + 1,
                            addr: addr.clone(),
                        })
                        .collect(),
                }
            })
            .collect();
        let route = CollectionRoute {
            collection: Some(CollectionInfo {
                name: name.to_string(),
                database: db.to_string(),
                partitioning: partitioning.into(),
                ..Default::default()
            }),
            tablets: routes,
            routing_version: 1,
        };
        lock(&self.master.routes).insert((db.to_string(), name.to_string()), route);
    }

    /// Every request the servers saw, in server order.
    pub fn all_seen(&self) -> Vec<Seen> {
        self.servers
            .iter()
            .flat_map(|server| server.seen())
            .collect()
    }
}
