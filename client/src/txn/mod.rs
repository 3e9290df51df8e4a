//! Snapshot-isolated transactions across the collections of one database
//! (docs/transactions.md).
//!
//! A transaction reads at its start timestamp and buffers its writes here; nothing reaches a
//! server before [`Transaction::commit`]. A commit whose writes all live in one tablet group
//! is one request and one journal entry (one-phase). Otherwise it is Percolator's two
//! phases: lock every key (prewrite), take a commit timestamp, commit the primary key (the
//! point of no return), then the other keys in the background.

mod commit;
pub(crate) mod resolve;

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::RangeBounds;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use luna_proto::keys;

use crate::collection::{Collection, ReadOptions, check_value, checked_routing_key};
use crate::error::{ClientError, Result};
use crate::retry::{Backoff, Deadline};
use crate::snapshots::SnapshotHold;
use crate::{Client, Database};

/// How long a transaction's locks outlive its prewrite if it does not commit: then any
/// reader or writer that meets them may roll it back, and the commit fails with
/// [`ClientError::TxnAborted`]. The TTL sent is this plus the time the transaction ran
/// before it committed, since servers measure it from the start timestamp.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(3);

/// The longest TTL servers accept.
const MAX_LOCK_TTL: Duration = Duration::from_secs(600);

/// What the body of [`Database::transaction`] returns: a boxed future that may borrow the
/// transaction.
pub type TxnFuture<'t, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 't>>;

/// Attempts [`Database::transaction`] makes before it returns the last conflict.
const MAX_ATTEMPTS: u32 = 10;

/// Where a transaction is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active,
    Committed,
    RolledBack,
}

/// A buffered write: a value, or `None` for a delete.
type Buffered = Option<Bytes>;

/// A transaction on one database. Reads see the snapshot at [`Transaction::start_ts`] plus
/// the transaction's own writes; writes are buffered until [`Transaction::commit`].
///
/// Dropping an active transaction without committing it sends nothing: it never wrote
/// anything to a server, so there is nothing to roll back.
#[derive(Debug)]
pub struct Transaction {
    client: Client,
    database: String,
    start_ts: u64,
    read_only: bool,
    state: State,
    /// By (collection, user key).
    writes: BTreeMap<(String, Bytes), Buffered>,
    /// When it began here, to measure how long it has run.
    began: Instant,
    /// Keeps the versions this transaction reads from being garbage-collected.
    _hold: SnapshotHold,
}

impl Database {
    /// Begins a read-write transaction at a fresh timestamp from the master.
    pub async fn begin(&self) -> Result<Transaction> {
        let start_ts = self.client.timestamp().await?;
        Ok(self.transaction_at(start_ts, false))
    }

    /// Begins a read-only transaction at `read_ts` (for example a timestamp from
    /// [`Client::timestamp`] taken earlier): every read sees that one snapshot, and writes
    /// are refused.
    pub fn read_only_at(&self, read_ts: u64) -> Transaction {
        self.transaction_at(read_ts, true)
    }

    fn transaction_at(&self, start_ts: u64, read_only: bool) -> Transaction {
        Transaction {
            client: self.client.clone(),
            database: self.name().to_owned(),
            start_ts,
            read_only,
            state: State::Active,
            writes: BTreeMap::new(),
            began: Instant::now(),
            _hold: self.client.inner.hold_snapshot(start_ts),
        }
    }

