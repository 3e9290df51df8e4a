//! Data operations on one collection: point reads and writes, batches.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;
use luna_proto::keys;
use luna_proto::master::Partitioning;
use luna_proto::request_ids::InFlightRequest;
use luna_proto::tablet as pb;

use crate::error::{ClientError, Result};
use crate::exec::{Access, CallSpec, LiveLock, Locate, Outcome, on_tablet};
use crate::retry::Deadline;
use crate::routing::{RouteCache, RouteTable, TabletEntry};
use crate::{Inner, MAX_KEY_LEN, MAX_VALUE_LEN};

/// How a read is made consistent. The default reads on the group leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadOptions {
    mode: ReadMode,
    read_ts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ReadMode {
    #[default]
    Leader,
    Follower,
    Stale,
}

impl ReadOptions {
    /// On the group leader: linearizable, the newest data.
    pub fn leader() -> Self {
        ReadOptions::default()
    }

    /// On any replica after a ReadIndex round with the leader: linearizable, and spreads
    /// load over replicas.
    pub fn follower() -> Self {
        ReadOptions {
            mode: ReadMode::Follower,
            read_ts: 0,
        }
    }

    /// On any replica at `read_ts` without asking the leader: sees what that replica has
    /// applied, which may be behind. `read_ts` comes from [`Client::timestamp`](crate::Client::timestamp)
    /// or a commit timestamp; reads below the GC safe point fail with
    /// [`ClientError::SnapshotTooOld`].
    pub fn stale(read_ts: u64) -> Self {
        ReadOptions {
            mode: ReadMode::Stale,
            read_ts,
        }
    }

    /// Reads the snapshot at `read_ts` instead of the newest data (leader and follower reads).
    pub fn at(mut self, read_ts: u64) -> Self {
        self.read_ts = read_ts;
        self
    }

    /// The snapshot timestamp; 0 means the newest data.
    pub fn read_ts(&self) -> u64 {
        self.read_ts
    }

    pub(crate) fn access(&self) -> Access {
        match self.mode {
            ReadMode::Leader => Access::Leader,
            ReadMode::Follower | ReadMode::Stale => Access::AnyReplica,
        }
    }

    pub(crate) fn to_proto(self) -> Result<pb::ReadOptions> {
        let mode = match self.mode {
            ReadMode::Leader => pb::ReadMode::Leader,
            ReadMode::Follower => pb::ReadMode::Follower,
            ReadMode::Stale => pb::ReadMode::Stale,
        };
        if self.mode == ReadMode::Stale && self.read_ts == 0 {
            return Err(ClientError::invalid(
                "a stale read needs a timestamp: use ReadOptions::stale(ts) with ts from Client::timestamp",
            ));
        }
        Ok(pb::ReadOptions {
            mode: mode.into(),
            read_ts: self.read_ts,
        })
    }
}

