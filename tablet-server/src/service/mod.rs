//! The tablet gRPC service: Get, BatchGet, Scan and Write on the tablets hosted here, and
//! the transaction requests ([`txn`]).

mod control;
mod txn;

pub(crate) use self::control::GroupControlService;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use luna_proto::master::Partitioning;
use luna_proto::request_ids::{InFlightRequest, RequestIds};
use luna_proto::tablet::{self as pb, tablet_server};
use luna_proto::{keys, multiplex};
use luna_storage::{Direction, KeyRange, ScanRequest};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{Result, TabletServerError};
use crate::group::{Group, Hosted, RequestKey, Sealed, WriteRequest};
use crate::hosting::Hosting;

/// Pairs a scan returns when the request sets no limit.
const DEFAULT_SCAN_LIMIT: usize = 1000;
/// Most pairs one scan response carries.
const MAX_SCAN_LIMIT: usize = 10_000;
/// Most keys in one BatchGet.
const MAX_BATCH_GET_KEYS: usize = 10_000;

/// The tablet service of one server. Clones share everything (a `Multiplex` stream serves
/// its commands with one).
#[derive(Clone)]
pub(crate) struct TabletService {
    hosting: Arc<Hosting>,
    /// Writes that arrive without a request id get one from this server: a client id of
    /// its own, new every time the server starts (a restarted server starts its seqs over,
    /// and must not meet the records or the `done_below` of its previous run).
    own_client_id: Bytes,
    own_ids: Arc<RequestIds>,
    /// Turns true when the server stops, which ends the `Multiplex` streams.
    stopping: watch::Receiver<bool>,
}

impl TabletService {
    pub(crate) fn new(hosting: Arc<Hosting>, stopping: watch::Receiver<bool>) -> Self {
        Self {
            hosting,
            own_client_id: Bytes::copy_from_slice(uuid::Uuid::new_v4().as_bytes()),
            own_ids: Arc::default(),
            stopping,
        }
    }

