//! How raft messages leave and enter a [`Node`](super::Node).
//!
//! The driver hands a [`Transport`] every message of a ready round, grouped by destination
//! server; the transport delivers them to the peer's [`Inbox`]. Raft tolerates loss,
//! duplication and reordering, so a transport may drop what it cannot deliver: it must
//! never block the driver.
//!
//! [`MemNetwork`] is the in-process transport used by tests; `grpc` is the real one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use super::driver::{Event, Events};

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
}

impl Inbox {
    /// Delivers `messages` from server `from` to the node's driver. Returns `false` once the
    /// node has stopped, so the caller can drop its connection.
    pub fn deliver(&self, from: u64, messages: Vec<Bytes>) -> bool {
        self.events.send(Event::Messages { from, messages }).is_ok()
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
