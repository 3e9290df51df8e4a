//! The gRPC raft transport (`luna.journal.v1.RaftTransport`, tonic).
//!
//! Every server dials every peer once and keeps one long-lived bidirectional `Exchange`
//! stream to it. The links, the server and its receivers run on the node's driver thread
//! (its current-thread runtime): a peer's batch reaches the ready loop, and the loop's
//! batches reach the socket, without a wake-up of another thread. The driver's batch for a
//! peer (one per ready round) goes straight into that stream's queue, with no task in
//! between: tonic's encoder writes everything queued since its previous write at once. A
//! lost connection is redialled with backoff by the peer's connection task; messages sent
//! while it is down are dropped (raft resends what still matters).
//!
//! Raft messages are opaque `bytes` in the batch; a peer that sends garbage (undecodable
//! messages, a batch for another server) is logged and ignored.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use luna_proto::journal::raft_transport_client::RaftTransportClient;
use luna_proto::journal::raft_transport_server::{RaftTransport, RaftTransportServer};
use luna_proto::journal::{RaftAck, RaftBatch};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use super::driver::{Node, driver_runtime};
use super::partition::Partition;
use super::server::RaftConfig;
use super::transport::{Inbox, Transport};
use crate::error::JournalError;

/// Ready rounds queued for one peer before new ones are dropped (raft resends).
const PEER_QUEUE_DEPTH: usize = 4096;
/// Largest batch a server accepts: one maximal batch plus one oversized entry.
const MAX_DECODING_BYTES: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The outgoing side: one connection task per peer server.
#[derive(Debug)]
pub struct GrpcTransport {
    node_id: u64,
    /// The driver thread's runtime, which runs the links.
    runtime: Handle,
    /// Peers join and move while the server runs (a tablet server learns its groups' peers
    /// from the master), so the map changes under a lock that `send` holds only briefly.
    peers: Mutex<HashMap<u64, PeerLink>>,
    /// Peers cut off by a fault test.
    partition: Partition,
}

/// The exchange queue and connection task of one peer.
#[derive(Debug)]
struct PeerLink {
    addr: SocketAddr,
    outbound: Arc<Outbound>,
    task: AbortHandle,
}

/// The request queue of the exchange with one peer, while it is up.
type Outbound = Mutex<Option<mpsc::Sender<RaftBatch>>>;

impl GrpcTransport {
    /// Starts a connection task to each of `peers` (node id to address) for server
    /// `node_id`, on `runtime`.
    fn start(node_id: u64, peers: &HashMap<u64, SocketAddr>, runtime: Handle) -> Arc<Self> {
        let transport = Self {
            node_id,
            runtime,
            peers: Mutex::new(HashMap::new()),
            partition: Partition::default(),
        };
        for (&peer_id, &addr) in peers {
            transport.set_peer(peer_id, addr);
        }
        Arc::new(transport)
    }

    /// Adds peer `peer_id` at `addr`, or moves it there. A no-op for this server itself and
    /// for a peer already at `addr`, and, in effect, after the node stopped (a task spawned
    /// on its stopped runtime is dropped at once).
    pub fn set_peer(&self, peer_id: u64, addr: SocketAddr) {
        if peer_id == self.node_id {
            return;
        }
        // The map stays consistent under a panic elsewhere: every update is one insert.
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if peers.get(&peer_id).is_some_and(|link| link.addr == addr) {
            return;
        }
        let outbound = Arc::new(Mutex::new(None));
        let link = Link {
            peer_id,
            addr,
            outbound: Arc::clone(&outbound),
        };
        let task = self.runtime.spawn(link.run()).abort_handle();
        let new = PeerLink {
            addr,
            outbound,
            task,
        };
        if let Some(old) = peers.insert(peer_id, new) {
            old.task.abort();
        }
    }

    fn abort_links(&self) {
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        for link in peers.values() {
            link.task.abort();
        }
    }
}

impl Transport for GrpcTransport {
    fn send(&self, to: u64, messages: Vec<Bytes>) {
        if self.partition.blocks(to) {
            return;
        }
        // Cloned out so the peer map's lock is not held while queueing.
        let outbound = self
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&to)
            .map(|link| Arc::clone(&link.outbound));
        let Some(outbound) = outbound else {
            tracing::warn!(to, "no address for raft peer; dropping messages");
            return;
        };
        let outbound = outbound.lock().unwrap_or_else(PoisonError::into_inner);
        let batch = RaftBatch {
            from: self.node_id,
            to,
            messages,
        };
        match outbound.as_ref().map(|queue| queue.try_send(batch)) {
            Some(Ok(())) => {}
            Some(Err(_)) => tracing::debug!(to, "raft peer queue full or closed; dropping"),
            None => tracing::debug!(to, "raft link down; dropping messages"),
        }
    }
}

impl Drop for GrpcTransport {
    fn drop(&mut self) {
        self.abort_links();
    }
}

/// One server's connection to one peer.
struct Link {
    peer_id: u64,
    addr: SocketAddr,
    outbound: Arc<Outbound>,
}

