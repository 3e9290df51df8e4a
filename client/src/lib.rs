//! The Rust client SDK of Luna.
//!
//! A [`Client`] talks to the master (routing, timestamps, administration) and to the tablet
//! servers (data). [`Database`] and [`Collection`] are cheap handles: a collection's routing
//! is fetched from the master on first use, cached, and refreshed when a tablet server says
//! it is stale. Requests that hit a moved tablet, a changed leader or a busy server are
//! retried with backoff until the operation deadline ([`ClientOptions::operation_timeout`]).
//!
//! ```no_run
//! use luna_client::{Client, CollectionSpec};
//!
//! # async fn example() -> Result<(), luna_client::ClientError> {
//! let client = Client::connect(["127.0.0.1:7420"]).await?;
//! client.admin().create_database("shop").await?;
//! client
//!     .admin()
//!     .create_collection("shop", "carts", CollectionSpec::range())
//!     .await?;
//!
//! let carts = client.database("shop").collection("carts");
//! carts.put("cart:1", "apples").await?;
//! assert_eq!(carts.get("cart:1").await?.as_deref(), Some(&b"apples"[..]));
//! for (key, value) in carts.scan("cart:".."cart;", 100, false).await? {
//!     println!("{key:?} = {value:?}");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees and limits
//!
//! - A single put, delete or [`WriteBatch`] within one tablet is atomic. A batch whose keys
//!   span tablets is split by tablet and the parts are sent in parallel: each part is atomic,
//!   the whole is not (see [`ClientError::BatchPartiallyApplied`]). Transactions across
//!   tablets come later.
//! - Writes carry a request id that stays the same across retries, so the server applies a
//!   retried write at most once. A write whose answer was lost until the deadline returns
//!   [`ClientError::OutcomeUnknown`].
//! - Keys are 1 to [`MAX_KEY_LEN`] bytes as stored: in hash-partitioned collections the
//!   stored key carries a 4-byte hash prefix, so user keys there may be at most
//!   `MAX_KEY_LEN - 4` bytes. Values are at most [`MAX_VALUE_LEN`] bytes. These match the
//!   storage engine's default limits and are checked before anything is sent.

#![warn(missing_docs)]

mod admin;
mod collection;
mod conn;
mod error;
mod exec;
mod mux;
mod retry;
mod routing;
mod scan;
mod snapshots;
mod tso;
mod txn;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use luna_proto::request_ids::{InFlightRequest, RequestIds};
use tonic::transport::Channel;

pub use admin::{Admin, CollectionSpec, TabletMoved};
pub use collection::{Collection, ReadOptions, WriteBatch};
pub use error::{ClientError, Result};
/// The catalog types the admin API returns, as the master sends them.
pub use luna_proto::master::{
    CollectionInfo, DatabaseInfo, GroupInfo, Partitioning, ReplicaMove, ServerInfo, TabletInfo,
    TabletMove, TabletSplit,
};
pub use txn::{DEFAULT_LOCK_TTL, Transaction, TxnFuture};

use mux::TabletConn;
use routing::RouteCache;

/// Largest key in bytes, as stored (a hash collection's stored key includes a 4-byte hash
/// prefix). Keys must also be at least one byte.
pub const MAX_KEY_LEN: usize = 4 * 1024;

/// Largest value in bytes.
pub const MAX_VALUE_LEN: usize = 8 * 1024 * 1024;

/// Timeouts and retry settings of a [`Client`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// How long to wait for a TCP/HTTP2 connection to a server.
    pub connect_timeout: Duration,
    /// How long to wait for the answer to one request before retrying it.
    pub request_timeout: Duration,
    /// How long one operation may take with all its retries; then it fails with
    /// [`ClientError::Timeout`] (or another typed error saying what failed last).
    pub operation_timeout: Duration,
    /// Upper bound of the first backoff between retries; it doubles with each retry.
    pub min_backoff: Duration,
    /// Upper bound of any backoff between retries.
    pub max_backoff: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl ClientOptions {
    /// Sets [`ClientOptions::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`ClientOptions::request_timeout`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`ClientOptions::operation_timeout`].
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets the backoff bounds: the first wait is at most `min`, no wait exceeds `max`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self
    }
}

/// A connection to a Luna universe. Cloning is cheap and shares connections and routing.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What every handle of one client shares.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) options: ClientOptions,
    /// Master addresses as given, for messages.
    pub(crate) masters: Vec<String>,
    /// The same, as URIs.
    pub(crate) master_uris: Vec<String>,
    /// The URI of the master that answered last: a listed one, or the leader a listed
    /// replica named.
    pub(crate) preferred_master: Mutex<String>,
    /// One channel per server address.
    pub(crate) channels: Mutex<HashMap<String, Channel>>,
    /// One multiplexed stream per tablet server address.
    pub(crate) tablet_conns: Mutex<HashMap<String, TabletConn>>,
    /// Tablet servers that just failed at the transport level, and when (see
    /// [`Inner::mark_unreachable`]).
    pub(crate) unreachable: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Random, identifies this client's writes for deduplication.
    client_id: Bytes,
    request_ids: Arc<RequestIds>,
    /// Counts operations, to vary their backoff jitter.
    next_op: AtomicU64,
    /// The largest timestamp this client has seen: commit timestamps it was answered with,
    /// and timestamps the TSO gave it. Timestamps it asks for later are above it, so its
    /// next snapshot includes its own commits; its plain writes commit above it, so a
    /// snapshot it took before a write does not see the write.
    max_seen_ts: AtomicU64,
    /// Callers waiting for timestamps.
    timestamps: tso::TimestampQueue,
    /// Open transactions' and snapshots' holds on the GC safe point.
    snapshot_holds: snapshots::SnapshotHolds,
    /// Per (database, collection).
    routes: Mutex<HashMap<(String, String), Arc<RouteCache>>>,
}