    fn observe<T>(&self, op: &str, result: &Result<T>, started: Instant) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(error) => error.kind_label(),
        };
        self.hosting
            .context()
            .metrics
            .observe(op, outcome, started.elapsed());
    }

    fn locate(&self, tablet: Option<&pb::TabletRef>) -> Result<(Arc<Group>, Hosted)> {
        self.locate_in(tablet, Sealed::Refuse)
    }

    /// [`TabletService::locate`], taking a tablet sealed for a move if `sealed` allows.
    fn locate_in(
        &self,
        tablet: Option<&pb::TabletRef>,
        sealed: Sealed,
    ) -> Result<(Arc<Group>, Hosted)> {
        let tablet = tablet.ok_or_else(|| {
            TabletServerError::InvalidArgument("the request names no tablet".to_owned())
        })?;
        self.hosting.locate(tablet.tablet_id, tablet.epoch, sealed)
    }

    /// Passes the read barrier the request asks for, then looks its tablet up. In that
    /// order: a snapshot the replica installs while it waits replaces the tablet's handle,
    /// and a handle taken before would read without the writes applied since.
    async fn locate_for_read(
        &self,
        tablet: Option<&pb::TabletRef>,
        options: Option<pb::ReadOptions>,
    ) -> Result<(Arc<Group>, Hosted, u64)> {
        let (group, hosted) = self.locate(tablet)?;
        let options = options.unwrap_or_default();
        let read_ts = group
            .read_barrier(options.mode().into(), options.read_ts)
            .await?;
        let hosted = group.tablet(hosted.info.id, hosted.info.epoch)?;
        Ok((group, hosted, read_ts))
    }

    async fn get_inner(&self, request: pb::GetRequest) -> Result<pb::GetResponse> {
        let (group, hosted, read_ts) = self
            .locate_for_read(request.tablet.as_ref(), request.options)
            .await?;
        let key = storage_key(&hosted, &request.key)?;
        group.check_read(hosted.info.id, &key, read_ts)?;
        hosted.load.reads.fetch_add(1, Ordering::Relaxed);
        let value = hosted.tablet.get(&key, read_ts).await?;
        Ok(pb::GetResponse {
            error: None,
            found: value.is_some(),
            value: value.unwrap_or_default(),
        })
    }

    async fn batch_get_inner(&self, request: pb::BatchGetRequest) -> Result<pb::BatchGetResponse> {
        if request.keys.len() > MAX_BATCH_GET_KEYS {
            return Err(TabletServerError::InvalidArgument(format!(
                "{} keys in one BatchGet; the limit is {MAX_BATCH_GET_KEYS}",
                request.keys.len()
            )));
        }
        let (group, hosted, read_ts) = self
            .locate_for_read(request.tablet.as_ref(), request.options)
            .await?;
        let keys = request
            .keys
            .iter()
            .map(|key| storage_key(&hosted, key))
            .collect::<Result<Vec<_>>>()?;
        for key in &keys {
            group.check_read(hosted.info.id, key, read_ts)?;
        }
        let mut lookups = Vec::with_capacity(keys.len());
        for key in keys {
            let value = hosted.tablet.get(&key, read_ts).await?;
            lookups.push(pb::Lookup {
                found: value.is_some(),
                value: value.unwrap_or_default(),
            });
        }
        hosted
            .load
            .reads
            .fetch_add(lookups.len() as u64, Ordering::Relaxed);
        Ok(pb::BatchGetResponse {
            error: None,
            lookups,
        })
    }

    async fn scan_inner(&self, request: pb::ScanRequest) -> Result<pb::ScanResponse> {
        let (group, hosted, read_ts) = self
            .locate_for_read(request.tablet.as_ref(), request.options)
            .await?;
        let limit = match usize::try_from(request.limit).unwrap_or(MAX_SCAN_LIMIT) {
            0 => DEFAULT_SCAN_LIMIT,
            limit => limit.min(MAX_SCAN_LIMIT),
        };
        let range = KeyRange::new(request.start.clone(), request.end.clone());
        group.check_scan(hosted.info.id, &range, read_ts)?;
        let direction = if request.reverse {
            Direction::Reverse
        } else {
            Direction::Forward
        };
        // One more than asked tells whether the tablet has more.
        let mut pairs = hosted
            .tablet
            .scan(&ScanRequest {
                range,
                read_ts,
                limit: limit + 1,
                direction,
            })
            .await?;
        let more = pairs.len() > limit;
        pairs.truncate(limit);
        hosted.load.reads.fetch_add(1, Ordering::Relaxed);
        Ok(pb::ScanResponse {
            error: None,
            pairs: pairs
                .into_iter()
                .map(|(key, value)| pb::KeyValue { key, value })
                .collect(),
            more,
        })
    }

    async fn write_inner(&self, request: pb::WriteRequest) -> Result<pb::WriteResponse> {
        if request.mutations.is_empty() {
            return Err(TabletServerError::InvalidArgument(
                "a write needs at least one mutation".to_owned(),
            ));
        }
        txn::check_not_ahead("commit_above", request.commit_above)?;
        let (group, hosted) = self.locate(request.tablet.as_ref())?;
        let (request_id, _own_id) = self.request_key(request.request_id.as_ref())?;
        let mutations = checked_mutations(&hosted, request.mutations)?;
        hosted.load.writes.fetch_add(1, Ordering::Relaxed);
        let commit_ts = group
            .write(
                WriteRequest {
                    tablet_id: hosted.info.id,
                    epoch: hosted.info.epoch,
                    request_id,
                    mutations,
                    txn: None,
                },
                request.commit_above,
            )
            .await?;
        Ok(pb::WriteResponse {
            error: None,
            commit_ts,
        })
    }
}

impl TabletService {
    /// The request's id as the group's dedup key; one of this server's own when the
    /// request has none, in flight (see [`RequestIds`]) until the returned guard drops.
    fn request_key(
        &self,
        id: Option<&pb::RequestId>,
    ) -> Result<(RequestKey, Option<InFlightRequest>)> {
        let (key, own_id) = match id {
            Some(id) => (RequestKey::new(id), None),
            None => {
                let own_id = self.own_ids.start(&self.own_client_id);
                (RequestKey::new(&own_id), Some(own_id))
            }
        };
        let key = key.ok_or_else(|| {
            TabletServerError::InvalidArgument(
                "request_id needs a 16-byte client_id, and done_below at most seq".to_owned(),
            )
        })?;
        Ok((key, own_id))
    }
}

/// The mutations with their keys checked ([`storage_key`]) and their values within the
/// size limit.
fn checked_mutations(hosted: &Hosted, mutations: Vec<pb::Mutation>) -> Result<Vec<pb::Mutation>> {
    let limits = hosted.tablet.memstore().options().limits;
    mutations
        .into_iter()
        .map(|mutation| {
            let key = storage_key(hosted, &mutation.key)?;
            if mutation.op() == pb::mutation::Op::Put
                && mutation.value.len() > limits.max_value_size
            {
                return Err(TabletServerError::InvalidArgument(format!(
                    "value of {} bytes exceeds the limit of {} bytes",
                    mutation.value.len(),
                    limits.max_value_size
                )));
            }
            Ok(pb::Mutation { key, ..mutation })
        })
        .collect()
}