impl Link {
    /// Keeps the exchange up until the task is aborted.
    async fn run(self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let (connected, reason) = self.exchange().await;
            // Messages sent while the link is down are dropped; raft resends what matters.
            *self.outbound.lock().unwrap_or_else(PoisonError::into_inner) = None;
            tracing::debug!(peer = self.peer_id, addr = %self.addr, reason, "raft link down");
            if connected {
                backoff = MIN_BACKOFF;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Connects, opens the exchange and publishes its queue, then waits until the link
    /// breaks. Returns whether it had connected, and why it ended.
    async fn exchange(&self) -> (bool, String) {
        let endpoint = match Endpoint::from_shared(format!("http://{}", self.addr)) {
            Ok(endpoint) => endpoint
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(3)),
            Err(e) => return (false, e.to_string()),
        };
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => return (false, e.to_string()),
        };
        let mut client =
            RaftTransportClient::new(channel).max_encoding_message_size(MAX_DECODING_BYTES);
        let (queue, outbound) = mpsc::channel::<RaftBatch>(PEER_QUEUE_DEPTH);
        let mut acks = match client.exchange(ReceiverStream::new(outbound)).await {
            Ok(response) => response.into_inner(),
            Err(e) => return (false, e.to_string()),
        };
        *self.outbound.lock().unwrap_or_else(PoisonError::into_inner) = Some(queue);
        loop {
            match acks.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return (true, "the peer ended the exchange".to_owned()),
                Err(status) => return (true, status.to_string()),
            }
        }
    }
}

/// The receiving side: delivers every batch addressed to this server to its inbox.
struct Receiver {
    node_id: u64,
    inbox: Inbox,
    partition: Partition,
}

type AckStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<RaftAck, Status>> + Send>>;

#[tonic::async_trait]
impl RaftTransport for Receiver {
    type ExchangeStream = AckStream;

    async fn exchange(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        let mut inbound = request.into_inner();
        let (node_id, inbox) = (self.node_id, self.inbox.clone());
        let partition = self.partition.clone();
        // The response half stays open while this task runs; its end tells the dialer.
        let (ack_tx, acks) = mpsc::channel::<Result<RaftAck, Status>>(1);
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(batch)) if batch.to != node_id => {
                        tracing::warn!(
                            from = batch.from,
                            to = batch.to,
                            "ignoring a raft batch for another server"
                        );
                    }
                    Ok(Some(batch)) if partition.blocks(batch.from) => {}
                    Ok(Some(batch)) => {
                        if !inbox.deliver(batch.from, batch.messages) {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        // What a peer that stops or crashes leaves: as ordinary as the
                        // dialer's "raft link down", and logged at the same level.
                        tracing::debug!(%status, "raft exchange from a peer failed");
                        break;
                    }
                }
            }
            drop(ack_tx);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(acks))))
    }
}

/// A [`Node`] connected to its peers over gRPC: the node, its transport, and its gRPC server
/// on `listener`.
#[derive(Debug)]
pub struct GrpcNode {
    node: Node,
    transport: Arc<GrpcTransport>,
    local_addr: SocketAddr,
    stop_serving: Option<oneshot::Sender<()>>,
    serving: JoinHandle<()>,
}

impl GrpcNode {
    /// Starts server `config.node_id`, serving the raft transport on `listener` and dialing
    /// `peers` (node id to address; this server's own entry is skipped). Must be called
    /// inside the tokio runtime `listener` was made on, which hands it to the node's own.
    pub fn start(
        config: RaftConfig,
        listener: TcpListener,
        peers: &HashMap<u64, SocketAddr>,
    ) -> Result<Self, JournalError> {
        let node_id = config.node_id;
        let local_addr = listener
            .local_addr()
            .map_err(|e| JournalError::io("reading the raft listener's address", e))?;
        // Moved to the driver's runtime, whose I/O driver then wakes the driver thread.
        let listener = listener
            .into_std()
            .map_err(|e| JournalError::io("moving the raft listener to its driver", e))?;
        let runtime = driver_runtime()?;
        let handle = runtime.handle().clone();
        let transport = GrpcTransport::start(node_id, peers, handle.clone());
        let node = Node::start_on(
            config,
            runtime,
            Arc::clone(&transport) as Arc<dyn Transport>,
        )?;
        let service = RaftTransportServer::new(Receiver {
            node_id,
            inbox: node.inbox(),
            partition: transport.partition.clone(),
        })
        .max_decoding_message_size(MAX_DECODING_BYTES);
        let (stop_serving, stop) = oneshot::channel::<()>();
        let serving = handle.spawn(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::error!(%error, node_id, "raft transport listener failed");
                    return;
                }
            };
            let result = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(service)
                .serve_with_incoming_shutdown(
                    // The builder's tcp_nodelay covers only sockets it binds itself: without
                    // this, small replies wait out Nagle and delayed ACKs (40 ms).
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stop.await;
                    },
                )
                .await;
            if let Err(error) = result {
                tracing::error!(%error, node_id, "raft transport server failed");
            }
        });
        Ok(Self {
            node,
            transport,
            local_addr,
            stop_serving: Some(stop_serving),
            serving,
        })
    }

    /// The node, to add streams to.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Adds peer `peer_id` at `addr`, or moves it there.
    pub fn set_peer(&self, peer_id: u64, addr: SocketAddr) {
        self.transport.set_peer(peer_id, addr);
    }

    /// The partition this server keeps (none at first): cut peers' raft messages are
    /// dropped both ways. For fault tests.
    pub fn partition(&self) -> &Partition {
        &self.transport.partition
    }

    /// The address the raft transport is served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops serving, closes the links to peers, and shuts the node down (see
    /// [`Node::shutdown`]).
    pub async fn shutdown(mut self) {
        self.stop();
        self.node.shutdown().await;
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop_serving.take() {
            let _ = stop.send(());
        }
        // Open exchanges would keep the graceful shutdown waiting; a stop is a stop.
        self.serving.abort();
        self.transport.abort_links();
    }
}

impl Drop for GrpcNode {
    fn drop(&mut self) {
        self.stop();
    }
}