impl Inner {
    /// Checks and keeps the master addresses; connects nothing yet.
    pub(crate) fn new<I, S>(master_addrs: I, options: ClientOptions) -> Result<Inner>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let masters: Vec<String> = master_addrs
            .into_iter()
            .map(|addr| addr.as_ref().trim().to_string())
            .collect();
        if masters.is_empty() {
            return Err(ClientError::invalid(
                "no master address given: pass host:port (default 127.0.0.1:7420), or set --master or LUNA_MASTER",
            ));
        }
        let master_uris = masters
            .iter()
            .map(|addr| conn::normalize_addr(addr))
            .collect::<Result<Vec<_>>>()?;
        Ok(Inner {
            options,
            masters,
            preferred_master: Mutex::new(master_uris[0].clone()),
            master_uris,
            channels: Mutex::new(HashMap::new()),
            tablet_conns: Mutex::new(HashMap::new()),
            unreachable: Mutex::new(HashMap::new()),
            client_id: Bytes::copy_from_slice(uuid::Uuid::new_v4().as_bytes()),
            request_ids: Arc::default(),
            next_op: AtomicU64::new(0),
            max_seen_ts: AtomicU64::new(0),
            timestamps: tso::TimestampQueue::default(),
            snapshot_holds: snapshots::SnapshotHolds::default(),
            routes: Mutex::new(HashMap::new()),
        })
    }

    /// Notes a timestamp this client saw: a commit timestamp a server answered with, or one
    /// from the TSO (see `max_seen_ts`).
    pub(crate) fn saw_timestamp(&self, ts: u64) {
        self.max_seen_ts.fetch_max(ts, Ordering::Relaxed);
    }

    /// The largest timestamp this client has seen.
    pub(crate) fn max_seen_ts(&self) -> u64 {
        self.max_seen_ts.load(Ordering::Relaxed)
    }

    /// This client's random id.
    pub(crate) fn client_id(&self) -> &[u8] {
        &self.client_id
    }

    /// A new request id for one write (its retries reuse it), in flight until dropped.
    pub(crate) fn next_request_id(&self) -> InFlightRequest {
        self.request_ids.start(&self.client_id)
    }

    /// A seed for one operation's backoff jitter: differs between clients and operations.
    pub(crate) fn next_seed(&self) -> u64 {
        let mut id = [0u8; 8];
        for (slot, byte) in id.iter_mut().zip(self.client_id.iter()) {
            *slot = *byte;
        }
        u64::from_le_bytes(id) ^ self.next_op.fetch_add(1, Ordering::Relaxed).rotate_left(32)
    }

    pub(crate) fn route_cache(&self, database: &str, collection: &str) -> Arc<RouteCache> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes
            .entry((database.to_string(), collection.to_string()))
            .or_insert_with(|| Arc::new(RouteCache::new(database, collection)))
            .clone()
    }

    /// Forgets the routing of one collection (after dropping it), or of all collections of
    /// a database when `collection` is `None`.
    pub(crate) fn forget_routes(&self, database: &str, collection: Option<&str>) {
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        for ((db, coll), cache) in routes.iter() {
            if db == database && collection.is_none_or(|name| name == coll) {
                cache.clear();
            }
        }
    }
}

impl Client {
    /// Connects to the master at the first of `master_addrs` that accepts a connection, with
    /// default options. Addresses are `host:port` or `http://host:port`.
    ///
    /// Fails with [`ClientError::MasterUnreachable`] if none does, and with
    /// [`ClientError::InvalidArgument`] if the list is empty or an address is malformed.
    pub async fn connect<I, S>(master_addrs: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Client::connect_with(master_addrs, ClientOptions::default()).await
    }

    /// [`Client::connect`] with explicit options. Each address is tried once, in order,
    /// with [`ClientOptions::connect_timeout`]; later calls fail over between them.
    pub async fn connect_with<I, S>(master_addrs: I, options: ClientOptions) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let inner = Inner::new(master_addrs, options)?;
        let mut failures = Vec::new();
        for uri in &inner.master_uris {
            match inner.connect_now(uri).await {
                Ok(()) => {
                    inner.prefer_master(uri);
                    return Ok(Client {
                        inner: Arc::new(inner),
                    });
                }
                Err(detail) => failures.push(format!("{uri}: {detail}")),
            }
        }
        Err(ClientError::MasterUnreachable {
            addrs: inner.masters.clone(),
            detail: failures.join("; "),
        })
    }

    /// A handle to database `name`. Nothing is checked until it is used.
    pub fn database(&self, name: &str) -> Database {
        Database {
            client: self.clone(),
            name: name.to_string(),
        }
    }

    /// The administration API: databases, collections, servers, groups, tablets.
    pub fn admin(&self) -> Admin {
        Admin::new(self.inner.clone())
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }
}

/// A handle to one database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    client: Client,
    name: String,
}

impl Database {
    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle to collection `name` of this database. Handles to the same collection share
    /// one routing cache; nothing is fetched until the first request.
    pub fn collection(&self, name: &str) -> Collection {
        let cache = self.client.inner.route_cache(&self.name, name);
        Collection::new(self.client.inner.clone(), cache)
    }
}