/// Puts and deletes applied together. Atomic when all keys live in one tablet; a batch
/// spanning tablets is split by tablet and is atomic per tablet only. Later mutations of
/// the same key win.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    mutations: Vec<pb::Mutation>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        WriteBatch::default()
    }

    /// Adds a put of `value` at `key`.
    pub fn put(&mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> &mut Self {
        self.mutations.push(pb::Mutation {
            op: pb::mutation::Op::Put.into(),
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Adds a delete of `key`.
    pub fn delete(&mut self, key: impl Into<Bytes>) -> &mut Self {
        self.mutations.push(pb::Mutation {
            op: pb::mutation::Op::Delete.into(),
            key: key.into(),
            value: Bytes::new(),
        });
        self
    }

    /// Mutations in the batch.
    pub fn len(&self) -> usize {
        self.mutations.len()
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.mutations.is_empty()
    }
}

/// A handle to one collection. Cheap to clone; all handles to a collection share its
/// routing cache.
#[derive(Debug, Clone)]
pub struct Collection {
    pub(crate) inner: Arc<Inner>,
    pub(crate) cache: Arc<RouteCache>,
}

/// The stored (routing) key of user key `key`, after checking its size.
pub(crate) fn checked_routing_key(partitioning: Partitioning, key: &[u8]) -> Result<Bytes> {
    if key.is_empty() {
        return Err(ClientError::invalid("keys must be at least 1 byte"));
    }
    let routed = keys::routing_key(partitioning, key);
    if routed.len() > MAX_KEY_LEN {
        let limit = MAX_KEY_LEN - (routed.len() - key.len());
        return Err(ClientError::invalid(format!(
            "key of {} bytes exceeds the limit of {limit} bytes{}",
            key.len(),
            if partitioning == Partitioning::Hash {
                " (hash-partitioned collections keep 4 of the 4096 bytes for the hash prefix)"
            } else {
                ""
            }
        )));
    }
    Ok(Bytes::from(routed))
}

/// The checks that need no routing: a key is never empty nor longer than [`MAX_KEY_LEN`].
fn precheck_key(key: &[u8]) -> Result<()> {
    if key.len() > MAX_KEY_LEN {
        // Same message as after routing.
        return checked_routing_key(Partitioning::Range, key).map(|_| ());
    }
    if key.is_empty() {
        return Err(ClientError::invalid("keys must be at least 1 byte"));
    }
    Ok(())
}

pub(crate) fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(ClientError::invalid(format!(
            "value of {} bytes exceeds the limit of {MAX_VALUE_LEN} bytes (8 MiB); split it over several keys",
            value.len()
        )));
    }
    Ok(())
}

/// Splits `items` by the tablet that holds each one's routing key, keeping their order
/// within each part. Keys that no cached tablet holds form one part of their own, which
/// the retry loop sends after refreshing the routing.
pub(crate) fn split_by_tablet<T>(
    table: &RouteTable,
    items: Vec<T>,
    key: impl Fn(&T) -> &[u8],
) -> Vec<Vec<T>> {
    let mut parts: Vec<(Option<u64>, Vec<T>)> = Vec::new();
    for item in items {
        let tablet = table.locate(key(&item)).map(|tablet| tablet.id);
        match parts.iter_mut().find(|(id, _)| *id == tablet) {
            Some((_, part)) => part.push(item),
            None => parts.push((tablet, vec![item])),
        }
    }
    parts.into_iter().map(|(_, part)| part).collect()
}

/// Whether every key is inside `tablet`.
fn all_within<'a>(mut keys: impl Iterator<Item = &'a [u8]>, tablet: &TabletEntry) -> bool {
    keys.all(|key| tablet.contains(key))
}

impl Collection {
    pub(crate) fn new(inner: Arc<Inner>, cache: Arc<RouteCache>) -> Self {
        Collection { inner, cache }
    }

    /// The database's name.
    pub fn database(&self) -> &str {
        &self.cache.database
    }

    /// The collection's name.
    pub fn name(&self) -> &str {
        &self.cache.collection
    }

    pub(crate) fn deadline(&self) -> Deadline {
        Deadline::after(self.inner.options.operation_timeout)
    }

    pub(crate) async fn table(&self, deadline: &Deadline) -> Result<Arc<RouteTable>> {
        self.cache.table(&self.inner, deadline).await
    }

