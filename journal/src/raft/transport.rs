//! How raft messages leave and enter a [`Node`](super::Node).
//!
//! The driver hands a [`Transport`] every message of a ready round, grouped by destination
//! server; the transport delivers them to the peer's [`Inbox`]. Raft tolerates loss,
//! duplication and reordering, so a transport may drop what it cannot deliver: it must
//! never block the driver.
//!
//! [`MemNetwork`] is the in-process transport used by tests; `grpc` is the real one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use super::driver::{Counters, Event, Events};

/// Bytes of peers' messages a node holds for its driver before it drops further batches
/// (raft resends what is lost). Raft's flow control bounds each stream's share, not that of
/// thousands of streams together. The gRPC transport reads on the driver's own thread, so
/// it stops reading while the driver is busy; a transport on other threads (the in-process
/// one) would not, and the queue is one channel with the clients' events.
pub(crate) const MAX_QUEUED_PEER_BYTES: usize = 256 << 20;

/// Carries a server's raft messages to its peers.
pub trait Transport: Send + Sync + 'static {
    /// Queues `messages` (wire envelopes, see `encode_envelope`) for server `to`. Must return
    /// at once; messages that cannot be delivered are dropped (raft resends).
    fn send(&self, to: u64, messages: Vec<Bytes>);
}

/// The receiving end of a [`Node`](super::Node): a transport delivers peers' messages here.
#[derive(Clone, Debug)]
pub struct Inbox {
    pub(crate) events: Events,
    pub(crate) counters: Arc<Counters>,
}

impl Inbox {
    /// Delivers `messages` from server `from` to the node's driver, or drops them while it
    /// holds [`MAX_QUEUED_PEER_BYTES`] of peers' messages not yet handled. Returns `false`
    /// once the node has stopped, so the caller can drop its connection.
    pub fn deliver(&self, from: u64, messages: Vec<Bytes>) -> bool {
        let bytes = messages.iter().map(Bytes::len).sum();
        let queued = &self.counters.peer_bytes_queued;
        if queued.load(Ordering::Relaxed).saturating_add(bytes) > MAX_QUEUED_PEER_BYTES {
            self.counters
                .peer_batches_dropped
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                from,
                bytes,
                "the raft driver is behind on peers' messages; dropping a batch"
            );
            return !self.events.is_closed();
        }
        queued.fetch_add(bytes, Ordering::Relaxed);
        let delivered = self.events.send(Event::Messages {
            from,
            messages,
            bytes,
        });
        delivered.is_ok()
    }
}

/// An in-process network of nodes, for tests: every node's transport delivers straight to
/// the destination's inbox. Servers can be isolated and the network healed.
#[derive(Debug, Default)]
pub struct MemNetwork {
    inboxes: Mutex<HashMap<u64, Inbox>>,
    isolated: Mutex<HashSet<u64>>,
}

impl MemNetwork {
    /// An empty network.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The transport of server `from`.
    pub fn transport(self: &Arc<Self>, from: u64) -> Arc<MemTransport> {
        Arc::new(MemTransport {
            network: Arc::clone(self),
            from,
        })
    }

    /// Connects server `id`'s inbox (replacing a previous one, e.g. after a restart).
    pub fn register(&self, id: u64, inbox: Inbox) {
        lock(&self.inboxes).insert(id, inbox);
    }

    /// Drops every message to and from server `id` until [`heal`](Self::heal).
    pub fn isolate(&self, id: u64) {
        lock(&self.isolated).insert(id);
    }

    /// Ends every isolation.
    pub fn heal(&self) {
        lock(&self.isolated).clear();
    }
}

/// One server's side of a [`MemNetwork`].
#[derive(Debug)]
pub struct MemTransport {
    network: Arc<MemNetwork>,
    from: u64,
}

impl Transport for MemTransport {
    fn send(&self, to: u64, messages: Vec<Bytes>) {
        {
            let isolated = lock(&self.network.isolated);
            if isolated.contains(&self.from) || isolated.contains(&to) {
                return;
            }
        }
        let inbox = lock(&self.network.inboxes).get(&to).cloned();
        if let Some(inbox) = inbox {
            // A stopped peer drops the messages, as a crashed server would.
            inbox.deliver(self.from, messages);
        }
    }
}

/// Locks `mutex`, ignoring poison: every critical section leaves the data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;

    #[test]
    fn an_inbox_drops_batches_beyond_its_bound_until_the_driver_catches_up() {
        let (events, mut queue) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let inbox = Inbox {
            events,
            counters: Arc::clone(&counters),
        };
        let mebibyte = Bytes::from(vec![0u8; 1 << 20]);
        let fits = MAX_QUEUED_PEER_BYTES >> 20;
        for _ in 0..fits + 3 {
            assert!(inbox.deliver(2, vec![mebibyte.clone()]), "the node is up");
        }
        assert_eq!(counters.peer_batches_dropped.load(Ordering::Relaxed), 3);
        assert_eq!(
            counters.peer_bytes_queued.load(Ordering::Relaxed),
            MAX_QUEUED_PEER_BYTES
        );
        let mut queued = 0;
        while let Ok(Event::Messages { bytes, .. }) = queue.try_recv() {
            queued += 1;
            assert_eq!(bytes, 1 << 20);
        }
        assert_eq!(queued, fits);
        // What the driver does with each batch it handles.
        counters
            .peer_bytes_queued
            .fetch_sub(1 << 20, Ordering::Relaxed);
        assert!(inbox.deliver(2, vec![mebibyte.clone()]));
        assert_eq!(counters.peer_batches_dropped.load(Ordering::Relaxed), 3);
        // A stopped node tells the caller, dropped batch or not.
        drop(queue);
        assert!(!inbox.deliver(2, vec![mebibyte]));
    }
}
