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
/// Largest batch a server accepts: a batch of many messages is split below
/// `MAX_BATCH_BYTES`, and one larger message (a single big entry) travels alone.
const MAX_DECODING_BYTES: usize = 64 << 20;
/// Bytes of raft messages that one gRPC batch carries at most, unless a single message is
/// larger. A driver round for a peer can hold a catch-up append from each of thousands of
/// streams; sent as one message over the decoding limit it would break the link, and raft's
/// resend would break it again.
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Room a single message needs beside its entry: the envelope and raft's own fields.
const MESSAGE_OVERHEAD_BYTES: usize = 64 << 10;
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
        let Some(queue) = outbound.as_ref() else {
            tracing::debug!(to, "raft link down; dropping messages");
            return;
        };
        for messages in split_batches(messages, MAX_BATCH_BYTES) {
            let batch = RaftBatch {
                from: self.node_id,
                to,
                messages,
            };
            if queue.try_send(batch).is_err() {
                tracing::debug!(to, "raft peer queue full or closed; dropping");
                return;
            }
        }
    }
}

/// `messages` in order, in runs of at most `limit` bytes; a larger message forms a run of
/// its own.
fn split_batches(messages: Vec<Bytes>, limit: usize) -> Vec<Vec<Bytes>> {
    if messages.iter().map(Bytes::len).sum::<usize>() <= limit {
        return vec![messages];
    }
    let mut runs = Vec::new();
    let mut run = Vec::new();
    let mut run_bytes = 0;
    for message in messages {
        if !run.is_empty() && run_bytes + message.len() > limit {
            runs.push(std::mem::take(&mut run));
            run_bytes = 0;
        }
        run_bytes += message.len();
        run.push(message);
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
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
        if config.max_entry_size > MAX_DECODING_BYTES - MESSAGE_OVERHEAD_BYTES {
            return Err(JournalError::InvalidConfig {
                name: "max_entry_size",
                reason: format!(
                    "{} bytes; an entry travels in one gRPC message, at most {} bytes with its envelope",
                    config.max_entry_size, MAX_DECODING_BYTES
                ),
            });
        }
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;
    use crate::raft::driver::Event;

    proptest! {
        #[test]
        fn batches_keep_every_message_in_order_and_under_the_limit(
            sizes in proptest::collection::vec(0usize..300, 0..40),
            limit in 1usize..500,
        ) {
            let messages: Vec<Bytes> = sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| Bytes::from(vec![i as u8; size]))
                .collect();
            let runs = split_batches(messages.clone(), limit);
            prop_assert_eq!(runs.concat(), messages);
            for run in &runs {
                prop_assert!(!run.is_empty() || runs.len() == 1);
                let bytes: usize = run.iter().map(Bytes::len).sum();
                prop_assert!(bytes <= limit || run.len() == 1, "{} bytes in {:?}", bytes, run);
            }
        }
    }

    #[tokio::test]
    async fn an_entry_limit_the_transport_cannot_carry_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut config = RaftConfig::new(1, dir.path());
        config.max_entry_size = MAX_DECODING_BYTES;
        match GrpcNode::start(config, listener, &HashMap::new()) {
            Err(JournalError::InvalidConfig { name, .. }) => assert_eq!(name, "max_entry_size"),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    /// A round for one peer can exceed the decoding limit (a catch-up append from each of
    /// many streams): it must arrive, not break the link.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_larger_than_a_grpc_message_reaches_the_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (events, mut delivered) = mpsc::unbounded_channel();
        let receiver = RaftTransportServer::new(Receiver {
            node_id: 2,
            inbox: Inbox {
                events,
                counters: Default::default(),
            },
            partition: Partition::default(),
        })
        .max_decoding_message_size(MAX_DECODING_BYTES);
        let serving = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(receiver)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        let transport = GrpcTransport::start(1, &HashMap::from([(2, addr)]), Handle::current());
        let deadline = Instant::now() + Duration::from_secs(30);
        while transport.peers.lock().expect("peers")[&2]
            .outbound
            .lock()
            .expect("outbound")
            .is_none()
        {
            assert!(Instant::now() < deadline, "the link never came up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // 80 MiB in one round, above the 64 MiB a batch may have.
        let count = 80;
        let message = Bytes::from(vec![7u8; 1 << 20]);
        transport.send(2, vec![message; count]);
        let mut received = 0;
        while received < count {
            let event = tokio::time::timeout_at(deadline.into(), delivered.recv())
                .await
                .expect("every message within 30 s")
                .expect("the receiver is up");
            if let Event::Messages { from, messages, .. } = event {
                assert_eq!(from, 1);
                assert!(messages.iter().all(|m| m.len() == 1 << 20 && m[0] == 7));
                received += messages.len();
            }
        }
        assert_eq!(received, count);
        serving.abort();
    }
}