/// Checks a routing key (as clients send them: see `luna_proto::keys`) against the
/// collection's partitioning, the size limits and the tablet's range. The routing key is
/// also the storage key.
fn storage_key(hosted: &Hosted, key: &Bytes) -> Result<Bytes> {
    let partitioning = Partitioning::try_from(hosted.info.partitioning).unwrap_or_default();
    let limits = hosted.tablet.memstore().options().limits;
    let user_key = keys::user_key(partitioning, key).unwrap_or_default();
    if user_key.is_empty() || key.len() > limits.max_key_size {
        return Err(TabletServerError::InvalidArgument(format!(
            "keys must be 1 to {} bytes as stored (this one is {}; a hash collection adds {})",
            limits.max_key_size,
            key.len(),
            keys::HASH_PREFIX_LEN
        )));
    }
    if partitioning == Partitioning::Hash && keys::routing_key(partitioning, user_key) != key[..] {
        return Err(TabletServerError::InvalidArgument(
            "the key's hash prefix does not match its hash: send keys::routing_key(Hash, key)"
                .to_owned(),
        ));
    }
    if !hosted.tablet.range().contains(key) {
        return Err(TabletServerError::InvalidArgument(format!(
            "key is outside tablet {}: route it with the current routing table",
            hosted.info.id
        )));
    }
    Ok(key.clone())
}

/// Answers with the response, or with the typed error inside a default response, or
/// with a gRPC status for errors that are not the client's to route around.
fn respond<T: Default>(
    result: Result<T>,
    set_error: impl FnOnce(&mut T, pb::TabletError),
) -> Result<Response<T>, Status> {
    match result {
        Ok(response) => Ok(Response::new(response)),
        Err(error) => {
            let error = error.into_reply()?;
            let mut response = T::default();
            set_error(&mut response, error);
            Ok(Response::new(response))
        }
    }
}

#[tonic::async_trait]
impl tablet_server::Tablet for TabletService {
    type MultiplexStream = multiplex::ReplyStream;

    async fn multiplex(
        &self,
        request: Request<Streaming<pb::CommandBatch>>,
    ) -> Result<Response<Self::MultiplexStream>, Status> {
        let replies = multiplex::serve(
            Arc::new(self.clone()),
            request.into_inner(),
            self.stopping.clone(),
        );
        Ok(Response::new(replies))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let started = Instant::now();
        let result = self.get_inner(request.into_inner()).await;
        self.observe("get", &result, started);
        respond(result, |response, error| response.error = Some(error))
    }

    async fn batch_get(
        &self,
        request: Request<pb::BatchGetRequest>,
    ) -> Result<Response<pb::BatchGetResponse>, Status> {
        let started = Instant::now();
        let result = self.batch_get_inner(request.into_inner()).await;
        self.observe("batch_get", &result, started);
        respond(result, |response, error| response.error = Some(error))
    }

    async fn scan(
        &self,
        request: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        let started = Instant::now();
        let result = self.scan_inner(request.into_inner()).await;
        self.observe("scan", &result, started);
        respond(result, |response, error| response.error = Some(error))
    }

    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let started = Instant::now();
        let result = self.write_inner(request.into_inner()).await;
        self.observe("write", &result, started);
        respond(result, |response, error| response.error = Some(error))
    }

    async fn prewrite(
        &self,
        request: Request<pb::PrewriteRequest>,
    ) -> Result<Response<pb::PrewriteResponse>, Status> {
        let started = Instant::now();
        let result = self.prewrite_inner(request.into_inner()).await;
        self.observe("prewrite", &result, started);
        respond(result, |response, error| response.error = Some(error))
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let started = Instant::now();
        let result = self.resolve_inner(request.into_inner()).await;
        self.observe("resolve", &result, started);
        respond(result, |response, error| response.error = Some(error))
    }

    async fn check_txn(
        &self,
        request: Request<pb::CheckTxnRequest>,
    ) -> Result<Response<pb::CheckTxnResponse>, Status> {
        let started = Instant::now();
        let result = self.check_txn_inner(request.into_inner()).await;
        self.observe("check_txn", &result, started);
        respond(result, |response, error| response.error = Some(error))
    }
}