    /// The value at `key`, read on the leader; `None` if there is none.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.get_with(key, &ReadOptions::default()).await
    }

    /// The value at `key`, read as `options` say.
    pub async fn get_with(
        &self,
        key: impl AsRef<[u8]>,
        options: &ReadOptions,
    ) -> Result<Option<Bytes>> {
        precheck_key(key.as_ref())?;
        let deadline = self.deadline();
        let read = options.to_proto()?;
        let table = self.table(&deadline).await?;
        let routed = checked_routing_key(table.partitioning, key.as_ref())?;
        let spec = CallSpec {
            operation: "get",
            access: options.access(),
            is_write: false,
            read_ts: options.read_ts,
            locate: Locate::Key(&routed),
            fits: None,
            live_lock: LiveLock::Wait,
            names_other_tablets: false,
        };
        let outcome = on_tablet(&self.inner, &self.cache, &spec, &deadline, |target| {
            let request = pb::GetRequest {
                tablet: Some(target.tablet),
                key: routed.clone(),
                options: Some(read),
            };
            async move {
                let response = target.client.get(request).await?;
                let value = response.found.then_some(response.value);
                Ok((response.error, value))
            }
        })
        .await?;
        match outcome {
            Outcome::Done(value) => Ok(value),
            Outcome::Resplit => Err(ClientError::protocol("a single key cannot span tablets")),
        }
    }

    /// Writes `value` at `key`. Returns the commit timestamp.
    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<u64> {
        let mut batch = WriteBatch::new();
        batch.put(key, value);
        self.write(batch, "put").await
    }

    /// Deletes `key` (deleting a missing key is not an error). Returns the commit timestamp.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<u64> {
        let mut batch = WriteBatch::new();
        batch.delete(key);
        self.write(batch, "delete").await
    }

    /// Applies `batch`: atomically if its keys live in one tablet. Otherwise it is split by
    /// tablet and the parts are sent in parallel, each atomic on its own but not together
    /// (transactions across tablets come later); if some parts fail after others were
    /// applied the error is [`ClientError::BatchPartiallyApplied`].
    ///
    /// Returns the largest commit timestamp of the parts, so a read at it sees the whole
    /// batch; an empty batch does nothing and returns 0.
    pub async fn batch(&self, batch: WriteBatch) -> Result<u64> {
        self.write(batch, "batch").await
    }

    async fn write(&self, batch: WriteBatch, operation: &'static str) -> Result<u64> {
        if batch.is_empty() {
            return Ok(0);
        }
        // Bad input fails before any network round trip.
        for mutation in &batch.mutations {
            precheck_key(&mutation.key)?;
            check_value(&mutation.value)?;
        }
        let deadline = self.deadline();
        let mut table = self.table(&deadline).await?;
        let mut mutations = Vec::with_capacity(batch.mutations.len());
        for mut mutation in batch.mutations {
            mutation.key = checked_routing_key(table.partitioning, &mutation.key)?;
            mutations.push(mutation);
        }
        let mut pending = split_by_tablet(&table, mutations, |mutation| &mutation.key);
        let mut applied = Vec::new();
        let mut failed = Vec::new();
        while !pending.is_empty() {
            let parts = pending.into_iter().map(|part| {
                let request_id = self.inner.next_request_id();
                self.write_part(part, request_id, operation, &deadline)
            });
            let mut resplit = Vec::new();
            for (part, result) in join_all(parts).await {
                match result {
                    Ok(Outcome::Done(commit_ts)) => applied.push(commit_ts),
                    Ok(Outcome::Resplit) => resplit.extend(part),
                    Err(error) => failed.push(error),
                }
            }
            pending = Vec::new();
            if !resplit.is_empty() {
                // The routing changed under the batch; split what is left again, with new
                // request ids since the parts are new requests.
                table = self.table(&deadline).await?;
                pending = split_by_tablet(&table, resplit, |mutation| &mutation.key);
            }
        }
        let parts = applied.len() + failed.len();
        let mut failed = failed.into_iter();
        if let Some(&newest) = applied.iter().max() {
            self.inner.saw_timestamp(newest);
        }
        match failed.next() {
            None => Ok(applied.into_iter().max().unwrap_or(0)),
            Some(first_error) if !applied.is_empty() => Err(ClientError::BatchPartiallyApplied {
                applied: applied.len(),
                parts,
                first_error: Box::new(first_error),
            }),
            Some(first_error) => Err(first_error),
        }
    }

    /// Sends one part of a batch (keys in one tablet) with one request id for all retries.
    /// Gives the mutations back if they no longer fit in one tablet.
    async fn write_part(
        &self,
        mutations: Vec<pb::Mutation>,
        request_id: InFlightRequest,
        operation: &'static str,
        deadline: &Deadline,
    ) -> (Vec<pb::Mutation>, Result<Outcome<u64>>) {
        let Some(first_key) = mutations.first().map(|mutation| mutation.key.clone()) else {
            return (mutations, Ok(Outcome::Done(0)));
        };
        let fits = |tablet: &TabletEntry| {
            all_within(
                mutations.iter().map(|mutation| mutation.key.as_ref()),
                tablet,
            )
        };
        let spec = CallSpec {
            operation,
            access: Access::Leader,
            is_write: true,
            read_ts: 0,
            locate: Locate::Key(&first_key),
            fits: Some(&fits),
            live_lock: LiveLock::Wait,
            names_other_tablets: false,
        };
        let result = on_tablet(&self.inner, &self.cache, &spec, deadline, |target| {
            let request = pb::WriteRequest {
                tablet: Some(target.tablet),
                request_id: Some(request_id.clone()),
                mutations: mutations.clone(),
                commit_above: self.inner.max_seen_ts(),
            };
            async move {
                let response = target.client.write(request).await?;
                Ok((response.error, response.commit_ts))
            }
        })
        .await;
        (mutations, result)
    }

    /// The values at `keys`, in the same order, read on the leaders.
    pub async fn batch_get<I, K>(&self, keys: I) -> Result<Vec<Option<Bytes>>>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        self.batch_get_with(keys, &ReadOptions::default()).await
    }

    /// The values at `keys`, in the same order, read as `options` say. Keys are grouped by
    /// tablet and the tablets are asked in parallel.
    pub async fn batch_get_with<I, K>(
        &self,
        keys: I,
        options: &ReadOptions,
    ) -> Result<Vec<Option<Bytes>>>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        let deadline = self.deadline();
        let read = options.to_proto()?;
        let mut table = self.table(&deadline).await?;
        let mut wanted = Vec::new();
        for (index, key) in keys.into_iter().enumerate() {
            wanted.push((
                index,
                checked_routing_key(table.partitioning, key.as_ref())?,
            ));
        }
        let mut values = vec![None; wanted.len()];
        let mut pending = split_by_tablet(&table, wanted, |(_, key)| key);
        while !pending.is_empty() {
            let parts = pending
                .into_iter()
                .map(|part| self.batch_get_part(part, options, read, &deadline));
            let mut resplit = Vec::new();
            for (part, result) in join_all(parts).await {
                match result? {
                    Outcome::Done(found) => {
                        for ((index, _), value) in part.into_iter().zip(found) {
                            if let Some(slot) = values.get_mut(index) {
                                *slot = value;
                            }
                        }
                    }
                    Outcome::Resplit => resplit.extend(part),
                }
            }
            pending = Vec::new();
            if !resplit.is_empty() {
                table = self.table(&deadline).await?;
                pending = split_by_tablet(&table, resplit, |(_, key)| key);
            }
        }
        Ok(values)
    }

    async fn batch_get_part(
        &self,
        part: Vec<(usize, Bytes)>,
        options: &ReadOptions,
        read: pb::ReadOptions,
        deadline: &Deadline,
    ) -> (Vec<(usize, Bytes)>, Result<Outcome<Vec<Option<Bytes>>>>) {
        let Some(first_key) = part.first().map(|(_, key)| key.clone()) else {
            return (part, Ok(Outcome::Done(Vec::new())));
        };
        let keys: Vec<Bytes> = part.iter().map(|(_, key)| key.clone()).collect();
        let fits = |tablet: &TabletEntry| all_within(keys.iter().map(|key| key.as_ref()), tablet);
        let spec = CallSpec {
            operation: "batch_get",
            access: options.access(),
            is_write: false,
            read_ts: options.read_ts,
            locate: Locate::Key(&first_key),
            fits: Some(&fits),
            live_lock: LiveLock::Wait,
            names_other_tablets: false,
        };
        let result = on_tablet(&self.inner, &self.cache, &spec, deadline, |target| {
            let request = pb::BatchGetRequest {
                tablet: Some(target.tablet),
                keys: keys.clone(),
                options: Some(read),
            };
            let expected = keys.len();
            async move {
                let response = target.client.batch_get(request).await?;
                if response.error.is_none() && response.lookups.len() != expected {
                    return Err(tonic::Status::internal(format!(
                        "BatchGet answered {} lookups for {expected} keys",
                        response.lookups.len()
                    )));
                }
                let values = response
                    .lookups
                    .into_iter()
                    .map(|lookup| lookup.found.then_some(lookup.value))
                    .collect();
                Ok((response.error, values))
            }
        })
        .await;
        (part, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_against_the_stored_size() {
        assert!(checked_routing_key(Partitioning::Range, b"").is_err());
        let long = vec![b'k'; MAX_KEY_LEN];
        assert!(checked_routing_key(Partitioning::Range, &long).is_ok());
        assert!(checked_routing_key(Partitioning::Range, &[b'k'; MAX_KEY_LEN + 1]).is_err());
        let error = checked_routing_key(Partitioning::Hash, &long).err();
        assert!(
            matches!(&error, Some(ClientError::InvalidArgument { message }) if message.contains("4092")),
            "{error:?}"
        );
        assert!(checked_routing_key(Partitioning::Hash, &long[4..]).is_ok());
        assert!(check_value(&vec![0; MAX_VALUE_LEN]).is_ok());
        assert!(check_value(&vec![0; MAX_VALUE_LEN + 1]).is_err());
    }

    #[test]
    fn stale_reads_need_a_timestamp() {
        assert!(ReadOptions::stale(0).to_proto().is_err());
        let read = ReadOptions::stale(42).to_proto().ok();
        assert_eq!(read.map(|read| (read.mode, read.read_ts)), Some((2, 42)));
        assert_eq!(ReadOptions::follower().access(), Access::AnyReplica);
        assert_eq!(ReadOptions::default().access(), Access::Leader);
    }
}