    /// Runs `body` in a transaction and commits it; on a conflict ([`ClientError::is_conflict`])
    /// runs it again in a new transaction, with backoff, up to 10 times. Returns what `body`
    /// returned, with the commit timestamp. An error from `body` rolls the transaction back and
    /// is returned as is.
    ///
    /// `body` returns a boxed future, so that the whole call can be spawned on a runtime:
    ///
    /// ```no_run
    /// # async fn example(db: luna_client::Database) -> luna_client::Result<()> {
    /// let accounts = db.collection("accounts");
    /// let (moved, _commit_ts) = db
    ///     .transaction(|txn| {
    ///         let accounts = accounts.clone();
    ///         Box::pin(async move {
    ///             let from = txn.get(&accounts, "alice").await?;
    ///             txn.put(&accounts, "bob", from.unwrap_or_default())?;
    ///             Ok(true)
    ///         })
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn transaction<T, F>(&self, mut body: F) -> Result<(T, u64)>
    where
        F: for<'t> FnMut(&'t mut Transaction) -> TxnFuture<'t, T>,
    {
        let options = self.client.options();
        let mut backoff = Backoff::new(options, self.client.inner.next_seed());
        let mut attempt = 1;
        loop {
            let mut txn = self.begin().await?;
            let outcome = match body(&mut txn).await {
                Ok(value) => txn.commit().await.map(|commit_ts| (value, commit_ts)),
                Err(error) => Err(error),
            };
            match outcome {
                Ok(done) => return Ok(done),
                Err(error) if error.is_conflict() && attempt < MAX_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

impl Transaction {
    /// The snapshot the transaction reads at.
    pub fn start_ts(&self) -> u64 {
        self.start_ts
    }

    /// The TTL of the locks a prewrite takes now: [`DEFAULT_LOCK_TTL`] from now on, counted
    /// from the start timestamp as servers do.
    fn lock_ttl_ms(&self) -> u64 {
        let ttl = (self.began.elapsed() + DEFAULT_LOCK_TTL).min(MAX_LOCK_TTL);
        u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
    }

    fn check_active(&self) -> Result<()> {
        match self.state {
            State::Active => Ok(()),
            State::Committed => Err(ClientError::TxnFinished { state: "committed" }),
            State::RolledBack => Err(ClientError::TxnFinished {
                state: "rolled back",
            }),
        }
    }

    fn check_collection(&self, collection: &Collection) -> Result<()> {
        if collection.database() != self.database {
            return Err(ClientError::CrossDatabase {
                transaction: self.database.clone(),
                database: collection.database().to_owned(),
                collection: collection.name().to_owned(),
            });
        }
        Ok(())
    }

    fn check_writable(&self, collection: &Collection, key: &[u8]) -> Result<()> {
        self.check_active()?;
        self.check_collection(collection)?;
        if self.read_only {
            return Err(ClientError::invalid(
                "a read-only transaction cannot write: use Database::begin",
            ));
        }
        if key.is_empty() {
            return Err(ClientError::invalid("keys must be at least 1 byte"));
        }
        Ok(())
    }

    fn snapshot(&self) -> ReadOptions {
        ReadOptions::leader().at(self.start_ts)
    }

    /// The value at `key` in `collection`: the transaction's own write if it made one, else
    /// what the snapshot holds.
    pub async fn get(
        &self,
        collection: &Collection,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<Bytes>> {
        self.check_active()?;
        self.check_collection(collection)?;
        let key = key.as_ref();
        if let Some(buffered) = self
            .writes
            .get(&(collection.name().to_owned(), Bytes::copy_from_slice(key)))
        {
            return Ok(buffered.clone());
        }
        collection.get_with(key, &self.snapshot()).await
    }

    /// Up to `limit` pairs with keys in `range` of `collection`, ascending, as the snapshot
    /// holds them with the transaction's own writes applied. Like
    /// [`Collection::scan_with`], a hash-partitioned collection can only be scanned whole,
    /// in hash order.
    pub async fn scan<R, K>(
        &self,
        collection: &Collection,
        range: R,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>>
    where
        R: RangeBounds<K> + Clone,
        K: AsRef<[u8]> + ?Sized,
    {
        self.check_active()?;
        self.check_collection(collection)?;
        let in_range = |key: &Bytes| {
            let key: &[u8] = key.as_ref();
            let start_ok = match range.start_bound() {
                std::ops::Bound::Included(start) => key >= start.as_ref(),
                std::ops::Bound::Excluded(start) => key > start.as_ref(),
                std::ops::Bound::Unbounded => true,
            };
            let end_ok = match range.end_bound() {
                std::ops::Bound::Included(end) => key <= end.as_ref(),
                std::ops::Bound::Excluded(end) => key < end.as_ref(),
                std::ops::Bound::Unbounded => true,
            };
            start_ok && end_ok
        };
        let own: Vec<(&Bytes, &Buffered)> = self
            .writes
            .iter()
            .filter(|((name, key), _)| name == collection.name() && in_range(key))
            .map(|((_, key), value)| (key, value))
            .collect();
        // Own deletes may hide stored pairs: read that many more.
        let deletes = own.iter().filter(|(_, value)| value.is_none()).count();
        let stored = collection
            .scan_with(
                range.clone(),
                limit.saturating_add(deletes),
                false,
                &self.snapshot(),
            )
            .await?;
        let deadline = Deadline::after(self.client.options().operation_timeout);
        let partitioning = collection.table(&deadline).await?.partitioning;
        let mut merged: BTreeMap<Vec<u8>, (Bytes, Bytes)> = stored
            .into_iter()
            .map(|(key, value)| (keys::routing_key(partitioning, &key), (key, value)))
            .collect();
        for (key, value) in own {
            let routed = keys::routing_key(partitioning, key);
            match value {
                Some(value) => {
                    merged.insert(routed, (key.clone(), value.clone()));
                }
                None => {
                    merged.remove(&routed);
                }
            }
        }
        Ok(merged.into_values().take(limit).collect())
    }

    /// Buffers a write of `value` at `key` in `collection`.
    pub fn put(
        &mut self,
        collection: &Collection,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<()> {
        let key = key.into();
        let value = value.into();
        self.check_writable(collection, &key)?;
        check_value(&value)?;
        self.writes
            .insert((collection.name().to_owned(), key), Some(value));
        Ok(())
    }

    /// Buffers a delete of `key` in `collection`.
    pub fn delete(&mut self, collection: &Collection, key: impl Into<Bytes>) -> Result<()> {
        let key = key.into();
        self.check_writable(collection, &key)?;
        self.writes
            .insert((collection.name().to_owned(), key), None);
        Ok(())
    }

    /// Commits the transaction's writes and returns the commit timestamp (the start
    /// timestamp for a transaction that wrote nothing). Fails with [`ClientError::Conflict`]
    /// if another transaction committed one of its keys after it started or holds a lock on
    /// one, and with [`ClientError::TxnAborted`] if it was rolled back meanwhile; in both
    /// cases nothing was written, and running the transaction again may succeed.
    pub async fn commit(&mut self) -> Result<u64> {
        self.check_active()?;
        if self.writes.is_empty() {
            self.state = State::Committed;
            return Ok(self.start_ts);
        }
        let writes = std::mem::take(&mut self.writes);
        let mut routed = Vec::with_capacity(writes.len());
        let deadline = Deadline::after(self.client.options().operation_timeout);
        for ((name, key), value) in writes {
            let collection = self.client.database(&self.database).collection(&name);
            let table = collection.table(&deadline).await?;
            let routing_key = checked_routing_key(table.partitioning, &key)?;
            routed.push((collection, routing_key, value));
        }
        let result = commit::commit(self, routed, &deadline).await;
        if let Ok(commit_ts) = result {
            self.client.inner.saw_timestamp(commit_ts);
        }
        self.state = match result {
            Ok(_) => State::Committed,
            Err(_) => State::RolledBack,
        };
        result
    }

    /// Discards the transaction's writes. Nothing was sent before a commit, so nothing is
    /// sent now either.
    pub fn rollback(&mut self) -> Result<()> {
        self.check_active()?;
        self.writes.clear();
        self.state = State::RolledBack;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{ClientOptions, Inner};

    #[tokio::test]
    async fn locks_live_a_ttl_past_the_prewrite_however_long_the_transaction_ran() {
        let inner = Inner::new(["127.0.0.1:1"], ClientOptions::default()).expect("client");
        let client = Client {
            inner: Arc::new(inner),
        };
        let mut txn = client.database("d").read_only_at(5);
        let fresh = txn.lock_ttl_ms();
        assert!((3000..3100).contains(&fresh), "{fresh}");
        txn.began = Instant::now() - Duration::from_secs(5);
        let ttl = txn.lock_ttl_ms();
        assert!((8000..8100).contains(&ttl), "{ttl}");
        // Instants count from boot: a machine up for less than this cannot go back so far.
        if let Some(long_ago) = Instant::now().checked_sub(Duration::from_secs(700)) {
            txn.began = long_ago;
            assert_eq!(txn.lock_ttl_ms(), 600_000, "capped at what servers accept");
        }
    }
}
